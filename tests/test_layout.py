"""Zero-copy torch.save framing and record parsing (pure functions)."""

from __future__ import annotations

import io

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from cloudckpt import layout
from cloudckpt.errors import UnsupportedTensorError

TENSORS = {
    "f32": torch.randn(100, 37),
    "bf16": torch.randn(9).to(torch.bfloat16),
    "i64": torch.arange(10),
    "bool": torch.tensor([True, False]),
    "scalar": torch.tensor(3.5),
    "empty": torch.empty(0, 3),
    "transposed": torch.randn(8, 8).t(),
    "slice": torch.randn(100)[10:20],
}


def _join(fi: layout.FramedItem) -> bytes:
    return b"".join(bytes(s) for s in fi.segments)


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_frame_is_a_loadable_torch_save_archive(name):
    t = TENSORS[name]
    with layout.crc_disabled():
        fi = layout.frame_tensor(MetadataIndex(name), t)
    blob = _join(fi)
    assert len(blob) == fi.size
    assert torch.equal(torch.load(io.BytesIO(blob), weights_only=True), t)
    rec = layout.parse_tensor_record(memoryview(blob))
    assert rec.is_dense()
    assert torch.equal(layout.payload_view(memoryview(blob), rec), t)


def test_payload_aliases_the_tensor_memory():
    t = torch.randn(1 << 16)
    with layout.crc_disabled():
        fi = layout.frame_tensor(MetadataIndex("t"), t)
    assert len(fi.segments) == 3  # header, payload, trailer
    payload = fi.segments[1]
    assert isinstance(payload, memoryview) and payload.nbytes == t.numel() * 4
    t[0] = 42.0  # a write to the tensor is visible through the held view: no copy was made
    assert torch.frombuffer(bytearray(payload[:4]), dtype=torch.float32).item() == 42.0
    assert fi.payload_offset == len(fi.segments[0])


def test_views_are_cloned_to_their_own_bytes():
    base = torch.randn(1000)
    with layout.crc_disabled():
        fi = layout.frame_tensor(MetadataIndex("v"), base[10:20])
    assert fi.payload_nbytes == 40  # not the 4000-byte base storage


def test_crc_disabled_is_thread_local_and_restored():
    import torch.utils.serialization.config as cfg

    assert cfg.save.compute_crc32 is True
    with layout.crc_disabled():
        assert cfg.save.compute_crc32 is False
    assert cfg.save.compute_crc32 is True


def test_meta_and_non_cpu_tensors_are_refused():
    with pytest.raises(UnsupportedTensorError, match="meta"):
        layout.frame_tensor(MetadataIndex("m"), torch.empty(2, device="meta"))


def test_stock_non_dense_record_is_detected():
    buf = io.BytesIO()
    torch.save(torch.randn(4, 4).t(), buf)
    rec = layout.parse_tensor_record(memoryview(buf.getvalue()))
    assert not rec.is_dense()


def test_record_parser_refuses_arbitrary_pickles():
    buf = io.BytesIO()
    torch.save({"not": "a tensor"}, buf)
    with pytest.raises(Exception):
        layout.parse_tensor_record(memoryview(buf.getvalue()))


def test_object_names_match_filesystem_writer():
    assert layout.data_object_name(3, 0) == "__3_0.distcp"
    assert layout.rank_metadata_name(2) == "__2.metadata"
