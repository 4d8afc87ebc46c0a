"""The ``cloudckpt`` command, run as separate processes against the S3 and GCS test servers.

A fresh interpreter spends seconds importing torch on a 2-core machine, so most
invocations are forked from a multiprocessing *forkserver* that has imported
cloudckpt once: each is still its own process running ``cli.main(argv)`` with
its own stdout/stderr files, no terminal and a real exit status. The installed
console script itself is run for real (``real=True``) by the error case here
and by tests/test_demo.py. Independent invocations run side by side.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import cloudckpt
from cloudckpt import CheckpointManager, cli, crc
from cloudckpt.uri import parse_uri
from tests.conftest import closed_port, make_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "cloudckpt")
#: The installed console script when there is one (it is what users run), else the module.
CLI = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "cloudckpt.cli"]


@dataclass
class Result:
    """One finished invocation."""

    args: tuple[str, ...]
    rc: int
    out: str
    err: str

    @property
    def doc(self) -> Any:
        """stdout parsed as JSON (the --json document)."""
        return json.loads(self.out)

    def __str__(self) -> str:
        return f"cloudckpt {' '.join(self.args)} -> {self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"


#: Modules the forkserver imports once, before it forks the invocations.
_PRELOAD = ["cloudckpt.cli", "cloudckpt.manager", "cloudckpt.verify", "cloudckpt.store.s3", "cloudckpt.store.gcs",
            "tqdm", "tests.test_cli"]


def _cli_env() -> dict[str, str]:
    # The test servers' dummy credentials are in os.environ; a stray endpoint variable must not redirect us.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _forked_cli(argv: list[str], env: dict[str, str], cwd: str, out_path: str, err_path: str) -> None:
    """Body of one forked invocation: stdio to files, no terminal, exit with main()'s status."""
    import warnings

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    warnings.simplefilter("ignore")
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    code: Any = 0
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(int(code))


def run_cli(*args: str, cwd: str | None = None, real: bool = False, tmp: str | None = None) -> Result:
    """Run one ``cloudckpt ARGS`` invocation in its own process (see the module docstring)."""
    env = _cli_env()
    if real:
        p = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=cwd or REPO,
                           stdin=subprocess.DEVNULL, timeout=240)
        return Result(args, p.returncode, p.stdout, p.stderr)
    import multiprocessing as mp
    import tempfile

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        proc = ctx.Process(target=_forked_cli, args=(list(args), env, cwd or REPO, out, err))
        proc.start()
        proc.join(240)
        if proc.is_alive():
            proc.kill()
            proc.join()
        with open(out) as f_out, open(err) as f_err:
            return Result(args, proc.exitcode if proc.exitcode is not None else -9, f_out.read(), f_err.read())


