"""cloudckpt's sidecar manifest: its format, seal, opening and the facts it gives.

A manifest sits beside ``.metadata`` and records, for one save, the size and
CRC32C of every data object, and the offset, length, CRC32C and tensor-payload
offset and CRC32C of every item, plus the CRC32C of ``.metadata`` itself. Stock
readers ignore it; cloudckpt's reader, ``verify`` and ``cp`` check against it.

Each save writes its own manifest, named after the save id that ``.metadata``
records (``storage_meta.save_id``, see :func:`cloudckpt.layout.manifest_name`),
so a save that loses a race never replaces the manifest of the committed one.

Everything read here is untrusted input: a manifest is size-capped before it
is parsed, checked against its own CRC32C seal, and every field is validated
before use; anything else is an :class:`~cloudckpt.errors.IntegrityError`
naming the object.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cloudckpt import crc, layout
from cloudckpt.errors import IntegrityError

__all__ = [
    "MANIFEST_FORMAT",
    "MAX_MANIFEST_BYTES",
    "ItemFacts",
    "ObjectFacts",
    "Manifest",
    "build_manifest",
    "seal_manifest",
    "open_manifest",
    "check_metadata_bytes",
    "find_manifest",
]

#: Manifests of this format end with their own CRC32C and record the CRC32C of
#: ``.metadata`` (``metadata_crc32c``); format 1 (no seal) is still read.
MANIFEST_FORMAT = "cloudckpt-manifest/2"
_READABLE_FORMATS = (MANIFEST_FORMAT, "cloudckpt-manifest/1")
_SEAL = re.compile(rb',"manifest_crc32c":(\d+)\}\s*$')
#: The largest manifest that is parsed: about 40 bytes per item, so this is
#: millions of items; a larger object is refused before it is read.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
_U32 = 0xFFFFFFFF
_U63 = (1 << 63) - 1


@dataclasses.dataclass(frozen=True)
class ItemFacts:
    """What the manifest says about one stored item (offsets relative to the item)."""

    length: int
    crc32c: int
    payload_offset: int | None
    payload_crc32c: int | None


@dataclasses.dataclass(frozen=True)
class ObjectFacts:
    """What the manifest says about one data object."""

    size: int
    crc32c: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest.

    ``items`` maps ``(object name, item offset)`` to :class:`ItemFacts`;
    ``doc`` is the whole JSON document (writer, torch version, creation time...).
    """

    doc: dict[str, Any]
    objects: dict[str, ObjectFacts]
    items: dict[tuple[str, int], ItemFacts]

    @property
    def metadata_crc32c(self) -> int | None:
        """CRC32C of the ``.metadata`` this manifest belongs to (None for format 1)."""
        value = self.doc.get("metadata_crc32c")
        return value if isinstance(value, int) else None


