"""Incremental saves: find what a verified base checkpoint already holds, and plan server-side copies.

A save with a base (``base_checkpoint_id=``, or ``CheckpointManager(incremental=True)``)
copies every item whose bytes the base already holds *inside the object store*
(S3 CopyObject/UploadPartCopy, GCS rewrite, local copy_file_range) and uploads
only the rest. The new checkpoint still owns every object it references: it is
a complete stock DCP checkpoint, unaffected when the base is deleted.

* The base is opened once, by the coordinator (:func:`open_base`): it must be
  committed, its manifest must match its ``.metadata``, every object it
  references must exist with the size (and, where the store reports one, the
  CRC32C) the manifest records, and every name and offset must be sane. A base
  that fails any check is not used at all: the save uploads everything.
* Each rank gets the base facts of its own items (:class:`BaseSlice`, carried
  in the global plan). An item is unchanged when its staged bytes have the
  base item's length and CRC32C (so the same dtype, shape, chunk and
  framing); an item named by ``frozen_keys`` is taken as unchanged without
  being staged or checksummed when the base item has the same dtype, shape and
  chunk: the base manifest's CRC32C vouches for it.
* :func:`plan_copies` arranges unchanged items into copy objects, one per base
  object: a base object whose items are all unchanged is copied whole (one
  request); otherwise its unchanged runs become the parts of a multipart copy
  (stores with range copies only, S3's 5 MiB minimum part applies: small runs
  are uploaded instead). Every copy is conditional on the version of the
  source that was verified, so a base changed mid-save is never copied; a copy
  that cannot be made falls back to uploading its items.
* Changed items and unchanged ones that are uploaded go to separate objects, so
  the next incremental save finds whole unchanged objects (GCS copies nothing
  smaller). On GCS, a save made by ``CheckpointManager(incremental=True)`` (its
  first one too) or with a base also puts every item of at least
  :data:`OWN_OBJECT_MIN_BYTES` in an object of its own (the writer's
  ``copy_friendly_layout``): the next save copies each unchanged one whole,
  without a byte-range copy. S3 and local paths keep the usual packing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from cloudckpt import crc, layout, safe_pickle
from cloudckpt.errors import CloudCheckpointError
from cloudckpt.manifest import find_manifest
from cloudckpt.store.base import ObjectStore
from cloudckpt.transfer import CopyRun, ObjectCopy
from cloudckpt.uri import StorageURI, parse_uri

__all__ = ["BaseItem", "BaseSlice", "BaseCheckpoint", "BaseRejected", "open_base", "FrozenKeys",
           "plan_copies", "CopyPlacement", "COPY_PART_SIZE",
           "OWN_OBJECT_MIN_BYTES"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Preferred size of one copied part: large (copies cost requests, not client bytes),
#: split only at item boundaries so every part's CRC32C is known from the base manifest.
COPY_PART_SIZE = 512 * MiB
#: On stores that copy whole objects only (GCS), a save that is or may become a base gives
#: every item of at least this size an object of its own (CloudStorageWriter's
#: ``copy_friendly_layout``), so the next save copies it whole when it is unchanged.
OWN_OBJECT_MIN_BYTES = 1 * MiB
#: A range copy of fewer bytes is not worth its request: those items are uploaded.
MIN_COPY_BYTES = 256 * 1024
_MULTIPART_ETAG = re.compile(r'-\d+"?$')
#: HEAD requests in flight while verifying a base.
_VERIFY_THREADS = 16


class BaseRejected(Exception):
    """A base checkpoint that must not be used (the reason is the message); never leaves this package."""


@dataclasses.dataclass(frozen=True)
class BaseItem:
    """Where one item lies in the base and what the base manifest says about it."""

    name: str
    offset: int
    length: int
    crc32c: int
    payload_offset: int | None
    payload_crc32c: int | None
    #: Same dtype, global shape and chunk as the item being saved (frozen_keys needs it).
    compatible: bool = False


@dataclasses.dataclass(frozen=True)
class BaseSlice:
    """The base facts one rank needs: its items' locations and the verified base objects."""

    uri: str
    save_id: str | None
    #: base object name -> (size, CRC32C, copy tag of the verified version)
    objects: Mapping[str, tuple[int, int, str | None]]
    items: Mapping[MetadataIndex, BaseItem]


