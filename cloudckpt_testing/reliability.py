"""Reliability trials: saves and loads through a fault-injecting proxy, and stored-byte corruption.

Shared by the test suite (``tests/test_reliability.py``, a few trials) and the
benchmark (``python -m benchmarks.reliability``, many). A trial never decides
its own verdict from what cloudckpt reports: it inspects the bucket directly
(not through the proxy) after the fact.

Fault trials (:func:`run_fault_trial`): a state dict with a multipart object,
small objects and byte items is saved and loaded with every request exposed
to one fault kind at a given rate (plus one guaranteed fault, so no trial is
fault-free). Verdicts:

``ok``
    saved, loaded back byte-identical.
``failed-clean``
    the save raised within the deadline, nothing is committed (no
    ``.metadata``) and no multipart upload is left incomplete.
``load-failed``
    the save committed, the load through the faults raised, and the committed
    checkpoint loads byte-identical without faults.
Anything else (a commit that did not happen when save() returned, wrong data,
leftover uploads, a failure past the deadline) is a violation, named by the
verdict.

Corruption trials (:func:`run_corruption_trial`): one byte of one stored
object is flipped. The load must raise an error naming the object (and the
item, for data objects) or, when the byte is one the load never reads (zip
framing of a tensor read straight into its target), return correct data;
:func:`cloudckpt.verify.verify` must report the object in every case.
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from typing import Any, Callable

import torch

from cloudckpt_testing.faultproxy import FaultProxy, FaultRule

__all__ = [
    "TRIAL_FAULTS",
    "Target",
    "TrialResult",
    "CorruptionResult",
    "fault_rules",
    "trial_state_dict",
    "run_fault_trial",
    "run_corruption_trial",
    "ACCEPTABLE",
]

MiB = 1024 * 1024

#: Fault kinds the trials inject: name -> FaultRule keyword arguments (besides rate/count).
TRIAL_FAULTS: dict[str, dict[str, Any]] = {
    "503": {"fault": "status", "status": 503},
    "500": {"fault": "status", "status": 500},
    "429": {"fault": "status", "status": 429},
    "reset_request": {"fault": "reset_request"},
    "reset_response": {"fault": "reset_response"},
    "stall": {"fault": "stall"},
    "truncate": {"fault": "truncate"},
    "drop_response": {"fault": "drop_response"},
}

#: Verdicts that satisfy the reliability contract.
ACCEPTABLE = frozenset({"ok", "failed-clean", "load-failed"})


@dataclasses.dataclass(frozen=True)
class Target:
    """A running test server to run trials against.

    ``name`` is ``"s3"`` or ``"gcs"``; ``upstream`` the server's ``http://HOST:PORT``.
    ``timeout`` is the client's per-request read timeout (a stall fault lasts
    longer than it).
    """

    name: str
    upstream: str
    timeout: float = 2.0

    @property
    def scheme(self) -> str:
        """URI scheme of the backend."""
        return "s3" if self.name == "s3" else "gs"

    def options(self, endpoint: str) -> dict[str, Any]:
        """Store options that reach ``endpoint`` with this target's timeouts."""
        if self.name == "s3":
            return {"endpoint_url": endpoint, "connect_timeout": 2.0, "read_timeout": self.timeout}
        return {"endpoint_url": endpoint, "timeout": (2.0, self.timeout)}

    def new_bucket(self) -> str:
        """Create a fresh bucket directly on the server; return its name."""
        name = f"rel-{uuid.uuid4().hex[:16]}"
        if self.name == "s3":
            from cloudckpt_testing.s3 import s3_client

            s3_client(self.upstream).create_bucket(Bucket=name)
        else:
            from cloudckpt_testing.gcs_emulator import gcs_client

            gcs_client(self.upstream).create_bucket(name)
        return name

    def direct_store(self, bucket: str) -> Any:
        """A store that talks to the server itself, bypassing any proxy."""
        from cloudckpt.store import open_store

        return open_store(f"{self.scheme}://{bucket}", endpoint_url=self.upstream)


def fault_rules(kind: str, rate: float, *, stall_seconds: float, first_at: int = 0) -> list[FaultRule]:
    """Rules injecting ``kind`` into every operation: once at request ``first_at``, then at ``rate``."""
    spec = dict(TRIAL_FAULTS[kind])
    if spec["fault"] == "stall":
        spec["stall_seconds"] = stall_seconds
    return [FaultRule(None, count=1, skip=first_at, **spec), FaultRule(None, rate=rate, **spec)]


