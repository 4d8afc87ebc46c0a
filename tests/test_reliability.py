"""Reliability: retries, lost replies, throttling, deadlines, dead ranks, all through a fault-injecting proxy.

The trial suite here is small (one trial per fault kind and backend). The
larger run whose figures are in the README is ``python -m benchmarks.reliability``.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import cloudckpt
from cloudckpt import retry
from cloudckpt.errors import CloudCheckpointError, DeadlineExceededError, TransferError
from cloudckpt.retry import AdaptiveLimiter, Attempt, FailureKind, GaveUp, RetryPolicy, RetryScope
from cloudckpt.store import open_store
from cloudckpt_testing.faultproxy import FaultProxy, FaultRule
from cloudckpt_testing.reliability import TRIAL_FAULTS, Target, run_fault_trial
from cloudckpt.transfer import ObjectUpload, TransferEngine, TransferOptions
from tests import workers
from tests.dist import run_world, run_world_with_deaths

MiB = 1 << 20

pytestmark = pytest.mark.timeout(120)

# Operation names per backend, as the proxy classifies them.
OPS = {
    "s3": {"part": "UploadPart", "create": "CreateMultipartUpload", "complete": "CompleteMultipartUpload",
           "put": "PutObject"},
    "gcs": {"part": "gcs.xml.mpu.part", "create": "gcs.xml.mpu.init", "complete": "gcs.xml.mpu.complete",
            "put": "gcs.upload.multipart"},
}
# How a conditional (commit) PUT of .metadata shows in the request target.
COMMIT_PATH = {"s3": r"/\.metadata", "gcs": r"ifGenerationMatch=0"}


def _proxy(backend, rules: list[FaultRule]) -> FaultProxy:
    """A proxy in front of the backend's server, told which API it speaks."""
    return FaultProxy(backend.endpoint, rules=rules, api="s3" if backend.name == "s3" else "gcs")


def _proxied(backend, proxy: FaultProxy, **extra) -> dict:
    opts = dict(backend.options, endpoint_url=proxy.url)
    opts.update(extra)
    return opts


# -- pure parts of the retry loop ------------------------------------------------------------


def test_backoff_is_full_jitter_exponential_and_capped():
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=4.0)
    assert retry.backoff_delay(policy, 1, rng=lambda: 1.0) == 0.5
    assert retry.backoff_delay(policy, 3, rng=lambda: 1.0) == 2.0
    assert retry.backoff_delay(policy, 10, rng=lambda: 1.0) == 4.0   # capped
    assert retry.backoff_delay(policy, 10, rng=lambda: 0.0) == 0.0   # full jitter reaches zero
    assert retry.backoff_delay(policy, 4, rng=lambda: 0.25) == 1.0


def _flaky(failures: list[BaseException]):
    seen: list[Attempt] = []

    def fn(attempt: Attempt) -> str:
        seen.append(attempt)
        if failures:
            raise failures.pop(0)
        return "done"

    return fn, seen


def _kind(exc: BaseException) -> FailureKind | None:
    return {"throttle": FailureKind.THROTTLE, "reset": FailureKind.NETWORK,
            "refused": FailureKind.CONNECT}.get(str(exc))


def test_retry_loop_retries_transient_failures_and_tells_attempts_what_happened():
    fn, seen = _flaky([RuntimeError("throttle"), RuntimeError("reset")])
    sleeps: list[float] = []
    assert retry.call(fn, classify=_kind, policy=RetryPolicy(), sleep=sleeps.append) == "done"
    assert [a.number for a in seen] == [1, 2, 3]
    assert not seen[1].maybe_applied_before          # a throttled request was not applied
    assert seen[2].maybe_applied_before              # a reset one may have been
    assert len(sleeps) == 2


def test_retry_loop_stops_at_max_attempts_and_reraises_final_errors():
    fn, seen = _flaky([RuntimeError("throttle")] * 5)
    with pytest.raises(GaveUp) as info:
        retry.call(fn, classify=_kind, policy=RetryPolicy(max_attempts=3), sleep=lambda s: None)
    assert info.value.reason == "attempts" and info.value.attempts == 3 and len(seen) == 3
    fn, seen = _flaky([ValueError("final")])
    with pytest.raises(ValueError, match="final"):
        retry.call(fn, classify=_kind, policy=RetryPolicy(), sleep=lambda s: None)
    assert len(seen) == 1


