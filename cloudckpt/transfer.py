"""The transfer engine: parallel part uploads and ranged downloads over an ObjectStore.

Modelled on s3transfer: every request is a task on one bounded thread pool per
rank, so concurrency (and therefore memory) is bounded whatever the checkpoint
size. Request bodies are slices of the caller's buffers (memoryviews of staged
tensors), so uploading adds no copy of the payload and no memory that grows
with object size.

CRC32C is computed once per *piece* (the intersection of a part with a caller
segment) inside the worker threads; part, item and object checksums are then
combined from pieces without reading the data again.

Retries happen in one place, the stores' :func:`cloudckpt.retry.call` loop. The
engine gives every request it runs a :class:`~cloudckpt.retry.RetryScope`: the
upload's deadline (``save_deadline``), a cancellation event set by the first
failure (so other requests stop retrying at once), and an AIMD
:class:`~cloudckpt.retry.AdaptiveLimiter` that lowers the requests in flight
when the service throttles and raises them again as requests succeed. Every
request is idempotent: a part is re-sent from the caller's staged buffers.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cloudckpt import crc, retry
from cloudckpt.errors import CloudCheckpointError, DeadlineExceededError, EndpointUnreachableError, TransferError
from cloudckpt.retry import AdaptiveLimiter, RetryScope, RetryStats
from cloudckpt.store.base import Buffer, ObjectStore, PartResult

__all__ = [
    "abort_incomplete_uploads",
    "TransferOptions",
    "default_max_concurrency",
    "default_world_size",
    "ObjectUpload",
    "UploadedObject",
    "CopyRun",
    "ObjectCopy",
    "CopyOutcome",
    "TransferEngine",
    "plan_part_size",
    "coalesce_ranges",
    "DEFAULT_REQUEST_RATE",
    "DEFAULT_READ_RATE",
    "plan_read_pacing",
    "UploadPacing",
    "plan_pacing",
    "count_requests",
    "plan_budget_part_size",
    "PacedLimiter",
]

MiB = 1024 * 1024
_R = TypeVar("_R")
GiB = 1024 * MiB


#: Requests in flight per rank on a host with CPUs to spare: enough to fill a
#: rank's share of a training node's NIC at object-store latencies (~16 x 90 MB/s).
MAX_DEFAULT_CONCURRENCY = 16


def default_max_concurrency() -> int:
    """``max_concurrency`` when none is given: 16, or twice the usable CPUs if fewer.

    Each request in flight is a thread that spends CPU in the kernel and in
    botocore. On a host with few cores, threads beyond about two per core only
    contend: the sweep in docs/benchmarks.md measured 16 threads on 2 cores at
    more client CPU per GB and less throughput than 4. Training nodes have
    dozens of cores, so there the default is 16.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(4, min(MAX_DEFAULT_CONCURRENCY, 2 * cpus))


def default_world_size() -> int:
    """Ranks of the default process group (1 without one): whose share of a rate cap a rank gets."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class TransferOptions:
    """Tuning knobs of the transfer engine (defaults chosen by ``benchmarks/``)."""

    #: Bytes per multipart part (grown automatically if an object would need > max parts).
    part_size: int = 32 * MiB
    #: Requests in flight per rank, shared by all of that rank's objects
    #: (default: :func:`default_max_concurrency`, 16 on a host with 8+ CPUs).
    max_concurrency: int = field(default_factory=default_max_concurrency)
    #: A rank's items are split into data objects of about this size.
    target_object_size: int = 1 * GiB
    #: Ranged reads closer than this are merged into one request.
    read_gap_threshold: int = 1 * MiB
    #: Upper bound of one merged ranged read.
    max_read_size: int = 64 * MiB
    #: Seconds one rank's uploads of one save may take, retries included; after it
    #: the save fails with DeadlineExceededError and nothing is committed. None: no limit.
    save_deadline: float | None = 900.0
    #: Lower the requests in flight when the service throttles (AIMD), raise them as requests succeed.
    adaptive_concurrency: bool = True
    #: The fewest requests in flight adaptive concurrency goes down to.
    min_concurrency: int = 1
    #: Seconds allowed for aborting uploads and deleting objects after a failed upload.
    cleanup_timeout: float = 60.0
    #: Requests/s that all ranks of one save together may send (uploads only); each rank
    #: gets an equal share. None: the store's default (DEFAULT_REQUEST_RATE: S3 3,000,
    #: GCS 800, local unlimited); math.inf: no cap. See docs/scale.md.
    request_rate_limit: float | None = None
    #: Ranged GETs/s that all ranks of one load together may send; each rank gets an
    #: equal share. None: the store's default (DEFAULT_READ_RATE: S3 4,500, GCS 4,000,
    #: local unlimited); math.inf: no cap. See docs/scale.md.
    read_rate_limit: float | None = None
    #: Most write requests one rank sends per save; above it the part size grows. None:
    #: REQUEST_TIME_TARGET (5) seconds of the rank's share of request_rate_limit.
    max_requests_per_rank: int | None = None
    #: Seconds over which a rank's requests in flight rise from 1 to max_concurrency
    #: (jittered per rank). None: world size x max_concurrency / request_rate_limit,
    #: at most 2 s; 0: no ramp.
    ramp_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.part_size < 1:
            raise ValueError(f"part_size must be positive, got {self.part_size}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.target_object_size < 1:
            raise ValueError(f"target_object_size must be positive, got {self.target_object_size}")
        if self.save_deadline is not None and self.save_deadline <= 0:
            raise ValueError(f"save_deadline must be positive or None, got {self.save_deadline}")
        if self.min_concurrency < 1:
            raise ValueError(f"min_concurrency must be >= 1, got {self.min_concurrency}")
        if self.cleanup_timeout < 0:
            raise ValueError(f"cleanup_timeout must be >= 0, got {self.cleanup_timeout}")
        if self.request_rate_limit is not None and not self.request_rate_limit > 0:
            raise ValueError(f"request_rate_limit must be positive, math.inf or None, got {self.request_rate_limit}")
        if self.read_rate_limit is not None and not self.read_rate_limit > 0:
            raise ValueError(f"read_rate_limit must be positive, math.inf or None, got {self.read_rate_limit}")
        if self.max_requests_per_rank is not None and self.max_requests_per_rank < 1:
            raise ValueError(f"max_requests_per_rank must be >= 1 or None, got {self.max_requests_per_rank}")
        if self.ramp_seconds is not None and not self.ramp_seconds >= 0:
            raise ValueError(f"ramp_seconds must be >= 0 or None, got {self.ramp_seconds}")


def plan_part_size(size: int, part_size: int, store: ObjectStore) -> int:
    """Part size for an object of ``size`` bytes within the store's multipart limits."""
    ps = max(part_size, store.min_part_size)
    if math.ceil(size / ps) > store.max_parts:
        ps = math.ceil(math.ceil(size / store.max_parts) / MiB) * MiB
    if ps > store.max_part_size:
        raise TransferError(
            f"object of {size} bytes needs parts larger than the store's {store.max_part_size}-byte limit"
        )
    return ps


