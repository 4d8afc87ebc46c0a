"""Google Cloud Storage backend on google-cloud-storage.

* Credentials: Application Default Credentials, unless ``endpoint_url`` or
  ``STORAGE_EMULATOR_HOST`` points at an emulator, in which case requests are
  anonymous and go to that endpoint.
* Small objects go up as one JSON API ``multipart`` request carrying the
  CRC32C in its metadata, so GCS verifies the bytes before the object exists.
  ``if_absent`` is ``ifGenerationMatch=0``.
* Large objects use the XML API multipart upload (the S3-compatible MPU) through
  google-resumable-media's ``XMLMPUContainer``; parts are sent by hand on the
  client's authorized session because ``XMLMPUPart`` can only read a file,
  while our bodies are lists of buffers sent without being joined. Each part
  carries ``x-goog-hash: crc32c=...``, which GCS verifies. Where an endpoint
  has no XML multipart API (fake-gcs-server answers 404), the store notices once
  per endpoint and uses parallel composite uploads instead: parts as temporary
  objects with their CRC32C, ``compose`` (32 at a time, in a tree), a CRC32C
  check of the result, then the temporaries are deleted (see ``multipart_api``).
* Ranged reads land directly in the caller's buffer.
* Retries are cloudckpt's (:mod:`cloudckpt.retry`; every client call here passes
  ``retry=None``): 429/503 are throttling, 408/5xx and broken connections are
  retried with full-jitter backoff, and connection failures give up after
  ``unreachable_timeout`` so a wrong endpoint fails in seconds, not minutes.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import dataclasses
import datetime as _dt
import http.client
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote
from xml.etree import ElementTree

from cloudckpt import crc, layout
from cloudckpt import retry as _retry
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
    UnsupportedAPIError,
)
from cloudckpt.retry import Attempt, FailureKind, RetryPolicy
from cloudckpt.store._deadline import body_deadline
from cloudckpt.store.base import Body, MultipartUpload, ObjectInfo, ObjectStore, PartResult, Scatter
from cloudckpt.store.options import GCSRequestOptions
from cloudckpt.store.s3 import redact_library_logs
from cloudckpt.uri import redact_text, redact_url, scrub_exception

__all__ = ["GCSStore"]

_T = TypeVar("_T")
_DEFAULT_ENDPOINT = "https://storage.googleapis.com"
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_OCTET = "application/octet-stream"
#: Sources per compose request (a GCS limit).
_COMPOSE_LIMIT = 32
_EMPTY_CRC = 0  # CRC32C of no bytes
log = logging.getLogger(__name__)


class _BufferBody:
    """A request body made of buffers, sent one after another without joining them.

    requests takes its length from ``__len__`` (so it sends Content-Length, not
    chunked encoding) and urllib3 hands each memoryview straight to
    ``socket.sendall``. It can be iterated again, so a retried request resends it.
    """

    def __init__(self, buffers: Iterable[Any]) -> None:
        self._buffers = [m for m in (memoryview(b).cast("B") for b in buffers) if m.nbytes]
        self._size = sum(m.nbytes for m in self._buffers)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[memoryview]:
        return iter(self._buffers)


class _ShortRead(Exception):
    """The server sent fewer bytes than requested (the object is shorter): not retried."""


def _walk_causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None), getattr(e, "cause", None)):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))


def _is_connect_failure(exc: BaseException) -> bool:
    """True when no connection could be made at all (refused, DNS, connect timeout)."""
    import socket

    import requests
    import urllib3.exceptions

    for e in _walk_causes(exc):
        if isinstance(
            e,
            (
                requests.exceptions.ConnectTimeout,
                urllib3.exceptions.NewConnectionError,
                urllib3.exceptions.ConnectTimeoutError,
                urllib3.exceptions.NameResolutionError,
                ConnectionRefusedError,
                socket.gaierror,
            ),
        ):
            return True
    return False


def _is_network_failure(exc: BaseException) -> bool:
    """Connection-level failures and timeouts, at any layer."""
    import http.client

    import requests
    import urllib3.exceptions

    for e in _walk_causes(exc):
        if isinstance(
            e,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError,
                http.client.IncompleteRead,
                http.client.RemoteDisconnected,
                ConnectionError,
                TimeoutError,
            ),
        ):
            return True
    return False


def _status_and_text(exc: BaseException) -> tuple[int | None, str]:
    """HTTP status and response text of a google/resumable-media error, if it has one."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.GoogleAPICallError):
        response = getattr(exc, "response", None)
        text = str(exc.message)
        if response is not None:
            try:
                text += " " + response.text
            except Exception:  # noqa: BLE001 - a streamed body may be gone
                pass
        return exc.code, text
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None and response is not None:
        try:
            text = response.text
        except Exception:  # noqa: BLE001
            text = ""
        return int(status), f"{exc} {text}"
    return None, str(exc)


def _bucket_missing(text: str) -> bool:
    low = text.lower()
    return "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket does not exist" in low