def test_refused_connections_give_up_on_their_own_short_clock_and_then_fail_fast():
    health = retry.EndpointHealth()
    # Attempts are not the limit here (the jittered delays could use 10 up in 0.3 s): the clock is.
    policy = RetryPolicy(unreachable_timeout=0.3, initial_backoff=0.05, max_backoff=0.1, max_attempts=1000)
    fn, seen = _flaky([RuntimeError("refused")] * 1000)
    t0 = time.monotonic()
    with pytest.raises(GaveUp) as info:
        retry.call(fn, classify=_kind, policy=policy, health=health)
    assert info.value.reason == "unreachable" and time.monotonic() - t0 < 5
    assert len(seen) > 1
    # The next call to the endpoint given up on makes a single attempt.
    fn, seen = _flaky([RuntimeError("refused")] * 10)
    with pytest.raises(GaveUp):
        retry.call(fn, classify=_kind, policy=policy, health=health)
    assert len(seen) == 1


def test_scope_deadline_and_cancellation_stop_retries():
    fn, _ = _flaky([RuntimeError("throttle")] * 100)
    with retry.use_scope(RetryScope(deadline=time.monotonic() + 0.2)):
        with pytest.raises(GaveUp) as info:
            retry.call(fn, classify=_kind,
                       policy=RetryPolicy(max_attempts=10_000, initial_backoff=0.05, max_backoff=0.05))
    assert info.value.reason == "deadline"
    cancel = threading.Event()
    cancel.set()
    fn, seen = _flaky([RuntimeError("throttle")] * 100)
    with retry.use_scope(RetryScope(cancel=cancel)):
        with pytest.raises(GaveUp) as info:
            retry.call(fn, classify=_kind, policy=RetryPolicy())
    assert info.value.reason == "cancelled" and len(seen) == 1


def test_aimd_limiter_halves_once_per_round_and_climbs_back():
    lim = AdaptiveLimiter(16)
    t = time.monotonic()
    lim.on_throttle(t)
    assert lim.limit == 8
    lim.on_throttle(t)              # started before the decrease: the same round, no second cut
    assert lim.limit == 8
    lim.on_throttle(time.monotonic())
    assert lim.limit == 4
    for _ in range(4 + 5):          # about +1 per `limit` successes
        lim.on_success()
    assert 5 <= lim.limit <= 6
    for _ in range(1000):
        lim.on_success()
    assert lim.limit == 16
    floor = AdaptiveLimiter(4, min_limit=2)
    for _ in range(5):
        floor.on_throttle(time.monotonic())
    assert floor.limit == 2


# -- the stores' retries against real servers through the proxy ---------------------------------


def test_5xx_keeps_retrying_past_the_unreachable_window(cloud_backend):
    rules = [FaultRule(None, fault="status", status=503, count=6)]
    with _proxy(cloud_backend, rules) as proxy:
        store = open_store(cloud_backend.root, **_proxied(
            cloud_backend, proxy, retry_policy=RetryPolicy(unreachable_timeout=0.01, initial_backoff=0.05)))
        store.check_bucket()
        assert proxy.stats()["injected"] == 6


@pytest.mark.parametrize("what", ["commit", "complete", "create"])
def test_lost_replies_are_recognised(cloud_backend, what):
    """The request lands, its reply is lost, the retry finds the work done: a success, nothing left over."""
    ops = OPS[cloud_backend.name]
    rule = {
        "commit": FaultRule(ops["put"], fault="drop_response", count=1, path_regex=COMMIT_PATH[cloud_backend.name]),
        "complete": FaultRule(ops["complete"], fault="drop_response", count=1),
        "create": FaultRule(ops["create"], fault="drop_response", count=1),
    }[what]
    uri = cloud_backend.uri("lost")
    sd = {"big": torch.randn(1_600_000), "step": 3}
    with _proxy(cloud_backend, [rule]) as proxy:
        opts = _proxied(cloud_backend, proxy, part_size=5 * MiB)
        cloudckpt.save(sd, uri, no_dist=True, **opts)
        assert proxy.stats()["injected"] == 1
    out = {"big": torch.empty(1_600_000), "step": 0}
    cloudckpt.load(out, uri, no_dist=True, **cloud_backend.options)
    assert torch.equal(out["big"], sd["big"]) and out["step"] == 3
    assert cloud_backend.pending_uploads(uri) == []


