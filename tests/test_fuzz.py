"""Property-based fuzzing of everything cloudckpt parses from untrusted storage.

``.metadata`` (mutations of a real one, random pickles and opcode soups),
manifests (mutations and random JSON documents), tensor and byte item records
(mutations of real ``torch.save`` archives) and checkpoint URIs: every input
either parses into a valid object or raises a :class:`CloudCheckpointError`
subclass, within a time bound (Hypothesis ``deadline``) and a memory bound
(tracemalloc peak). Runs are short and derandomised so CI is stable.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import tempfile
import tracemalloc
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cloudckpt import crc, layout, safe_pickle  # noqa: E402
from cloudckpt.errors import CloudCheckpointError, InvalidURIError, UnsafeMetadataError  # noqa: E402
from cloudckpt.manifest import Manifest, build_manifest, open_manifest, seal_manifest  # noqa: E402
from cloudckpt.uri import StorageURI, parse_uri  # noqa: E402

MiB = 1024 * 1024
#: Most memory one parse may take, whatever the input (inputs are at most a few KiB).
PEAK_LIMIT = 32 * MiB

FUZZ = settings(max_examples=200, derandomize=True, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _bounded(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Run ``fn``; return (result, exception) and assert its Python heap peak stayed under PEAK_LIMIT."""
    tracemalloc.start()
    try:
        try:
            return fn(), None
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            return None, exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < PEAK_LIMIT, f"parsing took {peak / MiB:.1f} MiB"


def _typed_or_ok(exc: BaseException | None) -> None:
    if exc is not None and not isinstance(exc, CloudCheckpointError):
        raise AssertionError(f"untyped error {type(exc).__name__}: {exc}") from exc


# -- corpora: real objects to mutate --------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _real_checkpoint() -> tuple[bytes, dict[str, bytes]]:
    """A real stock ``.metadata`` and its data object."""
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.randn(3, 4), "b": torch.arange(5), "step": 7, "name": "run", "lst": [1, 2.5]},
                 storage_writer=dcp.FileSystemWriter(d), no_dist=True)
        with open(f"{d}/.metadata", "rb") as f:
            meta = f.read()
        with open(f"{d}/__0_0.distcp", "rb") as f:
            data = f.read()
    return meta, {"__0_0.distcp": data}


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def _records() -> list[bytes]:
    return [
        _saved(torch.arange(12, dtype=torch.float32).reshape(3, 4)),
        _saved(torch.arange(12).reshape(3, 4)[:, 1:]),        # not dense: the general loader
        _saved({"step": 3, "lr": [0.1, 0.2], "rng": torch.get_rng_state()[:16]}),
        _saved(torch.nn.Parameter(torch.ones(2))),
    ]


@functools.lru_cache(maxsize=None)
def _real_manifest() -> bytes:
    meta, _ = _real_checkpoint()
    doc = build_manifest(metadata_crc32c=crc.crc32c(meta), writer="fuzz", torch_version=torch.__version__,
                         save_id="0123456789abcdef", world_size=1,
                         objects={"__0_0.distcp": {"size": 100, "crc32c": 5}},
                         items={"__0_0.distcp": [[0, 50, 1, 10, 2], [50, 50, 3, None]]})
    return seal_manifest(doc)


def _mutations(base: Callable[[], bytes]) -> st.SearchStrategy[bytes]:
    """Byte strings derived from ``base()`` by overwrites, truncation, insertion and splicing."""

    @st.composite
    def mutate(draw: Any) -> bytes:
        data = bytearray(base())
        for _ in range(draw(st.integers(1, 6))):
            op = draw(st.sampled_from(["set", "truncate", "insert", "delete", "int"]))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if op == "set" and data:
                data[pos] = draw(st.integers(0, 255))
            elif op == "truncate":
                del data[pos:]
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            elif op == "delete":
                del data[pos:pos + draw(st.integers(1, 16))]
            elif op == "int" and len(data) >= pos + 4:
                # Big numbers where lengths, counts and sizes live.
                data[pos:pos + 4] = draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 1 << 30, 0, 1])).to_bytes(4, "little")
        return bytes(data)

    return mutate()


# -- .metadata --------------------------------------------------------------------------------

def _check_metadata(blob: bytes) -> None:
    result, exc = _bounded(lambda: safe_pickle.load_metadata(blob, "fuzz://b/ck/.metadata"))
    if exc is not None:
        assert isinstance(exc, UnsafeMetadataError), f"{type(exc).__name__}: {exc}"
        assert "fuzz://b/ck/.metadata" in str(exc)
        return
    # Loaded: every field the reader touches has the promised type.
    for idx, info in result.storage_data.items():
        assert isinstance(idx.fqn, str) and isinstance(info.relative_path, str)
        assert isinstance(info.offset, int) and info.offset >= 0 and isinstance(info.length, int)


@FUZZ
@given(_mutations(lambda: _real_checkpoint()[0]))
def test_fuzz_metadata_mutations(blob):
    _check_metadata(blob)


