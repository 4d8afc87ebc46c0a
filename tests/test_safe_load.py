"""Safe load: crafted .metadata and tensor records that would run code under plain pickle are refused."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo

import cloudckpt
from cloudckpt import layout
from cloudckpt.errors import IntegrityError, UnsafeCheckpointItemError, UnsafeMetadataError
from cloudckpt.safe_pickle import load_metadata
from cloudckpt.uri import parse_uri


class _Touch:
    """Unpickles as ``os.makedirs(path)``: creates ``path``, the proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _stock_metadata(tmp_path) -> object:
    src = tmp_path / "ref"
    dcp.save({"a": torch.ones(3), "step": 1}, storage_writer=dcp.FileSystemWriter(str(src)), no_dist=True)
    with open(src / ".metadata", "rb") as f:
        return pickle.load(f)  # our own, just written: trusted


def _crafted(kind: str, sentinel: str, tmp_path) -> bytes:
    if kind == "bare":
        return pickle.dumps(_Touch(sentinel))
    if kind == "nested":
        # A real Metadata with the payload buried inside it.
        meta = _stock_metadata(tmp_path)
        meta.planner_data = {"x": [1, _Touch(sentinel)]}
        return pickle.dumps(meta)
    if kind == "protocol2":
        return pickle.dumps(_Touch(sentinel), protocol=2)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bare", "nested", "protocol2"])
def test_crafted_metadata_would_run_code_but_is_refused(backend, tmp_path, kind):
    sentinel = str(tmp_path / f"pwned-{kind}")
    blob = _crafted(kind, sentinel, tmp_path)
    # Plain pickle runs it: this is what stock DCP's reader would do with the object.
    pickle.loads(blob)
    assert os.path.exists(sentinel)
    os.rmdir(sentinel)

    uri = backend.uri("crafted")
    cloudckpt.save({"a": torch.ones(3)}, uri, no_dist=True, **backend.options)
    store = backend.store()
    from cloudckpt import crc

    store.put(parse_uri(uri).key(".metadata"), [blob], crc32c=crc.crc32c(blob))
    url = store.url(parse_uri(uri).key(".metadata"))
    # The manifest's CRC32C of .metadata catches the swap before anything is unpickled...
    with pytest.raises(IntegrityError, match="metadata is corrupt"):
        cloudckpt.load({"a": torch.zeros(3)}, uri, no_dist=True, **backend.options)
    # ...and without it (verify=False, or an attacker who also removed the manifest) the
    # restricted unpickler refuses, naming the object and the class.
    with pytest.raises(UnsafeMetadataError) as info:
        cloudckpt.load({"a": torch.zeros(3)}, uri, no_dist=True, verify=False, **backend.options)
    assert url in str(info.value) and "os.makedirs" in str(info.value) and "refusing" in str(info.value)
    for info in list(store.list(parse_uri(uri).key(""))):
        if layout.is_manifest_name(info.key.rsplit("/", 1)[-1]):
            store.delete(info.key)
    with pytest.raises(UnsafeMetadataError):
        cloudckpt.load({"a": torch.zeros(3)}, uri, no_dist=True, **backend.options)
    assert not os.path.exists(sentinel)


@pytest.mark.parametrize("module, name", [
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "open"),
    ("builtins", "__import__"), ("os", "system"), ("posix", "system"), ("subprocess", "Popen"),
    ("torch", "load"), ("torch", "save"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.distributed.checkpoint.metadata", "os"), ("pathlib", "os"), ("collections", "namedtuple"),
])
def test_gadgets_outside_the_allow_list_are_refused(module, name):
    # GLOBAL opcode naming the callable, then a REDUCE: the classic gadget shape.
    blob = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n(X\x04\x00\x00\x00trueotR."
    with pytest.raises(UnsafeMetadataError, match=f"{module}.{name}"):
        load_metadata(blob, "s3://b/ck/.metadata")


def test_persistent_ids_and_garbage_are_refused():
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "x" if obj == "secret" else None

    buf = io.BytesIO()
    P(buf).dump(["secret"])
    with pytest.raises(UnsafeMetadataError, match="persistent"):
        load_metadata(buf.getvalue(), "gs://b/ck/.metadata")
    with pytest.raises(UnsafeMetadataError, match="not a readable DCP metadata"):
        load_metadata(b"\x80\x05garbage", "gs://b/ck/.metadata")


def test_real_metadata_round_trips_through_the_allow_list(tmp_path):
    meta = _stock_metadata(tmp_path)
    again = load_metadata(pickle.dumps(meta), "file")
    assert again.state_dict_metadata == meta.state_dict_metadata
    assert again.storage_data == meta.storage_data
    assert load_metadata(pickle.dumps(meta, protocol=2), "file").storage_data == meta.storage_data


def test_tensor_records_load_weights_only(backend, tmp_path):
    """A tensor item replaced by a torch.save archive that runs code is refused by weights-only loading."""
    sentinel = str(tmp_path / "pwned-record")
    src = tmp_path / "stock"
    dcp.save({"a": torch.ones(3), "b": torch.arange(4)}, storage_writer=dcp.FileSystemWriter(str(src)), no_dist=True)
    with open(src / ".metadata", "rb") as f:
        meta = pickle.load(f)
    [idx] = [i for i in meta.storage_data if i.fqn == "a"]
    info = meta.storage_data[idx]
    buf = io.BytesIO()
    torch.save(_Touch(sentinel), buf)
    evil = buf.getvalue()
    torch.load(io.BytesIO(evil), weights_only=False)   # plain torch.load runs it
    assert os.path.exists(sentinel)
    os.rmdir(sentinel)
    path = src / info.relative_path
    with open(path, "ab") as f:
        offset = f.tell()
        f.write(evil)
    meta.storage_data[idx] = _StorageInfo(info.relative_path, offset, len(evil))
    with open(src / ".metadata", "wb") as f:
        pickle.dump(meta, f)

    uri = backend.uri("evil-record")
    backend.upload(str(src), uri)     # a stock-layout checkpoint: no manifest, nothing to verify against
    with pytest.raises(UnsafeCheckpointItemError) as info_:
        cloudckpt.load({"a": torch.zeros(3), "b": torch.zeros(4, dtype=torch.int64)}, uri, no_dist=True,
                       **backend.options)
    # Refused by the restricted loader's allow-list, naming the key and the class.
    msg = str(info_.value)
    assert "os.makedirs" in msg and "'a'" in msg, msg
    assert not os.path.exists(sentinel)
