"""Load a checkpoint into CUDA tensors with cloudckpt and compare with torch's own pinned copy bandwidth.

    python -m benchmarks.cuda_load                      # 1 GiB of 32 MiB tensors
    python -m benchmarks.cuda_load --total-mib 4096 --json out.json

Three figures on the same machine:

* **torch pinned H2D**: ``tensor.pin_memory()`` then ``.cuda(non_blocking=True)``
  (a copy into a preallocated device tensor), timed with CUDA events: the
  host-to-device ceiling;
* **cloudckpt load to CPU**: the same checkpoint loaded into CPU tensors from
  the fast S3 server (the fetch ceiling, no device copy);
* **cloudckpt load to CUDA**: loaded into CUDA tensors (the reader reads into
  reused pinned blocks and copies them on a side stream, see ``_Copier`` in
  cloudckpt/reader.py), wall time up to ``torch.cuda.synchronize()``.

The CUDA load cannot beat either ceiling; the report gives it as GB/s and as a
share of ``min(pinned H2D, load to CPU)``. Every loaded value is checked.
Without a CUDA device it prints "no CUDA device" and exits 0 having measured
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

MiB = 1 << 20
GB = 1e9
NO_CUDA = "no CUDA device: benchmarks.cuda_load measures host-to-device loads and needs a GPU; nothing was measured"


def torch_pinned_h2d_gbps(nbytes: int, repeats: int = 5) -> float:
    """Median GB/s of copying a pinned host tensor of ``nbytes`` into a device tensor (CUDA events)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)  # warm-up: context, allocator, DMA mappings
    torch.cuda.synchronize()
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        rates.append(nbytes / (start.elapsed_time(end) / 1e3) / GB)
    return statistics.median(rates)


def _load_gbps(reader_factory: Any, uri: str, target: dict[str, Any], nbytes: int, cuda: bool) -> float:
    import torch
    import torch.distributed.checkpoint as dcp

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    dcp.load(target, checkpoint_id=uri, storage_reader=reader_factory(), no_dist=True)
    if cuda:
        torch.cuda.synchronize()
    return nbytes / (time.perf_counter() - t0) / GB


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Save a checkpoint to the fast S3 server, then measure the three figures."""
    import torch
    import torch.distributed.checkpoint as dcp

    import cloudckpt
    from benchmarks.methods import build_state_dict, compare, tensor_bytes
    from benchmarks.runner import environment
    from benchmarks.servers import BUCKET, CREDENTIALS, REGION
    from cloudckpt_testing.fast_s3 import FastS3Server
    from cloudckpt_testing.s3 import s3_client

    os.environ.update(CREDENTIALS)
    sd = {k: v for k, v in build_state_dict(args.total_mib * MiB, args.tensor_mib * MiB).items()
          if isinstance(v, torch.Tensor)}
    nbytes = tensor_bytes(sd)
    uri = f"s3://{BUCKET}/cuda-load"
    out: dict[str, Any] = {"mode": "cuda_load", "bytes": nbytes, "device": torch.cuda.get_device_name(0),
                           "environment": environment()}
    out["torch_pinned_h2d_gbps"] = torch_pinned_h2d_gbps(max(t.nbytes for t in sd.values()) if args.per_tensor
                                                         else nbytes)
    with FastS3Server(prefault_bytes=nbytes + 64 * MiB) as server:
        s3_client(server.endpoint_url).create_bucket(Bucket=BUCKET)
        writer = cloudckpt.S3StorageWriter(uri, endpoint_url=server.endpoint_url, region=REGION)
        dcp.save(sd, checkpoint_id=uri, storage_writer=writer, no_dist=True)

        def reader() -> Any:
            return cloudckpt.S3StorageReader(uri, endpoint_url=server.endpoint_url)

        cpu_target = {k: torch.zeros_like(v) for k, v in sd.items()}
        cuda_target = {k: torch.zeros_like(v, device="cuda") for k, v in sd.items()}
        _load_gbps(reader, uri, {k: v.clone() for k, v in cpu_target.items()}, nbytes, False)  # warm-up
        out["load_cpu_gbps"] = statistics.median(
            _load_gbps(reader, uri, cpu_target, nbytes, False) for _ in range(args.repeat))
        out["load_cuda_gbps"] = statistics.median(
            _load_gbps(reader, uri, cuda_target, nbytes, True) for _ in range(args.repeat))
    problem = compare({k: v.cpu() for k, v in cuda_target.items()}, sd) or compare(cpu_target, sd)
    if problem:
        raise AssertionError(f"loaded state dict differs from the saved one: {problem}")
    ceiling = min(out["torch_pinned_h2d_gbps"], out["load_cpu_gbps"])
    out["cuda_share_of_ceiling"] = out["load_cuda_gbps"] / ceiling
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring). Exit 0 without a GPU, having printed :data:`NO_CUDA`."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cuda_load", description=__doc__.split("\n")[0])
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--tensor-mib", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--per-tensor", action="store_true",
                    help="time torch's copy at one tensor's size instead of the whole checkpoint's")
    ap.add_argument("--json", help="also write the report as JSON to this path")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    report = run(args)
    print(f"### CUDA load on {report['device']}: {report['bytes'] / MiB:.0f} MiB, median of {args.repeat}\n")
    print("| torch pinned H2D GB/s | cloudckpt load to CPU GB/s | cloudckpt load to CUDA GB/s | "
          "CUDA load / min(H2D, CPU load) |\n|---|---|---|---|")
    print(f"| {report['torch_pinned_h2d_gbps']:.2f} | {report['load_cpu_gbps']:.2f} | "
          f"{report['load_cuda_gbps']:.2f} | {report['cuda_share_of_ceiling'] * 100:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
