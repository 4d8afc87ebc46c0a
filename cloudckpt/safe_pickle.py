"""Restricted unpickling of DCP ``.metadata``.

A ``.metadata`` object comes from storage that other principals may be able to
write. Plain ``pickle.load`` on it would run any code a crafted file names, so
it is loaded by an unpickler that resolves only the DCP metadata classes and the
handful of torch/builtin types they are made of, and refuses everything else.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from cloudckpt.errors import UnsafeMetadataError

__all__ = ["load_metadata", "MAX_METADATA_BYTES"]

#: The largest ``.metadata`` that is read: DCP metadata of a job with thousands of ranks
#: and tensors is tens of MiB; a larger object is refused before it is read.
MAX_METADATA_BYTES = 512 * 1024 * 1024

_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "slice", "complex", "bytearray", "tuple", "list", "dict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BytesIO, where: str) -> None:
        super().__init__(f)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise UnsafeMetadataError(
            f"{self._where} references {module}.{name}, which a DCP checkpoint's metadata never needs; "
            "refusing to unpickle it. The object may have been tampered with: restore it from a trusted "
            "copy, or re-save the checkpoint"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeMetadataError(f"{self._where} contains persistent references; refusing to unpickle it")


def load_metadata(blob: bytes, where: str) -> Any:
    """Unpickle a ``.metadata`` blob, allowing only DCP metadata classes."""
    try:
        return _MetadataUnpickler(io.BytesIO(blob), where).load()
    except UnsafeMetadataError:
        raise
    except Exception as exc:
        raise UnsafeMetadataError(
            f"{where} is not a readable DCP metadata file ({type(exc).__name__}: {exc}); "
            "the object is corrupt or was not written by DCP"
        ) from exc
