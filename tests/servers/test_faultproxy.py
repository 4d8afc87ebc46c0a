"""Tests of cloudckpt_testing.faultproxy against moto's S3 server and a tiny echo server.

Clients that must *see* a fault use ``total_max_attempts=1``: botocore's
``retries={"max_attempts": N}`` counts retries, not attempts, so
``max_attempts=1`` would still retry once and hide a single injected fault.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from cloudckpt_testing.faultproxy import (
    GCS_OPS,
    S3_OPS,
    FaultProxy,
    FaultRule,
    ThrottleRule,
    classify,
    error_response,
    is_ranged,
    object_key,
    rule_fires,
)

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError, HTTPClientError, ReadTimeoutError  # noqa: E402

from cloudckpt_testing.s3 import TEST_CREDENTIALS, MotoS3Server  # noqa: E402

pytestmark = pytest.mark.timeout(60)

S3_HEADERS = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/...", "x-amz-date": "20260101T000000Z"}
GOOG_HEADERS = {"x-goog-api-client": "gl-python/3.11.7 gccl/3.17.1", "User-Agent": "gcloud-python/3.17.1"}


# ---------------------------------------------------------------------------
# classify / pure helpers
# ---------------------------------------------------------------------------

CLASSIFY_CASES: list[tuple[str, str, str, dict[str, str], str]] = [
    # S3 (path-style, as boto3 sends to an IP endpoint)
    ("PUT", "/bkt/a/b.bin", "", S3_HEADERS, "PutObject"),
    ("PUT", "/bkt/a/b.bin", "x-id=PutObject", S3_HEADERS, "PutObject"),
    ("GET", "/bkt/a/b.bin", "", S3_HEADERS, "GetObject"),
    ("GET", "/bkt/a/b.bin", "x-id=GetObject", {**S3_HEADERS, "Range": "bytes=0-9"}, "GetObject"),
    ("HEAD", "/bkt/a/b.bin", "", S3_HEADERS, "HeadObject"),
    ("DELETE", "/bkt/a/b.bin", "x-id=DeleteObject", S3_HEADERS, "DeleteObject"),
    ("POST", "/bkt", "delete", S3_HEADERS, "DeleteObjects"),
    ("GET", "/bkt", "list-type=2&prefix=a%2F", S3_HEADERS, "ListObjectsV2"),
    ("GET", "/bkt", "prefix=a%2F&marker=x", S3_HEADERS, "ListObjects"),
    ("GET", "/bkt/", "", S3_HEADERS, "ListObjects"),
    ("POST", "/bkt/a/b.bin", "uploads", S3_HEADERS, "CreateMultipartUpload"),
    ("PUT", "/bkt/a/b.bin", "partNumber=3&uploadId=xyz", S3_HEADERS, "UploadPart"),
    ("POST", "/bkt/a/b.bin", "uploadId=xyz", S3_HEADERS, "CompleteMultipartUpload"),
    ("DELETE", "/bkt/a/b.bin", "uploadId=xyz", S3_HEADERS, "AbortMultipartUpload"),
    ("GET", "/bkt", "uploads&prefix=a", S3_HEADERS, "ListMultipartUploads"),
    ("GET", "/bkt/a/b.bin", "uploadId=xyz&max-parts=1000", S3_HEADERS, "ListParts"),
    ("PUT", "/bkt", "", S3_HEADERS, "CreateBucket"),
    ("HEAD", "/bkt", "", S3_HEADERS, "HeadBucket"),
    ("HEAD", "/bkt", "", {}, "HeadBucket"),  # headers are optional for S3
    ("PUT", "/bkt/k", "", {**S3_HEADERS, "x-amz-copy-source": "/bkt/j"}, "CopyObject"),
    ("GET", "/", "", S3_HEADERS, "ListBuckets"),
    # GCS JSON API
    ("POST", "/upload/storage/v1/b/bkt/o", "uploadType=media&name=a%2Fb", GOOG_HEADERS, "gcs.upload.media"),
    ("POST", "/upload/storage/v1/b/bkt/o", "uploadType=multipart", GOOG_HEADERS, "gcs.upload.multipart"),
    ("POST", "/upload/storage/v1/b/bkt/o", "uploadType=resumable&name=x", GOOG_HEADERS,
     "gcs.upload.resumable.init"),
    ("PUT", "/upload/storage/v1/b/bkt/o", "uploadType=resumable&upload_id=U1", GOOG_HEADERS,
     "gcs.upload.resumable.chunk"),
    ("GET", "/download/storage/v1/b/bkt/o/a%2Fb", "alt=media", GOOG_HEADERS, "gcs.get.media"),
    ("GET", "/storage/v1/b/bkt/o/a%2Fb", "alt=media&generation=5", {}, "gcs.get.media"),
    ("GET", "/storage/v1/b/bkt/o/a%2Fb", "projection=noAcl", GOOG_HEADERS, "gcs.get.metadata"),
    ("GET", "/storage/v1/b/bkt/o", "prefix=a%2F&delimiter=%2F", GOOG_HEADERS, "gcs.list"),
    ("DELETE", "/storage/v1/b/bkt/o/a%2Fb", "", GOOG_HEADERS, "gcs.delete"),
    ("POST", "/storage/v1/b/bkt/o/a%2Fb/compose", "", GOOG_HEADERS, "gcs.compose"),
    ("GET", "/storage/v1/b/bkt", "projection=noAcl", GOOG_HEADERS, "gcs.bucket.get"),
    # GCS XML API (path-style like S3; told apart by the x-goog-* headers)
    ("POST", "/bkt/a/b.bin", "uploads", GOOG_HEADERS, "gcs.xml.mpu.init"),
    ("PUT", "/bkt/a/b.bin", "partNumber=2&uploadId=U", GOOG_HEADERS, "gcs.xml.mpu.part"),
    ("POST", "/bkt/a/b.bin", "uploadId=U", GOOG_HEADERS, "gcs.xml.mpu.complete"),
    ("DELETE", "/bkt/a/b.bin", "uploadId=U", GOOG_HEADERS, "gcs.xml.mpu.abort"),
    ("GET", "/bkt", "uploads", GOOG_HEADERS, "gcs.xml.list_uploads"),
    ("GET", "/bkt/a/b.bin", "", GOOG_HEADERS, "gcs.xml.get"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "query", "headers", "expected"), CLASSIFY_CASES)
def test_classify(method: str, path: str, query: str, headers: dict[str, str], expected: str) -> None:
    assert classify(method, path, query, headers) == expected


def test_classify_covers_every_documented_name() -> None:
    assert set(S3_OPS) | set(GCS_OPS) <= {case[-1] for case in CLASSIFY_CASES}


def test_classify_accepts_query_in_path_and_mappings() -> None:
    assert classify("PUT", "/bkt/k?partNumber=1&uploadId=u", None, S3_HEADERS) == "UploadPart"
    assert classify("put", "/bkt/k", {"partNumber": "1", "uploadId": ["u"]}, {}) == "UploadPart"
    assert classify("POST", "/bkt/k", {"uploads": ""}, None) == "CreateMultipartUpload"
    msg = http.client.HTTPMessage()
    msg["X-Goog-Api-Client"] = "gccl/3"
    assert classify("GET", "/bkt/k", "", msg) == "gcs.xml.get"


def test_is_ranged() -> None:
    assert is_ranged({"Range": "bytes=0-1"})
    assert is_ranged({"range": "bytes=-5"})
    assert not is_ranged({"Accept": "*/*"})


def test_object_key() -> None:
    assert object_key("/bkt/a/b/c.bin") == ("bkt", "a/b/c.bin")
    assert object_key("/bkt", "list-type=2") == ("bkt", "")
    assert object_key("/bkt/a%20b") == ("bkt", "a b")
    assert object_key("/upload/storage/v1/b/bkt/o", "uploadType=media&name=x%2Fy") == ("bkt", "x/y")
    assert object_key("/storage/v1/b/bkt/o/x%2Fy/compose") == ("bkt", "x/y")
    assert object_key("/download/storage/v1/b/bkt/o/x%2Fy", "alt=media") == ("bkt", "x/y")


def test_throttle_prefix() -> None:
    t = ThrottleRule(prefix_depth=2)
    assert t.prefix_of("bkt", "a/b/c/d.bin") == "bkt/a/b"
    assert t.prefix_of("bkt", "a/b") == "bkt/a"  # the last component is the object name
    assert t.prefix_of("bkt", "top.bin") == "bkt"
    assert ThrottleRule(prefix_fn=lambda k: k[:3]).prefix_of("bkt", "abcdef") == "bkt/abc"


def test_error_bodies_follow_the_api() -> None:
    ctype, body = error_response("PutObject", 503)
    assert ctype == "application/xml" and b"<Code>SlowDown</Code>" in body
    assert b"<Code>InternalError</Code>" in error_response("GetObject", 500)[1]
    assert b"<Code>SlowDown</Code>" in error_response("UploadPart", 429)[1]
    ctype, body = error_response("gcs.get.media", 429)
    doc = json.loads(body)
    assert ctype.startswith("application/json")
    assert doc["error"]["code"] == 429 and doc["error"]["errors"][0]["reason"] == "rateLimitExceeded"
    assert error_response("gcs.xml.mpu.part", 503)[1].startswith(b"<?xml")


def test_rule_fires_semantics() -> None:
    rule = FaultRule("PutObject", fault="status", count=2, skip=1)
    assert [rule_fires(rule, 0, 0, k) for k in range(5)] == [False, True, True, False, False]
    always = FaultRule(None, fault="status")
    assert all(rule_fires(always, 3, 1, k) for k in range(10))
    never = FaultRule(None, fault="status", rate=0.0)
    assert not any(rule_fires(never, 3, 1, k) for k in range(100))
    half = FaultRule(None, fault="status", rate=0.5)
    picks = [k for k in range(200) if rule_fires(half, 0, 0, k)]
    assert 60 < len(picks) < 140
    assert picks == [k for k in range(200) if rule_fires(half, 0, 0, k)]  # pure
    assert picks != [k for k in range(200) if rule_fires(half, 1, 0, k)]  # seed matters
    assert picks != [k for k in range(200) if rule_fires(half, 0, 1, k)]  # rule index matters
    windowed = FaultRule(None, fault="status", rate=1.0, count=3, skip=2)
    assert [k for k in range(10) if rule_fires(windowed, 0, 0, k)] == [2, 3, 4]


def test_rule_validation() -> None:
    with pytest.raises(ValueError):
        FaultRule("PutObject", fault="explode")
    with pytest.raises(ValueError):
        FaultRule("PutObject", fault="status", rate=1.5)
    with pytest.raises(ValueError):
        FaultRule("PutObject", fault="status", status=200)
    with pytest.raises(ValueError):
        ThrottleRule(per_prefix_rps=0)


# ---------------------------------------------------------------------------
# S3 through moto
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        yield server


def make_client(endpoint: str, *, see_faults: bool = True, read_timeout: float = 2.0) -> Any:
    """boto3 client; ``see_faults`` turns retries off so one injected fault surfaces."""
    cfg: dict[str, Any] = {"s3": {"addressing_style": "path"}}
    if see_faults:
        cfg.update(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=2,
                   read_timeout=read_timeout)  # fmt: skip
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
        config=Config(**cfg),
    )


@pytest.fixture
def direct(moto: MotoS3Server) -> Any:
    """Client talking to moto directly: the ground truth of what landed."""
    return make_client(moto.endpoint_url, see_faults=False)


@pytest.fixture
def bucket(direct: Any) -> str:
    name = f"fp-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto: MotoS3Server) -> Iterator[FaultProxy]:
    with FaultProxy(moto.endpoint_url, seed=0) as p:
        yield p


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (429, "SlowDown")])
def test_status_fault(proxy: FaultProxy, bucket: str, status: int, code: str) -> None:
    proxy.set_rules([FaultRule("PutObject", fault="status", status=status, count=1, retry_after=1)])
    client = make_client(proxy.url)
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)
    err = info.value.response
    assert err["Error"]["Code"] == code
    assert err["ResponseMetadata"]["HTTPStatusCode"] == status
    assert err["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
    client.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)  # count=1: the next one passes
    stats = proxy.stats()
    assert stats["faults"] == {"PutObject": {"status": 1}}
    assert stats["forwarded"]["PutObject"] == 1 and stats["requests"]["PutObject"] == 2
    assert proxy.injected == 1


def test_default_retries_recover_from_503(proxy: FaultProxy, bucket: str, direct: Any) -> None:
    direct.put_object(Bucket=bucket, Key="obj", Body=b"payload")
    proxy.set_rules([FaultRule("GetObject", fault="status", status=503, count=2)])
    client = make_client(proxy.url, see_faults=False)
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"payload"
    stats = proxy.stats()
    assert stats["faults"]["GetObject"] == {"status": 2}
    assert stats["forwarded"]["GetObject"] == 1


def test_reset_request_never_reaches_upstream(proxy: FaultProxy, bucket: str, direct: Any) -> None:
    proxy.set_rules([FaultRule("PutObject", fault="reset_request")])
    with pytest.raises(HTTPClientError):
        make_client(proxy.url).put_object(Bucket=bucket, Key="k", Body=b"x" * 300_000)
    assert direct.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    assert proxy.stats()["forwarded"].get("PutObject", 0) == 0


def test_reset_response_breaks_the_body(proxy: FaultProxy, bucket: str, direct: Any) -> None:
    direct.put_object(Bucket=bucket, Key="obj", Body=b"y" * 200_000)
    proxy.set_rules([FaultRule("GetObject", fault="reset_response")])
    resp = make_client(proxy.url).get_object(Bucket=bucket, Key="obj")  # head arrives intact
    assert resp["ContentLength"] == 200_000
    with pytest.raises(HTTPClientError):  # ResponseStreamingError (connection reset)
        resp["Body"].read()


def test_truncate_is_an_incomplete_read(proxy: FaultProxy, bucket: str, direct: Any) -> None:
    direct.put_object(Bucket=bucket, Key="obj", Body=b"z" * 100_000)
    proxy.set_rules([FaultRule("GetObject", fault="truncate", count=1)])
    resp = make_client(proxy.url).get_object(Bucket=bucket, Key="obj")
    with pytest.raises(HTTPClientError, match="IncompleteRead"):
        resp["Body"].read()


def test_truncated_download_is_retried_by_s3transfer(proxy: FaultProxy, bucket: str, direct: Any) -> None:
    data = bytes(range(256)) * 400
    direct.put_object(Bucket=bucket, Key="obj", Body=data)
    proxy.set_rules([FaultRule("GetObject", fault="truncate", count=1)])
    out = io.BytesIO()
    make_client(proxy.url, see_faults=False).download_fileobj(bucket, "obj", out)
    assert out.getvalue() == data
    stats = proxy.stats()
    assert stats["faults"]["GetObject"] == {"truncate": 1} and stats["forwarded"]["GetObject"] == 2


def test_drop_response_applies_the_put(proxy: FaultProxy, bucket: str, direct: Any) -> None:
    proxy.set_rules([FaultRule("PutObject", fault="drop_response")])
    with pytest.raises(HTTPClientError):  # ConnectionClosedError: no reply at all
        make_client(proxy.url).put_object(Bucket=bucket, Key="landed", Body=b"commit")
    # ...but the write happened.
    assert direct.get_object(Bucket=bucket, Key="landed")["Body"].read() == b"commit"
    assert proxy.stats()["faults"]["PutObject"] == {"drop_response": 1}


def test_stall_gives_read_timeout(proxy: FaultProxy, bucket: str) -> None:
    proxy.set_rules([FaultRule("HeadBucket", fault="stall", stall_seconds=30)])
    with pytest.raises(ReadTimeoutError):
        make_client(proxy.url, read_timeout=0.5).head_bucket(Bucket=bucket)


def test_short_stall_then_forwards(proxy: FaultProxy, bucket: str) -> None:
    proxy.set_rules([FaultRule("HeadBucket", fault="stall", stall_seconds=0.05)])
    make_client(proxy.url).head_bucket(Bucket=bucket)
    assert proxy.stats()["forwarded"]["HeadBucket"] == 1


def test_stalled_request_whose_client_gave_up_is_dropped(proxy: FaultProxy, bucket: str, direct: Any) -> None:
    # The client times out and hangs up during the stall: the request must never
    # reach the upstream (a late-applied PUT or multipart start would be a ghost).
    proxy.set_rules([FaultRule("PutObject", fault="stall", stall_seconds=1.5)])
    with pytest.raises(ReadTimeoutError):
        make_client(proxy.url, read_timeout=0.3).put_object(Bucket=bucket, Key="ghost", Body=b"x" * 1000)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proxy.stats()["faults"].get("PutObject", {}).get("stall") != 1:
        time.sleep(0.05)
    time.sleep(2.0)  # past the stall: the handler has decided by now
    assert proxy.stats()["forwarded"].get("PutObject", 0) == 0
    assert direct.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_stop_returns_promptly_with_stalled_request(moto: MotoS3Server, bucket: str) -> None:
    p = FaultProxy(moto.endpoint_url, rules=[FaultRule(None, fault="stall", stall_seconds=300)]).start()
    outcome: list[BaseException | int] = []

    def stalled_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=60)
        try:
            conn.request("HEAD", f"/{bucket}")
            outcome.append(conn.getresponse().status)
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)

    # An idle keep-alive connection must not hold stop() up either.
    idle = socket.create_connection(("127.0.0.1", p.port))
    t = threading.Thread(target=stalled_request, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while p.injected == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.injected == 1
    t0 = time.monotonic()
    p.stop()
    elapsed = time.monotonic() - t0
    t.join(timeout=10)
    idle.close()
    assert elapsed < 10, f"stop() took {elapsed:.1f}s with a stalled request open"
    assert len(outcome) == 1 and isinstance(outcome[0], (OSError, http.client.HTTPException))


def _head_failures(url: str, bucket: str, n: int) -> list[int]:
    client = make_client(url)
    failed = []
    for i in range(n):
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError:
            failed.append(i)
    return failed


def test_count_and_skip(proxy: FaultProxy, bucket: str) -> None:
    proxy.set_rules([FaultRule("HeadBucket", fault="status", count=2, skip=1)])
    assert _head_failures(proxy.url, bucket, 5) == [1, 2]


def test_same_seed_same_faults(moto: MotoS3Server, bucket: str) -> None:
    rule = FaultRule("HeadBucket", fault="status", rate=0.3)
    runs = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        with FaultProxy(moto.endpoint_url, rules=[rule], seed=seed) as p:
            runs[name] = _head_failures(p.url, bucket, 50)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    # ...and exactly the indices the pure decision function names.
    assert runs["a"] == [k for k in range(50) if rule_fires(rule, 11, 0, k)]
    assert 3 <= len(runs["a"]) <= 30


def test_concurrent_requests_get_the_same_number_of_faults(proxy: FaultProxy, bucket: str) -> None:
    rule = FaultRule("HeadBucket", fault="status", rate=0.4)
    proxy.set_rules([rule])
    failures: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        n = len(_head_failures(proxy.url, bucket, 10))
        with lock:
            failures.append(n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    expected = sum(rule_fires(rule, 0, 0, k) for k in range(40))
    assert sum(failures) == expected == proxy.injected


def test_rate_zero_and_one(proxy: FaultProxy, bucket: str) -> None:
    proxy.set_rules([FaultRule("HeadBucket", fault="status", rate=0.0)])
    assert _head_failures(proxy.url, bucket, 5) == []
    proxy.set_rules([FaultRule("HeadBucket", fault="status", rate=1.0)])
    assert _head_failures(proxy.url, bucket, 5) == [0, 1, 2, 3, 4]


def test_ranged_rule_matches_only_ranged_gets(proxy: FaultProxy, bucket: str, direct: Any) -> None:
    direct.put_object(Bucket=bucket, Key="obj", Body=b"0123456789")
    proxy.set_rules([FaultRule("GetObject", fault="status", ranged=True)])
    client = make_client(proxy.url)
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"0123456789"
    with pytest.raises(ClientError):
        client.get_object(Bucket=bucket, Key="obj", Range="bytes=2-4")


def test_regex_op_method_and_path_filters(proxy: FaultProxy, bucket: str) -> None:
    proxy.set_rules([FaultRule(re.compile(r"Put.*|UploadPart"), fault="status", path_regex=r"/fail/")])
    client = make_client(proxy.url)
    client.put_object(Bucket=bucket, Key="ok/a", Body=b"1")
    with pytest.raises(ClientError):
        client.put_object(Bucket=bucket, Key="fail/a", Body=b"1")
    proxy.set_rules([FaultRule(None, method="DELETE", fault="status", status=500)])
    client.put_object(Bucket=bucket, Key="fail/a", Body=b"1")
    with pytest.raises(ClientError, match="InternalError"):
        client.delete_object(Bucket=bucket, Key="ok/a")


def test_multipart_ops_through_the_proxy(proxy: FaultProxy, bucket: str, direct: Any) -> None:
    proxy.set_rules([FaultRule("UploadPart", fault="status", count=1)])
    client = make_client(proxy.url, see_faults=False)
    mpu = client.create_multipart_upload(Bucket=bucket, Key="big")
    part = b"p" * (5 * 1024 * 1024)
    parts = []
    for n in (1, 2):
        etag = client.upload_part(Bucket=bucket, Key="big", UploadId=mpu["UploadId"], PartNumber=n, Body=part)["ETag"]
        parts.append({"ETag": etag, "PartNumber": n})
    client.complete_multipart_upload(Bucket=bucket, Key="big", UploadId=mpu["UploadId"],
                                     MultipartUpload={"Parts": parts})  # fmt: skip
    assert direct.head_object(Bucket=bucket, Key="big")["ContentLength"] == 2 * len(part)
    stats = proxy.stats()
    assert stats["faults"] == {"UploadPart": {"status": 1}}
    assert stats["forwarded"]["UploadPart"] == 2
    assert stats["forwarded"]["CreateMultipartUpload"] == stats["forwarded"]["CompleteMultipartUpload"] == 1


def test_set_rules_and_clear(proxy: FaultProxy, bucket: str) -> None:
    proxy.set_rules([FaultRule("HeadBucket", fault="status", count=1)])
    assert _head_failures(proxy.url, bucket, 2) == [0]
    proxy.set_rules([FaultRule("HeadBucket", fault="status", count=1)])  # counters restart
    assert _head_failures(proxy.url, bucket, 2) == [0]
    proxy.set_rules([FaultRule("HeadBucket", fault="status")])
    proxy.clear()
    assert _head_failures(proxy.url, bucket, 2) == []
    assert proxy.injected == 2
    proxy.reset_stats()
    assert proxy.stats()["injected"] == 0 and proxy.stats()["requests"] == {}


def test_throttle_per_prefix(proxy: FaultProxy, bucket: str) -> None:
    # 1 request/s per prefix with a burst of 3: a quick run of 20 PUTs to one
    # prefix must be throttled; 20 PUTs to 20 prefixes each find a full bucket.
    proxy.set_throttle(ThrottleRule(per_prefix_rps=1.0, burst=3, prefix_depth=2))
    client = make_client(proxy.url)

    def put_all(keys: list[str]) -> int:
        slowdowns = 0
        for key in keys:
            try:
                client.put_object(Bucket=bucket, Key=key, Body=b"t")
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "SlowDown"
                assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 503
                slowdowns += 1
        return slowdowns

    hot = put_all([f"run/shard0/obj{i}" for i in range(20)])
    spread = put_all([f"run/shard{i + 1}/obj" for i in range(20)])
    assert hot > 0
    assert spread < hot
    throttled = proxy.stats()["throttled"]
    assert throttled[f"{bucket}/run/shard0"] == hot
    # Reads are not in ThrottleRule.ops, so they pass.
    client.head_object(Bucket=bucket, Key="run/shard1/obj")


# ---------------------------------------------------------------------------
# Framing and headers, against a tiny echo upstream
# ---------------------------------------------------------------------------


class _Echo(BaseHTTPRequestHandler):
    """Upstream that records each request (headers, raw body wire bytes, peer port)."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _raw_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raw = b""
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer == b"\r\n":
                            return raw
                raw += self.rfile.read(size + 2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._raw_body()
        self.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                          "body": body, "port": self.client_address[1]})  # fmt: skip
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n")
            return
        out = json.dumps({"len": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


@pytest.fixture
def echo() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    handler = type("Echo", (_Echo,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.block_on_close = False
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    server.shutdown()
    server.server_close()


def test_chunked_request_forwarded_faithfully(echo: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = echo
    with FaultProxy(url) as p:
        port = p.port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        wire = b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Sum: 1\r\n\r\n"
        conn.putrequest("PUT", "/bkt/key", skip_accept_encoding=True)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        conn.send(wire)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"len": len(wire)}
        # Keep-alive on both sides: a second request reuses the upstream connection.
        conn.request("PUT", "/bkt/key2", body=b"0123456789")
        assert json.loads(conn.getresponse().read()) == {"len": 10}
        conn.close()
    assert seen[0]["body"] == wire
    assert seen[0]["headers"]["Host"] == f"127.0.0.1:{port}"  # the client's Host is kept
    assert "Expect" not in seen[0]["headers"]  # answered by the proxy
    assert seen[1]["body"] == b"0123456789"
    assert seen[0]["port"] == seen[1]["port"]


def test_chunked_response_and_host_rewrite(echo: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = echo
    with FaultProxy(url, rewrite_host=True) as p:
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        sock.sendall(b"GET /chunked HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Connection: close" in head
    assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    assert seen[0]["headers"]["Host"] == url.removeprefix("http://")


def test_reset_response_on_chunked_reply(echo: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = echo
    with FaultProxy(url, rules=[FaultRule(None, fault="reset_response", path_regex="^/chunked")]) as p:
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        sock.sendall(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                raw += chunk
        sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    assert body and b"hello".startswith(body[3:]) and not body.endswith(b"0\r\n\r\n")


def test_gcs_json_error_body(echo: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = echo
    rules = [FaultRule("gcs.list", fault="status", status=429), FaultRule("gcs.get.metadata", fault="truncate")]
    with FaultProxy(url, rules=rules) as p:
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        conn.request("GET", "/storage/v1/b/bkt/o?prefix=a")
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status == 429 and doc["error"]["errors"][0]["reason"] == "rateLimitExceeded"
        conn.request("GET", "/storage/v1/b/bkt/o/a%2Fb")
        resp = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
    assert [s["path"] for s in seen] == ["/storage/v1/b/bkt/o/a%2Fb"]


# ---------------------------------------------------------------------------
# GCS through the emulator (when the project has one)
# ---------------------------------------------------------------------------


def _gcs_emulator_module() -> Any:
    try:
        from cloudckpt_testing import gcs_emulator
    except ImportError as exc:
        pytest.skip(f"cloudckpt_testing.gcs_emulator is not available yet ({exc})")
    pytest.importorskip("google.cloud.storage")
    return gcs_emulator


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    mod = _gcs_emulator_module()
    # Small XML MPU parts keep the multipart test light.
    emulator = mod.GCSEmulator(min_part_size=256 * 1024).start()
    try:
        yield emulator.endpoint
    finally:
        emulator.stop()


@pytest.fixture
def gcs_proxy(gcs_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(gcs_endpoint) as p:
        yield p


def _gcs_object(endpoint: str, data: bytes) -> str:
    """Create a bucket holding ``dir/obj.bin`` directly on the emulator; return the bucket name."""
    mod = _gcs_emulator_module()
    bucket = mod.gcs_client(endpoint).bucket(f"fp-{uuid.uuid4().hex[:12]}")
    bucket.create()
    bucket.blob("dir/obj.bin").upload_from_string(data)
    return str(bucket.name)


def _blob_via_proxy(proxy: FaultProxy, bucket: str) -> Any:
    return _gcs_emulator_module().gcs_client(proxy.url).bucket(bucket).blob("dir/obj.bin")


def test_gcs_download_503_is_retried(gcs_endpoint: str, gcs_proxy: FaultProxy) -> None:
    data = b"g" * 100_000
    blob = _blob_via_proxy(gcs_proxy, _gcs_object(gcs_endpoint, data))
    gcs_proxy.set_rules([FaultRule("gcs.get.media", fault="status", status=503, count=1)])
    assert blob.download_as_bytes() == data
    stats = gcs_proxy.stats()
    assert stats["faults"]["gcs.get.media"] == {"status": 1}
    assert stats["forwarded"]["gcs.get.media"] == 1


def test_gcs_truncated_download_is_resumed(gcs_endpoint: str, gcs_proxy: FaultProxy) -> None:
    data = bytes(range(256)) * 1024
    blob = _blob_via_proxy(gcs_proxy, _gcs_object(gcs_endpoint, data))
    gcs_proxy.set_rules([FaultRule("gcs.get.media", fault="truncate", count=1)])
    assert blob.download_as_bytes() == data
    stats = gcs_proxy.stats()
    assert stats["faults"]["gcs.get.media"] == {"truncate": 1}
    assert stats["forwarded"]["gcs.get.media"] == 2  # the resumed request is ranged


def test_gcs_resumable_chunk_503_goes_through_the_proxy(gcs_endpoint: str, gcs_proxy: FaultProxy) -> None:
    bucket = _gcs_object(gcs_endpoint, b"seed")
    data = bytes(range(256)) * 2400  # 600 KiB: three 256 KiB resumable chunks
    blob = _blob_via_proxy(gcs_proxy, bucket)
    blob.chunk_size = 256 * 1024
    gcs_proxy.set_rules([FaultRule("gcs.upload.resumable.chunk", fault="status", status=503, count=1)])
    blob.upload_from_file(io.BytesIO(data))  # no size given: always a resumable upload
    stats = gcs_proxy.stats()
    # Every chunk came back through the proxy: the session URL (Location,
    # built from the Host header) points at the proxy, not the emulator.
    assert stats["forwarded"]["gcs.upload.resumable.init"] == 1
    assert stats["forwarded"]["gcs.upload.resumable.chunk"] == 3
    assert stats["faults"] == {"gcs.upload.resumable.chunk": {"status": 1}}
    direct_blob = _gcs_emulator_module().gcs_client(gcs_endpoint).bucket(bucket).blob("dir/obj.bin")
    assert direct_blob.download_as_bytes() == data


def test_gcs_xml_multipart_part_503_is_retried(gcs_endpoint: str, gcs_proxy: FaultProxy, tmp_path: Any) -> None:
    from google.cloud.storage import transfer_manager

    bucket = _gcs_object(gcs_endpoint, b"seed")
    data = bytes(range(256)) * 3000  # 750 KiB: three XML MPU parts of 256 KiB
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    gcs_proxy.set_rules([FaultRule("gcs.xml.mpu.part", fault="status", status=503, count=1)])
    blob = _blob_via_proxy(gcs_proxy, bucket)
    transfer_manager.upload_chunks_concurrently(
        str(src), blob, chunk_size=256 * 1024, worker_type=transfer_manager.THREAD, max_workers=2
    )
    stats = gcs_proxy.stats()
    assert stats["forwarded"]["gcs.xml.mpu.init"] == stats["forwarded"]["gcs.xml.mpu.complete"] == 1
    assert stats["forwarded"]["gcs.xml.mpu.part"] == 3
    assert stats["faults"] == {"gcs.xml.mpu.part": {"status": 1}}
    direct_blob = _gcs_emulator_module().gcs_client(gcs_endpoint).bucket(bucket).blob("dir/obj.bin")
    assert direct_blob.download_as_bytes() == data
