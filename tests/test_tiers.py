"""Multi-tier checkpoints (cloudckpt/tiers.py): local tier, peer replicas, persistence, restore from any tier.

One box: each "node" is a group of ranks with its own local_dir and torchrun-style env
(tests/tier_workers.py). Real gloo process groups, real moto S3 server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Any

import pytest

from cloudckpt import layout
from cloudckpt.tiers import Topology, clean_local_dir, local_steps, read_marker
from tests import tier_workers
from tests.backends import new_bucket_name
from tests.dist import run_signalled_world, run_world, run_world_with_deaths

TIMEOUT = 600.0


def _s3_root(moto_server) -> dict:
    import boto3

    bucket = new_bucket_name()
    boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"root": f"s3://{bucket}/run", "store": {"endpoint_url": moto_server.endpoint_url}}


def _steps(node_dir: str) -> dict[int, bool]:
    """step -> committed (node marker present and valid) in one node's local_dir."""
    return {s: read_marker(p, s) is not None for s, p in local_steps(node_dir).items()}


# -- placement and markers (no processes) --------------------------------------------------------------


def test_partners_are_same_local_rank_on_next_nodes() -> None:
    topo = Topology(nodes=(0, 0, 1, 1, 2, 2), local_ranks=(0, 1, 0, 1, 0, 1))
    assert topo.partners(0, 1) == [2] and topo.partners(3, 1) == [5] and topo.partners(5, 1) == [1]
    assert topo.partners(0, 2) == [2, 4]
    assert topo.partners(0, 5) == [2, 4]  # never more copies than other nodes
    assert topo.partners(0, 0) == []
    assert topo.node_holds(1, 1) == [0, 1, 2, 3]
    assert Topology(nodes=(0, 0), local_ranks=(0, 1)).partners(1, 1) == []  # one node: nowhere to replicate


def test_malformed_markers_count_as_uncommitted_and_are_cleaned(tmp_path) -> None:
    good = tmp_path / layout.step_name(3)
    good.mkdir()
    doc = {"format": "cloudckpt-node-commit/1", "step": 3, "node": 0, "world_size": 2, "ranks": [0, 1],
           "metadata_crc32c": 5, "manifest": layout.manifest_name("ab" * 16)}
    (good / layout.NODE_COMMIT_NAME).write_text(json.dumps(doc))
    (good / "__0_0.distcp.tmp-123").write_bytes(b"x")
    assert read_marker(str(good), 3) is not None
    assert read_marker(str(good), 4) is None  # a marker for another step
    for bad in ({**doc, "ranks": [0, 7]}, {**doc, "manifest": "../../etc/passwd"}, {**doc, "world_size": True}):
        d = tmp_path / layout.step_name(9)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / layout.NODE_COMMIT_NAME).write_text(json.dumps({**bad, "step": 9}))
        assert read_marker(str(d), 9) is None
    (tmp_path / layout.step_name(5)).mkdir()  # no marker: a failed save
    big = tmp_path / layout.step_name(6)
    big.mkdir()
    (big / layout.NODE_COMMIT_NAME).write_bytes(b" " * (2 * 1024 * 1024))
    assert read_marker(str(big), 6) is None
    assert sorted(clean_local_dir(str(tmp_path))) == [5, 6, 9]
    assert sorted(os.listdir(good)) == [layout.NODE_COMMIT_NAME]


def test_bad_local_every_and_persist_every_are_refused(tmp_path) -> None:
    import cloudckpt

    with pytest.raises(ValueError, match="persist_every"):
        cloudckpt.CheckpointManager(str(tmp_path / "s"), local_dir=str(tmp_path / "l"), local_every=3,
                                    persist_every=10, preemption=False)
    with pytest.raises(ValueError, match="replicas"):
        cloudckpt.CheckpointManager(str(tmp_path / "s"), local_dir=str(tmp_path / "l"), replicas=-1,
                                    preemption=False)


# -- 4 ranks as 2 nodes x 2 ---------------------------------------------------------------------------


