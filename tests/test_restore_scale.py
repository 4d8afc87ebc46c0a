"""Restore at scale: replicated state fetched once per job, resharded loads fetch each byte range once.

Real gloo ranks (tests/dist.py) load from moto's S3 server or the GCS emulator
through a FaultProxy that counts the bytes the store serves and logs every
ranged GET, so the tests measure what the store actually sent.
"""

from __future__ import annotations

from typing import Any

import pytest

from cloudckpt_testing.faultproxy import FaultProxy
from tests import restore_workers, workers
from tests.dist import run_world

GET_OPS = ("GetObject", "gcs.get.media", "gcs.xml.get")


def _proxy(backend: Any) -> FaultProxy:
    return FaultProxy(backend.endpoint, api="s3" if backend.name == "s3" else "gcs")


def _checkpoint_bytes(backend: Any, uri: str) -> int:
    from cloudckpt.uri import parse_uri

    return sum(o.size for o in backend.store().list(parse_uri(uri).key("")))


def _data_reads(proxy: FaultProxy) -> list[Any]:
    return [r for r in proxy.reads() if r.op in GET_OPS and r.key.endswith(".distcp")]


def _assert_no_range_twice(reads: list[Any]) -> None:
    by_key: dict[str, list[tuple[int, int]]] = {}
    for r in reads:
        span = r.span()
        assert span is not None, f"whole-object GET of a data object: {r}"
        by_key.setdefault(r.key, []).append(span)
    assert by_key, "the load read no data object through the proxy"
    for key, spans in by_key.items():
        spans.sort()
        for (s0, e0), (s1, e1) in zip(spans, spans[1:], strict=False):
            assert s1 >= e0, f"{key}: bytes [{s1}, {min(e0, e1)}) fetched twice ({(s0, e0)} and {(s1, e1)})"


def test_replicated_four_rank_load_fetches_the_checkpoint_once(cloud_backend):
    uri = cloud_backend.uri("replicated")
    with _proxy(cloud_backend) as proxy:
        load_opts = dict(cloud_backend.options, endpoint_url=proxy.url)
        assert run_world(4, restore_workers.save_and_load_replicated, uri, cloud_backend.options, load_opts, 3,
                         timeout=400) == [True] * 4
        served = proxy.served_bytes
        reads = _data_reads(proxy)
    size = _checkpoint_bytes(cloud_backend, uri)
    assert size > 8 * 1024 * 1024
    # Every rank still reads .metadata and the manifest (a few KiB); data bytes come once.
    assert served <= 1.1 * size, f"the store served {served / size:.2f}x the checkpoint's {size} bytes"
    assert sum(r.nbytes for r in reads) <= size
    _assert_no_range_twice(reads)


def test_without_sharing_every_rank_reads_everything(moto_server, tmp_path, request):
    """share_reads=False is the direct-read fallback: correct, and the store serves every rank's bytes."""
    from tests.conftest import make_backend

    backend = make_backend("s3", request, tmp_path)
    uri = backend.uri("direct")
    with _proxy(backend) as proxy:
        load_opts = dict(backend.options, endpoint_url=proxy.url, share_reads=False)
        assert run_world(4, restore_workers.save_and_load_replicated, uri, backend.options, load_opts, 4,
                         timeout=400) == [True] * 4
        served = proxy.served_bytes
    size = _checkpoint_bytes(backend, uri)
    assert served >= 3.9 * size, f"expected about 4x without sharing, got {served / size:.2f}x"


@pytest.mark.parametrize("saved,loaded", [(2, 4), (4, 2)])
def test_resharded_load_fetches_no_byte_range_twice(cloud_backend, saved, loaded):
    uri = cloud_backend.uri(f"reshard{saved}to{loaded}")
    run_world(saved, workers.save_sharded, uri, cloud_backend.options, 7, timeout=400)
    with _proxy(cloud_backend) as proxy:
        load_opts = dict(cloud_backend.options, endpoint_url=proxy.url)
        assert run_world(loaded, workers.load_sharded, uri, load_opts, 7, saved, timeout=400) == [True] * loaded
        reads = _data_reads(proxy)
    _assert_no_range_twice(reads)


def test_a_rank_that_cannot_read_stops_every_rank_without_hanging(moto_server, tmp_path, request):
    """Rank 2's ranged GETs fail: the others stop (PeerReadError) and every rank raises rank 2's error."""
    from cloudckpt_testing.faultproxy import FaultRule
    from tests.conftest import make_backend

    backend = make_backend("s3", request, tmp_path)
    uri = backend.uri("peerfail")
    run_world(4, restore_workers.save_replicated, uri, backend.options, 0, timeout=400)
    rules = [FaultRule("GetObject", fault="status", status=500, ranged=True, rate=1.0)]
    with FaultProxy(backend.endpoint, rules=rules, api="s3") as proxy:
        bad = dict(backend.options, endpoint_url=proxy.url, max_attempts=1)
        seen = run_world(4, restore_workers.load_expect_failure, uri, backend.options, 2, bad, timeout=400)
        assert proxy.injected >= 1
    assert seen[2] not in ("no error", "PeerReadError"), seen
    assert seen == [seen[2]] * 4, seen
