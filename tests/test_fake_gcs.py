"""cloudckpt against fake-gcs-server, the GCS emulator most projects use.

fake-gcs-server has no XML API multipart upload (it answers 404 to
``POST /bucket/key?uploads``), so every object over ``part_size`` goes up as a
parallel composite upload: temporary part objects, ``compose``, a CRC32C check,
then the temporaries are deleted. These tests drive that path end to end with
cloudckpt's writer and reader, the failure and ``gc`` paths, and the same path
on our own emulator (forced) to check the request options it carries.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import cloudckpt
from cloudckpt import crc, layout, ops
from cloudckpt.errors import BucketNotFoundError, UnsupportedAPIError
from cloudckpt.store.gcs import GCSStore
from cloudckpt.uri import parse_uri
from cloudckpt_testing.faultproxy import FaultProxy, FaultRule
from tests.backends import Backend, new_bucket_name
from tests.conftest import make_backend

MIB = 1 << 20
PART = 5 * MIB


@pytest.fixture
def fake(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    """A fresh bucket on fake-gcs-server."""
    return make_backend("fake-gcs", request, tmp_path)


def _state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    # "big" is 11 MiB: three parts of 5 MiB at most, so a multipart upload.
    return {"big": torch.arange(11 * MIB // 4, dtype=torch.float32) * scale, "small": torch.ones(10) * scale}


def _empty() -> dict[str, torch.Tensor]:
    return {"big": torch.zeros(11 * MIB // 4), "small": torch.zeros(10)}


def _temporaries(backend: Backend, prefix: str = "") -> list[str]:
    names = [b.name for b in backend.gcs_client().list_blobs(backend.bucket, prefix=prefix)]
    return [n for n in names if layout.COMPOSITE_PART_MARK in n]


def test_save_and_load_over_part_size(fake: Backend) -> None:
    uri = fake.uri("ck")
    with FaultProxy(fake.endpoint, api="gcs") as proxy:
        opts = dict(endpoint_url=proxy.url)
        cloudckpt.save(_state(2.0), uri, no_dist=True, part_size=PART, **opts)
        out = _empty()
        cloudckpt.load(out, uri, no_dist=True, **opts)
        stats = proxy.stats()["requests"]
    assert torch.equal(out["big"], _state(2.0)["big"]) and torch.equal(out["small"], _state(2.0)["small"])
    assert cloudckpt.verify(uri, **fake.options).ok
    # The missing XML API was found once (the first multipart upload), then composite uploads took over.
    assert stats.get("gcs.xml.mpu.init") == 1, stats
    assert stats.get("gcs.compose", 0) >= 1, stats
    assert _temporaries(fake) == []
    assert fake.store().list_multipart_uploads("") == []
    data = [k for k in fake.keys(uri) if k.endswith(".distcp")]
    big = max((fake.store().head(f"ck/{k}") for k in data), key=lambda i: i.size if i else 0)
    assert big is not None and big.size > PART


def test_detection_is_per_endpoint_and_survives_pickling(fake: Backend, gcs_server: Any) -> None:
    import pickle

    with FaultProxy(fake.endpoint, api="gcs") as proxy:
        store = GCSStore(fake.bucket, endpoint_url=proxy.url)
        ids = [store.create_multipart("a/obj1"), store.create_multipart("a/obj2")]
        clone = pickle.loads(pickle.dumps(store))
        ids.append(clone.create_multipart("a/obj3"))
        # Probed once: the store, and its pickled copy, remember the endpoint's answer.
        assert proxy.stats()["requests"].get("gcs.xml.mpu.init") == 1, proxy.stats()
        assert all(i.startswith("compose-") for i in ids)
        for up in store.list_multipart_uploads("a/"):
            store.abort_multipart(up.key, up.upload_id)
    assert _temporaries(fake) == []
    # A copy that talks to another endpoint (one with the XML API) probes again and uses it there.
    moved = pickle.loads(pickle.dumps(store))
    bucket = new_bucket_name()
    Backend("gcs", "", {}, gcs_server.endpoint, bucket).gcs_client().create_bucket(bucket)
    moved.endpoint_url, moved.bucket = gcs_server.endpoint, bucket
    upload_id = moved.create_multipart("b/obj")
    assert not upload_id.startswith("compose-")
    assert [u.upload_id for u in moved.list_multipart_uploads("b/")] == [upload_id]
    moved.abort_multipart("b/obj", upload_id)


def test_missing_xml_api_is_named_when_fallback_is_off(fake: Backend) -> None:
    store = GCSStore(fake.bucket, endpoint_url=fake.endpoint)
    store.multipart_api = "xml"
    with pytest.raises(UnsupportedAPIError, match="no XML API multipart upload") as info:
        store.create_multipart("k/obj")
    assert "does not exist" not in str(info.value)
    with pytest.raises(UnsupportedAPIError, match="no XML API multipart upload"):
        store.list_multipart_uploads("k/")


def test_missing_bucket_is_not_taken_for_a_missing_api(fake_gcs_server: Any) -> None:
    store = GCSStore(new_bucket_name(), endpoint_url=fake_gcs_server.endpoint, retry_timeout=5)
    with pytest.raises(BucketNotFoundError):
        store.create_multipart("k/obj")
    with pytest.raises(BucketNotFoundError):
        store.list_multipart_uploads("k/")


def test_failed_composite_upload_leaves_no_temporaries(fake: Backend) -> None:
    uri = fake.uri("failed")
    state = {"big": torch.arange(11 * MIB // 4, dtype=torch.float32)}  # one data object: marker, then 3 parts
    # The first two JSON uploads (the marker, a part) go through; every later one is refused
    # with 400, which is not retried: a part fails and the save fails.
    rule = FaultRule("gcs.upload.multipart", fault="status", status=400, skip=2)
    with FaultProxy(fake.endpoint, api="gcs", rules=[rule]) as proxy:
        with pytest.raises(Exception, match="400"):
            cloudckpt.save(state, uri, no_dist=True, endpoint_url=proxy.url, part_size=PART)
        stats = proxy.stats()
    assert stats["forwarded"].get("gcs.upload.multipart") == 2, stats  # temporaries were created
    assert stats["faults"].get("gcs.upload.multipart"), stats
    assert "gcs.compose" not in stats["requests"], stats
    assert _temporaries(fake) == []
    assert fake.store().list_multipart_uploads("") == []
    assert ".metadata" not in fake.keys(uri)


def test_abort_deletes_every_temporary(fake: Backend) -> None:
    store = fake.store()
    key = "x/__0_0.0123456789ab.distcp"
    uid = store.create_multipart(key, metadata={"a": "b"})
    for n in (1, 2, 3):
        body = os.urandom(1000 + n)
        store.upload_part(key, uid, n, [body], crc32c=crc.crc32c(body))
    assert len(_temporaries(fake)) == 4  # marker + 3 parts
    assert [(u.key, u.upload_id) for u in store.list_multipart_uploads("x/")] == [(key, uid)]
    store.abort_multipart(key, uid)
    assert _temporaries(fake) == [] and store.list_multipart_uploads("") == []
    store.abort_multipart(key, uid)  # twice is fine
    assert store.head(key) is None


def test_gc_aborts_leftover_composite_uploads(fake: Backend) -> None:
    # A save that died mid-upload: one finished data object and a composite upload with parts.
    store = fake.store()
    prefix = "run/ckpt-1/"
    done = b"finished object"
    store.put(prefix + "__0_0.0123456789ab.distcp", [done], crc32c=crc.crc32c(done))
    key = prefix + "__0_1.0123456789ab.distcp"
    uid = store.create_multipart(key)
    body = os.urandom(4096)
    store.upload_part(key, uid, 1, [body], crc32c=crc.crc32c(body))
    root = parse_uri(fake.uri("run"))
    plan = ops.plan_gc(store, root, older_than_s=0)
    assert [(u.key, u.upload_id) for u in plan.uploads] == [(key, uid)]
    assert [c.uri for c in plan.checkpoints] == [fake.uri("run", "ckpt-1")]
    ops.run_gc(store, plan)
    assert list(store.list(prefix)) == [] and store.list_multipart_uploads("") == []


def test_gc_sees_a_prefix_holding_only_temporaries_as_a_checkpoint(fake: Backend) -> None:
    store = fake.store()
    key = "run/ckpt-2/__0_0.0123456789ab.distcp"
    uid = store.create_multipart(key)
    body = os.urandom(100)
    store.upload_part(key, uid, 1, [body], crc32c=crc.crc32c(body))
    plan = ops.plan_gc(store, parse_uri(fake.uri("run")), older_than_s=0)
    assert [(u.key, u.upload_id) for u in plan.uploads] == [(key, uid)]
    ops.run_gc(store, plan)
    assert _temporaries(fake) == []


def test_more_than_32_parts_compose_in_a_tree(fake: Backend) -> None:
    store = fake.store()
    key = "t/__0_0.0123456789ab.distcp"
    uid = store.create_multipart(key, metadata={"k": "v"})
    bodies = [os.urandom(997 + n) for n in range(70)]
    parts = [store.upload_part(key, uid, n + 1, [b], crc32c=crc.crc32c(b)) for n, b in enumerate(bodies)]
    info = store.complete_multipart(key, uid, list(reversed(parts)))
    whole = b"".join(bodies)
    assert info.size == len(whole) and info.crc32c == crc.crc32c(whole)
    assert store.get(key) == whole
    assert store.head(key).metadata == {"k": "v"}
    assert _temporaries(fake) == []


def test_composite_path_carries_request_options(gcs_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On our emulator (forced to the composite path): userProject, kmsKeyName and the storage class go along."""
    from cloudckpt_testing.gcs_emulator import gcs_client

    monkeypatch.setattr(GCSStore, "multipart_api", "compose")
    bucket = new_bucket_name()
    gcs_client(gcs_server.endpoint).create_bucket(bucket)
    key_name = "projects/p/locations/us/keyRings/ring/cryptoKeys/ckpt"
    opts = dict(endpoint_url=gcs_server.endpoint, kms_key_name=key_name, user_project="billing-proj",
                storage_class="NEARLINE")
    uri = f"gs://{bucket}/ck"
    with gcs_server.record() as reqs:
        cloudckpt.save(_state(3.0), uri, no_dist=True, part_size=PART, **opts)
    out = _empty()
    cloudckpt.load(out, uri, no_dist=True, **opts)
    assert torch.equal(out["big"], _state(3.0)["big"])
    ops_seen = {r.op for r in reqs}
    assert "gcs.compose" in ops_seen and not any(o.startswith("gcs.xml.mpu") for o in ops_seen), ops_seen
    for r in reqs:
        assert r.query.get("userProject") == "billing-proj", (r.op, r.path)
        if r.op in ("gcs.compose", "gcs.upload.multipart"):
            assert r.query.get("kmsKeyName") == key_name, (r.op, r.path)
    client = gcs_client(gcs_server.endpoint)
    blobs = list(client.list_blobs(bucket, prefix="ck/"))
    assert not [b.name for b in blobs if layout.COMPOSITE_PART_MARK in b.name]
    big = max(blobs, key=lambda b: b.size)
    assert big.size > PART and big.storage_class == "NEARLINE"
