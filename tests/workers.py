"""Functions run on every rank of a spawned gloo world (see tests/dist.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _full_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w_rows": torch.randn(16, 12, generator=g),                     # Shard(0), even
        "w_cols": torch.randn(10, 9, generator=g).to(torch.bfloat16),   # Shard(1), uneven
        "w_odd": torch.randn(7, 3, generator=g),                        # Shard(0), uneven
        "replicated": torch.randn(5, 5, generator=g),
        "counter": torch.arange(20, dtype=torch.int64),
    }


def _rank_value(r: int, seed: int) -> torch.Tensor:
    return torch.full((4, 3), float(r * 100 + seed))


def sharded_state_dict(world: int, seed: int, *, zero: bool = False) -> dict[str, Any]:
    """DTensor shards on a CPU mesh, replicated tensors, rank-distinct keys, non-tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = _full_tensors(seed)
    if zero:
        full = {k: torch.zeros_like(v) for k, v in full.items()}
    rank = dist.get_rank()
    sd: dict[str, Any] = {
        "model": {
            "w_rows": distribute_tensor(full["w_rows"], mesh, [Shard(0)]),
            "w_cols": distribute_tensor(full["w_cols"], mesh, [Shard(1)]),
            "w_odd": distribute_tensor(full["w_odd"], mesh, [Shard(0)]),
            "replicated": full["replicated"],
            "counter": full["counter"],
        },
        "step": 0 if zero else 100 + seed,
        f"rank{rank}": torch.zeros(4, 3) if zero else _rank_value(rank, seed),
    }
    return sd


def save_sharded(rank: int, world: int, uri: str, options: dict, seed: int) -> list[str]:
    """Save the sharded state dict; return this rank's data objects."""
    import cloudckpt

    cloudckpt.save(sharded_state_dict(world, seed), uri, **options)
    return [k for k in cloudckpt.storage_reader(uri, **options).store.list(
        cloudckpt.parse_uri(uri).key("")) if k.key.endswith(f"__{rank}_0.distcp")]


def load_sharded(rank: int, world: int, uri: str, options: dict, seed: int, saved_world: int) -> bool:
    """Load into a (possibly different) world size and compare exactly with what was saved."""
    import cloudckpt

    sd = sharded_state_dict(world, seed, zero=True)
    # Any rank can read any saved rank's private key: load all of them.
    for r in range(saved_world):
        sd[f"rank{r}"] = torch.zeros(4, 3)
    if f"rank{rank}" not in sd:
        sd[f"rank{rank}"] = torch.zeros(4, 3)
    sd = {k: v for k, v in sd.items() if not k.startswith("rank") or int(k[4:]) < saved_world}
    cloudckpt.load(sd, uri, **options)
    full = _full_tensors(seed)
    for name in ("w_rows", "w_cols", "w_odd"):
        got = sd["model"][name].full_tensor()
        assert torch.equal(got, full[name]), f"{name} differs after load on rank {rank}"
        assert got.dtype == full[name].dtype
    assert torch.equal(sd["model"]["replicated"], full["replicated"])
    assert torch.equal(sd["model"]["counter"], full["counter"])
    assert sd["step"] == 100 + seed
    for r in range(saved_world):
        assert torch.equal(sd[f"rank{r}"], _rank_value(r, seed)), f"rank{r} differs"
    return True


def save_expect_failure(rank: int, world: int, uri: str, options: dict, bad_rank: int, bad_options: dict) -> str:
    """Every rank saves; ``bad_rank`` uses ``bad_options`` (e.g. an unreachable endpoint)."""
    import cloudckpt

    opts = bad_options if rank == bad_rank else options
    sd = {f"big{rank}": torch.randn(3_000_000), "shared": torch.randn(1000)}
    try:
        cloudckpt.save(sd, uri, **opts)
    except BaseException as exc:  # noqa: BLE001 - we report what every rank saw
        return type(exc).__name__
    return "no error"
