"""Async checkpoint executors: DCP's ``_AsyncCheckpointExecutor``, reusable, thread or process.

Both executors implement torch's ``_AsyncCheckpointExecutor.execute_save`` and
fix the weaknesses of torch's own (docs/executors.md):

* they are long-lived and reused across saves: one worker thread per executor,
  plus (process executor) one persistent child process per rank; ``close()`` is
  idempotent, they work as context managers and close themselves at exit;
* at most one save is in flight per executor: a new save waits for the previous
  upload (``on_busy="wait"``) or raises (``on_busy="raise"``), so staging
  buffers are never overwritten while they upload;
* the process executor's children join their own gloo group through the
  trainer's TCPStore (or a TCPStore that rank 0 binds to port 0 itself), so
  there is no free-port race; staged tensors reach the child as shared-memory
  file descriptors (no copy); writers travel as plain picklable descriptions
  and the child builds its own storage clients;
* nothing waits forever: a dead child fails the future within about
  ``poll_interval`` seconds, and it raises an abort flag in the store that makes
  every other rank stop its own child (stuck in a collective with the dead one)
  instead of sitting in that collective until a timeout.
"""

from __future__ import annotations

import atexit
import copy
import datetime as _dt
import logging
import os
import pickle
import queue
import signal
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._async_executor import _AsyncCheckpointExecutor

from cloudckpt.errors import (
    CheckpointAbortedError,
    CheckpointInProgressError,
    CheckpointWorkerError,
    CloudCheckpointError,
    UnpicklableWriterError,
    UnsupportedTensorError,
    typed_errors,
)

__all__ = ["ThreadCheckpointExecutor", "ProcessCheckpointExecutor"]

log = logging.getLogger(__name__)

_ON_BUSY = ("wait", "raise")


def _resolve(staged: Any) -> Any:
    return staged.result() if isinstance(staged, Future) else staged


def _run_save(staged: Any, kwargs: dict[str, Any]) -> Any:
    import torch.distributed.checkpoint as dcp

    # Same errors as cloudckpt.save: the cloudckpt error of the lowest failing
    # rank, with DCP's CheckpointException (every rank's failure) as its cause.
    with typed_errors():
        return dcp.save(_resolve(staged), **kwargs)


