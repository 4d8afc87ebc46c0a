"""Unit tests of checkpoint URI parsing (pure functions)."""

from __future__ import annotations

import os

import pytest

from cloudckpt.errors import InvalidURIError, UnsupportedSchemeError
from cloudckpt.uri import StorageURI, parse_uri


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/run/step-1", StorageURI("s3", "bucket", "run/step-1")),
        ("s3://bucket/run/step-1/", StorageURI("s3", "bucket", "run/step-1")),
        ("s3://my.bucket-1", StorageURI("s3", "my.bucket-1", "")),
        ("gs://bkt_under/x", StorageURI("gs", "bkt_under", "x")),
        ("S3://bucket/p", StorageURI("s3", "bucket", "p")),
        ("file:///tmp/ck", StorageURI("file", "", "/tmp/ck")),
    ],
)
def test_valid(uri, expected):
    assert parse_uri(uri) == expected


def test_local_paths_are_absolute(tmp_path):
    assert parse_uri(str(tmp_path / "a")) == StorageURI("file", "", str(tmp_path / "a"))
    assert parse_uri("rel/dir").prefix == os.path.abspath("rel/dir")
    assert parse_uri(tmp_path).prefix == str(tmp_path)


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("s3:/x", "did you mean 's3://x'"),
        ("s3://", "no bucket name"),
        ("s3:///prefix", "no bucket name"),
        ("s3://UPPER/x", "invalid bucket name"),
        ("s3://ab/x", "invalid bucket name"),
        ("s3://-bad/x", "invalid bucket name"),
        ("s3://a..b/x", "invalid bucket name"),
        ("s3://192.168.1.1/x", "invalid bucket name"),
        ("s3://bucket/a//b", "doubled slash"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/a?x=1", "query strings"),
        ("gs://b_/x", "invalid bucket name"),
        ("file://host/path", "names a host"),
        ("", "empty"),
    ],
)
def test_malformed_uris_name_the_uri_and_the_fix(uri, fragment):
    with pytest.raises(InvalidURIError) as info:
        parse_uri(uri)
    msg = str(info.value)
    assert fragment in msg
    if uri:
        assert repr(uri) in msg or uri in msg


@pytest.mark.parametrize("uri", ["hdfs://nn/path", "azure://c/p", "gcs://bucket/p", "http://host/x"])
def test_unknown_schemes(uri):
    with pytest.raises(UnsupportedSchemeError, match="gs://"):
        parse_uri(uri)


def test_key_and_child():
    u = parse_uri("s3://bucket/root")
    assert u.key(".metadata") == "root/.metadata"
    assert str(u.child("step-10")) == "s3://bucket/root/step-10"
    assert parse_uri("s3://bucket").key("x") == "x"


def test_non_string_is_refused():
    with pytest.raises(InvalidURIError, match="string"):
        parse_uri(123)  # type: ignore[arg-type]
