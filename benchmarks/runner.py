"""What the benchmark modes share: the machine report, the round-trip runner and the summary of repeats.

``benchmarks.run`` (the comparison and memcheck modes), ``benchmarks.sweep`` and
``benchmarks.pyspy`` all build on this module; it imports none of them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

from benchmarks.measure import run_child
from benchmarks.servers import Server

MiB = 1 << 20
PACKAGES = ["torch", "boto3", "botocore", "s3torchconnector", "s3fs", "gcsfs", "fsspec", "google-cloud-storage",
            "cloudckpt", "moto", "psutil"]


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Machine and package versions, for the report."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


# --------------------------------------------------------------------------- running


class Runner:
    """Starts the servers a plan needs and runs save+load round trips in child processes."""

    def __init__(self, server_kinds: Iterable[str], total_bytes: int, tensor_bytes: int,
                 timeout: float = 1800.0, log: bool = True, shape: str = "large") -> None:
        self.total_bytes = total_bytes
        #: The state dict's shape ("large" or "llm", see benchmarks.methods.build_shape); roundtrip() may override.
        self.shape = shape
        self.tensor_bytes = tensor_bytes
        self.timeout = timeout
        self.log = log
        self.servers: dict[str, Server] = {}
        self._kinds = list(dict.fromkeys(server_kinds))
        self.workdir = ""

    def __enter__(self) -> Runner:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.workdir = tempfile.mkdtemp(prefix="cloudckpt-bench-", dir=shm)
        try:
            for kind in self._kinds:
                # Warm the fast server's memory for one checkpoint (+ slack) so no run pays for page faults.
                prefault = self.total_bytes + 64 * MiB if kind == "fast" else 0
                self.servers[kind] = Server(kind, prefault_bytes=prefault).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for s in self.servers.values():
            s.stop()
        self.servers.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def spec(self, method: str, server_kind: str | None, name: str, label: str,
             options: dict[str, Any] | None = None, total_bytes: int | None = None,
             shape: str | None = None) -> dict[str, Any]:
        """The child's job description, without the op."""
        server = self.servers[server_kind] if server_kind else None
        return {
            "method": method, "label": label, "name": name, "options": options or {},
            "total_bytes": total_bytes or self.total_bytes, "tensor_bytes": self.tensor_bytes,
            "shape": shape or self.shape, "server": server.info if server else None, "workdir": self.workdir,
        }

    def roundtrip(self, method: str, server_kind: str | None, name: str, label: str,
                  options: dict[str, Any] | None = None, total_bytes: int | None = None,
                  ops: tuple[str, ...] = ("save", "load"),
                  hooks: dict[str, dict[str, Any]] | None = None,
                  shape: str | None = None) -> dict[str, dict[str, Any]]:
        """Save then load ``method`` (each in a fresh child), then drop the stored data.

        ``hooks`` maps an op to ``on_ready``/``on_done`` callbacks for :func:`run_child`
        (the profiler attaches there).
        """
        server = self.servers[server_kind] if server_kind else None
        spec = self.spec(method, server_kind, name, label, options, total_bytes, shape)
        out: dict[str, dict[str, Any]] = {}
        try:
            for op in ops:
                res = run_child(dict(spec, op=op), timeout=self.timeout, **(hooks or {}).get(op, {}))
                res["label"], res["options"] = label, options or {}
                out[op] = res
                if self.log:
                    print(f"  {label:<34} {op:<4} " + brief(res), file=sys.stderr, flush=True)
                if not res.get("ok"):
                    break
        finally:
            if server:
                server.reset()
            for entry in os.listdir(self.workdir):
                shutil.rmtree(os.path.join(self.workdir, entry), ignore_errors=True)
        return out


def brief(res: dict[str, Any]) -> str:
    if not res.get("ok"):
        return f"FAILED: {res.get('error', '?')[:300]}"
    gbps = res["bytes"] / res["wall_s"] / 1e9
    return (f"{res['wall_s']:7.3f} s {gbps:6.3f} GB/s cpu {res['client_cpu_s']:6.2f} s "
            f"rss +{res['peak_extra_rss'] / MiB:6.0f} MiB")


# --------------------------------------------------------------------------- summarising


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median figures of the repeats of one (label, op); FAILED if any repeat failed."""
    bad = [r for r in results if not r.get("ok")]
    if bad or not results:
        return {"failed": True, "error": bad[0].get("error", "no result") if bad else "no result"}
    nbytes = results[0]["bytes"]
    gb = nbytes / 1e9
    wall = statistics.median(r["wall_s"] for r in results)
    server_cpu = [r["server_cpu_s"] for r in results if r.get("server_cpu_s") is not None]
    counted = [r["requests"] for r in results if r.get("requests") is not None]
    return {
        "failed": False,
        "repeats": len(results),
        "bytes": nbytes,
        "wall_s": wall,
        "wall_all": [r["wall_s"] for r in results],
        "gbps": gb / wall,
        "client_cpu_per_gb": statistics.median(r["client_cpu_s"] for r in results) / gb,
        "server_cpu_per_gb": statistics.median(server_cpu) / gb if server_cpu else None,
        "peak_extra_rss_mib": statistics.median(r["peak_extra_rss"] for r in results) / MiB,
        "peak_extra_rss_all_mib": [round(r["peak_extra_rss"] / MiB, 1) for r in results],
        "requests": statistics.median(sum(c.values()) for c in counted) if counted else None,
        "request_mix": counted[0] if counted else None,
    }
