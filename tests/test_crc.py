"""CRC32C combination (pure functions) against the native library."""

from __future__ import annotations

import os

import google_crc32c
import pytest

from cloudckpt import crc


@pytest.mark.parametrize("sizes", [(0, 5), (5, 0), (1, 1), (1000, 12345, 7), (3, 1 << 20, 0, 17)])
def test_combine_matches_crc_of_concatenation(sizes):
    pieces = [os.urandom(n) for n in sizes]
    joined = b"".join(pieces)
    assert crc.combine_all((crc.crc32c(p), len(p)) for p in pieces) == google_crc32c.value(joined)


def test_crc_of_memoryview_slices_without_copy():
    data = bytearray(os.urandom(4096))
    assert crc.crc32c(memoryview(data)[100:300]) == google_crc32c.value(bytes(data[100:300]))
    assert crc.crc32c_extend(crc.crc32c(data[:10]), memoryview(data)[10:]) == google_crc32c.value(bytes(data))


def test_base64_round_trip():
    assert crc.from_base64(crc.to_base64(0xDEADBEEF)) == 0xDEADBEEF
    # The wire form S3/GCS use: big-endian bytes, base64.
    assert crc.to_base64(crc.crc32c(b"hello")) == "mnG7TA=="
