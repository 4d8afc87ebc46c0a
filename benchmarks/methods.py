"""The state dict, and one class per checkpointing method with setup/save/load.

Every method saves and loads the same state dict (:func:`build_state_dict`) to
a checkpoint called ``name`` on its target:

============== ====== ==========================================================
name           target what
============== ====== ==========================================================
cloudckpt      s3     cloudckpt.S3StorageWriter / S3StorageReader, defaults
s3torchconnector s3   s3torchconnector.dcp S3StorageWriter / S3StorageReader
fsspec-s3fs    s3     torch FsspecWriter / FsspecReader over s3fs
filesystem-shm local  stock FileSystemWriter / FileSystemReader on /dev/shm
raw-http       s3     one http.client PUT of all tensor bytes, one GET (floor)
cloudckpt-gcs  gcs    cloudckpt.GCSStorageWriter / GCSStorageReader
fsspec-gcsfs   gcs    torch FsspecWriter / FsspecReader over gcsfs
raw-http-gcs   gcs    the raw floor against the GCS emulator (XML API PUT/GET)
============== ====== ==========================================================
"""

from __future__ import annotations

import http.client
import math
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from benchmarks.servers import BUCKET, CREDENTIALS, REGION

# gcsfs >= 2026 probes every bucket for hierarchical namespaces over gRPC first;
# an emulator has no gRPC endpoint, so each probe would wait 60 s before falling
# back. Real GCS users keep the default; the benchmark turns the probe off.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

MiB = 1 << 20
SMALL_TENSORS = 64
SMALL_TENSOR_BYTES = 4096

# --------------------------------------------------------------------------- the state dict


