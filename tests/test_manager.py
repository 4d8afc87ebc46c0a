"""CheckpointManager: naming, retention, latest, resume, deletion; over S3 and GCS servers and multi-rank."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from cloudckpt import CheckpointManager, crc
from cloudckpt.errors import CheckpointExistsError, CheckpointNotFoundError
from cloudckpt.layout import parse_data_object_name
from cloudckpt.manager import RetentionPolicy, parse_step_name, step_name
from cloudckpt.uri import parse_uri
from tests import workers
from tests.dist import run_world


def test_step_names_are_padded_and_parse_back():
    assert step_name(0) == "step-0000000000"
    assert step_name(1500) == "step-0000001500"
    assert step_name(12345678901) == "step-12345678901"  # wider than the padding: still one name
    assert parse_step_name("step-0000001500") == 1500
    assert parse_step_name("step-1500/") == 1500  # other tools' unpadded names are found too
    for bad in ("step-", "step-1a", "steps-1", "step--1", "ckpt-1"):
        assert parse_step_name(bad) is None
    for bad in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="non-negative int"):
            step_name(bad)


def test_retention_policy_keeps_newest_protected_and_milestones():
    committed = [1, 2, 3, 4, 5, 6, 7]
    assert RetentionPolicy().doomed(committed) == []
    assert RetentionPolicy(keep_last=2).doomed(committed) == [1, 2, 3, 4, 5]
    assert RetentionPolicy(keep_last=2, keep_every=3).doomed(committed) == [1, 2, 4, 5]
    # keep_every alone: milestones plus the newest (what a restart resumes from)
    assert RetentionPolicy(keep_every=10).doomed(committed) == [1, 2, 3, 4, 5, 6]
    # a protected step (the one just written, even if older than the newest) survives
    assert RetentionPolicy(keep_last=1).doomed([3, 9, 5], protect=[5]) == [3]
    assert RetentionPolicy(keep_last=1).doomed([]) == []
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            RetentionPolicy(keep_last=bad)
        with pytest.raises(ValueError):
            CheckpointManager("/tmp/unused", keep_every=bad)


def test_retention_latest_resume_and_delete(cloud_backend):
    root = cloud_backend.uri("run")
    opts = cloud_backend.options
    with CheckpointManager(root, **opts) as empty:
        state = {"w": torch.full((4,), 7.0)}
        assert empty.latest() is None and empty.steps() == []
        assert empty.load(state) is None  # nothing to resume: untouched
        assert torch.equal(state["w"], torch.full((4,), 7.0))

    # An uncommitted prefix with a higher step (a save in progress or a crashed one).
    store = cloud_backend.store()
    partial = parse_uri(root).child(step_name(99)).key("__0_0.distcp")
    store.put(partial, [b"partial"], crc32c=crc.crc32c(b"partial"))

    mgr = CheckpointManager(root, keep_last=2, keep_every=3, **opts)
    w = torch.zeros(256, 16)
    for step in range(1, 7):
        w.fill_(float(step))
        handle = mgr.async_save({"w": w, "step": step, "note": f"s{step}"}, step)
        handle.staging_completion.result()
        w.fill_(-1.0)  # the trainer keeps going while the upload runs
    mgr.wait()
    assert handle.done() and handle.upload_s is not None and handle.checkpoint_id == mgr.checkpoint_uri(6)
    assert mgr.steps() == [3, 5, 6]
    assert mgr.latest() == 6  # step 99 has no .metadata: not a checkpoint
    assert store.head(partial) is not None  # retention never touches uncommitted prefixes
    assert mgr.checkpoint_uri(6) == f"{root}/step-0000000006"
    keys6 = set(cloud_backend.keys(mgr.checkpoint_uri(6)))
    assert ".metadata" in keys6 and [(0, 0)] == [parse_data_object_name(k)[:2] for k in keys6
                                                 if parse_data_object_name(k)], keys6

    target = {"w": torch.empty(256, 16), "step": -1, "note": ""}
    assert mgr.load(target) == 6  # resume is one line
    assert torch.equal(target["w"], torch.full((256, 16), 6.0)) and target["step"] == 6 and target["note"] == "s6"
    assert mgr.load(target, step=3) == 3
    assert torch.equal(target["w"], torch.full((256, 16), 3.0))
    with pytest.raises(CheckpointNotFoundError, match=r"step 4 .*committed steps: \[3, 5, 6\]"):
        mgr.load(target, step=4)

    # A blocking save of an existing step fails typed, and nothing is deleted.
    with pytest.raises(CheckpointExistsError, match="already exists"):
        mgr.save({"w": w}, 6)
    # The same error through the async path arrives typed at wait().
    mgr.async_save({"w": w}, 5)
    with pytest.raises(CheckpointExistsError):
        mgr.wait()
    assert mgr.steps() == [3, 5, 6]

    mgr.delete(5)
    assert mgr.steps() == [3, 6]
    with pytest.raises(CheckpointNotFoundError):
        mgr.delete(5)
    mgr.delete(99)  # uncommitted prefixes can be deleted explicitly
    assert store.head(partial) is None
    # keep_every alone keeps the newest even though it is no milestone.
    mgr.close()
    with CheckpointManager(root, keep_every=100, **opts) as sparse:
        sparse.save({"w": w}, 7)
        assert sparse.steps() == [7]


class _Gate:
    """A byte item whose serialisation (in the upload worker) waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __deepcopy__(self, memo: dict) -> "_Gate":
        return self  # staging copies it by reference, so the test can open it later

    def __reduce__(self) -> tuple:
        assert self.release.wait(60), "test never released the gate"
        return (int, (7,))


