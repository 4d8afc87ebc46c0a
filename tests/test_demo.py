"""``cloudckpt demo``: end to end on moto's S3 server, and the causes its failures name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cloudckpt import demo

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "cloudckpt")
#: README's command: the console script of this venv (``python -m cloudckpt.cli`` where there is none).
CLI = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "cloudckpt.cli"]


def _demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run_demo(*args: str, cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "demo", *args], capture_output=True, text=True, env=_demo_env(), cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=600)


@pytest.mark.slow
def test_demo_on_moto_crashes_resumes_from_latest_committed_and_verifies(tmp_path):
    p = _run_demo("--json", "--steps", "4", "--every", "2", "--size-mib", "4", "--nproc", "2", cwd=str(tmp_path))
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    s = json.loads(p.stdout)
    assert s["storage"].startswith("embedded S3 server (moto) at http://127.0.0.1:"), s
    assert s["ranks"] == 2 and s["checkpoints_taken"] == 2 and s["checkpoint_steps"] == [2, 4]
    assert s["upload_errors"] == [], s
    # The crash may come before or after the last upload commits; resume must pick the newest commit
    # (each resuming rank also checked that its step is the newest one listed as committed).
    assert s["verified"] and s["mismatches"] == [], s
    assert s["committed_before_crash"], s
    assert s["resumed_from"] in (max(s["committed_before_crash"]), s["in_flight_at_crash"]), s
    assert s["first_blocking_ms"] > 0 and s["median_blocking_ms"] > 0
    assert 4 * 1024 * 1024 * 0.9 < s["state_bytes"] < 4 * 1024 * 1024 * 1.1
    text = demo.format_summary(s)
    for label in ("checkpoints taken", "blocking per save", "upload throughput", "resumed from step",
                  "state verified: OK"):
        assert label in text


@pytest.mark.slow
def test_demo_rank_failure_names_its_cause_without_the_reachability_hint(tmp_path):
    # The checkpoint root lies below a regular file: every rank fails with NotADirectoryError,
    # a local problem, so the demo must say so and must not blame the network.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    p = _run_demo("--steps", "2", "--every", "1", "--size-mib", "1", "--nproc", "2",
                  "--uri", str(blocker / "ckpts"), cwd=str(tmp_path))
    assert p.returncode != 0, p.stdout
    assert "demo training: rank " in p.stderr and "NotADirectoryError" in p.stderr, p.stderr
    assert "its log ends with:" in p.stderr and "Traceback" in p.stderr, p.stderr
    assert "reachable" not in p.stderr, p.stderr


def test_demo_storage_choice():
    assert demo.choose_storage(None, None, {})[0] == "embedded"
    assert demo.choose_storage(None, None, {"AWS_ENDPOINT_URL": "http://minio:9000"}) == (
        "endpoint", "S3 endpoint http://minio:9000")
    assert demo.choose_storage(None, None, {"AWS_ENDPOINT_URL_S3": "http://a", "AWS_ENDPOINT_URL": "http://b"})[1] \
        == "S3 endpoint http://a"  # the S3-specific variable wins, as in boto3
    assert demo.choose_storage(None, "http://c", {"AWS_ENDPOINT_URL": "http://b"})[1] == "S3 endpoint http://c"
    assert demo.choose_storage("gs://bucket/run", None, {"AWS_ENDPOINT_URL": "http://b"})[0] == "uri"


def test_demo_without_moto_fails_at_once_naming_the_demo_extra(monkeypatch, capsys):
    from cloudckpt import cli

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setitem(sys.modules, "moto", None)  # as if installed without the demo extra
    assert cli.main(["demo"]) == cli.EXIT_MISSING
    err = capsys.readouterr().err
    assert "moto" in err and "pip install 'cloudckpt[demo]'" in err and "--uri" in err, err


def test_digest_needs_no_numpy():
    # README's demo venv has no numpy: digests must come from the tensors' bytes through torch alone.
    code = textwrap.dedent("""
        import struct, sys, warnings
        sys.modules["numpy"] = None
        warnings.simplefilter("ignore")
        import torch
        from cloudckpt import crc, demo
        try:
            torch.arange(3.0).numpy()
        except RuntimeError:
            pass
        else:
            raise SystemExit("numpy was importable")
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        state = {"t": base.t(), "row": base[1], "empty": torch.zeros(0), "step": 7}
        got = demo._digest(state)
        want_t = crc.crc32c(struct.pack("12f", *[float(x) for x in range(12)][0::4]
                                        + [float(x) for x in range(12)][1::4]
                                        + [float(x) for x in range(12)][2::4]
                                        + [float(x) for x in range(12)][3::4]))
        assert got["t"] == f"torch.float32:[4, 3]:{want_t:08x}", got
        assert got["row"] == f"torch.float32:[4]:{crc.crc32c(struct.pack('4f', 4, 5, 6, 7)):08x}", got
        assert got["empty"] == f"torch.float32:[0]:{crc.crc32c(b''):08x}", got
        assert got["step"] == "7", got
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr


# -- what a failed phase reports ---------------------------------------------------------------