def build_state_dict(total_bytes: int, tensor_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Deterministic state dict: ``total_bytes`` of float32 tensors of ``tensor_bytes`` each
    (the last one smaller if needed), 64 tensors of 4 KiB, and non-tensor objects."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {}
    sizes = [tensor_bytes] * (total_bytes // tensor_bytes)
    if total_bytes % tensor_bytes:
        sizes.append(total_bytes % tensor_bytes)
    for i, nbytes in enumerate(sizes):
        numel = nbytes // 4
        cols = math.gcd(numel, 4096)
        sd[f"layers.{i:03d}.weight"] = torch.rand(numel // cols, cols, generator=g)
    for i in range(SMALL_TENSORS):
        sd[f"norms.{i:02d}.bias"] = torch.rand(SMALL_TENSOR_BYTES // 4, generator=g)
    sd.update(objects())
    return sd


#: Transformer blocks of the LLM-like state dict, and the tensors of each block.
LLM_BLOCKS = 24
LLM_BLOCK_TENSORS = (  # (name, rows as a multiple of the hidden size h, columns as a multiple of h; 0: a vector)
    ("input_norm.weight", 1, 0), ("input_norm.bias", 1, 0),
    ("attn.qkv.weight", 3, 1), ("attn.qkv.bias", 3, 0),
    ("attn.out.weight", 1, 1), ("attn.out.bias", 1, 0),
    ("post_norm.weight", 1, 0), ("post_norm.bias", 1, 0),
    ("mlp.up.weight", 4, 1), ("mlp.up.bias", 4, 0),
    ("mlp.down.weight", 1, 4), ("mlp.down.bias", 1, 0),
)


def llm_shapes(total_bytes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a 24-block transformer whose params + AdamW state take about ``total_bytes``.

    float32 params, ``exp_avg`` and ``exp_avg_sq`` are three copies of the
    parameters (12 bytes per parameter). The hidden size ``h`` is chosen so
    that the blocks hold about 90% of the parameters; the embedding (the
    largest tensor) takes the rest.
    """
    params = max(total_bytes // 12, 1)
    h = max(32, int(math.sqrt(0.9 * params / (LLM_BLOCKS * 12))) // 32 * 32)
    per_block = sum(r * h * (c * h if c else 1) for _, r, c in LLM_BLOCK_TENSORS)
    vocab = max(1, (params - LLM_BLOCKS * per_block - 2 * h) // h)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, h)}
    for b in range(LLM_BLOCKS):
        for name, r, c in LLM_BLOCK_TENSORS:
            shapes[f"blocks.{b:02d}.{name}"] = (r * h, c * h) if c else (r * h,)
    shapes["final_norm.weight"] = (h,)
    shapes["final_norm.bias"] = (h,)
    return shapes


def build_llm_state_dict(total_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Deterministic LLM-like state dict of about ``total_bytes``: model params + AdamW state.

    ``{"model": {fqn: param}, "optim": {"state": {fqn: {"exp_avg", "exp_avg_sq", "step"}}}}``
    plus the non-tensor objects; ``step`` is a 0-dim float32 tensor as in
    ``torch.optim.AdamW``. 24 blocks × 12 tensors: about 1,160 tensors.
    """
    g = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, shape in llm_shapes(total_bytes).items():
        model[fqn] = torch.rand(shape, generator=g)
        state[fqn] = {"exp_avg": torch.rand(shape, generator=g), "exp_avg_sq": torch.rand(shape, generator=g),
                      "step": torch.tensor(float(len(state) + 1))}
    return {"model": model, "optim": {"state": state}, **objects()}


def build_shape(shape: str, total_bytes: int, tensor_bytes: int) -> dict[str, Any]:
    """The benchmark state dict of ``shape``: "large" (:func:`build_state_dict`) or "llm"."""
    if shape == "llm":
        return build_llm_state_dict(total_bytes)
    if shape == "large":
        return build_state_dict(total_bytes, tensor_bytes)
    raise ValueError(f"unknown state dict shape {shape!r}; choose large or llm")


def describe_shape(shape: str, total_bytes: int, tensor_bytes: int) -> str:
    """One line: how many tensors, their size range and total."""
    sizes = sorted(t.nbytes for t in _tensors(build_shape(shape, total_bytes, tensor_bytes)))
    return (f"{shape}: {len(sizes)} tensors, {sizes[0]} B to {sizes[-1] / MiB:.1f} MiB, "
            f"{sum(sizes) / MiB:.0f} MiB in all")


def objects() -> dict[str, Any]:
    """The non-tensor entries of the state dict: an int, a string and a nested dict."""
    return {
        "step": 123_456,
        "run_name": "benchmark-run",
        "optimizer_config": {"name": "adamw", "lr": 3e-4, "betas": [0.9, 0.95], "warmup_steps": 2000},
    }


def tiny_state_dict() -> dict[str, Any]:
    """One 4 KiB tensor plus the non-tensor objects: the warm-up checkpoint."""
    return {"warmup": torch.arange(1024, dtype=torch.float32), **objects()}


def tensor_bytes(sd: dict[str, Any]) -> int:
    """Sum of the tensor payload bytes (the GB in GB/s), nested dicts included."""
    return sum(v.nbytes for v in _tensors(sd))


def _blank(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)  # touched now, so loads do not time page faults
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    if isinstance(value, list):
        return []
    if isinstance(value, str):
        return ""
    if isinstance(value, (int, float)):
        return type(value)(-1)
    return None


def blank_like(sd: dict[str, Any]) -> dict[str, Any]:
    """A load destination with the same keys: zeroed tensors and wrong placeholder objects."""
    return {k: _blank(v) for k, v in sd.items()}


def compare(got: Any, want: Any, path: str = "") -> str | None:
    """None if equal (tensors with torch.equal), else a description of the first difference."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return f"{path}: expected tensor {tuple(want.shape)} {want.dtype}, got {type(got).__name__}"
        return None if torch.equal(got, want) else f"{path}: tensor values differ"
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return f"{path}: keys differ"
        for k in want:
            problem = compare(got[k], want[k], f"{path}.{k}" if path else k)
            if problem:
                return problem
        return None
    return None if got == want and type(got) is type(want) else f"{path}: expected {want!r}, got {got!r}"


def _tensors(sd: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor of ``sd``, nested dicts included, in a fixed (insertion) order."""
    out: list[torch.Tensor] = []
    for v in sd.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            out.extend(_tensors(v))
    return out


# --------------------------------------------------------------------------- methods


@dataclass
class Context:
    """Where a method saves: server endpoint (if any), scratch directory, extra options."""

    endpoint: str | None = None
    workdir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Context":
        server = spec.get("server") or {}
        return cls(endpoint=server.get("endpoint"), workdir=spec.get("workdir"), options=spec.get("options", {}))


class Method:
    """A way to save and load a DCP state dict. Subclasses set ``target`` and implement save/load."""

    #: "s3", "gcs" or "local": which server the method needs.
    target = "s3"
    #: One-line description for the tables' legend.
    description = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def setup(self) -> None:
        """Import and configure the client; runs before the measured operation."""
        os.environ.update(CREDENTIALS)

    def uri(self, name: str) -> str:
        """Location of checkpoint ``name``."""
        scheme = "gs" if self.target == "gcs" else "s3"
        return f"{scheme}://{BUCKET}/{type(self).__name__.lower()}/{name}"

    def save(self, sd: dict[str, Any], name: str) -> None:
        raise NotImplementedError

    def load(self, sd: dict[str, Any], name: str) -> None:
        raise NotImplementedError


class CloudckptS3(Method):
    description = "cloudckpt S3StorageWriter/S3StorageReader (defaults unless swept)"

    def save(self, sd: dict[str, Any], name: str) -> None:
        import cloudckpt

        opts = {k: v for k, v in self.ctx.options.items() if k in ("part_size", "max_concurrency", "target_object_size")}
        writer = cloudckpt.S3StorageWriter(self.uri(name), endpoint_url=self.ctx.endpoint, region=REGION, **opts)
        dcp.save(sd, checkpoint_id=self.uri(name), storage_writer=writer, no_dist=True)

    def load(self, sd: dict[str, Any], name: str) -> None:
        import cloudckpt

        opts = {k: v for k, v in self.ctx.options.items() if k in ("max_concurrency", "read_gap_threshold")}
        reader = cloudckpt.S3StorageReader(self.uri(name), endpoint_url=self.ctx.endpoint, **opts)
        dcp.load(sd, checkpoint_id=self.uri(name), storage_reader=reader, no_dist=True)


class S3TorchConnector(Method):
    description = "s3torchconnector 1.5 DCP S3StorageWriter/S3StorageReader, thread_count=1 (its default)"

    def _fs(self, **kw: Any) -> Any:
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client
        from s3torchconnector.dcp.s3_file_system import S3FileSystem

        # The DCP classes take no endpoint; give their file system a client that has one.
        client = S3Client(REGION, endpoint=self.ctx.endpoint, s3client_config=S3ClientConfig(force_path_style=True))
        return S3FileSystem(REGION, s3_client=client, **kw)

    def save(self, sd: dict[str, Any], name: str) -> None:
        from s3torchconnector.dcp import S3StorageWriter

        writer = S3StorageWriter(REGION, self.uri(name))
        writer.fs = self._fs()
        dcp.save(sd, checkpoint_id=self.uri(name), storage_writer=writer, no_dist=True)

    def load(self, sd: dict[str, Any], name: str) -> None:
        from s3torchconnector.dcp import S3StorageReader

        reader = S3StorageReader(REGION, self.uri(name))
        reader.fs = self._fs(reader_constructor=reader._reader_constructor)
        dcp.load(sd, checkpoint_id=self.uri(name), storage_reader=reader, no_dist=True)


class FsspecS3(Method):
    description = "torch FsspecWriter/FsspecReader + s3fs, sync_files=False"

    def _options(self) -> dict[str, Any]:
        return {
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.ctx.endpoint, "region_name": REGION},
        }

    def save(self, sd: dict[str, Any], name: str) -> None:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(self.uri(name), sync_files=False, **self._options())
        # No checkpoint_id: DCP would reset() the writer with it and drop the fsspec options.
        dcp.save(sd, storage_writer=writer, no_dist=True)

    def load(self, sd: dict[str, Any], name: str) -> None:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        reader = FsspecReader(self.uri(name), **self._options())
        dcp.load(sd, storage_reader=reader, no_dist=True)


class FileSystemShm(Method):
    target = "local"
    description = "stock FileSystemWriter/FileSystemReader into a temp dir on /dev/shm"

    def uri(self, name: str) -> str:
        assert self.ctx.workdir, "filesystem-shm needs a workdir"
        return os.path.join(self.ctx.workdir, name)

    def save(self, sd: dict[str, Any], name: str) -> None:
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(self.uri(name)), no_dist=True)

    def load(self, sd: dict[str, Any], name: str) -> None:
        dcp.load(sd, storage_reader=dcp.FileSystemReader(self.uri(name)), no_dist=True)


class RawHttp(Method):
    """The client floor: all tensor bytes in one PUT body and back with one GET.

    The body is the tensors' memoryviews sent back to back (no copy); the GET
    ``readinto``s straight into the destination tensors. Non-tensor objects are
    not stored (the floor is about bytes); the load copies them over so the
    verification covers the tensors.
    """

    description = "one http.client PUT of the tensor bytes, one GET with readinto (no DCP)"

    def _conn(self) -> tuple[http.client.HTTPConnection, str]:
        assert self.ctx.endpoint
        u = urllib.parse.urlsplit(self.ctx.endpoint)
        return http.client.HTTPConnection(u.hostname, u.port, timeout=600), u.path.rstrip("/")

    def _path(self, base: str, name: str) -> str:
        return f"{base}/{BUCKET}/{type(self).__name__.lower()}/{name}/blob"

    def save(self, sd: dict[str, Any], name: str) -> None:
        conn, base = self._conn()
        views = [memoryview(t.numpy()).cast("B") for t in _tensors(sd)]
        size = sum(v.nbytes for v in views)
        conn.request("PUT", self._path(base, name), body=iter(views),
                     headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"PUT -> {resp.status}: {body[:300]!r}")

    def load(self, sd: dict[str, Any], name: str) -> None:
        conn, base = self._conn()
        conn.request("GET", self._path(base, name))
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"GET -> {resp.status}: {resp.read()[:300]!r}")
        for t in _tensors(sd):
            view = memoryview(t.numpy()).cast("B")
            got = 0
            while got < view.nbytes:
                n = resp.readinto(view[got:])
                if not n:
                    raise RuntimeError("short GET")
                got += n
        if resp.read(1):
            raise RuntimeError("GET returned more bytes than were stored")
        conn.close()
        # Only bytes travel; take the objects from a fresh build so verification checks the tensors.
        sd.update(objects())


class CloudckptGCS(Method):
    target = "gcs"
    description = "cloudckpt GCSStorageWriter/GCSStorageReader (GCS emulator)"

    def save(self, sd: dict[str, Any], name: str) -> None:
        import cloudckpt

        opts = {k: v for k, v in self.ctx.options.items() if k in ("part_size", "max_concurrency", "target_object_size")}
        writer = cloudckpt.GCSStorageWriter(self.uri(name), endpoint_url=self.ctx.endpoint, project="bench", **opts)
        dcp.save(sd, checkpoint_id=self.uri(name), storage_writer=writer, no_dist=True)

    def load(self, sd: dict[str, Any], name: str) -> None:
        import cloudckpt

        reader = cloudckpt.GCSStorageReader(self.uri(name), endpoint_url=self.ctx.endpoint, project="bench")
        dcp.load(sd, checkpoint_id=self.uri(name), storage_reader=reader, no_dist=True)


class FsspecGCS(Method):
    target = "gcs"
    description = "torch FsspecWriter/FsspecReader + gcsfs, token='anon' (GCS emulator)"

    def _options(self) -> dict[str, Any]:
        return {"endpoint_url": self.ctx.endpoint, "token": "anon", "project": "bench"}

    def save(self, sd: dict[str, Any], name: str) -> None:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(self.uri(name), sync_files=False, **self._options())
        # No checkpoint_id: DCP would reset() the writer with it and drop the fsspec options.
        dcp.save(sd, storage_writer=writer, no_dist=True)

    def load(self, sd: dict[str, Any], name: str) -> None:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        reader = FsspecReader(self.uri(name), **self._options())
        dcp.load(sd, storage_reader=reader, no_dist=True)


class RawHttpGCS(RawHttp):
    target = "gcs"
    description = "the raw floor against the GCS emulator (XML API PUT / GET)"


METHODS: dict[str, type[Method]] = {
    "cloudckpt": CloudckptS3,
    "s3torchconnector": S3TorchConnector,
    "fsspec-s3fs": FsspecS3,
    "filesystem-shm": FileSystemShm,
    "raw-http": RawHttp,
    "cloudckpt-gcs": CloudckptGCS,
    "fsspec-gcsfs": FsspecGCS,
    "raw-http-gcs": RawHttpGCS,
}


def create(name: str, ctx: Context) -> Method:
    """Instantiate method ``name`` (a key of :data:`METHODS`)."""
    return METHODS[name](ctx)
