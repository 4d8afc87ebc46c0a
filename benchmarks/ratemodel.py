"""Request-rate model of a save at scale: peak requests/s per key prefix and time to save.

    python -m benchmarks.ratemodel                    # the table in docs/scale.md (markdown)
    python -m benchmarks.ratemodel --json             # the same rows as JSON
    python -m benchmarks.ratemodel --measure          # measure per-request client costs against the
                                                      # fast S3 server on 127.0.0.1, then print the table
    python -m benchmarks.ratemodel --ranks 2048 --gib-per-rank 4 --backend gs --prefix-strategy hash

Object stores throttle a checkpoint long before the network saturates (S3: at
least 3,500 writes/s per *partitioned* prefix, and a new bucket is one
partition; GCS: a new bucket starts near 1,000 object writes/s). This model
applies cloudckpt's own planning code (:func:`cloudckpt.transfer.plan_pacing`,
:func:`~cloudckpt.transfer.plan_budget_part_size`,
:func:`~cloudckpt.transfer.count_requests`, :func:`cloudckpt.writer.rank_prefix`)
to N ranks with B bytes each, and derives:

* the requests each rank sends (part size after the request budget, single PUT
  vs multipart, objects of ``target_object_size``);
* the rate each rank can send at: the least of its share of
  ``request_rate_limit`` (the cap), ``rank bandwidth / part size``,
  ``max_concurrency / per-request latency`` and ``1 / client CPU per request``;
* the peak requests/s in the busiest second, over the whole job and per key
  prefix. With the cap, ranks start at independent uniform phases, so the
  count in a second is binomial: the peak shown is its mean + 3 standard
  deviations. Without the cap, every rank fires ``max_concurrency`` requests at
  once and then goes at its natural rate;
* the time to save: the larger of the rate-bound and the transfer-bound
  times (random start phase + bytes over the rank's usable bandwidth + per
  request latency + at most half the ramp), or the client-CPU-bound time. A
  rank's bandwidth is shared by its requests in flight, each capped by one
  connection's throughput (an assumption, see
  :data:`DEFAULT_CONNECTION_BANDWIDTH`). Rows over the limit show no time: the
  service would answer 503s, and the unthrottled figure would be fiction.

Everything in the model is a pure function of its inputs (unit-tested in
tests/test_scale.py). Only ``--measure`` touches the network (127.0.0.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from cloudckpt.transfer import (
    MAX_DEFAULT_CONCURRENCY,
    TransferOptions,
    count_requests,
    plan_budget_part_size,
    plan_pacing,
)
from cloudckpt.layout import rank_prefix

MiB = 1 << 20
GiB = 1 << 30

#: Documented request-rate limits, requests/s (docs/scale.md, ../shared/reference/anchors.md §d).
S3_WRITES_PER_PARTITION = 3500.0
GCS_WRITES_PER_BUCKET_INITIAL = 1000.0

#: Per-request client costs measured with ``--measure`` against cloudckpt_testing.fast_s3 on the
#: development machine (2 shared cores, loopback; median of 3 runs, see docs/scale.md). CPU is
#: this process's CPU, user + system (boto3 signing and HTTP, cloudckpt's CRC32C, the kernel's
#: loopback send); wall is one request at a time.
MEASURED = {
    "client_cpu_per_request_s": 0.00121,
    "client_cpu_per_byte_s": 0.413e-9,
    "loopback_wall_per_request_s": 0.00152,
}

#: Assumed service latency of one write request in the same region (first byte to reply,
#: excluding the body's transfer). Not measured here: a parameter, typical for S3/GCS.
DEFAULT_SERVICE_LATENCY_S = 0.03

#: Assumed throughput of one HTTP connection to the service, bytes/s. Not measured here
#: (loopback says nothing about it); S3 guidance is often quoted as ~85-90 MB/s per
#: connection (UNVERIFIED in a primary source for this project).
DEFAULT_CONNECTION_BANDWIDTH = 90e6


@dataclass(frozen=True)
class StoreLimits:
    """The multipart limits :func:`cloudckpt.transfer.plan_part_size` reads from a store."""

    scheme: str = "s3"
    min_part_size: int = 5 * MiB
    max_part_size: int = 5 * GiB
    max_parts: int = 10_000


@dataclass(frozen=True)
class Scenario:
    """One save to model."""

    name: str
    ranks: int
    bytes_per_rank: int
    #: Network bandwidth one rank can use, bytes/s (its share of the node's NIC).
    rank_bandwidth: float = 1.25e9
    backend: str = "s3"
    prefix_strategy: "str | int" = "none"
    options: TransferOptions = field(default_factory=lambda: node_options())
    #: Bypass cloudckpt's pacing and request budget (the fixed-part-size, fire-at-once baseline).
    unpaced: bool = False
    #: Whether each spread prefix is already its own S3 partition (only then does spreading raise the limit).
    partitioned: bool = False
    service_latency: float = DEFAULT_SERVICE_LATENCY_S
    connection_bandwidth: float = DEFAULT_CONNECTION_BANDWIDTH
    client_cpu_per_request: float = MEASURED["client_cpu_per_request_s"]
    client_cpu_per_byte: float = MEASURED["client_cpu_per_byte_s"]


@dataclass(frozen=True)
class Result:
    """What :func:`model` derives for one scenario (rates in requests/s, times in s)."""

    scenario: Scenario
    part_size: int
    objects_per_rank: int
    requests_per_rank: int
    total_requests: int
    rate_cap_per_rank: float | None
    natural_rate_per_rank: float
    prefixes: int
    max_ranks_per_prefix: int
    peak_rps_total: float
    peak_rps_per_prefix: float
    limit: float
    limit_scope: str
    time_to_save: float
    bound: str

    @property
    def under_limit(self) -> bool:
        """True if the busiest second stays under the limit that applies."""
        peak = self.peak_rps_per_prefix if self.limit_scope == "per partitioned prefix" else self.peak_rps_total
        return peak <= self.limit

    def row(self) -> dict[str, Any]:
        """A flat dict for tables and JSON."""
        s = self.scenario
        return {
            "scenario": s.name, "backend": s.backend, "ranks": s.ranks,
            "total_TB": round(s.ranks * s.bytes_per_rank / 1e12, 3),
            "MiB_per_rank": round(s.bytes_per_rank / MiB, 1),
            "prefix_strategy": s.prefix_strategy, "paced": not s.unpaced,
            "part_MiB": round(self.part_size / MiB, 1), "objects_per_rank": self.objects_per_rank,
            "requests_per_rank": self.requests_per_rank, "total_requests": self.total_requests,
            "rate_cap_per_rank": None if self.rate_cap_per_rank is None else round(self.rate_cap_per_rank, 3),
            "prefixes": self.prefixes, "max_ranks_per_prefix": self.max_ranks_per_prefix,
            "peak_rps_total": round(self.peak_rps_total), "peak_rps_per_prefix": round(self.peak_rps_per_prefix),
            "limit": self.limit, "limit_scope": self.limit_scope, "under_limit": self.under_limit,
            # Over the limit the service answers 503s: the unthrottled time would be a fiction.
            "time_to_save_s": round(self.time_to_save, 1) if self.under_limit else None,
            "bound": self.bound if self.under_limit else "throttled (503)",
            "aggregate_GBps": round(s.ranks * s.bytes_per_rank / self.time_to_save / 1e9, 1)
            if self.under_limit else None,
        }


def object_sizes(bytes_per_rank: int, target_object_size: int) -> list[int]:
    """A rank's data objects: full ``target_object_size`` objects, then the remainder.

    The writer fills objects up to the target with whole items; with items much
    smaller than an object (the usual FSDP shard) this is what it produces.
    """
    if bytes_per_rank <= 0:
        return []
    full, rest = divmod(bytes_per_rank, target_object_size)
    return [target_object_size] * full + ([rest] if rest else [])


def prefix_counts(ranks: int, strategy: "str | int") -> Counter:
    """How many ranks share each key prefix under ``strategy`` (the names the writer really gives)."""
    if strategy == "none":
        return Counter({"": ranks})
    return Counter(rank_prefix(r, strategy).split("-", 1)[0] for r in range(ranks))


def busiest_second(ranks: int, per_rank_in_second: float) -> float:
    """Mean + 3 standard deviations of the requests ``ranks`` independent ranks start in one second.

    Each rank starts ``per_rank_in_second`` requests per second on a schedule with a
    uniform random phase: ``floor(x)`` for sure and one more with probability
    ``frac(x)``, so the total is ``ranks * floor(x)`` plus a binomial.
    """
    whole = math.floor(per_rank_in_second)
    p = per_rank_in_second - whole
    return ranks * whole + ranks * p + 3.0 * math.sqrt(ranks * p * (1.0 - p))


def model(s: Scenario) -> Result:
    """Derive requests, peak rates and time to save for scenario ``s`` (pure)."""
    opts = s.options
    store = StoreLimits(scheme=s.backend)
    sizes = object_sizes(s.bytes_per_rank, opts.target_object_size)
    if s.unpaced:
        rate_cap, ramp, budget = None, 0.0, None
    else:
        pacing = plan_pacing(opts, s.backend, s.ranks)
        rate_cap, ramp, budget = pacing.rate_per_rank, pacing.ramp_seconds, pacing.max_requests
    part = plan_budget_part_size(sizes, opts.part_size, budget, store)  # type: ignore[arg-type]
    n = count_requests(sizes, part, store)  # type: ignore[arg-type]
    bytes_per_request = s.bytes_per_rank / max(1, n)
    cpu_per_request = s.client_cpu_per_request + s.client_cpu_per_byte * bytes_per_request
    in_flight = max(1, min(opts.max_concurrency, n))
    # A rank's bandwidth is shared by its requests in flight, each capped by one connection's.
    rank_bw = min(s.rank_bandwidth, in_flight * s.connection_bandwidth)
    request_time = s.service_latency + bytes_per_request / (rank_bw / in_flight)
    natural = min(in_flight / request_time, 1.0 / cpu_per_request)
    rate = natural if rate_cap is None else min(natural, rate_cap)

    counts = prefix_counts(s.ranks, s.prefix_strategy)
    top = max(counts.values())
    if rate_cap is not None:
        # The schedule never starts more than rate_cap requests a second (at a random phase).
        per_rank_second = min(float(n), rate_cap)
    else:
        # Uncapped ranks fire their concurrency at once, then go at their natural rate.
        per_rank_second = min(float(n), max(float(in_flight), natural))
    if rate_cap is None:
        peak_total = s.ranks * per_rank_second      # every rank starts at the same instant
        peak_prefix = top * per_rank_second
    else:
        peak_total = busiest_second(s.ranks, per_rank_second)
        peak_prefix = busiest_second(top, per_rank_second)

    if s.backend == "gs":
        limit, scope = GCS_WRITES_PER_BUCKET_INITIAL, "per bucket (initial)"
    elif s.partitioned and s.prefix_strategy != "none":
        limit, scope = S3_WRITES_PER_PARTITION, "per partitioned prefix"
    else:
        limit, scope = S3_WRITES_PER_PARTITION, "one partition (unpartitioned)"

    last_part = min(part, sizes[-1]) if sizes else 0
    # The ramp holds requests in flight below the maximum for its first seconds: at most half of it is
    # lost (nothing when the rank has a single request in flight anyway).
    # A paced rank's first request waits for its random phase, up to 1 / rate_cap.
    phase = 0.0 if rate_cap is None else 1.0 / rate_cap
    times = {
        "transfer": (phase + s.bytes_per_rank / rank_bw + n * s.service_latency / in_flight
                     + ramp / 2 * (1 - 1 / in_flight)),
        "client CPU": phase + n * cpu_per_request,
        # Only a cap below the natural rate sets the pace (else the bandwidth term already counts it).
        "rate cap": (0.0 if rate_cap is None or rate_cap >= natural else
                     1.0 / rate_cap + (n - 1) / rate_cap + s.service_latency
                     + last_part / min(s.rank_bandwidth, s.connection_bandwidth)),
    }
    bound = max(times, key=lambda k: times[k])
    return Result(scenario=s, part_size=part, objects_per_rank=len(sizes), requests_per_rank=n,
                  total_requests=n * s.ranks, rate_cap_per_rank=rate_cap, natural_rate_per_rank=natural,
                  prefixes=len(counts), max_ranks_per_prefix=top, peak_rps_total=peak_total,
                  peak_rps_per_prefix=peak_prefix, limit=limit, limit_scope=scope,
                  time_to_save=times[bound], bound=bound)


# -- the table in docs/scale.md -----------------------------------------------------------------

#: 70B parameters with mixed-precision Adam: bf16 weights (2 B) + fp32 master weights (4 B)
#: + two fp32 moments (8 B) = 14 bytes/parameter, 0.98 TB in all.
LLAMA70B_ADAM_BYTES = 70_000_000_000 * 14


def node_options(**overrides: Any) -> TransferOptions:
    """cloudckpt's defaults as they resolve on a training node (dozens of CPUs), whatever runs the model."""
    return TransferOptions(**{"max_concurrency": MAX_DEFAULT_CONCURRENCY, **overrides})


