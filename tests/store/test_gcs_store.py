"""GCSStore against the in-memory GCS emulator (real google-cloud-storage client underneath)."""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import os
import pickle
import socket
import time
import uuid
from typing import Any, Iterator

import pytest

pytest.importorskip("google.cloud.storage")

from cloudckpt import crc  # noqa: E402
from cloudckpt.errors import (  # noqa: E402
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransferError,
)
from cloudckpt.store import open_store  # noqa: E402
from cloudckpt.store.base import PartResult  # noqa: E402
from cloudckpt.store.gcs import GCSStore  # noqa: E402
from cloudckpt_testing.gcs_emulator import GCSEmulator, gcs_client  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def emulator() -> Iterator[GCSEmulator]:
    with GCSEmulator() as emu:
        yield emu


@pytest.fixture
def bucket_name(emulator: GCSEmulator) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    gcs_client(emulator.endpoint).create_bucket(name)
    return name


@pytest.fixture
def store(emulator: GCSEmulator, bucket_name: str) -> GCSStore:
    return GCSStore(bucket_name, endpoint_url=emulator.endpoint)


def _put(store: GCSStore, key: str, data: bytes, **kwargs: Any) -> Any:
    return store.put(key, [data], crc32c=crc.crc32c(data), **kwargs)


# --------------------------------------------------------------------------- buckets
def test_check_bucket(store: GCSStore, emulator: GCSEmulator) -> None:
    store.check_bucket()
    missing = GCSStore("no-such-bucket-here", endpoint_url=emulator.endpoint)
    with pytest.raises(BucketNotFoundError) as info:
        missing.check_bucket()
    msg = str(info.value)
    assert "gs://no-such-bucket-here" in msg and "create" in msg


def test_missing_bucket_on_every_kind_of_call(emulator: GCSEmulator) -> None:
    s = GCSStore("absent-bucket-xyz", endpoint_url=emulator.endpoint)
    calls = [
        lambda: _put(s, "k", b"x"),
        lambda: s.get("k"),
        lambda: s.head("k"),
        lambda: list(s.list("")),
        lambda: s.list_prefixes(""),
        lambda: s.delete("k"),
        lambda: s.create_multipart("k"),
        lambda: s.list_multipart_uploads(""),
        lambda: s.get_range("k", 0, memoryview(bytearray(4))),
    ]
    for call in calls:
        with pytest.raises(BucketNotFoundError, match="gs://absent-bucket-xyz"):
            call()


def test_open_store_builds_gcs_store(emulator: GCSEmulator, bucket_name: str) -> None:
    s = open_store(f"gs://{bucket_name}/prefix", endpoint_url=emulator.endpoint)
    assert isinstance(s, GCSStore) and s.bucket == bucket_name
    s.check_bucket()


# --------------------------------------------------------------------------- single objects
def test_put_get_head(store: GCSStore) -> None:
    data = os.urandom(300_000)
    body = [data[:1000], memoryview(data)[1000:200_000], bytearray(data[200_000:])]
    info = store.put("dir/obj", body, crc32c=crc.crc32c(data), metadata={"kind": "shard"})
    assert info.size == len(data) and info.crc32c == crc.crc32c(data) and info.version
    assert store.get("dir/obj") == data
    head = store.head("dir/obj")
    assert head is not None
    assert head.key == "dir/obj" and head.size == len(data)
    assert head.crc32c == crc.crc32c(data) and isinstance(head.crc32c, int)
    assert head.metadata == {"kind": "shard"}
    assert head.version == info.version and head.etag
    assert isinstance(head.last_modified, _dt.datetime) and head.last_modified.tzinfo is not None
    assert store.head("dir/missing") is None


def test_put_empty_object(store: GCSStore) -> None:
    info = store.put("empty", [], crc32c=crc.crc32c(b""))
    assert info.size == 0
    assert store.get("empty") == b""