@dataclasses.dataclass
class BaseCheckpoint:
    """A verified base: every item's facts, and each base object's (size, CRC32C, copy tag)."""

    uri: StorageURI
    metadata: Any
    save_id: str | None
    objects: dict[str, tuple[int, int, str | None]]
    items: dict[MetadataIndex, BaseItem]

    def slice_for(self, items: Iterable[WriteItem]) -> BaseSlice:
        """The facts of ``items`` (a rank's plan) that the base holds, with dtype/shape/chunk compared."""
        out: dict[MetadataIndex, BaseItem] = {}
        described = getattr(self.metadata, "state_dict_metadata", {}) or {}
        for item in items:
            bi = self.items.get(item.index)
            if bi is None:
                continue
            out[item.index] = dataclasses.replace(bi, compatible=_compatible(item, described.get(item.index.fqn)))
        used = {bi.name for bi in out.values()}
        return BaseSlice(str(self.uri), self.save_id, {n: self.objects[n] for n in used}, out)


def _compatible(item: WriteItem, described: Any) -> bool:
    """Whether the base describes ``item``'s fqn with the same dtype, global shape and this chunk."""
    if item.type == WriteItemType.BYTE_IO:
        return isinstance(described, BytesStorageMetadata)
    td = item.tensor_data
    if td is None or not isinstance(described, TensorStorageMetadata):
        return False
    if described.properties.dtype != td.properties.dtype or tuple(described.size) != tuple(td.size):
        return False
    return any(tuple(c.offsets) == tuple(td.chunk.offsets) and tuple(c.sizes) == tuple(td.chunk.sizes)
               for c in described.chunks)


def _own_name(name: Any) -> bool:
    return isinstance(name, str) and "/" not in name and "\\" not in name \
        and layout.parse_data_object_name(name) is not None


def open_base(store: ObjectStore, target: StorageURI, base_id: Any) -> BaseCheckpoint:
    """Open and verify the base checkpoint ``base_id`` for a save to ``target``; BaseRejected if unusable.

    Everything read is untrusted: ``.metadata`` is size-capped and loaded with
    the safe unpickler, the manifest must be sealed and match ``.metadata``'s
    CRC32C, every referenced object name must be a plain data object name of
    the base, every item must lie inside its object, and a HEAD of every
    referenced object must show the size (and CRC32C, where reported) the
    manifest records.
    """
    try:
        uri = parse_uri(base_id)
    except CloudCheckpointError as exc:
        raise BaseRejected(f"{base_id!r} is not a checkpoint URI ({exc})") from None
    if uri.scheme != target.scheme or uri.bucket != target.bucket:
        raise BaseRejected(f"{uri} is not in the bucket of {target}; server-side copies stay inside one bucket")
    if uri.key("") == target.key(""):
        raise BaseRejected(f"{uri} is the checkpoint being saved")
    meta_key = uri.key(layout.METADATA_NAME)
    try:
        blob = store.get(meta_key, max_size=safe_pickle.MAX_METADATA_BYTES)
    except FileNotFoundError:
        raise BaseRejected(f"{uri} is not committed (no {layout.METADATA_NAME})") from None
    except CloudCheckpointError as exc:
        raise BaseRejected(f"{store.url(meta_key)} cannot be read ({exc})") from None
    try:
        metadata = safe_pickle.load_metadata(blob, store.url(meta_key))
        manifest = find_manifest(store, uri, blob)
    except CloudCheckpointError as exc:
        raise BaseRejected(f"{uri} failed verification ({exc})") from None
    if manifest is None or manifest.metadata_crc32c is None:
        raise BaseRejected(f"{uri} has no cloudckpt manifest that vouches for its .metadata")
    items: dict[MetadataIndex, BaseItem] = {}
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise BaseRejected(f"{uri}: .metadata has no storage_data table")
    for index, info in storage.items():
        name, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if not isinstance(index, MetadataIndex) or not isinstance(name, str) or not _own_name(name) \
                or not isinstance(offset, int) \
                or not isinstance(length, int) or offset < 0 or length < 0:
            raise BaseRejected(f"{uri}: .metadata has a malformed storage entry {str(index)[:200]}")
        facts = manifest.items.get((name, offset))
        obj = manifest.objects.get(name)
        if facts is None or obj is None or facts.length != length or offset + length > obj.size:
            raise BaseRejected(f"{uri}: the manifest does not vouch for item {index.fqn!r} in {name}")
        items[index] = BaseItem(name, offset, length, facts.crc32c, facts.payload_offset, facts.payload_crc32c)
    names = sorted({bi.name for bi in items.values()})
    objects = _head_all(store, uri, names, {n: (manifest.objects[n].size, manifest.objects[n].crc32c) for n in names})
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    return BaseCheckpoint(uri, metadata, save_id if isinstance(save_id, str) else None, objects, items)


