"""The one small object-store interface every backend implements.

Modelled on Apache Arrow's ``object_store``: a handful of operations, no backend
details leaking upward. Upper layers (transfer engine, writer, reader, manager)
only ever talk to :class:`ObjectStore`.

Conventions shared by all backends:

* Keys are full object keys inside the bucket (no leading slash).
* Request bodies are a *sequence of buffers* (``Body``) sent back to back, so a
  part that straddles tensors is sent without assembling it in a new buffer.
* ``crc32c`` arguments are the CRC32C (Castagnoli) of the whole body as an
  unsigned int; backends pass it to the server so the server verifies it.
* Every backend raises only :mod:`cloudckpt.errors` exceptions, never a
  boto3/google exception, and names the object in the message.
* Stores are picklable: live clients are created lazily and dropped when pickled,
  so a store can be sent to another process and rebuilds its client there.
"""

from __future__ import annotations

import abc
import bisect
import builtins
import datetime as _dt
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

Buffer = bytes | bytearray | memoryview
Body = Sequence[Buffer]

__all__ = [
    "Body",
    "Buffer",
    "ObjectInfo",
    "PartResult",
    "MultipartUpload",
    "ObjectStore",
    "body_size",
    "COPY_CHUNK",
    "Scatter",
]

#: Bytes per request when a store without server-side copies copies through the client.
COPY_CHUNK = 32 * 1024 * 1024


def body_size(body: Body) -> int:
    """Total number of bytes in a segmented body."""
    return sum(memoryview(b).nbytes for b in body)


#: Bytes discarded per read while a scatter read skips the bytes between its views.
SKIP_CHUNK = 256 * 1024