class _Worker:
    """One long-lived daemon thread that runs jobs one at a time, in order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[tuple[Future, Callable[[], Any]] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - CheckpointException is a BaseException
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            del fut, fn, job  # drop staged tensors before waiting for the next job

    def submit(self, fut: Future, fn: Callable[[], Any]) -> None:
        """Queue ``fn``; its result or exception completes ``fut``."""
        self._jobs.put((fut, fn))

    def stop(self, timeout: float | None) -> bool:
        """Let queued jobs finish, then end the thread; True if it ended within ``timeout``."""
        self._jobs.put(None)
        if threading.current_thread() is self.thread:
            return True  # called from a job's done-callback: the loop ends after it
        self.thread.join(timeout)
        return not self.thread.is_alive()


def _close_at_exit(ref: weakref.ref[_BaseExecutor], timeout: float) -> None:
    executor = ref()
    if executor is not None:
        try:
            executor.close(timeout=timeout)
        except Exception:
            log.warning("closing %r at exit failed", executor, exc_info=True)


class _BaseExecutor(_AsyncCheckpointExecutor):
    """In-flight bookkeeping, close() and context-manager use shared by both executors."""

    #: Whether staged tensors should live in shared memory for this executor.
    needs_shared_memory: ClassVar[bool] = False
    #: Seconds that close() at interpreter exit waits for an in-flight save.
    exit_timeout: ClassVar[float] = 30.0

    def __init__(self, *, on_busy: str = "wait") -> None:
        if on_busy not in _ON_BUSY:
            raise ValueError(f"on_busy must be one of {_ON_BUSY}, got {on_busy!r}")
        self.on_busy = on_busy
        self._inflight: Future | None = None
        self._closed = False
        #: Number of saves handed to this executor.
        self.saves_started = 0
        self._worker = _Worker(f"cloudckpt-{type(self).__name__}")
        # A per-instance callable (atexit.unregister removes every registration of
        # a function) holding only a weak reference, so the executor can be freed.
        ref, timeout = weakref.ref(self), self.exit_timeout
        self._exit_hook = lambda: _close_at_exit(ref, timeout)
        atexit.register(self._exit_hook)

    @property
    def worker_thread(self) -> threading.Thread:
        """The executor's one long-lived worker thread (the same for every save)."""
        return self._worker.thread

    @property
    def busy(self) -> bool:
        """True while a save's upload is still running."""
        return self._inflight is not None and not self._inflight.done()

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until the previous save finished; its outcome is not raised here (its future has it)."""
        fut = self._inflight
        if fut is not None:
            try:
                fut.exception(timeout=timeout)
            except TimeoutError:
                raise
            except BaseException:  # noqa: BLE001 - the caller of that save sees it
                pass

    def _admit(self) -> None:
        """Refuse when closed; wait for (or refuse during) the previous upload."""
        if self._closed:
            raise CheckpointWorkerError(f"{type(self).__name__} is closed; create a new executor")
        if self.busy:
            if self.on_busy == "raise":
                raise CheckpointInProgressError(
                    "the previous checkpoint is still uploading; wait for its upload_completion future, "
                    "or create the executor with on_busy='wait'"
                )
            self.wait_idle()

    def _start(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        self._inflight = fut
        self.saves_started += 1
        self._worker.submit(fut, fn)
        return fut

    def _mark_closed(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        atexit.unregister(self._exit_hook)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker (idempotent); waits up to ``timeout`` s for an in-flight save."""
        raise NotImplementedError

    # -- preemption: stop the in-flight save -------------------------------------------------
    def abort(self, reason: str = "aborted by the caller", timeout: float | None = 30.0) -> bool:
        """Stop the in-flight save before it commits, where this executor can; True once none runs.

        A save on the thread executor cannot be interrupted from outside its
        thread: its writer must stop itself (CheckpointManager's writers stop
        sending requests once their handle's ``abort_event`` is set, which fails
        the save on every rank before the commit). This waits up to ``timeout``
        seconds for the save to end, whatever its outcome (its future has it).
        """
        try:
            self.wait_idle(timeout)
        except TimeoutError:
            return False
        return True

    def __enter__(self) -> _BaseExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# Thread executor
# --------------------------------------------------------------------------------------


