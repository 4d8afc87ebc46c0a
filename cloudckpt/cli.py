"""The ``cloudckpt`` command: inspect, verify, copy and clean up checkpoints.

Run ``cloudckpt --help`` or see docs/configuration.md. Exit codes (stable, for scripts):

====  ===========================================================
0     success
1     verification found problems (or copied bytes failed their checksum)
2     usage error, bad URI
3     not found (no checkpoint, object or bucket)
4     already exists (destination checkpoint, without --overwrite)
5     access denied, endpoint unreachable, network/transfer failure
6     a package the command needs is missing (the message names the pip extra)
10    unexpected error (rerun with --debug for the traceback)
130   interrupted (Ctrl-C)
====  ===========================================================
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.machinery
import json
import mmap
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

__all__ = ["main", "exit_code_for", "parse_duration", "EXIT_CODES"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_EXISTS = 4
EXIT_ACCESS = 5
EXIT_MISSING = 6
EXIT_UNEXPECTED = 10
EXIT_INTERRUPTED = 130
#: Meaning of every exit code (also in docs/configuration.md).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_PROBLEMS: "verification problems",
    EXIT_USAGE: "usage error or bad URI",
    EXIT_NOT_FOUND: "checkpoint, object or bucket not found",
    EXIT_EXISTS: "destination already exists",
    EXIT_ACCESS: "access denied, endpoint unreachable or network problem",
    EXIT_MISSING: "a needed package is not installed",
    EXIT_UNEXPECTED: "unexpected error",
    EXIT_INTERRUPTED: "interrupted",
}

MiB = 1024 * 1024
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CLIError(Exception):
    """An error with a message for the user and the exit code it maps to."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception raised by a command."""
    from cloudckpt import errors as e

    if isinstance(exc, CLIError):
        return exc.code
    if isinstance(exc, ImportError):
        return EXIT_MISSING
    if isinstance(exc, e.InvalidURIError):
        return EXIT_USAGE
    if isinstance(exc, (e.CheckpointExistsError, e.PreconditionFailedError)):
        return EXIT_EXISTS
    if isinstance(exc, (e.ObjectNotFoundError, e.BucketNotFoundError)):
        return EXIT_NOT_FOUND
    if isinstance(exc, (e.AccessDeniedError, e.EndpointUnreachableError, e.TransferError)):
        return EXIT_ACCESS
    if isinstance(exc, (e.IntegrityError, e.UnsafeMetadataError)):
        return EXIT_PROBLEMS
    if isinstance(exc, e.CloudCheckpointError):
        return EXIT_UNEXPECTED
    if isinstance(exc, FileNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, FileExistsError):
        return EXIT_EXISTS
    if isinstance(exc, (PermissionError, ConnectionError)):
        return EXIT_ACCESS
    return EXIT_UNEXPECTED


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``30m``, ``2h``, ``7d``, ``1w`` (a bare number is seconds)."""
    m = _DURATION_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 30m, 2h, 7d or 0s")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _when(t: _dt.datetime | None) -> str:
    if t is None:
        return "-"
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%SZ")


def _utc(t: _dt.datetime) -> _dt.datetime:
    # Stores report aware times; a naive one is taken to be UTC (as S3 and GCS mean it).
    return t.replace(tzinfo=_dt.timezone.utc) if t.tzinfo is None else t.astimezone(_dt.timezone.utc)


def _iso(t: _dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


# -- output and progress ----------------------------------------------------------------


@dataclass
class _Out:
    """Where a command's results go: text for people, or one JSON document on stdout."""

    json: bool
    quiet: bool
    #: Show progress bars even when stderr is not a terminal.
    force_progress: bool = False

    def result(self, doc: Any, text: str | None) -> None:
        if self.json:
            print(json.dumps(doc, indent=2, default=str))
        elif text:
            print(text)

    def info(self, text: str) -> None:
        """Chatter on stderr (suppressed by -q and --json)."""
        if not (self.quiet or self.json):
            print(text, file=sys.stderr)

    @property
    def progress_enabled(self) -> bool:
        """Bars on stderr: on a terminal unless -q/--json, or always with --progress."""
        return self.force_progress or (not (self.quiet or self.json) and sys.stderr.isatty())


