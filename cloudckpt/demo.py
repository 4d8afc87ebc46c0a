"""``cloudckpt demo``: train, checkpoint asynchronously, crash, resume, verify.

What it does, end to end, on this machine:

1. with no endpoint configured (no ``--uri``, ``--endpoint-url`` or
   ``AWS_ENDPOINT_URL``), starts moto's S3 server (``pip install
   'cloudckpt[demo]'``) on 127.0.0.1 in a child process, with dummy
   credentials, and creates a bucket;
2. launches ``--nproc`` ranks torchrun-style (``RANK``/``WORLD_SIZE``/
   ``MASTER_ADDR``/``MASTER_PORT``, gloo, the rendezvous store hosted by this
   process as torchrun's agent does) that train a 2-layer MLP with DDP and
   Adam, sized so model + optimizer state is ``--size-mib``, taking an async
   checkpoint every ``--every`` steps through
   :class:`cloudckpt.manager.CheckpointManager` (``keep_last=2``);
3. after ``--steps`` steps every rank exits hard (``os._exit``), possibly with
   an upload still in flight: the simulated crash;
4. relaunches the ranks, which resume with ``step = mgr.load(state)`` and
   compare the restored model + optimizer state, bit for bit (CRC32C per
   tensor), with what each rank recorded when it took that checkpoint;
5. prints a summary: checkpoints taken, blocking time per save (the copy
   into staging buffers, plus any wait for the previous upload; the first
   save also sets up the worker and its buffers), upload throughput (measured
   while training runs on the same CPUs), the step resumed from, and
   ``state verified: OK``.

A failed phase raises :class:`DemoError` naming the rank that failed first,
its error and the end of its log; the hint to check that the storage is
reachable is given only when that error is a connection error.

``python -m cloudckpt.demo`` runs it too (same options as ``cloudckpt demo``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudckpt._moto_server import INSTALL_HINT

__all__ = ["run", "choose_storage", "format_summary", "main"]

MiB = 1024 * 1024
#: Exit status of a rank that "crashed" on purpose after its last step.
CRASH_EXIT = 17
_DEMO_BUCKET = "cloudckpt-demo"
_DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "cloudckpt-demo",
    "AWS_SECRET_ACCESS_KEY": "cloudckpt-demo-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_DIM = 512
#: Seconds the other ranks get to exit after one rank of a phase failed.
_FAILURE_GRACE_S = 20.0
#: Upper bound on one phase (start-up, training, uploads) before its ranks are killed.
_PHASE_TIMEOUT_S = 600.0


# -- the parent: servers, launches, summary -------------------------------------------------


@contextlib.contextmanager
def _env(updates: dict[str, str | None]) -> Iterator[None]:
    """Apply environment changes (None removes) for the duration of the block."""
    old = {k: os.environ.get(k) for k in updates}
    try:
        for k, v in updates.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ensure_bucket(uri: str, store_options: dict[str, Any]) -> None:
    """Create the demo bucket on a custom S3 endpoint if it does not exist yet."""
    from cloudckpt.errors import BucketNotFoundError
    from cloudckpt.store import open_store

    store = open_store(uri, **store_options)
    try:
        store.check_bucket()
    except BucketNotFoundError:
        from cloudckpt.uri import parse_uri

        store.client.create_bucket(Bucket=parse_uri(uri).bucket)  # type: ignore[attr-defined]


@dataclass
class _PhaseResult:
    """How the ranks of one phase ended."""

    codes: list[int]  # exit status per rank (negative: killed by that signal)
    exited_at: list[float]  # seconds after launch at which each rank was seen to exit
    stopped: set[int] = field(default_factory=set)  # ranks this process killed (grace over or timeout)
    timed_out: bool = False


def _launch(phase: str, nproc: int, args: list[str], workdir: str, expected: int, timeout: float) -> _PhaseResult:
    """Run ``nproc`` worker ranks for ``phase`` and wait for them.

    This process hosts the rendezvous TCPStore (bound to port 0, so no port
    race) and the ranks connect to it as torchrun's workers connect to the
    agent's store (``TORCHELASTIC_USE_AGENT_STORE``). As torchrun does, once
    one rank fails the others get a short grace period and are then killed,
    rather than left waiting in a collective for their dead peer.
    """
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size=nproc, is_master=True, wait_for_workers=False)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update({
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p),
        })
        log = open(_log_path(workdir, phase, rank), "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "cloudckpt.demo", "--worker", phase, *args],
                                       env=env, stdout=log, stderr=subprocess.STDOUT), log))
    t0 = time.monotonic()
    deadline = t0 + timeout
    exited_at = [float("inf")] * nproc
    result = _PhaseResult(codes=[], exited_at=exited_at)
    try:
        while True:
            codes = [p.poll() for p, _ in procs]
            for rank, code in enumerate(codes):
                if code is not None and exited_at[rank] == float("inf"):
                    exited_at[rank] = time.monotonic() - t0
            if all(c is not None for c in codes):
                break
            if any(c is not None and c != expected for c in codes):
                deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
            if time.monotonic() > deadline:
                result.timed_out = not any(c is not None and c != expected for c in codes)
                break
            time.sleep(0.1)
    finally:
        for rank, (p, log) in enumerate(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
                result.stopped.add(rank)
            log.close()
        del store
    result.codes = [int(p.returncode) for p, _ in procs]
    return result


def _log_path(workdir: str, phase: str, rank: int) -> str:
    return os.path.join(workdir, f"{phase}-rank{rank}.log")


def _error_path(workdir: str, phase: str, rank: int) -> str:
    return os.path.join(workdir, f"{phase}-rank{rank}.error.json")


class DemoError(RuntimeError):
    """A phase of the demo failed; the message names the rank, its error and the end of its log."""


def _check_phase(what: str, phase: str, result: _PhaseResult, expected: int, workdir: str, root: Any,
                 server: Any = None) -> None:
    """Raise DemoError naming the real cause unless every rank exited ``expected``."""
    bad = [r for r, c in enumerate(result.codes) if c != expected]
    if not bad:
        return
    # The rank that failed first by itself, not one stopped after it (nor one that failed
    # only because its peer died, which happens later).
    own = [r for r in bad if r not in result.stopped]
    rank = min(own, key=lambda r: result.exited_at[r]) if own else bad[0]
    code = result.codes[rank]
    if rank in result.stopped:
        how = (f"did not finish within {_PHASE_TIMEOUT_S:.0f} s and was stopped" if result.timed_out
               else "was stopped after another rank failed")
    elif code < 0:
        how = f"was killed by signal {_signal_name(-code)}" + (" (out of memory?)" if -code == 9 else "")
    else:
        how = f"exited with status {code}"
    log_path = _log_path(workdir, phase, rank)
    tail = _tail(log_path)
    error = _read_error(_error_path(workdir, phase, rank)) or _error_from_log(tail)
    lines = [f"demo {what}: rank {rank} {how} while checkpointing to {root}"
             + (f": {error['error']}" if error else "")]
    lines.append(f"its log ends with:\n{tail}" if tail.strip() else "its log is empty")
    hint = _hint(error, root, server)
    if hint:
        lines.append(hint)
    raise DemoError("\n".join(lines))


def _hint(error: dict[str, Any] | None, root: Any, server: Any) -> str:
    """What to check, only when the cause is the storage being unreachable (or the embedded server gone)."""
    dead = server is not None and not server.running
    if dead:
        return (f"The embedded S3 server at {server.endpoint_url} exited during the demo "
                f"(status {server.exit_status}); run `cloudckpt demo` again.")
    if not (error and error.get("connection")):
        return ""
    if server is not None:
        return f"The embedded S3 server at {server.endpoint_url} stopped answering; run `cloudckpt demo` again."
    return (f"Check that {root} is reachable from this machine (`cloudckpt ls {root}`), or run `cloudckpt demo` "
            "without --uri/--endpoint-url/AWS_ENDPOINT_URL to use the embedded server.")


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _read_error(path: str) -> dict[str, Any] | None:
    """The error a rank recorded before it exited (see :func:`_record_error`), if any."""
    try:
        with open(path) as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return None


# Names of the exception types that mean "the storage endpoint could not be reached":
# cloudckpt's own, and those of botocore, urllib3 and the socket layer below it.
_CONNECTION_ERRORS = frozenset({
    "EndpointUnreachableError", "EndpointConnectionError", "ConnectTimeoutError", "NewConnectionError",
    "ConnectionClosedError", "ProxyConnectionError", "ConnectionRefusedError", "gaierror",
})
_CONNECTION_RE = re.compile(r"\b(" + "|".join(sorted(_CONNECTION_ERRORS)) + r")\b")
_ERROR_LINE_RE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$", re.MULTILINE)


def _error_from_log(log: str) -> dict[str, Any] | None:
    """Best effort for a rank that recorded nothing: the last ``SomeError: message`` line of its log."""
    found = _ERROR_LINE_RE.findall(log)
    if not found:
        return None
    name, message = found[-1]
    return {"error": f"{name}: {message}", "connection": bool(_CONNECTION_RE.search(log))}


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the per-rank failures a DCP CheckpointException carries."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 50:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo.extend(f[0] for f in failures.values() if isinstance(f, tuple) and f
                        and isinstance(f[0], BaseException))
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return seen


def _describe_error(exc: BaseException) -> dict[str, Any]:
    """``{"error": "Type: message", "connection": bool}`` for a rank's exception.

    The named error is the first cloudckpt error in the chain (the typed cause),
    else the first that is not DCP's generic CheckpointException wrapper;
    ``connection`` says whether any error in the chain means the endpoint was unreachable.
    """
    from cloudckpt.errors import CloudCheckpointError

    chain = _exception_chain(exc)
    named = next((e for e in chain if isinstance(e, CloudCheckpointError)), None) or next(
        (e for e in chain if type(e).__name__ != "CheckpointException"), exc)
    connection = any(c.__name__ in _CONNECTION_ERRORS for e in chain for c in type(e).__mro__)
    return {"error": f"{type(named).__name__}: {named}", "connection": connection}


def choose_storage(uri: str | None, endpoint_url: str | None, environ: Mapping[str, str]) -> tuple[str, str]:
    """Where the demo checkpoints: ``(mode, description)``.

    ``mode`` is ``"uri"`` when a URI was given (used as is), ``"endpoint"`` when
    an S3 endpoint is configured (``--endpoint-url``, ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``: bucket ``cloudckpt-demo`` there, created if missing),
    else ``"embedded"`` (moto's S3 server on 127.0.0.1).
    """
    if uri is not None:
        return "uri", "given URI"
    configured = endpoint_url or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if configured:
        return "endpoint", f"S3 endpoint {configured}"
    return "embedded", "embedded S3 server"


def _require_embedded_server_packages() -> None:
    """Fail at once, naming the pip extra, if moto's S3 server or the S3 client cannot be imported."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401  (moto's server and its Flask/Werkzeug dependencies)
    except ImportError as exc:
        raise ImportError(
            f"the demo's embedded S3 server needs moto's server and boto3 ({exc}): {INSTALL_HINT} "
            "(or pass --uri to a location you can already reach)"
        ) from exc


