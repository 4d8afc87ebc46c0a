"""Restricted unpickling of everything a checkpoint stores: ``.metadata`` and byte items.

Both come from storage that other principals may be able to write. Plain
``pickle.load`` (or ``torch.load(weights_only=False)``, which DCP's default
planner uses for byte items) would run any code a crafted object names, so:

* ``.metadata`` is loaded by an unpickler that resolves only the DCP metadata
  classes and the few torch/builtin types they are made of, and the result is
  then checked field by field (:func:`validate_metadata`) before anything uses it;
* byte items (``torch.save`` archives of non-tensor values) are loaded by
  :func:`load_byte_item`, which parses the archive itself and resolves only
  what common training state needs: numbers, strings, bytes, containers,
  ``OrderedDict``, tensors and parameters (storages built from the archive's
  own records, never larger than those records), ``torch.Size``, dtypes and
  devices. Anything else raises :class:`~cloudckpt.errors.UnsafeCheckpointItemError`.

Allocating constructors (``bytearray``, ``_codecs.encode``) accept only
arguments that already exist in the pickle, so memory stays proportional to
the input size: a 30-byte object cannot ask for a GiB.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from cloudckpt.errors import IntegrityError, UnsafeCheckpointItemError, UnsafeMetadataError

__all__ = [
    "load_metadata",
    "validate_metadata",
    "load_byte_item",
    "load_tensor_item",
    "load_tensor_record",
    "reserialise",
    "MAX_METADATA_BYTES",
    "MAX_NUMEL",
]

#: The largest ``.metadata`` that is read: DCP metadata of a job with thousands of ranks
#: and tensors is tens of MiB; a larger object is refused before it is read.
MAX_METADATA_BYTES = 512 * 1024 * 1024
#: The most elements a stored tensor may claim (2**50 elements is 8 PiB of fp64).
MAX_NUMEL = 1 << 50
#: The largest byte offset/length a storage entry may claim (S3/GCS objects are <= 5 TiB).
_MAX_OFFSET = 1 << 62
_MAX_RANK = 64

_ALLOW_PICKLE_HINT = ("If the checkpoint comes from a trusted source, load it with allow_pickle=True "
                      "(cloudckpt.load(..., allow_pickle=True) or the reader's allow_pickle=True)")


# -- allocation-bounded constructors --------------------------------------------------

def _bounded_bytearray(*args: Any) -> bytearray:
    """``bytearray`` as pickle protocols 2-4 call it: from bytes, or a str and its encoding.

    An int argument (``bytearray(2**30)``) would allocate that many bytes from a
    few bytes of pickle; only data already present in the pickle is accepted.
    """
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], args[1])
    raise pickle.UnpicklingError(f"bytearray{tuple(type(a).__name__ for a in args)} is not allowed "
                                 "(only bytes or a latin-1 string are)")


def _bounded_encode(obj: Any, encoding: Any = "utf-8", *_: Any) -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for ``bytes``: a str in latin-1."""
    if isinstance(obj, str) and encoding in ("latin1", "latin-1"):
        return obj.encode("latin-1")
    raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 strings (how pickle stores bytes)")


def _bounded_container(kind: type) -> Callable[..., Any]:
    def make(*args: Any) -> Any:
        if len(args) > 1:
            raise pickle.UnpicklingError(f"{kind.__name__}() takes at most one argument")
        if args and not isinstance(args[0], (list, tuple, set, frozenset, dict, str, bytes)):
            raise pickle.UnpicklingError(f"{kind.__name__}() of a {type(args[0]).__name__} is not allowed")
        return kind(*args)
    make.__name__ = kind.__name__
    return make


def _bounded_complex(*args: Any) -> complex:
    if len(args) > 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise pickle.UnpicklingError("complex() takes up to two numbers")
    return complex(*args)


def _torch_constant(name: str) -> Any:
    """A torch dtype, layout or memory format by name, else None."""
    obj = getattr(torch, name, None)
    if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
        return obj
    return None


def _py3_module(module: str) -> str:
    # Protocol 0-2 pickles name Python 2 modules (``__builtin__``); pickle maps them the same way.
    return {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)


# -- .metadata ------------------------------------------------------------------------

