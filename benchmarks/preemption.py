"""Preemption figures: notice -> committed emergency checkpoint, and the per-step cost of reached_preemption.

    PYTHONPATH=$PWD python -m benchmarks.preemption --mib 1024 --ranks 2 [--server fast|moto] [--calls 10000]

Each rank joins a gloo group through a TCPStore hosted by this process (as
torchrun's agent hosts one), measures ``reached_preemption`` with no notice
(the common case: one ``check`` on the store per call) ``--calls`` times, then
runs a training loop (one all-reduce and a 50 ms sleep per step). At step 3 the
last rank sends itself SIGTERM; every rank stops at the agreed step and makes
the emergency save of ``--mib`` MiB in total (split evenly over the ranks).
Reported: from the signal to the agreed stop, the save itself, and from the
signal to the committed checkpoint (``save`` returns on every rank only after
rank 0 committed ``.metadata``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import time
from typing import Any

BUCKET = "bench-preemption"


def _rank_main(rank: int, world: int, port: int, endpoint: str, mib: int, calls: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from cloudckpt import CheckpointManager

    os.environ.update({"AWS_EC2_METADATA_DISABLED": "true", "NO_GCE_CHECK": "true"})
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=300))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    root = f"s3://{BUCKET}/run-{int(time.time())}"
    mgr = CheckpointManager(root, endpoint_url=endpoint, preemption_grace=600.0)
    # The common case: no notice anywhere. Steps far beyond the loop's, so nothing is proposed.
    costs = []
    for i in range(calls):
        t0 = time.perf_counter()
        mgr.reached_preemption(10**9 + i)
        costs.append(time.perf_counter() - t0)
    costs.sort()
    dist.barrier()
    numel = mib * 2**20 // world // 4
    state = {f"r{rank}": torch.randn(numel), "step": 0}
    ones = torch.ones(1)
    agreed_at = save_s = None
    for step in range(1, 1000):
        dist.all_reduce(ones)
        time.sleep(0.05)
        state["step"] = step
        if step == 3 and rank == world - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if mgr.reached_preemption(step):
            agreed_at = time.time()
            t0 = time.perf_counter()
            mgr.save(state, step)
            save_s = time.perf_counter() - t0
            break
    committed_at = time.time()
    notice = mgr.preemption_notice
    mgr.close()
    out.put({"rank": rank, "step": step, "notice_source": notice.source if notice else None,
             "notice_time": notice.time if notice and notice.source == "signal" else None,
             "agreed_at": agreed_at, "committed_at": committed_at, "save_s": save_s,
             "reached_median_us": statistics.median(costs) * 1e6,
             "reached_p99_us": costs[int(0.99 * (len(costs) - 1))] * 1e6,
             "reached_max_us": costs[-1] * 1e6})
    dist.destroy_process_group()


def run(mib: int, ranks: int, server_kind: str, calls: int) -> dict[str, Any]:
    """Start the server and the ranks; return the figures."""
    import torch.distributed as dist

    from cloudckpt_testing.s3 import TEST_CREDENTIALS, s3_client

    os.environ.update(TEST_CREDENTIALS)
    if server_kind == "moto":
        from cloudckpt_testing.s3 import MotoS3Server as Server
    else:
        from cloudckpt_testing.fast_s3 import FastS3Server as Server  # type: ignore[assignment]
    with Server() as server:
        s3_client(server.endpoint_url).create_bucket(Bucket=BUCKET)
        store = dist.TCPStore("127.0.0.1", 0, world_size=ranks + 1, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=300))
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=_rank_main, args=(r, ranks, store.port, server.endpoint_url, mib, calls, out))
                 for r in range(ranks)]
        for p in procs:
            p.start()
        rows = sorted((out.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
        for p in procs:
            p.join(60)
    notice = min(r["notice_time"] for r in rows if r["notice_time"] is not None)
    save_s = max(r["save_s"] for r in rows)
    return {
        "mib": mib, "ranks": ranks, "server": server_kind, "cpus": os.cpu_count(), "machine": platform.machine(),
        "stop_steps": sorted({r["step"] for r in rows}),
        "notice_to_agreed_s": round(max(r["agreed_at"] for r in rows) - notice, 3),
        "emergency_save_s": round(save_s, 3),
        "notice_to_committed_s": round(max(r["committed_at"] for r in rows) - notice, 3),
        "save_mib_per_s": round(mib / save_s, 1),
        "reached_preemption_median_us": round(max(r["reached_median_us"] for r in rows), 1),
        "reached_preemption_p99_us": round(max(r["reached_p99_us"] for r in rows), 1),
        "reached_preemption_max_us": round(max(r["reached_max_us"] for r in rows), 1),
        "calls": calls,
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="checkpoint size in MiB, all ranks together")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--server", choices=("fast", "moto"), default="fast")
    ap.add_argument("--calls", type=int, default=10_000, help="reached_preemption calls timed per rank")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.mib, args.ranks, args.server, args.calls), indent=2))


if __name__ == "__main__":
    main()