def run_all(*invocations: tuple[str, ...]) -> list[Result]:
    """Run independent invocations side by side (results in the given order)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda a: run_cli(*a), invocations))


def small_state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 20, generator=g), "b": torch.arange(7, dtype=torch.int64) * seed,
            "h": torch.randn(11, generator=g).to(torch.bfloat16), "step": seed, "name": f"run-{seed}"}


def assert_loaded_equal(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert set(expected) == set(got)
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


def target_like(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}


def test_s3_every_command_end_to_end(moto_server, tmp_path, request):
    backend = make_backend("s3", request, tmp_path)
    opts = backend.options
    root = backend.uri("run")
    with CheckpointManager(root, **opts) as mgr:
        mgr.save(small_state(1), 1)
        mgr.save(small_state(2), 2)
    store = backend.store()
    ru = parse_uri(root)
    partial = ru.child("step-0000000099").key("__0_0.distcp")
    store.put(partial, [b"half a save"], crc32c=crc.crc32c(b"half a save"))
    upload_key = ru.child("step-0000000100").key("__0_0.distcp")
    store.create_multipart(upload_key)  # a save whose only trace is an unfinished upload
    # A checkpoint whose data object rotted after the commit.
    bad = backend.uri("bad", "step-0000000001")
    cloudckpt.save(small_state(3), bad, **opts)
    [data_name] = [k for k in backend.keys(bad) if k.endswith(".distcp")]  # save-unique: __0_0.<token>.distcp
    data_key = parse_uri(bad).key(data_name)
    blob = bytearray(store.get(data_key))
    blob[-2000] ^= 0xFF
    store.put(data_key, [bytes(blob)], crc32c=crc.crc32c(bytes(blob)))

    ep = ("--endpoint-url", backend.endpoint)
    ck1 = f"{root}/step-0000000001"
    local = str(tmp_path / "copied")
    with concurrent.futures.ThreadPoolExecutor(1) as real:
        # The installed console script itself, while the forked invocations below run.
        missing_future = real.submit(run_cli, "--json", "info", f"{root}/step-0000000099", *ep, real=True)
        ls_root, ls_ckpt, info, ok, problems, cp, rm_unconfirmed, gc_dry = run_all(
            ("ls", root, "--json", *ep),
            ("ls", ck1, *ep),
            ("info", ck1, "--json", *ep),
            ("verify", ck1, "--json", *ep),
            ("verify", bad, *ep),
            ("cp", ck1, local, "--progress", *ep),
            ("rm", f"{root}/step-0000000002", *ep),
            ("gc", root, "--older-than", "0s", "--dry-run", "--json", *ep),
        )
        missing = missing_future.result()

    assert ls_root.rc == 0, ls_root
    entries = {e["step"]: e for e in ls_root.doc["checkpoints"]}
    assert sorted(entries) == [1, 2, 99, 100], ls_root
    assert [entries[s]["committed"] for s in (1, 2, 99, 100)] == [True, True, False, False]
    assert entries[100]["uploads_in_progress"] == 1 and entries[1]["uri"] == ck1

    assert ls_ckpt.rc == 0, ls_ckpt
    assert ".metadata" in ls_ckpt.out and "__0_0." in ls_ckpt.out and "committed" in ls_ckpt.out

    assert info.rc == 0, info
    items = {i["key"]: i for i in info.doc["items"]}
    assert items["w"]["dtype"] == "float32" and items["w"]["shape"] == [300, 20]
    assert items["h"]["dtype"] == "bfloat16" and items["step"]["kind"] == "bytes"
    assert info.doc["ranks"] == [0] and info.doc["checksums"] and info.doc["created"]

    assert ok.rc == 0 and ok.doc["ok"] and ok.doc["checksums_verified"], ok
    assert problems.rc == cli.EXIT_PROBLEMS, problems
    assert "PROBLEMS" in problems.out and data_name in problems.out

    assert missing.rc == cli.EXIT_NOT_FOUND, missing
    assert missing.doc["ok"] is False and missing.doc["exit_code"] == 3
    assert "cloudckpt ls" in missing.doc["error"] and "cloudckpt: error:" in missing.err  # says what to do

    assert cp.rc == 0, cp
    assert "copy" in cp.err and "100%" in cp.err  # the tqdm bar, forced on without a terminal
    from torch.distributed.checkpoint import FileSystemReader
    import torch.distributed.checkpoint as dcp

    got = target_like(small_state(1))
    dcp.load(got, storage_reader=FileSystemReader(local), no_dist=True)  # stock reader, no cloudckpt
    assert_loaded_equal(small_state(1), got)

    assert rm_unconfirmed.rc == cli.EXIT_USAGE and "--yes" in rm_unconfirmed.err, rm_unconfirmed
    assert store.head(ru.child("step-0000000002").key(".metadata")) is not None

    assert gc_dry.rc == 0, gc_dry
    assert [c["uri"] for c in gc_dry.doc["deleted_checkpoints"]] == [f"{root}/step-0000000099"]
    assert [u["key"] for u in gc_dry.doc["aborted_uploads"]] == [upload_key]
    assert store.head(partial) is not None  # dry run: nothing changed

    rm, gc = run_all(
        ("rm", f"{root}/step-0000000002", "--yes", "--json", *ep),
        ("gc", root, "--older-than", "0s", "--yes", *ep),
    )
    assert rm.rc == 0 and rm.doc["committed"] and rm.doc["deleted_objects"] == 3, rm
    assert backend.keys(f"{root}/step-0000000002") == []
    assert gc.rc == 0 and "deleted uncommitted checkpoint" in gc.out, gc
    assert store.head(partial) is None and backend.pending_uploads(root) == []
    with CheckpointManager(root, **opts) as mgr:
        assert mgr.steps() == [1]  # gc never touches committed checkpoints


def test_cp_stock_dcp_dir_to_gcs_and_gc_spares_recent(gcs_server, tmp_path, request):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    backend = make_backend("gcs", request, tmp_path)
    src = str(tmp_path / "stock")
    dcp.save(small_state(5), storage_writer=FileSystemWriter(src), no_dist=True)
    dst = backend.uri("imported", "step-0000000005")
    ep = ("--endpoint-url", backend.endpoint)
    up = run_cli("cp", src, dst, "--json", *ep)
    assert up.rc == 0, up
    assert up.doc["dst"] == dst and up.doc["objects"] == len(os.listdir(src))
    got = target_like(small_state(5))
    cloudckpt.load(got, dst, **backend.options)
    assert_loaded_equal(small_state(5), got)

    # A save in progress: recent objects and a recent multipart upload.
    store = backend.store()
    active = parse_uri(backend.uri("imported", "step-0000000006"))
    store.put(active.key("__0_0.distcp"), [b"x"], crc32c=crc.crc32c(b"x"))
    store.create_multipart(active.key("__1_0.distcp"))
    dead = f"http://127.0.0.1:{closed_port()}"
    again, verify, gc, unreachable = run_all(
        ("cp", src, dst, *ep),
        ("verify", dst, *ep),
        ("gc", backend.uri("imported"), "--json", *ep),  # default: only things older than 24 h
        ("ls", backend.uri("imported"), "--endpoint-url", dead),
    )
    assert unreachable.rc == cli.EXIT_ACCESS, unreachable
    assert dead in unreachable.err and "check STORAGE_EMULATOR_HOST / endpoint_url" in unreachable.err
    assert again.rc == cli.EXIT_EXISTS and "--overwrite" in again.err, again
    assert verify.rc == 0 and "structure only (no checksums)" in verify.out, verify
    assert gc.rc == 0 and gc.doc["deleted_checkpoints"] == [] and gc.doc["aborted_uploads"] == [], gc
    assert store.head(active.key("__0_0.distcp")) is not None


def test_bench_is_not_a_command(capsys):
    # The benchmarks run from a source checkout only: `python -m benchmarks.run`.
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == cli.EXIT_USAGE and "invalid choice: 'bench'" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["ls"])
    assert exc.value.code == cli.EXIT_USAGE
    assert cli.main(["ls", "gcs://bucket/x"]) == cli.EXIT_USAGE
    assert "gs://BUCKET/PREFIX" in capsys.readouterr().err
    assert cli.main(["demo", "--steps", "2", "--every", "5"]) == cli.EXIT_USAGE
    assert cli.main(["ls", str(tmp_path / "nothing-here")]) == cli.EXIT_NOT_FOUND


def test_exit_codes_and_durations():
    from cloudckpt import errors as e

    assert cli.exit_code_for(e.CheckpointNotFoundError("x")) == cli.EXIT_NOT_FOUND
    assert cli.exit_code_for(e.BucketNotFoundError("x")) == cli.EXIT_NOT_FOUND
    assert cli.exit_code_for(e.CheckpointExistsError("x")) == cli.EXIT_EXISTS
    assert cli.exit_code_for(e.EndpointUnreachableError("x")) == cli.EXIT_ACCESS
    assert cli.exit_code_for(e.AccessDeniedError("x")) == cli.EXIT_ACCESS
    assert cli.exit_code_for(e.IntegrityError("x")) == cli.EXIT_PROBLEMS
    assert cli.exit_code_for(e.InvalidURIError("x")) == cli.EXIT_USAGE
    assert cli.exit_code_for(ImportError("no boto3")) == cli.EXIT_MISSING
    assert cli.exit_code_for(RuntimeError("?")) == cli.EXIT_UNEXPECTED
    assert [cli.parse_duration(t) for t in ("0s", "90", "30m", "2h", "7d", "1w")] == [
        0, 90, 1800, 7200, 7 * 86400, 7 * 86400]
    with pytest.raises(Exception, match="invalid duration"):
        cli.parse_duration("soon")


# -- in-process invocations over every backend ---------------------------------------------------------------


def _ep(backend: Any) -> list[str]:
    return ["--endpoint-url", backend.endpoint] if backend.endpoint else []


def _json(capsys: Any, argv: list[str], code: int = 0) -> Any:
    capsys.readouterr()
    got = cli.main(argv)
    captured = capsys.readouterr()
    assert got == code, captured
    return json.loads(captured.out) if captured.out.strip() else None


class _Terminal(io.StringIO):
    """Typed answers on a stdin that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_rm_and_gc_ask_on_a_terminal_and_need_yes_without_one(backend, monkeypatch, capsys):
    root = backend.uri("run")
    cloudckpt.save(small_state(1), f"{root}/step-0000000001", **backend.options)
    store = backend.store()
    stale = parse_uri(root).child("step-0000000002").key("__0_0.distcp")
    store.put(stale, [b"half"], crc32c=crc.crc32c(b"half"))
    ck = f"{root}/step-0000000001"
    ep = _ep(backend)
    # No terminal, no --yes: refused with a usage error, nothing deleted.
    assert cli.main(["rm", ck, *ep]) == cli.EXIT_USAGE
    assert cli.main(["gc", root, "--older-than", "0s", *ep]) == cli.EXIT_USAGE
    assert "--yes" in capsys.readouterr().err
    # --dry-run needs no confirmation and changes nothing.
    assert _json(capsys, ["rm", ck, "--dry-run", "--json", *ep])["dry_run"] is True
    gc_dry = _json(capsys, ["gc", root, "--older-than", "0s", "--dry-run", "--json", *ep])
    assert [c["uri"] for c in gc_dry["deleted_checkpoints"]] == [f"{root}/step-0000000002"]
    assert store.head(stale) is not None and store.head(parse_uri(ck).key(".metadata")) is not None
    # On a terminal: "n" keeps, "y" deletes.
    monkeypatch.setattr("sys.stdin", _Terminal("n\nn\ny\nyes\n"))
    assert cli.main(["rm", ck, *ep]) == 0 and cli.main(["gc", root, "--older-than", "0s", *ep]) == 0
    assert store.head(stale) is not None and store.head(parse_uri(ck).key(".metadata")) is not None
    assert cli.main(["gc", root, "--older-than", "0s", *ep]) == 0
    assert store.head(stale) is None
    assert cli.main(["rm", ck, *ep]) == 0
    assert backend.keys(ck) == []
    err = capsys.readouterr().err
    assert "delete committed checkpoint" in err and "[y/N]" in err and "will delete uncommitted" in err


