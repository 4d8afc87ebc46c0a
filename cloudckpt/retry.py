"""The one retry loop of cloudckpt, and the adaptive concurrency it drives.

Every request a store sends goes through :func:`call`; nothing else retries
(botocore's own retries are switched off, google-cloud-storage's ``retry=None``),
so attempts never multiply between layers. The loop:

* retries only failures its caller classifies as transient (:class:`FailureKind`)
  and only operations that are idempotent as sent (every part is re-sent from
  the caller's staged buffers; conditional writes are re-checked by the store);
* sleeps with exponential backoff and *full jitter* (a uniform draw in
  ``[0, min(max_backoff, initial_backoff * 2**n)]``), so many ranks that were
  throttled together do not come back together;
* stops after ``max_attempts`` attempts, after ``timeout`` seconds for the
  operation, at the deadline of the enclosing :class:`RetryScope` (the save),
  or at once when that scope is cancelled (another request of the save failed);
* gives up on an endpoint that refuses connections after ``unreachable_timeout``
  seconds, a clock separate from (and much shorter than) the one for 5xx and
  throttling, and remembers it in :class:`EndpointHealth` so the next call to a
  dead endpoint fails after a single attempt instead of waiting again.

The transfer engine opens a :class:`RetryScope` around each task: it carries the
save's deadline, its cancellation event and an :class:`AdaptiveLimiter`, which
caps requests in flight and follows AIMD: every throttling reply (503 SlowDown,
429) halves the cap, at most once per round of requests, and every success
raises it by ``1/cap`` (about +1 per round), back up to ``max_concurrency``.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = [
    "FailureKind",
    "RetryPolicy",
    "Attempt",
    "GaveUp",
    "EndpointHealth",
    "AdaptiveLimiter",
    "RetryStats",
    "RetryScope",
    "use_scope",
    "current_scope",
    "call",
    "backoff_delay",
]

_T = TypeVar("_T")


class FailureKind(enum.Enum):
    """Why a request failed, as far as retrying is concerned."""

    #: 503 SlowDown / 429: the service asks for less load. Back off and lower concurrency.
    THROTTLE = "throttle"
    #: 500/502/504 and the like: the request may or may not have been applied.
    SERVER = "server"
    #: The connection broke or stalled after it was made (reset, read timeout,
    #: truncated body): the request may have been applied.
    NETWORK = "network"
    #: No connection could be made at all (refused, DNS, connect timeout): nothing was applied.
    CONNECT = "connect"

    @property
    def maybe_applied(self) -> bool:
        """Whether the server may have applied the failed request (its reply is what was lost)."""
        return self in (FailureKind.SERVER, FailureKind.NETWORK)


@dataclass(frozen=True)
class RetryPolicy:
    """How one store operation is retried (see the module docstring)."""

    #: Attempts in total, the first one included.
    max_attempts: int = 10
    #: Cap of the first backoff draw, in seconds; it doubles per attempt.
    initial_backoff: float = 0.2
    #: Largest backoff cap, in seconds.
    max_backoff: float = 8.0
    #: Seconds one operation may spend over all its attempts.
    timeout: float = 120.0
    #: Seconds after which an endpoint that accepts no connection is given up on.
    unreachable_timeout: float = 5.0
    #: For this long after an endpoint was given up on, calls to it make one attempt only.
    unreachable_cooldown: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("initial_backoff", "max_backoff", "timeout", "unreachable_timeout", "unreachable_cooldown"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def backoff_delay(policy: RetryPolicy, failures: int, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter backoff before the next attempt, after ``failures`` (>= 1) failed attempts."""
    cap = min(policy.max_backoff, policy.initial_backoff * (2 ** (failures - 1)))
    return cap * rng()


@dataclass(frozen=True)
class Attempt:
    """What an attempt knows about the attempts before it."""

    #: 1 for the first attempt.
    number: int
    #: Kinds of the earlier failures, oldest first.
    previous: tuple[FailureKind, ...] = ()

    @property
    def maybe_applied_before(self) -> bool:
        """True if an earlier attempt may have been applied although it failed (lost reply)."""
        return any(k.maybe_applied for k in self.previous)


class GaveUp(Exception):
    """Raised by :func:`call` when it stops retrying; stores translate ``last`` into a typed error.

    ``reason`` is ``"attempts"``, ``"timeout"``, ``"unreachable"``, ``"deadline"``
    (the save's deadline) or ``"cancelled"`` (another request of the save failed).
    """

    def __init__(self, last: BaseException, kind: FailureKind, reason: str, attempts: int, elapsed: float) -> None:
        super().__init__(f"{reason} after {attempts} attempt(s) in {elapsed:.1f} s: {type(last).__name__}")
        self.last = last
        self.kind = kind
        self.reason = reason
        self.attempts = attempts
        self.elapsed = elapsed

    def summary(self) -> str:
        """A short phrase for error messages."""
        what = {
            "attempts": "all attempts failed",
            "timeout": "the operation's retry timeout ran out",
            "unreachable": "no connection could be made",
            "deadline": "the save deadline passed",
            "cancelled": "the save was cancelled because another request failed",
        }.get(self.reason, self.reason)
        return f"gave up after {self.attempts} attempt(s) in {self.elapsed:.1f} s: {what}"


