"""The fast S3 server's shaped mode, the shaped benchmark's model, and the CUDA load benchmark's no-GPU path.

The shaping tests talk to a real server process through a real boto3 client:
a single connection's upload and download must take at least ``size / cap``
(the cap is enforced) and at most about twice that (the pacing does not
over-throttle), and every response's first byte must wait the latency.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.shaped import connections_needed, ideal_bps, request_efficiency, smallest_efficient_part
from cloudckpt_testing.fast_s3 import FastS3Server, Shaping
from cloudckpt_testing.s3 import s3_client

MiB = 1 << 20
LATENCY = 0.1
CAP = 4e6  # bytes/s per connection, each way
SIZE = 4 * MiB
BURST = 64 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_connection_client(endpoint: str) -> Any:
    from botocore.config import Config

    # One pooled connection, no retries: every request below rides the same socket.
    return s3_client(endpoint, config=Config(max_pool_connections=1, retries={"max_attempts": 1},
                                             read_timeout=60, connect_timeout=10))


@pytest.fixture(scope="module")
def shaped() -> Iterator[FastS3Server]:
    with FastS3Server(shaping=Shaping(latency=LATENCY, conn_rate=CAP, burst=BURST)) as server:
        s3_client(server.endpoint_url).create_bucket(Bucket="shaped")
        yield server


def test_single_connection_upload_is_capped(shaped: FastS3Server) -> None:
    client = _one_connection_client(shaped.endpoint_url)
    body = os.urandom(SIZE)
    t0 = time.perf_counter()
    client.put_object(Bucket="shaped", Key="up", Body=body)
    elapsed = time.perf_counter() - t0
    ideal = SIZE / CAP
    assert ideal <= elapsed <= 2 * ideal + LATENCY, f"upload of {SIZE} B took {elapsed:.3f} s; ideal {ideal:.3f} s"
    assert shaped.stats()["bytes_in"] >= SIZE


def test_single_connection_download_is_capped(shaped: FastS3Server) -> None:
    client = _one_connection_client(shaped.endpoint_url)
    body = os.urandom(SIZE)
    client.put_object(Bucket="shaped", Key="down", Body=body)
    t0 = time.perf_counter()
    got = client.get_object(Bucket="shaped", Key="down")["Body"].read()
    elapsed = time.perf_counter() - t0
    assert got == body
    ideal = SIZE / CAP
    assert ideal <= elapsed <= 2 * ideal + LATENCY, f"download of {SIZE} B took {elapsed:.3f} s; ideal {ideal:.3f} s"


def test_first_byte_latency_is_observed(shaped: FastS3Server) -> None:
    client = _one_connection_client(shaped.endpoint_url)
    client.put_object(Bucket="shaped", Key="small", Body=b"x" * 100)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        client.head_object(Bucket="shaped", Key="small")
        times.append(time.perf_counter() - t0)
    # Every response waits the latency (the connection is reused, so no connect time hides in it) ...
    assert min(times) >= LATENCY, times
    # ... and a tiny request costs about one latency, not one per byte or per pacing slice.
    assert min(times) < LATENCY + 1.0, times


def test_errors_are_delayed_but_control_requests_are_not(shaped: FastS3Server) -> None:
    client = _one_connection_client(shaped.endpoint_url)
    t0 = time.perf_counter()
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket="shaped", Key="missing")
    assert time.perf_counter() - t0 >= LATENCY
    t0 = time.perf_counter()
    stats = shaped.stats()  # the benchmark's own bookkeeping must not pay the network's price
    assert time.perf_counter() - t0 < LATENCY
    assert stats["peak_in_flight"] >= 1 and stats["in_flight"] == 0


def test_link_cap_is_shared_by_connections() -> None:
    link = 4e6
    size = 2 * MiB
    with FastS3Server(in_process=True, shaping=Shaping(conn_rate=100e6, link_rate=link, burst=BURST)) as server:
        s3_client(server.endpoint_url).create_bucket(Bucket="link")
        clients = [_one_connection_client(server.endpoint_url) for _ in range(2)]
        body = os.urandom(size)
        errors: list[BaseException] = []

        def put(client: Any, key: str) -> None:
            try:
                client.put_object(Bucket="link", Key=key, Body=body)
            except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=put, args=(c, f"k{i}")) for i, c in enumerate(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        elapsed = time.perf_counter() - t0
        assert not errors, errors
        assert server.stats()["peak_in_flight"] == 2
    # Two connections at 100 MB/s each would take 0.04 s; the 4 MB/s link makes it about 1 s.
    ideal = (2 * size - 2 * BURST) / link
    assert ideal <= elapsed <= 2 * (2 * size / link), f"{elapsed:.3f} s for {2 * size} B over a {link:.0f} B/s link"


def test_shaping_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Shaping(latency=-1)
    with pytest.raises(ValueError):
        Shaping(conn_rate=0)
    with pytest.raises(ValueError):
        Shaping(burst=0)
    assert not Shaping().active
    assert Shaping(latency=0.02).active and not Shaping(latency=0.02).paced


# --------------------------------------------------------------------------- the benchmark's model


def test_ideal_is_min_of_link_and_connections_times_cap() -> None:
    assert ideal_bps(25e6, 4) == 100e6
    assert ideal_bps(25e6, 4, link=200e6) == 100e6
    assert ideal_bps(25e6, 16, link=200e6) == 200e6
    assert ideal_bps(90e6, 1) == 90e6
    with pytest.raises(ValueError):
        ideal_bps(25e6, 0)
    with pytest.raises(ValueError):
        ideal_bps(0, 4)


def test_connections_needed_and_part_sizing() -> None:
    assert connections_needed(200e6, 25e6) == 8
    assert connections_needed(201e6, 25e6) == 9
    assert connections_needed(12.5e9, 90e6) == 139  # 100 Gbit/s NIC at ~90 MB/s per S3 connection
    # 30 ms of a 25 MB/s connection is 750 kB; 90% efficiency needs nine of them per request.
    part = smallest_efficient_part(25e6, 0.030, 0.9)
    assert part == 6_750_000
    assert request_efficiency(part, 25e6, 0.030) == pytest.approx(0.9)
    assert request_efficiency(32 * MiB, 25e6, 0.030) > 0.97


# --------------------------------------------------------------------------- CUDA load benchmark, no GPU here


def test_cuda_load_benchmark_exits_cleanly_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-GPU path cannot be exercised here")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cuda_load", "--total-mib", "8"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
