"""Measuring one operation in a fresh child process.

The parent calls :func:`run_child` with a JSON-able spec; the child
(``python -m benchmarks.measure SPEC.json``) builds the state dict, sets the
method up, and measures exactly one operation (save or load):

* wall clock (``time.perf_counter``);
* client CPU: ``getrusage(RUSAGE_SELF)`` user + system of the child, which
  counts every thread of the child (the CRT's native threads included);
* peak extra RSS: a thread samples RSS with psutil every 5 ms; the figure is
  the peak minus the RSS just before the operation (after the state dict, and
  for loads the destination tensors, were built and touched);
* server CPU and requests: deltas of the server's counters around the
  operation (see :mod:`benchmarks.servers`).

Before measuring, the child runs the same operation once on a tiny state dict
(the save child writes it, the load child reads it), so one-time imports and
lazy initialisation are not billed to the measured checkpoint.

A load child also checks every loaded value against the saved one and reports
``ok: false`` if anything differs. The result is written as JSON to the path
in ``spec["result_path"]``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

import psutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all threads included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class RssSampler:
    """Context manager that samples this process's RSS and keeps the peak.

    ``baseline`` is the RSS at entry; ``peak_extra`` is ``max(RSS) - baseline``
    over the block (never negative).
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_extra(self) -> int:
        """Bytes of RSS above the baseline at the peak."""
        return max(0, self.peak - self.baseline)


def measure(fn: Callable[[], None], server: dict[str, Any] | None) -> dict[str, Any]:
    """Run ``fn`` once and return wall, client CPU, peak extra RSS and server deltas."""
    from benchmarks.servers import snapshot

    gc.collect()
    before = snapshot(server)
    with RssSampler() as rss:
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        t1, c1 = time.perf_counter(), cpu_seconds()
    after = snapshot(server)
    requests = {k: after.requests.get(k, 0) - before.requests.get(k, 0) for k in after.requests}
    return {
        "wall_s": t1 - t0,
        "client_cpu_s": c1 - c0,
        "peak_extra_rss": rss.peak_extra,
        "rss_baseline": rss.baseline,
        "server_cpu_s": (after.cpu_s - before.cpu_s) if server else None,
        "requests": {k: v for k, v in sorted(requests.items()) if v} if after.counted else None,
    }


# --------------------------------------------------------------------------- parent side


def run_child(spec: dict[str, Any], timeout: float = 900.0,
              on_ready: Callable[[int], Any] | None = None,
              on_done: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh ``python -m benchmarks.measure`` and return its JSON result.

    With ``on_ready`` (used for profiling) the child pauses after its set-up:
    ``on_ready(pid)`` runs, then the operation starts; ``on_done(token)`` runs
    with what ``on_ready`` returned once the operation has finished, before the
    child verifies and exits.
    """
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-") as tmp:
        spec = dict(spec, result_path=os.path.join(tmp, "result.json"), pause=on_ready is not None)
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
        env.setdefault("PYTHONWARNINGS", "ignore")
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.measure", spec_path], cwd=REPO_ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if on_ready is not None:
                _expect(proc, "READY")
                token = on_ready(proc.pid)
                proc.stdin.write("go\n")
                proc.stdin.flush()
                _expect(proc, "DONE")
                if on_done is not None:
                    on_done(token)
                proc.stdin.write("go\n")
                proc.stdin.flush()
            proc.stdin.close()
            out = proc.stdout.read()
            rc = proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        try:
            with open(spec["result_path"]) as f:
                return json.load(f)
        except FileNotFoundError:
            tail = out[-2000:] if out else ""
            return {"ok": False, "error": f"child exited with status {rc} and no result; stdout tail: {tail}"}


def _expect(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == word:
            return
    raise RuntimeError(f"child exited before printing {word} (status {proc.wait()})")


# --------------------------------------------------------------------------- child side


def _describe(exc: BaseException) -> str:
    """One line for an error; DCP's CheckpointException is unwrapped to the rank's own exception."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        exc = inner[0] if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException) else exc
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]


def child_main(spec_path: str) -> None:
    """Entry point of the child: build, set up, measure one operation, verify, write JSON."""
    from benchmarks import methods

    with open(spec_path) as f:
        spec = json.load(f)
    result: dict[str, Any] = {"method": spec["method"], "op": spec["op"], "label": spec.get("label"), "ok": False}
    try:
        expected = methods.build_shape(spec.get("shape", "large"), spec["total_bytes"], spec["tensor_bytes"])
        result["bytes"] = methods.tensor_bytes(expected)
        method = methods.create(spec["method"], methods.Context.from_spec(spec))
        method.setup()
        if spec.get("warmup", True):
            # One tiny round of the same operation first, so one-time imports and lazy
            # initialisation are not billed to the measured checkpoint.
            tiny = methods.tiny_state_dict()
            if spec["op"] == "save":
                method.save(tiny, spec["name"] + "-warmup")
            else:
                method.load(methods.blank_like(tiny), spec["name"] + "-warmup")
        if spec["op"] == "save":
            target, op = expected, lambda: method.save(expected, spec["name"])
        else:
            target = methods.blank_like(expected)
            op = lambda: method.load(target, spec["name"])  # noqa: E731
        if spec.get("pause"):
            print("READY", flush=True)
            sys.stdin.readline()
        result.update(measure(op, spec.get("server")))
        if spec.get("pause"):
            print("DONE", flush=True)
            sys.stdin.readline()
        if spec["op"] == "load":
            problem = methods.compare(target, expected)
            if problem:
                raise AssertionError(f"loaded state dict differs from the saved one: {problem}")
            result["verified"] = True
        result["ok"] = True
    except BaseException as exc:  # report, never hang the parent
        result["error"] = _describe(exc)
        result["traceback"] = traceback.format_exc()[-4000:]
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    child_main(sys.argv[1])
