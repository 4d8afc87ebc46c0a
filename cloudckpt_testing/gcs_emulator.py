"""An in-memory Google Cloud Storage emulator for tests, driven by the real client.

The existing emulators (gcp-storage-emulator, fake-gcs-server) get preconditions,
resumable-chunk retries and the XML multipart API wrong or do not implement them
at all (see ``shared/reference/gcs.md``), and those are exactly what a
checkpoint writer relies on. This one is a stdlib ``ThreadingHTTPServer`` that
speaks the wire format google-cloud-storage 3.x sends:

* JSON API: buckets (insert/get/list/delete), objects (get, ``alt=media`` with
  ranges, list with prefix/delimiter/pagination, delete, patch/update, compose,
  rewrite) and uploads (``media``, ``multipart``, ``resumable``).
* XML API, path style: simple GET/HEAD/PUT/DELETE of ``/{bucket}/{object}`` and
  the S3-compatible multipart upload (initiate, parts, complete, abort, list
  parts, list uploads).
* Generation/metageneration preconditions on every read, write, delete and
  compose, with Google's JSON error shape (XML errors on XML routes).
* Server-side verification of client-supplied CRC32C/MD5 values.

Usage::

    with GCSEmulator() as emu:
        client = gcs_client(emu.endpoint)
        client.create_bucket("b")

or standalone: ``python -m cloudckpt_testing.gcs_emulator --port 4443``.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import contextlib
import datetime as _dt
import email.utils
import hashlib
import http.server
import json
import re
import socket
import struct
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Union
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape as _xml_escape

__all__ = ["GCSEmulator", "RecordedRequest", "gcs_client"]

_Bytes = Union[bytes, bytearray, memoryview]

try:  # The ICRAR ``crc32c`` package takes any buffer and releases the GIL.
    import crc32c as _crc32c_mod

    def _crc32c(data: _Bytes) -> int:
        return _crc32c_mod.crc32c(data)

except ImportError:  # pragma: no cover - exercised only without the test extra
    import google_crc32c as _google_crc32c

    def _crc32c(data: _Bytes) -> int:
        # google_crc32c only accepts read-only objects that need no release.
        return _google_crc32c.value(bytes(data))


_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_XML_DECL = "<?xml version='1.0' encoding='UTF-8'?>"
_MAX_COMPOSE_SOURCES = 32
_MAX_COMPONENT_COUNT = 1024
_DEFAULT_MAX_RESULTS = 1000
# Bodies smaller than this go out in the same send() as the headers.
_SMALL_BODY = 64 * 1024
_BUCKET_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
# multipart/related boundary: "quoted" (RFC 2045), 'quoted' (apitools, so gcloud storage) or bare.
_BOUNDARY_RE = re.compile(r"""boundary\s*=\s*(?:"([^"]+)"|'([^']+)'|([^;\s]+))""", re.IGNORECASE)
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)
_WRITABLE_FIELDS = (
    "cacheControl",
    "contentDisposition",
    "contentEncoding",
    "contentLanguage",
    "customTime",
    "storageClass",
)


# --------------------------------------------------------------------------- helpers
def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _crc_b64(crc: int) -> str:
    return _b64(struct.pack(">I", crc))


def _rfc3339(ts: float) -> str:
    dt = _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _header_safe(value: str) -> str:
    """Header values go out as latin-1; percent-encode anything else."""
    try:
        value.encode("latin-1")
        return value
    except UnicodeEncodeError:
        return quote(value, safe="/:=,;!*'()@&+$ ")


