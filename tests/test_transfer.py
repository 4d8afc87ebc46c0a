"""Transfer engine: part planning, coalescing (pure), and all-or-nothing uploads on real stores."""

from __future__ import annotations

import os

import pytest

from cloudckpt import crc
from cloudckpt.errors import BucketNotFoundError, TransferError
from cloudckpt.store.local import LocalStore
from cloudckpt.transfer import ObjectUpload, TransferEngine, TransferOptions, coalesce_ranges, plan_part_size

MiB = 1 << 20


def test_part_size_grows_for_huge_objects():
    store = LocalStore()
    store.max_parts = 10_000
    store.min_part_size = 5 * MiB
    assert plan_part_size(100 * MiB, 8 * MiB, store) == 8 * MiB
    assert plan_part_size(100 * MiB, 1 * MiB, store) == 5 * MiB
    huge = 10_000 * 8 * MiB + 1
    ps = plan_part_size(huge, 8 * MiB, store)
    assert ps % MiB == 0 and -(-huge // ps) <= 10_000


def test_coalesce_merges_close_ranges_up_to_a_maximum():
    ranges = [(0, 10), (12, 20), (100, 110), (111, 300), (1000, 5000)]
    out = coalesce_ranges(ranges, gap=5, max_size=250)
    assert [(s, e) for s, e, _ in out] == [(0, 20), (100, 300), (1000, 5000)]
    assert [m for _, _, m in out] == [[0, 1], [2, 3], [4]]
    # max_size splits merges
    out = coalesce_ranges(ranges, gap=5, max_size=100)
    assert [(s, e) for s, e, _ in out] == [(0, 20), (100, 110), (111, 300), (1000, 5000)]


def test_upload_segments_and_piece_checksums(backend):
    store = backend.store()
    segs = [os.urandom(3 * MiB), memoryview(os.urandom(4 * MiB)), b"tail" * 100]
    body = b"".join(bytes(s) for s in segs)
    key = backend.uri("obj")
    from cloudckpt.uri import parse_uri

    k = parse_uri(key).key("data.bin")
    part = 5 * MiB if backend.name != "local" else MiB
    engine = TransferEngine(store, TransferOptions(part_size=part, max_concurrency=4))
    [res] = engine.upload([ObjectUpload(k, segs)])
    assert res.size == len(body) and res.crc32c == crc.crc32c(body)
    assert res.span_crc32c(3 * MiB, 4 * MiB) == crc.crc32c(body[3 * MiB:7 * MiB])
    assert store.get(k) == body
    out = bytearray(1000)
    engine.download_ranges([(k, 3 * MiB - 500, memoryview(out))])
    assert bytes(out) == body[3 * MiB - 500:3 * MiB + 500]
    assert backend.pending_uploads(key) == []


def test_one_failed_object_aborts_the_whole_upload(tmp_path):
    # Object B cannot be written (its parent is a file). Its failure must be
    # raised, not swallowed, and must abort A's in-flight multipart upload and
    # delete anything A completed.
    store = LocalStore()
    (tmp_path / "blocker").write_bytes(b"x")
    a = str(tmp_path / "ck" / "a.bin")
    b = str(tmp_path / "blocker" / "b.bin")
    engine = TransferEngine(store, TransferOptions(part_size=MiB, max_concurrency=2))
    with pytest.raises(TransferError, match="b.bin"):
        engine.upload([ObjectUpload(a, [os.urandom(8 * MiB)]), ObjectUpload(b, [b"small"])])
    assert not os.path.exists(a)
    assert store.list_multipart_uploads(str(tmp_path)) == []


def test_missing_bucket_fails_with_a_typed_error(cloud_backend):
    store = cloud_backend.store()
    missing = type(store)("no-such-bucket-" + os.urandom(4).hex(), **cloud_backend.options)
    with pytest.raises(BucketNotFoundError, match="no-such-bucket"):
        TransferEngine(missing, TransferOptions(part_size=5 * MiB)).upload(
            [ObjectUpload("x", [os.urandom(12 * MiB)])])
    assert store.list_multipart_uploads("") == []


def test_upload_of_nothing_is_a_no_op():
    assert TransferEngine(LocalStore()).upload([]) == []


def test_options_are_validated():
    with pytest.raises(ValueError):
        TransferOptions(max_concurrency=0)
    with pytest.raises(TransferError):
        s = LocalStore()
        s.max_part_size = 10
        plan_part_size(10**9, 1, s)


def test_default_concurrency_follows_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudckpt import transfer

    for cpus, want in ((1, 4), (2, 4), (4, 8), (8, 16), (96, 16)):
        monkeypatch.setattr(transfer.os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert transfer.default_max_concurrency() == want
        assert TransferOptions().max_concurrency == want
    assert TransferOptions(max_concurrency=32).max_concurrency == 32
