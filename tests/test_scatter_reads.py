"""Scatter reads: one ranged GET fills many target tensors, skipping the framing between their payloads.

Real servers only: S3 requests are counted by a FaultProxy in front of moto
(GCS: in front of the GCS emulator), local reads by counting the store's calls.
"""

from __future__ import annotations

import contextlib
import io
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import cloudckpt
from cloudckpt import crc
from cloudckpt.errors import IntegrityError
from cloudckpt.reader import reader_for
from cloudckpt.store.base import Scatter
from cloudckpt.store.local import LocalStore
from cloudckpt.transfer import TransferOptions
from cloudckpt.uri import parse_uri
from cloudckpt_testing.faultproxy import FaultProxy

GET_OPS = ("GetObject", "gcs.get.media", "gcs.xml.get")
MAX_READ = 1 << 20
SENTINEL = -7.0


def _state() -> dict[str, Any]:
    """Many small tensors, some medium ones and a byte item: several 1 MiB read buffers per object."""
    g = torch.Generator().manual_seed(3)
    sd: dict[str, Any] = {f"small.{i:03d}": torch.rand(1024, generator=g) for i in range(300)}  # 4 KiB each
    sd.update({f"medium.{i:02d}": torch.rand(64, 1024, generator=g) for i in range(6)})  # 256 KiB each
    sd.update({f"ints.{i}": torch.arange(i * 100, dtype=torch.int64) for i in range(1, 4)})
    sd["step"] = 42
    return sd


def _blank(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in sd.items()}


def _check_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


def _data_objects(backend: Any, uri: str) -> dict[str, int]:
    """Sizes of the checkpoint's data objects (relative name -> bytes)."""
    store = backend.store()
    prefix = parse_uri(uri).key("")
    return {o.key[len(prefix):].lstrip("/"): o.size for o in store.list(prefix) if o.key.endswith(".distcp")}


@contextlib.contextmanager
def _counting(backend: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, Any], list[Any]]]:
    """Reader options that count data GETs, and the list they are counted in (one entry per request).

    Cloud backends go through a FaultProxy (what the server saw); the local
    store's read calls are counted (one call is one read of the file).
    """
    if backend.name == "local":
        calls: list[Any] = []
        for name in ("get_range", "get_ranges_into"):
            orig = getattr(LocalStore, name)

            def counted(self: Any, key: str, start: int, out: Any, _orig: Any = orig) -> None:
                if key.endswith(".distcp"):
                    calls.append((key, start))
                return _orig(self, key, start, out)

            monkeypatch.setattr(LocalStore, name, counted)
        yield {}, calls
        return
    with FaultProxy(backend.endpoint, api="s3" if backend.name == "s3" else "gcs") as proxy:
        reads: list[Any] = []
        yield dict(backend.options, endpoint_url=proxy.url), reads
        reads.extend(r for r in proxy.reads() if r.op in GET_OPS and r.key.endswith(".distcp"))


def _spy_scatter(monkeypatch: pytest.MonkeyPatch, backend: Any) -> list[int]:
    """Count scatter reads (views per call) on the backend's store class."""
    store_cls = type(backend.store())
    seen: list[int] = []
    orig = store_cls.get_ranges_into

    def spy(self: Any, key: str, start: int, views: Any) -> None:
        seen.append(len(views))
        return orig(self, key, start, views)

    monkeypatch.setattr(store_cls, "get_ranges_into", spy)
    return seen


def test_many_tensors_load_exactly_in_about_one_get_per_max_read_size(backend, monkeypatch):
    uri = backend.uri("many")
    sd = _state()
    cloudckpt.save(sd, uri, no_dist=True, **backend.options)
    sizes = _data_objects(backend, uri)
    assert sizes, "the save wrote no data object"
    scatters = _spy_scatter(monkeypatch, backend)
    target = _blank(sd)
    with _counting(backend, monkeypatch) as (opts, reads):
        cloudckpt.load(target, uri, no_dist=True, transfer_options=TransferOptions(max_read_size=MAX_READ),
                       **(opts or backend.options))
    _check_equal(target, sd)
    per_object: dict[str, int] = {}
    for r in reads:
        key = r[0] if isinstance(r, tuple) else r.key
        name = next(n for n in sizes if key.endswith(n))
        per_object[name] = per_object.get(name, 0) + 1
    assert set(per_object) == set(sizes), (per_object, sizes)
    for name, size in sizes.items():
        ideal = math.ceil(size / MAX_READ)
        # Items are never split, so a buffer may close a little before max_read_size: at most one extra read.
        assert ideal <= per_object[name] <= ideal + 1, (name, size, per_object[name])
    # The payloads went straight into their tensors: most reads were scatter reads of many tensors.
    assert scatters and max(scatters) > 50, scatters
    assert len(scatters) >= sum(per_object.values()) - 2