class Scatter:
    """Where each byte of one contiguous range goes in a scatter read (:meth:`ObjectStore.get_ranges_into`).

    ``views`` are ``(offset, writable view)`` pairs: absolute object offsets,
    ascending and non-overlapping, each at or after ``start``. The range is
    ``[start, end of the last view)``; bytes between views are read and
    discarded. Only the given views are ever written, whatever the offsets
    (they only choose *which* bytes land in each view); offsets out of order or
    overlapping raise ValueError before anything is read.
    """

    def __init__(self, start: int, views: Sequence[tuple[int, memoryview | None]]) -> None:
        self.start = start
        # (position in the range, length, view or None for bytes to skip)
        self.parts: list[tuple[int, int, memoryview | None]] = []
        pos = start
        for off, view in views:
            if off < pos:
                raise ValueError(f"scatter view at offset {off} overlaps or precedes byte {pos}; views must be "
                                 "ascending and disjoint")
            if off > pos:
                self.parts.append((pos - start, off - pos, None))
            n = 0
            if view is not None:
                view = memoryview(view).cast("B")
                if view.readonly:
                    raise ValueError("scatter views must be writable")
                n = view.nbytes
            if n:
                self.parts.append((off - start, n, view))
            pos = off + n
        #: Bytes in the range (views and the skipped bytes between them).
        self.size = pos - start
        self._starts = [p for p, _, _ in self.parts]
        self._scratch: memoryview | None = None

    def _skip_buffer(self, n: int) -> memoryview:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(SKIP_CHUNK))
        return self._scratch[:min(n, SKIP_CHUNK)]

    def fill(self, readinto: Callable[[memoryview], int | None], got: int, want: int) -> int:
        """Read range bytes ``[got, want)`` from ``readinto`` into place; return how far it got (EOF stops early).

        ``readinto(buf)`` reads at most ``len(buf)`` bytes into ``buf`` (a
        socket or file's ``readinto``); positions are relative to ``start``.
        """
        i = bisect.bisect_right(self._starts, got) - 1
        while got < want:
            pos, n, view = self.parts[i]
            lo, hi = got - pos, min(n, want - pos)
            dst = self._skip_buffer(hi - lo) if view is None else view[lo:hi]
            k = readinto(dst)
            if not k:
                break
            got += k
            if got >= pos + n:
                i += 1
        return got

    def copy_from(self, data: memoryview) -> None:
        """Place the range's bytes, given whole in ``data`` (the fallback of stores without scatter reads)."""
        for pos, n, view in self.parts:
            if view is not None:
                view[:] = data[pos:pos + n]


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD or LIST tells about one object."""

    key: str
    size: int
    etag: str | None = None
    crc32c: int | None = None
    last_modified: _dt.datetime | None = None
    # GCS generation / S3 version id when the backend has one.
    version: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartResult:
    """One uploaded part of a multipart upload, as needed to complete it."""

    part_number: int
    etag: str
    size: int
    crc32c: int


@dataclass(frozen=True)
class MultipartUpload:
    """An in-progress (not completed, not aborted) multipart upload."""

    key: str
    upload_id: str
    initiated: _dt.datetime | None = None


class ObjectStore(abc.ABC):
    """Abstract object store bound to one bucket.

    Implementations: :class:`cloudckpt.store.s3.S3Store`,
    :class:`cloudckpt.store.gcs.GCSStore`, :class:`cloudckpt.store.local.LocalStore`.
    """

    #: URI scheme served by this backend ("s3", "gs", "file").
    scheme: str = ""
    #: Limits on multipart uploads (S3 and GCS XML API share them).
    min_part_size: int = 5 * 1024 * 1024
    max_part_size: int = 5 * 1024 * 1024 * 1024
    max_parts: int = 10_000

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket

    def too_large(self, key: str, size: int, max_size: int) -> Exception:
        """The error for an object over a read cap (see :meth:`get`)."""
        from cloudckpt.errors import ObjectTooLargeError

        return ObjectTooLargeError(
            f"{self.url(key)} has {size} bytes, more than the {max_size} cloudckpt reads for an object of its kind; "
            "it is corrupt, was tampered with, or is not what its name says. Restore it from a trusted copy")

    def url(self, key: str) -> str:
        """Human-readable URL of ``key`` for error messages."""
        return f"{self.scheme}://{self.bucket}/{key}"

    # -- buckets -------------------------------------------------------------
    @abc.abstractmethod
    def check_bucket(self) -> None:
        """Raise BucketNotFoundError / EndpointUnreachableError / AccessDeniedError if unusable."""

    # -- single-request objects ---------------------------------------------
    @abc.abstractmethod
    def put(
        self,
        key: str,
        body: Body,
        *,
        crc32c: int,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Write ``body`` as one object; with ``if_absent`` raise PreconditionFailedError if it exists."""

    @abc.abstractmethod
    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        """Read a whole object; ObjectNotFoundError if it is missing.

        With ``max_size``, an object larger than that raises ObjectTooLargeError
        without its body being read: untrusted objects never cost more memory
        than the caller allows.
        """

    @abc.abstractmethod
    def get_range(self, key: str, start: int, out: memoryview) -> None:
        """Fill ``out`` (writable, contiguous) with bytes ``[start, start + len(out))`` of ``key``."""

    def get_ranges_into(self, key: str, start: int, views: Sequence[tuple[int, memoryview | None]]) -> None:
        """Scatter read: one ranged read from ``start`` to the end of the last view, each view filled in order.

        ``views`` are ``(offset, writable view)`` pairs (object offsets,
        ascending, disjoint; a None view is skipped). Bytes between views are
        read and discarded, so many tensors separated by framing bytes come in
        one request, each straight into its own memory. This default reads the
        range into one scratch buffer and copies; backends stream instead.
        """
        plan = Scatter(start, views)
        if not plan.size:
            return
        buf = memoryview(bytearray(plan.size))
        self.get_range(key, start, buf)
        plan.copy_from(buf)

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Return the object's info, or None if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix`` (recursive, key order)."""

    # In this class body `list` is the method above, so the builtin is named in full below.
    @abc.abstractmethod
    def list_prefixes(self, prefix: str) -> builtins.list[str]:
        """Return the immediate "sub-directories" of ``prefix`` (keys ending in '/')."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete several objects (backends may batch this)."""
        for key in keys:
            self.delete(key)

    # -- multipart -----------------------------------------------------------
    @abc.abstractmethod
    def create_multipart(self, key: str, *, metadata: Mapping[str, str] | None = None) -> str:
        """Start a multipart upload and return its upload id."""

    @abc.abstractmethod
    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body, *, crc32c: int) -> PartResult:
        """Upload one part (1-based ``part_number``); the server verifies ``crc32c``."""

    @abc.abstractmethod
    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartResult], *, if_absent: bool = False
    ) -> ObjectInfo:
        """Assemble the parts (in part-number order) into the final object."""

    @abc.abstractmethod
    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an upload and free its parts; aborting an unknown upload is not an error."""

    @abc.abstractmethod
    def list_multipart_uploads(self, prefix: str) -> builtins.list[MultipartUpload]:
        """Return uploads under ``prefix`` that were neither completed nor aborted."""

    # -- copies (incremental saves) --------------------------------------------
    #: True when :meth:`copy_object` copies inside the service (no bytes through the client).
    server_side_copy: bool = False
    #: True when :meth:`upload_part_copy` copies a byte range inside the service.
    server_side_range_copy: bool = False
    #: Largest object :meth:`copy_object` copies in one request (S3 CopyObject: 5 GiB).
    max_copy_object_size: int = 5 * 1024 * 1024 * 1024

    def copy_probe(self, key: str) -> ObjectInfo | None:
        """What a copy's source condition is checked against: a HEAD (None if absent).

        Its :meth:`copy_tag` identifies this exact version of the object.
        """
        return self.head(key)

    def copy_tag(self, info: ObjectInfo) -> str | None:
        """The token that identifies the version of an object :meth:`copy_probe` saw (S3: its ETag)."""
        return info.etag

    def _check_source(self, src_key: str, if_match: str | None) -> ObjectInfo:
        """The source's info; ObjectNotFoundError / PreconditionFailedError if absent or changed."""
        from cloudckpt.errors import ObjectNotFoundError, PreconditionFailedError

        info = self.copy_probe(src_key)
        if info is None:
            raise ObjectNotFoundError(f"copy source {self.url(src_key)} does not exist")
        if if_match is not None and self.copy_tag(info) != if_match:
            raise PreconditionFailedError(f"copy source {self.url(src_key)} changed (its version is no longer "
                                          f"{if_match}); nothing was copied")
        return info

    def copy_object(self, src_key: str, dst_key: str, *, if_match: str | None = None,
                    crc32c: int | None = None) -> ObjectInfo:
        """Copy the whole object ``src_key`` to ``dst_key`` in the same bucket.

        ``if_match``: the source's :meth:`copy_tag`; if the source changed
        (or is gone) nothing is written and PreconditionFailedError
        (ObjectNotFoundError) is raised. ``crc32c``: the CRC32C the copy must
        have (IntegrityError otherwise). This default reads the source through
        the client and uploads it again; backends override it with a
        server-side copy (:attr:`server_side_copy`).
        """
        from cloudckpt import crc as _crc
        from cloudckpt.errors import IntegrityError

        info = self._check_source(src_key, if_match)
        if info.size <= COPY_CHUNK:
            buf = bytearray(info.size)
            self.get_range(src_key, 0, memoryview(buf))
            got = _crc.crc32c(buf)
            if crc32c is not None and got != crc32c:
                raise IntegrityError(f"copy source {self.url(src_key)} has CRC32C {got:#010x}, expected "
                                     f"{crc32c:#010x}; nothing was copied")
            return self.put(dst_key, [buf], crc32c=got)
        upload_id = self.create_multipart(dst_key)
        try:
            parts = [self.upload_part_copy(dst_key, upload_id, n + 1, src_key, start,
                                           min(start + COPY_CHUNK, info.size))
                     for n, start in enumerate(range(0, info.size, COPY_CHUNK))]
            whole = _crc.combine_all((p.crc32c, p.size) for p in parts)
            if crc32c is not None and whole != crc32c:
                raise IntegrityError(f"copy source {self.url(src_key)} has CRC32C {whole:#010x}, expected "
                                     f"{crc32c:#010x}; nothing was copied")
            return self.complete_multipart(dst_key, upload_id, parts)
        except BaseException:
            self.abort_multipart(dst_key, upload_id)
            raise

    def upload_part_copy(self, key: str, upload_id: str, part_number: int, src_key: str, start: int, end: int,
                         *, crc32c: int | None = None, if_match: str | None = None) -> PartResult:
        """Make bytes ``[start, end)`` of ``src_key`` part ``part_number`` of a multipart upload of ``key``.

        ``if_match`` and ``crc32c`` as in :meth:`copy_object`. As for uploaded
        parts, every part but the last must have at least :attr:`min_part_size`
        bytes. This default reads the range through the client and uploads it.
        """
        from cloudckpt import crc as _crc
        from cloudckpt.errors import IntegrityError

        if if_match is not None:
            self._check_source(src_key, if_match)
        buf = bytearray(end - start)
        self.get_range(src_key, start, memoryview(buf))
        got = _crc.crc32c(buf)
        if crc32c is not None and got != crc32c:
            raise IntegrityError(f"bytes [{start}, {end}) of copy source {self.url(src_key)} have CRC32C "
                                 f"{got:#010x}, expected {crc32c:#010x}; nothing was copied")
        return self.upload_part(key, upload_id, part_number, [buf], crc32c=got)

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - a hook: stores that hold no clients need not override it
        """Release clients and connection pools (the store stays usable; they are recreated)."""

    def __getstate__(self) -> dict:
        # Live clients, pools and locks never travel through pickle; subclasses
        # name them in _transient and recreate them lazily.
        state = self.__dict__.copy()
        for name in getattr(self, "_transient", ()):
            state[name] = None
        return state
