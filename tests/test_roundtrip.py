"""Single-process save/load through every backend, and interop with stock DCP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import cloudckpt
from cloudckpt import layout
from tests.helpers import assert_state_equal, empty_like_state_dict, realistic_state_dict


def test_round_trip_realistic_state_dict(backend):
    sd = realistic_state_dict()
    uri = backend.uri("run", "step-1")
    cloudckpt.save(sd, uri, no_dist=True, **backend.options)
    target = empty_like_state_dict(sd)
    cloudckpt.load(target, uri, no_dist=True, **backend.options)
    assert_state_equal(sd, target)


def test_layout_is_dcp_filesystem_layout(backend):
    sd = realistic_state_dict()
    uri = backend.uri("ck")
    cloudckpt.save(sd, uri, no_dist=True, **backend.options)
    keys = backend.keys(uri)
    assert ".metadata" in keys
    data = [k for k in keys if k.endswith(".distcp")]
    assert data and all(k.startswith("__0_") for k in data)
    # Nothing besides data, .metadata and this save's manifest sidecar.
    rest = set(keys) - set(data) - {".metadata"}
    assert len(rest) == 1 and layout.is_manifest_name(rest.pop())


def test_stock_filesystem_reader_loads_a_downloaded_checkpoint(backend, tmp_path):
    sd = realistic_state_dict(1)
    uri = backend.uri("ck")
    cloudckpt.save(sd, uri, no_dist=True, **backend.options)
    local = tmp_path / "copy"
    backend.download(uri, str(local))
    target = empty_like_state_dict(sd)
    dcp.load(target, storage_reader=dcp.FileSystemReader(str(local)), no_dist=True)
    assert_state_equal(sd, target)


def test_reader_loads_a_stock_filesystem_writer_checkpoint(backend, tmp_path):
    sd = realistic_state_dict(2)
    src = tmp_path / "stock"
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(src), thread_count=2), no_dist=True)
    uri = backend.uri("uploaded")
    backend.upload(str(src), uri)
    target = empty_like_state_dict(sd)
    cloudckpt.load(target, uri, no_dist=True, **backend.options)
    assert_state_equal(sd, target)


def test_multipart_objects_and_several_objects_per_rank(backend):
    # Small part and object sizes force multipart uploads and object splitting.
    sd = {f"t{i}": torch.randn(700_000 + i) for i in range(4)}  # ~2.8 MB each
    uri = backend.uri("mp")
    opts = dict(backend.options)
    writer = cloudckpt.storage_writer(uri, part_size=5 * 1024 * 1024, target_object_size=6 * 1024 * 1024, **opts)
    if backend.name == "local":
        writer = cloudckpt.storage_writer(uri, part_size=1024 * 1024, target_object_size=6 * 1024 * 1024)
    cloudckpt.save(sd, uri, storage_writer=writer, no_dist=True)
    data = [k for k in backend.keys(uri) if k.endswith(".distcp")]
    assert len(data) == 2, data
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    cloudckpt.load(target, uri, no_dist=True, **backend.options)
    assert_state_equal(sd, target)


def test_overwrite_false_refuses_before_uploading(backend):
    uri = backend.uri("ck")
    cloudckpt.save({"a": torch.ones(4)}, uri, no_dist=True, **backend.options)
    before = backend.keys(uri)
    with pytest.raises(cloudckpt.CheckpointExistsError, match="overwrite=True"):
        cloudckpt.save({"a": torch.zeros(4), "b": torch.ones(1000)}, uri, no_dist=True, **backend.options)
    assert backend.keys(uri) == before
    target = {"a": torch.empty(4)}
    cloudckpt.load(target, uri, no_dist=True, **backend.options)
    assert torch.equal(target["a"], torch.ones(4))


def test_overwrite_true_replaces_and_removes_stale_objects(backend):
    uri = backend.uri("ck")
    big = {f"t{i}": torch.full((1000,), float(i)) for i in range(3)}
    w = cloudckpt.storage_writer(uri, target_object_size=2000, **backend.options)
    cloudckpt.save(big, uri, storage_writer=w, no_dist=True)
    assert len([k for k in backend.keys(uri) if k.endswith(".distcp")]) == 3
    cloudckpt.save({"t0": torch.full((1000,), 9.0)}, uri, overwrite=True, no_dist=True, **backend.options)
    assert len([k for k in backend.keys(uri) if k.endswith(".distcp")]) == 1
    target = {"t0": torch.empty(1000)}
    cloudckpt.load(target, uri, no_dist=True, **backend.options)
    assert torch.equal(target["t0"], torch.full((1000,), 9.0))


def test_load_of_missing_checkpoint_names_the_uri(backend):
    uri = backend.uri("never-saved")
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match="never-saved"):
        cloudckpt.load({"a": torch.empty(1)}, uri, no_dist=True, **backend.options)


def test_meta_tensor_is_refused_with_a_typed_error(backend):
    uri = backend.uri("meta")
    with pytest.raises(cloudckpt.UnsupportedTensorError, match="meta"):
        cloudckpt.save({"w": torch.empty(3, device="meta")}, uri, no_dist=True, **backend.options)
    assert ".metadata" not in backend.keys(uri)


def test_writer_and_reader_pickle_without_live_clients(backend):
    import pickle

    uri = backend.uri("pk")
    w = cloudckpt.storage_writer(uri, **backend.options)
    _ = w.store  # create the client
    w2 = pickle.loads(pickle.dumps(w))
    assert w2._store is None and w2.uri == w.uri
    cloudckpt.save({"x": torch.arange(5)}, uri, storage_writer=w2, no_dist=True)
    r = pickle.loads(pickle.dumps(cloudckpt.storage_reader(uri, **backend.options)))
    t = {"x": torch.empty(5, dtype=torch.int64)}
    cloudckpt.load(t, uri, storage_reader=r, no_dist=True)
    assert torch.equal(t["x"], torch.arange(5))


def test_dcp_save_and_load_accept_our_writer_directly(backend):
    uri = backend.uri("direct")
    sd = {"w": torch.randn(10, 10), "step": 3}
    dcp.save(sd, checkpoint_id=uri, storage_writer=cloudckpt.storage_writer(uri, **backend.options), no_dist=True)
    t = {"w": torch.empty(10, 10), "step": 0}
    dcp.load(t, checkpoint_id=uri, storage_reader=cloudckpt.storage_reader(uri, **backend.options), no_dist=True)
    assert torch.equal(t["w"], sd["w"]) and t["step"] == 3