def _payload_location(backend: Any, uri: str, fqn: str) -> tuple[str, int, int]:
    """(object key, absolute payload offset, payload bytes) of tensor ``fqn``, from metadata + manifest."""
    reader = reader_for(uri, **backend.options)
    md = reader.read_metadata()
    (index, info), = [(i, s) for i, s in md.storage_data.items() if i.fqn == fqn]
    facts = reader._facts[(info.relative_path, info.offset)]
    assert facts.payload_offset is not None
    return parse_uri(uri).key(info.relative_path), info.offset + facts.payload_offset, \
        info.length - facts.payload_offset


def _flip(backend: Any, key: str, at: int) -> None:
    store = backend.store()
    data = bytearray(store.get(key))
    data[at] ^= 0x40
    store.put(key, [bytes(data)], crc32c=crc.crc32c(data))


def test_flipped_payload_byte_in_a_scattered_read_names_the_item(backend, monkeypatch):
    uri = backend.uri("flip")
    sd = _state()
    cloudckpt.save(sd, uri, no_dist=True, **backend.options)
    key, payload, _ = _payload_location(backend, uri, "small.150")
    _flip(backend, key, payload + 100)
    scatters = _spy_scatter(monkeypatch, backend)
    target = _blank(sd)
    with pytest.raises(IntegrityError, match=r"small\.150"):
        cloudckpt.load(target, uri, no_dist=True, transfer_options=TransferOptions(max_read_size=MAX_READ),
                       **backend.options)
    assert scatters, "the corrupt item was not read by a scatter read"


class _ForgedReader(cloudckpt.reader.CloudStorageReader):
    """A reader whose manifest says what an attacker wrote: shifted payload offsets."""

    shift: dict[str, int] = {}

    def _load_manifest(self, metadata_blob: bytes, rank: int | None) -> Any:
        manifest = super()._load_manifest(metadata_blob, rank)
        from cloudckpt import safe_pickle

        md = safe_pickle.load_metadata(metadata_blob, "forged")
        for index, info in md.storage_data.items():
            delta = self.shift.get(index.fqn)
            facts = self._facts.get((info.relative_path, info.offset))
            if delta is not None and facts is not None and facts.payload_offset is not None:
                self._facts[(info.relative_path, info.offset)] = dataclasses.replace(
                    facts, payload_offset=facts.payload_offset + delta)
        return manifest


@pytest.mark.parametrize("verify", [True, False])
def test_forged_payload_offsets_never_write_outside_the_targets(backend, verify):
    uri = backend.uri("forged")
    sd = {f"t.{i:02d}": torch.full((1024,), float(i)) for i in range(40)}
    cloudckpt.save(sd, uri, no_dist=True, **backend.options)
    # Targets are slices of one backing tensor with sentinel gaps between them.
    backing = torch.full((40 * 1100,), SENTINEL)
    target = {f"t.{i:02d}": backing[i * 1100:i * 1100 + 1024] for i in range(40)}
    for t in target.values():
        t.zero_()
    # Payloads shifted back into the previous item's bytes, forward into the next one's framing,
    # and onto a neighbour's payload (overlapping reads).
    shifts = {"t.05": -64, "t.06": -4000, "t.10": 32, "t.20": -200}
    scheme = parse_uri(uri).scheme
    cls = type(f"Forged{scheme}", (_ForgedReader, type(reader_for(uri, **backend.options))),
               {"shift": shifts, "scheme": scheme})
    reader = cls(uri, verify=verify, transfer_options=TransferOptions(max_read_size=MAX_READ), **backend.options)
    try:
        cloudckpt.load(target, uri, storage_reader=reader, no_dist=True)
    except IntegrityError as err:
        assert verify, f"verify=False still failed: {err}"
        assert any(f"'{fqn}'" in str(err) for fqn in shifts), err
    else:
        assert not verify, "a forged payload offset loaded without an integrity error"
    gaps = torch.cat([backing[i * 1100 + 1024:(i + 1) * 1100] for i in range(40)])
    assert bool((gaps == SENTINEL).all()), "a read wrote outside its target tensor"
    if not verify:  # unshifted items are still exact
        for i in range(40):
            if f"t.{i:02d}" not in shifts:
                assert torch.equal(target[f"t.{i:02d}"], sd[f"t.{i:02d}"])


