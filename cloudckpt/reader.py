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

When the checkpoint was written by cloudckpt, the manifest gives each item's
payload offset and CRC32C, so a resharded load fetches only the rows it needs
and whole-payload reads are verified.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import json
import os
import uuid
from collections import defaultdict
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
    UnsafePathError,
)
from cloudckpt.manifest import ItemFacts, Manifest, check_metadata_bytes, find_manifest
from cloudckpt.safe_pickle import MAX_METADATA_BYTES, load_metadata
from cloudckpt.store import ObjectStore, open_store
from cloudckpt.transfer import TransferEngine, TransferOptions, coalesce_ranges, default_world_size
from cloudckpt.uri import StorageURI, parse_uri

__all__ = ["CloudStorageReader", "S3StorageReader", "GCSStorageReader", "LocalStorageReader", "reader_for",
           "CheckedLoadPlanner"]


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
        checkpoint_id: "str | os.PathLike[str] | None" = None,
        *,
        max_concurrency: int | None = None,
        read_gap_threshold: int | None = None,
        transfer_options: TransferOptions | None = None,
        verify: bool = True,
        allow_pickle: bool = False,
        **store_options: Any,
    ) -> None:
        super().__init__()
        opts = transfer_options or TransferOptions()
        overrides = {k: v for k, v in (("max_concurrency", max_concurrency),
                                       ("read_gap_threshold", read_gap_threshold)) if v is not None}
        self.transfer_options = dataclasses.replace(opts, **overrides)
        self.verify = verify
        #: Unpickle byte items with plain pickle (runs whatever code they name): trusted checkpoints only.
        self.allow_pickle = allow_pickle
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
    def reset(self, checkpoint_id: "str | os.PathLike[str] | None" = None) -> None:
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
    def validate_checkpoint_id(cls, checkpoint_id: "str | os.PathLike[str]") -> bool:
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
        if getattr(metadata, "storage_meta", None) is not None:
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

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Nothing to add globally."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fetch every item of ``plan`` and hand it to ``planner``; complete (or failed) on return."""
        fut: Future[None] = Future()
        try:
            self._read(plan, planner)
            fut.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - DCP re-raises it on every rank
            fut.set_exception(exc)
        return fut

    # -- reading ----------------------------------------------------------------------------
    def _read(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        assert self.metadata is not None and self.uri is not None
        self._check_kinds(plan, planner)
        located = self._locate(plan)
        # The world size sets this rank's share of the read rate (see plan_read_pacing).
        engine = TransferEngine(self.store, self.transfer_options, world_size=default_world_size())
        direct: list[tuple[str, int, memoryview]] = []
        direct_done: list[tuple[ReadItem, torch.Tensor, Any, int | None]] = []
        ranged: dict[str, list[tuple[int, int, ReadItem, Any]]] = defaultdict(list)
        for req, (info, key) in zip(plan.items, located):
            rel = info.relative_path
            facts = self._facts.get((rel, info.offset))
            # Transformed (e.g. compressed) items are fetched whole and decoded in _deliver.
            if req.type == LoadItemType.BYTE_IO or facts is None or facts.payload_offset is None \
                    or getattr(info, "transform_descriptors", None):
                ranged[key].append((info.offset, info.offset + info.length, req, ("item", info, facts)))
                continue
            # cloudckpt-written dense tensor: fetch only the payload bytes needed.
            chunk = self._chunk_meta(req)
            itemsize = torch.empty((), dtype=chunk[0]).element_size()
            sizes = chunk[1]
            strides = _row_major(sizes)
            first = sum(o * s for o, s in zip(req.storage_offsets, strides))
            last = sum((o + n - 1) * s for o, n, s in zip(req.storage_offsets, req.lengths, strides))
            numel = 1
            for n in req.lengths:
                numel *= n
            payload_start = info.offset + facts.payload_offset
            stored = 1
            for n in sizes:
                stored *= n
            if facts.payload_offset + stored * itemsize > info.length:
                raise IntegrityError(
                    f"the manifest places item {req.storage_index.fqn!r}'s payload at [{payload_start}, "
                    f"{payload_start + stored * itemsize}) of {self.store.url(key)}, past the item's end "
                    f"({info.offset + info.length}); the checkpoint is corrupt or was tampered with")
            full = list(req.storage_offsets) == [0] * len(sizes) and list(req.lengths) == list(sizes)
            if numel == 0:
                target = planner.resolve_tensor(req)
                planner.commit_tensor(req, target)
                continue
            span = (first * itemsize, (last + 1) * itemsize)
            # Payloads smaller than the coalescing gap are cheaper merged with their
            # neighbours into one request than fetched one request each.
            if full and numel * itemsize >= self.transfer_options.read_gap_threshold:
                target = planner.resolve_tensor(req).detach()
                if target.device.type == "cpu" and target.is_contiguous() and target.dtype == chunk[0] \
                        and target.numel() == numel:
                    # Straight from the socket into the target tensor: no buffer, no copy.
                    direct.append((key, payload_start, writable_bytes(target)))
                    direct_done.append((req, target, info, facts.payload_crc32c))
                    continue
            ranged[key].append((payload_start + span[0], payload_start + span[1], req,
                                ("span", chunk[0], sizes, strides, first, full, facts.payload_crc32c)))

        engine.download_ranges(direct)
        for req, target, info, payload_crc in direct_done:
            if self.verify and payload_crc is not None:
                got = crc.crc32c(writable_bytes(target))
                if got != payload_crc:
                    raise IntegrityError(
                        f"checksum mismatch in {self.store.url(self.uri.key(info.relative_path))} for item "
                        f"{req.storage_index.fqn!r} (offset {info.offset}): stored bytes are corrupt; "
                        "restore the object or load an earlier checkpoint"
                    )
            planner.commit_tensor(req, target)
        self._read_ranged(ranged, engine, planner)

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
        for req, (info, key) in zip(plan.items, located):
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
        for key, info in zip(keys, infos):
            if info is None:
                raise ObjectNotFoundError(
                    f"{self.store.url(key)} does not exist (or is not a regular object), but {where} points at it; "
                    "the checkpoint is incomplete: restore the object or load an earlier checkpoint")
            sizes[key] = info.size
        return sizes

    def _read_ranged(self, ranged: dict[str, list[tuple[int, int, ReadItem, Any]]], engine: TransferEngine,
                     planner: LoadPlanner) -> None:
        opts = self.transfer_options
        # Fetch in batches so a load never holds more than ~concurrency x max read size
        # of download buffers, whatever the checkpoint size.
        budget = max(opts.max_read_size * opts.max_concurrency, opts.max_read_size)
        batch: list[tuple[str, int, memoryview]] = []
        batch_members: list[tuple[bytearray, int, list[tuple[int, int, ReadItem, Any]]]] = []
        size = 0

        def flush() -> None:
            nonlocal batch, batch_members, size
            engine.download_ranges(batch)
            for buf, start, members in batch_members:
                view = memoryview(buf)
                for s, e, req, how in members:
                    self._deliver(view[s - start:e - start], req, how, planner)
            batch, batch_members, size = [], [], 0

        for key, reads in ranged.items():
            merged = coalesce_ranges([(s, e) for s, e, _, _ in reads], opts.read_gap_threshold, opts.max_read_size)
            for start, end, members in merged:
                buf = bytearray(end - start)
                batch.append((key, start, memoryview(buf)))
                batch_members.append((buf, start, [reads[i] for i in members]))
                size += end - start
                if size >= budget:
                    flush()
        if batch:
            flush()

    def _deliver(self, data: memoryview, req: ReadItem, how: Any, planner: LoadPlanner) -> None:
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
            if getattr(info, "transform_descriptors", None):  # stream transforms (cloudckpt.transforms)
                data = transforms.decode_item(data, info.transform_descriptors, f"item {req.storage_index.fqn!r} in "
                                              f"{url}", transforms.decoded_limit(self.metadata, req.storage_index))
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, self._byte_stream(data, req.storage_index.fqn, url))
                return
            tensor = safe_pickle.load_tensor_record(data, fqn=req.storage_index.fqn, where=url)
            try:
                for dim, (off, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                    tensor = tensor.narrow(dim, off, n)
            except (RuntimeError, IndexError) as exc:
                raise IntegrityError(
                    f"item {req.storage_index.fqn!r} in {url} has shape {tuple(tensor.size())}, which does not "
                    f"hold the requested rows ({exc}); the checkpoint metadata and data disagree") from None
        else:
            _, dtype, sizes, strides, first, full, payload_crc = how
            if self.verify and full and payload_crc is not None and crc.crc32c(data) != payload_crc:
                raise IntegrityError(
                    f"checksum mismatch in {self.store.url(self.uri.key(self.metadata.storage_data[req.storage_index].relative_path))} "  # type: ignore[union-attr]
                    f"for item {req.storage_index.fqn!r}: stored bytes are corrupt; restore the object or "
                    "load an earlier checkpoint"
                )
            import warnings

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
        target.copy_(tensor)
        planner.commit_tensor(req, target)

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
        checkpoint_id: "str | os.PathLike[str] | None" = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_concurrency: int | None = None,
        read_gap_threshold: int | None = None,
        transfer_options: TransferOptions | None = None,
        verify: bool = True,
        allow_pickle: bool = False,
        **client_options: Any,
    ) -> None:
        super().__init__(checkpoint_id, max_concurrency=max_concurrency, read_gap_threshold=read_gap_threshold,
                         transfer_options=transfer_options, verify=verify, allow_pickle=allow_pickle,
                         endpoint_url=endpoint_url,
                         region=region, **client_options)


