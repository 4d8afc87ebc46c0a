"""moto's S3 server for tests and benchmarks: the product's launcher plus test credentials and a CRT patch.

The launcher itself lives in :mod:`cloudckpt._moto_server` (the demo uses it too);
this module adds what only tests and benchmarks need.

    with MotoS3Server() as server:
        client = boto3.client("s3", endpoint_url=server.endpoint_url, ...)

Credentials are dummy values; moto accepts any.
"""

from __future__ import annotations

from typing import Any

from cloudckpt._moto_server import MotoS3Server as _ProductMotoS3Server

__all__ = ["MotoS3Server", "TEST_CREDENTIALS", "s3_client"]

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Older moto (before its model-based response serializer) answers CompleteMultipartUpload with the root
# element CompleteMultipartUploadResponse; S3 (and the AWS CRT client used by s3torchconnector)
# expect CompleteMultipartUploadResult, which newer moto already sends (and has no method to patch).
_CRT_PATCH = r"""
import moto.s3.responses as _r
if hasattr(_r.S3Response, "_complete_multipart_upload"):
    _orig = _r.S3Response._complete_multipart_upload
    def _patched(self, *a, **k):
        out = _orig(self, *a, **k)
        if isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], str):
            out = (out[0], out[1], out[2].replace("CompleteMultipartUploadResponse", "CompleteMultipartUploadResult"))
        return out
    _r.S3Response._complete_multipart_upload = _patched
"""


class MotoS3Server(_ProductMotoS3Server):
    """The product's moto server (:mod:`cloudckpt._moto_server`) with test credentials.

    ``crt_compatible=True`` patches moto's CompleteMultipartUpload answer so the
    AWS CRT client (s3torchconnector, used by the benchmarks) accepts it.
    """

    def __init__(self, *, crt_compatible: bool = False, startup_timeout: float = 60.0) -> None:
        super().__init__(env=TEST_CREDENTIALS, startup_timeout=startup_timeout)
        self._crt_compatible = crt_compatible

    def _child_prelude(self) -> str:
        return _CRT_PATCH if self._crt_compatible else ""


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