def test_put_if_absent(store: GCSStore) -> None:
    _put(store, "marker", b"first", if_absent=True)
    with pytest.raises(PreconditionFailedError, match="gs://.*/marker"):
        _put(store, "marker", b"second", if_absent=True)
    assert store.get("marker") == b"first"
    _put(store, "marker", b"third")  # unconditional overwrite is fine
    assert store.get("marker") == b"third"


def test_put_wrong_crc_is_rejected_by_server(store: GCSStore) -> None:
    with pytest.raises(IntegrityError):
        store.put("bad", [b"payload"], crc32c=crc.crc32c(b"other"))
    assert store.head("bad") is None


def test_get_missing_object(store: GCSStore) -> None:
    with pytest.raises(ObjectNotFoundError) as info:
        store.get("nope/x")
    assert f"gs://{store.bucket}/nope/x" in str(info.value)
    with pytest.raises(ObjectNotFoundError):
        store.get_range("nope/x", 0, memoryview(bytearray(8)))


def test_get_range(store: GCSStore) -> None:
    data = os.urandom(1 * MiB + 7)
    _put(store, "r", data)
    buf = bytearray(1000)
    store.get_range("r", 12345, memoryview(buf))
    assert bytes(buf) == data[12345:13345]
    # Into the middle of a larger buffer, up to the last byte.
    big = bytearray(2 * MiB)
    store.get_range("r", 7, memoryview(big)[100 : 100 + len(data) - 7])
    assert bytes(big[100 : 100 + len(data) - 7]) == data[7:]
    store.get_range("r", 0, memoryview(bytearray(0)))  # no request, no error
    with pytest.raises(TransferError, match="short read"):
        store.get_range("r", len(data) - 10, memoryview(bytearray(20)))
    with pytest.raises(TransferError, match="short read"):
        store.get_range("r", len(data) + 5, memoryview(bytearray(20)))


def test_concurrent_ranges_share_one_store(store: GCSStore) -> None:
    data = os.urandom(4 * MiB)
    _put(store, "c", data)
    out = bytearray(len(data))
    view = memoryview(out)
    step = 256 * 1024
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda off: store.get_range("c", off, view[off : off + step]), range(0, len(data), step)))
    assert bytes(out) == data


# --------------------------------------------------------------------------- listing / deleting
def test_list_and_prefixes_paginate(store: GCSStore) -> None:
    keys = [f"ck/step{s}/r{r}" for s in range(4) for r in range(3)] + ["ck/.metadata", "other/x"]
    for key in keys:
        _put(store, key, key.encode())
    store.list_page_size = 3  # force several pages
    listed = list(store.list("ck/"))
    assert [i.key for i in listed] == sorted(k for k in keys if k.startswith("ck/"))
    assert all(i.size == len(i.key) and i.crc32c == crc.crc32c(i.key.encode()) for i in listed)
    assert store.list_prefixes("ck/") == [f"ck/step{s}/" for s in range(4)]
    assert store.list_prefixes("") == ["ck/", "other/"]
    assert list(store.list("nothing/")) == []


def test_delete_and_delete_many(store: GCSStore) -> None:
    for i in range(6):
        _put(store, f"d/{i}", b"x")
    store.delete("d/0")
    store.delete("d/0")  # missing is fine
    store.delete_many([f"d/{i}" for i in range(1, 6)] + ["d/never"])
    assert list(store.list("d/")) == []
    store.delete_many([])


