"""Preemption notices, and agreement on the step at which every rank stops.

This module only *detects* preemption and makes the ranks *agree* on it; it
does not know where (or whether) an emergency checkpoint is written. The
:class:`~cloudckpt.manager.CheckpointManager` builds on it (``preemption=True``).

Notices (:class:`PreemptionNotice`) come from:

* signals (SIGTERM by default): Kubernetes, SageMaker, Slurm and torchrun send
  one, then SIGKILL after a grace period. The handler is installed on the main
  thread only, chains the handler it replaced, and only records the notice
  (no locks, no logging, no I/O: it may run in the middle of anything);
* the EC2 spot interruption notice (IMDSv2: ``PUT /latest/api/token``, then
  ``GET /latest/meta-data/spot/instance-action``), at the endpoint botocore
  uses (``AWS_EC2_METADATA_SERVICE_ENDPOINT``, default ``http://169.254.169.254/``;
  ``AWS_EC2_METADATA_DISABLED=true`` turns it off);
* the GCE preemption notice (``/computeMetadata/v1/instance/preempted`` with
  ``Metadata-Flavor: Google``), at the host google-auth uses
  (``GCE_METADATA_HOST``, default ``169.254.169.254``; ``NO_GCE_CHECK=true``
  turns it off);
* :meth:`PreemptionWatcher.request`, for schedulers of the user's own.

The metadata services are probed and polled from one daemon thread, never from
the caller's, and only where they exist: the link-local address is contacted
only on a machine whose firmware (DMI) says it is an EC2 instance or a GCE VM,
or at an endpoint the environment names. Off the cloud nothing is probed.

Agreement (:class:`StepAgreement`): the first rank that sees a notice proposes
"stop after step ``s + margin``" in the process group's key-value store with
``compare_set`` (the first proposal wins); every rank reads the key with one
``check`` per step (about 60 µs on loopback; see benchmarks/preemption.py), so
there is no collective per step and no rank can wait in a collective for a rank
that already stopped.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PreemptionNotice",
    "StopDecision",
    "PreemptionWatcher",
    "StepAgreement",
    "PreemptionGuard",
    "ec2_metadata_endpoint",
    "gce_metadata_host",
    "default_store",
]

log = logging.getLogger(__name__)

SOURCES = ("signal", "ec2", "gce", "request", "peer")
#: EC2's IMDSv2 token lifetime we ask for (seconds); refreshed on 401 or when near expiry.
_EC2_TOKEN_TTL = 21600


@dataclass(frozen=True)
class PreemptionNotice:
    """What announced the preemption.

    ``source``: ``"signal"``, ``"ec2"``, ``"gce"``, ``"request"`` (the user's
    own scheduler), or ``"peer"`` (another rank saw a notice; this one learnt
    it through the agreement). ``time``: when it was seen (``time.time()``).
    ``deadline``: the wall-clock instant the notice says the machine goes away
    (EC2 gives one; signals and GCE do not: None). ``detail``: free text.
    """

    source: str
    time: float
    deadline: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class StopDecision:
    """The agreed outcome: every rank stops at ``step`` and must be done by ``deadline`` (wall clock)."""

    step: int
    deadline: float
    source: str
    rank: int

    def encode(self) -> str:
        """The value stored under the agreement key."""
        return f"v1|{self.step}|{self.deadline:.6f}|{self.source}|{self.rank}"

    @classmethod
    def decode(cls, raw: bytes | str) -> StopDecision:
        """Parse a stored value (strictly: a malformed one is an error, not a guess)."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        parts = text.split("|")
        if len(parts) != 5 or parts[0] != "v1" or parts[3] not in SOURCES:
            raise ValueError(f"malformed preemption decision in the process group's store: {text[:200]!r}")
        return cls(step=int(parts[1]), deadline=float(parts[2]), source=parts[3], rank=int(parts[4]))


# -- metadata endpoints ---------------------------------------------------------------------------


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _dmi(name: str) -> str:
    try:
        with open(f"/sys/class/dmi/id/{name}", encoding="utf-8", errors="replace") as f:
            return f.read(256).strip()
    except OSError:
        return ""


