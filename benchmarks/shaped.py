"""Save and load over a network shaped like a cloud region: throughput against the ideal.

    python -m benchmarks.shaped                                  # 30 ms, 25 MB/s per connection, 200 MB/s link
    python -m benchmarks.shaped --latency-ms 20 --conn-mb-per-s 50 --link-mb-per-s 400 --total-mib 512
    python -m benchmarks.shaped --json

Loopback has no latency and no per-connection limit, so the comparison in
``benchmarks.run`` cannot show whether a client's concurrency and part sizes
would fill a real link. Here the fast S3 server runs in its shaped mode
(:class:`cloudckpt_testing.fast_s3.Shaping`): every response waits
``--latency-ms`` before its first byte, each connection is capped at
``--conn-mb-per-s`` in each direction, and the whole link at
``--link-mb-per-s``. The ideal throughput of a configuration is

    ideal = min(link, connections x per-connection cap)

(:func:`ideal_bps`), with ``connections`` the client's configured concurrency
(cloudckpt's ``max_concurrency``), or, for s3torchconnector, whose CRT client
picks its own connection count from ``throughput_target_gbps``, the most
requests the server saw in flight at once. Each point is a save and a load in
fresh child processes (:mod:`benchmarks.measure`, loads verified value by
value); for loads, "part" is cloudckpt's ``max_read_size``.

Keep the caps low enough that this machine's cores are not the bottleneck: the
point is to see the network's shape, not the CPU's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from benchmarks.measure import REPO_ROOT
from benchmarks.methods import Method
from benchmarks.runner import MiB, environment, summarize
from benchmarks.servers import BUCKET, CREDENTIALS, REGION

MB = 1_000_000


# --------------------------------------------------------------------------- the model (pure)


def ideal_bps(per_connection: float, connections: int, link: float | None = None) -> float:
    """Ideal throughput in bytes/s: ``min(link, connections x per_connection)`` (no link cap when None)."""
    if per_connection <= 0 or connections < 1:
        raise ValueError("per_connection must be positive and connections at least 1")
    total = connections * per_connection
    return total if link is None else min(link, total)


def connections_needed(link: float, per_connection: float) -> int:
    """Requests in flight needed to fill ``link`` when each connection carries ``per_connection``."""
    if link <= 0 or per_connection <= 0:
        raise ValueError("link and per_connection must be positive")
    return math.ceil(link / per_connection - 1e-9)


def request_efficiency(part_bytes: int, per_connection: float, latency: float) -> float:
    """Share of a connection's time spent moving bytes when each request of ``part_bytes`` pays ``latency`` first."""
    transfer = part_bytes / per_connection
    return transfer / (transfer + latency)


def smallest_efficient_part(per_connection: float, latency: float, efficiency: float = 0.9) -> int:
    """The smallest part (bytes) whose requests reach ``efficiency`` on one connection.

    ``p / C / (p / C + L) >= e``  =>  ``p >= L x C x e / (1 - e)``: at 90% a part must
    carry nine latencies' worth of the connection's bandwidth.
    """
    if not 0 < efficiency < 1:
        raise ValueError("efficiency must be between 0 and 1")
    return math.ceil(latency * per_connection * efficiency / (1 - efficiency) - 1e-6)  # no float fuzz


# --------------------------------------------------------------------------- methods (run in the child)


class ShapedCloudckpt(Method):
    """cloudckpt with explicit TransferOptions (part_size, max_concurrency, max_read_size)."""

    description = "cloudckpt S3StorageWriter/S3StorageReader"
    KNOBS = ("part_size", "max_concurrency", "max_read_size")

    def _options(self) -> Any:
        from cloudckpt import TransferOptions

        return TransferOptions(**{k: v for k, v in self.ctx.options.items() if k in self.KNOBS})

    def uri(self, name: str) -> str:
        return f"s3://{BUCKET}/cloudckpt/{name}"

    def save(self, sd: dict[str, Any], name: str) -> None:
        import torch.distributed.checkpoint as dcp

        import cloudckpt

        writer = cloudckpt.S3StorageWriter(self.uri(name), endpoint_url=self.ctx.endpoint, region=REGION,
                                           transfer_options=self._options())
        dcp.save(sd, checkpoint_id=self.uri(name), storage_writer=writer, no_dist=True)

    def load(self, sd: dict[str, Any], name: str) -> None:
        import torch.distributed.checkpoint as dcp

        import cloudckpt

        reader = cloudckpt.S3StorageReader(self.uri(name), endpoint_url=self.ctx.endpoint,
                                           transfer_options=self._options())
        dcp.load(sd, checkpoint_id=self.uri(name), storage_reader=reader, no_dist=True)