def test_cli_gc_keeps_rank_local_commit_and_other_prefixes(backend, capsys):
    import torch.distributed.checkpoint as dcp

    root = backend.uri("run")
    writer = cloudckpt.storage_writer(f"{root}/step-0000000003", **backend.options)
    dcp.save(small_state(3), storage_writer=writer, no_dist=True, use_collectives=False)
    store = backend.store()
    dataset = parse_uri(root).child("eval-data")
    store.put(dataset.key("eval.metadata"), [b"labels"], crc32c=crc.crc32c(b"labels"))
    ep = _ep(backend)
    listed = _json(capsys, ["ls", root, "--json", *ep])
    kinds = {e["name"]: (e["kind"], e["committed"]) for e in listed["checkpoints"]}
    assert kinds == {"step-0000000003": ("checkpoint", True), "eval-data": ("prefix", None)}
    gc = _json(capsys, ["gc", root, "--older-than", "0s", "--yes", "--json", *ep])
    assert gc["deleted_checkpoints"] == []
    assert cli.main(["rm", str(dataset), "--yes", *ep]) == cli.EXIT_USAGE  # not a checkpoint
    assert store.head(dataset.key("eval.metadata")) is not None
    got = target_like(small_state(3))
    cloudckpt.load(got, f"{root}/step-0000000003", **backend.options)
    assert_loaded_equal(small_state(3), got)


def test_cli_nested_layout_info_ls_and_cp(backend, tmp_path, capsys):
    from tests.test_ops import nested_checkpoint, state, target

    src = backend.uri("nested", "step-0000000004")
    backend.upload(nested_checkpoint(tmp_path, 4), src)
    ep = _ep(backend)
    info = _json(capsys, ["info", src, "--json", *ep])
    assert info["ranks"] == [0] and info["objects"] == 2 and info["missing"] == []
    listed = _json(capsys, ["ls", src, "--json", *ep])
    assert {o["name"] for o in listed["objects"]} == {".metadata", "0000000000/epoch_3/__0_0.distcp"}
    assert listed["bytes"] == info["stored_bytes"]
    local = str(tmp_path / "copied")
    cp = _json(capsys, ["cp", src, local, "--json", *ep])
    assert cp["objects"] == 2
    got = target()
    cloudckpt.load(got, local)
    assert torch.equal(got["w"], state(4)["w"]) and got["step"] == 4
