"""Incremental saves: unchanged items are copied inside the store, every checkpoint stays complete.

Every test runs on moto's S3 server, the GCS emulator and a local directory
(the ``backend`` fixture). Bytes the client sends are counted on the wire for
S3 and GCS (a relay between the client and the server counts every byte of
every request) and at the store's upload calls for local paths.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner

import cloudckpt
from cloudckpt import layout, ops
from cloudckpt.store import open_store
from cloudckpt.uri import parse_uri
from cloudckpt.writer import writer_for
from tests.backends import Backend

MiB = 1024 * 1024
FROZEN = [f"base.layer{i}.weight" for i in range(4)]  # 4 x 16 MiB
TRAINABLE = [f"lora.layer{i}.A" for i in range(4)]    # 4 x 256 KiB
STATE_BYTES = 4 * 16 * MiB + 4 * 256 * 1024


def make_state(seed: int = 0) -> dict[str, Any]:
    """64 MiB of frozen weights, 1 MiB of trainable ones, and a step counter (a byte item)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {k: torch.randn(2048, 2048, generator=g) for k in FROZEN}
    sd.update({k: torch.randn(64, 1024, generator=g) for k in TRAINABLE})
    sd["step"] = 1
    return sd


def train_step(sd: dict[str, Any], seed: int) -> dict[str, Any]:
    """A fine-tuning step: new trainable weights and step counter, the same frozen tensors."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = dict(sd)
    out.update({k: torch.randn(64, 1024, generator=g) for k in TRAINABLE})
    out["step"] = seed
    return out


def assert_loads(uri: str, expected: dict[str, Any], opts: dict[str, Any]) -> None:
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in expected.items()}
    cloudckpt.load(out, uri, no_dist=True, **opts)
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(out[k], v), k
        else:
            assert out[k] == v, k


def transfer_record(backend: Backend, uri: str) -> dict[str, Any]:
    """The ``transfer`` record of the manifest that matches the checkpoint's .metadata."""
    from cloudckpt.manifest import find_manifest

    store = backend.store()
    u = parse_uri(uri)
    blob = store.get(u.key(layout.METADATA_NAME))
    manifest = find_manifest(store, u, blob)
    assert manifest is not None
    return manifest.doc["transfer"]


# -- counting the client's bytes --------------------------------------------------------------


class CountingRelay:
    """A TCP relay in front of a test server that counts every byte the client sends."""

    def __init__(self, upstream: str) -> None:
        hostport = upstream.split("://", 1)[1].rstrip("/")
        host, port = hostport.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._lock = threading.Lock()
        self.sent = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._stop = False
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                if count:
                    with self._lock:
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> int:
        """Bytes sent since the last call."""
        with self._lock:
            n, self.sent = self.sent, 0
        return n

    def close(self) -> None:
        self._stop = True
        self._sock.close()


class _CountingLocal:
    """Counts the bytes a local store's upload calls write (the local "requests")."""

    def __init__(self) -> None:
        self.sent = 0

    def wrap(self, writer: Any) -> Any:
        store = writer.store
        put, part = store.put, store.upload_part

        def counted_put(key: str, body: Any, **kw: Any) -> Any:
            self.sent += sum(memoryview(b).nbytes for b in body)
            return put(key, body, **kw)

        def counted_part(key: str, upload_id: str, n: int, body: Any, **kw: Any) -> Any:
            self.sent += sum(memoryview(b).nbytes for b in body)
            return part(key, upload_id, n, body, **kw)

        store.put, store.upload_part = counted_put, counted_part
        return writer

    def take(self) -> int:
        n, self.sent = self.sent, 0
        return n


