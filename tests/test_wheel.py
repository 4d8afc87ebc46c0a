"""What ships: the wheel holds the product only, the product needs no test code, CI runs README's commands."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Top-level packages of the source tree that must never ship nor be imported by the product.
NOT_SHIPPED = ("cloudckpt_testing", "tests", "benchmarks")
#: Build leftovers and environments not copied into the clean build tree.
_JUNK = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".tox",
                               ".pytest_cache", ".ruff_cache", ".mypy_cache", "bench-results")


def _product_modules() -> set[str]:
    """Every .py file of the product, as a path in the wheel (``cloudckpt/...``)."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "cloudckpt").rglob("*.py")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Build from a clean copy: a stale build/ in the checkout (say from before a package moved)
    # would otherwise leak old files into the wheel. The copy keeps the test code and benchmarks,
    # so that leaving them out is what is tested.
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_JUNK)
    out = tmp / "dist"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    (path,) = out.glob("cloudckpt-*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


@pytest.mark.slow
def test_wheel_holds_only_the_product(wheel):
    names = wheel.namelist()
    dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert len(dist_info) == 1, dist_info
    outside = [n for n in names if not n.startswith("cloudckpt/") and n.split("/")[0] not in dist_info]
    assert outside == [], f"the wheel holds files outside the product: {outside}"
    assert not [n for n in names if n.startswith("cloudckpt/testing/")]
    # Everything of the product is there, and nothing else.
    assert {n for n in names if n.startswith("cloudckpt/") and n.endswith(".py")} == _product_modules()
    assert "cloudckpt/_moto_server.py" in names and "cloudckpt/demo.py" in names
    entry_points = wheel.read(f"{dist_info.pop()}/entry_points.txt").decode()
    assert "cloudckpt = cloudckpt.cli:main" in entry_points


def test_the_test_rig_left_the_package():
    assert not (ROOT / "cloudckpt" / "testing").exists()
    assert (ROOT / "cloudckpt_testing" / "s3.py").exists()


def test_product_imports_without_test_or_benchmark_code():
    # Every product module imports with cloudckpt_testing, tests and benchmarks made unimportable.
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys, warnings
        warnings.simplefilter("ignore")
        BLOCKED = {NOT_SHIPPED!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is not part of the product")
                return None

        sys.meta_path.insert(0, Block())
        for name in BLOCKED:
            sys.modules.pop(name, None)
        import cloudckpt
        names = [m.name for m in pkgutil.walk_packages(cloudckpt.__path__, "cloudckpt.")]
        for name in names:
            importlib.import_module(name)
        print(len(names), sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    count, leaked = p.stdout.split(" ", 1)
    # walk_packages lists every module but the top package itself.
    assert int(count) == len(_product_modules()) - 1 and leaked.strip() == "[]", p.stdout


def test_product_has_no_deferred_import_of_test_or_benchmark_code():
    # Imports inside functions (the demo once imported the test servers lazily) escape the test
    # above; every import statement of the product is checked here.
    offenders = []
    for path in sorted((ROOT / "cloudckpt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in NOT_SHIPPED]
    assert offenders == []


def _readme_command_module():
    """.ci/readme_command.py, which .ci/run uses to read README's commands."""
    spec = importlib.util.spec_from_file_location("readme_command", ROOT / ".ci" / "readme_command.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _readme_command(name: str) -> str:
    return _readme_command_module().readme_command(name, (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_commands_it_finds_in_readme():
    demo, tests = _readme_command("demo"), _readme_command("test")
    assert demo.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "-e '.[all,demo]'" in demo and demo.endswith("&& cloudckpt demo")
    assert "-e '.[all,test]'" in tests and tests.endswith("&& python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py demo" in ci and "readme_command.py test" in ci
    # Both run literally: no rewriting of the command text (the demo runs in a fresh clone instead).
    assert 'bash -euo pipefail -c "$demo_cmd"' in ci and 'bash -euo pipefail -c "$test_cmd"' in ci
    assert "demo_cmd=${" not in ci and "test_cmd=${" not in ci
    assert "ruff check cloudckpt" in ci and "mypy cloudckpt" in ci


def test_readme_command_refuses_a_missing_or_ambiguous_marker():
    mod = _readme_command_module()
    block = "<!-- ci: demo -->\n```bash\necho hi\n```\n"
    assert mod.readme_command("demo", block) == "echo hi"
    for text in ("", block + block, "<!-- ci: demo -->\n```bash\necho a\necho b\n```\n"):
        with pytest.raises(ValueError, match="ci: demo"):
            mod.readme_command("demo", text)
