"""Functions run on every rank of a spawned gloo world for tests/test_restore_scale.py (see tests/dist.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def replicated_state(seed: int, *, zero: bool = False) -> dict[str, Any]:
    """A DDP-style state: the same plain tensors on every rank (about 8 MiB), plus a small step counter."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {f"layer{i}.weight": torch.randn(512, 256, generator=g) for i in range(16)}
    sd["layer0.bias"] = torch.randn(256, generator=g).to(torch.bfloat16)
    sd["step"] = torch.tensor(1000 + seed)
    if zero:
        sd = {k: torch.zeros_like(v) for k, v in sd.items()}
    return sd


def save_and_load_replicated(rank: int, world: int, uri: str, save_options: dict, load_options: dict,
                             seed: int) -> bool:
    """Save the replicated state (direct to the store), then load it through ``load_options`` and compare."""
    import cloudckpt

    cloudckpt.save(replicated_state(seed), uri, **save_options)
    dist.barrier()
    sd = replicated_state(seed, zero=True)
    cloudckpt.load(sd, uri, **load_options)
    want = replicated_state(seed)
    for k, v in want.items():
        assert torch.equal(sd[k], v) and sd[k].dtype == v.dtype, f"{k} differs on rank {rank}"
    return True


def load_expect_failure(rank: int, world: int, uri: str, options: dict, bad_rank: int, bad_options: dict) -> str:
    """Every rank loads the replicated state; ``bad_rank`` cannot reach the store. Returns the error seen."""
    import cloudckpt

    sd = replicated_state(0, zero=True)
    try:
        cloudckpt.load(sd, uri, **(bad_options if rank == bad_rank else options))
    except BaseException as exc:  # noqa: BLE001 - we report what every rank saw
        return type(exc).__name__
    return "no error"


def save_replicated(rank: int, world: int, uri: str, options: dict, seed: int) -> bool:
    """Save the replicated state."""
    import cloudckpt

    cloudckpt.save(replicated_state(seed), uri, **options)
    return True