class ShapedS3TorchConnector(Method):
    """s3torchconnector with its knobs: part_size, throughput_target_gbps (CRT connections), thread_count (save)."""

    description = "s3torchconnector DCP S3StorageWriter/S3StorageReader"

    def uri(self, name: str) -> str:
        return f"s3://{BUCKET}/s3torchconnector/{name}"

    def _fs(self, **kw: Any) -> Any:
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client
        from s3torchconnector.dcp.s3_file_system import S3FileSystem

        o = self.ctx.options
        config = S3ClientConfig(force_path_style=True, part_size=o.get("part_size", 8 * MiB),
                                throughput_target_gbps=o.get("throughput_target_gbps", 10.0))
        # The DCP classes take no endpoint; give their file system a client that has one.
        client = S3Client(REGION, endpoint=self.ctx.endpoint, s3client_config=config)
        return S3FileSystem(REGION, s3_client=client, **kw)

    def save(self, sd: dict[str, Any], name: str) -> None:
        import torch.distributed.checkpoint as dcp
        from s3torchconnector.dcp import S3StorageWriter

        writer = S3StorageWriter(REGION, self.uri(name), thread_count=self.ctx.options.get("thread_count", 1))
        writer.fs = self._fs()
        dcp.save(sd, checkpoint_id=self.uri(name), storage_writer=writer, no_dist=True)

    def load(self, sd: dict[str, Any], name: str) -> None:
        import torch.distributed.checkpoint as dcp
        from s3torchconnector.dcp import S3StorageReader

        reader = S3StorageReader(REGION, self.uri(name))
        reader.fs = self._fs(reader_constructor=reader._reader_constructor)
        dcp.load(sd, checkpoint_id=self.uri(name), storage_reader=reader, no_dist=True)


CHILD_METHODS: dict[str, type[Method]] = {
    "shaped-cloudckpt": ShapedCloudckpt,
    "shaped-s3torchconnector": ShapedS3TorchConnector,
}


def _child(spec_path: str) -> None:
    """Child entry: make this module's methods known to :mod:`benchmarks.methods`, then measure."""
    from benchmarks import measure, methods

    methods.METHODS.update(CHILD_METHODS)
    measure.child_main(spec_path)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Point:
    """One configuration: a method and its knobs."""

    method: str  # "cloudckpt" or "s3torchconnector"
    label: str
    options: dict[str, Any] = field(default_factory=dict)

    def connections(self, default_concurrency: int) -> int | None:
        """The configured concurrency, if the method has one (cloudckpt); None: take the observed peak."""
        if self.method != "cloudckpt":
            return None
        return int(self.options.get("max_concurrency", default_concurrency))


def plan(default_concurrency: int) -> list[Point]:
    """cloudckpt's defaults, then concurrency and part size one at a time; s3torchconnector's defaults and knobs."""
    c = "cloudckpt"
    pts = [Point(c, f"defaults (max_concurrency={default_concurrency}, part 32 MiB, read 64 MiB)")]
    pts += [Point(c, f"max_concurrency={n}", {"max_concurrency": n})
            for n in (1, 2, 4, 8, 16) if n != default_concurrency]
    for part in (8, 16, 64):
        pts.append(Point(c, f"part_size=max_read_size={part} MiB",
                         {"part_size": part * MiB, "max_read_size": part * MiB}))
    for n in (8, 16):  # enough parts and reads to keep every connection busy on a small checkpoint
        pts.append(Point(c, f"max_concurrency={n}, part_size=max_read_size=16 MiB",
                         {"max_concurrency": n, "part_size": 16 * MiB, "max_read_size": 16 * MiB}))
    s = "s3torchconnector"
    pts += [
        Point(s, "defaults (part 8 MiB, 10 Gbps target, thread_count=1)"),
        Point(s, "part_size=32 MiB", {"part_size": 32 * MiB}),
        Point(s, "thread_count=4", {"thread_count": 4}),
        Point(s, "throughput_target_gbps=1", {"throughput_target_gbps": 1.0}),
    ]
    return pts


