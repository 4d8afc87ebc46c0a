"""Typed exceptions raised by cloudckpt.

Every message names the URI or object involved and says what to do about it.
All exceptions derive from :class:`CloudCheckpointError` so callers can catch the
whole family with one ``except``.
"""

from __future__ import annotations


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


class UnsafeMetadataError(CloudCheckpointError):
    """A ``.metadata`` object tried to unpickle something outside the DCP allow-list."""


class CheckpointInProgressError(CloudCheckpointError):
    """A save was requested while the executor's previous upload is still running."""


class CheckpointWorkerError(CloudCheckpointError):
    """A background checkpoint worker (thread or process) died or could not start."""


class CheckpointAbortedError(CloudCheckpointError):
    """The save was aborted on this rank because another rank's worker failed."""


class DeadlineExceededError(TransferError):
    """A save's uploads did not finish within ``TransferOptions.save_deadline``; nothing was committed."""


class UnpicklableWriterError(CloudCheckpointError, TypeError):
    """A writer or planner cannot be sent to the checkpoint process because it holds live state (a client)."""


class DemoFailedError(CloudCheckpointError):
    """A phase of ``cloudckpt demo`` failed; the message carries the failing rank's log."""
