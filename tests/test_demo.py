"""``cloudckpt demo`` at reduced size: embedded S3 server, 2 ranks, async saves, crash, resume, verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cloudckpt import demo
from tests.test_cli import CLI


def test_demo_crashes_resumes_from_latest_committed_and_verifies(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env["PYTHONWARNINGS"] = "ignore"
    p = subprocess.run([*CLI, "demo", "--json", "--steps", "4", "--every", "2", "--size-mib", "1"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                       timeout=300)
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    s = json.loads(p.stdout)
    assert s["storage"].startswith("embedded S3 server at http://127.0.0.1:"), s
    assert s["ranks"] == 2 and s["checkpoints_taken"] == 2 and s["checkpoint_steps"] == [2, 4]
    # The crash may come before or after the last upload commits; resume must pick the newest commit.
    assert s["verified"] and s["mismatches"] == [], s
    # (each resuming rank also checked that its step is the newest one listed as committed).
    assert s["committed_before_crash"], s
    assert s["resumed_from"] in (max(s["committed_before_crash"]), s["in_flight_at_crash"]), s
    assert s["first_blocking_ms"] > 0 and s["median_blocking_ms"] > 0
    assert s["state_bytes"] > 1024 * 1024 * 0.9
    text = demo.format_summary(s)
    for label in ("checkpoints taken", "blocking per save", "upload throughput", "resumed from step",
                  "state verified: OK"):
        assert label in text


def test_demo_storage_choice():
    assert demo.choose_storage(None, None, {})[0] == "embedded"
    assert demo.choose_storage(None, None, {"AWS_ENDPOINT_URL": "http://minio:9000"}) == (
        "endpoint", "S3 endpoint http://minio:9000")
    assert demo.choose_storage(None, None, {"AWS_ENDPOINT_URL_S3": "http://a", "AWS_ENDPOINT_URL": "http://b"})[1] \
        == "S3 endpoint http://a"  # the S3-specific variable wins, as in boto3
    assert demo.choose_storage(None, "http://c", {"AWS_ENDPOINT_URL": "http://b"})[1] == "S3 endpoint http://c"
    assert demo.choose_storage("gs://bucket/run", None, {"AWS_ENDPOINT_URL": "http://b"})[0] == "uri"


def test_demo_without_the_embedded_server_packages_names_the_extra(monkeypatch, capsys):
    from cloudckpt import cli

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setitem(sys.modules, "google_crc32c", None)  # as if `pip install cloudckpt[s3]` only
    assert cli.main(["demo"]) == cli.EXIT_MISSING
    err = capsys.readouterr().err
    assert "google-crc32c" in err and "pip install 'cloudckpt[all]'" in err and "--uri" in err