class EndpointHealth:
    """Remembers that an endpoint refused connections, so later calls fail fast (per store)."""

    def __init__(self) -> None:
        self._down_since: float | None = None

    def mark_unreachable(self) -> None:
        """Record that a call just gave up on connecting."""
        self._down_since = time.monotonic()

    def mark_ok(self) -> None:
        """Record a successful request: the endpoint is up."""
        self._down_since = None

    def recently_unreachable(self, cooldown: float) -> bool:
        """True if a call gave up on connecting less than ``cooldown`` seconds ago."""
        down = self._down_since
        return down is not None and time.monotonic() - down < cooldown


@dataclass
class RetryStats:
    """Counters of one scope (thread-safe through its lock)."""

    attempts: int = 0
    retries: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    gave_up: int = 0
    limit_min: float = 0.0
    limit_max_after_min: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_failure(self, kind: FailureKind, retried: bool) -> None:
        """Count one failed attempt."""
        with self._lock:
            self.failures[kind.value] = self.failures.get(kind.value, 0) + 1
            if retried:
                self.retries += 1
            else:
                self.gave_up += 1

    def record_attempt(self) -> None:
        """Count one attempt."""
        with self._lock:
            self.attempts += 1

    def as_dict(self) -> dict[str, object]:
        """A plain-dict snapshot (for reports and benchmarks)."""
        with self._lock:
            return {"attempts": self.attempts, "retries": self.retries, "failures": dict(self.failures),
                    "gave_up": self.gave_up, "limit_min": self.limit_min,
                    "limit_max_after_min": self.limit_max_after_min}


class AdaptiveLimiter:
    """AIMD cap on requests in flight: halve on throttling, +1/cap per success.

    A decrease happens only for a throttled request that *started* after the
    previous decrease, so the burst of 503s from requests that were already in
    flight when the first one came back counts once, like TCP's one decrease
    per round trip.
    """

    def __init__(self, max_limit: int, *, min_limit: int = 1, decrease: float = 0.5,
                 stats: RetryStats | None = None) -> None:
        if max_limit < 1 or min_limit < 1 or min_limit > max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {min_limit}, {max_limit}")
        if not 0.0 < decrease < 1.0:
            raise ValueError(f"decrease must be in (0, 1), got {decrease}")
        self.max_limit = max_limit
        self.min_limit = min_limit
        self.decrease = decrease
        self._limit = float(max_limit)
        self._in_flight = 0
        self._last_decrease = -float("inf")
        self._cond = threading.Condition()
        self.stats = stats
        self.decreases = 0
        if stats is not None:
            stats.limit_min = float(max_limit)
            stats.limit_max_after_min = float(max_limit)

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return max(self.min_limit, int(self._limit))

    @property
    def in_flight(self) -> int:
        """Requests in flight now."""
        return self._in_flight

    def acquire(self, *, deadline: float | None = None, cancel: threading.Event | None = None) -> bool:
        """Wait for a free slot; False if the deadline passed or ``cancel`` was set first."""
        with self._cond:
            while self._in_flight >= self.limit:
                if cancel is not None and cancel.is_set():
                    return False
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    return False
                self._cond.wait(wait)
            self._in_flight += 1
            return True

    def release(self) -> None:
        """Give a slot back."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify()

    def on_throttle(self, started: float) -> None:
        """A request that started at ``started`` (monotonic) was throttled: multiplicative decrease."""
        with self._cond:
            if started < self._last_decrease:
                return
            self._limit = max(float(self.min_limit), self._limit * self.decrease)
            self._last_decrease = time.monotonic()
            self.decreases += 1
            if self.stats is not None:
                self.stats.limit_min = min(self.stats.limit_min, self._limit)
                self.stats.limit_max_after_min = self._limit

    def on_success(self) -> None:
        """A request succeeded: additive increase of about one slot per round."""
        with self._cond:
            if self._limit < self.max_limit:
                self._limit = min(float(self.max_limit), self._limit + 1.0 / self._limit)
                if self.stats is not None:
                    self.stats.limit_max_after_min = max(self.stats.limit_max_after_min, self._limit)
                self._cond.notify()


@dataclass
class RetryScope:
    """Context that the transfer engine gives every request of one upload or download."""

    #: Monotonic time after which no new attempt starts (None: only the per-operation timeout).
    deadline: float | None = None
    #: Set when the save has failed elsewhere: retries stop at once.
    cancel: threading.Event | None = None
    limiter: AdaptiveLimiter | None = None
    stats: RetryStats = field(default_factory=RetryStats)

    def cancelled(self) -> bool:
        """True once the scope's cancel event is set."""
        return self.cancel is not None and self.cancel.is_set()