_PICKLE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(_PICKLE_VALUES, st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_fuzz_metadata_random_pickles(value, protocol):
    _check_metadata(pickle.dumps(value, protocol=protocol))


_GLOBALS = [b"cbuiltins\nbytearray\n", b"cbuiltins\nlist\n", b"cbuiltins\nset\n", b"cbuiltins\nfrozenset\n",
            b"cbuiltins\ncomplex\n", b"cbuiltins\neval\n", b"ccollections\nOrderedDict\n", b"ctorch\nSize\n",
            b"ctorch\nfloat32\n", b"cpathlib\nPosixPath\n", b"c__builtin__\nbytearray\n", b"cos\nsystem\n",
            b"ctorch.distributed.checkpoint.metadata\nMetadata\n",
            b"ctorch.distributed.checkpoint.filesystem\n_StorageInfo\n"]
_OPS = [b"(", b"t", b"\x85", b"\x86", b"R", b"b", b"]", b"}", b"e", b"a", b"u", b"s", b"N", b"\x88", b"0", b"2",
        b"J\x00\x00\x00@", b"J\xff\xff\xff\x7f", b"K\x05", b"X\x03\x00\x00\x00abc", b"C\x02ab", b"q\x00",
        b"h\x00", b"\x81", b"l", b"d", b"\x8f", b"\x90", b"\x94"]


@FUZZ
@given(st.lists(st.sampled_from(_GLOBALS + _OPS), max_size=30))
def test_fuzz_metadata_opcode_soup(ops):
    _check_metadata(b"\x80\x02" + b"".join(ops) + b".")


# -- manifests ----------------------------------------------------------------------------------

def _check_manifest(blob: bytes) -> None:
    result, exc = _bounded(lambda: open_manifest(blob, "fuzz://b/ck/manifest"))
    _typed_or_ok(exc)
    if exc is None:
        assert isinstance(result, Manifest)
        for (name, offset), facts in result.items.items():
            assert isinstance(name, str) and isinstance(offset, int) and offset >= 0
            assert isinstance(facts.crc32c, int)


@FUZZ
@given(_mutations(_real_manifest))
def test_fuzz_manifest_mutations(blob):
    _check_manifest(blob)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["format", "metadata_crc32c", "objects", "items", "save_id", "writer"]),
                       _JSON, max_size=6), st.booleans())
def test_fuzz_manifest_documents(doc, sealed):
    doc.setdefault("format", 2)
    blob = seal_manifest(doc) if sealed else json.dumps(doc).encode()
    _check_manifest(blob)


# -- tensor and byte item records ------------------------------------------------------------------

@FUZZ
@given(st.integers(0, 3).flatmap(lambda i: _mutations(lambda: _records()[i])))
def test_fuzz_records(blob):
    result, exc = _bounded(lambda: safe_pickle.load_tensor_record(blob, fqn="k", where="fuzz://obj"))
    _typed_or_ok(exc)
    if exc is None:
        assert isinstance(result, torch.Tensor)
        result.sum()  # its memory is really there
    result, exc = _bounded(lambda: safe_pickle.load_byte_item(blob, fqn="k", where="fuzz://obj"))
    _typed_or_ok(exc)
    # The record parser of the fast path: a TensorRecord that lies inside the blob, or an exception
    # (which the reader turns into the restricted loader's typed verdict, checked above).
    rec, exc = _bounded(lambda: layout.parse_tensor_record(memoryview(blob)))
    if exc is None and rec.is_dense():
        assert rec.payload_offset + rec.payload_nbytes <= len(blob)


def test_record_corpus_loads_unmutated():
    """The corpus itself loads (so the mutations above start from valid records)."""
    for blob in _records():
        safe_pickle.load_byte_item(blob, fqn="k", where="corpus")
    assert torch.equal(safe_pickle.load_tensor_record(_records()[0], fqn="k", where="corpus"),
                       torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert torch.equal(safe_pickle.load_tensor_record(_records()[1], fqn="k", where="corpus"),
                       torch.arange(12).reshape(3, 4)[:, 1:])


# -- URIs --------------------------------------------------------------------------------------------

_URI_PARTS = st.tuples(
    st.sampled_from(["s3", "gs", "gcs", "file", "S3", "http", "", "c", "s3:", "az"]),
    st.sampled_from(["://", ":/", ":", "///", "//"]),
    st.text(alphabet="abcXYZ019-._/?#:% \x00\n\\", max_size=40),
)


def _check_uri(text: str) -> None:
    result, exc = _bounded(lambda: parse_uri(text))
    if exc is not None:
        assert isinstance(exc, InvalidURIError), f"{type(exc).__name__}: {exc}"
        return
    assert isinstance(result, StorageURI)
    if not result.is_local:
        assert parse_uri(str(result)) == result  # a parsed cloud URI round-trips
        assert not result.prefix.startswith("/") and not result.prefix.endswith("/")
        assert ".." not in result.prefix.split("/")


@FUZZ
@given(_URI_PARTS)
def test_fuzz_uri_structured(parts):
    _check_uri("".join(parts))


@FUZZ
@given(st.text(max_size=60))
def test_fuzz_uri_text(text):
    _check_uri(text)