@dataclass
class ObjectUpload:
    """An object to upload: its key and its body as back-to-back segments."""

    key: str
    segments: Sequence[Buffer]
    size: int = -1

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = sum(memoryview(s).nbytes for s in self.segments)


@dataclass(frozen=True)
class UploadedObject:
    """Result of one upload: size, whole-object CRC32C, and the CRC of every piece.

    ``pieces`` are ``(offset, length, crc32c)`` in object order; every segment
    boundary of the upload is a piece boundary, so any segment-aligned span's
    checksum can be combined from them.
    """

    key: str
    size: int
    crc32c: int
    pieces: tuple[tuple[int, int, int], ...] = field(repr=False)

    @functools.cached_property
    def _piece_starts(self) -> list[int]:
        return [off for off, _, _ in self.pieces]

    def span_crc32c(self, offset: int, length: int) -> int:
        """CRC32C of ``[offset, offset+length)``, which must be piece-aligned.

        Finds the first piece by bisection: a save asks this once or twice per
        item, so a scan from the start would cost items × pieces.
        """
        total, end = 0, offset + length
        first = bisect.bisect_left(self._piece_starts, offset)
        pieces = self.pieces
        for k in range(first, len(pieces)):
            off, n, c = pieces[k]
            if off >= end:
                break
            if off + n > end:
                raise ValueError("span is not piece-aligned")
            total = crc.combine(total, c, n)
        return total


@dataclass(frozen=True)
class CopyRun:
    """Bytes ``[start, end)`` of the object ``src_key``, copied server side as one request.

    ``crc32c`` is what those bytes must checksum to (the base checkpoint's
    manifest says so); ``src_tag`` is the source version that was verified
    (:meth:`~cloudckpt.store.base.ObjectStore.copy_tag`): if the source changed
    since, the copy is refused.
    """

    src_key: str
    start: int
    end: int
    crc32c: int
    src_tag: str | None = None
    src_size: int = -1

    @property
    def size(self) -> int:
        """Bytes in the run."""
        return self.end - self.start


@dataclass
class ObjectCopy:
    """An object made of runs of existing objects, back to back, copied inside the store.

    One run covering its whole source object is a single whole-object copy
    (S3 CopyObject, GCS rewrite, local copy_file_range); anything else is a
    multipart upload of ``UploadPartCopy`` parts, one per run, so every run but
    the last must hold at least the store's ``min_part_size`` bytes.
    """

    key: str
    runs: Sequence[CopyRun]

    @property
    def size(self) -> int:
        """Bytes of the new object."""
        return sum(r.size for r in self.runs)

    @property
    def crc32c(self) -> int:
        """CRC32C of the new object, combined from the runs'."""
        return crc.combine_all((r.crc32c, r.size) for r in self.runs)

    @property
    def whole(self) -> bool:
        """True when the object is one complete source object."""
        return len(self.runs) == 1 and self.runs[0].start == 0 and self.runs[0].end == self.runs[0].src_size


@dataclass
class CopyOutcome:
    """What :meth:`TransferEngine.copy` did: objects made, and copies that fell back (key -> why)."""

    done: list[UploadedObject] = field(default_factory=list)
    failed: dict[str, BaseException] = field(default_factory=dict)

    @property
    def copied_bytes(self) -> int:
        """Bytes the store copied for the objects made."""
        return sum(o.size for o in self.done)


def _slice_segments(segments: Sequence[Buffer], starts: list[int], begin: int,
                    end: int) -> list[tuple[int, memoryview]]:
    """Zero-copy pieces covering ``[begin, end)``: (object offset, memoryview)."""
    import bisect

    out = []
    i = max(0, bisect.bisect_right(starts, begin) - 1)
    pos = begin
    while pos < end and i < len(segments):
        seg = memoryview(segments[i]).cast("B")
        s0 = starts[i]
        lo, hi = pos - s0, min(end - s0, seg.nbytes)
        if hi > lo:
            out.append((pos, seg[lo:hi]))
            pos = s0 + hi
        i += 1
    return out


