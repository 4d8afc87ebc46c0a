"""``python -m benchmarks.run --sweep``: cloudckpt's part size, concurrency and object size.

The defaults of :class:`cloudckpt.TransferOptions` are chosen from this table.
``--sweep-grid axes`` (the default) varies one knob at a time around the
defaults; ``full`` runs every combination. Each point is a save and a load in
fresh child processes against the fast S3 server, verified like the
comparison, median of ``--repeat``.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

from benchmarks.runner import MiB, Runner, summarize

GRID: dict[str, list[int]] = {
    "part_size": [8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB],
    "max_concurrency": [2, 4, 8, 16, 32],
    "target_object_size": [256 * MiB, 1024 * MiB, 4096 * MiB],
}


def defaults() -> dict[str, int]:
    """cloudckpt's current defaults for the swept knobs."""
    from cloudckpt import TransferOptions

    opts = TransferOptions()
    return {k: getattr(opts, k) for k in GRID}


def points(grid: str) -> list[dict[str, int]]:
    """The option sets to run: one knob at a time (``axes``) or the full product."""
    base = defaults()
    if grid == "full":
        return [dict(zip(GRID, combo)) for combo in itertools.product(*GRID.values())]
    out = [base]
    for knob, values in GRID.items():
        out += [dict(base, **{knob: v}) for v in values if v != base[knob]]
    return out


def _label(opts: dict[str, int], base: dict[str, int]) -> str:
    changed = [k for k in GRID if opts[k] != base[k]]
    if not changed:
        return "defaults"
    return ", ".join(f"{k}={opts[k] // MiB} MiB" if k != "max_concurrency" else f"{k}={opts[k]}" for k in changed)


def sweep_main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sweep and print one table with save and load figures per point."""
    base = defaults()
    rows = []
    with Runner(["fast"], args.total_mib * MiB, args.tensor_mib * MiB) as runner:
        for i, opts in enumerate(points(args.sweep_grid)):
            label = _label(opts, base)
            res: dict[str, list[dict[str, Any]]] = {"save": [], "load": []}
            for rep in range(args.repeat):
                one = runner.roundtrip("cloudckpt", "fast", f"s{i}-{rep}", label, options=opts)
                for op in res:
                    res[op].append(one.get(op) or {"ok": False, "error": "not run: the save failed"})
            rows.append((label, opts, {op: summarize(rs) for op, rs in res.items()}))
    print(f"### cloudckpt option sweep ({args.sweep_grid}), {args.total_mib} MiB, median of {args.repeat}\n")
    print("| options | save GB/s | save CPU s/GB | save peak RSS MiB | save requests | "
          "load GB/s | load CPU s/GB | load peak RSS MiB |\n|---|---|---|---|---|---|---|---|")
    for label, _, s in rows:
        sv, ld = s["save"], s["load"]
        if sv["failed"] or ld["failed"]:
            print(f"| {label} | FAILED: {(sv.get('error') or ld.get('error') or '')[:200]} | | | | | | |")
            continue
        print(f"| {label} | {sv['gbps']:.3f} | {sv['client_cpu_per_gb']:.2f} | {sv['peak_extra_rss_mib']:.0f} | "
              f"{sv['requests']:.0f} | {ld['gbps']:.3f} | {ld['client_cpu_per_gb']:.2f} | "
              f"{ld['peak_extra_rss_mib']:.0f} |")
    return {"mode": "sweep", "grid": args.sweep_grid,
            "rows": [{"label": label, "options": opts, **s} for label, opts, s in rows]}
