"""Full vs incremental saves of a LoRA-like state: client bytes sent, wall time and client CPU.

    python benchmarks/incremental.py [--frozen-mib 1024] [--trainable-mib 16] [--runs 2] [--json]

The state is ``--frozen-mib`` of frozen weights (64 MiB tensors) plus
``--trainable-mib`` of adapters (1 MiB tensors) and a step counter, saved to the
fast in-memory S3 server (:class:`cloudckpt_testing.fast_s3.FastS3Server`, a
child process, so its CPU is not the client's). Each run saves, in order:

* ``full``: an ordinary save (no base);
* ``incremental (CRC)``: the adapters changed, base = the full save; unchanged
  items are found by the CRC32C of their staged bytes and copied server side
  (UploadPartCopy of the unchanged byte ranges);
* ``incremental (frozen_keys)``: the adapters changed again, base = the previous
  step, the frozen weights named by ``frozen_keys``: not staged, not
  checksummed, copied whole (CopyObject).

Client bytes are the request bytes the server received (``bytes_in`` of its
own counters: bodies of every request); client CPU is this process's user +
system time over the save (all threads). The goal of issue 17: incremental
client CPU and bytes at most 5% of a full save's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MiB = 1024 * 1024


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def make_state(frozen_mib: int, trainable_mib: int) -> tuple[dict[str, Any], list[str], list[str]]:
    """Frozen 64 MiB tensors (the last one smaller if needed), 1 MiB adapters, a step counter."""
    import torch

    frozen, trainable = [], []
    sd: dict[str, Any] = {}
    left = frozen_mib
    i = 0
    while left > 0:
        mib = min(64, left)
        name = f"model.layers.{i}.weight"
        sd[name] = torch.randn(mib * MiB // 4)
        frozen.append(name)
        left -= mib
        i += 1
    for j in range(trainable_mib):
        name = f"model.layers.{j}.lora_A"
        sd[name] = torch.randn(MiB // 4)
        trainable.append(name)
    sd["step"] = 0
    return sd, frozen, trainable


def _save(sd: dict[str, Any], uri: str, server: Any, opts: dict[str, Any], **writer_opts: Any) -> dict[str, Any]:
    import cloudckpt
    from cloudckpt.writer import writer_for

    writer = writer_for(uri, **opts, **writer_opts)
    server.reset_stats()
    cpu0, t0 = _cpu(), time.perf_counter()
    cloudckpt.save(sd, uri, storage_writer=writer, no_dist=True)
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    stats = server.stats()
    inc = writer.last_incremental or {}
    return {"wall_s": wall, "client_cpu_s": cpu, "bytes_sent": stats["bytes_in"], "requests": stats["requests"],
            "copied_bytes": inc.get("copied_bytes", 0), "uploaded_bytes": inc.get("uploaded_bytes", 0),
            "request_counts": stats["request_counts"]}


def run(frozen_mib: int, trainable_mib: int, runs: int) -> dict[str, Any]:
    """Measure each kind of save ``runs`` times; medians."""
    import torch

    from cloudckpt_testing.fast_s3 import FastS3Server
    from cloudckpt_testing.s3 import TEST_CREDENTIALS, s3_client

    for k, v in TEST_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    sd, frozen, trainable = make_state(frozen_mib, trainable_mib)
    results: dict[str, list[dict[str, Any]]] = {"full": [], "incremental (CRC)": [], "incremental (frozen_keys)": []}
    with FastS3Server() as server:
        s3_client(server.endpoint_url).create_bucket(Bucket="bench")
        opts = {"endpoint_url": server.endpoint_url}
        step = 0
        for r in range(runs + 1):  # the first round warms connections, pages and the server's slab pool
            def train() -> None:
                nonlocal step
                step += 1
                for name in trainable:
                    sd[name] = torch.randn(MiB // 4)
                sd["step"] = step

            train()
            full = _save(sd, f"s3://bench/r{r}/step-{step}", server, opts)
            base = f"s3://bench/r{r}/step-{step}"
            train()
            crc = _save(sd, f"s3://bench/r{r}/step-{step}", server, opts, base_checkpoint_id=base)
            base = f"s3://bench/r{r}/step-{step}"
            train()
            hint = _save(sd, f"s3://bench/r{r}/step-{step}", server, opts, base_checkpoint_id=base,
                         frozen_keys=frozen)
            if r:
                results["full"].append(full)
                results["incremental (CRC)"].append(crc)
                results["incremental (frozen_keys)"].append(hint)
            server.reset()
            s3_client(server.endpoint_url).create_bucket(Bucket="bench")
    out: dict[str, Any] = {"frozen_mib": frozen_mib, "trainable_mib": trainable_mib, "runs": runs, "kinds": {}}
    for kind, rows in results.items():
        out["kinds"][kind] = {k: statistics.median(row[k] for row in rows)
                              for k in ("wall_s", "client_cpu_s", "bytes_sent", "requests", "copied_bytes",
                                        "uploaded_bytes")}
    base_row = out["kinds"]["full"]
    for row in out["kinds"].values():
        row["bytes_vs_full"] = row["bytes_sent"] / base_row["bytes_sent"]
        row["cpu_vs_full"] = row["client_cpu_s"] / base_row["client_cpu_s"]
        row["wall_vs_full"] = row["wall_s"] / base_row["wall_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frozen-mib", type=int, default=1024)
    ap.add_argument("--trainable-mib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    res = run(args.frozen_mib, args.trainable_mib, args.runs)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"state: {args.frozen_mib} MiB frozen + {args.trainable_mib} MiB trainable; median of {args.runs} run(s)")
    print(f"{'save':28} {'wall s':>8} {'client CPU s':>13} {'MiB sent':>10} {'requests':>9} {'copied MiB':>11} "
          f"{'bytes/full':>10} {'CPU/full':>9}")
    for kind, row in res["kinds"].items():
        print(f"{kind:28} {row['wall_s']:8.2f} {row['client_cpu_s']:13.3f} {row['bytes_sent'] / MiB:10.1f} "
              f"{row['requests']:9.0f} {row['copied_bytes'] / MiB:11.1f} {row['bytes_vs_full']:10.1%} "
              f"{row['cpu_vs_full']:9.1%}")


if __name__ == "__main__":
    main()
