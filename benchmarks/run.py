"""Benchmark cloudckpt against s3torchconnector, fsspec, local /dev/shm and the raw HTTP floor.

    python -m benchmarks.run                       # 1 GiB, every method, median of 3
    python -m benchmarks.run --total-mib 128 --repeat 1 --methods cloudckpt,raw-http
    python -m benchmarks.run --server fast,moto    # S3 methods against moto too (use small sizes)
    python -m benchmarks.run --shape both --total-mib 256 --methods cloudckpt,s3torchconnector
                                                   # 32 MiB tensors and an LLM-like state (params + AdamW)
    python -m benchmarks.run --sweep               # cloudckpt part size / concurrency / object size
    python -m benchmarks.run --memcheck            # cloudckpt save peak RSS at 256 MiB and 1 GiB
    python -m benchmarks.run --profile DIR         # py-spy profiles of one cloudckpt save and load

Everything runs on 127.0.0.1: the servers are started here, each in its own
process, and every save and every load runs in a fresh child process (see
:mod:`benchmarks.measure`). Loads are verified value by value before any
figure is printed; a method whose round trip is wrong is shown as FAILED.
GB = 1e9 bytes of tensor payload.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks.methods import METHODS, describe_shape
from benchmarks.runner import MiB, Runner, environment, summarize

DEFAULT_METHODS = list(METHODS)


def server_for(method: str, s3_server: str) -> str | None:
    """Which server a method runs against."""
    target = METHODS[method].target
    return {"s3": s3_server, "gcs": "gcs", "local": None}[target]


def label_for(method: str, server_kind: str | None) -> str:
    """Row label: the method, marked with its server when that is not the fast S3 server."""
    if server_kind == "gcs":
        return f"{method} (emulator)"
    if server_kind == "moto":
        return f"{method} @moto"
    return method


# --------------------------------------------------------------------------- summarising


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def reference_label(label: str) -> str:
    """The cloudckpt row a row is compared with (same server)."""
    if label.endswith("(emulator)"):
        return "cloudckpt-gcs (emulator)"
    if label.endswith("@moto"):
        return "cloudckpt @moto"
    return "cloudckpt"


def table(op: str, summaries: dict[str, dict[str, Any]]) -> str:
    """A markdown table of one operation, with cloudckpt's ratios to every row."""
    head = ["method", "wall s", "GB/s", "client CPU s/GB", "server CPU s/GB", "peak extra RSS MiB", "requests",
            "cloudckpt speed ×", "cloudckpt CPU/GB ×"]
    lines = [f"### {op}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for label, s in summaries.items():
        if s["failed"]:
            lines.append(f"| {label} | FAILED | | | | | | | |")
            notes.append(f"- {label}: FAILED: {s['error'][:400]}")
            continue
        ref = summaries.get(reference_label(label))
        if ref and not ref["failed"]:
            speed = _fmt(ref["gbps"] / s["gbps"], ".2f")
            cpu = _fmt(ref["client_cpu_per_gb"] / s["client_cpu_per_gb"] if s["client_cpu_per_gb"] else None, ".2f")
        else:
            speed = cpu = "n/a"
        lines.append(
            f"| {label} | {s['wall_s']:.3f} | {s['gbps']:.3f} | {s['client_cpu_per_gb']:.2f} | "
            f"{_fmt(s['server_cpu_per_gb'], '.2f')} | {s['peak_extra_rss_mib']:.0f} | "
            f"{_fmt(s['requests'], '.0f')} | {speed} | {cpu} |"
        )
        if s["request_mix"]:
            mix = ", ".join(f"{k} {v}" for k, v in s["request_mix"].items())
            notes.append(f"- {label}: {mix}")
    lines += ["", "cloudckpt speed × = cloudckpt GB/s ÷ this row's GB/s (>1: cloudckpt is faster); "
              "cloudckpt CPU/GB × = cloudckpt client CPU per GB ÷ this row's (<1: cloudckpt is cheaper). "
              "Rows on the GCS emulator are compared with cloudckpt-gcs, rows @moto with cloudckpt @moto.", "",
              "Requests per operation (first repeat):", *notes, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- modes


def run_main(args: argparse.Namespace) -> dict[str, Any]:
    """The comparison: every selected method × server, ``--repeat`` times, interleaved."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    s3_servers = [s.strip() for s in args.server.split(",") if s.strip()]
    plan: list[tuple[str, str | None]] = []
    for m in methods:
        if METHODS[m].target == "s3":
            plan += [(m, s) for s in s3_servers]
        else:
            plan.append((m, server_for(m, s3_servers[0])))
    kinds = [k for _, k in plan if k]
    shapes = ["large", "llm"] if args.shape == "both" else [args.shape]
    out: dict[str, Any] = {"mode": "compare", "shapes": {}}
    with Runner(kinds, args.total_mib * MiB, args.tensor_mib * MiB) as runner:
        for shape in shapes:
            out["shapes"][shape] = _compare_shape(runner, plan, shape, args.repeat)
    if len(shapes) == 1:  # the single-shape layout of earlier results
        out.update(out["shapes"][shapes[0]])
    return out


def _compare_shape(runner: Runner, plan: list[tuple[str, str | None]], shape: str, repeat: int) -> dict[str, Any]:
    """Every (method, server) of ``plan`` on one state dict shape, ``repeat`` times interleaved; print tables."""
    raw: dict[tuple[str, str], list[dict[str, Any]]] = {}
    order: list[str] = []
    print(f"## state dict shape: {describe_shape(shape, runner.total_bytes, runner.tensor_bytes)}\n")
    for rep in range(repeat):
        print(f"{shape}: repeat {rep + 1}/{repeat}", file=sys.stderr, flush=True)
        for method, kind in plan:
            label = label_for(method, kind)
            if label not in order:
                order.append(label)
            res = runner.roundtrip(method, kind, f"{shape}-r{rep}", label, shape=shape)
            ok = all(r.get("ok") for r in res.values()) and "load" in res
            for op in ("save", "load"):
                r = res.get(op) or {"ok": False, "error": "not run: the save failed"}
                if not ok and r.get("ok"):  # a wrong load makes the whole round trip untrustworthy
                    r = dict(r, ok=False, error="round trip failed: " + next(
                        (x.get("error", "?") for x in res.values() if not x.get("ok")), "load not run"))
                raw.setdefault((label, op), []).append(r)
    summaries = {op: {label: summarize(raw[(label, op)]) for label in order} for op in ("save", "load")}
    for op in ("save", "load"):
        print(table(op, summaries[op]))
    return {"summaries": summaries, "raw": [r for rs in raw.values() for r in rs]}


def memcheck_main(args: argparse.Namespace) -> dict[str, Any]:
    """cloudckpt save at 256 MiB and 1 GiB (and --total-mib if bigger): peak extra RSS must not track size."""
    sizes = sorted({256, 1024, args.total_mib})
    rows = []
    with Runner(["fast"], max(sizes) * MiB, args.tensor_mib * MiB) as runner:
        for size in sizes:
            results = [runner.roundtrip("cloudckpt", "fast", f"m{size}-{i}", f"cloudckpt {size} MiB",
                                        total_bytes=size * MiB, ops=("save",))["save"]
                       for i in range(args.repeat)]
            rows.append((size, summarize(results)))
    print("### cloudckpt save: peak extra RSS vs checkpoint size\n")
    print("| total MiB | GB/s | client CPU s/GB | peak extra RSS MiB (median) | per repeat |\n|---|---|---|---|---|")
    for size, s in rows:
        if s["failed"]:
            print(f"| {size} | FAILED: {s['error'][:200]} | | | |")
            continue
        each = ", ".join(f"{x:.0f}" for x in s["peak_extra_rss_all_mib"])
        print(f"| {size} | {s['gbps']:.3f} | {s['client_cpu_per_gb']:.2f} | {s['peak_extra_rss_mib']:.0f} | {each} |")
    return {"mode": "memcheck", "rows": [{"total_mib": size, **s} for size, s in rows]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--total-mib", type=int, default=1024, help="MiB of large tensors (default 1024)")
    ap.add_argument("--tensor-mib", type=int, default=32, help="MiB per large float32 tensor (default 32)")
    ap.add_argument("--shape", choices=["large", "llm", "both"], default="large",
                    help="large: --tensor-mib float32 tensors + 64 small ones; llm: a 24-block transformer + "
                         "AdamW state (about 1,160 tensors, --total-mib in all); both: one table each")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; medians are reported (default 3)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of: {', '.join(METHODS)}")
    ap.add_argument("--server", default="fast",
                    help="S3 server(s) for the S3 methods: fast, moto, or fast,moto (default fast)")
    ap.add_argument("--json", metavar="PATH", help="write the raw results and summaries here")
    ap.add_argument("--sweep", action="store_true", help="sweep cloudckpt's part size, concurrency, object size")
    ap.add_argument("--sweep-grid", choices=["axes", "full"], default="axes",
                    help="axes: vary one knob at a time around the defaults; full: every combination")
    ap.add_argument("--memcheck", action="store_true", help="cloudckpt save peak RSS at 256 MiB and 1 GiB")
    ap.add_argument("--profile", metavar="DIR", help="py-spy profile one cloudckpt save and one load into DIR")
    return ap


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    args = build_parser().parse_args(argv)
    env = environment()
    print(f"# cloudckpt benchmark ({time.strftime('%Y-%m-%d %H:%M')})\n")
    print(f"command: python -m benchmarks.run {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"machine: {env['nproc']} CPUs ({env['cpu_model']}), {env['ram_gib']} GiB RAM, Python {env['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    if args.shape in ("large", "both"):
        print(f"state dict (large): {args.total_mib} MiB of {args.tensor_mib} MiB float32 tensors + 64 × 4 KiB "
              "tensors + non-tensor objects")
    if args.shape in ("llm", "both"):
        print(f"state dict (llm): 24 transformer blocks × 12 float32 tensors + embedding + final norm, with AdamW "
              f"exp_avg, exp_avg_sq and a 0-dim step per parameter, about {args.total_mib} MiB in all")
    print(f"repeats: {args.repeat} (median)\n")
    if args.sweep:
        from benchmarks.sweep import sweep_main

        out = sweep_main(args)
    elif args.memcheck:
        out = memcheck_main(args)
    elif args.profile:
        from benchmarks.pyspy import profile_main

        out = profile_main(args)
    else:
        out = run_main(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "environment": env, **out}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