# --------------------------------------------------------------------------- multipart
def _parts(data: bytes, size: int) -> list[tuple[int, memoryview]]:
    view = memoryview(data)
    return [(i // size + 1, view[i : i + size]) for i in range(0, len(data), size)]


def test_multipart_roundtrip(store: GCSStore) -> None:
    data = os.urandom(11 * MiB + 333)
    upload_id = store.create_multipart("mp/obj", metadata={"m": "1"})
    assert [(u.key, u.upload_id) for u in store.list_multipart_uploads("mp/")] == [("mp/obj", upload_id)]
    assert isinstance(store.list_multipart_uploads("mp/")[0].initiated, _dt.datetime)
    pieces = _parts(data, 5 * MiB)

    def send(item: tuple[int, memoryview]) -> PartResult:
        number, part = item
        # Each part goes out as two buffers, as a part straddling two tensors would.
        body = [part[:1000], part[1000:]]
        return store.upload_part("mp/obj", upload_id, number, body, crc32c=crc.crc32c(part))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(send, reversed(pieces)))
    assert all(r.etag for r in results) and sum(r.size for r in results) == len(data)
    info = store.complete_multipart("mp/obj", upload_id, results)
    assert info.size == len(data) and info.crc32c == crc.crc32c(data) and info.version
    assert store.get("mp/obj") == data
    head = store.head("mp/obj")
    assert head is not None and head.crc32c == crc.crc32c(data) and head.metadata == {"m": "1"}
    assert store.list_multipart_uploads("mp/") == []


def test_abort_and_list_uploads(store: GCSStore) -> None:
    a = store.create_multipart("u/a")
    b = store.create_multipart("u/b")
    store.create_multipart("elsewhere/c")
    assert sorted(u.upload_id for u in store.list_multipart_uploads("u/")) == sorted([a, b])
    store.abort_multipart("u/a", a)
    assert [u.upload_id for u in store.list_multipart_uploads("u/")] == [b]
    store.abort_multipart("u/a", a)  # already aborted: fine
    store.abort_multipart("u/b", b)
    assert store.list_multipart_uploads("u/") == []
    assert [u.key for u in store.list_multipart_uploads("")] == ["elsewhere/c"]
    with pytest.raises(ObjectNotFoundError):
        store.upload_part("u/a", a, 1, [b"x"], crc32c=crc.crc32c(b"x"))


def test_complete_if_absent(store: GCSStore) -> None:
    data = os.urandom(1000)
    upload_id = store.create_multipart("guarded")
    part = store.upload_part("guarded", upload_id, 1, [data], crc32c=crc.crc32c(data))
    _put(store, "guarded", b"someone else")
    with pytest.raises(PreconditionFailedError):
        store.complete_multipart("guarded", upload_id, [part], if_absent=True)
    assert store.get("guarded") == b"someone else"
    store.delete("guarded")
    info = store.complete_multipart("guarded", upload_id, [part], if_absent=True)
    assert info.size == 1000 and store.get("guarded") == data


def test_upload_part_wrong_crc(store: GCSStore) -> None:
    upload_id = store.create_multipart("badpart")
    with pytest.raises(IntegrityError):
        store.upload_part("badpart", upload_id, 1, [b"data"], crc32c=crc.crc32c(b"atad"))
    store.abort_multipart("badpart", upload_id)


def test_complete_with_unknown_part_fails(store: GCSStore) -> None:
    upload_id = store.create_multipart("k")
    bogus = PartResult(part_number=1, etag='"0123"', size=1, crc32c=0)
    with pytest.raises(TransferError):
        store.complete_multipart("k", upload_id, [bogus])
    store.abort_multipart("k", upload_id)


# --------------------------------------------------------------------------- composite uploads (forced)
@pytest.fixture
def composite(store: GCSStore) -> GCSStore:
    """The store on the parallel composite upload path, as it is where the XML API is missing."""
    store.multipart_api = "compose"
    return store


def test_emulator_keeps_the_xml_path(store: GCSStore, emulator: GCSEmulator) -> None:
    before = emulator.request_counts
    upload_id = store.create_multipart("xml/k")
    assert not upload_id.startswith("compose-")
    assert emulator.request_counts["xml.mpu.initiate"] == before["xml.mpu.initiate"] + 1
    store.abort_multipart("xml/k", upload_id)


def test_composite_complete_with_a_missing_part_fails_typed(composite: GCSStore) -> None:
    upload_id = composite.create_multipart("c/k")
    body = os.urandom(100)
    good = composite.upload_part("c/k", upload_id, 1, [body], crc32c=crc.crc32c(body))
    bogus = PartResult(part_number=2, etag="1", size=1, crc32c=0)
    with pytest.raises(ObjectNotFoundError):
        composite.complete_multipart("c/k", upload_id, [good, bogus])
    assert composite.head("c/k") is None
    composite.abort_multipart("c/k", upload_id)
    assert list(composite.list("c/")) == []


def test_composite_complete_after_abort_says_the_upload_is_gone(composite: GCSStore) -> None:
    upload_id = composite.create_multipart("c/k2")
    body = os.urandom(100)
    part = composite.upload_part("c/k2", upload_id, 1, [body], crc32c=crc.crc32c(body))
    composite.abort_multipart("c/k2", upload_id)
    with pytest.raises(ObjectNotFoundError, match="no longer exists"):
        composite.complete_multipart("c/k2", upload_id, [part])


def test_composite_part_pinned_to_its_generation(composite: GCSStore) -> None:
    """A part replaced after it was uploaded (another generation) is not composed silently."""
    upload_id = composite.create_multipart("c/k3")
    body = os.urandom(100)
    part = composite.upload_part("c/k3", upload_id, 1, [body], crc32c=crc.crc32c(body))
    other = os.urandom(100)
    composite.upload_part("c/k3", upload_id, 1, [other], crc32c=crc.crc32c(other))
    with pytest.raises(ObjectNotFoundError):
        composite.complete_multipart("c/k3", upload_id, [part])
    assert composite.head("c/k3") is None
    composite.abort_multipart("c/k3", upload_id)


def test_composite_part_number_range(composite: GCSStore) -> None:
    upload_id = composite.create_multipart("c/k4")
    with pytest.raises(TransferError, match="outside"):
        composite.upload_part("c/k4", upload_id, 0, [b"x"], crc32c=crc.crc32c(b"x"))
    composite.abort_multipart("c/k4", upload_id)


# --------------------------------------------------------------------------- lifecycle
def test_pickle_round_trip(emulator: GCSEmulator, bucket_name: str) -> None:
    client = gcs_client(emulator.endpoint)
    s = GCSStore(bucket_name, client=client)
    _put(s, "p", b"pickled")
    assert s.client is client
    clone = pickle.loads(pickle.dumps(s))
    assert clone._client is None and clone._user_client is None
    assert clone.client is not client  # rebuilt from the captured endpoint
    assert clone.endpoint_url == emulator.endpoint
    assert clone.get("p") == b"pickled"
    _put(clone, "q", b"from clone")
    assert s.get("q") == b"from clone"
    # A store that already built its client pickles without it, too.
    again = pickle.loads(pickle.dumps(clone))
    assert again.get("q") == b"from clone"
    clone.close()
    assert clone.get("p") == b"pickled"  # usable again after close()


def test_storage_emulator_host_env(emulator: GCSEmulator, bucket_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint.replace("http://", ""))
    s = GCSStore(bucket_name)
    s.check_bucket()
    _put(s, "env", b"ok")
    assert s.get("env") == b"ok"


def test_unreachable_endpoint_fails_in_bounded_time() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    s = GCSStore("bkt", endpoint_url=f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as info:
        s.check_bucket()
    elapsed = time.monotonic() - t0
    assert elapsed < 30
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "STORAGE_EMULATOR_HOST" in msg
    quick = GCSStore("bkt", endpoint_url=f"http://127.0.0.1:{port}", unreachable_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachableError):
        quick.put("k", [b"x"], crc32c=crc.crc32c(b"x"))
    assert time.monotonic() - t0 < 10


def test_forbidden_translates_to_access_denied(store: GCSStore) -> None:
    from google.api_core import exceptions as gexc

    err = store._translate(gexc.Forbidden("caller does not have storage.objects.get"), "k", "download")
    assert isinstance(err, AccessDeniedError) and f"gs://{store.bucket}/k" in str(err)