def trial_state_dict(seed: int, big_numel: int = 1_600_000) -> dict[str, Any]:
    """A state dict whose data object goes up in several parts, with small tensors and byte items."""
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(big_numel, generator=g),                 # > 5 MiB: a multipart object
        "layer": {"w": torch.randn(64, 48, generator=g), "b": torch.randn(48, generator=g).to(torch.bfloat16)},
        "ids": torch.arange(1000, dtype=torch.int64) * seed,
        "step": seed,
        "meta": {"name": f"trial-{seed}", "lr": 0.125},
    }


def _empty_like(sd: Any) -> Any:
    if isinstance(sd, torch.Tensor):
        return torch.full_like(sd, 7) if not sd.is_floating_point() else torch.full_like(sd, float("nan"))
    if isinstance(sd, dict):
        return {k: _empty_like(v) for k, v in sd.items()}
    return None


def _identical(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    return bool(a == b)


def _describe(exc: BaseException) -> str:
    cause = exc
    # DCP wraps rank failures; show the root error a user would read.
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))[0]
    return f"{type(cause).__name__}: {str(cause)[:300]}"


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """Outcome of one fault trial."""

    backend: str
    fault: str
    trial: int
    verdict: str
    save_seconds: float
    load_seconds: float | None
    faults_injected: int
    requests: int
    error: str | None = None

    @property
    def acceptable(self) -> bool:
        """Whether the verdict satisfies the reliability contract."""
        return self.verdict in ACCEPTABLE


def _transfer_options(deadline: float) -> Any:
    from cloudckpt.transfer import TransferOptions

    return TransferOptions(part_size=5 * MiB, max_concurrency=4, save_deadline=deadline, cleanup_timeout=20.0)


def run_fault_trial(
    target: Target,
    kind: str,
    trial: int,
    *,
    rate: float = 0.05,
    deadline: float = 60.0,
    seed: int = 0,
    stall_seconds: float | None = None,
    big_numel: int = 1_600_000,
) -> TrialResult:
    """Save and load once through a proxy injecting ``kind``; judge the outcome from the bucket itself."""
    import cloudckpt

    trial_seed = seed * 100_003 + trial
    rng = random.Random(f"{target.name}:{kind}:{trial_seed}")
    bucket = target.new_bucket()
    uri = f"{target.scheme}://{bucket}/ck"
    sd = trial_state_dict(trial_seed % 1000 + 1, big_numel)
    stall = stall_seconds if stall_seconds is not None else target.timeout * 2.5
    rules = fault_rules(kind, rate, stall_seconds=stall, first_at=rng.randrange(0, 8))
    error = None
    load_s = None
    saved = loaded_ok = False
    identical = False
    with FaultProxy(target.upstream, rules=rules, seed=trial_seed, api="s3" if target.name == "s3" else "gcs") as proxy:
        opts = target.options(proxy.url)
        t0 = time.monotonic()
        try:
            cloudckpt.save(sd, uri, no_dist=True, transfer_options=_transfer_options(deadline), **opts)
            saved = True
        except BaseException as exc:  # noqa: BLE001 - DCP raises BaseException subclasses
            if isinstance(exc, KeyboardInterrupt):
                raise
            error = "save: " + _describe(exc)
        save_s = time.monotonic() - t0
        if saved:
            out = _empty_like(sd)
            t1 = time.monotonic()
            try:
                cloudckpt.load(out, uri, no_dist=True, **opts)
                loaded_ok = True
                identical = _identical(sd, out)
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                error = "load: " + _describe(exc)
            load_s = time.monotonic() - t1
        stats = proxy.stats()
    verdict = _judge_fault_trial(target, bucket, uri, sd, saved, loaded_ok, identical, save_s, deadline)
    return TrialResult(target.name, kind, trial, verdict, save_s, load_s, int(stats["injected"]),
                       sum(stats["requests"].values()), error)


