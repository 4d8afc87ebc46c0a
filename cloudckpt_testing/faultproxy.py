"""A deterministic, fault-injecting HTTP reverse proxy for S3 and GCS test servers.

The proxy sits between a storage client (boto3, google-cloud-storage) and a test
server (moto's S3 server, a GCS emulator). Point the client's endpoint at
``proxy.url``; every request is forwarded to the upstream ``http://127.0.0.1:PORT``
unless a rule says to inject a fault::

    with MotoS3Server() as s3, FaultProxy(s3.endpoint_url, rules=[
        FaultRule("PutObject", fault="status", status=503, count=2),
    ]) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url, ...)

Each request is named by :func:`classify` (``"PutObject"``, ``"gcs.get.media"``...)
and matched against the rules in order. The decision for the k-th request that
matches rule i depends only on ``(seed, i, k)``, so a rerun that sends the same
request sequence injects the same faults. Under concurrency the *set* of faulted
indices is the same, while which concurrent request receives which index follows
arrival order.

Fault kinds (``FaultRule.fault``):

``status``
    Answer with an error status without forwarding. The body matches the API:
    S3 XML ``<Error><Code>SlowDown</Code>...`` or GCS JSON ``rateLimitExceeded``.
``reset_request``
    Read part of the request body, then reset the socket (RST). The upstream
    never sees the request.
``reset_response``
    Forward the request, send the status line, the headers and part of the
    body, then reset the socket.
``stall``
    Hold the request without answering for ``stall_seconds`` or until the proxy
    stops, whichever comes first. After the stall (if the proxy is still running)
    the request is forwarded normally, so a short stall acts as added latency,
    unless the client hung up meanwhile (it timed out): then the request is
    dropped, never reaching the upstream, as a request lost in a stuck path is.
``truncate``
    Forward, send the headers with the full ``Content-Length`` and only part of
    the body, then close the connection cleanly (FIN).
``drop_response``
    Forward the request so the upstream applies it, read the full reply, then
    reset the client connection without any response: "the commit landed but the
    reply was lost".

Throttling (:class:`ThrottleRule`) models S3's per-prefix request-rate limit with
one token bucket per key prefix; requests over the rate get ``503 SlowDown``.

Only the standard library is used. Classification assumes path-style addressing
(``/bucket/key``), which is what clients use against an IP endpoint.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import random
import re
import select
import socket
import struct
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "FAULT_KINDS",
    "S3_OPS",
    "GCS_OPS",
    "FaultRule",
    "ThrottleRule",
    "FaultProxy",
    "ServedRead",
    "classify",
    "is_ranged",
    "object_key",
    "rule_fires",
    "error_response",
]

FAULT_KINDS: frozenset[str] = frozenset(
    {"status", "reset_request", "reset_response", "stall", "truncate", "drop_response"}
)
"""Every value accepted by :attr:`FaultRule.fault`."""

S3_OPS: tuple[str, ...] = (
    "PutObject", "GetObject", "HeadObject", "DeleteObject", "DeleteObjects",
    "ListObjectsV2", "ListObjects", "CreateMultipartUpload", "UploadPart",
    "CompleteMultipartUpload", "AbortMultipartUpload", "ListMultipartUploads",
    "ListParts", "CreateBucket", "HeadBucket",
)  # fmt: skip
"""The S3 operation names :func:`classify` produces (it also returns a few others)."""

GCS_OPS: tuple[str, ...] = (
    "gcs.upload.media", "gcs.upload.multipart", "gcs.upload.resumable.init",
    "gcs.upload.resumable.chunk", "gcs.get.media", "gcs.get.metadata", "gcs.list",
    "gcs.delete", "gcs.compose", "gcs.bucket.get",
    "gcs.xml.mpu.init", "gcs.xml.mpu.part", "gcs.xml.mpu.complete",
    "gcs.xml.mpu.abort", "gcs.xml.list_uploads", "gcs.xml.get",
)  # fmt: skip
"""The GCS operation names :func:`classify` produces (it also returns a few others)."""

_IO_CHUNK = 64 * 1024  # bodies are streamed in pieces of at most this size
_MAX_LINE = 65536  # longest chunk-size or trailer line accepted
# Hop-by-hop headers (RFC 9110 §7.6.1) are per connection and never forwarded.
# Expect is handled here: the proxy answers "100 Continue" itself.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
     "proxy-authorization", "te", "trailer", "upgrade", "expect"}
)  # fmt: skip


# ---------------------------------------------------------------------------
# Classification (pure functions)
# ---------------------------------------------------------------------------


def _lower_headers(headers: Mapping[str, str] | Any) -> dict[str, str]:
    """Lower-case header names; accepts a dict or an ``http.client.HTTPMessage``."""
    items = headers.items() if headers is not None else ()
    return {str(k).lower(): str(v) for k, v in items}


def _query_dict(query: str | Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Parse a raw query string (``"uploads&x=1"``) or pass a mapping through."""
    if not query:
        return {}
    if isinstance(query, str):
        # keep_blank_values: S3 subresources such as ``?uploads`` have no value.
        return parse_qs(query.lstrip("?"), keep_blank_values=True)
    return {str(k): (list(v) if isinstance(v, (list, tuple)) else [str(v)]) for k, v in query.items()}


