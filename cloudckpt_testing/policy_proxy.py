"""A recording HTTP proxy in front of moto that behaves like a locked-down S3 bucket.

Enterprise buckets refuse requests that lack headers their policies demand. moto
enforces none of that, so this proxy does, before forwarding to moto::

    policy = BucketPolicy(required_sse="aws:kms", required_kms_key_id=KEY, require_request_payer=True)
    with PolicyProxy(moto.endpoint_url, policy) as proxy:
        cloudckpt.save(sd, f"s3://{bucket}/ck", endpoint_url=proxy.url, server_side_encryption="aws:kms", ...)
        assert all(r.headers["x-amz-request-payer"] == "requester" for r in proxy.requests)

What it enforces (each part only when the policy asks for it), with S3's answers:

* Object-creating requests (PutObject, CreateMultipartUpload, CopyObject) must
  carry ``x-amz-server-side-encryption: <required_sse>`` and, for KMS,
  ``x-amz-server-side-encryption-aws-kms-key-id: <required_kms_key_id>``
  (403 AccessDenied). UploadPart and CompleteMultipartUpload carry no SSE
  headers on real S3: the upload's encryption is fixed when it is created.
* SSE-C: every request that reads or writes object bytes (Put, Get, Head,
  CreateMultipartUpload, UploadPart, CompleteMultipartUpload, copies) must carry
  the algorithm, the key and its MD5 (400 InvalidRequest). The headers are
  stripped before moto sees them, so moto's own SSE-C handling does not matter.
* Every request must carry ``x-amz-request-payer: requester`` (403) and/or
  ``x-amz-expected-bucket-owner: <owner>`` (403 when missing or different).
* ``credentials_valid(access_key_id, session_token)`` rejects expired keys with
  400 ExpiredToken, as S3 does.
* ``express=True``: an S3 Express One Zone directory bucket. ``GET /b?session``
  (CreateSession) is answered here with session credentials; every other
  request must carry ``x-amz-s3session-token``; Content-MD5 is refused
  (directory buckets support no MD5); prefixes of ListObjectsV2 and
  ListMultipartUploads must end in '/'. ``bucket_map`` maps the directory bucket
  name onto a bucket moto accepts.
* ``shuffle_listings=True``: ListObjectsV2 answers list their entries in random
  order, as directory buckets do.

Every request is recorded (:attr:`PolicyProxy.requests`): operation, method,
path, query, lower-cased headers, whether it was denied. Only the standard
library is used; bodies are buffered, so keep test objects small.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import random
import re
import secrets
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping, Optional
from urllib.parse import parse_qs, quote, urlsplit

from cloudckpt_testing.faultproxy import classify

__all__ = ["BucketPolicy", "ContainerCredentialsServer", "PolicyProxy", "RecordedRequest", "OBJECT_IO_OPS",
           "OBJECT_CREATE_OPS", "requests_by_op"]

#: Requests that create an object (where S3 checks the SSE headers).
OBJECT_CREATE_OPS = frozenset({"PutObject", "CreateMultipartUpload", "CopyObject"})
#: Requests that read or write object bytes (where SSE-C keys are needed).
OBJECT_IO_OPS = OBJECT_CREATE_OPS | {"GetObject", "HeadObject", "UploadPart", "UploadPartCopy",
                                     "CompleteMultipartUpload", "ListParts"}
_SSE_C_HEADERS = ("x-amz-server-side-encryption-customer-algorithm", "x-amz-server-side-encryption-customer-key",
                  "x-amz-server-side-encryption-customer-key-md5")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect",
                         "transfer-encoding"})
_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the proxy received it."""

    op: str
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # names lower-cased
    denied: Optional[str] = None  # the error code sent instead of forwarding

    @property
    def access_key_id(self) -> Optional[str]:
        """The access key id of the request's signature, if it was signed."""
        m = _CREDENTIAL_RE.search(self.headers.get("authorization", ""))
        return m.group(1) if m else None


@dataclass
class BucketPolicy:
    """What the locked-down bucket demands (every field off by default)."""

    required_sse: Optional[str] = None
    required_kms_key_id: Optional[str] = None
    require_sse_c: bool = False
    require_request_payer: bool = False
    expected_owner: Optional[str] = None
    credentials_valid: Optional[Callable[[str, Optional[str]], bool]] = None
    express: bool = False
    shuffle_listings: bool = False
    bucket_map: Mapping[str, str] = field(default_factory=dict)