class ThreadCheckpointExecutor(_BaseExecutor):
    """Runs uploads on one long-lived background thread.

    With a process group, the save's collectives run on a dedicated gloo group
    (created once, at the first save, by every member rank) rather than on the
    trainer's group, so they never interleave with the training loop's own
    collectives. ``collective_timeout`` bounds how long a save waits for a rank
    that stopped answering. ``on_busy`` says what a save does while the previous
    one still uploads: ``"wait"`` for it, or ``"raise"``
    :class:`~cloudckpt.errors.CheckpointInProgressError`.
    """

    def __init__(self, *, on_busy: str = "wait", dedicated_group: bool = True,
                 collective_timeout: float = 600.0) -> None:
        super().__init__(on_busy=on_busy)
        self.dedicated_group = dedicated_group
        self.collective_timeout = collective_timeout
        self._groups: dict[Any, Any] = {}

    def _group_for(self, process_group: Any, no_dist: bool) -> Any:
        if no_dist or not self.dedicated_group or not (dist.is_available() and dist.is_initialized()):
            return process_group
        key = "default" if process_group is None else process_group
        if key not in self._groups:
            timeout = _dt.timedelta(seconds=self.collective_timeout)
            if process_group is None:
                group = dist.new_group(backend="gloo", timeout=timeout)
            else:
                # Only the members call this, so no other rank has to take part.
                group = dist.new_group(ranks=dist.get_process_group_ranks(process_group), backend="gloo",
                                       timeout=timeout, use_local_synchronization=True)
            self._groups[key] = group
        return self._groups[key]

    def execute_save(self, staging_future_or_state_dict: Any, *, checkpoint_id: Any = None,
                     storage_writer: Any = None, planner: Any = None, process_group: Any = None,
                     no_dist: bool = False, use_collectives: bool = True, **kwargs: Any) -> Future:
        """Queue a save on the worker thread; returns a Future of the DCP ``Metadata``."""
        self._admit()
        group = self._group_for(process_group, no_dist)
        save_kwargs = dict(checkpoint_id=checkpoint_id, storage_writer=storage_writer, planner=planner,
                           process_group=group, no_dist=no_dist, use_collectives=use_collectives, **kwargs)
        staged = staging_future_or_state_dict
        return self._start(lambda: _run_save(staged, save_kwargs))

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued save (up to ``timeout`` s) and stop the thread; safe to call twice."""
        if not self._mark_closed():
            return
        if self._worker.stop(timeout):
            for group in self._groups.values():
                try:
                    dist.destroy_process_group(group)
                except Exception:  # noqa: BLE001 - the world may already be gone
                    pass
        self._groups.clear()


# --------------------------------------------------------------------------------------
# Process executor
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StoreAddress:
    """Where the children rendezvous, and the key prefix that is this executor's own."""

    host: str
    port: int
    prefix: str


@dataclass(frozen=True)
class _SaveContext:
    """What the monitor needs to know about one save."""

    seq: int
    rank: int
    distributed: bool
    checkpoint_id: Any
    request: bytes
    #: The save id pinned on the writer sent to the child (None: not a cloudckpt writer);
    #: the parent finds the child's uploads by the token it puts in their names.
    save_id: str | None = None

    @property
    def abort_key(self) -> str:
        return f"abort/save{self.seq}"


