"""Undo DCP stream transforms (compression, encryption...) recorded in ``.metadata``.

``FileSystemWriter(path, _extensions=[ZStandard()])`` passes every item through
the given :class:`~torch.distributed.checkpoint._extension.StreamTransformExtension`
chain and records the chain in ``_StorageInfo.transform_descriptors``; the
item's ``offset``/``length`` then describe the *stored* (e.g. compressed)
bytes. :func:`decode_item` turns those stored bytes back into the
``torch.save`` record that cloudckpt's restricted loaders parse, using torch's
own :class:`~torch.distributed.checkpoint._extension.ExtensionRegistry`, so
``stream.zstd`` works when ``zstandard`` or ``pyzstd`` is installed
(``pip install cloudckpt[zstd]``) and any extension a user registers with
:func:`register_extension` works too.

Everything here reads untrusted input:

* an unknown or unusable descriptor raises :class:`UnsupportedTransformError`
  naming it, the item and the object, and saying what to install or register;
  it is never reported as corruption;
* decoding is streamed and stops at ``max_size`` decoded bytes
  (:func:`decoded_limit`: the tensor's declared size plus framing, or
  ``CLOUDCKPT_MAX_DECODED_BYTES`` for byte items), so a decompression bomb
  raises :class:`DecodedTooLargeError` after allocating at most that much;
* any other decoding failure is an :class:`IntegrityError`.

Order: the writer wraps the output stream with each extension in turn, so the
*first* extension is the one applied last to the data, and it stores the
descriptors in reverse (``[last, ..., first]``), i.e. in the order the
transforms were applied to the data. Decoding therefore undoes them from the
end of the list. (torch 2.13's ``FileSystemReader`` applies them from the start,
which only agrees with its writer for a single transform.)
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from cloudckpt.errors import DecodedTooLargeError, IntegrityError, UnsupportedTransformError

__all__ = [
    "decode_item",
    "decoded_limit",
    "check_supported",
    "register_extension",
    "extension_registry",
    "max_decoded_bytes",
    "FRAMING_BYTES",
    "MAX_DESCRIPTORS",
]

#: Room for a ``torch.save`` record's zip framing around a tensor payload (it is ~1.6 KB).
FRAMING_BYTES = 1 << 20
#: Default decoded-size limit of a transformed byte item (override: ``CLOUDCKPT_MAX_DECODED_BYTES``).
DEFAULT_MAX_DECODED_BYTES = 1 << 30
#: More stacked transforms than this on one item are refused (each adds a decoding pass).
MAX_DESCRIPTORS = 8
_ENV_LIMIT = "CLOUDCKPT_MAX_DECODED_BYTES"
_READ_CHUNK = 1 << 20

_registry = ExtensionRegistry()
_registry_lock = threading.Lock()


def register_extension(cls: type[StreamTransformExtension]) -> None:
    """Make ``cls`` decode items whose descriptor names ``cls.registry_name()``, in this process.

    Like ``ExtensionRegistry.register`` for torch's ``FileSystemReader``; call it
    in every process that loads (or verifies) such checkpoints.
    """
    if not (isinstance(cls, type) and issubclass(cls, StreamTransformExtension)):
        raise TypeError(f"register_extension needs a StreamTransformExtension subclass, got {cls!r}")
    with _registry_lock:
        _registry.register(cls)


def extension_registry() -> ExtensionRegistry:
    """The registry cloudckpt decodes with (torch's defaults, i.e. ``stream.zstd``, plus registered ones)."""
    return _registry


def max_decoded_bytes() -> int:
    """The decoded-size limit of a transformed byte item: ``CLOUDCKPT_MAX_DECODED_BYTES`` or 1 GiB."""
    raw = os.environ.get(_ENV_LIMIT)
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_DECODED_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{_ENV_LIMIT}={raw!r} is not a whole number of bytes") from None
    if value < 1:
        raise ValueError(f"{_ENV_LIMIT}={raw!r} must be positive")
    return value


def decoded_limit(metadata: Metadata | None, index: MetadataIndex) -> int:
    """The most bytes the item at ``index`` may decode to.

    A tensor chunk's record is its payload (dtype size x declared elements)
    plus :data:`FRAMING_BYTES`; anything else (byte items, entries that match no
    chunk) gets :func:`max_decoded_bytes`.
    """
    md = None if metadata is None else metadata.state_dict_metadata.get(index.fqn)
    if isinstance(md, TensorStorageMetadata):
        offsets = list(index.offset or [])
        for chunk in md.chunks:
            if list(chunk.offsets) == offsets:
                itemsize = torch.empty((), dtype=md.properties.dtype).element_size()
                return math.prod(chunk.sizes) * itemsize + FRAMING_BYTES
    return max_decoded_bytes()


def _hint(name: str) -> str:
    if name == "stream.zstd":
        return "install zstandard or pyzstd (pip install 'cloudckpt[zstd]') in every process that loads it"
    return ("register the StreamTransformExtension subclass that wrote it with "
            "cloudckpt.transforms.register_extension(cls) in every process that loads it")


def _unsupported(desc: Any, where: str, reason: str) -> UnsupportedTransformError:
    name = desc.partition("/")[0] if isinstance(desc, str) else ""
    shown = repr(desc)[:120]
    return UnsupportedTransformError(
        f"{where} is stored through the stream transform {shown}, which cannot be decoded here ({reason}). "
        f"The stored bytes are not known to be corrupt: {_hint(name)}")


def check_supported(descriptors: Sequence[str] | None, where: str,
                    registry: ExtensionRegistry | None = None) -> list[StreamTransformExtension]:
    """The extensions for ``descriptors`` (in stored order), or :class:`UnsupportedTransformError`.

    Resolves every descriptor through the registry without decoding anything,
    so :func:`cloudckpt.verify` can report unsupported items cheaply.
    """
    if not descriptors:
        return []
    reg = registry if registry is not None else _registry
    if not isinstance(descriptors, (list, tuple)) or len(descriptors) > MAX_DESCRIPTORS:
        n = len(descriptors) if isinstance(descriptors, (list, tuple)) else "?"
        raise UnsupportedTransformError(
            f"{where} claims {n} stacked stream transforms; at most {MAX_DESCRIPTORS} are decoded. The metadata "
            "is unusual or was tampered with; check it with `cloudckpt verify`")
    out: list[StreamTransformExtension] = []
    for desc in descriptors:
        if not isinstance(desc, str):
            raise _unsupported(desc, where, "a descriptor must be a string")
        try:
            (ext,) = reg.from_descriptor_list([desc])
        except Exception as exc:  # noqa: BLE001 - unknown name, bad version, missing module
            raise _unsupported(desc, where, f"{type(exc).__name__}: {str(exc)[:200]}") from None
        if not isinstance(ext, StreamTransformExtension):
            raise _unsupported(desc, where, f"{type(ext).__name__} is registered under that name but is not a "
                                            "stream transform")
        out.append(ext)
    return out


class _ViewReader(io.RawIOBase):
    """A read-only stream over a memoryview (no copy of the stored bytes)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(out.nbytes, self._view.nbytes - self._pos))
        out[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n


def _read_bounded(stream: Any, max_size: int, where: str, shown: str) -> bytearray:
    """Everything ``stream`` yields, or DecodedTooLargeError as soon as it passes ``max_size``."""
    out = bytearray()
    while True:
        chunk = stream.read(min(_READ_CHUNK, max_size + 1 - len(out)))
        if not chunk:
            return out
        out += chunk
        if len(out) > max_size:
            raise DecodedTooLargeError(
                f"{where} decodes (through {shown}) to more than {max_size} bytes, the most it may: a "
                "decompression bomb or corrupt data; decoding was stopped. For a byte item that is really this "
                f"large, raise {_ENV_LIMIT}; otherwise restore the object or load an earlier checkpoint")


def decode_item(data: memoryview | bytes | bytearray, descriptors: Sequence[str] | None, where: str,
                max_size: int, registry: ExtensionRegistry | None = None) -> memoryview:
    """The stored bytes of one item with its stream transforms undone; ``data`` itself when there are none.

    ``where`` names the item and its object (e.g. ``"item 'w' in s3://b/ckpt/__0_0.distcp"``) for errors;
    ``max_size`` bounds the decoded size (see :func:`decoded_limit`).
    Raises :class:`UnsupportedTransformError`, :class:`DecodedTooLargeError`
    or :class:`IntegrityError`.
    """
    if not descriptors:
        return memoryview(data)
    exts = check_supported(descriptors, where, registry)
    shown = ", ".join(repr(d)[:80] for d in descriptors)
    stream: Any = _ViewReader(memoryview(data).cast("B"))
    streams = [stream]
    try:
        # Stored as [applied first ... applied last]: the last one is outermost on the stored bytes.
        for ext in reversed(exts):
            stream = ext.transform_from(stream)
            streams.append(stream)
        return memoryview(_read_bounded(stream, max_size, where, shown))
    except (DecodedTooLargeError, UnsupportedTransformError):
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure (ZstdError, OSError...) ends here
        raise IntegrityError(
            f"{where} could not be decoded through stream transform(s) {shown} ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the stored bytes are corrupt, or were written by a different extension "
            "of that name. Restore the object or load an earlier checkpoint") from None
    finally:
        for s in reversed(streams):
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing an in-memory decoder cannot lose data
                pass