class _Progress:
    """A tqdm bar of bytes, fed by the transfer engine's ``progress(n)`` callbacks (any thread)."""

    def __init__(self, desc: str, enabled: bool, total: int | None = None) -> None:
        self.desc = desc
        self.enabled = enabled
        self._bar: Any = None
        self._lock = threading.Lock()
        if total is not None:
            self.set_total(total)

    def set_total(self, total: int) -> None:
        """Create (or resize) the bar once the number of bytes is known."""
        if not self.enabled:
            return
        from tqdm import tqdm

        with self._lock:
            if self._bar is None:
                self._bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024,
                                 file=sys.stderr, leave=True, dynamic_ncols=True)
            else:
                self._bar.total = total
                self._bar.refresh()

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# -- shared helpers -----------------------------------------------------------------------


def _store_options(args: argparse.Namespace, scheme: str) -> dict[str, Any]:
    """Global options that apply to ``scheme``'s store."""
    opts: dict[str, Any] = {}
    if scheme == "s3":
        if args.endpoint_url:
            opts["endpoint_url"] = args.endpoint_url
        if args.region:
            opts["region"] = args.region
    elif scheme == "gs":
        if args.endpoint_url:
            opts["endpoint_url"] = args.endpoint_url
        if args.project:
            opts["project"] = args.project
    return opts


def _open(args: argparse.Namespace, uri_text: str) -> tuple[Any, Any]:
    from cloudckpt.store import open_store
    from cloudckpt.uri import parse_uri

    uri = parse_uri(uri_text)
    return uri, open_store(uri, **_store_options(args, uri.scheme))


def _is_dcp_name(name: str) -> bool:
    from cloudckpt import layout

    return layout.is_checkpoint_object_name(name)


def _top_level(store: Any, uri: Any) -> tuple[dict[str, Any], list[Any]]:
    """(objects directly under the prefix by name, every object below it)."""
    base = uri.key("")
    everything = list(store.list(base))
    top = {}
    for info in everything:
        rel = info.key[len(base):]
        if rel and "/" not in rel:
            top[rel] = info
    return top, everything