def _phase(workdir, logs, errors=None, codes=None, stopped=(), exited_at=None, timed_out=False):
    """Lay out the rank logs (and recorded errors) of a failed training phase, as the launcher leaves them."""
    for rank, text in enumerate(logs):
        (workdir / f"train-rank{rank}.log").write_text(text)
    for rank, err in (errors or {}).items():
        (workdir / f"train-rank{rank}.error.json").write_text(json.dumps(err))
    codes = codes or [1] * len(logs)
    return demo._PhaseResult(codes=codes, exited_at=exited_at or [float(r) for r in range(len(logs))],
                             stopped=set(stopped), timed_out=timed_out)


def _report(tmp_path, result, root="s3://bucket/run", server=None) -> str:
    with pytest.raises(demo.DemoError) as info:
        demo._check_phase("training", "train", result, demo.CRASH_EXIT, str(tmp_path), root, server)
    return str(info.value)


def test_failure_report_names_the_recorded_error_and_log_tail_without_network_hint(tmp_path):
    result = _phase(tmp_path, ["Traceback ...\nKeyError: 'model.0.weight'\n", ""],
                    errors={0: {"error": "KeyError: 'model.0.weight'", "connection": False}})
    msg = _report(tmp_path, result)
    assert "rank 0 exited with status 1" in msg and "KeyError: 'model.0.weight'" in msg, msg
    assert "its log ends with:\nTraceback ..." in msg, msg
    assert "reachable" not in msg, msg


def test_failure_report_gives_the_reachability_hint_for_connection_errors(tmp_path):
    result = _phase(tmp_path, ["...\n", "...\n"], errors={
        1: {"error": "EndpointUnreachableError: could not reach S3 endpoint", "connection": True}},
        codes=[-9, 1], stopped=[0])
    msg = _report(tmp_path, result)
    # Rank 0 was stopped by the launcher after rank 1 failed: rank 1 is the cause.
    assert "rank 1 exited with status 1" in msg and "EndpointUnreachableError" in msg, msg
    assert "Check that s3://bucket/run is reachable" in msg, msg


def test_failure_report_reads_the_log_when_a_rank_recorded_nothing(tmp_path):
    log = "Traceback (most recent call last):\nbotocore.exceptions.EndpointConnectionError: Could not connect\n"
    msg = _report(tmp_path, _phase(tmp_path, [log]))
    assert "botocore.exceptions.EndpointConnectionError: Could not connect" in msg and "reachable" in msg, msg
    msg = _report(tmp_path, _phase(tmp_path, ["Traceback (most recent call last):\nValueError: bad shape\n"]))
    assert "ValueError: bad shape" in msg and "reachable" not in msg, msg


def test_failure_report_blames_the_first_rank_to_fail_and_says_how_it_ended(tmp_path):
    # Rank 1 failed first; rank 0 failed later (its peer was gone); rank 2 was killed by a signal.
    result = _phase(tmp_path, ["RuntimeError: Connection closed by peer\n", "OSError: disk full\n", ""],
                    codes=[1, 1, -9], exited_at=[5.0, 1.0, 7.0])
    msg = _report(tmp_path, result)
    assert "rank 1 exited with status 1" in msg and "OSError: disk full" in msg and "reachable" not in msg, msg
    result = _phase(tmp_path, ["", "", ""], codes=[-9, -9, -9], stopped=[0, 1, 2], timed_out=True)
    msg = _report(tmp_path, result)
    assert "did not finish within" in msg and "its log is empty" in msg, msg
    result = _phase(tmp_path, ["", ""], codes=[-9, 17], exited_at=[1.0, 2.0])
    assert "rank 0 was killed by signal SIGKILL" in _report(tmp_path, result)


def test_failure_report_says_when_the_embedded_server_died(tmp_path):
    class DeadServer:
        running = False
        exit_status = -11
        endpoint_url = "http://127.0.0.1:1"

    msg = _report(tmp_path, _phase(tmp_path, ["ValueError: x\n"]), server=DeadServer())
    assert "The embedded S3 server at http://127.0.0.1:1 exited during the demo (status -11)" in msg, msg


def test_describe_error_finds_the_typed_cause_and_connection_errors():
    from botocore.exceptions import EndpointConnectionError
    from torch.distributed.checkpoint.api import CheckpointException

    from cloudckpt.errors import EndpointUnreachableError

    def raised(exc_factory):
        try:
            exc_factory()
        except BaseException as exc:  # noqa: BLE001 - the exception is the value under test
            return exc
        raise AssertionError("nothing raised")

    def unreachable():
        try:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        except EndpointConnectionError as exc:
            raise EndpointUnreachableError("could not reach S3 endpoint http://127.0.0.1:1") from exc

    def wrapped(inner):
        def f():
            raise CheckpointException("save", {0: (raised(inner), None)})
        return f

    d = demo._describe_error(raised(wrapped(unreachable)))
    assert d == {"error": "EndpointUnreachableError: could not reach S3 endpoint http://127.0.0.1:1",
                 "connection": True}, d

    def bad_value():
        raise ValueError("bad shape")

    d = demo._describe_error(raised(wrapped(bad_value)))
    assert d == {"error": "ValueError: bad shape", "connection": False}, d