def _head_all(store: ObjectStore, uri: StorageURI, names: Sequence[str],
              want: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int, str | None]]:
    """HEAD every base object (in parallel); BaseRejected unless each matches the manifest."""
    def one(name: str) -> tuple[str, tuple[int, int, str | None]]:
        key = uri.key(name)
        info = store.copy_probe(key)
        size, c = want[name]
        if info is None:
            raise BaseRejected(f"{store.url(key)} is missing")
        if info.size != size:
            raise BaseRejected(f"{store.url(key)} has {info.size} bytes, its manifest records {size}")
        # A multipart object's checksum may be composite (a CRC of the parts' CRCs; some
        # servers omit the "-N" that says so): only a single-part object's is compared.
        composite = info.etag is not None and _MULTIPART_ETAG.search(info.etag) is not None
        if info.crc32c is not None and not composite and info.crc32c != c:
            raise BaseRejected(f"{store.url(key)} has CRC32C {info.crc32c:#010x}, its manifest records {c:#010x}")
        return name, (size, c, store.copy_tag(info))

    if not names:
        return {}
    try:
        with concurrent.futures.ThreadPoolExecutor(min(_VERIFY_THREADS, len(names)),
                                                   thread_name_prefix="cloudckpt-base") as pool:
            return dict(pool.map(one, names))
    except CloudCheckpointError as exc:
        raise BaseRejected(f"{uri} could not be verified ({exc})") from None


class FrozenKeys:
    """The ``frozen_keys`` hint: names (an fqn, or a dotted prefix of fqns) or a predicate on fqns.

    Picklable when the predicate is (a module-level function, not a lambda),
    which the process executor needs.
    """

    def __init__(self, keys: Iterable[str] | Callable[[str], bool] | str) -> None:
        if callable(keys):
            self.predicate: Callable[[str], bool] | None = keys
            self.names: frozenset[str] = frozenset()
        else:
            names = [keys] if isinstance(keys, str) else list(keys)
            if not all(isinstance(n, str) for n in names):
                raise TypeError("frozen_keys must be state-dict keys (str), an iterable of them, or a predicate")
            self.predicate, self.names = None, frozenset(names)

    def __call__(self, fqn: str) -> bool:
        if self.predicate is not None:
            return bool(self.predicate(fqn))
        if fqn in self.names:
            return True
        parts = fqn.split(".")
        return any(".".join(parts[:i]) in self.names for i in range(1, len(parts)))


@dataclasses.dataclass(frozen=True)
class CopyPlacement:
    """An item that a copy object holds: which object (index into the plan's copies) and where."""

    index: MetadataIndex
    base: BaseItem
    copy: int
    offset: int


