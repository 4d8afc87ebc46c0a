"""Amazon S3 (and S3-compatible) backend on boto3.

* Credentials come from the standard boto3 chain unless passed explicitly.
* ``endpoint_url=``, ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL`` are honoured;
  with a custom endpoint, path-style addressing is used by default because most
  S3-compatible servers (MinIO, moto, Ceph) expect it.
* Every upload carries a CRC32C checksum that S3 verifies.
* Body signing is off (``payload_signing_enabled=False``): integrity comes from
  the CRC32C header, and SHA-256 signing of every byte would cost more CPU than
  the rest of the upload path put together.
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
from typing import Any, Iterator, Mapping, Sequence

from cloudckpt import crc
from cloudckpt.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransferError,
)
from cloudckpt.store._body import SegmentReader
from cloudckpt.store.base import Body, MultipartUpload, ObjectInfo, ObjectStore, PartResult

__all__ = ["S3Store"]

_SECRET_OPTIONS = ("aws_secret_access_key", "aws_session_token")


class S3Store(ObjectStore):
    """An :class:`ObjectStore` over one S3 bucket."""

    scheme = "s3"
    _transient = ("_client", "_lock")

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_pool_connections: int = 64,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_attempts: int = 5,
        addressing_style: str | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__(bucket)
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region
        self.max_pool_connections = max_pool_connections
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self.addressing_style = addressing_style or ("path" if self.endpoint_url else "auto")
        self._client_options = dict(client_options)
        self._client: tuple[int, Any] | None = None
        self._lock: threading.Lock | None = threading.Lock()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # Never show credentials: only the bucket and endpoint.
        return f"S3Store(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    # -- client ----------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The boto3 client of this process (created on first use, never pickled)."""
        cached = self._client
        if cached is not None and cached[0] == os.getpid():
            return cached[1]
        assert self._lock is not None
        with self._lock:
            if self._client is not None and self._client[0] == os.getpid():
                return self._client[1]
            import boto3
            from botocore.config import Config

            opts = dict(self._client_options)
            profile = opts.pop("profile_name", None)
            session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
            config = Config(
                region_name=self.region,
                max_pool_connections=self.max_pool_connections,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                s3={"addressing_style": self.addressing_style, "payload_signing_enabled": False},
                # We send CRC32C ourselves; botocore must not add another checksum pass.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            user_config = opts.pop("config", None)
            if user_config is not None:
                config = config.merge(user_config)
            client = session.client("s3", endpoint_url=self.endpoint_url, config=config, **opts)
            # boto3 clients are thread-safe: one per process shares one connection pool.
            self._client = (os.getpid(), client)
            return client

    def close(self) -> None:
        self._client = None

    # -- errors ----------------------------------------------------------------
    def _translate(self, exc: BaseException, key: str | None, action: str) -> Exception:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = self.url(key) if key is not None else f"s3://{self.bucket}"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (key is None and status == 404):
                return BucketNotFoundError(
                    f"bucket s3://{self.bucket} does not exist (while trying to {action} {where}); "
                    "create it first or fix the bucket name, region and endpoint"
                )
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectNotFoundError(f"{where} does not exist (while trying to {action} it)")
            if code in ("PreconditionFailed", "412") or status == 412:
                return PreconditionFailedError(f"{where} already exists (conditional {action} refused)")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
                return AccessDeniedError(
                    f"access denied trying to {action} {where} ({code}); check the credentials and the "
                    "bucket policy grant s3:GetObject/PutObject/ListBucket/AbortMultipartUpload"
                )
            return TransferError(f"failed to {action} {where}: {code or status}: {err.get('Message', '')}")
        if isinstance(exc, NoCredentialsError):
            return AccessDeniedError(
                f"no AWS credentials found to {action} {where}; configure the boto3 credential chain "
                "(env vars, ~/.aws, instance/IRSA role) or pass aws_access_key_id/aws_secret_access_key"
            )
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
            endpoint = self.endpoint_url or "the default AWS endpoint"
            return EndpointUnreachableError(
                f"could not reach S3 endpoint {endpoint} to {action} {where}: {type(exc).__name__}; "
                "check endpoint_url / AWS_ENDPOINT_URL and network access"
            )
        return TransferError(f"failed to {action} {where}: {type(exc).__name__}: {exc}")

    def _call(self, action: str, key: str | None, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated into typed errors
            raise self._translate(exc, key, action) from exc

    # -- operations -------------------------------------------------------------
    def check_bucket(self) -> None:
        self._call("access bucket", None, self.client.head_bucket)

    def put(
        self,
        key: str,
        body: Body,
        *,
        crc32c: int,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        reader = SegmentReader(body)
        kwargs: dict[str, Any] = {"Key": key, "Body": reader, "ContentLength": len(reader),
                                  "ChecksumCRC32C": crc.to_base64(crc32c)}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        if metadata:
            kwargs["Metadata"] = dict(metadata)
        resp = self._call("upload", key, self.client.put_object, **kwargs)
        return ObjectInfo(key=key, size=len(reader), etag=resp.get("ETag"), crc32c=crc32c,
                          version=resp.get("VersionId"))

    def get(self, key: str) -> bytes:
        resp = self._call("download", key, self.client.get_object, Key=key)
        try:
            return resp["Body"].read()
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, key, "download") from exc

    def get_range(self, key: str, start: int, out: memoryview) -> None:
        out = memoryview(out).cast("B")
        n = out.nbytes
        if n == 0:
            return
        resp = self._call("read", key, self.client.get_object, Key=key, Range=f"bytes={start}-{start + n - 1}")
        body = resp["Body"]
        got = 0
        try:
            while got < n:
                k = body.readinto(out[got:])
                if not k:
                    break
                got += k
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, key, "read") from exc
        finally:
            body.close()
        if got != n:
            raise TransferError(f"short read of {self.url(key)}: wanted bytes [{start}, {start + n}), got {got}")

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self._call("inspect", key, self.client.head_object, Key=key, ChecksumMode="ENABLED")
        except ObjectNotFoundError:
            return None
        c = resp.get("ChecksumCRC32C")
        return ObjectInfo(
            key=key,
            size=int(resp["ContentLength"]),
            etag=resp.get("ETag"),
            crc32c=crc.from_base64(c) if c and "-" not in c else None,
            last_modified=resp.get("LastModified"),
            version=resp.get("VersionId"),
            metadata=resp.get("Metadata") or {},
        )

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", None, self.client.list_objects_v2, **kwargs)
            for o in resp.get("Contents", []):
                yield ObjectInfo(key=o["Key"], size=int(o["Size"]), etag=o.get("ETag"),
                                 last_modified=o.get("LastModified"))
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    def list_prefixes(self, prefix: str) -> list[str]:
        out: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", None, self.client.list_objects_v2, **kwargs)
            out.extend(p["Prefix"] for p in resp.get("CommonPrefixes", []))
            if not resp.get("IsTruncated"):
                return out
            token = resp["NextContinuationToken"]

    def delete(self, key: str) -> None:
        try:
            self._call("delete", key, self.client.delete_object, Key=key)
        except ObjectNotFoundError:
            pass

    def delete_many(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            resp = self._call("delete", batch[0], self.client.delete_objects,
                              Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                e = errors[0]
                raise TransferError(f"failed to delete {self.url(e['Key'])}: {e.get('Code')}: {e.get('Message')}")

    def create_multipart(self, key: str, *, metadata: Mapping[str, str] | None = None) -> str:
        kwargs: dict[str, Any] = {"Key": key, "ChecksumAlgorithm": "CRC32C"}
        if metadata:
            kwargs["Metadata"] = dict(metadata)
        return self._call("start multipart upload of", key, self.client.create_multipart_upload, **kwargs)["UploadId"]

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body, *, crc32c: int) -> PartResult:
        reader = SegmentReader(body)
        resp = self._call(f"upload part {part_number} of", key, self.client.upload_part, Key=key,
                          UploadId=upload_id, PartNumber=part_number, Body=reader,
                          ContentLength=len(reader), ChecksumCRC32C=crc.to_base64(crc32c))
        return PartResult(part_number=part_number, etag=resp["ETag"], size=len(reader), crc32c=crc32c)

    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartResult], *, if_absent: bool = False
    ) -> ObjectInfo:
        ordered = sorted(parts, key=lambda p: p.part_number)
        kwargs: dict[str, Any] = {
            "Key": key,
            "UploadId": upload_id,
            "MultipartUpload": {"Parts": [
                {"PartNumber": p.part_number, "ETag": p.etag, "ChecksumCRC32C": crc.to_base64(p.crc32c)}
                for p in ordered
            ]},
        }
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        resp = self._call("complete multipart upload of", key, self.client.complete_multipart_upload, **kwargs)
        size = sum(p.size for p in ordered)
        whole = crc.combine_all((p.crc32c, p.size) for p in ordered)
        return ObjectInfo(key=key, size=size, etag=resp.get("ETag"), crc32c=whole, version=resp.get("VersionId"))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self._call("abort multipart upload of", key, self.client.abort_multipart_upload, Key=key,
                       UploadId=upload_id)
        except ObjectNotFoundError:
            pass  # NoSuchUpload: already aborted or completed

    def list_multipart_uploads(self, prefix: str) -> list[MultipartUpload]:
        out: list[MultipartUpload] = []
        kwargs: dict[str, Any] = {"Prefix": prefix}
        while True:
            resp = self._call("list multipart uploads in", None, self.client.list_multipart_uploads, **kwargs)
            for u in resp.get("Uploads", []):
                initiated = u.get("Initiated")
                out.append(MultipartUpload(key=u["Key"], upload_id=u["UploadId"],
                                           initiated=initiated if isinstance(initiated, _dt.datetime) else None))
            if not resp.get("IsTruncated"):
                return out
            kwargs["KeyMarker"] = resp.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker")
