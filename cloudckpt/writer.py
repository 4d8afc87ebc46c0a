"""DCP ``StorageWriter`` implementations for S3, GCS and local paths.

Protocol per save (see docs/architecture.md):

1. ``prepare_global_plan`` (rank 0, before any rank uploads a byte): check the
   bucket, refuse an existing committed checkpoint unless ``overwrite=True``
   (in which case its ``.metadata`` is removed first, so a half-replaced
   checkpoint can never look committed), and give each rank its file prefix.
2. ``write_data`` (every rank): frame every item zero-copy, split the rank's
   items over data objects, upload all parts in parallel. Any failure aborts
   the rank's multipart uploads and raises; DCP's gather then fails the save on
   every rank, and ``finish`` never runs.
3. ``finish`` (rank 0, after DCP's gather proved every rank's uploads complete):
   write the checksum manifest, then ``.metadata`` with one conditional PUT.
   That PUT is the commit point: a checkpoint exists iff ``.metadata`` exists.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import time
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint import Metadata, SavePlan, SavePlanner, StorageWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from cloudckpt import crc, layout, retry
from cloudckpt._version import __version__
from cloudckpt.errors import CheckpointExistsError, InvalidURIError, PreconditionFailedError
from cloudckpt.manifest import build_manifest, seal_manifest
from cloudckpt.store import ObjectStore, open_store
from cloudckpt.transfer import ObjectUpload, TransferEngine, TransferOptions, default_world_size
from cloudckpt.uri import StorageURI, parse_uri

__all__ = ["CloudStorageWriter", "S3StorageWriter", "GCSStorageWriter", "LocalStorageWriter", "ItemWriteInfo",
           "writer_for", "commit_metadata"]

log = logging.getLogger(__name__)
_DCP_VERSION = "1.0.0"

@dataclasses.dataclass
class _CloudStoragePrefix(_StoragePrefix):
    """``_StoragePrefix`` plus the world size, which sets each rank's share of the request rate."""

    world_size: int = 1


@dataclasses.dataclass(frozen=True)
class ItemWriteInfo:
    """``WriteResult.storage_data`` as it travels to rank 0.

    ``finish`` turns ``storage`` into the stock ``_StorageInfo`` stored in
    ``.metadata`` and the checksums into the manifest, so ``.metadata`` only
    references torch classes and loads with the stock FileSystemReader.
    """

    storage: _StorageInfo
    crc32c: int
    payload_offset: int | None
    payload_crc32c: int | None
    object_size: int
    object_crc32c: int


