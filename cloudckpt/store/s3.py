"""Amazon S3 (and S3-compatible) backend on boto3.

* Credentials come from the standard boto3 chain unless passed explicitly.
* ``endpoint_url=``, ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL`` are honoured;
  with a custom endpoint, path-style addressing is used by default because most
  S3-compatible servers (MinIO, moto, Ceph) expect it.
* Every upload carries a CRC32C checksum that S3 verifies.
* Body signing is off (``payload_signing_enabled=False``): integrity comes from
  the CRC32C header, and SHA-256 signing of every byte would cost more CPU than
  the rest of the upload path put together.
* Retries are cloudckpt's (:mod:`cloudckpt.retry`), not botocore's: the client is
  built with ``total_max_attempts=1`` so the two never multiply, and reading a
  response body (where truncation and resets show up) is inside the retried
  attempt. A ranged read that breaks resumes where it stopped.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as _dt
import http.client
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from cloudckpt import crc, retry
from cloudckpt.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CloudCheckpointError,
    DeadlineExceededError,
    EndpointUnreachableError,
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    ReadDeadlineExceededError,
    TransferError,
    UnknownStoreOptionError,
)
from cloudckpt.retry import Attempt, FailureKind, RetryPolicy
from cloudckpt.store._body import SegmentReader
from cloudckpt.store._deadline import body_deadline
from cloudckpt.store.base import Body, MultipartUpload, ObjectInfo, ObjectStore, PartResult, Scatter
from cloudckpt.store.options import S3_CLIENT_OPTIONS, S3RequestOptions, SecretBytes, is_directory_bucket
from cloudckpt.uri import redact_text, redact_url, scrub_exception

__all__ = ["S3Store", "S3RequestOptions", "SecretBytes"]

_T = TypeVar("_T")
_SECRET_OPTIONS = ("aws_secret_access_key", "aws_session_token")
_THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                             "TooManyRequestsException", "RequestThrottled", "ProvisionedThroughputExceededException"})
_SERVER_CODES = frozenset({"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
                           "PriorRequestNotComplete", "BadGateway", "GatewayTimeout"})


class _Truncated(Exception):
    """A response body ended before its Content-Length: a broken transfer, retried."""


# urllib3 sends a file-like body in read() blocks of this size (botocore sets
# 128 KiB). Each block is one sendall and a few Python calls: at 128 KiB that
# is 8,000 round trips per GB, which measured 0.2 s/GB more kernel time and
# 0.15 s/GB more user time than 8 MiB blocks. Our bodies return views of
# staged memory, so a larger block costs no memory.
_SEND_BLOCK_SIZE = 8 << 20


def _widen_send_blocks(client: Any) -> None:
    """Make the client's connection pools send request bodies in large blocks.

    botocore has no public option for it; its pool manager's keyword
    arguments (public urllib3 API) reach every connection pool it creates. If a
    future botocore moves them, the client keeps botocore's block size: slower,
    still correct.
    """
    manager = getattr(getattr(getattr(client, "_endpoint", None), "http_session", None), "_manager", None)
    pool_kw = getattr(manager, "connection_pool_kw", None)
    if isinstance(pool_kw, dict) and "blocksize" in pool_kw:
        pool_kw["blocksize"] = _SEND_BLOCK_SIZE


# One boto3 session per (process, profile). Building a session loads botocore's
# service models from disk (~0.3 s of CPU); a job that saves every few minutes
# would otherwise pay that on every rank for every save and load. Sessions hold
# no per-store state: clients, with their own config, are still one per store.
# The credential-related environment is part of the key, so a process that
# changes its credentials gets a fresh session rather than stale ones.
_SESSIONS: dict[tuple[Any, ...], Any] = {}
_SESSIONS_LOCK = threading.Lock()
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                   "AWS_CONFIG_FILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                   "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")


def _session(profile: str | None) -> Any:
    """This process's boto3 session for ``profile`` (call with _SESSIONS_LOCK held)."""
    import boto3

    key = (os.getpid(), profile, tuple(os.environ.get(v) for v in _CREDENTIAL_ENV))
    if key not in _SESSIONS:
        _SESSIONS[key] = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
    return _SESSIONS[key]