def build_manifest(*, metadata_crc32c: int, writer: str, torch_version: str, save_id: str, world_size: int,
                   objects: Mapping[str, Mapping[str, int]], items: Mapping[str, Iterable[list[int | None]]],
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest document of one save (seal it with :func:`seal_manifest`)."""
    doc: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "metadata_crc32c": metadata_crc32c,
        "writer": writer,
        "torch": torch_version,
        "save_id": save_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "world_size": world_size,
        "objects": {k: dict(v) for k, v in sorted(objects.items())},
        "items": {k: sorted(v, key=lambda r: r[0] or 0) for k, v in sorted(items.items())},
    }
    if extra:
        doc.update(extra)
    return doc


def seal_manifest(manifest: dict[str, Any]) -> bytes:
    """Serialise a manifest with its own CRC32C as the last member (see :func:`open_manifest`).

    The checksum covers the exact bytes of the manifest without that member, so
    checking it needs no re-serialisation: strip the member, recompute.
    """
    body = json.dumps(manifest, separators=(",", ":")).encode()
    return body[:-1] + b',"manifest_crc32c":%d}' % crc.crc32c(body)


def _corrupt(where: str, what: str) -> IntegrityError:
    return IntegrityError(f"{where} {what}: the manifest is corrupt or was tampered with, so none of its "
                          "checksums can be trusted; restore the object or load an earlier checkpoint")


def _uint(value: Any, limit: int = _U63) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _opt_uint(value: Any, limit: int = _U63) -> bool:
    return value is None or _uint(value, limit)


def open_manifest(blob: bytes, where: str) -> Manifest:
    """Parse and validate a manifest; IntegrityError (naming ``where``) if it is not intact."""
    if len(blob) > MAX_MANIFEST_BYTES:
        raise _corrupt(where, f"has {len(blob)} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")
    seal = _SEAL.search(blob)
    if seal is not None and crc.crc32c(blob[:seal.start()] + b"}") != int(seal.group(1)):
        raise _corrupt(where, "does not match its own CRC32C seal")
    try:
        doc = json.loads(blob)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(where, f"is not readable JSON ({type(exc).__name__})") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt == MANIFEST_FORMAT and seal is None:
        raise _corrupt(where, "has lost its checksum seal")
    if fmt not in _READABLE_FORMATS:
        raise IntegrityError(f"{where} is not a cloudckpt manifest this version can read (format {fmt!r}); it is "
                             "corrupt or was written by a newer cloudckpt")
    doc.pop("manifest_crc32c", None)
    if not _opt_uint(doc.get("metadata_crc32c"), _U32):
        raise _corrupt(where, "has a metadata_crc32c that is not a 32-bit checksum")
    return Manifest(doc=doc, objects=_objects(doc.get("objects"), where), items=_items(doc.get("items"), where))


def _objects(raw: Any, where: str) -> dict[str, ObjectFacts]:
    if not isinstance(raw, dict):
        raise _corrupt(where, "has no 'objects' table")
    out: dict[str, ObjectFacts] = {}
    for name, facts in raw.items():
        if not isinstance(facts, dict) or not _uint(facts.get("size")) or not _uint(facts.get("crc32c"), _U32):
            raise _corrupt(where, f"has a malformed entry for object {str(name)[:200]!r}")
        out[name] = ObjectFacts(facts["size"], facts["crc32c"])
    return out


def _items(raw: Any, where: str) -> dict[tuple[str, int], ItemFacts]:
    if not isinstance(raw, dict):
        raise _corrupt(where, "has no 'items' table")
    out: dict[tuple[str, int], ItemFacts] = {}
    for name, rows in raw.items():
        if not isinstance(rows, list):
            raise _corrupt(where, f"has a malformed item list for object {str(name)[:200]!r}")
        for row in rows:
            if not (isinstance(row, list) and 4 <= len(row) <= 5 and _uint(row[0]) and _uint(row[1])
                    and _uint(row[2], _U32) and _opt_uint(row[3]) and (len(row) < 5 or _opt_uint(row[4], _U32))):
                raise _corrupt(where, f"has a malformed item row in object {str(name)[:200]!r}")
            payload_crc = row[4] if len(row) > 4 else None
            out[(name, row[0])] = ItemFacts(row[1], row[2], row[3], payload_crc)
    return out


def check_metadata_bytes(blob: bytes, manifest: Manifest | None, where: str) -> None:
    """IntegrityError if ``.metadata``'s bytes do not match the CRC32C its manifest recorded."""
    want = None if manifest is None else manifest.metadata_crc32c
    if want is not None and crc.crc32c(blob) != want:
        raise IntegrityError(f"checksum mismatch in {where}: the checkpoint metadata is corrupt; restore the "
                             "object or load an earlier checkpoint")


#: Manifests looked at when finding the one that matches ``.metadata`` (a save
#: that lost a race may leave one behind; more than this is not a checkpoint).
MAX_MANIFEST_CANDIDATES = 16


def find_manifest(store: Any, uri: Any, metadata_blob: bytes, rank: int | None = None) -> Manifest | None:
    """The manifest of the save that wrote ``metadata_blob``, or None for a checkpoint without one.

    Every manifest in the checkpoint prefix is a candidate (one LIST request);
    the one that records ``metadata_blob``'s CRC32C is the committed save's.
    Candidates that exist but match none mean ``.metadata`` is corrupt (or was
    replaced): IntegrityError. A manifest that is itself damaged is an
    IntegrityError too, unless another one matches.
    """
    stem = layout.manifest_name(None, rank)[: -len(".json")]
    base = uri.key("")
    names = sorted(info.key[len(base):] for info in store.list(uri.key(stem)))
    names = [n for n in names if "/" not in n and layout.is_manifest_name(n)
             and n.startswith(stem)][:MAX_MANIFEST_CANDIDATES]
    if not names:
        return None
    want = crc.crc32c(metadata_blob)
    damaged: IntegrityError | None = None
    legacy: Manifest | None = None
    for name in names:
        key = uri.key(name)
        try:
            found = open_manifest(store.get(key, max_size=MAX_MANIFEST_BYTES), store.url(key))
        except IntegrityError as exc:
            damaged = damaged or exc
            continue
        except FileNotFoundError:
            continue  # deleted since the listing (a losing save cleaning up)
        if found.metadata_crc32c == want:
            return found
        if found.metadata_crc32c is None and name == layout.manifest_name(None, rank):
            legacy = found  # format 1 recorded no CRC of .metadata
    if legacy is not None:
        return legacy
    if damaged is not None:
        raise damaged
    meta = store.url(uri.key(layout.METADATA_NAME if rank is None else layout.rank_metadata_name(rank)))
    raise IntegrityError(f"checksum mismatch in {meta}: its CRC32C {want:#010x} matches none of the checkpoint's "
                         f"{len(names)} manifest(s), so the checkpoint metadata is corrupt or was replaced; restore "
                         "the object or load an earlier checkpoint")
