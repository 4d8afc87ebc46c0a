"""Async executors: repeated saves under training, reuse, errors from any rank, crash, close, shared memory, CUDA."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from tests import workers
from tests.dist import run_world


@pytest.fixture
def s3_and_gcs(request, tmp_path):
    """A fresh bucket on each cloud test server (moto S3 and the GCS emulator)."""
    from tests.conftest import make_backend

    return make_backend("s3", request, tmp_path), make_backend("gcs", request, tmp_path)


def test_repeated_async_saves_reuse_one_worker_and_report_any_ranks_error(s3_and_gcs):
    from cloudckpt_testing.faultproxy import FaultProxy, FaultRule

    s3, gcs = s3_and_gcs
    targets = [(s3.uri("run"), s3.options), (gcs.uri("run"), gcs.options)]
    # Rank 1's objects only are refused: the error starts on one rank.
    refuse_rank1 = [FaultRule(None, fault="status", status=403, path_regex=r"/__1_")]
    with FaultProxy(s3.endpoint, rules=refuse_rank1) as proxy:
        results = run_world(2, workers.repeated_async_saves, targets, ["thread", "process"], 5,
                            (s3.uri("bad"), dict(s3.options, endpoint_url=proxy.url)))
    for rank_result in results:
        for kind in ("thread", "process"):
            r = rank_result[kind]
            assert r["saves"] == 12, (kind, r)
            # Reuse: nothing new per save after the first (one worker thread, one child per rank).
            assert r["new_threads"] == [], (kind, r)
            assert r["new_children"] == [], (kind, r)
            assert not r["worker_alive_after_close"], (kind, r)
            # Every rank's future raises rank 1's own error, typed.
            assert r["bad_outcome"] == "AccessDeniedError", (kind, r)
            assert "__1_" in r["bad_detail"], (kind, r)
        p = rank_result["process"]
        assert p["children"] == 1 and p["pids"] == 1, p
        # The children rendezvoused through the trainer's own TCPStore: no port of our own.
        assert p["child_store_port"] == rank_result["trainer_port"] and not p["own_store"], p
    for kind in ("thread", "process"):
        for backend in (s3, gcs):
            for step in range(10):
                keys = backend.keys(backend.uri("run", kind, f"step-{step}"))
                assert (".metadata" in keys) == ((backend is s3) == (step % 2 == 0)), (kind, backend.name, step)
        assert ".metadata" not in s3.keys(s3.uri("bad", kind))
        assert s3.pending_uploads(s3.uri("bad", kind)) == []


@pytest.mark.parametrize("strategy", ["none", "hash"])
def test_killed_child_fails_every_rank_fast_and_commits_nothing(moto_server, tmp_path, request, strategy):
    # With prefix_strategy="hash" the objects are named 3f-__1_0.<token>.distcp: the parent must find the
    # dead child's uploads by the layout's names (it once listed __1_ and leaked them).
    from cloudckpt_testing.faultproxy import FaultProxy, FaultRule
    from tests.conftest import make_backend

    backend = make_backend("s3", request, tmp_path)
    uri = backend.uri("crash")
    # Parts hang for a minute: the kill always lands in the middle of an open multipart upload.
    stall = [FaultRule("UploadPart", fault="stall", stall_seconds=60.0)]
    with FaultProxy(moto_server.endpoint_url, rules=stall) as proxy:
        slow = dict(backend.options, endpoint_url=proxy.url, part_size=5 * 1024 * 1024, prefix_strategy=strategy)
        results = run_world(2, workers.crash_child_mid_upload, uri, slow, backend.options, 1,
                            backend.uri("after"))
    assert results[1]["outcome"] == "CheckpointWorkerError", results[1]
    assert "SIGKILL" in results[1]["detail"], results[1]
    assert results[0]["outcome"] == "CheckpointAbortedError", results[0]
    assert "rank 1" in results[0]["detail"], results[0]
    for r in results:
        assert r["elapsed"] < 30, r  # bounded: well before the 60 s stall or any collective timeout
        assert r["children"] == 2, r  # the executor started a fresh child for the next save
    assert ".metadata" not in backend.keys(uri)
    assert backend.pending_uploads(uri) == []


def test_process_executor_maps_staged_shared_memory_without_copying(moto_server, tmp_path, request):
    """Staged tensors are shared memory, reused across saves, and the child maps those very pages."""
    from cloudckpt.errors import CheckpointWorkerError
    from cloudckpt.executors import ProcessCheckpointExecutor
    from cloudckpt.api import async_save
    from cloudckpt.staging import Stager
    from tests.conftest import make_backend

    backend = make_backend("s3", request, tmp_path)
    probe = tmp_path / "probe.json"
    src = {"a": torch.randn(300, 100), "b": torch.arange(5000)}
    ex = ProcessCheckpointExecutor()
    stager = Stager(shared_memory=True)
    pids = []
    for step in range(2):
        src["a"].add_(1.0)
        writer = workers.ProbeS3Writer(backend.uri(f"shm-{step}"), probe=str(probe), **backend.options)
        writer.store.check_bucket()  # the parent now holds a live client: it must not travel
        resp = async_save(src, checkpoint_id=backend.uri(f"shm-{step}"), executor=ex, stager=stager,
                          storage_writer=writer)
        resp.upload_completion.result(timeout=120)
        pids.append(ex.pid)
    seen = json.loads(probe.read_text())
    # Staging the same source again returns the same (reused, refilled) shared buffers.
    staged = stager.stage(src)
    assert pids[0] == pids[1] == seen["pid"] and seen["pid"] != __import__("os").getpid()
    assert seen["arrived_with_store"] is False  # the child built its own client
    for name in ("a", "b"):
        storage = staged[name].untyped_storage()
        assert storage.is_shared() and seen["tensors"][name]["shared"]
        parent_map = workers._shm_mapping(storage.data_ptr())
        child_map = tuple(seen["tensors"][name]["mapping"])
        # Same device, inode and file offset: the child reads the parent's pages, not a copy.
        assert parent_map is not None and parent_map[:3] == child_map[:3], (parent_map, child_map)
    t = {"a": torch.empty(300, 100), "b": torch.empty(5000, dtype=torch.int64)}
    import cloudckpt

    cloudckpt.load(t, backend.uri("shm-1"), no_dist=True, **backend.options)
    assert torch.equal(t["a"], src["a"]) and torch.equal(t["b"], src["b"])
    ex.close()
    ex.close()  # twice is harmless
    stager.close()
    with pytest.raises(CheckpointWorkerError, match="closed"):
        async_save(src, checkpoint_id=backend.uri("shm-2"), executor=ex, no_dist=True, **backend.options)


def test_process_executor_refuses_a_writer_holding_a_live_client(tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from cloudckpt.errors import UnpicklableWriterError
    from cloudckpt.executors import ProcessCheckpointExecutor
    from cloudckpt.api import async_save
    from cloudckpt.writer import GCSStorageWriter

    client = storage.Client(project="p", credentials=AnonymousCredentials())
    with ProcessCheckpointExecutor() as ex:
        with pytest.raises(UnpicklableWriterError, match="live client"):
            async_save({"a": torch.ones(2)}, checkpoint_id="gs://bucket/x", executor=ex, no_dist=True,
                       storage_writer=GCSStorageWriter("gs://bucket/x", client=client))
        assert ex.pid is None  # refused before any process was started


def test_thread_executor_close_is_idempotent_and_refuses_new_saves(tmp_path):
    from cloudckpt.errors import CheckpointWorkerError
    from cloudckpt.executors import ThreadCheckpointExecutor
    from cloudckpt.api import async_save

    ex = ThreadCheckpointExecutor()
    async_save({"a": torch.ones(3)}, checkpoint_id=str(tmp_path / "a"), executor=ex,
               no_dist=True).upload_completion.result(timeout=120)
    ex.close()
    ex.close()
    assert not ex.worker_thread.is_alive()
    with pytest.raises(CheckpointWorkerError, match="closed"):
        async_save({"a": torch.ones(3)}, checkpoint_id=str(tmp_path / "b"), executor=ex, no_dist=True)


_EXIT_SCRIPT = """
import sys, torch
from cloudckpt.executors import ProcessCheckpointExecutor, ThreadCheckpointExecutor
from cloudckpt.api import async_save
root = sys.argv[1]
for name, ex in (("thread", ThreadCheckpointExecutor()), ("process", ProcessCheckpointExecutor())):
    async_save({"w": torch.full((1000,), 3.0)}, checkpoint_id=f"{root}/{name}", executor=ex, no_dist=True)