def _readinto(body: Any, out: memoryview) -> int:
    """Read from a botocore StreamingBody straight into ``out``.

    urllib3's ``readinto`` is ``read(n)`` followed by a copy, and ``read(n)``
    itself copies once more, so a 32 MiB range would cost two full extra
    copies. For a plain (not content-encoded) response, the underlying
    ``http.client`` response reads from the socket buffer into ``out`` directly.
    Both attributes are private, so anything unexpected takes the public path.
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if fp is not None and getattr(raw, "_decoder", None) is None and not getattr(raw, "_has_decoded_content", False) \
            and hasattr(fp, "readinto"):
        try:
            return fp.readinto(out)
        except (OSError, ValueError) as exc:
            import urllib3.exceptions

            # Same exception family as the public path, so retries classify it alike.
            raise urllib3.exceptions.ProtocolError(f"connection broken while reading: {exc!r}", exc) from exc
    return body.readinto(out)


# botocore's DEBUG logs print every request's headers and canonical request,
# session tokens included (and botocore.parsers logs S3's reply to a bad
# signature, which echoes the canonical request); urllib3 and s3transfer log
# URLs, which can carry an endpoint's password. A filter on a parent logger does
# not apply to its children's records, so every logger of these families that
# exists when a client is created gets its own filter.
_REDACTED_FAMILIES = ("botocore", "boto3", "s3transfer", "urllib3", "requests", "google", "cloudckpt")


class RedactSecrets(logging.Filter):
    """Masks session tokens, signatures and URL passwords in log records (stateless)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's problem, not ours
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback is formatted from the exception itself: its URL may carry a password.
            scrub_exception(record.exc_info[1])
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def redact_library_logs() -> None:
    """Put a :class:`RedactSecrets` filter on every existing logger of the storage libraries (idempotent)."""
    names = [n for n in list(logging.Logger.manager.loggerDict)
             if n.split(".", 1)[0] in _REDACTED_FAMILIES]
    for name in set(names) | set(_REDACTED_FAMILIES):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