def _error(code: str, message: str) -> bytes:
    return (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>policy-proxy</RequestId></Error>").encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """No access log."""

    def setup(self) -> None:
        super().setup()
        self._up: Optional[http.client.HTTPConnection] = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._up is not None:
                self._up.close()

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _dispatch(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        headers = {k.lower(): v for k, v in self.headers.items()}
        op = "CreateSession" if self.command == "GET" and "session" in query else classify(
            self.command, url.path, url.query, headers, api="s3")
        denied = proxy._check(op, url.path, query, headers)
        proxy._record(RecordedRequest(op, self.command, url.path, query, headers,
                                      denied[1] if denied else None))
        if denied:
            self._reply(denied[0], {"content-type": "application/xml"}, _error(denied[1], denied[2]))
            return
        if op == "CreateSession":
            self._reply(200, {"content-type": "application/xml"}, proxy._session_xml())
            return
        status, out_headers, data = self._forward(proxy, url, headers, body)
        if op == "ListObjectsV2" and proxy.policy.shuffle_listings and status == 200:
            data = _shuffled(data, proxy._rng)
        self._reply(status, out_headers, data, head=self.command == "HEAD")

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _dispatch

    def _forward(self, proxy: "PolicyProxy", url: Any, headers: dict[str, str],
                 body: bytes) -> tuple[int, dict[str, str], bytes]:
        path = proxy._upstream_path(url.path)
        target = path + (f"?{url.query}" if url.query else "")
        send = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP and k not in _SSE_C_HEADERS
                and not k.startswith("x-amz-copy-source-server-side-encryption-customer")}
        send["content-length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have been closed
            if self._up is None:
                self._up = http.client.HTTPConnection(proxy._upstream_host, proxy._upstream_port, timeout=60)
            try:
                self._up.request(self.command, target, body=body, headers=send)
                resp = self._up.getresponse()
                data = resp.read()
                out = {k.lower(): v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
                if resp.will_close:
                    self._up.close()
                    self._up = None
                return resp.status, out, data
            except (OSError, http.client.HTTPException):
                self._up.close()
                self._up = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _reply(self, status: int, headers: Mapping[str, str], data: bytes, head: bool = False) -> None:
        self.send_response_only(status)
        for k, v in headers.items():
            if k not in ("content-length", "date", "server"):
                self.send_header(k, v)
        length = headers.get("content-length", str(len(data))) if head else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if not head:
            self.wfile.write(data)


def _shuffled(data: bytes, rng: random.Random) -> bytes:
    """A ListObjectsV2 answer with its Contents and CommonPrefixes in random order."""
    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return data
    ElementTree.register_namespace("", ns[1:-1])
    for tag in ("Contents", "CommonPrefixes"):
        items = root.findall(ns + tag) or root.findall(tag)
        for item in items:
            root.remove(item)
        rng.shuffle(items)
        for item in items:
            root.append(item)
    return ElementTree.tostring(root, xml_declaration=True, encoding="UTF-8")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], proxy: "PolicyProxy") -> None:
        self.proxy = proxy
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up is not an error of the proxy


class PolicyProxy:
    """The locked-down bucket: ``url`` for clients, forwarding to ``upstream`` (moto)."""

    def __init__(self, upstream: str, policy: Optional[BucketPolicy] = None, *, seed: int = 0) -> None:
        split = urlsplit(upstream)
        self._upstream_host = split.hostname or "127.0.0.1"
        self._upstream_port = split.port or 80
        self.policy = policy or BucketPolicy()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self.session_token = "express-session-" + secrets.token_hex(8)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        assert self._server is not None, "PolicyProxy is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def start(self) -> "PolicyProxy":
        self._server = _Server(("127.0.0.1", 0), self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="policy-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "PolicyProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- policy ----------------------------------------------------------------------
    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _upstream_path(self, path: str) -> str:
        bucket, sep, rest = path.lstrip("/").partition("/")
        return "/" + quote(self.policy.bucket_map.get(bucket, bucket), safe="") + sep + rest

    def _session_xml(self) -> bytes:
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
        return ("<?xml version='1.0' encoding='UTF-8'?><CreateSessionResult xmlns="
                "\"http://s3.amazonaws.com/doc/2006-03-01/\"><Credentials>"
                f"<SessionToken>{self.session_token}</SessionToken><SecretAccessKey>express-secret"
                "</SecretAccessKey><AccessKeyId>EXPRESSSESSIONKEY</AccessKeyId>"
                f"<Expiration>{expires}</Expiration></Credentials></CreateSessionResult>").encode()

    def _check(self, op: str, path: str, query: Mapping[str, str],
               h: Mapping[str, str]) -> Optional[tuple[int, str, str]]:
        """(status, code, message) when the request is refused, else None."""
        p = self.policy
        if p.credentials_valid is not None:
            m = _CREDENTIAL_RE.search(h.get("authorization", ""))
            if m and op != "CreateSession" and not p.express and not p.credentials_valid(
                    m.group(1), h.get("x-amz-security-token")):
                return 400, "ExpiredToken", "The provided token has expired."
        if p.require_request_payer and h.get("x-amz-request-payer") != "requester":
            return 403, "AccessDenied", "Access Denied (requester pays bucket)"
        if p.expected_owner is not None and h.get("x-amz-expected-bucket-owner") != p.expected_owner:
            return 403, "AccessDenied", "Access Denied (expected bucket owner)"
        if p.express:
            if "content-md5" in h:
                return 400, "InvalidRequest", "Content-MD5 is not supported for directory buckets"
            if op != "CreateSession" and h.get("x-amz-s3session-token") != self.session_token:
                return 403, "AccessDenied", "missing or invalid x-amz-s3session-token"
            if op in ("ListObjectsV2", "ListMultipartUploads") and query.get("prefix", "/")[-1:] not in ("/", ""):
                return 400, "InvalidArgument", "Prefixes must end in a delimiter for directory buckets"
        if op in OBJECT_CREATE_OPS and p.required_sse is not None:
            if h.get("x-amz-server-side-encryption") != p.required_sse:
                return 403, "AccessDenied", "Access Denied (bucket policy requires server-side encryption)"
            if p.required_kms_key_id is not None and \
                    h.get("x-amz-server-side-encryption-aws-kms-key-id") != p.required_kms_key_id:
                return 403, "AccessDenied", "Access Denied (bucket policy requires a specific KMS key)"
        if op in OBJECT_IO_OPS and p.require_sse_c:
            if any(not h.get(k) for k in _SSE_C_HEADERS):
                return 400, "InvalidRequest", "The object was stored using a form of SSE-C; provide the key"
            key = base64.b64decode(h["x-amz-server-side-encryption-customer-key"])
            if base64.b64encode(hashlib.md5(key).digest()).decode() != h[_SSE_C_HEADERS[2]]:
                return 400, "InvalidArgument", "The calculated MD5 hash of the key did not match"
        return None


class ContainerCredentialsServer:
    """A local container-credentials endpoint (``AWS_CONTAINER_CREDENTIALS_FULL_URI``).

    Every GET issues a fresh key that expires ``ttl`` seconds later, like ECS,
    EKS Pod Identity and SageMaker do (with hours, not seconds).
    :meth:`valid` tells a :class:`BucketPolicy` whether a key is still good.
    """

    def __init__(self, ttl: float = 20.0) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._issued: dict[str, tuple[str, float]] = {}  # key id -> (token, expiry)
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """The URI to put in ``AWS_CONTAINER_CREDENTIALS_FULL_URI``."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/creds"

    def issued(self) -> dict[str, tuple[str, float]]:
        """Every key issued so far: key id -> (session token, expiry time)."""
        with self._lock:
            return dict(self._issued)

    def issue(self) -> dict[str, str]:
        key = "ASIA" + secrets.token_hex(8).upper()
        token = "tok-" + secrets.token_hex(16)
        expiry = time.time() + self.ttl
        with self._lock:
            self._issued[key] = (token, expiry)
        return {"AccessKeyId": key, "SecretAccessKey": "secret-" + secrets.token_hex(16), "Token": token,
                "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry))}

    def valid(self, key: str, token: Optional[str]) -> bool:
        """True for a key this server issued, with its token, before it expired."""
        with self._lock:
            got = self._issued.get(key)
        return got is not None and got[0] == token and time.time() < got[1]

    def start(self) -> "ContainerCredentialsServer":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                data = json.dumps(outer.issue()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True, name="container-credentials")
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "ContainerCredentialsServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def requests_by_op(requests: list[RecordedRequest]) -> dict[str, list[RecordedRequest]]:
    """Group recorded requests by operation name."""
    out: dict[str, list[RecordedRequest]] = {}
    for r in requests:
        out.setdefault(r.op, []).append(r)
    return out
