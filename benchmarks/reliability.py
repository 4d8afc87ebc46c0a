"""Reliability figures: saves and loads under injected faults, killed ranks, corrupted bytes.

    python -m benchmarks.reliability --trials 50            # the README figures
    python -m benchmarks.reliability --trials 3 --backends s3 --faults 503,stall

Servers (moto's S3 server, cloudckpt's GCS emulator) run on 127.0.0.1 and a
:class:`~cloudckpt_testing.faultproxy.FaultProxy` sits between them and
cloudckpt. Every verdict is taken from the bucket itself, after the fact (see
:mod:`cloudckpt_testing.reliability`):

* fault trials: per backend and fault kind, ``--trials`` saves + loads with
  ``--rate`` of all requests faulted (and one guaranteed fault per trial);
* killed-rank trials: a 2-rank world commits step 1, then rank 1 SIGKILLs
  itself while its parts stall during step 2;
* corruption trials: one byte of one stored object (data, manifest or
  ``.metadata``) is inverted, then the checkpoint is loaded and verified.

Prints Markdown tables (and ``--json PATH`` writes every trial's record).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
import warnings
from typing import Any, Iterable

MiB = 1024 * 1024


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_fault_trials(targets: dict[str, Any], kinds: list[str], trials: int, rate: float, deadline: float,
                     seed: int, log: Any) -> list[Any]:
    """Every (backend, fault kind) pair, ``trials`` times."""
    from cloudckpt_testing.reliability import run_fault_trial

    results = []
    for name, target in targets.items():
        for kind in kinds:
            for t in range(trials):
                r = run_fault_trial(target, kind, t, rate=rate, deadline=deadline, seed=seed)
                results.append(r)
                if not r.acceptable:
                    log(f"  VIOLATION {name} {kind} #{t}: {r.verdict} ({r.error})")
            log(f"  {name:4} {kind:15} done")
    return results


def run_kill_trials(targets: dict[str, Any], trials: int, log: Any) -> list[dict[str, Any]]:
    """2-rank worlds where rank 1 dies mid-upload of step 2."""
    from cloudckpt.manager import CheckpointManager, committed_steps, step_name
    from cloudckpt_testing.faultproxy import FaultProxy, FaultRule
    from cloudckpt.uri import parse_uri
    from tests import workers
    from tests.dist import run_world_with_deaths

    part_op = {"s3": "UploadPart", "gcs": "gcs.xml.mpu.part"}
    out = []
    for name, target in targets.items():
        for t in range(trials):
            bucket = target.new_bucket()
            root = f"{target.scheme}://{bucket}/run"
            rules = [FaultRule(part_op[name], fault="stall", stall_seconds=120, path_regex=r"step-0+2(/|%2F)__1_")]
            record: dict[str, Any] = {"backend": name, "trial": t}
            with FaultProxy(target.upstream, rules=rules, api="s3" if name == "s3" else "gcs") as proxy:
                opts = {"endpoint_url": proxy.url, "part_size": 5 * MiB}
                try:
                    results, dead = run_world_with_deaths(2, workers.save_twice_then_die, root, opts, 1, 3.0,
                                                          expect_dead={1}, timeout=300)
                    record.update(died=dead == {1: -9}, survivor=results[0]["outcome"],
                                  after_death=results[0]["after_death"])
                except Exception as exc:  # noqa: BLE001 - recorded as a failed trial
                    record.update(died=False, survivor=f"harness error: {exc}"[:200], after_death=None)
            store = target.direct_store(bucket)
            step2 = parse_uri(f"{root}/{step_name(2)}")
            record["committed"] = store.head(step2.key(".metadata")) is not None
            record["uploads_left"] = len(store.list_multipart_uploads(step2.key("")))
            record["latest"] = CheckpointManager(root, endpoint_url=target.upstream).latest()
            record["steps"] = sorted(committed_steps(store, parse_uri(root)))
            record["ok"] = bool(record["died"] and not record["committed"] and record["uploads_left"] == 0
                                and record["latest"] == 1 and record["survivor"] != "committed")
            if not record["ok"]:
                log(f"  VIOLATION kill {name} #{t}: {record}")
            out.append(record)
        log(f"  {name:4} killed-rank done")
    return out


def run_corruption_trials(targets: dict[str, Any], trials: int, seed: int, log: Any) -> list[Any]:
    """Flip one byte of one object per trial."""
    from cloudckpt_testing.reliability import run_corruption_trial

    out = []
    for name, target in targets.items():
        for t in range(trials):
            r = run_corruption_trial(target, t, seed=seed)
            if not r.acceptable:
                log(f"  VIOLATION corruption {name} #{t}: {r}")
            out.append(r)
        log(f"  {name:4} corruption done")
    return out


def fault_table(results: Iterable[Any], rate: float) -> str:
    rows = ["| backend | fault | trials | ok (byte-identical) | failed cleanly | load failed, checkpoint intact "
            "| violations | faults / requests | save s median / max |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, str], list[Any]] = collections.defaultdict(list)
    for r in results:
        groups[(r.backend, r.fault)].append(r)
    for (backend, fault), rs in groups.items():
        verdicts = collections.Counter(r.verdict for r in rs)
        bad = sum(n for v, n in verdicts.items() if v not in ("ok", "failed-clean", "load-failed"))
        faults, reqs = sum(r.faults_injected for r in rs), sum(r.requests for r in rs)
        saves = [r.save_seconds for r in rs]
        rows.append(f"| {backend} | {fault} | {len(rs)} | {verdicts['ok']} | {verdicts['failed-clean']} | "
                    f"{verdicts['load-failed']} | {bad} | {faults} / {reqs} ({100 * faults / max(reqs, 1):.0f}%) | "
                    f"{statistics.median(saves):.1f} / {max(saves):.1f} |")
    return "\n".join(rows)


def kill_table(records: list[dict[str, Any]]) -> str:
    rows = ["| backend | trials | rank died mid-upload | step 2 committed | incomplete uploads left "
            "| latest is step 1 | survivor failed, s after the death (median / max) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        groups[r["backend"]].append(r)
    for backend, rs in groups.items():
        after = [r["after_death"] for r in rs if r["after_death"] is not None and r["survivor"] != "committed"]
        rows.append(f"| {backend} | {len(rs)} | {sum(r['died'] for r in rs)} | {sum(r['committed'] for r in rs)} | "
                    f"{sum(r['uploads_left'] for r in rs)} | {sum(r['latest'] == 1 for r in rs)} | "
                    f"{statistics.median(after) if after else float('nan'):.1f} / "
                    f"{max(after) if after else float('nan'):.1f} |")
    return "\n".join(rows)


def corruption_table(results: list[Any]) -> str:
    rows = ["| backend | object hit | trials | load: error naming object (+ item) | load: byte never read, data "
            "correct | load: wrong data | verify: reported | verify: missed |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, str], list[Any]] = collections.defaultdict(list)
    for r in results:
        kind = "data object" if r.object.endswith(".distcp") else r.object
        groups[(r.backend, kind)].append(r)
    for (backend, kind), rs in sorted(groups.items()):
        rows.append(f"| {backend} | {kind} | {len(rs)} | {sum(r.load == 'detected' for r in rs)} | "
                    f"{sum(r.load == 'unaffected' for r in rs)} | "
                    f"{sum(r.load not in ('detected', 'unaffected') for r in rs)} | "
                    f"{sum(r.verify == 'detected' for r in rs)} | {sum(r.verify != 'detected' for r in rs)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from cloudckpt_testing.reliability import TRIAL_FAULTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10, help="fault trials per backend and fault kind, and "
                   "corruption trials per backend (default 10)")
    p.add_argument("--kill-trials", type=int, default=None, help="killed-rank trials per backend "
                   "(default: trials // 10, at least 1; each spawns a 2-rank world)")
    p.add_argument("--rate", type=float, default=0.05, help="share of requests faulted (default 0.05)")
    p.add_argument("--deadline", type=float, default=60.0, help="save_deadline of every save (default 60 s)")
    p.add_argument("--timeout", type=float, default=1.5, help="client read timeout; stalls last 2.5x (default 1.5)")
    p.add_argument("--backends", default="s3,gcs")
    p.add_argument("--faults", default=",".join(TRIAL_FAULTS), help=f"comma list of {sorted(TRIAL_FAULTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of parts to skip: faults,kill,corruption")
    p.add_argument("--json", default=None, help="write every trial's record to this file")
    args = p.parse_args(argv)
    _quiet()
    from cloudckpt_testing.gcs_emulator import GCSEmulator
    from cloudckpt_testing.reliability import Target
    from cloudckpt_testing.s3 import TEST_CREDENTIALS, MotoS3Server

    os.environ.update(TEST_CREDENTIALS)
    backends = [b for b in args.backends.split(",") if b]
    kinds = [k for k in args.faults.split(",") if k]
    skip = set(args.skip.split(","))
    kill_trials = args.kill_trials if args.kill_trials is not None else max(1, args.trials // 10)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.monotonic()
    with MotoS3Server() as s3, GCSEmulator() as gcs:
        all_targets = {"s3": Target("s3", s3.endpoint_url, timeout=args.timeout),
                       "gcs": Target("gcs", gcs.endpoint, timeout=args.timeout)}
        targets = {b: all_targets[b] for b in backends}
        faults = [] if "faults" in skip else run_fault_trials(targets, kinds, args.trials, args.rate,
                                                               args.deadline, args.seed, log)
        kills = [] if "kill" in skip else run_kill_trials(targets, kill_trials, log)
        corrupt = [] if "corruption" in skip else run_corruption_trials(targets, args.trials, args.seed, log)
    elapsed = time.monotonic() - started

    command = " ".join(["python -m benchmarks.reliability", *(argv if argv is not None else sys.argv[1:])])
    print(f"## Reliability ({command})\n")
    print(f"{elapsed / 60:.1f} min on {os.cpu_count()} CPUs; rate {args.rate:.0%} per request plus one guaranteed "
          f"fault per trial; save_deadline {args.deadline:g} s; client read timeout {args.timeout:g} s.\n")
    if faults:
        print("### Injected faults (save + load per trial)\n")
        print(fault_table(faults, args.rate) + "\n")
    if kills:
        print("### Killed ranks (2 ranks; rank 1 SIGKILLed mid-upload of step 2)\n")
        print(kill_table(kills) + "\n")
    if corrupt:
        print("### Corruption (one byte inverted in one stored object)\n")
        print(corruption_table(corrupt) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"faults": [dataclasses.asdict(r) for r in faults], "kill": kills,
                       "corruption": [dataclasses.asdict(r) for r in corrupt]}, f, indent=1)
    violations = sum(not r.acceptable for r in faults) + sum(not r["ok"] for r in kills) + sum(
        not r.acceptable for r in corrupt)
    print(f"Violations: {violations}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
