"""Multi-tier checkpoint figures: blocking, local-complete, replicated, durable; restore time per tier.

    PYTHONPATH=$PWD python -m benchmarks.tiers --mib-per-rank 1024 --nodes 2 --ranks-per-node 1 [--server fast|moto]

Spawns ``nodes * ranks_per_node`` ranks on this box, each "node" with its own
local directory (under ``--local-base``, default a fresh dir in /dev/shm, a RAM
disk like the one Orbax and HyperPod use) and torchrun-style GROUP_RANK /
LOCAL_RANK / LOCAL_WORLD_SIZE. Each rank holds ``--mib-per-rank`` MiB of
float32 tensors.

Save: ``CheckpointManager(local_dir=..., local_every=1, persist_every=1,
replicas=1)``; two ``async_save`` calls (the first allocates the staging
buffers; the second is reported). Per rank: ``blocked_s`` (async_save returned),
``local_s`` (the DCP write to the node's local dir done), ``replicated_s``
(every node committed its copy, replicas included), ``durable_s`` (committed in
the object store). Baseline: the same two async saves with a manager without a
local tier (``blocked_s``, ``durable_s``).

Restore (fresh managers): from the local tier, from replicas (node 1's local
dir wiped; its ranks fetch from node 0), and from the object store (all local
dirs wiped). The first load of each rank process (from the local tier) is
reported alone as ``cold_restore_local_s``: it also pays the process's one-time
costs. Then each tier is restored ``--repeats`` times, interleaved, and the
median is reported. Reported: the slowest rank. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
from typing import Any

BUCKET = "bench-tiers"


def _state(rank: int, mib: int) -> dict[str, Any]:
    import torch

    per = 64 * 2**20 // 4
    numel = mib * 2**20 // 4
    sizes = [per] * (numel // per) + ([numel % per] if numel % per else [])
    return {f"r{rank}.t{i}": torch.randn(n) for i, n in enumerate(sizes)}


def _rank_main(rank: int, cfg: dict[str, Any], out: Any) -> None:
    import torch
    import torch.distributed as dist

    from cloudckpt import CheckpointManager

    os.environ.update({"AWS_EC2_METADATA_DISABLED": "true", "NO_GCE_CHECK": "true", "OMP_NUM_THREADS": "1"})
    lw, world = cfg["ranks_per_node"], cfg["nodes"] * cfg["ranks_per_node"]
    node = rank // lw
    os.environ.update(GROUP_RANK=str(node), LOCAL_RANK=str(rank % lw), LOCAL_WORLD_SIZE=str(lw))
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", cfg["port"], is_master=False, timeout=datetime.timedelta(seconds=600))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    local_dir = os.path.join(cfg["local_base"], f"node{node}")
    opts = dict(endpoint_url=cfg["endpoint"], preemption=False)
    state = _state(rank, cfg["mib"])
    row: dict[str, Any] = {"rank": rank}

    mgr = CheckpointManager(f"s3://{BUCKET}/tiered", local_dir=local_dir, local_every=1, persist_every=1,
                            keep_local=2, replicas=1, **opts)
    for step in (1, 2):
        dist.barrier()
        h = mgr.async_save(state, step)
        h.result()
        h.persist_completion.result()
    row.update({f"tiered_{k}": round(v, 3) for k, v in vars(h.times).items()})
    mgr.close()

    base = CheckpointManager(f"s3://{BUCKET}/baseline", **opts)
    for step in (1, 2):
        dist.barrier()
        t0 = time.perf_counter()
        h = base.async_save(state, step)
        blocked = time.perf_counter() - t0
        h.result()
        row.update(baseline_blocked_s=round(blocked, 3), baseline_durable_s=round(time.perf_counter() - t0, 3))
    base.close()

    # The first load of a process also pays one-time costs (imports, thread pools, the S3 client), whatever
    # the tier: it is reported on its own (cold_restore_local_s). Then each tier is timed `repeats` times
    # (in this order: wiping is destructive) and the median is reported.
    row["cold_restore_local_s"] = round(_timed_restore(state, cfg, local_dir, node, rank, lw, [], opts, "local"), 3)
    samples: dict[str, list[float]] = {}
    for label, wipe in (("local", []), ("replica", [1]), ("object_store", list(range(cfg["nodes"])))):
        samples[label] = [_timed_restore(state, cfg, local_dir, node, rank, lw, wipe, opts, label)
                          for _ in range(cfg["repeats"])]
    for label, values in samples.items():
        row[f"restore_{label}_s"] = round(statistics.median(values), 3)
        row[f"restore_{label}_tier"] = label
    out.put(row)
    dist.destroy_process_group()


def _timed_restore(state: dict[str, Any], cfg: dict[str, Any], local_dir: str, node: int, rank: int, lw: int,
                   wipe: list[int], opts: dict[str, Any], tier: str) -> float:
    """Wipe the listed nodes' local dirs, then time one load by a fresh manager (values and tier checked)."""
    import torch
    import torch.distributed as dist

    from cloudckpt import CheckpointManager

    dist.barrier()
    if rank % lw == 0 and node in wipe:
        shutil.rmtree(local_dir, ignore_errors=True)
    dist.barrier()
    target = {k: torch.empty_like(v) for k, v in state.items()}
    mgr = CheckpointManager(f"s3://{BUCKET}/tiered", local_dir=local_dir, **opts)
    dist.barrier()
    t0 = time.perf_counter()
    got = mgr.load(target)
    seconds = time.perf_counter() - t0
    assert got == 2 and all(torch.equal(target[k], state[k]) for k in state), wipe
    assert mgr.last_load_tier == tier, (tier, mgr.last_load_tier)
    mgr.close()
    return seconds


