"""Which component takes which option: the one table the manager and the CLI route options by.

:class:`~cloudckpt.manager.CheckpointManager` takes one flat set of keyword
options and hands each to the object store, the writer and/or the reader.
Writers and readers also pass every store option on to their store, so a
writer gets ``store ∪ writer`` options and a reader ``store ∪ reader``.
Keeping that routing in one table (rather than lists of "writer-only" and
"reader-only" names in each caller) is what stops the lists drifting apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["STORE", "WRITER", "READER", "OPTIONS", "SplitOptions", "split_options"]

STORE = "store"
WRITER = "writer"
READER = "reader"

_S = frozenset({STORE})
_W = frozenset({WRITER})
_R = frozenset({READER})
_WR = frozenset({WRITER, READER})

#: Every option a manager accepts, and the components it configures.
OPTIONS: Mapping[str, frozenset[str]] = MappingProxyType({
    # writer (cloudckpt.writer.CloudStorageWriter)
    "overwrite": _W,
    "part_size": _W,
    "target_object_size": _W,
    "prefix_strategy": _W,
    "frozen_keys": _W,  # incremental saves: items copied from the base without being staged
    "copy_friendly_layout": _W,  # GCS: large items in objects of their own (set by incremental=True)
    # reader (cloudckpt.reader.CloudStorageReader)
    "read_gap_threshold": _R,
    "verify": _R,
    "allow_pickle": _R,
    "share_reads": _R,
    # both
    "max_concurrency": _WR,
    "transfer_options": _WR,
    # object store (cloudckpt.store.s3.S3Store / gcs.GCSStore)
    "endpoint_url": _S,
    "region": _S,
    "project": _S,
    "client": _S,
    "max_pool_connections": _S,
    "connect_timeout": _S,
    "read_timeout": _S,
    "timeout": _S,
    "max_attempts": _S,
    "retry_policy": _S,
    "retry_timeout": _S,
    "unreachable_timeout": _S,
    "addressing_style": _S,
    # locked-down buckets (cloudckpt.store.options: S3RequestOptions / GCSRequestOptions)
    "server_side_encryption": _S,
    "sse_kms_key_id": _S,
    "bucket_key_enabled": _S,
    "sse_customer_key": _S,
    "request_payer": _S,
    "expected_bucket_owner": _S,
    "storage_class": _S,
    "object_tags": _S,
    "object_metadata": _S,
    "kms_key_name": _S,
    "user_project": _S,
    # boto3 client options the S3 store passes through
    "profile_name": _S,
    "config": _S,
    "aws_access_key_id": _S,
    "aws_secret_access_key": _S,
    "aws_session_token": _S,
    "aws_account_id": _S,
    "use_ssl": _S,
    "api_version": _S,
})


@dataclass(frozen=True)
class SplitOptions:
    """Options routed to each component (``writer`` and ``reader`` include the store's)."""

    store: Mapping[str, Any] = field(default_factory=dict)
    writer: Mapping[str, Any] = field(default_factory=dict)
    reader: Mapping[str, Any] = field(default_factory=dict)


def split_options(options: Mapping[str, Any], *, owner: str = "CheckpointManager") -> SplitOptions:
    """Route ``options`` by :data:`OPTIONS`; TypeError naming any option no component takes."""
    unknown = sorted(k for k in options if k not in OPTIONS)
    if unknown:
        raise TypeError(f"{owner} got unknown option(s) {', '.join(map(repr, unknown))}; "
                        f"known options: {', '.join(sorted(OPTIONS))}")

    def to(component: str) -> dict[str, Any]:
        return {k: v for k, v in options.items() if component in OPTIONS[k]}

    store = to(STORE)
    return SplitOptions(store=store, writer={**store, **to(WRITER)}, reader={**store, **to(READER)})
