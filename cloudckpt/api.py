"""The façade: ``save``, ``load`` and ``async_save`` by URI.

The writer or reader is picked from the ``checkpoint_id``'s scheme; DCP's
``CheckpointException`` is replaced by the cloudckpt error behind it
(:func:`cloudckpt.errors.typed_errors`). ``async_save`` stages the state dict
and hands it to a reusable executor (:mod:`cloudckpt.executors`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import Metadata
from torch.distributed.checkpoint._async_executor import _AsyncCheckpointExecutor

from cloudckpt.errors import typed_errors
from cloudckpt.executors import ThreadCheckpointExecutor
from cloudckpt.reader import CheckedLoadPlanner, CloudStorageReader, reader_for
from cloudckpt.staging import Stager
from cloudckpt.transfer import abort_incomplete_uploads
from cloudckpt.uri import parse_uri
from cloudckpt.writer import CloudStorageWriter, writer_for

__all__ = ["storage_writer", "storage_reader", "save", "load", "async_save", "AsyncSaveResponse"]


def storage_writer(uri: str | os.PathLike[str], **options: Any) -> CloudStorageWriter:
    """The DCP StorageWriter for ``uri``: S3 for ``s3://``, GCS for ``gs://``, local otherwise."""
    return writer_for(uri, **options)


def storage_reader(uri: str | os.PathLike[str], **options: Any) -> CloudStorageReader:
    """The DCP StorageReader for ``uri``: S3 for ``s3://``, GCS for ``gs://``, local otherwise."""
    return reader_for(uri, **options)


def save(
    state_dict: dict[str, Any],
    checkpoint_id: str | os.PathLike[str],
    *,
    storage_writer: CloudStorageWriter | None = None,
    planner: Any = None,
    process_group: Any = None,
    no_dist: bool = False,
    **writer_options: Any,
) -> Metadata:
    """``dcp.save`` with the writer resolved from ``checkpoint_id``.

    ``writer_options`` (``overwrite=``, ``part_size=``, ``endpoint_url=`` ...) go to
    the writer when ``storage_writer`` is None. Returns the committed
    checkpoint's ``Metadata`` on every rank.
    """
    chosen = storage_writer if storage_writer is not None else writer_for(checkpoint_id, **writer_options)
    try:
        with typed_errors():
            return dcp.save(state_dict, checkpoint_id=str(parse_uri(checkpoint_id)), storage_writer=chosen,
                            planner=planner, process_group=process_group, no_dist=no_dist)
    except BaseException:
        _abort_uncommitted(chosen)
        raise


def _abort_uncommitted(writer: CloudStorageWriter) -> None:
    # A rank that died mid-upload cannot abort its multipart uploads; the
    # coordinator of the failed save aborts those of this save that it knows
    # of (by the save tokens in their names), never a concurrent save's.
    if not (writer.is_coordinator and writer.use_collectives and writer.uri is not None):
        return
    try:
        abort_incomplete_uploads(writer.store, writer.uri.key(""), tokens=writer.known_save_tokens())
    except Exception:  # noqa: BLE001 - never hide the save's own error
        pass


def load(
    state_dict: dict[str, Any],
    checkpoint_id: str | os.PathLike[str],
    *,
    storage_reader: CloudStorageReader | None = None,
    planner: Any = None,
    process_group: Any = None,
    no_dist: bool = False,
    **reader_options: Any,
) -> None:
    """``dcp.load`` (in place into ``state_dict``) with the reader resolved from ``checkpoint_id``.

    ``reader_options`` (``verify=``, ``endpoint_url=`` ...) go to the reader when
    ``storage_reader`` is None; ``allow_pickle=True`` unpickles byte items with plain pickle (trusted checkpoints only).
    """
    chosen = storage_reader if storage_reader is not None else reader_for(checkpoint_id, **reader_options)
    if process_group is not None and getattr(chosen, "process_group", None) is None:
        chosen.process_group = process_group  # reads are shared on the load's group
    with typed_errors(chosen):
        dcp.load(state_dict, checkpoint_id=str(parse_uri(checkpoint_id)), storage_reader=chosen,
                 planner=planner if planner is not None else CheckedLoadPlanner(), process_group=process_group,
                 no_dist=no_dist)


def _stateful_to_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Shallow copy with every ``Stateful`` value replaced by its ``state_dict()``, as DCP does.

    DCP's own helper logs a structured event per key (about 0.2 ms each), which
    would be paid on the training thread at every save.
    """
    from torch.distributed.checkpoint.stateful import Stateful

    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}


@dataclass(frozen=True)
class AsyncSaveResponse:
    """Like DCP's ``AsyncSaveResponse``: ``staging_completion`` (training may go on) and
    ``upload_completion`` (the committed checkpoint's ``Metadata``)."""

    staging_completion: Future
    upload_completion: Future


def async_save(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: Any,
    executor: _AsyncCheckpointExecutor | None = None,
    stager: Any = None,
    process_group: Any = None,
    storage_writer: Any = None,
    planner: Any = None,
    no_dist: bool = False,
    **writer_options: Any,
) -> AsyncSaveResponse:
    """Stage ``state_dict`` and upload it in the background.

    Training blocks only for staging (a copy into reused CPU buffers; pinned
    with CUDA, shared memory for the process executor). Pass a long-lived
    ``executor`` and ``stager`` to reuse the worker and the staging buffers
    across saves; without them both are created for this call and closed when
    its upload ends. A save through a busy executor first waits for (or, with
    ``on_busy="raise"``, refuses during) the previous upload, because that
    upload still reads the staging buffers. ``writer_options`` (``overwrite=``,
    ``endpoint_url=`` ...) configure the writer when ``storage_writer`` is None.
    Errors are those of :func:`cloudckpt.save`, raised by ``upload_completion``.
    """
    if storage_writer is not None and writer_options:
        raise TypeError(f"writer options {sorted(writer_options)} were given together with storage_writer; "
                        "configure the writer itself instead")
    uri = str(parse_uri(checkpoint_id))
    owned: list[Any] = []
    if executor is None:
        executor = ThreadCheckpointExecutor()
        owned.append(executor)
    if stager is None:
        stager = Stager(shared_memory=getattr(executor, "needs_shared_memory", False))
        owned.append(stager)
    writer = storage_writer if storage_writer is not None else writer_for(uri, **writer_options)
    staging_done: Future = Future()
    staging_done.set_running_or_notify_cancel()
    try:
        admit = getattr(executor, "_admit", None)
        if admit is not None:
            admit()  # the previous upload is done: its staging buffers may be overwritten
        staged = stager.stage(_stateful_to_state_dict(state_dict))  # on the caller's thread: it blocks training
        upload = executor.execute_save(staged, checkpoint_id=uri, storage_writer=writer, planner=planner,
                                       process_group=process_group, no_dist=no_dist)
    except BaseException:
        for obj in owned:
            obj.close()
        raise

    if isinstance(staged, Future):
        def _mirror(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                staging_done.set_exception(exc)
            else:
                staging_done.set_result(None)
        staged.add_done_callback(_mirror)
    else:
        staging_done.set_result(None)
    if owned:
        def _close_owned(_: Future) -> None:
            # Not on the worker's own thread: closing joins it (and the child).
            threading.Thread(target=lambda: [obj.close() for obj in owned], name="cloudckpt-close",
                             daemon=True).start()
        upload.add_done_callback(_close_owned)
    return AsyncSaveResponse(staging_completion=staging_done, upload_completion=upload)
