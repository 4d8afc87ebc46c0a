"""Step-numbered checkpoints under one root: save, async save, resume, retention.

::

    mgr = CheckpointManager("s3://bucket/run-7", keep_last=3, keep_every=1000)
    step = mgr.load(state) or 0            # resume: None when there is no checkpoint yet
    for step in range(step + 1, total):
        train_step()
        if step % 500 == 0:
            mgr.async_save(state, step)    # blocks only while the state is copied
    mgr.close()                            # last upload committed (or its error raised)

Naming: checkpoint ``N`` lives at ``{root}/step-{N:010d}``, e.g.
``s3://bucket/run-7/step-0000001500``. The step is zero-padded to ten digits so
that object listings, consoles and ``cloudckpt ls`` show steps in numeric
order. When listing, any ``step-<digits>`` prefix is accepted and its integer
parsed, so checkpoints written as ``step-1500`` by other tools (torchtitan's
naming) are found, loaded and retained too.

A checkpoint counts only once it is committed (its ``.metadata``, or the
rank-local ``__0.metadata``, exists; see :func:`cloudckpt.layout.checkpoint_state`):
:meth:`CheckpointManager.latest`, :meth:`~CheckpointManager.steps` and
:meth:`~CheckpointManager.load` never see a half-written one.

Retention (``keep_last``/``keep_every``) runs on rank 0 inside the save's
commit phase, right after ``.metadata`` is written and before DCP releases the
other ranks. So when ``save()`` returns (or an async save's
``upload_completion`` resolves) on *any* rank, the old checkpoints are already
gone and every rank lists the same steps.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudckpt import layout
from cloudckpt.errors import (
    CheckpointAbortedError,
    CheckpointNotFoundError,
    CloudCheckpointError,
    DeadlineExceededError,
)
from cloudckpt.layout import parse_step_name, step_name
from cloudckpt.ops import delete_checkpoint, is_committed
from cloudckpt.options import split_options
from cloudckpt.store import ObjectStore, open_store
from cloudckpt.uri import StorageURI, parse_uri
from cloudckpt.writer import GCSStorageWriter, LocalStorageWriter, S3StorageWriter

__all__ = [
    "CheckpointManager",
    "AsyncCheckpoint",
    "RetentionPolicy",
    "step_name",
    "parse_step_name",
    "step_prefixes",
    "committed_steps",
    "apply_retention",
    "delete_checkpoint",
]

log = logging.getLogger(__name__)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return step


def _check_keep(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints survive a commit.

    ``keep_last``: the newest ``keep_last`` committed checkpoints.
    ``keep_every``: every checkpoint whose step is a multiple of it (milestones).
    Both None keeps everything. The newest committed checkpoint and any
    protected step (the one just written) are always kept.
    """

    keep_last: int | None = None
    keep_every: int | None = None

    def __post_init__(self) -> None:
        _check_keep("keep_last", self.keep_last)
        _check_keep("keep_every", self.keep_every)

    @property
    def active(self) -> bool:
        """False when the policy keeps everything."""
        return self.keep_last is not None or self.keep_every is not None

    def doomed(self, committed: Iterable[int], protect: Iterable[int] = ()) -> list[int]:
        """The steps of ``committed`` this policy deletes, ascending (pure: no I/O)."""
        steps = sorted(set(committed))
        if not self.active or not steps:
            return []
        keep = set(protect)
        keep.add(steps[-1])  # the newest is what a restart resumes from
        if self.keep_last is not None:
            keep.update(steps[-self.keep_last:])
        if self.keep_every is not None:
            keep.update(s for s in steps if s % self.keep_every == 0)
        return [s for s in steps if s not in keep]


# -- listing and deleting (shared with the CLI) --------------------------------------------------------