_SCOPE: contextvars.ContextVar[RetryScope | None] = contextvars.ContextVar("cloudckpt_retry_scope", default=None)
# True while this thread runs an attempt: a call nested inside it (a store checking
# what a lost reply did) must not wait for a second limiter slot.
_IN_ATTEMPT: contextvars.ContextVar[bool] = contextvars.ContextVar("cloudckpt_in_attempt", default=False)


def current_scope() -> RetryScope | None:
    """The scope of the calling thread's current task, if any."""
    return _SCOPE.get()


@contextlib.contextmanager
def use_scope(scope: RetryScope | None) -> Iterator[RetryScope | None]:
    """Run the block (on this thread) under ``scope``."""
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def call(
    fn: Callable[[Attempt], _T],
    *,
    classify: Callable[[BaseException], FailureKind | None],
    policy: RetryPolicy,
    health: EndpointHealth | None = None,
    sleep: Callable[[float], None] | None = None,
    rng: Callable[[], float] = random.random,
) -> _T:
    """Run ``fn(attempt)`` until it succeeds or retrying must stop.

    ``classify`` says whether a failure is transient (a :class:`FailureKind`) or
    final (None: re-raised as is). When retrying stops on a transient failure,
    :class:`GaveUp` is raised with the last failure attached.
    """
    scope = current_scope()
    stats = scope.stats if scope is not None else None
    limiter = scope.limiter if scope is not None and not _IN_ATTEMPT.get() else None
    cancel = scope.cancel if scope is not None else None
    start = time.monotonic()
    op_deadline = start + policy.timeout
    deadline = op_deadline if scope is None or scope.deadline is None else min(op_deadline, scope.deadline)
    fast_fail = health is not None and health.recently_unreachable(policy.unreachable_cooldown)
    previous: list[FailureKind] = []

    def wait(delay: float) -> None:
        if sleep is not None:
            sleep(delay)
        elif cancel is not None:
            cancel.wait(delay)
        else:
            time.sleep(delay)

    while True:
        number = len(previous) + 1
        if limiter is not None and not limiter.acquire(deadline=deadline, cancel=cancel):
            last = TimeoutError("no request slot became free")
            why = "cancelled" if scope is not None and scope.cancelled() else "deadline"
            raise GaveUp(last, previous[-1] if previous else FailureKind.THROTTLE, why, number - 1,
                         time.monotonic() - start)
        started = time.monotonic()
        try:
            if stats is not None:
                stats.record_attempt()
            token = _IN_ATTEMPT.set(True)
            try:
                result = fn(Attempt(number, tuple(previous)))
            finally:
                _IN_ATTEMPT.reset(token)
        except Exception as exc:  # classified below; final errors re-raised unchanged
            if limiter is not None:
                limiter.release()
            kind = classify(exc)
            if kind is None:
                raise
            now = time.monotonic()
            if kind is FailureKind.THROTTLE and limiter is not None:
                limiter.on_throttle(started)
            reason: str | None = None
            if kind is FailureKind.CONNECT:
                if health is not None:
                    health.mark_unreachable()
                if fast_fail or now - start >= policy.unreachable_timeout:
                    reason = "unreachable"
            elif health is not None:
                health.mark_ok()  # it answered, so it is reachable
            delay = backoff_delay(policy, number, rng)
            if reason is None:
                if number >= policy.max_attempts:
                    reason = "attempts"
                elif scope is not None and scope.cancelled():
                    reason = "cancelled"
                elif now + delay >= deadline:
                    reason = "deadline" if scope is not None and scope.deadline is not None and \
                        scope.deadline <= op_deadline else "timeout"
                elif kind is FailureKind.CONNECT and now + delay - start >= policy.unreachable_timeout:
                    # Do not sleep past the unreachable window only to give up afterwards.
                    delay = max(0.0, policy.unreachable_timeout - (now - start))
            if stats is not None:
                stats.record_failure(kind, retried=reason is None)
            if reason is not None:
                raise GaveUp(exc, kind, reason, number, now - start) from exc
            previous.append(kind)
            wait(delay)
            if scope is not None and scope.cancelled():
                raise GaveUp(exc, kind, "cancelled", number, time.monotonic() - start) from exc
            continue
        if limiter is not None:
            limiter.release()
            limiter.on_success()
        if health is not None:
            health.mark_ok()
        return result
