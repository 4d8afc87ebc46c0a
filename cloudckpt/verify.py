"""Check a whole checkpoint without loading it into a model.

:func:`verify` answers "would this checkpoint load, byte for byte as saved?":

* **structure** (always): ``.metadata`` exists and unpickles with the
  allow-list of :mod:`cloudckpt.safe_pickle`; every stored item has a storage
  entry; every entry names an existing object and lies inside it;
* **checksums** (when cloudckpt's manifest is present): every object's size and
  whole-object CRC32C, every item's CRC32C and every tensor payload's CRC32C.
  Objects are streamed in ranged pieces on the :class:`TransferEngine`, so
  memory stays at ``max_concurrency x piece_size`` whatever the checkpoint size;
* **safety** (always): every ``relative_path`` must name an object inside the
  checkpoint, and every byte item (a pickled Python object) is loaded with the
  restricted unpickler of :mod:`cloudckpt.safe_pickle`, exactly as
  :func:`cloudckpt.load` does by default: an item naming a class outside the
  allow-list is reported with its key and the class (nothing is executed), and
  a byte item that holds a tensor (a tensor key re-declared as bytes) is reported
  as a kind mismatch;
* **contents** (``deep=True``): every tensor item is parsed as a ``torch.save``
  record and its dtype and shape compared with the metadata; records that are
  not plain dense tensors go through the same restricted loader.

A checkpoint written by stock DCP has no manifest: its structure (and, with
``deep=True``, its records) are checked, and the report says that checksums
were not verified.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from cloudckpt import crc, layout, safe_pickle, transforms
from cloudckpt.errors import (
    CheckpointNotFoundError,
    CloudCheckpointError,
    IntegrityError,
    ObjectNotFoundError,
    TransferError,
    UnsafeCheckpointItemError,
    UnsafeMetadataError,
    UnsafePathError,
    UnsupportedTransformError,
)
from cloudckpt.manifest import Manifest, check_metadata_bytes, find_manifest
from cloudckpt.safe_pickle import MAX_METADATA_BYTES, load_metadata
from cloudckpt.store import ObjectStore, open_store
from cloudckpt.transfer import TransferEngine, TransferOptions
from cloudckpt.uri import StorageURI, parse_uri

__all__ = ["VerifyReport", "verify"]

MiB = 1024 * 1024
#: Bytes of every item kept from its start and its end for parsing. A torch.save
#: record's zip framing is ~0.7 KB before the payload and ~0.9 KB after it.
_WINDOW = 64 * 1024
#: Items whose structure needs the whole record (non-dense tensors, odd archives)
#: are fetched whole up to this size; larger ones are reported as not parsed.
_FULL_FETCH_LIMIT = 512 * MiB
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found.

    ``problems`` is empty iff ``ok``; each problem names the object, the item
    (state-dict key) where there is one, and what is wrong. ``notes`` are
    facts that are not problems (no manifest, unreferenced objects...).
    ``checksums_verified`` is False when the checkpoint has no cloudckpt
    manifest, i.e. only its structure could be checked. ``unsupported`` lists
    the items stored through a stream transform (``transform_descriptors``)
    that this process cannot decode; they are problems (a load would fail),
    not corruption.
    """

    uri: str
    ok: bool
    objects_checked: int
    items_checked: int
    bytes_checked: int
    problems: list[str] = dataclasses.field(default_factory=list)
    checksums_verified: bool = False
    deep: bool = True
    notes: list[str] = dataclasses.field(default_factory=list)
    #: Items stored through a stream transform this process cannot decode (also in ``problems``:
    #: a load would fail). Not corruption: install or register the extension, see each message.
    unsupported: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        return dataclasses.asdict(self)


class _Unavailable(Exception):
    """A parse needed bytes outside the kept head/tail windows of an item."""