def on_ec2() -> bool:
    """True when the machine's firmware says it is an EC2 instance (no network involved)."""
    if _dmi("sys_vendor") == "Amazon EC2" or _dmi("board_asset_tag").startswith("i-"):
        return True
    try:
        with open("/sys/hypervisor/uuid", encoding="ascii", errors="replace") as f:
            return f.read(3).lower() == "ec2"  # Xen-based instance types
    except OSError:
        return False


def on_gce() -> bool:
    """True when the machine's firmware says it is a GCE VM (google-auth's residency check)."""
    return "Google" in _dmi("product_name") or _dmi("bios_vendor") == "Google"


def ec2_metadata_endpoint() -> str | None:
    """The IMDS base URL botocore would use (with a trailing slash), or None.

    None when disabled (``AWS_EC2_METADATA_DISABLED``) and, unless
    ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` names one, off EC2: the link-local
    metadata address is only ever contacted on a machine whose firmware says
    it is an EC2 instance.
    """
    if _truthy("AWS_EC2_METADATA_DISABLED"):
        return None
    url = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    if not url:
        if not on_ec2():
            return None
        url = "http://169.254.169.254/"
    return url if url.endswith("/") else url + "/"


def gce_metadata_host() -> str | None:
    """The metadata host (``host[:port]``) google-auth would use, or None.

    None when disabled (``NO_GCE_CHECK``) and, unless ``GCE_METADATA_HOST`` (or
    ``GCE_METADATA_IP``) names one, off GCE (firmware check, as google-auth does).
    """
    if _truthy("NO_GCE_CHECK"):
        return None
    host = os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_IP")
    if host:
        return host
    # google-auth defaults to metadata.google.internal; the link-local IP needs no DNS.
    return "169.254.169.254" if on_gce() else None


# Metadata requests must never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, headers: dict[str, str], timeout: float) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "PUT" else None)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read(4096)
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in (exc.headers or {}).items()}, b""


