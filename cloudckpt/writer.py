"""DCP ``StorageWriter`` implementations for S3, GCS and local paths.

Protocol per save (see docs/architecture.md):

1. ``set_up_storage_writer`` (every rank, once per save): draw this save's id;
   its first hex digits are the rank's *save token*, part of every data object
   name the rank writes (``__0_3.<token>.distcp``). Two saves of one checkpoint
   therefore never write an object of the same name.
2. ``prepare_global_plan`` (rank 0, before any rank uploads a byte): check the
   bucket, refuse an existing committed checkpoint unless ``overwrite=True``,
   and give each rank its name prefix. Nothing is deleted here: an overwrite
   leaves the old checkpoint whole until its ``.metadata`` is replaced.
3. ``write_data`` (every rank): frame every item zero-copy, split the rank's
   items over data objects, upload all parts in parallel. Any failure aborts
   the rank's multipart uploads and raises; DCP's gather then fails the save on
   every rank, and ``finish`` never runs.
4. ``finish`` (rank 0, after DCP's gather proved every rank's uploads complete):
   write this save's checksum manifest (a save-unique name), then ``.metadata``
   with one PUT, conditional unless ``overwrite=True``. That PUT is the commit
   point: a checkpoint exists iff ``.metadata`` exists. A save that loses the
   race to commit deletes its own objects (every rank's, known from the write
   results) and its own manifest, never anyone else's. An overwrite deletes,
   only after its commit, what the replaced ``.metadata`` referenced and the
   new one does not.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.checkpoint import Metadata, SavePlan, SavePlanner, StorageWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from cloudckpt import crc, incremental, layout, retry, safe_pickle
from cloudckpt._version import __version__
from cloudckpt.errors import CheckpointExistsError, CloudCheckpointError, InvalidURIError, PreconditionFailedError
from cloudckpt.manifest import build_manifest, seal_manifest
from cloudckpt.store import ObjectStore, open_store
from cloudckpt.transfer import (
    CopyOutcome,
    ObjectUpload,
    TransferEngine,
    TransferOptions,
    UploadedObject,
    default_world_size,
)
from cloudckpt.uri import StorageURI, parse_uri, relative_key

__all__ = ["CloudStorageWriter", "S3StorageWriter", "GCSStorageWriter", "LocalStorageWriter", "ItemWriteInfo",
           "writer_for", "commit_metadata"]

log = logging.getLogger(__name__)
_DCP_VERSION = "1.0.0"

@dataclasses.dataclass
class _CloudStoragePrefix(_StoragePrefix):
    """``_StoragePrefix`` plus the world size, which sets each rank's share of the request rate."""

    world_size: int = 1
    #: The base facts of this rank's items (incremental saves), or None.
    base: Any = None


@dataclasses.dataclass(frozen=True)
class _SaveToken:
    """A local plan's ``storage_data``: tells the coordinator this rank's save token.

    Information only, for cleanup after a failed save (the coordinator then
    aborts a dead rank's uploads, and only this save's). Object names never
    depend on it: each rank names its objects with its own token, because DCP's
    plan caching replays the first save's plans (and then this does not arrive).
    """

    token: str


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
    #: True when the item's bytes were copied inside the store from the base checkpoint.
    copied: bool = False