def run(
    *,
    steps: int = 12,
    every: int = 3,
    size_mib: float = 64.0,
    nproc: int = 2,
    uri: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    project: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, Any]:
    """Run the demo and return its summary (see the module docstring).

    ``uri`` (``s3://...``, ``gs://...`` or a local path) or ``endpoint_url`` /
    ``AWS_ENDPOINT_URL`` select real storage instead of the embedded server.
    Raises ImportError (naming the pip extra) if the embedded server is needed
    and not installed, DemoError if a phase fails; the summary's ``verified``
    says whether the restored state matched.
    """
    if steps < 1 or every < 1 or every > steps:
        raise ValueError(f"need 1 <= --every <= --steps, got every={every}, steps={steps}")
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if not size_mib > 0:
        raise ValueError(f"--size-mib must be positive, got {size_mib}")
    from cloudckpt.uri import parse_uri

    t_start = time.perf_counter()
    mode, where = choose_storage(uri, endpoint_url, os.environ)
    if mode == "embedded":
        _require_embedded_server_packages()
    with contextlib.ExitStack() as stack:
        server = None
        env_updates: dict[str, str | None] = {}
        if mode == "embedded":
            from cloudckpt._moto_server import MotoS3Server

            log("starting moto's S3 server on 127.0.0.1 ...")
            server = stack.enter_context(MotoS3Server(env=_DUMMY_CREDENTIALS))
            where = f"embedded S3 server (moto) at {server.endpoint_url}"
            env_updates = dict(_DUMMY_CREDENTIALS, AWS_ENDPOINT_URL=server.endpoint_url, AWS_ENDPOINT_URL_S3=None,
                               AWS_PROFILE=None, AWS_SESSION_TOKEN=None)
        root = parse_uri(uri if uri is not None else f"s3://{_DEMO_BUCKET}/run-{uuid.uuid4().hex[:8]}")
        store_options = _store_options(root, endpoint_url, region, project)
        stack.enter_context(_env(env_updates))
        _prepare_storage(root, mode, store_options)
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cloudckpt-demo-"))
        common = ["--root", str(root), "--workdir", workdir, "--steps", str(steps), "--every", str(every),
                  "--size-mib", str(size_mib), "--store-options", json.dumps(store_options)]
        log(f"training {nproc} ranks for {steps} steps, async checkpoint every {every} steps, "
            f"to {root} ({where}) ...")
        result = _launch("train", nproc, common, workdir, CRASH_EXIT, _PHASE_TIMEOUT_S)
        _check_phase("training", "train", result, CRASH_EXIT, workdir, root, server)
        log(f"all ranks crashed on purpose after step {steps}; relaunching and resuming ...")
        result = _launch("resume", nproc, common, workdir, 0, _PHASE_TIMEOUT_S)
        _check_phase("resuming", "resume", result, 0, workdir, root, server)
        train = [_read_json(os.path.join(workdir, f"train-{r}.json")) for r in range(nproc)]
        resume = [_read_json(os.path.join(workdir, f"resume-{r}.json")) for r in range(nproc)]
    summary = _summarize(train, resume, steps=steps, every=every, nproc=nproc)
    summary.update(uri=str(root), storage=where, seconds=round(time.perf_counter() - t_start, 1))
    return summary


