"""Multi-rank saves and loads on real gloo process groups in separate processes."""

from __future__ import annotations

import pytest

from cloudckpt.layout import parse_data_object_name

from tests import workers
from tests.conftest import closed_port
from tests.dist import run_world


# The full world-size matrix runs on S3; GCS runs both reshard directions and the
# local backend one, which keeps the suite's spawned-process count in check.
RESHARD_MATRIX = [("s3", 2, 2), ("s3", 4, 2), ("s3", 2, 4), ("gcs", 4, 2), ("gcs", 2, 4), ("local", 2, 4)]


@pytest.mark.parametrize("backend_name, save_world, load_world", RESHARD_MATRIX)
def test_sharded_save_and_reshard(backend_name, save_world, load_world, request, tmp_path):
    from tests.conftest import make_backend

    backend = make_backend(backend_name, request, tmp_path)
    uri = backend.uri("sharded")
    objs = run_world(save_world, workers.save_sharded, uri, backend.options, 7)
    assert all(objs), "every rank wrote a data object"
    keys = backend.keys(uri)
    assert ".metadata" in keys
    assert {parse_data_object_name(k)[0] for k in keys if k.endswith(".distcp")} <= set(range(save_world))
    assert all(run_world(load_world, workers.load_sharded, uri, backend.options, 7, save_world))


def test_failure_on_one_rank_commits_nothing(cloud_backend):
    uri = cloud_backend.uri("failed")
    bad = dict(cloud_backend.options, endpoint_url=f"http://127.0.0.1:{closed_port()}")
    if cloud_backend.name == "s3":
        bad["max_attempts"] = 1
    seen = run_world(2, workers.save_expect_failure, uri, cloud_backend.options, 1, bad)
    # Every rank fails the save, with the unreachable endpoint as the reason.
    assert seen == ["EndpointUnreachableError", "EndpointUnreachableError"], seen
    keys = cloud_backend.keys(uri)
    assert ".metadata" not in keys
    assert cloud_backend.pending_uploads(uri) == []


def test_failed_part_uploads_on_one_rank_abort_and_commit_nothing(moto_server, tmp_path, request):
    """Rank 1's UploadPart requests get HTTP 500 from a fault proxy in front of moto."""
    from cloudckpt_testing.faultproxy import FaultProxy, FaultRule
    from tests.conftest import make_backend

    backend = make_backend("s3", request, tmp_path)
    uri = backend.uri("partfail")
    rules = [FaultRule("UploadPart", fault="status", status=500, rate=1.0)]
    with FaultProxy(moto_server.endpoint_url, rules=rules, seed=1) as proxy:
        bad = dict(backend.options, endpoint_url=proxy.url, max_attempts=1, part_size=5 * 1024 * 1024)
        seen = run_world(2, workers.save_expect_failure, uri, dict(backend.options, part_size=5 * 1024 * 1024),
                         1, bad)
        stats = proxy.stats()
    assert seen == ["TransferError", "TransferError"], seen
    assert stats["faults"].get("UploadPart", {}).get("status", 0) >= 1
    assert stats["requests"].get("CreateMultipartUpload", 0) >= 1  # rank 1 did start an upload
    keys = backend.keys(uri)
    assert ".metadata" not in keys
    assert not [k for k in keys if (parse_data_object_name(k) or (None,))[0] == 1], keys
    assert backend.pending_uploads(uri) == []


def test_stock_writer_swallows_worker_errors_but_ours_raises(tmp_path, backend):
    """Regression: FileSystemWriter(thread_count=2) commits a checkpoint missing tensors (dcp_internals §4)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    import cloudckpt

    class FailingPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):
            if write_item.index.fqn == "t2":
                raise RuntimeError("injected failure resolving t2")
            return super().resolve_data(write_item)

    sd = {f"t{i}": torch.randn(1000) for i in range(4)}
    stock_dir = tmp_path / "stock"
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(stock_dir), thread_count=2), planner=FailingPlanner(),
             no_dist=True)  # returns normally: the bug
    meta = dcp.FileSystemReader(str(stock_dir)).read_metadata()
    assert "t2" not in {k.fqn for k in meta.storage_data}  # committed without t2

    uri = backend.uri("ours")
    with pytest.raises(BaseException, match="injected failure resolving t2"):
        cloudckpt.save(sd, uri, planner=FailingPlanner(), no_dist=True, **backend.options)
    assert ".metadata" not in backend.keys(uri)