def step_prefixes(store: ObjectStore, root: StorageURI) -> dict[int, list[StorageURI]]:
    """Every ``step-N`` prefix under ``root``, committed or not, by step (canonical name first)."""
    base = root.key("")
    out: dict[int, list[StorageURI]] = {}
    for p in store.list_prefixes(base):
        name = p[len(base):].strip("/")
        step = parse_step_name(name)
        if step is not None:
            out.setdefault(step, []).append(root.child(name))
    for step, uris in out.items():
        canonical = step_name(step)
        uris.sort(key=lambda u: (not u.prefix.endswith(canonical), u.prefix))
    return out


def _committed_uri(store: ObjectStore, uris: Sequence[StorageURI]) -> StorageURI | None:
    for uri in uris:
        if is_committed(store, uri):
            return uri
    return None


def committed_steps(store: ObjectStore, root: StorageURI,
                    prefixes: dict[int, list[StorageURI]] | None = None) -> dict[int, StorageURI]:
    """Committed checkpoints under ``root``: step -> URI (one HEAD per candidate, in parallel)."""
    dirs = step_prefixes(store, root) if prefixes is None else prefixes
    if not dirs:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(dirs)),
                                               thread_name_prefix="cloudckpt-list") as pool:
        found = dict(zip(dirs, pool.map(lambda s: _committed_uri(store, dirs[s]), dirs), strict=True))
    return {s: u for s, u in sorted(found.items()) if u is not None}


def apply_retention(store: ObjectStore, root: StorageURI, policy: RetentionPolicy,
                    protect: Iterable[int] = ()) -> list[int]:
    """Delete the committed checkpoints under ``root`` that ``policy`` does not keep; return their steps.

    Uncommitted prefixes (saves in progress, failed saves) are never candidates,
    not even one that shares a doomed step's number (``step-5`` beside a
    committed ``step-0000000005``): ``cloudckpt gc`` removes those once they
    are old enough. A symlinked local step directory is unlinked, never its
    target's contents.
    """
    if not policy.active:
        return []
    dirs = step_prefixes(store, root)
    doomed = policy.doomed(committed_steps(store, root, dirs), protect)
    for s in doomed:
        for uri in dirs[s]:
            if is_committed(store, uri):
                delete_checkpoint(store, uri)
        log.info("cloudckpt: retention deleted step %d under %s", s, root)
    return doomed


# -- writers that retain after their commit ------------------------------------------------------------


@dataclass(frozen=True)
class _RetentionJob:
    """What a managed writer needs to apply retention after its commit (picklable)."""

    root: str
    policy: RetentionPolicy
    step: int


class _RetainAfterCommit:
    """Writer mixin: rank 0 applies the manager's retention right after ``.metadata`` is committed.

    ``finish`` only runs on the coordinator, after every rank's uploads, and DCP
    releases the other ranks only once it returns; so retention is finished
    before ``save`` returns anywhere. A failed cleanup is logged, never raised:
    the checkpoint is already committed.
    """

    retention: _RetentionJob | None = None

    def finish(self, metadata: Any, results: Any) -> None:
        super().finish(metadata, results)  # type: ignore[misc]
        job = self.retention
        # Without collectives every rank writes its own metadata: the manager does not retain then.
        if job is None or self.metadata_name() != layout.METADATA_NAME:  # type: ignore[attr-defined]
            return
        try:
            deleted = apply_retention(self.store, parse_uri(job.root), job.policy, protect=(job.step,))  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a failed cleanup must not fail a committed save
            log.warning("cloudckpt: retention under %s failed after committing step %d (checkpoints kept): %s",
                        job.root, job.step, exc)
            return
        if deleted:
            log.info("cloudckpt: committed step %d under %s; retention deleted steps %s", job.step, job.root, deleted)


class _AbortGuardStore:
    """An ObjectStore view that refuses to send data or commit once ``event`` is set.

    Cleanup (aborting multipart uploads, deleting, listing) still goes through,
    so a save stopped this way unwinds like any failed save: its transfer
    engine aborts its multipart uploads and deletes what it completed, and DCP
    fails the save on every rank before rank 0 commits.
    """

    _BLOCKED = frozenset({"put", "create_multipart", "upload_part", "complete_multipart"})

    def __init__(self, store: ObjectStore, event: threading.Event) -> None:
        self._store = store
        self._event = event

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in self._BLOCKED:
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self._event.is_set():
                raise CheckpointAbortedError(
                    f"the save to {self._store.url('')} was aborted for the emergency (preemption) checkpoint; "
                    "nothing was committed by it")
            return attr(*args, **kwargs)
        return guarded


