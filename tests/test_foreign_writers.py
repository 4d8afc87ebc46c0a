"""Checkpoints written by a foreign DCP writer: s3torchconnector's, with a nested prefix strategy (issue 14).

s3torchconnector's ``S3StorageWriter`` with a prefix strategy such as
``BinaryPrefixStrategy(epoch_num=3)`` puts each rank's data object in a
sub-folder (``0000000000/epoch_3/__0_0.distcp``), and its ``.metadata`` points
there. Here two real gloo ranks save a DTensor-sharded state that way into moto
through the AWS CRT client, and the ``cloudckpt`` command (``verify``, ``info``,
``ls``, ``cp``) and ``cloudckpt.load`` must see every object. The reverse
direction (cloudckpt writes, s3torchconnector's ``S3StorageReader`` reads) is
checked too.

The DCP classes of s3torchconnector take no endpoint; as benchmarks/methods.py
does, their file system is given a CRT client that has one (path-style
addressing: moto has no virtual-host DNS). The CRT client takes the test
credentials from the environment the ``moto_server`` fixture sets.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import cloudckpt
from cloudckpt import cli, layout
from tests.backends import new_bucket_name
from tests.dist import run_world

pytest.importorskip("s3torchconnector.dcp", reason="s3torchconnector[dcp] is not installed (it is in the test "
                    "extra: pip install -c constraints.txt -e '.[test]')")

# Two spawned ranks import torch and s3torchconnector before the first test runs; CI machines can be slow.
pytestmark = pytest.mark.timeout(600)

REGION = "us-east-1"
WORLD = 2
STEP = 3
#: Rows of the sharded tensor: each rank's shard (6 MiB) exceeds the CRT part size set below (5 MiB, the
#: S3 minimum), so each rank's data object goes up as a real multipart upload, as a large checkpoint would.
ROWS, COLS = 3 * 1024, 1024
PART_SIZE = 5 * 1024 * 1024


def expected_state() -> dict[str, Any]:
    """The full (unsharded) values every save here writes: two tensors and one non-tensor."""
    g = torch.Generator().manual_seed(14)
    return {
        "w": torch.randn(ROWS, COLS, generator=g),
        "b": torch.arange(37, dtype=torch.int64) * 3 - 5,
        "note": f"written by s3torchconnector at step {STEP}",
    }


def empty_target() -> dict[str, Any]:
    """A state dict of the right shapes and dtypes to load into."""
    return {"w": torch.zeros(ROWS, COLS), "b": torch.zeros(37, dtype=torch.int64), "note": ""}


def assert_exact(got: dict[str, Any]) -> None:
    """``got`` holds exactly what :func:`expected_state` saved."""
    want = expected_state()
    assert torch.equal(got["w"], want["w"])
    assert torch.equal(got["b"], want["b"]) and got["b"].dtype == torch.int64
    assert got["note"] == want["note"]


def _crt_file_system(endpoint: str, **kwargs: Any) -> Any:
    """s3torchconnector's DCP file system on a CRT client pointed at ``endpoint`` (path-style)."""
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    config = S3ClientConfig(force_path_style=True, part_size=PART_SIZE, max_attempts=3)
    return S3FileSystem(REGION, s3_client=S3Client(REGION, endpoint=endpoint, s3client_config=config), **kwargs)


def s3tc_writer(endpoint: str, uri: str, prefix_strategy: Any = None) -> Any:
    """s3torchconnector's ``S3StorageWriter`` for ``uri`` on the test server."""
    from s3torchconnector.dcp import S3StorageWriter

    writer = S3StorageWriter(REGION, uri, prefix_strategy=prefix_strategy)
    writer.fs = _crt_file_system(endpoint)
    return writer


def s3tc_reader(endpoint: str, uri: str) -> Any:
    """s3torchconnector's ``S3StorageReader`` (its default, range-coalescing reader) on the test server."""
    from s3torchconnector.dcp import S3StorageReader

    reader = S3StorageReader(REGION, uri)
    # prepare_local_plan hands byte ranges to this reader constructor: the new file system must share it.
    reader.fs = _crt_file_system(endpoint, reader_constructor=reader._reader_constructor)
    return reader


def save_with_s3torchconnector(rank: int, world: int, endpoint: str, uri: str) -> list[str]:
    """On each rank: save ``w`` sharded by rows (DTensor), ``b`` and ``note`` replicated, nested prefixes."""
    from s3torchconnector.dcp.s3_prefix_strategy import BinaryPrefixStrategy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = expected_state()
    state = {"w": distribute_tensor(full["w"], mesh, [Shard(0)]), "b": full["b"], "note": full["note"]}
    writer = s3tc_writer(endpoint, uri, BinaryPrefixStrategy(epoch_num=STEP))
    metadata = dcp.save(state, checkpoint_id=uri, storage_writer=writer)
    return sorted({sd.relative_path for sd in metadata.storage_data.values()})