def plan_copies(candidates: Sequence[tuple[MetadataIndex, BaseItem]], base: BaseSlice, store: ObjectStore,
                key_of: Callable[[int], str], *, part_size: int = COPY_PART_SIZE
                ) -> tuple[list[ObjectCopy], list[CopyPlacement], list[tuple[MetadataIndex, BaseItem]]]:
    """Arrange unchanged items into copy objects; return (copies, placements, items to upload instead).

    One copy object per base object, named ``key_of(n)``. A base object whose
    items are all unchanged is copied whole. Otherwise, on stores with range
    copies, runs of adjacent unchanged items become parts (split at item
    boundaries near ``part_size``), large ones first; a run under the store's
    ``min_part_size`` can only be the last part, so at most one such run stays
    (the largest) and the others are uploaded. Without range copies (GCS) the
    unchanged items of a partly changed object are uploaded.
    """
    base_uri = parse_uri(base.uri)
    by_object: dict[str, list[tuple[MetadataIndex, BaseItem]]] = {}
    for index, bi in candidates:
        by_object.setdefault(bi.name, []).append((index, bi))
    copies: list[ObjectCopy] = []
    placements: list[CopyPlacement] = []
    upload: list[tuple[MetadataIndex, BaseItem]] = []
    for name in sorted(by_object):
        entries = sorted(by_object[name], key=lambda e: e[1].offset)
        size, obj_crc, tag = base.objects[name]
        src = base_uri.key(name)
        runs = _runs(entries)
        combined = crc.combine_all((bi.crc32c, bi.length) for _, bi in entries)
        whole = len(runs) == 1 and entries[0][1].offset == 0 and _end(entries) == size and combined == obj_crc
        if whole and size <= store.max_copy_object_size:
            copy_runs = [CopyRun(src, 0, size, obj_crc, tag, size)]
            placements.extend(CopyPlacement(index, bi, len(copies), bi.offset) for index, bi in entries)
            copies.append(ObjectCopy(key_of(len(copies)), copy_runs))
            continue
        if not store.server_side_range_copy:
            upload.extend(entries)
            continue
        pieces = [p for run in runs for p in _split(run, part_size, store)]
        # Items longer than a part can be are uploaded; small runs only as the last part.
        too_big = [p for p in pieces if _end(p) - p[0][1].offset > store.max_part_size]
        pieces = [p for p in pieces if not any(p is q for q in too_big)]
        tiny = [p for p in pieces if _end(p) - p[0][1].offset < MIN_COPY_BYTES]
        too_big += tiny
        pieces = [p for p in pieces if not any(p is q for q in tiny)]
        big = [p for p in pieces if _end(p) - p[0][1].offset >= store.min_part_size]
        small = sorted((p for p in pieces if _end(p) - p[0][1].offset < store.min_part_size),
                       key=lambda p: _end(p) - p[0][1].offset, reverse=True)
        keep = big + small[:1]
        if len(keep) > store.max_parts:
            keep = sorted(keep, key=lambda p: _end(p) - p[0][1].offset, reverse=True)[:store.max_parts]
        dropped = [p for p in pieces if not any(p is k for k in keep)] + too_big
        for p in dropped:
            upload.extend(p)
        if not keep:
            continue
        n = len(copies)
        copy_runs = []
        pos = 0
        for p in keep:
            start, end = p[0][1].offset, _end(p)
            copy_runs.append(CopyRun(src, start, end, crc.combine_all((bi.crc32c, bi.length) for _, bi in p),
                                     tag, size))
            for index, bi in p:
                placements.append(CopyPlacement(index, bi, n, pos + bi.offset - start))
            pos += end - start
        copies.append(ObjectCopy(key_of(n), copy_runs))
    return copies, placements, upload


def _end(entries: Sequence[tuple[MetadataIndex, BaseItem]]) -> int:
    return entries[-1][1].offset + entries[-1][1].length


def _runs(entries: Sequence[tuple[MetadataIndex, BaseItem]]) -> list[list[tuple[MetadataIndex, BaseItem]]]:
    """Maximal runs of items that lie back to back in the base object."""
    runs: list[list[tuple[MetadataIndex, BaseItem]]] = []
    for e in entries:
        if runs and _end(runs[-1]) == e[1].offset:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _split(run: Sequence[tuple[MetadataIndex, BaseItem]], part_size: int, store: ObjectStore
           ) -> list[list[tuple[MetadataIndex, BaseItem]]]:
    """Cut a run at item boundaries into pieces of about ``part_size`` (at most the store's largest part)."""
    limit = min(max(part_size, store.min_part_size), store.max_part_size)
    out: list[list[tuple[MetadataIndex, BaseItem]]] = []
    size = 0
    for e in run:
        if not out or (size + e[1].length > limit and out[-1]):
            out.append([])
            size = 0
        out[-1].append(e)
        size += e[1].length
    return out
