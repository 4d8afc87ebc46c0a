"""Async checkpointing benchmarks: blocking time and training overlap (docs/executors.md).

    python -m benchmarks.async_bench                      # 256 MiB, both benchmarks, every method
    python -m benchmarks.async_bench --total-mib 64 --bench blocking
    python -m benchmarks.async_bench --methods ours-process,torch-process --window 10
    python -m benchmarks.async_bench --profile DIR        # py-spy profile of each overlap child

Methods (every one saves through cloudckpt's S3 writer to the fast in-memory S3
server on 127.0.0.1, in its own fresh child process with a one-rank gloo group):

* ``bare-copy``      (blocking only) ``dst.copy_(src)`` of the same tensors into
  preallocated, already-touched buffers: the floor for any staging;
* ``ours-thread``    ``cloudckpt.async_save`` + a reused ``ThreadCheckpointExecutor`` and ``Stager``;
* ``ours-process``   ``cloudckpt.async_save`` + a reused ``ProcessCheckpointExecutor`` and shared-memory ``Stager``;
* ``torch-thread``   ``torch.distributed.checkpoint.async_save(..., async_checkpointer_type=THREAD)``;
* ``torch-process``  the same with ``AsyncCheckpointerType.PROCESS``.

**Blocking time**: how long the save call keeps the training loop from going
on (staging included). One cold save, then ``--repeat`` measured saves, each
waited for before the next; the figure is the median of the measured ones.

**Training overlap**: a CPU training loop (an MLP, one intra-op thread) runs for
``--window`` seconds without checkpointing, then for ``--window`` seconds with
a save always in flight (the next starts as soon as the previous upload ends),
then again without. "During upload" counts only the steps taken while an
upload ran, over the time they took (the blocking save calls are excluded and
reported separately); "overall" is all steps over the whole window.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

MiB = 1 << 20
METHODS = ["bare-copy", "ours-thread", "ours-process", "torch-thread", "torch-process"]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- child side


def _init_world() -> None:
    import torch.distributed as dist

    # A one-rank group on a TCPStore, as torchrun gives (torch's process executor needs a group).
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)


def _payload(total_bytes: int, tensors: int) -> dict[str, Any]:
    import torch

    n = max(1, total_bytes // tensors // 4)
    return {f"t{i}": torch.randn(n) for i in range(tensors)}


class _Saver:
    """One method's save call: ``start(state_dict, uri)`` returns (blocking seconds, future)."""

    def __init__(self, method: str, endpoint: str, nice: int = 10) -> None:
        self.method = method
        self.options = {"endpoint_url": endpoint, "overwrite": True}
        self.executor: Any = None
        self.stager: Any = None
        if method in ("ours-thread", "ours-process"):
            from cloudckpt import ProcessCheckpointExecutor, Stager, ThreadCheckpointExecutor

            self.executor = (ProcessCheckpointExecutor(nice=nice) if method == "ours-process"
                             else ThreadCheckpointExecutor())
            self.stager = Stager(shared_memory=self.executor.needs_shared_memory)

    def start(self, state_dict: dict[str, Any], uri: str) -> tuple[float, Any]:
        if self.executor is not None:
            import cloudckpt

            t0 = time.perf_counter()
            resp = cloudckpt.async_save(state_dict, checkpoint_id=uri, executor=self.executor, stager=self.stager,
                                        **self.options)
            return time.perf_counter() - t0, resp.upload_completion
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        import cloudckpt

        kind = AsyncCheckpointerType.PROCESS if self.method == "torch-process" else AsyncCheckpointerType.THREAD
        writer = cloudckpt.S3StorageWriter(uri, **self.options)
        t0 = time.perf_counter()
        fut = dcp.async_save(state_dict, checkpoint_id=uri, storage_writer=writer, async_checkpointer_type=kind)
        blocking = time.perf_counter() - t0
        fut = getattr(fut, "upload_completion", fut)
        return blocking, fut

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.stager.close()


