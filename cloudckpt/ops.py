"""Checkpoint operations on a store: list, describe, copy, delete, garbage-collect.

The library behind the ``cloudckpt`` command (which only parses arguments and
renders these results) and behind :class:`~cloudckpt.manager.CheckpointManager`'s
deletion. Every function returns a frozen dataclass with a ``to_dict()`` for
JSON output. ``verify`` lives in :mod:`cloudckpt.verify`.

What a checkpoint *is* (committed, uncommitted, or not one at all) is defined
once, in :func:`cloudckpt.layout.checkpoint_state`; everything here goes
through it. A checkpoint's objects are the ones its commit objects' metadata
refer to (``storage_data[*].relative_path``, which may lie in sub-folders, as
s3torchconnector's prefix strategies write them), plus the commit objects and
manifests: they are enumerated from ``.metadata``, never guessed from a
listing, and every name is validated with :func:`cloudckpt.layout.check_relative_path`.

Deleting never follows a symbolic link: a symlinked local checkpoint directory
is unlinked, its target left alone.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import mmap
import os
import posixpath
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cloudckpt import layout
from cloudckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IntegrityError,
    InvalidURIError,
    NotACheckpointError,
    UnsafeDestinationError,
    UnsafeMetadataError,
)
from cloudckpt.store import ObjectInfo, ObjectStore
from cloudckpt.uri import StorageURI

__all__ = [
    "StoredObject", "CheckpointSummary", "RootListing", "CheckpointListing", "list_uri",
    "ItemInfo", "CheckpointInfo", "checkpoint_info",
    "CheckpointObjects", "checkpoint_objects",
    "CopyResult", "copy_checkpoint",
    "RemovalPlan", "plan_removal", "remove_checkpoint",
    "StaleUpload", "StaleCheckpoint", "GCPlan", "plan_gc", "run_gc",
    "is_committed", "delete_checkpoint",
]

Progress = Callable[[int], None]
_MiB = 1024 * 1024


def _iso(t: _dt.datetime | None) -> str | None:
    return None if t is None else _utc(t).isoformat()


def _utc(t: _dt.datetime) -> _dt.datetime:
    # Stores report aware times; a naive one is taken to be UTC (as S3 and GCS mean it).
    return t.replace(tzinfo=_dt.timezone.utc) if t.tzinfo is None else t.astimezone(_dt.timezone.utc)


def _as_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict (datetimes as ISO strings, tuples as lists)."""
    def conv(v: Any) -> Any:
        if isinstance(v, _dt.datetime):
            return _iso(v)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


# -- listing ------------------------------------------------------------------------------------


def _listing(store: ObjectStore, uri: StorageURI) -> dict[str, ObjectInfo]:
    """Every object below ``uri`` by its name relative to it (sub-folders included)."""
    base = uri.key("")
    return {info.key[len(base):]: info for info in store.list(base) if len(info.key) > len(base)}


def _by_child(listing: Mapping[str, ObjectInfo]) -> dict[str, dict[str, ObjectInfo]]:
    """Objects one level down, by child prefix: {child: {name relative to the child: info}}."""
    out: dict[str, dict[str, ObjectInfo]] = {}
    for rel, info in listing.items():
        child, sep, rest = rel.partition("/")
        if sep and rest:
            out.setdefault(child, {})[rest] = info
    return out


def _uploads_by_child(store: ObjectStore, uri: StorageURI) -> dict[str, list[Any]]:
    """Unfinished multipart uploads below ``uri`` by child prefix ('' for uploads directly in it)."""
    base = uri.key("")
    out: dict[str, list[Any]] = {}
    for u in store.list_multipart_uploads(base):
        child, sep, _ = u.key[len(base):].partition("/")
        out.setdefault(child if sep else "", []).append(u)
    return out


def is_committed(store: ObjectStore, uri: StorageURI) -> bool:
    """True if ``uri`` holds a commit object (:data:`cloudckpt.layout.COMMIT_OBJECT_NAMES`): one HEAD or two."""
    return any(store.head(uri.key(name)) is not None for name in layout.COMMIT_OBJECT_NAMES)


@dataclass(frozen=True)
class StoredObject:
    """One object of a checkpoint (``name`` relative to the checkpoint)."""

    name: str
    size: int
    modified: _dt.datetime | None


@dataclass(frozen=True)
class CheckpointSummary:
    """One child of a root: a checkpoint (committed or not) or some other prefix."""

    name: str
    uri: str
    step: int | None
    kind: str  # "checkpoint" or "prefix"
    committed: bool | None
    objects: int
    bytes: int
    modified: _dt.datetime | None
    uploads_in_progress: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return _as_dict(self)