@dataclass(frozen=True)
class Foreign:
    """One checkpoint written by s3torchconnector on two ranks, and what the foreign side says it holds."""

    endpoint: str
    bucket: str
    root: str
    uri: str
    key: str
    #: Object names (relative to the checkpoint) that ``.metadata`` references.
    data_objects: tuple[str, ...]
    #: Every object under the checkpoint's prefix, name -> size, as boto3 lists it.
    sizes: dict[str, int]

    def ep(self) -> list[str]:
        return ["--endpoint-url", self.endpoint]


def _listing(endpoint: str, bucket: str, prefix: str) -> dict[str, int]:
    from cloudckpt_testing.s3 import s3_client

    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def foreign(moto_server: Any) -> Foreign:
    """Two gloo ranks save with s3torchconnector's S3StorageWriter + BinaryPrefixStrategy(epoch_num=3)."""
    from cloudckpt_testing.s3 import s3_client

    endpoint = moto_server.endpoint_url
    bucket = new_bucket_name()
    s3_client(endpoint).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/run"
    uri = f"{root}/step-{STEP:010d}"
    per_rank = run_world(WORLD, save_with_s3torchconnector, endpoint, uri, timeout=480.0)
    key = f"run/step-{STEP:010d}/"
    # What the foreign reader itself says .metadata references (not cloudckpt's parser).
    metadata = s3tc_reader(endpoint, uri).read_metadata()
    data = tuple(sorted({sd.relative_path for sd in metadata.storage_data.values()}))
    assert list(data) == per_rank[0] == per_rank[1]
    return Foreign(endpoint, bucket, root, uri, key, data, _listing(endpoint, bucket, key))


def _cli_json(capsys: Any, argv: list[str], code: int = 0) -> Any:
    """Run ``cloudckpt ARGV --json`` in this process; check the exit status; return the JSON document."""
    capsys.readouterr()
    got = cli.main([*argv, "--json"])
    captured = capsys.readouterr()
    assert got == code, f"cloudckpt {' '.join(argv)} -> {got}\nstdout:\n{captured.out}\nstderr:\n{captured.err}"
    return json.loads(captured.out)


def test_foreign_layout_is_nested(foreign: Foreign) -> None:
    # The premise of every test below: one data object per rank, each in a sub-folder, and nothing else.
    assert len(foreign.data_objects) == WORLD
    assert all(name.count("/") >= 2 and f"epoch_{STEP}/" in name for name in foreign.data_objects)
    assert len({name.rsplit("/", 1)[0] for name in foreign.data_objects}) == WORLD  # a folder per rank
    assert set(foreign.sizes) == {".metadata", *foreign.data_objects}
    # Each shard (6 MiB) went up in parts through the CRT client: a multipart object's ETag ends in -<parts>.
    from cloudckpt_testing.s3 import s3_client

    client = s3_client(foreign.endpoint)
    for name in foreign.data_objects:
        assert foreign.sizes[name] > PART_SIZE
        etag = client.head_object(Bucket=foreign.bucket, Key=foreign.key + name)["ETag"].strip('"')
        assert etag.endswith("-2"), (name, etag)


def test_foreign_load_exact(foreign: Foreign) -> None:
    got = empty_target()
    cloudckpt.load(got, foreign.uri, endpoint_url=foreign.endpoint)
    assert_exact(got)


def test_foreign_verify_cli_and_api(foreign: Foreign, capsys: Any) -> None:
    doc = _cli_json(capsys, ["verify", foreign.uri, *foreign.ep()])
    assert doc["ok"] is True and doc["problems"] == [] and doc["unsupported"] == []
    assert doc["checksums_verified"] is False  # s3torchconnector writes no cloudckpt manifest
    report = cloudckpt.verify(foreign.uri, endpoint_url=foreign.endpoint)
    assert report.ok, report.problems
    assert report.objects_checked == len(foreign.data_objects)
    assert report.items_checked == doc["items_checked"] > 0
    assert report.bytes_checked == sum(foreign.sizes[n] for n in foreign.data_objects)