class _AbortableUploads:
    """Writer mixin: an async save whose ``abort_event`` is set stops sending requests (thread executor).

    The event does not travel to a checkpoint process (it is not pickled);
    there the executor's ``abort()`` stops the save instead.
    """

    abort_event: threading.Event | None = None

    @property
    def store(self) -> Any:
        base = super().store  # type: ignore[misc]
        return base if self.abort_event is None else _AbortGuardStore(base, self.abort_event)

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # type: ignore[misc]
        state.pop("abort_event", None)
        return state


class _ManagedS3Writer(_AbortableUploads, _RetainAfterCommit, S3StorageWriter):
    """S3 writer of a :class:`CheckpointManager` (retains after commit)."""


class _ManagedGCSWriter(_AbortableUploads, _RetainAfterCommit, GCSStorageWriter):
    """GCS writer of a :class:`CheckpointManager` (retains after commit)."""


class _ManagedLocalWriter(_AbortableUploads, _RetainAfterCommit, LocalStorageWriter):
    """Local writer of a :class:`CheckpointManager` (retains after commit)."""


#: Managers created per root in this process: keeps each one's preemption key distinct.
_GUARD_SEQ: dict[str, itertools.count[int]] = {}
_GUARD_LOCK = threading.Lock()

_MANAGED_WRITERS = {"s3": _ManagedS3Writer, "gs": _ManagedGCSWriter, "file": _ManagedLocalWriter}


def _typed(exc: BaseException) -> BaseException:
    """DCP's ``CheckpointException`` replaced by the cloudckpt error behind it, as ``cloudckpt.save`` does."""
    from cloudckpt.errors import typed_errors

    try:
        with typed_errors():
            raise exc
    except BaseException as typed:  # noqa: BLE001 - returned, not swallowed
        return typed
    return exc  # pragma: no cover - the block always raises


# -- the manager -------------------------------------------------------------------------------------


def wait_all(handles: Iterable[Any]) -> None:
    """Wait for every handle's ``upload_completion``; then raise the first error among them."""
    first: BaseException | None = None
    for h in handles:
        try:
            h.upload_completion.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, once every handle is done
            first = first or exc
    if first is not None:
        raise first


@dataclass
class AsyncCheckpoint:
    """Handle of one :meth:`CheckpointManager.async_save`.

    ``staging_completion`` completes when the state dict has been copied and
    may be modified again; ``upload_completion`` completes (with the DCP
    ``Metadata``) once the checkpoint is committed and retention has run, or
    fails with the save's error.
    """

    step: int
    checkpoint_id: str
    staging_completion: concurrent.futures.Future
    upload_completion: concurrent.futures.Future
    #: Seconds async_save blocked the caller (waiting for the previous upload, then staging).
    blocked_s: float = 0.0
    #: Seconds from the return of async_save to the commit (set when the upload succeeds).
    upload_s: float | None = field(default=None)
    #: Set to stop the upload before it commits (emergency save; see CheckpointManager.save).
    abort_event: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the commit; return the Metadata or raise the save's error."""
        return self.upload_completion.result(timeout)

    def done(self) -> bool:
        """True once the upload finished (committed or failed)."""
        return self.upload_completion.done()


