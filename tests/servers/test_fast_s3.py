"""Functional tests of cloudckpt_testing.fast_s3 through real clients (no timing assertions)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import random
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import google_crc32c
import pytest

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from cloudckpt_testing.fast_s3 import FastS3Server  # noqa: E402

MiB = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[FastS3Server]:
    with FastS3Server(in_process=True, verify_all_checksums=True) as srv:
        yield srv


@pytest.fixture()
def s3(server: FastS3Server) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id="any",
        aws_secret_access_key="thing",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


@pytest.fixture()
def bucket(s3: Any) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]


def _status(exc: pytest.ExceptionInfo[ClientError]) -> int:
    return exc.value.response["ResponseMetadata"]["HTTPStatusCode"]


def _crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _raw(
    server: FastS3Server,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {}, **kw)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _data(n: int, seed: int = 0) -> bytes:
    # Non-repeating bytes, so a misplaced slab or an off-by-one across pieces shows up.
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- buckets


def test_bucket_lifecycle(s3: Any) -> None:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    assert s3.head_bucket(Bucket=name)["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert name in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket=name)
    assert _code(e) == "BucketAlreadyOwnedByYou" and _status(e) == 409
    s3.put_object(Bucket=name, Key="x", Body=b"1")
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket=name)
    assert _code(e) == "BucketNotEmpty" and _status(e) == 409
    s3.delete_object(Bucket=name, Key="x")
    s3.delete_bucket(Bucket=name)
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket=name)
    assert _status(e) == 404
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=name, Key="x")
    assert _code(e) == "NoSuchBucket" and _status(e) == 404
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket="No_Such..Name")
    assert _code(e) == "InvalidBucketName"


# --------------------------------------------------------------------------- objects


def test_put_get_head_delete(server: FastS3Server, s3: Any, bucket: str) -> None:
    put = s3.put_object(
        Bucket=bucket,
        Key="dir/obj.bin",
        Body=b"hello world",
        ContentType="text/plain",
        Metadata={"color": "blue"},
    )
    etag = put["ETag"]
    assert etag.startswith('"') and len(etag) == 34
    got = s3.get_object(Bucket=bucket, Key="dir/obj.bin")
    assert got["Body"].read() == b"hello world"
    assert got["ContentType"] == "text/plain"
    assert got["Metadata"] == {"color": "blue"}
    assert got["ETag"] == etag
    head = s3.head_object(Bucket=bucket, Key="dir/obj.bin")
    assert head["ContentLength"] == 11 and head["ETag"] == etag
    assert head["LastModified"].year >= 2024
    status, headers, _ = _raw(server, "HEAD", f"/{bucket}/dir/obj.bin")
    assert status == 200 and headers["last-modified"].endswith(" GMT")  # RFC 1123
    # Empty objects round-trip too.
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""
    s3.delete_object(Bucket=bucket, Key="dir/obj.bin")
    s3.delete_object(Bucket=bucket, Key="dir/obj.bin")  # missing key: still 204
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="dir/obj.bin")
    assert _code(e) == "NoSuchKey" and _status(e) == 404
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="dir/obj.bin")
    assert _status(e) == 404


def test_error_xml_shape(server: FastS3Server, bucket: str) -> None:
    status, headers, body = _raw(server, "GET", f"/{bucket}/missing%20key")
    assert status == 404 and headers["content-type"] == "application/xml"
    from xml.etree import ElementTree

    root = ElementTree.fromstring(body)
    assert root.tag == "Error"
    assert root.findtext("Code") == "NoSuchKey"
    assert root.findtext("Message")
    assert root.findtext("Key") == "missing key"


def test_if_none_match_and_if_match(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert _code(e) == "PreconditionFailed" and _status(e) == 412
    assert s3.get_object(Bucket=bucket, Key="once")["Body"].read() == b"first"
    etag = s3.head_object(Bucket=bucket, Key="once")["ETag"]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="once", IfNoneMatch=etag)
    assert _status(e) == 304
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="once", IfMatch='"0000"')
    assert _status(e) == 412
    s3.put_object(Bucket=bucket, Key="once", Body=b"third", IfMatch=etag)
    assert s3.get_object(Bucket=bucket, Key="once")["Body"].read() == b"third"


def test_crc32c_checksums(server: FastS3Server, s3: Any, bucket: str) -> None:
    data = _data(3 * MiB + 17)
    good = _crc32c_b64(data)
    put = s3.put_object(Bucket=bucket, Key="c", Body=data, ChecksumCRC32C=good)
    assert put["ChecksumCRC32C"] == good
    head = s3.head_object(Bucket=bucket, Key="c", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"] == good
    got = s3.get_object(Bucket=bucket, Key="c", ChecksumMode="ENABLED")
    assert got["ChecksumCRC32C"] == good and got["Body"].read() == data
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="bad", Body=data, ChecksumCRC32C=_crc32c_b64(b"other"))
    assert _code(e) == "BadDigest" and _status(e) == 400
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="bad")
    assert _status(e) == 404
    # A malformed value is InvalidRequest; a wrong Content-MD5 is BadDigest.
    status, _, body = _raw(server, "PUT", f"/{bucket}/bad", b"abc", {"x-amz-checksum-crc32c": "xx"})
    assert status == 400 and b"<Code>InvalidRequest</Code>" in body
    md5 = base64.b64encode(hashlib.md5(b"abd").digest()).decode()
    status, _, body = _raw(server, "PUT", f"/{bucket}/bad", b"abc", {"Content-MD5": md5})
    assert status == 400 and b"<Code>BadDigest</Code>" in body
    md5 = base64.b64encode(hashlib.md5(b"abc").digest()).decode()
    status, headers, _ = _raw(server, "PUT", f"/{bucket}/md5", b"abc", {"Content-MD5": md5})
    assert status == 200 and headers["etag"] == f'"{hashlib.md5(b"abc").hexdigest()}"'


def test_boto3_default_crc32(server: FastS3Server, s3: Any, bucket: str) -> None:
    """boto3's default CRC32 request checksum (a header over http; over https it is an
    aws-chunked trailer, whose framing test_aws_chunked_framings covers)."""
    data = _data(2 * MiB + 5)
    put = s3.put_object(Bucket=bucket, Key="t", Body=io.BytesIO(data))
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    assert put["ChecksumCRC32"] == crc
    assert s3.get_object(Bucket=bucket, Key="t")["Body"].read() == data
    assert s3.head_object(Bucket=bucket, Key="t", ChecksumMode="ENABLED")["ChecksumCRC32"] == crc


def _aws_chunks(data: bytes, chunk: int, signed: bool, trailers: dict[str, str]) -> bytes:
    sig = ";chunk-signature=" + "0" * 64 if signed else ""
    out = b"".join(
        b"%x%s\r\n%s\r\n" % (len(data[i : i + chunk]), sig.encode(), data[i : i + chunk])
        for i in range(0, len(data), chunk)
    )
    out += b"0%s\r\n" % sig.encode()
    out += b"".join(f"{k}:{v}\r\n".encode() for k, v in trailers.items())
    if signed and trailers:
        out += b"x-amz-trailer-signature:" + b"0" * 64 + b"\r\n"
    return out + b"\r\n"


def test_aws_chunked_framings(server: FastS3Server, s3: Any, bucket: str) -> None:
    data = _data(MiB + 333, seed=3)
    crc = _crc32c_b64(data)
    # Signed chunks with Content-Length framing (STREAMING-AWS4-HMAC-SHA256-PAYLOAD).
    body = _aws_chunks(data, 65536, True, {})
    status, _, _ = _raw(
        server,
        "PUT",
        f"/{bucket}/signed",
        body,
        {
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": str(len(data)),
            "Authorization": "AWS4-HMAC-SHA256 Credential=x/y",
        },
    )
    assert status == 200
    assert s3.get_object(Bucket=bucket, Key="signed")["Body"].read() == data
    # Unsigned trailer inside HTTP chunked transfer encoding, no decoded length.
    body = _aws_chunks(data, 100_000, False, {"x-amz-checksum-crc32c": crc})
    status, headers, _ = _raw(
        server,
        "PUT",
        f"/{bucket}/trailer",
        iter([body[:777], body[777:]]),
        {
            "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            "Content-Encoding": "aws-chunked",
            "x-amz-trailer": "x-amz-checksum-crc32c",
            "Transfer-Encoding": "chunked",
        },
        encode_chunked=True,
    )
    assert status == 200 and headers["x-amz-checksum-crc32c"] == crc
    assert s3.get_object(Bucket=bucket, Key="trailer")["Body"].read() == data
    # A wrong checksum in the trailer is rejected.
    body = _aws_chunks(data, 100_000, True, {"x-amz-checksum-crc32c": _crc32c_b64(b"nope")})
    status, _, resp = _raw(
        server,
        "PUT",
        f"/{bucket}/trailer-bad",
        body,
        {
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": str(len(data)),
        },
    )
    assert status == 400 and b"BadDigest" in resp
    # Plain HTTP chunked, no aws-chunked.
    status, _, _ = _raw(
        server,
        "PUT",
        f"/{bucket}/plain-chunked",
        iter([data[:10], data[10:]]),
        {"Transfer-Encoding": "chunked"},
        encode_chunked=True,
    )
    assert status == 200
    assert s3.get_object(Bucket=bucket, Key="plain-chunked")["Body"].read() == data


def test_ranged_get(server: FastS3Server, s3: Any, bucket: str) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    s3.put_object(Bucket=bucket, Key="r", Body=data)

    def rng(spec: str) -> tuple[bytes, str]:
        r = s3.get_object(Bucket=bucket, Key="r", Range=spec)
        assert r["ResponseMetadata"]["HTTPStatusCode"] == 206
        return r["Body"].read(), r["ContentRange"]

    assert rng("bytes=2-5") == (data[2:6], "bytes 2-5/10240")
    assert rng("bytes=10000-") == (data[10000:], "bytes 10000-10239/10240")
    assert rng("bytes=-3") == (data[-3:], "bytes 10237-10239/10240")
    assert rng("bytes=-99999") == (data, "bytes 0-10239/10240")
    assert rng("bytes=10200-99999") == (data[10200:], "bytes 10200-10239/10240")
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="r", Range="bytes=10240-")
    assert _code(e) == "InvalidRange" and _status(e) == 416
    status, headers, _ = _raw(server, "GET", f"/{bucket}/r", headers={"Range": "bytes=20000-20001"})
    assert status == 416 and headers["content-range"] == "bytes */10240"


# --------------------------------------------------------------------------- multipart


def _mpu(
    s3: Any, bucket: str, key: str, parts: list[bytes], **create: Any
) -> tuple[str, list[dict[str, Any]]]:
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, **create)["UploadId"]
    done = []
    for i, p in enumerate(parts, 1):
        kw = {"ChecksumCRC32C": _crc32c_b64(p)} if create.get("ChecksumAlgorithm") == "CRC32C" else {}
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i, Body=p, **kw)
        entry = {"PartNumber": i, "ETag": r["ETag"]}
        if kw:
            assert r["ChecksumCRC32C"] == kw["ChecksumCRC32C"]
            entry["ChecksumCRC32C"] = kw["ChecksumCRC32C"]
        done.append(entry)
    return upload_id, done


def test_multipart_ranges_across_parts(s3: Any, bucket: str) -> None:
    parts = [_data(5 * MiB, 1), _data(5 * MiB, 2), _data(MiB + 7, 3)]
    data = b"".join(parts)
    upload_id, done = _mpu(s3, bucket, "mp", parts, ChecksumAlgorithm="CRC32C")
    r = s3.complete_multipart_upload(
        Bucket=bucket, Key="mp", UploadId=upload_id, MultipartUpload={"Parts": done}
    )
    assert r["ETag"].endswith('-3"') and r["Key"] == "mp" and r["Bucket"] == bucket
    assert r["ChecksumCRC32C"].endswith("-3")
    assert s3.get_object(Bucket=bucket, Key="mp")["Body"].read() == data
    b = 5 * MiB
    for a, z in [(b - 10, b + 10), (b - 1, 2 * b), (0, 3 * MiB), (2 * b - 3, len(data) - 1)]:
        got = s3.get_object(Bucket=bucket, Key="mp", Range=f"bytes={a}-{z}")["Body"].read()
        assert got == data[a : z + 1]
    assert s3.get_object(Bucket=bucket, Key="mp", Range="bytes=-100")["Body"].read() == data[-100:]
    p2 = s3.get_object(Bucket=bucket, Key="mp", PartNumber=2)
    assert p2["PartsCount"] == 3 and p2["Body"].read() == parts[1]
    head = s3.head_object(Bucket=bucket, Key="mp", PartNumber=3)
    assert head["ContentLength"] == len(parts[2]) and head["PartsCount"] == 3
    head = s3.head_object(Bucket=bucket, Key="mp", ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data) and head["ChecksumCRC32C"].endswith("-3")
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_multipart_full_object_checksum_and_part_copy(s3: Any, bucket: str) -> None:
    parts = [_data(5 * MiB, 4), _data(2 * MiB, 5)]
    data = b"".join(parts)
    upload_id, done = _mpu(s3, bucket, "full", parts, ChecksumAlgorithm="CRC32C", ChecksumType="FULL_OBJECT")
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key="full",
            UploadId=upload_id,
            MultipartUpload={"Parts": done},
            ChecksumCRC32C=_crc32c_b64(b"wrong"),
            ChecksumType="FULL_OBJECT",
        )
    assert _code(e) == "BadDigest"
    r = s3.complete_multipart_upload(
        Bucket=bucket,
        Key="full",
        UploadId=upload_id,
        MultipartUpload={"Parts": done},
        ChecksumCRC32C=_crc32c_b64(data),
        ChecksumType="FULL_OBJECT",
    )
    assert r["ChecksumCRC32C"] == _crc32c_b64(data) and r["ChecksumType"] == "FULL_OBJECT"
    head = s3.head_object(Bucket=bucket, Key="full", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"] == _crc32c_b64(data)
    # UploadPartCopy of two ranges of it, the first across its part boundary.
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="copy")["UploadId"]
    src = {"Bucket": bucket, "Key": "full"}
    ranges = [(1, 5 * MiB + 1), (0, 0)]
    done = []
    for i, (a, z) in enumerate(ranges, 1):
        r = s3.upload_part_copy(
            Bucket=bucket,
            Key="copy",
            UploadId=upload_id,
            PartNumber=i,
            CopySource=src,
            CopySourceRange=f"bytes={a}-{z}",
        )
        done.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
    s3.complete_multipart_upload(
        Bucket=bucket, Key="copy", UploadId=upload_id, MultipartUpload={"Parts": done}
    )
    got = s3.get_object(Bucket=bucket, Key="copy")["Body"].read()
    assert got == data[1 : 5 * MiB + 2] + data[:1]


def test_multipart_errors(s3: Any, bucket: str) -> None:
    small = [_data(MiB, 1), _data(MiB, 2)]
    upload_id, done = _mpu(s3, bucket, "e", small)
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket=bucket, Key="e", UploadId=upload_id, MultipartUpload={"Parts": done}
        )
    assert _code(e) == "EntityTooSmall"
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket=bucket, Key="e", UploadId=upload_id, MultipartUpload={"Parts": done[::-1]}
        )
    assert _code(e) == "InvalidPartOrder"
    bad = [{"PartNumber": 1, "ETag": '"0123456789abcdef0123456789abcdef"'}]
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket=bucket, Key="e", UploadId=upload_id, MultipartUpload={"Parts": bad}
        )
    assert _code(e) == "InvalidPart"
    # A single small part is fine (the last part may be any size).
    s3.complete_multipart_upload(
        Bucket=bucket, Key="e", UploadId=upload_id, MultipartUpload={"Parts": done[:1]}
    )
    assert s3.get_object(Bucket=bucket, Key="e")["Body"].read() == small[0]
    for call in (
        lambda: s3.upload_part(Bucket=bucket, Key="e", UploadId="nope", PartNumber=1, Body=b"x"),
        lambda: s3.complete_multipart_upload(
            Bucket=bucket, Key="e", UploadId="nope", MultipartUpload={"Parts": done}
        ),
        lambda: s3.abort_multipart_upload(Bucket=bucket, Key="e", UploadId=upload_id),
        lambda: s3.list_parts(Bucket=bucket, Key="e", UploadId="nope"),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "NoSuchUpload" and _status(e) == 404
    # If-None-Match on completion.
    upload_id, done = _mpu(s3, bucket, "e", [b"again"])
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket=bucket, Key="e", UploadId=upload_id, MultipartUpload={"Parts": done}, IfNoneMatch="*"
        )
    assert _code(e) == "PreconditionFailed" and _status(e) == 412
    s3.abort_multipart_upload(Bucket=bucket, Key="e", UploadId=upload_id)


def test_list_uploads_parts_and_abort(s3: Any, bucket: str) -> None:
    u1, _ = _mpu(s3, bucket, "logs/a", [b"x" * 10, b"y" * 20], ChecksumAlgorithm="CRC32C")
    u2, _ = _mpu(s3, bucket, "data/b", [b"z"])
    ups = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert sorted((u["Key"], u["UploadId"]) for u in ups) == sorted([("logs/a", u1), ("data/b", u2)])
    ups = s3.list_multipart_uploads(Bucket=bucket, Prefix="logs/")["Uploads"]
    assert [u["UploadId"] for u in ups] == [u1]
    parts = s3.list_parts(Bucket=bucket, Key="logs/a", UploadId=u1)
    assert [(p["PartNumber"], p["Size"]) for p in parts["Parts"]] == [(1, 10), (2, 20)]
    assert parts["Parts"][0]["ChecksumCRC32C"] == _crc32c_b64(b"x" * 10)
    page = s3.list_parts(Bucket=bucket, Key="logs/a", UploadId=u1, MaxParts=1)
    assert page["IsTruncated"] and page["NextPartNumberMarker"] == 1
    # Re-uploading a part replaces it.
    s3.upload_part(Bucket=bucket, Key="logs/a", UploadId=u1, PartNumber=2, Body=b"w" * 5)
    assert s3.list_parts(Bucket=bucket, Key="logs/a", UploadId=u1)["Parts"][1]["Size"] == 5
    assert (
        s3.abort_multipart_upload(Bucket=bucket, Key="logs/a", UploadId=u1)["ResponseMetadata"][
            "HTTPStatusCode"
        ]
        == 204
    )
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket)["Uploads"]] == [u2]
    with pytest.raises(ClientError) as e:
        s3.abort_multipart_upload(Bucket=bucket, Key="logs/a", UploadId=u1)
    assert _code(e) == "NoSuchUpload"


# --------------------------------------------------------------------------- listing and deleting


def _keys(pages: Any) -> tuple[list[str], list[str]]:
    keys, prefixes = [], []
    for page in pages:
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    return keys, prefixes


def test_list_objects_v2(s3: Any, bucket: str) -> None:
    names = ["a/1", "a/2", "a/3", "b/1", "c", "d e+f", "dir/x/y", "é/ü"]
    for k in names:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    pag = s3.get_paginator("list_objects_v2")
    assert _keys(pag.paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})) == (sorted(names), [])
    assert _keys(pag.paginate(Bucket=bucket, Delimiter="/")) == (["c", "d e+f"], ["a/", "b/", "dir/", "é/"])
    # Pagination through common prefixes never repeats one.
    assert _keys(pag.paginate(Bucket=bucket, Delimiter="/", PaginationConfig={"PageSize": 1})) == (
        ["c", "d e+f"],
        ["a/", "b/", "dir/", "é/"],
    )
    assert _keys(pag.paginate(Bucket=bucket, Prefix="a/")) == (["a/1", "a/2", "a/3"], [])
    assert _keys(pag.paginate(Bucket=bucket, Prefix="dir/", Delimiter="/")) == ([], ["dir/x/"])
    r = s3.list_objects_v2(Bucket=bucket, StartAfter="b/1")
    assert [o["Key"] for o in r["Contents"]] == ["c", "d e+f", "dir/x/y", "é/ü"]
    r = s3.list_objects_v2(Bucket=bucket, MaxKeys=3)
    assert r["IsTruncated"] and r["KeyCount"] == 3 and r["NextContinuationToken"]
    obj = r["Contents"][0]
    assert obj["Size"] == 3 and obj["ETag"].startswith('"') and obj["StorageClass"] == "STANDARD"
    assert s3.list_objects_v2(Bucket=bucket, Prefix="zzz")["KeyCount"] == 0


def test_list_objects_v1(s3: Any, bucket: str) -> None:
    names = [f"k{i:02d}" for i in range(7)] + ["p/1", "p/2"]
    for k in names:
        s3.put_object(Bucket=bucket, Key=k, Body=b"")
    pag = s3.get_paginator("list_objects")
    assert _keys(pag.paginate(Bucket=bucket, PaginationConfig={"PageSize": 3})) == (sorted(names), [])
    assert _keys(pag.paginate(Bucket=bucket, Delimiter="/", PaginationConfig={"PageSize": 2})) == (
        names[:7],
        ["p/"],
    )
    r = s3.list_objects(Bucket=bucket, Marker="k04")
    assert [o["Key"] for o in r["Contents"]] == ["k05", "k06", "p/1", "p/2"]


def test_delete_objects(s3: Any, bucket: str) -> None:
    for k in ("x", "y", "z"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"1")
    r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "x"}, {"Key": "y"}, {"Key": "missing"}]})
    assert sorted(d["Key"] for d in r["Deleted"]) == ["missing", "x", "y"]
    r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "z"}], "Quiet": True})
    assert not r.get("Deleted") and not r.get("Errors")
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_copy_object_shares_data(s3: Any, bucket: str) -> None:
    data = _data(3 * MiB + 1)
    s3.put_object(Bucket=bucket, Key="src", Body=data, Metadata={"m": "1"})
    s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"})
    s3.delete_object(Bucket=bucket, Key="src")
    s3.put_object(Bucket=bucket, Key="other", Body=_data(3 * MiB + 1, 9))  # may reuse freed slabs
    got = s3.get_object(Bucket=bucket, Key="dst")
    assert got["Body"].read() == data and got["Metadata"] == {"m": "1"}


# --------------------------------------------------------------------------- transfer manager, stats, modes


def test_s3transfer_roundtrip(server: FastS3Server, s3: Any, bucket: str) -> None:
    from boto3.s3.transfer import TransferConfig

    data = _data(20 * MiB + 123, 5)
    cfg = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)
    before = server.request_counts
    s3.upload_fileobj(io.BytesIO(data), bucket, "big", Config=cfg)
    out = io.BytesIO()
    s3.download_fileobj(bucket, "big", out, Config=cfg)
    assert out.getvalue() == data
    counts = server.request_counts - before
    assert counts["UploadPart"] == 3 and counts["CompleteMultipartUpload"] == 1
    assert counts["GetObject"] >= 3  # ranged GETs


def test_stats_and_virtual_host(server: FastS3Server, s3: Any, bucket: str) -> None:
    server.reset_stats()
    s3.put_object(Bucket=bucket, Key="s", Body=b"12345")
    s3.get_object(Bucket=bucket, Key="s")["Body"].read()
    st = server.stats()
    assert st["request_counts"] == {"PutObject": 1, "GetObject": 1}
    assert st["bytes_in"] >= 5 and st["bytes_out"] == 5 and st["server_cpu_seconds"] >= 0
    status, _, body = _raw(server, "GET", "/s", headers={"Host": f"{bucket}.localhost:{server.port}"})
    assert status == 200 and body == b"12345"
    status, _, body = _raw(server, "GET", "/__stats__")
    assert status == 200 and json.loads(body)["request_counts"]["GetObject"] == 2


def test_child_process_mode() -> None:
    with FastS3Server() as srv:
        status, _, _ = _raw(srv, "PUT", "/child")
        assert status == 200
        status, _, _ = _raw(srv, "PUT", "/child/k", b"x" * 1000)
        assert status == 200
        status, _, body = _raw(srv, "GET", "/child/k", headers={"Range": "bytes=10-19"})
        assert status == 206 and body == b"x" * 10
        st = srv.stats()
        assert st["request_counts"] == {"CreateBucket": 1, "PutObject": 1, "GetObject": 1}
        assert st["pid"] != os.getpid() and srv.server_cpu_seconds() > 0
        srv.reset()
        status, _, body = _raw(srv, "GET", "/child/k")
        assert status == 404 and b"NoSuchBucket" in body
        assert srv.stats()["requests"] == 1


# --------------------------------------------------------------------------- other clients


def test_s3fs_roundtrip(server: FastS3Server, bucket: str) -> None:
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(
        key="any",
        secret="thing",
        skip_instance_cache=True,
        client_kwargs={"endpoint_url": server.endpoint_url, "region_name": "us-east-1"},
    )
    data = _data(12 * MiB + 9, 7)
    with fs.open(f"{bucket}/dir/a.bin", "wb", block_size=5 * MiB) as f:  # multipart
        f.write(data)
    fs.pipe(f"{bucket}/small.txt", b"hi")
    assert sorted(fs.ls(bucket)) == [f"{bucket}/dir", f"{bucket}/small.txt"]
    assert fs.info(f"{bucket}/dir/a.bin")["size"] == len(data)
    assert fs.cat(f"{bucket}/dir/a.bin") == data
    assert (
        fs.cat_file(f"{bucket}/dir/a.bin", start=5 * MiB - 3, end=5 * MiB + 3)
        == data[5 * MiB - 3 : 5 * MiB + 3]
    )
    with fs.open(f"{bucket}/dir/a.bin", "rb", block_size=MiB) as f:
        f.seek(7 * MiB)
        assert f.read(100) == data[7 * MiB : 7 * MiB + 100]
    fs.rm(f"{bucket}/dir", recursive=True)
    assert fs.ls(bucket, refresh=True) == [f"{bucket}/small.txt"]


def test_s3torchconnector_roundtrip(
    server: FastS3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("s3torchconnector")
    from s3torchconnector._s3client import S3Client, S3ClientConfig
    from s3torchconnector.s3reader import S3ReaderConstructor

    for k, v in {
        "AWS_ACCESS_KEY_ID": "any",
        "AWS_SECRET_ACCESS_KEY": "thing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    client = S3Client(
        region="us-east-1",
        endpoint=server.endpoint_url,
        s3client_config=S3ClientConfig(force_path_style=True, part_size=5 * MiB),
    )
    data = _data(17 * MiB + 11, 11)
    before = server.request_counts
    writer = client.put_object(bucket, "crt.bin")
    writer.write(data)
    writer.close()
    counts = server.request_counts - before
    assert counts["CompleteMultipartUpload"] == 1 and counts["UploadPart"] >= 2
    assert client.get_object(bucket, "crt.bin").read() == data
    reader = client.get_object(bucket, "crt.bin", reader_constructor=S3ReaderConstructor.range_based())
    for off, n in [(5 * MiB - 50, 100), (10 * MiB - 1, 2), (len(data) - 10, 10), (0, 3 * MiB)]:
        reader.seek(off)
        assert reader.read(n) == data[off : off + n]