# --------------------------------------------------------------------------- running


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One measured operation in a fresh ``python -m benchmarks.shaped --child`` (see :mod:`benchmarks.measure`)."""
    with tempfile.TemporaryDirectory(prefix="cloudckpt-shaped-") as tmp:
        spec = dict(spec, result_path=os.path.join(tmp, "result.json"))
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
        env.setdefault("PYTHONWARNINGS", "ignore")
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.shaped", "--child", spec_path], cwd=REPO_ROOT,
                                  env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"child ran past {timeout:.0f} s"}
        try:
            with open(spec["result_path"]) as f:
                return dict(json.load(f))
        except FileNotFoundError:
            return {"ok": False, "error": f"child exited with status {proc.returncode}: {proc.stderr[-1500:]}"}


def _row(point: Point, op: str, results: list[dict[str, Any]], peaks: list[int], shaping: Any,
         default_concurrency: int) -> dict[str, Any]:
    s = summarize(results)
    peak = max(peaks) if peaks else None
    conns = point.connections(default_concurrency)
    basis = "configured"
    if conns is None:
        conns, basis = peak or 1, "observed peak"
    ideal = ideal_bps(shaping.conn_rate, conns, shaping.link_rate)
    row = {"method": point.method, "label": point.label, "options": point.options, "op": op,
           "connections": conns, "connections_basis": basis, "peak_in_flight": peak, "ideal_bps": ideal, **s}
    if not s["failed"]:
        row["bps"] = s["bytes"] / s["wall_s"]
        row["efficiency"] = row["bps"] / ideal
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the shaped server, run every point, return the rows."""
    import boto3  # noqa: F401 - fail early if the S3 client is missing

    from cloudckpt import TransferOptions
    from cloudckpt_testing.fast_s3 import FastS3Server, Shaping
    from cloudckpt_testing.s3 import s3_client

    shaping = Shaping(latency=args.latency_ms / 1e3, conn_rate=args.conn_mb_per_s * MB,
                      link_rate=args.link_mb_per_s * MB if args.link_mb_per_s else None)
    default_concurrency = TransferOptions().max_concurrency
    os.environ.update(CREDENTIALS)
    points = [p for p in plan(default_concurrency) if (not args.only or p.method in args.only)
              and (not args.defaults_only or p.label.startswith("defaults"))
              and (not args.match or any(m == p.label for m in args.match))]
    rows: list[dict[str, Any]] = []
    total = args.total_mib * MiB
    with FastS3Server(shaping=shaping, prefault_bytes=total + 64 * MiB) as server:
        info = {"kind": "fast", "endpoint": server.endpoint_url, "pid": server.stats()["pid"]}
        for i, point in enumerate(points):
            res: dict[str, list[dict[str, Any]]] = {"save": [], "load": []}
            peaks: dict[str, list[int]] = {"save": [], "load": []}
            for rep in range(args.repeat):
                server.reset()
                s3_client(server.endpoint_url).create_bucket(Bucket=BUCKET)
                spec = {"method": f"shaped-{point.method}", "label": point.label, "name": f"p{i}-{rep}",
                        "options": point.options, "total_bytes": total, "tensor_bytes": args.tensor_mib * MiB,
                        "server": info, "workdir": None}
                for op in ("save", "load"):
                    server.reset_stats()
                    one = run_child(dict(spec, op=op), timeout=args.timeout)
                    peaks[op].append(int(server.stats()["peak_in_flight"]))
                    res[op].append(one)
                    print(f"  {point.method:<16} {point.label:<52} {op} "
                          + (f"{one['bytes'] / one['wall_s'] / MB:7.1f} MB/s peak {peaks[op][-1]}" if one.get("ok")
                             else f"FAILED {one.get('error', '')[:300]}"), file=sys.stderr, flush=True)
                    if not one.get("ok"):
                        break
                if len(res["load"]) <= rep:
                    res["load"].append({"ok": False, "error": "not run: the save failed"})
            rows += [_row(point, op, res[op], peaks[op], shaping, default_concurrency) for op in ("save", "load")]
    return {"mode": "shaped", "latency_ms": args.latency_ms, "conn_mb_per_s": args.conn_mb_per_s,
            "link_mb_per_s": args.link_mb_per_s, "total_mib": args.total_mib, "tensor_mib": args.tensor_mib,
            "repeat": args.repeat, "default_concurrency": default_concurrency, "environment": environment(),
            "rows": rows}


def _cell(row: dict[str, Any]) -> str:
    if row["failed"]:
        return f"FAILED: {str(row.get('error'))[:120]} | | | "
    return (f"{row['bps'] / MB:.1f} | {row['ideal_bps'] / MB:.0f} ({row['connections']}) | "
            f"**{row['efficiency'] * 100:.0f}%** | {row['peak_in_flight']} ")


def table(report: dict[str, Any]) -> str:
    """The markdown table: one line per point, save and load side by side."""
    link = f"{report['link_mb_per_s']:.0f} MB/s link" if report["link_mb_per_s"] else "no link cap"
    out = [f"### Shaped network: {report['latency_ms']:.0f} ms first-byte latency, "
           f"{report['conn_mb_per_s']:.0f} MB/s per connection, {link}; {report['total_mib']} MiB "
           f"({report['tensor_mib']} MiB tensors), median of {report['repeat']}\n",
           "| method | configuration | save MB/s | save ideal MB/s (conns) | save % of ideal | save peak in flight "
           "| load MB/s | load ideal MB/s (conns) | load % of ideal | load peak in flight |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    rows = report["rows"]
    for sv, ld in zip(rows[::2], rows[1::2], strict=True):
        out.append(f"| {sv['method']} | {sv['label']} | {_cell(sv)}| {_cell(ld)}|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.shaped", description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--conn-mb-per-s", type=float, default=25.0)
    ap.add_argument("--link-mb-per-s", type=float, default=200.0, help="0: no link cap")
    ap.add_argument("--total-mib", type=int, default=256)
    ap.add_argument("--tensor-mib", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child")
    ap.add_argument("--only", nargs="*", choices=["cloudckpt", "s3torchconnector"])
    ap.add_argument("--defaults-only", action="store_true", help="only each method's defaults")
    ap.add_argument("--match", nargs="*", help="only the points with these exact labels")
    ap.add_argument("--json", help="also write the report as JSON to this path")
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    report = run(args)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
