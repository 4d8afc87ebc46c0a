"""cloudckpt.ops (list, info, copy, rm, gc) and the one definition of a checkpoint, over S3, GCS and local.

Each attack from issues 12 and 14 is its own test: rank-local commits, prefixes
that are not checkpoints, nested (s3torchconnector-style) layouts, hostile
object names, planted symlinks and failures half-way through a copy.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

import cloudckpt
from cloudckpt import cli, crc, layout, ops
from cloudckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IntegrityError,
    NotACheckpointError,
    UnsafeDestinationError,
    UnsafeMetadataError,
)
from cloudckpt.options import split_options
from cloudckpt.uri import parse_uri


def state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 8, generator=g), "b": torch.arange(5) * seed, "step": seed}


def target() -> dict[str, Any]:
    return {"w": torch.zeros(64, 8), "b": torch.zeros(5, dtype=torch.int64), "step": -1}


def assert_state(seed: int, got: dict[str, Any]) -> None:
    want = state(seed)
    assert torch.equal(got["w"], want["w"]) and torch.equal(got["b"], want["b"]) and got["step"] == seed


def put(store: Any, key: str, data: bytes) -> None:
    store.put(key, [data], crc32c=crc.crc32c(data))


def rank_local_save(backend: Any, uri: str, seed: int) -> None:
    """A checkpoint committed as ``__0.metadata`` (``use_collectives=False``), as S3StorageWriter writes it."""
    writer = cloudckpt.storage_writer(uri, **backend.options)
    dcp.save(state(seed), storage_writer=writer, no_dist=True, use_collectives=False)


def nested_checkpoint(tmp_path: Any, seed: int) -> str:
    """A stock DCP checkpoint whose data object lives in a sub-folder, as s3torchconnector's prefix strategies write.

    Written by the stock FileSystemWriter, then the data object is moved to
    ``0000000000/epoch_3/`` and ``.metadata``'s ``relative_path`` rewritten with plain pickle.
    """
    d = str(tmp_path / f"nested-{seed}")
    dcp.save(state(seed), storage_writer=FileSystemWriter(d), no_dist=True)
    data = [n for n in os.listdir(d) if n.endswith(".distcp")]
    assert data == ["__0_0.distcp"], data
    os.makedirs(os.path.join(d, "0000000000", "epoch_3"))
    os.rename(os.path.join(d, data[0]), os.path.join(d, "0000000000", "epoch_3", data[0]))
    rewrite_paths(d, lambda p: f"0000000000/epoch_3/{p}")
    return d


def rewrite_paths(directory: str, fn: Any) -> None:
    path = os.path.join(directory, ".metadata")
    with open(path, "rb") as f:
        md = pickle.load(f)  # our own test file, written just above
    for info in md.storage_data.values():
        info.relative_path = fn(info.relative_path)
    with open(path, "wb") as f:
        pickle.dump(md, f)


# -- the definition (pure) ------------------------------------------------------------------------


def test_checkpoint_state_knows_every_commit_form():
    s = layout.checkpoint_state
    assert s([".metadata", "__0_0.distcp"]) == layout.COMMITTED
    assert s(["__0.metadata", "__0_0.distcp", "__0.cloudckpt-manifest-ab12cd34.json"]) == layout.COMMITTED
    assert s(["__0_0.9c1e4b7a2f30.distcp", ".cloudckpt-manifest-ab12cd34.json"]) == layout.UNCOMMITTED
    assert s(["3f-__12_0.distcp"]) == layout.UNCOMMITTED
    # Not checkpoints: a dataset folder, a mixed prefix, only another rank's metadata, nothing.
    assert s(["eval.metadata", "train.bin"]) is None
    assert s(["eval.metadata"]) is None
    assert s(["__0_0.distcp", "notes.txt"]) is None
    assert s(["__3.metadata"]) is None
    assert s([]) is None
    # Names in sub-folders never decide.
    assert s(["sub/.metadata", "sub/__0_0.distcp"]) is None
    assert layout.commit_objects([".metadata", "__2.metadata", "__0.metadata", "__10.metadata", "x"]) == [
        "__2.metadata", "__10.metadata", "__0.metadata", ".metadata"]


@pytest.mark.parametrize("name", ["..", "a/../../b", ".", "a//b", "/etc/passwd", "C:/x", "a\x00b", "ctl\x07",
                                  "tab\tname", "back\\slash", "x" * 300, "a/" + "y" * 256, "", "z/" * 600])
def test_check_relative_path_rejects_escapes_and_unwritable_names(name):
    with pytest.raises(UnsafeMetadataError, match="s3://b/ck/.metadata"):
        layout.check_relative_path(name, "s3://b/ck/.metadata")


def test_check_relative_path_accepts_real_layouts():
    for ok in ("__0_0.distcp", "0000000000/epoch_3/__0_0.distcp", "3f-__12_0.9c1e4b7a2f30.distcp", "x" * 255):
        assert layout.check_relative_path(ok, "w") == ok
    for bad in (None, 3, b"__0_0.distcp"):
        with pytest.raises(UnsafeMetadataError):
            layout.check_relative_path(bad, "w")


def test_split_options_routes_every_option_once_and_names_unknown_ones():
    routed = split_options({"endpoint_url": "http://x", "prefix_strategy": "hash", "allow_pickle": True,
                            "max_concurrency": 4, "verify": False})
    assert routed.store == {"endpoint_url": "http://x"}
    assert routed.writer == {"endpoint_url": "http://x", "prefix_strategy": "hash", "max_concurrency": 4}
    assert routed.reader == {"endpoint_url": "http://x", "allow_pickle": True, "max_concurrency": 4,
                             "verify": False}
    with pytest.raises(TypeError, match="'prefix_stratgy'.*'zzz'"):
        split_options({"prefix_stratgy": "hash", "zzz": 1})


# -- gc, ls and rm know every commit form -----------------------------------------------------------


def test_gc_keeps_rank_local_commit(backend):
    root = backend.uri("run")
    rank_local_save(backend, f"{root}/step-0000000001", 1)
    store = backend.store()
    listed = ops.list_uri(store, parse_uri(root))
    assert [(e.step, e.committed) for e in listed.entries] == [(1, True)]
    assert ops.list_uri(store, parse_uri(f"{root}/step-0000000001")).committed
    plan = ops.plan_gc(store, parse_uri(root), 0)
    assert plan.checkpoints == ()
    ops.run_gc(store, plan)
    got = target()
    cloudckpt.load(got, f"{root}/step-0000000001", **backend.options)
    assert_state(1, got)


def test_gc_never_deletes_a_non_checkpoint_prefix(backend):
    root = parse_uri(backend.uri("run"))
    store = backend.store()
    put(store, root.child("data").key("eval.metadata"), b"not a checkpoint")
    put(store, root.child("data").key("train.bin"), b"dataset")
    put(store, root.child("mixed").key("__0_0.distcp"), b"looks like data")
    put(store, root.child("mixed").key("README.txt"), b"but a person keeps notes here")
    put(store, root.child("only-eval").key("eval.metadata"), b"x")
    put(store, root.child("step-0000000007").key("__0_0.distcp"), b"an abandoned save")  # the one real candidate
    plan = ops.plan_gc(store, root, 0)
    assert [c.uri for c in plan.checkpoints] == [str(root.child("step-0000000007"))]
    ops.run_gc(store, plan)
    for name in ("data/eval.metadata", "data/train.bin", "mixed/__0_0.distcp", "mixed/README.txt",
                 "only-eval/eval.metadata"):
        assert store.head(root.key(name)) is not None, name
    assert store.head(root.child("step-0000000007").key("__0_0.distcp")) is None
    with pytest.raises(NotACheckpointError, match="not a checkpoint"):
        ops.plan_removal(store, root.child("data"))


def test_gc_rechecks_before_deleting_a_prefix_committed_since_the_plan(backend):
    root = parse_uri(backend.uri("run"))
    store = backend.store()
    put(store, root.child("step-0000000003").key("__0_0.distcp"), b"half")
    plan = ops.plan_gc(store, root, 0)
    assert len(plan.checkpoints) == 1
    put(store, root.child("step-0000000003").key(".metadata"), b"committed meanwhile")
    assert ops.run_gc(store, plan).checkpoints == ()
    assert store.head(root.child("step-0000000003").key("__0_0.distcp")) is not None


# -- nested layouts -------------------------------------------------------------------------------------


def test_cp_nested_layout_copies_every_object(backend, tmp_path):
    src = backend.uri("imported", "step-0000000004")
    backend.upload(nested_checkpoint(tmp_path, 4), src)
    store = backend.store()
    info = ops.checkpoint_info(store, parse_uri(src))
    assert info.ranks == (0,) and info.objects == 2 and info.missing == ()
    assert info.stored_bytes == sum(os.path.getsize(os.path.join(d, f))
                                    for d, _, fs in os.walk(str(tmp_path / "nested-4")) for f in fs)
    listed = ops.list_uri(store, parse_uri(backend.uri("imported")))
    assert listed.entries[0].bytes == info.stored_bytes and listed.entries[0].committed

    local = str(tmp_path / "copied")
    result = ops.copy_checkpoint(store, parse_uri(src), ops_store(local), parse_uri(local))
    assert result.objects == 2
    assert os.path.isfile(os.path.join(local, "0000000000", "epoch_3", "__0_0.distcp"))
    got = target()
    dcp.load(got, storage_reader=dcp.FileSystemReader(local), no_dist=True)  # stock reader
    assert_state(4, got)
    # And back up again, to a second prefix of the same backend.
    back = backend.uri("again", "step-0000000004")
    ops.copy_checkpoint(ops_store(local), parse_uri(local), store, parse_uri(back))
    assert "0000000000/epoch_3/__0_0.distcp" in backend.keys(back)
    got = target()
    cloudckpt.load(got, back, **backend.options)
    assert_state(4, got)


def ops_store(path: str) -> Any:
    from cloudckpt.store import open_store

    return open_store(path)


def test_cp_refuses_a_checkpoint_whose_referenced_object_is_missing(backend, tmp_path):
    d = nested_checkpoint(tmp_path, 5)
    shutil.rmtree(os.path.join(d, "0000000000"))
    src = backend.uri("broken")
    backend.upload(d, src)
    local = str(tmp_path / "copied")
    with pytest.raises(IncompleteCheckpointError, match="0000000000/epoch_3/__0_0.distcp"):
        ops.copy_checkpoint(backend.store(), parse_uri(src), ops_store(local), parse_uri(local))
    assert not os.path.exists(local) or os.listdir(local) == []
    assert ops.checkpoint_info(backend.store(), parse_uri(src)).missing == ("0000000000/epoch_3/__0_0.distcp",)


# -- cp to a local destination under attack -------------------------------------------------------------


def test_cp_does_not_follow_planted_symlink(backend, tmp_path):
    src = backend.uri("ck")
    cloudckpt.save(state(6), src, **backend.options)
    names = backend.keys(src)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dst = tmp_path / "dst"
    dst.mkdir()
    # A symlink at the commit object's name makes the destination look committed: refused, not followed.
    os.symlink(victim, dst / ".metadata")
    with pytest.raises(CheckpointExistsError):
        ops.copy_checkpoint(backend.store(), parse_uri(src), ops_store(str(dst)), parse_uri(str(dst)))
    os.unlink(dst / ".metadata")
    for n in names:  # at the old predictable temporary name and at every other final name
        os.symlink(victim, dst / f"{n}.cloudckpt-partial")
        if n != ".metadata":
            os.symlink(victim, dst / n)
    ops.copy_checkpoint(backend.store(), parse_uri(src), ops_store(str(dst)), parse_uri(str(dst)))
    assert victim.read_bytes() == b"precious"
    for n in names:
        assert not os.path.islink(dst / n) and os.path.isfile(dst / n), n
    got = target()
    cloudckpt.load(got, str(dst))
    assert_state(6, got)


def test_cp_refuses_a_planted_directory_symlink(backend, tmp_path):
    src = backend.uri("nested")
    backend.upload(nested_checkpoint(tmp_path, 7), src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(elsewhere, dst / "0000000000")
    with pytest.raises(UnsafeDestinationError, match="0000000000"):
        ops.copy_checkpoint(backend.store(), parse_uri(src), ops_store(str(dst)), parse_uri(str(dst)))
    assert list(elsewhere.iterdir()) == []
    assert sorted(os.listdir(dst)) == ["0000000000"]  # only the planted link: no partial files
    assert cli.exit_code_for(UnsafeDestinationError("x")) == cli.EXIT_LOCAL_FS


def test_cp_cleans_partial_files_on_failure(backend, tmp_path):
    src = backend.uri("ck")
    cloudckpt.save(state(8), src, **backend.options)
    store = backend.store()
    data = next(n for n in backend.keys(src) if n.endswith(".distcp"))
    # 1. A corrupt object: its CRC32C fails after every object was downloaded.
    key = parse_uri(src).key(data)
    blob = bytearray(store.get(key))
    blob[-3] ^= 0xFF
    put(store, key, bytes(blob))
    dst = tmp_path / "dst"
    with pytest.raises(IntegrityError, match="CRC32C"):
        ops.copy_checkpoint(store, parse_uri(src), ops_store(str(dst)), parse_uri(str(dst)))
    assert not dst.exists()  # the directory the copy created went too
    dst.mkdir()
    # 2. A rename that fails after another object was already placed (a directory at the data object's name).
    blob[-3] ^= 0xFF
    put(store, key, bytes(blob))
    (dst / data).mkdir()
    with pytest.raises(IsADirectoryError):
        ops.copy_checkpoint(store, parse_uri(src), ops_store(str(dst)), parse_uri(str(dst)))
    assert os.listdir(dst) == [data] and os.listdir(dst / data) == []
    assert cli.main(["cp", src, str(dst), *endpoint(backend)]) == cli.EXIT_LOCAL_FS
    assert os.listdir(dst) == [data]


def test_cp_overwrite_replaces_a_committed_checkpoint_and_its_stale_objects(backend, tmp_path):
    src, dst = backend.uri("a"), backend.uri("b")
    cloudckpt.save(state(12), src, **backend.options)
    cloudckpt.save(state(13), dst, **backend.options)
    old = set(backend.keys(dst))
    store = backend.store()
    with pytest.raises(CheckpointExistsError):
        ops.copy_checkpoint(store, parse_uri(src), store, parse_uri(dst))
    ops.copy_checkpoint(store, parse_uri(src), store, parse_uri(dst), overwrite=True)
    assert set(backend.keys(dst)) == set(backend.keys(src))
    assert [n for n in old if layout.is_manifest_name(n) and n in backend.keys(dst)] == []  # the replaced one's
    got = target()
    cloudckpt.load(got, dst, **backend.options)
    assert_state(12, got)


def endpoint(backend: Any) -> list[str]:
    return ["--endpoint-url", backend.endpoint] if backend.endpoint else []


@pytest.mark.parametrize("bad", ["..", "a\x00b", "/etc/passwd", "x" * 300, "a/../../outside", "bell\x07"])
def test_cp_bad_object_names_exit_codes(backend, tmp_path, bad):
    d = str(tmp_path / "stock")
    dcp.save(state(9), storage_writer=FileSystemWriter(d), no_dist=True)
    rewrite_paths(d, lambda p: bad)
    src = backend.uri("hostile")
    backend.upload(d, src)
    dst = tmp_path / "out" / "dst"
    with pytest.raises(UnsafeMetadataError, match="refer|names object|only name objects inside"):
        ops.copy_checkpoint(backend.store(), parse_uri(src), ops_store(str(dst)), parse_uri(str(dst)))
    assert cli.main(["cp", src, str(dst), *endpoint(backend)]) == cli.EXIT_PROBLEMS
    assert cli.main(["info", src, *endpoint(backend)]) == cli.EXIT_PROBLEMS
    left = [os.path.join(p, f) for p, _, fs in os.walk(tmp_path / "out") for f in fs]
    assert left == [] and not (tmp_path / "outside").exists()


def test_cp_os_errors_map_to_documented_exit_codes(tmp_path, capsys):
    src = str(tmp_path / "ck")
    cloudckpt.save(state(10), src)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["cp", src, str(blocker / "dst")]) == cli.EXIT_LOCAL_FS  # ENOTDIR, not 10
    assert "local file system" in capsys.readouterr().err
    for code, want in ((errno.ENOSPC, cli.EXIT_LOCAL_FS), (errno.ENAMETOOLONG, cli.EXIT_LOCAL_FS),
                       (errno.EDQUOT, cli.EXIT_LOCAL_FS), (errno.EACCES, cli.EXIT_ACCESS),
                       (errno.EROFS, cli.EXIT_ACCESS), (errno.ENOENT, cli.EXIT_NOT_FOUND)):
        assert cli.exit_code_for(OSError(code, os.strerror(code))) == want, code
    assert cli.exit_code_for(PermissionError(errno.EACCES, "denied")) == cli.EXIT_ACCESS


# -- deletion never follows symlinks ----------------------------------------------------------------------


def test_rm_unlinks_a_symlinked_checkpoint_and_keeps_its_target(tmp_path):
    real = str(tmp_path / "real")
    cloudckpt.save(state(11), real)
    before = sorted(os.listdir(real))
    link = tmp_path / "root" / "step-0000000011"
    link.parent.mkdir()
    os.symlink(real, link)
    store = ops_store(str(link))
    plan = ops.plan_removal(store, parse_uri(str(link)))
    assert plan.symlink and plan.committed
    ops.remove_checkpoint(store, plan)
    assert not os.path.lexists(link) and sorted(os.listdir(real)) == before


def test_delete_refuses_roots_and_missing_checkpoints(tmp_path):
    from cloudckpt.errors import InvalidURIError

    with pytest.raises(InvalidURIError):
        ops.delete_checkpoint(ops_store("/"), parse_uri("/"))
    with pytest.raises(CheckpointNotFoundError):
        ops.plan_removal(ops_store(str(tmp_path)), parse_uri(str(tmp_path / "nothing")))
