"""Loads into CUDA tensors: pinned reused host buffers, non-blocking copies on a side stream.

Runs wherever CUDA exists; skipped (not passed) elsewhere.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _state(device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"w{i}": torch.randn(1024, 512, generator=g) for i in range(12)}
    sd["cols"] = torch.randn(64, 33, generator=g).to(torch.bfloat16)
    sd["tiny"] = torch.arange(7)
    return {k: v.to(device) for k, v in sd.items()}


def _spy_copiers(monkeypatch):
    from cloudckpt import reader as reader_mod

    copiers = []
    real = reader_mod._Copier

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            copiers.append(self)

    monkeypatch.setattr(reader_mod, "_Copier", Spy)
    return copiers


def test_load_into_cuda_tensors_is_exact_via_pinned_buffers_and_a_side_stream(backend, monkeypatch):
    import cloudckpt

    uri = backend.uri("cuda")
    cloudckpt.save(_state("cpu"), uri, no_dist=True, **backend.options)
    copiers = _spy_copiers(monkeypatch)
    target = {k: torch.zeros_like(v) for k, v in _state("cuda").items()}
    cloudckpt.load(target, uri, no_dist=True, **backend.options)
    for k, v in _state("cpu").items():
        assert target[k].is_cuda and torch.equal(target[k].cpu(), v), k
    assert copiers and all(c.pinned for c in copiers)
    assert copiers[0]._streams, "device copies did not use a side stream"


def test_pinned_buffers_are_reused_and_bounded(backend, monkeypatch):
    import cloudckpt
    from cloudckpt.transfer import TransferOptions

    uri = backend.uri("cudabound")
    cloudckpt.save(_state("cpu", 1), uri, no_dist=True, **backend.options)
    copiers = _spy_copiers(monkeypatch)
    target = {k: torch.zeros_like(v) for k, v in _state("cuda", 1).items()}
    opts = TransferOptions(max_read_size=1 << 20, max_concurrency=2, read_gap_threshold=1)
    cloudckpt.load(target, uri, no_dist=True, transfer_options=opts, **backend.options)
    for k, v in _state("cpu", 1).items():
        assert torch.equal(target[k].cpu(), v), k
    c = copiers[0]
    assert c.requested >= 12 and c.allocated < c.requested, (c.requested, c.allocated)
    assert not c._inflight and not c._deferred
