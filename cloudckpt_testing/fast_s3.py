"""A fast, in-memory, S3-compatible HTTP server for benchmarks and tests.

moto costs 7 to 20 server CPU seconds per GB and s3rver stalls near 0.1 GB/s,
so neither can measure a client's speed. This server keeps objects in memory,
serves them with a handful of syscalls per MiB and spends well under a CPU
second per GB, so on loopback the client sets the pace.

    with FastS3Server() as server:          # runs in a child process
        client = boto3.client("s3", endpoint_url=server.endpoint_url, ...)
        ...
        print(server.stats())               # request counts, bytes, server CPU

It speaks enough of the S3 REST API for boto3 (s3transfer included), s3fs and
the AWS CRT client used by s3torchconnector: buckets, PutObject, GetObject with
ranges and partNumber, HeadObject, CopyObject, DeleteObject(s), ListObjects v1
and v2, and the multipart upload calls. Signatures are never checked: any
credentials work. Versioning, ACLs, tagging, policies and the like answer 501.

Standalone: ``python -m cloudckpt_testing.fast_s3 --port 9000``.

Shaped mode (:class:`Shaping`) makes loopback look like a cloud region: every
response's first byte waits a fixed latency, and each connection's bytes, in
each direction, are paced by a token bucket to a per-connection cap, with an
optional cap on the whole link. ``--latency-ms 30 --conn-mb-per-s 50``.

Only the standard library and the ``crc32c`` package (a dependency of
cloudckpt, which hashes buffers without copying them) are needed.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import email.utils
import hashlib
import http.client
import http.server
import io
import itertools
import json
import mmap
import os
import re
import resource
import socket
import socketserver
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from xml.etree import ElementTree
from xml.sax.saxutils import escape as _xml_escape

# The crc32c package (a core dependency of cloudckpt) hashes memoryviews in place.
import crc32c as _crc32c_mod

__all__ = ["FastS3Server", "S3Backend", "S3Error", "Shaping", "main"]

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
MiB = 1 << 20
# Big objects are stored in 1 MiB slabs carved from 64 MiB anonymous mmaps and
# recycled through a free list. On these VMs the first touch of a page costs
# about 10 us (1 GiB of fresh memory takes 1.2 to 5 s to fault in), far more
# than copying into it, so reusing memory is what makes 1 GB/s possible.
# 1 MiB keeps the per-slab Python overhead (one readinto / sendall each)
# negligible; 64 KiB slabs hold the tails so a small object wastes little.
_ARENA = 64 * MiB
_BIG = MiB
_SMALL = 64 * 1024
MIN_PART_SIZE = 5 * MiB
_SOCKET_BUFFER = 4 * MiB
MAX_KEYS = 1000
_OWNER_ID = "75aa57f09aa0c8caeab4f8c24e99d10f8e7faeebf76c078efc7c6caea54ba06a"
_OWNER_NAME = "fast-s3"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
# Sub-resources we do not implement: answering 501 beats silently listing.
_UNSUPPORTED_SUBRESOURCES = frozenset(
    "accelerate acl analytics attributes cors encryption intelligent-tiering inventory "
    "legal-hold lifecycle logging metrics notification object-lock ownershipControls "
    "policy policyStatus publicAccessBlock replication requestPayment restore retention "
    "select tagging torrent versions website".split()
)
_CHECKSUM_HEADERS = (
    "x-amz-checksum-crc32c",
    "x-amz-checksum-crc32",
    "x-amz-checksum-crc64nvme",
    "x-amz-checksum-sha1",
    "x-amz-checksum-sha256",
)
# Headers stored with an object and returned by GET/HEAD.
_STORED_HEADERS = (
    "cache-control",
    "content-disposition",
    "content-language",
    "expires",
    "x-amz-storage-class",
    "x-amz-website-redirect-location",
)


class S3Error(Exception):
    """An S3 error response: HTTP status, S3 error code, message and extra XML fields."""

    def __init__(self, status: int, code: str, message: str, **fields: Any) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        # Extra response headers (e.g. Content-Range on 416).
        self.headers: list[tuple[str, str]] = []


class _ClientGone(Exception):
    """The client closed the connection in the middle of a request body."""


# --------------------------------------------------------------------------- memory


class _SlabPool:
    """Recycles 1 MiB and 64 KiB memoryviews so stored objects reuse warm pages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_big: list[memoryview] = []
        self._free_small: list[memoryview] = []
        self._arenas: list[mmap.mmap] = []
        self.arena_bytes = 0

    def _grow(self) -> None:
        # Called with the lock held. mmap (not bytearray) because bytearray()
        # memsets the whole buffer, which faults every page in up front.
        arena = mmap.mmap(-1, _ARENA)
        self._arenas.append(arena)
        self.arena_bytes += _ARENA
        view = memoryview(arena)
        self._free_big.extend(view[i : i + _BIG] for i in range(0, _ARENA, _BIG))

    def _take_big(self) -> memoryview:
        if not self._free_big:
            self._grow()
        return self._free_big.pop()

    def take_big(self) -> memoryview:
        """One free 1 MiB slab."""
        with self._lock:
            return self._take_big()

    def take(self, size: int) -> tuple[list[memoryview], list[memoryview]]:
        """Room for ``size`` bytes: (pieces of exactly ``size`` bytes in total, slabs to give back)."""
        pieces: list[memoryview] = []
        slabs: list[memoryview] = []
        nbig, rest = divmod(size, _BIG)
        nsmall, tail = divmod(rest, _SMALL)
        with self._lock:
            for _ in range(nbig):
                slab = self._take_big()
                slabs.append(slab)
                pieces.append(slab)
            for _ in range(nsmall):
                if not self._free_small:
                    big = self._take_big()
                    self._free_small.extend(big[i : i + _SMALL] for i in range(0, _BIG, _SMALL))
                slab = self._free_small.pop()
                slabs.append(slab)
                pieces.append(slab)
        if tail:
            pieces.append(memoryview(bytearray(tail)))
        return pieces, slabs

    def give(self, slabs: Iterable[memoryview]) -> None:
        """Return slabs from :meth:`take` / :meth:`take_big` to the free lists."""
        with self._lock:
            for slab in slabs:
                (self._free_big if len(slab) == _BIG else self._free_small).append(slab)

    def prefault(self, nbytes: int) -> None:
        """Touch ``nbytes`` of slabs now so the first large PUT does not pay for page faults."""
        slabs = [self.take_big() for _ in range((nbytes + _BIG - 1) // _BIG)]
        for slab in slabs:
            slab[::4096] = b"\0" * len(range(0, _BIG, 4096))
        self.give(slabs)

    def free_bytes(self) -> int:
        """Bytes sitting in the free lists."""
        with self._lock:
            return len(self._free_big) * _BIG + len(self._free_small) * _SMALL


class _Blob:
    """Bytes received in one request, as a list of memoryview pieces.

    ``refs`` counts the objects, parts and in-flight GETs that use the blob; the
    slabs go back to the pool when it drops to zero (always under the table lock).
    """

    __slots__ = ("pieces", "size", "slabs", "refs")

    def __init__(self, pieces: list[memoryview], size: int, slabs: list[memoryview]) -> None:
        self.pieces = pieces
        self.size = size
        self.slabs = slabs
        self.refs = 0


def _trimmed(blob: _Blob) -> Iterable[memoryview]:
    """The blob's pieces cut to its size (the last slab may be longer)."""
    left = blob.size
    for piece in blob.pieces:
        if left <= 0:
            return
        yield piece[: min(len(piece), left)]
        left -= len(piece)


class _Crc32c:
    """Incremental CRC32C over memoryviews (4-byte big-endian digest)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: memoryview) -> None:
        """Fold ``data`` in."""
        self.value = _crc32c_mod.crc32c(data, value=self.value)

    def digest(self) -> bytes:
        """The CRC as 4 big-endian bytes."""
        return self.value.to_bytes(4, "big")


class _Crc32:
    """Incremental zlib CRC32 over memoryviews."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: memoryview) -> None:
        """Fold ``data`` in."""
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        """The CRC as 4 big-endian bytes."""
        return self.value.to_bytes(4, "big")


def _hasher(header: str) -> Any:
    """A fresh hash object for an x-amz-checksum-* header, or None if we cannot compute it."""
    if header == "x-amz-checksum-crc32c":
        return _Crc32c()
    if header == "x-amz-checksum-crc32":
        return _Crc32()
    if header == "x-amz-checksum-sha1":
        return hashlib.sha1()
    if header == "x-amz-checksum-sha256":
        return hashlib.sha256()
    return None  # crc64nvme: not in the standard library; stored and echoed unverified


def _digest_pieces(hasher: Any, pieces: Iterable[memoryview]) -> bytes:
    for piece in pieces:
        hasher.update(piece)
    return hasher.digest()


# --------------------------------------------------------------------------- request bodies


class _Source(Protocol):
    """A request body: fixed-length or HTTP-chunked."""

    def readinto_exact(self, view: memoryview) -> None:
        """Fill ``view`` completely or raise."""

    def readline(self, limit: int) -> bytes:
        """One line of at most ``limit`` bytes."""

    def drain(self) -> None:
        """Discard the rest of the body."""


class _LengthSource:
    """The next ``length`` bytes of the connection."""

    def __init__(self, rfile: io.BufferedIOBase, length: int) -> None:
        self.rfile = rfile
        self.left = length

    def readinto_exact(self, view: memoryview) -> None:
        """Fill ``view`` completely or raise."""
        n = len(view)
        if n > self.left:
            raise S3Error(400, "IncompleteBody", "The request body is shorter than its framing says.")
        if n and self.rfile.readinto(view) != n:  # BufferedReader loops until full or EOF
            raise _ClientGone()
        self.left -= n

    def readline(self, limit: int) -> bytes:
        """One line of at most ``limit`` bytes."""
        line = self.rfile.readline(min(limit, self.left))
        self.left -= len(line)
        return line

    def drain(self) -> None:
        """Discard the rest of the body."""
        while self.left:
            data = self.rfile.read(min(self.left, MiB))
            if not data:
                raise _ClientGone()
            self.left -= len(data)


class _HttpChunkedSource:
    """Decodes ``Transfer-Encoding: chunked`` (RFC 9112 section 7.1)."""

    def __init__(self, rfile: io.BufferedIOBase) -> None:
        self.rfile = rfile
        self.left = 0
        self.eof = False

    def next_chunk(self) -> None:
        """Read the next chunk-size line (and the trailers after the last chunk)."""
        line = self.rfile.readline(4096)
        if not line:
            raise _ClientGone()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise S3Error(400, "IncompleteBody", "Bad chunk size line in a chunked body.") from None
        if size == 0:
            while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                pass  # HTTP trailers of the outer framing (aws-chunked puts its own inside)
            self.eof = True
        self.left = size

    def _chunk_done(self) -> None:
        if self.rfile.readline(8) not in (b"\r\n", b"\n"):
            raise S3Error(400, "IncompleteBody", "Missing CRLF after a chunk.")

    def readinto_exact(self, view: memoryview) -> None:
        """Fill ``view`` completely, across chunks, or raise."""
        pos, n = 0, len(view)
        while pos < n:
            if self.left == 0:
                if self.eof:
                    raise S3Error(400, "IncompleteBody", "The chunked body ended early.")
                self.next_chunk()
                continue
            k = min(n - pos, self.left)
            if self.rfile.readinto(view[pos : pos + k]) != k:
                raise _ClientGone()
            pos += k
            self.left -= k
            if self.left == 0:
                self._chunk_done()

    def readline(self, limit: int) -> bytes:
        """One line of at most ``limit`` bytes, across chunks."""
        out = b""
        while len(out) < limit and not out.endswith(b"\n"):
            if self.left == 0:
                if self.eof:
                    break
                self.next_chunk()
                continue
            part = self.rfile.readline(min(self.left, limit - len(out)))
            if not part:
                raise _ClientGone()
            self.left -= len(part)
            if self.left == 0:
                self._chunk_done()
            out += part
        return out

    def drain(self) -> None:
        """Discard the rest of the body."""
        while not self.eof:
            if self.left == 0:
                self.next_chunk()
                continue
            data = self.rfile.read(min(self.left, MiB))
            if not data:
                raise _ClientGone()
            self.left -= len(data)
            if self.left == 0:
                self._chunk_done()


class _BlobWriter:
    """Fills pooled memory from a source: exactly-sized when the length is known, else growing."""

    def __init__(self, pool: _SlabPool, size: int | None) -> None:
        self.pool = pool
        self.fixed = size is not None
        self.pieces: list[memoryview]
        self.slabs: list[memoryview]
        if size is not None:
            self.pieces, self.slabs = pool.take(size)
        else:
            self.pieces, self.slabs = [], []
        self.index = 0  # piece being filled
        self.offset = 0  # bytes filled in it
        self.size = 0

    def fill(self, src: _Source, n: int) -> None:
        """Copy the next ``n`` bytes of ``src`` in."""
        while n:
            if self.fixed:
                if self.index >= len(self.pieces):
                    raise S3Error(
                        400,
                        "IncompleteBody",
                        "The body is longer than x-amz-decoded-content-length.",
                    )
                piece = self.pieces[self.index]
            else:
                if self.index >= len(self.pieces):
                    slab = self.pool.take_big()
                    self.slabs.append(slab)
                    self.pieces.append(slab)
                piece = self.pieces[self.index]
            k = min(n, len(piece) - self.offset)
            src.readinto_exact(piece[self.offset : self.offset + k])
            self.offset += k
            self.size += k
            n -= k
            if self.offset == len(piece):
                self.index += 1
                self.offset = 0

    def finish(self) -> _Blob:
        """The filled blob; raises if a known length was not reached."""
        if self.fixed:
            if self.index < len(self.pieces):
                self.abandon()
                raise S3Error(
                    400,
                    "IncompleteBody",
                    "You did not provide the number of bytes specified by the Content-Length HTTP header.",
                )
            return _Blob(self.pieces, self.size, self.slabs)
        if self.offset:  # trim the last, partly filled slab
            self.pieces[self.index] = self.pieces[self.index][: self.offset]
            del self.pieces[self.index + 1 :]
        else:
            del self.pieces[self.index :]
        return _Blob(self.pieces, self.size, self.slabs)

    def abandon(self) -> None:
        """Give the memory back (on an error)."""
        self.pool.give(self.slabs)
        self.slabs = []


def _decode_aws_chunked(src: _Source, writer: _BlobWriter) -> dict[str, str]:
    """Decode aws-chunked framing into ``writer``; returns the trailers (lower-case names).

    Framing: ``hex-size[;chunk-signature=...]\\r\\n data \\r\\n`` repeated, then
    ``0[;chunk-signature=...]\\r\\n``, optional ``name:value\\r\\n`` trailers and an
    empty line. Chunk and trailer signatures are ignored.
    """
    while True:
        line = src.readline(4096)
        if not line:
            raise S3Error(400, "IncompleteBody", "The aws-chunked body ended early.")
        line = line.strip()
        if not line:
            continue  # tolerate a stray CRLF
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise S3Error(400, "IncompleteBody", "Bad aws-chunked chunk header.") from None
        if size == 0:
            break
        writer.fill(src, size)
        if src.readline(8).strip():
            raise S3Error(400, "IncompleteBody", "Missing CRLF after an aws-chunked chunk.")
    trailers: dict[str, str] = {}
    while True:
        line = src.readline(65536)
        if line.strip() == b"":
            break
        name, _, value = line.decode("latin-1").partition(":")
        trailers[name.strip().lower()] = value.strip()
    return trailers


# --------------------------------------------------------------------------- data model


class _Object:
    """A stored object (or an uploaded part): blobs plus metadata."""

    __slots__ = (
        "blobs",
        "pieces",
        "starts",
        "size",
        "etag",
        "mtime",
        "content_type",
        "content_encoding",
        "headers",
        "metadata",
        "checksums",
        "checksum_type",
        "part_sizes",
    )

    def __init__(
        self,
        blobs: list[_Blob],
        etag: str,
        *,
        content_type: str = "binary/octet-stream",
        content_encoding: str | None = None,
        headers: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        checksums: dict[str, str] | None = None,
        checksum_type: str | None = None,
        part_sizes: list[int] | None = None,
    ) -> None:
        self.blobs = blobs
        self.pieces = [p for b in blobs for p in b.pieces]
        # starts[i] is the offset of pieces[i]; bisect finds the piece of an offset.
        self.starts = [0, *itertools.accumulate(len(p) for p in self.pieces)][:-1]
        self.size = sum(b.size for b in blobs)
        self.etag = etag
        self.mtime = time.time()
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers = headers or {}
        self.metadata = metadata or {}
        self.checksums = checksums or {}
        self.checksum_type = checksum_type
        self.part_sizes = part_sizes

    def slices(self, start: int, end: int) -> Iterable[memoryview]:
        """memoryviews covering bytes [start, end) across piece boundaries."""
        if start >= end:
            return
        i = bisect.bisect_right(self.starts, start) - 1
        while start < end:
            piece, base = self.pieces[i], self.starts[i]
            a = start - base
            b = min(len(piece), end - base)
            yield piece[a:b]
            start = base + b
            i += 1


class _Upload:
    """An in-progress multipart upload."""

    __slots__ = ("upload_id", "bucket", "key", "initiated", "parts", "template", "algorithm", "ctype")

    def __init__(
        self,
        upload_id: str,
        bucket: str,
        key: str,
        template: dict[str, Any],
        algorithm: str | None,
        ctype: str | None,
    ) -> None:
        self.upload_id = upload_id
        self.bucket = bucket
        self.key = key
        self.initiated = time.time()
        self.parts: dict[int, _Object] = {}
        self.template = template  # content type, metadata, ... for the final object
        self.algorithm = algorithm  # x-amz-checksum-algorithm, upper case
        self.ctype = ctype  # x-amz-checksum-type: COMPOSITE / FULL_OBJECT


class _Bucket:
    __slots__ = ("name", "created", "objects", "_sorted")

    def __init__(self, name: str) -> None:
        self.name = name
        self.created = time.time()
        self.objects: dict[str, _Object] = {}
        self._sorted: list[str] | None = None

    def sorted_keys(self) -> list[str]:
        """The keys in order."""
        # Cached until a key is added or removed so paginated listings stay O(page).
        if self._sorted is None:
            self._sorted = sorted(self.objects)
        return self._sorted

    def invalidate(self) -> None:
        """Forget the sorted keys after a key is added or removed."""
        self._sorted = None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def _http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def _xml(root: str, inner: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{S3_NS}">{inner}</{root}>'.encode()


def _el(name: str, value: Any) -> str:
    return f"<{name}>{_xml_escape(str(value))}</{name}>"


def _owner() -> str:
    return f"<ID>{_OWNER_ID}</ID><DisplayName>{_OWNER_NAME}</DisplayName>"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_xml(body: bytes) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        raise S3Error(
            400,
            "MalformedXML",
            "The XML you provided was not well-formed or did not validate against our published schema.",
        ) from None


def _children(elem: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [c for c in elem if _local(c.tag) == name]


def _child_text(elem: ElementTree.Element, name: str) -> str | None:
    for c in elem:
        if _local(c.tag) == name:
            return c.text or ""
    return None


def _unquote_etag(etag: str) -> str:
    return etag.strip().strip('"')


def _checksum_name(header: str) -> str:
    """x-amz-checksum-crc32c -> ChecksumCRC32C (the XML element name)."""
    return "Checksum" + header.rsplit("-", 1)[-1].upper()


# --------------------------------------------------------------------------- backend


class S3Backend:
    """Buckets, objects, uploads and counters shared by all connection threads.

    One lock (``self.lock``) guards the tables; it is never held while a body is
    read from or written to a socket.
    """

    def __init__(self, *, verify_all_checksums: bool = False, min_part_size: int = MIN_PART_SIZE) -> None:
        self.lock = threading.Lock()
        self.pool = _SlabPool()
        self.buckets: dict[str, _Bucket] = {}
        self.uploads: dict[str, _Upload] = {}
        # CRC32C is always verified (hardware-accelerated, ~0.09 s/GB); CRC32,
        # SHA-1 and SHA-256 cost 0.4 to 2 s/GB, so only when asked.
        self.verify_all_checksums = verify_all_checksums
        self.min_part_size = min_part_size
        self._etag_counter = itertools.count(1)
        self._nonce = os.getpid() & 0xFFFFFFFF
        self.stats_lock = threading.Lock()
        self.request_counts: collections.Counter[str] = collections.Counter()
        self.error_counts: collections.Counter[str] = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.handler_cpu = 0.0
        self._cpu0 = time.process_time()
        self.in_flight = 0
        self.peak_in_flight = 0  # most S3 requests being served at once since the last reset

    # -- memory bookkeeping (call with self.lock held)
    def _incref(self, obj: _Object) -> None:
        for blob in obj.blobs:
            blob.refs += 1

    def _decref(self, obj: _Object) -> None:
        for blob in obj.blobs:
            blob.refs -= 1
            if blob.refs <= 0 and blob.slabs:
                self.pool.give(blob.slabs)
                blob.slabs = []
                blob.pieces = []

    def release_blob(self, blob: _Blob) -> None:
        """Give back a blob no object took (error paths)."""
        with self.lock:
            if blob.refs <= 0 and blob.slabs:
                self.pool.give(blob.slabs)
                blob.slabs = []

    def pin(self, obj: _Object) -> None:
        """Keep ``obj``'s memory alive while a GET sends it."""
        with self.lock:
            self._incref(obj)

    def unpin(self, obj: _Object) -> None:
        """Undo :meth:`pin`."""
        with self.lock:
            self._decref(obj)

    def new_etag(self, crc: int = 0, size: int = 0) -> str:
        """A unique md5-shaped ETag; clients only echo it back, and MD5 would cost 0.6+ s/GB."""
        n = next(self._etag_counter)
        return '"%08x%016x%08x"' % ((crc ^ self._nonce) & 0xFFFFFFFF, size & (2**64 - 1), n & 0xFFFFFFFF)

    # -- tables
    def bucket(self, name: str) -> _Bucket:
        """The bucket or NoSuchBucket. Call with the lock held."""
        b = self.buckets.get(name)
        if b is None:
            raise S3Error(404, "NoSuchBucket", "The specified bucket does not exist", BucketName=name)
        return b

    def put(
        self, bucket: str, key: str, obj: _Object, *, if_none_match: str | None, if_match: str | None
    ) -> None:
        """Store ``obj`` under bucket/key, honouring conditional-write headers atomically."""
        with self.lock:
            b = self.bucket(bucket)
            old = b.objects.get(key)
            if if_none_match is not None and if_none_match.strip() == "*" and old is not None:
                raise S3Error(
                    412,
                    "PreconditionFailed",
                    "At least one of the pre-conditions you specified did not hold",
                    Condition="If-None-Match",
                )
            if if_match is not None:
                if old is None:
                    raise S3Error(404, "NoSuchKey", "The specified key does not exist.", Key=key)
                if _unquote_etag(if_match) not in ("*", _unquote_etag(old.etag)):
                    raise S3Error(
                        412,
                        "PreconditionFailed",
                        "At least one of the pre-conditions you specified did not hold",
                        Condition="If-Match",
                    )
            self._incref(obj)
            b.objects[key] = obj
            if old is None:
                b.invalidate()
            else:
                self._decref(old)

    def delete(self, bucket: str, key: str) -> None:
        """Drop bucket/key if present (no error when missing, like S3)."""
        with self.lock:
            b = self.bucket(bucket)
            old = b.objects.pop(key, None)
            if old is not None:
                b.invalidate()
                self._decref(old)

    def reset(self) -> None:
        """Drop every bucket, object and upload, and zero the counters."""
        with self.lock:
            for b in self.buckets.values():
                for obj in b.objects.values():
                    self._decref(obj)
            for up in self.uploads.values():
                for part in up.parts.values():
                    self._decref(part)
            self.buckets.clear()
            self.uploads.clear()
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero request counters, byte counters and the CPU baseline."""
        with self.stats_lock:
            self.request_counts.clear()
            self.error_counts.clear()
            self.bytes_in = self.bytes_out = 0
            self.handler_cpu = 0.0
            self._cpu0 = time.process_time()
            self.peak_in_flight = self.in_flight

    def request_started(self) -> None:
        """An S3 request is being served (for ``peak_in_flight``)."""
        with self.stats_lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def request_finished(self) -> None:
        """An S3 request has been answered or abandoned."""
        with self.stats_lock:
            self.in_flight -= 1

    def account(self, op: str, nin: int, nout: int, cpu: float, error: str | None) -> None:
        """Add one request to the counters."""
        with self.stats_lock:
            self.request_counts[op] += 1
            self.bytes_in += nin
            self.bytes_out += nout
            self.handler_cpu += cpu
            if error:
                self.error_counts[error] += 1

    def account_cpu(self, cpu: float) -> None:
        """Add CPU seconds spent after a request was counted (sending its body)."""
        with self.stats_lock:
            self.handler_cpu += cpu

    def stats(self, *, whole_process: bool) -> dict[str, Any]:
        """Counters as a JSON-able dict.

        ``server_cpu_seconds`` is the process's CPU time since the last reset when
        the server owns its process, else the summed CPU time of request threads.
        """
        with self.lock:
            nobj = sum(len(b.objects) for b in self.buckets.values())
            stored = sum(o.size for b in self.buckets.values() for o in b.objects.values())
            nuploads = len(self.uploads)
        with self.stats_lock:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            out = {
                "request_counts": dict(self.request_counts),
                "requests": sum(self.request_counts.values()),
                "error_counts": dict(self.error_counts),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "handler_cpu_seconds": self.handler_cpu,
                "server_cpu_seconds": (time.process_time() - self._cpu0)
                if whole_process
                else self.handler_cpu,
                "process_cpu_seconds": time.process_time(),
                "max_rss_bytes": ru.ru_maxrss * 1024,
                "objects": nobj,
                "stored_bytes": stored,
                "multipart_uploads": nuploads,
                "pool_bytes": self.pool.arena_bytes,
                "pool_free_bytes": self.pool.free_bytes(),
                "pid": os.getpid(),
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
            }
        return out


# --------------------------------------------------------------------------- network shaping


@dataclass(frozen=True)
class Shaping:
    """A cloud-region-like network: first-byte latency and bandwidth caps (all off by default).

    ``latency``: seconds every response waits before its first byte leaves (the
    request has been read by then), like an object store's time to first byte.
    ``conn_rate``: bytes per second per connection, in each direction (request
    bodies received and responses sent are paced separately, as on a full-duplex
    link). ``link_rate``: bytes per second across all connections, per direction.
    ``burst``: bytes a bucket lets through at once after being idle (the
    pacing granularity: the server sleeps once per ``burst`` bytes at most).
    Control requests (``/__stats__`` and the like) are never shaped.
    """

    latency: float = 0.0
    conn_rate: float | None = None
    link_rate: float | None = None
    burst: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.latency < 0:
            raise ValueError(f"latency must be >= 0, got {self.latency}")
        for name in ("conn_rate", "link_rate"):
            rate = getattr(self, name)
            if rate is not None and rate <= 0:
                raise ValueError(f"{name} must be positive or None, got {rate}")
        if self.burst < 1:
            raise ValueError(f"burst must be positive, got {self.burst}")

    @property
    def paced(self) -> bool:
        """Whether any bandwidth cap is set."""
        return self.conn_rate is not None or self.link_rate is not None

    @property
    def active(self) -> bool:
        """Whether this shapes anything at all."""
        return self.paced or self.latency > 0

    def to_args(self) -> list[str]:
        """Command-line flags that recreate this shaping in a child server."""
        args = ["--latency-ms", repr(self.latency * 1e3), "--burst-bytes", str(self.burst)]
        if self.conn_rate is not None:
            args += ["--conn-mb-per-s", repr(self.conn_rate / 1e6)]
        if self.link_rate is not None:
            args += ["--link-mb-per-s", repr(self.link_rate / 1e6)]
        return args


class _TokenBucket:
    """Paces bytes to ``rate`` per second, letting at most ``burst`` bytes through at once.

    GCRA form: one timestamp (``_tat``, when the bytes reserved so far will have
    drained at ``rate``) instead of a token count refilled by a timer, so there is
    no background thread and a caller sleeps exactly as long as it must.
    Thread-safe: the link-wide bucket is shared by every connection.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.slack = burst / rate  # seconds of idle credit a bucket may bank
        self._tat = 0.0
        self._lock = threading.Lock()

    def reserve(self, n: int, now: float) -> float:
        """Book ``n`` bytes; returns the monotonic time at which they may pass."""
        with self._lock:
            self._tat = max(self._tat, now) + n / self.rate
            return self._tat - self.slack


class _Pacer:
    """One direction of one connection: its own bucket plus the shared link bucket, if any."""

    def __init__(self, buckets: list[_TokenBucket]) -> None:
        self.buckets = buckets

    def pace(self, n: int) -> None:
        """Sleep (not spin) until ``n`` more bytes fit under every cap."""
        now = time.monotonic()
        due = max(b.reserve(n, now) for b in self.buckets)
        if due > now:
            time.sleep(due - now)


class _PacedReader(io.RawIOBase):
    """A raw socket reader that hands out at most ``chunk`` bytes per call, paced after each."""

    def __init__(self, raw: Any, pacer: _Pacer, chunk: int) -> None:
        super().__init__()
        self.raw = raw
        self.pacer = pacer
        self.chunk = chunk

    def readable(self) -> bool:
        """Yes."""
        return True

    def fileno(self) -> int:
        """The socket's descriptor."""
        return int(self.raw.fileno())

    def readinto(self, b: Any) -> int:
        """Read up to ``chunk`` bytes, then wait until the caps allow them."""
        view = memoryview(b).cast("B")[: self.chunk]
        n = self.raw.readinto(view)
        if n:
            self.pacer.pace(n)
        return int(n or 0)

    def close(self) -> None:
        """Close the wrapped socket file too."""
        if not self.closed:
            self.raw.close()
        super().close()


# --------------------------------------------------------------------------- HTTP


def _parse_range(spec: str, size: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=`` range into [start, end); None means "ignore, send all".

    Raises 416 InvalidRange when it cannot be satisfied.
    """
    spec = spec.strip()
    if not spec.startswith("bytes=") or "," in spec:
        return None  # S3 ignores malformed and multi-range headers
    first, sep, last = spec[6:].strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0 or size == 0:
                raise _unsatisfiable(spec, size)
            return max(0, size - n), size
        a = int(first)
        b = int(last) if last else size - 1
    except ValueError:
        return None
    if a > b and last:
        return None
    if a >= size:
        raise _unsatisfiable(spec, size)
    return a, min(b, size - 1) + 1


def _unsatisfiable(spec: str, size: int) -> S3Error:
    err = S3Error(
        416,
        "InvalidRange",
        "The requested range is not satisfiable",
        RangeRequested=spec,
        ActualObjectSize=size,
    )
    err.headers.append(("Content-Range", f"bytes */{size}"))
    return err


class _Handler(http.server.BaseHTTPRequestHandler):
    """One keep-alive connection; each request runs :meth:`_dispatch`."""

    protocol_version = "HTTP/1.1"
    server_version = "FastS3"
    sys_version = ""
    # Reads of at least this size bypass BufferedReader's buffer and land
    # straight in the slab, so keep it below the 64 KiB / 1 MiB slab sizes: a
    # "large rbufsize" would add a memcpy of every body byte.
    rbufsize = 64 * 1024
    wbufsize = 0  # unbuffered: headers go out in one sendall, bodies straight from the slabs
    disable_nagle_algorithm = True
    server: _HTTPServer
    _md5: str | None = None  # hex MD5 of the body when the client sent Content-MD5
    _pace_out: _Pacer | None = None  # shaped mode: paces what this connection sends
    _shaped = False  # whether the current request is shaped (control requests are not)

    def setup(self) -> None:
        """In shaped mode, pace this connection's reads and writes with its own buckets."""
        super().setup()
        shaping = self.server.shaping
        if not shaping.paced:
            return
        pace_in, self._pace_out = self.server.pacers()
        # Reads go through the pacer below the BufferedReader, so every body byte
        # (hot path, chunked or aws-chunked) is paced the same way.
        self.rfile.close()
        raw = _PacedReader(self.connection.makefile("rb", 0), pace_in, shaping.burst)
        self.rfile = io.BufferedReader(raw, self.rbufsize)

    def _sendall(self, data: bytes | memoryview) -> None:
        """``sendall``, paced in ``burst``-sized slices in shaped mode."""
        pacer = self._pace_out if self._shaped else None
        if pacer is None:
            self.connection.sendall(data)
            return
        view = memoryview(data).cast("B")
        step = self.server.shaping.burst
        for off in range(0, len(view), step):
            piece = view[off : off + step]
            pacer.pace(len(piece))
            self.connection.sendall(piece)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence per-request logging (it costs more than the request)."""

    def handle_one_request(self) -> None:
        """Time each request's CPU on this thread for the stats."""
        self._op = ""
        self._nin = 0
        self._error: str | None = None
        self._accounted = False
        self._t0 = time.thread_time()
        try:
            super().handle_one_request()
        except (_ClientGone, ConnectionError, BrokenPipeError):
            self.close_connection = True
        if self._accounted:  # the CPU spent sending the body
            self.server.backend.account_cpu(time.thread_time() - self._t0)
        elif self._op:  # the client went away before we answered
            self.server.backend.account(self._op, self._nin, 0, time.thread_time() - self._t0, self._error)

    def _account(self, nout: int) -> None:
        # Counted before the response goes out, so a client that has its answer
        # always sees the request in stats(); CPU for the send is added after.
        if self._op and not self._accounted:
            t = time.thread_time()
            self.server.backend.account(self._op, self._nin, nout, t - self._t0, self._error)
            self._t0 = t
            self._accounted = True

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        """GET."""
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        """PUT."""
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        """POST."""
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        """DELETE."""
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        """HEAD."""
        self._dispatch()

    # -- plumbing
    def _header(self, name: str) -> str | None:
        return self.headers.get(name)

    def _send(
        self,
        status: int,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        *,
        pieces: Iterable[memoryview] | None = None,
        length: int | None = None,
    ) -> None:
        """Write the status line, headers and body (bytes, or ``pieces`` of ``length`` bytes)."""
        if length is None:
            length = len(body)
        reason = http.server.BaseHTTPRequestHandler.responses.get(status, ("",))[0]
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Date: {_http_date(time.time())}",
            "Server: FastS3",
            f"x-amz-request-id: {self.server.next_request_id()}",
        ]
        lines.extend(f"{k}: {v}" for k, v in headers or ())
        if status not in (204, 304) or length:
            lines.append(f"Content-Length: {length}")
        if not self._body_done and self._body_expected():
            # We answer without reading the body: drain it if small, else hang up.
            self._drain_or_close()
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self._shaped and self.server.shaping.latency:
            time.sleep(self.server.shaping.latency)  # time to first byte
        send = self._sendall
        if self.command == "HEAD":
            self._account(0)
            send(head)
            return
        self._account(length)
        if pieces is None:
            send(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                send(body)
            return
        send(head)
        for piece in pieces:  # one sendall per slab; no copies in Python
            send(piece)

    def _body_expected(self) -> bool:
        te = (self._header("Transfer-Encoding") or "").lower()
        return "chunked" in te or int(self._header("Content-Length") or 0) > 0

    def _drain_or_close(self) -> None:
        self._body_done = True
        te = (self._header("Transfer-Encoding") or "").lower()
        n = int(self._header("Content-Length") or 0)
        if "chunked" not in te and n <= MiB:
            try:
                _LengthSource(self.rfile, n).drain()
                return
            except (_ClientGone, OSError):
                pass
        self.close_connection = True

    def _send_xml(
        self, root: str, inner: str, status: int = 200, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self._send(status, [("Content-Type", "application/xml"), *(headers or [])], _xml(root, inner))

    def _send_error(self, err: S3Error) -> None:
        self._error = err.code
        headers = list(err.headers)
        if self.command == "HEAD":
            # HEAD errors carry no body; boto3 maps the bare status to a code.
            headers.append(("x-amz-error-code", err.code))
            self._send(err.status, headers)
            return
        inner = _el("Code", err.code) + _el("Message", err.message)
        inner += "".join(_el(k, v) for k, v in err.fields.items())
        inner += _el("RequestId", "0")
        body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>{inner}</Error>'.encode()
        self._send(err.status, [("Content-Type", "application/xml"), *headers], body)

    def _read_body(self) -> _Blob:
        """The request body in pooled memory, with any chunked / aws-chunked framing removed."""
        self._body_done = True
        try:
            return self._read_body_inner()
        except BaseException:
            # The stream is somewhere inside a body we could not parse: hang up after answering.
            self.close_connection = True
            raise

    def _read_body_inner(self) -> _Blob:
        backend = self.server.backend
        te = (self._header("Transfer-Encoding") or "").lower()
        ce = (self._header("Content-Encoding") or "").lower()
        sha = self._header("x-amz-content-sha256") or ""
        aws_chunked = "aws-chunked" in ce or sha.startswith("STREAMING-")
        src: _Source
        if "chunked" in te:
            src = _HttpChunkedSource(self.rfile)
            length = None
        else:
            length = int(self._header("Content-Length") or 0)
            if not aws_chunked:
                # Hot path: read straight into the slabs, no framing to parse.
                pieces, slabs = backend.pool.take(length)
                try:
                    for piece in pieces:
                        if self.rfile.readinto(piece) != len(piece):
                            raise _ClientGone()
                except BaseException:
                    backend.pool.give(slabs)
                    raise
                self._nin += length
                return _Blob(pieces, length, slabs)
            src = _LengthSource(self.rfile, length)
        self._trailers: dict[str, str] = {}
        if aws_chunked:
            decoded = self._header("x-amz-decoded-content-length")
            writer = _BlobWriter(backend.pool, int(decoded) if decoded else None)
            try:
                self._trailers = _decode_aws_chunked(src, writer)
                src.drain()
                blob = writer.finish()
            except BaseException:
                writer.abandon()
                raise
        else:  # plain HTTP chunked
            writer = _BlobWriter(backend.pool, None)
            try:
                assert isinstance(src, _HttpChunkedSource)
                while True:
                    if src.left == 0:
                        if src.eof:
                            break
                        src.next_chunk()
                        continue
                    writer.fill(src, src.left)  # exactly the rest of this chunk
                blob = writer.finish()
            except BaseException:
                writer.abandon()
                raise
        self._nin += blob.size
        return blob

    def _read_small_body(self, limit: int = 64 * MiB) -> bytes:
        """A (small) body as bytes, for XML requests."""
        blob = self._read_body()
        try:
            if blob.size > limit:
                raise S3Error(400, "MaxMessageLengthExceeded", "Your request was too big.")
            return b"".join(blob.pieces)
        finally:
            self.server.backend.release_blob(blob)

    # -- routing
    def _dispatch(self) -> None:
        self._body_done = False
        self._trailers = {}
        raw_path, _, query = self.path.partition("?")
        if raw_path.startswith("http://") or raw_path.startswith("https://"):
            raw_path = "/" + raw_path.split("/", 3)[-1] if raw_path.count("/") >= 3 else "/"
        q = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        path = urllib.parse.unquote(raw_path)
        self._shaped = False
        if path.startswith("/__") and self._control(path):
            return
        self._shaped = self.server.shaping.active
        backend = self.server.backend
        backend.request_started()
        try:
            self._dispatch_s3(path, q)
        finally:
            backend.request_finished()

    def _dispatch_s3(self, path: str, q: dict[str, str]) -> None:
        host = (self._header("Host") or "").rsplit(":", 1)[0].lower()
        if host.endswith(".localhost"):  # virtual-host style, cheap to support
            bucket, key = host[: -len(".localhost")], path[1:]
        else:
            bucket, _, key = path[1:].partition("/")
        try:
            self._route(self.command, bucket, key, q)
        except S3Error as err:
            self._send_error(err)
        except (_ClientGone, ConnectionError, BrokenPipeError):
            raise
        except Exception as exc:  # a bug: answer 500 and show it
            traceback.print_exc()
            self.close_connection = True
            self._send_error(S3Error(500, "InternalError", f"{type(exc).__name__}: {exc}"))

    def _control(self, path: str) -> bool:
        backend = self.server.backend
        if path == "/__stats__" and self.command == "GET":
            body = json.dumps(backend.stats(whole_process=self.server.whole_process)).encode()
            self._send(200, [("Content-Type", "application/json")], body)
            return True
        if path == "/__reset__" and self.command == "POST":
            backend.reset()
            self._send(204)
            return True
        if path == "/__reset_stats__" and self.command == "POST":
            backend.reset_stats()
            self._send(204)
            return True
        return False

    def _route(self, method: str, bucket: str, key: str, q: dict[str, str]) -> None:
        unsupported = _UNSUPPORTED_SUBRESOURCES.intersection(q)
        if not bucket:
            self._op = "ListBuckets"
            if method != "GET":
                raise S3Error(
                    405, "MethodNotAllowed", "The specified method is not allowed against this resource."
                )
            return self._list_buckets()
        if unsupported:
            self._op = "Unsupported"
            raise S3Error(501, "NotImplemented", f"{sorted(unsupported)[0]} is not implemented by FastS3.")
        if not key:
            if method == "PUT":
                self._op = "CreateBucket"
                return self._create_bucket(bucket)
            if method == "HEAD":
                self._op = "HeadBucket"
                return self._head_bucket(bucket)
            if method == "DELETE":
                self._op = "DeleteBucket"
                return self._delete_bucket(bucket)
            if method == "GET":
                if "uploads" in q:
                    self._op = "ListMultipartUploads"
                    return self._list_uploads(bucket, q)
                if "location" in q:
                    self._op = "GetBucketLocation"
                    with self.server.backend.lock:
                        self.server.backend.bucket(bucket)
                    return self._send_xml("LocationConstraint", "")
                if "versioning" in q:
                    self._op = "GetBucketVersioning"
                    with self.server.backend.lock:
                        self.server.backend.bucket(bucket)
                    return self._send_xml("VersioningConfiguration", "")
                self._op = "ListObjectsV2" if q.get("list-type") == "2" else "ListObjects"
                return self._list_objects(bucket, q, v2=q.get("list-type") == "2")
            if method == "POST" and "delete" in q:
                self._op = "DeleteObjects"
                return self._delete_objects(bucket)
        else:
            if method == "PUT":
                if "uploadId" in q:
                    self._op = "UploadPartCopy" if self._header("x-amz-copy-source") else "UploadPart"
                    return self._upload_part(bucket, key, q)
                if self._header("x-amz-copy-source"):
                    self._op = "CopyObject"
                    return self._copy_object(bucket, key)
                self._op = "PutObject"
                return self._put_object(bucket, key)
            if method in ("GET", "HEAD"):
                if method == "GET" and "uploadId" in q:
                    self._op = "ListParts"
                    return self._list_parts(bucket, key, q)
                self._op = "GetObject" if method == "GET" else "HeadObject"
                return self._get_object(bucket, key, q)
            if method == "DELETE":
                if "uploadId" in q:
                    self._op = "AbortMultipartUpload"
                    return self._abort_upload(bucket, key, q["uploadId"])
                self._op = "DeleteObject"
                self.server.backend.delete(bucket, key)
                return self._send(204)
            if method == "POST":
                if "uploads" in q:
                    self._op = "CreateMultipartUpload"
                    return self._create_upload(bucket, key)
                if "uploadId" in q:
                    self._op = "CompleteMultipartUpload"
                    return self._complete_upload(bucket, key, q["uploadId"])
        self._op = self._op or "Unsupported"
        raise S3Error(501, "NotImplemented", f"{method} with these parameters is not implemented by FastS3.")

    # -- buckets
    def _list_buckets(self) -> None:
        backend = self.server.backend
        with backend.lock:
            rows = sorted((b.name, b.created) for b in backend.buckets.values())
        inner = f"<Owner>{_owner()}</Owner><Buckets>"
        inner += "".join(f"<Bucket>{_el('Name', n)}{_el('CreationDate', _iso(t))}</Bucket>" for n, t in rows)
        self._send_xml("ListAllMyBucketsResult", inner + "</Buckets>")

    def _create_bucket(self, name: str) -> None:
        if self._body_expected():
            self._read_small_body()  # CreateBucketConfiguration: region is ignored
        if not _BUCKET_RE.match(name) or ".." in name:
            raise S3Error(400, "InvalidBucketName", "The specified bucket is not valid.", BucketName=name)
        backend = self.server.backend
        with backend.lock:
            if name in backend.buckets:
                raise S3Error(
                    409,
                    "BucketAlreadyOwnedByYou",
                    "Your previous request to create the named bucket succeeded and you already own it.",
                    BucketName=name,
                )
            backend.buckets[name] = _Bucket(name)
        self._send(200, [("Location", f"/{name}")])

    def _head_bucket(self, name: str) -> None:
        with self.server.backend.lock:
            self.server.backend.bucket(name)
        self._send(200, [("x-amz-bucket-region", "us-east-1")])

    def _delete_bucket(self, name: str) -> None:
        backend = self.server.backend
        with backend.lock:
            b = backend.bucket(name)
            if b.objects:
                raise S3Error(
                    409, "BucketNotEmpty", "The bucket you tried to delete is not empty", BucketName=name
                )
            for uid in [u for u, up in backend.uploads.items() if up.bucket == name]:
                for part in backend.uploads.pop(uid).parts.values():
                    backend._decref(part)
            del backend.buckets[name]
        self._send(204)

    # -- checksums
    def _request_checksums(self) -> dict[str, str]:
        """x-amz-checksum-* values sent as headers or aws-chunked trailers."""
        out = {}
        for h in _CHECKSUM_HEADERS:
            v = self._trailers.get(h) or self._header(h)
            if v:
                out[h] = v.strip()
        return out

    def _verify(self, blob: _Blob, checksums: dict[str, str]) -> int:
        """Check the body against client checksums and Content-MD5; returns its CRC32C if computed."""
        crc = 0
        backend = self.server.backend
        for h, value in checksums.items():
            try:
                expected = base64.b64decode(value, validate=True)
            except ValueError:
                expected = b""
            hasher = _hasher(h)
            if hasher is None:
                continue
            if len(expected) != len(hasher.digest()):
                raise S3Error(400, "InvalidRequest", f"Value for {h} header is invalid.")
            if h != "x-amz-checksum-crc32c" and not backend.verify_all_checksums:
                continue
            got = _digest_pieces(hasher, blob.pieces)
            if got != expected:
                algo = h.rsplit("-", 1)[-1].upper()
                raise S3Error(
                    400, "BadDigest", f"The {algo} you specified did not match the calculated checksum."
                )
            if h == "x-amz-checksum-crc32c":
                crc = int.from_bytes(got, "big")
        md5 = self._header("Content-MD5")
        if md5:
            try:
                expected = base64.b64decode(md5, validate=True)
            except ValueError:
                expected = b""
            if len(expected) != 16:
                raise S3Error(400, "InvalidDigest", "The Content-MD5 you specified was invalid.")
            if _digest_pieces(hashlib.md5(), blob.pieces) != expected:
                raise S3Error(
                    400, "BadDigest", "The Content-MD5 you specified did not match what we received."
                )
            self._md5 = expected.hex()
        return crc

    def _object_template(self) -> dict[str, Any]:
        """Content type, encoding, stored headers and user metadata from the request."""
        ce = self._header("Content-Encoding")
        if ce:  # aws-chunked is transport framing, not part of the object
            ce = (
                ",".join(p for p in (s.strip() for s in ce.split(",")) if p and p.lower() != "aws-chunked")
                or None
            )
        headers = {h: v for h in _STORED_HEADERS if (v := self._header(h))}
        metadata = {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-amz-meta-")}
        return {
            "content_type": self._header("Content-Type") or "binary/octet-stream",
            "content_encoding": ce,
            "headers": headers,
            "metadata": metadata,
        }

    # -- objects
    def _put_object(self, bucket: str, key: str) -> None:
        backend = self.server.backend
        with backend.lock:
            backend.bucket(bucket)  # fail before reading a body we would throw away
        self._md5 = None
        blob = self._read_body()
        try:
            checksums = self._request_checksums()
            crc = self._verify(blob, checksums)
            etag = f'"{self._md5}"' if self._md5 else backend.new_etag(crc, blob.size)
            obj = _Object(
                [blob],
                etag,
                checksums=checksums,
                checksum_type="FULL_OBJECT" if checksums else None,
                **self._object_template(),
            )
            backend.put(
                bucket,
                key,
                obj,
                if_none_match=self._header("If-None-Match"),
                if_match=self._header("If-Match"),
            )
        except BaseException:
            backend.release_blob(blob)
            raise
        headers = [("ETag", etag), *checksums.items()]
        if checksums:
            headers.append(("x-amz-checksum-type", "FULL_OBJECT"))
        self._send(200, headers)

    def _copy_source(self) -> tuple[str, str]:
        src = urllib.parse.unquote(self._header("x-amz-copy-source") or "")
        src = src.split("?", 1)[0].lstrip("/")
        sb, _, sk = src.partition("/")
        if not sb or not sk:
            raise S3Error(
                400,
                "InvalidArgument",
                "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            )
        return sb, sk

    def _lookup(self, bucket: str, key: str) -> _Object:
        """The object or NoSuchBucket/NoSuchKey. Call with the lock held."""
        obj = self.server.backend.bucket(bucket).objects.get(key)
        if obj is None:
            raise S3Error(404, "NoSuchKey", "The specified key does not exist.", Key=key)
        return obj

    def _check_copy_source(self, src: _Object) -> None:
        """x-amz-copy-source-if-match / -if-none-match: 412 when the source is not the expected version."""
        etag = _unquote_etag(src.etag)
        im = self._header("x-amz-copy-source-if-match")
        inm = self._header("x-amz-copy-source-if-none-match")
        if (im is not None and _unquote_etag(im) not in ("*", etag)) or (
                inm is not None and _unquote_etag(inm) in ("*", etag)):
            raise S3Error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                          Condition="x-amz-copy-source-If-Match" if im is not None else
                          "x-amz-copy-source-If-None-Match")

    def _copy_object(self, bucket: str, key: str) -> None:
        backend = self.server.backend
        sb, sk = self._copy_source()
        with backend.lock:
            src = self._lookup(sb, sk)
            self._check_copy_source(src)
            backend.bucket(bucket)
            if self._header("x-amz-metadata-directive") == "REPLACE":
                template = self._object_template()
            else:
                template = {
                    "content_type": src.content_type,
                    "content_encoding": src.content_encoding,
                    "headers": dict(src.headers),
                    "metadata": dict(src.metadata),
                }
            # Blobs are immutable once stored, so the copy shares them (refcounted).
            obj = _Object(
                list(src.blobs),
                backend.new_etag(0, src.size),
                checksums=dict(src.checksums),
                checksum_type=src.checksum_type,
                part_sizes=src.part_sizes,
                **template,
            )
        backend.put(bucket, key, obj, if_none_match=self._header("If-None-Match"), if_match=None)
        inner = _el("LastModified", _iso(obj.mtime)) + _el("ETag", obj.etag)
        self._send_xml("CopyObjectResult", inner)

    def _get_object(self, bucket: str, key: str, q: dict[str, str]) -> None:
        backend = self.server.backend
        with backend.lock:
            obj = self._lookup(bucket, key)
            backend._incref(obj)  # pin the slabs while we send them
        try:
            self._send_object(obj, q)
        finally:
            backend.unpin(obj)

    def _check_conditions(self, obj: _Object) -> None:
        etag = _unquote_etag(obj.etag)
        im = self._header("If-Match")
        if im is not None and _unquote_etag(im) not in ("*", etag):
            raise S3Error(
                412,
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold",
                Condition="If-Match",
            )
        inm = self._header("If-None-Match")
        if inm is not None and _unquote_etag(inm) in ("*", etag):
            err = S3Error(304, "NotModified", "Not Modified")
            err.headers.append(("ETag", obj.etag))
            raise err
        mtime = int(obj.mtime)
        ius = self._parse_date(self._header("If-Unmodified-Since"))
        if ius is not None and im is None and mtime > ius:
            raise S3Error(
                412,
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold",
                Condition="If-Unmodified-Since",
            )
        ims = self._parse_date(self._header("If-Modified-Since"))
        if ims is not None and inm is None and mtime <= ims:
            raise S3Error(304, "NotModified", "Not Modified")

    @staticmethod
    def _parse_date(value: str | None) -> int | None:
        if not value:
            return None
        try:
            return int(email.utils.parsedate_to_datetime(value).timestamp())
        except (TypeError, ValueError):
            return None

    def _send_object(self, obj: _Object, q: dict[str, str]) -> None:
        try:
            self._check_conditions(obj)
        except S3Error as err:
            if err.status == 304:  # not an error: no body, no XML
                self._send(304, err.headers)
                return
            raise
        size = obj.size
        headers = [
            ("Content-Type", obj.content_type),
            ("ETag", obj.etag),
            ("Last-Modified", _http_date(obj.mtime)),
            ("Accept-Ranges", "bytes"),
        ]
        if obj.content_encoding:
            headers.append(("Content-Encoding", obj.content_encoding))
        headers.extend(obj.headers.items())
        headers.extend(obj.metadata.items())
        rng: tuple[int, int] | None = None
        part = q.get("partNumber")
        if part is not None:
            try:
                pn = int(part)
            except ValueError:
                pn = 0
            sizes = obj.part_sizes or [size]
            if not 1 <= pn <= len(sizes):
                raise S3Error(
                    416,
                    "InvalidPartNumber",
                    "The requested partnumber is not satisfiable",
                    PartNumberRequested=part,
                    ActualPartCount=len(sizes),
                )
            start = sum(sizes[: pn - 1])
            rng = (start, start + sizes[pn - 1])
            if obj.part_sizes:
                headers.append(("x-amz-mp-parts-count", str(len(sizes))))
        else:
            spec = self._header("Range")
            if spec:
                rng = _parse_range(spec, size)
        if rng is None and (self._header("x-amz-checksum-mode") or "").upper() == "ENABLED" and obj.checksums:
            headers.extend(obj.checksums.items())
            if obj.checksum_type:
                headers.append(("x-amz-checksum-type", obj.checksum_type))
        if rng is None or (part is not None and size == 0):
            self._send(200, headers, pieces=obj.slices(0, size), length=size)
            return
        a, b = rng
        headers.append(("Content-Range", f"bytes {a}-{b - 1}/{size}"))
        self._send(206, headers, pieces=obj.slices(a, b), length=b - a)

    # -- multi-object delete
    def _delete_objects(self, bucket: str) -> None:
        body = self._read_small_body()
        self._md5 = None
        root = _parse_xml(body)
        quiet = (_child_text(root, "Quiet") or "").strip().lower() == "true"
        keys = [_child_text(o, "Key") or "" for o in _children(root, "Object")]
        if len(keys) > 1000:
            raise S3Error(400, "MalformedXML", "You can delete at most 1000 objects per request.")
        backend = self.server.backend
        inner = []
        for key in keys:
            backend.delete(bucket, key)
            if not quiet:
                inner.append(f"<Deleted>{_el('Key', key)}</Deleted>")
        self._send_xml("DeleteResult", "".join(inner))

    # -- listing
    def _list_objects(self, bucket: str, q: dict[str, str], *, v2: bool) -> None:
        backend = self.server.backend
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter", "")
        encode = q.get("encoding-type") == "url"
        try:
            max_keys = min(int(q.get("max-keys", MAX_KEYS)), MAX_KEYS)
        except ValueError:
            raise S3Error(
                400, "InvalidArgument", "Provided max-keys not an integer or within integer range"
            ) from None
        if v2:
            token = q.get("continuation-token")
            if token is not None:
                try:
                    marker = base64.urlsafe_b64decode(token.encode()).decode()
                except ValueError:
                    raise S3Error(
                        400, "InvalidArgument", "The continuation token provided is incorrect"
                    ) from None
            else:
                marker = q.get("start-after", "")
        else:
            marker = q.get("marker", "")
        contents: list[tuple[str, _Object]] = []
        prefixes: list[str] = []
        truncated = False
        last = ""
        with backend.lock:
            b = backend.bucket(bucket)
            keys = b.sorted_keys()
            i = bisect.bisect_right(keys, marker) if marker else bisect.bisect_left(keys, prefix)
            i = max(i, bisect.bisect_left(keys, prefix))
            while i < len(keys):
                k = keys[i]
                if not k.startswith(prefix):
                    break
                cp = None
                if delimiter:
                    j = k.find(delimiter, len(prefix))
                    if j >= 0:
                        cp = k[: j + len(delimiter)]
                if cp is not None and (cp == marker or (prefixes and prefixes[-1] == cp)):
                    i = bisect.bisect_left(keys, cp + "\U0010ffff", i + 1)  # already listed
                    continue
                if len(contents) + len(prefixes) >= max_keys:
                    truncated = True
                    break
                if cp is not None:
                    prefixes.append(cp)
                    last = cp
                    # Skip the rest of this common prefix in one bisect.
                    i = bisect.bisect_left(keys, cp + "\U0010ffff", i)
                    continue
                contents.append((k, b.objects[k]))
                last = k
                i += 1

        def enc(s: str) -> str:
            return urllib.parse.quote_plus(s, safe="/") if encode else s

        parts = [_el("Name", bucket), _el("Prefix", enc(prefix))]
        if v2:
            parts.append(_el("KeyCount", len(contents) + len(prefixes)))
            if "continuation-token" in q:
                parts.append(_el("ContinuationToken", q["continuation-token"]))
            if "start-after" in q:
                parts.append(_el("StartAfter", enc(q["start-after"])))
            if truncated:
                parts.append(_el("NextContinuationToken", base64.urlsafe_b64encode(last.encode()).decode()))
        else:
            parts.append(_el("Marker", enc(marker)))
            if truncated and delimiter:
                parts.append(_el("NextMarker", enc(last)))
        parts.append(_el("MaxKeys", max_keys))
        if delimiter:
            parts.append(_el("Delimiter", enc(delimiter)))
        if encode:
            parts.append(_el("EncodingType", "url"))
        parts.append(_el("IsTruncated", "true" if truncated else "false"))
        fetch_owner = not v2 or q.get("fetch-owner") == "true"
        for k, o in contents:
            row = _el("Key", enc(k)) + _el("LastModified", _iso(o.mtime)) + _el("ETag", o.etag)
            for h in o.checksums:
                row += _el("ChecksumAlgorithm", h.rsplit("-", 1)[-1].upper())
            if o.checksum_type:
                row += _el("ChecksumType", o.checksum_type)
            row += _el("Size", o.size)
            if fetch_owner:
                row += f"<Owner>{_owner()}</Owner>"
            row += _el("StorageClass", "STANDARD")
            parts.append(f"<Contents>{row}</Contents>")
        parts.extend(f"<CommonPrefixes>{_el('Prefix', enc(p))}</CommonPrefixes>" for p in prefixes)
        self._send_xml("ListBucketResult", "".join(parts))

    # -- multipart
    def _create_upload(self, bucket: str, key: str) -> None:
        backend = self.server.backend
        if self._body_expected():
            self._read_small_body()
        algorithm = (self._header("x-amz-checksum-algorithm") or "").upper() or None
        ctype = (self._header("x-amz-checksum-type") or "").upper() or None
        upload_id = base64.urlsafe_b64encode(uuid.uuid4().bytes + os.urandom(8)).decode().rstrip("=")
        with backend.lock:
            backend.bucket(bucket)
            backend.uploads[upload_id] = _Upload(
                upload_id, bucket, key, self._object_template(), algorithm, ctype
            )
        headers = []
        if algorithm:
            headers.append(("x-amz-checksum-algorithm", algorithm))
            headers.append(("x-amz-checksum-type", ctype or "COMPOSITE"))
        inner = _el("Bucket", bucket) + _el("Key", key) + _el("UploadId", upload_id)
        self._send_xml("InitiateMultipartUploadResult", inner, headers=headers)

    def _upload(self, bucket: str, key: str, upload_id: str) -> _Upload:
        """The upload or NoSuchUpload. Call with the lock held."""
        backend = self.server.backend
        backend.bucket(bucket)
        up = backend.uploads.get(upload_id)
        if up is None or up.bucket != bucket or up.key != key:
            raise S3Error(
                404,
                "NoSuchUpload",
                "The specified upload does not exist. The upload ID may be invalid, or the upload "
                "may have been aborted or completed.",
                UploadId=upload_id,
            )
        return up

    def _upload_part(self, bucket: str, key: str, q: dict[str, str]) -> None:
        backend = self.server.backend
        upload_id = q["uploadId"]
        try:
            pn = int(q.get("partNumber", ""))
        except ValueError:
            pn = 0
        if not 1 <= pn <= 10000:
            raise S3Error(
                400,
                "InvalidArgument",
                "Part number must be an integer between 1 and 10000, inclusive",
                ArgumentName="partNumber",
            )
        with backend.lock:
            self._upload(bucket, key, upload_id)
        self._md5 = None
        copy = self._header("x-amz-copy-source")
        if copy:
            blob = self._copy_part_blob()
            checksums: dict[str, str] = {}
            crc = 0
            with backend.lock:
                algo = self._upload(bucket, key, upload_id).algorithm
            hasher = _hasher(f"x-amz-checksum-{algo.lower()}") if algo else None
            if hasher is not None:
                # As S3 does for uploads started with a checksum algorithm: the copied part's checksum.
                checksums[f"x-amz-checksum-{algo.lower()}"] = base64.b64encode(
                    _digest_pieces(hasher, _trimmed(blob))).decode()
        else:
            blob = self._read_body()
            try:
                checksums = self._request_checksums()
                crc = self._verify(blob, checksums)
            except BaseException:
                backend.release_blob(blob)
                raise
        etag = f'"{self._md5}"' if self._md5 else backend.new_etag(crc, blob.size)
        part = _Object([blob], etag, checksums=checksums)
        with backend.lock:
            try:
                up = self._upload(bucket, key, upload_id)
            except S3Error:
                if blob.refs <= 0:
                    backend.pool.give(blob.slabs)
                    blob.slabs = []
                raise
            backend._incref(part)
            old = up.parts.get(pn)
            up.parts[pn] = part
            if old is not None:
                backend._decref(old)
        if copy:
            inner = _el("LastModified", _iso(part.mtime)) + _el("ETag", etag)
            inner += "".join(_el(_checksum_name(h), v) for h, v in checksums.items())
            self._send_xml("CopyPartResult", inner)
        else:
            self._send(200, [("ETag", etag), *checksums.items()])

    def _copy_part_blob(self) -> _Blob:
        """UploadPartCopy: copy (a range of) the source into fresh pooled memory."""
        backend = self.server.backend
        sb, sk = self._copy_source()
        with backend.lock:
            src = self._lookup(sb, sk)
            self._check_copy_source(src)
            backend._incref(src)
        try:
            a, b = 0, src.size
            spec = self._header("x-amz-copy-source-range")
            if spec:
                m = re.fullmatch(r"\s*bytes=(\d+)-(\d+)\s*", spec)
                if not m or int(m.group(1)) > int(m.group(2)) or int(m.group(2)) >= src.size:
                    raise S3Error(
                        400,
                        "InvalidArgument",
                        "The x-amz-copy-source-range value must be of the form bytes=first-last "
                        "where first and last are the zero-based offsets of the first and last "
                        "bytes to copy",
                    )
                a, b = int(m.group(1)), int(m.group(2)) + 1
            pieces, slabs = backend.pool.take(b - a)
            out = memoryview(b"").cast("B")
            dst = iter(pieces)
            pos = 0
            for chunk in src.slices(a, b):
                while len(chunk):
                    if pos == len(out):
                        out, pos = next(dst), 0
                    k = min(len(chunk), len(out) - pos)
                    out[pos : pos + k] = chunk[:k]
                    chunk = chunk[k:]
                    pos += k
            return _Blob(pieces, b - a, slabs)
        finally:
            backend.unpin(src)

    def _complete_upload(self, bucket: str, key: str, upload_id: str) -> None:
        backend = self.server.backend
        body = self._read_small_body()
        root = _parse_xml(body)
        wanted: list[tuple[int, str, dict[str, str]]] = []
        for p in _children(root, "Part"):
            try:
                pn = int(_child_text(p, "PartNumber") or "")
            except ValueError:
                raise S3Error(400, "MalformedXML", "PartNumber is not an integer.") from None
            sums = {}
            for c in p:
                name = _local(c.tag)
                if name.startswith("Checksum") and name != "ChecksumType" and c.text:
                    sums["x-amz-checksum-" + name[len("Checksum") :].lower()] = c.text.strip()
            wanted.append((pn, _unquote_etag(_child_text(p, "ETag") or ""), sums))
        if not wanted:
            raise S3Error(400, "MalformedXML", "You must specify at least one part.")
        with backend.lock:
            up = self._upload(bucket, key, upload_id)
            parts: list[_Object] = []
            prev = 0
            for pn, etag, sums in wanted:
                if pn <= prev:
                    raise S3Error(
                        400,
                        "InvalidPartOrder",
                        "The list of parts was not in ascending order. Parts must be ordered by part number.",
                        UploadId=upload_id,
                    )
                prev = pn
                part = up.parts.get(pn)
                if part is None or _unquote_etag(part.etag) != etag:
                    raise S3Error(
                        400,
                        "InvalidPart",
                        "One or more of the specified parts could not be found.  The part may not "
                        "have been uploaded, or the specified entity tag may not have matched the "
                        "part's entity tag.",
                        UploadId=upload_id,
                        PartNumber=pn,
                        ETag=etag,
                    )
                for h, v in sums.items():
                    if part.checksums.get(h, v) != v:
                        raise S3Error(
                            400,
                            "InvalidPart",
                            f"The {_checksum_name(h)} of part {pn} does not match the uploaded part.",
                            UploadId=upload_id,
                            PartNumber=pn,
                        )
                parts.append(part)
            for part in parts[:-1]:
                if part.size < backend.min_part_size:
                    raise S3Error(
                        400,
                        "EntityTooSmall",
                        "Your proposed upload is smaller than the minimum allowed object size.",
                        ProposedSize=part.size,
                        MinSizeAllowed=backend.min_part_size,
                    )
            blobs = [blob for part in parts for blob in part.blobs]
            # ETag like S3's: md5 of the parts' binary ETags, then "-N".
            joined = b"".join(
                bytes.fromhex(_unquote_etag(p.etag))
                if re.fullmatch(r"[0-9a-f]{32}", _unquote_etag(p.etag))
                else p.etag.encode()
                for p in parts
            )
            etag = f'"{hashlib.md5(joined).hexdigest()}-{len(parts)}"'
            checksums: dict[str, str] = {}
            ctype = None
            algo_header = f"x-amz-checksum-{up.algorithm.lower()}" if up.algorithm else None
            if algo_header and up.ctype != "FULL_OBJECT" and all(algo_header in p.checksums for p in parts):
                # S3's composite checksum: the checksum of the parts' binary checksums, then "-N".
                hasher = _hasher(algo_header)
                if hasher is not None:
                    raw = b"".join(base64.b64decode(p.checksums[algo_header]) for p in parts)
                    hasher.update(memoryview(raw))
                    checksums[algo_header] = base64.b64encode(hasher.digest()).decode() + f"-{len(parts)}"
                    ctype = "COMPOSITE"
            obj = _Object(
                blobs,
                etag,
                checksums=checksums,
                checksum_type=ctype,
                part_sizes=[p.size for p in parts],
                **up.template,
            )
            backend._incref(obj)  # pin while we verify outside the lock
        try:
            self._complete_checksum(obj, up)
            with backend.lock:
                # The upload may have been aborted or completed meanwhile.
                if backend.uploads.get(upload_id) is not up:
                    self._upload(bucket, key, "")
                b = backend.bucket(bucket)
                old = b.objects.get(key)
                inm = self._header("If-None-Match")
                if inm is not None and inm.strip() == "*" and old is not None:
                    raise S3Error(
                        412,
                        "PreconditionFailed",
                        "At least one of the pre-conditions you specified did not hold",
                        Condition="If-None-Match",
                    )
                im = self._header("If-Match")
                if im is not None and (
                    old is None or _unquote_etag(im) not in ("*", _unquote_etag(old.etag))
                ):
                    if old is None:
                        raise S3Error(404, "NoSuchKey", "The specified key does not exist.", Key=key)
                    raise S3Error(
                        412,
                        "PreconditionFailed",
                        "At least one of the pre-conditions you specified did not hold",
                        Condition="If-Match",
                    )
                backend._incref(obj)
                b.objects[key] = obj
                if old is None:
                    b.invalidate()
                else:
                    backend._decref(old)
                del backend.uploads[upload_id]
                for part in up.parts.values():  # parts not in the list are dropped
                    backend._decref(part)
        finally:
            backend.unpin(obj)
        host = self._header("Host") or f"{self.server.server_name}:{self.server.server_port}"
        location = f"http://{host}/{urllib.parse.quote(bucket)}/{urllib.parse.quote(key)}"
        inner = _el("Location", location) + _el("Bucket", bucket) + _el("Key", key) + _el("ETag", etag)
        headers = []
        for h, v in obj.checksums.items():
            inner += _el(_checksum_name(h), v)
            headers.append((h, v))
        if obj.checksum_type:
            inner += _el("ChecksumType", obj.checksum_type)
        self._send_xml("CompleteMultipartUploadResult", inner, headers=headers)

    def _complete_checksum(self, obj: _Object, up: _Upload) -> None:
        """Check a checksum sent with CompleteMultipartUpload; add a full-object one if asked.

        Runs outside the lock (one pass over the data, ~0.09 s/GB for CRC32C),
        only when the upload was created FULL_OBJECT or the request carries a
        whole-object checksum.
        """
        sent = {h: v.strip() for h in _CHECKSUM_HEADERS if (v := self._header(h))}
        for h, v in sent.items():
            if "-" in v and obj.checksums.get(h, v) != v:  # composite: must match ours
                raise S3Error(400, "BadDigest", f"The {_checksum_name(h)} you specified did not match.")
        wanted = {h: v for h, v in sent.items() if "-" not in v}
        if up.ctype == "FULL_OBJECT" and up.algorithm:
            wanted.setdefault(f"x-amz-checksum-{up.algorithm.lower()}", "")
        for h, v in wanted.items():
            hasher = _hasher(h)
            if hasher is None:  # cannot compute it (CRC64NVME): keep what the client said
                if v:
                    obj.checksums, obj.checksum_type = {h: v}, "FULL_OBJECT"
                continue
            got = base64.b64encode(_digest_pieces(hasher, obj.pieces)).decode()
            if v and got != v:
                algo = h.rsplit("-", 1)[-1].upper()
                raise S3Error(
                    400, "BadDigest", f"The {algo} you specified did not match the calculated checksum."
                )
            obj.checksums, obj.checksum_type = {h: got}, "FULL_OBJECT"

    def _abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        backend = self.server.backend
        with backend.lock:
            up = self._upload(bucket, key, upload_id)
            del backend.uploads[upload_id]
            for part in up.parts.values():
                backend._decref(part)
        self._send(204)

    def _list_parts(self, bucket: str, key: str, q: dict[str, str]) -> None:
        backend = self.server.backend
        upload_id = q["uploadId"]
        try:
            max_parts = min(int(q.get("max-parts", 1000)), 1000)
            marker = int(q.get("part-number-marker", 0) or 0)
        except ValueError:
            raise S3Error(
                400, "InvalidArgument", "max-parts and part-number-marker must be integers"
            ) from None
        with backend.lock:
            up = self._upload(bucket, key, upload_id)
            numbers = sorted(n for n in up.parts if n > marker)
            rows = [(n, up.parts[n]) for n in numbers[:max_parts]]
            algorithm, ctype = up.algorithm, up.ctype
        truncated = len(numbers) > max_parts
        inner = _el("Bucket", bucket) + _el("Key", key) + _el("UploadId", upload_id)
        inner += _el("PartNumberMarker", marker)
        if rows:
            inner += _el("NextPartNumberMarker", rows[-1][0])
        inner += _el("MaxParts", max_parts) + _el("IsTruncated", "true" if truncated else "false")
        inner += f"<Initiator>{_owner()}</Initiator><Owner>{_owner()}</Owner>" + _el(
            "StorageClass", "STANDARD"
        )
        if algorithm:
            inner += _el("ChecksumAlgorithm", algorithm) + _el("ChecksumType", ctype or "COMPOSITE")
        for n, p in rows:
            row = (
                _el("PartNumber", n)
                + _el("LastModified", _iso(p.mtime))
                + _el("ETag", p.etag)
                + _el("Size", p.size)
            )
            row += "".join(_el(_checksum_name(h), v) for h, v in p.checksums.items())
            inner += f"<Part>{row}</Part>"
        self._send_xml("ListPartsResult", inner)

    def _list_uploads(self, bucket: str, q: dict[str, str]) -> None:
        backend = self.server.backend
        prefix = q.get("prefix", "")
        key_marker = q.get("key-marker", "")
        id_marker = q.get("upload-id-marker", "")
        try:
            max_uploads = min(int(q.get("max-uploads", 1000)), 1000)
        except ValueError:
            raise S3Error(400, "InvalidArgument", "max-uploads must be an integer") from None
        with backend.lock:
            backend.bucket(bucket)
            ups = sorted(
                (u for u in backend.uploads.values() if u.bucket == bucket and u.key.startswith(prefix)),
                key=lambda u: (u.key, u.initiated, u.upload_id),
            )
        if key_marker:
            if id_marker:
                idx = next(
                    (i for i, u in enumerate(ups) if u.key == key_marker and u.upload_id == id_marker), None
                )
                ups = ups[idx + 1 :] if idx is not None else [u for u in ups if u.key > key_marker]
            else:
                ups = [u for u in ups if u.key > key_marker]
        truncated = len(ups) > max_uploads
        ups = ups[:max_uploads]
        inner = _el("Bucket", bucket) + _el("KeyMarker", key_marker) + _el("UploadIdMarker", id_marker)
        if truncated and ups:
            inner += _el("NextKeyMarker", ups[-1].key) + _el("NextUploadIdMarker", ups[-1].upload_id)
        inner += _el("Prefix", prefix) + _el("MaxUploads", max_uploads)
        inner += _el("IsTruncated", "true" if truncated else "false")
        for u in ups:
            row = _el("Key", u.key) + _el("UploadId", u.upload_id)
            row += f"<Initiator>{_owner()}</Initiator><Owner>{_owner()}</Owner>"
            row += _el("StorageClass", "STANDARD") + _el("Initiated", _iso(u.initiated))
            if u.algorithm:
                row += _el("ChecksumAlgorithm", u.algorithm)
            inner += f"<Upload>{row}</Upload>"
        self._send_xml("ListMultipartUploadsResult", inner)


class _HTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Thread-per-connection HTTP server that tracks its connections so stop() can close them."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256  # the CRT client opens many connections at once

    def __init__(
        self, address: tuple[str, int], backend: S3Backend, *, whole_process: bool, shaping: Shaping | None = None
    ) -> None:
        self.backend = backend
        self.whole_process = whole_process
        self.shaping = shaping or Shaping()
        link = self.shaping.link_rate
        # One bucket per direction for the whole link, shared by every connection.
        self._link = [_TokenBucket(link, self.shaping.burst) for _ in range(2)] if link else None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._req_ids = itertools.count(1)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's getfqdn() lookup, which can stall without DNS."""
        # Accepted sockets inherit these. Fixed 4 MiB buffers instead of
        # autotuning cut syscalls and wake-ups: on loopback they took a 1 GiB
        # PUT from ~1.1 to ~1.8 GB/s and GET from ~1.1 to ~1.3 GB/s.
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.socket.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def pacers(self) -> tuple[_Pacer, _Pacer]:
        """Fresh (receive, send) pacers for one new connection in shaped mode."""
        sh = self.shaping
        out = []
        for direction in range(2):
            buckets = [_TokenBucket(sh.conn_rate, sh.burst)] if sh.conn_rate else []
            if self._link:
                buckets.append(self._link[direction])
            out.append(_Pacer(buckets))
        return out[0], out[1]

    def next_request_id(self) -> str:
        """A unique x-amz-request-id."""
        return "%016X" % next(self._req_ids)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Track the connection, then hand it to a thread."""
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Forget the connection and close it."""
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open connection so idle keep-alive threads exit."""
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# --------------------------------------------------------------------------- public wrapper


class FastS3Server:
    """A fast in-memory S3 server on ``host:port`` (port 0 picks a free one).

    By default it runs in a child process, so its CPU time and GIL never mix with
    the client being measured; ``in_process=True`` serves from threads in this
    process instead (handy in tests: no start-up cost, direct access to
    :attr:`backend`).

    ``verify_all_checksums`` also verifies CRC32/SHA-1/SHA-256 request checksums
    (CRC32C and Content-MD5 are always verified). ``min_part_size`` is the smallest
    non-final multipart part CompleteMultipartUpload accepts (S3: 5 MiB).
    ``prefault_bytes`` warms that much slab memory at start so the first large
    PUT does not pay for page faults. ``shaping`` (a :class:`Shaping`) adds
    first-byte latency and per-connection / link bandwidth caps.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        in_process: bool = False,
        verify_all_checksums: bool = False,
        min_part_size: int = MIN_PART_SIZE,
        prefault_bytes: int = 0,
        startup_timeout: float = 30.0,
        shaping: Shaping | None = None,
    ) -> None:
        self.host = host
        self.shaping = shaping or Shaping()
        self.port = port
        self.in_process = in_process
        self.verify_all_checksums = verify_all_checksums
        self.min_part_size = min_part_size
        self.prefault_bytes = prefault_bytes
        self.startup_timeout = startup_timeout
        self.backend: S3Backend | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://host:port`` of the running server."""
        if not self.running:
            raise RuntimeError("FastS3Server is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether start() has been called and stop() has not."""
        return self._httpd is not None or self._proc is not None

    def start(self) -> FastS3Server:
        """Start serving; returns self once the server accepts connections."""
        if self.running:
            return self
        if self.in_process:
            self.backend = S3Backend(
                verify_all_checksums=self.verify_all_checksums, min_part_size=self.min_part_size
            )
            if self.prefault_bytes:
                self.backend.pool.prefault(self.prefault_bytes)
            self._httpd = _HTTPServer((self.host, self.port), self.backend, whole_process=False,
                                      shaping=self.shaping)
            self.port = self._httpd.server_address[1]
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="fast-s3", daemon=True
            )
            self._thread.start()
            return self
        # Run this file as a script: it needs only the standard library and
        # crc32c, so the child skips importing the cloudckpt package (and
        # whatever that grows to import). -P keeps this directory off sys.path.
        cmd = [
            sys.executable,
            *(["-P"] if sys.version_info >= (3, 11) else []),
            os.path.abspath(__file__),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--min-part-size",
            str(self.min_part_size),
            "--prefault-bytes",
            str(self.prefault_bytes),
            "--print-port",
            "--exit-on-stdin-eof",
        ]
        if self.verify_all_checksums:
            cmd.append("--verify-all-checksums")
        if self.shaping.active:
            cmd += self.shaping.to_args()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        # The child prints its port once it listens; readline blocks until then.
        timer = threading.Timer(self.startup_timeout, self._proc.kill)
        timer.start()
        try:
            line = self._proc.stdout.readline().strip()
        finally:
            timer.cancel()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"FastS3 child failed to start (printed {line!r})")
        self.port = int(line)
        return self

    def stop(self) -> None:
        """Stop serving and drop all data."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            httpd.close_connections()
            if self._thread is not None:
                self._thread.join(timeout=5)
        proc, self._proc = self._proc, None
        if proc is not None:
            from cloudckpt._moto_server import stop_child

            stop_child(proc)

    def __enter__(self) -> FastS3Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _control(self, method: str, path: str) -> bytes:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path} -> {resp.status}: {body[:200]!r}")
            return body
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        """Request counts per operation, bytes in/out, and server CPU seconds since the last reset.

        In child-process mode ``server_cpu_seconds`` is the whole server
        process's CPU time; in-process it is the summed CPU time of the request
        threads (the process's own total would include the client).
        """
        if self.backend is not None and self._httpd is not None:
            return self.backend.stats(whole_process=False)
        return json.loads(self._control("GET", "/__stats__"))

    @property
    def request_counts(self) -> collections.Counter[str]:
        """Requests per S3 operation name since the last reset."""
        return collections.Counter(self.stats()["request_counts"])

    def server_cpu_seconds(self) -> float:
        """Server CPU seconds since the last reset (see :meth:`stats`)."""
        return float(self.stats()["server_cpu_seconds"])

    def reset(self) -> None:
        """Drop every bucket, object and upload, and zero the counters."""
        if self.backend is not None and self._httpd is not None:
            self.backend.reset()
        else:
            self._control("POST", "/__reset__")

    def reset_stats(self) -> None:
        """Zero the counters but keep the data."""
        if self.backend is not None and self._httpd is not None:
            self.backend.reset_stats()
        else:
            self._control("POST", "/__reset_stats__")


def main(argv: list[str] | None = None) -> None:
    """Command line: serve until interrupted (or until stdin closes with --exit-on-stdin-eof)."""
    ap = argparse.ArgumentParser(
        prog="python -m cloudckpt_testing.fast_s3", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument(
        "--verify-all-checksums", action="store_true", help="also verify CRC32/SHA-1/SHA-256 (costs CPU)"
    )
    ap.add_argument("--min-part-size", type=int, default=MIN_PART_SIZE)
    ap.add_argument("--prefault-bytes", type=int, default=0, help="warm this much slab memory at start")
    ap.add_argument("--print-port", action="store_true", help="print only the bound port (for launchers)")
    ap.add_argument("--exit-on-stdin-eof", action="store_true", help="exit when stdin closes (parent died)")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="shaped: delay before each response's first byte")
    ap.add_argument("--conn-mb-per-s", type=float, default=None, help="shaped: per-connection cap, MB/s each way")
    ap.add_argument("--link-mb-per-s", type=float, default=None, help="shaped: whole-link cap, MB/s each way")
    ap.add_argument("--burst-bytes", type=int, default=Shaping.burst, help="shaped: token bucket depth")
    args = ap.parse_args(argv)
    shaping = Shaping(
        latency=args.latency_ms / 1e3,
        conn_rate=args.conn_mb_per_s * 1e6 if args.conn_mb_per_s else None,
        link_rate=args.link_mb_per_s * 1e6 if args.link_mb_per_s else None,
        burst=args.burst_bytes,
    )
    backend = S3Backend(verify_all_checksums=args.verify_all_checksums, min_part_size=args.min_part_size)
    if args.prefault_bytes:
        backend.pool.prefault(args.prefault_bytes)
    httpd = _HTTPServer((args.host, args.port), backend, whole_process=True, shaping=shaping)
    port = httpd.server_address[1]
    if args.print_port:
        print(port, flush=True)
    else:
        print(f"FastS3 listening on http://{args.host}:{port}", flush=True)
    if args.exit_on_stdin_eof:

        def watch() -> None:
            sys.stdin.read()
            httpd.shutdown()

        threading.Thread(target=watch, daemon=True).start()
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