@dataclass(frozen=True)
class RootListing:
    """What ``ls`` shows for a root: its checkpoints (by step) and other prefixes."""

    uri: str
    entries: tuple[CheckpointSummary, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``kind: root``)."""
        return {"uri": self.uri, "kind": "root", "checkpoints": [e.to_dict() for e in self.entries]}


@dataclass(frozen=True)
class CheckpointListing:
    """What ``ls`` shows for one checkpoint: every object below it, sub-folders included."""

    uri: str
    committed: bool
    objects: tuple[StoredObject, ...]
    bytes: int
    uploads_in_progress: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``kind: checkpoint``)."""
        return dict(_as_dict(self), kind="checkpoint")


def _summary(root: StorageURI, child: str, objs: Mapping[str, ObjectInfo], uploads: list[Any]) -> CheckpointSummary:
    state = layout.checkpoint_state(objs)
    uri = str(root.child(child))
    total = sum(i.size for i in objs.values())
    if state is None and not (uploads and not any("/" not in n for n in objs)):
        return CheckpointSummary(child, uri, None, "prefix", None, len(objs), total, None, 0)
    commit = next((objs[n] for n in layout.COMMIT_OBJECT_NAMES if n in objs), None)
    times = [i.last_modified for i in objs.values() if i.last_modified is not None]
    when = commit.last_modified if commit is not None and commit.last_modified else (max(times) if times else None)
    return CheckpointSummary(child, uri, layout.parse_step_name(child), "checkpoint", state == layout.COMMITTED,
                             len(objs), total, when, len(uploads))


def list_uri(store: ObjectStore, uri: StorageURI) -> RootListing | CheckpointListing:
    """The checkpoint at ``uri`` with its objects, or the checkpoints and prefixes under a root."""
    listing = _listing(store, uri)
    uploads = _uploads_by_child(store, uri)
    if not listing and not uploads:
        raise CheckpointNotFoundError(f"nothing under {uri}; check the URI (and --endpoint-url)")
    state = layout.checkpoint_state(listing)
    direct_uploads = uploads.get("", [])
    if state is not None or (direct_uploads and not any("/" not in n for n in listing)):
        objs = tuple(StoredObject(n, i.size, i.last_modified) for n, i in sorted(listing.items()))
        return CheckpointListing(str(uri), state == layout.COMMITTED, objs, sum(o.size for o in objs),
                                 len(direct_uploads))
    children = _by_child(listing)
    for child in uploads:
        if child:
            children.setdefault(child, {})  # a save whose only objects are unfinished uploads
    entries = [_summary(uri, c, objs, uploads.get(c, [])) for c, objs in children.items()]
    entries.sort(key=lambda e: (e.kind != "checkpoint", e.step is None, e.step or 0, e.name))
    return RootListing(str(uri), tuple(entries))


# -- a checkpoint's objects ---------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointObjects:
    """A committed checkpoint's objects, enumerated from its commit objects' metadata.

    ``referenced`` maps every data object ``.metadata`` points at to the bytes
    its items need (the end of the last item); ``commits`` are the commit
    objects in the order a copy writes them (see :func:`cloudckpt.layout.commit_objects`);
    ``manifests`` are cloudckpt's manifests beside them; ``metadata`` holds
    each commit object's parsed metadata and ``blobs`` its bytes.
    """

    uri: str
    commits: tuple[str, ...]
    manifests: tuple[str, ...]
    referenced: Mapping[str, int]
    metadata: Mapping[str, Any]
    blobs: Mapping[str, bytes]

    @property
    def payload(self) -> list[str]:
        """Everything a copy transfers before the commit: data, manifests, non-committing rank metadata."""
        late = set(layout.COMMIT_OBJECT_NAMES)
        names = set(self.referenced) | set(self.manifests) | {c for c in self.commits if c not in late}
        return sorted(names - late)

    def missing(self, listing: Mapping[str, ObjectInfo]) -> list[str]:
        """Referenced objects that are absent from ``listing`` or shorter than their items need."""
        return sorted(n for n, need in self.referenced.items() if n not in listing or listing[n].size < need)


