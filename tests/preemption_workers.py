"""Training-loop ranks for tests/test_preemption.py (spawned processes, real signals, gloo).

Each rank joins a gloo group through a TCPStore hosted by the test process (as
torchrun's agent hosts one), runs the loop from issue 19 and reports through a
queue; readiness goes through files so the parent knows when to send signals.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist


def rank_tensor(rank: int, step: int, numel: int) -> torch.Tensor:
    """What rank ``rank`` holds after ``step`` steps (exact in float32 for the steps we run)."""
    return torch.arange(numel, dtype=torch.float32) % 1000 + float(step * 10 + rank)


def _state(rank: int, step: int, numel: int) -> dict[str, Any]:
    return {f"r{rank}": rank_tensor(rank, step, numel), "shared": torch.full((8,), float(step)), "step": step}


def _mark(cfg: dict, name: str, rank: int) -> None:
    path = os.path.join(cfg["ready_dir"], f"{name}.{rank}")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)


def train(rank: int, world: int, cfg: dict) -> dict[str, Any]:
    """The loop of issue 19; returns what the test checks."""
    from cloudckpt import CheckpointManager

    opts = {"endpoint_url": cfg["endpoint"], "part_size": 5 * 2**20}
    mgr = CheckpointManager(cfg["root"], keep_last=3, preemption_grace=cfg.get("grace", 25.0), **opts)
    numel = cfg["numel"]
    state = _state(rank, 0, numel)
    start = mgr.load(state) or 0
    step = start
    stopped = False
    ones = torch.ones(1)
    for step in range(start + 1, cfg.get("max_steps", 3000) + 1):
        state[f"r{rank}"].copy_(rank_tensor(rank, step, numel))  # "train_step"
        state["shared"].fill_(float(step))
        state["step"] = step
        dist.all_reduce(ones)  # synchronous data parallelism: one collective per step
        time.sleep(cfg.get("sleep", 0.03))
        if step == cfg.get("ready_at", 3):
            _mark(cfg, "ready", rank)
        if step % cfg.get("every", 5) == 0:
            mgr.async_save(state, step)
            if cfg.get("mark_async"):
                _mark(cfg, f"async{step}", rank)
        if mgr.reached_preemption(step):
            _mark(cfg, "saving", rank)
            mgr.save(state, step)
            stopped = True
            break
    notice = mgr.preemption_notice
    mgr.close()
    # Verify from a fresh manager, as the next job would: latest committed step, exact values.
    check = CheckpointManager(cfg["root"], preemption=False, **opts)
    latest = check.latest()
    target = _state(rank, 0, numel)
    target[f"r{rank}"].zero_()
    loaded = check.load(target)
    exact = (loaded is not None and torch.equal(target[f"r{rank}"], rank_tensor(rank, loaded, numel))
             and torch.equal(target["shared"], torch.full((8,), float(loaded))) and target["step"] == loaded)
    uploads = len(check.store.list_multipart_uploads(check.root.key(""))) if rank == 0 else 0
    steps = check.steps()
    check.close()
    return {"rank": rank, "step": step, "stopped": stopped, "latest": latest, "loaded": loaded, "exact": exact,
            "source": None if notice is None else notice.source, "steps": steps,
            "open_uploads": uploads}