class _HTTPError(Exception):
    """An error answer; rendered as Google JSON or as S3-style XML by the route."""

    def __init__(
        self,
        status: int,
        message: str,
        reason: str = "invalid",
        xml_code: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.xml_code = xml_code or reason
        self.headers = dict(headers or {})


def _not_found_bucket(bucket: str) -> _HTTPError:
    return _HTTPError(
        404, f"The specified bucket does not exist: {bucket}", "notFound", "NoSuchBucket"
    )


def _not_found_object(bucket: str, name: str) -> _HTTPError:
    return _HTTPError(404, f"No such object: {bucket}/{name}", "notFound", "NoSuchKey")


def _precondition_failed(what: str) -> _HTTPError:
    return _HTTPError(
        412,
        f"At least one of the pre-conditions you specified did not hold ({what}).",
        "conditionNotMet",
        "PreconditionFailed",
    )


def _bad_request(message: str, xml_code: str = "InvalidArgument") -> _HTTPError:
    return _HTTPError(400, message, "invalid", xml_code)


def _parse_int(value: Optional[str], what: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise _bad_request(f"Invalid value for {what}: {value!r}") from None


def _decode_b64_hash(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, base64.binascii.Error):
        raise _bad_request(f"Invalid base64 {what}: {value!r}", "InvalidDigest") from None


def _parse_goog_hash(values: Iterable[str]) -> dict[str, bytes]:
    """Parse ``x-goog-hash`` headers (``crc32c=..,md5=..``, possibly repeated)."""
    out: dict[str, bytes] = {}
    for value in values:
        for item in value.split(","):
            key, sep, val = item.strip().partition("=")
            if sep:
                out[key.strip().lower()] = _decode_b64_hash(val.strip(), f"x-goog-hash {key}")
    return out


def _verify_hashes(
    expected: Mapping[str, bytes], crc: int, md5: Optional[bytes]
) -> None:
    """Raise 400 if a client-supplied crc32c/md5 does not match the stored bytes."""
    if "crc32c" in expected and expected["crc32c"] != struct.pack(">I", crc):
        raise _HTTPError(
            400,
            f"Provided CRC32C \"{_b64(expected['crc32c'])}\" doesn't match calculated "
            f"CRC32C \"{_crc_b64(crc)}\".",
            "invalid",
            "BadDigest",
        )
    if "md5" in expected and md5 is not None and expected["md5"] != md5:
        raise _HTTPError(
            400,
            f"Provided MD5 hash \"{_b64(expected['md5'])}\" doesn't match calculated "
            f"MD5 hash \"{_b64(md5)}\".",
            "invalid",
            "BadDigest",
        )


def _strip_ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


# --------------------------------------------------------------------------- state
@dataclass
class _Object:
    """One live object generation. ``data`` is never mutated once stored."""

    name: str
    data: _Bytes
    generation: int
    metageneration: int
    content_type: str
    crc32c: int
    md5: Optional[bytes]
    created: float
    updated: float
    metadata: dict[str, str] = field(default_factory=dict)
    component_count: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)
    xml_etag: str = ""

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class _Part:
    data: _Bytes
    crc32c: int
    md5: bytes
    modified: float

    @property
    def etag(self) -> str:
        return f'"{self.md5.hex()}"'


@dataclass
class _MPU:
    """An XML API multipart upload in progress."""

    upload_id: str
    key: str
    initiated: float
    seq: int
    content_type: str
    metadata: dict[str, str]
    extra: dict[str, Any]
    pre: dict[str, int]
    parts: dict[int, _Part] = field(default_factory=dict)


@dataclass
class _Bucket:
    name: str
    created: float
    objects: dict[str, _Object] = field(default_factory=dict)
    uploads: dict[str, _MPU] = field(default_factory=dict)
    _sorted: Optional[list[str]] = None

    def sorted_keys(self) -> list[str]:
        # Rebuilt only after an insert/delete of a key, so listing is cheap.
        if self._sorted is None:
            self._sorted = sorted(self.objects)
        return self._sorted

    def put(self, obj: _Object) -> None:
        if obj.name not in self.objects:
            self._sorted = None
        self.objects[obj.name] = obj

    def remove(self, name: str) -> None:
        del self.objects[name]
        self._sorted = None


@dataclass
class _Resumable:
    """A JSON API resumable upload session."""

    upload_id: str
    bucket: str
    name: str
    content_type: str
    metadata: dict[str, str]
    extra: dict[str, Any]
    pre: dict[str, int]
    expected: dict[str, bytes]
    total: Optional[int] = None
    persisted: int = 0
    chunks: list[_Bytes] = field(default_factory=list)
    result: Optional[_Object] = None
    failed: Optional[_HTTPError] = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator received it (see :meth:`GCSEmulator.record`)."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # names lower-cased

    @property
    def op(self) -> str:
        """The operation's name (``gcs.upload.multipart``, ``gcs.xml.mpu.init``...)."""
        from cloudckpt_testing.faultproxy import classify

        return classify(self.method, self.path, dict(self.query), dict(self.headers), api="gcs")


class _State:
    """Everything the server stores, behind one lock."""

    def __init__(self, min_part_size: int) -> None:
        self.lock = threading.Lock()
        self.min_part_size = min_part_size
        self.buckets: dict[str, _Bucket] = {}
        self.sessions: dict[str, _Resumable] = {}
        self._last_generation = 0
        self._seq = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.counts_lock = threading.Lock()
        # Requests are recorded only inside GCSEmulator.record(): the server is shared by a session.
        self.recordings: list[list[RecordedRequest]] = []

    def reset(self) -> None:
        with self.lock:
            self.buckets.clear()
            self.sessions.clear()
        with self.counts_lock:
            self.counts.clear()

    def record(self, request: RecordedRequest) -> None:
        with self.counts_lock:
            for recording in self.recordings:
                recording.append(request)

    def count(self, op: str) -> None:
        with self.counts_lock:
            self.counts[op] += 1

    # The following must be called with ``self.lock`` held.
    def next_generation(self) -> int:
        # Real generations are microsecond timestamps; keep them strictly increasing.
        self._last_generation = max(self._last_generation + 1, time.time_ns() // 1000)
        return self._last_generation

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def bucket(self, name: str) -> _Bucket:
        try:
            return self.buckets[name]
        except KeyError:
            raise _not_found_bucket(name) from None

    def commit(
        self,
        bucket: str,
        name: str,
        data: _Bytes,
        *,
        crc: int,
        md5: Optional[bytes],
        content_type: str,
        metadata: Mapping[str, str],
        extra: Mapping[str, Any],
        pre: Mapping[str, int],
        component_count: Optional[int] = None,
        xml_etag: Optional[str] = None,
    ) -> _Object:
        """Atomically check write preconditions and make ``data`` the live generation."""
        b = self.bucket(bucket)
        _check_write_preconditions(b.objects.get(name), pre)
        now = time.time()
        obj = _Object(
            name=name,
            data=data,
            generation=self.next_generation(),
            metageneration=1,
            content_type=content_type or "application/octet-stream",
            crc32c=crc,
            md5=md5,
            created=now,
            updated=now,
            metadata=dict(metadata),
            component_count=component_count,
            extra=dict(extra),
            xml_etag=xml_etag or (f'"{md5.hex()}"' if md5 is not None else f'"{crc:08x}"'),
        )
        b.put(obj)
        return obj


def _check_write_preconditions(obj: Optional[_Object], pre: Mapping[str, int]) -> None:
    """Write/delete semantics: any failed condition is 412 (a missing object fails match)."""
    _check_preconditions(obj, pre, read=False)


def _check_preconditions(obj: Optional[_Object], pre: Mapping[str, int], *, read: bool) -> None:
    not_match_status = 304 if read else 412
    igm = pre.get("ifGenerationMatch")
    if igm is not None:
        if igm == 0:
            if obj is not None:
                raise _precondition_failed("ifGenerationMatch=0 but the object exists")
        elif obj is None or obj.generation != igm:
            raise _precondition_failed(f"ifGenerationMatch={igm}")
    ignm = pre.get("ifGenerationNotMatch")
    if ignm is not None:
        if ignm == 0 and obj is None:
            raise _precondition_failed("ifGenerationNotMatch=0 but the object does not exist")
        if obj is not None and obj.generation == ignm:
            if not_match_status == 304:
                raise _HTTPError(304, "Not Modified", "notModified", "NotModified")
            raise _precondition_failed(f"ifGenerationNotMatch={ignm}")
    imm = pre.get("ifMetagenerationMatch")
    if imm is not None and (obj is None or obj.metageneration != imm):
        raise _precondition_failed(f"ifMetagenerationMatch={imm}")
    imnm = pre.get("ifMetagenerationNotMatch")
    if imnm is not None and obj is not None and obj.metageneration == imnm:
        if not_match_status == 304:
            raise _HTTPError(304, "Not Modified", "notModified", "NotModified")
        raise _precondition_failed(f"ifMetagenerationNotMatch={imnm}")


_PRECONDITION_PARAMS = (
    "ifGenerationMatch",
    "ifGenerationNotMatch",
    "ifMetagenerationMatch",
    "ifMetagenerationNotMatch",
)
_PRECONDITION_HEADERS = {
    "x-goog-if-generation-match": "ifGenerationMatch",
    "x-goog-if-generation-not-match": "ifGenerationNotMatch",
    "x-goog-if-metageneration-match": "ifMetagenerationMatch",
    "x-goog-if-metageneration-not-match": "ifMetagenerationNotMatch",
}


# --------------------------------------------------------------------------- handler
class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes one request; the body is read before any lock is taken."""

    protocol_version = "HTTP/1.1"
    server_version = "cloudckpt-gcs-emulator/1.0"
    # Headers and body go out in separate writes; without this, Nagle plus
    # delayed ACKs add 40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server: "_Server"

    # -- plumbing ----------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    @property
    def state(self) -> _State:
        return self.server.state

    def _read_body(self) -> bytearray:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        buf = bytearray(length)
        view = memoryview(buf)
        pos = 0
        while pos < length:
            got = self.rfile.readinto(view[pos:])
            if not got:
                raise ConnectionError("client closed the connection mid-body")
            pos += got
        return buf

    def _read_chunked(self) -> bytearray:
        pieces: list[bytearray] = []
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            chunk = bytearray(size)
            view = memoryview(chunk)
            pos = 0
            while pos < size:
                got = self.rfile.readinto(view[pos:])
                if not got:
                    raise ConnectionError("client closed the connection mid-body")
                pos += got
            pieces.append(chunk)
            self.rfile.readline(8)  # CRLF after the chunk
        if len(pieces) == 1:
            return pieces[0]
        return bytearray(b"".join(pieces))

    def _host(self) -> str:
        return self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"

    def _send(
        self,
        status: int,
        body: _Bytes = b"",
        headers: Optional[Mapping[str, str]] = None,
        content_type: Optional[str] = None,
    ) -> None:
        reason = self.responses.get(status, ("",))[0] if status in self.responses else ""
        if status == 308:
            reason = "Resume Incomplete"
        elif status == 499:
            reason = "Client Closed Request"
        lines = [f"HTTP/1.1 {status} {reason}\r\n", f"Date: {_http_date(time.time())}\r\n"]
        lines.append(f"Server: {self.server_version}\r\n")
        body_len = memoryview(body).nbytes
        if status != 304:
            lines.append(f"Content-Length: {body_len}\r\n")
        if content_type:
            lines.append(f"Content-Type: {content_type}\r\n")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {_header_safe(str(value))}\r\n")
        if self.close_connection:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        send_body = self.command != "HEAD" and status != 304 and body_len > 0
        if send_body and body_len <= _SMALL_BODY:
            self.wfile.write(head + bytes(body))
        else:
            self.wfile.write(head)
            if send_body:
                self.wfile.write(memoryview(body))

    def _send_json(self, status: int, doc: Any, headers: Optional[Mapping[str, str]] = None) -> None:
        self._send(status, json.dumps(doc).encode(), headers, "application/json; charset=UTF-8")

    def _send_xml(self, status: int, xml: str, headers: Optional[Mapping[str, str]] = None) -> None:
        self._send(status, (_XML_DECL + xml).encode("utf-8"), headers, "application/xml; charset=UTF-8")

    def _send_error(self, err: _HTTPError, xml: bool) -> None:
        if err.status == 304:
            self._send(304, b"", err.headers)
        elif xml:
            doc = (
                f"<Error><Code>{_xml_escape(err.xml_code)}</Code>"
                f"<Message>{_xml_escape(err.message)}</Message>"
                f"<Details>{_xml_escape(err.message)}</Details></Error>"
            )
            self._send_xml(err.status, doc, err.headers)
        else:
            doc = {
                "error": {
                    "code": err.status,
                    "message": err.message,
                    "errors": [{"message": err.message, "domain": "global", "reason": err.reason}],
                }
            }
            self._send_json(err.status, doc, err.headers)

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
        except (ConnectionError, OSError, ValueError):
            self.close_connection = True
            return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if self.state.recordings:
            self.state.record(RecordedRequest(method, url.path, query,
                                              {k.lower(): v for k, v in self.headers.items()}))
        segs = url.path.split("/")[1:]
        xml = False
        try:
            if segs[:2] == ["storage", "v1"]:
                self._json_api(method, [unquote(s) for s in segs[2:]], query, body)
            elif segs[:3] == ["upload", "storage", "v1"]:
                self._upload_api(method, [unquote(s) for s in segs[3:]], query, body)
            elif segs[:4] == ["resumable", "upload", "storage", "v1"]:
                # apitools clients (gcloud storage, gsutil) start resumable uploads on
                # this path (their upload config's ``resumable_path``); GCS serves it
                # exactly like /upload/storage/v1.
                self._upload_api(method, [unquote(s) for s in segs[4:]], query, body)
            elif segs[:3] == ["download", "storage", "v1"]:
                if method not in ("GET", "HEAD") or len(segs) != 7 or segs[3] != "b" or segs[5] != "o":
                    raise _HTTPError(404, f"Not found: {url.path}", "notFound")
                self._object_media(unquote(segs[4]), unquote(segs[6]), query, xml=False)
            elif segs[:3] == ["batch", "storage", "v1"]:
                raise _HTTPError(501, "JSON batch requests are not supported by this emulator", "notImplemented")
            else:
                xml = True
                bucket = unquote(segs[0]) if segs else ""
                key = unquote("/".join(segs[1:]))
                self._xml_api(method, bucket, key, query, body)
        except _HTTPError as err:
            self._send_error(err, xml)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception as exc:  # a bug in the emulator: answer 500, keep serving
            import traceback

            traceback.print_exc(file=sys.stderr)
            self._send_error(_HTTPError(500, f"emulator error: {exc!r}", "backendError", "InternalError"), xml)

    # -- JSON rendering ----------------------------------------------------------
    def _bucket_json(self, b: _Bucket) -> dict[str, Any]:
        return {
            "kind": "storage#bucket",
            "id": b.name,
            "selfLink": f"http://{self._host()}/storage/v1/b/{quote(b.name, safe='')}",
            "name": b.name,
            "projectNumber": "0",
            "metageneration": "1",
            "location": "US",
            "storageClass": "STANDARD",
            "etag": "CAE=",
            "timeCreated": _rfc3339(b.created),
            "updated": _rfc3339(b.created),
            "locationType": "multi-region",
        }

    def _object_json(self, bucket: str, o: _Object) -> dict[str, Any]:
        qname = quote(o.name, safe="")
        qbucket = quote(bucket, safe="")
        host = self._host()
        doc: dict[str, Any] = {
            "kind": "storage#object",
            "id": f"{bucket}/{o.name}/{o.generation}",
            "selfLink": f"http://{host}/storage/v1/b/{qbucket}/o/{qname}",
            "mediaLink": f"http://{host}/download/storage/v1/b/{qbucket}/o/{qname}"
            f"?generation={o.generation}&alt=media",
            "name": o.name,
            "bucket": bucket,
            "generation": str(o.generation),
            "metageneration": str(o.metageneration),
            "contentType": o.content_type,
            "storageClass": o.extra.get("storageClass", "STANDARD"),
            "size": str(o.size),
            "crc32c": _crc_b64(o.crc32c),
            "etag": _b64(struct.pack(">QI", o.generation, o.metageneration)),
            "timeCreated": _rfc3339(o.created),
            "updated": _rfc3339(o.updated),
            "timeStorageClassUpdated": _rfc3339(o.created),
        }
        if o.md5 is not None:
            doc["md5Hash"] = _b64(o.md5)
        if o.component_count is not None:
            doc["componentCount"] = o.component_count
        if o.metadata:
            doc["metadata"] = dict(o.metadata)
        for key in _WRITABLE_FIELDS:
            if key in o.extra and key != "storageClass":
                doc[key] = o.extra[key]
        return doc

    def _media_headers(self, o: _Object) -> dict[str, str]:
        hashes = f"crc32c={_crc_b64(o.crc32c)}"
        if o.md5 is not None:
            hashes += f",md5={_b64(o.md5)}"
        headers = {
            "X-Goog-Hash": hashes,
            "X-Goog-Generation": str(o.generation),
            "X-Goog-Metageneration": str(o.metageneration),
            "X-Goog-Stored-Content-Length": str(o.size),
            "X-Goog-Stored-Content-Encoding": o.extra.get("contentEncoding", "identity"),
            "X-Goog-Storage-Class": o.extra.get("storageClass", "STANDARD"),
            "ETag": o.xml_etag,
            "Last-Modified": _http_date(o.updated),
            "Accept-Ranges": "bytes",
        }
        if o.component_count is not None:
            headers["X-Goog-Component-Count"] = str(o.component_count)
        return headers

    # -- JSON API ----------------------------------------------------------------
    def _json_api(self, method: str, segs: list[str], q: dict[str, str], body: bytearray) -> None:
        if not segs or segs[0] != "b":
            raise _HTTPError(404, "Not found", "notFound")
        if len(segs) == 1:
            if method == "GET":
                return self._bucket_list(q)
            if method == "POST":
                return self._bucket_insert(body)
        elif len(segs) == 2:
            if method == "GET":
                return self._bucket_get(segs[1])
            if method == "DELETE":
                return self._bucket_delete(segs[1])
            if method in ("PATCH", "PUT"):
                return self._bucket_get(segs[1], op="bucket.patch")
        elif segs[2] == "o":
            bucket = segs[1]
            if len(segs) == 3 and method == "GET":
                return self._object_list(bucket, q)
            if len(segs) == 4:
                name = segs[3]
                if method in ("GET", "HEAD"):
                    if q.get("alt") == "media":
                        return self._object_media(bucket, name, q, xml=False)
                    return self._object_get(bucket, name, q)
                if method == "DELETE":
                    return self._object_delete(bucket, name, q, xml=False)
                if method in ("PATCH", "PUT"):
                    return self._object_patch(bucket, name, q, body, replace=(method == "PUT"))
            if len(segs) == 5 and segs[4] == "compose" and method == "POST":
                return self._object_compose(bucket, segs[3], q, body)
            if len(segs) == 9 and segs[4] == "rewriteTo" and method == "POST":
                return self._object_rewrite(bucket, segs[3], segs[6], segs[8], q, body)
            if len(segs) == 7 and segs[4] == "moveTo" and segs[5] == "o" and method == "POST":
                return self._object_move(bucket, segs[3], segs[6], q)
        raise _HTTPError(404, f"Not found: {method} /storage/v1/{'/'.join(segs)}", "notFound")

    def _bucket_insert(self, body: bytearray) -> None:
        self.state.count("bucket.insert")
        meta = self._json_body(body)
        name = meta.get("name", "")
        if not isinstance(name, str) or not _BUCKET_NAME_RE.match(name):
            raise _bad_request(f"Invalid bucket name: {name!r}")
        with self.state.lock:
            if name in self.state.buckets:
                raise _HTTPError(
                    409, "Your previous request to create the named bucket succeeded and you already own it.",
                    "conflict", "BucketAlreadyOwnedByYou",
                )
            b = _Bucket(name=name, created=time.time())
            self.state.buckets[name] = b
            doc = self._bucket_json(b)
        self._send_json(200, doc)

    def _bucket_get(self, name: str, op: str = "bucket.get") -> None:
        self.state.count(op)
        with self.state.lock:
            doc = self._bucket_json(self.state.bucket(name))
        self._send_json(200, doc)

    def _bucket_list(self, q: dict[str, str]) -> None:
        self.state.count("bucket.list")
        prefix = q.get("prefix", "")
        with self.state.lock:
            items = [self._bucket_json(b) for n, b in sorted(self.state.buckets.items()) if n.startswith(prefix)]
        self._send_json(200, {"kind": "storage#buckets", "items": items})

    def _bucket_delete(self, name: str) -> None:
        self.state.count("bucket.delete")
        with self.state.lock:
            b = self.state.bucket(name)
            if b.objects:
                raise _HTTPError(409, "The bucket you tried to delete is not empty.", "conflict", "BucketNotEmpty")
            del self.state.buckets[name]
            for sid in [s for s, sess in self.state.sessions.items() if sess.bucket == name]:
                del self.state.sessions[sid]
        self._send(204)

    @staticmethod
    def _json_body(body: _Bytes) -> dict[str, Any]:
        if not body:
            return {}
        try:
            doc = json.loads(bytes(body))
        except ValueError:
            raise _bad_request("Request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise _bad_request("Request body must be a JSON object")
        return doc

    @staticmethod
    def _pre_from_query(q: Mapping[str, str]) -> dict[str, int]:
        pre: dict[str, int] = {}
        for key in _PRECONDITION_PARAMS:
            value = _parse_int(q.get(key), key)
            if value is not None:
                pre[key] = value
        return pre

    def _pre_from_headers(self) -> dict[str, int]:
        pre: dict[str, int] = {}
        for header, key in _PRECONDITION_HEADERS.items():
            value = _parse_int(self.headers.get(header), header)
            if value is not None:
                pre[key] = value
        return pre

    def _lookup(self, bucket: str, name: str, q: Mapping[str, str]) -> _Object:
        """The live object (lock held), honouring an explicit ``generation``."""
        b = self.state.bucket(bucket)
        obj = b.objects.get(name)
        gen = _parse_int(q.get("generation"), "generation")
        if obj is None or (gen is not None and gen != obj.generation):
            raise _not_found_object(bucket, name)
        return obj

    def _object_get(self, bucket: str, name: str, q: dict[str, str]) -> None:
        self.state.count("object.get")
        with self.state.lock:
            obj = self._lookup(bucket, name, q)
            _check_preconditions(obj, self._pre_from_query(q), read=True)
            doc = self._object_json(bucket, obj)
        self._send_json(200, doc)

    def _object_media(self, bucket: str, name: str, q: dict[str, str], *, xml: bool) -> None:
        self.state.count("xml.get" if xml else "object.download")
        pre = self._pre_from_headers() if xml else self._pre_from_query(q)
        with self.state.lock:
            obj = self._lookup(bucket, name, q)
            _check_preconditions(obj, pre, read=True)
        headers = self._media_headers(obj)
        size = obj.size
        rng = self.headers.get("Range")
        data = memoryview(obj.data)
        if rng and size > 0:
            m = _RANGE_RE.match(rng)
            if m is None:
                # Unparseable ranges are ignored, as HTTP says.
                self._send(200, data, headers, obj.content_type)
                return
            first, last = m.group(1), m.group(2)
            if first == "" and last == "":
                raise _HTTPError(416, f"Invalid range {rng!r}", "requestedRangeNotSatisfiable", "InvalidRange")
            if first == "":
                n = int(last)
                if n == 0:
                    raise _HTTPError(
                        416, "The requested range cannot be satisfied.", "requestedRangeNotSatisfiable",
                        "InvalidRange", {"Content-Range": f"bytes */{size}"},
                    )
                start, end = max(0, size - n), size - 1
            else:
                start = int(first)
                end = size - 1 if last == "" else min(int(last), size - 1)
                if start >= size or end < start:
                    raise _HTTPError(
                        416, "The requested range cannot be satisfied.", "requestedRangeNotSatisfiable",
                        "InvalidRange", {"Content-Range": f"bytes */{size}"},
                    )
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send(206, data[start : end + 1], headers, obj.content_type)
            return
        self._send(200, data, headers, obj.content_type)

    def _object_delete(self, bucket: str, name: str, q: dict[str, str], *, xml: bool) -> None:
        self.state.count("xml.delete" if xml else "object.delete")
        pre = self._pre_from_headers() if xml else self._pre_from_query(q)
        with self.state.lock:
            obj = self._lookup(bucket, name, q)
            _check_write_preconditions(obj, pre)
            self.state.buckets[bucket].remove(name)
        self._send(204)

    def _object_patch(
        self, bucket: str, name: str, q: dict[str, str], body: bytearray, *, replace: bool
    ) -> None:
        self.state.count("object.update" if replace else "object.patch")
        changes = self._json_body(body)
        with self.state.lock:
            obj = self._lookup(bucket, name, q)
            _check_write_preconditions(obj, self._pre_from_query(q))
            if replace:
                obj.metadata = {}
                for key in _WRITABLE_FIELDS:
                    if key != "storageClass":
                        obj.extra.pop(key, None)
            if "metadata" in changes:
                new = changes["metadata"]
                if new is None:
                    obj.metadata = {}
                elif isinstance(new, dict):
                    for key, value in new.items():
                        if value is None:
                            obj.metadata.pop(key, None)
                        else:
                            obj.metadata[key] = str(value)
                else:
                    raise _bad_request("metadata must be an object")
            if changes.get("contentType"):
                obj.content_type = str(changes["contentType"])
            for key in _WRITABLE_FIELDS:
                if key in changes and key != "storageClass":
                    if changes[key] is None:
                        obj.extra.pop(key, None)
                    else:
                        obj.extra[key] = changes[key]
            obj.metageneration += 1
            obj.updated = time.time()
            doc = self._object_json(bucket, obj)
        self._send_json(200, doc)

    def _object_list(self, bucket: str, q: dict[str, str]) -> None:
        self.state.count("object.list")
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter", "")
        max_results = _parse_int(q.get("maxResults"), "maxResults") or _DEFAULT_MAX_RESULTS
        max_results = max(1, min(max_results, _DEFAULT_MAX_RESULTS))
        start_offset = q.get("startOffset", "")
        end_offset = q.get("endOffset", "")
        trailing = q.get("includeTrailingDelimiter", "").lower() == "true"
        after, after_is_prefix = "", False
        token = q.get("pageToken")
        if token:
            try:
                after, after_is_prefix = json.loads(base64.urlsafe_b64decode(token.encode()))
            except (ValueError, TypeError):
                raise _bad_request(f"Invalid pageToken {token!r}") from None
        items: list[dict[str, Any]] = []
        prefixes: list[str] = []
        next_token: Optional[str] = None
        with self.state.lock:
            b = self.state.bucket(bucket)
            keys = b.sorted_keys()
            n = len(keys)
            i = bisect.bisect_left(keys, max(prefix, start_offset))
            if after:
                i = max(i, bisect.bisect_right(keys, after))
                if after_is_prefix:
                    i = self._skip_prefix(keys, i, after)
            count = 0
            last: tuple[str, bool] = ("", False)
            while i < n:
                key = keys[i]
                if not key.startswith(prefix) or (end_offset and key >= end_offset):
                    break
                if count >= max_results:
                    next_token = base64.urlsafe_b64encode(json.dumps(list(last)).encode()).decode()
                    break
                if delimiter:
                    j = key.find(delimiter, len(prefix))
                    if j >= 0:
                        sub = key[: j + len(delimiter)]
                        prefixes.append(sub)
                        if trailing and sub in b.objects:
                            items.append(self._object_json(bucket, b.objects[sub]))
                        count += 1
                        last = (sub, True)
                        i = self._skip_prefix(keys, i, sub)
                        continue
                items.append(self._object_json(bucket, b.objects[key]))
                count += 1
                last = (key, False)
                i += 1
        doc: dict[str, Any] = {"kind": "storage#objects"}
        if items:
            doc["items"] = items
        if prefixes:
            doc["prefixes"] = prefixes
        if next_token:
            doc["nextPageToken"] = next_token
        self._send_json(200, doc)

    @staticmethod
    def _skip_prefix(keys: list[str], i: int, prefix: str) -> int:
        i = bisect.bisect_right(keys, prefix + "\U0010ffff", i)
        while i < len(keys) and keys[i].startswith(prefix):
            i += 1
        return i

    def _object_compose(self, bucket: str, dest: str, q: dict[str, str], body: bytearray) -> None:
        self.state.count("object.compose")
        req = self._json_body(body)
        sources = req.get("sourceObjects") or []
        if not isinstance(sources, list) or not sources:
            raise _bad_request("You must provide at least one source component.")
        if len(sources) > _MAX_COMPOSE_SOURCES:
            raise _bad_request(
                f"The number of source components provided ({len(sources)}) exceeds the maximum "
                f"({_MAX_COMPOSE_SOURCES})."
            )
        dest_meta = req.get("destination") or {}
        pre = self._pre_from_query(q)
        with self.state.lock:
            b = self.state.bucket(bucket)
            _check_write_preconditions(b.objects.get(dest), pre)
            picked: list[_Object] = []
            for src in sources:
                sname = src.get("name")
                obj = b.objects.get(sname) if isinstance(sname, str) else None
                gen = _parse_int(str(src["generation"]) if src.get("generation") is not None else None, "generation")
                if obj is None or (gen is not None and gen != obj.generation):
                    raise _not_found_object(bucket, str(sname))
                spre = (src.get("objectPreconditions") or {}).get("ifGenerationMatch")
                if spre is not None and int(spre) != obj.generation:
                    raise _precondition_failed(f"source {sname} ifGenerationMatch={spre}")
                picked.append(obj)
            components = sum(o.component_count or 1 for o in picked)
            if components > _MAX_COMPONENT_COUNT:
                raise _bad_request(f"The resulting object would have {components} components (max 1024).")
            first = picked[0]
        # Concatenate and checksum outside the lock; data buffers are immutable.
        data = b"".join(o.data for o in picked)
        crc = _crc32c(data)
        with self.state.lock:
            obj = self.state.commit(
                bucket, dest, data,
                crc=crc, md5=None,
                content_type=dest_meta.get("contentType") or first.content_type,
                metadata=dest_meta.get("metadata") or {},
                extra={k: dest_meta[k] for k in _WRITABLE_FIELDS if k in dest_meta},
                pre=pre, component_count=components,
                xml_etag=f'"{crc:08x}-{components}"',
            )
            doc = self._object_json(bucket, obj)
        self._send_json(200, doc)

    def _object_rewrite(
        self, src_bucket: str, src_name: str, dst_bucket: str, dst_name: str, q: dict[str, str], body: bytearray
    ) -> None:
        self.state.count("object.rewrite")
        dest_meta = self._json_body(body)
        pre = self._pre_from_query(q)
        src_pre: dict[str, int] = {}
        for key in ("ifSourceGenerationMatch", "ifSourceGenerationNotMatch",
                    "ifSourceMetagenerationMatch", "ifSourceMetagenerationNotMatch"):
            value = _parse_int(q.get(key), key)
            if value is not None:
                src_pre["if" + key[len("ifSource"):]] = value
        with self.state.lock:
            src = self._lookup(src_bucket, src_name, {"generation": q.get("sourceGeneration", "")})
            _check_write_preconditions(src, src_pre)
            obj = self.state.commit(
                dst_bucket, dst_name, src.data,
                crc=src.crc32c, md5=src.md5,
                content_type=dest_meta.get("contentType") or src.content_type,
                metadata=dest_meta.get("metadata") if "metadata" in dest_meta else src.metadata,
                extra={k: dest_meta.get(k, src.extra.get(k)) for k in _WRITABLE_FIELDS
                       if k in dest_meta or k in src.extra},
                pre=pre, component_count=src.component_count, xml_etag=src.xml_etag,
            )
            doc = {
                "kind": "storage#rewriteResponse",
                "totalBytesRewritten": str(obj.size),
                "objectSize": str(obj.size),
                "done": True,
                "resource": self._object_json(dst_bucket, obj),
            }
        self._send_json(200, doc)

    def _object_move(self, bucket: str, src_name: str, dst_name: str, q: dict[str, str]) -> None:
        """Atomic same-bucket move (``objects.move``, which gcsfs uses for ``mv``)."""
        self.state.count("object.move")
        pre = self._pre_from_query(q)
        src_pre: dict[str, int] = {}
        for key in ("ifSourceGenerationMatch", "ifSourceGenerationNotMatch",
                    "ifSourceMetagenerationMatch", "ifSourceMetagenerationNotMatch"):
            value = _parse_int(q.get(key), key)
            if value is not None:
                src_pre["if" + key[len("ifSource"):]] = value
        with self.state.lock:
            src = self._lookup(bucket, src_name, {})
            _check_write_preconditions(src, src_pre)
            obj = self.state.commit(
                bucket, dst_name, src.data, crc=src.crc32c, md5=src.md5, content_type=src.content_type,
                metadata=src.metadata, extra=dict(src.extra), pre=pre, component_count=src.component_count,
                xml_etag=src.xml_etag,
            )
            self.state.buckets[bucket].remove(src_name)
            doc = self._object_json(bucket, obj)
        self._send_json(200, doc)

    # -- uploads -----------------------------------------------------------------
    def _upload_api(self, method: str, segs: list[str], q: dict[str, str], body: bytearray) -> None:
        if len(segs) != 3 or segs[0] != "b" or segs[2] != "o":
            raise _HTTPError(404, "Not found", "notFound")
        bucket = segs[1]
        upload_type = q.get("uploadType", "")
        # A chunk for an existing session: GCS takes it by PUT, and gcsfs sends it by POST.
        if method in ("PUT", "POST") and "upload_id" in q:
            return self._resumable_put(q["upload_id"], body)
        if method == "POST":
            if upload_type == "media":
                return self._upload_media(bucket, q, body)
            if upload_type == "multipart":
                return self._upload_multipart(bucket, q, body)
            if upload_type == "resumable":
                return self._resumable_init(bucket, q, body)
            raise _bad_request(f"Unsupported uploadType {upload_type!r}")
        if method == "DELETE" and "upload_id" in q:
            return self._resumable_cancel(q["upload_id"])
        raise _bad_request(f"Unsupported upload request {method} uploadType={upload_type!r}")

    def _expected_hashes(self, meta: Mapping[str, Any]) -> dict[str, bytes]:
        expected: dict[str, bytes] = {}
        if meta.get("crc32c"):
            expected["crc32c"] = _decode_b64_hash(str(meta["crc32c"]), "crc32c")
        if meta.get("md5Hash"):
            expected["md5"] = _decode_b64_hash(str(meta["md5Hash"]), "md5Hash")
        header = _parse_goog_hash(self.headers.get_all("x-goog-hash") or [])
        expected.update({k: v for k, v in header.items() if k in ("crc32c", "md5")})
        if self.headers.get("Content-MD5"):
            expected["md5"] = _decode_b64_hash(self.headers["Content-MD5"], "Content-MD5")
        return expected

    def _store_upload(
        self,
        bucket: str,
        name: str,
        data: _Bytes,
        meta: Mapping[str, Any],
        pre: Mapping[str, int],
        expected: Mapping[str, bytes],
        content_type: str,
        also_expected: Optional[Mapping[str, bytes]] = None,
    ) -> _Object:
        """Hash (outside the lock), verify, then commit an uploaded object."""
        if not name:
            raise _bad_request("Object name is required", "InvalidArgument")
        crc = _crc32c(data)
        md5 = hashlib.md5(data).digest()
        _verify_hashes(expected, crc, md5)
        if also_expected:
            _verify_hashes(also_expected, crc, md5)
        metadata = meta.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise _bad_request("metadata must be an object")
        with self.state.lock:
            return self.state.commit(
                bucket, name, data,
                crc=crc, md5=md5,
                content_type=meta.get("contentType") or content_type,
                metadata={str(k): str(v) for k, v in metadata.items() if v is not None},
                extra={k: meta[k] for k in _WRITABLE_FIELDS if k in meta},
                pre=pre,
            )

    def _check_bucket_and_pre(self, bucket: str, name: str, pre: Mapping[str, int]) -> None:
        with self.state.lock:
            b = self.state.bucket(bucket)
            _check_write_preconditions(b.objects.get(name), pre)

    def _upload_media(self, bucket: str, q: dict[str, str], body: bytearray) -> None:
        self.state.count("object.upload.media")
        name = q.get("name", "")
        pre = self._pre_from_query(q)
        self._check_bucket_and_pre(bucket, name, pre)
        obj = self._store_upload(
            bucket, name, memoryview(body).toreadonly(), {}, pre, self._expected_hashes({}),
            self.headers.get("Content-Type", "application/octet-stream"),
        )
        with self.state.lock:
            doc = self._object_json(bucket, obj)
        self._send_json(200, doc)

    def _upload_multipart(self, bucket: str, q: dict[str, str], body: bytearray) -> None:
        self.state.count("object.upload.multipart")
        meta_raw, data, data_type = self._split_multipart(body)
        meta = self._json_body(meta_raw)
        name = meta.get("name") or q.get("name", "")
        pre = self._pre_from_query(q)
        self._check_bucket_and_pre(bucket, name, pre)
        obj = self._store_upload(
            bucket, name, data, meta, pre, self._expected_hashes(meta),
            data_type or "application/octet-stream",
        )
        with self.state.lock:
            doc = self._object_json(bucket, obj)
        self._send_json(200, doc)

    def _split_multipart(self, body: bytearray) -> tuple[memoryview, memoryview, str]:
        """Split a two-part multipart/related body into (json, data, data content type).

        Done by hand with ``bytearray.find`` so the data part is a zero-copy view.
        Line ends may be CRLF (RFC 2046, google-cloud-storage) or bare LF (apitools,
        so gcloud storage and gsutil, whose ``email.generator`` writes ``\\n``); the
        first delimiter line decides which, and the same is used throughout so a
        payload ending in ``\\r`` is never cut short. The boundary parameter may be
        quoted with ``"`` or (apitools) ``'``.
        """
        ctype = self.headers.get("Content-Type", "")
        m = _BOUNDARY_RE.search(ctype)
        if not ctype.lower().startswith("multipart/related") or m is None:
            raise _bad_request("Multipart upload needs a multipart/related Content-Type with a boundary")
        boundary = next(g for g in m.groups() if g is not None)
        delim = b"--" + boundary.encode("latin-1")
        view = memoryview(body).toreadonly()
        first = body.find(delim)
        if first < 0 or (first > 0 and body[first - 1:first] != b"\n"):
            raise _bad_request("Malformed multipart body: no boundary")
        after = first + len(delim)
        if body[after:after + 2] == b"\r\n":
            eol = b"\r\n"
        elif body[after:after + 1] == b"\n":
            eol = b"\n"
        else:
            raise _bad_request("Malformed multipart body: boundary line not terminated")

        def part_at(pos: int) -> tuple[int, str]:
            # ``pos`` points just after a delimiter line; returns (payload start, content-type).
            hdr_end = body.find(eol + eol, pos - len(eol))
            if hdr_end < 0:
                raise _bad_request("Malformed multipart body: part headers not terminated")
            part_type = ""
            for line in bytes(body[pos:hdr_end]).decode("latin-1").split(eol.decode("ascii")):
                key, _, value = line.partition(":")
                if key.strip().lower() == "content-type":
                    part_type = value.strip()
            return hdr_end + 2 * len(eol), part_type

        json_start, _ = part_at(after + len(eol))
        json_end = body.find(eol + delim, json_start)
        if json_end < 0:
            raise _bad_request("Malformed multipart body: missing second part")
        data_start, data_type = part_at(json_end + len(eol) + len(delim) + len(eol))
        data_end = body.rfind(eol + delim + b"--")
        if data_end < data_start:
            raise _bad_request("Malformed multipart body: missing closing boundary")
        return view[json_start:json_end], view[data_start:data_end], data_type

    def _resumable_init(self, bucket: str, q: dict[str, str], body: bytearray) -> None:
        self.state.count("object.upload.resumable.init")
        meta = self._json_body(body)
        name = meta.get("name") or q.get("name", "")
        if not name:
            raise _bad_request("Object name is required")
        pre = self._pre_from_query(q)
        self._check_bucket_and_pre(bucket, name, pre)
        metadata = meta.get("metadata") or {}
        sess = _Resumable(
            upload_id=uuid.uuid4().hex,
            bucket=bucket,
            name=name,
            content_type=meta.get("contentType")
            or self.headers.get("X-Upload-Content-Type")
            or "application/octet-stream",
            metadata={str(k): str(v) for k, v in metadata.items() if v is not None},
            extra={k: meta[k] for k in _WRITABLE_FIELDS if k in meta},
            pre=pre,
            expected=self._expected_hashes(meta),
            total=_parse_int(self.headers.get("X-Upload-Content-Length"), "X-Upload-Content-Length"),
        )
        with self.state.lock:
            self.state.sessions[sess.upload_id] = sess
        location = (
            f"http://{self._host()}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
            f"?uploadType=resumable&name={quote(name, safe='')}&upload_id={sess.upload_id}"
        )
        self._send(200, b"", {"Location": location, "X-GUploader-UploadID": sess.upload_id})

    def _resumable_cancel(self, upload_id: str) -> None:
        self.state.count("object.upload.resumable.cancel")
        with self.state.lock:
            if self.state.sessions.pop(upload_id, None) is None:
                raise _HTTPError(404, f"No such upload session: {upload_id}", "notFound")
        self._send(499)

    def _resumable_put(self, upload_id: str, body: bytearray) -> None:
        with self.state.lock:
            sess = self.state.sessions.get(upload_id)
        if sess is None:
            self.state.count("object.upload.resumable.chunk")
            raise _HTTPError(404, f"No such upload session: {upload_id}", "notFound")
        crange = self.headers.get("Content-Range", "")
        m = _CONTENT_RANGE_RE.match(crange) if crange else None
        if crange and m is None:
            raise _bad_request(f"Invalid Content-Range {crange!r}")
        is_query = m is not None and m.group(1) is None and not body
        self.state.count("object.upload.resumable.status" if is_query else "object.upload.resumable.chunk")
        # One lock per session: requests on the same session are serialised, others are not.
        with sess.lock:
            if sess.failed is not None:
                raise sess.failed
            if sess.result is not None:
                with self.state.lock:
                    doc = self._object_json(sess.bucket, sess.result)
                return self._send_json(200, doc)
            if m is None:
                # No Content-Range: the whole object in one request.
                first, last, total = 0, len(body) - 1, len(body)
            else:
                total = None if m.group(3) == "*" else int(m.group(3))
                if m.group(1) is None:
                    first, last = sess.persisted, sess.persisted - 1
                    if body:
                        raise _bad_request("Content-Range 'bytes */N' must have an empty body")
                else:
                    first, last = int(m.group(1)), int(m.group(2))
                    if last < first or last - first + 1 != len(body):
                        raise _bad_request(
                            f"Content-Range {crange!r} does not match the body length {len(body)}"
                        )
            if total is not None:
                if sess.total is not None and total != sess.total:
                    raise _bad_request(f"Total size {total} differs from the earlier {sess.total}")
                if last + 1 > total:
                    raise _bad_request(f"Content-Range {crange!r} goes past the total size")
            if first > sess.persisted:
                raise _bad_request(
                    f"Invalid request. According to the Content-Range header, the upload offset is "
                    f"{first} byte(s), which exceeds already uploaded size of {sess.persisted} byte(s)."
                )
            # A re-sent chunk overlaps bytes already persisted: skip them, as GCS does.
            skip = sess.persisted - first
            if skip < len(body):
                sess.chunks.append(memoryview(body).toreadonly()[skip:])
                sess.persisted += len(body) - skip
            if total is not None:
                sess.total = total
            if sess.total is not None and sess.persisted >= sess.total and (m is None or total is not None):
                if sess.persisted > sess.total:
                    raise _bad_request("More bytes were uploaded than the declared total size")
                return self._resumable_finalize(sess)
            headers = {}
            if sess.persisted > 0:
                headers["Range"] = f"bytes=0-{sess.persisted - 1}"
            self._send(308, b"", headers)

    def _resumable_finalize(self, sess: _Resumable) -> None:
        if len(sess.chunks) == 1:
            data: _Bytes = sess.chunks[0]
        else:
            data = b"".join(sess.chunks)
        # Both the metadata sent at initiation and the final chunk's x-goog-hash must hold.
        final_hashes = self._expected_hashes({})
        meta = {"metadata": sess.metadata, "contentType": sess.content_type, **sess.extra}
        try:
            obj = self._store_upload(
                sess.bucket, sess.name, data, meta, sess.pre, sess.expected, sess.content_type,
                also_expected=final_hashes,
            )
        except _HTTPError as err:
            if err.status in (400, 412):
                sess.failed = err
                sess.chunks = []
            raise
        sess.result = obj
        sess.chunks = []
        with self.state.lock:
            doc = self._object_json(sess.bucket, obj)
        self._send_json(200, doc)

    # -- XML API -----------------------------------------------------------------
    def _xml_api(self, method: str, bucket: str, key: str, q: dict[str, str], body: bytearray) -> None:
        if not bucket:
            raise _HTTPError(400, "A bucket name is required", "invalid", "InvalidBucketName")
        if not key:
            if method == "GET" and "uploads" in q:
                return self._mpu_list_uploads(bucket, q)
            raise _HTTPError(501, f"{method} on an XML bucket URL is not implemented", "notImplemented", "NotImplemented")
        if method == "POST" and "uploads" in q:
            return self._mpu_initiate(bucket, key)
        if "uploadId" in q:
            upload_id = q["uploadId"]
            if method == "PUT" and "partNumber" in q:
                return self._mpu_part(bucket, key, upload_id, q["partNumber"], body)
            if method == "POST":
                return self._mpu_complete(bucket, key, upload_id, body)
            if method == "DELETE":
                return self._mpu_abort(bucket, key, upload_id)
            if method == "GET":
                return self._mpu_list_parts(bucket, key, upload_id)
        if method in ("GET", "HEAD"):
            if method == "HEAD":
                self.state.count("xml.head")
                with self.state.lock:
                    obj = self._lookup(bucket, key, q)
                    _check_preconditions(obj, self._pre_from_headers(), read=True)
                return self._send(200, obj.data, self._media_headers(obj), obj.content_type)
            return self._object_media(bucket, key, q, xml=True)
        if method == "PUT":
            return self._xml_put(bucket, key, body)
        if method == "DELETE":
            return self._object_delete(bucket, key, q, xml=True)
        raise _HTTPError(501, f"{method} is not implemented for XML object URLs", "notImplemented", "NotImplemented")

    def _xml_meta_headers(self) -> dict[str, str]:
        return {
            k[len("x-goog-meta-"):]: v
            for k, v in self.headers.items()
            if k.lower().startswith("x-goog-meta-")
        }

    def _xml_put(self, bucket: str, key: str, body: bytearray) -> None:
        self.state.count("xml.put")
        pre = self._pre_from_headers()
        self._check_bucket_and_pre(bucket, key, pre)
        meta = {"metadata": self._xml_meta_headers()}
        obj = self._store_upload(
            bucket, key, memoryview(body).toreadonly(), meta, pre, self._expected_hashes({}),
            self.headers.get("Content-Type", "application/octet-stream"),
        )
        headers = self._media_headers(obj)
        self._send(200, b"", {k: headers[k] for k in ("ETag", "X-Goog-Generation", "X-Goog-Hash")})

    def _mpu(self, bucket: str, key: str, upload_id: str) -> _MPU:
        b = self.state.bucket(bucket)
        mpu = b.uploads.get(upload_id)
        if mpu is None or mpu.key != key:
            raise _HTTPError(
                404, "The requested upload was not found.", "notFound", "NoSuchUpload"
            )
        return mpu

    def _mpu_initiate(self, bucket: str, key: str) -> None:
        self.state.count("xml.mpu.initiate")
        pre = self._pre_from_headers()
        extra = {}
        for header, field_name in (
            ("Cache-Control", "cacheControl"),
            ("Content-Disposition", "contentDisposition"),
            ("Content-Encoding", "contentEncoding"),
            ("Content-Language", "contentLanguage"),
        ):
            if self.headers.get(header):
                extra[field_name] = self.headers[header]
        with self.state.lock:
            b = self.state.bucket(bucket)
            _check_write_preconditions(b.objects.get(key), pre)
            mpu = _MPU(
                upload_id=uuid.uuid4().hex + uuid.uuid4().hex,
                key=key,
                initiated=time.time(),
                seq=self.state.next_seq(),
                content_type=self.headers.get("Content-Type") or "application/octet-stream",
                metadata=self._xml_meta_headers(),
                extra=extra,
                pre=pre,
            )
            b.uploads[mpu.upload_id] = mpu
        doc = (
            f"<InitiateMultipartUploadResult xmlns='{_S3_NS}'>"
            f"<Bucket>{_xml_escape(bucket)}</Bucket><Key>{_xml_escape(key)}</Key>"
            f"<UploadId>{mpu.upload_id}</UploadId></InitiateMultipartUploadResult>"
        )
        self._send_xml(200, doc)

    def _mpu_part(self, bucket: str, key: str, upload_id: str, part_number: str, body: bytearray) -> None:
        self.state.count("xml.mpu.part")
        number = _parse_int(part_number, "partNumber")
        if number is None or not 1 <= number <= 10_000:
            raise _bad_request(f"partNumber must be between 1 and 10000, got {part_number!r}")
        with self.state.lock:
            self._mpu(bucket, key, upload_id)
        data = memoryview(body).toreadonly()
        crc = _crc32c(data)
        md5 = hashlib.md5(data).digest()
        _verify_hashes(self._expected_hashes({}), crc, md5)
        part = _Part(data=data, crc32c=crc, md5=md5, modified=time.time())
        with self.state.lock:
            # Re-check: the upload may have been aborted while we hashed.
            self._mpu(bucket, key, upload_id).parts[number] = part
        self._send(200, b"", {"ETag": part.etag, "x-goog-hash": f"crc32c={_crc_b64(crc)},md5={_b64(md5)}"})

    def _mpu_complete(self, bucket: str, key: str, upload_id: str, body: bytearray) -> None:
        self.state.count("xml.mpu.complete")
        try:
            root = ElementTree.fromstring(bytes(body))
        except ElementTree.ParseError:
            raise _bad_request("The XML you provided was not well-formed.", "MalformedXML") from None
        wanted: list[tuple[int, str]] = []
        for part in root:
            if _strip_ns(part.tag) != "Part":
                continue
            fields = {_strip_ns(child.tag): (child.text or "").strip() for child in part}
            number = _parse_int(fields.get("PartNumber"), "PartNumber")
            if number is None:
                raise _bad_request("Each Part needs a PartNumber", "MalformedXML")
            wanted.append((number, fields.get("ETag", "").strip('"')))
        if not wanted:
            raise _bad_request("The XML you provided did not list any parts.", "MalformedXML")
        numbers = [n for n, _ in wanted]
        if any(a >= b for a, b in zip(numbers, numbers[1:])):
            raise _bad_request("The list of parts was not in ascending order.", "InvalidPartOrder")
        pre_header = self._pre_from_headers()
        with self.state.lock:
            mpu = self._mpu(bucket, key, upload_id)
            pre = {**mpu.pre, **pre_header}
            _check_write_preconditions(self.state.buckets[bucket].objects.get(key), pre)
            parts: list[_Part] = []
            for index, (number, etag) in enumerate(wanted):
                part = mpu.parts.get(number)
                if part is None or (etag and etag != part.md5.hex()):
                    raise _bad_request(
                        f"One or more of the specified parts could not be found (part {number}).",
                        "InvalidPart",
                    )
                if index < len(wanted) - 1 and len(part.data) < self.state.min_part_size:
                    raise _bad_request(
                        f"Part {number} is {len(part.data)} bytes; every part but the last must be "
                        f"at least {self.state.min_part_size} bytes.",
                        "EntityTooSmall",
                    )
                parts.append(part)
        data = parts[0].data if len(parts) == 1 else b"".join(p.data for p in parts)
        crc = _crc32c(data)
        etag = f'"{hashlib.md5(b"".join(p.md5 for p in parts)).hexdigest()}-{len(parts)}"'
        with self.state.lock:
            b = self.state.bucket(bucket)
            if b.uploads.get(upload_id) is not mpu:
                raise _HTTPError(404, "The requested upload was not found.", "notFound", "NoSuchUpload")
            obj = self.state.commit(
                bucket, key, data,
                crc=crc, md5=None,  # GCS: MPU objects have a CRC32C but no MD5
                content_type=mpu.content_type, metadata=mpu.metadata, extra=mpu.extra,
                pre=pre, xml_etag=etag,
            )
            del b.uploads[upload_id]
        doc = (
            f"<CompleteMultipartUploadResult xmlns='{_S3_NS}'>"
            f"<Location>http://{_xml_escape(self._host())}/{_xml_escape(quote(bucket))}/{_xml_escape(quote(key))}"
            f"</Location><Bucket>{_xml_escape(bucket)}</Bucket><Key>{_xml_escape(key)}</Key>"
            f"<ETag>{_xml_escape(etag)}</ETag></CompleteMultipartUploadResult>"
        )
        self._send_xml(200, doc, {"x-goog-generation": str(obj.generation), "x-goog-hash": f"crc32c={_crc_b64(crc)}"})

    def _mpu_abort(self, bucket: str, key: str, upload_id: str) -> None:
        self.state.count("xml.mpu.abort")
        with self.state.lock:
            self._mpu(bucket, key, upload_id)
            del self.state.buckets[bucket].uploads[upload_id]
        self._send(204)

    def _mpu_list_parts(self, bucket: str, key: str, upload_id: str) -> None:
        self.state.count("xml.mpu.list_parts")
        with self.state.lock:
            mpu = self._mpu(bucket, key, upload_id)
            parts = sorted(mpu.parts.items())
        rows = "".join(
            f"<Part><PartNumber>{n}</PartNumber><LastModified>{_rfc3339(p.modified)}</LastModified>"
            f"<ETag>{_xml_escape(p.etag)}</ETag><Size>{len(p.data)}</Size></Part>"
            for n, p in parts
        )
        doc = (
            f"<ListPartsResult xmlns='{_S3_NS}'><Bucket>{_xml_escape(bucket)}</Bucket>"
            f"<Key>{_xml_escape(key)}</Key><UploadId>{upload_id}</UploadId>"
            f"<StorageClass>STANDARD</StorageClass><PartNumberMarker>0</PartNumberMarker>"
            f"<NextPartNumberMarker>{parts[-1][0] if parts else 0}</NextPartNumberMarker>"
            f"<MaxParts>10000</MaxParts><IsTruncated>false</IsTruncated>{rows}</ListPartsResult>"
        )
        self._send_xml(200, doc)

    def _mpu_list_uploads(self, bucket: str, q: dict[str, str]) -> None:
        self.state.count("xml.mpu.list_uploads")
        prefix = q.get("prefix", "")
        key_marker = q.get("key-marker", "")
        id_marker = q.get("upload-id-marker", "")
        max_uploads = max(1, min(_parse_int(q.get("max-uploads"), "max-uploads") or 1000, 1000))
        with self.state.lock:
            b = self.state.bucket(bucket)
            uploads = sorted(
                (u for u in b.uploads.values() if u.key.startswith(prefix)),
                key=lambda u: (u.key, u.seq),
            )
        if key_marker:
            if id_marker:
                marker_seq = next((u.seq for u in uploads if u.upload_id == id_marker), -1)
                uploads = [u for u in uploads if (u.key, u.seq) > (key_marker, marker_seq)]
            else:
                uploads = [u for u in uploads if u.key > key_marker]
        truncated = len(uploads) > max_uploads
        page = uploads[:max_uploads]
        rows = "".join(
            f"<Upload><Key>{_xml_escape(u.key)}</Key><UploadId>{u.upload_id}</UploadId>"
            f"<StorageClass>STANDARD</StorageClass><Initiated>{_rfc3339(u.initiated)}</Initiated></Upload>"
            for u in page
        )
        nxt = ""
        if truncated:
            nxt = (
                f"<NextKeyMarker>{_xml_escape(page[-1].key)}</NextKeyMarker>"
                f"<NextUploadIdMarker>{page[-1].upload_id}</NextUploadIdMarker>"
            )
        doc = (
            f"<ListMultipartUploadsResult xmlns='{_S3_NS}'><Bucket>{_xml_escape(bucket)}</Bucket>"
            f"<KeyMarker>{_xml_escape(key_marker)}</KeyMarker><UploadIdMarker>{_xml_escape(id_marker)}</UploadIdMarker>"
            f"{nxt}<Prefix>{_xml_escape(prefix)}</Prefix><MaxUploads>{max_uploads}</MaxUploads>"
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{rows}</ListMultipartUploadsResult>"
        )
        self._send_xml(200, doc)


# --------------------------------------------------------------------------- server
class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], state: _State, verbose: bool) -> None:
        self.state = state
        self.verbose = verbose
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def close_connections(self) -> None:
        """Shut down kept-alive connections so nothing is served after stop()."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.verbose:
            super().handle_error(request, client_address)


class GCSEmulator:
    """In-memory GCS (JSON + XML API) server on ``host:port`` (0 picks a free port).

    ``min_part_size`` is the smallest allowed XML multipart part other than the
    last one (5 MiB on real GCS); tests of small uploads may lower it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        min_part_size: int = 5 * 1024 * 1024,
        verbose: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self._verbose = verbose
        self._state = _State(min_part_size)
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def endpoint(self) -> str:
        """``http://HOST:PORT``; use it as ``STORAGE_EMULATOR_HOST`` or ``api_endpoint``."""
        if self._server is None:
            raise RuntimeError("GCSEmulator is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise RuntimeError("GCSEmulator is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def request_counts(self) -> collections.Counter[str]:
        """A snapshot of how many requests each operation (e.g. ``xml.mpu.part``) got."""
        with self._state.counts_lock:
            return collections.Counter(self._state.counts)

    @contextlib.contextmanager
    def record(self) -> Iterator[list[RecordedRequest]]:
        """Record every request received inside the ``with`` block into the yielded list."""
        recording: list[RecordedRequest] = []
        with self._state.counts_lock:
            self._state.recordings.append(recording)
        try:
            yield recording
        finally:
            with self._state.counts_lock:
                self._state.recordings = [r for r in self._state.recordings if r is not recording]

    def start(self) -> "GCSEmulator":
        """Bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            return self
        self._server = _Server((self._host, self._port), self._state, self._verbose)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"gcs-emulator-{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (for the command line)."""
        if self._server is None:
            self._server = _Server((self._host, self._port), self._state, self._verbose)
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._server.server_close()

    def stop(self) -> None:
        """Stop serving and drop open connections. The stored data is kept until reset()."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def reset(self) -> None:
        """Drop every bucket, object, upload session and request count."""
        self._state.reset()

    def __enter__(self) -> "GCSEmulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def gcs_client(endpoint: str, project: str = "test-project", *, pool_size: int = 64) -> Any:
    """A ``google.cloud.storage.Client`` for ``endpoint`` with anonymous credentials.

    The requests pool holds ``pool_size`` connections so 32+ threads can share
    the client without "connection pool is full" churn.
    """
    import requests
    from google.auth.credentials import AnonymousCredentials
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud import storage

    credentials = AnonymousCredentials()
    session = AuthorizedSession(credentials)
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return storage.Client(
        project=project,
        credentials=credentials,
        _http=session,
        client_options={"api_endpoint": endpoint},
    )


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: run the emulator in the foreground and print its endpoint."""
    parser = argparse.ArgumentParser(description="In-memory Google Cloud Storage emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4443)
    parser.add_argument("--min-part-size", type=int, default=5 * 1024 * 1024)
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    emu = GCSEmulator(args.host, args.port, min_part_size=args.min_part_size, verbose=args.verbose)
    emu._server = _Server((args.host, args.port), emu._state, args.verbose)
    print(emu.endpoint, flush=True)
    try:
        emu.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
