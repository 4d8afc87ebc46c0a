"""Benchmark cloudckpt against s3torchconnector, fsspec, local /dev/shm and the raw HTTP floor.

    python -m benchmarks.run                       # 1 GiB, every method, median of 3
    python -m benchmarks.run --total-mib 128 --repeat 1 --methods cloudckpt,raw-http
    python -m benchmarks.run --server fast,moto    # S3 methods against moto too (use small sizes)
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
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Iterable

from benchmarks.measure import run_child
from benchmarks.methods import METHODS
from benchmarks.servers import Server

MiB = 1 << 20
DEFAULT_METHODS = list(METHODS)
PACKAGES = ["torch", "boto3", "botocore", "s3torchconnector", "s3fs", "gcsfs", "fsspec", "google-cloud-storage",
            "cloudckpt", "moto", "psutil"]


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Machine and package versions, for the report."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


# --------------------------------------------------------------------------- running


class Runner:
    """Starts the servers a plan needs and runs save+load round trips in child processes."""

    def __init__(self, server_kinds: Iterable[str], total_bytes: int, tensor_bytes: int,
                 timeout: float = 1800.0, log: bool = True) -> None:
        self.total_bytes = total_bytes
        self.tensor_bytes = tensor_bytes
        self.timeout = timeout
        self.log = log
        self.servers: dict[str, Server] = {}
        self._kinds = list(dict.fromkeys(server_kinds))
        self.workdir = ""

    def __enter__(self) -> "Runner":
        self.workdir = tempfile.mkdtemp(prefix="cloudckpt-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            for kind in self._kinds:
                # Warm the fast server's memory for one checkpoint (+ slack) so no run pays for page faults.
                prefault = self.total_bytes + 64 * MiB if kind == "fast" else 0
                self.servers[kind] = Server(kind, prefault_bytes=prefault).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for s in self.servers.values():
            s.stop()
        self.servers.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def spec(self, method: str, server_kind: str | None, name: str, label: str,
             options: dict[str, Any] | None = None, total_bytes: int | None = None) -> dict[str, Any]:
        """The child's job description, without the op."""
        server = self.servers[server_kind] if server_kind else None
        return {
            "method": method, "label": label, "name": name, "options": options or {},
            "total_bytes": total_bytes or self.total_bytes, "tensor_bytes": self.tensor_bytes,
            "server": server.info if server else None, "workdir": self.workdir,
        }

    def roundtrip(self, method: str, server_kind: str | None, name: str, label: str,
                  options: dict[str, Any] | None = None, total_bytes: int | None = None,
                  ops: tuple[str, ...] = ("save", "load"),
                  hooks: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Save then load ``method`` (each in a fresh child), then drop the stored data.

        ``hooks`` maps an op to ``on_ready``/``on_done`` callbacks for :func:`run_child`
        (the profiler attaches there).
        """
        server = self.servers[server_kind] if server_kind else None
        spec = self.spec(method, server_kind, name, label, options, total_bytes)
        out: dict[str, dict[str, Any]] = {}
        try:
            for op in ops:
                res = run_child(dict(spec, op=op), timeout=self.timeout, **(hooks or {}).get(op, {}))
                res["label"], res["options"] = label, options or {}
                out[op] = res
                if self.log:
                    print(f"  {label:<34} {op:<4} " + _brief(res), file=sys.stderr, flush=True)
                if not res.get("ok"):
                    break
        finally:
            if server:
                server.reset()
            for entry in os.listdir(self.workdir):
                shutil.rmtree(os.path.join(self.workdir, entry), ignore_errors=True)
        return out


def _brief(res: dict[str, Any]) -> str:
    if not res.get("ok"):
        return f"FAILED: {res.get('error', '?')[:300]}"
    gbps = res["bytes"] / res["wall_s"] / 1e9
    return (f"{res['wall_s']:7.3f} s {gbps:6.3f} GB/s cpu {res['client_cpu_s']:6.2f} s "
            f"rss +{res['peak_extra_rss'] / MiB:6.0f} MiB")


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


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median figures of the repeats of one (label, op); FAILED if any repeat failed."""
    bad = [r for r in results if not r.get("ok")]
    if bad or not results:
        return {"failed": True, "error": bad[0].get("error", "no result") if bad else "no result"}
    nbytes = results[0]["bytes"]
    gb = nbytes / 1e9
    wall = statistics.median(r["wall_s"] for r in results)
    server_cpu = [r["server_cpu_s"] for r in results if r.get("server_cpu_s") is not None]
    counted = [r["requests"] for r in results if r.get("requests") is not None]
    return {
        "failed": False,
        "repeats": len(results),
        "bytes": nbytes,
        "wall_s": wall,
        "wall_all": [r["wall_s"] for r in results],
        "gbps": gb / wall,
        "client_cpu_per_gb": statistics.median(r["client_cpu_s"] for r in results) / gb,
        "server_cpu_per_gb": statistics.median(server_cpu) / gb if server_cpu else None,
        "peak_extra_rss_mib": statistics.median(r["peak_extra_rss"] for r in results) / MiB,
        "peak_extra_rss_all_mib": [round(r["peak_extra_rss"] / MiB, 1) for r in results],
        "requests": statistics.median(sum(c.values()) for c in counted) if counted else None,
        "request_mix": counted[0] if counted else None,
    }


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
    raw: dict[tuple[str, str], list[dict[str, Any]]] = {}
    order: list[str] = []
    with Runner(kinds, args.total_mib * MiB, args.tensor_mib * MiB) as runner:
        for rep in range(args.repeat):
            print(f"repeat {rep + 1}/{args.repeat}", file=sys.stderr, flush=True)
            for method, kind in plan:
                label = label_for(method, kind)
                if label not in order:
                    order.append(label)
                res = runner.roundtrip(method, kind, f"r{rep}", label)
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
    return {"mode": "compare", "summaries": summaries,
            "raw": [r for rs in raw.values() for r in rs]}


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
    print(f"state dict: {args.total_mib} MiB of {args.tensor_mib} MiB float32 tensors + 64 × 4 KiB tensors "
          f"+ non-tensor objects; repeats: {args.repeat} (median)\n")
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