_METADATA_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
}
# No list/tuple/dict: pickle has opcodes for them, and as callables they turn a
# small iterable-producing argument into a huge container.
_METADATA_BUILTINS: dict[str, Callable[..., Any]] = {
    "set": _bounded_container(set),
    "frozenset": _bounded_container(frozenset),
    "bytearray": _bounded_bytearray,
    "complex": _bounded_complex,
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BytesIO, where: str) -> None:
        super().__init__(f)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        module = _py3_module(module)
        if name in _METADATA_ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "builtins" and name in _METADATA_BUILTINS:
            return _METADATA_BUILTINS[name]
        if module == "torch":
            if name == "Size":
                return torch.Size
            const = _torch_constant(name)
            if const is not None:
                return const
        raise UnsafeMetadataError(
            f"{self._where} references {module}.{name}, which a DCP checkpoint's metadata never needs; "
            "refusing to unpickle it. The object may have been tampered with: restore it from a trusted "
            "copy, or re-save the checkpoint"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeMetadataError(f"{self._where} contains persistent references; refusing to unpickle it")


def load_metadata(blob: bytes, where: str) -> Metadata:
    """Unpickle a ``.metadata`` blob (DCP metadata classes only) and validate every field."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(blob), where).load()
    except UnsafeMetadataError:
        raise
    except Exception as exc:
        raise UnsafeMetadataError(
            f"{where} is not a readable DCP metadata file ({type(exc).__name__}: {str(exc)[:200]}); "
            "the object is corrupt or was not written by DCP"
        ) from exc
    return validate_metadata(metadata, where)


class _Invalid(Exception):
    """A field of ``.metadata`` has the wrong type or an impossible value."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape(v: Any, path: str, rank: int | None = None) -> tuple[int, ...]:
    if not isinstance(v, (torch.Size, tuple, list)):
        raise _Invalid(f"{path} is a {type(v).__name__}, expected torch.Size")
    if len(v) > _MAX_RANK or (rank is not None and len(v) != rank):
        raise _Invalid(f"{path} has {len(v)} dimensions, expected {rank if rank is not None else '<= 64'}")
    for i, d in enumerate(v):
        if not _is_int(d) or d < 0 or d > MAX_NUMEL:
            raise _Invalid(f"{path}[{i}] is {d!r}, expected a non-negative int")
    return tuple(v)


def _numel(shape: tuple[int, ...], path: str) -> int:
    n = math.prod(shape)
    if n > MAX_NUMEL:
        raise _Invalid(f"{path} has {n} elements, more than the {MAX_NUMEL} a tensor may have")
    return n


def _check_tensor_md(md: TensorStorageMetadata, path: str) -> None:
    props = getattr(md, "properties", None)
    if not isinstance(props, TensorProperties):
        raise _Invalid(f"{path}.properties is a {type(props).__name__}, expected TensorProperties")
    if not isinstance(getattr(props, "dtype", None), torch.dtype):
        raise _Invalid(f"{path}.properties.dtype is {getattr(props, 'dtype', None)!r}, expected a torch.dtype")
    for name, kind in (("layout", torch.layout), ("memory_format", torch.memory_format)):
        value = getattr(props, name, None)
        if value is not None and not isinstance(value, kind):
            raise _Invalid(f"{path}.properties.{name} is {value!r}, expected a {kind.__name__}")
    for name in ("requires_grad", "pin_memory"):
        if not isinstance(getattr(props, name, False), bool):
            raise _Invalid(f"{path}.properties.{name} is not a bool")
    size = _shape(getattr(md, "size", None), f"{path}.size")
    _numel(size, f"{path}.size")
    chunks = getattr(md, "chunks", None)
    if not isinstance(chunks, list):
        raise _Invalid(f"{path}.chunks is a {type(chunks).__name__}, expected a list")
    for i, chunk in enumerate(chunks):
        where = f"{path}.chunks[{i}]"
        if not isinstance(chunk, ChunkStorageMetadata):
            raise _Invalid(f"{where} is a {type(chunk).__name__}, expected ChunkStorageMetadata")
        offsets = _shape(getattr(chunk, "offsets", None), f"{where}.offsets", len(size))
        sizes = _shape(getattr(chunk, "sizes", None), f"{where}.sizes", len(size))
        for d, (o, n, full) in enumerate(zip(offsets, sizes, size, strict=True)):
            if o + n > full:
                raise _Invalid(f"{where} spans [{o}, {o + n}) in dimension {d}, outside the tensor's size {full}")


def _check_storage_info(info: Any, path: str) -> None:
    rel = getattr(info, "relative_path", None)
    if not isinstance(rel, str):
        raise _Invalid(f"{path}.relative_path is a {type(rel).__name__}, expected a str")
    for name in ("offset", "length"):
        v = getattr(info, name, None)
        if not isinstance(v, int) or not _is_int(v) or v < 0 or v > _MAX_OFFSET:
            raise _Invalid(f"{path}.{name} is {v!r}, expected a non-negative int")
    td = getattr(info, "transform_descriptors", None)
    if td is not None and not (isinstance(td, (list, tuple)) and all(isinstance(t, str) for t in td)):
        raise _Invalid(f"{path}.transform_descriptors is {td!r}, expected None or a list of str")


def _check_index(idx: Any, path: str) -> None:
    if not isinstance(idx, MetadataIndex):
        raise _Invalid(f"{path} is a {type(idx).__name__}, expected MetadataIndex")
    if not isinstance(getattr(idx, "fqn", None), str):
        raise _Invalid(f"{path}.fqn is not a str")
    if getattr(idx, "offset", None) is not None:
        _shape(idx.offset, f"{path}.offset")
    index = getattr(idx, "index", None)
    if index is not None and (not _is_int(index) or index < 0):
        raise _Invalid(f"{path}.index is {index!r}, expected None or a non-negative int")


def validate_metadata(metadata: Any, where: str) -> Metadata:
    """``metadata`` if every field has the type and range DCP gives it, else :class:`UnsafeMetadataError`.

    Checked before anything reads the fields, so a crafted ``.metadata`` gives
    one typed error naming the object and field, not an AttributeError deep in
    DCP or an allocation sized by a forged number.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    try:
        if not isinstance(metadata, Metadata):
            raise _Invalid(f"the top-level object is a {type(metadata).__name__}, expected Metadata")
        sdm = getattr(metadata, "state_dict_metadata", None)
        if not isinstance(sdm, dict):
            raise _Invalid(f"state_dict_metadata is a {type(sdm).__name__}, expected a dict")
        for fqn, md in sdm.items():
            path = f"state_dict_metadata[{fqn!r}]"
            if not isinstance(fqn, str):
                raise _Invalid(f"state_dict_metadata has a key of type {type(fqn).__name__}, expected str")
            if isinstance(md, TensorStorageMetadata):
                _check_tensor_md(md, path)
            elif not isinstance(md, BytesStorageMetadata):
                raise _Invalid(f"{path} is a {type(md).__name__}, expected TensorStorageMetadata or "
                               "BytesStorageMetadata")
        storage = getattr(metadata, "storage_data", None)
        if storage is None:
            storage = metadata.storage_data = {}
        if not isinstance(storage, dict):
            raise _Invalid(f"storage_data is a {type(storage).__name__}, expected a dict")
        for idx, info in storage.items():
            _check_index(idx, f"storage_data key {idx!r}")
            if not isinstance(info, _StorageInfo):
                raise _Invalid(f"storage_data[{idx.fqn!r}] is a {type(info).__name__}, expected _StorageInfo")
            _check_storage_info(info, f"storage_data[{idx.fqn!r}]")
        planner_data = getattr(metadata, "planner_data", None)
        if planner_data is not None and not isinstance(planner_data, dict):
            raise _Invalid(f"planner_data is a {type(planner_data).__name__}, expected a dict")
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is not None and not isinstance(storage_meta, StorageMeta):
            raise _Invalid(f"storage_meta is a {type(storage_meta).__name__}, expected StorageMeta")
        version = getattr(metadata, "version", None)
        if version is not None and not isinstance(version, str):
            raise _Invalid(f"version is a {type(version).__name__}, expected a str")
    except _Invalid as exc:
        raise UnsafeMetadataError(
            f"{where} is not valid DCP metadata: {exc}. The object is corrupt or was tampered with: restore it "
            "from a trusted copy, or re-save the checkpoint"
        ) from None
    except Exception as exc:
        raise UnsafeMetadataError(
            f"{where} is not valid DCP metadata ({type(exc).__name__}: {str(exc)[:200]}); the object is corrupt "
            "or was tampered with"
        ) from exc
    return metadata


# -- byte items -----------------------------------------------------------------------

class _Storage:
    """A storage rebuilt from one of the archive's own records."""

    __slots__ = ("untyped", "dtype", "numel")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype, numel: int) -> None:
        self.untyped = untyped
        self.dtype = dtype
        self.numel = numel


