"""Attack corpus for loading: hostile checkpoints written with plain clients, on S3 (moto), GCS (emulator) and local.

Every checkpoint here is built as an attacker would: a stock DCP checkpoint
written with ``FileSystemWriter``, edited by hand, and uploaded with boto3 /
google-cloud-storage / shutil (``backend.upload``), never through cloudckpt.
Each test checks that the attack gets a typed error naming what is wrong, runs
no code, changes nothing in the caller's state dict and stays within a time
and memory bound.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import pickle
import socketserver
import threading
import time
import tracemalloc
from typing import Any, Iterator

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

import cloudckpt
from cloudckpt import crc, layout
from cloudckpt.errors import (
    CloudCheckpointError,
    IntegrityError,
    ItemKindMismatchError,
    ReadDeadlineExceededError,
    UnsafeCheckpointItemError,
    UnsafeMetadataError,
    UnsafePathError,
)
from cloudckpt.manifest import build_manifest, seal_manifest
from cloudckpt.store import open_store
from tests.helpers import Opaque, assert_state_equal, empty_like_state_dict, realistic_state_dict

MiB = 1024 * 1024


class _Touch:
    """Unpickles as ``os.makedirs(path)``: creates ``path``, the proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


# -- building hostile checkpoints by hand ------------------------------------------------

def _stock(src: Any, state_dict: dict[str, Any]) -> Any:
    """A stock DCP checkpoint in ``src``; returns its Metadata (ours, just written: trusted)."""
    dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(str(src)), no_dist=True)
    with open(os.path.join(src, ".metadata"), "rb") as f:
        return pickle.load(f)


def _write_metadata(src: Any, metadata: Any) -> bytes:
    blob = pickle.dumps(metadata)
    with open(os.path.join(src, ".metadata"), "wb") as f:
        f.write(blob)
    return blob


def _append(src: Any, rel: str, blob: bytes) -> tuple[int, int]:
    """Append ``blob`` to data object ``rel``; returns (offset, length)."""
    path = os.path.join(src, rel)
    with open(path, "ab") as f:
        offset = f.tell()
        f.write(blob)
    return offset, len(blob)


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _index(metadata: Any, fqn: str) -> MetadataIndex:
    [idx] = [i for i in metadata.storage_data if i.fqn == fqn]
    return idx


def _load_args(backend: Any) -> dict[str, Any]:
    return {"no_dist": True, **backend.options}


# -- 1. no code runs on load ---------------------------------------------------------------

def _gadget_checkpoint(tmp_path: Any, sentinel: str) -> Any:
    src = tmp_path / "gadget"
    meta = _stock(src, {"a": torch.ones(3), "step": 1})
    idx = _index(meta, "step")
    rel = meta.storage_data[idx].relative_path
    offset, length = _append(src, rel, _saved(_Touch(sentinel)))
    meta.storage_data[idx] = _StorageInfo(rel, offset, length)
    _write_metadata(src, meta)
    return src


def test_reduce_gadget_in_byte_item_is_refused(backend, tmp_path):
    sentinel = str(tmp_path / "pwned")
    src = _gadget_checkpoint(tmp_path, sentinel)
    uri = backend.uri("gadget")
    backend.upload(str(src), uri)
    target = {"a": torch.zeros(3), "step": 0}
    with pytest.raises(UnsafeCheckpointItemError) as info:
        cloudckpt.load(target, uri, **_load_args(backend))
    msg = str(info.value)
    assert "'step'" in msg and "os.makedirs" in msg and "allow_pickle=True" in msg, msg
    assert not os.path.exists(sentinel)
    assert target["step"] == 0
    # A caller's own DefaultLoadPlanner (whose load_bytes calls torch.load(weights_only=False)) is safe too:
    # the reader hands it a stream re-serialised from allow-listed objects only.
    with pytest.raises(UnsafeCheckpointItemError):
        cloudckpt.load({"a": torch.zeros(3), "step": 0}, uri, planner=DefaultLoadPlanner(), **_load_args(backend))
    assert not os.path.exists(sentinel)