def test_save_restore_every_tier_and_reshard(moto_server, tmp_path) -> None:
    import cloudckpt

    cfg = dict(_s3_root(moto_server), base=str(tmp_path / "local"), local_world=2, last=7)
    saved = run_world(4, tier_workers.save_steps, cfg, timeout=TIMEOUT)
    assert [r["partners"] for r in saved] == [[2], [3], [0], [1]]
    assert all(r["local"] == [layout.step_name(6), layout.step_name(7)]
                                               for r in saved), saved
    nodes = [str(tmp_path / "local" / f"node{n}") for n in (0, 1)]
    for node in nodes:
        assert _steps(node) == {6: True, 7: True}  # keep_local=2, both committed
        # each node holds its own ranks' objects and its partners' replicas: all four ranks
        objs = {layout.parse_data_object_name(n)[0] for n in os.listdir(os.path.join(node, layout.step_name(7)))
                if layout.parse_data_object_name(n)}
        assert objs == {0, 1, 2, 3}
    mgr = cloudckpt.CheckpointManager(cfg["root"], preemption=False, **cfg["store"])
    assert mgr.steps() == [5]  # the object store holds only persisted steps
    assert list(cloudckpt.manager.step_prefixes(mgr.store, mgr.root)) == [5]

    # A step whose replicas did not complete: node 0 committed a copy of step 8 that holds only its own
    # ranks, node 1 has nothing. It must never be chosen.
    src, dst = os.path.join(nodes[0], layout.step_name(7)), os.path.join(nodes[0], layout.step_name(8))
    shutil.copytree(src, dst)
    marker = json.loads(open(os.path.join(dst, layout.NODE_COMMIT_NAME)).read())
    marker.update(step=8, ranks=[0, 1])
    with open(os.path.join(dst, layout.NODE_COMMIT_NAME), "w") as f:
        json.dump(marker, f)

    # 4 -> 2 ranks (2 nodes x 1) from the local tier: every node holds all objects.
    assert run_world(2, tier_workers.load_phases, dict(cfg, local_world=1, phases=[[]]),
                     timeout=TIMEOUT) == [[(7, "local")]] * 2
    # A fresh 4-rank job: step 7 from local; node 1 wiped: step 7 from node 0's replicas;
    # both wiped: step 5 from the object store.
    phases = run_world(4, tier_workers.load_phases, dict(cfg, phases=[[], [1], [0, 1]]), timeout=TIMEOUT)
    assert phases == [[(7, "local"), (7, "replica"), (5, "object_store")]] * 4
    # 4 -> 2 ranks from the object store.
    assert run_world(2, tier_workers.load_phases, dict(cfg, local_world=1, phases=[[0, 1]]),
                     timeout=TIMEOUT) == [[(5, "object_store")]] * 2


def test_rank_killed_while_replicating_leaves_previous_step(moto_server, tmp_path) -> None:
    cfg = dict(_s3_root(moto_server), base=str(tmp_path / "local"), local_world=2, victim=3)
    results, dead = run_world_with_deaths(4, tier_workers.die_while_replicating, cfg, expect_dead={3},
                                          timeout=TIMEOUT)
    assert dead == {3: 17}
    assert all(r != "saved" for r in results.values()), results
    for n in (0, 1):
        steps = _steps(str(tmp_path / "local" / f"node{n}"))
        assert steps.get(2) is True and steps.get(3) is not True, steps
    phases = run_world(4, tier_workers.load_phases, dict(cfg, phases=[[]]), timeout=TIMEOUT)
    assert phases == [[(2, "local")]] * 4


def test_received_objects_are_published_only_with_the_manifest_checksum(tmp_path) -> None:
    from cloudckpt import crc
    from cloudckpt.tiers import Transfer, _InStream

    good = Transfer(1, 0, "__1_0.distcp", 4, crc.crc32c(b"abcd"))
    bad = Transfer(1, 0, "__1_1.distcp", 4, crc.crc32c(b"abcd"))
    stream = _InStream(str(tmp_path), [good, bad])
    stream.consume(memoryview(b"ab"))
    stream.consume(memoryview(b"cdabce"))  # the second object arrives damaged
    assert stream.left == 0 and len(stream.errors) == 1 and "__1_1.distcp" in stream.errors[0]
    assert os.listdir(tmp_path) == ["__1_0.distcp"]  # no temp file, no damaged object
    assert (tmp_path / "__1_0.distcp").read_bytes() == b"abcd"


# -- the process executor (2 ranks as 2 nodes x 1) -------------------------------------------------------


