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
        cloudckpt.parse_uri(uri).key("")) if (cloudckpt.layout.parse_data_object_name(k.key) or (None,))[0] == rank]


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


def _executor(kind: str, **kwargs: Any) -> Any:
    from cloudckpt.executors import ProcessCheckpointExecutor, ThreadCheckpointExecutor

    return (ProcessCheckpointExecutor if kind == "process" else ThreadCheckpointExecutor)(**kwargs)


def _live_threads() -> set:
    import threading

    return set(threading.enumerate())


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _reinit_on_tcpstore(rank: int, world: int) -> Any:
    """Move the default group onto a TCPStore (rank 0 binds port 0); returns the store to keep alive."""
    master = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False) if rank == 0 else None
    port = [master.port if master is not None else None]
    dist.broadcast_object_list(port, src=0)
    dist.barrier()
    dist.destroy_process_group()
    store = master if master is not None else dist.TCPStore("127.0.0.1", port[0], world, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    return store


def repeated_async_saves(rank: int, world: int, targets: list, kinds: list, n: int, bad_target: list) -> dict:
    """For each executor kind: ``n`` async saves per target while a 'training loop' mutates the tensors
    (each checkpoint must hold exactly the values of its own save call), then one save that fails on
    rank 1 only (``bad_target``: a proxy refusing rank 1's objects), then one more good save, all on
    one executor. The default group runs on a TCPStore, which the process executor rendezvouses through."""
    store = _reinit_on_tcpstore(rank, world)
    out = {kind: _repeated_async_saves(rank, world, targets, kind, n, bad_target) for kind in kinds}
    out["trainer_port"] = store.port
    return out


def _repeated_async_saves(rank: int, world: int, targets: list, kind: str, n: int, bad_target: list) -> dict:
    import cloudckpt
    from cloudckpt.api import async_save
    from cloudckpt.staging import Stager

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    ex = _executor(kind)
    stager = Stager(shared_memory=ex.needs_shared_memory)
    w = torch.zeros(256, 64)
    shared = torch.zeros(100)
    mesh = init_device_mesh("cpu", (world,))
    sharded = distribute_tensor(torch.zeros(4 * world, 8), mesh, [Shard(0)])  # a DTensor, as FSDP2 gives
    uploads = []
    saved = []
    pids = set()
    threads_first = children_first = None
    for step in range(n * len(targets)):
        root, options = targets[step % len(targets)]
        root = f"{root}/{kind}"
        w.fill_(step * 10 + rank)          # the training step that this checkpoint must capture
        shared.fill_(float(step))
        sharded.to_local().fill_(float(step * 10 + rank))
        sd = {f"w{rank}": w, "shared": shared, "step": step, "sharded": sharded}
        resp = async_save(sd, checkpoint_id=f"{root}/step-{step}", executor=ex, stager=stager, **options)
        resp.staging_completion.result()
        for _ in range(3):                 # training goes on while the upload runs
            w.add_(1000.0)
            shared.add_(1000.0)
            sharded.to_local().add_(1000.0)
        uploads.append(resp.upload_completion)
        saved.append((root, options, step))
        if kind == "process":
            pids.add(ex.pid)
        if step == 0:
            resp.upload_completion.result(timeout=120)
            threads_first, children_first = _live_threads(), _child_pids()
    for f in uploads:
        f.result(timeout=120)
    threads_last, children_last = _live_threads(), _child_pids()
    for root, options, step in saved:
        t = {f"w{r}": torch.empty(256, 64) for r in range(world)}
        t.update({"shared": torch.empty(100), "step": -1,
                  "sharded": distribute_tensor(torch.zeros(4 * world, 8), mesh, [Shard(0)])})
        cloudckpt.load(t, f"{root}/step-{step}", **options)
        full = t["sharded"].full_tensor()
        for r in range(world):
            assert torch.equal(t[f"w{r}"], torch.full((256, 64), float(step * 10 + r))), (kind, step, r)
            assert torch.equal(full[4 * r:4 * r + 4], torch.full((4, 8), float(step * 10 + r))), (kind, step, r)
        assert torch.equal(t["shared"], torch.full((100,), float(step))) and t["step"] == step, (kind, step)
    # A failure on rank 1 only must reach every rank's future as rank 1's real (typed) error.
    bad_root, bad_options = bad_target
    resp = async_save({f"w{rank}": w}, checkpoint_id=f"{bad_root}/{kind}", executor=ex, stager=stager,
                      **bad_options)
    try:
        resp.upload_completion.result(timeout=120)
        bad_outcome, bad_detail = "committed", ""
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        bad_outcome, bad_detail = type(exc).__name__, str(exc)[:300]
    # ... and the executor stays usable, with the same worker.
    root, options = targets[0]
    w.fill_(7.0)
    async_save({f"w{rank}": w}, checkpoint_id=f"{root}/{kind}/after-error", executor=ex, stager=stager,
               **options).upload_completion.result(timeout=120)
    t = {f"w{rank}": torch.empty(256, 64)}
    cloudckpt.load(t, f"{root}/{kind}/after-error", **options)
    assert torch.equal(t[f"w{rank}"], torch.full((256, 64), 7.0))
    worker = ex.worker_thread
    addr = getattr(ex, "_addr", None)
    ex.close()
    ex.close()  # twice is harmless
    stager.close()
    return {"saves": ex.saves_started, "children": getattr(ex, "children_started", 0), "pids": len(pids),
            "new_threads": sorted(t.name for t in threads_last - threads_first),
            "new_children": sorted(children_last - children_first),
            "worker_alive_after_close": worker.is_alive(),
            "bad_outcome": bad_outcome, "bad_detail": bad_detail,
            "child_store_port": addr.port if addr is not None else None,
            "own_store": getattr(ex, "_server_store", None) is not None}


def crash_child_mid_upload(rank: int, world: int, uri: str, slow_options: dict, options: dict,
                           kill_rank: int, next_uri: str) -> dict:
    """SIGKILL one rank's checkpoint process while its multipart upload is open; every rank must fail fast.

    ``slow_options`` may carry ``prefix_strategy``: the kill waits for an upload under that rank's prefix.
    """
    import os
    import signal
    import time

    import cloudckpt
    from cloudckpt.executors import ProcessCheckpointExecutor
    from cloudckpt.api import async_save
    from cloudckpt.store import open_store

    ex = ProcessCheckpointExecutor(poll_interval=0.2)
    resp = async_save({f"big{rank}": torch.randn(3_000_000)}, checkpoint_id=uri, executor=ex, **slow_options)
    resp.staging_completion.result()
    if rank == kill_rank:
        # Kill only once the upload is really under way: a multipart upload is open (its parts stall).
        from cloudckpt.layout import rank_prefix

        strategy = slow_options.get("prefix_strategy", "none")
        store, prefix = open_store(uri, **options), cloudckpt.parse_uri(uri).key(rank_prefix(rank, strategy))
        deadline = time.monotonic() + 90
        while not store.list_multipart_uploads(prefix):
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.1)
        os.kill(ex.pid, signal.SIGKILL)
    start = time.monotonic()
    try:
        resp.upload_completion.result(timeout=90)
        outcome, detail = "committed", ""
    except BaseException as exc:  # noqa: BLE001
        outcome, detail = type(exc).__name__, str(exc)[:500]
    elapsed = time.monotonic() - start
    # The executor recovers: the next save starts fresh children and succeeds.
    resp2 = async_save({"after": torch.arange(4)}, checkpoint_id=next_uri, executor=ex, **options)
    resp2.upload_completion.result(timeout=120)
    t = {"after": torch.empty(4, dtype=torch.int64)}
    cloudckpt.load(t, next_uri, **options)
    assert torch.equal(t["after"], torch.arange(4))
    ex.close()
    return {"outcome": outcome, "detail": detail, "elapsed": elapsed, "children": ex.children_started}