class Counter:
    """Saves through ``backend`` while counting the client's bytes."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.relay = CountingRelay(backend.endpoint) if backend.endpoint else None
        self.local = None if self.relay else _CountingLocal()
        self.opts = dict(backend.options)
        if self.relay:
            self.opts["endpoint_url"] = self.relay.url

    def save(self, sd: dict[str, Any], uri: str, **writer_opts: Any) -> tuple[int, Any]:
        """Save; return (bytes the client sent, the writer)."""
        writer = writer_for(uri, **self.opts, **writer_opts)
        if self.local:
            self.local.wrap(writer)
        else:
            self.relay.take()
        cloudckpt.save(sd, uri, storage_writer=writer, no_dist=True)
        return (self.local.take() if self.local else self.relay.take()), writer

    def close(self) -> None:
        if self.relay:
            self.relay.close()


@pytest.fixture
def counter(backend: Backend) -> Iterator[Counter]:
    c = Counter(backend)
    yield c
    c.close()


# -- the figures of the issue -------------------------------------------------------------------


class _ManagerSaves:
    """Saves steps through ``CheckpointManager(incremental=True)`` while ``counter`` counts the client's bytes."""

    def __init__(self, backend: Backend, counter: Counter, root: str) -> None:
        self.counter = counter
        self.mgr = cloudckpt.CheckpointManager(root, incremental=True, preemption=False, **counter.opts)
        self.writers: dict[int, Any] = {}
        make = self.mgr._writer

        def counted(step: int) -> Any:  # the manager's own writer, its uploads counted for local paths
            writer = make(step)
            self.writers[step] = counter.local.wrap(writer) if counter.local else writer
            return writer

        self.mgr._writer = counted  # type: ignore[method-assign]

    def save(self, sd: dict[str, Any], step: int) -> tuple[int, Any, str]:
        """Save ``step``; return (bytes the client sent, the writer, the step's URI)."""
        if self.counter.relay:
            self.counter.relay.take()
        self.mgr.save(sd, step)
        c = self.counter
        sent = c.local.take() if c.local else c.relay.take()
        return sent, self.writers[step], self.mgr.checkpoint_uri(step)

    def close(self) -> None:
        self.mgr.close()


def test_only_changed_bytes_are_sent(backend: Backend, counter: Counter) -> None:
    """64 MiB frozen + 1 MiB trainable through the manager: step 2 already sends at most 5% of the state.

    On GCS (whole-object copies only) the manager lays out even the first save
    so that every large item is an object of its own; S3 and local paths keep
    the usual packing and copy byte ranges.
    """
    saves = _ManagerSaves(backend, counter, backend.uri("run"))
    try:
        sd1 = make_state()
        full, _, uri1 = saves.save(sd1, 1)
        sd2 = train_step(sd1, 2)
        sent2, w2, uri2 = saves.save(sd2, 2)
        sd3 = train_step(sd2, 3)
        sent3, w3, uri3 = saves.save(sd3, 3)
    finally:
        saves.close()
    assert full >= STATE_BYTES
    objects1 = _object_names(backend, parse_uri(uri1))
    # GCS: the four 16 MiB frozen tensors alone, the small items packed together; elsewhere one object.
    assert len(objects1) == (5 if backend.name == "gcs" else 1), objects1
    print(f"{backend.name}: step 2 sent {sent2} bytes = {sent2 / STATE_BYTES:.4f} of the state")
    for sent, w in ((sent2, w2), (sent3, w3)):
        assert sent <= 0.05 * STATE_BYTES, sent
        assert w.last_incremental["copied_bytes"] >= 64 * MiB
        assert w.last_incremental["uploaded_bytes"] < 2 * MiB
    rec = transfer_record(backend, uri2)
    assert rec["base"] == str(parse_uri(uri1)) and rec["copied_bytes"] >= 64 * MiB
    rec = transfer_record(backend, uri3)
    assert rec["base"] == str(parse_uri(uri2)) and rec["copied_bytes"] >= 64 * MiB
    assert_loads(uri2, sd2, backend.options)
    assert_loads(uri3, sd3, backend.options)