def _group_children(uri: Any, everything: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Objects one level down, by child name: {child: {relative name: info}} (deeper ones under '')."""
    base = uri.key("")
    out: dict[str, dict[str, Any]] = {}
    for info in everything:
        rel = info.key[len(base):]
        child, sep, rest = rel.partition("/")
        if sep:
            out.setdefault(child, {})[rest] = info
    return out


def _uploads_by_child(store: Any, uri: Any) -> dict[str, list[Any]]:
    """Unfinished multipart uploads under ``uri`` by child name ('' for uploads directly inside it)."""
    base = uri.key("")
    out: dict[str, list[Any]] = {}
    for u in store.list_multipart_uploads(base):
        child, sep, _ = u.key[len(base):].partition("/")
        out.setdefault(child if sep else "", []).append(u)
    return out


def _load_metadata(store: Any, uri: Any) -> Any:
    from cloudckpt import layout
    from cloudckpt.errors import CheckpointNotFoundError, ObjectNotFoundError
    from cloudckpt.safe_pickle import load_metadata

    key = uri.key(layout.METADATA_NAME)
    try:
        blob = store.get(key)
    except ObjectNotFoundError:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {uri}: {store.url(key)} does not exist; list what is there with "
            f"`cloudckpt ls {uri}`"
        ) from None
    return load_metadata(blob, store.url(key))


def _load_manifest(store: Any, uri: Any) -> dict[str, Any] | None:
    """The checkpoint's manifest document (None if it has none, or none matches its ``.metadata``)."""
    from cloudckpt import layout
    from cloudckpt.errors import CloudCheckpointError
    from cloudckpt.manifest import find_manifest
    from cloudckpt.safe_pickle import MAX_METADATA_BYTES

    try:
        found = find_manifest(store, uri, store.get(uri.key(layout.METADATA_NAME), max_size=MAX_METADATA_BYTES))
    except CloudCheckpointError:
        return None
    if found is None:
        return None
    return dict(found.doc, objects={n: {"size": o.size, "crc32c": o.crc32c} for n, o in found.objects.items()})


# -- ls -------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace, out: _Out) -> int:
    """List the checkpoints under a root, or the objects of one checkpoint."""
    from cloudckpt import layout
    from cloudckpt.errors import CheckpointNotFoundError
    from cloudckpt.layout import parse_step_name

    uri, store = _open(args, args.uri)
    top, everything = _top_level(store, uri)
    uploads = _uploads_by_child(store, uri)
    if not everything and not uploads:
        raise CheckpointNotFoundError(f"nothing under {uri}; check the URI (and --endpoint-url)")
    if any(_is_dcp_name(n) for n in top) or (not everything and "" in uploads):
        committed = layout.METADATA_NAME in top
        objs = [{"name": n, "size": i.size, "modified": _iso(i.last_modified)} for n, i in sorted(top.items())]
        total = sum(i.size for i in top.values())
        pending = len(uploads.get("", []))
        doc = {"uri": str(uri), "kind": "checkpoint", "committed": committed, "bytes": total, "objects": objs,
               "uploads_in_progress": pending}
        rows = [(o["name"], _human(o["size"]), _when(top[o["name"]].last_modified)) for o in objs]
        text = (_table(rows, ("OBJECT", "SIZE", "MODIFIED")) +
                f"\n{len(objs)} objects, {_human(total)}, {'committed' if committed else 'NOT committed (no .metadata)'}"
                + (f", {pending} multipart upload(s) in progress" if pending else ""))
        out.result(doc, text)
        return EXIT_OK
    entries = []
    children = _group_children(uri, everything)
    for child in uploads:
        if child:
            children.setdefault(child, {})  # a save whose only objects are unfinished uploads
    for child, objs in sorted(children.items()):
        direct = {n: i for n, i in objs.items() if "/" not in n}
        pending = len(uploads.get(child, []))
        if not any(_is_dcp_name(n) for n in direct) and not pending:
            entries.append({"name": child, "uri": str(uri.child(child)), "step": None, "kind": "prefix",
                            "committed": None, "objects": len(objs), "bytes": sum(i.size for i in objs.values()),
                            "modified": None, "uploads_in_progress": 0})
            continue
        meta = direct.get(layout.METADATA_NAME)
        times = [i.last_modified for i in direct.values() if i.last_modified is not None]
        when = meta.last_modified if meta is not None and meta.last_modified else (max(times) if times else None)
        entries.append({"name": child, "uri": str(uri.child(child)), "step": parse_step_name(child),
                        "kind": "checkpoint", "committed": meta is not None, "objects": len(direct),
                        "bytes": sum(i.size for i in direct.values()), "modified": _iso(when),
                        "uploads_in_progress": pending})
    entries.sort(key=lambda e: (e["kind"] != "checkpoint", e["step"] is None,
                                e["step"] if e["step"] is not None else 0, e["name"]))
    rows = []
    for e in entries:
        if e["kind"] == "prefix":
            rows.append(("-", "-", _human(e["bytes"]), "-", e["uri"] + "/"))
        else:
            state = "yes" if e["committed"] else ("NO (uploading)" if e["uploads_in_progress"] else "NO")
            rows.append((str(e["step"]) if e["step"] is not None else "-", state,
                         _human(e["bytes"]), _when(_dt.datetime.fromisoformat(e["modified"]))
                         if e["modified"] else "-", e["uri"]))
    n_ckpt = sum(1 for e in entries if e["kind"] == "checkpoint")
    n_committed = sum(1 for e in entries if e["committed"])
    text = _table(rows, ("STEP", "COMMITTED", "SIZE", "MODIFIED", "URI")) + (
        f"\n{n_ckpt} checkpoints ({n_committed} committed)")
    out.result({"uri": str(uri), "kind": "root", "checkpoints": entries}, text)
    return EXIT_OK


# -- info -----------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace, out: _Out) -> int:
    """Describe a checkpoint: ranks, tensors, dtypes, shapes, bytes, creation time, writer."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    from cloudckpt import layout

    uri, store = _open(args, args.uri)
    metadata = _load_metadata(store, uri)
    manifest = _load_manifest(store, uri)
    top, _ = _top_level(store, uri)
    ranks = sorted({parsed[0] for n in top if (parsed := layout.parse_data_object_name(n)) is not None})
    byte_lengths: dict[str, int] = {}
    for idx, info in metadata.storage_data.items():
        byte_lengths[idx.fqn] = byte_lengths.get(idx.fqn, 0) + getattr(info, "length", 0)
    items = []
    tensor_bytes = 0
    for fqn, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            numel = 1
            for s in md.size:
                numel *= s
            nbytes = numel * torch.empty((), dtype=md.properties.dtype).element_size()
            tensor_bytes += nbytes
            items.append({"key": fqn, "kind": "tensor", "dtype": str(md.properties.dtype).replace("torch.", ""),
                          "shape": list(md.size), "chunks": len(md.chunks), "bytes": nbytes})
        elif isinstance(md, BytesStorageMetadata):
            items.append({"key": fqn, "kind": "bytes", "dtype": None, "shape": None, "chunks": 1,
                          "bytes": byte_lengths.get(fqn, 0)})
    meta_info = top.get(layout.METADATA_NAME)
    created = (manifest or {}).get("created") or _iso(meta_info.last_modified if meta_info else None)
    writer = (manifest or {}).get("writer") or "stock DCP or another tool (no cloudckpt manifest)"
    storage_meta = getattr(metadata, "storage_meta", None)
    doc = {
        "uri": str(uri),
        "created": created,
        "writer": writer,
        "torch": (manifest or {}).get("torch"),
        "save_id": (manifest or {}).get("save_id") or getattr(storage_meta, "save_id", None),
        "ranks": ranks,
        "world_size": (manifest or {}).get("world_size", len(ranks) or None),
        "objects": len(top),
        "stored_bytes": sum(i.size for i in top.values()),
        "tensor_bytes": tensor_bytes,
        "tensors": sum(1 for i in items if i["kind"] == "tensor"),
        "byte_items": sum(1 for i in items if i["kind"] == "bytes"),
        "checksums": manifest is not None,
        "items": items,
    }
    rows = [(i["key"], i["kind"] if i["kind"] == "bytes" else i["dtype"],
             "-" if i["shape"] is None else "x".join(map(str, i["shape"])) or "scalar",
             str(i["chunks"]), _human(i["bytes"])) for i in items]
    created_text = created or "-"
    header = "\n".join([
        f"checkpoint  {uri}",
        f"created     {created_text}",
        f"writer      {writer}",
        f"ranks       {len(ranks)} ({', '.join(map(str, ranks)) if len(ranks) <= 16 else f'{ranks[0]}..{ranks[-1]}'})",
        f"objects     {len(top)} ({_human(doc['stored_bytes'])} stored)",
        f"tensors     {doc['tensors']} ({_human(tensor_bytes)}), byte items {doc['byte_items']}",
        f"checksums   {'CRC32C manifest present' if manifest is not None else 'none (no manifest)'}",
        "",
    ])
    out.result(doc, header + _table(rows, ("KEY", "DTYPE", "SHAPE", "CHUNKS", "BYTES")))
    return EXIT_OK


# -- verify -----------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace, out: _Out) -> int:
    """Run :func:`cloudckpt.verify.verify`; exit 1 if it found problems."""
    from cloudckpt.uri import parse_uri
    from cloudckpt.verify import verify

    uri = parse_uri(args.uri)
    bar = _Progress("verify", out.progress_enabled)
    try:
        report = verify(uri, deep=not args.shallow, max_concurrency=args.max_concurrency, progress=bar,
                        **_store_options(args, uri.scheme))
    finally:
        bar.close()
    lines = []
    if report.ok:
        if not out.quiet:
            what = "checksums and structure" if report.checksums_verified else "structure only (no checksums)"
            lines.append(f"OK: {report.uri}: {report.objects_checked} objects, {report.items_checked} items, "
                         f"{_human(report.bytes_checked)} checked ({what}{', records parsed' if report.deep else ''})")
    else:
        lines.append(f"PROBLEMS: {report.uri}: {len(report.problems)} problem(s)")
        lines.extend(f"  {p}" for p in report.problems)
    if not out.quiet:
        lines.extend(f"  note: {n}" for n in report.notes)
    out.result(report.to_dict(), "\n".join(lines))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


# -- cp ------------------------------------------------------------------------------------------


def _download_to_files(store: Any, jobs: list[tuple[str, str, int]], engine: Any, bar: _Progress,
                       piece: int) -> dict[str, int]:
    """Download ``(key, path, size)`` objects into files (via mmap, ranged, in parallel); return CRC32C by path.

    Each file is written as ``path.cloudckpt-partial`` and renamed into place once
    complete, so an interrupted copy never leaves a plausible-looking file.
    """
    from cloudckpt import crc

    maps: list[tuple[str, str, mmap.mmap | None]] = []
    views: list[memoryview] = []
    reads: list[tuple[str, int, memoryview]] = []
    ok = False
    try:
        for key, path, size in jobs:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = path + ".cloudckpt-partial"
            with open(tmp, "wb+") as f:
                f.truncate(size)
                mm = mmap.mmap(f.fileno(), size) if size else None
            maps.append((tmp, path, mm))
            if mm is not None:
                base = memoryview(mm)
                views.append(base)
                for off in range(0, size, piece):
                    views.append(base[off:off + piece])
                    reads.append((key, off, views[-1]))
        engine.download_ranges(reads, progress=bar)
        crcs = {path: crc.crc32c(mm) if mm is not None else 0 for _, path, mm in maps}
        ok = True
        return crcs
    finally:
        # Every view must be released before its mmap can be closed.
        reads.clear()
        for v in views:
            v.release()
        for tmp, path, mm in maps:
            if mm is not None:
                mm.close()
            if ok:
                os.replace(tmp, path)
            elif os.path.exists(tmp):
                os.unlink(tmp)


def _upload_files(store: Any, jobs: list[tuple[str, str, int]], engine: Any, bar: _Progress) -> dict[str, int]:
    """Upload ``(path, key, size)`` files (mmapped, zero-copy, multipart); return CRC32C by key."""
    from cloudckpt.transfer import ObjectUpload

    maps: list[mmap.mmap] = []
    views: list[memoryview] = []
    uploads = []
    try:
        for path, key, size in jobs:
            if size:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
                maps.append(mm)
                views.append(memoryview(mm))
                uploads.append(ObjectUpload(key, [views[-1]], size))
            else:
                uploads.append(ObjectUpload(key, [b""], 0))
        done = engine.upload(uploads, progress=bar)
        return {u.key: u.crc32c for u in done}
    finally:
        uploads.clear()
        for v in views:
            v.release()
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # pragma: no cover - a slice kept alive by a failed request
                pass


def cmd_cp(args: argparse.Namespace, out: _Out) -> int:
    """Copy a checkpoint between a bucket and a local directory (or between any two locations)."""
    from cloudckpt import crc, layout
    from cloudckpt.errors import CheckpointExistsError, CheckpointNotFoundError, IntegrityError
    from cloudckpt.transfer import TransferEngine, TransferOptions

    src, sstore = _open(args, args.src)
    dst, dstore = _open(args, args.dst)
    if str(src) == str(dst):
        raise CLIError(f"source and destination are the same ({src})", EXIT_USAGE)
    top, _ = _top_level(sstore, src)
    if layout.METADATA_NAME not in top:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {src}: {sstore.url(src.key(layout.METADATA_NAME))} does not exist; "
            f"only committed checkpoints can be copied (see `cloudckpt ls {src}`)"
        )
    if not dst.is_local:
        dstore.check_bucket()
    dst_meta = dst.key(layout.METADATA_NAME)
    if dstore.head(dst_meta) is not None:
        if not args.overwrite:
            raise CheckpointExistsError(
                f"a committed checkpoint already exists at {dst}; choose another destination, delete it "
                f"(`cloudckpt rm {dst}`) or pass --overwrite"
            )
        # Un-commit first: an interrupted overwrite must not look like a valid checkpoint.
        dstore.delete(dst_meta)
    manifest = _load_manifest(sstore, src)
    expected = {n: int(o["crc32c"]) for n, o in (manifest or {}).get("objects", {}).items()}
    names = sorted(n for n in top if n != layout.METADATA_NAME)
    sizes = {n: top[n].size for n in names}
    total = sum(sizes.values())
    opts = TransferOptions(max_concurrency=args.max_concurrency,
                           **({"part_size": args.part_size * MiB} if args.part_size else {}))
    t0 = time.perf_counter()
    piece = max(opts.part_size, MiB)

    def check(name: str, got: int) -> None:
        if name in expected and got != expected[name]:
            raise IntegrityError(
                f"{sstore.url(src.key(name))} has CRC32C {got:#010x} but its manifest says {expected[name]:#010x}: "
                "the source object is corrupt; nothing was committed at the destination"
            )

    bar = _Progress("copy", out.progress_enabled)
    try:
        if dst.is_local:
            bar.set_total(total)
            crcs = _download_to_files(sstore, [(src.key(n), dst.key(n), sizes[n]) for n in names],
                                      TransferEngine(sstore, opts), bar, piece)
            for n in names:
                check(n, crcs[dst.key(n)])
        else:
            staging = None
            if src.is_local:
                local_src = src
            else:
                # Cloud to cloud: stage through a local temporary directory.
                staging = tempfile.TemporaryDirectory(prefix="cloudckpt-cp-")
                from cloudckpt.uri import parse_uri

                local_src = parse_uri(staging.name)
                bar.set_total(2 * total)
                crcs = _download_to_files(sstore, [(src.key(n), local_src.key(n), sizes[n]) for n in names],
                                          TransferEngine(sstore, opts), bar, piece)
                for n in names:
                    check(n, crcs[local_src.key(n)])
            try:
                if staging is None:
                    bar.set_total(total)
                crcs = _upload_files(dstore, [(local_src.key(n), dst.key(n), sizes[n]) for n in names],
                                     TransferEngine(dstore, opts), bar)
            finally:
                if staging is not None:
                    staging.cleanup()
            for n in names:
                check(n, crcs[dst.key(n)])
    finally:
        bar.close()
    if args.overwrite:
        # Objects of the replaced checkpoint that the new one lacks.
        dtop, _ = _top_level(dstore, dst)
        stale = [dtop[n].key for n in dtop if n not in sizes and n != layout.METADATA_NAME and _is_dcp_name(n)]
        if stale:
            dstore.delete_many(stale)
    # The commit: .metadata last, so a partial copy is never a checkpoint.
    blob = sstore.get(src.key(layout.METADATA_NAME))
    dstore.put(dst_meta, [blob], crc32c=crc.crc32c(blob), if_absent=not args.overwrite)
    seconds = time.perf_counter() - t0
    moved = total + len(blob)
    doc = {"src": str(src), "dst": str(dst), "objects": len(names) + 1, "bytes": moved, "seconds": round(seconds, 3)}
    text = None if out.quiet else (f"copied {len(names) + 1} objects ({_human(moved)}) from {src} to {dst} in "
                                   f"{seconds:.1f} s ({_human(moved / max(seconds, 1e-9))}/s)")
    out.result(doc, text)
    return EXIT_OK


# -- rm -------------------------------------------------------------------------------------------


def _confirm(question: str) -> bool:
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_rm(args: argparse.Namespace, out: _Out) -> int:
    """Delete one checkpoint, ``.metadata`` first."""
    from cloudckpt import layout
    from cloudckpt.errors import CheckpointNotFoundError
    from cloudckpt.manager import delete_checkpoint

    uri, store = _open(args, args.uri)
    top, everything = _top_level(store, uri)
    uploads = store.list_multipart_uploads(uri.key(""))
    if not everything and not uploads:
        raise CheckpointNotFoundError(f"no checkpoint at {uri}: nothing is stored there")
    if not any(_is_dcp_name(n) for n in top) and everything:
        children = sorted(_group_children(uri, everything))
        raise CLIError(
            f"{uri} is not a checkpoint (it holds {len(children)} prefixes, e.g. {children[0]}/); "
            "rm deletes one checkpoint at a time: pass a checkpoint URI", EXIT_USAGE)
    total = sum(i.size for i in everything)
    committed = layout.METADATA_NAME in top
    if not args.yes:
        if not sys.stdin.isatty():
            raise CLIError(f"refusing to delete {uri} without confirmation; pass --yes", EXIT_USAGE)
        state = "committed checkpoint" if committed else "UNCOMMITTED checkpoint"
        if not _confirm(f"delete {state} {uri} ({len(everything)} objects, {_human(total)})?"):
            out.info("nothing deleted")
            return EXIT_OK
    delete_checkpoint(store, uri, abort_uploads=True)
    doc = {"uri": str(uri), "deleted_objects": len(everything), "bytes": total, "committed": committed,
           "aborted_uploads": len(uploads)}
    out.result(doc, None if out.quiet else f"deleted {uri} ({len(everything)} objects, {_human(total)})")
    return EXIT_OK


# -- gc --------------------------------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace, out: _Out) -> int:
    """Abort stale multipart uploads and delete stale uncommitted checkpoints under a root."""
    from cloudckpt import layout
    from cloudckpt.manager import delete_checkpoint

    uri, store = _open(args, args.root)
    if not uri.is_local:
        store.check_bucket()
    now = _dt.datetime.now(_dt.timezone.utc)
    cutoff = now - _dt.timedelta(seconds=args.older_than)

    def old(t: _dt.datetime | None) -> bool:
        return t is not None and _utc(t) <= cutoff

    by_child = _uploads_by_child(store, uri)
    uploads = [u for us in by_child.values() for u in us]
    stale_uploads = [u for u in uploads if old(u.initiated)]
    unknown_age = [u for u in uploads if u.initiated is None]
    _, everything = _top_level(store, uri)
    stale_ckpts = []
    for child, objs in sorted(_group_children(uri, everything).items()):
        direct = {n: i for n, i in objs.items() if "/" not in n}
        if layout.METADATA_NAME in direct or not any(_is_dcp_name(n) for n in direct):
            continue  # committed, or not a checkpoint at all
        # A save still uploading parts is active even if its finished objects are old.
        times = [i.last_modified for i in objs.values()] + [u.initiated for u in by_child.get(child, [])]
        if any(t is None for t in times):
            continue  # some age unknown: never guess that a prefix is abandoned
        newest = max((_utc(t) for t in times), default=None)
        if old(newest):
            stale_ckpts.append({"uri": str(uri.child(child)), "objects": len(objs),
                                "bytes": sum(i.size for i in objs.values()), "modified": _iso(newest)})
    lines = []
    verb = "would abort" if args.dry_run else "aborted"
    for u in stale_uploads:
        if not args.dry_run:
            store.abort_multipart(u.key, u.upload_id)
        lines.append(f"{verb} incomplete upload of {store.url(u.key)} (started {_when(u.initiated)})")
    verb = "would delete" if args.dry_run else "deleted"
    for c in stale_ckpts:
        if not args.dry_run:
            from cloudckpt.uri import parse_uri

            delete_checkpoint(store, parse_uri(c["uri"]))
        lines.append(f"{verb} uncommitted checkpoint {c['uri']} ({c['objects']} objects, {_human(c['bytes'])}, "
                     f"last written {_when(_dt.datetime.fromisoformat(c['modified']))})")
    if unknown_age:
        lines.append(f"skipped {len(unknown_age)} upload(s) whose start time the store does not report")
    if not lines:
        lines.append(f"nothing to clean under {uri} (older than {args.older_than:g} s)")
    doc = {
        "root": str(uri), "older_than_s": args.older_than, "dry_run": args.dry_run,
        "aborted_uploads": [{"key": u.key, "upload_id": u.upload_id, "initiated": _iso(u.initiated)}
                            for u in stale_uploads],
        "deleted_checkpoints": stale_ckpts,
        "skipped_uploads": len(unknown_age),
    }
    out.result(doc, None if out.quiet and not args.dry_run else "\n".join(lines))
    return EXIT_OK


# -- bench and demo ---------------------------------------------------------------------------------


def _find_benchmarks() -> bool:
    # `python -m benchmarks.run` searches the working directory first, then sys.path.
    spec = importlib.machinery.PathFinder.find_spec("benchmarks", [os.getcwd(), *sys.path])
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.exists(os.path.join(d, "run.py")) for d in spec.submodule_search_locations)


def cmd_bench(args: argparse.Namespace, out: _Out) -> int:
    """Run ``python -m benchmarks.run`` with the remaining arguments."""
    if not _find_benchmarks():
        raise CLIError(
            "the benchmarks are not installed with the package; run them from a source checkout: "
            "`git clone <cloudckpt repository> && cd cloudckpt && pip install -e '.[all,bench]' && "
            "cloudckpt bench` (or `python -m benchmarks.run --help`)", EXIT_NOT_FOUND)
    passthrough = list(args.bench_args)
    if passthrough[:1] == ["--"]:
        passthrough = passthrough[1:]
    return subprocess.call([sys.executable, "-m", "benchmarks.run", *passthrough])


def cmd_demo(args: argparse.Namespace, out: _Out) -> int:
    """Train, checkpoint asynchronously, crash, resume and verify (see cloudckpt.demo)."""
    from cloudckpt import demo

    try:
        summary = demo.run(steps=args.steps, every=args.every, size_mib=args.size_mib, nproc=args.nproc,
                           uri=args.uri, endpoint_url=args.endpoint_url, region=args.region, project=args.project,
                           log=out.info)
    except ValueError as exc:  # bad --steps/--every/--size-mib/--nproc
        raise CLIError(str(exc), EXIT_USAGE) from exc
    out.result(summary, demo.format_summary(summary))
    return EXIT_OK if summary.get("verified") else EXIT_PROBLEMS


# -- parser ---------------------------------------------------------------------------------------------


def _add_globals(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Global options are accepted before and after the command; after it they
    # use SUPPRESS so they do not reset what was given before it.
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("global options")
    g.add_argument("--endpoint-url", default=d(None), metavar="URL",
                   help="S3-compatible or GCS emulator endpoint (default: AWS_ENDPOINT_URL(_S3) / "
                        "STORAGE_EMULATOR_HOST, else the public endpoint)")
    g.add_argument("--region", default=d(None), help="S3 region (s3:// only)")
    g.add_argument("--project", default=d(None), help="GCP project (gs:// only)")
    g.add_argument("--json", action="store_true", default=d(False), help="machine-readable output on stdout")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="no progress bars or success chatter")
    g.add_argument("--progress", action="store_true", default=d(False),
                   help="show progress bars on stderr even when it is not a terminal (e.g. in CI logs)")
    g.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks of errors")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``cloudckpt`` command."""
    from cloudckpt import __version__

    parser = argparse.ArgumentParser(
        prog="cloudckpt",
        description="Inspect, verify, copy and clean up PyTorch DCP checkpoints on S3, GCS and local disk.",
        epilog="exit codes: " + ", ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + ". See docs/configuration.md.",
    )
    parser.add_argument("--version", action="version", version=f"cloudckpt {__version__}")
    _add_globals(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, fn: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_globals(p, suppress=True)
        p.set_defaults(func=fn)
        return p

    p = command("ls", cmd_ls, "list checkpoints under a root, or the objects of a checkpoint")
    p.add_argument("uri", help="root (s3://bucket/run) or checkpoint (s3://bucket/run/step-0000000100) URI")

    p = command("info", cmd_info, "ranks, tensors, dtypes, shapes, sizes, creation time and writer of a checkpoint")
    p.add_argument("uri")

    p = command("verify", cmd_verify, "check a checkpoint's structure, checksums and records without loading it")
    p.add_argument("uri")
    p.add_argument("--shallow", action="store_true",
                   help="skip parsing records (structure and checksums only)")
    p.add_argument("--max-concurrency", type=int, default=16, help="ranged reads in flight (default 16)")

    p = command("cp", cmd_cp, "copy a checkpoint: bucket -> local dir, local dir -> bucket (or bucket -> bucket)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--part-size", type=int, default=None, metavar="MIB",
                   help="multipart part / ranged read size in MiB (default 32)")

    p = command("rm", cmd_rm, "delete a checkpoint (.metadata first, so it is never half-committed)")
    p.add_argument("uri")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation (required without a TTY)")

    p = command("gc", cmd_gc, "abort stale multipart uploads and delete stale uncommitted checkpoints under ROOT")
    p.add_argument("root")
    p.add_argument("--older-than", type=parse_duration, default=24 * 3600.0, metavar="AGE",
                   help="only touch things at least this old: 30m, 2h, 7d, 0s (default 24h)")
    p.add_argument("--dry-run", action="store_true", help="list what would be done, change nothing")

    p = command("bench", cmd_bench, "run the benchmarks (python -m benchmarks.run ARGS) from a source checkout")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks.run")

    p = command("demo", cmd_demo, "train, checkpoint asynchronously, crash, resume and verify, on an embedded "
                                  "S3 server (or --uri / AWS_ENDPOINT_URL)")
    p.add_argument("--steps", type=int, default=12, help="training steps before the crash (default 12)")
    p.add_argument("--every", type=int, default=3, help="checkpoint every N steps (default 3)")
    p.add_argument("--size-mib", type=float, default=64.0,
                   help="model + optimizer state size in MiB (default 64)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--uri", default=None, help="checkpoint root to use instead of the embedded server")
    return parser


def _split_bench(argv: list[str]) -> tuple[list[str], list[str] | None]:
    # Everything after `bench` belongs to benchmarks.run, even options argparse would claim.
    for i, tok in enumerate(argv):
        if tok == "bench":
            return argv[:i + 1], argv[i + 1:]
        if not tok.startswith("-"):
            # A command other than bench (or a value of a global option): stop looking
            # once we pass the first positional that is not an option value.
            if i > 0 and argv[i - 1] in ("--endpoint-url", "--region", "--project"):
                continue
            return argv, None
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cloudckpt`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    head, bench_args = _split_bench(argv)
    parser = build_parser()
    args = parser.parse_args(head)  # exits 2 on usage errors
    if bench_args is not None:
        args.bench_args = bench_args
    from cloudckpt.errors import CloudCheckpointError

    out = _Out(json=args.json, quiet=args.quiet, force_progress=args.progress)
    try:
        return int(args.func(args, out))
    except KeyboardInterrupt:
        print("cloudckpt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every error becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        code = exit_code_for(exc)
        message = str(exc) or type(exc).__name__
        if code == EXIT_MISSING and "pip install" not in message:
            message = f"{message} (a package this command needs is not installed: pip install 'cloudckpt[all]')"
        elif code == EXIT_UNEXPECTED and not isinstance(exc, (CLIError, CloudCheckpointError)):
            message = f"unexpected {type(exc).__name__}: {message} (rerun with --debug for the traceback)"
        if args.debug:
            traceback.print_exc()
        print(f"cloudckpt: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": message, "error_type": type(exc).__name__, "exit_code": code}))
        return code


if __name__ == "__main__":  # pragma: no cover - `python -m cloudckpt.cli`
    sys.exit(main())
