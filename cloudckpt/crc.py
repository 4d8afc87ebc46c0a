"""CRC32C helpers: fast native checksums plus combining checksums of adjacent pieces.

The checksum of each byte range is computed once, in a worker thread, by the
``crc32c`` package (hardware CRC32C, ~15 GB/s, releases the GIL, and accepts
any buffer, so memoryviews of tensors are checksummed without a copy). Checksums of larger spans (a part, a tensor
item, a whole object) are then *combined* from the pieces without touching the
data again. ``combine`` is the zlib ``crc32_combine`` algorithm (multiplication
by x^(8n) modulo the reflected Castagnoli polynomial), hand-written here because
neither crc32c nor google-crc32c exposes it.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Iterable

import crc32c as _crc32c

__all__ = ["crc32c", "crc32c_extend", "combine", "combine_all", "to_base64", "from_base64"]

_POLY = 0x82F63B78  # CRC32C, reflected


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C of ``data`` as an unsigned int."""
    return _crc32c.crc32c(data)


def crc32c_extend(crc: int, data: bytes | bytearray | memoryview) -> int:
    """Continue ``crc`` over ``data``."""
    return _crc32c.crc32c(data, crc)


def _multmodp(a: int, b: int) -> int:
    # Multiply a(x) * b(x) modulo p(x), bit-reflected polynomials.
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> tuple[int, ...]:
    # table[k] = x^(2^k) mod p(x)
    table = []
    p = 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return tuple(table)


_X2N = _x2n_table()


@functools.lru_cache(maxsize=4096)
def _x8nmodp(n: int) -> int:
    # x^(8n) mod p(x). Cached: a save combines pieces of a few recurring
    # lengths (part size, tensor size, header sizes) thousands of times, and
    # each uncached call costs ~12 pure-Python polynomial products.
    p = 1 << 31  # x^0 == 1
    k = 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC32C of ``A + B`` given ``crc(A)``, ``crc(B)`` and ``len(B)``."""
    if len_b == 0:
        return crc_a
    return _multmodp(_x8nmodp(len_b), crc_a) ^ crc_b


def combine_all(pieces: Iterable[tuple[int, int]]) -> int:
    """Combine ``(crc, length)`` pieces laid back to back into one CRC32C."""
    total = 0
    for crc, length in pieces:
        total = combine(total, crc, length)
    return total


def to_base64(crc: int) -> str:
    """The big-endian base64 form used by S3 (x-amz-checksum-crc32c) and GCS (x-goog-hash)."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def from_base64(value: str) -> int:
    """Inverse of :func:`to_base64`."""
    return int.from_bytes(base64.b64decode(value), "big")