class _SparseFile(io.RawIOBase):
    """A read-only file of ``length`` bytes of which only some windows are known.

    Lets :mod:`zipfile` read an item's central directory and local headers from
    the kept windows without the payload in memory; reading anywhere else raises
    :class:`_Unavailable`.
    """

    def __init__(self, length: int, windows: list[tuple[int, bytes | bytearray]]) -> None:
        super().__init__()
        self._length = length
        self._windows = windows
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        want = min(out.nbytes, max(0, self._length - self._pos))
        got = 0
        while got < want:
            pos = self._pos + got
            for start, data in self._windows:
                if start <= pos < start + len(data):
                    n = min(want - got, start + len(data) - pos)
                    out[got:got + n] = memoryview(data)[pos - start:pos - start + n]
                    got += n
                    break
            else:
                raise _Unavailable(pos)
        self._pos += got
        return got


def _zip_members(f: io.RawIOBase, length: int) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size), checking every local header.

    Reads only the central directory and local headers, never member data,
    and does not check zip CRCs (cloudckpt writes records with the zip CRC off;
    CRC32C in the manifest protects the bytes instead).
    """
    zf = zipfile.ZipFile(f)
    out: dict[str, tuple[int, int]] = {}
    for zi in zf.infolist():
        f.seek(zi.header_offset)
        raw = f.read(_LOCAL_HEADER.size)
        if raw is None or len(raw) != _LOCAL_HEADER.size:
            raise zipfile.BadZipFile(f"truncated local header of {zi.filename}")
        h = _LOCAL_HEADER.unpack(raw)
        if h[0] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header signature for {zi.filename}")
        data_offset = zi.header_offset + _LOCAL_HEADER.size + h[9] + h[10]
        if data_offset + zi.file_size > length:
            raise zipfile.BadZipFile(f"member {zi.filename} runs past the end of the record")
        if zi.compress_type != zipfile.ZIP_STORED:
            raise zipfile.BadZipFile(f"member {zi.filename} is compressed; torch.save never compresses")
        out[zi.filename] = (data_offset, zi.file_size)
    return out


def _read_member(f: io.RawIOBase, members: dict[str, tuple[int, int]], name: str) -> bytes:
    off, size = members[name]
    f.seek(off)
    data = f.read(size)
    if data is None or len(data) != size:
        raise zipfile.BadZipFile(f"truncated member {name}")
    return data


def _parse_record(f: io.RawIOBase, length: int) -> layout.TensorRecord:
    """The :func:`layout.parse_tensor_record` logic over a (sparse) file.

    data.pkl is read with layout's record unpickler, which resolves only the
    tensor-rebuild function and storage classes and constructs nothing, so a
    crafted record cannot run code here either.
    """
    members = _zip_members(f, length)
    pkl = next((n for n in members if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
        raise ValueError("no data.pkl in archive")
    root = pkl[: -len("data.pkl")]
    up = layout._RecordUnpickler(io.BytesIO(_read_member(f, members, pkl)))
    obj = up.load()
    if not (isinstance(obj, tuple) and len(obj) == 5 and obj[0] == "tensor"):
        raise ValueError("archive does not hold a single plain tensor")
    _, (_, key, dtype), storage_offset, shape, stride = obj
    name = f"{root}data/{key}"
    if name not in members:
        raise ValueError(f"missing record {name}")
    doff, dsize = members[name]
    return layout.TensorRecord(doff, dsize, dtype, storage_offset, tuple(shape), tuple(stride))


@dataclasses.dataclass(eq=False)
class _Item:
    """One stored item being checked while its object streams past."""

    label: str
    obj: str
    kind: str                      # "tensor" or "bytes"
    start: int
    length: int
    expected_crc: int | None
    payload_offset: int | None     # relative to the item, from the manifest
    expected_payload_crc: int | None
    chunk: tuple[torch.dtype, list[int]] | None
    descriptors: tuple[str, ...] = ()  # stream transforms (e.g. zstd): the stored bytes are encoded
    decoded_limit: int = 0             # the most bytes the item may decode to
    unsupported: bool = False          # a transform this process cannot decode (already reported)
    crc: int = 0
    payload_crc: int = 0
    checked: bool = False          # byte item already run through the restricted loader
    head: bytearray = dataclasses.field(default_factory=bytearray)
    tail: bytearray = dataclasses.field(default_factory=bytearray)

    @property
    def end(self) -> int:
        return self.start + self.length

    @functools.cached_property
    def payload_span(self) -> tuple[int, int] | None:
        """Absolute [start, end) of the tensor payload, when the manifest and metadata give it."""
        if self.payload_offset is None or self.chunk is None or self.descriptors:
            return None
        numel = 1
        for s in self.chunk[1]:
            numel *= s
        nbytes = numel * torch.empty((), dtype=self.chunk[0]).element_size()
        start = self.start + self.payload_offset
        return (start, start + nbytes) if start + nbytes <= self.end else None

    def head_len(self) -> int:
        return min(self.length, _WINDOW)

    def tail_start(self) -> int:
        return max(self.head_len(), self.length - _WINDOW)


@dataclasses.dataclass(eq=False)
class _Obj:
    """One object being streamed: its items in offset order and running CRC."""

    name: str
    key: str
    size: int                      # bytes to read (the object's actual size)
    expected_size: int | None
    expected_crc: int | None
    items: list[_Item]
    crc: int = 0
    cursor: int = 0
    failed: bool = False


def _label(idx: MetadataIndex, multi_chunk: bool) -> str:
    if multi_chunk and idx.offset is not None:
        return f"{idx.fqn} (chunk at {list(idx.offset)})"
    return idx.fqn


class _Verifier:
    def __init__(self, uri: StorageURI, store: ObjectStore, deep: bool, max_concurrency: int,
                 progress: Callable[[int], None] | None, piece_size: int) -> None:
        self.uri = uri
        self.store = store
        self.deep = deep
        self.progress = progress
        self.piece_size = piece_size
        self.max_concurrency = max(1, max_concurrency)
        self.engine = TransferEngine(store, TransferOptions(max_concurrency=self.max_concurrency))
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.unsupported: list[str] = []
        self._byte_items: list[_Item] = []
        self.bytes_checked = 0

    def url(self, name: str) -> str:
        return self.store.url(self.uri.key(name))

    def problem(self, name: str, item: str | None, what: str) -> None:
        where = self.url(name) + (f": item {item!r}" if item else "")
        self.problems.append(f"{where}: {what}")

    # -- driver -------------------------------------------------------------------------
    def run(self) -> VerifyReport:
        base = self.uri.key("")
        listing = {}
        for info in self.store.list(base):
            rel = info.key[len(base):]
            if rel:  # sub-folder objects too (s3torchconnector writes epoch_3/__0_0.distcp)
                listing[rel] = info
        if layout.METADATA_NAME not in listing:
            meta_url = self.url(layout.METADATA_NAME)
            if listing:
                raise CheckpointNotFoundError(
                    f"{self.uri} is not a committed checkpoint: {meta_url} does not exist (the save failed or is "
                    "still running); there is nothing to verify. Remove leftovers with `cloudckpt gc`"
                )
            raise CheckpointNotFoundError(
                f"no checkpoint at {self.uri}: {meta_url} does not exist; list checkpoints with `cloudckpt ls`"
            )
        try:
            meta_blob = self.store.get(self.uri.key(layout.METADATA_NAME), max_size=MAX_METADATA_BYTES)
        except ObjectNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"{self.url(layout.METADATA_NAME)} disappeared while verifying (deleted concurrently?)") from exc
        manifest = self._manifest(meta_blob)
        try:
            check_metadata_bytes(meta_blob, manifest, self.url(layout.METADATA_NAME))
        except IntegrityError as exc:
            # Still parsed below (the unpickler is restricted, so that is safe) for detail.
            self.problems.append(str(exc))
        try:
            metadata = load_metadata(meta_blob, self.url(layout.METADATA_NAME))
        except UnsafeMetadataError as exc:
            self.problems.append(str(exc))
            return self.report(0, 0, checksums=False)
        objects, n_items = self._structure(metadata, listing, manifest)
        if manifest is None and not any(layout.is_manifest_name(n) for n in listing):
            self.notes.append("no cloudckpt manifest (written by stock DCP or another tool): checksums not "
                              "verified, structural checks only")
        if objects:
            self._stream(objects)
        for it in self._byte_items:
            if not it.checked:
                self._check_bytes(it)
        referenced = {o.name for o in objects} | {
            info.relative_path for info in metadata.storage_data.values()}
        stale = sorted(n for n in listing if "/" not in n and n.endswith(layout.DATA_SUFFIX) and n not in referenced)
        if stale:
            self.notes.append(f"{len(stale)} data object(s) not referenced by .metadata (leftovers, safe to "
                              f"delete): {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}")
        n_objects = len({info.relative_path for info in metadata.storage_data.values()}
                        | set(manifest.objects if manifest is not None else ()))
        return self.report(n_objects, n_items, checksums=manifest is not None)

    def report(self, objects: int, items: int, *, checksums: bool) -> VerifyReport:
        return VerifyReport(uri=str(self.uri), ok=not self.problems, objects_checked=objects, items_checked=items,
                            bytes_checked=self.bytes_checked, problems=list(self.problems),
                            checksums_verified=checksums, deep=self.deep, notes=list(self.notes),
                            unsupported=list(self.unsupported))

    def _manifest(self, meta_blob: bytes) -> Manifest | None:
        try:
            return find_manifest(self.store, self.uri, meta_blob)
        except IntegrityError as exc:
            self.problems.append(f"{exc}; checksums cannot be verified")
            return None

    # -- structure ------------------------------------------------------------------------
    def _structure(self, metadata: Any, listing: dict[str, Any], manifest: Manifest | None
                   ) -> tuple[list[_Obj], int]:
        """Check storage entries against metadata and listing; plan what to stream."""
        sdm = metadata.state_dict_metadata
        storage = metadata.storage_data
        stored = {(idx.fqn, None if idx.offset is None else tuple(idx.offset)) for idx in storage}
        chunks: dict[str, dict[tuple[int, ...], list[int]]] = {}
        for fqn, md in sdm.items():
            if isinstance(md, TensorStorageMetadata):
                chunks[fqn] = {tuple(c.offsets): list(c.sizes) for c in md.chunks}
                for off in chunks[fqn]:
                    if (fqn, off) not in stored:
                        self.problems.append(f"{self.url(layout.METADATA_NAME)}: item {fqn!r}: chunk at {list(off)} "
                                             "has no storage entry (the checkpoint cannot load this tensor)")
            elif isinstance(md, BytesStorageMetadata) and (fqn, None) not in stored:
                self.problems.append(f"{self.url(layout.METADATA_NAME)}: item {fqn!r} has no storage entry")

        m_objects = manifest.objects if manifest is not None else {}
        m_items = manifest.items if manifest is not None else {}

        items_by_obj: dict[str, list[_Item]] = {}
        n_items = 0
        for idx, info in storage.items():
            n_items += 1
            name = info.relative_path
            md = sdm.get(idx.fqn)
            multi = isinstance(md, TensorStorageMetadata) and len(md.chunks) > 1
            label = _label(idx, multi)
            unsafe = self._unsafe_path(name)
            if unsafe is not None:
                self.problems.append(f"{self.url(layout.METADATA_NAME)}: item {label!r}: {unsafe}")
                continue
            obj = listing.get(name)
            if obj is None:
                self.problem(name, label, "object is missing")
                continue
            if info.offset < 0 or info.length <= 0 or info.offset + info.length > obj.size:
                self.problem(name, label, f"bytes [{info.offset}, {info.offset + info.length}) lie outside the "
                                          f"object, which has {obj.size} bytes (truncated?)")
                continue
            chunk = None
            kind = "bytes"
            if isinstance(md, TensorStorageMetadata):
                kind = "tensor"
                sizes = chunks.get(idx.fqn, {}).get(tuple(idx.offset) if idx.offset is not None else ())
                if sizes is None:
                    self.problem(name, label, "storage entry matches no chunk in the metadata")
                else:
                    chunk = (md.properties.dtype, sizes)
            elif md is None:
                self.problem(name, label, "storage entry for a key that is not in the metadata")
            row = m_items.get((name, info.offset))
            if manifest is not None and name in m_objects and row is None:
                self.problem(name, label, f"item at offset {info.offset} is not in the manifest")
            if row is not None and row.length != info.length:
                self.problem(name, label, f"manifest says {row.length} bytes, metadata says {info.length}")
                row = None
            item = _Item(
                label=label, obj=name, kind=kind, start=info.offset, length=info.length,
                expected_crc=None if row is None else row.crc32c,
                payload_offset=None if row is None else row.payload_offset,
                expected_payload_crc=None if row is None else row.payload_crc32c,
                chunk=chunk)
            self._transforms(item, info, idx, metadata)
            items_by_obj.setdefault(name, []).append(item)
            if kind == "bytes":
                self._byte_items.append(item)

        objects: list[_Obj] = []
        names = set(m_objects) | (set(items_by_obj) if self.deep else set())
        for name in sorted(names):
            if name not in items_by_obj:
                unsafe = self._unsafe_path(name)
                if unsafe is not None:
                    self.problem(layout.METADATA_NAME, None, f"the manifest lists an object: {unsafe}")
                    continue
            info = listing.get(name)
            expected = m_objects.get(name)
            if info is None:
                if name not in items_by_obj:  # else already reported per item
                    self.problem(name, None, "object listed in the manifest is missing")
                continue
            exp_size = None if expected is None else expected.size
            if exp_size is not None and exp_size != info.size:
                self.problem(name, None, f"object has {info.size} bytes, the manifest says {exp_size} "
                                         "(truncated or replaced)")
            items = sorted(items_by_obj.get(name, []), key=lambda i: i.start)
            for a, b in zip(items, items[1:], strict=False):  # neighbours
                if b.start < a.end:
                    self.problem(name, b.label, f"overlaps item {a.label!r} in the object")
            objects.append(_Obj(name=name, key=self.uri.key(name), size=info.size, expected_size=exp_size,
                                expected_crc=None if expected is None else expected.crc32c, items=items))
        return objects, n_items

    def _transforms(self, it: _Item, info: Any, idx: MetadataIndex, metadata: Any) -> None:
        """Note the item's stream transforms; report (once) those this process cannot decode."""
        descriptors = getattr(info, "transform_descriptors", None)
        if not descriptors:
            return
        it.descriptors = tuple(descriptors)
        it.decoded_limit = transforms.decoded_limit(metadata, idx)
        try:
            transforms.check_supported(descriptors, f"item {it.label!r} in {self.url(it.obj)}")
        except UnsupportedTransformError as exc:
            it.unsupported = True
            self.unsupported.append(str(exc))
            self.problems.append(str(exc))

    def _unsafe_path(self, name: Any) -> str | None:
        """Why ``name`` does not resolve inside the checkpoint, or None if it does."""
        try:
            layout.check_relative_path(name, self.url(layout.METADATA_NAME))
        except UnsafePathError as exc:
            return str(exc)
        if self.uri.is_local:
            import os

            root = os.path.realpath(self.uri.prefix)
            real = os.path.realpath(self.uri.key(name))
            if not real.startswith(root.rstrip(os.sep) + os.sep):
                return f"object path {name!r} resolves to {real}, outside the checkpoint directory (a symlink)"
        return None

    # -- streaming --------------------------------------------------------------------------
    def _stream(self, objects: list[_Obj]) -> None:
        pieces = [(o, start, min(self.piece_size, o.size - start))
                  for o in objects for start in range(0, o.size, self.piece_size)]
        total = sum(n for _, _, n in pieces)
        set_total = getattr(self.progress, "set_total", None)
        if callable(set_total):
            set_total(total)
        buffers: list[bytearray] = []
        for i in range(0, len(pieces), self.max_concurrency):
            batch = [p for p in pieces[i:i + self.max_concurrency] if not p[0].failed]
            while len(buffers) < len(batch):
                buffers.append(bytearray(self.piece_size))
            views = [memoryview(buffers[k])[:n] for k, (_, _, n) in enumerate(batch)]
            reads = [(o.key, start, v) for (o, start, _), v in zip(batch, views, strict=True)]
            try:
                self.engine.download_ranges(reads, progress=self.progress)
            except (ObjectNotFoundError, TransferError):
                # Something changed under us (deleted or truncated object): find out which
                # pieces fail, one by one, and report those objects.
                for (o, start, _), v in zip(batch, views, strict=True):
                    if o.failed:
                        continue
                    try:
                        self.store.get_range(o.key, start, v)
                    except (ObjectNotFoundError, TransferError) as exc:
                        o.failed = True
                        self.problem(o.name, None, f"could not be read at offset {start}: {exc}")
            for (o, start, _), v in zip(batch, views, strict=True):
                if not o.failed:
                    self._piece(o, start, v)
                    self.bytes_checked += v.nbytes
                    if start + v.nbytes >= o.size:
                        self._finish_object(o)

    def _piece(self, o: _Obj, start: int, view: memoryview) -> None:
        end = start + view.nbytes
        o.crc = crc.crc32c_extend(o.crc, view)
        k = o.cursor
        while k < len(o.items) and o.items[k].start < end:
            it = o.items[k]
            lo, hi = max(start, it.start), min(end, it.end)
            if hi > lo:
                it.crc = crc.crc32c_extend(it.crc, view[lo - start:hi - start])
                span = it.payload_span
                if span is not None:
                    plo, phi = max(lo, span[0]), min(hi, span[1])
                    if phi > plo:
                        it.payload_crc = crc.crc32c_extend(it.payload_crc, view[plo - start:phi - start])
                if self.deep and not it.descriptors:  # encoded bytes: parsed whole, after decoding
                    self._keep_windows(it, start, view, lo, hi)
                if it.end <= end:
                    self._finish_item(it)
            k += 1
        while o.cursor < len(o.items) and o.items[o.cursor].end <= end:
            o.cursor += 1

    @staticmethod
    def _keep_windows(it: _Item, start: int, view: memoryview, lo: int, hi: int) -> None:
        # Head and tail of the item, in order, as the pieces stream past.
        h_end = it.start + it.head_len()
        if lo < h_end:
            it.head += view[lo - start:min(hi, h_end) - start]
        t_start = it.start + it.tail_start()
        if hi > t_start:
            it.tail += view[max(lo, t_start) - start:hi - start]

    def _finish_object(self, o: _Obj) -> None:
        if o.expected_crc is not None and (o.expected_size is None or o.expected_size == o.size) \
                and o.crc != o.expected_crc:
            self.problem(o.name, None, f"CRC32C {o.crc:#010x} does not match the manifest's {o.expected_crc:#010x}: "
                                       "stored bytes are corrupt")

    def _finish_item(self, it: _Item) -> None:
        if it.expected_crc is not None and it.crc != it.expected_crc:
            self.problem(it.obj, it.label, f"CRC32C {it.crc:#010x} of bytes [{it.start}, {it.end}) does not match "
                                           f"the manifest's {it.expected_crc:#010x}: stored bytes are corrupt; "
                                           "restore the object or use an earlier checkpoint")
        elif it.expected_payload_crc is not None and it.payload_span is not None \
                and it.payload_crc != it.expected_payload_crc:
            self.problem(it.obj, it.label, f"tensor payload CRC32C {it.payload_crc:#010x} does not match the "
                                           f"manifest's {it.expected_payload_crc:#010x}")
        if self.deep:
            try:
                self._parse(it)
            finally:
                it.head = bytearray()
                it.tail = bytearray()

    # -- parsing --------------------------------------------------------------------------------
    def _sparse(self, it: _Item) -> _SparseFile:
        windows: list[tuple[int, bytes | bytearray]] = [(0, it.head)]
        if it.tail:
            windows.append((it.tail_start(), it.tail))
        return _SparseFile(it.length, windows)

    def _fetch_whole(self, it: _Item, why: str) -> bytearray | None:
        if it.length > _FULL_FETCH_LIMIT:
            self.notes.append(f"{self.url(it.obj)}: item {it.label!r} not parsed ({why}; {it.length} bytes is "
                              "more than verify fetches whole)")
            return None
        buf = bytearray(it.length)
        self.store.get_range(self.uri.key(it.obj), it.start, memoryview(buf))
        if it.descriptors:
            return self._decode(it, buf)
        return buf

    def _decode(self, it: _Item, stored: bytearray) -> bytearray | None:
        """The item's record with its stream transforms undone (bounded), or None with the problem reported."""
        if it.unsupported:
            return None  # reported once, in _transforms
        try:
            decoded = transforms.decode_item(memoryview(stored), it.descriptors,
                                             f"item {it.label!r} in {self.url(it.obj)}", it.decoded_limit)
        except UnsupportedTransformError as exc:  # e.g. registered between the two looks
            it.unsupported = True
            self.unsupported.append(str(exc))
            self.problems.append(str(exc))
            return None
        except IntegrityError as exc:  # includes DecodedTooLargeError
            self.problems.append(str(exc))
            return None
        return decoded.obj if isinstance(decoded.obj, bytearray) else bytearray(decoded)

    def _parse(self, it: _Item) -> None:
        if it.descriptors:
            self._parse_decoded(it)
            return
        if it.kind == "bytes":
            self._parse_bytes(it)
            if not it.checked:
                self._check_bytes(it)
        else:
            self._parse_tensor(it)

    def _parse_decoded(self, it: _Item) -> None:
        """Parse a transformed (e.g. compressed) item: fetch it whole, decode it, check the record."""
        if it.unsupported:
            it.checked = True
            return
        if it.kind == "tensor" and it.decoded_limit > _FULL_FETCH_LIMIT:
            # Decoding needs the whole record in memory; a load does that, verify stays bounded.
            self.notes.append(f"{self.url(it.obj)}: item {it.label!r} not parsed (stream-transformed, and its "
                              f"record may decode to {it.decoded_limit} bytes, more than verify decodes whole)")
            return
        whole = self._whole_or_report(it, "stream-transformed item")
        if whole is None:
            it.checked = True
            return
        if it.kind == "bytes":
            self._check_bytes(it, whole)
            return
        if it.expected_payload_crc is not None and it.payload_offset is not None and it.chunk is not None:
            # The manifest's payload offset and CRC are of the decoded record.
            nbytes = torch.empty((), dtype=it.chunk[0]).element_size() * math.prod(it.chunk[1])
            got = crc.crc32c(memoryview(whole)[it.payload_offset:it.payload_offset + nbytes])
            if got != it.expected_payload_crc:
                self.problem(it.obj, it.label, f"decoded tensor payload CRC32C {got:#010x} does not match the "
                                               f"manifest's {it.expected_payload_crc:#010x}")
        try:
            rec = _parse_record(io.BytesIO(whole), len(whole))  # type: ignore[arg-type]
        except (zipfile.BadZipFile, struct.error, OSError, EOFError) as exc:
            self.problem(it.obj, it.label, f"decoded bytes are not a readable torch.save record ({exc})")
            return
        except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind
            self._load_tensor(it, f"{type(exc).__name__}: {exc}", whole)
            return
        if not rec.is_dense():
            self._load_tensor(it, "record is not a dense tensor", whole)
            return
        self._check_tensor(it, rec.dtype, list(rec.size))

    def _whole_or_report(self, it: _Item, why: str) -> bytearray | None:
        try:
            return self._fetch_whole(it, why)
        except CloudCheckpointError as exc:
            self.problem(it.obj, it.label, f"could not be read: {exc}")
            return None

    def _restricted_load(self, it: _Item, whole: bytearray, what: str) -> tuple[bool, Any]:
        """``(True, obj)`` from the restricted loader a load uses, or ``(False, None)`` with the problem reported."""
        try:
            return True, safe_pickle.load_byte_item(whole, fqn=it.label, where=self.url(it.obj))
        except UnsafeCheckpointItemError as exc:
            self.problems.append(str(exc))
        except CloudCheckpointError as exc:
            self.problem(it.obj, it.label, f"{what} does not load: {exc}")
        return False, None

    def _check_bytes(self, it: _Item, whole: bytearray | None = None) -> None:
        """Run a byte item through the restricted loader, as a load would; nothing stored is executed."""
        it.checked = True
        if whole is None:
            if it.unsupported:
                return
            whole = self._whole_or_report(it, "byte item too large to check")
        if whole is None:
            return
        loaded, obj = self._restricted_load(it, whole, "byte item")
        if loaded and isinstance(obj, torch.Tensor):
            self.problem(it.obj, it.label, "is declared in .metadata as a byte item but holds a tensor (DCP "
                                           "stores tensors as tensor items): a load would replace the model's "
                                           "tensor with it; the metadata was probably altered")

    def _parse_bytes(self, it: _Item) -> None:
        try:
            try:
                members = _zip_members(self._sparse(it), it.length)
            except _Unavailable:
                whole = self._fetch_whole(it, "its zip directory is unusually large")
                if whole is None:
                    return
                members = _zip_members(io.BytesIO(whole), it.length)  # type: ignore[arg-type]
        except (zipfile.BadZipFile, ValueError, struct.error, OSError) as exc:
            self.problem(it.obj, it.label, f"not a readable torch.save archive ({exc})")
            return
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in members):
            self.problem(it.obj, it.label, "torch.save archive has no data.pkl")

    def _parse_tensor(self, it: _Item) -> None:
        try:
            try:
                rec = _parse_record(self._sparse(it), it.length)
            except _Unavailable:
                whole = self._fetch_whole(it, "its zip directory is unusually large")
                if whole is None:
                    return
                rec = _parse_record(io.BytesIO(whole), it.length)  # type: ignore[arg-type]
        except (zipfile.BadZipFile, struct.error, OSError, EOFError) as exc:
            self.problem(it.obj, it.label, f"not a readable torch.save record ({exc})")
            return
        except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind
            # Not a plain single-tensor record: the restricted loader judges it, as a load would.
            self._load_tensor(it, f"{type(exc).__name__}: {exc}")
            return
        if it.payload_offset is not None and rec.payload_offset != it.payload_offset:
            self.problem(it.obj, it.label, f"payload starts at {rec.payload_offset} in the record, the manifest "
                                           f"says {it.payload_offset}")
        if not rec.is_dense():
            self._load_tensor(it, "record is not a dense tensor")
            return
        self._check_tensor(it, rec.dtype, list(rec.size))

    def _load_tensor(self, it: _Item, why: str, whole: bytearray | None = None) -> None:
        if whole is None:
            whole = self._fetch_whole(it, why)
        if whole is None:
            return
        loaded, t = self._restricted_load(it, whole, "tensor record")
        if not loaded:
            return
        if not isinstance(t, torch.Tensor):
            self.problem(it.obj, it.label, f"record holds a {type(t).__name__}, not a tensor")
            return
        self._check_tensor(it, t.dtype, list(t.shape))

    def _check_tensor(self, it: _Item, dtype: torch.dtype, shape: list[int]) -> None:
        if it.chunk is None:
            return
        want_dtype, want_shape = it.chunk
        if dtype != want_dtype:
            self.problem(it.obj, it.label, f"stored dtype {dtype} but the metadata says {want_dtype}")
        if shape != list(want_shape):
            self.problem(it.obj, it.label, f"stored shape {shape} but the metadata says {list(want_shape)}")