def test_only_changed_bytes_are_sent_with_base_checkpoint_id(backend: Backend, counter: Counter) -> None:
    """The same with ``base_checkpoint_id=`` on plain saves: on GCS from step 3, once objects are arranged."""
    sd1 = make_state()
    full, _ = counter.save(sd1, backend.uri("step-1"))
    assert full >= STATE_BYTES
    sd2 = train_step(sd1, 2)
    sent2, w2 = counter.save(sd2, backend.uri("step-2"), base_checkpoint_id=backend.uri("step-1"))
    sd3 = train_step(sd2, 3)
    sent3, w3 = counter.save(sd3, backend.uri("step-3"), base_checkpoint_id=backend.uri("step-2"))
    if backend.name == "gcs":
        # GCS cannot copy a byte range: the plain step 1 mixed frozen and trainable items in one
        # object, so step 2 uploads it, laid out so that large items are whole objects from then on.
        assert w2.last_incremental["copied_bytes"] == 0
    else:
        assert sent2 <= 0.05 * STATE_BYTES, sent2
        assert w2.last_incremental["copied_bytes"] >= 64 * MiB
    assert sent3 <= 0.05 * STATE_BYTES, sent3
    assert w3.last_incremental["copied_bytes"] >= 64 * MiB
    rec = transfer_record(backend, backend.uri("step-3"))
    assert rec["copied_bytes"] >= 64 * MiB and rec["uploaded_bytes"] < 2 * MiB
    assert rec["base"] == str(parse_uri(backend.uri("step-2")))
    assert_loads(backend.uri("step-2"), sd2, backend.options)
    assert_loads(backend.uri("step-3"), sd3, backend.options)


def test_changed_frozen_tensor_loads_exactly(backend: Backend, counter: Counter) -> None:
    sd1 = make_state()
    counter.save(sd1, backend.uri("a"))
    sd2 = train_step(sd1, 2)
    sd2[FROZEN[1]] = sd1[FROZEN[1]].clone()
    sd2[FROZEN[1]][7, 11] += 1.0  # one element of one frozen tensor changes
    sent, w = counter.save(sd2, backend.uri("b"), base_checkpoint_id=backend.uri("a"))
    assert_loads(backend.uri("b"), sd2, backend.options)
    if backend.name != "gcs":
        assert w.last_incremental["copied_bytes"] >= 48 * MiB
        assert sent < 20 * MiB  # the changed tensor and the trainable part, not the other 48 MiB


@pytest.mark.parametrize("via", ["base_checkpoint_id", "manager"])
def test_incremental_checkpoint_is_self_contained(backend: Backend, counter: Counter, tmp_path: Any,
                                                  via: str) -> None:
    """Step 2 alone, downloaded with plain clients, loads with the stock reader; step 1 deleted changes nothing.

    ``manager``: both steps through CheckpointManager(incremental=True), whose
    GCS layout (large items in objects of their own) is copied at step 2 too.
    """
    sd1 = make_state()
    sd2 = train_step(sd1, 2)
    if via == "manager":
        saves = _ManagerSaves(backend, counter, backend.uri("run"))
        try:
            _, _, uri1 = saves.save(sd1, 1)
            _, w, uri2 = saves.save(sd2, 2)
        finally:
            saves.close()
        assert w.last_incremental["copied_bytes"] >= 64 * MiB
    else:
        uri1, uri2 = backend.uri("step-1"), backend.uri("step-2")
        counter.save(sd1, uri1)
        _, w = counter.save(sd2, uri2, base_checkpoint_id=uri1, frozen_keys=FROZEN)
        assert w.last_incremental["copied_items"] > 0 or backend.name == "gcs"
    ops.delete_checkpoint(backend.store(), parse_uri(uri1))
    assert backend.keys(uri1) == []
    assert_loads(uri2, sd2, backend.options)
    dest = str(tmp_path / "plain")
    backend.download(uri2, dest)
    stock = {k: torch.zeros_like(v) for k, v in sd2.items() if isinstance(v, torch.Tensor)}
    stock["step"] = 0
    dcp.load(stock, storage_reader=dcp.FileSystemReader(dest), no_dist=True)
    for k, v in sd2.items():
        assert (torch.equal(stock[k], v) if isinstance(v, torch.Tensor) else stock[k] == v), k


# -- frozen_keys ------------------------------------------------------------------------------