def test_reduce_gadget_is_refused_by_the_manager(backend, tmp_path):
    sentinel = str(tmp_path / "pwned")
    src = _gadget_checkpoint(tmp_path, sentinel)
    backend.upload(str(src), backend.uri("run", layout.step_name(1)))
    mgr = cloudckpt.CheckpointManager(backend.uri("run"), **backend.options)
    try:
        target = {"a": torch.zeros(3), "step": 0}
        with pytest.raises(UnsafeCheckpointItemError, match="'step'"):
            mgr.load(target)
    finally:
        mgr.close()
    assert not os.path.exists(sentinel)
    assert target["step"] == 0


def test_verify_reports_the_gadget_without_running_it(backend, tmp_path):
    sentinel = str(tmp_path / "pwned")
    src = _gadget_checkpoint(tmp_path, sentinel)
    uri = backend.uri("gadget")
    backend.upload(str(src), uri)
    for deep in (True, False):
        report = cloudckpt.verify(uri, deep=deep, **backend.options)
        assert not report.ok
        assert any("'step'" in p and "os.makedirs" in p for p in report.problems), report.problems
    assert not os.path.exists(sentinel)


def test_allow_pickle_opt_in_loads_trusted_custom_objects(backend):
    sd = realistic_state_dict(5, opaque=True)
    uri = backend.uri("trusted")
    cloudckpt.save(sd, uri, no_dist=True, **backend.options)
    # Refused by default: Opaque is a class outside the allow-list...
    target = empty_like_state_dict(sd)
    with pytest.raises(UnsafeCheckpointItemError, match=r"'extra'.*tests\.helpers\.Opaque"):
        cloudckpt.load(target, uri, **_load_args(backend))
    # ...and loaded with the explicit opt-in for trusted checkpoints.
    target = empty_like_state_dict(sd)
    cloudckpt.load(target, uri, allow_pickle=True, **_load_args(backend))
    assert target["extra"] == Opaque("meta", [1, 2, 3])
    assert_state_equal(sd, target)
    # The reader takes it too.
    target = empty_like_state_dict(sd)
    reader = cloudckpt.storage_reader(uri, allow_pickle=True, **backend.options)
    cloudckpt.load(target, uri, storage_reader=reader, no_dist=True)
    assert_state_equal(sd, target)


def test_common_training_state_loads_restricted(backend):
    """What DCP writes as byte items for ordinary training state passes the allow-list."""
    import collections
    import random

    sd = {
        "w": torch.randn(4, 4),
        "rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        # In a list so DCP stores it as one byte item rather than flattening it.
        "sched": [collections.OrderedDict(last_epoch=3, base_lrs=[0.1, 0.01], name="cos", flags={1, 2})],
        "blob": b"\x00\xffbytes",
        "shape": torch.Size([3, 4]),
        "dtype": torch.bfloat16,
        "dev": torch.device("cpu"),
        "none": None,
        "c": complex(1, 2),
    }
    uri = backend.uri("common")
    cloudckpt.save(sd, uri, no_dist=True, **backend.options)
    target = empty_like_state_dict(sd)
    cloudckpt.load(target, uri, **_load_args(backend))
    assert_state_equal(sd, target)


# -- 1b. a tensor key re-declared as bytes never replaces the caller's tensor --------------------

def _redeclared_checkpoint(tmp_path: Any) -> Any:
    src = tmp_path / "redeclared"
    meta = _stock(src, {"w": torch.ones(4), "n": 1})
    idx = _index(meta, "w")
    rel = meta.storage_data[idx].relative_path
    offset, length = _append(src, rel, _saved(torch.full((4,), 7.0)))
    del meta.storage_data[idx]
    meta.state_dict_metadata["w"] = BytesStorageMetadata()
    meta.storage_data[MetadataIndex("w")] = _StorageInfo(rel, offset, length)
    _write_metadata(src, meta)
    return src


def test_tensor_key_redeclared_as_bytes_is_refused(backend, tmp_path):
    uri = backend.uri("redeclared")
    backend.upload(str(_redeclared_checkpoint(tmp_path)), uri)
    for planner in (None, DefaultLoadPlanner()):
        w = torch.zeros(4)
        target = {"w": w, "n": 0}
        with pytest.raises(ItemKindMismatchError, match="'w'.*byte item.*holds a tensor"):
            cloudckpt.load(target, uri, planner=planner, **_load_args(backend))
        assert target["w"] is w and torch.equal(w, torch.zeros(4))
        assert target["n"] == 0
    report = cloudckpt.verify(uri, **backend.options)
    assert any("'w'" in p and "holds a tensor" in p for p in report.problems), report.problems


