"""Wall-clock deadlines for reading HTTP response bodies.

A socket read timeout bounds each ``recv``, not a whole response: a server
that sends one byte per second never trips it, and a large ``readinto`` keeps
waiting for the rest. :func:`body_deadline` arms one shared watchdog thread
that, when the deadline passes, shuts the response's socket down. The blocked
read then returns at once (short), and the caller raises
:class:`~cloudckpt.errors.ReadDeadlineExceededError` instead of retrying.

Reads stay zero-copy (large ``readinto`` calls straight into the caller's
buffer); the watchdog costs one heap push and pop per response.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["BodyDeadline", "body_deadline", "socket_of"]


def socket_of(response: Any) -> socket.socket | None:
    """The socket under a urllib3 (or botocore/requests-wrapped) response, if it can be found."""
    candidates = (
        ("_raw_stream", "_connection", "sock"),
        ("_raw_stream", "_fp", "fp", "raw", "_sock"),
        ("raw", "_connection", "sock"),
        ("raw", "_fp", "fp", "raw", "_sock"),
        ("_connection", "sock"),
        ("_fp", "fp", "raw", "_sock"),
    )
    for path in candidates:
        obj = response
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, socket.socket):
            return obj
    return None


class BodyDeadline:
    """One armed deadline; ``expired`` turns True when the watchdog cut the connection."""

    def __init__(self, when: float, sock: socket.socket | None) -> None:
        self.when = when
        self.expired = False
        self._sock = sock
        self._done = False
        self._lock = threading.Lock()

    def fire(self) -> None:
        with self._lock:
            if self._done:
                return  # the read finished: the connection may already serve another request
            self.expired = True
            self._done = True
            if self._sock is not None:
                try:
                    # The plain socket's shutdown, also for TLS sockets: it wakes a blocked
                    # recv in another thread without touching the TLS object it is using.
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def disarm(self) -> None:
        with self._lock:
            self._done = True

    def remaining(self) -> float:
        return self.when - time.monotonic()


class _Watchdog:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, BodyDeadline]] = []
        self._seq = itertools.count()
        self._pid: int | None = None

    def arm(self, entry: BodyDeadline) -> None:
        with self._cv:
            if self._pid != os.getpid():  # first use, or a forked child: threads do not survive fork
                self._pid = os.getpid()
                self._heap = []
                threading.Thread(target=self._loop, name="cloudckpt-read-deadline", daemon=True).start()
            heapq.heappush(self._heap, (entry.when, next(self._seq), entry))
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                when, _, entry = self._heap[0]
                if entry._done:
                    heapq.heappop(self._heap)
                    continue
                wait = when - time.monotonic()
                if wait > 0:
                    self._cv.wait(min(wait, 1.0))
                    continue
                heapq.heappop(self._heap)
            entry.fire()


    def reset_after_fork(self) -> None:
        # A lock held by another thread at fork time stays held in the child: start clean.
        self._cv = threading.Condition()
        self._heap = []
        self._pid = None


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WATCHDOG.reset_after_fork)


@contextlib.contextmanager
def body_deadline(seconds: float, response: Any) -> Iterator[BodyDeadline]:
    """Cut ``response``'s connection if the block has not finished within ``seconds``.

    Disarmed on exit, before the caller releases the connection, so a late
    firing can never hit a connection that serves another request.
    """
    entry = BodyDeadline(time.monotonic() + max(0.0, seconds), socket_of(response))
    _WATCHDOG.arm(entry)
    try:
        yield entry
    finally:
        entry.disarm()