def test_commit_by_another_writer_is_still_refused(cloud_backend):
    """The lost-reply check compares bytes: someone else's .metadata is not mistaken for ours."""
    uri = cloud_backend.uri("race")
    writer = cloudckpt.storage_writer(uri, **cloud_backend.options)
    cloudckpt.save({"a": torch.ones(3)}, uri, no_dist=True, **cloud_backend.options)
    with pytest.raises(cloudckpt.CheckpointExistsError, match="another writer"):
        writer._commit(b"not the stored bytes")  # noqa: SLF001 - the commit step on its own


def test_throttling_lowers_concurrency_and_success_raises_it(cloud_backend):
    ops = OPS[cloud_backend.name]
    store_opts = dict(cloud_backend.options)
    rules = [FaultRule(ops["part"], fault="status", status=503, count=6)]
    data = [torch.randn(10 * MiB // 4) for _ in range(4)]   # 40 MiB: 8 parts of 5 MiB
    with _proxy(cloud_backend, rules) as proxy:
        store_opts["endpoint_url"] = proxy.url
        store = open_store(cloud_backend.root, **store_opts)
        engine = TransferEngine(store, TransferOptions(part_size=5 * MiB, max_concurrency=8))
        segments = [memoryview(t.numpy()).cast("B") for t in data]
        [done] = engine.upload([ObjectUpload("throttled/obj", segments)])
        assert proxy.stats()["faults"][ops["part"]]["status"] == 6
    stats = engine.stats.as_dict()
    assert stats["failures"] == {"throttle": 6} and stats["retries"] == 6
    assert stats["limit_min"] <= 4, stats            # at least one halving of 8
    assert stats["limit_max_after_min"] > stats["limit_min"], stats   # and successes raised it again
    assert done.size == 40 * MiB


def test_persistent_throttling_fails_within_the_deadline_and_leaves_nothing(cloud_backend):
    ops = OPS[cloud_backend.name]
    uri = cloud_backend.uri("deadline")
    rules = [FaultRule(ops["part"], fault="status", status=503, rate=1.0, skip=1)]
    with _proxy(cloud_backend, rules) as proxy:
        opts = _proxied(cloud_backend, proxy, part_size=5 * MiB,
                        transfer_options=TransferOptions(save_deadline=4.0, max_concurrency=4))
        t0 = time.monotonic()
        with pytest.raises(TransferError) as info:
            cloudckpt.save({"big": torch.randn(3_000_000)}, uri, no_dist=True, **opts)
        elapsed = time.monotonic() - t0
    assert isinstance(info.value, DeadlineExceededError), info.value
    assert "save_deadline" in str(info.value)
    assert elapsed < 40, f"took {elapsed:.1f} s"
    keys = cloud_backend.keys(uri)
    assert ".metadata" not in keys and not [k for k in keys if k.endswith(".distcp")]
    assert cloud_backend.pending_uploads(uri) == []


def test_the_deadline_covers_the_whole_save_including_the_commit(cloud_backend):
    ops = OPS[cloud_backend.name]
    uri = cloud_backend.uri("late-commit")
    rules = [FaultRule(ops["put"], fault="status", status=503, rate=1.0, path_regex=COMMIT_PATH[cloud_backend.name])]
    with _proxy(cloud_backend, rules) as proxy:
        opts = _proxied(cloud_backend, proxy, transfer_options=TransferOptions(save_deadline=4.0))
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="save_deadline"):
            cloudckpt.save({"a": torch.randn(1000)}, uri, no_dist=True, **opts)
        elapsed = time.monotonic() - t0
        assert proxy.stats()["faults"][ops["put"]]["status"] >= 1
    assert elapsed < 40, f"took {elapsed:.1f} s"
    assert ".metadata" not in cloud_backend.keys(uri)


# -- the trial suite: one trial per fault kind and backend -----------------------------------------


@pytest.mark.parametrize("kind", sorted(TRIAL_FAULTS))
def test_fault_trial(cloud_backend, kind):
    """Save + load under one fault kind (10% of requests plus one guaranteed): success or a clean failure."""
    target = Target(cloud_backend.name, cloud_backend.endpoint, timeout=1.5)
    result = run_fault_trial(target, kind, 0, rate=0.1, deadline=60.0, seed=11)
    print(f"\n{result}")
    assert result.faults_injected >= 1
    assert result.acceptable, result


# -- ranks that fail or die ------------------------------------------------------------------------


def test_failing_rank_fails_every_rank_within_the_deadline(moto_server, request, tmp_path):
    from tests.conftest import make_backend

    backend = make_backend("s3", request, tmp_path)
    uri = backend.uri("bounded")
    rules = [FaultRule("UploadPart", fault="status", status=503, rate=1.0)]
    with FaultProxy(moto_server.endpoint_url, rules=rules) as proxy:
        fast = dict(backend.options, part_size=5 * MiB)
        bad = dict(fast, endpoint_url=proxy.url, transfer_options=TransferOptions(save_deadline=5.0))
        seen = run_world(2, workers.save_under_faults, uri, fast, 1, bad)
    assert [s["outcome"] for s in seen] == ["DeadlineExceededError", "DeadlineExceededError"], seen
    assert all(s["elapsed"] < 60 for s in seen), seen
    assert ".metadata" not in backend.keys(uri)
    assert backend.pending_uploads(uri) == []


def test_killed_rank_leaves_no_commit_and_the_previous_checkpoint_latest(cloud_backend):
    from cloudckpt.manager import CheckpointManager, step_name

    ops = OPS[cloud_backend.name]
    root = cloud_backend.uri("run")
    # Rank 1's parts stall, so it is mid-upload when it SIGKILLs itself; step 1 is untouched.
    rules = [FaultRule(ops["part"], fault="stall", stall_seconds=60, path_regex=r"step-0+2(/|%2F)__1_")]
    with _proxy(cloud_backend, rules) as proxy:
        opts = _proxied(cloud_backend, proxy, part_size=5 * MiB)
        results, dead = run_world_with_deaths(2, workers.save_twice_then_die, root, opts, 1, 3.0,
                                              expect_dead={1})
        stalled = proxy.stats()["faults"].get(ops["part"], {}).get("stall", 0)
    assert dead == {1: -9}
    assert stalled >= 1, "rank 1 was not mid-upload when it died"
    assert results[0]["outcome"] != "committed"
    assert results[0]["after_death"] < 60, results
    step2 = f"{root}/{step_name(2)}"
    assert ".metadata" not in cloud_backend.keys(step2)
    assert cloud_backend.pending_uploads(step2) == []   # the survivor aborted the dead rank's upload
    manager = CheckpointManager(root, **cloud_backend.options)
    assert manager.latest() == 1
    out = {"big0": torch.empty(1_600_000), "big1": torch.empty(1_600_000), "step": 0}
    manager.load(out)
    assert torch.equal(out["big1"], torch.full((1_600_000,), 11.0)) and out["step"] == 1


def test_errors_of_a_cancelled_upload_are_not_the_ones_reported(cloud_backend):
    """When one request fails for good, the error raised is that one, not a 'cancelled' follower."""
    ops = OPS[cloud_backend.name]
    uri = cloud_backend.uri("first")
    rules = [FaultRule(ops["part"], fault="status", status=400, count=1)]
    with _proxy(cloud_backend, rules) as proxy:
        opts = _proxied(cloud_backend, proxy, part_size=5 * MiB)
        with pytest.raises(CloudCheckpointError) as info:
            cloudckpt.save({"big": torch.randn(4_000_000)}, uri, no_dist=True, **opts)
    msg = str(info.value)
    assert "cancelled" not in msg and ("400" in msg or "BadRequest" in msg), msg
    assert cloud_backend.pending_uploads(uri) == []


_LATE_UPLOAD = """
import sys, threading, time
from cloudckpt.store.local import LocalStore
from cloudckpt.transfer import ObjectUpload, TransferEngine, TransferOptions

def late() -> None:
    time.sleep(0.5)  # the main thread has returned by now: the interpreter is shutting down
    objs = [ObjectUpload(f"{sys.argv[1]}/o{i}", [bytes([i]) * 1000]) for i in range(4)]
    TransferEngine(LocalStore(), TransferOptions(max_concurrency=2)).upload(objs)
    print("uploaded", flush=True)

threading.Thread(target=late).start()
"""


def test_uploads_still_run_while_the_interpreter_shuts_down(tmp_path):
    """A background save reaching its uploads after the main thread returned must still upload."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _LATE_UPLOAD, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "uploaded" in proc.stdout, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o0", "o1", "o2", "o3"]