class _CountingPlanner(DefaultSavePlanner):
    """Records which items the writer staged (resolve_data)."""

    staged: list[str] = []

    def resolve_data(self, write_item: Any) -> Any:
        type(self).staged.append(write_item.index.fqn)
        return super().resolve_data(write_item)


def _frozen_predicate(fqn: str) -> bool:
    return fqn.startswith("base.")


@pytest.mark.parametrize("hint", ["names", "prefix", "predicate"])
def test_frozen_keys_are_copied_without_staging(backend: Backend, counter: Counter, hint: str) -> None:
    keys: Any = {"names": FROZEN, "prefix": ["base"], "predicate": _frozen_predicate}[hint]
    sd1 = make_state()
    # The hint also arranges the first save: frozen items in objects of their own, so even GCS
    # (whole-object copies only) copies them at the next step.
    _, w1 = counter.save(sd1, backend.uri("s1"), frozen_keys=keys)
    sd2 = train_step(sd1, 2)
    writer = writer_for(backend.uri("s2"), **counter.opts, base_checkpoint_id=backend.uri("s1"), frozen_keys=keys)
    if counter.local:
        counter.local.wrap(writer)
    else:
        counter.relay.take()
    _CountingPlanner.staged = []
    cloudckpt.save(sd2, backend.uri("s2"), storage_writer=writer, planner=_CountingPlanner(), no_dist=True)
    sent = counter.local.take() if counter.local else counter.relay.take()
    assert not set(_CountingPlanner.staged) & set(FROZEN), "frozen items were staged"
    assert set(TRAINABLE) <= set(_CountingPlanner.staged)
    assert writer.last_incremental["copied_bytes"] >= 64 * MiB
    assert sent <= 0.05 * STATE_BYTES, sent
    assert_loads(backend.uri("s2"), sd2, backend.options)


def test_frozen_key_with_another_shape_is_uploaded(backend: Backend) -> None:
    sd1 = make_state()
    cloudckpt.save(sd1, backend.uri("s1"), no_dist=True, **backend.options)
    sd2 = train_step(sd1, 2)
    sd2[FROZEN[0]] = torch.randn(1024, 2048)  # "frozen", but resized: the hint cannot hold
    w = writer_for(backend.uri("s2"), **backend.options, base_checkpoint_id=backend.uri("s1"), frozen_keys=FROZEN)
    cloudckpt.save(sd2, backend.uri("s2"), storage_writer=w, no_dist=True)
    assert_loads(backend.uri("s2"), sd2, backend.options)


# -- bases that must not be used ----------------------------------------------------------------


def _save_pair(backend: Backend, damage: Any) -> tuple[dict[str, Any], Any]:
    sd1 = make_state()
    cloudckpt.save(sd1, backend.uri("s1"), no_dist=True, **backend.options)
    damage(parse_uri(backend.uri("s1")))
    sd2 = train_step(sd1, 2)
    w = writer_for(backend.uri("s2"), **backend.options, base_checkpoint_id=backend.uri("s1"), frozen_keys=FROZEN)
    cloudckpt.save(sd2, backend.uri("s2"), storage_writer=w, no_dist=True)
    assert_loads(backend.uri("s2"), sd2, backend.options)
    return sd2, w


def _object_names(backend: Backend, uri: Any) -> list[str]:
    return [n for n in backend.keys(str(uri)) if layout.parse_data_object_name(n) is not None]


def _replace(backend: Backend, uri: Any, name: str, data: bytes) -> None:
    store = backend.store()
    from cloudckpt import crc

    store.put(uri.key(name), [data], crc32c=crc.crc32c(data))


