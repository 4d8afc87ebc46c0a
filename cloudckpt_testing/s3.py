"""Start moto's S3 server on 127.0.0.1 in a child process, for tests and the demo.

The server runs in its own process so its request handling (which is slow and
CPU-heavy) never competes with the test process for the GIL.

    with MotoS3Server() as server:
        client = boto3.client("s3", endpoint_url=server.endpoint_url, ...)

Credentials are dummy values; moto accepts any.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

__all__ = ["MotoS3Server", "TEST_CREDENTIALS", "s3_client"]

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Runs inside the child: bind to port 0, print the port, serve forever.
_CHILD = r"""
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
{patch}
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()   # exit when the parent closes our stdin (or dies)
server.stop()
"""

# moto answers CompleteMultipartUpload with the root element
# CompleteMultipartUploadResponse; S3 (and the AWS CRT client used by
# s3torchconnector) expect CompleteMultipartUploadResult.
_CRT_PATCH = r"""
import moto.s3.responses as _r
_orig = _r.S3Response._complete_multipart_upload
def _patched(self, *a, **k):
    out = _orig(self, *a, **k)
    if isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], str):
        out = (out[0], out[1], out[2].replace("CompleteMultipartUploadResponse", "CompleteMultipartUploadResult"))
    return out
_r.S3Response._complete_multipart_upload = _patched
"""


class MotoS3Server:
    """moto's S3 server in a subprocess bound to 127.0.0.1 on a free port."""

    def __init__(self, *, crt_compatible: bool = False, startup_timeout: float = 60.0) -> None:
        self._crt_compatible = crt_compatible
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[str] | None = None
        self.port: int | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        if self.port is None:
            raise RuntimeError("MotoS3Server is not running; call start() first")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3Server":
        """Start the server and wait until it answers HTTP."""
        code = _CHILD.format(patch=_CRT_PATCH if self._crt_compatible else "")
        env = dict(os.environ, **TEST_CREDENTIALS)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"moto S3 server failed to start (printed {line!r})")
        self.port = int(line)
        deadline = time.monotonic() + self._startup_timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)
        return self

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=30).read()

    def stop(self) -> None:
        """Stop the server process."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> "MotoS3Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def s3_client(endpoint_url: str, **kwargs: Any) -> Any:
    """A plain boto3 S3 client for the test server (path-style, dummy credentials)."""
    import boto3
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"})
    if "config" in kwargs:
        config = config.merge(kwargs.pop("config"))
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
        config=config,
        **kwargs,
    )