def test_non_tensor_value_for_a_stored_tensor_is_refused(backend, tmp_path):
    src = tmp_path / "stock"
    _stock(src, {"w": torch.ones(4), "n": 1})
    uri = backend.uri("stock")
    backend.upload(str(src), uri)
    target = {"w": 5, "n": 0}
    with pytest.raises(ItemKindMismatchError, match="'w'.*as a tensor.*holds a int"):
        cloudckpt.load(target, uri, **_load_args(backend))
    assert target == {"w": 5, "n": 0}


# -- 4. nothing is read outside the checkpoint ------------------------------------------------

def _forge_manifest(src: Any, meta_blob: bytes, rel: str, data: bytes) -> None:
    """A manifest (as cloudckpt writes them) vouching for ``rel`` as a raw 16-byte payload."""
    c = crc.crc32c(data)
    doc = build_manifest(metadata_crc32c=crc.crc32c(meta_blob), writer="forged", torch_version=torch.__version__,
                         save_id="deadbeefdeadbeef", world_size=1, objects={rel: {"size": len(data), "crc32c": c}},
                         items={rel: [[0, len(data), c, 0, c]]})
    with open(os.path.join(src, layout.manifest_name("deadbeefdeadbeef")), "wb") as f:
        f.write(seal_manifest(doc))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "dot-segment", "backslash"])
def test_relative_path_outside_the_checkpoint_is_refused(backend, tmp_path, how):
    secret = torch.arange(4, dtype=torch.float32)
    secret_path = tmp_path / "secret"       # root/ck/../../secret for the local backend
    secret_path.write_bytes(secret.numpy().tobytes())
    rel = {"dotdot": "../../secret", "absolute": str(secret_path), "dot-segment": "./__0_0.distcp",
           "backslash": "..\\..\\secret"}[how]
    src = tmp_path / "ck"
    meta = _stock(src, {"w": torch.ones(4)})
    idx = _index(meta, "w")
    meta.storage_data[idx] = _StorageInfo(rel, 0, 16)
    _forge_manifest(src, _write_metadata(src, meta), rel, secret_path.read_bytes())
    uri = backend.uri("ck")
    backend.upload(str(src), uri)
    w = torch.zeros(4)
    with pytest.raises(UnsafePathError, match="inside itself"):
        cloudckpt.load({"w": w}, uri, **_load_args(backend))
    assert torch.equal(w, torch.zeros(4))
    report = cloudckpt.verify(uri, **backend.options)
    assert any("inside itself" in p for p in report.problems), report.problems


def test_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    secret_path = tmp_path / "secret"
    secret_path.write_bytes(torch.arange(4, dtype=torch.float32).numpy().tobytes())
    src = tmp_path / "ck"
    meta = _stock(src, {"w": torch.ones(4)})
    os.symlink(secret_path, src / "link.distcp")
    idx = _index(meta, "w")
    meta.storage_data[idx] = _StorageInfo("link.distcp", 0, 16)
    _forge_manifest(src, _write_metadata(src, meta), "link.distcp", secret_path.read_bytes())
    w = torch.zeros(4)
    with pytest.raises(UnsafePathError, match="symlink"):
        cloudckpt.load({"w": w}, str(src), no_dist=True)
    assert torch.equal(w, torch.zeros(4))
    assert any("symlink" in p for p in cloudckpt.verify(str(src)).problems)


def test_sub_folder_relative_paths_stay_valid(backend, tmp_path):
    """s3torchconnector-style layouts name objects in sub-folders: still inside, still loadable."""
    src = tmp_path / "nested"
    sd = {"w": torch.randn(5), "step": 3}
    meta = _stock(src, sd)
    os.makedirs(src / "0000000000" / "epoch_3")
    for idx, info in list(meta.storage_data.items()):
        new = f"0000000000/epoch_3/{info.relative_path}"
        if not os.path.exists(src / new):
            os.rename(src / info.relative_path, src / new)
        meta.storage_data[idx] = _StorageInfo(new, info.offset, info.length)
    _write_metadata(src, meta)
    uri = backend.uri("nested")
    backend.upload(str(src), uri)
    target = {"w": torch.zeros(5), "step": 0}
    cloudckpt.load(target, uri, **_load_args(backend))
    assert_state_equal(sd, target)
    report = cloudckpt.verify(uri, **backend.options)
    assert report.ok, report.problems


