"""The local servers the benchmarks talk to, each in its own process on 127.0.0.1.

* ``fast``: :class:`cloudckpt_testing.fast_s3.FastS3Server`, the throughput target;
* ``moto``: :class:`cloudckpt_testing.s3.MotoS3Server` (CRT-compatible), an
  optional second S3 target (slow: 7 to 20 server CPU s/GB);
* ``gcs``: :class:`cloudckpt_testing.gcs_emulator.GCSEmulator`, started by this
  module's ``__main__`` in a child process with a small side channel that
  serves its request counts and resets it.

Children get a JSON-able ``info`` dict (kind, endpoint, pid, control URL) and
call :func:`snapshot` around the measured operation: server CPU comes from the
server process's CPU times (psutil; all its threads), request counts from the
server's own counters (none for moto).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from typing import Any

import psutil

BUCKET = "bench"
REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}


@dataclass
class Snapshot:
    """Server counters at one instant."""

    cpu_s: float
    requests: dict[str, int]
    counted: bool  # whether this server counts requests at all


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def snapshot(info: dict[str, Any] | None) -> Snapshot:
    """Current CPU seconds and request counts of the server described by ``info``."""
    if info is None:
        return Snapshot(0.0, {}, False)
    t = psutil.Process(info["pid"]).cpu_times()
    cpu = t.user + t.system
    if info["kind"] == "fast":
        return Snapshot(cpu, dict(_get_json(info["endpoint"] + "/__stats__")["request_counts"]), True)
    if info["kind"] == "gcs":
        return Snapshot(cpu, dict(_get_json(info["control"] + "/counts")), True)
    return Snapshot(cpu, {}, False)


class Server:
    """One running server of ``kind`` with a bucket named :data:`BUCKET`."""

    def __init__(self, kind: str, *, prefault_bytes: int = 0) -> None:
        self.kind = kind
        self.prefault_bytes = prefault_bytes
        self._impl: Any = None
        self._proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}

    def start(self) -> "Server":
        """Start the server process and create the bucket."""
        os.environ.update(CREDENTIALS)
        if self.kind == "fast":
            from cloudckpt_testing.fast_s3 import FastS3Server

            self._impl = FastS3Server(prefault_bytes=self.prefault_bytes).start()
            pid = _get_json(self._impl.endpoint_url + "/__stats__")["pid"]
            self.info = {"kind": "fast", "endpoint": self._impl.endpoint_url, "pid": pid}
        elif self.kind == "moto":
            from cloudckpt_testing.s3 import MotoS3Server

            self._impl = MotoS3Server(crt_compatible=True).start()
            self.info = {"kind": "moto", "endpoint": self._impl.endpoint_url, "pid": self._impl._proc.pid}
        elif self.kind == "gcs":
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.servers", "gcs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            assert self._proc.stdout is not None
            endpoint, control = self._proc.stdout.readline().split()
            self.info = {"kind": "gcs", "endpoint": endpoint, "pid": self._proc.pid, "control": control}
        else:
            raise ValueError(f"unknown server kind {self.kind!r}")
        self._make_bucket()
        return self

    def _make_bucket(self) -> None:
        if self.kind == "gcs":
            from cloudckpt_testing.gcs_emulator import gcs_client

            gcs_client(self.info["endpoint"]).create_bucket(BUCKET)
        else:
            from cloudckpt_testing.s3 import s3_client

            s3_client(self.info["endpoint"]).create_bucket(Bucket=BUCKET)

    def reset(self) -> None:
        """Drop all stored data (keeps the server's warm memory) and recreate the bucket."""
        if self.kind == "gcs":
            req = urllib.request.Request(self.info["control"] + "/reset", method="POST")
            urllib.request.urlopen(req, timeout=30).read()
        else:
            self._impl.reset()
        self._make_bucket()

    def stop(self) -> None:
        """Stop the server process."""
        if self._impl is not None:
            self._impl.stop()
            self._impl = None
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _serve_gcs() -> None:
    """Child: GCS emulator plus a side channel (GET /counts, POST /reset); exits when stdin closes."""
    from cloudckpt_testing.gcs_emulator import GCSEmulator

    emu = GCSEmulator().start()

    class Control(http.server.BaseHTTPRequestHandler):
        def _reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self._reply(json.dumps(dict(emu.request_counts)).encode())

        def do_POST(self) -> None:  # noqa: N802
            emu.reset()
            self._reply(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    control = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print(emu.endpoint, f"http://127.0.0.1:{control.server_address[1]}", flush=True)
    sys.stdin.read()
    control.shutdown()
    emu.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["gcs"]:
        _serve_gcs()
    else:
        sys.exit("usage: python -m benchmarks.servers gcs")