def is_ranged(headers: Mapping[str, str] | Any) -> bool:
    """True when the request carries a ``Range`` header."""
    return "range" in _lower_headers(headers)


def _is_gcs_xml(h: Mapping[str, str]) -> bool:
    """Whether a path-style request comes from a GCS client (XML API) rather than S3.

    Both APIs use ``/bucket/object`` paths, so only the headers tell them apart:
    boto3 signs with ``AWS4-HMAC-SHA256`` and sends ``x-amz-*``; the Google client
    always sends ``x-goog-api-client``.
    """
    if h.get("authorization", "").startswith("AWS") or any(k.startswith("x-amz-") for k in h):
        return False
    return any(k.startswith("x-goog-") for k in h) or "gcloud-python" in h.get("user-agent", "")


_GCS_JSON_PREFIXES = ("/storage/v1/", "/upload/storage/v1/", "/download/storage/v1/", "/batch/")


def _classify_gcs_json(method: str, path: str, q: Mapping[str, list[str]]) -> str:
    """Name a GCS JSON API request (``/storage/v1/...``, ``/upload/...``, ``/download/...``)."""
    if path.startswith("/batch/"):
        return "gcs.batch"
    if path.startswith("/upload/storage/v1/"):
        upload_type = (q.get("uploadType") or [""])[0]
        if "upload_id" in q:
            if method == "DELETE":
                return "gcs.upload.resumable.cancel"
            # The chunk PUTs and the status query (``Content-Range: bytes */N``).
            return "gcs.upload.resumable.chunk"
        if upload_type in ("media", "multipart"):
            return f"gcs.upload.{upload_type}"
        if upload_type == "resumable":
            return "gcs.upload.resumable.init"
        return "gcs.upload.other"
    if path.startswith("/download/storage/v1/"):
        return "gcs.get.media"
    rest = path[len("/storage/v1/"):].strip("/")
    parts = rest.split("/")
    if parts == ["b"]:
        return "gcs.bucket.insert" if method == "POST" else "gcs.bucket.list"
    if len(parts) == 2 and parts[0] == "b":
        return {"GET": "gcs.bucket.get", "DELETE": "gcs.bucket.delete"}.get(method, "gcs.bucket.patch")
    if len(parts) == 3 and parts[0] == "b" and parts[2] == "o":
        return "gcs.list" if method == "GET" else "gcs.insert"
    if len(parts) >= 4 and parts[0] == "b" and parts[2] == "o":
        # Object names are percent-encoded (``a%2Fb``) so suffixes are reliable.
        if parts[-1] == "compose" and method == "POST":
            return "gcs.compose"
        if "rewriteTo" in parts[3:]:
            return "gcs.rewrite"
        if "copyTo" in parts[3:]:
            return "gcs.copy"
        if method == "GET":
            return "gcs.get.media" if (q.get("alt") or [""])[0] == "media" else "gcs.get.metadata"
        if method == "DELETE":
            return "gcs.delete"
        if method in ("PATCH", "PUT"):
            return "gcs.patch"
    return "gcs.other"


def _classify_gcs_xml(method: str, has_key: bool, q: Mapping[str, list[str]]) -> str:
    """Name a GCS XML API request (path-style ``/bucket/object``)."""
    if not has_key:
        if method == "GET" and "uploads" in q:
            return "gcs.xml.list_uploads"
        return "gcs.xml.list" if method == "GET" else "gcs.xml.other"
    if method == "POST" and "uploads" in q:
        return "gcs.xml.mpu.init"
    if "uploadId" in q:
        if method == "PUT" and "partNumber" in q:
            return "gcs.xml.mpu.part"
        return {"POST": "gcs.xml.mpu.complete", "DELETE": "gcs.xml.mpu.abort",
                "GET": "gcs.xml.list_parts"}.get(method, "gcs.xml.other")  # fmt: skip
    return {"GET": "gcs.xml.get", "PUT": "gcs.xml.put", "HEAD": "gcs.xml.head",
            "DELETE": "gcs.xml.delete"}.get(method, "gcs.xml.other")  # fmt: skip


def _classify_s3(method: str, has_key: bool, q: Mapping[str, list[str]], h: Mapping[str, str]) -> str:
    """Name an S3 request (path-style ``/bucket/key``)."""
    if not has_key:
        if method == "HEAD":
            return "HeadBucket"
        if method == "PUT":
            # Bucket subresources (``?versioning``, ``?policy``...) are not CreateBucket.
            return "CreateBucket" if not (set(q) - {"x-id"}) else "PutBucketSubresource"
        if method == "DELETE":
            return "DeleteBucket" if not (set(q) - {"x-id"}) else "DeleteBucketSubresource"
        if method == "POST" and "delete" in q:
            return "DeleteObjects"
        if method == "GET":
            if "uploads" in q:
                return "ListMultipartUploads"
            if (q.get("list-type") or [""])[0] == "2":
                return "ListObjectsV2"
            if "versions" in q:
                return "ListObjectVersions"
            if "location" in q:
                return "GetBucketLocation"
            return "ListObjects"
        return "Other"
    if method == "PUT":
        if "partNumber" in q and "uploadId" in q:
            return "UploadPartCopy" if "x-amz-copy-source" in h else "UploadPart"
        if "x-amz-copy-source" in h:
            return "CopyObject"
        if set(q) - {"x-id"}:  # ?tagging, ?acl, ...
            return "PutObjectSubresource"
        return "PutObject"
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        return "Other"
    if method == "GET":
        if "uploadId" in q:
            return "ListParts"
        if set(q) - {"x-id", "versionId", "partNumber"} and not any(k.startswith("response-") for k in q):
            return "GetObjectSubresource"  # ?tagging, ?acl, ?attributes, ...
        return "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    return "Other"