def scenarios(**overrides: Any) -> list[Scenario]:
    """The scenarios of the table: 1,024 nodes x 8 GPUs saving a 70B model with optimizer state."""
    ranks = 1024 * 8
    per_rank = LLAMA70B_ADAM_BYTES // ranks
    base = dict(ranks=ranks, bytes_per_rank=per_rank)
    base.update(overrides)
    inf = node_options(request_rate_limit=math.inf)
    rows = [
        Scenario("defaults", backend="s3", **base),
        Scenario("defaults", backend="gs", **base),
        Scenario("defaults + hash spreading", backend="s3", prefix_strategy="hash", **base),
        Scenario("defaults + hash, partitioned, cap raised x256", backend="s3", prefix_strategy="hash",
                 partitioned=True, options=node_options(request_rate_limit=256 * 3000.0), **base),
        Scenario("no pacing (fixed 32 MiB parts, all at once)", backend="s3", unpaced=True, options=inf, **base),
        Scenario("no pacing, 8 MiB parts (s3torchconnector default)", backend="s3", unpaced=True,
                 options=node_options(part_size=8 * MiB, request_rate_limit=math.inf), **base),
        Scenario("no pacing + hash spreading, unpartitioned", backend="s3", unpaced=True, prefix_strategy="hash",
                 options=inf, **base),
        Scenario("no pacing + hash spreading, partitioned", backend="s3", unpaced=True, prefix_strategy="hash",
                 partitioned=True, options=inf, **base),
    ]
    # Fewer, larger ranks: the same 0.98 TB from 128 ranks, and 8 TB from 8,192 ranks.
    rows.append(Scenario("defaults, 128 ranks", backend="s3", ranks=128, bytes_per_rank=LLAMA70B_ADAM_BYTES // 128))
    rows.append(Scenario("defaults, 1 GB/rank (8 TB)", backend="s3", ranks=ranks, bytes_per_rank=10**9))
    rows.append(Scenario("defaults, 1 GB/rank (8 TB)", backend="gs", ranks=ranks, bytes_per_rank=10**9))
    return rows


_COLUMNS = [
    ("scenario", "scenario"), ("backend", "store"), ("ranks", "ranks"), ("MiB_per_rank", "MiB/rank"),
    ("part_MiB", "part MiB"), ("requests_per_rank", "req/rank"), ("total_requests", "requests"),
    ("rate_cap_per_rank", "cap/rank"), ("prefixes", "prefixes"), ("peak_rps_total", "peak req/s"),
    ("peak_rps_per_prefix", "peak/prefix"), ("limit", "limit"), ("limit_scope", "limit applies"),
    ("under_limit", "under?"), ("time_to_save_s", "save s"), ("bound", "bound by"),
]


def markdown(results: Sequence[Result]) -> str:
    """The results as a markdown table."""
    head = "| " + " | ".join(h for _, h in _COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    lines = [head, sep]
    for r in results:
        row = r.row()
        cells = []
        for key, _ in _COLUMNS:
            v = row[key]
            if key == "under_limit":
                v = "yes" if v else "**NO**"
            elif v is None:
                v = "-"
            elif isinstance(v, float) and v.is_integer():
                v = int(v)
            cells.append(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- measuring per-request client costs -----------------------------------------------------------


def measure_request_costs(n_small: int = 300, n_large: int = 24, large: int = 8 * MiB) -> dict[str, float]:
    """Client CPU and wall time per request against the fast S3 server (a child process on 127.0.0.1).

    ``n_small`` sequential 1 KiB PUTs give the per-request cost; ``n_large``
    sequential 8 MiB UploadParts, less that, give the per-byte cost. CPU is this
    process's CPU time (the server runs in its own process).
    """
    import os

    from cloudckpt import crc
    from cloudckpt.store import open_store
    from cloudckpt_testing.fast_s3 import FastS3Server
    from cloudckpt_testing.s3 import TEST_CREDENTIALS

    os.environ.update(TEST_CREDENTIALS)
    with FastS3Server() as server:
        import boto3

        boto3.client("s3", endpoint_url=server.endpoint_url).create_bucket(Bucket="ratemodel")
        store = open_store("s3://ratemodel", endpoint_url=server.endpoint_url)
        small = b"x" * 1024
        small_crc = crc.crc32c(small)
        for i in range(20):  # warm up: connections, signing caches
            store.put(f"warm/{i}", [small], crc32c=small_crc)
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(n_small):
            store.put(f"small/{i}", [small], crc32c=small_crc)
        cpu_small = (time.process_time() - c0) / n_small
        wall_small = (time.perf_counter() - w0) / n_small
        body = memoryview(bytearray(os.urandom(1024)) * (large // 1024))
        upload_id = store.create_multipart("large/obj")
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(n_large):
            store.upload_part("large/obj", upload_id, i + 1, [body], crc32c=crc.crc32c(body))
        cpu_large = (time.process_time() - c0) / n_large
        wall_large = (time.perf_counter() - w0) / n_large
        store.abort_multipart("large/obj", upload_id)
    return {
        "client_cpu_per_request_s": cpu_small,
        "client_cpu_per_byte_s": max(0.0, (cpu_large - cpu_small) / large),
        "loopback_wall_per_request_s": wall_small,
        "loopback_wall_per_8MiB_part_s": wall_large,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (markdown or JSON), optionally after measuring client costs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="rows as JSON instead of a markdown table")
    p.add_argument("--measure", action="store_true", help="measure client costs first and use them")
    p.add_argument("--ranks", type=int, help="model one scenario with this many ranks")
    p.add_argument("--gib-per-rank", type=float, default=None, help="bytes per rank, GiB (with --ranks)")
    p.add_argument("--backend", choices=("s3", "gs"), default="s3")
    p.add_argument("--prefix-strategy", default="none", help='"none", "hash" or a fan-out')
    p.add_argument("--rank-gbps", type=float, default=1.25, help="per-rank bandwidth, GB/s")
    p.add_argument("--latency", type=float, default=DEFAULT_SERVICE_LATENCY_S, help="service latency, s")
    p.add_argument("--conn-mbps", type=float, default=DEFAULT_CONNECTION_BANDWIDTH / 1e6,
                   help="throughput of one connection, MB/s")
    args = p.parse_args(argv)
    costs: dict[str, float] = {}
    if args.measure:
        costs = measure_request_costs()
        print("measured:", json.dumps({k: float(f"{v:.3g}") for k, v in costs.items()}), file=sys.stderr)
    over: dict[str, Any] = {"rank_bandwidth": args.rank_gbps * 1e9, "service_latency": args.latency,
                            "connection_bandwidth": args.conn_mbps * 1e6}
    if costs:
        over.update(client_cpu_per_request=costs["client_cpu_per_request_s"],
                    client_cpu_per_byte=costs["client_cpu_per_byte_s"])
    if args.ranks:
        strategy: "str | int" = int(args.prefix_strategy) if args.prefix_strategy.isdigit() else args.prefix_strategy
        per_rank = int((args.gib_per_rank or LLAMA70B_ADAM_BYTES / args.ranks / GiB) * GiB)
        rows = [Scenario("custom", ranks=args.ranks, bytes_per_rank=per_rank, backend=args.backend,
                         prefix_strategy=strategy, **over)]
    else:
        rows = [dataclasses.replace(s, **over) for s in scenarios()]
    results = [model(s) for s in rows]
    if args.json:
        print(json.dumps([r.row() for r in results], indent=1))
    else:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
