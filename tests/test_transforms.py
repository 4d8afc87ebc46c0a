"""Stream transforms (``_StorageInfo.transform_descriptors``): stock compressed checkpoints, custom and unknown ones.

Checkpoints are written by torch's own ``FileSystemWriter(_extensions=[...])``
into a local directory and copied into the bucket with plain clients, then
loaded and verified by cloudckpt.
"""

from __future__ import annotations

import io
import pickle
import tracemalloc
from pathlib import Path
from typing import IO, Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension, ZStandard
from torch.distributed.checkpoint.filesystem import _StorageInfo

import cloudckpt
from cloudckpt import transforms
from cloudckpt.errors import DecodedTooLargeError, IntegrityError, UnsupportedTransformError

zstandard = pytest.importorskip("zstandard", reason="stream.zstd needs zstandard (in the test extra)")

MiB = 1 << 20


# -- a user-defined transform ---------------------------------------------------------------------
_XOR = bytes(b ^ 0x5A for b in range(256))


class _XorWriter(io.RawIOBase):
    def __init__(self, output: IO[bytes]) -> None:
        super().__init__()
        self.output = output

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.output.write(data.translate(_XOR))
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.output.close()  # finishes an inner transform's frame (zstd) when stacked
        super().close()


class _XorReader(io.RawIOBase):
    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self.source = source

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        data = self.source.read(out.nbytes) or b""
        out[:len(data)] = data.translate(_XOR)
        return len(data)


class XorTransform(StreamTransformExtension):
    """A streaming byte-XOR transform, standing in for a user's encryption extension."""

    @staticmethod
    def registry_name() -> str:
        return "stream.xor@cloudckpt-tests"

    @staticmethod
    def from_descriptor(version: str) -> XorTransform:
        if version != "1":
            raise ValueError(f"unknown version {version}")
        return XorTransform()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return _XorWriter(output)  # type: ignore[return-value]

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return _XorReader(input)  # type: ignore[return-value]


# -- helpers -----------------------------------------------------------------------------------------
def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.w": torch.randn(256, 64, generator=g),
        "model.b": torch.zeros(1000),                      # compresses well
        "model.i": torch.arange(300, dtype=torch.int64).reshape(30, 10),
        "step": 42,
        "opt": {"lr": 0.125, "betas": [0.9, 0.999], "name": "adamw"},
    }


def _empty() -> dict[str, Any]:
    return {
        "model.w": torch.empty(256, 64),
        "model.b": torch.ones(1000),
        "model.i": torch.zeros(30, 10, dtype=torch.int64),
        "step": 0,
        "opt": {"lr": 0.0, "betas": [0.0, 0.0], "name": ""},
    }


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k in ("model.w", "model.b", "model.i"):
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert got["step"] == want["step"] and got["opt"] == want["opt"]


def _stock_save(path: Path, extensions: list[StreamTransformExtension]) -> None:
    dcp.save(_state(), storage_writer=dcp.FileSystemWriter(str(path), _extensions=extensions), no_dist=True)