class _StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: only their dtype is used."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _storage_types() -> dict[str, torch.dtype]:
    out: dict[str, torch.dtype] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation: only .dtype is read
        for name in dir(torch):
            if not name.endswith("Storage") or name in ("UntypedStorage", "TypedStorage"):
                continue
            cls = getattr(torch, name)
            try:
                dtype = cls.dtype
            except Exception:  # noqa: BLE001 - not a legacy typed storage class
                continue
            if isinstance(dtype, torch.dtype):
                out[name] = dtype
    out["UntypedStorage"] = torch.uint8
    return out


_STORAGE_TYPES = _storage_types()


class _ItemUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a byte item; resolves only the allow-list, builds storages itself."""

    def __init__(self, pkl: bytes, blob: memoryview, members: dict[str, tuple[int, int]], root: str,
                 fqn: str, where: str) -> None:
        super().__init__(io.BytesIO(pkl))
        self._blob = blob
        self._members = members
        self._root = root
        self._fqn = fqn
        self._where = where
        self._storages: dict[str, torch.UntypedStorage] = {}

    def _refuse(self, what: str) -> UnsafeCheckpointItemError:
        return UnsafeCheckpointItemError(
            f"item {self._fqn!r} in {self._where} is a pickled object that references {what}, which restricted "
            f"loading does not allow (it could run code); refusing to load it. {_ALLOW_PICKLE_HINT}")

    def find_class(self, module: str, name: str) -> Any:
        module = _py3_module(module)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._rebuild_parameter
        if module == "builtins" and name in _METADATA_BUILTINS:
            return _METADATA_BUILTINS[name]
        if module == "_codecs" and name == "encode":
            return _bounded_encode
        if module in ("torch", "torch.storage") and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        if module == "torch":
            if name == "Size":
                return torch.Size
            if name == "device":
                return _device
            const = _torch_constant(name)
            if const is not None:
                return const
        raise self._refuse(f"the class {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:100]}")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(location, str) \
                or not _is_int(numel) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage reference {str(pid)[:100]}")
        name = f"{self._root}data/{key}"
        if name not in self._members:
            raise pickle.UnpicklingError(f"storage record {name} is missing from the archive")
        off, size = self._members[name]
        itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
        # The record's real size bounds the allocation, whatever numel claims.
        if numel * itemsize > size:
            raise pickle.UnpicklingError(f"storage {key} claims {numel} elements of {itemsize} bytes but its "
                                         f"record has {size} bytes")
        untyped = self._storages.get(key)
        if untyped is None:
            data = bytearray(self._blob[off:off + size])
            untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if size else torch.UntypedStorage(0)
            self._storages[key] = untyped
        return _Storage(untyped, storage_type.dtype, numel)

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                        requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("_rebuild_tensor_v2 called without a storage record")
        if not _is_int(storage_offset) or storage_offset < 0:
            raise pickle.UnpicklingError(f"bad storage offset {storage_offset!r}")
        shape = _shape_or_fail(size)
        strides = _shape_or_fail(stride)
        if len(shape) != len(strides):
            raise pickle.UnpicklingError("size and stride have different lengths")
        if not isinstance(requires_grad, bool):
            raise pickle.UnpicklingError("requires_grad must be a bool")
        if backward_hooks:
            raise self._refuse("backward hooks")
        if metadata not in (None, {}) and not isinstance(metadata, dict):
            raise pickle.UnpicklingError("bad tensor metadata")
        if len(shape) != len(strides):
            raise pickle.UnpicklingError(f"tensor of size {shape} has {len(strides)} strides")
        if 0 not in shape:
            extent = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
            if extent > storage.numel:
                raise pickle.UnpicklingError(f"tensor of size {shape} and stride {strides} at offset "
                                             f"{storage_offset} lies outside its {storage.numel}-element storage")
        t = torch.empty((0,), dtype=storage.dtype)
        t.set_(storage.untyped, storage_offset, shape, strides)
        if requires_grad:
            if not (t.is_floating_point() or t.is_complex()):
                raise pickle.UnpicklingError("requires_grad on a non-float tensor")
            t.requires_grad_(True)
        return t

    def _rebuild_parameter(self, data: Any, requires_grad: Any, backward_hooks: Any = None) -> torch.nn.Parameter:
        if not isinstance(data, torch.Tensor) or not isinstance(requires_grad, bool):
            raise pickle.UnpicklingError("_rebuild_parameter needs a tensor and a bool")
        if backward_hooks:
            raise self._refuse("backward hooks")
        return torch.nn.Parameter(data, requires_grad)


def _device(*args: Any) -> torch.device:
    if not (1 <= len(args) <= 2 and isinstance(args[0], str) and len(args[0]) < 64
            and (len(args) == 1 or args[1] is None or _is_int(args[1]))):
        raise pickle.UnpicklingError("torch.device takes a device string and an optional index")
    return torch.device(*args)


def _shape_or_fail(v: Any) -> tuple[int, ...]:
    try:
        return _shape(v, "shape")
    except _Invalid as exc:
        raise pickle.UnpicklingError(str(exc)) from None


def _load_archive(data: Any, fqn: str, where: str) -> Any:
    from cloudckpt import layout

    blob = memoryview(data).cast("B")
    try:
        members = layout.zip_members(blob)
    except ValueError as exc:
        raise IntegrityError(f"item {fqn!r} in {where} is not a readable torch.save archive ({exc}); the stored "
                             "bytes are corrupt or were tampered with") from None
    pkl = next((n for n in members if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
        raise IntegrityError(f"item {fqn!r} in {where} is a zip archive without data.pkl, not a torch.save record")
    root = pkl[: -len("data.pkl")]
    order = members.get(f"{root}byteorder")
    if order is not None and bytes(blob[order[0]:order[0] + order[1]]) not in (b"little", b""):
        raise IntegrityError(f"item {fqn!r} in {where} was saved big-endian, which restricted loading does not "
                             "support")
    off, size = members[pkl]
    unpickler = _ItemUnpickler(bytes(blob[off:off + size]), blob, members, root, fqn, where)
    try:
        return unpickler.load()
    except (UnsafeCheckpointItemError, IntegrityError):
        raise
    except RecursionError:
        raise IntegrityError(f"item {fqn!r} in {where} is nested too deeply to load") from None
    except Exception as exc:  # noqa: BLE001 - every malformed pickle ends here
        raise IntegrityError(f"item {fqn!r} in {where} is not a loadable torch.save record "
                             f"({type(exc).__name__}: {str(exc)[:200]}); the stored bytes are corrupt or were "
                             "tampered with") from None


def load_byte_item(data: Any, *, fqn: str, where: str) -> Any:
    """Load a byte item's ``torch.save`` archive without ever resolving a class outside the allow-list.

    Raises :class:`UnsafeCheckpointItemError` (naming ``fqn``, ``where`` and the
    class) for anything that could run code, and :class:`IntegrityError` for
    malformed archives. Memory is bounded by the archive's size.
    """
    return _load_archive(data, fqn, where)


def load_tensor_item(data: Any, *, fqn: str, where: str) -> torch.Tensor:
    """Like :func:`load_byte_item` for a tensor item: the record must hold exactly one tensor."""
    obj = _load_archive(data, fqn, where)
    if not isinstance(obj, torch.Tensor):
        raise IntegrityError(f"item {fqn!r} in {where} is stored as a tensor but its record holds a "
                             f"{type(obj).__name__}; the checkpoint metadata and data disagree")
    return obj


def load_tensor_record(data: Any, *, fqn: str, where: str) -> torch.Tensor:
    """The tensor of a tensor item's record, as the reader loads it; typed errors only.

    A plain dense record (what DCP and cloudckpt write) is viewed in place,
    without a copy; anything else goes through :func:`load_tensor_item`.
    """
    from cloudckpt import layout

    try:
        rec = layout.parse_tensor_record(data)
        if rec.is_dense():
            return layout.payload_view(memoryview(data).cast("B"), rec)
    except Exception:  # noqa: BLE001 - not a plain record: the restricted loader judges it
        pass
    return load_tensor_item(data, fqn=fqn, where=where)


def reserialise(obj: Any) -> io.BytesIO:
    """``obj`` (built by the restricted loader, so allow-listed types only) as a fresh ``torch.save`` stream.

    A planner's own ``torch.load`` of this stream only meets classes the
    restricted loader created, whatever the stored bytes named.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
