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
  carries ``x-goog-hash: crc32c=...``, which GCS verifies.
* Ranged reads land directly in the caller's buffer.
* Retries are cloudckpt's (:mod:`cloudckpt.retry`; every client call here passes
  ``retry=None``): 429/503 are throttling, 408/5xx and broken connections are
  retried with full-jitter backoff, and connection failures give up after
  ``unreachable_timeout`` so a wrong endpoint fails in seconds, not minutes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as _dt
import http.client
import json
import os
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar
from urllib.parse import quote
from xml.etree import ElementTree

from cloudckpt import crc
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
    TransferError,
)
from cloudckpt.retry import Attempt, FailureKind, RetryPolicy
from cloudckpt.store.base import Body, MultipartUpload, ObjectInfo, ObjectStore, PartResult
from cloudckpt.store.options import GCSRequestOptions
from cloudckpt.store.s3 import redact_library_logs
from cloudckpt.uri import redact_text, redact_url, scrub_exception

__all__ = ["GCSStore"]

_T = TypeVar("_T")
_DEFAULT_ENDPOINT = "https://storage.googleapis.com"
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_OCTET = "application/octet-stream"


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


def _status_and_text(exc: BaseException) -> tuple[Optional[int], str]:
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
    if status is not None:
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

    def __init__(
        self,
        bucket: str,
        *,
        client: Any = None,
        project: Optional[str] = None,
        endpoint_url: Optional[str] = None,
        timeout: "float | tuple[float, float]" = (5.0, 120.0),
        max_pool_connections: int = 64,
        retry_policy: Optional[RetryPolicy] = None,
        retry_timeout: Optional[float] = None,
        unreachable_timeout: Optional[float] = None,
        kms_key_name: Optional[str] = None,
        user_project: Optional[str] = None,
        storage_class: Optional[str] = None,
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
        self._user_client: Optional[tuple[int, Any]] = (os.getpid(), client) if client is not None else None
        self._client: Optional[tuple[int, Any]] = None
        self._lock: Optional[threading.Lock] = threading.Lock()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GCSStore(bucket={self.bucket!r}, endpoint_url={redact_url(self._endpoint())!r})"

    # -- client ----------------------------------------------------------------
    def _emulator_endpoint(self) -> Optional[str]:
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
            project = self.project or "cloudckpt"
            options: Optional[dict[str, str]] = {"api_endpoint": endpoint}
        else:
            try:
                credentials, adc_project = google.auth.default(scopes=list(storage.Client.SCOPE))
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
        client = storage.Client(project=project, credentials=credentials, _http=session, client_options=options)
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
    def _classify(self, exc: BaseException) -> Optional[FailureKind]:
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
            from google.resumable_media import DataCorruption  # type: ignore[no-redef]
        from google.cloud.storage.retry import _should_retry

        # A download whose bytes do not match GCS's own hash was damaged in transit
        # (stored bytes are verified at upload): fetch it again.
        if isinstance(exc, DataCorruption) or _is_network_failure(exc) or _should_retry(exc):
            return FailureKind.NETWORK
        return None

    def _run(self, action: str, key: Optional[str], fn: Callable[[], _T], *, retry: bool = True) -> _T:
        """Call ``fn`` (retried with this store's policy) and translate any failure."""
        return self._run_attempts(action, key, lambda _attempt: fn(), retry=retry)

    def _run_attempts(self, action: str, key: Optional[str], fn: Callable[[Attempt], _T], *,
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
        except Exception as exc:  # noqa: BLE001 - translated into typed errors
            raise self._translate(exc, key, action) from exc

    def _translate(self, exc: BaseException, key: Optional[str], action: str) -> Exception:
        """The typed error for ``exc``, with every URL password and token in its text (and its cause's) masked."""
        scrub_exception(exc)  # chained below the typed error: its text may show a URL with a password
        err = self._typed_error(exc, key, action)
        text = str(err)
        clean = redact_text(text)
        return err if clean == text else type(err)(clean)

    def _typed_error(self, exc: BaseException, key: Optional[str], action: str) -> Exception:
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
            from google.resumable_media import DataCorruption  # type: ignore[no-redef]
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
                return IntegrityError(f"GCS rejected the checksum while trying to {action} {where}: {text.strip()[:500]}")
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
        params: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
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
        ).encode("utf-8")
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
            except Exception as exc:  # noqa: BLE001
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

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        """Download a whole object; the client verifies GCS's CRC32C of it."""
        if max_size is not None:
            info = self.head(key)
            if info is None:
                raise ObjectNotFoundError(f"{self.url(key)} does not exist (while trying to download it)")
            if info.size > max_size:
                raise self.too_large(key, info.size, max_size)
        blob = self._bucket().blob(key)

        def call() -> bytes:
            data = blob.download_as_bytes(checksum="crc32c", retry=None, timeout=self.timeout)
            if max_size is not None and len(data) > max_size:
                raise self.too_large(key, len(data), max_size)
            return data

        return self._run("download", key, call)

    def get_range(self, key: str, start: int, out: memoryview) -> None:
        """Read bytes ``[start, start + len(out))`` of ``key`` straight into ``out``."""
        out = memoryview(out).cast("B")
        n = out.nbytes
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
                while got < n:
                    k = readinto(out[got:])
                    if not k:
                        break
                    got += k
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

        def call() -> Optional[ObjectInfo]:
            try:
                blob.reload(retry=None, timeout=self.timeout)
            except gexc.NotFound as exc:
                _, text = _status_and_text(exc)
                if _bucket_missing(text):
                    raise
                return None
            return self._info_from_blob(blob)

        return self._run("inspect", key, call)

    def _list_page(self, token: Optional[str], **kwargs: Any) -> tuple[list[Any], tuple[str, ...], Optional[str]]:
        """One page of a listing: (blobs, prefixes, next token), retried as a unit."""

        def call() -> tuple[list[Any], tuple[str, ...], Optional[str]]:
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
        token: Optional[str] = None
        while True:
            blobs, _, token = self._list_page(token, prefix=prefix)
            for blob in blobs:
                yield self._info_from_blob(blob)
            if not token:
                return

    def list_prefixes(self, prefix: str) -> list[str]:
        """Immediate "sub-directories" of ``prefix`` (each ending in '/')."""
        found: set[str] = set()
        token: Optional[str] = None
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
    def _container(self, key: str, upload_id: Optional[str] = None, headers: Optional[dict] = None) -> Any:
        try:
            from google.cloud.storage._media.requests import XMLMPUContainer
        except ImportError:  # google-cloud-storage 2.x uses the separate package
            from google.resumable_media.requests import XMLMPUContainer  # type: ignore[no-redef]

        # Initiation, completion and abort all carry the requester-pays header.
        headers = {**self.request_options.xml_headers(), **(headers or {})}
        return XMLMPUContainer(
            self._xml_url(key), None, headers=headers, upload_id=upload_id, retry=None
        )

    def create_multipart(self, key: str, *, metadata: Mapping[str, str] | None = None) -> str:
        """Start an XML API multipart upload of ``key`` and return its upload id."""
        headers = {f"x-goog-meta-{k}": str(v) for k, v in (metadata or {}).items()}
        headers.update(self.request_options.xml_headers(create=True))

        maybe_orphans = False

        def call(attempt: Attempt) -> str:
            nonlocal maybe_orphans
            maybe_orphans = attempt.maybe_applied_before
            container = self._container(key, headers=dict(headers))
            container.initiate(self._session, _OCTET, timeout=self.timeout)
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
        """PUT one part (its buffers back to back); GCS verifies the part's CRC32C."""
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
        """Assemble ``parts`` (sorted by number) into ``key``; ``if_absent`` sends x-goog-if-generation-match: 0."""
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
            except Exception as exc:  # noqa: BLE001
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
            raise IntegrityError(f"{self.url(key)} has CRC32C {info.crc32c:#010x} after completion, expected {whole:#010x}")
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
            token: Optional[str] = None
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

        def call() -> None:
            try:
                self._container(key, upload_id=upload_id).cancel(self._session, timeout=self.timeout)
            except Exception as exc:  # noqa: BLE001
                status, text = _status_and_text(exc)
                if status == 404 and not _bucket_missing(text):
                    return
                raise

        self._run("abort multipart upload of", key, call)

    def list_multipart_uploads(self, prefix: str) -> list[MultipartUpload]:
        """In-progress XML API multipart uploads whose key starts with ``prefix``."""
        url = f"{self._api_base()}/{quote(self.bucket, safe='')}"
        out: list[MultipartUpload] = []
        params: dict[str, str] = {"uploads": "", "prefix": prefix}
        while True:
            resp = self._run(
                "list multipart uploads in", None, lambda: self._request("GET", url, params=dict(params),
                                                                 headers=self.request_options.xml_headers())
            )
            try:
                root = ElementTree.fromstring(resp.content)
            except ElementTree.ParseError as exc:
                raise TransferError(f"unreadable multipart upload listing for gs://{self.bucket}: {exc}") from exc

            def text(node: Any, tag: str) -> Optional[str]:
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