class CheckpointManager:
    """Numbered checkpoints under ``root_uri`` (``s3://``, ``gs://`` or a local path).

    Args:
        root_uri: where checkpoints live; checkpoint ``N`` is ``{root}/step-{N:010d}``.
        keep_last: after each commit, keep only the ``keep_last`` newest committed
            checkpoints (None: keep all).
        keep_every: also keep every checkpoint whose step is a multiple of
            ``keep_every``. Given alone, everything else except the newest
            checkpoint is deleted.
        executor: a long-lived :class:`~cloudckpt.executors.ThreadCheckpointExecutor`
            or :class:`~cloudckpt.executors.ProcessCheckpointExecutor` for
            :meth:`async_save`; it stays open when the manager closes. None: the
            manager creates a thread executor on first use and closes it in :meth:`close`.
        process_group: the group saves and loads run on (None: the default group).
        preemption: watch for preemption notices (SIGTERM and the other
            ``preemption_signals``, the EC2 and GCE metadata notices) from the
            moment the manager is created; see :meth:`reached_preemption`.
            False installs nothing (:meth:`request_preemption` still works).
        preemption_signals: signals that mean "preempted" (handlers are
            installed only when the manager is created on the main thread, and
            put back by :meth:`close`).
        preemption_grace: seconds from a notice until the emergency checkpoint
            must be committed, unless the notice gives an earlier deadline (EC2
            does). Leave a few seconds of the platform's grace period for exiting.
        preemption_margin: how many steps after the step at which a rank saw
            the notice every rank stops (see :class:`~cloudckpt.preemption.StepAgreement`).
        local_dir: a node-local directory (NVMe, or a RAM disk such as
            ``/dev/shm/ckpt``) that turns on multi-tier checkpoints
            (:mod:`cloudckpt.tiers`, docs/tiers.md): saves of multiples of
            ``local_every`` go there and to ``replicas`` other nodes, multiples
            of ``persist_every`` (None: never) are then copied to ``root_uri``
            in the background; ``keep_local`` steps stay in the local tier;
            ``load`` restores the freshest step complete in any tier and sets
            ``last_load_tier``.
        incremental: every save uses the newest committed step as its base: items
            whose bytes it already holds are copied inside the store, not uploaded
            (see :mod:`cloudckpt.incremental`); each checkpoint stays complete on
            its own. ``frozen_keys=`` names items to copy without staging them.
        **writer_options: routed by the table in :mod:`cloudckpt.options`:
            writer options (``part_size``, ``overwrite``, ``prefix_strategy``, ...)
            go to the writer, reader options (``verify``, ``allow_pickle``, ...)
            to the reader, and store options (``endpoint_url``, ``region``,
            ``project``, client options) to the object store of saves, loads,
            listing and deletion. An option no component takes is a TypeError.

    Retention runs only after a commit, only on rank 0, and never deletes the
    newest committed checkpoint, the one just written, or any uncommitted
    prefix (a save in progress or a failed one); ``cloudckpt gc`` removes
    failed ones once they are old enough. At most one save of a manager is in
    flight: a new save first waits for the previous one.

    :meth:`save`, :meth:`async_save`, :meth:`load`, :meth:`wait` and
    :meth:`close` are collective (every rank calls them, in the same order);
    :meth:`latest`, :meth:`steps` and :meth:`delete` are not (:meth:`delete`
    does nothing on ranks other than 0).
    """

    def __init__(
        self,
        root_uri: str | StorageURI,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        executor: Any = None,
        process_group: Any = None,
        preemption: bool = True,
        preemption_signals: Iterable[int] = (signal.SIGTERM,),
        preemption_grace: float = 25.0,
        preemption_margin: int = 1,
        local_dir: str | os.PathLike[str] | None = None,
        local_every: int = 1,
        persist_every: int | None = None,
        keep_local: int = 2,
        replicas: int = 1,
        incremental: bool = False,
        **writer_options: Any,
    ) -> None:
        self.policy = RetentionPolicy(keep_last, keep_every)
        #: Incremental saves: each save copies, inside the store, what the newest committed step already holds.
        self.incremental = bool(incremental)
        self.root = parse_uri(root_uri)
        self.executor = executor
        self.process_group = process_group
        routed = split_options(writer_options)
        self.store_options = dict(routed.store)
        self.writer_options = dict(routed.writer)
        if self.incremental:
            # Every save may become the next one's base: lay it out so that stores copying
            # whole objects only (GCS) can copy its unchanged large items (first save too).
            self.writer_options.setdefault("copy_friendly_layout", True)
        self.reader_options = dict(routed.reader)
        self._store: ObjectStore | None = None
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._pending: list[AsyncCheckpoint] = []
        self._own_executor: Any = None
        self._stager: Any = None
        self._closed = False
        # -- preemption (see the "preemption" section below) --
        self._last_async: AsyncCheckpoint | None = None
        self._preemption = self._preemption_guard(preemption, preemption_signals, preemption_grace,
                                                  preemption_margin)
        # -- multi-tier checkpoints (cloudckpt/tiers.py; docs/tiers.md): only with local_dir --
        #: The tier the latest tiered load() restored from: "local", "replica", "object_store" (None: nothing).
        self.last_load_tier: str | None = None
        self._tiers: Any = None
        if local_dir is not None:
            from cloudckpt.tiers import TieredCheckpoints

            self._tiers = TieredCheckpoints(self, local_dir=local_dir, local_every=local_every,
                                            persist_every=persist_every, keep_local=keep_local, replicas=replicas)

    @property
    def keep_last(self) -> int | None:
        """See the class docstring."""
        return self.policy.keep_last

    @property
    def keep_every(self) -> int | None:
        """See the class docstring."""
        return self.policy.keep_every

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.root)!r}, keep_last={self.keep_last}, keep_every={self.keep_every})"

    # -- helpers -------------------------------------------------------------------------
    @property
    def store(self) -> ObjectStore:
        """The object store of the root (created on first use)."""
        if self._store is None:
            self._store = open_store(self.root, **self.store_options)
        return self._store

    def checkpoint_uri(self, step: int) -> str:
        """The URI checkpoint ``step`` is written to: ``{root}/step-{step:010d}``."""
        return str(self.root.child(step_name(step)))

    def _rank(self) -> int:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group) if self.process_group is not None else dist.get_rank()
        return 0

    def _writer(self, step: int) -> Any:
        uri = self.checkpoint_uri(step)
        writer = _MANAGED_WRITERS[self.root.scheme](uri, **self.writer_options)
        writer.retention = _RetentionJob(str(self.root), self.policy, step) if self.policy.active else None  # type: ignore[attr-defined]
        if self.incremental:
            # The coordinator picks the base when the save runs (after earlier saves committed).
            writer._base_from_root = (str(self.root), step)
        return writer

    # -- queries -------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        return list(committed_steps(self.store, self.root))

    def latest(self) -> int | None:
        """The newest committed step, or None (checks candidates newest first, so usually one HEAD)."""
        dirs = step_prefixes(self.store, self.root)
        for step in sorted(dirs, reverse=True):
            if _committed_uri(self.store, dirs[step]) is not None:
                return step
        return None

    # -- saving ---------------------------------------------------------------------------------
    def _begin(self, step: int) -> None:
        with self._lock:
            self._in_flight.add(step)

    def _end(self, step: int) -> None:
        with self._lock:
            self._in_flight.discard(step)

    def save(self, state_dict: dict[str, Any], step: int) -> Any:
        """Save ``state_dict`` as checkpoint ``step`` (blocking, collective); return its Metadata.

        In-flight async saves are waited for first (their error, if any, is
        raised), so commits happen in call order. Retention has run when this returns.
        If an async save of the same ``step`` is still in flight, this waits for
        it and returns its Metadata instead of uploading the step twice (a step
        that is already committed raises CheckpointExistsError, except in the
        emergency save, which returns the committed step's Metadata).

        After a preemption notice this is the emergency save (see
        :meth:`reached_preemption`): an earlier async upload still in flight gets
        up to half of the remaining grace to commit and is then aborted (nothing
        of it committed); the save then runs with ``TransferOptions.save_deadline``
        set to the grace that is left. Either it commits, or it raises and
        nothing new is committed; earlier checkpoints are never touched.
        """
        from cloudckpt.api import save

        step = _check_step(step)
        self._check_open()
        if self._tiers is not None:
            return self._tiers.save(state_dict, step)
        # Emergency only once the ranks agreed (not on a local notice alone): every rank takes the same path.
        if self._preemption.stop_deadline() is not None:
            return self._emergency_save(state_dict, step)
        same = self._async_of(step)
        if same is not None and not same.done():
            try:
                # That step is (being) uploaded already: never upload it twice.
                meta = same.result()
            except CloudCheckpointError as exc:
                log.warning("cloudckpt: the async save of step %d failed (%s); saving it again", step, exc)
            else:
                self.wait()
                return meta
        self.wait()
        writer = self._writer(step)
        self._begin(step)
        try:
            return save(state_dict, writer.uri, storage_writer=writer, process_group=self.process_group)
        finally:
            self._end(step)

    def async_save(self, state_dict: dict[str, Any], step: int) -> AsyncCheckpoint:
        """Save ``state_dict`` as checkpoint ``step`` in the background (collective).

        Blocks while the previous async save finishes uploading (raising its
        error, if it failed: a failed checkpoint is never silent) and while
        ``state_dict`` is copied into reused staging buffers; returns a handle
        whose ``upload_completion`` resolves at the commit, after retention.
        """
        from cloudckpt.api import async_save

        step = _check_step(step)
        self._check_open()
        if self._tiers is not None:
            return self._tiers.async_save(state_dict, step)
        t0 = time.perf_counter()
        self.wait()
        writer = self._writer(step)
        executor = self._executor()
        if self._stager is None:
            from cloudckpt.staging import Stager

            self._stager = Stager(shared_memory=getattr(executor, "needs_shared_memory", False))
        writer.abort_event = threading.Event()
        self._begin(step)
        try:
            resp = async_save(state_dict, checkpoint_id=str(writer.uri), executor=executor, stager=self._stager,
                              storage_writer=writer, process_group=self.process_group)
        except BaseException:
            self._end(step)
            raise
        handle = AsyncCheckpoint(step=step, checkpoint_id=str(writer.uri),
                                 staging_completion=resp.staging_completion,
                                 upload_completion=concurrent.futures.Future(),
                                 abort_event=writer.abort_event)
        started = time.perf_counter()

        def done(fut: concurrent.futures.Future) -> None:
            # Runs on the thread that finished the upload: un-track before publishing,
            # so a caller woken by the handle can delete or re-save the step at once.
            self._end(step)
            exc = fut.exception()
            if exc is not None:
                handle.upload_completion.set_exception(_typed(exc))
                return
            handle.upload_s = time.perf_counter() - started
            handle.upload_completion.set_result(fut.result())

        with self._lock:
            self._pending.append(handle)
            self._last_async = handle
        handle.blocked_s = time.perf_counter() - t0
        resp.upload_completion.add_done_callback(done)
        return handle

    def _executor(self) -> Any:
        # One long-lived executor: a new worker (and a new gloo group) per save would cost seconds.
        if self.executor is not None:
            return self.executor
        if self._own_executor is None:
            from cloudckpt.executors import ThreadCheckpointExecutor

            self._own_executor = ThreadCheckpointExecutor()
        return self._own_executor

    def wait(self) -> None:
        """Wait for every in-flight async save; raise the first error among them (once)."""
        if self._tiers is not None:
            self._tiers.wait()
        with self._lock:
            pending, self._pending = self._pending, []
        wait_all(pending)

    # -- loading ---------------------------------------------------------------------------------
    def load(self, state_dict: dict[str, Any], step: int | None = None) -> int | None:
        """Load checkpoint ``step`` (default: the latest committed) into ``state_dict`` in place.

        Returns the step loaded, or None (``state_dict`` untouched) when there is
        no committed checkpoint, so ``step = mgr.load(state)`` is the whole
        resume logic. With a process group, rank 0 picks the step and
        broadcasts it, so every rank loads the same checkpoint even while
        another job commits a new one. Collective.
        """
        import torch.distributed as dist

        from cloudckpt.api import load

        if self._tiers is not None:
            return self._tiers.load(state_dict, None if step is None else _check_step(step))
        if step is None:
            if dist.is_available() and dist.is_initialized():
                choice: list[Any] = [None]
                if self._rank() == 0:
                    try:
                        choice[0] = ("ok", self.latest())
                    except CloudCheckpointError as exc:
                        choice[0] = ("error", f"{type(exc).__name__}: {exc}")
                dist.broadcast_object_list(choice, src=self._global_rank0(), group=self.process_group)
                status, value = choice[0]
                if status == "error":
                    raise CloudCheckpointError(f"rank 0 could not find the latest checkpoint under {self.root}: "
                                               f"{value}")
                step = value
            else:
                step = self.latest()
            if step is None:
                return None
        step = _check_step(step)
        uri = _committed_uri(self.store, step_prefixes(self.store, self.root).get(step, []))
        if uri is None:
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step} under {self.root} (expected "
                f"{self.checkpoint_uri(step)}/.metadata); committed steps: {self.steps() or 'none'}. "
                "Call load(state) without a step to resume from the latest one"
            )
        load(state_dict, str(uri), process_group=self.process_group, **self.reader_options)
        return step

    def _global_rank0(self) -> int:
        import torch.distributed as dist

        if self.process_group is None:
            return 0
        return dist.get_global_rank(self.process_group, 0)

    # -- deletion and retention ------------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Delete checkpoint ``step`` (committed or not) on rank 0; a no-op on other ranks.

        ``.metadata`` goes first, so a partly deleted checkpoint is never seen as
        committed; then the manifest, data objects and any unfinished uploads.
        Raises ValueError while this manager is still saving the step, and
        CheckpointNotFoundError if nothing is stored for it.
        """
        step = _check_step(step)
        with self._lock:
            if step in self._in_flight:
                raise ValueError(f"checkpoint {step} under {self.root} is still being saved; "
                                 "call wait() before deleting it")
        if self._rank() != 0:
            return
        uris = step_prefixes(self.store, self.root).get(step)
        if not uris:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} under {self.root} "
                                          f"(committed steps: {self.steps() or 'none'})")
        for uri in uris:
            delete_checkpoint(self.store, uri, abort_uploads=True)

    def apply_retention(self) -> list[int]:
        """Apply ``keep_last``/``keep_every`` now (rank 0 only); return the deleted steps.

        Saves do this automatically after every commit; call it after changing
        the policy or to clean up a root written without one.
        """
        if self._rank() != 0:
            return []
        with self._lock:
            protect = set(self._in_flight)
        return apply_retention(self.store, self.root, self.policy, protect)

    # -- preemption ------------------------------------------------------------------------------
    def _preemption_guard(self, watch: bool, signals: Iterable[int], grace: float, margin: int) -> Any:
        from cloudckpt.preemption import PreemptionGuard

        # The same key on every rank, distinct per root and per manager of that root in this job.
        root = str(self.root)
        with _GUARD_LOCK:
            seq = next(_GUARD_SEQ.setdefault(root, itertools.count()))
        namespace = f"{hashlib.sha256(root.encode()).hexdigest()[:16]}/{seq}"
        return PreemptionGuard(namespace, grace=grace, signals=signals, margin=margin, watch=watch)

    @property
    def preemption_notice(self) -> Any:
        """None, or the :class:`~cloudckpt.preemption.PreemptionNotice` seen (source, time, deadline, detail).

        A rank that saw nothing itself reports a ``"peer"`` notice once
        :meth:`reached_preemption` has learnt of another rank's.
        """
        return self._preemption.notice

    def request_preemption(self, detail: str = "requested", deadline: float | None = None) -> Any:
        """Act as if a preemption notice arrived now (for schedulers of your own); returns the notice.

        ``deadline`` (``time.time()`` seconds) bounds the emergency save in
        addition to ``preemption_grace``. Call it on one rank or on all.
        """
        return self._preemption.request(detail, deadline)

    def reached_preemption(self, step: int) -> bool:
        """True on every rank at the same ``step`` once any rank has seen a preemption notice.

        Call it once per step on every rank, then save and stop::

            if mgr.reached_preemption(step):
                mgr.save(state, step)      # the emergency checkpoint
                break

        Not collective: ranks agree through the process group's key-value store
        (one lookup per call, well under a millisecond; a rank that sees a notice
        proposes to stop ``preemption_margin`` steps later, and the first
        proposal wins). This assumes ranks stay within ``preemption_margin``
        steps of each other, as synchronous data-parallel training does.
        """
        return self._preemption.reached(_check_step(step))

    def _async_of(self, step: int) -> AsyncCheckpoint | None:
        """This manager's latest async save if it is of ``step`` and not known to have failed."""
        h = self._last_async
        if h is None or h.step != step:
            return None
        if h.done() and h.upload_completion.exception() is not None:
            return None
        return h

    def _settle(self, handle: AsyncCheckpoint, budget: float) -> tuple[bool, Any]:
        """Wait up to ``budget`` s for an async save; abort it past that. Returns (committed, Metadata)."""
        try:
            return True, handle.upload_completion.result(timeout=max(budget, 0.0))
        except concurrent.futures.TimeoutError:
            pass
        except BaseException as exc:  # noqa: BLE001 - an earlier save's failure must not stop the emergency save
            log.warning("cloudckpt: the async save of step %d failed before the emergency save: %s",
                        handle.step, exc)
            return False, None
        log.warning("cloudckpt: aborting the async save of step %d: it did not commit within %.1f s of the "
                    "preemption grace", handle.step, budget)
        handle.abort_event.set()
        abort = getattr(self.executor or self._own_executor, "abort", None)
        if abort is not None:
            abort("preemption", timeout=0)
        # Unwinding takes one in-flight request plus aborting uploads; the emergency save does not need it
        # finished (it runs on the trainer's group), so the wait is short and bounded.
        try:
            return True, handle.upload_completion.result(timeout=min(10.0, max(self._preemption.remaining() or 0,
                                                                                 0.0)))
        except BaseException as exc:  # noqa: BLE001 - aborted (or failed): nothing of it was committed
            log.info("cloudckpt: the async save of step %d ended without a commit: %s", handle.step, exc)
            return False, None

    def _emergency_save(self, state_dict: dict[str, Any], step: int) -> Any:
        """The save after a preemption notice; see :meth:`save`."""
        from cloudckpt.api import save

        guard = self._preemption
        with self._lock:
            pending, self._pending = self._pending, []
        same = self._async_of(step)
        for h in pending:
            if h is not same:
                self._settle(h, (guard.remaining() or 0.0) / 2)
        if same is not None:
            committed, meta = self._settle(same, guard.remaining() or 0.0)
            if committed:
                return meta
        left = guard.remaining() or 0.0
        if left <= 0:
            raise DeadlineExceededError(
                f"the preemption grace ran out before the emergency checkpoint of step {step} could start "
                f"({self.checkpoint_uri(step)}); nothing new was committed. Raise preemption_grace if the "
                "platform allows more time, or save more often")
        writer = self._writer(step)
        writer.transfer_options = dataclasses.replace(writer.transfer_options, save_deadline=left)
        log.warning("cloudckpt: emergency checkpoint of step %d to %s (%.1f s of grace left)",
                    step, writer.uri, left)
        self._begin(step)
        try:
            return save(state_dict, writer.uri, storage_writer=writer, process_group=self.process_group)
        finally:
            self._end(step)

    # -- lifecycle --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this CheckpointManager ({self.root}) is closed; create a new one")

    def close(self) -> None:
        """Wait for in-flight saves (raising their error) and stop the manager's own workers."""
        if self._closed:
            return
        self._closed = True
        self._preemption.close()
        try:
            if self._tiers is not None:
                self._tiers.close()
            self.wait()
        finally:
            if self._own_executor is not None:
                self._own_executor.close()
                self._own_executor = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
