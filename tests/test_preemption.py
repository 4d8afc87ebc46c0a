"""Preemption-aware checkpointing (issue 19): real processes, real signals, real servers on 127.0.0.1."""

from __future__ import annotations

import datetime
import http.server
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from cloudckpt.errors import CheckpointAbortedError
from cloudckpt.preemption import PreemptionGuard, PreemptionWatcher, StepAgreement, StopDecision
from tests import preemption_workers
from tests.backends import new_bucket_name
from tests.dist import run_signalled_world, wait_for_files

QUIET_ENV = {"AWS_EC2_METADATA_DISABLED": "true", "NO_GCE_CHECK": "true"}


# -- servers ---------------------------------------------------------------------------------------


@pytest.fixture
def s3_root(moto_server: Any) -> tuple[str, str]:
    """A fresh bucket on moto: (root URI, endpoint)."""
    import boto3

    bucket = new_bucket_name()
    boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run", moto_server.endpoint_url


class _Metadata(http.server.ThreadingHTTPServer):
    """A tiny EC2 IMDSv2 + GCE metadata server; ``armed`` posts the notice."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _MetadataHandler)
        self.armed = threading.Event()
        self.token = "tok-123"
        self.requests: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    server: _Metadata

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        self.server.requests.append(f"PUT {self.path}")
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._send(200, self.server.token.encode())
        else:
            self._send(400)

    def do_GET(self) -> None:
        self.server.requests.append(f"GET {self.path}")
        if self.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
                self._send(401)
            elif self.server.armed.is_set():
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
                self._send(200, json.dumps({"action": "terminate", "time": when}).encode())
            else:
                self._send(404)
        elif self.path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                self._send(403)
            else:
                body = b"TRUE" if self.server.armed.is_set() else b"FALSE"
                self._send(200, body, {"Metadata-Flavor": "Google"})
        else:
            self._send(404)


@pytest.fixture
def metadata_server() -> Iterator[_Metadata]:
    server = _Metadata()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


# -- the world ---------------------------------------------------------------------------------------


def run_training(world: int, cfg: dict, act: Callable[[dict[int, int], str], None],
                 timeout: float = 150.0) -> list[dict]:
    """Spawn ``world`` training ranks; ``act(pids, ready_dir)`` once all are in the loop; results by rank."""
    return run_signalled_world(preemption_workers.train, world, cfg, act, timeout=timeout, store_timeout=120.0,
                               ready_timeout=120.0, join_timeout=30.0)


def _cfg(s3_root: tuple[str, str], tmp_path: Any, **kw: Any) -> dict:
    root, endpoint = s3_root
    cfg = {"root": root, "endpoint": endpoint, "ready_dir": str(tmp_path), "numel": 64 * 1024, "sleep": 0.03,
           "every": 5, "ready_at": 3, "env": dict(QUIET_ENV)}
    cfg.update(kw)
    return cfg


def _check_agreed(results: list[dict], source: str | None = None) -> int:
    steps = {r["step"] for r in results}
    assert len(steps) == 1, f"ranks stopped at different steps: {results}"
    step = steps.pop()
    for r in results:
        assert r["stopped"], f"rank {r['rank']} ran to max_steps: no preemption seen ({r})"
        assert r["latest"] == step and r["loaded"] == step and r["exact"], r
        assert r["open_uploads"] == 0, r
    if source is not None:
        assert source in {r["source"] for r in results}, results
    return step


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)


# -- multi-rank training loops -------------------------------------------------------------------------


def test_sigterm_to_one_rank_only(s3_root: Any, tmp_path: Any) -> None:
    results = run_training(2, _cfg(s3_root, tmp_path), lambda pids, _: _kill(pids[1]))
    _check_agreed(results, "signal")
    assert results[0]["source"] == "peer" and results[1]["source"] == "signal"


def test_sigterm_to_one_of_four_ranks(s3_root: Any, tmp_path: Any) -> None:
    results = run_training(4, _cfg(s3_root, tmp_path, sleep=0.05), lambda pids, _: _kill(pids[2]))
    _check_agreed(results, "signal")
    assert [r["source"] for r in results] == ["peer", "peer", "signal", "peer"]


def test_sigterm_to_all_ranks_staggered(s3_root: Any, tmp_path: Any) -> None:
    def act(pids: dict[int, int], _: str) -> None:
        for r in (1, 0):  # rank 1 first, rank 0 ~ one and a half steps later
            _kill(pids[r])
            time.sleep(0.045)

    results = run_training(2, _cfg(s3_root, tmp_path), act)
    _check_agreed(results, "signal")


def test_sigterm_while_async_upload_in_flight(s3_root: Any, tmp_path: Any) -> None:
    # 8 MiB per rank in 5 MiB parts: the step-5 upload is still running when the signal lands.
    cfg = _cfg(s3_root, tmp_path, numel=2 * 2**20, every=5, ready_at=1, mark_async=True, max_steps=400)

    def act(pids: dict[int, int], ready: str) -> None:
        wait_for_files(ready, "async5", range(2), 120.0)
        _kill(pids[0])

    results = run_training(2, cfg, act)
    step = _check_agreed(results, "signal")
    assert step > 5
    # The in-flight step 5 committed (it had the time) or was aborted; never half-written.
    assert results[0]["steps"][-1] == step


def test_ec2_spot_notice_without_signal(s3_root: Any, tmp_path: Any, metadata_server: _Metadata) -> None:
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{metadata_server.address}/", "NO_GCE_CHECK": "true"}
    results = run_training(2, _cfg(s3_root, tmp_path, env=env), lambda *_: metadata_server.armed.set())
    _check_agreed(results, "ec2")
    assert any(r.startswith("PUT /latest/api/token") for r in metadata_server.requests)


def test_gce_preempted_notice(s3_root: Any, tmp_path: Any, metadata_server: _Metadata) -> None:
    env = {"GCE_METADATA_HOST": metadata_server.address, "AWS_EC2_METADATA_DISABLED": "true"}
    results = run_training(2, _cfg(s3_root, tmp_path, env=env), lambda *_: metadata_server.armed.set())
    _check_agreed(results, "gce")


def test_signals_during_emergency_save_do_not_corrupt(s3_root: Any, tmp_path: Any) -> None:
    cfg = _cfg(s3_root, tmp_path, numel=2 * 2**20)

    def act(pids: dict[int, int], ready: str) -> None:
        _kill(pids[1])
        _kill(pids[1])  # a second SIGTERM right away
        wait_for_files(ready, "saving", range(2), 120.0)
        for r in (0, 1):  # a notice (and a third one for rank 1) during the emergency save itself
            _kill(pids[r])

    results = run_training(2, cfg, act)
    _check_agreed(results, "signal")


# -- in-process units -------------------------------------------------------------------------------------


@pytest.fixture
def tcp_stores() -> Iterator[tuple[Any, Any, Any]]:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=10))
    a = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=10))
    b = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=10))
    yield server, a, b


def test_agreement_first_proposal_wins(tcp_stores: Any) -> None:
    _, a, b = tcp_stores
    ra, rb = StepAgreement(a, "job/stop", rank=0), StepAgreement(b, "job/stop", rank=1)
    assert ra.poll() is None and not ra.reached(4, None)
    d = rb.propose(4, 1234.5, "signal")
    assert d == StopDecision(5, 1234.5, "signal", 1)
    assert not ra.reached(4, ra.poll())  # rank 0 at step 4: not yet
    assert ra.reached(5, ra.poll()) and rb.reached(5, rb.decision)
    # A later notice on another rank does not move the agreed step.
    late = StepAgreement(a, "job/stop", rank=0, margin=3)
    assert late.propose(9, 99.0, "ec2") == d
    # A rank already past the agreed step stops at once.
    assert late.reached(7, d)


def test_agreement_rejects_bad_values(tcp_stores: Any) -> None:
    _, a, _ = tcp_stores
    a.set("job2/stop", "not a decision")
    with pytest.raises(ValueError, match="malformed preemption decision"):
        StepAgreement(a, "job2/stop").poll()
    with pytest.raises(ValueError, match="margin"):
        StepAgreement(a, "k", margin=0)


def test_guard_agreement_with_request(tcp_stores: Any) -> None:
    _, a, b = tcp_stores
    g0 = PreemptionGuard("ns", watch=False, store=a, rank=0, grace=10.0)
    g1 = PreemptionGuard("ns", watch=False, store=b, rank=1, grace=10.0, margin=2)
    assert not g0.reached(1) and not g1.reached(1) and g0.stop_deadline() is None
    g1.request("scheduler says stop")
    assert not g1.reached(2) and not g0.reached(2)  # agreed: stop at 2 + 2
    assert not g0.reached(3) and not g1.reached(3)
    assert g0.reached(4) and g1.reached(4)
    assert g0.notice.source == "peer" and g1.notice.source == "request"
    assert g0.stop_deadline() == g1.stop_deadline() and 9.0 < g0.remaining() <= 10.0
    g0.close()
    g1.close()


def test_watcher_chains_and_restores_sigterm() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        prior = signal.getsignal(signal.SIGTERM)
        w = PreemptionWatcher(poll_metadata=False).start()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while w.signal_count < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.notice is not None and w.notice.source == "signal" and "SIGTERM" in w.notice.detail
        assert w.signal_count == 2 and seen == [signal.SIGTERM, signal.SIGTERM]
        first = w.notice
        w.close()
        assert signal.getsignal(signal.SIGTERM) is prior
        assert w.notice is first
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_watcher_off_main_thread_installs_nothing() -> None:
    before = signal.getsignal(signal.SIGTERM)
    box: list[PreemptionWatcher] = []
    t = threading.Thread(target=lambda: box.append(PreemptionWatcher(poll_metadata=False).start()))
    t.start()
    t.join()
    assert signal.getsignal(signal.SIGTERM) is before
    assert box[0].request("x").source == "request"
    box[0].close()


def test_watcher_polls_ec2_and_probe_is_off_the_caller(metadata_server: _Metadata,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://{metadata_server.address}")
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    t0 = time.perf_counter()
    w = PreemptionWatcher(signals=(), poll_interval=0.05).start()
    assert time.perf_counter() - t0 < 0.05  # start() never waits for a probe
    time.sleep(0.2)
    assert w.notice is None
    metadata_server.armed.set()
    deadline = time.monotonic() + 10
    while w.notice is None and time.monotonic() < deadline:
        time.sleep(0.02)
    w.close()
    assert w.notice is not None and w.notice.source == "ec2" and w.services == ["ec2"]
    assert w.notice.deadline is not None and 100 < w.notice.deadline - time.time() <= 121


def test_aborted_async_upload_commits_nothing(s3_root: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The abort hook of the emergency save: multipart uploads aborted, nothing committed, old step intact."""
    from cloudckpt import CheckpointManager

    for k, v in QUIET_ENV.items():
        monkeypatch.setenv(k, v)
    root, endpoint = s3_root
    with CheckpointManager(root, endpoint_url=endpoint, part_size=5 * 2**20, preemption=False) as mgr:
        mgr.save({"w": torch.full((16,), 1.0)}, 1)
        big = {"w": torch.randn(24 * 2**20 // 4)}
        handle = mgr.async_save(big, 2)
        handle.abort_event.set()
        with pytest.raises(CheckpointAbortedError, match="aborted for the emergency"):
            handle.result(timeout=60)
        with pytest.raises(CheckpointAbortedError):
            mgr.wait()
        assert mgr.steps() == [1]
        assert mgr.store.list_multipart_uploads(mgr.root.key("")) == []
        target = {"w": torch.zeros(16)}
        assert mgr.load(target) == 1 and torch.equal(target["w"], torch.full((16,), 1.0))
        # After a (requested) notice, save() is the emergency save and resumes from it.
        mgr.request_preemption("test")
        assert mgr.reached_preemption(3)
        mgr.save({"w": torch.full((16,), 3.0)}, 3)
        assert mgr.steps() == [1, 3]


def test_metadata_endpoints_are_never_probed_off_the_cloud(monkeypatch):
    """Off EC2/GCE (firmware says so) and with no endpoint named, nothing but 127.0.0.1 is ever contacted."""
    from cloudckpt import preemption

    for name in ("AWS_EC2_METADATA_DISABLED", "NO_GCE_CHECK", "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                 "GCE_METADATA_HOST", "GCE_METADATA_IP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(preemption, "on_ec2", lambda: False)
    monkeypatch.setattr(preemption, "on_gce", lambda: False)
    assert preemption.ec2_metadata_endpoint() is None and preemption.gce_metadata_host() is None
    monkeypatch.setattr(preemption, "on_ec2", lambda: True)
    monkeypatch.setattr(preemption, "on_gce", lambda: True)
    assert preemption.ec2_metadata_endpoint() == "http://169.254.169.254/"
    assert preemption.gce_metadata_host() == "169.254.169.254"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
    assert preemption.ec2_metadata_endpoint() == "http://127.0.0.1:9/"