def child_blocking(spec: dict[str, Any]) -> dict[str, Any]:
    """Blocking time of one method: a cold save, then ``repeat`` measured ones, each right after a bare copy
    of the same bytes in this same process (so both see the same machine load)."""
    import torch

    _pin_self(spec)
    _init_world()
    sd = _payload(spec["total_bytes"], spec["tensors"])
    nbytes = sum(t.nbytes for t in sd.values())
    dst = {k: torch.empty_like(v) for k, v in sd.items()}
    for d in dst.values():
        d.fill_(0.0)  # touch: preallocated means resident
    bare: list[float] = []
    blocking: list[float] = []
    upload: list[float] = []
    saver = _Saver(spec["method"], spec["endpoint"], spec["child_nice"]) if spec["method"] != "bare-copy" else None
    uri = f"s3://{spec['bucket']}/async/{spec['method']}"
    def bare_copy() -> float:
        t0 = time.perf_counter()
        for k, v in sd.items():
            dst[k].copy_(v)
        return time.perf_counter() - t0

    ratios: list[float] = []
    for i in range(spec["repeat"] + 1):
        for v in sd.values():
            v.add_(1.0)  # a training step between checkpoints
        before = bare_copy()
        if saver is None:
            t_block = bare_copy()
        else:
            t_block, fut = saver.start(sd, uri)
            t0 = time.perf_counter()
            fut.result(timeout=600)
            upload.append(t_block + time.perf_counter() - t0)
            if i == 0:
                _pin_children(spec)
        after = bare_copy()
        # The machine's memory bandwidth drifts (shared host): compare with the bare
        # copies just before and just after this very save.
        bare.append((before + after) / 2)
        blocking.append(t_block)
        ratios.append(t_block / bare[-1])
    if saver is not None:
        saver.close()
    return {"method": spec["method"], "bytes": nbytes, "cold_s": blocking[0],
            "blocking_s": statistics.median(blocking[1:]), "blocking_all_s": blocking,
            "bare_s": statistics.median(bare[1:]), "bare_all_s": bare,
            "ratio": statistics.median(ratios[1:]), "ratios": ratios,
            "upload_s": statistics.median(upload[1:]) if upload else None}


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _pin(pid: int, cpus: list[int]) -> None:
    """Pin every thread of process ``pid`` (threads it starts later inherit the mask)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # the thread ended meanwhile


def _pin_self(spec: dict[str, Any]) -> None:
    if spec.get("pin"):
        import torch

        _pin(os.getpid(), spec["pin"]["trainer"])
        # More intra-op threads than CPUs would spin against each other.
        torch.set_num_threads(min(torch.get_num_threads(), len(spec["pin"]["trainer"])))


def _pin_children(spec: dict[str, Any]) -> None:
    # Checkpoint processes (ours or torch's) started from the pinned trainer inherited its CPUs: move them.
    if spec.get("pin"):
        import psutil

        for child in psutil.Process().children(recursive=True):
            _pin(child.pid, spec["pin"]["others"])


def _model() -> tuple[Any, Any, Any]:
    import torch

    torch.manual_seed(0)
    layers: list[Any] = []
    for _ in range(4):
        layers += [torch.nn.Linear(512, 512), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(64, 512)
    return model, opt, x


def _step(model: Any, opt: Any, x: Any) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def _baseline(model: Any, opt: Any, x: Any, window: float) -> float:
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < window:
        _step(model, opt, x)
        steps += 1
    return steps / (time.perf_counter() - t0)


def child_overlap(spec: dict[str, Any]) -> dict[str, Any]:
    """Training step rate without checkpoints and with a save always in flight, alternating
    (``rounds`` checkpointing phases, each between two phases without)."""
    import torch

    torch.set_num_threads(1)
    _pin_self(spec)
    _init_world()
    model, opt, x = _model()
    extra = _payload(spec["total_bytes"], spec["tensors"])
    state = {"model": model.state_dict(), "extra": extra}
    nbytes = sum(t.nbytes for t in extra.values()) + sum(t.nbytes for t in model.state_dict().values())
    saver = _Saver(spec["method"], spec["endpoint"], spec["child_nice"])
    uri = f"s3://{spec['bucket']}/overlap/{spec['method']}"
    # Warm-up: one whole save (process start, buffers), and the loop itself.
    saver.start(state, uri)[1].result(timeout=600)
    _pin_children(spec)
    _baseline(model, opt, x, 1.0)
    bases = [_baseline(model, opt, x, spec["window"])]
    phases = []
    for _ in range(spec["rounds"]):
        cpu0 = os.times()
        steps_during = steps_total = saves = 0
        time_during = blocking_total = 0.0
        fut = None
        t_start = time.perf_counter()
        while time.perf_counter() - t_start < spec["window"]:
            if fut is None or fut.done():
                if fut is not None:
                    fut.result()
                    saves += 1
                t_block, fut = saver.start(state, uri)
                blocking_total += t_block
            t0 = time.perf_counter()
            _step(model, opt, x)
            dt = time.perf_counter() - t0
            steps_total += 1
            if not fut.done():
                steps_during += 1
                time_during += dt
        window = time.perf_counter() - t_start
        cpu1 = os.times()
        fut.result(timeout=600)
        saves += 1
        bases.append(_baseline(model, opt, x, spec["window"]))
        base = (bases[-2] + bases[-1]) / 2
        during = steps_during / time_during if time_during else 0.0
        # Trainer time a checkpoint costs: steps not taken (vs the rate without), in seconds, per save.
        lost_s = max(0.0, base * window - steps_total) / base / saves
        phases.append({"base_steps_s": base, "during_steps_s": during, "kept": during / base, "lost_s_per_save": lost_s,
                       "overall_steps_s": steps_total / window, "saves": saves, "blocking_total_s": blocking_total,
                       "window_s": window, "trainer_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)})
    saver.close()
    med = sorted(phases, key=lambda p: p["kept"])[len(phases) // 2]
    return dict(med, method=spec["method"], bytes=nbytes, bases=bases, phases=phases)


# --------------------------------------------------------------------------- parent side


def _run_child(bench: str, spec: dict[str, Any], timeout: float, profile: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.async_bench", "--child", bench, json.dumps(spec)]
    if profile:
        os.makedirs(profile, exist_ok=True)
        out = os.path.join(profile, f"{bench}-{spec['method']}.svg")
        cmd = ["py-spy", "record", "--subprocesses", "--idle", "-r", "50", "-o", out, "--"] + cmd
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"method": spec["method"], "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print a Markdown report (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--total-mib", type=int, default=256, help="checkpoint payload (default 256)")
    p.add_argument("--tensors", type=int, default=16, help="number of payload tensors (default 16)")
    p.add_argument("--repeat", type=int, default=7, help="measured saves per method for blocking time")
    p.add_argument("--window", type=float, default=8.0, help="seconds per overlap phase (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="checkpointing phases per overlap child (default 3)")
    p.add_argument("--child-nice", type=int, default=10,
                   help="ProcessCheckpointExecutor(nice=...) for ours-process (default 10, its default)")
    p.add_argument("--server-nice", type=int, default=0,
                   help="nice value for the S3 server process, to emulate a server that is not on this host")
    p.add_argument("--pin", action="store_true",
                   help="pin the trainer process to the first CPU, checkpoint processes and the server to the rest")
    p.add_argument("--bench", default="blocking,overlap", help="blocking, overlap or both")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--profile", help="record a py-spy flame graph of every child into this directory")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        bench, spec = args.child[0], json.loads(args.child[1])
        result = (child_blocking if bench == "blocking" else child_overlap)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    from benchmarks.runner import environment
    from benchmarks.servers import BUCKET, Server

    methods = [m for m in args.methods.split(",") if m]
    benches = [b for b in args.bench.split(",") if b]
    total = args.total_mib * MiB
    env = environment()
    results: dict[str, list[dict[str, Any]]] = {"blocking": [], "overlap": []}
    loads = {"start": _load()}
    with Server("fast", prefault_bytes=total + 64 * MiB) as server:
        pin = None
        if args.pin:
            cpus = _cpus()
            if len(cpus) < 2:
                raise SystemExit("--pin needs at least 2 CPUs")
            pin = {"trainer": cpus[:1], "others": cpus[1:]}
            _pin(server.info["pid"], pin["others"])
        if args.server_nice:
            import psutil

            psutil.Process(server.info["pid"]).nice(args.server_nice)
            for tid in os.listdir(f"/proc/{server.info['pid']}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), args.server_nice)
        base = {"child_nice": args.child_nice, "total_bytes": total, "tensors": args.tensors, "repeat": args.repeat, "window": args.window,
                "rounds": args.rounds, "endpoint": server.info["endpoint"], "bucket": BUCKET, "pin": pin}
        for bench in benches:
            for method in methods:
                if bench == "overlap" and method == "bare-copy":
                    continue
                res = _run_child(bench, dict(base, method=method), 1800, args.profile)
                server.reset()
                results[bench].append(res)
                print(f"{bench:<9} {method:<14} " + json.dumps(res)[:400], file=sys.stderr, flush=True)
    loads["end"] = _load()
    report = _markdown(results, env, args, loads)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "load": loads, "results": results}, f, indent=1)
    return 0


def _markdown(results: dict[str, list[dict[str, Any]]], env: dict[str, Any], args: Any,
              loads: dict[str, str]) -> str:
    v = env["versions"]
    pin = " Trainer pinned to CPU 0, checkpoint processes and server to the others." if args.pin else ""
    pin += f" ours-process child nice +{args.child_nice}; S3 server nice +{args.server_nice}."
    out = [f"Payload {args.total_mib} MiB in {args.tensors} float32 tensors; fast in-memory S3 server on 127.0.0.1. "
           f"{env['nproc']} CPUs ({env['cpu_model']}), {env['ram_gib']} GiB RAM, Python {env['python']}, "
           f"torch {v.get('torch')}, boto3 {v.get('boto3')}. Load average (1/5/15 min) at start "
           f"{loads['start']}, at end {loads['end']}.{pin}", ""]
    if results["blocking"]:
        out += ["| method | blocking, median (s) | bare copy around it, median (s) | x bare copy (median of pairs) | "
                "first save blocking (s) | save to committed, median (s) |",
                "|---|---|---|---|---|---|"]
        for r in results["blocking"]:
            if "error" in r:
                out.append(f"| {r['method']} | FAILED: {r['error'][-200:]!r} | | | | |")
                continue
            up = f"{r['upload_s']:.3f}" if r.get("upload_s") else "-"
            out.append(f"| {r['method']} | {r['blocking_s']:.4f} | {r['bare_s']:.4f} | "
                       f"{r['ratio']:.2f} | {r['cold_s']:.4f} | {up} |")
        out.append("")
    if results["overlap"]:
        out += ["| method | steps/s without ckpt | steps/s during upload | kept (median of rounds; all) | "
                "steps/s overall | saves per window | trainer time lost per save (s) | blocking per window (s) | "
                "trainer CPU s / window s |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in results["overlap"]:
            if "error" in r:
                out.append(f"| {r['method']} | FAILED: {r['error'][-200:]!r} | | | | | | | |")
                continue
            kept_all = ", ".join(f"{100 * p['kept']:.0f}%" for p in r["phases"])
            out.append(f"| {r['method']} | {r['base_steps_s']:.1f} | {r['during_steps_s']:.1f} | "
                       f"{100 * r['kept']:.0f}% ({kept_all}) | {r['overall_steps_s']:.1f} | {r['saves']} | "
                       f"{r['lost_s_per_save']:.2f} | "
                       f"{r['blocking_total_s']:.2f} | {r['trainer_cpu_s']:.1f} / {r['window_s']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