# -- 5. bounded resources on hostile input ------------------------------------------------

@contextlib.contextmanager
def _bounded(seconds: float, peak_bytes: int) -> Iterator[None]:
    """Assert the block finishes within ``seconds`` and allocates at most ``peak_bytes`` (Python heap)."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    assert peak < peak_bytes, f"peak {peak / MiB:.1f} MiB"


def _upload_metadata(backend: Any, tmp_path: Any, name: str, blob: bytes) -> str:
    src = tmp_path / name
    src.mkdir()
    (src / ".metadata").write_bytes(blob)
    uri = backend.uri(name)
    backend.upload(str(src), uri)
    return uri


# 30 bytes: bytearray(1 GiB) through the (once allow-listed) bytearray constructor.
_BYTEARRAY_BOMB = b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00@\x85R."
# 64M-item list: list(bytearray(64M)).
_LIST_BOMB = b"\x80\x02cbuiltins\nlist\ncbuiltins\nbytearray\nJ\x00\x00\x00\x04\x85R\x85R."


@pytest.mark.parametrize("blob", [_BYTEARRAY_BOMB, _LIST_BOMB], ids=["bytearray-1GiB", "list-64M"])
def test_metadata_allocation_bombs_are_refused(backend, tmp_path, blob):
    assert len(blob) <= 50
    uri = _upload_metadata(backend, tmp_path, "bomb", blob)
    with _bounded(60, 16 * MiB):
        with pytest.raises(UnsafeMetadataError):
            cloudckpt.load({"a": torch.zeros(1)}, uri, **_load_args(backend))
        report = cloudckpt.verify(uri, **backend.options)
    assert not report.ok


@pytest.mark.parametrize("pkl", [_BYTEARRAY_BOMB, _LIST_BOMB], ids=["bytearray-1GiB", "list-64M"])
def test_byte_item_allocation_bombs_are_refused(backend, tmp_path, pkl):
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
    src = tmp_path / "item-bomb"
    meta = _stock(src, {"a": torch.ones(3), "step": 1})
    idx = _index(meta, "step")
    rel = meta.storage_data[idx].relative_path
    meta.storage_data[idx] = _StorageInfo(rel, *_append(src, rel, buf.getvalue()))
    _write_metadata(src, meta)
    uri = backend.uri("item-bomb")
    backend.upload(str(src), uri)
    with _bounded(60, 32 * MiB):
        with pytest.raises(CloudCheckpointError, match="'step'"):
            cloudckpt.load({"a": torch.zeros(3), "step": 0}, uri, **_load_args(backend))
        report = cloudckpt.verify(uri, **backend.options)
    assert any("'step'" in p for p in report.problems), report.problems


def test_false_storage_length_allocates_nothing_big(backend, tmp_path):
    src = tmp_path / "liar"
    meta = _stock(src, {"a": torch.ones(4), "step": 1})
    for fqn, length in (("a", 3 << 30), ("step", 3 << 30)):
        idx = _index(meta, fqn)
        info = meta.storage_data[idx]
        meta.storage_data[idx] = _StorageInfo(info.relative_path, info.offset, length)
    _write_metadata(src, meta)
    uri = backend.uri("liar")
    backend.upload(str(src), uri)
    a = torch.zeros(4)
    with _bounded(60, 64 * MiB):
        with pytest.raises(IntegrityError, match="has only .* bytes"):
            cloudckpt.load({"a": a, "step": 0}, uri, **_load_args(backend))
        report = cloudckpt.verify(uri, **backend.options)
    assert torch.equal(a, torch.zeros(4))
    assert any("outside the object" in p for p in report.problems), report.problems


def _tensor_record_with_false_numel(numel: int) -> bytes:
    """A torch.save record of a 4-element tensor whose pickle claims ``numel`` storage elements.

    Its storage offset is 1, so it is not a plain dense record and goes to the
    general loader (where ``torch.load`` would allocate the claimed storage).
    """
    import zipfile

    zin = zipfile.ZipFile(io.BytesIO(_saved(torch.ones(4))))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                marker = b"X\x03\x00\x00\x00cpuq\x04"
                at = data.index(marker) + len(marker)
                rest = data[at:]
                assert rest.startswith(b"K\x04tq\x05QK\x00"), rest[:12]
                data = data[:at] + b"J" + numel.to_bytes(4, "little") + b"tq\x05QK\x01" + rest[8:]
            zout.writestr(name, data)
    return out.getvalue()


def test_false_record_numel_allocates_nothing_big(backend, tmp_path):
    """A 16-byte storage record whose pickle claims 3 GiB must not make the loader allocate it."""
    src = tmp_path / "numel"
    meta = _stock(src, {"a": torch.ones(4)})
    idx = _index(meta, "a")
    rel = meta.storage_data[idx].relative_path
    offset, length = _append(src, rel, _tensor_record_with_false_numel(768 << 20))  # 768M float32 = 3 GiB
    meta.storage_data[idx] = _StorageInfo(rel, offset, length)
    _write_metadata(src, meta)
    uri = backend.uri("numel")
    backend.upload(str(src), uri)
    with _bounded(60, 64 * MiB):
        with pytest.raises(IntegrityError, match="record has 16 bytes"):
            cloudckpt.load({"a": torch.zeros(4)}, uri, **_load_args(backend))


def _variants(meta: Any) -> dict[str, Any]:
    """Copies of a real Metadata with one field of the wrong type or range each."""
    import copy

    idx = _index(meta, "a")

    def edit(fn: Any) -> Any:
        m = copy.deepcopy(meta)
        fn(m)
        return m

    def set_attr(obj_path: Any, name: str, value: Any) -> Any:
        return lambda m: object.__setattr__(obj_path(m), name, value)

    tsm = lambda m: m.state_dict_metadata["a"]  # noqa: E731
    info = lambda m: m.storage_data[idx]  # noqa: E731
    return {
        "top-level-dict": {"state_dict_metadata": {}},
        "top-level-int": 5,
        "sdm-list": edit(set_attr(lambda m: m, "state_dict_metadata", [1, 2])),
        "sdm-value-int": edit(lambda m: m.state_dict_metadata.__setitem__("a", 3)),
        "sdm-key-int": edit(lambda m: m.state_dict_metadata.__setitem__(7, BytesStorageMetadata())),
        "properties-none": edit(set_attr(tsm, "properties", None)),
        "dtype-str": edit(set_attr(lambda m: tsm(m).properties, "dtype", "float32")),
        "size-str": edit(set_attr(tsm, "size", "big")),
        "size-negative": edit(set_attr(tsm, "size", torch.Size([-4]))),
        "size-huge": edit(set_attr(tsm, "size", torch.Size([1 << 40, 1 << 40]))),
        "chunks-dict": edit(set_attr(tsm, "chunks", {})),
        "chunk-rank": edit(set_attr(lambda m: tsm(m).chunks[0], "offsets", torch.Size([0, 0]))),
        "chunk-outside": edit(set_attr(lambda m: tsm(m).chunks[0], "sizes", torch.Size([9]))),
        "chunk-int": edit(lambda m: tsm(m).chunks.__setitem__(0, 1)),
        "storage-data-list": edit(set_attr(lambda m: m, "storage_data", [])),
        "storage-key-str": edit(lambda m: m.storage_data.__setitem__("a", m.storage_data[idx])),
        "storage-value-str": edit(lambda m: m.storage_data.__setitem__(idx, "x")),
        "relative-path-int": edit(set_attr(info, "relative_path", 7)),
        "offset-negative": edit(set_attr(info, "offset", -1)),
        "offset-float": edit(set_attr(info, "offset", 1.5)),
        "length-str": edit(set_attr(info, "length", "16")),
        "length-bool": edit(set_attr(info, "length", True)),
        "transform-int": edit(set_attr(info, "transform_descriptors", 5)),
        "index-offset-str": edit(lambda m: m.storage_data.__setitem__(
            MetadataIndex("a", None, None), m.storage_data[idx]) or object.__setattr__(
            next(k for k in m.storage_data if k.offset is None), "offset", "zz")),
        "storage-meta-str": edit(set_attr(lambda m: m, "storage_meta", "x")),
        "version-int": edit(set_attr(lambda m: m, "version", 3)),
        "planner-data-list": edit(set_attr(lambda m: m, "planner_data", [1])),
    }


def test_wrong_type_fields_give_one_typed_error(backend, tmp_path):
    src = tmp_path / "typed"
    meta = _stock(src, {"a": torch.ones(4), "step": 1})
    variants = _variants(meta)
    assert len(variants) >= 19
    wrong: dict[str, str] = {}
    for name, bad in variants.items():
        blob = pickle.dumps(bad)
        _write_metadata(src, bad)
        uri = backend.uri(f"typed-{name}")
        backend.upload(str(src), uri)
        try:
            cloudckpt.load({"a": torch.zeros(4), "step": 0}, uri, **_load_args(backend))
        except UnsafeMetadataError as exc:
            if ".metadata" not in str(exc):
                wrong[name] = f"message does not name the object: {exc}"
        except BaseException as exc:  # noqa: BLE001 - collected and reported below
            wrong[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            wrong[name] = "loaded"
        assert len(blob) < 64 * 1024
    assert not wrong, wrong


# -- 5b. wall-clock deadline on reads: a trickling server -------------------------------------

class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a 200 whose 1000-byte body arrives one byte per second."""

    protocol_version = "HTTP/1.1"
    stop: threading.Event

    def _headers(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", "1000")
        self.send_header("ETag", '"abc"')
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server API
        self._headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self._headers()
        try:
            for _ in range(1000):
                if self.stop.wait(1.0):
                    return
                self.wfile.write(b"x")
                self.wfile.flush()
        except OSError:
            return  # the client cut the connection: what the deadline is for

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _trickle_server() -> Iterator[str]:
    stop = threading.Event()
    handler = type("Handler", (_TrickleHandler,), {"stop": stop})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


_READ_TIMEOUT = 2.0
_MARGIN = 6.0


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_trickling_server_hits_the_read_deadline(scheme, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with _trickle_server() as endpoint:
        opts: dict[str, Any] = {"endpoint_url": endpoint}
        opts.update({"read_timeout": _READ_TIMEOUT, "region": "us-east-1"} if scheme == "s3"
                    else {"timeout": (5.0, _READ_TIMEOUT)})
        uri = f"{scheme}://bucket/ck"
        store = open_store(uri, **opts)
        for what, call in (("get", lambda: store.get("ck/.metadata", max_size=1 << 20)),
                           ("get_range", lambda: store.get_range("ck/__0_0.distcp", 0, memoryview(bytearray(500)))),
                           ("load", lambda: cloudckpt.load({"a": torch.zeros(1)}, uri, no_dist=True, **opts))):
            t0 = time.monotonic()
            with pytest.raises(ReadDeadlineExceededError, match="read"):
                call()
            elapsed = time.monotonic() - t0
            assert elapsed < _READ_TIMEOUT + _MARGIN, f"{what} took {elapsed:.1f} s"


# -- local: a FIFO planted under an object's name ------------------------------------------------

@pytest.mark.parametrize("victim", ["data", ".metadata"])
def test_fifo_as_an_object_never_blocks(tmp_path, victim):
    src = tmp_path / "fifo"
    meta = _stock(src, {"a": torch.ones(4)})
    rel = meta.storage_data[_index(meta, "a")].relative_path if victim == "data" else ".metadata"
    os.unlink(src / rel)
    os.mkfifo(src / rel)
    result: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            cloudckpt.load({"a": torch.zeros(4)}, str(src), no_dist=True)
            result["exc"] = None
        except BaseException as exc:  # noqa: BLE001 - inspected below
            result["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():
        # Unblock the reader so the test process can exit, then fail.
        with open(src / rel, "wb"):
            pass
        pytest.fail("load blocked on a FIFO")
    assert isinstance(result["exc"], CloudCheckpointError), result
    assert "regular" in str(result["exc"]) or "does not exist" in str(result["exc"])
