"""The transfer engine: parallel part uploads and ranged downloads over an ObjectStore.

Modelled on s3transfer: every request is a task on one bounded thread pool per
rank, so concurrency (and therefore memory) is bounded whatever the checkpoint
size. Request bodies are slices of the caller's buffers (memoryviews of staged
tensors), so uploading adds no copy of the payload and no memory that grows
with object size.

CRC32C is computed once per *piece* (the intersection of a part with a caller
segment) inside the worker threads; part, item and object checksums are then
combined from pieces without reading the data again.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from cloudckpt import crc
from cloudckpt.errors import CloudCheckpointError, TransferError
from cloudckpt.store.base import Buffer, ObjectStore, PartResult

__all__ = [
    "TransferOptions",
    "ObjectUpload",
    "UploadedObject",
    "TransferEngine",
    "plan_part_size",
    "coalesce_ranges",
]

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class TransferOptions:
    """Tuning knobs of the transfer engine (defaults chosen by ``benchmarks/``)."""

    #: Bytes per multipart part (grown automatically if an object would need > max parts).
    part_size: int = 32 * MiB
    #: Requests in flight per rank, shared by all of that rank's objects.
    max_concurrency: int = 16
    #: A rank's items are split into data objects of about this size.
    target_object_size: int = 1 * GiB
    #: Ranged reads closer than this are merged into one request.
    read_gap_threshold: int = 1 * MiB
    #: Upper bound of one merged ranged read.
    max_read_size: int = 64 * MiB

    def __post_init__(self) -> None:
        if self.part_size < 1:
            raise ValueError(f"part_size must be positive, got {self.part_size}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.target_object_size < 1:
            raise ValueError(f"target_object_size must be positive, got {self.target_object_size}")


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

    def span_crc32c(self, offset: int, length: int) -> int:
        """CRC32C of ``[offset, offset+length)``, which must be piece-aligned."""
        total, end = 0, offset + length
        for off, n, c in self.pieces:
            if off >= end:
                break
            if off >= offset:
                if off + n > end:
                    raise ValueError("span is not piece-aligned")
                total = crc.combine(total, c, n)
        return total


def _slice_segments(segments: Sequence[Buffer], starts: list[int], begin: int, end: int) -> list[tuple[int, memoryview]]:
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


class TransferEngine:
    """Runs one rank's uploads and downloads on one bounded pool."""

    def __init__(self, store: ObjectStore, options: TransferOptions | None = None) -> None:
        self.store = store
        self.options = options or TransferOptions()

    # -- uploads --------------------------------------------------------------
    def upload(
        self,
        objects: Sequence[ObjectUpload],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> list[UploadedObject]:
        """Upload every object (multipart above the part size); all-or-nothing.

        On any failure, pending requests are cancelled, every multipart upload
        started here is aborted, objects completed here are deleted, and the
        first error is raised. Nothing is swallowed.
        """
        if not objects:
            return []
        opts = self.options
        failed = threading.Event()
        state_lock = threading.Lock()
        uploads: dict[str, str] = {}  # key -> upload id, for abort
        completed: list[str] = []

        def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any) -> Any:
                if failed.is_set():
                    return None  # another request failed: don't start new work
                try:
                    return fn(*args)
                except BaseException:
                    failed.set()
                    raise
            return run

        def piece_crcs(pieces: list[tuple[int, memoryview]]) -> list[tuple[int, int, int]]:
            return [(off, mv.nbytes, crc.crc32c(mv)) for off, mv in pieces]

        def put_small(obj: ObjectUpload, starts: list[int]) -> list[tuple[int, int, int]]:
            pieces = _slice_segments(obj.segments, starts, 0, obj.size)
            crcs = piece_crcs(pieces)
            whole = crc.combine_all((c, n) for _, n, c in crcs)
            self.store.put(obj.key, [mv for _, mv in pieces], crc32c=whole)
            with state_lock:
                completed.append(obj.key)
            if progress:
                progress(obj.size)
            return crcs

        def put_part(obj: ObjectUpload, starts: list[int], upload_id: str, number: int, begin: int, end: int
                     ) -> tuple[PartResult, list[tuple[int, int, int]]]:
            pieces = _slice_segments(obj.segments, starts, begin, end)
            crcs = piece_crcs(pieces)
            part_crc = crc.combine_all((c, n) for _, n, c in crcs)
            result = self.store.upload_part(obj.key, upload_id, number, [mv for _, mv in pieces], crc32c=part_crc)
            if progress:
                progress(end - begin)
            return result, crcs

        pool = ThreadPoolExecutor(max_workers=opts.max_concurrency, thread_name_prefix="cloudckpt-upload")
        try:
            small: list[tuple[ObjectUpload, Future]] = []
            large: list[tuple[ObjectUpload, list[int], int, Future]] = []
            for obj in objects:
                starts, pos = [], 0
                for s in obj.segments:
                    starts.append(pos)
                    pos += memoryview(s).nbytes
                ps = plan_part_size(obj.size, opts.part_size, self.store)
                if obj.size <= ps:
                    small.append((obj, pool.submit(guarded(put_small), obj, starts)))
                else:
                    large.append((obj, starts, ps, pool.submit(guarded(self.store.create_multipart), obj.key)))

            part_futs: list[tuple[ObjectUpload, str, list[Future]]] = []
            for obj, starts, ps, fut in large:
                upload_id = self._result(fut, failed)
                if upload_id is None:
                    break
                with state_lock:
                    uploads[obj.key] = upload_id
                futs = [
                    pool.submit(guarded(put_part), obj, starts, upload_id, i + 1, b, min(b + ps, obj.size))
                    for i, b in enumerate(range(0, obj.size, ps))
                ]
                part_futs.append((obj, upload_id, futs))

            results: dict[str, tuple[int, list[tuple[int, int, int]]]] = {}
            complete_futs: list[tuple[ObjectUpload, Future]] = []
            for obj, upload_id, futs in part_futs:
                parts: list[PartResult] = []
                crcs: list[tuple[int, int, int]] = []
                for f in futs:
                    r = self._result(f, failed)
                    if r is None:
                        break
                    parts.append(r[0])
                    crcs.extend(r[1])
                else:
                    complete_futs.append((obj, pool.submit(guarded(self._complete), obj.key, upload_id, parts,
                                                           uploads, completed, state_lock)))
                    results[obj.key] = (crc.combine_all((p.crc32c, p.size) for p in parts), crcs)
            for obj, fut in complete_futs:
                self._result(fut, failed)
            for obj, fut in small:
                crcs = self._result(fut, failed)
                if crcs is not None:
                    results[obj.key] = (crc.combine_all((c, n) for _, n, c in crcs), crcs)
            all_futs = [f for _, f in small] + [f for *_, f in large] + [f for _, _, fs in part_futs for f in fs] + [
                f for _, f in complete_futs]
            if failed.is_set():
                self._raise_first(all_futs)
        except BaseException:
            failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._cleanup(uploads, completed)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [UploadedObject(o.key, o.size, results[o.key][0], tuple(results[o.key][1])) for o in objects]

    def _complete(self, key: str, upload_id: str, parts: list[PartResult], uploads: dict[str, str],
                  completed: list[str], lock: threading.Lock) -> None:
        self.store.complete_multipart(key, upload_id, parts)
        with lock:
            uploads.pop(key, None)
            completed.append(key)

    @staticmethod
    def _result(fut: Future, failed: threading.Event) -> Any:
        # Wait for one future, but return early (None) as soon as any request failed.
        while True:
            done, _ = wait([fut], timeout=0.1)
            if done:
                if fut.exception() is not None:
                    failed.set()
                    return None
                return fut.result()
            if failed.is_set():
                return None

    @staticmethod
    def _raise_first(futs: list[Future]) -> None:
        wait(futs, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in futs if f.done() and not f.cancelled() and f.exception() is not None]
        if not errors:
            raise TransferError("upload aborted")
        raise errors[0]

    def _cleanup(self, uploads: dict[str, str], completed: list[str]) -> None:
        # Best effort, but never hide the original error: aborting must not raise.
        for key, upload_id in list(uploads.items()):
            try:
                self.store.abort_multipart(key, upload_id)
            except CloudCheckpointError:
                pass
        if completed:
            try:
                self.store.delete_many(completed)
            except CloudCheckpointError:
                pass

    # -- downloads --------------------------------------------------------------
    def download_ranges(
        self,
        reads: Sequence[tuple[str, int, memoryview]],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Fill each ``out`` with ``[start, start+len(out))`` of ``key``, in parallel."""
        if not reads:
            return

        def one(key: str, start: int, out: memoryview) -> None:
            self.store.get_range(key, start, out)
            if progress:
                progress(memoryview(out).nbytes)

        if len(reads) == 1:
            one(*reads[0])
            return
        with ThreadPoolExecutor(max_workers=min(self.options.max_concurrency, len(reads)),
                                thread_name_prefix="cloudckpt-download") as pool:
            futs = [pool.submit(one, *r) for r in reads]
            done, _ = wait(futs, return_when=FIRST_EXCEPTION)
            for f in futs:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    for g in futs:
                        g.cancel()
                    raise f.exception()  # type: ignore[misc]
            for f in futs:
                f.result()


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