class _Pool:
    """A bounded set of worker threads running submitted calls, returning Futures.

    Unlike ``ThreadPoolExecutor`` it keeps accepting work while the interpreter
    shuts down: a background save that reaches its uploads after the main thread
    returned (an executor's ``close()`` at exit waits for it) must still be able
    to upload, where ``ThreadPoolExecutor.submit`` raises "cannot schedule new
    futures after interpreter shutdown". Workers are daemon threads: the caller
    always waits for the futures it needs, and a hung request must not keep the
    process alive after the caller gave up.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._max = max(1, workers)
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("pool is shut down")
            self._queue.put((fut, fn, args))
            # A new thread only when none is idle, up to the bound.
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                t = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:  # noqa: BLE001 - delivered through the future
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
            del item, fut, fn, args
            self._idle.release()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                threads: list[threading.Thread] = []
            else:
                self._closed = True
                threads = list(self._threads)
                if cancel_futures:
                    pending = []
                    while True:
                        try:
                            pending.append(self._queue.get_nowait())
                        except queue.Empty:
                            break
                    for item in pending:
                        if item is not None:
                            item[0].cancel()
                for _ in threads:
                    self._queue.put(None)
        if wait:
            for t in threads:
                t.join()


class _Failure:
    """The first error of one upload or download; later ones are consequences."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def set(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def _segment_starts(segments: Sequence[Buffer]) -> list[int]:
    """The object offset at which each segment starts."""
    starts, pos = [], 0
    for s in segments:
        starts.append(pos)
        pos += memoryview(s).nbytes
    return starts


def _piece_crcs(pieces: list[tuple[int, memoryview]]) -> list[tuple[int, int, int]]:
    return [(off, mv.nbytes, crc.crc32c(mv)) for off, mv in pieces]


