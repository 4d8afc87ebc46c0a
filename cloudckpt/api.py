"""URI-driven entry points: pick the writer/reader from the scheme, save and load."""

from __future__ import annotations

import os
from typing import Any

import contextlib
from typing import Iterator

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import Metadata
from torch.distributed.checkpoint.api import CheckpointException

from cloudckpt.errors import CloudCheckpointError

from cloudckpt.reader import CloudStorageReader, GCSStorageReader, LocalStorageReader, S3StorageReader
from cloudckpt.uri import parse_uri
from cloudckpt.writer import CloudStorageWriter, GCSStorageWriter, LocalStorageWriter, S3StorageWriter

__all__ = ["storage_writer", "storage_reader", "save", "load", "typed_errors"]

_WRITERS: dict[str, type[CloudStorageWriter]] = {
    "s3": S3StorageWriter,
    "gs": GCSStorageWriter,
    "file": LocalStorageWriter,
}
_READERS: dict[str, type[CloudStorageReader]] = {
    "s3": S3StorageReader,
    "gs": GCSStorageReader,
    "file": LocalStorageReader,
}


def storage_writer(uri: "str | os.PathLike[str]", **options: Any) -> CloudStorageWriter:
    """The DCP StorageWriter for ``uri``: S3 for ``s3://``, GCS for ``gs://``, local otherwise."""
    u = parse_uri(uri)
    return _WRITERS[u.scheme](str(u), **options)


def storage_reader(uri: "str | os.PathLike[str]", **options: Any) -> CloudStorageReader:
    """The DCP StorageReader for ``uri``: S3 for ``s3://``, GCS for ``gs://``, local otherwise."""
    u = parse_uri(uri)
    return _READERS[u.scheme](str(u), **options)


@contextlib.contextmanager
def typed_errors(reader: CloudStorageReader | None = None) -> Iterator[None]:
    """Re-raise a DCP ``CheckpointException`` as the cloudckpt error that caused it.

    DCP wraps every rank's failure in a ``CheckpointException`` (a BaseException).
    When the root cause is a cloudckpt error (bad URI, existing checkpoint,
    missing bucket...) the lowest failing rank's error is raised instead, with
    the CheckpointException (listing every rank) chained as its cause.
    """
    try:
        yield
    except CheckpointException as exc:
        # DCP turns a missing .metadata into a generic AssertionError after also
        # trying the per-rank fallback; the reader kept the real, typed error.
        missing = getattr(reader, "metadata_error", None)
        if missing is not None:
            raise missing from exc
        for rank in sorted(exc.failures):
            err = exc.failures[rank][0]
            if isinstance(err, CloudCheckpointError):
                raise err from exc
        raise


def save(
    state_dict: dict[str, Any],
    checkpoint_id: "str | os.PathLike[str]",
    *,
    storage_writer: CloudStorageWriter | None = None,
    planner: Any = None,
    process_group: Any = None,
    no_dist: bool = False,
    **writer_options: Any,
) -> Metadata:
    """``dcp.save`` with the writer resolved from ``checkpoint_id``.

    ``writer_options`` (``overwrite=``, ``part_size=``, ``endpoint_url=`` ...) go to
    the writer. Returns the committed checkpoint's ``Metadata`` on every rank.
    """
    writer = storage_writer if storage_writer is not None else globals()["storage_writer"](checkpoint_id,
                                                                                          **writer_options)
    try:
        with typed_errors():
            return dcp.save(state_dict, checkpoint_id=str(parse_uri(checkpoint_id)), storage_writer=writer,
                            planner=planner, process_group=process_group, no_dist=no_dist)
    except BaseException:
        _abort_uncommitted(writer)
        raise


def _abort_uncommitted(writer: CloudStorageWriter) -> None:
    # A rank that died mid-upload cannot abort its multipart uploads; the
    # coordinator of the failed (uncommitted) save does it for every rank.
    if not (writer.is_coordinator and writer.use_collectives and writer.uri is not None):
        return
    from cloudckpt.transfer import abort_incomplete_uploads

    try:
        abort_incomplete_uploads(writer.store, writer.uri.key(""),
                                 unless_exists=writer.uri.key(writer._metadata_name()))  # noqa: SLF001
    except Exception:  # noqa: BLE001 - never hide the save's own error
        pass


def load(
    state_dict: dict[str, Any],
    checkpoint_id: "str | os.PathLike[str]",
    *,
    storage_reader: CloudStorageReader | None = None,
    planner: Any = None,
    process_group: Any = None,
    no_dist: bool = False,
    **reader_options: Any,
) -> None:
    """``dcp.load`` (in place into ``state_dict``) with the reader resolved from ``checkpoint_id``."""
    reader = storage_reader if storage_reader is not None else globals()["storage_reader"](checkpoint_id,
                                                                                          **reader_options)
    with typed_errors(reader):
        dcp.load(state_dict, checkpoint_id=str(parse_uri(checkpoint_id)), storage_reader=reader,
                 planner=planner, process_group=process_group, no_dist=no_dist)