def _references(metadata: Any, where: str) -> dict[str, int]:
    """Object name -> bytes needed, from a DCP Metadata's ``storage_data`` (every field checked)."""
    table = getattr(metadata, "storage_data", None)
    if not isinstance(table, dict) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise UnsafeMetadataError(f"{where} is not a DCP checkpoint's metadata (no storage_data table); "
                                  "the object is corrupt or was not written by DCP")
    need: dict[str, int] = {}
    for info in table.values():
        name = layout.check_relative_path(getattr(info, "relative_path", None), where)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and _byte_count(offset) and _byte_count(length)):
            raise UnsafeMetadataError(f"{where} records item offset {offset!r} / length {length!r} in {name!r}, "
                                      "which are not byte counts; the metadata is corrupt or was tampered with")
        need[name] = max(need.get(name, 0), offset + length)
    return need


def _byte_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def checkpoint_objects(store: ObjectStore, uri: StorageURI,
                       listing: Mapping[str, ObjectInfo] | None = None) -> CheckpointObjects:
    """Read every commit object of the committed checkpoint at ``uri`` and enumerate its objects.

    Raises CheckpointNotFoundError if ``uri`` is not a committed checkpoint and
    UnsafeMetadataError for metadata that is unreadable or names an object
    outside the checkpoint.
    """
    from cloudckpt.safe_pickle import MAX_METADATA_BYTES, load_metadata

    listing = _listing(store, uri) if listing is None else listing
    if layout.checkpoint_state(listing) != layout.COMMITTED:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {uri}: {store.url(uri.key(layout.METADATA_NAME))} does not exist; "
            f"list what is there with `cloudckpt ls {uri}`")
    commits = layout.commit_objects(listing)
    referenced: dict[str, int] = {}
    metadata: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    for name in commits:
        where = store.url(uri.key(name))
        blobs[name] = store.get(uri.key(name), max_size=MAX_METADATA_BYTES)
        metadata[name] = load_metadata(blobs[name], where)
        for ref, need in _references(metadata[name], where).items():
            referenced[ref] = max(referenced.get(ref, 0), need)
    manifests = tuple(sorted(n for n in listing if "/" not in n and layout.is_manifest_name(n)))
    return CheckpointObjects(str(uri), tuple(commits), manifests, referenced, metadata, blobs)


def _expected_crcs(store: ObjectStore, uri: StorageURI, objs: CheckpointObjects) -> tuple[dict[str, int], Any]:
    """CRC32C of each data object from the manifest(s) matching the commit objects, and the primary manifest."""
    from cloudckpt.manifest import find_manifest

    expected: dict[str, int] = {}
    primary = None
    for name in objs.commits:
        rank = None if name == layout.METADATA_NAME else int(name[2:-len(layout.METADATA_NAME)])
        found = find_manifest(store, uri, objs.blobs[name], rank)
        if found is None:
            continue
        if name in layout.COMMIT_OBJECT_NAMES:
            primary = found  # commits come in order: .metadata's manifest wins over __0.metadata's
        expected.update({n: o.crc32c for n, o in found.objects.items()})
    return expected, primary


