"""Parse and validate a ``checkpoint_id`` into scheme, bucket and prefix.

Accepted forms:

* ``s3://bucket/some/prefix`` (S3 or an S3-compatible server)
* ``gs://bucket/some/prefix`` (Google Cloud Storage)
* ``file:///abs/path`` or a plain filesystem path (local disk)

Everything is validated up front so a typo fails before any data is uploaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from cloudckpt.errors import InvalidURIError, UnsupportedSchemeError

__all__ = ["StorageURI", "parse_uri", "CLOUD_SCHEMES", "redact_url", "redact_text", "scrub_exception"]

CLOUD_SCHEMES = ("s3", "gs")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# S3 bucket naming rules (general purpose buckets).
_S3_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# GCS allows underscores and, for dotted names, up to 222 characters.
_GCS_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
# S3 Express One Zone directory buckets: BASE--ZONE-ID--x-s3 (e.g. ckpt--usw2-az1--x-s3), no dots.
_S3_DIRECTORY_BUCKET_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?--[a-z0-9]+(?:-[a-z0-9]+)+--x-s3$")
# Prefixes and suffixes S3 reserves for access points, aliases and other bucket types.
_S3_RESERVED = (("xn--", "sthree-", "amzn-s3-demo-"), ("-s3alias", "--ol-s3", "--table-s3"))


@dataclass(frozen=True)
class StorageURI:
    """A validated checkpoint location.

    ``prefix`` never has a leading or trailing slash; for ``file`` URIs it is the
    absolute local path and ``bucket`` is empty.
    """

    scheme: str
    bucket: str
    prefix: str

    @property
    def is_local(self) -> bool:
        """True for local filesystem locations."""
        return self.scheme == "file"

    def key(self, name: str) -> str:
        """Return the full object key (or local path) of ``name`` inside this prefix."""
        if self.is_local:
            return os.path.join(self.prefix, name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def child(self, name: str) -> StorageURI:
        """Return the URI of a sub-prefix, e.g. ``root.child("step-100")``."""
        name = name.strip("/")
        if self.is_local:
            return StorageURI("file", "", os.path.join(self.prefix, name))
        return StorageURI(self.scheme, self.bucket, self.key(name))

    def __str__(self) -> str:
        if self.is_local:
            return self.prefix
        return f"{self.scheme}://{self.bucket}/{self.prefix}" if self.prefix else f"{self.scheme}://{self.bucket}"


def _validate_bucket(scheme: str, bucket: str, uri: str) -> None:
    if not bucket:
        raise InvalidURIError(
            f"checkpoint URI {uri!r} has no bucket name; write it as {scheme}://BUCKET/PREFIX"
        )
    if scheme == "s3" and bucket.endswith("--x-s3"):
        if len(bucket) > 63 or not _S3_DIRECTORY_BUCKET_RE.match(bucket):
            raise InvalidURIError(
                f"invalid directory bucket name {bucket!r} in checkpoint URI {uri!r}: S3 Express One Zone bucket "
                "names are BASE--ZONE-ID--x-s3 (e.g. ckpt--usw2-az1--x-s3), at most 63 characters of lowercase "
                "letters, digits and '-', no dots"
            )
        return
    if scheme == "s3" and (bucket.startswith(_S3_RESERVED[0]) or bucket.endswith(_S3_RESERVED[1])):
        raise InvalidURIError(
            f"invalid bucket name {bucket!r} in checkpoint URI {uri!r}: S3 reserves the prefixes "
            f"{', '.join(_S3_RESERVED[0])} and the suffixes {', '.join(_S3_RESERVED[1])} for other resource types"
        )
    pattern = _S3_BUCKET_RE if scheme == "s3" else _GCS_BUCKET_RE
    bad = not pattern.match(bucket) or ".." in bucket or _IPV4_RE.match(bucket)
    if bad:
        rules = (
            "3-63 characters of lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
            if scheme == "s3"
            else "3-63 characters of lowercase letters, digits, '-', '_' and '.', starting and ending with a letter "
            "or digit"
        )
        raise InvalidURIError(
            f"invalid bucket name {bucket!r} in checkpoint URI {uri!r}: bucket names must be {rules}"
        )


def _validate_prefix(prefix: str, uri: str) -> str:
    if "//" in prefix.strip("/"):
        raise InvalidURIError(
            f"checkpoint URI {uri!r} contains an empty path segment ('//'); remove the doubled slash"
        )
    prefix = prefix.strip("/")
    parts = prefix.split("/") if prefix else []
    if any(p in (".", "..") for p in parts):
        raise InvalidURIError(
            f"checkpoint URI {uri!r} contains '.' or '..' segments, which object stores do not resolve; "
            "use a plain prefix such as run1/step-100"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in prefix):
        raise InvalidURIError(f"checkpoint URI {uri!r} contains control characters; remove them")
    return prefix


def parse_uri(uri: str | os.PathLike[str] | StorageURI) -> StorageURI:
    """Parse ``uri`` into a :class:`StorageURI`, raising :class:`InvalidURIError` on bad input."""
    if isinstance(uri, StorageURI):
        return uri
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise InvalidURIError(
            f"checkpoint_id must be a string URI such as s3://bucket/prefix, got {type(uri).__name__}"
        )
    if not uri.strip():
        raise InvalidURIError("checkpoint_id is empty; pass e.g. s3://bucket/run/step-100 or a local path")
    m = _SCHEME_RE.match(uri)
    # A one-letter "scheme" is a Windows drive letter, not a URI scheme.
    if m is None or len(m.group(1)) == 1:
        return StorageURI("file", "", os.path.abspath(os.path.expanduser(uri)))
    scheme = m.group(1).lower()
    rest = uri[m.end():]
    if scheme == "file":
        if not rest.startswith("//"):
            raise InvalidURIError(f"malformed file URI {uri!r}; write it as file:///absolute/path")
        path = rest[2:]
        if path and not path.startswith("/"):
            raise InvalidURIError(
                f"file URI {uri!r} names a host ({path.split('/')[0]!r}); write it as file:///absolute/path"
            )
        if not path:
            raise InvalidURIError(f"file URI {uri!r} has no path; write it as file:///absolute/path")
        return StorageURI("file", "", os.path.abspath(path))
    if scheme in ("gcs",):
        raise UnsupportedSchemeError(
            f"unsupported scheme {scheme!r} in checkpoint URI {uri!r}; Google Cloud Storage URIs are written "
            "gs://BUCKET/PREFIX"
        )
    if scheme not in CLOUD_SCHEMES:
        raise UnsupportedSchemeError(
            f"unsupported scheme {scheme!r} in checkpoint URI {uri!r}; "
            "use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, file:///path or a local path"
        )
    if not rest.startswith("//"):
        fixed = f"{scheme}://{rest.lstrip('/')}"
        raise InvalidURIError(
            f"malformed checkpoint URI {uri!r}: expected {scheme}://BUCKET/PREFIX (did you mean {fixed!r}?)")
    body = rest[2:]
    bucket, _, prefix = body.partition("/")
    _validate_bucket(scheme, bucket, uri)
    for bad in ("?", "#"):
        if bad in prefix:
            raise InvalidURIError(
                f"checkpoint URI {uri!r} contains {bad!r}; query strings and fragments are not supported in prefixes"
            )
    return StorageURI(scheme, bucket, _validate_prefix(prefix, uri))


def relative_key(uri: StorageURI, key: str) -> str:
    """Inverse of :meth:`StorageURI.key`: strip the checkpoint prefix from a full key."""
    if uri.is_local:
        return str(PurePosixPath(os.path.relpath(key, uri.prefix)))
    if not uri.prefix:
        return key
    assert key.startswith(uri.prefix + "/"), (key, uri)
    return key[len(uri.prefix) + 1:]


# -- secrets in URLs and texts ------------------------------------------------------------
#
# An endpoint may carry a password (``http://user:pass@host``), and request logs
# or server replies may carry AWS session tokens and signatures. Everything that
# shows an endpoint or an error text goes through these helpers.

REDACTED = "***"
# scheme://userinfo@ : the userinfo (user and password) is masked.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@'\"<>]+)@")
# Header forms ("x-amz-security-token: v", "'X-Amz-Security-Token': b'v'", canonical "x-amz-security-token:v")
# and query forms ("X-Amz-Security-Token=v", "X-Amz-Signature=v", "X-Amz-Credential=v").
_SECRET_FIELDS = re.compile(
    r"(?P<name>x-amz-security-token|x-amz-s3session-token|x-goog-security-token|authorization|x-amz-signature"
    r"|x-amz-credential|x-goog-signature|x-goog-credential|access_token|upload_token|signature"
    r"|x-amz-copy-source-server-side-encryption-customer-key|x-amz-server-side-encryption-customer-key"
    r"|CopySourceSSECustomerKey|SSECustomerKey|x-goog-encryption-key)"
    r"(?P<sep>['\"]?\s*[:=]\s*b?['\"]?)(?P<value>[^'\"\s,&}<]+)",
    re.IGNORECASE)
# S3 echoes the whole canonical request (session token included) on SignatureDoesNotMatch,
# as text and as hex bytes.
_ECHOED_REQUEST = re.compile(
    r"<(?P<tag>CanonicalRequest|CanonicalRequestBytes|StringToSign|StringToSignBytes)>.*?</(?P=tag)>",
    re.IGNORECASE | re.DOTALL)


def redact_url(url: str | None) -> str | None:
    """``url`` with any ``user:password@`` replaced by ``***@`` (None stays None)."""
    if url is None:
        return None
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", str(url))


def redact_text(text: str) -> str:
    """``text`` with URL userinfo, session tokens, signatures and echoed canonical requests masked."""
    if not text:
        return text
    text = _ECHOED_REQUEST.sub(lambda m: f"<{m.group('tag')}>{REDACTED}</{m.group('tag')}>", text)
    text = _SECRET_FIELDS.sub(lambda m: f"{m.group('name')}{m.group('sep')}{REDACTED}", text)
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def scrub_exception(exc: BaseException | None, *, depth: int = 8) -> None:
    """Redact, in place, the texts of ``exc`` and the exceptions it chains (cause and context).

    Library exceptions (botocore's, urllib3's, requests') embed the request URL,
    so a chained traceback would show an endpoint's password. Their string
    arguments are replaced by redacted copies; other state is left alone.
    """
    seen: set[int] = set()
    while exc is not None and depth > 0 and id(exc) not in seen:
        seen.add(id(exc))
        depth -= 1
        try:
            args = tuple(redact_text(a) if isinstance(a, str) else a for a in exc.args)
            if args != exc.args:
                exc.args = args
            for attr in ("msg", "message", "fmt"):
                value = exc.__dict__.get(attr)
                if isinstance(value, str):
                    setattr(exc, attr, redact_text(value))
            kwargs = exc.__dict__.get("kwargs")
            if isinstance(kwargs, dict):  # botocore formats str() from these
                for k, v in list(kwargs.items()):
                    if isinstance(v, str):
                        kwargs[k] = redact_text(v)
        except Exception:  # noqa: BLE001 - an exotic exception keeps its text rather than break error handling
            pass
        exc = exc.__cause__ or exc.__context__