class CloudStorageWriter(StorageWriter):
    """Backend-independent DCP writer; use the S3/GCS/Local subclasses or :func:`cloudckpt.storage_writer`."""

    scheme: str = ""

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        part_size: int | None = None,
        max_concurrency: int | None = None,
        target_object_size: int | None = None,
        transfer_options: TransferOptions | None = None,
        prefix_strategy: str | int = "none",
        base_checkpoint_id: str | os.PathLike[str] | None = None,
        frozen_keys: Iterable[str] | Callable[[str], bool] | None = None,
        copy_friendly_layout: bool = False,
        **store_options: Any,
    ) -> None:
        super().__init__()
        #: Incremental saves: the committed checkpoint whose unchanged items are copied
        #: server side instead of uploaded (verified first; see cloudckpt.incremental).
        self.base_checkpoint_id = None if base_checkpoint_id is None else str(base_checkpoint_id)
        #: Items named here (fqns, dotted prefixes, or a predicate) are copied from the base
        #: without being staged or checksummed; they are also kept in objects of their own.
        self.frozen_keys = None if frozen_keys is None else incremental.FrozenKeys(frozen_keys)
        #: Lay out data objects so a later save can copy unchanged items server side even on
        #: stores that copy whole objects only (GCS): every item of at least
        #: incremental.OWN_OBJECT_MIN_BYTES gets an object of its own. Set by
        #: CheckpointManager(incremental=True), whose every save may become a base; saves
        #: with a base do it anyway. No effect on stores that copy byte ranges (S3, local).
        self.copy_friendly_layout = bool(copy_friendly_layout)
        # Set by CheckpointManager(incremental=True): (root, step); the coordinator picks the
        # newest committed step under root other than step as the base, at save time.
        self._base_from_root: tuple[str, int] | None = None
        # What the coordinator decided about the base of the current save (for the manifest).
        self._base_summary: dict[str, Any] = {}
        #: This rank's latest save: bytes and items copied in the store vs uploaded.
        self.last_incremental: dict[str, Any] | None = None
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
        self.transfer_options = dataclasses.replace(opts, **overrides)  # type: ignore[arg-type]
        self.overwrite = overwrite
        self._store_options = store_options
        self._store: ObjectStore | None = None
        # torch.save framings by (dtype, shape, strides), reused within and across this writer's saves.
        self._framing = layout.FramingCache()
        self.uri: StorageURI | None = None
        #: This save's id (a fresh one per save, drawn in set_up_storage_writer); its first
        #: layout.TOKEN_CHARS hex digits are the token in this rank's data object names.
        self.save_id = uuid.uuid4().hex
        # Set by pin_save_id: the id the next saves use instead of a fresh one.
        self._pinned_save_id: str | None = None
        # Every rank's save tokens known to this rank (its own; all ranks' once finish ran).
        self._known_tokens: set[str] = set()
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
        state["_framing"] = layout.FramingCache()  # rebuilt where the writer runs
        return state

    @property
    def save_token(self) -> str:
        """The token in this rank's data object names for the current save."""
        return self.save_id[:layout.TOKEN_CHARS]

    def known_save_tokens(self) -> frozenset[str]:
        """Save tokens of the current save that this rank knows.

        Its own; on the coordinator also every rank's, from the local plans
        (unless a caching or custom planner dropped them) and from the write
        results in ``finish``. Used to clean up after a failed save without
        touching a concurrent save's objects or uploads.
        """
        return frozenset(self._known_tokens | {self.save_token})

    def pin_save_id(self, save_id: str | None) -> None:
        """Make every following save use ``save_id`` (32 hex digits) rather than a fresh id; None unpins.

        For a supervisor that must recognise this save's objects without hearing
        from the process that writes them (the process executor's parent, which
        cleans up after a dead child).
        """
        if save_id is not None and (len(save_id) != 32 or any(c not in "0123456789abcdef" for c in save_id)):
            raise ValueError(f"save_id must be 32 lowercase hex digits, got {save_id!r}")
        self._pinned_save_id = save_id
        if save_id is not None:
            self.save_id = save_id

    def metadata_name(self) -> str:
        """The commit object of this save: ``.metadata``, or ``__{rank}.metadata`` without collectives."""
        if not self.use_collectives and self.rank is not None:
            return layout.rank_metadata_name(self.rank)
        return layout.METADATA_NAME

    # -- StorageWriter API -----------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
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

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
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
        # A fresh id (and so a fresh token in every data object name) for every save. Not
        # in reset(): DCP skips reset when no checkpoint_id is passed. Not in the plan's
        # storage_data: plan caching would reuse the first save's.
        self.save_id = self._pinned_save_id or uuid.uuid4().hex
        self._known_tokens = set()
        if self.rank is None:
            import torch.distributed as dist

            self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Tell rank 0 this rank's save token; the existence check is made once, by rank 0."""
        # dataclasses.replace keeps plan-caching's usable=False plans intact.
        return dataclasses.replace(plan, storage_data=_SaveToken(self.save_token))

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
        # Every rank's token, as far as the planner passed them on (see _SaveToken).
        self._known_tokens |= {p.storage_data.token for p in plans if isinstance(p.storage_data, _SaveToken)}
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
            # An overwrite deletes nothing here: the new objects get new names, so the
            # old checkpoint stays whole and loadable until finish() replaces .metadata.
        # dataclasses.replace keeps plan-caching's usable=False plans intact.
        # Without collectives each rank plans alone: its own rank names its objects.
        alone = len(plans) == 1 and not self.use_collectives
        world = default_world_size() if alone else len(plans)
        base = self._open_base()
        return [dataclasses.replace(p, storage_data=_CloudStoragePrefix(
            layout.rank_prefix((self.rank or 0) if alone else i, self.prefix_strategy), world_size=world,
            base=None if base is None else base.slice_for(p.items)))
            for i, p in enumerate(plans)]

    def _base_id(self) -> str | None:
        """The base checkpoint of this save: the explicit one, or the manager's newest committed step."""
        if self.base_checkpoint_id is not None:
            return self.base_checkpoint_id
        if self._base_from_root is None:
            return None
        from cloudckpt.manager import committed_steps

        root, step = self._base_from_root
        root_uri = parse_uri(root)
        found = committed_steps(self.store, root_uri)
        older = [s for s in found if s < step] or [s for s in found if s != step]
        return str(found[max(older)]) if older else None

    def _open_base(self) -> incremental.BaseCheckpoint | None:
        """Coordinator: open and verify the base; None (and a warning) if there is none or it is unusable."""
        self._base_summary = {}
        base_id = self._base_id()
        if base_id is None:
            return None
        try:
            base = incremental.open_base(self.store, self._require_uri(), base_id)
        except incremental.BaseRejected as exc:
            log.warning("cloudckpt: not using %s as the base of %s, every item is uploaded: %s",
                        base_id, self.uri, exc)
            self._base_summary = {"base_rejected": str(exc)}
            return None
        self._base_summary = {"base": str(base.uri), "base_save_id": base.save_id}
        return base

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Upload this rank's items; the returned future is complete (or failed) on return."""
        fut: Future[list[WriteResult]] = Future()
        try:
            fut.set_result(self._write(plan, planner))
        except BaseException as exc:  # noqa: BLE001 - handed to DCP, which re-raises on every rank
            fut.set_exception(exc)  # type: ignore[arg-type]  # torch Future takes any exception
        return fut

    def _write(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        uri = self._require_uri()
        prefix = plan.storage_data.prefix if isinstance(plan.storage_data, _StoragePrefix) else \
            layout.rank_prefix(self.rank or 0, self.prefix_strategy)
        base = getattr(plan.storage_data, "base", None)
        base = base if isinstance(base, incremental.BaseSlice) else None
        # Items to upload, in two classes kept in separate objects: "changed" (new or
        # different from the base) and "stable" (frozen, or unchanged but not copyable),
        # so the next incremental save finds whole unchanged objects.
        changed: list[layout.FramedItem] = []
        stable: list[layout.FramedItem] = []
        candidates: list[tuple[Any, incremental.BaseItem]] = []  # unchanged: copy from the base
        framed: dict[Any, layout.FramedItem] = {}
        with layout.crc_disabled():
            for item in plan.items:
                bi = base.items.get(item.index) if base is not None else None
                frozen = self.frozen_keys is not None and item.type != WriteItemType.BYTE_IO \
                    and self.frozen_keys(item.index.fqn)
                if bi is not None and frozen and bi.compatible:
                    candidates.append((item.index, bi))  # the base manifest's CRC vouches: not staged
                    continue
                fi = self._frame(item, planner)
                if bi is not None and fi.size == bi.length and _item_crc32c(fi) == bi.crc32c:
                    framed[item.index] = fi
                    candidates.append((item.index, bi))
                    continue
                (stable if frozen else changed).append(fi)
        world = getattr(plan.storage_data, "world_size", None) or default_world_size()
        engine = TransferEngine(self.store, self.transfer_options, world_size=world)
        copies: list[Any] = []
        placements: list[incremental.CopyPlacement] = []
        outcome = CopyOutcome()
        if candidates and base is not None:
            copies, placements, fallback = incremental.plan_copies(
                candidates, base, self.store, lambda n: uri.key(layout.data_object_name(prefix, n, self.save_token)))
            try:
                outcome = engine.copy(copies, deadline=self._save_deadline())
            finally:
                self.last_transfer_stats = engine.stats.as_dict()
            for key, why in outcome.failed.items():
                log.warning("cloudckpt: server-side copy to %s failed (%s); uploading its items instead",
                            self.store.url(key), why)
            failed = {n for n, c in enumerate(copies) if c.key in outcome.failed}
            fallback += [(p.index, p.base) for p in placements if p.copy in failed]
            placements = [p for p in placements if p.copy not in failed]
            if fallback:
                by_index = {item.index: item for item in plan.items}
                with layout.crc_disabled():
                    for index, _ in fallback:
                        stable.append(framed.get(index) or self._frame(by_index[index], planner))
        framed.clear()
        try:
            results = self._upload_items(uri, prefix, len(copies), changed, stable, engine,
                                         own_objects=self._own_objects_layout())
        except BaseException:
            self._discard([relative_key(uri, o.key) for o in outcome.done])
            raise
        done = {o.key: o for o in outcome.done}
        for p in placements:
            obj = done[copies[p.copy].key]
            name = relative_key(uri, obj.key)
            info = ItemWriteInfo(
                storage=_StorageInfo(relative_path=name, offset=p.offset, length=p.base.length),
                crc32c=p.base.crc32c, payload_offset=p.base.payload_offset, payload_crc32c=p.base.payload_crc32c,
                object_size=obj.size, object_crc32c=obj.crc32c, copied=True)
            results.append(WriteResult(index=p.index, size_in_bytes=p.base.length, storage_data=info))
        copied = sum(p.base.length for p in placements)
        self.last_incremental = {
            "base": None if base is None else base.uri,
            "copied_bytes": copied, "copied_items": len(placements), "copy_objects": len(outcome.done),
            "uploaded_bytes": sum(wr.size_in_bytes for wr in results) - copied,
            "uploaded_items": len(results) - len(placements), "copy_fallbacks": len(outcome.failed),
        }
        return results

    def _frame(self, item: Any, planner: SavePlanner) -> layout.FramedItem:
        """Stage one item for upload: its torch.save framing around a zero-copy payload view."""
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            assert isinstance(data, io.BytesIO)
            return layout.frame_bytes(item.index, data.getbuffer())
        assert isinstance(data, torch.Tensor)
        return layout.frame_tensor(item.index, data, self._framing)

    def _own_objects_layout(self) -> bool:
        """Whether large items get objects of their own: a store that copies whole objects only
        (GCS), and a save that may become a base (manager) or has one (a later save copies from it)."""
        if self.store.server_side_range_copy:
            return False  # S3 and local copy byte ranges: the usual packing copies just as well
        return self.copy_friendly_layout or self.base_checkpoint_id is not None or self._base_from_root is not None

    def _upload_items(self, uri: StorageURI, prefix: str, first: int, changed: list[layout.FramedItem],
                      stable: list[layout.FramedItem], engine: TransferEngine, *,
                      own_objects: bool = False) -> list[WriteResult]:
        """Upload the items (changed and stable ones in separate objects, numbered from ``first``).

        With ``own_objects`` every item of at least :data:`incremental.OWN_OBJECT_MIN_BYTES`
        is an object of its own (see :meth:`_own_objects_layout`).
        """
        groups = [g for cls in (changed, stable) if cls for g in self._group_into_objects(cls, own_objects)]
        if not groups and first == 0:
            groups = [[]]  # a rank without items still writes its (empty) object, as before
        uploads = []
        placements = []  # (item, object name, offset)
        for n, group in enumerate(groups, start=first):
            name = layout.data_object_name(prefix, n, self.save_token)
            segments: list[Any] = []
            offset = 0
            for fi in group:
                placements.append((fi, name, offset))
                segments.extend(fi.segments)
                offset += fi.size
            uploads.append(ObjectUpload(uri.key(name), segments, offset))
        done: dict[str, UploadedObject] = {}
        if uploads:
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

    def _group_into_objects(self, items: list[layout.FramedItem],
                            own_objects: bool = False) -> list[list[layout.FramedItem]]:
        # Byte items first (as FileSystemWriter does), then tensors largest first,
        # each object filled up to the target size so no single object serialises
        # a rank's upload.
        target = self.transfer_options.target_object_size
        ordered = [i for i in items if i.payload_offset is None and i.payload_nbytes == 0] + sorted(
            (i for i in items if not (i.payload_offset is None and i.payload_nbytes == 0)),
            key=lambda i: -i.size,
        )
        singles: list[list[layout.FramedItem]] = []
        if own_objects:
            # Whole-object copies only (GCS): each large item alone, so when it is unchanged
            # at the next save its object is copied whole; small items stay packed together
            # (an object per tiny item would cost a request each for little gain).
            singles = [[fi] for fi in ordered if fi.size >= incremental.OWN_OBJECT_MIN_BYTES]
            ordered = [fi for fi in ordered if fi.size < incremental.OWN_OBJECT_MIN_BYTES]
        groups: list[list[layout.FramedItem]] = []
        size = 0
        for fi in ordered:
            if not groups or (size + fi.size > target and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(fi)
            size += fi.size
        return singles + groups or [[]]

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
        copied = uploaded = 0
        for rank_results in results:
            for wr in rank_results:
                info = wr.storage_data
                if isinstance(info, ItemWriteInfo):
                    if info.copied:
                        copied += info.storage.length
                    else:
                        uploaded += info.storage.length
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
            save_id=self.save_id, world_size=len(results), objects=objects, items=items,
            extra={"transfer": {"uploaded_bytes": uploaded, "copied_bytes": copied, **self._base_summary}})
        rank = None if self.metadata_name() == layout.METADATA_NAME else self.rank
        manifest_name = layout.manifest_name(self.save_id, rank)
        self._known_tokens |= {t for t in (_token_of(n) for n in objects) if t is not None}
        # Everything this save wrote, all ranks together: the only objects it may ever delete.
        own = sorted(objects) + [manifest_name]
        blob = seal_manifest(manifest)
        try:
            store.put(uri.key(manifest_name), [blob], crc32c=crc.crc32c(blob))
            replaced = self._replaced_names(rank, keep=set(own)) if self.overwrite else set()
        except BaseException:
            self._discard(own)  # nothing references them: no commit was attempted
            raise
        try:
            self._commit(meta_blob)
        except CheckpointExistsError:
            # Lost the race: another save committed. Its objects have other names
            # (other tokens, another manifest); remove only ours.
            self._discard(own)
            raise
        if replaced:
            # After the commit: the replaced .metadata no longer points at them.
            self._discard(sorted(replaced))

    def _commit(self, blob: bytes) -> None:
        commit_metadata(self.store, self._require_uri(), blob, name=self.metadata_name(), overwrite=self.overwrite)

    def _replaced_names(self, rank: int | None, keep: set[str]) -> set[str]:
        """Objects of the checkpoint this overwrite replaces: what its ``.metadata`` references, and its manifest.

        Read just before the commit. Only names the old ``.metadata`` itself
        lists are returned (never "everything not referenced by the new one",
        which could include a concurrent save's objects), and only plain
        checkpoint object names inside the prefix: the old ``.metadata`` is
        untrusted input. An unreadable old ``.metadata`` deletes nothing.
        """
        uri = self._require_uri()
        key = uri.key(self.metadata_name())
        try:
            old_blob = self.store.get(key, max_size=safe_pickle.MAX_METADATA_BYTES)
        except FileNotFoundError:
            return set()
        except CloudCheckpointError as exc:
            log.warning("could not read the replaced checkpoint's metadata %s (%s); its objects are left in place",
                        self.store.url(key), exc)
            return set()
        try:
            old = safe_pickle.load_metadata(old_blob, self.store.url(key))
            names = {getattr(info, "relative_path", None) for info in dict(old.storage_data).values()}
            save_id = getattr(getattr(old, "storage_meta", None), "save_id", None)
        except (CloudCheckpointError, AttributeError, TypeError, ValueError) as exc:
            log.warning("the replaced checkpoint's metadata %s is unreadable (%s); its objects are left in place",
                        self.store.url(key), exc)
            return set()
        if isinstance(save_id, str):
            names.add(layout.manifest_name(save_id, rank))
        names.add(layout.manifest_name(None, rank))  # the legacy manifest: no current save writes it
        return {n for n in names if isinstance(n, str) and _is_own_object_name(n) and n not in keep}

    def _discard(self, names: list[str]) -> None:
        """Best-effort delete of objects of this checkpoint; never raises (the save's own error wins)."""
        if not names:
            return
        uri = self._require_uri()
        with retry.use_scope(retry.RetryScope(deadline=time.monotonic() + self.transfer_options.cleanup_timeout)):
            try:
                self.store.delete_many([uri.key(n) for n in names])
            except Exception as exc:  # noqa: BLE001 - leftovers are found by gc; the original error matters
                log.warning("could not delete %d object(s) of %s: %s", len(names), uri, exc)


def _item_crc32c(fi: layout.FramedItem) -> int:
    """CRC32C of a framed item's bytes (its segments back to back), computed without joining them."""
    value = 0
    for seg in fi.segments:
        value = crc.crc32c_extend(value, seg)
    return value


def _token_of(name: str) -> str | None:
    parsed = layout.parse_data_object_name(name)
    return None if parsed is None else parsed[2]


def _is_own_object_name(name: str) -> bool:
    """A data object or manifest name directly inside the checkpoint prefix (no path, no commit object)."""
    return ("/" not in name and "\\" not in name and not layout.is_commit_name(name)
            and (layout.is_manifest_name(name) or layout.parse_data_object_name(name) is not None))


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
        checkpoint_id: str | os.PathLike[str] | None = None,
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
        checkpoint_id: str | os.PathLike[str] | None = None,
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


def writer_for(uri: str | os.PathLike[str] | StorageURI, **options: Any) -> CloudStorageWriter:
    """The DCP StorageWriter for ``uri``: S3 for ``s3://``, GCS for ``gs://``, local otherwise."""
    u = parse_uri(uri)
    return _WRITERS[u.scheme](str(u), **options)
