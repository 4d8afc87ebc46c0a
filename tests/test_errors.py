"""Bad input gives typed errors that name the URI/object and say what to do."""

from __future__ import annotations

import time

import pytest
import torch

import cloudckpt
from tests.conftest import closed_port


@pytest.mark.parametrize("uri", ["s3:/x", "s3://", "s3://Bad_Bucket/x", "gs://-x/y", "ftp://host/x", "gcs://b/x"])
def test_malformed_uri_fails_before_anything_happens(uri):
    with pytest.raises(cloudckpt.InvalidURIError) as info:
        cloudckpt.save({"a": torch.ones(1)}, uri, no_dist=True)
    assert uri in str(info.value)


def test_writer_rejects_a_uri_of_another_scheme():
    with pytest.raises(cloudckpt.InvalidURIError, match="storage_writer"):
        cloudckpt.S3StorageWriter("gs://bucket/x")


def test_missing_bucket(cloud_backend):
    uri = f"{cloud_backend.uri()[:5]}no-such-bucket-{time.monotonic_ns()}/ck"
    with pytest.raises(cloudckpt.BucketNotFoundError) as info:
        cloudckpt.save({"a": torch.ones(10)}, uri, no_dist=True, **cloud_backend.options)
    msg = str(info.value)
    assert "no-such-bucket" in msg and "create it" in msg


def test_unreachable_endpoint_fails_fast(cloud_backend):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    opts = dict(cloud_backend.options, endpoint_url=endpoint)
    start = time.monotonic()
    with pytest.raises(cloudckpt.EndpointUnreachableError) as info:
        cloudckpt.save({"a": torch.ones(10)}, cloud_backend.uri("ck"), no_dist=True, **opts)
    elapsed = time.monotonic() - start
    assert endpoint in str(info.value)
    assert elapsed < 45, f"took {elapsed:.1f} s to give up"
    with pytest.raises(cloudckpt.EndpointUnreachableError):
        cloudckpt.load({"a": torch.ones(10)}, cloud_backend.uri("ck"), no_dist=True, **opts)


def test_load_shape_mismatch_is_reported(backend):
    uri = backend.uri("shape")
    cloudckpt.save({"a": torch.ones(4, 4)}, uri, no_dist=True, **backend.options)
    with pytest.raises(BaseException, match="a"):
        cloudckpt.load({"a": torch.ones(5, 5)}, uri, no_dist=True, **backend.options)


def test_repr_never_shows_credentials(moto_server):
    w = cloudckpt.S3StorageWriter("s3://bucket/x", endpoint_url=moto_server.endpoint_url,
                                  aws_access_key_id="AKIDSENTINEL", aws_secret_access_key="SECRET-SENTINEL-123")
    r = cloudckpt.S3StorageReader("s3://bucket/x", aws_secret_access_key="SECRET-SENTINEL-123")
    for obj in (w, r, w.store):
        assert "SECRET-SENTINEL" not in repr(obj)
