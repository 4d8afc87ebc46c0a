"""SegmentReader: the seekable, zero-copy request body over back-to-back buffers."""

from __future__ import annotations

import io

import pytest

from cloudckpt.store._body import SegmentReader

SEGMENTS = [b"abc", b"", b"defgh", b"ij"]
WHOLE = b"".join(SEGMENTS)


def drain(reader: SegmentReader, size: int) -> list[bytes]:
    chunks = []
    while chunk := reader.read(size):
        chunks.append(bytes(chunk))
    return chunks


@pytest.mark.parametrize("size", [1, 2, 4, 100, -1])
def test_reads_concatenate_to_the_whole_body(size: int) -> None:
    assert b"".join(drain(SegmentReader(SEGMENTS), size)) == WHOLE


def test_reads_stop_at_segment_boundaries_and_alias_the_segment() -> None:
    seg = bytearray(b"0123456789")
    reader = SegmentReader([b"ab", seg])
    assert bytes(reader.read(5)) == b"ab"  # short read at the boundary, no copy across segments
    view = reader.read(4)
    assert isinstance(view, memoryview)
    seg[0] = ord("X")
    assert bytes(view) == b"X123"  # a view of the caller's buffer, not a copy


def test_len_seek_tell_and_rewind_for_a_retry() -> None:
    reader = SegmentReader(SEGMENTS)
    assert len(reader) == len(WHOLE)
    drain(reader, 3)
    assert reader.tell() == len(WHOLE)
    assert reader.seek(0) == 0
    assert reader.readall() == WHOLE
    reader.seek(-2, io.SEEK_END)
    assert reader.readall() == b"ij"
    reader.seek(4)
    reader.seek(1, io.SEEK_CUR)
    assert bytes(reader.read(10)) == b"fgh"


def test_readinto_fills_across_segments() -> None:
    reader = SegmentReader(SEGMENTS)
    buf = bytearray(6)
    assert reader.readinto(buf) == 6
    assert bytes(buf) == WHOLE[:6]


def test_bad_seek_is_refused() -> None:
    reader = SegmentReader(SEGMENTS)
    with pytest.raises(ValueError):
        reader.seek(-1)
    with pytest.raises(ValueError):
        reader.seek(0, 7)