def verify(
    uri: str | StorageURI,
    *,
    deep: bool = True,
    max_concurrency: int = 16,
    progress: Callable[[int], None] | None = None,
    piece_size: int = 8 * MiB,
    **store_options: Any,
) -> VerifyReport:
    """Check the checkpoint at ``uri`` and return a :class:`VerifyReport`; never loads it into a model.

    ``deep`` also parses every tensor record (dtype and shape against the
    metadata). Byte items are always loaded with the restricted unpickler (as
    :func:`cloudckpt.load` does by default, never running stored code); one that
    names a class outside the allow-list, or holds a tensor, is a problem.
    Every ``relative_path`` must resolve inside the checkpoint. ``max_concurrency`` ranged reads of ``piece_size``
    bytes are in flight at once (memory ~ their product). ``progress`` is
    called with byte counts as they are checked; if it has a ``set_total(n)``
    method, that is called first with the number of bytes to read.
    ``store_options`` (``endpoint_url=``, ``region=``, ``project=`` ...) configure
    the object store as for :func:`cloudckpt.storage_reader`.

    Raises :class:`~cloudckpt.CheckpointNotFoundError` when there is no
    committed checkpoint (no ``.metadata``) at ``uri``, and the store's errors
    (access denied, unreachable endpoint, missing bucket) as they are.
    """
    if piece_size < 1:
        raise ValueError(f"piece_size must be positive, got {piece_size}")
    u = parse_uri(uri)
    store = open_store(u, **store_options)
    return _Verifier(u, store, deep, max_concurrency, progress, piece_size).run()
