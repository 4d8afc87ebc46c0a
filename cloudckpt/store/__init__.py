"""Object-store backends behind one small interface (:class:`ObjectStore`)."""

from __future__ import annotations

from typing import Any

from cloudckpt.store.base import Body, MultipartUpload, ObjectInfo, ObjectStore, PartResult, body_size
from cloudckpt.uri import StorageURI, parse_uri

__all__ = ["Body", "MultipartUpload", "ObjectInfo", "ObjectStore", "PartResult", "body_size", "open_store"]


def open_store(uri: str | StorageURI, **options: Any) -> ObjectStore:
    """Return the backend for ``uri``'s scheme, configured with ``options``."""
    u = parse_uri(uri)
    if u.scheme == "s3":
        try:
            from cloudckpt.store.s3 import S3Store
        except ImportError as exc:  # pragma: no cover - depends on installed extras
            raise ImportError(f"{u} needs boto3: pip install 'cloudckpt[s3]'") from exc
        return S3Store(u.bucket, **options)
    if u.scheme == "gs":
        try:
            from cloudckpt.store.gcs import GCSStore
        except ImportError as exc:  # pragma: no cover - depends on installed extras
            raise ImportError(f"{u} needs google-cloud-storage: pip install 'cloudckpt[gcs]'") from exc
        return GCSStore(u.bucket, **options)
    from cloudckpt.store.local import LocalStore

    if options:
        raise TypeError(f"local checkpoint {u} takes no storage options, got {sorted(options)}")
    return LocalStore()
