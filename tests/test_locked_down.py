"""Locked-down buckets: encryption, requester pays, bucket owner, storage class, S3 Express, GCS CMEK.

S3 tests run behind :class:`cloudckpt_testing.policy_proxy.PolicyProxy`, a proxy
in front of moto that refuses what a locked-down bucket refuses and records
every request; the assertions are on those recorded requests. GCS tests check
the emulator's recorded requests.
"""

from __future__ import annotations

import base64
import io
import logging
import pickle
from typing import Any, Iterator

import boto3
import pytest
import torch

import cloudckpt
from cloudckpt import crc
from cloudckpt.errors import AccessDeniedError, InvalidURIError
from cloudckpt.store.options import S3RequestOptions, SecretBytes
from cloudckpt.store.s3 import S3Store
from cloudckpt.uri import parse_uri
from cloudckpt_testing.policy_proxy import (
    OBJECT_CREATE_OPS,
    OBJECT_IO_OPS,
    BucketPolicy,
    PolicyProxy,
    RecordedRequest,
)
from tests.backends import new_bucket_name

KMS_KEY = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OWNER = "111122223333"
SSE_C_KEY = bytes(range(7, 39))  # 32 bytes
LOCKED = dict(server_side_encryption="aws:kms", sse_kms_key_id=KMS_KEY, request_payer="requester",
              expected_bucket_owner=OWNER, storage_class="STANDARD_IA",
              object_tags={"team": "llm", "run": "r1"}, object_metadata={"run-id": "r1"})
MIB = 1 << 20