def test_scatter_plan_refuses_disordered_views_and_writes_only_views():
    a, b = bytearray(4), bytearray(4)
    with pytest.raises(ValueError):
        Scatter(0, [(8, memoryview(a)), (6, memoryview(b))])  # overlapping
    with pytest.raises(ValueError):
        Scatter(10, [(4, memoryview(a))])  # before the range start
    with pytest.raises(ValueError):
        Scatter(0, [(0, memoryview(bytes(4)))])  # read-only
    plan = Scatter(100, [(102, memoryview(a)), (110, memoryview(b))])
    assert plan.size == 14
    src = memoryview(bytes(range(100, 114)))
    pos = 0

    def readinto(buf: memoryview) -> int:
        nonlocal pos
        n = min(len(buf), 3, len(src) - pos)  # short reads, as sockets give
        buf[:n] = src[pos:pos + n]
        pos += n
        return n

    assert plan.fill(readinto, 0, plan.size) == 14
    assert bytes(a) == bytes(range(102, 106)) and bytes(b) == bytes(range(110, 114))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8,
                                   torch.bool, torch.complex64, torch.float64])
def test_cached_framing_is_byte_for_byte_torch_save(dtype):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from cloudckpt import layout

    g = torch.Generator().manual_seed(1)
    shapes = [(1,), (7,), (3, 5), (2, 3, 4), (), (1024,), (17, 1)]
    cache = layout.FramingCache()
    for shape in shapes:
        framed = []
        for round_ in range(3):  # the first frames with torch.save and fills the cache; later ones hit it
            t = (torch.rand(shape, generator=g) * 100).to(dtype)
            with layout.crc_disabled():
                fi = layout.frame_tensor(MetadataIndex(f"x{round_}"), t, cache)
                want = io.BytesIO()
                torch.save(t, want)
            got = b"".join(bytes(s) for s in fi.segments)
            assert got == want.getvalue(), (dtype, shape, round_)
            assert fi.size == len(got)
            assert fi.payload_offset is not None
            assert got[fi.payload_offset:fi.payload_offset + fi.payload_nbytes] == \
                t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            framed.append(fi)
        with layout.crc_disabled():
            key = layout._framing_key(framed[-1].keepalive)
        assert key is not None and key in cache, (dtype, shape)


def test_framing_cache_is_not_used_when_torch_save_would_differ():
    from cloudckpt import layout

    with layout.crc_disabled():
        assert layout._framing_key(torch.zeros(3)) is not None
        assert layout._framing_key(torch.zeros(3, requires_grad=True)) is None
        assert layout._framing_key(torch.nn.Parameter(torch.zeros(3))) is None
        assert layout._framing_key(torch.zeros(3, dtype=torch.complex64).conj()) is None
    # With torch.save's zip CRC on, the framing holds the payload's CRC: never cached.
    assert layout._framing_key(torch.zeros(3)) is None


def test_a_large_tensor_is_fetched_in_max_read_size_pieces(backend, monkeypatch):
    """One tensor larger than max_read_size is read over several connections, never in one GET."""
    uri = backend.uri("big")
    sd = {"w": torch.randn(6 * 1024 * 1024 // 4)}  # 6 MiB of float32
    cloudckpt.save(sd, uri, no_dist=True, **backend.options)
    target = {"w": torch.zeros_like(sd["w"])}
    with _counting(backend, monkeypatch) as (opts, reads):
        cloudckpt.load(target, uri, no_dist=True, transfer_options=TransferOptions(max_read_size=MAX_READ),
                       **(opts or backend.options))
    assert torch.equal(target["w"], sd["w"])
    data_reads = [r for r in reads if (r[0] if isinstance(r, tuple) else r.key).endswith(".distcp")]
    assert len(data_reads) >= math.ceil(6 * 1024 * 1024 / MAX_READ), len(data_reads)
