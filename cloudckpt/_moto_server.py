"""moto's S3 server on 127.0.0.1 in a child process (private: used by ``cloudckpt demo`` and the tests).

The server runs in its own process so its request handling (slow, CPU-heavy
pure Python) never competes with the caller for the GIL, and so that it dies
with its parent: the child exits when its standard input closes.

    with MotoS3Server() as server:
        client = boto3.client("s3", endpoint_url=server.endpoint_url, ...)

moto accepts any credentials. Needs ``moto[server]`` (``pip install 'cloudckpt[demo]'``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from typing import IO, Any

__all__ = ["MotoS3Server", "INSTALL_HINT"]

# Runs inside the child: bind to port 0, print the port, serve until stdin closes.
_CHILD = r"""
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
{prelude}
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()   # exit when the parent closes our stdin (or dies)
server.stop()
"""

#: The pip requirement that brings moto's server and its web framework.
INSTALL_HINT = "pip install 'cloudckpt[demo]'"


class MotoS3Server:
    """moto's S3 server in a subprocess bound to 127.0.0.1 on a free port.

    ``env`` adds variables to the child's environment. Subclasses may return
    extra Python from :meth:`_child_prelude`, run in the child after moto is
    imported and before the server starts (e.g. to patch a response).
    """

    def __init__(self, *, env: Mapping[str, str] | None = None, startup_timeout: float = 60.0) -> None:
        self._env = dict(env or {})
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None
        self.port: int | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        if self.port is None:
            raise RuntimeError("the moto S3 server is not running; call start() first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_status(self) -> int | None:
        """The server process's exit status once it has exited (None while it runs or before start)."""
        return None if self._proc is None else self._proc.poll()

    def _child_prelude(self) -> str:
        """Python run in the child before the server starts (none here)."""
        return ""

    def start(self) -> MotoS3Server:
        """Start the server and wait until it answers HTTP; RuntimeError with the child's stderr if it cannot."""
        code = _CHILD.format(prelude=self._child_prelude())
        # The child's stderr goes to a file, not a pipe nobody reads (which could fill and block it),
        # so that a failed start can say why.
        self._stderr = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=dict(os.environ, **self._env),
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.isdigit():
            self._fail(f"printed {line!r} instead of its port")
        self.port = int(line)
        deadline = time.monotonic() + self._startup_timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=5).read()
                return self
            except OSError as exc:
                if time.monotonic() > deadline:
                    self._fail(f"did not answer HTTP within {self._startup_timeout:.0f} s ({exc})")
                time.sleep(0.05)

    def _fail(self, what: str) -> None:
        """Stop the child and raise RuntimeError carrying what it wrote to stderr."""
        err = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            err = self._stderr.read()[-4000:].strip()
        self.stop()
        if "ModuleNotFoundError" in err or "ImportError" in err:
            raise ImportError(f"moto's S3 server could not start: {err.splitlines()[-1]} ({INSTALL_HINT})")
        raise RuntimeError(f"moto's S3 server {what}; its stderr:\n{err or '(empty)'}")

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=30).read()

    def stop(self) -> None:
        """Stop the server process (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_child(proc)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def stop_child(proc: subprocess.Popen[str]) -> None:
    """End a server child that exits when its stdin closes; kill it if it has not exited within 10 s."""
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()
