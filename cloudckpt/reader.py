"""DCP ``StorageReader`` implementations for S3, GCS and local paths.

Loads are planned per object: every read item becomes a byte range, ranges
close together are coalesced, and the merged ranges are fetched in parallel
on one bounded pool. Tensor payloads are copied once, from the downloaded bytes
(or straight from the socket when the target tensor is the whole stored chunk)
into the target tensor; records that are not plain dense tensors go through
the restricted loader of :mod:`cloudckpt.safe_pickle`.

Everything read is untrusted. Byte items (pickled non-tensor values) are loaded
with the restricted unpickler unless ``allow_pickle=True``, so loading never
runs code; every ``relative_path`` must name an object inside the checkpoint;
every object the plan touches is HEADed once, and no item may claim bytes past
its object's real end, so a forged length never sizes an allocation; a key
stored as bytes never replaces a tensor the caller holds (nor the reverse).

In a multi-rank load the coordinator gives every byte range the job needs to
exactly one reading rank (:mod:`cloudckpt.read_sharing`); ranks fetch their
pieces and send them to the other ranks that need them, so a replicated state
is fetched from the store once per job, not once per rank. Loads into CUDA
tensors go through reused pinned host buffers and non-blocking copies on a
side stream.

When the checkpoint was written by cloudckpt, the manifest gives each item's
payload offset and CRC32C, so a resharded load fetches only the rows it needs
and whole-payload reads are verified.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import math
import os
import uuid
import warnings
from collections import defaultdict, deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, LoadPlan, LoadPlanner, Metadata, StorageReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem
from torch.futures import Future

from cloudckpt import crc, layout, safe_pickle, transforms
from cloudckpt.errors import (
    CheckpointNotFoundError,
    CloudCheckpointError,
    IntegrityError,
    InvalidURIError,
    ItemKindMismatchError,
    ObjectNotFoundError,
    PeerReadError,
    UnsafePathError,
)
from cloudckpt.manifest import ItemFacts, Manifest, check_metadata_bytes, find_manifest
from cloudckpt.read_sharing import SharePlan, find_span, merge_ranges, plan_sharing
from cloudckpt.safe_pickle import MAX_METADATA_BYTES, load_metadata
from cloudckpt.store import ObjectStore, open_store
from cloudckpt.transfer import TransferEngine, TransferOptions, default_world_size
from cloudckpt.uri import StorageURI, parse_uri

__all__ = ["CloudStorageReader", "S3StorageReader", "GCSStorageReader", "LocalStorageReader", "reader_for",
           "CheckedLoadPlanner"]

#: The smallest piece a large range read is cut into to keep every connection busy: at
#: ~30 ms first-byte latency and ~100 MB/s per connection, smaller pieces waste the link.
MIN_SPLIT_READ = 8 * 1024 * 1024


def writable_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class CloudStorageReader(StorageReader):
    """Backend-independent DCP reader; use the S3/GCS/Local subclasses or :func:`cloudckpt.storage_reader`."""

    scheme: str = ""

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        max_concurrency: int | None = None,
        read_gap_threshold: int | None = None,
        transfer_options: TransferOptions | None = None,
        verify: bool = True,
        allow_pickle: bool = False,
        share_reads: bool | None = None,
        process_group: Any = None,
        **store_options: Any,
    ) -> None:
        super().__init__()
        opts = transfer_options or TransferOptions()
        overrides = {k: v for k, v in (("max_concurrency", max_concurrency),
                                       ("read_gap_threshold", read_gap_threshold)) if v is not None}
        self.transfer_options = dataclasses.replace(opts, **overrides)  # type: ignore[arg-type]
        self.verify = verify
        #: Unpickle byte items with plain pickle (runs whatever code they name): trusted checkpoints only.
        self.allow_pickle = allow_pickle
        #: Read each byte range once per job and share it over the process group
        #: (None: for S3 and GCS, not for local paths; False: every rank reads its own items).
        self.share_reads = share_reads
        #: The load's process group (None: the default group); reads are shared on it.
        self.process_group = process_group
        self._store_options = store_options
        self._store: ObjectStore | None = None
        self.uri: StorageURI | None = None
        self.metadata: Metadata | None = None
        self._facts: dict[tuple[str, int], ItemFacts] = {}
        self.is_coordinator = False
        if checkpoint_id is not None:
            self.reset(checkpoint_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.uri) if self.uri else None!r})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None
        state["process_group"] = None  # a live group does not travel to another process
        return state

    @property
    def store(self) -> ObjectStore:
        """The object store of the current checkpoint (created lazily, not pickled)."""
        if self._store is None:
            if self.uri is None:
                raise InvalidURIError(f"{type(self).__name__} has no checkpoint_id; pass checkpoint_id=... to load()")
            self._store = open_store(self.uri, **self._store_options)
        return self._store

    # -- StorageReader API --------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Point the reader at a checkpoint."""
        if checkpoint_id is not None:
            uri = parse_uri(checkpoint_id)
            if self.scheme and uri.scheme != self.scheme:
                raise InvalidURIError(
                    f"{type(self).__name__} reads {self.scheme}:// checkpoints, got {str(uri)!r}; "
                    "use cloudckpt.storage_reader(uri) to pick the right reader"
                )
            if self.uri is None or (uri.scheme, uri.bucket) != (self.uri.scheme, self.uri.bucket):
                self._store = None
            self.uri = uri
        self.metadata = None
        self.metadata_error: Exception | None = None
        self._facts = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """True if ``checkpoint_id`` parses and matches this reader's scheme."""
        try:
            uri = parse_uri(checkpoint_id)
        except InvalidURIError:
            return False
        return not cls.scheme or uri.scheme == cls.scheme

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Fetch and safely unpickle ``.metadata`` (``__{rank}.metadata`` when DCP passes ``rank``)."""
        assert self.uri is not None, "reset(checkpoint_id) first"
        rank = kwargs.get("rank")
        name = layout.METADATA_NAME if rank is None else layout.rank_metadata_name(rank)
        key = self.uri.key(name)
        try:
            try:
                blob = self.store.get(key, max_size=MAX_METADATA_BYTES)
            except ObjectNotFoundError:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint at {self.uri}: {self.store.url(key)} does not exist. "
                    "The save may have failed or still be running; list checkpoints with `cloudckpt ls`"
                ) from None
            # The manifest first: it holds .metadata's CRC32C, checked before unpickling.
            manifest = self._load_manifest(blob, rank)
            if self.verify:
                check_metadata_bytes(blob, manifest, self.store.url(key))
            metadata = load_metadata(blob, self.store.url(key))
        except CloudCheckpointError as err:
            # DCP swallows this and retries per-rank metadata; keep the real error
            # so cloudckpt.load can raise it instead of DCP's generic one.
            if rank is None:
                self.metadata_error = err
            raise
        self.metadata_error = None
        if metadata.storage_meta is not None:
            metadata.storage_meta.load_id = uuid.uuid4().hex
        self.metadata = metadata
        return metadata

    def _load_manifest(self, metadata_blob: bytes, rank: int | None) -> Manifest | None:
        assert self.uri is not None
        self._facts = {}
        try:
            manifest = find_manifest(self.store, self.uri, metadata_blob, rank)
        except IntegrityError:
            if self.verify:
                raise
            return None  # verify=False: load as if the checkpoint had no manifest
        if manifest is not None:
            self._facts = manifest.items
        return manifest  # None: written by stock DCP or another tool, no checksums to verify

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Keep the metadata for planning reads."""
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Nothing to add per rank."""
        return plan

    # -- reading ----------------------------------------------------------------------------
    def _sharing_wanted(self, world: int) -> bool:
        """Whether a load planned over ``world`` ranks shares reads over the process group."""
        share = self.share_reads if self.share_reads is not None else (self.uri is not None
                                                                         and not self.uri.is_local)
        if not share or world < 2:
            return False
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return False
        try:
            return dist.get_world_size(self.process_group) == world
        except (RuntimeError, ValueError):  # not a member of the group, or a destroyed group
            return False

    def _plan_item(self, req: ReadItem) -> tuple[str, int, int, Any] | None:
        """``(relative path, start, end, how)`` of the bytes ``req`` needs; None for an empty tensor.

        Pure function of the metadata and manifest, so the coordinator computes
        every rank's ranges exactly as each rank does.
        """
        assert self.metadata is not None and self.uri is not None
        info = self.metadata.storage_data.get(req.storage_index)
        if info is None:
            where = self.store.url(self.uri.key(layout.METADATA_NAME))
            raise IntegrityError(f"{where} has no storage entry for item {req.storage_index.fqn!r} "
                                 f"(offset {req.storage_index.offset}); the metadata is incomplete or corrupt")
        rel = info.relative_path
        facts = self._facts.get((rel, info.offset))
        if req.type == LoadItemType.BYTE_IO or facts is None or facts.payload_offset is None \
                or getattr(info, "transform_descriptors", None):
            # Whole stored item: byte items, records of other writers, and transformed
            # (e.g. compressed) items, which are decoded whole before parsing.
            return rel, info.offset, info.offset + info.length, ("item", info, facts)
        # cloudckpt-written dense tensor: fetch only the payload bytes needed.
        dtype, sizes = self._chunk_meta(req)
        itemsize = torch.empty((), dtype=dtype).element_size()
        strides = _row_major(sizes)
        stored = math.prod(sizes)
        payload_start = info.offset + facts.payload_offset
        if facts.payload_offset + stored * itemsize > info.length:
            raise IntegrityError(
                f"the manifest places item {req.storage_index.fqn!r}'s payload at [{payload_start}, "
                f"{payload_start + stored * itemsize}) of {self.store.url(self.uri.key(rel))}, past the item's "
                f"end ({info.offset + info.length}); the checkpoint is corrupt or was tampered with")
        if math.prod(req.lengths) == 0:
            return None
        first = sum(o * st for o, st in zip(req.storage_offsets, strides, strict=True))
        last = sum((o + n - 1) * st for o, n, st in zip(req.storage_offsets, req.lengths, strides, strict=True))
        full = list(req.storage_offsets) == [0] * len(sizes) and list(req.lengths) == list(sizes)
        return (rel, payload_start + first * itemsize, payload_start + (last + 1) * itemsize,
                ("span", dtype, sizes, strides, first, full, facts.payload_crc32c))

    def _local_needs(self, items: list[tuple[str, int, int, Any] | None]) -> list[tuple[str, int, int]]:
        """This rank's buffers: its item ranges per object, coalesced (gap and size from the options)."""
        opts = self.transfer_options
        by_rel: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for it in items:
            if it is not None:
                by_rel[it[0]].append((it[1], it[2]))
        return [(rel, s, e) for rel in sorted(by_rel)
                for s, e in merge_ranges(by_rel[rel], opts.read_gap_threshold, opts.max_read_size)]

    def _round_bytes(self) -> int:
        opts = self.transfer_options
        # A round holds about concurrency x max read size of buffers per rank, whatever the checkpoint size.
        return max(opts.max_read_size * opts.max_concurrency, opts.max_read_size)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Give every byte range the job needs to exactly one reading rank (when sharing reads).

        Each plan gets a :class:`~cloudckpt.read_sharing.SharePlan` in its
        ``storage_data``: the rank's buffers, and per round the pieces it
        fetches from the store or receives from another rank.
        """
        if not self._sharing_wanted(len(plans)):
            return plans
        needs = [self._local_needs([self._plan_item(req) for req in p.items]) for p in plans]
        shares = plan_sharing(needs, round_bytes=self._round_bytes(), max_piece=self.transfer_options.max_read_size)
        return [dataclasses.replace(p, storage_data=sp) for p, sp in zip(plans, shares, strict=True)]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fetch every item of ``plan`` and hand it to ``planner``; complete (or failed) on return."""
        fut: Future[None] = Future()
        try:
            self._read(plan, planner)
            fut.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - DCP re-raises it on every rank
            fut.set_exception(exc)  # type: ignore[arg-type]  # torch's Future takes any exception
        return fut

    def _read(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        assert self.metadata is not None and self.uri is not None
        share = plan.storage_data if isinstance(plan.storage_data, SharePlan) else None
        group = None
        error: BaseException | None = None
        items: list[tuple[str, int, int, Any] | None] = []
        keys: dict[str, str] = {}
        try:
            if share is not None:
                group = self._share_group(share)
            self._check_kinds(plan, planner)
            for req, (info, key) in zip(plan.items, self._locate(plan), strict=True):
                keys[info.relative_path] = key
                items.append(self._plan_item(req))
        except Exception as exc:
            if share is None:
                raise
            error = exc
        if share is None:
            share = plan_sharing([self._local_needs(items)], round_bytes=self._round_bytes(),
                                 max_piece=self.transfer_options.max_read_size)[0]
        # The world size sets this rank's share of the read rate (see plan_read_pacing).
        engine = TransferEngine(self.store, self.transfer_options, world_size=default_world_size())
        load = _RankLoad(self, share, planner, engine, keys, group)
        leftovers = load.attach(plan.items, items) if error is None else []
        load.run(error)
        if leftovers:
            # Items the coordinator's plan did not cover (a planner that changed the plan
            # after prepare_global_plan): read them here, after every collective.
            rest = plan_sharing([self._local_needs([it for _, it in leftovers])], round_bytes=self._round_bytes(),
                                max_piece=self.transfer_options.max_read_size)[0]
            extra = _RankLoad(self, rest, planner, engine, keys, None)
            extra.attach([req for req, _ in leftovers], [it for _, it in leftovers])
            extra.run(None)

    def _share_group(self, share: SharePlan) -> Any:
        """The process group reads are shared on (a gloo group when the load's group cannot carry CPU tensors)."""
        import torch.distributed as dist

        group = self.process_group
        rank = dist.get_rank(group)
        if rank != share.rank or dist.get_world_size(group) != share.world:
            raise PeerReadError(f"this process is rank {rank} of {dist.get_world_size(group)} but the load plan "
                                f"was made for rank {share.rank} of {share.world}; pass the load's process_group "
                                "to the storage reader")
        return _cpu_group(group)

    def _check_kinds(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        """Refuse items whose stored kind (tensor or pickled bytes) differs from the caller's value.

        DCP's default planner keeps the flattened target state dict in
        ``planner.state_dict``; a key the caller holds as a tensor but that
        ``.metadata`` declares as bytes would otherwise be *replaced* by
        whatever the bytes unpickle to. Checked before anything is read, so the
        caller's values are never changed. Planners without that attribute are
        not checked here (the restricted loader still applies).
        """
        assert self.uri is not None
        targets = getattr(planner, "state_dict", None)
        if not isinstance(targets, Mapping):
            return
        where = self.store.url(self.uri.key(layout.METADATA_NAME))
        for req in plan.items:
            fqn = req.dest_index.fqn
            if fqn in targets:
                _check_kind(fqn, req.type == LoadItemType.BYTE_IO, targets[fqn], where)

    def _locate(self, plan: LoadPlan) -> list[tuple[Any, str]]:
        """``(storage info, object key)`` of every item, after checking it against untrusted input.

        Every ``relative_path`` must name an object inside the checkpoint (and,
        locally, must not escape it through a symlink); every object is HEADed
        once so no item may claim bytes past the object's real end, which would
        otherwise size a download buffer from a forged number.
        """
        assert self.metadata is not None and self.uri is not None
        where = self.store.url(self.uri.key(layout.METADATA_NAME))
        storage_data = self.metadata.storage_data
        keys: dict[str, str] = {}
        located: list[tuple[Any, str]] = []
        for req in plan.items:
            info = storage_data.get(req.storage_index)
            if info is None:
                raise IntegrityError(f"{where} has no storage entry for item {req.storage_index.fqn!r} "
                                     f"(offset {req.storage_index.offset}); the metadata is incomplete or corrupt")
            rel = info.relative_path
            if rel not in keys:
                keys[rel] = self._object_key(rel, where)
            located.append((info, keys[rel]))
        sizes = self._object_sizes(sorted(set(keys.values())), where)
        for req, (info, key) in zip(plan.items, located, strict=True):
            if info.offset + info.length > sizes[key]:
                raise IntegrityError(
                    f"{where} places item {req.storage_index.fqn!r} at bytes [{info.offset}, "
                    f"{info.offset + info.length}) of {self.store.url(key)}, which has only {sizes[key]} bytes; "
                    "the object is truncated or the metadata was tampered with")
        return located

    def _object_key(self, rel: str, where: str) -> str:
        assert self.uri is not None
        layout.check_relative_path(rel, where)
        key = self.uri.key(rel)
        if self.uri.is_local:
            root = os.path.realpath(self.uri.prefix)
            real = os.path.realpath(key)
            if not real.startswith(root.rstrip(os.sep) + os.sep):
                raise UnsafePathError(
                    f"{where} records the object path {rel!r}, which resolves to {real} outside the checkpoint "
                    f"directory {root} (through a symlink); refusing to read it. Remove the link")
        return key

    def _object_sizes(self, keys: list[str], where: str) -> dict[str, int]:
        """The real size of every object in ``keys`` (one HEAD each, in parallel)."""
        if not keys:
            return {}
        workers = max(1, min(len(keys), self.transfer_options.max_concurrency))
        if workers == 1:
            infos = [self.store.head(k) for k in keys]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="cloudckpt-head") as pool:
                infos = list(pool.map(self.store.head, keys))
        sizes: dict[str, int] = {}
        for key, info in zip(keys, infos, strict=True):
            if info is None:
                raise ObjectNotFoundError(
                    f"{self.store.url(key)} does not exist (or is not a regular object), but {where} points at it; "
                    "the checkpoint is incomplete: restore the object or load an earlier checkpoint")
            sizes[key] = info.size
        return sizes

    def _item_url(self, req: ReadItem) -> str:
        assert self.metadata is not None and self.uri is not None
        return self.store.url(self.uri.key(self.metadata.storage_data[req.storage_index].relative_path))

    def _decode_item(self, data: memoryview, info: Any, url: str, req: ReadItem) -> memoryview:
        """The whole stored item's bytes as the parser needs them (the stream-transform hook).

        Items with ``transform_descriptors`` are always fetched whole (see
        :meth:`_plan_item`); they are decoded here (:mod:`cloudckpt.transforms`,
        bounded by the item's declared size), before parsing. The manifest's
        CRC32C, checked before this, covers the stored (encoded) bytes.
        """
        descriptors = getattr(info, "transform_descriptors", None)
        if not descriptors:
            return data
        limit = transforms.decoded_limit(self.metadata, req.storage_index)
        return memoryview(transforms.decode_item(data, descriptors, f"item {req.storage_index.fqn!r} in {url}",
                                                 limit)).cast("B")

    def _deliver(self, data: memoryview, req: ReadItem, how: Any, planner: LoadPlanner,
                 copier: _Copier | None = None) -> None:
        assert self.uri is not None
        if how[0] == "item":
            _, info, facts = how
            if self.verify and facts is not None and crc.crc32c(data) != facts.crc32c:
                raise IntegrityError(
                    f"checksum mismatch in {self.store.url(self.uri.key(info.relative_path))} for item "
                    f"{req.storage_index.fqn!r} (offset {info.offset}, {info.length} bytes): stored bytes "
                    "are corrupt; restore the object or load an earlier checkpoint"
                )
            url = self.store.url(self.uri.key(info.relative_path))
            data = self._decode_item(data, info, url, req)
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, self._byte_stream(data, req.storage_index.fqn, url))
                return
            tensor = safe_pickle.load_tensor_record(data, fqn=req.storage_index.fqn, where=url)
            try:
                for dim, (off, n) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
                    tensor = tensor.narrow(dim, off, n)
            except (RuntimeError, IndexError) as exc:
                raise IntegrityError(
                    f"item {req.storage_index.fqn!r} in {url} has shape {tuple(tensor.size())}, which does not "
                    f"hold the requested rows ({exc}); the checkpoint metadata and data disagree") from None
        else:
            _, dtype, sizes, strides, first, full, payload_crc = how
            if self.verify and full and payload_crc is not None and crc.crc32c(data) != payload_crc:
                raise IntegrityError(
                    f"checksum mismatch in {self._item_url(req)} "
                    f"for item {req.storage_index.fqn!r}: stored bytes are corrupt; restore the object or "
                    "load an earlier checkpoint"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                flat = torch.frombuffer(data, dtype=dtype)
            tensor = flat.as_strided(list(req.lengths), strides, 0)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise IntegrityError(
                f"item {req.storage_index.fqn!r} has shape {tuple(tensor.size())} in storage but "
                f"{tuple(target.size())} was requested; the checkpoint metadata and data disagree"
            )
        if copier is None:
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        else:
            copier.copy(req, target, tensor)

    def _byte_stream(self, data: memoryview, fqn: str, url: str) -> io.BytesIO:
        """What the planner's ``load_bytes`` gets: the stored bytes only if pickle is allowed.

        Otherwise the item is loaded by the restricted unpickler (which refuses
        anything that could run code) and re-serialised, so the planner's own
        ``torch.load`` only ever meets objects the restricted loader built.
        """
        if self.allow_pickle:
            return io.BytesIO(data.tobytes())
        obj = safe_pickle.load_byte_item(data, fqn=fqn, where=url)
        try:
            return safe_pickle.reserialise(obj)
        except Exception as exc:  # noqa: BLE001 - e.g. nesting too deep to pickle again
            raise IntegrityError(f"item {fqn!r} in {url} loaded but cannot be handed to the planner "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None

    def _chunk_meta(self, req: ReadItem) -> tuple[torch.dtype, list[int]]:
        assert self.metadata is not None
        md = self.metadata.state_dict_metadata.get(req.storage_index.fqn)
        if not isinstance(md, TensorStorageMetadata):
            raise IntegrityError(f"item {req.storage_index.fqn!r} is read as a tensor but the metadata does not "
                                 "describe it as one; the metadata is corrupt")
        offsets = list(req.storage_index.offset or [])
        for chunk in md.chunks:
            if list(chunk.offsets) == offsets:
                return md.properties.dtype, list(chunk.sizes)
        raise IntegrityError(f"no stored chunk of {req.storage_index.fqn!r} at offsets {offsets} in the metadata")


def _check_kind(fqn: str, stored_bytes: bool, value: Any, where: str) -> None:
    """ItemKindMismatchError unless a stored byte item meets a non-tensor and a stored tensor a tensor."""
    holds_tensor = isinstance(value, torch.Tensor)
    if stored_bytes != holds_tensor:
        return
    stored = "a pickled byte item" if stored_bytes else "a tensor"
    held = "a tensor" if holds_tensor else f"a {type(value).__name__}"
    raise ItemKindMismatchError(
        f"{where} stores key {fqn!r} as {stored}, but the state dict being loaded holds {held} there; "
        "refusing to load it, and nothing in the state dict was changed. The checkpoint does not match the "
        "model, or its metadata was altered: check the checkpoint with `cloudckpt verify`")


class CheckedLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, which first checks every key's stored kind against the state dict.

    DCP plans a key stored as a tensor for a caller value that is not one (and
    fails deep inside planning), and plans a key stored as pickled bytes over a
    tensor (replacing the tensor). This planner refuses both with
    :class:`~cloudckpt.errors.ItemKindMismatchError` before anything is planned
    or read; :func:`cloudckpt.load` uses it when no planner is given.
    """

    def create_local_plan(self) -> LoadPlan:
        """Check kinds, then plan as DCP does."""
        sdm = getattr(self.metadata, "state_dict_metadata", None) or {}
        for fqn, value in self.state_dict.items():
            md = sdm.get(fqn)
            if isinstance(md, (BytesStorageMetadata, TensorStorageMetadata)):
                _check_kind(fqn, isinstance(md, BytesStorageMetadata), value, "the checkpoint")
        return super().create_local_plan()


class _Copier:
    """Copies loaded tensors into their targets: CPU targets in place; CUDA targets without blocking.

    CUDA targets are filled from pinned host buffers with non-blocking copies on
    a side stream, so the next reads overlap the copies. A buffer is kept (and
    then reused) until the copies from it finished; at most ``max_inflight``
    bytes of buffers wait for copies, which bounds host memory. Commits of CUDA
    targets wait until :meth:`finish` synchronised the side stream.
    """

    def __init__(self, planner: LoadPlanner, *, pinned: bool, max_inflight: int) -> None:
        self.planner = planner
        self.pinned = pinned
        self.max_inflight = max_inflight
        self._streams: dict[Any, Any] = {}
        self._inflight: deque[tuple[Any, torch.Tensor]] = deque()
        self._inflight_bytes = 0
        self._free: list[torch.Tensor] = []
        self._deferred: list[tuple[ReadItem, torch.Tensor]] = []
        #: Host buffers asked for, and allocated (pinned blocks are reused; for tests and benchmarks).
        self.requested = 0
        self.allocated = 0

    def host_buffer(self, n: int) -> torch.Tensor:
        """A host buffer of ``n`` bytes: a reused pinned block for CUDA loads, else a fresh CPU tensor."""
        self.requested += 1
        if not self.pinned:
            self.allocated += 1
            return torch.empty(n, dtype=torch.uint8)
        fits = [b for b in self._free if b.numel() >= n]
        if fits:
            block = min(fits, key=lambda b: b.numel())
            self._free.remove(block)
            return block[:n]
        self.allocated += 1
        return torch.empty(max(n, 1 << 20), dtype=torch.uint8, pin_memory=True)[:n]

    def _stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            self._streams[device] = stream
        # Copies into targets must follow whatever the caller's stream still does to them.
        stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    def copy(self, req: ReadItem, target: torch.Tensor, tensor: torch.Tensor) -> None:
        """Copy ``tensor`` (a view of a host buffer) into ``target`` and commit it (CUDA: after finish())."""
        if target.device.type != "cuda":
            target.copy_(tensor)
            self.planner.commit_tensor(req, target)
            return
        with torch.cuda.stream(self._stream(target.device)):
            target.copy_(tensor, non_blocking=True)
        self._deferred.append((req, target))

    def release(self, buf: torch.Tensor) -> None:
        """``buf`` is no longer read by the loader; reuse it once copies from it are done."""
        if not self.pinned or not self._streams:
            if self.pinned:
                self._free.append(_base(buf))
            return
        events = []
        for stream in self._streams.values():
            ev = torch.cuda.Event()
            ev.record(stream)
            events.append(ev)
        block = _base(buf)
        self._inflight.append((events, block))
        self._inflight_bytes += block.numel()
        while self._inflight_bytes > self.max_inflight and self._inflight:
            self._reclaim()

    def _reclaim(self) -> None:
        events, block = self._inflight.popleft()
        for ev in events:
            ev.synchronize()
        self._inflight_bytes -= block.numel()
        self._free.append(block)

    def finish(self) -> None:
        """Wait for every device copy, then commit the targets they filled."""
        for stream in self._streams.values():
            stream.synchronize()
        while self._inflight:
            self._reclaim()
        deferred, self._deferred = self._deferred, []
        for req, target in deferred:
            self.planner.commit_tensor(req, target)


def _base(buf: torch.Tensor) -> torch.Tensor:
    """The whole pinned block a buffer view was cut from."""
    return buf._base if buf._base is not None else buf


def _wants_pinned(planner: LoadPlanner) -> bool:
    """Whether the state dict being loaded holds CUDA tensors (then host buffers are pinned)."""
    if not torch.cuda.is_available():
        return False
    targets = getattr(planner, "state_dict", None)
    if not isinstance(targets, Mapping):
        return True
    return any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in targets.values())


class _RankLoad:
    """One rank's part of one load: its buffers and the pieces it fetches, sends and receives, round by round.

    Every rank of a shared load runs the same rounds and, in each, the same
    collectives in the same order: an all-reduce of "did anyone fail" (so a
    rank that failed to read stops every rank instead of leaving peers waiting
    for its bytes), then the point-to-point sends and receives of the round's
    pieces. A rank's buffers are delivered to its targets as soon as all their
    pieces arrived.
    """

    def __init__(self, reader: CloudStorageReader, share: SharePlan, planner: LoadPlanner, engine: TransferEngine,
                 keys: dict[str, str], group: Any) -> None:
        self.reader = reader
        self.share = share
        self.planner = planner
        self.engine = engine
        self.keys = keys
        self.group = group  # None: the default group (used only when the plan is shared)
        self.needs = share.needs
        self._spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self._index: dict[str, list[int]] = defaultdict(list)
        for i, (rel, s, e) in enumerate(self.needs):
            self._spans[rel].append((s, e))
            self._index[rel].append(i)
        self._starts = {rel: [s for s, _ in spans] for rel, spans in self._spans.items()}
        self.members: list[list[tuple[int, int, ReadItem, Any]]] = [[] for _ in self.needs]
        self.buffers: dict[int, torch.Tensor] = {}
        self.direct: dict[int, tuple[ReadItem, torch.Tensor, int | None]] = {}
        self.pending = [0] * len(self.needs)
        #: Buffers this rank fetches whole in one piece and shares with no one: candidates for scatter reads.
        self.solo: set[int] = set()
        for rnd in share.rounds:
            for p in rnd:
                k = self._need(p.rel, p.start, p.end)
                self.pending[k] += 1
                if (p.start, p.end) == self.needs[k][1:] and p.owner == share.rank and p.needers == (share.rank,):
                    self.solo.add(k)
        self.solo = {k for k in self.solo if self.pending[k] == 1}
        #: Scatter-read buffers: (targets filled in place, (start, end, req, how, host buffer) of the others).
        self.scatter: dict[int, tuple[list[tuple[ReadItem, torch.Tensor, int | None]],
                                      list[tuple[int, int, ReadItem, Any, torch.Tensor]]]] = {}
        opts = reader.transfer_options
        self.copier = _Copier(planner, pinned=_wants_pinned(planner),
                              max_inflight=2 * max(opts.max_read_size * opts.max_concurrency, opts.max_read_size))

    def _need(self, rel: str, start: int, end: int) -> int:
        """The buffer holding ``[start, end)`` of ``rel`` (PeerReadError if none: an inconsistent plan)."""
        i = self._need_of(rel, start, end, strict=True)
        assert i is not None
        return i

    def _need_of(self, rel: str, start: int, end: int, *, strict: bool = False) -> int | None:
        spans = self._spans.get(rel)
        i = find_span(self._starts[rel], spans, start, end) if spans else None
        if i is None:
            if strict:
                raise PeerReadError(f"the load plan sends bytes [{start}, {end}) of {rel!r} to rank "
                                    f"{self.share.rank}, outside its buffers; the plan is inconsistent")
            return None
        return self._index[rel][i]

    def attach(self, reqs: list[ReadItem], items: list[tuple[str, int, int, Any] | None]
               ) -> list[tuple[ReadItem, tuple[str, int, int, Any]]]:
        """Map each item to the buffer holding its bytes; return the items no buffer holds."""
        leftovers = []
        for req, it in zip(reqs, items, strict=True):
            if it is None:  # an empty tensor: nothing to read
                self.planner.commit_tensor(req, self.planner.resolve_tensor(req))
                continue
            i = self._need_of(it[0], it[1], it[2])
            if i is None or not self.pending[i]:
                leftovers.append((req, it))
                continue
            self.members[i].append((it[1], it[2], req, it[3]))
        return leftovers

    def run(self, error: BaseException | None) -> None:
        """Fetch, exchange and deliver round by round; raise this rank's error, or PeerReadError for another's."""
        peer_failed = False
        try:
            for rnd in self.share.rounds:
                if error is None:
                    try:
                        self._fetch(rnd)
                    except Exception as exc:  # noqa: BLE001 - reported to the peers below
                        error = exc
                if self.share.shared:
                    if self._anyone_failed(error is not None):
                        peer_failed = error is None
                        break
                    self._exchange(rnd)
                if error is None:
                    try:
                        self._deliver_round(rnd)
                    except Exception as exc:  # noqa: BLE001 - reported to the peers at the next round
                        error = exc
        finally:
            self.copier.finish()
        if error is not None:
            raise error
        if peer_failed:
            raise PeerReadError(f"rank {self.share.rank} stopped loading from {self.reader.uri}: another rank "
                                "failed to read its part of the checkpoint (its error is reported by that rank)")

    def _buffer(self, i: int) -> torch.Tensor:
        buf = self.buffers.get(i)
        if buf is not None:
            return buf
        rel, s, e = self.needs[i]
        members = self.members[i]
        buf = None
        if len(members) == 1 and members[0][:2] == (s, e):
            _, _, req, how = members[0]
            target = self._direct_target(req, how, e - s)
            if target is not None:
                # Straight from the socket (or the peer) into the target tensor: no buffer, no copy.
                buf = target.reshape(-1).view(torch.uint8)
                self.direct[i] = (req, target, how[6])
        if buf is None:
            buf = self.copier.host_buffer(e - s)
        self.buffers[i] = buf
        return buf

    def _direct_target(self, req: ReadItem, how: Any, nbytes: int) -> torch.Tensor | None:
        """The target tensor, if the item's stored payload (``nbytes``) can be read straight into its memory.

        That is a whole dense payload (cloudckpt-written, offsets from the
        manifest) and a contiguous CPU target of the same dtype and byte size.
        """
        if how[0] != "span" or not how[5]:
            return None
        target = self.planner.resolve_tensor(req).detach()
        if target.device.type == "cpu" and target.is_contiguous() and target.dtype == how[1] \
                and target.numel() * target.element_size() == nbytes:
            return target
        return None

    def _scatter_views(self, i: int) -> list[tuple[int, memoryview | None]] | None:
        """``(offset, view)`` pairs for reading buffer ``i`` in one request straight into its targets, or None.

        Used when the buffer holds several items, at least one of them a whole
        dense payload that can be read into its target tensor; the other items
        get a host buffer each, and the framing bytes between items are
        discarded. Items whose byte ranges overlap (reads of the same bytes)
        keep the single buffer and copies, as do CUDA loads (pinned buffers).
        """
        members = sorted(self.members[i], key=lambda m: (m[0], m[1]))
        if len(members) < 2 or self.copier.pinned:
            return None
        if any(b[0] < a[1] for a, b in zip(members, members[1:], strict=False)):  # neighbours
            return None
        targets = [self._direct_target(req, how, end - start) for start, end, req, how in members]
        if all(t is None for t in targets):
            return None
        direct: list[tuple[ReadItem, torch.Tensor, int | None]] = []
        buffered: list[tuple[int, int, ReadItem, Any, torch.Tensor]] = []
        views: list[tuple[int, memoryview | None]] = []
        for (start, end, req, how), target in zip(members, targets, strict=True):
            if target is None:
                target = self.copier.host_buffer(end - start)
                buffered.append((start, end, req, how, target))
            else:
                direct.append((req, target, how[6]))
            views.append((start, writable_bytes(target)))
        self.scatter[i] = (direct, buffered)
        return views

    def _key(self, rel: str) -> str:
        key = self.keys.get(rel)
        if key is None:
            assert self.reader.uri is not None
            key = self.keys[rel] = self.reader._object_key(
                rel, self.reader.store.url(self.reader.uri.key(layout.METADATA_NAME)))
        return key

    def _fetch(self, rnd: list) -> None:
        """GET the round's pieces this rank owns (contiguous pieces of one buffer in one request)."""
        gets: list[list[Any]] = []  # [buffer index, start, end]
        for p in rnd:
            if p.owner != self.share.rank:
                continue
            i = self._need(p.rel, p.start, p.end)
            if gets and gets[-1][0] == i and gets[-1][2] == p.start:
                gets[-1][2] = p.end
            else:
                gets.append([i, p.start, p.end])
        reads: list[tuple[str, int, Any]] = []
        for i, start, end in gets:
            rel, s, e = self.needs[i]
            if i in self.solo and (start, end) == (s, e):
                views = self._scatter_views(i)
                if views is not None:  # one request, each payload straight into its tensor
                    reads.append((self._key(rel), s, views))
                    continue
            view = writable_bytes(self._buffer(i))[start - s:end - s]
            reads.append((self._key(rel), start, view))
        self.engine.download_ranges(self._split(reads))

    def _split(self, reads: list[tuple[str, int, Any]]) -> list[tuple[str, int, Any]]:
        """Plain range reads cut so that every connection has work: at most ``max_read_size`` each, and
        smaller (down to :data:`MIN_SPLIT_READ`) while fewer reads than ``max_concurrency`` would run.

        One GET per large tensor would leave the other connections idle (on a real
        network one connection carries ~100 MB/s); scatter reads stay whole.
        """
        opts = self.reader.transfer_options
        plain = sum(memoryview(v).nbytes for _, _, v in reads if isinstance(v, memoryview))
        size = min(opts.max_read_size, max(MIN_SPLIT_READ, -(-plain // max(1, opts.max_concurrency))))
        out: list[tuple[str, int, Any]] = []
        for key, start, view in reads:
            if not isinstance(view, memoryview) or view.nbytes <= size:
                out.append((key, start, view))
                continue
            for off in range(0, view.nbytes, size):
                out.append((key, start + off, view[off:off + size]))
        return out

    def _anyone_failed(self, failed: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def _exchange(self, rnd: list) -> None:
        """Send the pieces this rank fetched to the other ranks that need them; receive the rest."""
        import torch.distributed as dist

        me = self.share.rank
        works = []
        for p in rnd:
            if len(p.needers) == 1:
                continue
            i = self._need(p.rel, p.start, p.end)
            s = self.needs[i][1]
            view = self._buffer(i)[p.start - s:p.end - s]
            if p.owner == me:
                for r in p.needers:
                    if r != me:
                        works.append(dist.isend(view, dst=_global_rank(self.group, r), group=self.group, tag=p.tag))
            else:
                works.append(dist.irecv(view, src=_global_rank(self.group, p.owner), group=self.group, tag=p.tag))
        for w in works:
            if w is not None:  # None on ranks outside the group, which never reach here
                w.wait()

    def _deliver_round(self, rnd: list) -> None:
        done = []
        for p in rnd:
            i = self._need(p.rel, p.start, p.end)
            self.pending[i] -= 1
            if not self.pending[i]:
                done.append(i)
        for i in done:
            self._deliver_buffer(i)

    def _commit_direct(self, i: int, req: ReadItem, target: torch.Tensor, payload_crc: int | None) -> None:
        """Check a payload read straight into its target against the manifest's CRC32C, then commit it."""
        reader = self.reader
        if reader.verify and payload_crc is not None and crc.crc32c(writable_bytes(target)) != payload_crc:
            raise IntegrityError(
                f"checksum mismatch in {reader.store.url(self._key(self.needs[i][0]))} for item "
                f"{req.storage_index.fqn!r}: stored bytes are corrupt; restore the object or load an "
                "earlier checkpoint")
        self.planner.commit_tensor(req, target)

    def _deliver_buffer(self, i: int) -> None:
        reader = self.reader
        assert reader.uri is not None
        scattered = self.scatter.pop(i, None)
        if scattered is not None:
            direct_items, buffered = scattered
            for req, target, payload_crc in direct_items:
                self._commit_direct(i, req, target, payload_crc)
            for _, _, req, how, host in buffered:
                reader._deliver(writable_bytes(host), req, how, self.planner, self.copier)
                self.copier.release(host)
            self.members[i] = []
            return
        buf = self.buffers.pop(i)
        direct = self.direct.pop(i, None)
        if direct is not None:
            self._commit_direct(i, *direct)
            return
        view = writable_bytes(buf)
        s = self.needs[i][1]
        for start, end, req, how in self.members[i]:
            reader._deliver(view[start - s:end - s], req, how, self.planner, self.copier)
        self.members[i] = []
        self.copier.release(buf)


def _global_rank(group: Any, rank: int) -> int:
    import torch.distributed as dist

    return rank if group is None else dist.get_global_rank(group, rank)


#: gloo groups made for loads whose group cannot carry CPU tensors (NCCL), by the group they mirror.
_CPU_GROUPS: dict[Any, Any] = {}


def _cpu_group(group: Any) -> Any:
    """``group`` if it carries CPU tensors, else a gloo group of the same ranks (made once per process)."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return group
    key = "world" if group is None else id(group)
    if key not in _CPU_GROUPS:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        # Collective: every rank of the load reaches this point in the same load (the plan says to share).
        _CPU_GROUPS[key] = dist.new_group(ranks=ranks, backend="gloo")
    return _CPU_GROUPS[key]


def _row_major(sizes: list[int]) -> list[int]:
    strides, acc = [], 1
    for s in reversed(sizes):
        strides.append(acc)
        acc *= s
    return list(reversed(strides))


class S3StorageReader(CloudStorageReader):
    """Load DCP checkpoints from ``s3://bucket/prefix`` (boto3 credential chain)."""

    scheme = "s3"

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_concurrency: int | None = None,
        read_gap_threshold: int | None = None,
        transfer_options: TransferOptions | None = None,
        verify: bool = True,
        allow_pickle: bool = False,
        share_reads: bool | None = None,
        process_group: Any = None,
        **client_options: Any,
    ) -> None:
        super().__init__(checkpoint_id, max_concurrency=max_concurrency, read_gap_threshold=read_gap_threshold,
                         transfer_options=transfer_options, verify=verify, allow_pickle=allow_pickle,
                         share_reads=share_reads, process_group=process_group,
                         endpoint_url=endpoint_url,
                         region=region, **client_options)


class GCSStorageReader(CloudStorageReader):
    """Load DCP checkpoints from ``gs://bucket/prefix`` (Application Default Credentials)."""

    scheme = "gs"

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        client: Any = None,
        project: str | None = None,
        max_concurrency: int | None = None,
        read_gap_threshold: int | None = None,
        transfer_options: TransferOptions | None = None,
        verify: bool = True,
        allow_pickle: bool = False,
        share_reads: bool | None = None,
        process_group: Any = None,
        **store_options: Any,
    ) -> None:
        if client is not None:
            store_options["client"] = client
        if project is not None:
            store_options["project"] = project
        super().__init__(checkpoint_id, max_concurrency=max_concurrency, read_gap_threshold=read_gap_threshold,
                         transfer_options=transfer_options, verify=verify, allow_pickle=allow_pickle,
                         share_reads=share_reads, process_group=process_group, **store_options)


class LocalStorageReader(CloudStorageReader):
    """Load DCP checkpoints from a local directory (including stock FileSystemWriter output)."""

    scheme = "file"


_READERS: dict[str, type[CloudStorageReader]] = {
    "s3": S3StorageReader,
    "gs": GCSStorageReader,
    "file": LocalStorageReader,
}


def reader_for(uri: str | os.PathLike[str] | StorageURI, **options: Any) -> CloudStorageReader:
    """The DCP StorageReader for ``uri``: S3 for ``s3://``, GCS for ``gs://``, local otherwise."""
    u = parse_uri(uri)
    return _READERS[u.scheme](str(u), **options)
