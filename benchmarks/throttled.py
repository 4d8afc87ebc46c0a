"""Throttled multi-rank saves: 503 counts and completion time with and without adaptation and spreading.

    python -m benchmarks.throttled                       # 4 ranks, 10 writes/s per prefix (default)
    python -m benchmarks.throttled --ranks 8 --rps 20 --mib-per-rank 64
    python -m benchmarks.throttled --json

A gloo world of ``--ranks`` processes on this machine saves ``--mib-per-rank``
MiB per rank (5 MiB parts) to the fast in-memory S3 server
(:mod:`cloudckpt_testing.fast_s3`) through the fault-injecting proxy
(:mod:`cloudckpt_testing.faultproxy`) in its throttling mode: one token bucket
per key prefix refilling at ``--rps`` writes/s (burst: one second's worth);
a write that finds the bucket empty gets ``503 SlowDown``, as S3 answers when a
prefix's request rate outgrows its partition. That is S3's 3,500 writes/s per
partition scaled down to what two cores can drive.

Two prefix models:

* **one partition**: every object of the checkpoint shares one bucket (S3
  before it has partitioned the prefix; also GCS's per-bucket limit);
* **partitioned**: objects whose names start with a different spreading tag
  (``prefix_strategy``) each have their own bucket (S3 after partitioning, or a
  pre-partitioned bucket).

Every case runs in the same world, one after the other, each under its own
checkpoint prefix (so its own token buckets). Reported per case: whether the
save committed on every rank, wall time of the slowest rank, 503s the proxy
sent (its own count), attempts (from each rank's retry counters) and the
lowest AIMD cap any rank reached. Loads are verified value by value.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

MiB = 1 << 20
BUCKET = "throttled"


@dataclass(frozen=True)
class Case:
    """One configuration of the comparison."""

    name: str
    transfer: dict[str, Any]
    max_attempts: int
    prefix_strategy: "str | int" = "none"
    partitioned: bool = False
    #: request_rate_limit as a multiple of the per-prefix rate (times the prefixes when partitioned).
    rate_fraction: float | None = None


def cases(ranks: int) -> list[Case]:
    """The comparison: fixed concurrency, AIMD alone, AIMD with pacing; flat and spread names."""
    fixed = {"adaptive_concurrency": False, "request_rate_limit": math.inf, "ramp_seconds": 0.0}
    aimd = {"request_rate_limit": math.inf}
    return [
        Case("fixed, 3 attempts", fixed, 3),
        Case("fixed, 10 attempts", fixed, 10),
        Case("AIMD, 3 attempts", aimd, 3),
        Case("AIMD, 10 attempts", aimd, 10),
        Case("AIMD + pacing, 3 attempts", {}, 3, rate_fraction=0.8),
        Case("AIMD + pacing, 10 attempts", {}, 10, rate_fraction=0.8),
        Case("fixed + spread, one partition, 3 attempts", fixed, 3, prefix_strategy=ranks),
        Case("fixed + spread, partitioned, 3 attempts", fixed, 3, prefix_strategy=ranks, partitioned=True),
        Case("AIMD + spread, partitioned, 10 attempts", aimd, 10, prefix_strategy=ranks, partitioned=True),
        Case("AIMD + pacing + spread, partitioned, 3 attempts", {}, 3, prefix_strategy=ranks, partitioned=True,
             rate_fraction=0.8),
    ]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def throttle_prefix(key: str) -> str:
    """The proxy's bucket for ``key``: the checkpoint prefix, plus the spreading tag when partitioned.

    Cases whose directory ends in ``-partitioned...`` model a partitioned bucket.
    """
    directory, _, name = key.rpartition("/")
    if "partitioned" in directory.rsplit("/", 1)[-1] and "-" in name:
        return f"{directory}/{name.split('-', 1)[0]}"
    return directory


# -- the world ----------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, init_file: str, endpoint: str, plan: list, mib: int, out: Any) -> None:
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch
        import torch.distributed as dist

        import cloudckpt
        from cloudckpt.retry import RetryPolicy
        from cloudckpt.transfer import TransferOptions

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        t = torch.arange(mib * MiB // 4, dtype=torch.float32) + rank
        results = []
        for uri, transfer, strategy, attempts in plan:
            opts = {"endpoint_url": endpoint, "retry_policy": RetryPolicy(max_attempts=attempts)}
            writer = cloudckpt.storage_writer(uri, prefix_strategy=strategy, part_size=5 * MiB,
                                              transfer_options=TransferOptions(**transfer), **opts)
            dist.barrier()
            start = time.monotonic()
            try:
                cloudckpt.save({f"w{rank}": t}, uri, storage_writer=writer)
                outcome, detail = "committed", ""
            except BaseException as exc:  # noqa: BLE001 - reported
                outcome, detail = type(exc).__name__, str(exc)[:200]
            elapsed = time.monotonic() - start
            loaded = None
            if outcome == "committed":
                back = {f"w{rank}": torch.empty_like(t)}
                cloudckpt.load(back, uri, endpoint_url=endpoint)
                loaded = bool(torch.equal(back[f"w{rank}"], t))
            p = writer.last_pacing
            results.append({"outcome": outcome, "detail": detail, "elapsed": elapsed, "loaded": loaded,
                            "stats": writer.last_transfer_stats,
                            "part_size": None if p is None else p.part_size,
                            "requests": None if p is None else p.requests})
            dist.barrier()
        dist.destroy_process_group()
        out.put((rank, True, results))
    except BaseException as exc:  # noqa: BLE001
        out.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run(ranks: int, rps: float, mib: int, selected: Sequence[Case] | None = None,
        timeout: float = 1800.0) -> dict[str, Any]:
    """Run every case; return the environment and one row per case."""
    from cloudckpt_testing.fast_s3 import FastS3Server
    from cloudckpt_testing.faultproxy import FaultProxy, ThrottleRule
    from cloudckpt_testing.s3 import TEST_CREDENTIALS, s3_client

    os.environ.update(TEST_CREDENTIALS)
    todo = list(selected or cases(ranks))
    rows = []
    with FastS3Server() as server:
        s3_client(server.endpoint_url).create_bucket(Bucket=BUCKET)
        rule = ThrottleRule(per_prefix_rps=rps, prefix_fn=throttle_prefix)
        with FaultProxy(server.endpoint_url, throttle=rule, api="s3") as proxy:
            plan = []
            for c in todo:
                transfer = dict(c.transfer)
                if c.rate_fraction is not None:
                    prefixes = ranks if c.partitioned and c.prefix_strategy != "none" else 1
                    transfer["request_rate_limit"] = c.rate_fraction * rps * min(prefixes, ranks)
                suffix = "-partitioned" if c.partitioned else ""
                plan.append((f"s3://{BUCKET}/bench/{_slug(c.name)}{suffix}", transfer, c.prefix_strategy,
                             c.max_attempts))
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            with tempfile.TemporaryDirectory() as tmp:
                init = os.path.join(tmp, "rendezvous")
                procs = [ctx.Process(target=_rank_main, args=(r, ranks, init, proxy.url, plan, mib, out))
                         for r in range(ranks)]
                for p in procs:
                    p.start()
                per_rank: dict[int, Any] = {}
                deadline = time.monotonic() + timeout
                try:
                    while len(per_rank) < ranks:
                        try:
                            rank, ok, value = out.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                        except queue.Empty:
                            if time.monotonic() > deadline:
                                raise TimeoutError(f"the world did not finish within {timeout} s") from None
                            continue
                        if not ok:
                            raise RuntimeError(f"rank {rank} failed:\n{value}")
                        per_rank[rank] = value
                finally:
                    for p in procs:
                        p.join(timeout=30)
                        if p.is_alive():
                            p.kill()
            throttled = proxy.stats()["throttled"]
    for i, c in enumerate(todo):
        uri = plan[i][0]
        base = uri[len(f"s3://{BUCKET}/"):]
        r = [per_rank[k][i] for k in range(ranks)]
        n503 = sum(v for k, v in throttled.items() if k == f"{BUCKET}/{base}" or k.startswith(f"{BUCKET}/{base}/"))
        committed = all(x["outcome"] == "committed" for x in r)
        hit = [x for x in r if x["stats"] and x["stats"]["failures"].get("throttle")]
        rows.append({
            "case": c.name, "committed": committed,
            "outcomes": sorted({x["outcome"] for x in r}),
            "loaded_ok": all(x["loaded"] for x in r) if committed else None,
            "slowest_rank_s": round(max(x["elapsed"] for x in r), 2),
            "throttled_503": n503,
            "attempts": sum((x["stats"] or {}).get("attempts", 0) for x in r),
            # Without adaptation there is no AIMD cap to report.
            "min_aimd_cap": (min((x["stats"] or {}).get("limit_min", 0) for x in r)
                             if plan[i][1].get("adaptive_concurrency", True) else None),
            # AIMD recovered: every rank that was throttled raised its cap again after its lowest point.
            "aimd_recovered": (all(x["stats"]["limit_max_after_min"] > x["stats"]["limit_min"] for x in hit)
                               if hit and plan[i][1].get("adaptive_concurrency", True) else None),
            "requests_per_rank": r[0]["requests"], "part_MiB": (r[0]["part_size"] or 0) / MiB,
            "request_rate_limit": plan[i][1].get("request_rate_limit"),
        })
    return {"ranks": ranks, "rps_per_prefix": rps, "mib_per_rank": mib, "cores": os.cpu_count(), "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    cols = ["case", "committed", "slowest_rank_s", "throttled_503", "attempts", "min_aimd_cap", "aimd_recovered",
            "requests_per_rank"]
    heads = ["case", "committed", "time s (slowest rank)", "503s", "attempts", "lowest AIMD cap",
             "AIMD raised again", "req/rank"]
    lines = [f"{report['ranks']} ranks x {report['mib_per_rank']} MiB, {report['rps_per_prefix']:g} writes/s per "
             f"prefix, {report['cores']} cores", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in report["rows"]:
        cells = []
        for c in cols:
            v = row[c]
            if c == "committed":
                v = "yes" if v else f"**no** ({', '.join(row['outcomes'])})"
            elif v is None:
                v = "-"
            elif c == "aimd_recovered":
                v = "yes" if v else "no"
            elif c == "slowest_rank_s" and not row["committed"]:
                v = f"{v} (failed)"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rps", type=float, default=10.0, help="writes/s per throttled prefix")
    p.add_argument("--mib-per-rank", type=int, default=40)
    p.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    chosen = [c for c in cases(args.ranks) if not args.only or any(s in c.name for s in args.only.split(","))]
    report = run(args.ranks, args.rps, args.mib_per_rank, chosen)
    print(json.dumps(report, indent=1) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