def _shm_mapping(ptr: int) -> tuple[str, int, int, str] | None:
    """(device, inode, file offset of ``ptr``, path) of the mapping of this process that holds address ``ptr``."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                path = fields[5].strip() if len(fields) > 5 else ""
                return fields[3], int(fields[4]), int(fields[2], 16) + (ptr - lo), path
    return None


try:
    from cloudckpt.writer import S3StorageWriter as _S3StorageWriter
except ImportError:  # pragma: no cover - the package itself is broken then
    _S3StorageWriter = object  # type: ignore[assignment,misc]


class ProbeS3Writer(_S3StorageWriter):  # type: ignore[misc,valid-type]
    """An S3 writer that records, in the process that uploads, what it received: its pid, whether it
    arrived holding a live store, and which memory mapping backs each tensor it writes (JSON at ``probe``)."""

    def __init__(self, *args: Any, probe: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe = probe
        self.arrived_with_store: bool | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        # Only the first reset after __init__ (that is: in the uploading process) is recorded.
        if getattr(self, "arrived_with_store", "constructing") is None:
            self.arrived_with_store = self._store is not None
        super().reset(checkpoint_id)

    def write_data(self, plan: Any, planner: Any) -> Any:
        import json
        import os

        from torch.distributed.checkpoint.planner import WriteItemType

        tensors = {}
        for item in plan.items:
            if item.type != WriteItemType.BYTE_IO:
                t = planner.resolve_data(item)
                storage = t.untyped_storage()
                tensors[item.index.fqn] = {"ptr": storage.data_ptr(), "shared": storage.is_shared(),
                                           "mapping": _shm_mapping(storage.data_ptr())}
        with open(self.probe, "w") as f:
            json.dump({"pid": os.getpid(), "arrived_with_store": self.arrived_with_store, "tensors": tensors}, f)
        return super().write_data(plan, planner)


def manager_rounds(rank: int, world: int, root: str, options: dict, n: int) -> dict:
    """n async saves through a CheckpointManager(keep_last=2), then delete and resume; report what each rank saw."""
    import cloudckpt

    mgr = cloudckpt.CheckpointManager(root, keep_last=2, **options)
    w = torch.zeros(64, 8)
    shared = torch.zeros(10)
    for step in range(1, n + 1):
        w.fill_(step * 10 + rank)
        shared.fill_(float(step))
        mgr.async_save({f"w{rank}": w, "shared": shared, "step": step}, step)
        w.fill_(-1.0)                      # training goes on while the upload runs
    mgr.wait()
    after_saves = mgr.steps()              # retention ran on rank 0 before any rank's upload completed
    if rank == 1:
        mgr.delete(after_saves[0])         # a no-op off rank 0
    dist.barrier()
    after_rank1_delete = mgr.steps()
    dist.barrier()
    if rank == 0:
        mgr.delete(after_saves[0])
    dist.barrier()
    after_rank0_delete = mgr.steps()
    mgr.close()
    fresh = cloudckpt.CheckpointManager(root, **options)
    target = {f"w{r}": torch.empty(64, 8) for r in range(world)}
    target.update({"shared": torch.empty(10), "step": -1})
    resumed = fresh.load(target)          # the one-line resume
    ok = all(torch.equal(target[f"w{r}"], torch.full((64, 8), float(n * 10 + r))) for r in range(world))
    ok = ok and torch.equal(target["shared"], torch.full((10,), float(n))) and target["step"] == n
    fresh.close()
    return {"after_saves": after_saves, "after_rank1_delete": after_rank1_delete,
            "after_rank0_delete": after_rank0_delete, "resumed": resumed, "values_ok": ok}


def save_twice_then_die(rank: int, world: int, root: str, options: dict, die_rank: int, die_after: float) -> dict:
    """Commit step 1, then save step 2 while ``die_rank`` SIGKILLs itself mid-upload (its parts stall).

    The surviving ranks report how step 2 failed and how long after the death.
    """
    import os
    import signal
    import threading
    import time

    import cloudckpt
    from cloudckpt.manager import step_name

    def state(step: int) -> dict:
        return {f"big{rank}": torch.full((1_600_000,), float(step * 10 + rank)), "step": step}

    cloudckpt.save(state(1), f"{root}/{step_name(1)}", **options)
    dist.barrier()
    if rank == die_rank:
        threading.Timer(die_after, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    start = time.monotonic()
    try:
        cloudckpt.save(state(2), f"{root}/{step_name(2)}", **options)
        outcome = "committed"
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        outcome = type(exc).__name__
    return {"outcome": outcome, "after_death": time.monotonic() - start - die_after}


def save_under_faults(rank: int, world: int, uri: str, options: dict, bad_rank: int, bad_options: dict) -> dict:
    """Every rank saves a multipart object; ``bad_rank`` goes through a proxy failing its requests."""
    import time

    import cloudckpt

    opts = bad_options if rank == bad_rank else options
    start = time.monotonic()
    try:
        cloudckpt.save({f"big{rank}": torch.randn(1_600_000)}, uri, **opts)
        outcome = "committed"
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        outcome = type(exc).__name__
    return {"outcome": outcome, "elapsed": time.monotonic() - start}


# -- scale (tests/test_scale.py) -------------------------------------------------------------------


def scale_save_load(rank: int, world: int, uri: str, options: dict, strategy: Any) -> dict:
    """Save a small sharded state dict with ``prefix_strategy=strategy``, then load it back in the same world."""
    import cloudckpt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(11)
    full = torch.randn(4 * world, 6, generator=g)
    shared = torch.arange(10, dtype=torch.int64)
    sd = {"w": distribute_tensor(full, mesh, [Shard(0)]), "shared": shared,
          f"own{rank}": torch.full((3,), float(rank)), "step": 5}
    writer = cloudckpt.storage_writer(uri, prefix_strategy=strategy, **options)
    cloudckpt.save(sd, uri, storage_writer=writer)
    dist.barrier()
    other = (rank + 1) % world  # another rank's private key: reads cross ranks
    out = {"w": distribute_tensor(torch.zeros_like(full), mesh, [Shard(0)]),
           "shared": torch.zeros(10, dtype=torch.int64), f"own{other}": torch.zeros(3), "step": -1}
    cloudckpt.load(out, uri, **options)
    ok = (torch.equal(out["w"].full_tensor(), full) and torch.equal(out["shared"], shared) and out["step"] == 5
          and torch.equal(out[f"own{other}"], torch.full((3,), float(other))))
    pacing = writer.last_pacing
    return {"ok": bool(ok), "world_size": pacing.world_size, "rate_per_rank": pacing.rate_per_rank}


def throttled_save(rank: int, world: int, uri: str, options: dict, transfer: dict) -> dict:
    """Each rank saves 30 MiB with TransferOptions(**transfer); report the outcome and the rank's counters."""
    import time

    import cloudckpt
    from cloudckpt.transfer import TransferOptions

    mib = 1 << 20
    t = torch.arange(30 * mib // 4, dtype=torch.float32) + rank  # 30 MiB: 7 parts of 5 MiB
    writer = cloudckpt.storage_writer(uri, transfer_options=TransferOptions(**transfer), **options)
    start = time.monotonic()
    try:
        cloudckpt.save({f"w{rank}": t}, uri, storage_writer=writer)
        outcome = "committed"
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        outcome = type(exc).__name__
    elapsed = time.monotonic() - start
    loaded = None
    if outcome == "committed":
        out = {f"w{rank}": torch.empty_like(t)}
        cloudckpt.load(out, uri, **options)
        loaded = bool(torch.equal(out[f"w{rank}"], t))
    pacing = writer.last_pacing
    return {"outcome": outcome, "elapsed": elapsed, "loaded": loaded, "stats": writer.last_transfer_stats,
            "rate_per_rank": None if pacing is None else pacing.rate_per_rank,
            "requests": None if pacing is None else pacing.requests}


def throttled_saves(rank: int, world: int, cases: list) -> list[dict]:
    """:func:`throttled_save` for each ``(uri, options, transfer)`` in turn, in one world (one spawn)."""
    out = []
    for uri, options, transfer in cases:
        out.append(throttled_save(rank, world, uri, options, transfer))
        dist.barrier()
    return out
