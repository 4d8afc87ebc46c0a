"""Run a function on N real processes joined in a gloo process group.

Processes are spawned (not forked) and rendezvous through a file in a temp
dir, so there is no free-port race. The function must live in an importable
module (tests.workers). Every rank's return value comes back to the caller;
an exception on any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any


def _entry(rank: int, world_size: int, init_file: str, fn: Callable[..., Any], args: tuple, out: Any) -> None:
    import torch.distributed as dist

    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        out.put((rank, True, result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_world(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 180.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results by rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, out), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results) - set(errors))} "
                                       f"did not finish within {timeout} s")
                try:
                    rank, ok, value = out.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)
                            and i not in results and i not in errors]
                    if dead:
                        raise RuntimeError(f"ranks {dead} died with exit codes {[procs[i].exitcode for i in dead]}")
                    continue
                (results if ok else errors)[rank] = value
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        rank = min(errors)
        raise AssertionError(f"rank {rank} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]


def run_world_with_deaths(world_size: int, fn: Callable[..., Any], *args: Any, expect_dead: set[int],
                          timeout: float = 180.0) -> tuple[dict[int, Any], dict[int, int]]:
    """Like :func:`run_world`, for worlds where the ranks in ``expect_dead`` kill themselves.

    Returns ``(results of the other ranks, exit codes of the dead ranks)``. Fails
    if an expected rank does not die, if any other rank dies or raises, or if
    the world is not done within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, out), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        dead: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) + len(dead) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(results) - set(errors) - set(dead))
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout} s")
                try:
                    rank, ok, value = out.get(timeout=min(remaining, 0.5))
                    (results if ok else errors)[rank] = value
                except queue.Empty:
                    pass
                for i, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and i not in results and i not in errors and i not in dead:
                        dead[i] = p.exitcode
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        rank = min(errors)
        raise AssertionError(f"rank {rank} failed:\n{errors[rank]}")
    if set(dead) != set(expect_dead):
        raise AssertionError(f"expected ranks {sorted(expect_dead)} to die, but ranks {sorted(dead)} died "
                             f"(exit codes {dead}); results: {results}")
    return results, dead


# -- worlds that are signalled while they run ------------------------------------------------------------


def wait_for_files(directory: str, name: str, ranks: range, timeout: float, poll: float = 0.005) -> dict[int, int]:
    """pid by rank, once every rank of ``ranks`` wrote ``{directory}/{name}.{rank}`` (holding its pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        paths = {r: os.path.join(directory, f"{name}.{r}") for r in ranks}
        if all(os.path.exists(p) for p in paths.values()):
            return {r: int(open(p).read()) for r, p in paths.items()}
        time.sleep(poll)
    raise TimeoutError(f"ranks did not reach {name!r} within {timeout} s")


def _store_entry(rank: int, world: int, port: int, store_timeout: float, fn: Callable[..., Any], cfg: dict,
                 out: Any) -> None:
    """Child: ``cfg["env"]``, gloo through the parent's TCPStore, ``fn(rank, world, cfg)``; exit 1 on error."""
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update(cfg.get("env", {}))
    torch.set_num_threads(1)
    try:
        timeout = datetime.timedelta(seconds=store_timeout)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            out.put((rank, True, fn(rank, world, cfg)))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def run_signalled_world(fn: Callable[..., Any], world: int, cfg: dict, act: Callable[[dict[int, int], str], None],
                        *, timeout: float, store_timeout: float, ready_timeout: float,
                        join_timeout: float) -> list[Any]:
    """Spawn ``world`` ranks running ``fn(rank, world, cfg)``; once every rank wrote ``ready.<rank>`` into
    ``cfg["ready_dir"]``, call ``act(pids, ready_dir)`` (send signals, arm servers...); every rank must then
    report success and exit 0. The parent hosts the rendezvous TCPStore (port 0: no port race)."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size=world + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=store_timeout))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_store_entry, args=(r, world, store.port, store_timeout, fn, cfg, out))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        act(wait_for_files(cfg["ready_dir"], "ready", range(world), ready_timeout), cfg["ready_dir"])
        deadline = time.monotonic() + timeout
        while len(results) < world:
            try:
                rank, ok, value = out.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                assert not dead, f"ranks {dead} died: exit codes {[procs[r].exitcode for r in dead]}"
                assert time.monotonic() < deadline, f"ranks {sorted(set(range(world)) - set(results))} hung"
                continue
            assert ok, f"rank {rank} failed:\n{value}"
            results[rank] = value
        for p in procs:
            p.join(join_timeout)
        assert [p.exitcode for p in procs] == [0] * world
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
