"""cloudckpt.verify: whole-checkpoint checks without loading into a model, and integrity errors on load."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import cloudckpt
from cloudckpt import layout
from cloudckpt import crc
from cloudckpt.errors import CheckpointNotFoundError, IntegrityError
from cloudckpt.transfer import TransferOptions
from cloudckpt.uri import parse_uri
from cloudckpt.manifest import MANIFEST_FORMAT, open_manifest, seal_manifest
from tests.helpers import empty_like_state_dict, realistic_state_dict

MiB = 1 << 20


def _objects(backend, uri: str) -> dict[str, bytes]:
    store = backend.store()
    base = parse_uri(uri).key("")
    return {o.key[len(base):]: store.get(o.key) for o in store.list(base)}


def _rewrite(backend, uri: str, name: str, data: bytes) -> None:
    backend.store().put(parse_uri(uri).key(name), [data], crc32c=crc.crc32c(data))


def _flip(backend, uri: str, name: str, offset: int) -> None:
    data = bytearray(_objects(backend, uri)[name])
    data[offset] ^= 0xFF
    _rewrite(backend, uri, name, bytes(data))


def _item_spans(uri: str, backend) -> dict[str, tuple[str, int, int]]:
    """fqn -> (object, offset, length) from the stored metadata."""
    from cloudckpt.safe_pickle import load_metadata

    meta = load_metadata(_objects(backend, uri)[".metadata"], uri)
    return {idx.fqn: (i.relative_path, i.offset, i.length) for idx, i in meta.storage_data.items()}


def _save(backend, name: str = "ck", **kw) -> tuple[str, dict]:
    sd = realistic_state_dict(3)
    uri = backend.uri(name)
    cloudckpt.save(sd, uri, no_dist=True, **backend.options, **kw)
    return uri, sd


def test_clean_checkpoint_verifies(backend):
    uri, _ = _save(backend, transfer_options=TransferOptions(target_object_size=64 * 1024))
    objs = _objects(backend, uri)
    seen: list[int] = []

    class Progress:
        total = None

        def __call__(self, n: int) -> None:
            seen.append(n)

        def set_total(self, n: int) -> None:
            Progress.total = n

    # Small pieces so items straddle piece boundaries.
    report = cloudckpt.verify(uri, piece_size=4096, max_concurrency=3, progress=Progress(), **backend.options)
    assert report.ok, report.problems
    assert report.checksums_verified and report.deep
    data = {k: v for k, v in objs.items() if k.endswith(".distcp")}
    assert len(data) > 1
    assert report.objects_checked == len(data)
    assert report.bytes_checked == sum(len(v) for v in data.values()) == Progress.total == sum(seen)
    assert report.items_checked == len(_item_spans(uri, backend))
    assert report.to_dict()["ok"] is True


@pytest.mark.parametrize("where", ["payload", "framing", "bytes_item"])
def test_flipped_byte_in_a_data_object_names_object_and_item(backend, where):
    uri, sd = _save(backend)
    spans = _item_spans(uri, backend)
    fqn = {"payload": "model.embed.weight", "framing": "model.embed.weight", "bytes_item": "run_name"}[where]
    name, offset, length = spans[fqn]
    # The payload sits in the middle of the record; the zip framing at its ends.
    pos = {"payload": offset + length // 2, "framing": offset + 10, "bytes_item": offset + length // 2}[where]
    _flip(backend, uri, name, pos)
    url = backend.store().url(parse_uri(uri).key(name))

    report = cloudckpt.verify(uri, **backend.options)
    assert not report.ok
    assert any(url in p and repr(fqn) in p and "CRC32C" in p for p in report.problems), report.problems

    target = empty_like_state_dict(sd)
    if where == "framing":
        # A tensor read straight into its target never reads its record's zip framing:
        # the load is correct, and verify (above) is what reports the damage.
        cloudckpt.load(target, uri, no_dist=True, **backend.options)
        assert torch.equal(target["model"]["embed.weight"], sd["model"]["embed.weight"])
        return
    with pytest.raises(IntegrityError) as info:
        cloudckpt.load(target, uri, no_dist=True, **backend.options)
    assert url in str(info.value) and repr(fqn) in str(info.value)


def test_flipped_byte_in_metadata_or_manifest_is_an_integrity_error(backend):
    for which in ("metadata", "manifest"):
        uri, sd = _save(backend, which)
        objs = _objects(backend, uri)
        name = ".metadata" if which == "metadata" else next(n for n in objs if layout.is_manifest_name(n))
        size = len(objs[name])
        _flip(backend, uri, name, size // 3)
        url = backend.store().url(parse_uri(uri).key(name))
        with pytest.raises(IntegrityError) as info:
            cloudckpt.load(empty_like_state_dict(sd), uri, no_dist=True, **backend.options)
        assert url in str(info.value)
        report = cloudckpt.verify(uri, **backend.options)
        assert not report.ok and any(url in p for p in report.problems), report.problems


def test_truncated_and_missing_objects_are_reported(cloud_backend):
    uri, _ = _save(cloud_backend, transfer_options=TransferOptions(target_object_size=64 * 1024))
    objs = _objects(cloud_backend, uri)
    data = sorted(k for k in objs if k.endswith(".distcp"))
    _rewrite(cloud_backend, uri, data[0], objs[data[0]][:-100])
    cloud_backend.store().delete(parse_uri(uri).key(data[1]))
    report = cloudckpt.verify(uri, **cloud_backend.options)
    assert not report.ok
    text = "\n".join(report.problems)
    assert data[0] in text and "truncated" in text
    assert any(data[1] in p and "missing" in p for p in report.problems), report.problems


def test_stock_checkpoint_verifies_structurally(backend, tmp_path):
    sd = realistic_state_dict(4)
    src = tmp_path / "stock"
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(src)), no_dist=True)
    uri = backend.uri("stock")
    backend.upload(str(src), uri)
    report = cloudckpt.verify(uri, **backend.options)
    assert report.ok, report.problems
    assert not report.checksums_verified
    assert any("no cloudckpt manifest" in n for n in report.notes)


def test_deep_check_compares_records_with_the_metadata(local_stock_with_swapped_shape):
    uri, fqn = local_stock_with_swapped_shape
    assert cloudckpt.verify(uri, deep=False).ok        # structure alone cannot see it
    report = cloudckpt.verify(uri)
    assert not report.ok
    assert any(repr(fqn) in p and "shape" in p for p in report.problems), report.problems


@pytest.fixture
def local_stock_with_swapped_shape(tmp_path) -> tuple[str, str]:
    """A stock checkpoint whose (4, 3) tensor record was replaced by a same-length (3, 4) one."""
    src = tmp_path / "swapped"
    dcp.save({"a": torch.zeros(4, 3), "b": torch.ones(2)}, storage_writer=dcp.FileSystemWriter(str(src)),
             no_dist=True)
    meta = dcp.FileSystemReader(str(src)).read_metadata()
    [info] = [i for idx, i in meta.storage_data.items() if idx.fqn == "a"]
    buf = io.BytesIO()
    torch.save(torch.zeros(3, 4), buf)
    record = buf.getvalue()
    path = os.path.join(str(src), info.relative_path)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    assert len(record) == info.length, "a (3, 4) record frames to the length of a (4, 3) one"
    data[info.offset:info.offset + info.length] = record
    with open(path, "wb") as f:
        f.write(data)
    return str(src), "a"


def test_byte_items_are_never_unpickled_by_verify(backend, tmp_path):
    sentinel = tmp_path / "pwned"
    uri = backend.uri("evil")
    cloudckpt.save({"a": torch.ones(3), "evil": _Evil(str(sentinel))}, uri, no_dist=True, **backend.options)
    sentinel.unlink(missing_ok=True)   # saving pickled it, and pickling ran nothing; be sure
    report = cloudckpt.verify(uri, **backend.options)
    # Checked with the restricted unpickler, as a load would: reported by key and class, never run.
    assert not report.ok
    [problem] = report.problems
    assert "'evil'" in problem and "system" in problem and "allow_pickle=True" in problem, problem
    assert not sentinel.exists()


class _Evil:
    """Pickles as a call to os.system (would create ``path`` if unpickled)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_no_checkpoint_to_verify(backend):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        cloudckpt.verify(backend.uri("nothing"), **backend.options)
    uri, _ = _save(backend, "uncommitted")
    backend.store().delete(parse_uri(uri).key(".metadata"))
    with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint"):
        cloudckpt.verify(uri, **backend.options)


def test_manifest_seal_round_trip_and_tamper_detection():
    doc = {"format": MANIFEST_FORMAT, "objects": {"__0_0.distcp": {"size": 3, "crc32c": 7}}, "items": {}}
    blob = seal_manifest(doc)
    assert open_manifest(blob, "m").doc == doc
    tampered = blob.replace(b'"size":3', b'"size":4')
    with pytest.raises(IntegrityError, match="manifest is corrupt"):
        open_manifest(tampered, "m")
    unsealed = blob[:blob.index(b',"manifest_crc32c"')] + b"}"
    with pytest.raises(IntegrityError, match="seal"):
        open_manifest(unsealed, "m")
    with pytest.raises(IntegrityError, match="not readable JSON"):
        open_manifest(b"{not json", "m")
    # Manifests of the first format (no seal) are still read.
    old = {"format": "cloudckpt-manifest/1", "objects": {}, "items": {}}
    assert open_manifest(json.dumps(old).encode(), "m").doc == old
