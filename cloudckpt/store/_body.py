"""A read-only, seekable file object over a sequence of buffers.

HTTP clients (botocore, requests) accept file-like bodies; this one lets a part
that spans several tensors go out without first being assembled into one buffer.
It is seekable so the client can rewind it to retry a request.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Sequence

from cloudckpt.store.base import Buffer

__all__ = ["SegmentReader"]


class SegmentReader(io.RawIOBase):
    """Present ``segments`` (bytes/memoryview) back to back as one readable stream."""

    def __init__(self, segments: Sequence[Buffer]) -> None:
        super().__init__()
        self._segs = [memoryview(s).cast("B") for s in segments if memoryview(s).nbytes]
        self._starts: list[int] = []
        pos = 0
        for s in self._segs:
            self._starts.append(pos)
            pos += s.nbytes
        self._size = pos
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(b).cast("B")
        n = 0
        want = out.nbytes
        while n < want and self._pos < self._size:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            seg = self._segs[i]
            off = self._pos - self._starts[i]
            take = min(want - n, seg.nbytes - off)
            out[n:n + take] = seg[off:off + take]
            n += take
            self._pos += take
        return n

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes, never past the end of the current segment.

        The result is a view of the segment, not a copy: HTTP clients hand
        what ``read()`` returns to ``socket.sendall``, which takes any buffer,
        so the payload goes from tensor memory to the socket. A short read at a
        segment boundary is allowed by the raw I/O contract, and every caller
        (http.client, urllib3) loops until ``read()`` returns nothing.
        """
        if size is None or size < 0:
            size = self._size - self._pos
        size = max(0, min(size, self._size - self._pos))
        if size == 0:
            return b""
        i = bisect.bisect_right(self._starts, self._pos) - 1
        off = self._pos - self._starts[i]
        seg = self._segs[i]
        take = min(size, seg.nbytes - off)
        self._pos += take
        return seg[off:off + take]  # type: ignore[return-value]

    def readall(self) -> bytes:
        """Everything from the position to the end, as one (copied) bytes object."""
        chunks = []
        while chunk := self.read(-1):
            chunks.append(bytes(chunk))
        return b"".join(chunks)