def run(mib: int, nodes: int, ranks_per_node: int, server_kind: str, local_base: str | None,
        repeats: int = 3) -> dict[str, Any]:
    """Start the server and the ranks; return the figures."""
    import torch.distributed as dist

    from cloudckpt_testing.s3 import TEST_CREDENTIALS, s3_client

    os.environ.update(TEST_CREDENTIALS)
    if server_kind == "moto":
        from cloudckpt_testing.s3 import MotoS3Server as Server
    else:
        from cloudckpt_testing.fast_s3 import FastS3Server as Server  # type: ignore[assignment]
    parent = local_base or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    tmp = tempfile.mkdtemp(prefix="cloudckpt-tiers-", dir=parent)
    world = nodes * ranks_per_node
    try:
        with Server() as server:
            s3_client(server.endpoint_url).create_bucket(Bucket=BUCKET)
            store = dist.TCPStore("127.0.0.1", 0, world_size=world + 1, is_master=True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=600))
            cfg = dict(mib=mib, repeats=repeats, nodes=nodes, ranks_per_node=ranks_per_node, port=store.port,
                       endpoint=server.endpoint_url, local_base=tmp)
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            procs = [ctx.Process(target=_rank_main, args=(r, cfg, out)) for r in range(world)]
            for p in procs:
                p.start()
            rows = sorted((out.get(timeout=3600) for _ in procs), key=lambda r: r["rank"])
            for p in procs:
                p.join(60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    worst = {k: max(r[k] for r in rows) for k in rows[0] if k.endswith("_s") and rows[0][k] is not None}
    return {"mib_per_rank": mib, "repeats": repeats, "nodes": nodes, "ranks_per_node": ranks_per_node,
            "server": server_kind,
            "local_base": parent, "cpus": os.cpu_count(), "machine": platform.machine(),
            "slowest_rank": worst, "tiers": {k: rows[0][k] for k in rows[0] if k.endswith("_tier")},
            "per_rank": rows}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib-per-rank", type=int, default=1024)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--ranks-per-node", type=int, default=1)
    ap.add_argument("--server", choices=("fast", "moto"), default="fast")
    ap.add_argument("--repeats", type=int, default=3, help="timed restores per tier (median reported)")
    ap.add_argument("--local-base", default=None, help="parent of the per-node local dirs (default /dev/shm)")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.mib_per_rank, args.nodes, args.ranks_per_node, args.server, args.local_base,
                         args.repeats),
                     indent=2))


if __name__ == "__main__":
    main()