class GCSStorageReader(CloudStorageReader):
    """Load DCP checkpoints from ``gs://bucket/prefix`` (Application Default Credentials)."""

    scheme = "gs"

    def __init__(
        self,
        checkpoint_id: "str | os.PathLike[str] | None" = None,
        *,
        client: Any = None,
        project: str | None = None,
        max_concurrency: int | None = None,
        read_gap_threshold: int | None = None,
        transfer_options: TransferOptions | None = None,
        verify: bool = True,
        allow_pickle: bool = False,
        **store_options: Any,
    ) -> None:
        if client is not None:
            store_options["client"] = client
        if project is not None:
            store_options["project"] = project
        super().__init__(checkpoint_id, max_concurrency=max_concurrency, read_gap_threshold=read_gap_threshold,
                         transfer_options=transfer_options, verify=verify, allow_pickle=allow_pickle,
                         **store_options)


class LocalStorageReader(CloudStorageReader):
    """Load DCP checkpoints from a local directory (including stock FileSystemWriter output)."""

    scheme = "file"


_READERS: dict[str, type[CloudStorageReader]] = {
    "s3": S3StorageReader,
    "gs": GCSStorageReader,
    "file": LocalStorageReader,
}


def reader_for(uri: "str | os.PathLike[str] | StorageURI", **options: Any) -> CloudStorageReader:
    """The DCP StorageReader for ``uri``: S3 for ``s3://``, GCS for ``gs://``, local otherwise."""
    u = parse_uri(uri)
    return _READERS[u.scheme](str(u), **options)
