"""Scale: prefix spreading, request pacing (rate cap, jittered ramp, request budget), world size 8, throttling.

The request-rate model's report is ``python -m benchmarks.ratemodel`` and the
throttled-save report ``python -m benchmarks.throttled`` (docs/scale.md); here
are their pure functions and small end-to-end checks.
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

import cloudckpt
from benchmarks import ratemodel
from cloudckpt.retry import RetryPolicy
from cloudckpt.transfer import (
    DEFAULT_READ_RATE,
    DEFAULT_REQUEST_RATE,
    PacedLimiter,
    TransferEngine,
    TransferOptions,
    ObjectUpload,
    count_requests,
    plan_budget_part_size,
    plan_pacing,
    plan_read_pacing,
)
from cloudckpt.layout import parse_data_object_name, rank_prefix
from tests import workers
from tests.dist import run_world
from tests.helpers import assert_state_equal, empty_like_state_dict, realistic_state_dict

MiB = 1 << 20
GiB = 1 << 30
LIMITS = ratemodel.StoreLimits()


# -- prefix names ------------------------------------------------------------------------------


def test_rank_prefix_names():
    assert rank_prefix(12) == "__12_"                      # FileSystemWriter's own names
    assert rank_prefix(12, 16) == "c-__12_"
    assert rank_prefix(3, 300) == "003-__3_"               # as many hex digits as 299 needs
    tag, rest = rank_prefix(12, "hash").split("-", 1)
    assert rest == "__12_" and len(tag) == 2 and int(tag, 16) >= 0
    assert rank_prefix(12, "hash") == rank_prefix(12, "hash")  # stable: overwrite cleanup can rely on it
    for bad in ("rank", "HASH", 1, 0, -4, True, 2.5):
        with pytest.raises(ValueError, match="prefix_strategy"):
            rank_prefix(0, bad)
    with pytest.raises(ValueError, match="prefix_strategy"):
        cloudckpt.storage_writer("s3://bucket-x/ck", prefix_strategy="subdir")


def test_prefix_fan_out_is_even_and_hash_uses_many_prefixes():
    rr = ratemodel.prefix_counts(8192, 16)
    assert len(rr) == 16 and set(rr.values()) == {512}
    hashed = ratemodel.prefix_counts(8192, "hash")
    assert len(hashed) == 256 and sum(hashed.values()) == 8192
    assert ratemodel.prefix_counts(8192, "none") == {"": 8192}


# -- pacing plans (pure) -----------------------------------------------------------------------------


def test_pacing_defaults_follow_world_size_and_backend():
    opts = TransferOptions(max_concurrency=16)  # the default on a host with 8+ CPUs
    big = plan_pacing(opts, "s3", 8192)
    assert big.rate_per_rank == pytest.approx(DEFAULT_REQUEST_RATE["s3"] / 8192)
    assert big.ramp_seconds == 2.0                          # capped
    assert big.max_requests == 1                            # 5 s of 0.37 req/s
    gcs = plan_pacing(opts, "gs", 8192)
    assert gcs.rate_per_rank == pytest.approx(800 / 8192)
    small = plan_pacing(opts, "s3", 8)
    assert small.rate_per_rank == 375.0
    assert small.ramp_seconds == pytest.approx(8 * 16 / 3000)
    assert small.max_requests == 1875
    local = plan_pacing(opts, "file", 64)
    assert (local.rate_per_rank, local.ramp_seconds, local.max_requests, local.active) == (None, 0.0, None, False)
    off = plan_pacing(TransferOptions(request_rate_limit=math.inf), "s3", 8192)
    assert off.rate_per_rank is None and off.max_requests is None and not off.active
    explicit = plan_pacing(TransferOptions(request_rate_limit=100.0, ramp_seconds=0.0, max_requests_per_rank=7),
                           "s3", 4)
    assert (explicit.rate_per_rank, explicit.ramp_seconds, explicit.max_requests) == (25.0, 0.0, 7)
    # A short deadline bounds the derived budget: pacing alone must never run a save past it.
    tight = plan_pacing(TransferOptions(request_rate_limit=100.0, save_deadline=4.0), "s3", 1)
    assert tight.max_requests == 100
    for bad in ({"request_rate_limit": 0}, {"max_requests_per_rank": 0}, {"ramp_seconds": -1.0}):
        with pytest.raises(ValueError):
            TransferOptions(**bad)


def test_request_counts_and_budget_part_size():
    assert count_requests([100 * MiB], 32 * MiB, LIMITS) == 4 + 2     # parts + create + complete
    assert count_requests([10 * MiB, 40 * MiB], 32 * MiB, LIMITS) == 1 + 4
    assert plan_budget_part_size([100 * MiB], 32 * MiB, 6, LIMITS) == 32 * MiB   # within budget: unchanged
    assert plan_budget_part_size([100 * MiB], 32 * MiB, None, LIMITS) == 32 * MiB
    grown = plan_budget_part_size([100 * MiB], 32 * MiB, 4, LIMITS)
    assert count_requests([100 * MiB], grown, LIMITS) <= 4
    assert count_requests([100 * MiB], grown - MiB, LIMITS) > 4        # the smallest that fits
    assert plan_budget_part_size([100 * MiB], 32 * MiB, 1, LIMITS) == 100 * MiB   # one single PUT
    # A budget below one request per object cannot be met: the fewest requests it is.
    sizes = [GiB] * 3
    ps = plan_budget_part_size(sizes, 32 * MiB, 2, LIMITS)
    assert ps == GiB and count_requests(sizes, ps, LIMITS) == 3
    # Requests never grow with the part size (what the bisection relies on).
    counts = [count_requests([3 * GiB + 7, 700 * MiB], p * MiB, LIMITS) for p in range(5, 400, 7)]
    assert counts == sorted(counts, reverse=True)
    # The 10,000-part rule still applies under a generous budget.
    assert plan_budget_part_size([200 * GiB], 5 * MiB, 10**9, LIMITS) == 5 * MiB
    assert count_requests([200 * GiB], 5 * MiB, LIMITS) <= 10_000 + 2


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_paced_limiter_ramps_from_one_and_schedules_slots_at_a_random_phase():
    clock = _Clock()
    lim = PacedLimiter(16, rate=10.0, ramp_seconds=2.0, rng=lambda: 1.0, clock=clock)
    assert lim.ramp == 2.0                                # draw 1.0: the slowest ramp
    assert lim.limit == 1
    clock.t += 1.0
    assert lim.limit == 8
    clock.t += 1.5
    assert lim.limit == 16
    half = PacedLimiter(16, ramp_seconds=2.0, rng=lambda: 0.0, clock=clock)
    assert half.ramp == 1.0                               # draws lie in [ramp/2, ramp]
    phased = PacedLimiter(4, rate=10.0, rng=lambda: 0.5, clock=clock)
    start = clock.t
    assert phased.reserve() == pytest.approx(start + 0.05)  # first slot at the drawn phase
    assert phased.reserve() == pytest.approx(start + 0.15)
    clock.t += 5.0                                         # idle time is not banked as a burst
    assert phased.reserve() == pytest.approx(clock.t)
    assert phased.reserve() == pytest.approx(clock.t + 0.1)


def test_paced_limiter_keeps_aimd_or_turns_it_off():
    on = PacedLimiter(16, rate=100.0)
    on.on_throttle(time.monotonic())
    assert on.limit == 8
    for _ in range(1000):
        on.on_success()
    assert on.limit == 16
    off = PacedLimiter(16, rate=100.0, adaptive=False)
    off.on_throttle(time.monotonic())
    assert off.limit == 16


def test_paced_limiter_gives_up_its_slot_at_the_deadline_or_on_cancel():
    lim = PacedLimiter(2, rate=0.1, rng=lambda: 0.99)      # first slot ~10 s away
    assert lim.acquire(deadline=time.monotonic() + 0.05) is False
    assert lim.in_flight == 0
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    assert lim.acquire(cancel=cancel) is False
    assert lim.in_flight == 0


def test_engine_grows_parts_to_fit_the_request_budget(tmp_path):
    from cloudckpt.store import open_store

    store = open_store(str(tmp_path))
    data = torch.arange(3 * MiB, dtype=torch.int32)          # 12 MiB
    opts = TransferOptions(part_size=2 * MiB, max_requests_per_rank=3)
    engine = TransferEngine(store, opts, world_size=4)
    [done] = engine.upload([ObjectUpload(str(tmp_path / "obj"), [memoryview(data.numpy()).cast("B")])])
    assert engine.pacing.part_size == 12 * MiB and engine.pacing.requests == 1   # one PUT instead of 6+2
    assert engine.pacing.world_size == 4 and engine.pacing.rate_per_rank is None  # local: no rate cap
    assert done.size == 12 * MiB
    assert (tmp_path / "obj").read_bytes() == data.numpy().tobytes()


def test_read_pacing_defaults_follow_world_size_and_backend():
    opts = TransferOptions(max_concurrency=16)
    big = plan_read_pacing(opts, "s3", 8192)
    assert big.rate_per_rank == pytest.approx(DEFAULT_READ_RATE["s3"] / 8192)
    assert big.ramp_seconds == 2.0 and big.max_requests is None
    assert plan_read_pacing(opts, "gs", 8192).rate_per_rank == pytest.approx(DEFAULT_READ_RATE["gs"] / 8192)
    small = plan_read_pacing(opts, "s3", 8)
    assert small.rate_per_rank == pytest.approx(562.5) and small.ramp_seconds == pytest.approx(8 * 16 / 4500)
    assert not plan_read_pacing(opts, "file", 64).active
    assert not plan_read_pacing(TransferOptions(read_rate_limit=math.inf), "s3", 8192).active
    explicit = plan_read_pacing(TransferOptions(read_rate_limit=100.0, ramp_seconds=0.0), "gs", 4)
    assert (explicit.rate_per_rank, explicit.ramp_seconds) == (25.0, 0.0)
    with pytest.raises(ValueError):
        TransferOptions(read_rate_limit=0)


def test_downloads_keep_one_rate_schedule_across_batches(cloud_backend):
    # A load fetches in several batches; the rank's share of the read rate must hold
    # across them, not restart with each batch. Lower bound only: a slow machine
    # can only make the reads further apart.
    store = cloud_backend.store()
    data = torch.arange(4096, dtype=torch.int32)
    TransferEngine(store, TransferOptions()).upload([ObjectUpload("paced/obj", [memoryview(data.numpy()).cast("B")])])
    raw = data.numpy().tobytes()
    rate, world, reads = 40.0, 2, 10
    engine = TransferEngine(store, TransferOptions(read_rate_limit=rate, ramp_seconds=0.0), world_size=world)
    t0 = time.monotonic()
    for i in range(reads):
        out = bytearray(16)
        engine.download_ranges([("paced/obj", 16 * i, memoryview(out))])
        assert bytes(out) == raw[16 * i:16 * i + 16]
    elapsed = time.monotonic() - t0
    assert engine.read_pacing is not None and engine.read_pacing.rate_per_rank == rate / world
    assert engine.stats.as_dict()["attempts"] == reads
    # The 10th read cannot start before 9 slots of 1/20 s have passed.
    assert elapsed >= (reads - 1) / (rate / world) - 1e-3
    unpaced = TransferEngine(store, TransferOptions(read_rate_limit=math.inf))
    unpaced.download_ranges([("paced/obj", 0, memoryview(bytearray(16)))])
    assert unpaced.read_pacing is not None and not unpaced.read_pacing.active


# -- the request-rate model (pure) -------------------------------------------------------------------


def test_model_helpers():
    assert ratemodel.object_sizes(0, GiB) == []
    assert ratemodel.object_sizes(2 * GiB + 5, GiB) == [GiB, GiB, 5]
    assert ratemodel.busiest_second(100, 2.0) == 200.0                       # no randomness left
    p = 0.25
    assert ratemodel.busiest_second(400, p) == pytest.approx(100 + 3 * math.sqrt(400 * p * (1 - p)))


def test_model_defaults_keep_1024_nodes_under_the_limits():
    results = {(r.scenario.name, r.scenario.backend): r for r in map(ratemodel.model, ratemodel.scenarios())}
    s3 = results[("defaults", "s3")]
    gcs = results[("defaults", "gs")]
    assert s3.scenario.ranks == 8192 and 0.9e12 < s3.scenario.ranks * s3.scenario.bytes_per_rank < 1.1e12
    assert s3.under_limit and s3.peak_rps_total <= 3500
    assert gcs.under_limit and gcs.peak_rps_total <= 1000
    assert s3.requests_per_rank == 1                        # the budget turned 4 parts + 2 into one PUT
    unpaced = results[("no pacing (fixed 32 MiB parts, all at once)", "s3")]
    assert not unpaced.under_limit and unpaced.peak_rps_total == 8192 * 6
    # Spreading lowers the rate per prefix, but only partitioned prefixes have their own limit.
    assert not results[("no pacing + hash spreading, unpartitioned", "s3")].under_limit
    assert results[("no pacing + hash spreading, partitioned", "s3")].under_limit
    assert all(r.under_limit for (name, _), r in results.items() if name.startswith("defaults"))


def test_model_small_world_is_bandwidth_bound():
    s = ratemodel.Scenario("one rank", ranks=1, bytes_per_rank=4 * GiB, rank_bandwidth=1e9,
                           connection_bandwidth=1e9)
    r = ratemodel.model(s)
    assert r.bound == "transfer" and r.part_size == 32 * MiB
    assert 4 * GiB / 1e9 <= r.time_to_save < 4 * GiB / 1e9 + 1.0


def test_model_cli_prints_json(capsys):
    assert ratemodel.main(["--json", "--ranks", "64", "--gib-per-rank", "2", "--backend", "gs"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["ranks"] == 64 and row["backend"] == "gs" and row["under_limit"]


# -- spread checkpoints end to end (one process) ------------------------------------------------------


@pytest.mark.parametrize("strategy", ["hash", 16])
def test_spread_checkpoint_loads_with_the_stock_reader(backend, tmp_path, strategy):
    sd = realistic_state_dict(3)
    uri = backend.uri("spread")
    cloudckpt.save(sd, uri, no_dist=True, prefix_strategy=strategy, target_object_size=4096, **backend.options)
    keys = backend.keys(uri)
    data = [k for k in keys if k.endswith(".distcp")]
    tag = rank_prefix(0, strategy)
    assert len(data) > 1 and all(k.startswith(tag) and "/" not in k for k in data), data
    meta = cloudckpt.storage_reader(uri, **backend.options).read_metadata()
    assert {i.relative_path for i in meta.storage_data.values()} == set(data)
    local = tmp_path / "copy"
    backend.download(uri, str(local))                       # the plain client, not cloudckpt
    target = empty_like_state_dict(sd)
    dcp.load(target, storage_reader=dcp.FileSystemReader(str(local)), no_dist=True)
    assert_state_equal(sd, target)


def test_overwrite_cleanup_ls_and_verify_with_spread_names(cloud_backend, capsys):
    from cloudckpt import cli
    from cloudckpt.verify import verify

    uri = cloud_backend.uri("run", "step-1")
    opts = cloud_backend.options
    cloudckpt.save({"a": torch.randn(1000), "b": torch.randn(2000)}, uri, no_dist=True, target_object_size=4096,
                   **opts)
    old = [k for k in cloud_backend.keys(uri) if k.endswith(".distcp")]
    assert old and all(k.startswith("__0_") for k in old)
    sd = {"a": torch.randn(1000), "c": torch.randn(10)}
    writer = cloudckpt.storage_writer(uri, overwrite=True, prefix_strategy="hash", **opts)
    cloudckpt.save(sd, uri, storage_writer=writer, no_dist=True)
    new = [k for k in cloud_backend.keys(uri) if k.endswith(".distcp")]
    # One spread, save-unique object; the flat-named old objects were removed after the commit.
    assert len(new) == 1 and new[0].startswith(rank_prefix(0, "hash")), new
    assert parse_data_object_name(new[0]) == (0, 0, writer.save_token)
    report = verify(uri, **opts)
    assert report.ok and report.objects_checked == 1, report
    argv = ["--json", "--endpoint-url", cloud_backend.endpoint]
    assert cli.main(argv + ["ls", uri]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["committed"] and {o["name"] for o in doc["objects"]} >= set(new)
    assert cli.main(argv + ["info", uri]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"] == [0]
    assert cli.main(argv + ["ls", cloud_backend.uri("run")]) == 0
    [entry] = json.loads(capsys.readouterr().out)["checkpoints"]
    assert entry["step"] == 1 and entry["committed"] and entry["objects"] == 3   # data, manifest, .metadata


# -- world size 8 (gloo), S3 and GCS -----------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend_name", ["s3", "gcs"])
def test_world_size_8_save_and_load(backend_name, request, tmp_path):
    from tests.conftest import make_backend

    backend = make_backend(backend_name, request, tmp_path)
    uri = backend.uri("w8")
    out = run_world(8, workers.scale_save_load, uri, backend.options, 8, timeout=110)
    assert all(o["ok"] for o in out), out
    assert {o["world_size"] for o in out} == {8}          # every rank knew the world it shares the rate with
    scheme = "s3" if backend_name == "s3" else "gs"
    assert {o["rate_per_rank"] for o in out} == {DEFAULT_REQUEST_RATE[scheme] / 8}
    data = [k for k in backend.keys(uri) if k.endswith(".distcp")]
    assert sorted(k.split("-", 1)[0] for k in data) == [str(r) for r in range(8)]   # fan-out 8: one tag per rank


# -- throttling ---------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_throttled_multirank_save_completes_where_fixed_concurrency_fails(moto_server, request, tmp_path):
    """Two ranks, 30 MiB each in 5 MiB parts, behind 4 writes/s per checkpoint prefix.

    Fixed concurrency (no AIMD, no pacing) with 3 attempts per request cannot get
    its 18 requests through; paced (request_rate_limit under the service's rate)
    it commits; AIMD alone (10 attempts) commits too, after lowering and raising
    each rank's concurrency.
    """
    from cloudckpt_testing.faultproxy import FaultProxy, ThrottleRule
    from tests.conftest import make_backend

    backend = make_backend("s3", request, tmp_path)
    throttle = ThrottleRule(per_prefix_rps=4.0, burst=4, prefix_depth=2)    # bucket/throttled/<case>
    base = {"part_size": 5 * MiB, "max_concurrency": 8}
    cases = {
        "fixed": (dict(base, adaptive_concurrency=False, request_rate_limit=math.inf, ramp_seconds=0.0),
                  RetryPolicy(max_attempts=3)),
        "paced": (dict(base, request_rate_limit=0.8 * 4.0), RetryPolicy(max_attempts=3)),
        "aimd": (dict(base, request_rate_limit=math.inf), RetryPolicy()),
    }
    with FaultProxy(moto_server.endpoint_url, throttle=throttle, api="s3") as proxy:
        # Each case writes under its own prefix, so each has its own token bucket in the proxy.
        runs = [(backend.uri("throttled", name), dict(backend.options, endpoint_url=proxy.url, retry_policy=policy),
                 transfer) for name, (transfer, policy) in cases.items()]
        per_rank = run_world(2, workers.throttled_saves, runs, timeout=140)
        stats = proxy.stats()["throttled"]
    seen = {name: [per_rank[r][i] for r in range(2)] for i, name in enumerate(cases)}
    throttled = {name: stats.get(f"{backend.bucket}/throttled/{name}", 0) for name in cases}
    fixed, paced, aimd = seen["fixed"], seen["paced"], seen["aimd"]
    assert {r["outcome"] for r in fixed} != {"committed"}, fixed
    assert throttled["fixed"] > 0
    assert ".metadata" not in backend.keys(backend.uri("throttled", "fixed"))
    assert backend.pending_uploads(backend.uri("throttled", "fixed")) == []
    assert [r["outcome"] for r in paced] == ["committed", "committed"] and all(r["loaded"] for r in paced), paced
    assert all(r["rate_per_rank"] == pytest.approx(1.6) for r in paced), paced
    assert throttled["paced"] < throttled["fixed"], throttled
    assert [r["outcome"] for r in aimd] == ["committed", "committed"], aimd
    assert throttled["aimd"] > 0
    for r in aimd:                                         # per rank: lowered, then raised again
        if r["stats"]["failures"].get("throttle"):
            assert r["stats"]["limit_min"] < 8 and r["stats"]["limit_max_after_min"] > r["stats"]["limit_min"], r
    assert any(r["stats"]["failures"].get("throttle") for r in aimd), aimd