def _store_options(root: Any, endpoint_url: str | None, region: str | None, project: str | None) -> dict[str, Any]:
    """The store options the ranks pass on: those of the command line that apply to ``root``'s scheme."""
    options: dict[str, Any] = {}
    if root.scheme in ("s3", "gs") and endpoint_url:
        options["endpoint_url"] = endpoint_url
    if root.scheme == "s3" and region:
        options["region"] = region
    if root.scheme == "gs" and project:
        options["project"] = project
    return options


def _prepare_storage(root: Any, mode: str, store_options: dict[str, Any]) -> None:
    """Create the demo bucket on an S3 endpoint, or check the given bucket, before any rank starts.

    Failing here, with the store's own typed error, beats failing in every rank.
    """
    if root.scheme == "s3" and mode in ("embedded", "endpoint"):
        _ensure_bucket(str(root), store_options)
    elif not root.is_local:
        from cloudckpt.store import open_store

        open_store(root, **store_options).check_bucket()


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _summarize(train: list[dict[str, Any]], resume: list[dict[str, Any]], *, steps: int, every: int,
               nproc: int) -> dict[str, Any]:
    """The summary's numbers, from what rank 0 recorded while training and every rank on resume."""
    stats = train[0]
    uploads = [u for u in stats["uploads"] if u is not None]
    resumed = {r["step"] for r in resume}
    return {
        "ranks": nproc,
        "steps": steps,
        "every": every,
        "state_bytes": stats["state_bytes"],
        "checkpoints_taken": len(stats["saves"]),
        "checkpoint_steps": [s["step"] for s in stats["saves"]],
        "committed_before_crash": stats["committed_at_crash"],
        "in_flight_at_crash": stats["in_flight_at_crash"],
        # An upload that failed before the crash, on any rank: the real cause if nothing can be resumed.
        "upload_errors": [e for t in train for e in t["upload_errors"]][:10],
        # The first save also starts the upload worker, its gloo group and the staging
        # buffers (one-time costs), so it is reported apart from the steady state.
        "first_blocking_ms": round(1000 * stats["saves"][0]["blocked_s"], 2),
        "median_blocking_ms": round(1000 * statistics.median(
            s["blocked_s"] for s in (stats["saves"][1:] or stats["saves"])), 2),
        "upload_gbps": round(sum(u["bytes"] for u in uploads) / sum(u["seconds"] for u in uploads) / 1e9, 5)
        if uploads else None,
        "upload_seconds": [round(u["seconds"], 3) for u in uploads],
        "resumed_from": next(iter(resumed)) if len(resumed) == 1 else sorted(resumed, key=str),
        "verified": all(r["verified"] for r in resume) and len(resumed) == 1 and None not in resumed,
        "mismatches": [m for r in resume for m in r["mismatches"]][:10],
    }