def test_foreign_info(foreign: Foreign, capsys: Any) -> None:
    info = _cli_json(capsys, ["info", foreign.uri, *foreign.ep()])
    assert info["ranks"] == [0, 1] and info["world_size"] == WORLD
    assert info["objects"] == 1 + len(foreign.data_objects)
    assert info["stored_bytes"] == sum(foreign.sizes.values())
    assert info["missing"] == []
    assert info["tensors"] == 2 and info["byte_items"] == 1
    items = {i["key"]: i for i in info["items"]}
    assert items["w"]["shape"] == [ROWS, COLS] and items["w"]["chunks"] == WORLD
    assert items["b"]["dtype"] == "int64" and items["note"]["kind"] == "bytes"


def test_foreign_ls_checkpoint_and_root(foreign: Foreign, capsys: Any) -> None:
    listed = _cli_json(capsys, ["ls", foreign.uri, *foreign.ep()])
    assert listed["committed"] is True
    assert {o["name"]: o["size"] for o in listed["objects"]} == foreign.sizes
    assert listed["bytes"] == sum(foreign.sizes.values())
    root = _cli_json(capsys, ["ls", foreign.root, *foreign.ep()])
    [entry] = [e for e in root["checkpoints"] if e["kind"] == "checkpoint"]
    assert entry["uri"] == foreign.uri and entry["step"] == STEP and entry["committed"] is True
    assert entry["objects"] == len(foreign.sizes) and entry["bytes"] == sum(foreign.sizes.values())


def test_foreign_cp_to_local_dir(foreign: Foreign, tmp_path: Any, capsys: Any) -> None:
    dst = str(tmp_path / "copy")
    doc = _cli_json(capsys, ["cp", foreign.uri, dst, *foreign.ep()])
    assert doc["objects"] == len(foreign.sizes) and doc["bytes"] == sum(foreign.sizes.values())
    for name, size in foreign.sizes.items():
        assert os.path.getsize(os.path.join(dst, *name.split("/"))) == size, name
    got = empty_target()
    cloudckpt.load(got, dst)
    assert_exact(got)
    # The stock reader, which knows nothing of cloudckpt, loads the copy too.
    stock = empty_target()
    dcp.load(stock, storage_reader=dcp.FileSystemReader(dst), no_dist=True)
    assert_exact(stock)
    assert _cli_json(capsys, ["verify", dst])["ok"] is True


def test_foreign_cp_to_another_bucket_prefix(foreign: Foreign, capsys: Any) -> None:
    from cloudckpt_testing.s3 import s3_client

    bucket = new_bucket_name()
    s3_client(foreign.endpoint).create_bucket(Bucket=bucket)
    dst = f"s3://{bucket}/copies/step-{STEP:010d}"
    doc = _cli_json(capsys, ["cp", foreign.uri, dst, *foreign.ep()])
    assert doc["objects"] == len(foreign.sizes)
    assert _listing(foreign.endpoint, bucket, f"copies/step-{STEP:010d}/") == foreign.sizes
    got = empty_target()
    cloudckpt.load(got, dst, endpoint_url=foreign.endpoint)
    assert_exact(got)
    # The copy is still s3torchconnector's layout: its own reader loads it.
    back = empty_target()
    dcp.load(back, storage_reader=s3tc_reader(foreign.endpoint, dst), no_dist=True)
    assert_exact(back)
    assert _cli_json(capsys, ["info", dst, *foreign.ep()])["ranks"] == [0, 1]
    # rm of the copy deletes its sub-folders too, and nothing of the source.
    removed = _cli_json(capsys, ["rm", dst, "--yes", *foreign.ep()])
    assert removed["deleted_objects"] == len(foreign.sizes)
    assert _listing(foreign.endpoint, bucket, "") == {}
    assert _listing(foreign.endpoint, foreign.bucket, foreign.key) == foreign.sizes


def test_cloudckpt_checkpoint_loads_with_s3torchconnector_reader(moto_server: Any) -> None:
    from cloudckpt_testing.s3 import s3_client

    endpoint = moto_server.endpoint_url
    bucket = new_bucket_name()
    s3_client(endpoint).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/run/step-{STEP:010d}"
    cloudckpt.save(expected_state(), uri, endpoint_url=endpoint, no_dist=True)
    names = _listing(endpoint, bucket, f"run/step-{STEP:010d}/")
    assert any(layout.is_manifest_name(n) for n in names)  # really cloudckpt's layout, manifest and all
    got = empty_target()
    dcp.load(got, storage_reader=s3tc_reader(endpoint, uri), no_dist=True)
    assert_exact(got)
    # And the .metadata s3torchconnector read names only objects that exist.
    metadata = pickle.loads(s3_client(endpoint).get_object(
        Bucket=bucket, Key=f"run/step-{STEP:010d}/.metadata")["Body"].read())
    assert {sd.relative_path for sd in metadata.storage_data.values()} <= set(names)
