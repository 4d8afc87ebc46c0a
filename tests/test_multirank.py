"""Multi-rank saves and loads on real gloo process groups in separate processes."""

from __future__ import annotations

import pytest

from tests import workers
from tests.conftest import closed_port
from tests.dist import run_world


@pytest.mark.parametrize("save_world, load_world", [(2, 2), (4, 2), (2, 4)])
def test_sharded_save_and_reshard(backend, save_world, load_world):
    if backend.name != "s3" and (save_world, load_world) != (2, 4):
        pytest.skip("full world-size matrix runs on S3; other backends run the 2 -> 4 reshard")
    uri = backend.uri("sharded")
    objs = run_world(save_world, workers.save_sharded, uri, backend.options, 7)
    assert all(objs), "every rank wrote a data object"
    keys = backend.keys(uri)
    assert ".metadata" in keys
    assert {k.split("_")[2] for k in keys if k.endswith(".distcp")} <= {str(r) for r in range(save_world)}
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
