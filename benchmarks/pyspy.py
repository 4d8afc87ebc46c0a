"""``python -m benchmarks.run --profile DIR``: py-spy profiles of one cloudckpt save and one load.

Each operation runs in its own child exactly as in the comparison; py-spy
attaches after the child's set-up and warm-up and stops when the operation
ends, so the profile covers the measured operation only. For each op, DIR gets:

* ``{op}.txt``: py-spy's raw collapsed stacks, one line per stack and thread
  (any flame graph tool, e.g. speedscope, reads it);
* ``{op}-top.md``: the frames with the most samples, by self and inclusive count.

py-spy samples wall time of threads it does not judge idle. On a machine with
fewer cores than busy threads a runnable thread that waits for a core is
sampled too, so the shares show where CPU is wanted; the figure that measures
CPU is the comparison's client CPU s/GB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from benchmarks.runner import MiB, Runner, brief

RATE_HZ = 250


def py_spy_binary() -> str:
    """The py-spy executable next to this interpreter, or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = here if os.path.exists(here) else shutil.which("py-spy")
    if not found:
        sys.exit("py-spy is not installed: pip install py-spy (it is in the bench extra's README setup)")
    return found


def top_frames(raw_path: str, limit: int = 30) -> str:
    """Markdown tables of the frames with the most self and inclusive samples."""
    self_count: Counter[str] = Counter()
    incl_count: Counter[str] = Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            frames = stack.split(";")[1:]  # the first frame is the thread's name
            if not frames:
                continue
            count = int(n)
            total += count
            self_count[frames[-1]] += count
            for frame in set(frames):
                incl_count[frame] += count
    out = [f"{total} samples at {RATE_HZ} Hz\n"]
    for title, counter in (("self", self_count), ("inclusive", incl_count)):
        out += [f"### {title}\n", "| samples | share | frame |", "|---|---|---|"]
        for frame, count in counter.most_common(limit):
            out.append(f"| {count} | {count / max(total, 1):.1%} | `{frame[:150]}` |")
        out.append("")
    return "\n".join(out)


def profile_main(args: argparse.Namespace) -> dict[str, Any]:
    """Profile one cloudckpt save and one load of ``--total-mib`` into ``args.profile``."""
    spy = py_spy_binary()
    outdir = os.path.abspath(args.profile)
    os.makedirs(outdir, exist_ok=True)

    def hooks(op: str) -> dict[str, Any]:
        raw = os.path.join(outdir, f"{op}.txt")

        def on_ready(pid: int) -> subprocess.Popen[bytes]:
            proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--threads",
                                     "--nonblocking", "--format", "raw", "--output", raw],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy needs a moment to attach before the operation starts
            return proc

        def on_done(proc: subprocess.Popen[bytes]) -> None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output and exits
            _, err = proc.communicate(timeout=60)
            if not os.path.exists(raw):
                raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")

        return {"on_ready": on_ready, "on_done": on_done}

    with Runner(["fast"], args.total_mib * MiB, args.tensor_mib * MiB) as runner:
        res = runner.roundtrip("cloudckpt", "fast", "profile", "cloudckpt",
                               hooks={op: hooks(op) for op in ("save", "load")})
    files = []
    for op, r in res.items():
        print(f"{op}: {brief(r)}")
        raw = os.path.join(outdir, f"{op}.txt")
        if not os.path.exists(raw):
            continue
        top = os.path.join(outdir, f"{op}-top.md")
        with open(top, "w") as f:
            f.write(f"# cloudckpt {op}, {args.total_mib} MiB: py-spy samples\n\n" + top_frames(raw))
        files += [raw, top]
    print("wrote " + ", ".join(files))
    return {"mode": "profile", "results": res, "files": files}