@pytest.mark.parametrize("damage", ["uncommitted", "truncated_object", "tampered_manifest", "missing_object"])
def test_unusable_base_is_not_used(backend: Backend, damage: str) -> None:
    def harm(uri: Any) -> None:
        store = backend.store()
        if damage == "uncommitted":
            store.delete(uri.key(layout.METADATA_NAME))
        elif damage == "truncated_object":
            name = _object_names(backend, uri)[0]
            _replace(backend, uri, name, store.get(uri.key(name))[:-100])
        elif damage == "missing_object":
            store.delete(uri.key(_object_names(backend, uri)[0]))
        else:
            name = next(n for n in backend.keys(str(uri)) if layout.is_manifest_name(n))
            doc = bytearray(store.get(uri.key(name)))
            i = doc.index(b'"crc32c":') + len(b'"crc32c":')
            doc[i] = ord("1") if doc[i] != ord("1") else ord("2")
            _replace(backend, uri, name, bytes(doc))

    _, w = _save_pair(backend, harm)
    assert w.last_incremental["copied_bytes"] == 0
    rec = transfer_record(backend, backend.uri("s2"))
    assert rec["copied_bytes"] == 0 and "base_rejected" in rec and "base" not in rec


def test_base_deleted_mid_save_falls_back_to_uploads(backend: Backend) -> None:
    sd1 = make_state()
    # frozen_keys lays the frozen items out in objects of their own (GCS copies whole objects only).
    cloudckpt.save(sd1, backend.uri("s1"), no_dist=True, frozen_keys=FROZEN, **backend.options)
    sd2 = train_step(sd1, 2)
    w = writer_for(backend.uri("s2"), **backend.options, base_checkpoint_id=backend.uri("s1"))
    store = w.store
    base = parse_uri(backend.uri("s1"))
    gone = threading.Event()
    copy_object, part_copy = store.copy_object, store.upload_part_copy

    def vanish() -> None:
        # After the base was verified, before the first copy: someone deletes it.
        if not gone.is_set():
            gone.set()
            backend.store().delete_many([base.key(n) for n in _object_names(backend, base)])

    def copy(*a: Any, **kw: Any) -> Any:
        vanish()
        return copy_object(*a, **kw)

    def part(*a: Any, **kw: Any) -> Any:
        vanish()
        return part_copy(*a, **kw)

    store.copy_object, store.upload_part_copy = copy, part
    cloudckpt.save(sd2, backend.uri("s2"), storage_writer=w, no_dist=True)
    assert gone.is_set()
    assert w.last_incremental["copy_fallbacks"] >= 1 and w.last_incremental["copied_bytes"] == 0
    assert_loads(backend.uri("s2"), sd2, backend.options)
    assert backend.pending_uploads(backend.uri("s2")) == []


@pytest.mark.parametrize("backend", ["gcs", "local"], indirect=True)
def test_base_changed_mid_save_is_not_copied(backend: Backend) -> None:
    """A base object replaced after verification is never copied (the copy is conditional on its version).

    moto ignores CopySourceIfMatch, so S3 is left out here; real S3, GCS and
    local paths refuse the copy, and the items are uploaded from memory.
    """
    sd1 = make_state()
    cloudckpt.save(sd1, backend.uri("s1"), no_dist=True, frozen_keys=FROZEN, **backend.options)
    sd2 = train_step(sd1, 2)
    w = writer_for(backend.uri("s2"), **backend.options, base_checkpoint_id=backend.uri("s1"), frozen_keys=FROZEN)
    store = w.store
    base = parse_uri(backend.uri("s1"))
    copy_object = store.copy_object
    done = threading.Event()

    def copy(src: str, dst: str, **kw: Any) -> Any:
        if not done.is_set():
            done.set()
            data = bytearray(backend.store().get(src))
            _replace(backend, base, os.path.basename(src), bytes(data))  # same bytes, a new version
        return copy_object(src, dst, **kw)

    store.copy_object = copy
    cloudckpt.save(sd2, backend.uri("s2"), storage_writer=w, no_dist=True)
    assert done.is_set() and w.last_incremental["copy_fallbacks"] >= 1
    assert_loads(backend.uri("s2"), sd2, backend.options)


# -- a save killed while copying ----------------------------------------------------------------