def test_checkpoint_being_written_is_protected(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=1)
    mgr.save({"w": torch.ones(4)}, 1)
    gate = _Gate()
    handle = mgr.async_save({"w": torch.ones(4), "gate": gate}, 2)
    try:
        assert not handle.done()
        with pytest.raises(ValueError, match="still being saved"):
            mgr.delete(2)
        assert mgr.latest() == 1
        assert mgr.apply_retention() == []  # keeps the newest committed (1); 2 is not committed yet
        assert mgr.steps() == [1]
    finally:
        gate.release.set()
    mgr.wait()
    assert mgr.steps() == [2]  # the commit of 2 retired 1
    mgr.close()
    with pytest.raises(RuntimeError, match="closed"):
        mgr.save({"w": torch.ones(4)}, 3)


def test_two_ranks_agree_only_rank0_deletes_and_resume(moto_server, tmp_path, request):
    from tests.conftest import make_backend

    backend = make_backend("s3", request, tmp_path)
    results = run_world(2, workers.manager_rounds, backend.uri("run"), backend.options, 4)
    for r in results:
        assert r["after_saves"] == [3, 4], r
        assert r["after_rank1_delete"] == [3, 4], r  # rank 1's delete is a no-op
        assert r["after_rank0_delete"] == [4], r
        assert r["resumed"] == 4 and r["values_ok"], r
    keys = backend.keys(backend.uri("run", step_name(4)))
    assert ".metadata" in keys, keys
    assert sorted(parse_data_object_name(k)[:2] for k in keys if parse_data_object_name(k)) == [(0, 0), (1, 0)], keys


def test_process_executor_retains_in_its_child(tmp_path):
    from cloudckpt import ProcessCheckpointExecutor

    with ProcessCheckpointExecutor() as ex:
        mgr = CheckpointManager(str(tmp_path / "run"), keep_last=1, executor=ex)
        w = torch.zeros(1000)
        for step in (1, 2, 3):
            w.fill_(float(step))
            mgr.async_save({"w": w}, step).staging_completion.result()
            w.fill_(-1.0)
        mgr.close()  # waits; the executor is the caller's and stays open
        assert mgr.steps() == [3]  # retention ran in the child, right after its commit
        target = {"w": torch.empty(1000)}
        assert CheckpointManager(str(tmp_path / "run")).load(target) == 3
        assert torch.equal(target["w"], torch.full((1000,), 3.0))