def _judge_fault_trial(target: Target, bucket: str, uri: str, sd: dict[str, Any], saved: bool, loaded_ok: bool,
                       identical: bool, save_s: float, deadline: float) -> str:
    import cloudckpt

    store = target.direct_store(bucket)
    committed = store.head("ck/.metadata") is not None
    pending = store.list_multipart_uploads("ck/")
    if pending:
        return f"DIRTY: {len(pending)} incomplete upload(s)"
    if saved and not committed:
        return "LOST: save returned but nothing is committed"
    if not saved:
        if committed:
            return "COMMITTED-AFTER-FAILURE"
        # Allow one request timeout past the deadline for the attempt in flight.
        if save_s > deadline + 3 * target.timeout + 10:
            return f"SLOW-FAILURE: {save_s:.1f} s"
        return "failed-clean"
    if loaded_ok:
        return "ok" if identical else "CORRUPT: loaded data differ"
    out = _empty_like(sd)
    try:
        cloudckpt.load(out, uri, no_dist=True, endpoint_url=target.upstream)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        return f"UNREADABLE: {_describe(exc)}"
    return "load-failed" if _identical(sd, out) else "CORRUPT: committed data differ"


@dataclasses.dataclass(frozen=True)
class CorruptionResult:
    """Outcome of one corruption trial."""

    backend: str
    trial: int
    object: str
    offset: int
    load: str          # "detected", "unaffected" (load never reads that byte, data correct), or a violation
    verify: str        # "detected" or a violation
    error: str | None = None

    @property
    def acceptable(self) -> bool:
        """Whether both the load and verify behaved as the contract says."""
        return self.load in ("detected", "unaffected") and self.verify == "detected"


def _flip(store: Any, key: str, rng: random.Random) -> int:
    """Invert one random byte of ``key`` by rewriting the object; return its offset."""
    from cloudckpt import crc

    data = bytearray(store.get(key))
    offset = rng.randrange(len(data))
    data[offset] ^= 0xFF
    store.put(key, [bytes(data)], crc32c=crc.crc32c(data))
    return offset


def _item_at(store: Any, uri: str, name: str, offset: int) -> str | None:
    """The state-dict key of the item covering ``offset`` of data object ``name`` (from the intact metadata)."""
    from cloudckpt.safe_pickle import load_metadata
    from cloudckpt.uri import parse_uri

    meta = load_metadata(store.get(parse_uri(uri).key(".metadata")), uri)
    for idx, info in meta.storage_data.items():
        if info.relative_path == name and info.offset <= offset < info.offset + info.length:
            return str(idx.fqn)
    return None


def run_corruption_trial(
    target: Target,
    trial: int,
    *,
    seed: int = 0,
    choose: Callable[[list[str], random.Random], str] | None = None,
) -> CorruptionResult:
    """Save cleanly, flip one byte of one stored object, then load and verify."""
    import cloudckpt
    from cloudckpt.uri import parse_uri

    trial_seed = seed * 100_003 + trial
    rng = random.Random(f"corrupt:{target.name}:{trial_seed}")
    bucket = target.new_bucket()
    uri = f"{target.scheme}://{bucket}/ck"
    opts = target.options(target.upstream)
    # Two data objects (small target size), so corruption lands in different shapes of object.
    sd = trial_state_dict(trial_seed % 1000 + 1, big_numel=300_000)
    from cloudckpt.transfer import TransferOptions

    cloudckpt.save(sd, uri, no_dist=True, transfer_options=TransferOptions(target_object_size=MiB), **opts)
    store = target.direct_store(bucket)
    base = parse_uri(uri).key("")
    names = sorted(o.key[len(base):] for o in store.list(base))
    name = choose(names, rng) if choose is not None else rng.choice(names)
    offset = _flip(store, base + name, rng)
    # .metadata is intact when a data object was hit: it says which item the byte belongs to.
    item = _item_at(store, uri, name, offset) if name.endswith(".distcp") else None
    url = store.url(base + name)
    error = None
    out = _empty_like(sd)
    try:
        cloudckpt.load(out, uri, no_dist=True, **opts)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = _describe(exc)
        named = url in error and (item is None or repr(item) in error or f"'{item}'" in error)
        load = "detected" if named else f"MISATTRIBUTED: {error[:200]}"
    else:
        load = "unaffected" if _identical(sd, out) else "MISSED: wrong data loaded silently"
    report = cloudckpt.verify(uri, **opts)
    if report.ok:
        verify_verdict = "MISSED"
    elif any(url in p and (item is None or repr(item) in p) for p in report.problems):
        verify_verdict = "detected"
    else:
        verify_verdict = f"MISATTRIBUTED: {report.problems[:1]}"
    return CorruptionResult(target.name, trial, name, offset, load, verify_verdict, error)
