"""Replicated-state load (DDP style) on N gloo ranks: bytes the store serves and wall time, shared vs direct reads.

    PYTHONPATH=. python -m benchmarks.replicated --world 4 --mib 64

Each rank holds the same tensors; the checkpoint is saved once, then loaded with
``share_reads=True`` (each byte range fetched once per job, shared over gloo)
and ``share_reads=False`` (every rank reads everything), through a FaultProxy
that counts the bytes moto serves. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
import uuid

import torch
import torch.distributed as dist


def _state(mib: int, zero: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = max(1, mib // 4)
    sd = {f"w{i}": torch.randn(1024 * 1024, generator=g) for i in range(n)}  # 4 MiB each
    return {k: torch.zeros_like(v) for k, v in sd.items()} if zero else sd


def _worker(rank: int, world: int, uri: str, opts: dict, load_opts: dict, mib: int) -> float:
    import cloudckpt

    sd = _state(mib, zero=True)
    dist.barrier()
    t = time.perf_counter()
    cloudckpt.load(sd, uri, **load_opts)
    dist.barrier()
    return time.perf_counter() - t


def _save(rank: int, world: int, uri: str, opts: dict, mib: int) -> bool:
    import cloudckpt

    cloudckpt.save(_state(mib), uri, **opts)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import os

    import boto3

    from cloudckpt_testing.faultproxy import FaultProxy
    from cloudckpt_testing.s3 import TEST_CREDENTIALS, MotoS3Server
    from tests.dist import run_world

    os.environ.update(TEST_CREDENTIALS)
    with MotoS3Server() as s3:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/replicated"
        opts = {"endpoint_url": s3.endpoint_url}
        run_world(args.world, _save, uri, opts, args.mib, timeout=900)
        size = sum(o["Size"] for o in boto3.client("s3", endpoint_url=s3.endpoint_url).list_objects_v2(
            Bucket=bucket, Prefix="replicated/")["Contents"])
        print("| reads | world | checkpoint MiB | store served (x checkpoint) | GETs | "
              f"load wall s (min of {args.repeats}) |")
        print("|---|---|---|---|---|---|")
        for share in (False, True):
            walls, served, gets = [], 0, 0
            for _ in range(args.repeats):
                with FaultProxy(s3.endpoint_url, api="s3") as proxy:
                    lo = dict(opts, endpoint_url=proxy.url, share_reads=share)
                    walls.append(max(run_world(args.world, _worker, uri, opts, lo, args.mib, timeout=900)))
                    served = proxy.served_bytes
                    gets = proxy.stats()["requests"].get("GetObject", 0)
            name = "shared (default)" if share else "direct (share_reads=False)"
            print(f"| {name} | {args.world} | {size / 2**20:.1f} | {served / size:.2f}x | {gets} | {min(walls):.2f} |")


if __name__ == "__main__":
    main()
