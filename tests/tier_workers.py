"""Rank functions for tests/test_tiers.py (multi-tier checkpoints), run by tests.dist.run_world.

Each "node" is a group of ranks with its own local_dir and torchrun-style
environment (GROUP_RANK, LOCAL_RANK, LOCAL_WORLD_SIZE), set per rank here.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist

ROWS, COLS = 8, 6


def node_env(rank: int, local_world: int, base: str) -> str:
    """Set torchrun's node variables for ``rank``; return its node's local_dir."""
    node = rank // local_world
    os.environ.update(GROUP_RANK=str(node), LOCAL_RANK=str(rank % local_world), LOCAL_WORLD_SIZE=str(local_world))
    return os.path.join(base, f"node{node}")


def full_tensor(step: int) -> torch.Tensor:
    """The unsharded value of ``w`` at ``step``."""
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + 1000.0 * step


def make_state(step: int, world: int) -> dict[str, Any]:
    """A state dict with a row-sharded DTensor, a replicated tensor and a non-tensor value."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    return {"w": distribute_tensor(full_tensor(step), mesh, [Shard(0)]),
            "b": torch.full((5,), float(step)), "step": step}


def check_state(state: dict[str, Any], step: int, rank: int, world: int) -> None:
    """Assert ``state`` holds exactly the values of ``step`` for this rank's shard."""
    want = torch.chunk(full_tensor(step), world, dim=0)[rank]
    assert torch.equal(state["w"].to_local(), want), (rank, step, state["w"].to_local(), want)
    assert torch.equal(state["b"], torch.full((5,), float(step))), state["b"]
    assert state["step"] == step, state["step"]


def manager(cfg: dict[str, Any], local_dir: str, **overrides: Any) -> Any:
    """A tiered CheckpointManager as the tests configure it (``overrides`` replace its arguments)."""
    import cloudckpt

    kw: dict[str, Any] = dict(keep_last=3, local_dir=local_dir, local_every=1, persist_every=5, keep_local=2,
                              replicas=1, preemption=False)
    kw.update(overrides)
    return cloudckpt.CheckpointManager(cfg["root"], **kw, **cfg.get("store", {}))


def async_save_with_processes(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Async-save steps 1..cfg['last'] through a ProcessCheckpointExecutor; report handles and local dirs."""
    from cloudckpt import ProcessCheckpointExecutor

    local_dir = node_env(rank, cfg["local_world"], cfg["base"])
    executor = ProcessCheckpointExecutor()
    mgr = manager(cfg, local_dir, executor=executor)
    persisted, handles = {}, []
    try:
        for step in range(1, cfg["last"] + 1):
            state = make_state(step, world)
            handle = mgr.async_save(state, step)
            handle.staging_completion.result()
            # The state changes right after staging, as training would change it.
            state["w"].to_local().fill_(-1.0)
            state["b"].fill_(-1.0)
            if handle.persist_completion is not None:
                persisted[step] = handle
            handles.append(handle)
        mgr.close()
        children = executor.children_started
        child = executor.pid
    finally:
        executor.close()
    return {"local": sorted(os.listdir(local_dir)), "children": children, "child_pid": child,
            "pid": os.getpid(), "persisted": {s: h.persist_completion.result() for s, h in persisted.items()},
            "replicated": all(h.times.replicated_s is not None for h in handles)}


def save_steps(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Save steps 1..cfg['last'] (odd steps blocking, even ones async); report what the node dir holds."""
    local_dir = node_env(rank, cfg["local_world"], cfg["base"])
    mgr = manager(cfg, local_dir)
    persisted = {}
    for step in range(1, cfg["last"] + 1):
        state = make_state(step, world)
        if step % 2:
            mgr.save(state, step)
        else:
            handle = mgr.async_save(state, step)
            handle.staging_completion.result()
            if handle.persist_completion is not None:
                persisted[step] = handle
    mgr.close()
    return {"local": sorted(os.listdir(local_dir)),
            "persisted": {s: h.persist_completion.result() for s, h in persisted.items()},
            "partners": mgr._tiers.topology(None).partners(rank, 1)}


def _wipe(rank: int, world: int, cfg: dict[str, Any], nodes: list[int], local_dir: str) -> None:
    dist.barrier()
    if rank % cfg["local_world"] == 0 and rank // cfg["local_world"] in nodes:
        shutil.rmtree(local_dir, ignore_errors=True)
    dist.barrier()


def load_phases(rank: int, world: int, cfg: dict[str, Any]) -> list[tuple[int | None, str | None]]:
    """For each phase: wipe the listed nodes' local dirs, then a fresh manager loads; check the values."""
    local_dir = node_env(rank, cfg["local_world"], cfg["base"])
    out = []
    for wipe in cfg["phases"]:
        _wipe(rank, world, cfg, wipe, local_dir)
        mgr = manager(cfg, local_dir)
        state = make_state(0, world)
        state["step"] = -1
        step = mgr.load(state)
        check_state(state, step, rank, world)
        out.append((step, mgr.last_load_tier))
        mgr.close()
    return out


def die_while_replicating(rank: int, world: int, cfg: dict[str, Any]) -> str:
    """Save steps 1 and 2; rank cfg['victim'] exits in the middle of replicating step 3."""
    from cloudckpt import tiers

    local_dir = node_env(rank, cfg["local_world"], cfg["base"])
    mgr = manager(cfg, local_dir)
    for step in (1, 2):
        mgr.save(make_state(step, world), step)
    state = make_state(3, world)
    if rank == cfg["victim"]:
        def die(round_index: int) -> None:
            os._exit(17)
        tiers._after_round = die
    try:
        mgr.save(state, 3)
    except Exception as exc:  # noqa: BLE001 - the survivors report the failure
        return f"{type(exc).__name__}: {exc}"[:300]
    return "saved"


# -- preemption: a training loop stopped by a real signal (tests/test_tiers.py::test_sigterm_*) ----------


def _mark(directory: str, name: str, rank: int) -> None:
    path = os.path.join(directory, f"{name}.{rank}")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)


def train_until_preempted(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train (one all_reduce + sleep per step), async-save even steps, stop and emergency-save on preemption."""
    local_dir = node_env(rank, cfg["local_world"], cfg["base"])
    mgr = manager(cfg, local_dir, local_every=2, persist_every=4, preemption=True,
                  preemption_grace=cfg["grace"])
    state = make_state(0, world)
    ones = torch.ones(1)
    step, stopped = 0, False
    for step in range(1, cfg.get("max_steps", 3000) + 1):
        # "train_step": the state of step `step`, in place (the staged copy of an async save is unaffected)
        state["w"].to_local().copy_(torch.chunk(full_tensor(step), world, dim=0)[rank])
        state["b"].fill_(float(step))
        state["step"] = step
        dist.all_reduce(ones)
        time.sleep(cfg.get("sleep", 0.05))
        if step == cfg.get("ready_at", 3):
            _mark(cfg["ready_dir"], "ready", rank)
        if step % 2 == 0:
            handle = mgr.async_save(state, step)
            handle.staging_completion.result()
        if mgr.reached_preemption(step):
            mgr.save(state, step)  # the emergency checkpoint
            stopped = True
            break
    notice = mgr.preemption_notice
    mgr.close()
    return {"rank": rank, "step": step, "stopped": stopped, "source": None if notice is None else notice.source,
            "local": _committed(local_dir)}


def _committed(local_dir: str) -> list[int]:
    from cloudckpt.tiers import local_steps, read_marker

    return [s for s, p in local_steps(local_dir).items() if read_marker(p, s) is not None]