def _rate(gbps: float | None) -> str:
    if not gbps:
        return "n/a (no upload finished before the crash)"
    return f"{gbps:.2f} GB/s" if gbps >= 0.1 else f"{gbps * 1000:.1f} MB/s"


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable summary printed by ``cloudckpt demo``."""
    in_flight = s["in_flight_at_crash"]
    lines = [
        f"cloudckpt demo: {s['ranks']} ranks, {s['state_bytes'] / MiB:.1f} MiB of model + optimizer state, "
        f"{s['uri']} ({s['storage']})",
        f"  checkpoints taken         {s['checkpoints_taken']} (async, every {s['every']} steps, keep_last=2)",
        f"  blocking per save         {s['median_blocking_ms']:.1f} ms median, {s['first_blocking_ms']:.1f} ms for the "
        "first (the training loop waits only this long)",
        "  upload throughput         " + _rate(s["upload_gbps"]) + " (upload overlapped with training, same CPUs)",
        f"  crashed after step        {s['steps']}" + (f" (upload of step {in_flight} still in flight)"
                                                      if in_flight is not None else ""),
        f"  resumed from step         {s['resumed_from']} (latest committed checkpoint)",
    ]
    lines.extend(f"  upload failed             step {e['step']}: {e['error']}" for e in s.get("upload_errors", []))
    lines.append(f"  state verified: {'OK' if s['verified'] else 'FAILED'}")
    if not s["verified"]:
        lines.extend(f"    mismatch: {m}" for m in s["mismatches"])
    lines.append(f"  ({s['seconds']:.1f} s in all)")
    return "\n".join(lines)


# -- the ranks ----------------------------------------------------------------------------------


def _model_dims(size_mib: float) -> tuple[int, int]:
    # Adam keeps two moments per parameter: state = 3 x params x 4 bytes.
    params = max(int(size_mib * MiB / 12), 4 * _DIM)
    hidden = max(1, (params - _DIM) // (2 * _DIM + 1))
    return _DIM, hidden


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _flatten(obj[k], f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj


def _tensor_bytes(t: Any) -> memoryview:
    """A read-only byte view of a contiguous CPU tensor's memory (no copy, no numpy); keep ``t`` alive while used."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B").toreadonly()