def _rewrite_metadata(path: Path, edit: Any) -> None:
    """Edit ``.metadata`` with plain pickle (as another tool or an attacker could): ``edit(metadata)``."""
    meta_path = path / ".metadata"
    with open(meta_path, "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(meta_path, "wb") as f:
        pickle.dump(md, f)


def _entry(md: Any, fqn: str) -> Any:
    [idx] = [i for i in md.storage_data if i.fqn == fqn]
    return idx


def _upload(backend, src: Path, name: str) -> str:
    uri = backend.uri(name)
    backend.upload(str(src), uri)
    return uri


# -- tests ---------------------------------------------------------------------------------------------
def test_stock_zstd_checkpoint_loads_and_verifies(backend, tmp_path):
    src = tmp_path / "zstd"
    _stock_save(src, [ZStandard()])
    md = dcp.FileSystemReader(str(src)).read_metadata()
    assert all(i.transform_descriptors == ["stream.zstd/1"] for i in md.storage_data.values())
    uri = _upload(backend, src, "zstd")

    out = _empty()
    cloudckpt.load(out, uri, no_dist=True, **backend.options)
    _assert_same(out, _state())

    for deep in (True, False):
        report = cloudckpt.verify(uri, deep=deep, **backend.options)
        assert report.ok, report.problems
        assert report.unsupported == [] and report.items_checked == 7


def test_unknown_transform_is_unsupported_not_corrupt(backend, tmp_path):
    src = tmp_path / "unknown"
    _stock_save(src, [ZStandard()])

    def edit(md: Any) -> None:
        idx = _entry(md, "model.w")
        md.storage_data[idx].transform_descriptors = ["stream.unknown/1"]

    _rewrite_metadata(src, edit)
    uri = _upload(backend, src, "unknown")
    md = dcp.FileSystemReader(str(src)).read_metadata()
    obj = md.storage_data[_entry(md, "model.w")].relative_path

    with pytest.raises(UnsupportedTransformError) as err:
        cloudckpt.load(_empty(), uri, no_dist=True, **backend.options)
    msg = str(err.value)
    assert "'stream.unknown/1'" in msg and "'model.w'" in msg and obj in msg, msg
    assert "register_extension" in msg and "not known to be corrupt" in msg, msg

    report = cloudckpt.verify(uri, **backend.options)
    assert not report.ok
    [unsupported] = report.unsupported
    assert report.problems == [unsupported], report.problems     # nothing else, nothing called corrupt
    assert "'stream.unknown/1'" in unsupported and "'model.w'" in unsupported and obj in unsupported
    assert "register_extension" in unsupported


def test_user_registered_extension_and_stacked_transforms(backend, tmp_path, monkeypatch):
    # A fresh registry, so the registration does not leak into other tests.
    monkeypatch.setattr(transforms, "_registry", ExtensionRegistry())
    src = tmp_path / "custom"
    # Stacked: the writer applies XorTransform to the data first, then zstd (descriptors stored reversed).
    _stock_save(src, [ZStandard(), XorTransform()])
    md = dcp.FileSystemReader(str(src)).read_metadata()
    assert all(i.transform_descriptors == ["stream.xor@cloudckpt-tests/1", "stream.zstd/1"]
               for i in md.storage_data.values())
    uri = _upload(backend, src, "custom")

    with pytest.raises(UnsupportedTransformError, match="stream.xor@cloudckpt-tests/1"):
        cloudckpt.load(_empty(), uri, no_dist=True, **backend.options)
    assert not cloudckpt.verify(uri, **backend.options).ok

    transforms.register_extension(XorTransform)
    out = _empty()
    cloudckpt.load(out, uri, no_dist=True, **backend.options)
    _assert_same(out, _state())
    report = cloudckpt.verify(uri, **backend.options)
    assert report.ok and report.unsupported == [], report.problems


def _zstd_bomb(decoded: int) -> bytes:
    """A valid zstd frame of ``decoded`` zero bytes (a few KiB stored)."""
    co = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(MiB)
    parts = [co.compress(zeros) for _ in range(decoded // MiB)]
    parts.append(co.flush())
    return b"".join(parts)


def test_decompression_bomb_is_refused_within_a_memory_bound(backend, tmp_path, monkeypatch):
    src = tmp_path / "bomb"
    _stock_save(src, [ZStandard()])
    bomb = _zstd_bomb(1024 * MiB)                   # 1 GiB decoded, ~32 KiB stored
    assert len(bomb) < MiB
    (src / "bomb.distcp").write_bytes(bomb)

    def edit(md: Any) -> None:
        for fqn in ("model.b", "step"):             # a 4000-byte tensor and a byte item
            md.storage_data[_entry(md, fqn)] = _StorageInfo("bomb.distcp", 0, len(bomb), ["stream.zstd/1"])

    _rewrite_metadata(src, edit)
    uri = _upload(backend, src, "bomb")
    # Byte items have no declared size: their limit is configurable.
    monkeypatch.setenv("CLOUDCKPT_MAX_DECODED_BYTES", str(8 * MiB))

    tracemalloc.start()
    try:
        with pytest.raises(DecodedTooLargeError) as err:
            cloudckpt.load(_empty(), uri, no_dist=True, **backend.options)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        report = cloudckpt.verify(uri, **backend.options)
        _, verify_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(err.value)
    assert "bomb.distcp" in msg and ("'model.b'" in msg or "'step'" in msg), msg
    assert isinstance(err.value, IntegrityError)
    # Decoding stopped at the item's limit (4000 bytes + framing, or 8 MiB): nowhere near 1 GiB.
    assert peak < 64 * MiB, peak
    assert verify_peak < 64 * MiB, verify_peak
    assert not report.ok and report.unsupported == []
    bombs = [p for p in report.problems if "decompression bomb" in p]
    assert any("'model.b'" in p for p in bombs) and any("'step'" in p for p in bombs), report.problems


def test_corrupt_compressed_item_is_an_integrity_error(tmp_path):
    src = tmp_path / "flipped"
    _stock_save(src, [ZStandard()])
    md = dcp.FileSystemReader(str(src)).read_metadata()
    info = md.storage_data[_entry(md, "model.w")]
    path = src / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset] ^= 0xFF                       # the zstd frame's magic number
    path.write_bytes(bytes(data))

    with pytest.raises(IntegrityError) as err:
        cloudckpt.load(_empty(), str(src), no_dist=True)
    assert not isinstance(err.value, UnsupportedTransformError)
    assert "'model.w'" in str(err.value) and "corrupt" in str(err.value)
    report = cloudckpt.verify(str(src))
    assert not report.ok and report.unsupported == []
    assert any("'model.w'" in p for p in report.problems), report.problems


def test_missing_zstd_module_says_what_to_install(monkeypatch):
    import torch.distributed.checkpoint._extension as ext

    monkeypatch.setattr(ext, "zstandard", None)
    monkeypatch.setattr(ext, "pyzstd", None)
    with pytest.raises(UnsupportedTransformError) as err:
        transforms.decode_item(b"\x28\xb5\x2f\xfd", ["stream.zstd/1"], "item 'w' in s3://b/ck/__0_0.distcp", MiB)
    msg = str(err.value)
    assert "'stream.zstd/1'" in msg and "'w'" in msg and "__0_0.distcp" in msg
    assert "cloudckpt[zstd]" in msg


@pytest.mark.parametrize("descriptors", [["stream.zstd/2"], ["stream.zstd/1"] * 9, [7]])
def test_unusable_descriptor_lists_are_unsupported(descriptors):
    with pytest.raises(UnsupportedTransformError, match="'w'"):
        transforms.decode_item(b"x", descriptors, "item 'w' in /ck/__0_0.distcp", MiB)


def test_decode_item_without_descriptors_returns_the_bytes():
    assert bytes(transforms.decode_item(b"abc", None, "x", 1)) == b"abc"
    assert bytes(transforms.decode_item(b"abc", [], "x", 1)) == b"abc"


def test_decoded_limit_env_must_be_a_positive_number(monkeypatch):
    monkeypatch.setenv("CLOUDCKPT_MAX_DECODED_BYTES", "lots")
    with pytest.raises(ValueError, match="CLOUDCKPT_MAX_DECODED_BYTES"):
        transforms.max_decoded_bytes()
    monkeypatch.delenv("CLOUDCKPT_MAX_DECODED_BYTES")
    assert transforms.max_decoded_bytes() == transforms.DEFAULT_MAX_DECODED_BYTES
    monkeypatch.setenv("CLOUDCKPT_MAX_DECODED_BYTES", "4096")
    assert transforms.max_decoded_bytes() == 4096
