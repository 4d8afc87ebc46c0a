"""State dicts and comparisons shared by the tests."""

from __future__ import annotations

from typing import Any

import torch


class Opaque:
    """A small picklable object stored through DCP's BYTE_IO path."""

    def __init__(self, name: str, values: list[int]) -> None:
        self.name = name
        self.values = values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and (self.name, self.values) == (other.name, other.values)


def realistic_state_dict(seed: int = 0, *, opaque: bool = False) -> dict[str, Any]:
    """Several dtypes, views, 0-d/empty tensors, nesting and non-tensor values.

    ``opaque=True`` adds a custom class instance (``extra``), which loads only with
    ``allow_pickle=True``: restricted loading refuses classes outside its allow-list.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 48, generator=g)
    sd: dict[str, Any] = {
        "model": {
            "embed.weight": torch.randn(257, 33, generator=g),
            "fc.weight": torch.randn(40, 30, generator=g).to(torch.bfloat16),
            "fc.bias": torch.randn(40, generator=g).to(torch.float16),
            "transposed": base.t(),                # non-contiguous
            "row_view": base[5:9],                 # view with a storage offset
            "strided": base[:, ::3],               # non-contiguous view
            "scalar": torch.tensor(3.25),          # 0-d
            "empty": torch.empty(0, 7),            # empty
            "counts": torch.arange(100, dtype=torch.int64) * 7,
            "bytes": torch.randint(0, 255, (77,), dtype=torch.uint8, generator=g),
            "mask": torch.rand(13, generator=g) > 0.5,
        },
        "optim": {
            "state": {"0": {"exp_avg": torch.randn(257, 33, generator=g), "step": torch.tensor(12.0)}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}],
        },
        "step": 1234,
        "run_name": "exp-42",
        "history": [torch.ones(3), torch.zeros(2, 2)],
    }
    if opaque:
        sd["extra"] = Opaque("meta", [1, 2, 3])
    return sd


def empty_like_state_dict(sd: Any) -> Any:
    """A load target with the same structure and garbage/zero values."""
    if isinstance(sd, torch.Tensor):
        out = torch.empty_like(sd.contiguous())
        if out.is_floating_point():
            out.fill_(float("nan")) if out.dtype != torch.bool else None
        elif out.dtype == torch.bool:
            out.fill_(False)
        else:
            out.fill_(-1)
        return out
    if isinstance(sd, dict):
        return {k: empty_like_state_dict(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [empty_like_state_dict(v) for v in sd]
    if isinstance(sd, tuple):
        return tuple(empty_like_state_dict(v) for v in sd)
    return None


def assert_state_equal(expected: Any, actual: Any, path: str = "") -> None:
    """Exact equality, tensors compared bitwise with dtype and shape."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor, got {type(actual)}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert torch.equal(actual, expected), f"{path}: values differ"
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{path}: keys differ"
        for k in expected:
            assert_state_equal(expected[k], actual[k], f"{path}.{k}")
        return
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length differs"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_state_equal(e, a, f"{path}[{i}]")
        return
    assert actual == expected, f"{path}: {actual!r} != {expected!r}"