# -- info ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemInfo:
    """One key of the saved state dict."""

    key: str
    kind: str  # "tensor" or "bytes"
    dtype: str | None
    shape: tuple[int, ...] | None
    chunks: int
    bytes: int


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``info`` shows: ranks, items, sizes, creation time and writer of a committed checkpoint."""

    uri: str
    created: str | None
    writer: str
    torch: str | None
    save_id: str | None
    ranks: tuple[int, ...]
    world_size: int | None
    objects: int
    stored_bytes: int
    tensor_bytes: int
    tensors: int
    byte_items: int
    checksums: bool
    items: tuple[ItemInfo, ...]
    #: Referenced objects that are absent or too short (the checkpoint cannot be loaded).
    missing: tuple[str, ...]
    #: Item bytes the save sent from the client (None: the manifest does not say).
    uploaded_bytes: int | None = None
    #: Item bytes the save copied inside the store from its base checkpoint (incremental saves).
    copied_bytes: int | None = None
    #: The base checkpoint those bytes were copied from (None: a full save).
    base: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return _as_dict(self)


def _items(metadatas: Iterable[Any]) -> list[ItemInfo]:
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    byte_lengths: dict[str, int] = {}
    described: dict[str, Any] = {}
    for md in metadatas:
        for idx, info in md.storage_data.items():
            fqn = getattr(idx, "fqn", str(idx))
            byte_lengths[fqn] = byte_lengths.get(fqn, 0) + int(getattr(info, "length", 0))
        described.update(md.state_dict_metadata)
    items = []
    for fqn, md in sorted(described.items()):
        if isinstance(md, TensorStorageMetadata):
            numel = 1
            for s in md.size:
                numel *= s
            nbytes = numel * torch.empty((), dtype=md.properties.dtype).element_size()
            items.append(ItemInfo(fqn, "tensor", str(md.properties.dtype).replace("torch.", ""), tuple(md.size),
                                  len(md.chunks), nbytes))
        elif isinstance(md, BytesStorageMetadata):
            items.append(ItemInfo(fqn, "bytes", None, None, 1, byte_lengths.get(fqn, 0)))
    return items


def checkpoint_info(store: ObjectStore, uri: StorageURI) -> CheckpointInfo:
    """Describe the committed checkpoint at ``uri`` (its objects enumerated from ``.metadata``)."""
    from cloudckpt.errors import CloudCheckpointError

    listing = _listing(store, uri)
    objs = checkpoint_objects(store, uri, listing)
    try:
        _, manifest = _expected_crcs(store, uri, objs)
    except CloudCheckpointError:
        manifest = None  # a damaged manifest is verify's business; info still describes the checkpoint
    doc = manifest.doc if manifest is not None else {}
    names = set(objs.referenced) | set(objs.manifests) | set(objs.commits)
    ranks = sorted({p[0] for n in objs.referenced if (p := layout.parse_data_object_name(n)) is not None})
    items = _items(objs.metadata.values())
    commit = listing.get(objs.commits[-1])
    primary = objs.metadata[objs.commits[-1]]
    storage_meta = getattr(primary, "storage_meta", None)
    world = doc.get("world_size")
    return CheckpointInfo(
        uri=str(uri),
        created=doc.get("created") or _iso(commit.last_modified if commit else None),
        writer=doc.get("writer") or "stock DCP or another tool (no cloudckpt manifest)",
        torch=doc.get("torch"),
        save_id=doc.get("save_id") or getattr(storage_meta, "save_id", None),
        ranks=tuple(ranks),
        world_size=world if isinstance(world, int) else (len(ranks) or None),
        objects=len(names),
        stored_bytes=sum(listing[n].size for n in names if n in listing),
        tensor_bytes=sum(i.bytes for i in items if i.kind == "tensor"),
        tensors=sum(1 for i in items if i.kind == "tensor"),
        byte_items=sum(1 for i in items if i.kind == "bytes"),
        checksums=manifest is not None,
        items=tuple(items),
        missing=tuple(objs.missing(listing)),
        **_transfer_facts(doc),
    )


def _transfer_facts(doc: dict[str, Any]) -> dict[str, Any]:
    """Uploaded vs copied bytes and the base, from the manifest's ``transfer`` record (untrusted: checked)."""
    rec = doc.get("transfer")
    if not isinstance(rec, dict):
        return {}

    def count(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    base = rec.get("base")
    return {"uploaded_bytes": count(rec.get("uploaded_bytes")), "copied_bytes": count(rec.get("copied_bytes")),
            "base": base[:1024] if isinstance(base, str) else None}


# -- copy ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyResult:
    """A finished ``cp``: what was copied and how fast."""

    src: str
    dst: str
    objects: int
    bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return _as_dict(self)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_dirs(root: str, rel_dir: str, created: list[str]) -> str:
    """Create ``root/rel_dir`` one component at a time; refuse anything below ``root`` that is not a real directory.

    ``root`` itself is the user's choice (it may be a symlink); a symlink planted
    *inside* it would redirect writes elsewhere, so it is refused, never followed.
    """
    path = root
    for part in rel_dir.split("/") if rel_dir else []:
        path = os.path.join(path, part)
        try:
            os.mkdir(path)
            created.append(path)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise UnsafeDestinationError(
                f"{path} is a symbolic link or a file, where cp must create a directory; refusing to write "
                "through it. Remove it (or copy to an empty directory) and retry")
    return path


class _LocalFiles:
    """Files of one copy into a local directory: exclusive temporaries, renamed into place together.

    Each object is written to a fresh ``mkstemp`` file (``O_EXCL``, unpredictable
    name, never a planted symlink) in its final directory. Either every file is
    renamed into place, or every temporary, every file already placed and every
    directory created is removed again.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.mode = 0o666 & ~_umask()
        self.dirs: list[str] = []
        self.temps: dict[str, str] = {}
        self.placed: list[str] = []

    def create(self, name: str, size: int) -> tuple[str, mmap.mmap | None]:
        """A temporary file of ``size`` bytes for object ``name``, and an mmap of it (None when empty)."""
        directory = _make_dirs(self.root, posixpath.dirname(name), self.dirs)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".cloudckpt.tmp-", suffix=".partial")
        self.temps[name] = tmp
        with os.fdopen(fd, "wb+") as f:
            os.fchmod(f.fileno(), self.mode)
            f.truncate(size)
            return tmp, (mmap.mmap(f.fileno(), size) if size else None)

    def commit(self) -> None:
        """Rename every temporary to its object's name (a planted symlink there is replaced, not followed)."""
        for name, tmp in list(self.temps.items()):
            final = os.path.join(self.root, *name.split("/"))
            os.replace(tmp, final)
            del self.temps[name]
            self.placed.append(final)

    def discard(self) -> None:
        """Remove every temporary and placed file, then the directories this copy created (if empty)."""
        for path in [*self.temps.values(), *self.placed]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.temps.clear()
        self.placed.clear()
        for d in reversed(self.dirs):
            try:
                os.rmdir(d)
            except OSError:
                pass


def _download(store: ObjectStore, src: StorageURI, sizes: Mapping[str, int], root: str, engine: Any,
              progress: Progress | None, check: Callable[[dict[str, int]], None]) -> None:
    """Download objects ``sizes`` (name -> size) of ``src`` into files under ``root``, all or nothing.

    ``check`` gets the CRC32C of every downloaded object before anything is
    renamed into place; if it (or anything else) raises, nothing is left behind.
    """
    files = _LocalFiles(root)
    maps: dict[str, mmap.mmap | None] = {}
    views: list[memoryview] = []
    piece = max(engine.options.part_size, _MiB)
    ok = False
    try:
        reads: list[tuple[str, int, memoryview]] = []
        for name, size in sorted(sizes.items()):
            _, mm = files.create(name, size)
            maps[name] = mm
            if mm is not None:
                base = memoryview(mm)
                views.append(base)
                for off in range(0, size, piece):
                    views.append(base[off:off + piece])
                    reads.append((src.key(name), off, views[-1]))
        engine.download_ranges(reads, progress=progress)
        reads.clear()
        check({n: _crc_of(mm) for n, mm in maps.items()})
        _release(views, maps)
        files.commit()
        ok = True
    finally:
        _release(views, maps)
        if not ok:
            files.discard()


def _crc_of(mm: mmap.mmap | None) -> int:
    from cloudckpt import crc

    if mm is None:
        return 0
    with memoryview(mm) as view:
        return crc.crc32c(view)


def _release(views: list[memoryview], maps: dict[str, mmap.mmap | None]) -> None:
    # Every view must be released before its mmap can be closed.
    for v in views:
        v.release()
    views.clear()
    for mm in maps.values():
        if mm is not None:
            mm.close()
    maps.clear()


def _upload(store: ObjectStore, local: StorageURI, dst: StorageURI, sizes: Mapping[str, int], engine: Any,
            progress: Progress | None) -> dict[str, int]:
    """Upload local files (mmapped, zero-copy, multipart) to ``dst``; CRC32C by object name. All or nothing."""
    from cloudckpt.transfer import ObjectUpload

    maps: list[mmap.mmap] = []
    views: list[memoryview] = []
    uploads = []
    try:
        for name, size in sorted(sizes.items()):
            if size:
                with open(local.key(name), "rb") as f:
                    mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
                maps.append(mm)
                views.append(memoryview(mm))
                uploads.append(ObjectUpload(dst.key(name), [views[-1]], size))
            else:
                uploads.append(ObjectUpload(dst.key(name), [b""], 0))
        done = engine.upload(uploads, progress=progress)
        base = dst.key("")
        return {u.key[len(base):]: u.crc32c for u in done}
    finally:
        uploads.clear()
        for v in views:
            v.release()
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # pragma: no cover - a slice kept alive by a failed request
                pass


def _prepare_destination(store: ObjectStore, dst: StorageURI, overwrite: bool) -> dict[str, ObjectInfo]:
    """Check ``dst`` may be written; with ``overwrite``, un-commit what is there. Returns its listing."""
    if not dst.is_local:
        store.check_bucket()
    listing = _listing(store, dst)
    if layout.checkpoint_state(listing) == layout.COMMITTED:
        if not overwrite:
            raise CheckpointExistsError(
                f"a committed checkpoint already exists at {dst}; choose another destination, delete it "
                f"(`cloudckpt rm {dst}`) or pass --overwrite")
        # Un-commit first: an interrupted overwrite must not look like a valid checkpoint.
        for name in reversed(layout.commit_objects(listing)):
            store.delete(dst.key(name))
    return listing


def copy_checkpoint(src_store: ObjectStore, src: StorageURI, dst_store: ObjectStore, dst: StorageURI, *,
                    overwrite: bool = False, transfer_options: Any = None, progress: Progress | None = None,
                    on_total: Progress | None = None) -> CopyResult:
    """Copy the committed checkpoint at ``src`` to ``dst`` (bucket <-> local directory, or bucket -> bucket).

    Every object ``.metadata`` refers to (sub-folders included), the manifests
    and the commit objects are copied; nothing else. Before anything is
    transferred, every name is validated and every referenced object must
    exist with the size its items need. Copied bytes are checked against the
    manifest's CRC32C, every object is checked to have arrived with its size,
    and only then is ``.metadata`` written, with the writer's conditional,
    lost-reply-tolerant :func:`cloudckpt.writer.commit_metadata`. A failed copy
    leaves no partial files in a local destination and commits nothing.
    ``on_total`` is told the number of bytes to move; ``progress`` each chunk.
    """
    from cloudckpt.transfer import TransferEngine, TransferOptions
    from cloudckpt.uri import parse_uri
    from cloudckpt.writer import commit_metadata

    if (src.scheme, src.bucket, src.prefix) == (dst.scheme, dst.bucket, dst.prefix):
        raise InvalidURIError(f"source and destination are the same ({src})")
    opts = transfer_options or TransferOptions()
    t0 = time.perf_counter()
    listing = _listing(src_store, src)
    objs = checkpoint_objects(src_store, src, listing)
    missing = objs.missing(listing)
    if missing:
        raise IncompleteCheckpointError(
            f"{src} is incomplete: its metadata refers to {len(missing)} object(s) that are missing or shorter than "
            f"their items, e.g. {src_store.url(src.key(missing[0]))}; nothing was copied. Restore the objects or "
            "copy an earlier checkpoint")
    names = objs.payload
    sizes = {n: listing[n].size for n in names}
    expected, _ = _expected_crcs(src_store, src, objs)
    total = sum(sizes.values())
    _prepare_destination(dst_store, dst, overwrite)

    def check(crcs: dict[str, int]) -> None:
        for name, got in crcs.items():
            if name in expected and got != expected[name]:
                raise IntegrityError(
                    f"{src_store.url(src.key(name))} has CRC32C {got:#010x} but its manifest says "
                    f"{expected[name]:#010x}: the source object is corrupt; nothing was committed at {dst}")

    if dst.is_local:
        made = not os.path.lexists(dst.prefix)
        os.makedirs(dst.prefix, exist_ok=True)
        if on_total:
            on_total(total)
        try:
            _download(src_store, src, sizes, dst.prefix, TransferEngine(src_store, opts), progress, check)
        except BaseException:
            if made:
                shutil.rmtree(dst.prefix, ignore_errors=True)  # ours, and _download left it empty
            raise
    elif src.is_local:
        if on_total:
            on_total(total)
        check(_upload(dst_store, src, dst, sizes, TransferEngine(dst_store, opts), progress))
    else:
        # Cloud to cloud: stage through a private local temporary directory.
        with tempfile.TemporaryDirectory(prefix="cloudckpt-cp-") as staging:
            if on_total:
                on_total(2 * total)
            _download(src_store, src, sizes, staging, TransferEngine(src_store, opts), progress, check)
            check(_upload(dst_store, parse_uri(staging), dst, sizes, TransferEngine(dst_store, opts), progress))
    _check_arrived(dst_store, dst, sizes)
    if overwrite:
        _delete_stale(dst_store, dst, set(names) | set(objs.commits))
    for name in objs.commits:
        if name in layout.COMMIT_OBJECT_NAMES:
            commit_metadata(dst_store, dst, objs.blobs[name], name=name, overwrite=overwrite)
    moved = total + sum(len(objs.blobs[n]) for n in objs.commits if n in layout.COMMIT_OBJECT_NAMES)
    count = len(names) + sum(1 for n in objs.commits if n in layout.COMMIT_OBJECT_NAMES)
    return CopyResult(str(src), str(dst), count, moved, round(time.perf_counter() - t0, 3))


def _check_arrived(store: ObjectStore, dst: StorageURI, sizes: Mapping[str, int]) -> None:
    """IncompleteCheckpointError unless every copied object is at ``dst`` with its size (one LIST)."""
    there = _listing(store, dst)
    wrong = sorted(n for n, size in sizes.items() if n not in there or there[n].size != size)
    if wrong:
        raise IncompleteCheckpointError(
            f"{len(wrong)} copied object(s) are missing or have the wrong size at {dst}, e.g. "
            f"{store.url(dst.key(wrong[0]))}; nothing was committed. Retry the copy")


def _delete_stale(store: ObjectStore, dst: StorageURI, keep: set[str]) -> None:
    """Objects of a replaced checkpoint that the new one lacks (checkpoint object names only)."""
    stale = [dst.key(n) for n in _listing(store, dst)
             if n not in keep and layout.is_checkpoint_object_name(posixpath.basename(n))]
    if stale:
        store.delete_many(stale)


# -- deletion -----------------------------------------------------------------------------------


def _is_symlink_dir(uri: StorageURI) -> bool:
    return uri.is_local and os.path.islink(uri.prefix.rstrip("/") or "/")


def delete_checkpoint(store: ObjectStore, uri: StorageURI, *, abort_uploads: bool = False) -> int:
    """Delete every object of the checkpoint at ``uri``, commit objects first; return how many.

    Deleting the commit objects (``.metadata``, ``__0.metadata``) first
    un-commits the checkpoint, so a deletion that stops half-way leaves an
    uncommitted prefix (which ``cloudckpt gc`` removes) rather than a committed
    checkpoint with missing data. Every object under the prefix goes, not only
    the ones DCP wrote. A local checkpoint directory that is a symbolic link is
    unlinked; its target is never touched. Symbolic links inside it are
    removed as links, never followed.
    """
    if uri.is_local and uri.prefix.rstrip("/") == "":
        raise InvalidURIError("refusing to delete a filesystem root")
    if not uri.is_local and not uri.prefix:
        raise InvalidURIError(f"refusing to delete a whole bucket ({uri}); name a checkpoint prefix")
    if _is_symlink_dir(uri):
        os.unlink(uri.prefix.rstrip("/"))
        return 1
    if uri.is_local and not os.path.isdir(uri.prefix):
        return 0
    commit_keys = [uri.key(n) for n in layout.COMMIT_OBJECT_NAMES]
    for key in commit_keys:
        store.delete(key)
    keys = [o.key for o in store.list(uri.key("")) if o.key not in commit_keys]
    # Rank-local commit objects of other ranks next, then the rest.
    keys.sort(key=lambda k: not layout.is_commit_name(posixpath.basename(k)))
    if keys:
        store.delete_many(keys)
    if abort_uploads:
        for u in store.list_multipart_uploads(uri.key("")):
            store.abort_multipart(u.key, u.upload_id)
    if uri.is_local:
        # Local "prefixes" are directories: remove the now-empty tree too (rmtree never follows links in it).
        shutil.rmtree(uri.prefix, ignore_errors=True)
    return len(keys) + len(commit_keys)


@dataclass(frozen=True)
class RemovalPlan:
    """What ``rm`` is about to delete (or deleted)."""

    uri: str
    committed: bool
    objects: int
    bytes: int
    uploads: int
    #: A local checkpoint directory that is a symbolic link: only the link is removed.
    symlink: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return _as_dict(self)


def plan_removal(store: ObjectStore, uri: StorageURI) -> RemovalPlan:
    """Describe the checkpoint ``rm`` would delete; NotACheckpointError if ``uri`` is not one."""
    if _is_symlink_dir(uri):
        return RemovalPlan(str(uri), is_committed(store, uri), 1, 0, 0, symlink=True)
    listing = _listing(store, uri)
    uploads = store.list_multipart_uploads(uri.key(""))
    if not listing and not uploads:
        raise CheckpointNotFoundError(f"no checkpoint at {uri}: nothing is stored there")
    state = layout.checkpoint_state(listing)
    if state is None and listing:
        children = sorted(_by_child(listing))
        what = f"it holds {len(children)} prefixes, e.g. {children[0]}/" if children else \
            f"its objects (e.g. {sorted(listing)[0]}) are not DCP or cloudckpt objects"
        raise NotACheckpointError(f"{uri} is not a checkpoint ({what}); rm deletes one checkpoint at a time: "
                                  "pass a checkpoint URI")
    return RemovalPlan(str(uri), state == layout.COMMITTED, len(listing), sum(i.size for i in listing.values()),
                       len(uploads))


def remove_checkpoint(store: ObjectStore, plan: RemovalPlan) -> RemovalPlan:
    """Delete the checkpoint of ``plan`` (commit objects first, then everything, then unfinished uploads)."""
    from cloudckpt.uri import parse_uri

    delete_checkpoint(store, parse_uri(plan.uri), abort_uploads=True)
    return plan


# -- gc -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaleUpload:
    """An unfinished multipart upload older than the cut-off."""

    key: str
    upload_id: str
    initiated: _dt.datetime | None


@dataclass(frozen=True)
class StaleCheckpoint:
    """An uncommitted checkpoint whose newest object (and upload) is older than the cut-off."""

    uri: str
    objects: int
    bytes: int
    modified: _dt.datetime | None


@dataclass(frozen=True)
class GCPlan:
    """What ``gc`` deletes under a root (or, after :func:`run_gc`, what it deleted)."""

    root: str
    older_than_s: float
    cutoff: _dt.datetime
    uploads: tuple[StaleUpload, ...]
    checkpoints: tuple[StaleCheckpoint, ...]
    #: Uploads whose start time the store does not report (never aborted).
    skipped_uploads: int = 0

    @property
    def empty(self) -> bool:
        """True when there is nothing to delete."""
        return not self.uploads and not self.checkpoints

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``aborted_uploads``, ``deleted_checkpoints``)."""
        return {"root": self.root, "older_than_s": self.older_than_s,
                "aborted_uploads": [_as_dict(u) for u in self.uploads],
                "deleted_checkpoints": [_as_dict(c) for c in self.checkpoints],
                "skipped_uploads": self.skipped_uploads}


def _stale_checkpoint(root: StorageURI, child: str, objs: Mapping[str, ObjectInfo], uploads: list[Any],
                      cutoff: _dt.datetime) -> StaleCheckpoint | None:
    """``child`` if it is an uncommitted checkpoint (flat: nothing in sub-folders) older than ``cutoff``."""
    if layout.checkpoint_state(objs) != layout.UNCOMMITTED or any("/" in n for n in objs):
        return None  # committed, not a checkpoint, or holding sub-folders gc cannot vouch for
    # A save still uploading parts is active even if its finished objects are old.
    times = [i.last_modified for i in objs.values()] + [u.initiated for u in uploads]
    if any(t is None for t in times):
        return None  # some age unknown: never guess that a prefix is abandoned
    newest = max(_utc(t) for t in times if t is not None)
    if newest > cutoff:
        return None
    return StaleCheckpoint(str(root.child(child)), len(objs), sum(i.size for i in objs.values()), newest)


def plan_gc(store: ObjectStore, root: StorageURI, older_than_s: float,
            now: _dt.datetime | None = None) -> GCPlan:
    """Stale multipart uploads of checkpoint objects and stale uncommitted checkpoints under ``root``.

    Only prefixes that :func:`cloudckpt.layout.checkpoint_state` calls
    uncommitted are candidates (never a committed checkpoint, in either commit
    form, nor a prefix holding anything DCP or cloudckpt does not write); only
    uploads of checkpoint object names outside non-checkpoint prefixes are.
    """
    if not root.is_local:
        store.check_bucket()
    cutoff = (now or _dt.datetime.now(_dt.timezone.utc)) - _dt.timedelta(seconds=older_than_s)
    by_child = _uploads_by_child(store, root)
    children = _by_child(_listing(store, root))
    uploads: list[StaleUpload] = []
    skipped = 0
    for child, ups in by_child.items():
        if child and child in children and layout.checkpoint_state(children[child]) is None \
                and any("/" not in n for n in children[child]):
            continue  # a prefix that is not a checkpoint: its uploads are someone else's
        for u in ups:
            if not layout.is_checkpoint_object_name(posixpath.basename(u.key)):
                continue
            if u.initiated is None:
                skipped += 1
            elif _utc(u.initiated) <= cutoff:
                uploads.append(StaleUpload(u.key, u.upload_id, u.initiated))
    stale = [s for c, objs in sorted(children.items())
             if (s := _stale_checkpoint(root, c, objs, by_child.get(c, []), cutoff)) is not None]
    return GCPlan(str(root), older_than_s, cutoff, tuple(uploads), tuple(stale), skipped)


def run_gc(store: ObjectStore, plan: GCPlan) -> GCPlan:
    """Carry out ``plan``; return what was actually deleted.

    Each checkpoint is classified again right before it is deleted: one that
    was committed (or written to) since the plan was made is kept.
    """
    from cloudckpt.uri import parse_uri

    for u in plan.uploads:
        store.abort_multipart(u.key, u.upload_id)
    root = parse_uri(plan.root)
    done = []
    for c in plan.checkpoints:
        uri = parse_uri(c.uri)
        child = posixpath.basename(uri.prefix.rstrip("/"))
        again = _stale_checkpoint(root, child, _listing(store, uri), _uploads_by_child(store, uri).get("", []),
                                  plan.cutoff)
        if again is not None:
            delete_checkpoint(store, uri)
            done.append(again)
    return dataclasses.replace(plan, checkpoints=tuple(done))