def _digest(state: dict[str, Any]) -> dict[str, str]:
    """CRC32C of every tensor's bytes (and repr of every other value), by flattened key."""
    import torch

    from cloudckpt import crc

    out = {}
    for key, value in _flatten(state):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            out[key] = f"{t.dtype}:{list(t.shape)}:{crc.crc32c(_tensor_bytes(t)):08x}"
        else:
            out[key] = repr(value)
    return out


def _worker(phase: str, a: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cloudckpt.manager import CheckpointManager

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
    rank = dist.get_rank()
    dim, hidden = _model_dims(a.size_mib)
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, dim)))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(a.root, keep_last=2, part_size=8 * MiB, **json.loads(a.store_options))
    digests_path = os.path.join(a.workdir, f"digests-{rank}.json")

    def state() -> dict[str, Any]:
        msd, osd = get_state_dict(model, optim)
        return {"model": msd, "optim": osd}

    if phase == "resume":
        sd = state()
        step = mgr.load(sd)  # the one-line resume
        committed = mgr.steps()
        result: dict[str, Any] = {"step": step, "committed": committed, "verified": False, "mismatches": []}
        if step is not None and step != max(committed):
            result["mismatches"].append(f"rank {rank}: resumed from {step}, but the latest committed step is "
                                        f"{max(committed)}")
        elif step is not None:
            set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            with open(digests_path) as f:
                expected = json.load(f)[str(step)]
            got = _digest(state())
            bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
            result.update(verified=not bad, mismatches=[f"rank {rank}: {k}" for k in bad])
        else:
            result["mismatches"].append(f"rank {rank}: no committed checkpoint found")
        with open(os.path.join(a.workdir, f"resume-{rank}.json"), "w") as f:
            json.dump(result, f)
        mgr.close()
        dist.destroy_process_group()
        return 0

    g = torch.Generator().manual_seed(1000 + rank)
    target = torch.nn.Linear(dim, dim)
    digests: dict[str, Any] = {}
    saves: list[dict[str, Any]] = []
    handles = []
    state_bytes = sum(t.numel() * t.element_size() for _, t in _flatten(state()) if isinstance(t, torch.Tensor))
    for step in range(1, a.steps + 1):
        x = torch.randn(64, dim, generator=g)
        with torch.no_grad():
            y = target(x)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % a.every == 0:
            sd = state()
            digests[str(step)] = _digest(sd)
            with open(digests_path, "w") as f:  # written before the save: the crash may come any time
                json.dump(digests, f)
            h = mgr.async_save(sd, step)
            handles.append(h)
            saves.append({"step": step, "blocked_s": h.blocked_s})
    # Simulated crash: whatever is still uploading is lost mid-flight.
    in_flight = next((h.step for h in handles if not h.done()), None)
    committed = [h.step for h in handles if h.done() and h.upload_completion.exception() is None]
    uploads = [{"step": h.step, "bytes": state_bytes, "seconds": h.upload_s}
               if h.done() and h.upload_s else None for h in handles]
    upload_errors = [dict(_describe_error(exc), step=h.step, rank=rank) for h in handles
                     if h.done() and (exc := h.upload_completion.exception()) is not None]
    with open(os.path.join(a.workdir, f"train-{rank}.json"), "w") as f:
        json.dump({"saves": saves, "uploads": uploads, "state_bytes": state_bytes, "upload_errors": upload_errors,
                   "committed_at_crash": committed, "in_flight_at_crash": in_flight}, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(CRASH_EXIT)


def _record_error(a: argparse.Namespace, exc: BaseException) -> None:
    """Leave this rank's error where the launcher reads it (see :func:`_check_phase`)."""
    path = _error_path(a.workdir, a.worker, int(os.environ.get("RANK", "0")))
    with contextlib.suppress(Exception):  # never hide the error being reported
        with open(path, "w") as f:
            json.dump(_describe_error(exc), f)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cloudckpt.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--size-mib", type=float, default=64.0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--uri", default=None)
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--json", action="store_true")
    # Internal: run as one rank of a phase (set by the launcher).
    p.add_argument("--worker", choices=("train", "resume"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--store-options", default="{}", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m cloudckpt.demo``: the demo, or one of its ranks with ``--worker``."""
    a = _parser().parse_args(argv)
    if a.worker:
        try:
            return _worker(a.worker, a)
        except BaseException as exc:
            _record_error(a, exc)
            raise  # the traceback goes to the rank's log
    summary = run(steps=a.steps, every=a.every, size_mib=a.size_mib, nproc=a.nproc, uri=a.uri,
                  endpoint_url=a.endpoint_url)
    print(json.dumps(summary, indent=2) if a.json else format_summary(summary))
    return 0 if summary["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
