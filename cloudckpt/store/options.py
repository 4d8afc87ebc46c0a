"""Per-request options for locked-down buckets, in one place per backend.

Enterprise buckets reject requests that lack the right headers: a bucket policy
that demands SSE-KMS with one key, requester pays, a cross-account owner check.
:class:`S3RequestOptions` and :class:`GCSRequestOptions` validate those options
once, at construction, and give each request the parameters it must carry, so
every call site of a store adds one ``**extra(op)`` and nothing else.

Secrets (the SSE-C key) live in :class:`SecretBytes`, whose ``repr`` and ``str``
are redacted. It still pickles its value: a store sent to the checkpoint process
must be able to read and write the objects there.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from cloudckpt.errors import InvalidStoreOptionError, UnknownStoreOptionError

__all__ = [
    "GCSRequestOptions",
    "S3RequestOptions",
    "SecretBytes",
    "is_directory_bucket",
    "S3_CLIENT_OPTIONS",
]

#: Keyword arguments :class:`~cloudckpt.store.s3.S3Store` passes on to
#: ``boto3.Session.client`` (``profile_name`` picks the session). Anything else
#: is a TypeError at construction, not deep inside a save.
S3_CLIENT_OPTIONS = frozenset({
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_account_id",
    "profile_name", "config", "verify", "use_ssl", "api_version",
})

_SSE_VALUES = ("AES256", "aws:kms", "aws:kms:dsse")
_KMS = ("aws:kms", "aws:kms:dsse")
# Readable only after a restore request: a checkpoint written there could not be loaded.
_ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
_S3_STORAGE_CLASSES = (
    "STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR",
    "OUTPOSTS", "SNOW", "EXPRESS_ONEZONE", "FSX_OPENZFS",
)
_GCS_STORAGE_CLASSES = ("STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE", "MULTI_REGIONAL", "REGIONAL",
                        "DURABLE_REDUCED_AVAILABILITY", "RAPID")
_DIRECTORY_BUCKET_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?--[a-z0-9-]+--x-s3$")
_ACCOUNT_RE = re.compile(r"^\d{12}$")
_GCS_KMS_RE = re.compile(r"^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+(/cryptoKeyVersions/\d+)?$")

# Which boto3 parameters each operation accepts (from botocore's S3 model). A
# parameter goes on every operation that models it, so nothing is forgotten.
_EVERY = frozenset({"RequestPayer", "ExpectedBucketOwner"})
_SSE_C = frozenset({"SSECustomerKey", "SSECustomerAlgorithm"})
_CREATE = frozenset({"ServerSideEncryption", "SSEKMSKeyId", "BucketKeyEnabled", "StorageClass", "Tagging",
                     "Metadata"})
_S3_PARAMS: dict[str, frozenset[str]] = {
    "HeadBucket": frozenset({"ExpectedBucketOwner"}),
    "ListObjectsV2": _EVERY,
    "ListMultipartUploads": _EVERY,
    "DeleteObject": _EVERY,
    "DeleteObjects": _EVERY,
    "AbortMultipartUpload": _EVERY,
    "GetObject": _EVERY | _SSE_C,
    "HeadObject": _EVERY | _SSE_C,
    "UploadPart": _EVERY | _SSE_C,
    "CompleteMultipartUpload": _EVERY | _SSE_C,
    "ListParts": _EVERY | _SSE_C,
    "PutObject": _EVERY | _SSE_C | _CREATE,
    "CreateMultipartUpload": _EVERY | _SSE_C | _CREATE,
    "CopyObject": _EVERY | _SSE_C | _CREATE | {"CopySourceSSECustomerKey", "CopySourceSSECustomerAlgorithm",
                                               "ExpectedSourceBucketOwner"},
    "UploadPartCopy": _EVERY | _SSE_C | {"CopySourceSSECustomerKey", "CopySourceSSECustomerAlgorithm",
                                         "ExpectedSourceBucketOwner"},
}
#: Headers for what an operation's model lacks (HeadBucket has no RequestPayer):
#: added by the client hook :meth:`S3RequestOptions.install`.
_HEADER_OF = {"RequestPayer": "x-amz-request-payer", "ExpectedBucketOwner": "x-amz-expected-bucket-owner"}


def is_directory_bucket(bucket: str) -> bool:
    """True for S3 Express One Zone directory bucket names (``name--usw2-az1--x-s3``)."""
    return bool(_DIRECTORY_BUCKET_RE.match(bucket))


class SecretBytes:
    """A secret (an SSE-C key) that never shows in ``repr``, ``str``, logs or error messages.

    It pickles its value, because a store sent to the checkpoint process must
    use the key there; keep pickled stores out of logs and off disk.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """The secret itself; pass it only to the request that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "SecretBytes(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretBytes) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SecretBytes, (self._value,))


def _sse_customer_key(value: Any) -> SecretBytes | None:
    """A 256-bit SSE-C key from raw bytes, a 32-character string, or base64 text."""
    if value is None:
        return None
    if isinstance(value, SecretBytes):
        raw = value.reveal()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        if len(raw) != 32:
            try:
                raw = base64.b64decode(value, validate=True)
            except ValueError:  # binascii.Error: not base64 either; the length check below says so
                pass
    else:
        raise UnknownStoreOptionError(f"sse_customer_key must be bytes or str, got {type(value).__name__}")
    if len(raw) != 32:
        # Never echo the value: only its length.
        raise InvalidStoreOptionError(
            f"sse_customer_key must be a 256-bit AES key (32 bytes, raw or base64), got {len(raw)} "
                         "bytes")
    return SecretBytes(raw)


def _string_map(name: str, value: Mapping[str, Any] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UnknownStoreOptionError(f"{name} must be a mapping of str to str, got {type(value).__name__}")
    out = {str(k): str(v) for k, v in value.items()}
    for k in out:
        if not k or not k.isascii() or any(c in k for c in " \t\r\n:"):
            raise InvalidStoreOptionError(f"{name} key {k!r} is not a valid header/tag name (ASCII, no spaces or ':')")
    return out


@dataclasses.dataclass(frozen=True)
class S3RequestOptions:
    """What every S3 request of a store must carry; validated at construction.

    Which requests carry what:

    * ``request_payer``, ``expected_bucket_owner``: every request.
    * ``sse_customer_key``: every request that reads or writes object bytes
      (PutObject, CreateMultipartUpload, UploadPart, CompleteMultipartUpload,
      GetObject, HeadObject, ListParts, copies: both the destination and the
      source key).
    * ``server_side_encryption``, ``sse_kms_key_id``, ``bucket_key_enabled``,
      ``storage_class``, ``object_tags``, ``object_metadata``: requests that
      create objects (PutObject, CreateMultipartUpload, CopyObject).
    """

    bucket: str
    server_side_encryption: str | None = None
    sse_kms_key_id: str | None = None
    bucket_key_enabled: bool | None = None
    sse_customer_key: SecretBytes | None = None
    request_payer: str | None = None
    expected_bucket_owner: str | None = None
    storage_class: str | None = None
    object_tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    object_metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        set_("sse_customer_key", _sse_customer_key(self.sse_customer_key))
        set_("object_tags", _string_map("object_tags", self.object_tags))
        set_("object_metadata", _string_map("object_metadata", self.object_metadata))
        self._validate_encryption()
        self._validate_rest()
        if is_directory_bucket(self.bucket):
            self._validate_directory_bucket()

    def _validate_encryption(self) -> None:
        sse = self.server_side_encryption
        if sse is not None and sse not in _SSE_VALUES:
            raise InvalidStoreOptionError(
                f"server_side_encryption={sse!r} is not one of {', '.join(map(repr, _SSE_VALUES))}")
        if self.sse_kms_key_id is not None:
            if sse not in _KMS:
                raise InvalidStoreOptionError(
                    "sse_kms_key_id needs server_side_encryption='aws:kms' (or 'aws:kms:dsse'), "
                                 f"got server_side_encryption={sse!r}")
            if not isinstance(self.sse_kms_key_id, str) or not self.sse_kms_key_id.strip():
                raise InvalidStoreOptionError("sse_kms_key_id must be a KMS key id, key ARN or alias ARN")
        if self.bucket_key_enabled is not None:
            if not isinstance(self.bucket_key_enabled, bool):
                raise UnknownStoreOptionError(
                    f"bucket_key_enabled must be True or False, got {self.bucket_key_enabled!r}")
            if sse not in _KMS and not is_directory_bucket(self.bucket):
                raise InvalidStoreOptionError(
                    "bucket_key_enabled applies to SSE-KMS only: set server_side_encryption='aws:kms'")
        if self.sse_customer_key is not None and sse is not None:
            raise InvalidStoreOptionError(
                "sse_customer_key (SSE-C) cannot be combined with server_side_encryption: S3 encrypts "
                             "an object with one method; drop one of them")

    def _validate_rest(self) -> None:
        if self.request_payer is not None and self.request_payer != "requester":
            raise InvalidStoreOptionError(f"request_payer must be 'requester' (or None), got {self.request_payer!r}")
        owner = self.expected_bucket_owner
        if owner is not None and (not isinstance(owner, str) or not _ACCOUNT_RE.match(owner)):
            raise InvalidStoreOptionError(f"expected_bucket_owner must be a 12-digit AWS account id, got {owner!r}")
        sc = self.storage_class
        if sc is not None:
            if sc in _ARCHIVE_CLASSES:
                raise InvalidStoreOptionError(
                    f"storage_class={sc!r} needs a restore request before each read, so a checkpoint "
                                 "written there could not be loaded; use e.g. 'STANDARD_IA' or 'GLACIER_IR', or a "
                                 "lifecycle rule to archive old checkpoints")
            if sc not in _S3_STORAGE_CLASSES:
                raise InvalidStoreOptionError(f"storage_class={sc!r} is not an S3 storage class "
                                 f"({', '.join(_S3_STORAGE_CLASSES)})")
        if len(self.object_tags) > 10:
            raise InvalidStoreOptionError(
                f"object_tags has {len(self.object_tags)} tags; S3 allows at most 10 per object")
        for k, v in self.object_tags.items():
            if len(k) > 128 or len(v) > 256:
                raise InvalidStoreOptionError(
                    f"object tag {k!r}: keys are at most 128 characters and values at most 256")
        if sum(len(k) + len(v) for k, v in self.object_metadata.items()) > 1024:
            # S3 allows 2 KB of user metadata; cloudckpt keeps the rest for its own keys.
            raise InvalidStoreOptionError(
                "object_metadata is larger than 1 KiB; S3 allows 2 KiB of user metadata per object "
                             "and cloudckpt needs some of it")

    def _validate_directory_bucket(self) -> None:
        """Reject what S3 Express One Zone directory buckets refuse, before any request."""
        b = self.bucket
        if self.server_side_encryption == "aws:kms:dsse":
            raise InvalidStoreOptionError(
                f"directory bucket {b} does not support server_side_encryption='aws:kms:dsse'; "
                             "use 'aws:kms' or 'AES256' matching the bucket's default encryption")
        if self.sse_kms_key_id is not None:
            raise InvalidStoreOptionError(
                f"directory bucket {b} always uses its default encryption key (one customer-managed "
                             "KMS key per bucket); drop sse_kms_key_id and set the key in the bucket's default "
                             "encryption")
        if self.bucket_key_enabled is False:
            raise InvalidStoreOptionError(f"directory bucket {b} always uses S3 Bucket Keys with SSE-KMS; drop "
                             "bucket_key_enabled=False")
        if self.sse_customer_key is not None:
            raise InvalidStoreOptionError(f"directory bucket {b} does not support SSE-C (sse_customer_key)")
        if self.request_payer is not None:
            raise InvalidStoreOptionError(f"directory bucket {b} does not support requester pays; drop request_payer")
        if self.object_tags:
            raise InvalidStoreOptionError(f"directory bucket {b} does not support object tags; drop object_tags")
        if self.storage_class not in (None, "EXPRESS_ONEZONE"):
            raise InvalidStoreOptionError(f"directory bucket {b} stores only storage_class='EXPRESS_ONEZONE', got "
                             f"{self.storage_class!r}")

    # -- what requests carry ---------------------------------------------------------
    def _values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.request_payer:
            out["RequestPayer"] = self.request_payer
        if self.expected_bucket_owner:
            out["ExpectedBucketOwner"] = self.expected_bucket_owner
        if self.sse_customer_key is not None:
            # boto3 base64-encodes the key and adds its MD5 header itself.
            key = self.sse_customer_key.reveal()
            out.update(SSECustomerAlgorithm="AES256", SSECustomerKey=key,
                       CopySourceSSECustomerAlgorithm="AES256", CopySourceSSECustomerKey=key)
        if self.server_side_encryption:
            out["ServerSideEncryption"] = self.server_side_encryption
        if self.sse_kms_key_id:
            out["SSEKMSKeyId"] = self.sse_kms_key_id
        if self.bucket_key_enabled is not None:
            out["BucketKeyEnabled"] = self.bucket_key_enabled
        if self.storage_class:
            out["StorageClass"] = self.storage_class
        if self.object_tags:
            out["Tagging"] = urllib.parse.urlencode(self.object_tags)
        if self.expected_bucket_owner:
            out["ExpectedSourceBucketOwner"] = self.expected_bucket_owner
        return out

    def extra(self, operation: str, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The boto3 parameters ``operation`` (e.g. ``"PutObject"``) must carry.

        ``metadata`` is the call's own object metadata; it is merged over
        ``object_metadata`` (cloudckpt's keys win) for operations that create
        objects, and returned as ``Metadata`` when there is any.
        """
        allowed = _S3_PARAMS.get(operation)
        if allowed is None:
            raise KeyError(f"no request options defined for S3 operation {operation!r}")
        out = {k: v for k, v in self._values().items() if k in allowed}
        if "Metadata" in allowed:
            merged = {**self.object_metadata, **dict(metadata or {})}
            if merged:
                out["Metadata"] = merged
        return out

    def install(self, client: Any) -> None:
        """Hook ``client`` for what per-call parameters cannot express.

        * Operations whose model lacks a header (HeadBucket has no RequestPayer)
          get it added before signing.
        * DeleteObjects must carry a checksum; botocore picks CRC32 (not MD5, which
          S3 Express refuses) and needs the CRT for CRC32C. cloudckpt computes the
          CRC32C itself, so every request of a save is checksummed alike.
        """
        headers = {_HEADER_OF[k]: v for k, v in self._values().items() if k in _HEADER_OF}

        def add_headers(request: Any, **_: Any) -> None:
            for name, value in headers.items():
                if name not in request.headers:
                    request.headers[name] = value

        if headers:
            client.meta.events.register("before-sign.s3", add_headers, unique_id="cloudckpt-request-headers")
        client.meta.events.register("before-sign.s3.DeleteObjects", _crc32c_for_delete_objects,
                                    unique_id="cloudckpt-delete-crc32c")

    def denied_hint(self, action: str) -> str:
        """What usually fixes an AccessDenied for ``action`` on this bucket (no secrets)."""
        hints: list[str] = []
        writes = any(w in action for w in ("upload", "multipart", "copy", "commit", "write"))
        if writes and self.server_side_encryption is None and self.sse_customer_key is None:
            hints.append("the bucket policy may require server_side_encryption='aws:kms' and "
                         "sse_kms_key_id='arn:aws:kms:REGION:ACCOUNT:key/ID' (or 'AES256')")
        elif writes and self.server_side_encryption in _KMS:
            hints.append(f"the bucket policy may require a different KMS key than sse_kms_key_id="
                         f"{self.sse_kms_key_id!r}, or the role lacks kms:GenerateDataKey/kms:Decrypt on it")
        if self.request_payer is None:
            hints.append("requester pays buckets need request_payer='requester'")
        if self.expected_bucket_owner is not None:
            hints.append(f"or an expected_bucket_owner mismatch: S3 refuses every request when "
                         f"expected_bucket_owner={self.expected_bucket_owner} is not the account that owns "
                         f"s3://{self.bucket}")
        return ("; " + "; ".join(hints)) if hints else ""


