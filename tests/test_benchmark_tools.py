"""The benchmark's sweep plan and profile summary (pure functions; no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import pyspy, sweep
from cloudckpt.transfer import TransferOptions


def test_axes_sweep_varies_one_knob_at_a_time_around_the_defaults() -> None:
    base = sweep.defaults()
    assert base["max_concurrency"] == TransferOptions().max_concurrency
    points = sweep.points("axes")
    assert points[0] == base
    for p in points[1:]:
        changed = [k for k in sweep.GRID if p[k] != base[k]]
        assert len(changed) == 1
    assert len(points) == 1 + sum(len([v for v in vs if v != base[k]]) for k, vs in sweep.GRID.items())
    full = sweep.points("full")
    assert len(full) == len(sweep.GRID["part_size"]) * len(sweep.GRID["max_concurrency"]) * len(
        sweep.GRID["target_object_size"])


def test_top_frames_counts_self_and_inclusive_samples(tmp_path: Path) -> None:
    raw = tmp_path / "save.txt"
    raw.write_text(
        "thread (1): MainThread;main (a.py:1);send (b.py:2) 3\n"
        "thread (2): worker;main (a.py:1);crc (c.py:3) 1\n"
        "garbage line\n"
    )
    text = pyspy.top_frames(str(raw))
    assert text.startswith("4 samples")
    self_part, incl_part = text.split("### inclusive")
    assert "| 3 | 75.0% | `send (b.py:2)` |" in self_part
    assert "| 4 | 100.0% | `main (a.py:1)` |" in incl_part
    assert "MainThread" not in text  # thread names are not frames


def _benchmark_imports() -> dict[str, set[str]]:
    """benchmarks module -> the benchmarks modules it imports, at top level or inside functions."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            deps.update(n.split(".")[1] for n in names if n.startswith("benchmarks."))
        graph[path.stem] = deps - {path.stem}
    return graph


def test_benchmark_modules_import_each_other_without_a_cycle():
    graph = _benchmark_imports()
    assert {"run", "sweep", "pyspy", "runner"} <= set(graph)
    state: dict[str, str] = {}

    def visit(mod: str, path: list[str]) -> None:
        if state.get(mod) == "done":
            return
        assert state.get(mod) != "open", f"import cycle: {' -> '.join(path + [mod])}"
        state[mod] = "open"
        for dep in sorted(graph.get(mod, ())):
            visit(dep, path + [mod])
        state[mod] = "done"

    for mod in sorted(graph):
        visit(mod, [])