class _UploadCoordinator:
    """The tasks of one :meth:`TransferEngine.upload` call and the state they share.

    Like s3transfer's upload tasks, each step is a method run on the pool:
    :meth:`put_small` (one PUT), :meth:`start_multipart`, :meth:`put_part` and
    :meth:`complete`. The coordinator records every multipart upload started
    and every object completed (under one lock, by the task itself, so work
    that finishes after another task failed is still known) and owns the
    cleanup after a failure: :meth:`cleanup`.
    """

    def __init__(self, store: ObjectStore, scope: RetryScope, failure: _Failure,
                 progress: Callable[[int], None] | None) -> None:
        self.store = store
        self.scope = scope
        self.failure = failure
        self._progress = progress
        self._lock = threading.Lock()
        #: key -> upload id of every multipart upload started and not completed (aborted on failure).
        self.uploads: dict[str, str] = {}
        #: Keys of objects completed by this upload (deleted on failure).
        self.completed: list[str] = []
        #: Keys uploaded in parts: any incomplete upload of them is this upload's.
        self.multipart_keys: list[str] = []
        #: Copies that fell back (key -> why): their items are uploaded instead.
        self.failed_copies: dict[str, BaseException] = {}

    def guarded(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as a task: skipped once any task failed, run in the upload's retry scope, failure recorded."""
        def run(*args: Any) -> Any:
            if self.failure.is_set():
                return None  # another request failed: don't start new work
            try:
                with retry.use_scope(self.scope):
                    return fn(*args)
            except BaseException as exc:
                self.failure.set(exc)
                raise
        return run

    def _report(self, nbytes: int) -> None:
        if self._progress:
            self._progress(nbytes)

    def put_small(self, obj: ObjectUpload, starts: list[int]) -> list[tuple[int, int, int]]:
        """Upload a whole object in one PUT; return its piece CRCs."""
        pieces = _slice_segments(obj.segments, starts, 0, obj.size)
        crcs = _piece_crcs(pieces)
        whole = crc.combine_all((c, n) for _, n, c in crcs)
        self.store.put(obj.key, [mv for _, mv in pieces], crc32c=whole)
        with self._lock:
            self.completed.append(obj.key)
        self._report(obj.size)
        return crcs

    def start_multipart(self, obj: ObjectUpload) -> str:
        """Start a multipart upload; return its id."""
        upload_id = self.store.create_multipart(obj.key)
        # Recorded here, not by the waiting thread, so an upload that starts
        # after another request failed is still aborted.
        with self._lock:
            self.uploads[obj.key] = upload_id
        return upload_id

    def put_part(self, obj: ObjectUpload, starts: list[int], upload_id: str, number: int, begin: int, end: int
                 ) -> tuple[PartResult, list[tuple[int, int, int]]]:
        """Upload part ``number`` (bytes ``[begin, end)``); return its result and piece CRCs."""
        pieces = _slice_segments(obj.segments, starts, begin, end)
        crcs = _piece_crcs(pieces)
        part_crc = crc.combine_all((c, n) for _, n, c in crcs)
        result = self.store.upload_part(obj.key, upload_id, number, [mv for _, mv in pieces], crc32c=part_crc)
        self._report(end - begin)
        return result, crcs

    def complete(self, key: str, upload_id: str, parts: list[PartResult]) -> None:
        """Complete a multipart upload: from now on it is an object to delete on failure, not to abort."""
        self.store.complete_multipart(key, upload_id, parts)
        with self._lock:
            self.uploads.pop(key, None)
            self.completed.append(key)

    # -- copies ---------------------------------------------------------------------
    def soft(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as a copy task of object ``key``: a copy that cannot be made falls back, it does not fail.

        A missing, changed or corrupt source, or a store that refuses the copy,
        marks ``key`` failed (its items are uploaded instead); a deadline or a
        cancelled save still fails everything.
        """
        def run(*args: Any) -> Any:
            if self.failure.is_set():
                return None
            with self._lock:
                if key in self.failed_copies:
                    return None
            try:
                with retry.use_scope(self.scope):
                    return fn(*args)
            except (DeadlineExceededError, EndpointUnreachableError) as exc:
                self.failure.set(exc)
                raise
            except CloudCheckpointError as exc:
                with self._lock:
                    self.failed_copies.setdefault(key, exc)
                return None
            except BaseException as exc:
                self.failure.set(exc)
                raise
        return run

    def copy_whole(self, obj: ObjectCopy) -> int:
        """One whole-object server-side copy; returns the new object's CRC32C."""
        run = obj.runs[0]
        self.store.copy_object(run.src_key, obj.key, if_match=run.src_tag, crc32c=run.crc32c)
        with self._lock:
            self.completed.append(obj.key)
        return run.crc32c

    def copy_part(self, obj: ObjectCopy, upload_id: str, number: int, run: CopyRun) -> PartResult:
        """Part ``number`` of a multipart copy: one run, copied server side."""
        return self.store.upload_part_copy(obj.key, upload_id, number, run.src_key, run.start, run.end,
                                           crc32c=run.crc32c, if_match=run.src_tag)

    def drop_copy(self, key: str) -> None:
        """Abort or delete what a copy that fell back left behind (best effort)."""
        with self._lock:
            upload_id = self.uploads.pop(key, None)
            done = key in self.completed
            if done:
                self.completed.remove(key)
        try:
            if upload_id is not None:
                self.store.abort_multipart(key, upload_id)
            if done:
                self.store.delete(key)
        except CloudCheckpointError:
            pass

    def cleanup(self, timeout: float) -> None:
        """After a failure: abort every upload started here, delete every object completed here.

        Best effort, but never hides the original error: nothing here raises.
        Its own short deadline keeps a dead endpoint from stretching the failure.
        """
        with self._lock:
            uploads, completed = dict(self.uploads), list(self.completed)
        with retry.use_scope(RetryScope(deadline=time.monotonic() + timeout)):
            for key, upload_id in uploads.items():
                try:
                    self.store.abort_multipart(key, upload_id)
                except CloudCheckpointError:
                    pass
            self._abort_unknown(uploads)
            if completed:
                try:
                    self.store.delete_many(completed)
                except CloudCheckpointError:
                    pass

    def _abort_unknown(self, known: dict[str, str]) -> None:
        # A start whose reply was lost leaves an upload no request knows the id
        # of. These keys belong to this rank's save alone, so every incomplete
        # upload of them is garbage.
        if not self.multipart_keys:
            return
        keys = set(self.multipart_keys)
        try:
            for up in self.store.list_multipart_uploads(os.path.commonprefix(sorted(keys))):
                if up.key in keys and known.get(up.key) != up.upload_id:
                    self.store.abort_multipart(up.key, up.upload_id)
        except CloudCheckpointError:
            pass


class TransferEngine:
    """Runs one rank's uploads and downloads on one bounded pool.

    ``stats`` holds the :class:`~cloudckpt.retry.RetryStats` of the latest
    upload or download (attempts, retries, failures by kind, concurrency low).
    """

    def __init__(self, store: ObjectStore, options: TransferOptions | None = None, *, world_size: int = 1) -> None:
        self.store = store
        self.options = options or TransferOptions()
        self.stats = RetryStats()
        #: Ranks of the save this engine uploads for; sets its share of request_rate_limit.
        self.world_size = world_size
        #: How the latest upload was paced (see plan_pacing).
        self.pacing = UploadPacing()
        #: How this engine's downloads are paced (see plan_read_pacing); set at the first download.
        self.read_pacing: UploadPacing | None = None
        # One limiter for every download of this engine (a load makes several batches),
        # so the rank's share of the read rate holds across them.
        self._read_limits: tuple[RetryStats, AdaptiveLimiter | None] | None = None

    def _limiter(self, stats: RetryStats, pacing: UploadPacing | None) -> AdaptiveLimiter | None:
        opts = self.options
        limiter = None
        if opts.adaptive_concurrency:
            limiter = AdaptiveLimiter(opts.max_concurrency, min_limit=min(opts.min_concurrency, opts.max_concurrency),
                                      stats=stats)
        if pacing is not None and pacing.active:
            # Keeps the AIMD behaviour above (or none, if adaptation is off) and adds the ramp and pacing.
            limiter = PacedLimiter(opts.max_concurrency, min_limit=min(opts.min_concurrency, opts.max_concurrency),
                                   stats=stats, adaptive=opts.adaptive_concurrency, rate=pacing.rate_per_rank,
                                   ramp_seconds=pacing.ramp_seconds)
        return limiter

    def _scope(self, failure: _Failure, deadline: float | None, pacing: UploadPacing | None = None) -> RetryScope:
        stats = RetryStats()
        self.stats = stats
        return RetryScope(deadline=deadline, cancel=failure.event, limiter=self._limiter(stats, pacing), stats=stats)

    def _read_scope(self, failure: _Failure) -> RetryScope:
        if self._read_limits is None:
            self.read_pacing = plan_read_pacing(self.options, self.store.scheme, self.world_size)
            stats = RetryStats()
            self._read_limits = (stats, self._limiter(stats, self.read_pacing))
        stats, limiter = self._read_limits
        self.stats = stats
        return RetryScope(deadline=None, cancel=failure.event, limiter=limiter, stats=stats)

    # -- uploads --------------------------------------------------------------
    def upload(
        self,
        objects: Sequence[ObjectUpload],
        *,
        progress: Callable[[int], None] | None = None,
        deadline: float | None = None,
    ) -> list[UploadedObject]:
        """Upload every object (multipart above the part size); all-or-nothing.

        On any failure, or when the deadline passes, pending requests are
        cancelled (in-flight retries stop), every multipart upload started here
        is aborted, objects completed here are deleted, and the first error is
        raised. Nothing is swallowed. ``deadline`` is a ``time.monotonic()``
        instant (the writer passes the save's start + ``save_deadline``); by
        default it is ``save_deadline`` seconds from now.

        The steps, each a task on one bounded pool (as s3transfer's task
        classes): small objects are one PUT each; a large one is started, its
        parts are sent, and it is completed. An :class:`_UploadCoordinator`
        owns what those tasks share (started and completed uploads) and the
        cleanup after a failure.
        """
        if not objects:
            return []
        if deadline is None and self.options.save_deadline is not None:
            deadline = time.monotonic() + self.options.save_deadline
        part_size = self._plan_upload(objects)
        failure = _Failure()
        coord = _UploadCoordinator(self.store, self._scope(failure, deadline, self.pacing), failure, progress)
        pool = _Pool(self.options.max_concurrency, "cloudckpt-upload")
        results = self._coordinated(coord, pool, failure,
                                    lambda: self._run_upload(objects, part_size, coord, pool, deadline))
        return [UploadedObject(o.key, o.size, results[o.key][0], tuple(results[o.key][1])) for o in objects]

    def _coordinated(self, coord: _UploadCoordinator, pool: _Pool, failure: _Failure,
                     run: Callable[[], _R]) -> _R:
        """Run ``run`` on ``pool``; on any failure the coordinator aborts and deletes what it started.

        The first error is raised (later ones are its consequences). Shutting the
        pool down waits for requests in flight; they stop retrying once the
        scope is cancelled, so this is bounded by one attempt's timeout.
        """
        try:
            return run()
        except BaseException as exc:
            failure.set(exc)
            pool.shutdown(wait=True, cancel_futures=True)
            coord.cleanup(self.options.cleanup_timeout)
            first = failure.error
            if first is None or first is exc or not isinstance(exc, Exception):
                raise
            raise first from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _plan_upload(self, objects: Sequence[ObjectUpload]) -> int:
        """Set :attr:`pacing` for this upload and return the part size its request budget allows."""
        opts = self.options
        sizes = [o.size for o in objects]
        pacing = plan_pacing(opts, self.store.scheme, self.world_size)
        part_size = plan_budget_part_size(sizes, opts.part_size, pacing.max_requests, self.store)
        self.pacing = dataclasses.replace(pacing, part_size=part_size,
                                          requests=count_requests(sizes, part_size, self.store))
        return part_size

    def _run_upload(self, objects: Sequence[ObjectUpload], part_size: int, coord: _UploadCoordinator,
                    pool: _Pool, deadline: float | None) -> dict[str, tuple[int, list[tuple[int, int, int]]]]:
        """Submit every task, wait for them in order; ``{key: (object CRC32C, piece CRCs)}``.

        Returns early (raising the first error) as soon as any task failed or
        the deadline passed.
        """
        failure = coord.failure
        small: list[tuple[ObjectUpload, Future]] = []
        large: list[tuple[ObjectUpload, list[int], int, Future]] = []
        for obj in objects:
            starts = _segment_starts(obj.segments)
            ps = plan_part_size(obj.size, part_size, self.store)
            if obj.size <= ps:
                small.append((obj, pool.submit(coord.guarded(coord.put_small), obj, starts)))
            else:
                coord.multipart_keys.append(obj.key)
                large.append((obj, starts, ps, pool.submit(coord.guarded(coord.start_multipart), obj)))

        part_futs: list[tuple[ObjectUpload, str, list[Future]]] = []
        for obj, starts, ps, fut in large:
            upload_id = self._result(fut, failure, deadline)
            if upload_id is None:
                break
            part_futs.append((obj, upload_id, [
                pool.submit(coord.guarded(coord.put_part), obj, starts, upload_id, i + 1, b, min(b + ps, obj.size))
                for i, b in enumerate(range(0, obj.size, ps))]))

        results: dict[str, tuple[int, list[tuple[int, int, int]]]] = {}
        complete_futs: list[Future] = []
        for obj, upload_id, futs in part_futs:
            parts = self._collect_parts(futs, failure, deadline)
            if parts is None:
                break
            complete_futs.append(pool.submit(coord.guarded(coord.complete), obj.key, upload_id,
                                             [p for p, _ in parts]))
            results[obj.key] = (crc.combine_all((p.crc32c, p.size) for p, _ in parts),
                                [c for _, crcs in parts for c in crcs])
        for fut in complete_futs:
            self._result(fut, failure, deadline)
        for obj, fut in small:
            crcs = self._result(fut, failure, deadline)
            if crcs is not None:
                results[obj.key] = (crc.combine_all((c, n) for _, n, c in crcs), crcs)
        if failure.is_set():
            raise failure.error or TransferError("upload aborted")
        return results

    def _collect_parts(self, futs: list[Future], failure: _Failure, deadline: float | None
                       ) -> list[tuple[PartResult, list[tuple[int, int, int]]]] | None:
        """Every part's result in order, or None once the upload failed."""
        out = []
        for f in futs:
            r = self._result(f, failure, deadline)
            if r is None:
                return None
            out.append(r)
        return out

    def _result(self, fut: Future, failure: _Failure, deadline: float | None) -> Any:
        # Wait for one future, but return early (None) as soon as any request
        # failed or the deadline passed.
        while True:
            done, _ = wait([fut], timeout=0.1)
            if done:
                exc = fut.exception() if not fut.cancelled() else None
                if exc is not None or fut.cancelled():
                    failure.set(exc or TransferError("upload cancelled"))
                    return None
                return fut.result()
            if failure.is_set():
                return None
            if deadline is not None and time.monotonic() > deadline:
                failure.set(DeadlineExceededError(
                    f"uploads to {self.store.url('')} did not finish within save_deadline="
                    f"{self.options.save_deadline:g} s; nothing was committed. Check the storage service's "
                    "health, or raise TransferOptions.save_deadline if the save needs longer"))
                return None

    # -- server-side copies ------------------------------------------------------
    def copy(self, objects: Sequence[ObjectCopy], *, deadline: float | None = None) -> CopyOutcome:
        """Make every object from runs of existing ones, inside the store; no payload passes the client.

        A copy whose source is missing, changed or does not hold the recorded
        bytes does not fail the call: it is cleaned up and reported in
        :attr:`CopyOutcome.failed`, and the caller uploads those bytes instead.
        Transient errors are retried like uploads. A deadline, an unreachable
        endpoint or any other error fails the call: every copy made here is
        then removed and the error raised.
        """
        outcome = CopyOutcome()
        if not objects:
            return outcome
        if deadline is None and self.options.save_deadline is not None:
            deadline = time.monotonic() + self.options.save_deadline
        failure = _Failure()
        coord = _UploadCoordinator(self.store, self._scope(failure, deadline, self.pacing), failure, None)
        pool = _Pool(self.options.max_concurrency, "cloudckpt-copy")
        crcs = self._coordinated(coord, pool, failure, lambda: self._run_copies(objects, coord, pool, deadline))
        for obj in objects:
            if obj.key in coord.failed_copies:
                coord.drop_copy(obj.key)
                outcome.failed[obj.key] = coord.failed_copies[obj.key]
            else:
                pieces, pos = [], 0
                for r in obj.runs:
                    pieces.append((pos, r.size, r.crc32c))
                    pos += r.size
                outcome.done.append(UploadedObject(obj.key, obj.size, crcs[obj.key], tuple(pieces)))
        return outcome

    def _run_copies(self, objects: Sequence[ObjectCopy], coord: _UploadCoordinator, pool: _Pool,
                    deadline: float | None) -> dict[str, int]:
        """Submit every copy task, wait for them; ``{key: CRC32C}`` of the copies that did not fall back."""
        failure = coord.failure
        whole: list[tuple[ObjectCopy, Future]] = []
        started: list[tuple[ObjectCopy, Future]] = []
        for obj in objects:
            if obj.whole and obj.size <= self.store.max_copy_object_size:
                whole.append((obj, pool.submit(coord.soft(obj.key, coord.copy_whole), obj)))
            else:
                coord.multipart_keys.append(obj.key)
                started.append((obj, pool.submit(coord.soft(obj.key, coord.start_multipart), obj)))
        parts: list[tuple[ObjectCopy, str, list[Future]]] = []
        for obj, fut in started:
            upload_id = self._result(fut, failure, deadline)
            if failure.is_set():
                break
            if upload_id is None:
                continue  # fell back
            parts.append((obj, upload_id, [pool.submit(coord.soft(obj.key, coord.copy_part), obj, upload_id, i + 1, r)
                                           for i, r in enumerate(obj.runs)]))
        out: dict[str, int] = {}
        completes: list[Future] = []
        for obj, upload_id, futs in parts:
            results = [self._result(f, failure, deadline) for f in futs]
            if failure.is_set():
                break
            if any(r is None for r in results):
                continue
            completes.append(pool.submit(coord.soft(obj.key, coord.complete), obj.key, upload_id, results))
            out[obj.key] = crc.combine_all((p.crc32c, p.size) for p in results)
        for fut in completes:
            self._result(fut, failure, deadline)
        for obj, fut in whole:
            c = self._result(fut, failure, deadline)
            if c is not None:
                out[obj.key] = c
        if failure.is_set():
            raise failure.error or TransferError("copy aborted")
        return out

    # -- downloads --------------------------------------------------------------
    def download_ranges(
        self,
        reads: Sequence[tuple[str, int, memoryview | list[tuple[int, memoryview | None]]]],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Fill each ``out`` with ``[start, start+len(out))`` of ``key``, in parallel.

        An ``out`` that is a list of ``(offset, view)`` pairs is a scatter read
        (:meth:`~cloudckpt.store.base.ObjectStore.get_ranges_into`): one request
        from ``start`` fills every view in turn. The first failure cancels the
        other reads (their retries stop) and is raised.
        """
        if not reads:
            return
        failure = _Failure()
        scope = self._read_scope(failure)

        def one(key: str, start: int, out: memoryview | list[tuple[int, memoryview | None]]) -> None:
            if failure.is_set():
                return
            try:
                with retry.use_scope(scope):
                    if isinstance(out, list):
                        self.store.get_ranges_into(key, start, out)
                    else:
                        self.store.get_range(key, start, out)
            except BaseException as exc:
                failure.set(exc)
                raise
            if progress:
                progress(sum(memoryview(v).nbytes for _, v in out if v is not None) if isinstance(out, list)
                         else memoryview(out).nbytes)

        if len(reads) == 1:
            one(*reads[0])
            return
        pool = _Pool(min(self.options.max_concurrency, len(reads)), "cloudckpt-download")
        try:
            futs = [pool.submit(one, *r) for r in reads]
            wait(futs, return_when=FIRST_EXCEPTION)
        finally:
            pool.shutdown(wait=True, cancel_futures=failure.is_set())
        if failure.error is not None:
            raise failure.error
        for f in futs:
            f.result()


def abort_incomplete_uploads(store: ObjectStore, prefix: str, *, unless_exists: str | None = None,
                             tokens: Iterable[str] | None = None, timeout: float = 30.0) -> int:
    """Abort incomplete multipart uploads under ``prefix``; return how many. Never raises.

    With ``tokens``, only uploads of data objects whose name carries one of
    those save tokens (:func:`cloudckpt.layout.parse_data_object_name`) are
    aborted: the uploads of one save, never those of a concurrent save of the
    same checkpoint. Without, every upload under ``prefix`` is (for ``gc``).
    Nothing is done if the object ``unless_exists`` (the commit marker)
    exists. Bounded by ``timeout`` seconds whatever the store's health (a dead
    endpoint fails at once after its first give-up).
    """
    from cloudckpt import layout

    wanted = None if tokens is None else {t[:layout.TOKEN_CHARS] for t in tokens}
    aborted = 0
    with retry.use_scope(RetryScope(deadline=time.monotonic() + timeout)):
        try:
            if unless_exists is not None and store.head(unless_exists) is not None:
                return 0
            for up in store.list_multipart_uploads(prefix):
                if wanted is not None:
                    parsed = layout.parse_data_object_name(up.key)
                    if parsed is None or parsed[2] not in wanted:
                        continue
                try:
                    store.abort_multipart(up.key, up.upload_id)
                    aborted += 1
                except CloudCheckpointError:
                    pass
        except CloudCheckpointError:
            pass
    return aborted


def coalesce_ranges(
    ranges: Sequence[tuple[int, int]], gap: int, max_size: int
) -> list[tuple[int, int, list[int]]]:
    """Merge ``(start, end)`` ranges whose gap is <= ``gap`` into reads of <= ``max_size``.

    Returns ``(start, end, member indices)``; a single range larger than
    ``max_size`` stays one read.
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    out: list[tuple[int, int, list[int]]] = []
    for i in order:
        s, e = ranges[i]
        if out:
            cs, ce, members = out[-1]
            if s - ce <= gap and max(e, ce) - cs <= max_size:
                out[-1] = (cs, max(ce, e), members + [i])
                continue
        out.append((s, e, [i]))
    return out


# -- request pacing at scale (docs/scale.md) ------------------------------------------------
#
# Object stores throttle a save long before the network saturates: S3 allows about
# 3,500 writes/s per partitioned prefix and a new GCS bucket about 1,000 writes/s.
# Three mechanisms keep a whole job under those limits by construction, on top of
# the AIMD reaction to 503/429 above (which only helps after the service refused):
#
# * a per-rank request-rate cap: every rank gets an equal share of
#   ``request_rate_limit`` (the whole save's budget), paced as a token schedule
#   that starts at a random phase, so ranks never fire their first requests in
#   the same instant;
# * a jittered ramp of requests in flight from 1 to ``max_concurrency``;
# * a per-rank request budget: when a rank's objects would need more requests
#   than ``max_requests_per_rank``, its part size grows.

#: Default ``request_rate_limit`` by store scheme: requests/s that all ranks of one
#: save together may send. S3: 3,500 writes/s per partitioned prefix, less a margin
#: for other traffic and for requests that are retried. GCS: a new bucket's ~1,000
#: object writes/s, less a margin (whether XML multipart part PUTs count as writes
#: is not documented, so every request is counted). Local disks have no such limit.
DEFAULT_REQUEST_RATE: dict[str, float] = {"s3": 3000.0, "gs": 800.0}

#: Default ``read_rate_limit`` by store scheme: ranged GETs/s that all ranks of one
#: load together may send. S3: 5,500 GET/s per partitioned prefix; GCS: a new
#: bucket's ~5,000 object reads/s; each less a margin for other traffic and retries.
DEFAULT_READ_RATE: dict[str, float] = {"s3": 4500.0, "gs": 4000.0}

#: Seconds of requests, at a rank's share of ``request_rate_limit``, that the
#: derived request budget allows: beyond that, larger parts are cheaper than waiting.
REQUEST_TIME_TARGET = 5.0

#: Longest derived ramp, in seconds.
MAX_RAMP_SECONDS = 2.0


@dataclass(frozen=True)
class UploadPacing:
    """How one rank paces its uploads of one save (see :func:`plan_pacing`).

    ``rate_per_rank``: requests/s this rank may start (None: unlimited);
    ``ramp_seconds``: the longest this rank's requests in flight take to rise from
    1 to ``max_concurrency`` (each rank draws its own, jittered, in
    ``[ramp_seconds / 2, ramp_seconds]``); ``max_requests``: the request budget
    (None: none); ``part_size``: the part size after the budget was applied
    (filled in by :meth:`TransferEngine.upload`).
    """

    world_size: int = 1
    rate_per_rank: float | None = None
    ramp_seconds: float = 0.0
    max_requests: int | None = None
    part_size: int | None = None
    requests: int | None = None

    @property
    def active(self) -> bool:
        """True if the rank is paced or ramped at all."""
        return self.rate_per_rank is not None or self.ramp_seconds > 0


def _rate_and_ramp(options: TransferOptions, limit: float | None, defaults: dict[str, float], scheme: str,
                   world: int) -> tuple[float | None, float]:
    """A rank's share of ``limit`` (or the scheme's default; None if unlimited) and its ramp."""
    total = defaults.get(scheme, math.inf) if limit is None else limit
    rate = None if math.isinf(total) else total / world
    if options.ramp_seconds is not None:
        return rate, options.ramp_seconds
    if rate is None:
        return rate, 0.0
    return rate, min(MAX_RAMP_SECONDS, world * options.max_concurrency / total)


def plan_pacing(options: TransferOptions, scheme: str, world_size: int) -> UploadPacing:
    """Per-rank pacing for a save of ``world_size`` ranks to a ``scheme`` store (pure).

    * rate: ``request_rate_limit`` (or the scheme's :data:`DEFAULT_REQUEST_RATE`)
      divided by the world size; ``math.inf`` means unlimited;
    * ramp: ``ramp_seconds``, or the time the aggregate rate needs to admit every
      rank's full concurrency once (``world × max_concurrency / rate``), at most
      :data:`MAX_RAMP_SECONDS`;
    * budget: ``max_requests_per_rank``, or :data:`REQUEST_TIME_TARGET` seconds of
      this rank's rate (at least 1), and never more than a quarter of
      ``save_deadline`` at that rate, so pacing alone can never run a save past
      its deadline.
    """
    world = max(1, int(world_size))
    rate, ramp = _rate_and_ramp(options, options.request_rate_limit, DEFAULT_REQUEST_RATE, scheme, world)
    budget = options.max_requests_per_rank
    if budget is None and rate is not None:
        seconds = REQUEST_TIME_TARGET
        if options.save_deadline is not None:
            seconds = min(seconds, options.save_deadline / 4)
        budget = max(1, int(rate * seconds))
    return UploadPacing(world_size=world, rate_per_rank=rate, ramp_seconds=ramp, max_requests=budget)


def plan_read_pacing(options: TransferOptions, scheme: str, world_size: int) -> UploadPacing:
    """Per-rank pacing for a load of ``world_size`` ranks from a ``scheme`` store (pure).

    The rate is ``read_rate_limit`` (or :data:`DEFAULT_READ_RATE`) divided by the
    world size, the ramp as for uploads (``ramp_seconds`` or ``world ×
    max_concurrency / rate``, at most :data:`MAX_RAMP_SECONDS`). There is no
    request budget: reads are already coalesced up to ``max_read_size``.
    """
    world = max(1, int(world_size))
    rate, ramp = _rate_and_ramp(options, options.read_rate_limit, DEFAULT_READ_RATE, scheme, world)
    return UploadPacing(world_size=world, rate_per_rank=rate, ramp_seconds=ramp)


def count_requests(sizes: Sequence[int], part_size: int, store: ObjectStore) -> int:
    """Write requests to upload objects of ``sizes`` at ``part_size``: 1 per single PUT,
    parts + 2 (create, complete) per multipart object (pure)."""
    n = 0
    for size in sizes:
        ps = plan_part_size(size, part_size, store)
        n += 1 if size <= ps else math.ceil(size / ps) + 2
    return n


def plan_budget_part_size(sizes: Sequence[int], part_size: int, max_requests: int | None,
                          store: ObjectStore) -> int:
    """The smallest part size (a MiB multiple, at least ``part_size``) at which objects of
    ``sizes`` need at most ``max_requests`` requests (pure).

    When no part size achieves it (a request per object is the floor, and parts
    stop at the store's largest part), the part size that needs the fewest
    requests is returned; the budget is a target, never a reason to fail.
    """
    if max_requests is None or not sizes or count_requests(sizes, part_size, store) <= max_requests:
        return part_size
    # Requests never increase as parts grow, so bisect over MiB multiples. Parts
    # larger than the largest object (or the store's largest part) change nothing.
    lo = part_size
    hi = max(lo, min(store.max_part_size, math.ceil(max(sizes) / MiB) * MiB))
    if count_requests(sizes, hi, store) > max_requests:
        return hi
    while hi - lo > MiB:
        mid = (lo + hi) // 2 // MiB * MiB
        if mid <= lo:
            break
        if count_requests(sizes, mid, store) <= max_requests:
            hi = mid
        else:
            lo = mid
    return hi


class PacedLimiter(AdaptiveLimiter):
    """An :class:`~cloudckpt.retry.AdaptiveLimiter` that also ramps and paces one rank.

    Every attempt (retries included) passes :meth:`acquire`, so pacing bounds
    what the rank really sends. On top of AIMD (kept unless ``adaptive=False``):

    * the cap on requests in flight rises linearly from 1 to ``max_limit`` over
      this rank's ramp, a uniform draw in ``[ramp_seconds / 2, ramp_seconds]``;
    * with ``rate``, attempts start on a schedule of one every ``1 / rate``
      seconds whose first slot is a uniform draw in ``[0, 1 / rate)``, so the
      ranks' requests interleave instead of arriving together.
    """

    def __init__(self, max_limit: int, *, min_limit: int = 1, stats: RetryStats | None = None,
                 adaptive: bool = True, rate: float | None = None, ramp_seconds: float = 0.0,
                 rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_limit, min_limit=min_limit, stats=stats)
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be positive or None, got {rate}")
        if ramp_seconds < 0:
            raise ValueError(f"ramp_seconds must be >= 0, got {ramp_seconds}")
        self.adaptive = adaptive
        self.rate = rate
        self._clock = clock
        self._t0 = clock()
        self.ramp = ramp_seconds * (0.5 + 0.5 * rng())
        self._next_slot = self._t0 + (rng() / rate if rate is not None else 0.0)
        self._slot_lock = threading.Lock()

    @property
    def limit(self) -> int:
        """Requests allowed in flight now: the AIMD cap, lowered during the ramp."""
        lim = super().limit
        if self.ramp > 0:
            elapsed = self._clock() - self._t0
            if elapsed < self.ramp:
                lim = min(lim, max(1, math.ceil(self.max_limit * elapsed / self.ramp)))
        return lim

    def reserve(self) -> float:
        """Reserve the next rate slot; return its (monotonic) start time."""
        assert self.rate is not None
        with self._slot_lock:
            at = max(self._clock(), self._next_slot)
            self._next_slot = at + 1.0 / self.rate
        return at

    def acquire(self, *, deadline: float | None = None, cancel: threading.Event | None = None) -> bool:
        """Wait for a slot in flight, then for this rank's next rate slot."""
        if not super().acquire(deadline=deadline, cancel=cancel):
            return False
        if self.rate is None:
            return True
        at = self.reserve()
        while True:
            now = self._clock()
            if now >= at:
                return True
            if (cancel is not None and cancel.is_set()) or (deadline is not None and at > deadline):
                self.release()
                return False
            delay = min(at - now, 0.1)
            if cancel is not None:
                cancel.wait(delay)
            else:
                time.sleep(delay)

    def on_throttle(self, started: float) -> None:
        """Multiplicative decrease, unless adaptation is off."""
        if self.adaptive:
            super().on_throttle(started)

    def on_success(self) -> None:
        """Additive increase, unless adaptation is off."""
        if self.adaptive:
            super().on_success()