class GCSStore(ObjectStore):
    """An :class:`ObjectStore` over one Google Cloud Storage bucket.

    Args:
        bucket: bucket name (no ``gs://``).
        client: an existing ``google.cloud.storage.Client``, used only in this
            process: it is dropped when the store is pickled and the copy builds
            its own from ``project``/``endpoint_url`` (captured from the client).
        project: billing/quota project for the client (optional for object I/O).
        endpoint_url: e.g. an emulator's ``http://127.0.0.1:PORT``; requests to it
            are anonymous. ``STORAGE_EMULATOR_HOST`` is honoured the same way.
        timeout: ``(connect, read)`` seconds per HTTP request (one number sets both).
            A download whose body has not fully arrived ``read`` seconds after its
            headers (a trickling server) is cut and fails with
            ``ReadDeadlineExceededError``, not retried.
        max_pool_connections: size of the HTTP connection pool (one per
            concurrent transfer thread).
        retry_policy: how requests are retried (:class:`~cloudckpt.retry.RetryPolicy`).
        retry_timeout: shortcut for ``retry_policy.timeout``: give up retrying
            429/5xx/broken-connection errors of one call after this many seconds.
        unreachable_timeout: shortcut for ``retry_policy.unreachable_timeout``:
            give up after this many seconds if no connection can be made at all
            (bounds how long a wrong endpoint takes to fail).
        kms_key_name, user_project, storage_class: options for locked-down
            buckets (CMEK, requester pays), sent on every request that needs
            them (see :class:`~cloudckpt.store.options.GCSRequestOptions`).
    """

    scheme = "gs"
    _transient = ("_client", "_lock", "_user_client")
    #: Objects per list request (GCS caps it at 1000).
    list_page_size: int = 1000
    #: How multipart uploads travel: "auto" (the XML API multipart upload; where an
    #: endpoint answers 404 to it although the bucket exists, as fake-gcs-server
    #: does, parallel composite uploads, decided once per endpoint), "xml" (never
    #: fall back: such an endpoint raises UnsupportedAPIError) or "compose" (always
    #: parallel composite uploads). Set it on an instance or a subclass.
    multipart_api: str = "auto"

    def __init__(
        self,
        bucket: str,
        *,
        client: Any = None,
        project: str | None = None,
        endpoint_url: str | None = None,
        timeout: float | tuple[float, float] = (5.0, 120.0),
        max_pool_connections: int = 64,
        retry_policy: RetryPolicy | None = None,
        retry_timeout: float | None = None,
        unreachable_timeout: float | None = None,
        kms_key_name: str | None = None,
        user_project: str | None = None,
        storage_class: str | None = None,
    ) -> None:
        super().__init__(bucket)
        self.request_options = GCSRequestOptions(kms_key_name=kms_key_name, user_project=user_project,
                                                 storage_class=storage_class)
        if client is not None:
            project = project or getattr(client, "project", None)
            if endpoint_url is None:
                base = getattr(getattr(client, "_connection", None), "API_BASE_URL", None)
                if base and base.rstrip("/") != _DEFAULT_ENDPOINT:
                    endpoint_url = base
        self.project = project
        self.endpoint_url = endpoint_url
        if isinstance(timeout, (int, float)):
            timeout = (float(timeout), float(timeout))
        self.timeout = (float(timeout[0]), float(timeout[1]))
        self.max_pool_connections = max_pool_connections
        policy = retry_policy or RetryPolicy()
        if retry_timeout is not None:
            policy = dataclasses.replace(policy, timeout=retry_timeout)
        if unreachable_timeout is not None:
            policy = dataclasses.replace(policy, unreachable_timeout=unreachable_timeout)
        self.retry_policy = policy
        self._health = _retry.EndpointHealth()
        # endpoint -> whether it has the XML multipart API (kept when pickled).
        self._xml_mpu: dict[str, bool] = {}
        self._user_client: tuple[int, Any] | None = (os.getpid(), client) if client is not None else None
        self._client: tuple[int, Any] | None = None
        self._lock: threading.Lock | None = threading.Lock()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GCSStore(bucket={self.bucket!r}, endpoint_url={redact_url(self._endpoint())!r})"

    # -- client ----------------------------------------------------------------
    def _emulator_endpoint(self) -> str | None:
        endpoint = self.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint and "://" not in endpoint:
            endpoint = "http://" + endpoint
        return endpoint.rstrip("/") if endpoint else None

    def _endpoint(self) -> str:
        return self._emulator_endpoint() or _DEFAULT_ENDPOINT

    @property
    def client(self) -> Any:
        """The ``google.cloud.storage.Client`` of this process (created on first use, never pickled)."""
        user = self._user_client
        if user is not None and user[0] == os.getpid():
            return user[1]
        cached = self._client
        if cached is not None and cached[0] == os.getpid():
            return cached[1]
        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            if self._client is not None and self._client[0] == os.getpid():
                return self._client[1]
            redact_library_logs()
            client = self._make_client()
            redact_library_logs()  # and the loggers of modules the client imported
            self._client = (os.getpid(), client)
            return client

    def _make_client(self) -> Any:
        import google.auth
        import requests
        from google.auth.credentials import AnonymousCredentials
        from google.auth.exceptions import DefaultCredentialsError
        from google.auth.transport.requests import AuthorizedSession
        from google.cloud import storage

        endpoint = self._emulator_endpoint()
        if endpoint:
            credentials: Any = AnonymousCredentials()
            project: str | None = self.project or "cloudckpt"
            options: dict[str, str] | None = {"api_endpoint": endpoint}
        else:
            try:
                credentials, adc_project = google.auth.default(
                    scopes=list(storage.Client.SCOPE))  # type: ignore[attr-defined]
            except DefaultCredentialsError as exc:
                raise AccessDeniedError(
                    f"no Google Cloud credentials found for gs://{self.bucket}: run "
                    "`gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, "
                    "or run on a GCP VM with a service account "
                    f"({exc})"
                ) from exc
            project = self.project or adc_project
            options = None
        session = AuthorizedSession(credentials)
        # One pooled connection per transfer thread (requests' default keeps only 10,
        # so 32 threads would keep reconnecting).
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=self.max_pool_connections)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        client = storage.Client(  # type: ignore[attr-defined]
            project=project, credentials=credentials, _http=session, client_options=options)
        # google-cloud-storage 3.x fetches bucket metadata (buckets.get) in a background
        # thread for trace attributes. That request carries no userProject, so it is
        # refused on requester-pays buckets, and it needs storage.buckets.get, which
        # object-only roles lack: switch it off for cloudckpt's client.
        if getattr(client, "_bucket_metadata_cache", None) is not None:
            client._bucket_metadata_cache = None
        return client

    def close(self) -> None:
        """Drop this process's client and its connection pool (rebuilt on next use)."""
        cached, self._client = self._client, None
        if cached is not None and cached[0] == os.getpid():
            try:
                cached[1]._http.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    def _bucket(self) -> Any:
        """The client's Bucket, carrying ``user_project`` into every JSON API call made through it."""
        return self.client.bucket(self.bucket, user_project=self.request_options.user_project)

    @property
    def _session(self) -> Any:
        return self.client._http

    def _api_base(self) -> str:
        conn = self.client._connection
        getter = getattr(conn, "get_api_base_url_for_mtls", None)
        return (getter() if getter else conn.API_BASE_URL).rstrip("/")

    def _xml_url(self, key: str) -> str:
        # Same shape as transfer_manager.upload_chunks_concurrently: path style, '/' escaped.
        return f"{self._api_base()}/{quote(self.bucket, safe='')}/{quote(key, safe='~')}"

    def _media_url(self, key: str) -> str:
        return (
            f"{self._api_base()}/download/storage/v1/b/{quote(self.bucket, safe='')}"
            f"/o/{quote(key, safe='')}?alt=media"
        )

    # -- retries and errors ----------------------------------------------------
    def _classify(self, exc: BaseException) -> FailureKind | None:
        """Transient failures (retried) by kind; None for final ones."""
        if isinstance(exc, (_ShortRead, CloudCheckpointError)):
            return None
        if _is_connect_failure(exc):
            return FailureKind.CONNECT
        status, _ = _status_and_text(exc)
        if status in (429, 503):
            return FailureKind.THROTTLE
        if status in (408, 500, 502, 504):
            return FailureKind.SERVER
        if status is not None:
            return None
        try:
            from google.cloud.storage.exceptions import DataCorruption
        except ImportError:  # pragma: no cover - older storage releases
            from google.resumable_media import DataCorruption
        from google.cloud.storage.retry import _should_retry

        # A download whose bytes do not match GCS's own hash was damaged in transit
        # (stored bytes are verified at upload): fetch it again.
        if isinstance(exc, DataCorruption) or _is_network_failure(exc) or _should_retry(exc):
            return FailureKind.NETWORK
        return None

    def _run(self, action: str, key: str | None, fn: Callable[[], _T], *, retry: bool = True) -> _T:
        """Call ``fn`` (retried with this store's policy) and translate any failure."""
        return self._run_attempts(action, key, lambda _attempt: fn(), retry=retry)

    def _run_attempts(self, action: str, key: str | None, fn: Callable[[Attempt], _T], *,
                      retry: bool = True) -> _T:
        """Like :meth:`_run`, for calls that need to know about earlier attempts."""
        try:
            if retry:
                return _retry.call(fn, classify=self._classify, policy=self.retry_policy, health=self._health)
            return fn(Attempt(1))
        except _retry.GaveUp as gave_up:
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

    def _translate(self, exc: BaseException, key: str | None, action: str) -> Exception:
        """The typed error for ``exc``, with every URL password and token in its text (and its cause's) masked."""
        scrub_exception(exc)  # chained below the typed error: its text may show a URL with a password
        err = self._typed_error(exc, key, action)
        text = str(err)
        clean = redact_text(text)
        return err if clean == text else type(err)(clean)

    def _typed_error(self, exc: BaseException, key: str | None, action: str) -> Exception:
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        where = self.url(key) if key is not None else f"gs://{self.bucket}"
        if isinstance(exc, gexc.RetryError):
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if cause is None:
                return EndpointUnreachableError(
                    f"gave up trying to {action} {where} at {self._endpoint()}: {exc}; "
                    "check STORAGE_EMULATOR_HOST / endpoint_url and network access"
                )
            exc = cause
        if isinstance(exc, _ShortRead):
            return TransferError(f"short read of {where}: {exc}")
        try:
            from google.cloud.storage.exceptions import DataCorruption
        except ImportError:  # pragma: no cover - older storage releases
            from google.resumable_media import DataCorruption
        if isinstance(exc, DataCorruption):
            return IntegrityError(f"checksum mismatch while trying to {action} {where}: {exc}")
        if isinstance(exc, (auth_exc.RefreshError, auth_exc.DefaultCredentialsError)):
            return AccessDeniedError(
                f"could not obtain Google Cloud credentials to {action} {where}: {exc}; check "
                "Application Default Credentials (gcloud auth application-default login / "
                "GOOGLE_APPLICATION_CREDENTIALS / the VM's service account)"
            )
        status, text = _status_and_text(exc)
        if status is not None:
            if status == 404:
                if key is None or _bucket_missing(text):
                    return self._bucket_not_found(action, where)
                if "NoSuchUpload" in text:
                    return ObjectNotFoundError(
                        f"the multipart upload of {where} no longer exists (it was aborted or completed) "
                        f"while trying to {action} it"
                    )
                return ObjectNotFoundError(f"{where} does not exist (while trying to {action} it)")
            if status in (401, 403):
                return AccessDeniedError(
                    f"access denied trying to {action} {where} (HTTP {status}); check that the credentials "
                    "have storage.objects.create/get/list/delete on the bucket (e.g. roles/storage.objectAdmin)"
                    + self.request_options.denied_hint()
                )
            if status == 412:
                return PreconditionFailedError(f"{where} already exists (conditional {action} refused)")
            if status == 400 and any(c in text for c in ("BadDigest", "InvalidDigest", "CrcMismatch", "doesn't match")):
                return IntegrityError(
                    f"GCS rejected the checksum while trying to {action} {where}: {text.strip()[:500]}")
            return TransferError(f"failed to {action} {where}: HTTP {status}: {text.strip()[:500]}")
        if _is_connect_failure(exc) or (isinstance(exc, auth_exc.TransportError) and not _is_network_failure(exc)):
            return EndpointUnreachableError(
                f"could not reach GCS endpoint {self._endpoint()} to {action} {where}: "
                f"{type(exc).__name__}; check STORAGE_EMULATOR_HOST / endpoint_url and network access"
            )
        if _is_network_failure(exc) or isinstance(exc, auth_exc.TransportError):
            # Only the exception's type: its text can carry request URLs.
            return TransferError(
                f"the connection to GCS endpoint {self._endpoint()} broke while trying to {action} {where}: "
                f"{type(exc).__name__}"
            )
        return TransferError(f"failed to {action} {where}: {type(exc).__name__}: {exc}")

    def _bucket_not_found(self, action: str, where: str) -> BucketNotFoundError:
        return BucketNotFoundError(
            f"bucket gs://{self.bucket} does not exist or is not visible to these credentials "
            f"(while trying to {action} {where}); create it (gcloud storage buckets create "
            f"gs://{self.bucket}) or fix the bucket name / credentials"
        )

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        ok: Sequence[int] = (200,),
    ) -> Any:
        """One HTTP request on the authorized session; non-``ok`` statuses become google exceptions."""
        from google.api_core import exceptions as gexc

        resp = self._session.request(
            method, url, params=params, headers=dict(headers or {}), data=data, timeout=self.timeout
        )
        if resp.status_code not in ok:
            raise gexc.from_http_response(resp)
        return resp

    # -- info helpers ----------------------------------------------------------
    @staticmethod
    def _info_from_json(key: str, doc: Mapping[str, Any]) -> ObjectInfo:
        updated = doc.get("updated")
        last_modified = None
        if updated:
            try:
                last_modified = _dt.datetime.fromisoformat(str(updated).replace("Z", "+00:00"))
            except ValueError:
                last_modified = None
        c = doc.get("crc32c")
        return ObjectInfo(
            key=key,
            size=int(doc.get("size", 0)),
            etag=doc.get("etag"),
            crc32c=crc.from_base64(c) if c else None,
            last_modified=last_modified,
            version=str(doc["generation"]) if doc.get("generation") is not None else None,
            metadata=dict(doc.get("metadata") or {}),
        )

    @staticmethod
    def _info_from_blob(blob: Any) -> ObjectInfo:
        return ObjectInfo(
            key=blob.name,
            size=int(blob.size or 0),
            etag=blob.etag,
            crc32c=crc.from_base64(blob.crc32c) if blob.crc32c else None,
            last_modified=blob.updated,
            version=str(blob.generation) if blob.generation is not None else None,
            metadata=dict(blob.metadata or {}),
        )

    # -- buckets ---------------------------------------------------------------
    def check_bucket(self) -> None:
        """Raise unless objects in the bucket can be listed with these credentials."""
        # Listing needs only storage.objects.list, which a checkpoint writer needs
        # anyway; buckets.get would wrongly fail for object-only IAM roles.
        def call() -> None:
            it = self.client.list_blobs(
                self._bucket(), max_results=1, retry=None, timeout=self.timeout
            )
            list(it)

        self._run("access bucket", None, call)

    # -- single-request objects ----------------------------------------------------
    def put(
        self,
        key: str,
        body: Body,
        *,
        crc32c: int,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Upload ``body`` as ``key`` in one multipart/related request; GCS verifies ``crc32c``."""
        payload = _BufferBody(body)
        meta: dict[str, Any] = {"name": key, "contentType": _OCTET, "crc32c": crc.to_base64(crc32c),
                                **self.request_options.json_metadata()}
        if metadata:
            meta["metadata"] = dict(metadata)
        boundary = f"==============={uuid.uuid4().hex}=="
        head = (
            f"--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps(meta)}\r\n--{boundary}\r\ncontent-type: {_OCTET}\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--".encode("ascii")
        request_body = _BufferBody([head, *payload, tail])
        url = f"{self._api_base()}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"
        params = {"uploadType": "multipart", **self.request_options.json_params(create=True)}
        if if_absent:
            params["ifGenerationMatch"] = "0"
        headers = {"content-type": f'multipart/related; boundary="{boundary}"'}

        def call(attempt: Attempt) -> ObjectInfo:
            try:
                resp = self._request("POST", url, params=params, headers=headers, data=request_body)
            except Exception as exc:
                status, _ = _status_and_text(exc)
                if status == 412 and attempt.maybe_applied_before:
                    # An earlier attempt may have landed and only its reply was lost:
                    # if the live object is byte-for-byte ours, the write succeeded.
                    info = self.head(key)
                    if info is not None and info.crc32c == crc32c and info.size == len(payload):
                        return info
                raise
            return self._info_from_json(key, resp.json())

        info = self._run_attempts("upload", key, call)
        if info.crc32c is not None and info.crc32c != crc32c:
            raise IntegrityError(
                f"GCS stored {self.url(key)} with CRC32C {info.crc32c:#010x}, expected {crc32c:#010x}"
            )
        return info

    def _deadline_error(self, key: str, action: str) -> ReadDeadlineExceededError:
        return ReadDeadlineExceededError(
            f"failed to {action} {self.url(key)}: the response did not arrive within the read timeout "
            f"({self.timeout[1]:g} s) although the connection stayed open (a stalled or trickling server); "
            "not retried. Check the endpoint, or raise timeout= for very slow links")

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        """Download a whole object, checked against GCS's CRC32C of it (``x-goog-hash``).

        The size is known from the response headers before the body is read, so
        ``max_size`` refuses an oversized object unread, and the body must arrive
        within the read timeout (a trickling server is cut off, not waited for).
        """
        url = self._media_url(key)

        def call() -> bytes:
            from google.api_core import exceptions as gexc

            resp = self._session.request("GET", url, headers={"Accept-Encoding": "identity"},
                                         params=self.request_options.json_params(), timeout=self.timeout, stream=True)
            try:
                if resp.status_code != 200:
                    resp.content  # noqa: B018 - load the error body for the message
                    raise gexc.from_http_response(resp)
                length = resp.headers.get("Content-Length")
                size = int(length) if length is not None and length.isdigit() else None
                if max_size is not None and size is not None and size > max_size:
                    raise self.too_large(key, size, max_size)
                limit = max_size + 1 if max_size is not None else None
                data = bytearray()
                with body_deadline(self.timeout[1], resp.raw) as deadline:
                    try:
                        while limit is None or len(data) < limit:
                            chunk = resp.raw.read(1 << 20 if limit is None else min(1 << 20, limit - len(data)))
                            if not chunk:
                                break
                            data += chunk
                    except Exception:
                        if deadline.expired:
                            raise self._deadline_error(key, "download") from None
                        raise
                    if deadline.expired and (size is None or len(data) < size):
                        raise self._deadline_error(key, "download")
                if max_size is not None and len(data) > max_size:
                    raise self.too_large(key, len(data), max_size)
                if size is not None and len(data) != size:
                    raise http.client.IncompleteRead(b"", size - len(data))  # broken transfer: retried
                self._check_hash(resp, data, key)
                return bytes(data)
            finally:
                resp.close()

        return self._run("download", key, call)

    @staticmethod
    def _check_hash(resp: Any, data: bytes | bytearray, key: str) -> None:
        """Compare the body with the CRC32C GCS sent in ``x-goog-hash`` (when it sent one)."""
        for part in resp.headers.get("x-goog-hash", "").split(","):
            name, _, value = part.strip().partition("=")
            if name == "crc32c" and value:
                try:
                    want = crc.from_base64(value)
                except Exception:  # noqa: BLE001 - an unreadable header is not a checksum
                    return
                if crc.crc32c(data) != want:
                    try:
                        from google.cloud.storage.exceptions import DataCorruption
                    except ImportError:  # pragma: no cover - older storage releases
                        from google.resumable_media import DataCorruption
                    # Damaged in transit (GCS verified the stored bytes at upload): retried.
                    raise DataCorruption(resp, f"CRC32C of the downloaded {key} does not match x-goog-hash")
                return

    def get_range(self, key: str, start: int, out: memoryview) -> None:
        """Read bytes ``[start, start + len(out))`` of ``key`` straight into ``out``."""
        self._read_range(key, start, Scatter(start, [(start, out)]))

    def get_ranges_into(self, key: str, start: int, views: Sequence[tuple[int, memoryview | None]]) -> None:
        """One ranged GET streamed into each view in turn (the bytes between views are discarded)."""
        self._read_range(key, start, Scatter(start, views))

    def _read_range(self, key: str, start: int, plan: Scatter) -> None:
        """GET bytes ``[start, start + plan.size)`` of ``key`` straight into the plan's views."""
        n = plan.size
        if n == 0:
            return
        url = self._media_url(key)
        got = 0  # survives retries: a broken stream resumes where it stopped

        def call() -> None:
            nonlocal got
            from google.api_core import exceptions as gexc

            first = start + got
            resp = self._session.request(
                "GET", url, headers={"Range": f"bytes={first}-{start + n - 1}", "Accept-Encoding": "identity"},
                params=self.request_options.json_params(),
                timeout=self.timeout, stream=True,
            )
            try:
                if resp.status_code == 416:
                    raise _ShortRead(f"range starts at {first}, past the end of the object")
                if resp.status_code not in (200, 206):
                    resp.content  # noqa: B018 - load the error body for the message
                    raise gexc.from_http_response(resp)
                if resp.status_code == 200 and first != 0:
                    raise TransferError(f"{self.url(key)}: the server ignored the Range header")
                length = resp.headers.get("Content-Length")
                fp = getattr(resp.raw, "_fp", None)
                # Read from the http.client response directly: one copy, socket -> out.
                readinto = fp.readinto if fp is not None and hasattr(fp, "readinto") and not resp.headers.get(
                    "Content-Encoding") else resp.raw.readinto
                with body_deadline(self.timeout[1], resp.raw) as deadline:
                    try:
                        got = plan.fill(readinto, got, n)
                    except Exception:
                        if deadline.expired:
                            raise self._deadline_error(key, "read") from None
                        raise
                    if deadline.expired and got < n:
                        raise self._deadline_error(key, "read")
                if got < n and length is not None and got - (first - start) < int(length):
                    # Fewer bytes than the server announced: the transfer broke, not the
                    # object. Retried, resuming at ``got``.
                    raise http.client.IncompleteRead(b"", int(length) - (got - (first - start)))
                if got < n:
                    raise _ShortRead(
                        f"wanted bytes [{start}, {start + n}), the object ended after {got} bytes"
                        + (f" (Content-Length {length})" if length else "")
                    )
                if fp is not None and fp.isclosed():
                    # Fully read: hand the connection back to the pool for keep-alive
                    # (requests' close() would drop it since it did not read the body).
                    resp.raw.release_conn()
            finally:
                resp.close()

        self._run("read", key, call)

    def head(self, key: str) -> ObjectInfo | None:
        """Size, CRC32C, generation and metadata of ``key``, or None if it does not exist."""
        from google.api_core import exceptions as gexc

        blob = self._bucket().blob(key)

        def call() -> ObjectInfo | None:
            try:
                blob.reload(retry=None, timeout=self.timeout)
            except gexc.NotFound as exc:
                _, text = _status_and_text(exc)
                if _bucket_missing(text):
                    raise
                return None
            return self._info_from_blob(blob)

        return self._run("inspect", key, call)

    def _list_page(self, token: str | None, **kwargs: Any) -> tuple[list[Any], tuple[str, ...], str | None]:
        """One page of a listing: (blobs, prefixes, next token), retried as a unit."""

        def call() -> tuple[list[Any], tuple[str, ...], str | None]:
            it = self.client.list_blobs(
                self._bucket(), page_token=token, page_size=self.list_page_size, retry=None,
                timeout=self.timeout, **kwargs,
            )
            page = next(it.pages, None)
            if page is None:
                return [], (), None
            return list(page), tuple(getattr(page, "prefixes", ())), it.next_page_token

        return self._run("list", None, call)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, in key order, page by page."""
        token: str | None = None
        while True:
            blobs, _, token = self._list_page(token, prefix=prefix)
            for blob in blobs:
                yield self._info_from_blob(blob)
            if not token:
                return

    def list_prefixes(self, prefix: str) -> builtins.list[str]:
        """Immediate "sub-directories" of ``prefix`` (each ending in '/')."""
        found: set[str] = set()
        token: str | None = None
        while True:
            _, prefixes, token = self._list_page(token, prefix=prefix, delimiter="/")
            found.update(prefixes)
            if not token:
                return sorted(found)

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing object is fine, a missing bucket is not."""
        from google.api_core import exceptions as gexc

        blob = self._bucket().blob(key)

        def call() -> None:
            try:
                blob.delete(retry=None, timeout=self.timeout)
            except gexc.NotFound as exc:
                _, text = _status_and_text(exc)
                if _bucket_missing(text):
                    raise

        self._run("delete", key, call)

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` with a few concurrent requests (GCS has no multi-object delete)."""
        keys = list(keys)
        if len(keys) <= 2:
            for key in keys:
                self.delete(key)
            return
        with concurrent.futures.ThreadPoolExecutor(min(16, len(keys))) as pool:
            for fut in [pool.submit(self.delete, k) for k in keys]:
                fut.result()

    # -- multipart ---------------------------------------------------------------
    #
    # Two wire paths behind one interface. The XML API multipart upload is used
    # where the endpoint has it (real GCS, our emulator). Where it answers 404 to
    # the initiation although the bucket exists (fake-gcs-server has no XML
    # API), the store falls back to a parallel composite upload, which real GCS
    # supports too: each part becomes a temporary object (JSON API upload with
    # its CRC32C), completion composes them (32 sources per request, in a tree
    # for more) and checks the result's CRC32C against the parts' combined one.
    # The upload id says which path an upload took; the temporary objects are
    # named after it (:func:`cloudckpt.layout.composite_part_name`), so listing
    # finds unfinished composite uploads and ``gc`` aborts them.

    def _xml_multipart_available(self) -> bool | None:
        """Whether this endpoint has the XML multipart API: True, False, or None (not probed yet)."""
        if self.multipart_api == "xml":
            return True
        if self.multipart_api == "compose":
            return False
        known = getattr(self, "_xml_mpu", None)
        return known.get(self._endpoint()) if known else None

    def _remember_xml_multipart(self, available: bool) -> None:
        # Per endpoint: a pickled store keeps what it learned, and a copy that ends
        # up talking to another endpoint (STORAGE_EMULATOR_HOST) probes again.
        if getattr(self, "_xml_mpu", None) is None:
            self._xml_mpu = {}
        self._xml_mpu[self._endpoint()] = available

    def _no_xml_multipart(self, what: str, key: str | None) -> UnsupportedAPIError:
        where = self.url(key) if key is not None else f"gs://{self.bucket}"
        return UnsupportedAPIError(
            f"GCS endpoint {self._endpoint()} answered 404 to the XML API request to {what} for {where} although "
            f"bucket gs://{self.bucket} exists: it has no XML API multipart upload (fake-gcs-server lacks it). "
            "Set multipart_api='auto' (the default) to fall back to parallel composite uploads"
        )

    def _on_xml_404(self, exc: BaseException, what: str, key: str | None) -> None:
        """Inside a retried call: a 404 that is not "no such bucket/upload" means the XML API is missing."""
        status, text = _status_and_text(exc)
        if status == 404 and not _bucket_missing(text) and "NoSuchUpload" not in text:
            raise self._no_xml_multipart(what, key) from exc

    def _fall_back_from_xml(self, err: UnsupportedAPIError) -> None:
        """After a 404 from the XML API: raise unless composite uploads may take over."""
        # A missing bucket answers 404 too, on fake-gcs-server without saying so.
        self.check_bucket()
        if self.multipart_api == "xml":
            raise err
        if self._xml_multipart_available() is None:
            log.info("%s; using parallel composite uploads for gs://%s", err, self.bucket)
        self._remember_xml_multipart(False)

    def _container(self, key: str, upload_id: str | None = None, headers: dict | None = None) -> Any:
        try:
            from google.cloud.storage._media.requests import XMLMPUContainer
        except ImportError:  # google-cloud-storage 2.x uses the separate package
            from google.resumable_media.requests import XMLMPUContainer  # type: ignore[assignment]

        # Initiation, completion and abort all carry the requester-pays header.
        headers = {**self.request_options.xml_headers(), **(headers or {})}
        return XMLMPUContainer(
            self._xml_url(key), None, headers=headers, upload_id=upload_id, retry=None
        )

    def create_multipart(self, key: str, *, metadata: Mapping[str, str] | None = None) -> str:
        """Start a multipart upload of ``key`` and return its upload id.

        XML API multipart upload where the endpoint has it, else a parallel
        composite upload (decided once per endpoint, see :attr:`multipart_api`).
        """
        if self._xml_multipart_available() is False:
            return self._composite_create(key, metadata)
        try:
            upload_id = self._xml_create(key, metadata)
        except UnsupportedAPIError as err:
            self._fall_back_from_xml(err)
            return self._composite_create(key, metadata)
        self._remember_xml_multipart(True)
        return upload_id

    def _xml_create(self, key: str, metadata: Mapping[str, str] | None) -> str:
        headers = {f"x-goog-meta-{k}": str(v) for k, v in (metadata or {}).items()}
        headers.update(self.request_options.xml_headers(create=True))

        maybe_orphans = False

        def call(attempt: Attempt) -> str:
            nonlocal maybe_orphans
            maybe_orphans = attempt.maybe_applied_before
            container = self._container(key, headers=dict(headers))
            try:
                container.initiate(self._session, _OCTET, timeout=self.timeout)
            except Exception as exc:
                self._on_xml_404(exc, "start a multipart upload (POST ?uploads)", key)
                raise
            return str(container.upload_id)

        upload_id = self._run_attempts("start multipart upload of", key, call)
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
        """Upload one part (its buffers back to back); GCS verifies the part's CRC32C."""
        if _is_composite(upload_id):
            return self._composite_part(key, upload_id, part_number, body, crc32c)
        payload = _BufferBody(body)
        url = self._xml_url(key)
        params = {"partNumber": str(part_number), "uploadId": upload_id}
        headers = {"x-goog-hash": f"crc32c={crc.to_base64(crc32c)}", "content-type": _OCTET,
                   **self.request_options.xml_headers()}

        def call() -> PartResult:
            resp = self._request("PUT", url, params=params, headers=headers, data=payload if len(payload) else b"")
            etag = resp.headers.get("ETag")
            if not etag:
                raise TransferError(f"GCS sent no ETag for part {part_number} of {self.url(key)}")
            echoed = resp.headers.get("x-goog-hash", "")
            for item in echoed.split(","):
                name, _, value = item.strip().partition("=")
                if name == "crc32c" and value and crc.from_base64(value) != crc32c:
                    raise IntegrityError(
                        f"GCS stored part {part_number} of {self.url(key)} with CRC32C "
                        f"{crc.from_base64(value):#010x}, expected {crc32c:#010x}"
                    )
            return PartResult(part_number=part_number, etag=etag, size=len(payload), crc32c=crc32c)

        return self._run(f"upload part {part_number} of", key, call)

    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartResult], *, if_absent: bool = False
    ) -> ObjectInfo:
        """Assemble ``parts`` (sorted by number) into ``key``; ``if_absent``: only if ``key`` does not exist."""
        if _is_composite(upload_id):
            return self._composite_complete(key, upload_id, parts, if_absent=if_absent)
        ordered = sorted(parts, key=lambda p: p.part_number)
        size = sum(p.size for p in ordered)
        whole = crc.combine_all((p.crc32c, p.size) for p in ordered)
        headers = {"x-goog-if-generation-match": "0"} if if_absent else {}

        def call(attempt: Attempt) -> ObjectInfo:
            container = self._container(key, upload_id=upload_id, headers=dict(headers))
            for p in ordered:
                container.register_part(p.part_number, p.etag)
            try:
                resp = container.finalize(self._session, timeout=self.timeout)
            except Exception as exc:
                status, text = _status_and_text(exc)
                if attempt.maybe_applied_before and (
                        (status == 404 and "NoSuchUpload" in text) or (status == 412 and if_absent)):
                    # A retry after a lost reply finds the upload already consumed: if
                    # the live object is exactly what we assembled, the completion worked.
                    info = self.head(key)
                    if info is not None and info.size == size and info.crc32c == whole:
                        return info
                raise
            etag = None
            try:
                root = ElementTree.fromstring(resp.content)
                node = root.find(f"{_S3_NS}ETag")
                etag = node.text if node is not None else None
            except ElementTree.ParseError:
                pass
            generation = resp.headers.get("x-goog-generation")
            return ObjectInfo(key=key, size=size, etag=etag, crc32c=whole, version=generation)

        info = self._run_attempts("complete multipart upload of", key, call)
        if info.crc32c is not None and info.crc32c != whole:
            raise IntegrityError(
                f"{self.url(key)} has CRC32C {info.crc32c:#010x} after completion, expected {whole:#010x}")
        return info

    # -- server-side copies (incremental saves) ------------------------------------------
    #: ``objects.rewrite`` copies whole objects inside GCS; a byte range cannot be copied
    #: (``compose`` joins whole objects only), so range copies go through the client.
    server_side_copy = True
    server_side_range_copy = False
    #: objects.rewrite has no size limit short of GCS's 5 TiB object limit.
    max_copy_object_size = 5 * 1024 ** 4

    def copy_tag(self, info: ObjectInfo) -> str | None:
        """The object's generation: ``ifSourceGenerationMatch`` guards a copy with it."""
        return info.version

    def copy_object(self, src_key: str, dst_key: str, *, if_match: str | None = None,
                    crc32c: int | None = None) -> ObjectInfo:
        """``objects.rewrite`` (server side, repeated until done), guarded by ``ifSourceGenerationMatch``."""
        url = (f"{self._api_base()}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(src_key, safe='')}"
               f"/rewriteTo/b/{quote(self.bucket, safe='')}/o/{quote(dst_key, safe='')}")
        params: dict[str, str] = dict(self.request_options.json_params())
        if self.request_options.kms_key_name:
            params["destinationKmsKeyName"] = self.request_options.kms_key_name
        if if_match is not None:
            params["ifSourceGenerationMatch"] = str(if_match)
        body = json.dumps({"contentType": _OCTET, **self.request_options.json_metadata()})

        def call() -> ObjectInfo:
            token: str | None = None
            while True:
                p = dict(params, **({"rewriteToken": token} if token else {}))
                doc = self._request("POST", url, params=p, headers={"content-type": "application/json"},
                                    data=body).json()
                if doc.get("done"):
                    return self._info_from_json(dst_key, doc.get("resource") or {})
                token = doc.get("rewriteToken")
                if not token:
                    raise TransferError(f"GCS rewrite of {self.url(src_key)} is not done and sent no rewriteToken")

        try:
            info = self._run(f"copy {self.url(src_key)} to", dst_key, call)
        except PreconditionFailedError as exc:
            raise PreconditionFailedError(
                f"copy source {self.url(src_key)} changed since it was checked (ifSourceGenerationMatch refused); "
                f"nothing was copied to {self.url(dst_key)}") from exc
        except ObjectNotFoundError as exc:
            raise ObjectNotFoundError(f"copy source {self.url(src_key)} does not exist ({exc})") from exc
        if crc32c is not None and info.crc32c is not None and info.crc32c != crc32c:
            self.delete(dst_key)
            raise IntegrityError(f"copy of {self.url(src_key)} has CRC32C {info.crc32c:#010x}, expected "
                                 f"{crc32c:#010x}: the source does not hold the bytes its checkpoint recorded; the "
                                 "copy was removed")
        return info

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an upload; an unknown (already finished) upload is not an error."""
        if _is_composite(upload_id):
            self._composite_abort(key, upload_id)
            return

        def call() -> None:
            try:
                self._container(key, upload_id=upload_id).cancel(self._session, timeout=self.timeout)
            except Exception as exc:
                status, text = _status_and_text(exc)
                if status == 404 and not _bucket_missing(text):
                    return
                raise

        self._run("abort multipart upload of", key, call)

    def list_multipart_uploads(self, prefix: str) -> builtins.list[MultipartUpload]:
        """In-progress uploads whose key starts with ``prefix``: XML API ones, then composite ones."""
        out: builtins.list[MultipartUpload] = []
        if self._xml_multipart_available() is not False:
            try:
                out = self._xml_list_uploads(prefix)
            except UnsupportedAPIError as err:
                self._fall_back_from_xml(err)
        return out + self._composite_uploads(prefix)

    def _xml_list_uploads(self, prefix: str) -> builtins.list[MultipartUpload]:
        url = f"{self._api_base()}/{quote(self.bucket, safe='')}"
        out: builtins.list[MultipartUpload] = []
        params: dict[str, str] = {"uploads": "", "prefix": prefix}

        def call() -> Any:
            try:
                return self._request("GET", url, params=dict(params), headers=self.request_options.xml_headers())
            except Exception as exc:
                self._on_xml_404(exc, "list multipart uploads (GET ?uploads)", None)
                raise

        while True:
            resp = self._run("list multipart uploads in", None, call)
            try:
                root = ElementTree.fromstring(resp.content)
            except ElementTree.ParseError as exc:
                raise TransferError(f"unreadable multipart upload listing for gs://{self.bucket}: {exc}") from exc

            def text(node: Any, tag: str) -> str | None:
                found = node.find(f"{_S3_NS}{tag}")
                if found is None:
                    found = node.find(tag)
                return found.text if found is not None else None

            uploads = root.findall(f"{_S3_NS}Upload") or root.findall("Upload")
            for u in uploads:
                initiated = text(u, "Initiated")
                when = None
                if initiated:
                    try:
                        when = _dt.datetime.fromisoformat(initiated.replace("Z", "+00:00"))
                    except ValueError:
                        when = None
                out.append(MultipartUpload(key=text(u, "Key") or "", upload_id=text(u, "UploadId") or "",
                                           initiated=when))
            if (text(root, "IsTruncated") or "false").lower() != "true":
                return out
            params["key-marker"] = text(root, "NextKeyMarker") or ""
            params["upload-id-marker"] = text(root, "NextUploadIdMarker") or ""

    # -- parallel composite uploads ------------------------------------------------
    def _composite_create(self, key: str, metadata: Mapping[str, str] | None) -> str:
        """Start a composite upload: an empty marker object that keeps ``metadata`` until completion."""
        upload_id = f"compose-{uuid.uuid4().hex[:24]}"
        self._json_upload(layout.composite_part_name(key, upload_id, "0"), [], crc32c=_EMPTY_CRC,
                          metadata=metadata, temporary=True, action="start multipart upload of")
        return upload_id

    def _composite_part(self, key: str, upload_id: str, part_number: int, body: Body, crc32c: int) -> PartResult:
        if not 1 <= part_number <= self.max_parts:
            raise TransferError(f"part number {part_number} of {self.url(key)} is outside 1..{self.max_parts}")
        name = layout.composite_part_name(key, upload_id, str(part_number))
        info = self._json_upload(name, body, crc32c=crc32c, temporary=True,
                                 action=f"upload part {part_number} of")
        # The generation pins this exact part in the compose request.
        return PartResult(part_number=part_number, etag=info.version or "", size=info.size, crc32c=crc32c)

    def _json_upload(self, key: str, body: Body, *, crc32c: int, metadata: Mapping[str, str] | None = None,
                     temporary: bool, action: str) -> ObjectInfo:
        """One JSON API multipart upload carrying its CRC32C; a stored CRC32C that differs is removed and refused.

        GCS checks the CRC32C before it creates the object; an emulator that does
        not (fake-gcs-server) is caught by the CRC32C it reports back.
        """
        payload = _BufferBody(body)
        meta: dict[str, Any] = {"name": key, "contentType": _OCTET, "crc32c": crc.to_base64(crc32c),
                                **self._create_fields(temporary)}
        if metadata:
            meta["metadata"] = {str(k): str(v) for k, v in metadata.items()}
        boundary = f"==============={uuid.uuid4().hex}=="
        head = (
            f"--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps(meta)}\r\n--{boundary}\r\ncontent-type: {_OCTET}\r\n\r\n"
        ).encode()
        request_body = _BufferBody([head, *payload, f"\r\n--{boundary}--".encode("ascii")])
        url = f"{self._api_base()}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"
        params = {"uploadType": "multipart", **self.request_options.json_params(create=True)}
        headers = {"content-type": f'multipart/related; boundary="{boundary}"'}

        def call() -> ObjectInfo:
            resp = self._request("POST", url, params=params, headers=headers, data=request_body)
            return self._info_from_json(key, resp.json())

        info = self._run(action, key, call)
        if info.crc32c is not None and (info.crc32c != crc32c or info.size != len(payload)):
            self._delete_generation(key, info.version)
            raise IntegrityError(
                f"GCS stored {self.url(key)} with CRC32C {info.crc32c:#010x} and {info.size} bytes, expected "
                f"{crc32c:#010x} and {len(payload)} bytes (while trying to {action} {self.url(key)}); it was removed"
            )
        return info

    def _create_fields(self, temporary: bool) -> dict[str, str]:
        """Object-resource fields of a new object; CMEK and userProject travel as query parameters."""
        if not temporary:
            return self.request_options.json_metadata()
        # Temporary parts live for minutes: in a colder class each would be billed
        # its minimum storage duration (30 to 365 days), so they stay STANDARD.
        wanted = self.request_options.storage_class
        return {"storageClass": "STANDARD"} if wanted and wanted != "STANDARD" else {}

    def _compose(self, dest: str, sources: Sequence[_Source], *, metadata: Mapping[str, str] | None,
                 temporary: bool, if_absent: bool, action: str) -> ObjectInfo:
        """One compose request (at most 32 sources, each pinned to its generation)."""
        size = sum(s.size for s in sources)
        whole = crc.combine_all((s.crc32c, s.size) for s in sources)
        destination: dict[str, Any] = {"contentType": _OCTET, **self._create_fields(temporary)}
        if metadata:
            destination["metadata"] = dict(metadata)
        doc = {
            "kind": "storage#composeRequest",
            "sourceObjects": [{"name": s.name, **({"generation": s.generation} if s.generation else {})}
                              for s in sources],
            "destination": destination,
        }
        url = f"{self._api_base()}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(dest, safe='')}/compose"
        body = json.dumps(doc).encode("utf-8")
        params = dict(self.request_options.json_params(create=True))
        if if_absent:
            params["ifGenerationMatch"] = "0"

        def call(attempt: Attempt) -> ObjectInfo:
            try:
                resp = self._request("POST", url, params=params, data=body,
                                     headers={"content-type": "application/json; charset=UTF-8"})
            except Exception as exc:
                status, _ = _status_and_text(exc)
                if status == 412 and if_absent and attempt.maybe_applied_before:
                    # A retry after a lost reply: if the live object is exactly what
                    # we composed, the compose worked.
                    info = self.head(dest)
                    if info is not None and info.size == size and info.crc32c == whole:
                        return info
                raise
            return self._info_from_json(dest, resp.json())

        info = self._run_attempts(action, dest, call)
        if info.crc32c is None:
            info = self.head(dest) or info
        if info.crc32c != whole or info.size != size:
            got = f"{info.crc32c:#010x}" if info.crc32c is not None else "no CRC32C"
            self._delete_generation(dest, info.version)
            raise IntegrityError(
                f"compose produced {self.url(dest)} with {got} and {info.size} bytes, expected CRC32C {whole:#010x} "
                f"and {size} bytes (the combination of its parts); it was removed"
            )
        return info

    def _composite_complete(self, key: str, upload_id: str, parts: Sequence[PartResult], *,
                            if_absent: bool) -> ObjectInfo:
        """Compose the parts into ``key`` (in a tree of 32-way composes), verify it, delete the temporaries."""
        ordered = sorted(parts, key=lambda p: p.part_number)
        if not ordered or len({p.part_number for p in ordered}) != len(ordered):
            raise TransferError(f"cannot complete the upload of {self.url(key)}: no parts, or a part number twice")
        marker = self.head(layout.composite_part_name(key, upload_id, "0"))
        if marker is None:
            raise ObjectNotFoundError(
                f"the multipart upload {upload_id} of {self.url(key)} no longer exists (it was aborted or "
                "completed) while trying to complete it")
        sources = [_Source(layout.composite_part_name(key, upload_id, str(p.part_number)), p.etag, p.crc32c, p.size)
                   for p in ordered]
        level = 0
        while len(sources) > _COMPOSE_LIMIT:
            sources = self._compose_level(key, upload_id, level, sources)
            level += 1
        info = self._compose(key, sources, metadata=marker.metadata, temporary=False, if_absent=if_absent,
                             action="complete multipart upload of")
        self._composite_abort(key, upload_id, best_effort=True)
        return info

    def _compose_level(self, key: str, upload_id: str, level: int,
                       sources: Sequence[_Source]) -> builtins.list[_Source]:
        """One level of the tree: every 32 sources become one temporary intermediate object."""
        groups = [sources[i:i + _COMPOSE_LIMIT] for i in range(0, len(sources), _COMPOSE_LIMIT)]

        def one(i: int) -> _Source:
            group = groups[i]
            if len(group) == 1:
                return group[0]
            name = layout.composite_part_name(key, upload_id, f"t{level}.{i}")
            info = self._compose(name, group, metadata=None, temporary=True, if_absent=False,
                                 action="compose the parts of")
            return _Source(name, info.version or "", info.crc32c or 0, info.size)

        with concurrent.futures.ThreadPoolExecutor(min(8, len(groups))) as pool:
            return list(pool.map(one, range(len(groups))))

    def _composite_abort(self, key: str, upload_id: str, *, best_effort: bool = False) -> None:
        """Delete every temporary object of a composite upload (none left is not an error)."""
        prefix = f"{layout.composite_part_name(key, upload_id, '')}"
        try:
            names = [o.key for o in self.list(prefix) if layout.parse_composite_part_name(o.key) is not None]
            # The marker goes last: while it exists, a listing still shows the upload.
            self.delete_many([n for n in names if not n.endswith("-0")])
            self.delete_many([n for n in names if n.endswith("-0")])
        except CloudCheckpointError:
            if not best_effort:
                raise
            log.warning("could not delete the temporary parts of %s (upload %s); `cloudckpt gc` removes them",
                        self.url(key), upload_id, exc_info=True)

    def _composite_uploads(self, prefix: str) -> builtins.list[MultipartUpload]:
        """Unfinished composite uploads under ``prefix``, found by their temporary objects' names."""
        found: dict[tuple[str, str], _dt.datetime | None] = {}
        token: str | None = None
        while True:
            # matchGlob narrows the listing on GCS; servers without it list everything, filtered here.
            blobs, _, token = self._list_page(token, prefix=prefix,
                                              match_glob=f"**{layout.COMPOSITE_PART_MARK}compose-*")
            for blob in blobs:
                parsed = layout.parse_composite_part_name(blob.name)
                if parsed is None or not parsed[0].startswith(prefix):
                    continue
                when = blob.time_created or blob.updated
                ident = (parsed[0], parsed[1])
                old = found.get(ident)
                found[ident] = when if old is None or (when is not None and when < old) else old
            if not token:
                break
        return [MultipartUpload(key=k, upload_id=u, initiated=when) for (k, u), when in sorted(found.items())]

    def _delete_generation(self, key: str, generation: str | None) -> None:
        """Best effort: delete exactly this generation of ``key`` (never a newer object of the same name)."""
        if not generation:
            return
        url = f"{self._api_base()}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(key, safe='')}"
        params = {"ifGenerationMatch": generation, **self.request_options.json_params()}
        try:
            self._run("delete", key, lambda: self._request("DELETE", url, params=params, ok=(200, 204, 404, 412)))
        except CloudCheckpointError:
            log.warning("could not delete the bad object %s; `cloudckpt gc` removes it", self.url(key), exc_info=True)


class _Source:
    """A source object of a compose request: name, pinned generation, CRC32C and size."""

    __slots__ = ("name", "generation", "crc32c", "size")

    def __init__(self, name: str, generation: str, crc32c: int, size: int) -> None:
        self.name = name
        self.generation = generation
        self.crc32c = crc32c
        self.size = size


def _is_composite(upload_id: str) -> bool:
    """True for the upload ids of parallel composite uploads (never an XML API upload id)."""
    return layout.COMPOSITE_UPLOAD_ID_RE.match(upload_id) is not None