def _state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    # "big" is 6 MiB, so with part_size=5 MiB it goes up as a multipart upload.
    return {"big": torch.full((6 * MIB // 4,), scale), "small": torch.arange(100.0) * scale}


def _empty() -> dict[str, torch.Tensor]:
    return {"big": torch.zeros(6 * MIB // 4), "small": torch.zeros(100)}


def _bucket(moto_server: Any, name: str | None = None) -> str:
    name = name or new_bucket_name()
    boto3.client("s3", endpoint_url=moto_server.endpoint_url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def locked(moto_server: Any) -> Iterator[tuple[PolicyProxy, str, dict[str, Any]]]:
    """(proxy, bucket, options): a bucket demanding SSE-KMS with one key, requester pays and the owner check."""
    bucket = _bucket(moto_server)
    policy = BucketPolicy(required_sse="aws:kms", required_kms_key_id=KMS_KEY, require_request_payer=True,
                          expected_owner=OWNER)
    with PolicyProxy(moto_server.endpoint_url, policy) as proxy:
        yield proxy, bucket, dict(LOCKED, endpoint_url=proxy.url)


def _assert_every_request_carried(requests: list[RecordedRequest], *, sse: bool = True) -> set[str]:
    """Every request had the requester-pays and owner headers; object creations the SSE headers."""
    assert requests, "no request reached the proxy"
    for r in requests:
        assert r.denied is None, (r.op, r.denied)
        assert r.headers.get("x-amz-request-payer") == "requester", r.op
        assert r.headers.get("x-amz-expected-bucket-owner") == OWNER, r.op
        if sse and r.op in OBJECT_CREATE_OPS:
            assert r.headers.get("x-amz-server-side-encryption") == "aws:kms", r.op
            assert r.headers.get("x-amz-server-side-encryption-aws-kms-key-id") == KMS_KEY, r.op
            assert r.headers.get("x-amz-storage-class") == "STANDARD_IA", r.op
            assert r.headers.get("x-amz-tagging") == "team=llm&run=r1", r.op
            assert r.headers.get("x-amz-meta-run-id") == "r1", r.op
    return {r.op for r in requests}


# -- options and validation ------------------------------------------------------------

def test_unknown_store_option_is_a_type_error_at_construction() -> None:
    with pytest.raises(TypeError, match="server_side_encrypton"):
        S3Store("b", server_side_encrypton="aws:kms")
    # Real boto3 client options still pass.
    S3Store("b", aws_access_key_id="a", aws_secret_access_key="s", profile_name=None, verify=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(server_side_encryption="kms"), "server_side_encryption='kms' is not one of"),
    (dict(sse_kms_key_id=KMS_KEY), "sse_kms_key_id needs server_side_encryption='aws:kms'"),
    (dict(server_side_encryption="AES256", sse_kms_key_id=KMS_KEY), "sse_kms_key_id needs"),
    (dict(bucket_key_enabled=True), "bucket_key_enabled applies to SSE-KMS only"),
    (dict(sse_customer_key=b"short"), "32 bytes"),
    (dict(sse_customer_key=SSE_C_KEY, server_side_encryption="AES256"), "cannot be combined"),
    (dict(request_payer="owner"), "request_payer must be 'requester'"),
    (dict(expected_bucket_owner="acme"), "12-digit AWS account id"),
    (dict(storage_class="GLACIER"), "restore request"),
    (dict(storage_class="SUPER_CHEAP"), "not an S3 storage class"),
    (dict(object_tags={f"k{i}": "v" for i in range(11)}), "at most 10"),
])
def test_invalid_s3_options_are_value_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S3Store("bucket", **kwargs)


def test_invalid_option_fails_before_any_upload(moto_server: Any) -> None:
    bucket = _bucket(moto_server)
    with pytest.raises(ValueError, match="sse_kms_key_id needs"):
        cloudckpt.save(_state(), f"s3://{bucket}/ck", no_dist=True, endpoint_url=moto_server.endpoint_url,
                       sse_kms_key_id=KMS_KEY)
    assert "Contents" not in boto3.client("s3", endpoint_url=moto_server.endpoint_url).list_objects_v2(
        Bucket=bucket)


def test_sse_customer_key_never_shows_in_repr_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    raw_b64 = base64.b64encode(SSE_C_KEY).decode()
    store = S3Store("bucket", sse_customer_key=raw_b64)  # base64 text is accepted too
    assert store.request_options.sse_customer_key == SecretBytes(SSE_C_KEY)
    shown = repr(store) + repr(store.request_options) + str(store.request_options.sse_customer_key)
    assert raw_b64 not in shown and repr(SSE_C_KEY) not in shown and "redacted" in shown
    with pytest.raises(ValueError) as err:
        S3Store("bucket", sse_customer_key=SSE_C_KEY[:31])
    assert repr(SSE_C_KEY[:31]) not in str(err.value)
    # The process executor needs the key in the child: the pickled store still works.
    clone = pickle.loads(pickle.dumps(store))
    assert clone.request_options.sse_customer_key.reveal() == SSE_C_KEY


# -- the locked-down S3 bucket ---------------------------------------------------------

def test_save_load_verify_and_retention_carry_every_header(locked: Any) -> None:
    proxy, bucket, opts = locked
    root = f"s3://{bucket}/run"
    cloudckpt.save(_state(1.0), f"{root}/plain", no_dist=True, part_size=5 * MIB, **opts)
    out = _empty()
    cloudckpt.load(out, f"{root}/plain", no_dist=True, **opts)
    assert torch.equal(out["big"], _state(1.0)["big"]) and torch.equal(out["small"], _state(1.0)["small"])
    report = cloudckpt.verify(f"{root}/plain", **opts)
    assert report.ok, report
    with cloudckpt.CheckpointManager(f"{root}/managed", keep_last=1, part_size=5 * MIB, **opts) as mgr:
        for step in (1, 2, 3):
            mgr.save(_state(float(step)), step)
        assert mgr.steps() == [3]  # retention deleted steps 1 and 2 through the proxy
        got = _empty()
        assert mgr.load(got) == 3
        assert torch.equal(got["small"], _state(3.0)["small"])
    ops = _assert_every_request_carried(proxy.requests)
    assert {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "GetObject",
            "HeadObject", "ListObjectsV2"} <= ops, ops
    assert ops & {"DeleteObjects", "DeleteObject"}, ops
    # No request was checksummed with MD5 (S3 Express refuses it; CRC32C is used throughout).
    assert not [r.op for r in proxy.requests if "content-md5" in r.headers]
    for r in proxy.requests:
        if r.op == "DeleteObjects":
            assert r.headers.get("x-amz-checksum-crc32c") and r.headers.get("x-amz-sdk-checksum-algorithm") == "CRC32C"


def test_store_level_requests_carry_every_header(locked: Any) -> None:
    """The operations a save rarely makes (bucket check, upload listing, abort, single delete) too."""
    proxy, bucket, opts = locked
    store = S3Store(bucket, **opts)
    store.check_bucket()
    upload_id = store.create_multipart("x/obj", metadata={"k": "v"})
    assert [u.upload_id for u in store.list_multipart_uploads("x/")] == [upload_id]
    store.abort_multipart("x/obj", upload_id)
    store.put("x/one", [b"abc"], crc32c=crc.crc32c(b"abc"))
    assert store.get("x/one") == b"abc"
    assert store.head("x/one").metadata.get("run-id") == "r1"
    store.delete("x/one")
    ops = _assert_every_request_carried(proxy.requests)
    assert {"HeadBucket", "CreateMultipartUpload", "ListMultipartUploads", "AbortMultipartUpload", "PutObject",
            "GetObject", "HeadObject", "DeleteObject"} <= ops, ops
    create = [r for r in proxy.requests if r.op == "CreateMultipartUpload"][0]
    assert create.headers["x-amz-meta-k"] == "v" and create.headers["x-amz-meta-run-id"] == "r1"


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_async_save_through_each_executor_carries_every_header(locked: Any, executor: str) -> None:
    proxy, bucket, opts = locked
    ex = cloudckpt.ThreadCheckpointExecutor() if executor == "thread" else cloudckpt.ProcessCheckpointExecutor()
    with ex:
        resp = cloudckpt.async_save(_state(2.0), checkpoint_id=f"s3://{bucket}/{executor}", executor=ex,
                                    no_dist=True, part_size=5 * MIB, **opts)
        resp.upload_completion.result(timeout=300)
    out = _empty()
    cloudckpt.load(out, f"s3://{bucket}/{executor}", no_dist=True, **opts)
    assert torch.equal(out["big"], _state(2.0)["big"])
    ops = _assert_every_request_carried(proxy.requests)
    assert {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"} <= ops, ops


def test_cli_cp_rm_gc_carry_every_header(locked: Any) -> None:
    """cp, ls, rm and gc through the real CLI, with the locked-down options given as its flags."""
    import cloudckpt.cli as cli

    proxy, bucket, opts = locked
    src, dst = f"s3://{bucket}/src", f"s3://{bucket}/dst"
    cloudckpt.save(_state(4.0), src, no_dist=True, part_size=5 * MIB, **opts)
    # A failed save's leftovers for gc: an incomplete upload.
    S3Store(bucket, **opts).create_multipart("dead/step/__0_0.0123456789ab.distcp")
    base = ["--endpoint-url", proxy.url, "-q", "--server-side-encryption", "aws:kms", "--sse-kms-key-id", KMS_KEY,
            "--request-payer", "requester", "--expected-bucket-owner", OWNER, "--storage-class", "STANDARD_IA",
            "--object-tag", "team=llm", "--object-tag", "run=r1", "--object-metadata", "run-id=r1"]
    assert cli.main([*base, "cp", src, dst, "--part-size", "5"]) == 0
    out = _empty()
    cloudckpt.load(out, dst, no_dist=True, **opts)
    assert torch.equal(out["big"], _state(4.0)["big"])
    assert cli.main([*base, "ls", f"s3://{bucket}"]) == 0
    assert cli.main([*base, "rm", "-y", src]) == 0
    assert cli.main([*base, "gc", f"s3://{bucket}/dead", "--older-than", "0s", "--yes"]) == 0
    assert S3Store(bucket, **opts).list_multipart_uploads("dead/") == []
    ops = _assert_every_request_carried(proxy.requests)
    assert {"PutObject", "GetObject", "ListObjectsV2", "ListMultipartUploads", "AbortMultipartUpload"} <= ops, ops
    assert ops & {"DeleteObjects", "DeleteObject"}, ops


@pytest.mark.parametrize("missing, hint", [
    ("server_side_encryption", "server_side_encryption='aws:kms' and sse_kms_key_id="),
    ("request_payer", "requester pays buckets need request_payer='requester'"),
    ("expected_bucket_owner", "requester pays"),  # no owner header at all: denied, payer set, SSE set
])
def test_denied_write_names_bucket_operation_and_fix(locked: Any, missing: str, hint: str) -> None:
    proxy, bucket, opts = locked
    opts = {k: v for k, v in opts.items() if k != missing and not (missing == "server_side_encryption" and k in (
        "sse_kms_key_id",))}
    with pytest.raises(AccessDeniedError) as err:
        cloudckpt.save(_state(), f"s3://{bucket}/denied", no_dist=True, **opts)
    msg = str(err.value)
    assert f"s3://{bucket}" in msg and ("upload" in msg or "access bucket" in msg or "inspect" in msg), msg
    if missing != "expected_bucket_owner":
        assert hint in msg, msg
    assert [r for r in proxy.requests if r.denied], "the proxy denied nothing"


def test_wrong_expected_owner_is_named(locked: Any) -> None:
    proxy, bucket, opts = locked
    with pytest.raises(AccessDeniedError, match="expected_bucket_owner=999999999999 is not the account"):
        cloudckpt.save(_state(), f"s3://{bucket}/x", no_dist=True, **dict(opts, expected_bucket_owner="999999999999"))


def test_kms_key_mismatch_is_named(locked: Any) -> None:
    proxy, bucket, opts = locked
    other = KMS_KEY.replace("1234abcd", "ffffffff")
    with pytest.raises(AccessDeniedError, match="different KMS key than sse_kms_key_id"):
        cloudckpt.save(_state(), f"s3://{bucket}/x", no_dist=True, **dict(opts, sse_kms_key_id=other))


# -- SSE-C -----------------------------------------------------------------------------

def test_sse_c_key_sent_on_every_object_read_and_write_and_never_logged(
        moto_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    bucket = _bucket(moto_server)
    with PolicyProxy(moto_server.endpoint_url, BucketPolicy(require_sse_c=True)) as proxy:
        opts = dict(endpoint_url=proxy.url, sse_customer_key=SSE_C_KEY)
        uri = f"s3://{bucket}/ssec"
        with caplog.at_level(logging.DEBUG):
            cloudckpt.save(_state(5.0), uri, no_dist=True, part_size=5 * MIB, **opts)
            out = _empty()
            cloudckpt.load(out, uri, no_dist=True, **opts)
            assert cloudckpt.verify(uri, **opts).ok
        assert torch.equal(out["big"], _state(5.0)["big"])
        reqs = proxy.requests
    ops = {r.op for r in reqs}
    assert {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "GetObject"} <= ops
    key_b64 = base64.b64encode(SSE_C_KEY).decode()
    for r in reqs:
        assert r.denied is None, (r.op, r.denied)
        if r.op in OBJECT_IO_OPS:
            assert r.headers["x-amz-server-side-encryption-customer-key"] == key_b64, r.op
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "customer" in logged.lower(), "botocore's DEBUG request logs were not captured"
    assert key_b64 not in logged and repr(SSE_C_KEY)[2:-1] not in logged
    # Without the key, the object cannot be read: the proxy (like S3) refuses.
    with PolicyProxy(moto_server.endpoint_url, BucketPolicy(require_sse_c=True)) as proxy2:
        with pytest.raises(cloudckpt.errors.CloudCheckpointError):
            cloudckpt.load(_empty(), uri, no_dist=True, endpoint_url=proxy2.url)


def test_writer_pickle_holds_no_client_state(locked: Any) -> None:
    """Writers pickle their options (the child needs them) but never a client or its credentials."""
    proxy, bucket, opts = locked
    from cloudckpt.writer import writer_for

    writer = writer_for(f"s3://{bucket}/p", **opts)
    writer.store.check_bucket()  # a live client now exists in this process
    blob = pickle.dumps(writer)
    assert b"botocore" not in blob and b"testing" not in blob  # no client, no credentials (moto's are 'testing')


# -- S3 Express One Zone directory buckets ----------------------------------------------

def test_directory_bucket_names_are_valid_uris() -> None:
    assert parse_uri("s3://ckpt--usw2-az1--x-s3/run/step-1").bucket == "ckpt--usw2-az1--x-s3"
    assert parse_uri("s3://my-ckpt--use1-lax1-az1--x-s3").bucket == "my-ckpt--use1-lax1-az1--x-s3"
    for bad in ("s3://ckpt.dots--usw2-az1--x-s3/x", "s3://ckpt--x-s3/x", "s3://xn--abc/x", "s3://abc-s3alias/x"):
        with pytest.raises(InvalidURIError):
            parse_uri(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(server_side_encryption="aws:kms", sse_kms_key_id=KMS_KEY), "default encryption key"),
    (dict(server_side_encryption="aws:kms:dsse"), "does not support server_side_encryption='aws:kms:dsse'"),
    (dict(sse_customer_key=SSE_C_KEY), "does not support SSE-C"),
    (dict(request_payer="requester"), "does not support requester pays"),
    (dict(storage_class="STANDARD"), "EXPRESS_ONEZONE"),
    (dict(object_tags={"a": "b"}), "object tags"),
])
def test_directory_bucket_refuses_what_s3_express_refuses(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S3Store("ckpt--usw2-az1--x-s3", **kwargs)
    S3RequestOptions("ckpt--usw2-az1--x-s3", server_side_encryption="aws:kms", expected_bucket_owner=OWNER)


def test_directory_bucket_session_auth_no_md5_unordered_listing(moto_server: Any) -> None:
    """A directory bucket emulated by the proxy: CreateSession, s3session tokens, shuffled listings."""
    express = "ckpt--usw2-az1--x-s3"
    backing = _bucket(moto_server)
    policy = BucketPolicy(express=True, shuffle_listings=True, bucket_map={express: backing},
                          required_sse="aws:kms")
    with PolicyProxy(moto_server.endpoint_url, policy, seed=7) as proxy:
        opts = dict(endpoint_url=proxy.url, region="us-west-2", server_side_encryption="aws:kms")
        with cloudckpt.CheckpointManager(f"s3://{express}/run", keep_last=2, part_size=5 * MIB, **opts) as mgr:
            for step in (1, 2, 3, 10, 11):
                mgr.save(_state(float(step)), step)
            assert mgr.steps() == [10, 11]
            out = _empty()
            assert mgr.load(out) == 11
        assert torch.equal(out["big"], _state(11.0)["big"])
        assert cloudckpt.verify(f"s3://{express}/run/step-{11:010d}", **opts).ok
        store = S3Store(express, **opts)
        names = [o.key for o in store.list("run/step-0000000011/")]
        assert names == sorted(names) and names
        upload_id = store.create_multipart("run/tmp/obj")
        assert [u.upload_id for u in store.list_multipart_uploads("run/tmp/ob")] == [upload_id]
        store.abort_multipart("run/tmp/obj", upload_id)
        reqs = proxy.requests
    assert not [(r.op, r.denied) for r in reqs if r.denied]
    ops = {r.op for r in reqs}
    assert "CreateSession" in ops and {"ListObjectsV2", "PutObject", "UploadPart"} <= ops, ops
    for r in reqs:
        assert "content-md5" not in r.headers, r.op
        if r.op in ("ListObjectsV2", "ListMultipartUploads"):
            assert r.query.get("prefix", "/").endswith("/"), r.query
        if r.op in ("PutObject", "UploadPart"):
            assert r.headers.get("x-amz-checksum-crc32c"), r.op
    # Directory buckets need part numbers 1..N without gaps.
    parts: dict[str, list[int]] = {}
    for r in reqs:
        if r.op == "UploadPart":
            parts.setdefault(r.query["uploadId"], []).append(int(r.query["partNumber"]))
    assert parts and all(sorted(n) == list(range(1, len(n) + 1)) for n in parts.values()), parts


# -- GCS ---------------------------------------------------------------------------------

GCS_KEY = "projects/p/locations/us/keyRings/ring/cryptoKeys/ckpt"


def test_gcs_options_on_every_recorded_request(gcs_server: Any) -> None:
    from cloudckpt.store.gcs import GCSStore
    from cloudckpt_testing.gcs_emulator import gcs_client

    bucket = new_bucket_name()
    gcs_client(gcs_server.endpoint).create_bucket(bucket)
    opts = dict(endpoint_url=gcs_server.endpoint, kms_key_name=GCS_KEY, user_project="billing-proj",
                storage_class="NEARLINE")
    uri = f"gs://{bucket}/ck"
    with gcs_server.record() as reqs:
        cloudckpt.save(_state(6.0), uri, no_dist=True, part_size=5 * MIB, **opts)
        out = _empty()
        cloudckpt.load(out, uri, no_dist=True, **opts)
        assert cloudckpt.verify(uri, **opts).ok
        with cloudckpt.CheckpointManager(f"gs://{bucket}/m", keep_last=1, part_size=5 * MIB, **opts) as mgr:
            mgr.save(_state(1.0), 1)
            mgr.save(_state(2.0), 2)
            assert mgr.steps() == [2]
        store = GCSStore(bucket, **opts)
        store.check_bucket()
        upload_id = store.create_multipart("x/obj")
        assert [u.upload_id for u in store.list_multipart_uploads("x/")] == [upload_id]
        store.abort_multipart("x/obj", upload_id)
    assert torch.equal(out["big"], _state(6.0)["big"])
    ops = {r.op for r in reqs}
    assert {"gcs.upload.multipart", "gcs.xml.mpu.init", "gcs.xml.mpu.part", "gcs.xml.mpu.complete",
            "gcs.xml.mpu.abort", "gcs.xml.list_uploads", "gcs.get.media", "gcs.list", "gcs.delete"} <= ops, ops
    for r in reqs:
        xml = r.op.startswith("gcs.xml.")
        if xml:
            assert r.headers.get("x-goog-user-project") == "billing-proj", r.op
        else:
            assert r.query.get("userProject") == "billing-proj", (r.op, r.path, r.query)
    for r in reqs:
        if r.op == "gcs.upload.multipart":
            assert r.query.get("kmsKeyName") == GCS_KEY
        if r.op == "gcs.xml.mpu.init":
            assert r.headers.get("x-goog-encryption-kms-key-name") == GCS_KEY
            assert r.headers.get("x-goog-storage-class") == "NEARLINE"
    meta = [o for o in GCSStore(bucket, endpoint_url=gcs_server.endpoint).list("ck/")]
    assert meta
    raw = gcs_client(gcs_server.endpoint).bucket(bucket).get_blob("ck/.metadata")
    assert raw.storage_class == "NEARLINE"


def test_gcs_invalid_options() -> None:
    from cloudckpt.store.gcs import GCSStore

    with pytest.raises(ValueError, match="not a Cloud KMS key name"):
        GCSStore("b", kms_key_name="my-key")
    with pytest.raises(ValueError, match="not a GCS storage class"):
        GCSStore("b", storage_class="GLACIER")
    with pytest.raises(TypeError):
        GCSStore("b", server_side_encryption="aws:kms")


def test_pickled_store_reprs_hide_key() -> None:
    store = S3Store("bucket", sse_customer_key=SSE_C_KEY)
    buf = io.StringIO()
    print(store, store.request_options, file=buf)
    assert base64.b64encode(SSE_C_KEY).decode() not in buf.getvalue()


def test_general_bucket_with_unordered_listings(moto_server: Any) -> None:
    """An S3-compatible server that lists in no order: save, retention, load and verify still agree."""
    bucket = _bucket(moto_server)
    with PolicyProxy(moto_server.endpoint_url, BucketPolicy(shuffle_listings=True), seed=3) as proxy:
        opts = dict(endpoint_url=proxy.url)
        with cloudckpt.CheckpointManager(f"s3://{bucket}/run", keep_last=2, part_size=5 * MIB, **opts) as mgr:
            for step in (1, 2, 9, 10, 11):
                mgr.save(_state(float(step)), step)
            assert mgr.steps() == [10, 11]
            out = _empty()
            assert mgr.load(out) == 11
        assert torch.equal(out["big"], _state(11.0)["big"])
        assert cloudckpt.verify(f"s3://{bucket}/run/step-{11:010d}", **opts).ok
        assert any(r.op == "ListObjectsV2" for r in proxy.requests)