class CloudStorageWriter(StorageWriter):
    """Backend-independent DCP writer; use the S3/GCS/Local subclasses or :func:`cloudckpt.storage_writer`."""

    scheme: str = ""

    def __init__(
        self,
        checkpoint_id: "str | os.PathLike[str] | None" = None,
        *,
        overwrite: bool = False,
        part_size: int | None = None,
        max_concurrency: int | None = None,
        target_object_size: int | None = None,
        transfer_options: TransferOptions | None = None,
        prefix_strategy: "str | int" = "none",
        **store_options: Any,
    ) -> None:
        super().__init__()
        layout.check_prefix_strategy(prefix_strategy)
        #: How data objects are spread over key prefixes (see :func:`cloudckpt.layout.rank_prefix`, docs/scale.md).
        self.prefix_strategy = prefix_strategy
        #: Pacing of this rank's latest upload (world size, rate, ramp, request budget, part size).
        self.last_pacing: Any = None
        #: Retry/AIMD counters of this rank's latest upload (RetryStats.as_dict()).
        self.last_transfer_stats: dict[str, Any] | None = None
        # Set by set_up_storage_writer, which DCP calls first in every save.
        self._save_started: float | None = None
        opts = transfer_options or TransferOptions()
        overrides = {k: v for k, v in (("part_size", part_size), ("max_concurrency", max_concurrency),
                                       ("target_object_size", target_object_size)) if v is not None}
        self.transfer_options = dataclasses.replace(opts, **overrides)
        self.overwrite = overwrite
        self._store_options = store_options
        self._store: ObjectStore | None = None
        self.uri: StorageURI | None = None
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = False
        self.rank: int | None = None
        self.use_collectives = True
        if checkpoint_id is not None:
            self.reset(checkpoint_id)

    def __repr__(self) -> str:
        # Store options may hold credentials: never show them.
        return f"{type(self).__name__}({str(self.uri) if self.uri else None!r}, overwrite={self.overwrite})"

    # -- helpers -------------------------------------------------------------------
    @property
    def store(self) -> ObjectStore:
        """The object store of the current checkpoint (created lazily, not pickled)."""
        if self._store is None:
            self._store = open_store(self._require_uri(), **self._store_options)
        return self._store

    def _require_uri(self) -> StorageURI:
        if self.uri is None:
            raise InvalidURIError(f"{type(self).__name__} has no checkpoint_id; pass checkpoint_id=... to save()")
        return self.uri

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    def metadata_name(self) -> str:
        """The commit object of this save: ``.metadata``, or ``__{rank}.metadata`` without collectives."""
        if not self.use_collectives and self.rank is not None:
            return layout.rank_metadata_name(self.rank)
        return layout.METADATA_NAME

    # -- StorageWriter API -----------------------------------------------------------
    def reset(self, checkpoint_id: "str | os.PathLike[str] | None" = None) -> None:
        """Point the writer at a new checkpoint (DCP calls this once per save)."""
        if checkpoint_id is not None:
            uri = parse_uri(checkpoint_id)
            if self.scheme and uri.scheme != self.scheme:
                raise InvalidURIError(
                    f"{type(self).__name__} writes {self.scheme}:// checkpoints, got {str(uri)!r}; "
                    "use cloudckpt.storage_writer(uri) to pick the right writer"
                )
            if self.uri is None or uri.bucket != self.uri.bucket or uri.scheme != self.uri.scheme:
                self._store = None
            self.uri = uri
        self.save_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: "str | os.PathLike[str]") -> bool:
        """True if ``checkpoint_id`` parses and matches this writer's scheme."""
        try:
            uri = parse_uri(checkpoint_id)
        except InvalidURIError:
            return False
        return not cls.scheme or uri.scheme == cls.scheme

    def storage_meta(self) -> StorageMeta | None:
        """Identifies this save; cheap and collective-free (DCP calls it on every rank)."""
        return StorageMeta(checkpoint_id=str(self.uri) if self.uri else None, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Record rank and coordinator role (``kwargs`` is how DCP >= 2.9 passes ``rank``)."""
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank", self.rank)
        self.use_collectives = kwargs.get("use_collectives", True)
        # DCP calls this first in every save: TransferOptions.save_deadline counts from here.
        self._save_started = time.monotonic()
        if self.rank is None:
            import torch.distributed as dist

            self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Nothing per rank: the existence check is made once, by rank 0."""
        return plan

    def _save_deadline(self) -> float | None:
        """The ``time.monotonic()`` instant this save must end by (None: no deadline)."""
        limit = self.transfer_options.save_deadline
        started = self._save_started
        return None if limit is None or started is None else started + limit

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Rank 0, before any upload: check the target and assign per-rank prefixes."""
        with retry.use_scope(retry.RetryScope(deadline=self._save_deadline())):
            return self._prepare_global_plan(plans)

    def _prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        uri = self._require_uri()
        store = self.store
        store.check_bucket()
        meta_key = uri.key(self.metadata_name())
        if store.head(meta_key) is not None:
            if not self.overwrite:
                raise CheckpointExistsError(
                    f"a committed checkpoint already exists at {uri} ({store.url(meta_key)}); "
                    "save to a new checkpoint_id, delete it first (cloudckpt rm), or pass overwrite=True"
                )
            # Un-commit first: a failure after this leaves *no* checkpoint rather than
            # an old .metadata pointing at partly replaced data objects.
            store.delete(meta_key)
        # dataclasses.replace keeps plan-caching's usable=False plans intact.
        # Without collectives each rank plans alone: its own rank names its objects.
        alone = len(plans) == 1 and not self.use_collectives
        world = default_world_size() if alone else len(plans)
        return [dataclasses.replace(p, storage_data=_CloudStoragePrefix(
            layout.rank_prefix((self.rank or 0) if alone else i, self.prefix_strategy), world_size=world))
            for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Upload this rank's items; the returned future is complete (or failed) on return."""
        fut: Future[list[WriteResult]] = Future()
        try:
            fut.set_result(self._write(plan, planner))
        except BaseException as exc:  # noqa: BLE001 - handed to DCP, which re-raises on every rank
            fut.set_exception(exc)
        return fut

    def _write(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        uri = self._require_uri()
        prefix = plan.storage_data.prefix if isinstance(plan.storage_data, _StoragePrefix) else \
            layout.rank_prefix(self.rank or 0, self.prefix_strategy)
        with layout.crc_disabled():
            framed = []
            for item in plan.items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    framed.append(layout.frame_bytes(item.index, data.getbuffer()))
                else:
                    framed.append(layout.frame_tensor(item.index, data))
        groups = self._group_into_objects(framed)
        uploads = []
        placements = []  # (item, object name, offset)
        for n, group in enumerate(groups):
            name = layout.data_object_name(prefix, n)
            segments: list[Any] = []
            offset = 0
            for fi in group:
                placements.append((fi, name, offset))
                segments.extend(fi.segments)
                offset += fi.size
            uploads.append(ObjectUpload(uri.key(name), segments, offset))
        world = getattr(plan.storage_data, "world_size", None) or default_world_size()
        engine = TransferEngine(self.store, self.transfer_options, world_size=world)
        try:
            done = {u.key: u for u in engine.upload(uploads, deadline=self._save_deadline())}
        finally:
            self.last_pacing = engine.pacing
            self.last_transfer_stats = engine.stats.as_dict()
        results = []
        for fi, name, offset in placements:
            obj = done[uri.key(name)]
            info = ItemWriteInfo(
                storage=_StorageInfo(relative_path=name, offset=offset, length=fi.size),
                crc32c=obj.span_crc32c(offset, fi.size),
                payload_offset=fi.payload_offset,
                payload_crc32c=None if fi.payload_offset is None else obj.span_crc32c(
                    offset + fi.payload_offset, fi.payload_nbytes),
                object_size=obj.size,
                object_crc32c=obj.crc32c,
            )
            results.append(WriteResult(index=fi.index, size_in_bytes=fi.size, storage_data=info))
        return results

    def _group_into_objects(self, items: list[layout.FramedItem]) -> list[list[layout.FramedItem]]:
        # Byte items first (as FileSystemWriter does), then tensors largest first,
        # each object filled up to the target size so no single object serialises
        # a rank's upload.
        target = self.transfer_options.target_object_size
        ordered = [i for i in items if i.payload_offset is None and i.payload_nbytes == 0] + sorted(
            (i for i in items if not (i.payload_offset is None and i.payload_nbytes == 0)),
            key=lambda i: -i.size,
        )
        groups: list[list[layout.FramedItem]] = []
        size = 0
        for fi in ordered:
            if not groups or (size + fi.size > target and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(fi)
            size += fi.size
        return groups or [[]]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Rank 0 (or every rank without collectives): write the manifest, then commit ``.metadata``."""
        with retry.use_scope(retry.RetryScope(deadline=self._save_deadline())):
            self._finish(metadata, results)

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        uri = self._require_uri()
        store = self.store
        storage_data = {}
        objects: dict[str, dict[str, int]] = {}
        items: dict[str, list[list[int | None]]] = {}
        for rank_results in results:
            for wr in rank_results:
                info = wr.storage_data
                if isinstance(info, ItemWriteInfo):
                    storage_data[wr.index] = info.storage
                    name = info.storage.relative_path
                    objects[name] = {"size": info.object_size, "crc32c": info.object_crc32c}
                    items.setdefault(name, []).append(
                        [info.storage.offset, info.storage.length, info.crc32c, info.payload_offset,
                         info.payload_crc32c])
                else:
                    storage_data[wr.index] = info
        metadata.storage_data = storage_data
        metadata.storage_meta = self.storage_meta()
        if hasattr(metadata, "version"):
            metadata.version = _DCP_VERSION
        buf = io.BytesIO()
        pickle.dump(metadata, buf)
        meta_blob = buf.getvalue()
        manifest = build_manifest(
            metadata_crc32c=crc.crc32c(meta_blob), writer=f"cloudckpt {__version__}", torch_version=torch.__version__,
            save_id=self.save_id, world_size=len(results), objects=objects, items=items)
        rank = None if self.metadata_name() == layout.METADATA_NAME else self.rank
        manifest_name = layout.manifest_name(self.save_id, rank)
        blob = seal_manifest(manifest)
        store.put(uri.key(manifest_name), [blob], crc32c=crc.crc32c(blob))
        self._commit(meta_blob)
        if self.overwrite:
            self._remove_stale(set(objects) | {layout.METADATA_NAME, manifest_name})

    def _commit(self, blob: bytes) -> None:
        commit_metadata(self.store, self._require_uri(), blob, name=self.metadata_name(), overwrite=self.overwrite)

    def _remove_stale(self, keep: set[str]) -> None:
        # After an overwrite, data objects of the replaced checkpoint that the new
        # one does not reference (e.g. a larger old world size) are deleted.
        uri = self._require_uri()
        base = uri.key("")
        stale = [
            o.key for o in self.store.list(base)
            if "/" not in o.key[len(base):] and o.key[len(base):] not in keep
            and o.key.endswith(layout.DATA_SUFFIX)
        ]
        if stale:
            self.store.delete_many(stale)


def commit_metadata(store: ObjectStore, uri: StorageURI, blob: bytes, *, name: str = layout.METADATA_NAME,
                    overwrite: bool = False) -> None:
    """The commit point of a checkpoint: one PUT of its ``.metadata`` (or ``name``).

    Conditional (create-only) unless ``overwrite``, so of two saves racing to
    commit the same checkpoint exactly one wins; the other gets
    CheckpointExistsError and nothing is overwritten. Tolerant of a lost reply:
    if the conditional PUT is refused because our own earlier attempt landed,
    the stored bytes are ours (``.metadata`` holds this save's id), and that is
    a success. Used by every writer and by ``cloudckpt cp``.
    """
    key = uri.key(name)
    try:
        store.put(key, [blob], crc32c=crc.crc32c(blob), if_absent=not overwrite)
    except PreconditionFailedError:
        try:
            if store.get(key, max_size=len(blob)) == blob:
                return
        except Exception:  # noqa: BLE001 - fall through to the clear error below
            pass
        raise CheckpointExistsError(
            f"another writer committed {uri} while this save was running ({store.url(key)}); "
            "nothing was overwritten. Save to a new checkpoint_id or pass overwrite=True"
        ) from None


class S3StorageWriter(CloudStorageWriter):
    """Write DCP checkpoints to ``s3://bucket/prefix``.

    ``endpoint_url``/``region`` and any boto3 client options (credentials,
    ``config=``, ``profile_name=``) configure the client; the standard boto3
    credential chain and ``AWS_ENDPOINT_URL(_S3)`` apply otherwise.
    """

    scheme = "s3"

    def __init__(
        self,
        checkpoint_id: "str | os.PathLike[str] | None" = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int | None = None,
        max_concurrency: int | None = None,
        overwrite: bool = False,
        target_object_size: int | None = None,
        transfer_options: TransferOptions | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__(
            checkpoint_id,
            overwrite=overwrite,
            part_size=part_size,
            max_concurrency=max_concurrency,
            target_object_size=target_object_size,
            transfer_options=transfer_options,
            endpoint_url=endpoint_url,
            region=region,
            **client_options,
        )


class GCSStorageWriter(CloudStorageWriter):
    """Write DCP checkpoints to ``gs://bucket/prefix`` (Application Default Credentials)."""

    scheme = "gs"

    def __init__(
        self,
        checkpoint_id: "str | os.PathLike[str] | None" = None,
        *,
        client: Any = None,
        project: str | None = None,
        part_size: int | None = None,
        max_concurrency: int | None = None,
        overwrite: bool = False,
        target_object_size: int | None = None,
        transfer_options: TransferOptions | None = None,
        **store_options: Any,
    ) -> None:
        if client is not None:
            store_options["client"] = client
        if project is not None:
            store_options["project"] = project
        super().__init__(
            checkpoint_id,
            overwrite=overwrite,
            part_size=part_size,
            max_concurrency=max_concurrency,
            target_object_size=target_object_size,
            transfer_options=transfer_options,
            **store_options,
        )


class LocalStorageWriter(CloudStorageWriter):
    """Write DCP checkpoints to a local directory with the same protocol and checksums."""

    scheme = "file"


_WRITERS: dict[str, type[CloudStorageWriter]] = {
    "s3": S3StorageWriter,
    "gs": GCSStorageWriter,
    "file": LocalStorageWriter,
}


def writer_for(uri: "str | os.PathLike[str] | StorageURI", **options: Any) -> CloudStorageWriter:
    """The DCP StorageWriter for ``uri``: S3 for ``s3://``, GCS for ``gs://``, local otherwise."""
    u = parse_uri(uri)
    return _WRITERS[u.scheme](str(u), **options)