class S3Store(ObjectStore):
    """An :class:`ObjectStore` over one S3 bucket.

    Args:
        bucket: bucket name (no ``s3://``).
        endpoint_url: S3-compatible endpoint (else ``AWS_ENDPOINT_URL_S3`` /
            ``AWS_ENDPOINT_URL`` / AWS).
        region: client region.
        max_pool_connections: HTTP connections kept (one per transfer thread).
        connect_timeout, read_timeout: seconds per HTTP request; a stall longer
            than ``read_timeout`` fails the attempt, which is then retried. A
            download whose body has not fully arrived ``read_timeout`` seconds
            after its headers (a trickling server) is cut and fails with
            ``ReadDeadlineExceededError``, not retried.
        max_attempts: attempts per request (shortcut for ``retry_policy.max_attempts``).
        retry_policy: the full :class:`~cloudckpt.retry.RetryPolicy`.
        addressing_style: ``"path"``/``"virtual"``; path by default with a custom endpoint.
        server_side_encryption, sse_kms_key_id, bucket_key_enabled,
            sse_customer_key, request_payer, expected_bucket_owner,
            storage_class, object_tags, object_metadata: options for
            locked-down buckets, validated here and sent on every request that
            needs them (see :class:`~cloudckpt.store.options.S3RequestOptions`
            and docs/configuration.md, "Locked-down buckets").
        client_options: passed to ``boto3.Session.client``: credentials
            (``aws_access_key_id``...), ``config=``, ``profile_name=``, ``verify=``
            (:data:`~cloudckpt.store.options.S3_CLIENT_OPTIONS`); any other
            name is a TypeError. Never shown in ``repr`` or errors.
    """

    scheme = "s3"
    _transient = ("_client", "_lock")

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_pool_connections: int = 64,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        max_attempts: int | None = None,
        retry_policy: RetryPolicy | None = None,
        addressing_style: str | None = None,
        server_side_encryption: str | None = None,
        sse_kms_key_id: str | None = None,
        bucket_key_enabled: bool | None = None,
        sse_customer_key: bytes | str | SecretBytes | None = None,
        request_payer: str | None = None,
        expected_bucket_owner: str | None = None,
        storage_class: str | None = None,
        object_tags: Mapping[str, str] | None = None,
        object_metadata: Mapping[str, str] | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__(bucket)
        unknown = sorted(set(client_options) - S3_CLIENT_OPTIONS)
        if unknown:
            raise UnknownStoreOptionError(
                f"S3Store got unknown option(s) {', '.join(unknown)}; boto3 client options are "
                f"{', '.join(sorted(S3_CLIENT_OPTIONS))} (see docs/configuration.md)")
        self.request_options = S3RequestOptions(
            bucket, server_side_encryption=server_side_encryption, sse_kms_key_id=sse_kms_key_id,
            bucket_key_enabled=bucket_key_enabled, request_payer=request_payer,
            sse_customer_key=sse_customer_key,  # type: ignore[arg-type]  # __post_init__ wraps bytes/str
            expected_bucket_owner=expected_bucket_owner, storage_class=storage_class,
            object_tags=object_tags or {}, object_metadata=object_metadata or {})
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region
        self.max_pool_connections = max_pool_connections
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        policy = retry_policy or RetryPolicy()
        if max_attempts is not None:
            policy = dataclasses.replace(policy, max_attempts=max_attempts)
        self.retry_policy = policy
        self._health = retry.EndpointHealth()
        self.addressing_style = addressing_style or ("path" if self.endpoint_url else "auto")
        self._client_options = dict(client_options)
        self._client: tuple[int, Any] | None = None
        self._lock: threading.Lock | None = threading.Lock()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # Never show credentials: only the bucket and endpoint.
        return f"S3Store(bucket={self.bucket!r}, endpoint_url={redact_url(self.endpoint_url)!r})"

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
            from botocore.config import Config

            redact_library_logs()
            opts = dict(self._client_options)
            profile = opts.pop("profile_name", None)
            config = Config(
                region_name=self.region,
                max_pool_connections=self.max_pool_connections,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                # One attempt per botocore call: cloudckpt.retry is the only retry loop.
                retries={"total_max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": self.addressing_style, "payload_signing_enabled": False},
                # We send CRC32C ourselves; botocore must not add another checksum pass.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            user_config = opts.pop("config", None)
            if user_config is not None:
                config = config.merge(user_config)
            with _SESSIONS_LOCK:  # boto3 sessions are not safe to use from several threads at once
                client = _session(profile).client("s3", endpoint_url=self.endpoint_url, config=config, **opts)
            _widen_send_blocks(client)
            self.request_options.install(client)
            redact_library_logs()  # and the loggers of modules the client imported
            # boto3 clients are thread-safe: one per process shares one connection pool.
            self._client = (os.getpid(), client)
            return client

    def close(self) -> None:
        self._client = None

    def _extra(self, operation: str, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Parameters every ``operation`` request carries (encryption, requester pays...)."""
        return self.request_options.extra(operation, metadata)

    # -- errors and retries -------------------------------------------------------
    def _classify(self, exc: BaseException) -> FailureKind | None:
        """Transient failures (retried) by kind; None for final ones."""
        import urllib3.exceptions
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ProxyConnectionError,
        )

        if isinstance(exc, CloudCheckpointError):
            return None  # already judged by a nested call
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (429, 503) or code in _THROTTLE_CODES:
                return FailureKind.THROTTLE
            if status in (500, 502, 504) or code in _SERVER_CODES:
                return FailureKind.SERVER
            return None
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError)):
            return FailureKind.CONNECT
        if isinstance(exc, (HTTPClientError, IncompleteReadError, _Truncated, http.client.HTTPException,
                            urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return FailureKind.NETWORK
        return None

    def _translate(self, exc: BaseException, key: str | None, action: str) -> Exception:
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ProxyConnectionError,
        )

        scrub_exception(exc)  # chained below the typed error: its text may show a URL with a password
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
            if code in ("NoSuchKey", "NoSuchUpload", "404", "NotFound") or status == 404:
                return ObjectNotFoundError(f"{where} does not exist (while trying to {action} it)")
            if code in ("PreconditionFailed", "412") or status == 412:
                return PreconditionFailedError(f"{where} already exists (conditional {action} refused)")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
                return AccessDeniedError(
                    f"access denied trying to {action} {where} ({code}); check the credentials and the "
                    "bucket policy grant s3:GetObject/PutObject/ListBucket/AbortMultipartUpload"
                    + self.request_options.denied_hint(action)
                )
            if code in ("BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch"):
                return IntegrityError(
                    f"the server refused to {action} {where}: the data did not match its CRC32C ({code}); "
                    "the buffer changed while it was uploading, or the network corrupted it; nothing was stored"
                )
            return TransferError(f"failed to {action} {where}: {code or status}: "
                                 f"{redact_text(str(err.get('Message', '')))}")
        if isinstance(exc, NoCredentialsError):
            return AccessDeniedError(
                f"no AWS credentials found to {action} {where}; configure the boto3 credential chain "
                "(env vars, ~/.aws, instance/IRSA role) or pass aws_access_key_id/aws_secret_access_key"
            )
        endpoint = redact_url(self.endpoint_url) or "the default AWS endpoint"
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError)):
            return EndpointUnreachableError(
                f"could not reach S3 endpoint {endpoint} to {action} {where}: {type(exc).__name__}; "
                "check endpoint_url / AWS_ENDPOINT_URL and network access"
            )
        if self._classify(exc) is FailureKind.NETWORK:
            # Only the exception's type: its text can carry the request URL and headers.
            return TransferError(
                f"the connection to S3 endpoint {endpoint} broke while trying to {action} {where}: "
                f"{type(exc).__name__}"
            )
        return TransferError(f"failed to {action} {where}: {type(exc).__name__}: {redact_text(str(exc))}")

    def _run(self, action: str, key: str | None, fn: Callable[[Attempt], _T]) -> _T:
        """Run ``fn`` under the retry policy; every failure leaves as a typed error naming ``key``."""
        try:
            return retry.call(fn, classify=self._classify, policy=self.retry_policy, health=self._health)
        except retry.GaveUp as gave_up:
            err = self._translate(gave_up.last, key, action)
            cls = DeadlineExceededError if gave_up.reason == "deadline" and not isinstance(
                err, EndpointUnreachableError) else type(err)
            hint = "; raise TransferOptions.save_deadline if the save needs longer" if cls is DeadlineExceededError \
                else ""
            raise cls(f"{err} ({gave_up.summary()}{hint})") from gave_up.last
        except CloudCheckpointError:
            raise
        except Exception as exc:
            raise self._translate(exc, key, action) from exc

    def _call(self, action: str, key: str | None, fn: Any, **kwargs: Any) -> Any:
        return self._run(action, key, lambda _attempt: fn(Bucket=self.bucket, **kwargs))

    # -- operations -------------------------------------------------------------
    def check_bucket(self) -> None:
        self._call("access bucket", None, self.client.head_bucket, **self._extra("HeadBucket"))

    def put(
        self,
        key: str,
        body: Body,
        *,
        crc32c: int,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        size = sum(memoryview(b).nbytes for b in body)
        kwargs: dict[str, Any] = {"Key": key, "ContentLength": size, "ChecksumCRC32C": crc.to_base64(crc32c)}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        kwargs.update(self._extra("PutObject", metadata))

        def attempt(_: Attempt) -> Any:
            # A fresh reader per attempt: a retry re-sends the staged buffers from the start.
            return self.client.put_object(Bucket=self.bucket, Body=SegmentReader(body), **kwargs)

        resp = self._run("upload", key, attempt)
        return ObjectInfo(key=key, size=size, etag=resp.get("ETag"), crc32c=crc32c, version=resp.get("VersionId"))

    def _deadline_error(self, key: str, action: str) -> ReadDeadlineExceededError:
        return ReadDeadlineExceededError(
            f"failed to {action} {self.url(key)}: the response did not arrive within read_timeout "
            f"({self.read_timeout:g} s) although the connection stayed open (a stalled or trickling server); "
            "not retried. Check the endpoint, or raise read_timeout for very slow links")

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        def attempt(_: Attempt) -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, **self._extra("GetObject"))
            body = resp["Body"]
            try:
                size = int(resp.get("ContentLength", 0))
                if max_size is not None and size > max_size:
                    raise self.too_large(key, size, max_size)
                # Reading the body is part of the attempt: a truncated or reset body is retried;
                # a body that trickles in past read_timeout is cut and not retried.
                with body_deadline(self.read_timeout, body) as deadline:
                    try:
                        data = body.read()
                    except Exception:
                        if deadline.expired:
                            raise self._deadline_error(key, "download") from None
                        raise
                    if deadline.expired and len(data) < size:
                        raise self._deadline_error(key, "download")
                return data
            finally:
                body.close()

        return self._run("download", key, attempt)

    def get_range(self, key: str, start: int, out: memoryview) -> None:
        self._read_range(key, start, Scatter(start, [(start, out)]))

    def get_ranges_into(self, key: str, start: int, views: Sequence[tuple[int, memoryview | None]]) -> None:
        """One ranged GET streamed into each view in turn (the bytes between views are discarded)."""
        self._read_range(key, start, Scatter(start, views))

    def _read_range(self, key: str, start: int, plan: Scatter) -> None:
        """GET bytes ``[start, start + plan.size)`` of ``key`` straight into the plan's views."""
        n = plan.size
        if n == 0:
            return
        got = 0  # survives retries: a broken stream resumes where it stopped

        def attempt(_: Attempt) -> None:
            nonlocal got
            first = start + got
            resp = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={first}-{start + n - 1}",
                                          **self._extra("GetObject"))
            body = resp["Body"]
            sent = int(resp.get("ContentLength", n - got))
            try:
                want = min(n, got + sent)
                with body_deadline(self.read_timeout, body) as deadline:
                    try:
                        got = plan.fill(lambda buf: _readinto(body, buf), got, want)
                    except Exception:
                        if deadline.expired:
                            raise self._deadline_error(key, "read") from None
                        raise
                    if deadline.expired and got < want:
                        raise self._deadline_error(key, "read")
            finally:
                body.close()
            if got < n and got - (first - start) < sent:
                raise _Truncated(f"body ended after {got - (first - start)} of {sent} bytes")

        self._run("read", key, attempt)
        if got != n:
            raise TransferError(f"short read of {self.url(key)}: wanted bytes [{start}, {start + n}), got {got}; "
                                "the object is shorter than the checkpoint metadata says (truncated or replaced?)")

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self._call("inspect", key, self.client.head_object, Key=key, ChecksumMode="ENABLED",
                              **self._extra("HeadObject"))
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

    @property
    def directory_bucket(self) -> bool:
        """True for an S3 Express One Zone directory bucket (``name--usw2-az1--x-s3``)."""
        return is_directory_bucket(self.bucket)

    def _listable(self, prefix: str) -> str:
        # Directory buckets accept only prefixes that end in '/': list the enclosing
        # "directory" and keep the keys under ``prefix`` client-side.
        return prefix[:prefix.rfind("/") + 1] if self.directory_bucket else prefix

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if not self.directory_bucket:
            yield from self._list(prefix)
            return
        # Directory buckets list in no particular order: keep the key-order contract.
        yield from sorted((o for o in self._list(self._listable(prefix)) if o.key.startswith(prefix)),
                          key=lambda o: o.key)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix, **self._extra("ListObjectsV2")}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", None, self.client.list_objects_v2, **kwargs)
            for o in resp.get("Contents", []):
                yield ObjectInfo(key=o["Key"], size=int(o["Size"]), etag=o.get("ETag"),
                                 last_modified=o.get("LastModified"))
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    def list_prefixes(self, prefix: str) -> builtins.list[str]:
        out: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": self._listable(prefix), "Delimiter": "/",
                                      **self._extra("ListObjectsV2")}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", None, self.client.list_objects_v2, **kwargs)
            out.extend(p["Prefix"] for p in resp.get("CommonPrefixes", []) if p["Prefix"].startswith(prefix))
            if not resp.get("IsTruncated"):
                return sorted(out)  # S3 Express lists in no particular order
            token = resp["NextContinuationToken"]

    def delete(self, key: str) -> None:
        try:
            self._call("delete", key, self.client.delete_object, Key=key, **self._extra("DeleteObject"))
        except ObjectNotFoundError:
            pass

    def delete_many(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            resp = self._call("delete", batch[0], self.client.delete_objects,
                              Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                              **self._extra("DeleteObjects"))
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                e = errors[0]
                raise TransferError(f"failed to delete {self.url(e['Key'])}: {e.get('Code')}: {e.get('Message')}")

    def create_multipart(self, key: str, *, metadata: Mapping[str, str] | None = None) -> str:
        kwargs: dict[str, Any] = {"Key": key, "ChecksumAlgorithm": "CRC32C",
                                  **self._extra("CreateMultipartUpload", metadata)}
        maybe_orphans = False

        def attempt(a: Attempt) -> str:
            nonlocal maybe_orphans
            maybe_orphans = a.maybe_applied_before
            return self.client.create_multipart_upload(Bucket=self.bucket, **kwargs)["UploadId"]

        upload_id = self._run("start multipart upload of", key, attempt)
        if maybe_orphans:
            self._abort_others(key, upload_id)
        return upload_id

    def _abort_others(self, key: str, keep: str) -> None:
        # An earlier attempt may have created an upload whose reply was lost: abort
        # it, or it would stay incomplete (and billed) forever. Keys are per rank
        # and per save, so any other upload of this exact key is such an orphan or
        # a leftover of a failed save.
        try:
            for up in self.list_multipart_uploads(key):
                if up.key == key and up.upload_id != keep:
                    self.abort_multipart(key, up.upload_id)
        except CloudCheckpointError:
            pass  # best effort: `cloudckpt gc` finds what is left

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body, *, crc32c: int) -> PartResult:
        size = sum(memoryview(b).nbytes for b in body)

        def attempt(_: Attempt) -> Any:
            return self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=part_number,
                                           Body=SegmentReader(body), ContentLength=size,
                                           ChecksumCRC32C=crc.to_base64(crc32c), **self._extra("UploadPart"))

        resp = self._run(f"upload part {part_number} of", key, attempt)
        return PartResult(part_number=part_number, etag=resp["ETag"], size=size, crc32c=crc32c)

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
        kwargs.update(self._extra("CompleteMultipartUpload"))
        size = sum(p.size for p in ordered)
        whole = crc.combine_all((p.crc32c, p.size) for p in ordered)

        def attempt(a: Attempt) -> dict[str, Any]:
            from botocore.exceptions import ClientError

            try:
                return self.client.complete_multipart_upload(Bucket=self.bucket, **kwargs)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if a.maybe_applied_before and (code == "NoSuchUpload" or (if_absent and code == "PreconditionFailed")):
                    # The first completion landed and only its reply was lost: if the live
                    # object is the one these parts make, the completion worked.
                    info = self._head_raw(key)
                    if info is not None and self._is_assembly(info, ordered, size):
                        return info
                raise

        resp = self._run("complete multipart upload of", key, attempt)
        return ObjectInfo(key=key, size=size, etag=resp.get("ETag"), crc32c=whole, version=resp.get("VersionId"))

    def _head_raw(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED",
                                           **self._extra("HeadObject"))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    @staticmethod
    def _is_assembly(head: Mapping[str, Any], parts: Sequence[PartResult], size: int) -> bool:
        """Whether a HEAD describes the object that completing ``parts`` produces."""
        import hashlib

        if int(head.get("ContentLength", -1)) != size:
            return False
        # S3's composite checksum: CRC32C of the parts' CRC32Cs, "-N".
        composite = crc.to_base64(crc.crc32c(b"".join(p.crc32c.to_bytes(4, "big") for p in parts)))
        got = str(head.get("ChecksumCRC32C") or "")
        if got:
            return got.split("-")[0] == composite
        # No checksum reported: the multipart ETag is MD5 of the parts' MD5s, "-N".
        try:
            md5s = b"".join(bytes.fromhex(p.etag.strip('"')) for p in parts)
        except ValueError:
            return False
        return str(head.get("ETag", "")).strip('"') == f"{hashlib.md5(md5s).hexdigest()}-{len(parts)}"

    # -- server-side copies (incremental saves) ------------------------------------------
    server_side_copy = True
    server_side_range_copy = True

    def _copy_source(self, src_key: str, if_match: str | None, operation: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"CopySource": {"Bucket": self.bucket, "Key": src_key}}
        if if_match is not None:
            kwargs["CopySourceIfMatch"] = if_match
        kwargs.update(self._extra(operation))
        return kwargs

    def _copy_call(self, action: str, dst_key: str, src_key: str, fn: Callable[[Attempt], _T]) -> _T:
        """Run a copy; a failed source condition names the source, not the destination."""
        try:
            return self._run(action, dst_key, fn)
        except PreconditionFailedError as exc:
            raise PreconditionFailedError(
                f"copy source {self.url(src_key)} changed since it was checked (CopySourceIfMatch refused); "
                f"nothing was copied to {self.url(dst_key)}") from exc

    def copy_object(self, src_key: str, dst_key: str, *, if_match: str | None = None,
                    crc32c: int | None = None) -> ObjectInfo:
        """CopyObject (server side, at most :attr:`max_copy_object_size` bytes).

        ``CopySourceIfMatch`` guards the source.
        """
        kwargs = self._copy_source(src_key, if_match, "CopyObject")
        kwargs.update(Key=dst_key, ChecksumAlgorithm="CRC32C")
        if "Metadata" in kwargs:
            kwargs["MetadataDirective"] = "REPLACE"
        if "Tagging" in kwargs:
            kwargs["TaggingDirective"] = "REPLACE"

        def attempt(_: Attempt) -> Any:
            return self.client.copy_object(Bucket=self.bucket, **kwargs)

        resp = self._copy_call(f"copy {self.url(src_key)} to", dst_key, src_key, attempt)
        result = resp.get("CopyObjectResult") or {}
        c = result.get("ChecksumCRC32C")
        got = crc.from_base64(c) if c and "-" not in c else None
        if crc32c is not None and got is not None and got != crc32c:
            self.delete(dst_key)
            raise IntegrityError(f"copy of {self.url(src_key)} has CRC32C {got:#010x}, expected {crc32c:#010x}: "
                                 "the source does not hold the bytes its checkpoint recorded; the copy was removed")
        return ObjectInfo(key=dst_key, size=-1, etag=result.get("ETag"), crc32c=got if got is not None else crc32c,
                          version=resp.get("VersionId"))

    def upload_part_copy(self, key: str, upload_id: str, part_number: int, src_key: str, start: int, end: int,
                         *, crc32c: int | None = None, if_match: str | None = None) -> PartResult:
        """UploadPartCopy of ``[start, end)`` (``CopySourceRange``), guarded by ``CopySourceIfMatch``.

        When S3 reports the copied part's CRC32C (uploads started with a
        checksum algorithm), it must equal ``crc32c``; CompleteMultipartUpload
        then checks every part's CRC32C again.
        """
        kwargs = self._copy_source(src_key, if_match, "UploadPartCopy")
        kwargs.update(Key=key, UploadId=upload_id, PartNumber=part_number, CopySourceRange=f"bytes={start}-{end - 1}")

        def attempt(_: Attempt) -> Any:
            return self.client.upload_part_copy(Bucket=self.bucket, **kwargs)

        resp = self._copy_call(f"copy part {part_number} from {self.url(src_key)} to", key, src_key, attempt)
        result = resp.get("CopyPartResult") or {}
        c = result.get("ChecksumCRC32C")
        got = crc.from_base64(c) if c else None
        if crc32c is not None and got is not None and got != crc32c:
            raise IntegrityError(f"bytes [{start}, {end}) of {self.url(src_key)} have CRC32C {got:#010x}, expected "
                                 f"{crc32c:#010x}: the source does not hold the bytes its checkpoint recorded")
        etag = result.get("ETag")
        if not etag:
            raise TransferError(f"S3 sent no ETag for copied part {part_number} of {self.url(key)}")
        value = crc32c if crc32c is not None else got
        if value is None:
            raise TransferError(f"no CRC32C known for copied part {part_number} of {self.url(key)}")
        return PartResult(part_number=part_number, etag=etag, size=end - start, crc32c=value)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self._call("abort multipart upload of", key, self.client.abort_multipart_upload, Key=key,
                       UploadId=upload_id, **self._extra("AbortMultipartUpload"))
        except ObjectNotFoundError:
            pass  # NoSuchUpload: already aborted or completed

    def list_multipart_uploads(self, prefix: str) -> builtins.list[MultipartUpload]:
        out: list[MultipartUpload] = []
        kwargs: dict[str, Any] = {"Prefix": self._listable(prefix), **self._extra("ListMultipartUploads")}
        while True:
            resp = self._call("list multipart uploads in", None, self.client.list_multipart_uploads, **kwargs)
            for u in resp.get("Uploads", []):
                if not u["Key"].startswith(prefix):
                    continue  # listed only because a directory bucket needs a prefix ending in '/'
                initiated = u.get("Initiated")
                out.append(MultipartUpload(key=u["Key"], upload_id=u["UploadId"],
                                           initiated=initiated if isinstance(initiated, _dt.datetime) else None))
            if not resp.get("IsTruncated"):
                return out
            kwargs["KeyMarker"] = resp.get("NextKeyMarker")
            if not self.directory_bucket:  # directory buckets page by key marker only
                kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker")