_CHILD = r"""
import os, sys, time, json, torch
sys.path.insert(0, {root!r})
import cloudckpt
from cloudckpt.writer import writer_for
from tests.test_incremental import make_state, train_step, FROZEN
opts = json.loads({opts!r})
sd = train_step(make_state(), 2)
w = writer_for({uri!r}, base_checkpoint_id={base!r}, **opts)
store = w.store
orig = (store.copy_object, store.upload_part_copy)
def slow(fn):
    def run(*a, **kw):
        out = fn(*a, **kw)          # one copy lands...
        open({marker!r}, "a").close()
        time.sleep(120)             # ...and the process is killed before the others
        return out
    return run
store.copy_object, store.upload_part_copy = slow(orig[0]), slow(orig[1])
cloudckpt.save(sd, {uri!r}, storage_writer=w, no_dist=True)
"""


def test_kill_during_copy_heavy_save_commits_nothing(backend: Backend, tmp_path: Any) -> None:
    sd1 = make_state()
    cloudckpt.save(sd1, backend.uri("s1"), no_dist=True, frozen_keys=FROZEN, **backend.options)
    marker = str(tmp_path / "copying")
    script = _CHILD.format(root=os.getcwd(), opts=json.dumps(backend.options), uri=backend.uri("s2"),
                           base=backend.uri("s1"), marker=marker)
    child = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(marker):
            assert child.poll() is None, f"the save ended (rc {child.returncode}) before it copied"
            assert time.monotonic() < deadline, "the save never started copying"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    s2 = parse_uri(backend.uri("s2"))
    names = backend.keys(backend.uri("s2"))
    assert any(layout.parse_data_object_name(n) for n in names) or backend.pending_uploads(str(s2)), \
        "the kill came before any copy landed"
    assert not ops.is_committed(backend.store(), s2)
    assert layout.checkpoint_state(names) != layout.COMMITTED
    assert_loads(backend.uri("s1"), sd1, backend.options)  # the base is untouched


# -- the manager, info ---------------------------------------------------------------------------


def test_manager_incremental_uses_newest_committed_step(backend: Backend) -> None:
    opts = dict(backend.options)
    with cloudckpt.CheckpointManager(backend.uri("run"), keep_last=2, incremental=True, frozen_keys=FROZEN,
                                     preemption=False, **opts) as mgr:
        sd = make_state()
        mgr.save(sd, 1)
        for step in (2, 3):
            sd = train_step(sd, step)
            mgr.save(sd, step)
        assert mgr.steps() == [2, 3]
        out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in sd.items()}
        assert mgr.load(out) == 3
    assert all(torch.equal(out[k], v) for k, v in sd.items() if isinstance(v, torch.Tensor))
    rec = transfer_record(backend, mgr.checkpoint_uri(3))
    assert rec["base"] == mgr.checkpoint_uri(2) and rec["copied_bytes"] >= 64 * MiB
    assert transfer_record(backend, mgr.checkpoint_uri(2))["copied_bytes"] >= 64 * MiB


def test_info_shows_copied_and_uploaded_bytes(backend: Backend, capsys: Any) -> None:
    from cloudckpt import cli

    sd1 = make_state()
    cloudckpt.save(sd1, backend.uri("s1"), no_dist=True, frozen_keys=FROZEN, **backend.options)
    sd2 = train_step(sd1, 2)
    cloudckpt.save(sd2, backend.uri("s2"), no_dist=True, frozen_keys=FROZEN, base_checkpoint_id=backend.uri("s1"),
                   **backend.options)
    store = open_store(backend.uri("s2"), **backend.options)
    full = ops.checkpoint_info(store, parse_uri(backend.uri("s1")))
    assert full.copied_bytes == 0 and full.uploaded_bytes >= STATE_BYTES and full.base is None
    info = ops.checkpoint_info(store, parse_uri(backend.uri("s2")))
    assert info.copied_bytes >= 64 * MiB and info.uploaded_bytes < 2 * MiB
    assert info.base == str(parse_uri(backend.uri("s1")))
    args = ["info", backend.uri("s2")]
    if backend.endpoint:
        args += ["--endpoint-url", backend.endpoint]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "copied in the store from" in text and "uploaded" in text
