"""Measure FastS3Server itself: raw single-stream http.client PUT/GET, then boto3.

    python benchmarks/fast_s3_selfcheck.py [--gib 1] [--boto-mib 256] [--runs 3]

Prints GB/s and server CPU seconds per GB (from the server's /__stats__). The
server runs in a child process, so its CPU is measured apart from the client's.
The first PUT of a size warms the server's slab pool (fresh pages are expensive
on these VMs); every measured PUT after it reuses that memory, as a long-running
benchmark server would.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cloudckpt_testing.fast_s3 import FastS3Server  # noqa: E402


def _raw(server: FastS3Server, data: bytes, out: memoryview, runs: int) -> None:
    n = len(data)
    conn = http.client.HTTPConnection(server.host, server.port)
    conn.request("PUT", "/bench")
    conn.getresponse().read()

    def put() -> None:
        conn.request("PUT", "/bench/raw", body=data, headers={"Content-Length": str(n)})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status

    def get() -> None:
        conn.request("GET", "/bench/raw")
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        got = 0
        while got < n:
            k = resp.readinto(out[got:])
            if not k:
                raise RuntimeError("short GET")
            got += k

    put()  # warm the slab pool: an overwrite holds old and new copies at once
    put()
    for name, fn in (("PUT", put), ("GET", get)):
        rates, cpus, ccpus = [], [], []
        for _ in range(runs):
            server.reset_stats()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            dt, ccpu = time.perf_counter() - t0, time.process_time() - c0
            cpu = server.stats()["server_cpu_seconds"]
            rates.append(n / dt / 1e9)
            cpus.append(cpu / (n / 1e9))
            ccpus.append(ccpu / (n / 1e9))
        print(
            f"raw http.client {name} {n / 2**30:.2f} GiB: median {statistics.median(rates):.2f} GB/s "
            f"(runs {', '.join(f'{r:.2f}' for r in rates)}), server CPU "
            f"{statistics.median(cpus):.3f} s/GB, client CPU {statistics.median(ccpus):.3f} s/GB"
        )
    assert bytes(out[:4096]) == data[:4096] and bytes(out[-4096:]) == data[-4096:]
    conn.close()


def _boto(server: FastS3Server, data: bytes, runs: int) -> None:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        print("boto3 not installed; skipping")
        return
    s3 = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id="x",
        aws_secret_access_key="x",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    n = len(data)
    s3.put_object(Bucket="bench", Key="boto", Body=data)  # warm
    for name in ("put_object", "get_object"):
        rates, cpus = [], []
        for _ in range(runs):
            server.reset_stats()
            t0 = time.perf_counter()
            if name == "put_object":
                s3.put_object(Bucket="bench", Key="boto", Body=data)
            else:
                body = s3.get_object(Bucket="bench", Key="boto")["Body"].read()
                assert len(body) == n
                del body
            dt = time.perf_counter() - t0
            rates.append(n / dt / 1e9)
            cpus.append(server.stats()["server_cpu_seconds"] / (n / 1e9))
        print(
            f"boto3 {name} {n / 2**20:.0f} MiB: median {statistics.median(rates):.2f} GB/s "
            f"(runs {', '.join(f'{r:.2f}' for r in rates)}), server CPU {statistics.median(cpus):.3f} s/GB"
        )


def main() -> None:
    """Run the measurements and print one line per operation."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="raw PUT/GET size in GiB")
    ap.add_argument("--boto-mib", type=int, default=256, help="boto3 object size in MiB (0 skips)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    n = int(args.gib * 2**30)
    data = os.urandom(1 << 20) * (n >> 20)
    out = memoryview(bytearray(n))  # touched once here so the GETs do not time page faults
    with FastS3Server() as server:
        _raw(server, data, out, args.runs)
        del out
        if args.boto_mib:
            _boto(server, data[: args.boto_mib << 20], args.runs)
        s = server.stats()
        print(f"server pool {s['pool_bytes'] / 2**30:.2f} GiB, max RSS {s['max_rss_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