def _crc32c_for_delete_objects(request: Any, **_: Any) -> None:
    """Replace botocore's checksum of a DeleteObjects body with its CRC32C."""
    from cloudckpt import crc

    body = request.body
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray)):
        return  # a streamed body: keep botocore's checksum
    for name in list(request.headers.keys()):
        if name.lower().startswith("x-amz-checksum-") or name.lower() in ("content-md5",
                                                                          "x-amz-sdk-checksum-algorithm"):
            del request.headers[name]
    request.headers["x-amz-sdk-checksum-algorithm"] = "CRC32C"
    request.headers["x-amz-checksum-crc32c"] = crc.to_base64(crc.crc32c(bytes(body)))


@dataclasses.dataclass(frozen=True)
class GCSRequestOptions:
    """What every GCS request of a store must carry; validated at construction.

    * ``user_project`` (requester pays): every request, as the ``userProject``
      query parameter on the JSON API and the ``x-goog-user-project`` header on
      the XML API.
    * ``kms_key_name`` (CMEK) and ``storage_class``: requests that create
      objects (JSON uploads: ``kmsKeyName`` parameter and ``storageClass`` in
      the metadata; XML multipart initiation: ``x-goog-encryption-kms-key-name``
      and ``x-goog-storage-class`` headers).
    """

    kms_key_name: str | None = None
    user_project: str | None = None
    storage_class: str | None = None

    def __post_init__(self) -> None:
        if self.kms_key_name is not None and not _GCS_KMS_RE.match(str(self.kms_key_name)):
            raise InvalidStoreOptionError(
                f"kms_key_name={self.kms_key_name!r} is not a Cloud KMS key name; write it as "
                             "projects/P/locations/L/keyRings/R/cryptoKeys/K")
        if self.user_project is not None and (not isinstance(self.user_project, str) or not self.user_project):
            raise InvalidStoreOptionError(f"user_project must be the GCP project id to bill, got {self.user_project!r}")
        if self.storage_class is not None:
            if self.storage_class not in _GCS_STORAGE_CLASSES:
                raise InvalidStoreOptionError(f"storage_class={self.storage_class!r} is not a GCS storage class "
                                 f"({', '.join(_GCS_STORAGE_CLASSES)})")

    def json_params(self, *, create: bool = False) -> dict[str, str]:
        """Query parameters for a JSON API request (``create``: it makes an object)."""
        out: dict[str, str] = {}
        if self.user_project:
            out["userProject"] = self.user_project
        if create and self.kms_key_name:
            out["kmsKeyName"] = self.kms_key_name
        return out

    def json_metadata(self) -> dict[str, str]:
        """Object-resource fields for a JSON API upload."""
        return {"storageClass": self.storage_class} if self.storage_class else {}

    def xml_headers(self, *, create: bool = False) -> dict[str, str]:
        """Headers for an XML API request (``create``: multipart initiation)."""
        out: dict[str, str] = {}
        if self.user_project:
            out["x-goog-user-project"] = self.user_project
        if create and self.kms_key_name:
            out["x-goog-encryption-kms-key-name"] = self.kms_key_name
        if create and self.storage_class:
            out["x-goog-storage-class"] = self.storage_class
        return out

    def denied_hint(self) -> str:
        """What usually fixes a 403 on a locked-down GCS bucket."""
        hints = []
        if self.user_project is None:
            hints.append("requester pays buckets need user_project='BILLING_PROJECT'")
        if self.kms_key_name is None:
            hints.append("buckets that enforce CMEK need kms_key_name='projects/P/locations/L/keyRings/R/"
                         "cryptoKeys/K'")
        else:
            hints.append(f"the GCS service agent needs roles/cloudkms.cryptoKeyEncrypterDecrypter on "
                         f"{self.kms_key_name}")
        return "; " + "; ".join(hints)