def test_async_save_through_process_executor(moto_server, tmp_path) -> None:
    import cloudckpt

    cfg = dict(_s3_root(moto_server), base=str(tmp_path / "local"), local_world=1, last=5)
    saved = run_world(2, tier_workers.async_save_with_processes, cfg, timeout=TIMEOUT)
    for r in saved:
        # one long-lived checkpoint process per rank did every DCP write
        assert r["children"] == 1 and r["child_pid"] not in (None, r["pid"]), r
        assert r["replicated"] and r["persisted"] == {5: "committed"}, r
        assert r["local"] == [layout.step_name(4), layout.step_name(5)], r
    for n in (0, 1):
        node = str(tmp_path / "local" / f"node{n}")
        assert _steps(node) == {4: True, 5: True}
        objs = {layout.parse_data_object_name(x)[0] for x in os.listdir(os.path.join(node, layout.step_name(5)))
                if layout.parse_data_object_name(x)}
        assert objs == {0, 1}  # its own rank's objects and its partner's replica
    mgr = cloudckpt.CheckpointManager(cfg["root"], preemption=False, **cfg["store"])
    assert mgr.steps() == [5]
    phases = run_world(2, tier_workers.load_phases, dict(cfg, phases=[[], [1], [0, 1]]), timeout=TIMEOUT)
    assert phases == [[(5, "local"), (5, "replica"), (5, "object_store")]] * 2


# -- preemption: a real SIGTERM to one rank of 2 nodes x 1 ---------------------------------------------------


def _run_signalled(world: int, cfg: dict[str, Any], victim: int) -> list[dict[str, Any]]:
    """Spawn the training ranks, SIGTERM rank ``victim`` once all are training; every rank must exit 0."""
    return run_signalled_world(tier_workers.train_until_preempted, world, cfg,
                               lambda pids, _: os.kill(pids[victim], signal.SIGTERM), timeout=TIMEOUT,
                               store_timeout=300.0, ready_timeout=300.0, join_timeout=60.0)


def _preempted(moto_server: Any, tmp_path: Any, grace: float) -> tuple[dict[str, Any], int]:
    ready = tmp_path / "ready"
    ready.mkdir()
    cfg = dict(_s3_root(moto_server), base=str(tmp_path / "local"), local_world=1, grace=grace,
               ready_dir=str(ready), env={"AWS_EC2_METADATA_DISABLED": "true", "NO_GCE_CHECK": "true"})
    results = _run_signalled(2, cfg, victim=1)
    stops = {r["step"] for r in results}
    assert len(stops) == 1 and all(r["stopped"] for r in results), results
    assert [r["source"] for r in results] == ["peer", "signal"], results
    step = stops.pop()
    for r in results:
        assert r["local"][-1] == step, r  # the emergency step is committed on both nodes
    return cfg, step


def test_sigterm_emergency_save_goes_to_local_tier_then_object_store(moto_server, tmp_path) -> None:
    import cloudckpt

    cfg, step = _preempted(moto_server, tmp_path, grace=120.0)
    mgr = cloudckpt.CheckpointManager(cfg["root"], preemption=False, **cfg["store"])
    assert step in mgr.steps()  # the grace allowed persisting it, whatever persist_every says
    assert all(s % 4 == 0 or s == step for s in mgr.steps()), mgr.steps()
    phases = run_world(2, tier_workers.load_phases, dict(cfg, phases=[[], [1], [0, 1]]), timeout=TIMEOUT)
    assert phases == [[(step, "local"), (step, "replica"), (step, "object_store")]] * 2


def test_sigterm_with_no_grace_left_keeps_the_step_in_the_local_tier(moto_server, tmp_path) -> None:
    import cloudckpt

    # The grace (10 ms) is over before the agreed step is reached (each step sleeps 50 ms): the emergency step
    # still goes to the local tier and its replicas, and no rank starts persisting it.
    cfg, step = _preempted(moto_server, tmp_path, grace=0.01)
    mgr = cloudckpt.CheckpointManager(cfg["root"], preemption=False, **cfg["store"])
    durable = mgr.steps()
    assert all(s % 4 == 0 for s in durable), durable  # only the background persists, never the emergency one
    assert run_world(2, tier_workers.load_phases, dict(cfg, phases=[[]]), timeout=TIMEOUT) == [[(step, "local")]] * 2
    if step % 4:
        assert step not in durable
        if durable:
            assert run_world(2, tier_workers.load_phases, dict(cfg, phases=[[0, 1]]), timeout=TIMEOUT) == \
                [[(max(durable), "object_store")]] * 2
