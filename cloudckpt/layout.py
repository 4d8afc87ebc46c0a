"""DCP-compatible object names and ``torch.save`` framing with the payload kept by reference.

Every tensor item is stored exactly as DCP's ``FileSystemWriter`` stores it: a
complete ``torch.save`` archive of the (contiguous) tensor. Instead of writing
that archive into a buffer, :func:`frame_tensor` runs ``torch.save`` into a
capturing sink that *copies* the ~1.6 KB of zip framing (it lives in temporary
C++ buffers) and keeps the multi-megabyte payload as a memoryview aliasing the
tensor's memory. The item is therefore fully laid out, with its size known,
before a single byte is uploaded, and the payload is never copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from cloudckpt.errors import UnsupportedTensorError

__all__ = [
    "METADATA_NAME",
    "LEGACY_MANIFEST_NAME",
    "NODE_COMMIT_NAME",
    "DATA_SUFFIX",
    "PREFIX_STRATEGIES",
    "check_prefix_strategy",
    "rank_prefix",
    "data_object_name",
    "parse_data_object_name",
    "rank_metadata_name",
    "manifest_name",
    "is_commit_name",
    "is_manifest_name",
    "is_checkpoint_object_name",
    "COMMIT_OBJECT_NAMES",
    "COMMITTED",
    "UNCOMMITTED",
    "checkpoint_state",
    "commit_objects",
    "MAX_NAME_BYTES",
    "MAX_KEY_BYTES",
    "check_relative_path",
    "step_name",
    "parse_step_name",
    "FramedItem",
    "frame_tensor",
    "FramingCache",
    "frame_bytes",
    "crc_disabled",
    "TensorRecord",
    "parse_tensor_record",
    "payload_view",
    "MAX_RELATIVE_PATH",
    "check_relative_path",
    "zip_members",
]

# -- object names -----------------------------------------------------------------------
#
# Every naming rule of a checkpoint lives here: the commit objects (``.metadata``,
# ``__{rank}.metadata``), cloudckpt's manifest, data objects (stock names and the
# save-unique names cloudckpt writes), rank prefixes and step prefixes. Everything
# that lists, copies, cleans up or retains checkpoints recognises objects through
# these functions, so the rules cannot drift apart.

METADATA_NAME = ".metadata"
#: cloudckpt < 0.2 wrote its manifest under this one name for every save.
LEGACY_MANIFEST_NAME = ".cloudckpt-manifest.json"
_MANIFEST_STEM = ".cloudckpt-manifest"
#: A node's commit marker of its copy of a local-tier step (see cloudckpt/tiers.py).
NODE_COMMIT_NAME = ".cloudckpt-node-commit.json"
DATA_SUFFIX = ".distcp"

#: Named values of ``prefix_strategy`` (an int >= 2 is a round-robin fan-out).
PREFIX_STRATEGIES = ("none", "hash")

_RANK_METADATA_RE = re.compile(r"^__(\d+)\.metadata$")
# Stock ``__{rank}_{n}.distcp``, with the spreading tag of prefix_strategy in front
# and cloudckpt's per-save token behind: ``3f-__12_0.9c1e4b7a2f30.distcp``.
_DATA_RE = re.compile(r"^(?:(?P<tag>[0-9a-f]+)-)?__(?P<rank>\d+)_(?P<n>\d+)(?:\.(?P<token>[0-9a-f]{8,32}))?\.distcp$")
_MANIFEST_RE = re.compile(r"^(?:__\d+)?\.cloudckpt-manifest(?:-[0-9a-f]{8,64})?\.json$")
_STEP_RE = re.compile(r"^step-(\d+)$")
#: Hex digits of a save's token in its data object names.
TOKEN_CHARS = 12


def check_prefix_strategy(strategy: str | int) -> None:
    """ValueError unless ``strategy`` is a valid ``prefix_strategy``."""
    fan_out = isinstance(strategy, int) and not isinstance(strategy, bool) and strategy >= 2
    if not (fan_out or (isinstance(strategy, str) and strategy in PREFIX_STRATEGIES)):
        raise ValueError(f"prefix_strategy must be one of {PREFIX_STRATEGIES} or an int >= 2 (a fan-out), "
                         f"got {strategy!r}")


def rank_prefix(rank: int, strategy: str | int = "none") -> str:
    """The name prefix of ``rank``'s data objects: ``__{rank}_`` behind a spreading tag.

    * ``"none"``: ``__{rank}_`` (FileSystemWriter's names: ``__12_0.distcp``);
    * ``"hash"``: two hex digits of a hash of the rank first: ``3f-__12_0.distcp``
      (up to 256 key prefixes, no order shared with the rank);
    * ``N`` (int >= 2): ``rank % N`` in hex first, as many digits as ``N - 1`` needs,
      so consecutive ranks land in different prefixes and each gets ``world / N`` ranks.

    The tag goes at the start of the name, not into a sub-directory: object stores
    partition keys by leading characters whatever the delimiter, and flat names keep
    every listing tool working unchanged.
    """
    check_prefix_strategy(strategy)
    if strategy == "none":
        return f"__{rank}_"
    if strategy == "hash":
        tag = hashlib.blake2b(str(rank).encode(), digest_size=1).hexdigest()
    else:
        tag = format(rank % int(strategy), f"0{len(format(int(strategy) - 1, 'x'))}x")
    return f"{tag}-__{rank}_"


def data_object_name(prefix: str | int, n: int, token: str | None = None) -> str:
    """The ``n``-th data object of a rank: ``{prefix}{n}[.{token}].distcp``.

    ``prefix`` is a :func:`rank_prefix` (an int is taken as a rank with no
    spreading tag). ``token`` is the save's own token: two saves of one
    checkpoint never write an object of the same name, so a losing or failed
    save can never change bytes a committed ``.metadata`` points at.
    """
    if isinstance(prefix, int):
        prefix = rank_prefix(prefix)
    return f"{prefix}{n}{'' if token is None else '.' + token[:TOKEN_CHARS]}{DATA_SUFFIX}"


def parse_data_object_name(name: str) -> tuple[int, int, str | None] | None:
    """``(rank, n, token)`` of a data object's base name, or None if it is not one."""
    m = _DATA_RE.match(name.rsplit("/", 1)[-1])
    return None if m is None else (int(m.group("rank")), int(m.group("n")), m.group("token"))


def rank_metadata_name(rank: int) -> str:
    """The per-rank metadata name used when ``use_collectives=False``."""
    return f"__{rank}{METADATA_NAME}"


def manifest_name(save_id: str | None, rank: int | None = None) -> str:
    """cloudckpt's manifest of the save ``save_id`` (``.metadata``'s ``storage_meta.save_id``).

    Each save writes its own manifest, named after its save id, so a save that
    loses a race (or fails) never replaces the manifest of the committed one.
    ``rank`` names a rank-local (``use_collectives=False``) manifest.
    """
    stem = _MANIFEST_STEM if rank is None else f"__{rank}{_MANIFEST_STEM}"
    return f"{stem}.json" if save_id is None else f"{stem}-{save_id}.json"


def is_commit_name(name: str) -> bool:
    """True for a commit object: ``.metadata`` or a rank-local ``__{rank}.metadata``."""
    return name == METADATA_NAME or _RANK_METADATA_RE.match(name) is not None


def is_manifest_name(name: str) -> bool:
    """True for one of cloudckpt's manifests (any save, any rank, legacy names too)."""
    return _MANIFEST_RE.match(name) is not None


# -- temporary objects of a parallel composite upload -----------------------------------
#
# Where a GCS endpoint has no XML multipart upload API (fake-gcs-server), the GCS
# store uploads each part of a large object as a temporary object next to it and
# composes them. Their names say which object and which upload they belong to, so
# listing them is how unfinished uploads are found (and aborted by ``gc``).

#: What separates the destination key from the rest of a temporary part's name.
COMPOSITE_PART_MARK = ".cloudckpt-part-"
#: Upload ids of composite uploads (never the shape of a GCS XML API upload id).
COMPOSITE_UPLOAD_ID_RE = re.compile(r"^compose-[0-9a-f]{24}$")
# tag: 0 (the marker holding the metadata), N (part N), tL.I (intermediate I of level L).
_COMPOSITE_PART_RE = re.compile(
    r"^(?P<key>.+)\.cloudckpt-part-(?P<upload>compose-[0-9a-f]{24})-(?P<tag>\d{1,5}|t\d{1,2}\.\d{1,5})$",
    re.DOTALL,
)


def composite_part_name(key: str, upload_id: str, tag: str) -> str:
    """The temporary object ``tag`` ("0", a part number, "tL.I") of composite upload ``upload_id`` of ``key``."""
    return f"{key}{COMPOSITE_PART_MARK}{upload_id}-{tag}"


def parse_composite_part_name(name: str) -> tuple[str, str, str] | None:
    """(destination key, upload id, tag) of a temporary composite-upload object, or None."""
    m = _COMPOSITE_PART_RE.match(name)
    return (m.group("key"), m.group("upload"), m.group("tag")) if m else None


def _is_data_or_its_part(name: str) -> bool:
    """A data object, or a temporary part of one that is still being uploaded."""
    parsed = parse_composite_part_name(name)
    return _DATA_RE.match(parsed[0] if parsed else name) is not None


def is_checkpoint_object_name(name: str) -> bool:
    """True for a name DCP or cloudckpt writes directly inside a checkpoint prefix.

    Temporary parts of a composite upload of such an object count too: a save
    that failed mid-upload leaves them, and ``gc`` must see the prefix as an
    uncommitted checkpoint to remove them.
    """
    parsed = parse_composite_part_name(name)
    if parsed is not None:
        name = parsed[0]
    return is_commit_name(name) or is_manifest_name(name) or _DATA_RE.match(name) is not None


# -- what a checkpoint is ------------------------------------------------------------------
#
# The one definition every command, the manager and retention use. A prefix is
# a *committed* checkpoint iff it holds ``.metadata`` or the rank-local commit
# ``__0.metadata`` (written with ``use_collectives=False``; DCP's own overwrite
# check looks at it). It is an *uncommitted* checkpoint (a save in progress or a
# failed one) only if every object directly in it is a name DCP or cloudckpt
# writes and it holds data objects or a manifest. Anything else (a dataset
# folder with ``eval.metadata``, an empty prefix) is not a checkpoint at all.

#: The objects whose presence commits a checkpoint, in the order they are looked for.
COMMIT_OBJECT_NAMES = (METADATA_NAME, f"__0{METADATA_NAME}")
COMMITTED = "committed"
UNCOMMITTED = "uncommitted"


def checkpoint_state(names: Iterable[str]) -> str | None:
    """:data:`COMMITTED`, :data:`UNCOMMITTED` or None (not a checkpoint) for a prefix.

    ``names`` are the objects *directly* in the prefix (relative names; names
    holding a ``/`` lie in sub-folders and are ignored here). Pure: no I/O.
    """
    direct = {n for n in names if "/" not in n}
    if any(n in direct for n in COMMIT_OBJECT_NAMES):
        return COMMITTED
    if not direct or not all(is_checkpoint_object_name(n) for n in direct):
        return None
    if any(_is_data_or_its_part(n) or is_manifest_name(n) for n in direct):
        return UNCOMMITTED
    return None


def commit_objects(names: Iterable[str]) -> list[str]:
    """The commit objects among ``names`` (direct ones), in the order a copy writes them.

    Rank-local ``__{rank}.metadata`` of ranks other than 0 first (they commit
    nothing), then ``__0.metadata``, then ``.metadata``: the objects that make
    a prefix a committed checkpoint come last.
    """
    found = [n for n in set(names) if "/" not in n and is_commit_name(n)]

    def order(n: str) -> tuple[int, int]:
        if n == METADATA_NAME:
            return (2, 0)
        m = _RANK_METADATA_RE.match(n)
        rank = int(m.group(1)) if m else 0
        return (1, 0) if rank == 0 else (0, rank)

    return sorted(found, key=order)


def step_name(step: int) -> str:
    """The prefix name the manager writes checkpoint ``step`` under: ``step-{step:010d}``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"step-{step:010d}"


def parse_step_name(name: str) -> int | None:
    """The step of a ``step-<digits>`` name (padded or not, trailing ``/`` allowed), else None."""
    m = _STEP_RE.match(name.strip("/"))
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def crc_disabled() -> Iterator[None]:
    """Turn off torch.save's zip CRC in *this thread* (the setting is thread-local in 2.13).

    The CRC costs ~0.25 s/GB and nobody checks it on load; cloudckpt protects
    the bytes with CRC32C end to end instead.
    """
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    if config is not None and hasattr(config, "patch"):
        with config.patch("save.compute_crc32", False):
            yield
        return
    old = torch.serialization.get_crc32_options()  # pragma: no cover - torch < 2.6 path
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(old)


@dataclass
class FramedItem:
    """One DCP write item, laid out as segments ready to upload.

    ``segments`` are sent back to back; ``payload_offset``/``payload_nbytes``
    locate the raw tensor bytes inside the item (None for byte items).
    ``keepalive`` holds the tensor whose memory the payload aliases.
    """

    index: MetadataIndex
    segments: list[Any]
    size: int
    payload_offset: int | None = None
    payload_nbytes: int = 0
    keepalive: Any = None


def _buffer_address(mv: memoryview) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffer warning; we never write through it
        return torch.frombuffer(mv, dtype=torch.uint8).data_ptr()


class _CaptureSink(io.RawIOBase):
    """A write-only stream that aliases the storage payload and copies everything else."""

    def __init__(self, storage_ptr: int, storage_nbytes: int) -> None:
        super().__init__()
        self.segments: list[Any] = []
        self.size = 0
        self.payload_offset: int | None = None
        self._ptr = storage_ptr
        self._nbytes = storage_nbytes

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = mv.nbytes
        if (
            self.payload_offset is None
            and n == self._nbytes
            and n > 0
            and _buffer_address(mv) == self._ptr
        ):
            self.payload_offset = self.size
            self.segments.append(mv)
        else:
            # Framing chunks point into buffers torch reuses: copy them.
            self.segments.append(mv.tobytes())
        self.size += n
        return n

    def flush(self) -> None:
        pass


def _exact_tensor(tensor: torch.Tensor, fqn: str) -> torch.Tensor:
    if tensor.device.type == "meta":
        raise UnsupportedTensorError(
            f"tensor {fqn!r} is on the meta device and has no data to save; materialise it before saving"
        )
    if tensor.device.type != "cpu":
        raise UnsupportedTensorError(
            f"tensor {fqn!r} is on device {tensor.device}, but the writer only uploads CPU memory; "
            "stage the state dict with cloudckpt.async_save (pinned CPU copies) or move it to CPU first"
        )
    tensor = tensor.detach()
    # torch.save writes the whole underlying storage: a view of a bigger buffer
    # (FSDP flat params, slices) must be cloned so only its own bytes go out,
    # and the payload must be contiguous so loads can read it raw.
    if (
        not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
    ):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


#: Most framings a :class:`FramingCache` keeps (a state dict has a few dozen shapes).
_FRAMING_CACHE_MAX = 4096


class FramingCache:
    """torch.save framings (header, trailer, payload offset, size) by :func:`_framing_key`, bounded.

    One per writer (no state shared between writers or threads' saves): a save
    of a thousand tensors of a few dozen shapes runs torch.save a few dozen times.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[Any, ...], tuple[bytes, bytes, int, int]] = {}

    def get(self, key: tuple[Any, ...]) -> tuple[bytes, bytes, int, int] | None:
        return self._entries.get(key)

    def put(self, key: tuple[Any, ...], value: tuple[bytes, bytes, int, int]) -> None:
        if len(self._entries) >= _FRAMING_CACHE_MAX:
            self._entries.clear()
        self._entries[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._entries


def _save_config() -> Any:
    """torch.save's config (``torch.utils.serialization.config.save``), or None on torch versions without it."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # pragma: no cover - torch < 2.6
        return None
    return getattr(config, "save", None)


def _crc_off() -> bool:
    """Whether torch.save's zip CRC is off in this thread (then the framing does not depend on the payload)."""
    save = _save_config()
    return save is not None and getattr(save, "compute_crc32", True) is False


def _framing_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What torch.save's framing of a plain dense tensor depends on, or None if it may depend on more.

    With the zip CRC off, torch.save's bytes around the payload are a function
    of the dtype, sizes, strides, storage size and offset, and the save
    options: never of the values (tests/test_scatter_reads.py compares cached
    framings with torch.save's output byte for byte). Anything unusual
    (subclasses, Python attributes, conjugate/negative views, other layouts,
    grad-requiring tensors) is framed by torch.save every time.
    """
    if type(tensor) is not torch.Tensor or tensor.layout != torch.strided or tensor.is_quantized \
            or tensor.is_conj() or tensor.is_neg() or tensor.requires_grad or not _crc_off():
        return None
    if getattr(tensor, "__dict__", None):
        return None
    save_cfg = _save_config()
    options = tuple(getattr(save_cfg, k, None) for k in ("storage_alignment", "use_pinned_memory_for_d2h"))
    return (tensor.dtype, tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset(),
            tensor.untyped_storage().nbytes(), options, torch.serialization.DEFAULT_PROTOCOL)


def _payload_view(storage: torch.UntypedStorage, nbytes: int) -> memoryview:
    """A read-only byte view of a CPU storage's memory (no copy)."""
    import ctypes

    return memoryview((ctypes.c_char * nbytes).from_address(storage.data_ptr())).cast("B").toreadonly()


def frame_tensor(index: MetadataIndex, tensor: torch.Tensor, cache: FramingCache | None = None) -> FramedItem:
    """Frame ``tensor`` as a torch.save archive; call inside :func:`crc_disabled`.

    With a ``cache``, the framing of each (dtype, shape, strides) is made by
    torch.save once and then reused with the payload spliced in (see
    :func:`_framing_key`): a state dict of a thousand tensors of a few dozen
    shapes pays torch.save's per-call cost a few dozen times.
    """
    tensor = _exact_tensor(tensor, index.fqn)
    key = _framing_key(tensor) if cache is not None else None
    cached = cache.get(key) if cache is not None and key is not None else None
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    if cached is not None:
        head, tail, payload_offset, size = cached
        return FramedItem(index=index, segments=[head, _payload_view(storage, nbytes), tail], size=size,
                          payload_offset=payload_offset, payload_nbytes=nbytes, keepalive=tensor)
    framed = _frame_with_torch_save(index, tensor)
    segs = framed.segments
    if cache is not None and key is not None and nbytes and framed.payload_offset is not None and len(segs) == 3 \
            and isinstance(segs[0], bytes) and isinstance(segs[2], bytes) and len(segs[0]) == framed.payload_offset:
        cache.put(key, (segs[0], segs[2], framed.payload_offset, framed.size))
    return framed


def _frame_with_torch_save(index: MetadataIndex, tensor: torch.Tensor) -> FramedItem:
    """Frame ``tensor`` (already :func:`_exact_tensor`) by running torch.save into a capturing sink."""
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    sink = _CaptureSink(storage.data_ptr(), nbytes)
    torch.save(tensor, sink)  # type: ignore[arg-type]  # a RawIOBase is a binary stream
    if nbytes and sink.payload_offset is None:
        # A torch version that copies the payload: still correct, just not zero-copy.
        data = b"".join(bytes(s) for s in sink.segments)
        rec = parse_tensor_record(memoryview(data))
        return FramedItem(index, [data], len(data), rec.payload_offset, rec.payload_nbytes, None)
    return FramedItem(
        index=index,
        segments=_merge_small(sink.segments),
        size=sink.size,
        payload_offset=sink.payload_offset if nbytes else None,
        payload_nbytes=nbytes,
        keepalive=tensor,
    )


def _merge_small(segments: list[Any]) -> list[Any]:
    # torch.save emits ~39 chunks; join runs of copied framing into one bytes
    # so an item is three segments: header, payload view, trailer.
    out: list[Any] = []
    run: list[bytes] = []
    for seg in segments:
        if isinstance(seg, bytes):
            run.append(seg)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(seg)
    if run:
        out.append(b"".join(run))
    return out


def frame_bytes(index: MetadataIndex, data: bytes | bytearray | memoryview) -> FramedItem:
    """A BYTE_IO item: DCP's planner already produced its torch.save blob."""
    data = bytes(data)
    return FramedItem(index=index, segments=[data], size=len(data))


# -- reading ------------------------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


@dataclass(frozen=True)
class TensorRecord:
    """Where a tensor's raw bytes lie inside a torch.save archive, and how to view them."""

    payload_offset: int
    payload_nbytes: int
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def is_dense(self) -> bool:
        """True if the tensor is the whole storage, contiguous, from element 0."""
        if len(self.size) != len(self.stride):
            return False
        expected = 1
        for s, st in zip(reversed(self.size), reversed(self.stride), strict=True):
            if s != 1 and st != expected:
                return False
            expected *= s
        numel = 1
        for s in self.size:
            numel *= s
        return self.storage_offset == 0 and numel * _itemsize(self.dtype) == self.payload_nbytes


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _RecordUnpickler(pickle.Unpickler):
    """Reads data.pkl of a single-tensor archive without constructing anything.

    Only the tensor-rebuild functions and storage classes are resolved; anything
    else is refused, so this is also safe against crafted archives.
    """

    def __init__(self, f: io.BytesIO) -> None:
        super().__init__(f)
        self.storages: dict[str, tuple[torch.dtype, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_stub
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name in ("Size",):
            return torch.Size
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in tensor record")

    def persistent_load(self, pid: Any) -> Any:
        typename, storage_type, key, _location, numel = pid
        assert typename == "storage"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation: we only read .dtype
            dtype = storage_type.dtype
        self.storages[key] = (dtype, numel)
        return ("storage", key, dtype)


def _rebuild_stub(storage: Any, storage_offset: int, size: Any, stride: Any, *_: Any) -> Any:
    return ("tensor", storage, storage_offset, tuple(size), tuple(stride))


def _zip_members(blob: memoryview) -> dict[str, tuple[int, int]]:
    """Map member name -> (data offset, size) using the central directory."""
    zf = zipfile.ZipFile(io.BytesIO(blob))  # parses only the central directory
    out = {}
    for zi in zf.infolist():
        h = _LOCAL_HEADER.unpack_from(blob, zi.header_offset)
        if h[0] != b"PK\x03\x04":
            raise ValueError(f"bad local header for {zi.filename}")
        data_offset = zi.header_offset + _LOCAL_HEADER.size + h[9] + h[10]
        out[zi.filename] = (data_offset, zi.file_size)
    return out


def parse_tensor_record(blob: memoryview) -> TensorRecord:
    """Locate the payload of a torch.save'd single tensor inside ``blob``.

    Raises ValueError if the archive is not a plain single-tensor record
    (callers then fall back to ``torch.load``).
    """
    blob = memoryview(blob).cast("B")
    members = _zip_members(blob)
    pkl_name = next((n for n in members if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl_name is None:
        raise ValueError("no data.pkl in archive")
    root = pkl_name[: -len("data.pkl")]
    off, size = members[pkl_name]
    up = _RecordUnpickler(io.BytesIO(blob[off:off + size].tobytes()))
    obj = up.load()
    if not (isinstance(obj, tuple) and len(obj) == 5 and obj[0] == "tensor"):
        raise ValueError("archive does not hold a single plain tensor")
    _, (_, key, dtype), storage_offset, shape, stride = obj
    data_name = f"{root}data/{key}"
    if data_name not in members:
        raise ValueError(f"missing record {data_name}")
    doff, dsize = members[data_name]
    return TensorRecord(doff, dsize, dtype, storage_offset, shape, stride)


def payload_view(blob: memoryview, rec: TensorRecord) -> torch.Tensor:
    """A tensor aliasing ``blob`` according to ``rec`` (no copy)."""
    raw = blob[rec.payload_offset:rec.payload_offset + rec.payload_nbytes]
    if rec.payload_nbytes == 0:
        return torch.empty(rec.size, dtype=rec.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(raw, dtype=rec.dtype)
    return flat.as_strided(rec.size, rec.stride, rec.storage_offset)


def segments_nbytes(segments: Sequence[Any]) -> int:
    """Total size of a list of buffers."""
    return sum(memoryview(s).nbytes for s in segments)


# -- untrusted names and archives ---------------------------------------------------

#: The longest name component any common file system stores (bytes, UTF-8).
MAX_NAME_BYTES = 255
#: The longest ``relative_path`` a checkpoint may record (S3 keys are at most 1024 bytes).
MAX_KEY_BYTES = MAX_RELATIVE_PATH = 1024


def check_relative_path(rel: Any, where: str) -> str:
    """``rel`` if it names an object *inside* the checkpoint, else :class:`~cloudckpt.errors.UnsafePathError`.

    ``relative_path`` (and every object name a copy or a listing turns into a
    file) comes from storage that anyone who can write the bucket or directory
    controls. It must be a relative, normalised, '/'-separated name: no
    absolute path or drive letter, no ``..``/``.``/empty segment, no backslash,
    no control character, valid UTF-8, each segment at most
    :data:`MAX_NAME_BYTES` and the whole at most :data:`MAX_KEY_BYTES` bytes.
    Such a name stays inside the checkpoint on every backend and can be created
    as a local file. Sub-folders (``0000000000/epoch_3/__0_0.distcp``, as
    s3torchconnector writes) stay valid. ``where`` names the object that
    recorded the path.
    """
    from cloudckpt.errors import UnsafePathError

    def bad(why: str) -> UnsafePathError:
        return UnsafePathError(
            f"{where} records the object path {rel!r}, which {why}; a checkpoint may only name objects inside "
            "itself. The metadata is corrupt or was tampered with: restore it from a trusted copy")

    if not isinstance(rel, str):
        raise bad(f"is a {type(rel).__name__}, not a string")
    if not rel:
        raise bad("is empty")
    try:
        encoded = rel.encode("utf-8")
    except UnicodeError:
        raise bad("is not valid UTF-8") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise bad(f"is longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise bad("contains a control character")
    if "\\" in rel:
        raise bad("contains a backslash")
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise bad("is absolute")
    for seg in rel.split("/"):
        if seg in ("", ".", ".."):
            raise bad(f"has a {seg!r} segment" if seg else "has an empty segment")
        if len(seg.encode("utf-8")) > MAX_NAME_BYTES:
            raise bad(f"has a segment longer than {MAX_NAME_BYTES} bytes")
    return rel


def zip_members(blob: bytes | bytearray | memoryview) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of a ``torch.save`` zip archive, every bound checked.

    Unlike the fast path of :func:`parse_tensor_record`, this is for untrusted
    archives: members must be stored (uncompressed, as torch.save writes them),
    lie inside ``blob`` and carry valid local headers. Raises ``ValueError``
    for anything else.
    """
    view = memoryview(blob).cast("B")
    try:
        zf = zipfile.ZipFile(io.BytesIO(view))  # reads only the central directory
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, struct.error, ValueError,
            UnicodeDecodeError, OverflowError) as exc:
        raise ValueError(f"not a readable zip archive ({type(exc).__name__}: {exc})") from None
    out: dict[str, tuple[int, int]] = {}
    for zi in infos:
        if zi.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"member {zi.filename!r} is compressed; torch.save never compresses")
        if zi.header_offset < 0 or zi.header_offset + _LOCAL_HEADER.size > view.nbytes:
            raise ValueError(f"local header of {zi.filename!r} lies outside the archive")
        h = _LOCAL_HEADER.unpack_from(view, zi.header_offset)
        if h[0] != b"PK\x03\x04":
            raise ValueError(f"bad local header signature for {zi.filename!r}")
        data_offset = zi.header_offset + _LOCAL_HEADER.size + h[9] + h[10]
        if zi.file_size < 0 or data_offset + zi.file_size > view.nbytes:
            raise ValueError(f"member {zi.filename!r} runs past the end of the archive")
        if zi.filename in out:
            raise ValueError(f"member {zi.filename!r} appears twice")
        out[zi.filename] = (data_offset, zi.file_size)
    return out