def classify(
    method: str,
    path: str,
    query: str | Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | Any = None,
    *,
    api: str | None = None,
) -> str:
    """Name the storage operation of one HTTP request.

    ``path`` is the request path (a query after ``?`` is accepted too), ``query``
    the raw query string or a mapping, ``headers`` any mapping or ``HTTPMessage``.
    Path-style requests are S3 or GCS XML API: ``api`` (``"s3"``/``"gcs"``) says
    which when the upstream is known; with None the headers decide.
    S3 requests get boto3 operation names (``"PutObject"``), GCS requests
    ``"gcs.*"`` names (see :data:`S3_OPS`, :data:`GCS_OPS`). Requests not
    recognised give ``"Other"`` (S3) or ``"gcs.other"`` / ``"gcs.xml.other"``.
    Whether a request is ranged is separate: see :func:`is_ranged`.
    """
    method = method.upper()
    if path.startswith(("http://", "https://")):  # absolute-form request target
        split = urlsplit(path)
        path, query = split.path or "/", (split.query if query is None else query)
    if "?" in path:
        path, _, raw = path.partition("?")
        query = raw if not query else query
    q = _query_dict(query)
    h = _lower_headers(headers)
    if path.startswith(_GCS_JSON_PREFIXES):
        return _classify_gcs_json(method, path, q)
    if path.startswith("/moto-api"):
        return "moto-api"
    stripped = path.lstrip("/")
    if not stripped:
        return "ListBuckets" if method == "GET" else "Other"
    has_key = bool(stripped.partition("/")[2])
    if api == "gcs" or (api is None and _is_gcs_xml(h)):
        return _classify_gcs_xml(method, has_key, q)
    return _classify_s3(method, has_key, q, h)