def test_retention_keeps_in_progress_unpadded_step(backend):
    # step-5 (another tool's naming, or a save in progress) shares its number with the committed
    # step-0000000005 that retention deletes: only the committed prefix may go.
    root = backend.uri("run")
    store = backend.store()
    in_progress = parse_uri(root).child("step-5").key("__0_0.distcp")
    with CheckpointManager(root, keep_last=1, **backend.options) as mgr:
        mgr.save({"w": torch.ones(4)}, 5)
        store.put(in_progress, [b"uploading"], crc32c=crc.crc32c(b"uploading"))
        mgr.save({"w": torch.ones(4)}, 6)
        assert mgr.steps() == [6]
    assert store.head(in_progress) is not None
    assert backend.keys(f"{root}/step-0000000005") == []


def test_retention_does_not_follow_symlinked_step(tmp_path):
    import os

    outside = tmp_path / "outside"
    with CheckpointManager(str(outside)) as elsewhere:
        elsewhere.save({"w": torch.ones(4)}, 1)
    target = outside / step_name(1)
    before = sorted(os.listdir(target))
    root = tmp_path / "run"
    root.mkdir()
    os.symlink(target, root / step_name(1))
    with CheckpointManager(str(root), keep_last=1) as mgr:
        assert mgr.steps() == [1]
        mgr.save({"w": torch.zeros(4)}, 2)
        assert mgr.steps() == [2]
    assert not os.path.lexists(root / step_name(1))  # the link is gone ...
    assert sorted(os.listdir(target)) == before  # ... its target untouched
    os.symlink(target, root / step_name(1))
    with CheckpointManager(str(root)) as mgr:
        mgr.delete(1)
    assert sorted(os.listdir(target)) == before


def test_manager_accepts_prefix_strategy(tmp_path):
    root = str(tmp_path / "run")
    mgr = CheckpointManager(root, prefix_strategy="hash", verify=True)
    assert mgr.steps() == [] and mgr.latest() is None  # raised TypeError before
    assert mgr.writer_options == {"prefix_strategy": "hash"}
    assert mgr.reader_options == {"verify": True} and mgr.store_options == {}
    routed = CheckpointManager(root, allow_pickle=False, endpoint_url="http://127.0.0.1:1")
    assert routed.reader_options == {"allow_pickle": False, "endpoint_url": "http://127.0.0.1:1"}
    assert routed.writer_options == routed.store_options == {"endpoint_url": "http://127.0.0.1:1"}
    mgr.save({"w": torch.arange(6.0)}, 3)
    names = os.listdir(os.path.join(root, step_name(3)))
    assert any(n.endswith(".distcp") and "-__0_" in n for n in names), names  # the hash tag is in front
    target = {"w": torch.zeros(6)}
    assert mgr.load(target) == 3 and torch.equal(target["w"], torch.arange(6.0))
    mgr.close()
    with pytest.raises(TypeError, match="'prefix_stratgy'"):
        CheckpointManager(root, prefix_stratgy="hash")


def test_manager_sees_a_rank_local_commit(backend):
    import torch.distributed.checkpoint as dcp

    import cloudckpt

    root = backend.uri("run")
    writer = cloudckpt.storage_writer(f"{root}/{step_name(8)}", **backend.options)
    dcp.save({"w": torch.full((3,), 8.0)}, storage_writer=writer, no_dist=True, use_collectives=False)
    with CheckpointManager(root, keep_last=1, **backend.options) as mgr:
        assert mgr.steps() == [8] and mgr.latest() == 8
        mgr.save({"w": torch.full((3,), 9.0)}, 9)
        assert mgr.steps() == [9]  # retention knows the rank-local form as committed, too