print("leaving with both saves in flight and nothing closed", flush=True)
"""


def test_interpreter_exit_closes_executors_without_hanging(tmp_path):
    import os
    import subprocess
    import sys

    import cloudckpt

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path)], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "leaving" in proc.stdout
    for name in ("thread", "process"):
        # close() at exit let the in-flight upload finish and commit.
        t = {"w": torch.empty(1000)}
        cloudckpt.load(t, str(tmp_path / name), no_dist=True)
        assert torch.equal(t["w"], torch.full((1000,), 3.0)), name


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_on_busy_raise_refuses_a_second_save_while_one_uploads(kind, tmp_path):
    from cloudckpt.errors import CheckpointInProgressError
    from cloudckpt.api import async_save

    gate = threading.Event()
    with workers._executor(kind, on_busy="raise") as ex:
        busy = ex._start(gate.wait)  # stands in for a long upload on the executor's worker
        with pytest.raises(CheckpointInProgressError, match="still uploading"):
            async_save({"a": torch.ones(1)}, checkpoint_id=str(tmp_path / "x"), executor=ex, no_dist=True)
        gate.set()
        busy.result(timeout=10)
        assert not ex.busy
        if kind == "thread":  # (a real save through the process executor is covered above)
            async_save({"a": torch.ones(1)}, checkpoint_id=str(tmp_path / "x"), executor=ex,
                       no_dist=True).upload_completion.result(timeout=60)


def test_on_busy_wait_serialises_saves_so_staging_never_overwrites_an_upload(tmp_path):
    from cloudckpt.executors import ThreadCheckpointExecutor
    from cloudckpt.api import async_save

    gate = threading.Event()
    with ThreadCheckpointExecutor() as ex:
        ex._start(gate.wait)
        threading.Timer(0.5, gate.set).start()
        resp = async_save({"a": torch.ones(1)}, checkpoint_id=str(tmp_path / "x"), executor=ex, no_dist=True)
        assert gate.is_set()  # async_save waited for the previous upload before staging
        resp.upload_completion.result(timeout=60)


def test_upload_error_reaches_the_future_typed(tmp_path):
    from cloudckpt.errors import CheckpointExistsError
    from cloudckpt.executors import ThreadCheckpointExecutor
    from cloudckpt.api import async_save

    with ThreadCheckpointExecutor() as ex:
        async_save({"a": torch.ones(1)}, checkpoint_id=str(tmp_path / "x"), executor=ex,
                   no_dist=True).upload_completion.result(timeout=60)
        resp = async_save({"a": torch.ones(1)}, checkpoint_id=str(tmp_path / "x"), executor=ex, no_dist=True)
        with pytest.raises(CheckpointExistsError, match="already exists"):
            resp.upload_completion.result(timeout=60)


def test_async_save_without_executor_or_stager_owns_and_closes_them(tmp_path):
    import cloudckpt

    resp = cloudckpt.async_save({"a": torch.arange(6)}, checkpoint_id=str(tmp_path / "o"), no_dist=True)
    assert resp.staging_completion.result(timeout=60) is None
    meta = resp.upload_completion.result(timeout=60)
    assert "a" in meta.state_dict_metadata
    t = {"a": torch.empty(6, dtype=torch.int64)}
    cloudckpt.load(t, str(tmp_path / "o"), no_dist=True)
    assert torch.equal(t["a"], torch.arange(6))


def test_executors_are_torch_async_executors():
    from torch.distributed.checkpoint._async_executor import _AsyncCheckpointExecutor

    import cloudckpt

    for cls in (cloudckpt.ThreadCheckpointExecutor, cloudckpt.ProcessCheckpointExecutor):
        assert issubclass(cls, _AsyncCheckpointExecutor)
    assert cloudckpt.async_save.__module__ == "cloudckpt.api"  # the façade sits above the executors
    assert {"staging_completion", "upload_completion"} <= set(cloudckpt.AsyncSaveResponse.__dataclass_fields__)


def test_stager_reuses_buffers_across_saves():
    from cloudckpt.staging import Stager

    src = {"w": torch.randn(64, 64)}
    with Stager() as st:
        a = st.stage(src)
        ptr = a["w"].data_ptr()
        src["w"].add_(1)
        b = st.stage(src)
        assert b["w"].data_ptr() == ptr  # same buffer, refilled in place
        assert torch.equal(b["w"], src["w"])


def test_shared_memory_stager_reuses_shared_buffers():
    from cloudckpt.staging import Stager

    src = {"w": torch.randn(64, 64), "n": 3}
    with Stager(shared_memory=True) as st:
        a = st.stage(src)
        assert a["w"].is_shared() and a["n"] == 3
        src["w"].mul_(2)
        b = st.stage(src)
        assert b["w"].data_ptr() == a["w"].data_ptr() and torch.equal(b["w"], src["w"])


def test_stager_without_cuda_asks_for_no_accelerator_feature():
    from cloudckpt.staging import Stager

    st = Stager(pin_memory=True, non_blocking=True)
    if torch.cuda.is_available():
        assert st.pin_memory and st.non_blocking
    else:
        assert not st.pin_memory and not st.non_blocking  # silently off: nothing warns or fails
        assert not st.stage({"w": torch.ones(4)})["w"].is_pinned()
    st.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_staging_uses_pinned_memory_and_non_blocking_copies(tmp_path):
    from cloudckpt.executors import ThreadCheckpointExecutor
    from cloudckpt.api import async_save
    from cloudckpt.staging import Stager

    src = {"w": torch.randn(1024, 1024, device="cuda")}
    with ThreadCheckpointExecutor() as ex, Stager() as st:
        assert st.pin_memory and st.non_blocking
        staged = st.stage(src)
        assert staged["w"].device.type == "cpu" and staged["w"].is_pinned()
        assert torch.equal(staged["w"], src["w"].cpu())  # the non-blocking copy was synchronised
        resp = async_save(src, checkpoint_id=str(tmp_path / "c"), executor=ex, stager=st, no_dist=True)
        resp.upload_completion.result(timeout=120)
    import cloudckpt

    t = {"w": torch.empty(1024, 1024)}
    cloudckpt.load(t, str(tmp_path / "c"), no_dist=True)
    assert torch.equal(t["w"], src["w"].cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_staging_for_the_process_executor_is_pinned_shared_memory(tmp_path):
    from cloudckpt.executors import ProcessCheckpointExecutor
    from cloudckpt.api import async_save
    from cloudckpt.staging import Stager

    src = {"w": torch.randn(512, 512, device="cuda")}
    with ProcessCheckpointExecutor() as ex, Stager(shared_memory=True) as st:
        staged = st.stage(src)
        assert staged["w"].is_pinned() and staged["w"].is_shared()
        async_save(src, checkpoint_id=str(tmp_path / "p"), executor=ex, stager=st,
                   no_dist=True).upload_completion.result(timeout=120)
    import cloudckpt

    t = {"w": torch.empty(512, 512)}
    cloudckpt.load(t, str(tmp_path / "p"), no_dist=True)
    assert torch.equal(t["w"], src["w"].cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_reaching_the_writer_directly_is_refused(tmp_path):
    import cloudckpt

    with pytest.raises(cloudckpt.UnsupportedTensorError, match="cuda"):
        cloudckpt.save({"w": torch.ones(3, device="cuda")}, str(tmp_path / "x"), no_dist=True)