def object_key(path: str, query: str | Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(bucket, key)`` addressed by a request; ``key`` is ``""`` for bucket-level calls.

    Works for path-style S3/GCS-XML (``/bucket/key``) and for the GCS JSON API,
    where uploads carry the object name in ``?name=`` and other calls in the
    percent-encoded path segment after ``/o/``.
    """
    path = path.partition("?")[0]
    q = _query_dict(query)
    if path.startswith(_GCS_JSON_PREFIXES):
        m = re.match(r"^/(?:upload/|download/)?storage/v1/b/([^/]+)(?:/o(?:/([^/]+))?)?", path)
        if not m:
            return "", ""
        name = m.group(2) or (q.get("name") or [""])[0]
        return unquote(m.group(1)), unquote(name)
    bucket, _, key = path.lstrip("/").partition("/")
    return unquote(bucket), unquote(key)


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultRule:
    """One fault-injection rule; the first rule that fires for a request wins.

    Matching: ``op`` (exact name, compiled regex ``fullmatch``, or ``None`` for
    any), ``method``, ``path_regex`` (``re.search`` on the request target, path
    and query, so GCS upload names in ``?name=`` match too) and ``ranged``
    (``True``/``False`` to require the presence/absence of a ``Range`` header).

    Firing, for the k-th request (k = 0, 1, ...) that matches this rule:
    never while ``k < skip``; with ``count`` only while ``k < skip + count``; with
    ``rate`` with that probability, drawn from a RNG seeded by
    ``(proxy seed, rule index, k)``; with neither, always. Every matching
    request advances the rule's k, even when an earlier rule fired for it.

    ``status``/``retry_after`` shape ``fault="status"``; ``stall_seconds`` shapes
    ``"stall"``; ``fraction`` is the share of the body read (``reset_request``)
    or sent (``reset_response``, ``truncate``) before the connection is cut.
    """

    op: str | re.Pattern[str] | None
    _: dataclasses.KW_ONLY
    fault: str
    method: str | None = None
    status: int = 503
    rate: float | None = None
    count: int | None = None
    skip: int = 0
    stall_seconds: float = 30.0
    path_regex: str | None = None
    ranged: bool | None = None
    retry_after: float | None = None
    fraction: float = 0.5

    def __post_init__(self) -> None:
        """Reject nonsense early, where the test is written, not mid-run."""
        if self.fault not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {sorted(FAULT_KINDS)}")
        if self.rate is not None and not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if self.skip < 0:
            raise ValueError(f"skip must be >= 0, got {self.skip}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.fault == "status" and not 400 <= self.status <= 599:
            raise ValueError(f"status must be a 4xx/5xx code, got {self.status}")
        if self.path_regex is not None:
            re.compile(self.path_regex)

    def matches(self, op: str, method: str, target: str, ranged: bool) -> bool:
        """Whether this rule's filter selects a request (ignores count/rate/skip)."""
        if self.op is not None:
            if isinstance(self.op, re.Pattern):
                if not self.op.fullmatch(op):
                    return False
            elif self.op != op:
                return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.ranged is not None and self.ranged != ranged:
            return False
        if self.path_regex is not None and not re.search(self.path_regex, target):
            return False
        return True


def rule_fires(rule: FaultRule, seed: int, rule_index: int, k: int) -> bool:
    """Decide whether ``rule`` fires for its k-th matching request.

    Pure: the result depends only on the arguments. The RNG is seeded with a
    string, which ``random`` hashes with SHA-512, unlike ``hash()`` that is
    salted per process.
    """
    if k < rule.skip:
        return False
    if rule.count is not None and k >= rule.skip + rule.count:
        return False
    if rule.rate is None:
        return True
    return random.Random(f"cloudckpt.faultproxy:{seed}:{rule_index}:{k}").random() < rule.rate


_DEFAULT_THROTTLED_OPS = ("PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload")


@dataclass(frozen=True)
class ThrottleRule:
    """Per-prefix request-rate limit, modelled on S3's 3,500 writes/s per prefix.

    Requests whose op is in ``ops`` take a token from the bucket of their key
    prefix: the bucket name plus the key's first ``prefix_depth`` ``/``-separated
    components, or ``prefix_fn(key)`` when given. Buckets refill at
    ``per_prefix_rps`` and hold at most ``burst`` tokens (default: one second's
    worth, at least 1). A request that finds no token gets ``status`` (503 with
    an S3 ``SlowDown`` XML body, or the GCS JSON error for GCS ops).
    """

    ops: tuple[str, ...] = _DEFAULT_THROTTLED_OPS
    per_prefix_rps: float = 50.0
    prefix_depth: int = 2
    prefix_fn: Callable[[str], str] | None = None
    burst: float | None = None
    status: int = 503

    def __post_init__(self) -> None:
        """Validate the limits."""
        if self.per_prefix_rps <= 0:
            raise ValueError(f"per_prefix_rps must be > 0, got {self.per_prefix_rps}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        if self.prefix_depth < 0:
            raise ValueError(f"prefix_depth must be >= 0, got {self.prefix_depth}")

    @property
    def capacity(self) -> float:
        """Tokens a full bucket holds."""
        return self.burst if self.burst is not None else max(1.0, self.per_prefix_rps)

    def prefix_of(self, bucket: str, key: str) -> str:
        """The throttling prefix of an object: ``"bucket/a/b"`` for depth 2."""
        if self.prefix_fn is not None:
            return f"{bucket}/{self.prefix_fn(key)}"
        parts = key.split("/")
        # The last component is the object's own name, not a prefix; a key with
        # fewer components than prefix_depth shares its parent's bucket.
        return "/".join([bucket, *parts[: min(self.prefix_depth, max(len(parts) - 1, 0))]])


# ---------------------------------------------------------------------------
# Error bodies
# ---------------------------------------------------------------------------

_S3_CODES = {
    400: ("BadRequest", "Bad Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    409: ("OperationAborted", "A conflicting conditional operation is in progress."),
    412: ("PreconditionFailed", "At least one of the preconditions you specified did not hold."),
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "Not implemented."),
    502: ("BadGateway", "Bad Gateway."),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "Gateway Timeout."),
}
_GCS_REASONS = {
    400: ("badRequest", "global", "Bad Request"),
    403: ("forbidden", "global", "Forbidden"),
    404: ("notFound", "global", "Not Found"),
    408: ("requestTimeout", "global", "Request Timeout"),
    412: ("conditionNotMet", "global", "Precondition Failed"),
    429: ("rateLimitExceeded", "usageLimits",
          "The rate of change requests to the object exceeds the rate limit. Please reduce the rate of create, update, and delete requests."),
    500: ("backendError", "global", "Backend Error"),
    502: ("backendError", "global", "Bad Gateway"),
    503: ("backendError", "global", "Service Unavailable"),
    504: ("backendError", "global", "Gateway Timeout"),
}  # fmt: skip


def error_response(op: str, status: int) -> tuple[str, bytes]:
    """``(content_type, body)`` of an injected error in the format of ``op``'s API.

    S3 and the GCS XML API get ``<Error><Code>..</Code>..</Error>`` (503 and 429
    say ``SlowDown``, which botocore treats as throttling); the GCS JSON API gets
    ``{"error": {"code", "message", "errors": [{"reason", "domain"}]}}``.
    """
    if op.startswith("gcs.") and not op.startswith("gcs.xml."):
        reason, domain, message = _GCS_REASONS.get(status, ("backendError", "global", "Injected error"))
        doc = {"error": {"code": status, "message": message,
                         "errors": [{"message": message, "domain": domain, "reason": reason}]}}  # fmt: skip
        return "application/json; charset=UTF-8", json.dumps(doc).encode()
    code, message = _S3_CODES.get(status, ("InternalError", "Injected error."))
    if op.startswith("gcs.xml.") and status == 503:
        code, message = "ServiceUnavailable", "Service Unavailable"
    request_id = uuid.uuid4().hex[:16].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>"
    )
    return "application/xml", body.encode()


# ---------------------------------------------------------------------------
# Body framing helpers (yield (wire_bytes, payload_byte_count))
# ---------------------------------------------------------------------------


def _read_exact(f: Any, n: int) -> Iterator[tuple[bytes, int]]:
    """Yield exactly ``n`` bytes from ``f`` in pieces; a short read is an error."""
    remaining = n
    while remaining > 0:
        data = f.read(min(remaining, _IO_CHUNK))
        if not data:
            raise ConnectionError(f"peer closed with {remaining} of {n} body bytes unread")
        remaining -= len(data)
        yield data, len(data)