class _Child:
    """One checkpoint child process and the parent's end of its pipe."""

    def __init__(self, proc: Any, conn: Any, generation: int) -> None:
        self.proc = proc
        self.conn = conn
        self.generation = generation
        self.ready = False

    def kill(self, timeout: float = 10.0) -> None:
        """Kill the process (if still alive), reap it and close the pipe."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout)
        try:
            self.conn.close()
        except OSError:
            pass


def _watch_parent(parent_pid: int) -> None:
    # A SIGKILLed trainer cannot stop its child: the child notices it was
    # re-parented and exits rather than uploading (or waiting) for nobody.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(70)


def _child_main(conn: Any, parent_pid: int, rank: int, world_size: int, addr: _StoreAddress | None,
                generation: int, collective_timeout: float, torch_threads: int, nice: int) -> None:
    """Entry point of the checkpoint child: join the child gloo group, then serve saves until told to stop."""
    import torch.multiprocessing

    if nice:
        try:
            # Before any thread starts, so every upload thread inherits it: when CPUs are
            # short, the training loop gets them first and the upload takes what is left.
            os.nice(nice)
        except (AttributeError, OSError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="cloudckpt-parent-watch", daemon=True).start()
    torch.set_num_threads(torch_threads)
    try:
        if addr is not None:
            timeout = _dt.timedelta(seconds=collective_timeout)
            store = dist.TCPStore(addr.host, addr.port, is_master=False, timeout=timeout)
            dist.init_process_group("gloo", store=dist.PrefixStore(f"{addr.prefix}gen{generation}/", store),
                                    rank=rank, world_size=world_size, timeout=timeout)
        conn.send(("ready", os.getpid()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", _picklable(exc)))
        return
    previous: Any = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        seq, staged, request = msg
        # The previous save's tensors were kept mapped until now so that torch's
        # shared-storage cache maps the (reused) staging buffers only once.
        previous = staged
        try:
            writer, planner, kwargs = pickle.loads(request)
            reply = ("ok", _run_save(staged, dict(kwargs, storage_writer=writer, planner=planner)))
        except BaseException as exc:  # noqa: BLE001 - sent back to the parent
            reply = ("error", _picklable(exc))
        del staged
        try:
            conn.send((seq,) + reply)
        except (OSError, EOFError):
            break
    del previous
    if dist.is_initialized():
        dist.destroy_process_group()


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return CheckpointWorkerError(f"{type(exc).__name__}: {exc}\n{text}")


def _pin_save_id(writer: Any) -> tuple[Any, str | None]:
    """A copy of ``writer`` pinned to a fresh save id, and that id (``writer`` itself and None if not ours).

    The parent then knows the token in every data object name the child
    writes, and after the child dies aborts exactly those uploads.
    """
    from cloudckpt.writer import CloudStorageWriter

    if not isinstance(writer, CloudStorageWriter):
        return writer, None
    save_id = uuid.uuid4().hex
    pinned = copy.copy(writer)  # the caller's writer stays as it was
    pinned.pin_save_id(save_id)
    return pinned, save_id


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _trainer_tcp_store() -> tuple[str, int] | None:
    """(host, port) of the TCPStore behind the default process group, if that is what it uses."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no default store (private API moved): use our own
        return None
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return store.host, store.port
    return None


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors holding data in a state dict (a DTensor's data is its local shard)."""
    from torch.utils._pytree import tree_leaves

    return [getattr(t, "_local_tensor", t) for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


class ProcessCheckpointExecutor(_BaseExecutor):
    """Runs uploads in one persistent child process per rank (spawned at the first save).

    The child does the whole save (planning collectives, uploads, commit) on its
    own gloo group, so it never holds the trainer's GIL. Give it tensors staged
    in shared memory (:func:`async_save` does) and they reach it without a copy.

    * ``poll_interval``: how often the monitor thread checks the child and the
      other ranks' abort flags; a dead child fails every rank's future within
      a few of these.
    * ``start_timeout``: how long a child may take to start and join its group.
    * ``collective_timeout``: bound on any collective of the child's group.
    * ``save_timeout``: optional bound on a whole save; past it the child is
      killed and the future fails.
    * ``rendezvous_host``: host the other ranks' children reach rank 0's store
      at, used only when the trainer's own store is not a TCPStore (default:
      ``MASTER_ADDR``, else 127.0.0.1).
    * ``abort_grace``: after a collective failure reported by the child, how
      long to look for another rank's abort flag to explain it.
    * ``nice``: added to the child's nice value (Unix), so that on a host short
      of CPUs the training loop keeps them and the upload uses what is left;
      0 keeps the trainer's priority.
    """

    needs_shared_memory: ClassVar[bool] = True

    def __init__(self, *, on_busy: str = "wait", start_timeout: float = 300.0, poll_interval: float = 0.2,
                 collective_timeout: float = 600.0, save_timeout: float | None = None, torch_threads: int = 1,
                 rendezvous_host: str | None = None, abort_grace: float = 5.0, nice: int = 10) -> None:
        super().__init__(on_busy=on_busy)
        self.nice = nice
        self.start_timeout = start_timeout
        self.poll_interval = poll_interval
        self.collective_timeout = collective_timeout
        self.save_timeout = save_timeout
        self.torch_threads = torch_threads
        self.rendezvous_host = rendezvous_host
        self.abort_grace = abort_grace
        self._child: _Child | None = None
        self._generation = 0
        self._needs_restart = False
        self._addr: _StoreAddress | None = None
        self._group_ranks: list[int] | None = None
        self._server_store: Any = None  # rank 0's own TCPStore when the trainer has none
        self._store: Any = None  # this rank's client of the rendezvous store (abort flags)
        self._seq = 0
        self._warned_unshared = False
        #: Number of child processes started so far (1 while the first one lives).
        self.children_started = 0

    @property
    def pid(self) -> int | None:
        """PID of the current child process (None before the first save)."""
        return self._child.proc.pid if self._child is not None else None

    # -- child lifecycle ---------------------------------------------------------------
    @staticmethod
    def _group_info(process_group: Any, no_dist: bool) -> tuple[int, int, bool]:
        if no_dist or not (dist.is_available() and dist.is_initialized()):
            return 0, 1, False
        return dist.get_rank(process_group), dist.get_world_size(process_group), True

    @staticmethod
    def _all_max(values: list[int], process_group: Any) -> list[int]:
        pg = process_group if process_group is not None else dist.distributed_c10d._get_default_group()
        cpu = torch.device("cpu") in getattr(pg, "_device_types", [torch.device("cpu")])
        device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=process_group)
        return [int(v) for v in t.tolist()]

    def _rendezvous(self, process_group: Any, rank: int) -> _StoreAddress:
        info: list[Any] = [None]
        if rank == 0:
            prefix = f"cloudckpt/{uuid.uuid4().hex}/"
            trainer = _trainer_tcp_store()
            if trainer is not None:
                info[0] = _StoreAddress(trainer[0], trainer[1], prefix)
            else:
                host = self.rendezvous_host or os.environ.get("MASTER_ADDR", "127.0.0.1")
                # Port 0: the OS picks a free port atomically as we bind it (no race).
                self._server_store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                                   timeout=_dt.timedelta(seconds=self.start_timeout))
                info[0] = _StoreAddress(host, self._server_store.port, prefix)
        src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        dist.broadcast_object_list(info, src=src, group=process_group)
        return info[0]

    def _ensure_child(self, process_group: Any, rank: int, world: int, distributed: bool) -> None:
        """Agree with every rank on the save number and whether children restart; (re)start ours."""
        alive = self._child is not None and self._child.proc.is_alive()
        restart = int(not alive or self._needs_restart)
        if distributed:
            ranks = dist.get_process_group_ranks(process_group) if process_group is not None else list(range(world))
            if self._group_ranks is not None and ranks != self._group_ranks:
                raise ValueError(f"this ProcessCheckpointExecutor saves with the group of ranks {self._group_ranks}; "
                                 "use one executor per process group")
            # One tiny collective per save: every child restarts together, and every
            # rank uses the same save number for its abort flag.
            restart, seq = self._all_max([restart, self._seq + 1], process_group)
            if self._addr is None:
                self._group_ranks = ranks
                self._addr = self._rendezvous(process_group, rank)
                self._store = dist.PrefixStore(self._addr.prefix, dist.TCPStore(
                    self._addr.host, self._addr.port, is_master=False,
                    timeout=_dt.timedelta(seconds=self.start_timeout)))
        else:
            seq = self._seq + 1
        self._seq = seq
        if restart:
            self._spawn(rank, world, distributed)

    def _spawn(self, rank: int, world: int, distributed: bool) -> None:
        # Starts the child and returns: the monitor thread waits for it to be
        # ready, so even the first save blocks the trainer only for staging.
        import multiprocessing as mp

        self._stop_child(kill=True)
        self._needs_restart = False
        self._generation += 1
        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=_child_main, name=f"cloudckpt-ckpt-rank{rank}", daemon=True,
                           args=(child_conn, os.getpid(), rank, world, self._addr if distributed else None,
                                 self._generation, self.collective_timeout, self.torch_threads, self.nice))
        proc.start()
        child_conn.close()  # so the parent sees EOF as soon as the child dies
        self._child = _Child(proc, parent_conn, self._generation)
        self.children_started += 1

    def _await_ready(self, child: _Child, save: _SaveContext) -> None:
        """Monitor thread: wait until the child joined its group (once per child)."""
        if child.ready:
            return
        failed_key = f"abort/start{child.generation}"
        deadline = time.monotonic() + self.start_timeout
        problem = None
        while problem is None and not child.conn.poll(self.poll_interval):
            if not child.proc.is_alive():
                problem = f"{_describe_exit(child.proc.exitcode)} while starting; see its stderr"
            elif save.distributed and self._store.check([failed_key]):
                problem = (f"could not join its group because the checkpoint process of rank "
                           f"{self._store.get(failed_key).decode()} failed to start")
            elif time.monotonic() > deadline:
                problem = f"did not start within {self.start_timeout} s (are all ranks saving together?)"
        if problem is None:
            try:
                msg = child.conn.recv()
            except (EOFError, OSError):
                child.proc.join(5)
                msg = ("error", f"{_describe_exit(child.proc.exitcode)} while starting; see its stderr")
            if msg[0] == "ready":
                child.ready = True
                return
            problem = f"failed to start: {msg[1]}"
        if save.distributed:
            try:
                self._store.set(failed_key, str(save.rank))
            except Exception:  # noqa: BLE001 - the others then time out instead
                pass
        child.kill()
        self._needs_restart = True
        raise CheckpointWorkerError(f"the checkpoint process of rank {save.rank} {problem}")

    def _stop_child(self, kill: bool = False, timeout: float = 10.0) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if not kill:
            try:
                child.conn.send(None)
                child.proc.join(timeout)
            except (OSError, EOFError):
                pass
        child.kill(timeout)

    # -- saves -----------------------------------------------------------------------------
    def execute_save(self, staging_future_or_state_dict: Any, *, checkpoint_id: Any = None,
                     storage_writer: Any = None, planner: Any = None, process_group: Any = None,
                     no_dist: bool = False, use_collectives: bool = True, **kwargs: Any) -> Future:
        """Hand a save to the child; returns a Future of the DCP ``Metadata``.

        This call blocks only for one small collective (every rank agrees on the
        save number, and starts children at the first save or after a failure).
        The state dict is sent from the monitor thread.
        """
        self._admit()
        if storage_writer is None:
            from cloudckpt.writer import writer_for

            storage_writer = writer_for(checkpoint_id)
        rank, world, distributed = self._group_info(process_group, no_dist)
        storage_writer, save_id = _pin_save_id(storage_writer)
        # The child saves on its own default group, whose ranks mirror process_group's.
        request = self._pickle_request(storage_writer, planner, dict(
            checkpoint_id=checkpoint_id, no_dist=not distributed, use_collectives=use_collectives, **kwargs))
        self._ensure_child(process_group, rank, world, distributed)
        save = _SaveContext(self._seq, rank, distributed, checkpoint_id, request, save_id)
        child = self._child
        assert child is not None
        staged = staging_future_or_state_dict
        return self._start(lambda: self._drive(child, staged, save))

    @staticmethod
    def _pickle_request(writer: Any, planner: Any, kwargs: dict[str, Any]) -> bytes:
        # Pickled here, on the caller's thread, so a writer holding a live client
        # fails at once with a clear error rather than inside the child.
        try:
            return pickle.dumps((writer, planner, kwargs))
        except Exception as exc:
            raise UnpicklableWriterError(
                f"{writer!r} (or planner {planner!r}) cannot be sent to the checkpoint process: {exc}. "
                "Pass credentials and endpoints as writer options (the child builds its own client) "
                "instead of a live client object"
            ) from exc

    def _check_staged(self, staged: Any) -> None:
        tensors = _tensors(staged)
        bad = [t for t in tensors if t.device.type != "cpu"]
        if bad:
            raise UnsupportedTensorError(
                f"ProcessCheckpointExecutor got a {bad[0].device} tensor; stage the state dict to CPU shared "
                "memory first (cloudckpt.async_save does, with Stager(shared_memory=True))")
        unshared = sum(t.untyped_storage().nbytes() for t in tensors if not t.untyped_storage().is_shared())
        if unshared and not self._warned_unshared:
            self._warned_unshared = True
            log.warning("%.1f MiB of staged tensors are not in shared memory: torch moves them there (one copy) "
                        "before the checkpoint process can map them. Stage with Stager(shared_memory=True).",
                        unshared / 2**20)

    def _drive(self, child: _Child, staged: Any, save: _SaveContext) -> Any:
        """Monitor thread: send the save, then wait for the reply, the child's death or an abort."""
        proc, conn = child.proc, child.conn
        try:
            self._await_ready(child, save)
            staged_dict = _resolve(staged)
            del staged
            self._check_staged(staged_dict)
        except BaseException as exc:
            # The other ranks' children would wait for ours in the first collective.
            self._signal_abort(save, f"save could not be handed to its checkpoint process ({type(exc).__name__})")
            raise
        try:
            conn.send((save.seq, staged_dict, save.request))
        except (OSError, EOFError):
            self._child_died(proc, save)
        del staged_dict
        deadline = None if self.save_timeout is None else time.monotonic() + self.save_timeout
        while True:
            reply = self._poll_reply(proc, conn, save, self.poll_interval)
            if reply is not None:
                if reply[1] == "ok":
                    return reply[2]
                self._child_failed(proc, save, reply[2])
            if not proc.is_alive():
                self._child_died(proc, save)
            if save.distributed and self._store.check([save.abort_key]):
                # A reply that raced with the flag wins: that save did complete everywhere.
                reply = self._poll_reply(proc, conn, save, 0)
                if reply is not None and reply[1] == "ok":
                    return reply[2]
                self._abort(proc, save, self._store.get(save.abort_key).decode())
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                proc.join(10)
                self._signal_abort(save, f"save exceeded save_timeout={self.save_timeout} s")
                self._cleanup_uploads(save)
                raise CheckpointWorkerError(
                    f"the save of {save.checkpoint_id} did not finish within save_timeout={self.save_timeout} s "
                    f"on rank {save.rank}; its checkpoint process was killed and nothing was committed by this "
                    "rank. A new process starts at the next save")

    def _poll_reply(self, proc: Any, conn: Any, save: _SaveContext, timeout: float) -> tuple | None:
        """This save's reply if one arrives within ``timeout`` s; a dead child fails the save."""
        try:
            # A dead child's end of the pipe reads as EOF: poll() is True and recv() raises.
            if not conn.poll(timeout):
                return None
            reply = conn.recv()
        except (EOFError, OSError):
            self._child_died(proc, save)
        # With one save in flight no other reply can come; never misattribute one.
        return reply if reply[0] == save.seq else None

    def _signal_abort(self, save: _SaveContext, reason: str) -> None:
        self._needs_restart = True
        if save.distributed:
            try:
                self._store.set(save.abort_key, f"{save.rank}|{reason}")
            except Exception:
                log.warning("could not tell the other ranks to abort", exc_info=True)

    def _child_died(self, proc: Any, save: _SaveContext) -> None:
        proc.join(5)
        code = proc.exitcode
        # Tell the other ranks first: their children wait for ours in a collective.
        self._signal_abort(save, f"checkpoint process {_describe_exit(code)}")
        self._cleanup_uploads(save)
        raise CheckpointWorkerError(
            f"the checkpoint process of rank {save.rank} (pid {proc.pid}) {_describe_exit(code)} during the save "
            f"of {save.checkpoint_id}; the save failed, .metadata was not written by it and its multipart uploads "
            "were aborted. A new process starts at the next save")

    def _abort(self, proc: Any, save: _SaveContext, flag: str, cause: BaseException | None = None) -> None:
        who, _, reason = flag.partition("|")
        # Our child is (or was) in a collective with the failed one: stop it now.
        proc.kill()
        proc.join(10)
        self._needs_restart = True
        self._cleanup_uploads(save)
        err = CheckpointAbortedError(
            f"the save of {save.checkpoint_id} was aborted on rank {save.rank} because on rank {who} the "
            f"{reason or 'checkpoint process failed'}; nothing was committed and this rank's multipart uploads "
            "were aborted. New processes start at the next save")
        raise err from cause

    def _child_failed(self, proc: Any, save: _SaveContext, err: BaseException) -> None:
        if save.distributed and not isinstance(err, CloudCheckpointError):
            # A collective failure: if another rank's child died, say that (its
            # parent raises the flag within a poll interval) rather than gloo's words.
            self._needs_restart = True  # the child's group may be broken
            deadline = time.monotonic() + self.abort_grace
            while time.monotonic() < deadline:
                if self._store.check([save.abort_key]):
                    self._abort(proc, save, self._store.get(save.abort_key).decode(), cause=err)
                time.sleep(self.poll_interval / 2)
        raise err

    def _cleanup_uploads(self, save: _SaveContext) -> None:
        # The dead (or killed) child could not abort its multipart uploads: do it here.
        # Only this save's own uploads (the token of the save id pinned on its writer):
        # never a concurrent save's, and found whatever prefix_strategy named them.
        from cloudckpt import layout

        if save.save_id is None:
            return  # not one of our writers: nothing we know how to recognise
        token = save.save_id[:layout.TOKEN_CHARS]
        try:
            writer = pickle.loads(save.request)[0]
            if save.checkpoint_id is not None:
                writer.reset(save.checkpoint_id)
            store, uri = writer.store, writer.uri
            # With collectives the child's rank in its group is ours, and rank 0 gave it
            # rank_prefix(rank); otherwise look under the whole checkpoint.
            name_prefix = layout.rank_prefix(save.rank, writer.prefix_strategy) \
                if save.distributed and pickle.loads(save.request)[2].get("use_collectives", True) else ""
            prefix = uri.key(name_prefix)
        except Exception:  # noqa: BLE001 - not one of our writers: nothing we know how to clean
            return
        try:
            # Twice: a create request the child sent just before dying may land late.
            for attempt in range(2):
                for up in store.list_multipart_uploads(prefix):
                    parsed = layout.parse_data_object_name(up.key)
                    if parsed is not None and parsed[2] == token:
                        store.abort_multipart(up.key, up.upload_id)
                if attempt == 0:
                    time.sleep(0.5)
        except Exception:
            log.warning("could not abort the multipart uploads of rank %d under %s", save.rank, uri, exc_info=True)

    def abort(self, reason: str = "aborted by the caller", timeout: float | None = 30.0) -> bool:
        """Kill this rank's checkpoint process if a save is in flight; True once that save has ended.

        The monitor then fails the save as for any dead child: the other ranks'
        children are stopped through the abort flag, this rank's multipart
        uploads are aborted, and nothing is committed unless the commit had
        already landed (the commit is one conditional write: it happened
        entirely or not at all). A new process starts at the next save.
        """
        fut, child = self._inflight, self._child
        if fut is None or fut.done():
            return True
        if child is not None and child.proc.is_alive():
            log.warning("cloudckpt: aborting the in-flight save (%s): killing checkpoint process %d",
                        reason, child.proc.pid)
            child.proc.kill()
        return super().abort(reason, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Let the in-flight save finish (up to ``timeout`` s), then stop the child; safe to call twice."""
        if not self._mark_closed():
            return
        if self._inflight is not None and threading.current_thread() is not self._worker.thread:
            try:
                self._inflight.exception(timeout=timeout)
            except BaseException:  # noqa: BLE001 - its own caller sees the outcome
                pass
        # Stopping the child makes a still-running save fail (not hang) in the monitor.
        self._stop_child(kill=False, timeout=10.0 if timeout is None else max(timeout, 1.0))
        self._worker.stop(10.0)
        # The store clients stay: a save that outlived ``timeout`` still reports through them.
