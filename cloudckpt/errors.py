"""Typed exceptions raised by cloudckpt.

Every message names the URI or object involved and says what to do about it.
All exceptions derive from :class:`CloudCheckpointError` so callers can catch the
whole family with one ``except``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class CloudCheckpointError(Exception):
    """Base class of every error raised by cloudckpt."""


class InvalidURIError(CloudCheckpointError, ValueError):
    """A ``checkpoint_id`` could not be parsed or names an invalid bucket/prefix."""


class UnsupportedSchemeError(InvalidURIError):
    """The URI scheme is not one cloudckpt can store checkpoints under."""


class BucketNotFoundError(CloudCheckpointError):
    """The bucket named in the URI does not exist or is not visible to these credentials."""


class ObjectNotFoundError(CloudCheckpointError, FileNotFoundError):
    """An object that should exist (e.g. ``.metadata``) is missing."""


class CheckpointNotFoundError(ObjectNotFoundError):
    """No committed checkpoint (no ``.metadata``) exists at the URI."""


class CheckpointExistsError(CloudCheckpointError, FileExistsError):
    """A committed checkpoint already exists and ``overwrite=False`` was requested."""


class EndpointUnreachableError(CloudCheckpointError, ConnectionError):
    """The storage endpoint could not be reached within the configured time."""


class AccessDeniedError(CloudCheckpointError, PermissionError):
    """The credentials in use are not allowed to perform an operation."""


class TransferError(CloudCheckpointError):
    """An upload or download failed after all retries."""


class PreconditionFailedError(CloudCheckpointError):
    """A conditional write failed because the object already exists."""


class IntegrityError(CloudCheckpointError):
    """Stored bytes do not match the checksum recorded when they were written."""


class UnsupportedTensorError(CloudCheckpointError, TypeError):
    """A tensor reached the writer on a device it cannot serialise (CUDA, meta, ...)."""


class ObjectTooLargeError(IntegrityError):
    """An object is larger than cloudckpt reads for its kind (``.metadata``, a manifest); it is refused unread."""


class UnsafeMetadataError(CloudCheckpointError):
    """A ``.metadata`` object tried to unpickle something outside the DCP allow-list."""


class NotACheckpointError(InvalidURIError):
    """A destructive command was pointed at a prefix that is not a checkpoint (see ``layout.checkpoint_state``)."""


class IncompleteCheckpointError(IntegrityError):
    """An object a checkpoint's ``.metadata`` refers to is missing or shorter than the items stored in it."""


class UnsafeDestinationError(CloudCheckpointError):
    """A local destination holds a symbolic link or a file where a copy must create a directory."""


class CheckpointInProgressError(CloudCheckpointError):
    """A save was requested while the executor's previous upload is still running."""


class CheckpointWorkerError(CloudCheckpointError):
    """A background checkpoint worker (thread or process) died or could not start."""


class CheckpointAbortedError(CloudCheckpointError):
    """The save was aborted on this rank because another rank's worker failed."""


class DeadlineExceededError(TransferError):
    """A save's uploads did not finish within ``TransferOptions.save_deadline``; nothing was committed."""


class InvalidStoreOptionError(CloudCheckpointError, ValueError):
    """A store option has a value the bucket or cloudckpt cannot use (e.g. ``sse_kms_key_id`` without SSE-KMS)."""


class UnknownStoreOptionError(CloudCheckpointError, TypeError):
    """A store option (or a value's type) is not one the backend knows; a misspelt name, usually."""


class UnsafeCheckpointItemError(CloudCheckpointError):
    """A byte item (a pickled non-tensor value) names a class outside the restricted-load allow-list.

    Loading it would run code chosen by whoever wrote the checkpoint. Pass
    ``allow_pickle=True`` only for checkpoints from a trusted source.
    """


class ItemKindMismatchError(CloudCheckpointError, TypeError):
    """A key is stored as a tensor but the caller holds a non-tensor (or the reverse); nothing was changed."""


class UnsafePathError(IntegrityError, UnsafeMetadataError):
    """An object path recorded in a checkpoint points outside it, or at something that is not a regular file."""


class ReadDeadlineExceededError(DeadlineExceededError):
    """A read did not finish within the store's read timeout (a stalled or trickling server)."""


class UnpicklableWriterError(CloudCheckpointError, TypeError):
    """A writer or planner cannot be sent to the checkpoint process because it holds live state (a client)."""


class ReplicationError(CloudCheckpointError):
    """A local-tier step could not be written or replicated on every node; no node committed it."""


class PersistError(TransferError):
    """A local-tier step could not be copied to the object store; nothing new was committed there."""


class UnsupportedAPIError(TransferError):
    """The storage endpoint lacks an API cloudckpt needs (e.g. fake-gcs-server has no XML multipart upload)."""


class UnsupportedTransformError(CloudCheckpointError):
    """An item was stored through a stream transform (``_StorageInfo.transform_descriptors``) this process cannot undo.

    The bytes are not known to be corrupt: the transform is unknown to the
    extension registry (or its module is not installed). Install what it needs
    (``pip install cloudckpt[zstd]`` for ``stream.zstd``) or register the
    extension with :func:`cloudckpt.transforms.register_extension`.
    """


class DecodedTooLargeError(IntegrityError):
    """A transformed (e.g. compressed) item decodes to more bytes than it may: a decompression bomb, or corrupt data.

    Decoding stops at the limit, so memory stays bounded; the limit is the
    item's declared tensor size plus framing, or ``CLOUDCKPT_MAX_DECODED_BYTES``
    for byte items.
    """


class PeerReadError(TransferError):
    """A load that shares reads between ranks stopped because another rank failed to read its part."""


@contextlib.contextmanager
def typed_errors(reader: Any = None) -> Iterator[None]:
    """Re-raise a DCP ``CheckpointException`` as the cloudckpt error that caused it.

    DCP wraps every rank's failure in a ``CheckpointException`` (a BaseException).
    When the root cause is a cloudckpt error (bad URI, existing checkpoint,
    missing bucket...) the lowest failing rank's error is raised instead (a
    :class:`PeerReadError` only if no rank has another cloudckpt error), with
    the CheckpointException (listing every rank) chained as its cause.
    ``reader``'s ``metadata_error`` (a :class:`~cloudckpt.reader.CloudStorageReader`)
    is preferred: DCP turns a missing ``.metadata`` into a generic error after
    also trying its per-rank fallback, and the reader kept the real one.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        missing = getattr(reader, "metadata_error", None)
        if missing is not None:
            raise missing from exc
        errors = [exc.failures[rank][0] for rank in sorted(exc.failures)]
        # A rank that stopped because a peer failed (PeerReadError) is not the cause: prefer the peer's error.
        for err in sorted(errors, key=lambda e: isinstance(e, PeerReadError)):
            if isinstance(err, CloudCheckpointError):
                raise err from exc
        raise