def _read_chunked(f: Any) -> Iterator[tuple[bytes, int]]:
    """Yield a chunked body exactly as it is on the wire, chunk framing and trailers included."""
    while True:
        line = f.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise ConnectionError("bad or truncated chunk-size line")
        size = int(line.split(b";", 1)[0].strip() or b"x", 16)
        yield line, 0
        if size == 0:
            while True:  # trailer section, ends with an empty line
                trailer = f.readline(_MAX_LINE)
                if not trailer.endswith(b"\n"):
                    raise ConnectionError("truncated chunked trailer")
                yield trailer, 0
                if trailer in (b"\r\n", b"\n"):
                    return
        yield from _read_exact(f, size)
        crlf = f.readline(_MAX_LINE)
        if crlf not in (b"\r\n", b"\n"):
            raise ConnectionError("missing CRLF after chunk data")
        yield crlf, 0


def _read_to_eof(f: Any) -> Iterator[tuple[bytes, int]]:
    """Yield everything until the peer closes (responses framed by connection close)."""
    while True:
        data = f.read1(_IO_CHUNK)
        if not data:
            return
        yield data, len(data)


def _body_framing(headers: Mapping[str, str]) -> tuple[str, int]:
    """``("chunked", 0)``, ``("length", n)`` or ``("none", 0)`` for lower-cased headers."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return "chunked", 0
    if "content-length" in headers:
        return "length", int(headers["content-length"].split(",")[0].strip())
    return "none", 0


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its proxy and tracks open connections."""

    daemon_threads = True  # a stuck handler must never keep the process alive
    # server_close() would join every handler thread without a timeout; stop()
    # unblocks them by shutting their sockets down instead.
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # bursts of parallel uploads must not get refused

    def __init__(self, addr: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: broken connections are the point of this server."""


class _Handler(BaseHTTPRequestHandler):
    """Per-connection handler: classifies, decides, forwards or injects."""

    protocol_version = "HTTP/1.1"  # keep-alive with the client
    server: _Server

    def setup(self) -> None:
        """Register the connection so stop() can unblock this thread."""
        super().setup()
        self._rst = False
        self._up: http.client.HTTPConnection | None = None
        self.server.proxy._track(self.connection, add=True)

    def finish(self) -> None:
        """Close the connection, with a RST instead of a FIN when a fault asked for one."""
        try:
            super().finish()
        except OSError:
            pass
        self._drop_upstream()
        self.server.proxy._track(self.connection, add=False)
        if self._rst:
            _wait_sent(self.connection)
            try:
                # SO_LINGER on with timeout 0: close() discards the socket and sends RST.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            try:
                self.connection.close()  # shutdown_request() then finds it closed
            except OSError:
                pass

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: tests make thousands of requests."""

    def handle_expect_100(self) -> bool:
        """Defer ``100 Continue`` until the body is actually wanted (see _send_continue)."""
        return True

    # --- dispatch ---------------------------------------------------------

    def _dispatch(self) -> None:
        proxy = self.server.proxy
        self._continue_sent = False
        self._response_started = False
        self._h = _lower_headers(self.headers)
        target = self.path
        path, _, query = target.partition("?")
        op = classify(self.command, path, query, self._h, api=proxy._api)
        ranged = "range" in self._h
        self._op = op
        self._target = target
        try:
            decision = proxy._decide(op, self.command, target, path, query, ranged)
            if decision is None:
                self._forward()
            elif isinstance(decision, ThrottleRule):
                self._drain_request()
                self._send_error(decision.status, None)
            else:
                self._inject(decision)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # Either side broke. If nothing reached the client yet, tell it the
            # upstream failed; either way this connection is done.
            self.close_connection = True
            self._drop_upstream()
            if not self._response_started and not self._rst and not isinstance(exc, _ClientGone):
                try:
                    self._send_error(502, None, close=True)
                except OSError:
                    pass

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _inject(self, rule: FaultRule) -> None:
        kind = rule.fault
        if kind == "status":
            self._drain_request()
            self._send_error(rule.status, rule.retry_after)
        elif kind == "reset_request":
            self._read_part_of_request(rule.fraction)
            self._rst = True
            self.close_connection = True
        elif kind == "stall":
            # Wait before touching the body: the request can then still be
            # forwarded afterwards without buffering it.
            if self.server.proxy._stopping.wait(rule.stall_seconds):
                self.close_connection = True
                return
            # The body (if the client sent it) is read now, so a client that gave up
            # and closed its end shows as end-of-file behind it.
            body = [wire for wire, _ in self._request_pieces()]
            if self._client_hung_up():
                self.close_connection = True
                return
            self._forward(body)
        elif kind == "drop_response":
            resp = self._send_upstream()
            for _ in self._response_pieces(resp):  # read it all: the upstream finished its work
                pass
            self._finish_upstream(resp)
            self._rst = True
            self.close_connection = True
        elif kind in ("reset_response", "truncate"):
            resp = self._send_upstream()
            self._relay_partial(resp, rule.fraction)
            self._drop_upstream()  # the rest of the reply is still on that socket
            self._rst = kind == "reset_response"
            self.close_connection = True

    # --- request side -----------------------------------------------------

    def _send_continue(self) -> None:
        """Send ``100 Continue`` once, if the client asked for it, before reading the body."""
        if not self._continue_sent and self._h.get("expect", "").lower() == "100-continue":
            self._continue_sent = True
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _request_pieces(self) -> Iterator[tuple[bytes, int]]:
        """The request body as wire pieces, in its own framing."""
        framing, n = _body_framing(self._h)
        if framing == "none" or (framing == "length" and n == 0):
            return iter(())
        self._send_continue()
        pieces = _read_chunked(self.rfile) if framing == "chunked" else _read_exact(self.rfile, n)
        return _client_errors(pieces)

    def _drain_request(self) -> None:
        """Read and discard the body so the connection stays usable for the next request."""
        for _ in self._request_pieces():
            pass

    def _read_part_of_request(self, fraction: float) -> None:
        """Read about ``fraction`` of the body (at least one piece of a chunked one)."""
        framing, n = _body_framing(self._h)
        target = int(n * fraction) if framing == "length" else 1
        got = 0
        for _, payload in self._request_pieces():
            got += payload
            if got >= target:
                break

    def _upstream(self) -> http.client.HTTPConnection:
        """This client connection's upstream connection, reconnecting if it went stale."""
        conn = self._up
        if conn is not None and conn.sock is not None:
            # A readable idle keep-alive socket means the upstream closed it (or
            # sent junk): reconnect now instead of failing after streaming the body.
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if readable:
                conn.close()
        if conn is None:
            proxy = self.server.proxy
            conn = http.client.HTTPConnection(proxy._up_host, proxy._up_port, timeout=proxy._upstream_timeout)
            self._up = conn
            proxy._track_upstream(conn, add=True)
        return conn

    def _drop_upstream(self) -> None:
        conn, self._up = getattr(self, "_up", None), None
        if conn is not None:
            conn.close()
            self.server.proxy._track_upstream(conn, add=False)

    def _client_hung_up(self) -> bool:
        """True if the client closed or reset its connection (checked without consuming data)."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _send_upstream(self, body: Sequence[bytes] | None = None) -> http.client.HTTPResponse:
        """Forward the request line, headers and body (``body``: wire pieces already read); return the response."""
        proxy = self.server.proxy
        conn = self._upstream()
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        connection_tokens = {t.strip().lower() for t in self._h.get("connection", "").split(",")}
        has_host = False
        for name, value in self.headers.items():
            lname = name.lower()
            if lname in _HOP_BY_HOP or lname in connection_tokens:
                continue
            if lname == "host":
                if proxy._rewrite_host:
                    continue
                has_host = True
            conn.putheader(name, value)
        if proxy._rewrite_host or not has_host:
            conn.putheader("Host", proxy._up_netloc)
        conn.endheaders()
        proxy._count_forwarded(self._op)
        for wire in body if body is not None else (w for w, _ in self._request_pieces()):
            conn.send(wire)
        return conn.getresponse()

    # --- response side ----------------------------------------------------

    def _response_framing(self, resp: http.client.HTTPResponse) -> tuple[str, int]:
        if self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
            return "empty", 0
        framing, n = _body_framing(_lower_headers(resp.msg))
        return ("eof", 0) if framing == "none" else (framing, n)

    def _response_pieces(self, resp: http.client.HTTPResponse) -> Iterator[tuple[bytes, int]]:
        framing, n = self._response_framing(resp)
        if framing == "chunked":
            return _read_chunked(resp.fp)
        if framing == "length":
            return _read_exact(resp.fp, n)
        if framing == "eof":
            return _read_to_eof(resp.fp)
        return iter(())

    def _finish_upstream(self, resp: http.client.HTTPResponse) -> None:
        """Mark the upstream reply consumed; http.client refuses the next request otherwise."""
        if resp.will_close or self._response_framing(resp)[0] == "eof":
            self._drop_upstream()
        else:
            resp.close()  # closes only the response's file; the socket stays for keep-alive

    def _response_head(self, resp: http.client.HTTPResponse, close: bool) -> bytes:
        lines = [f"{self.protocol_version} {resp.status} {resp.reason}\r\n"]
        for name, value in resp.msg.items():
            if name.lower() not in _HOP_BY_HOP:
                lines.append(f"{name}: {value}\r\n")
        if close:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _forward(self, body: Sequence[bytes] | None = None) -> None:
        """Forward the request and stream the complete reply back."""
        resp = self._send_upstream(body)
        framing, _ = self._response_framing(resp)
        # Without a length or chunking the body ends when the upstream closes;
        # mirror that to the client rather than re-framing it.
        close = self.close_connection or framing == "eof"
        self._response_started = True
        self._write(self._response_head(resp, close))
        served = 0
        for wire, n in _upstream_errors(self._response_pieces(resp)):
            self._write(wire)
            served += n
        self._finish_upstream(resp)
        self.server.proxy._count_served(self._op, self.command, self._target, self._h.get("range"), served)
        if close:
            self.close_connection = True

    def _relay_partial(self, resp: http.client.HTTPResponse, fraction: float) -> None:
        """Send the head (with the full Content-Length) and about ``fraction`` of the body."""
        framing, n = self._response_framing(resp)
        self._response_started = True
        self._write(self._response_head(resp, close=True))
        if framing == "empty":
            return
        if framing == "length":
            limit = int(n * fraction)
            sent = 0
            for wire, _ in _upstream_errors(self._response_pieces(resp)):
                if sent >= limit:
                    break
                wire = wire[: limit - sent]
                self._write(wire)
                sent += len(wire)
            return
        # Chunked or close-delimited: the total is unknown, so send part of the
        # first piece that carries payload (plus any framing before it).
        for wire, payload in _upstream_errors(self._response_pieces(resp)):
            if payload:
                self._write(wire[: max(1, int(len(wire) * fraction))])
                return
            self._write(wire)

    def _send_error(self, status: int, retry_after: float | None, close: bool = False) -> None:
        """Answer with an injected error whose body matches the request's API."""
        content_type, body = error_response(self._op, status)
        reason = http.client.responses.get(status, "Error")
        lines = [f"{self.protocol_version} {status} {reason}\r\n",
                 f"Content-Type: {content_type}\r\n",
                 f"Content-Length: {len(body)}\r\n",
                 f"Date: {self.date_time_string()}\r\n",
                 "Server: cloudckpt-faultproxy\r\n"]  # fmt: skip
        if retry_after is not None:
            lines.append(f"Retry-After: {retry_after:g}\r\n")
        if close or self.close_connection:
            lines.append("Connection: close\r\n")
            self.close_connection = True
        lines.append("\r\n")
        self._response_started = True
        self._write("".join(lines).encode("latin-1") + (b"" if self.command == "HEAD" else body))

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise _ClientGone(str(exc)) from exc


class _ClientGone(ConnectionError):
    """The client side of the connection failed (so no 502 can be sent to it)."""


def _client_errors(pieces: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    """Re-raise read failures of the client's request body as _ClientGone."""
    try:
        yield from pieces
    except (OSError, ValueError) as exc:
        raise _ClientGone(str(exc)) from exc


def _upstream_errors(pieces: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    """Upstream body failures after the head went out: the client can only be cut off."""
    try:
        yield from pieces
    except (OSError, ValueError) as exc:
        raise _ClientGone(f"upstream body failed: {exc}") from exc


def _wait_sent(sock: socket.socket, timeout: float = 1.0) -> None:
    """Wait until the kernel has delivered what we wrote, so a RST cannot discard it.

    A close with SO_LINGER 0 throws away unsent data; reset_response promises
    the client the head and part of the body first. TIOCOUTQ (Linux) is the
    number of bytes not yet acknowledged by the peer.
    """
    try:
        import fcntl
        import termios
    except ImportError:  # not Linux/Unix: RST at once and accept the risk
        return
    deadline = time.monotonic() + timeout
    buf = bytearray(4)
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
        except (OSError, ValueError):
            return
        if struct.unpack("i", bytes(buf))[0] == 0:
            return
        time.sleep(0.002)


# ---------------------------------------------------------------------------
# Public proxy
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedRead:
    """One GET the proxy relayed in full: its op, object, ``Range`` header (None: whole) and body bytes."""

    op: str
    bucket: str
    key: str
    range: str | None
    nbytes: int

    def span(self) -> tuple[int, int] | None:
        """``(first, end)`` byte offsets of a ``bytes=a-b`` range read, else None."""
        m = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", self.range or "")
        if m is None:
            return None
        first = int(m.group(1))
        return first, first + self.nbytes


class FaultProxy:
    """Fault-injecting reverse proxy in front of one upstream test server.

    ``upstream`` is ``http://HOST:PORT``. The client's ``Host`` header is kept
    (moto routes on it, and emulators build resumable-upload ``Location``
    headers from it, which must point back at the proxy) unless
    ``rewrite_host=True``. ``seed`` drives :func:`rule_fires`. ``api``
    (``"s3"`` or ``"gcs"``) names the upstream's API for :func:`classify`; by
    default each request's headers decide (a GCS XML request without
    ``x-goog-*`` headers would then be named as S3).
    """

    def __init__(
        self,
        upstream: str,
        *,
        rules: Sequence[FaultRule] = (),
        throttle: ThrottleRule | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        rewrite_host: bool = False,
        api: str | None = None,
        upstream_timeout: float = 120.0,
    ) -> None:
        split = urlsplit(upstream)
        if split.scheme != "http" or not split.hostname:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._up_host = split.hostname
        self._up_port = split.port or 80
        self._up_netloc = split.netloc
        if api not in (None, "s3", "gcs"):
            raise ValueError(f"api must be 's3', 'gcs' or None, got {api!r}")
        self._api = api
        self._rewrite_host = rewrite_host
        self._upstream_timeout = upstream_timeout
        self._seed = seed
        self._bind = (host, port)
        self._lock = threading.Lock()
        self._rules: tuple[FaultRule, ...] = tuple(rules)
        self._rule_counts = [0] * len(self._rules)
        self._throttle = throttle
        self._buckets: dict[str, tuple[float, float]] = {}  # prefix -> (tokens, last refill time)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._upconns: set[http.client.HTTPConnection] = set()
        self.reset_stats()

    # --- lifecycle --------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` to give the client as its endpoint."""
        if self._server is None:
            raise RuntimeError("FaultProxy is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._server is None:
            raise RuntimeError("FaultProxy is not running; call start() first")
        return int(self._server.server_address[1])

    def start(self) -> FaultProxy:
        """Bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(self._bind, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"faultproxy:{self.port}", daemon=True,
        )  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut every open connection; returns promptly even with stalled requests."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes stalled handlers
        server.shutdown()
        server.server_close()
        with self._lock:  # after this, _track() shuts late arrivals down itself
            conns, upconns = list(self._conns), list(self._upconns)
        # Handlers may be blocked reading from the client (idle keep-alive) or
        # from the upstream; shutting the sockets down unblocks them.
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for conn in upconns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        """Start the proxy (``with FaultProxy(...) as proxy:``)."""
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        """Stop the proxy."""
        self.stop()

    # --- configuration ----------------------------------------------------

    @property
    def rules(self) -> tuple[FaultRule, ...]:
        """The active fault rules."""
        return self._rules

    def set_rules(self, rules: Sequence[FaultRule]) -> None:
        """Replace the rules; every rule's match counter k starts again at 0."""
        with self._lock:
            self._rules = tuple(rules)
            self._rule_counts = [0] * len(self._rules)

    def set_throttle(self, throttle: ThrottleRule | None) -> None:
        """Replace (or remove, with None) the throttle; token buckets start full."""
        with self._lock:
            self._throttle = throttle
            self._buckets = {}

    def clear(self) -> None:
        """Remove every rule and the throttle, so all requests pass; stats are kept."""
        self.set_rules(())
        self.set_throttle(None)

    # --- stats ------------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero all counters."""
        with self._lock:
            self._requests: dict[str, int] = defaultdict(int)
            self._forwarded: dict[str, int] = defaultdict(int)
            self._faults: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            self._throttled: dict[str, int] = defaultdict(int)
            self._injected = 0
            self._served: dict[str, int] = defaultdict(int)
            self._reads: list[ServedRead] = []

    @property
    def injected(self) -> int:
        """Total faults injected, throttling responses included."""
        with self._lock:
            return self._injected

    def stats(self) -> dict[str, Any]:
        """Snapshot of the counters.

        ``requests``: op -> requests received; ``forwarded``: op -> requests
        sent upstream (a stalled, truncated or dropped request counts as
        forwarded too); ``faults``: op -> {fault kind or ``"throttle"`` -> n};
        ``throttled``: prefix -> 503s from the throttle; ``injected``: total.
        """
        with self._lock:
            return {
                "requests": dict(self._requests),
                "forwarded": dict(self._forwarded),
                "faults": {op: dict(kinds) for op, kinds in self._faults.items()},
                "throttled": dict(self._throttled),
                "injected": self._injected,
                "served_bytes": dict(self._served),
            }

    @property
    def served_bytes(self) -> int:
        """Response body bytes the proxy relayed in full to clients (all ops), since the last reset."""
        with self._lock:
            return sum(self._served.values())

    def reads(self) -> list[ServedRead]:
        """Every GET relayed in full since the last reset, in completion order (see :class:`ServedRead`)."""
        with self._lock:
            return list(self._reads)

    # --- internals used by the handler -------------------------------------

    def _track(self, sock: socket.socket, *, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(sock)
            late = add and self._stopping.is_set()
        if late:  # accepted just before stop(): do not serve it
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _track_upstream(self, conn: http.client.HTTPConnection, *, add: bool) -> None:
        with self._lock:
            (self._upconns.add if add else self._upconns.discard)(conn)

    def _count_served(self, op: str, method: str, target: str, range_header: str | None, nbytes: int) -> None:
        with self._lock:
            self._served[op] += nbytes
            if method == "GET":
                path, _, query = target.partition("?")
                bucket, key = object_key(path, query)
                self._reads.append(ServedRead(op, bucket, key, range_header, nbytes))

    def _count_forwarded(self, op: str) -> None:
        with self._lock:
            self._forwarded[op] += 1

    def _take_token(self, prefix: str, throttle: ThrottleRule) -> bool:
        """Token-bucket check for one prefix; caller holds the lock."""
        now = time.monotonic()
        tokens, last = self._buckets.get(prefix, (throttle.capacity, now))
        tokens = min(throttle.capacity, tokens + (now - last) * throttle.per_prefix_rps)
        ok = tokens >= 1.0
        self._buckets[prefix] = (tokens - 1.0 if ok else tokens, now)
        return ok

    def _decide(
        self, op: str, method: str, target: str, path: str, query: str, ranged: bool
    ) -> FaultRule | ThrottleRule | None:
        """Count the request and pick the throttle, a firing rule, or None (forward)."""
        with self._lock:
            self._requests[op] += 1
            throttle = self._throttle
            if throttle is not None and op in throttle.ops:
                bucket, key = object_key(path, query)
                prefix = throttle.prefix_of(bucket, key)
                if not self._take_token(prefix, throttle):
                    self._throttled[prefix] += 1
                    self._faults[op]["throttle"] += 1
                    self._injected += 1
                    return throttle
            fired: FaultRule | None = None
            for i, rule in enumerate(self._rules):
                if not rule.matches(op, method, target, ranged):
                    continue
                k = self._rule_counts[i]
                self._rule_counts[i] = k + 1
                if fired is None and rule_fires(rule, self._seed, i, k):
                    fired = rule
            if fired is not None:
                self._faults[op][fired.fault] += 1
                self._injected += 1
            return fired