def _parse_utc(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%SZ")))
    except (ValueError, AttributeError):
        return None


class _EC2Poller:
    """IMDSv2 spot interruption notice."""

    name = "ec2"

    def __init__(self, base: str, timeout: float) -> None:
        self.base = base
        self.timeout = timeout
        self._token: str | None = None
        self._token_expires = 0.0

    def _fresh_token(self) -> str | None:
        if self._token is None or time.monotonic() > self._token_expires:
            status, _, body = _http("PUT", self.base + "latest/api/token",
                                    {"X-aws-ec2-metadata-token-ttl-seconds": str(_EC2_TOKEN_TTL)}, self.timeout)
            if status != 200 or not body:
                return None
            self._token = body.decode("ascii", "replace").strip()
            self._token_expires = time.monotonic() + _EC2_TOKEN_TTL - 60
        return self._token

    def probe(self) -> bool:
        """True if an IMDSv2 service answers here."""
        return self._fresh_token() is not None

    def poll(self) -> PreemptionNotice | None:
        """A notice if one is posted; None otherwise."""
        token = self._fresh_token()
        if token is None:
            return None
        status, _, body = _http("GET", self.base + "latest/meta-data/spot/instance-action",
                                {"X-aws-ec2-metadata-token": token}, self.timeout)
        if status == 401:
            self._token = None  # expired or revoked: a new one next time
            return None
        if status != 200:
            return None  # 404: no interruption scheduled
        try:
            doc = json.loads(body.decode("utf-8", "replace"))
            action, when = str(doc.get("action", "?"))[:32], _parse_utc(str(doc.get("time", "")))
        except (ValueError, AttributeError):
            action, when = "unknown", None
        return PreemptionNotice("ec2", time.time(), when, f"EC2 spot instance-action {action!r}")


class _GCEPoller:
    """GCE ``instance/preempted``."""

    name = "gce"

    def __init__(self, host: str, timeout: float) -> None:
        self.url = f"http://{host}/computeMetadata/v1/instance/preempted"
        self.timeout = timeout

    def probe(self) -> bool:
        """True if a GCE metadata server answers here (it sets ``Metadata-Flavor: Google``)."""
        status, headers, _ = _http("GET", self.url, {"Metadata-Flavor": "Google"}, self.timeout)
        return status == 200 and headers.get("metadata-flavor") == "Google"

    def poll(self) -> PreemptionNotice | None:
        """A notice once the instance is marked preempted."""
        status, _, body = _http("GET", self.url, {"Metadata-Flavor": "Google"}, self.timeout)
        if status == 200 and body.strip().upper() == b"TRUE":
            return PreemptionNotice("gce", time.time(), None, "GCE instance/preempted is TRUE")
        return None


# -- the watcher -------------------------------------------------------------------------------------


class PreemptionWatcher:
    """Collects the first preemption notice of this process (signals, metadata services, requests).

    Args:
        signals: signals that mean "you are being preempted" (default SIGTERM).
            Handlers are installed only when the watcher is started on the main
            thread; each chains the handler it replaced (if that was a Python
            callable) and is replaced by it again on :meth:`close`.
        poll_metadata: poll the EC2 and GCE metadata services (only those
            that answer a probe) from a daemon thread.
        poll_interval: seconds between polls (EC2 gives 2 minutes of notice,
            GCE about 30 s).
        http_timeout: seconds per metadata request (probe included).
        probe_attempts: probes per service before the thread gives up on it.
        on_notice: called (on the thread that saw it, never inside a signal
            handler) with the first notice.

    The first notice wins; later ones (a second SIGTERM) only count in
    :attr:`signal_count`. Reading :attr:`notice` is lock-free and cheap.
    """

    def __init__(self, *, signals: Sequence[int] = (signal.SIGTERM,), poll_metadata: bool = True,
                 poll_interval: float = 1.0, http_timeout: float = 0.5, probe_attempts: int = 3,
                 on_notice: Callable[[PreemptionNotice], None] | None = None) -> None:
        self.signals = tuple(signals)
        self.poll_metadata = poll_metadata
        self.poll_interval = poll_interval
        self.http_timeout = http_timeout
        self.probe_attempts = probe_attempts
        self.on_notice = on_notice
        #: Signals received so far (all of them, not only the first).
        self.signal_count = 0
        self._notice: PreemptionNotice | None = None
        self._previous: dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: Names of the metadata services found ("ec2", "gce"), once probed.
        self.services: list[str] = []

    @property
    def notice(self) -> PreemptionNotice | None:
        """The first notice seen, or None."""
        return self._notice

    def _record(self, notice: PreemptionNotice) -> bool:
        # Attribute assignment only: safe in a signal handler. A poller racing a
        # signal can at worst replace a notice recorded a moment earlier.
        if self._notice is not None:
            return False
        self._notice = notice
        return True

    def request(self, detail: str = "requested", deadline: float | None = None) -> PreemptionNotice:
        """Record a notice from the user's own scheduler (``deadline``: wall clock, optional)."""
        if self._record(PreemptionNotice("request", time.time(), deadline, detail)) and self.on_notice:
            self.on_notice(self._notice)  # type: ignore[arg-type]
        return self._notice  # type: ignore[return-value]

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> PreemptionWatcher:
        """Install the signal handlers (main thread only) and start the metadata poller."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
        elif self.signals:
            log.info("cloudckpt: not on the main thread; no preemption signal handlers installed "
                     "(metadata notices and request() still work)")
        if self.poll_metadata:
            pollers: list[Any] = []
            ec2, gce = ec2_metadata_endpoint(), gce_metadata_host()
            if ec2:
                pollers.append(_EC2Poller(ec2, self.http_timeout))
            if gce:
                pollers.append(_GCEPoller(gce, self.http_timeout))
            if pollers:
                self._thread = threading.Thread(target=self._poll_loop, args=(pollers,),
                                                name="cloudckpt-preemption-poll", daemon=True)
                self._thread.start()
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_count += 1
        if not self._closed:
            name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
            self._record(PreemptionNotice("signal", time.time(), None, f"received {name}"))
        previous = self._previous.get(signum)
        # SIG_DFL would end the process, SIG_IGN does nothing: only Python handlers are chained.
        if callable(previous):
            previous(signum, frame)

    def _poll_loop(self, pollers: list[Any]) -> None:
        active: list[Any] = []
        for _ in range(self.probe_attempts):
            for p in pollers:
                if p not in active and self._safe(p.probe, False):
                    active.append(p)
            if active or self._stop.wait(self.poll_interval):
                break
        self.services = [p.name for p in active]
        if active:
            log.info("cloudckpt: polling %s for preemption notices every %g s", self.services, self.poll_interval)
        while active and not self._stop.is_set() and self._notice is None:
            for p in active:
                notice = self._safe(p.poll, None)
                if notice is not None:
                    if self._record(notice):
                        log.warning("cloudckpt: preemption notice: %s", notice.detail)
                        if self.on_notice:
                            self.on_notice(notice)
                    return
            self._stop.wait(self.poll_interval)

    @staticmethod
    def _safe(fn: Callable[[], Any], default: Any) -> Any:
        try:
            return fn()
        except Exception:  # noqa: BLE001 - a metadata service that does not answer is not an error
            return default

    def close(self) -> None:
        """Stop the poller and put the replaced signal handlers back (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._previous:
            if threading.current_thread() is threading.main_thread():
                for sig, previous in self._previous.items():
                    # Only if ours is still installed: never undo someone else's later handler.
                    if signal.getsignal(sig) == self._on_signal:
                        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
                self._previous = {}
            else:
                log.warning("cloudckpt: close() off the main thread cannot restore signal handlers; "
                            "the installed ones now only chain the previous handlers")
        if self._thread is not None:
            self._thread.join(timeout=2 * self.http_timeout + 0.5)


# -- agreement ------------------------------------------------------------------------------------


def default_store() -> Any:
    """The default process group's key-value store, or None without a process group."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API moved or no store: agreement falls back to local
        return None


class StepAgreement:
    """Every rank stops at the same step, with one store lookup per step and no collective.

    A rank with a notice proposes ``StopDecision(step + margin, ...)`` under
    ``key`` with ``compare_set`` (only the first proposal is stored; every
    proposer reads back the winner). Every rank, notice or not, ``check``\\ s
    the key once per :meth:`reached` call until it appears, then caches it.

    Assumption: ranks are never more than ``margin`` steps apart when they call
    :meth:`reached`. Synchronous data-parallel training guarantees this with
    ``margin=1`` when every step contains a collective that blocks the host
    (gloo, or NCCL followed by any host sync such as ``loss.item()``): a rank
    can only finish step ``s + 1`` after every other rank has finished
    :meth:`reached` for step ``s``. Loops whose hosts run ahead of the devices
    (NCCL with no host sync for several steps) need a larger margin. A rank
    that finds the agreed step already behind it returns True at once and logs
    an error: the margin was too small.
    """

    def __init__(self, store: Any, key: str, *, margin: int = 1, rank: int = 0) -> None:
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
            raise ValueError(f"margin must be a positive int, got {margin!r}")
        self.store = store
        self.key = key
        self.margin = margin
        self.rank = rank
        self.decision: StopDecision | None = None
        self._late_warned = False

    def propose(self, step: int, deadline: float, source: str) -> StopDecision:
        """Propose stopping at ``step + margin``; return the decision that holds (maybe another rank's)."""
        if self.decision is None:
            mine = StopDecision(step + self.margin, deadline, source, self.rank)
            self.decision = StopDecision.decode(self.store.compare_set(self.key, "", mine.encode()))
        return self.decision

    def poll(self) -> StopDecision | None:
        """The decision, if some rank made one (one ``check`` until then)."""
        if self.decision is None and self.store.check([self.key]):
            self.decision = StopDecision.decode(self.store.get(self.key))
        return self.decision

    def reached(self, step: int, decision: StopDecision | None) -> bool:
        """Whether ``step`` is the agreed stop step (or past it)."""
        if decision is None or step < decision.step:
            return False
        if step > decision.step and not self._late_warned:
            self._late_warned = True
            log.error("cloudckpt: rank %d reached step %d but the ranks agreed to stop at step %d: ranks were "
                      "more than preemption margin=%d steps apart; stopping now", self.rank, step,
                      decision.step, self.margin)
        return True


class PreemptionGuard:
    """A :class:`PreemptionWatcher` plus a :class:`StepAgreement`: what a training loop asks each step.

    ``namespace`` names this guard's key in the store (the same on every rank,
    distinct per job and manager). ``grace`` is the seconds from the notice to
    the end of the emergency save when the notice itself gives no (earlier)
    deadline. ``watch=False`` installs nothing: only :meth:`request` notices.
    """

    def __init__(self, namespace: str, *, grace: float = 25.0, signals: Iterable[int] = (signal.SIGTERM,),
                 margin: int = 1, watch: bool = True, poll_metadata: bool = True, poll_interval: float = 1.0,
                 store: Any = None, rank: int | None = None) -> None:
        if not grace > 0:
            raise ValueError(f"preemption grace must be positive seconds, got {grace!r}")
        self.key = f"cloudckpt/preemption/{namespace}/stop"
        self.grace = float(grace)
        self.margin = margin
        self._store = store
        self._rank = rank
        self._agreement: StepAgreement | None = None
        self.watcher = PreemptionWatcher(signals=tuple(signals), poll_metadata=poll_metadata,
                                         poll_interval=poll_interval)
        if watch:
            self.watcher.start()
        self._reported_signals = 0

    # -- notices ----------------------------------------------------------------------------
    @property
    def local_notice(self) -> PreemptionNotice | None:
        """What this rank saw itself."""
        return self.watcher.notice

    @property
    def notice(self) -> PreemptionNotice | None:
        """This rank's own notice, else (once agreed) one saying which rank saw it."""
        own = self.watcher.notice
        if own is not None:
            return own
        d = self._agreement.decision if self._agreement is not None else None
        if d is None:
            return None
        return PreemptionNotice("peer", time.time(), d.deadline, f"rank {d.rank} saw a {d.source} notice")

    def request(self, detail: str = "requested", deadline: float | None = None) -> PreemptionNotice:
        """Record a notice from the user's own scheduler."""
        return self.watcher.request(detail, deadline)

    @property
    def decision(self) -> StopDecision | None:
        """The agreed stop step and deadline, once known."""
        return self._agreement.decision if self._agreement is not None else None

    def deadline(self) -> float | None:
        """Wall-clock instant the emergency save must be committed by (None: no notice known)."""
        d = self.decision
        if d is not None:
            return d.deadline
        own = self.watcher.notice
        return None if own is None else self._deadline_of(own)

    def stop_deadline(self) -> float | None:
        """The agreed deadline once the ranks agreed to stop, else None (one store lookup until then).

        Without a process group: the local notice's deadline. Unlike
        :meth:`deadline`, every rank gives the same answer after any collective
        that follows the proposal, so it can choose between a normal and an
        emergency save without the ranks diverging.
        """
        agreement = self._agree()
        if agreement is None:
            own = self.watcher.notice
            return None if own is None else self._deadline_of(own)
        d = agreement.poll()
        return None if d is None else d.deadline

    def remaining(self) -> float | None:
        """Seconds left until :meth:`deadline` (may be negative), or None."""
        dl = self.deadline()
        return None if dl is None else dl - time.time()

    def _deadline_of(self, notice: PreemptionNotice) -> float:
        mine = notice.time + self.grace
        return mine if notice.deadline is None else min(mine, notice.deadline)

    # -- agreement -------------------------------------------------------------------------
    def _agree(self) -> StepAgreement | None:
        if self._agreement is None:
            store = self._store if self._store is not None else default_store()
            if store is None:
                return None
            rank = self._rank
            if rank is None:
                import torch.distributed as dist

                rank = dist.get_rank() if dist.is_initialized() else 0
            self._agreement = StepAgreement(store, self.key, margin=self.margin, rank=rank)
        return self._agreement

    def reached(self, step: int) -> bool:
        """True on every rank at the same step once any rank has seen a notice (see :class:`StepAgreement`)."""
        if self.watcher.signal_count != self._reported_signals:
            if self._reported_signals:  # logged here, never inside the signal handler
                log.warning("cloudckpt: another preemption signal (%d so far); the first notice stands",
                            self.watcher.signal_count)
            self._reported_signals = self.watcher.signal_count
        own = self.watcher.notice
        agreement = self._agree()
        if agreement is None:
            return own is not None  # one process: stop at once
        decision = agreement.poll()
        if decision is None and own is not None:
            decision = agreement.propose(step, self._deadline_of(own), own.source)
            log.warning("cloudckpt: preemption (%s) seen by rank %d at step %d; ranks agreed to stop at step %d",
                        own.detail, agreement.rank, step, decision.step)
        return agreement.reached(step, decision)

    def close(self) -> None:
        """Stop watching (restores signal handlers, stops the poller)."""
        self.watcher.close()
