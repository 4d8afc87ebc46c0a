"""Multi-tier checkpoints: a node-local tier with peer replicas in front of the object store.

:class:`~cloudckpt.manager.CheckpointManager` delegates here when it is given
``local_dir`` (see docs/tiers.md)::

    mgr = CheckpointManager("s3://bucket/run", keep_last=3, local_dir="/local/nvme/ckpt",
                            local_every=10, persist_every=100, keep_local=2, replicas=1)

* **Local tier.** Step ``N`` (a multiple of ``local_every``) is a stock DCP save
  into ``{local_dir}/step-{N:010d}/`` on every node: each rank writes its data
  objects into its own node's directory, rank 0 writes ``.metadata`` and the
  checksum manifest into its node's, which every other node then receives.
* **Replication.** Each rank sends its objects over the process group (gloo
  send/recv, never a shared file system) to the rank with the same local rank on
  the next ``replicas`` nodes. Receivers write them with temp+rename and check
  every object's CRC32C against the manifest. Only when every rank of every node
  reports its own objects and the replicas it hosts complete does each node
  write its commit marker (:data:`cloudckpt.layout.NODE_COMMIT_NAME`): a marker
  on any node means the step was replicated everywhere.
* **Persistence.** Multiples of ``persist_every`` are then copied, in the
  background, from the local files (memory-mapped, no second staging copy) to
  ``{root}/step-{N:010d}`` as an ordinary committed cloudckpt checkpoint: every
  rank uploads its own objects, rank 0 writes the manifest and commits
  ``.metadata`` with :func:`cloudckpt.writer.commit_metadata`.
* **Restore.** Ranks gather their nodes' markers; rank 0 picks the freshest
  step that the committed node copies cover completely, or the object store's
  latest if that is newer. Each rank plans its DCP reads, fetches the objects
  its node lacks from ranks whose node holds them, then ``dcp.load``\\ s from
  its node's directory. Resharding works from every tier because the reads are
  planned against the saved metadata, whatever the new world size.

Everything read from a local directory is untrusted: markers and manifests are
size-capped and validated, object names must be plain data object names, and
every replicated or fetched byte is checked against the manifest's CRC32C.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as _dt
import json
import logging
import mmap
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloudckpt import crc, layout
from cloudckpt.errors import (
    CloudCheckpointError,
    DeadlineExceededError,
    IntegrityError,
    PersistError,
    ReplicationError,
)
from cloudckpt.layout import parse_step_name, step_name
from cloudckpt.manifest import MAX_MANIFEST_BYTES, Manifest, check_metadata_bytes, open_manifest

__all__ = [
    "TIERS",
    "NodeIdentity",
    "Topology",
    "Transfer",
    "TierTimes",
    "TieredCheckpoints",
    "exchange",
    "read_marker",
    "local_steps",
    "clean_local_dir",
]

log = logging.getLogger(__name__)

#: What served a load, fastest first (``CheckpointManager.last_load_tier``).
TIERS = ("local", "replica", "object_store")
MARKER_FORMAT = "cloudckpt-node-commit/1"
#: A marker is a few hundred bytes; anything bigger is not one.
MAX_MARKER_BYTES = 1024 * 1024
#: Bytes per send/recv message when replicating or fetching objects.
CHUNK_BYTES = 16 * 1024 * 1024
#: Data objects of the local tier are split at this size, so writes, replication and
#: persistence of one rank's shards overlap across several files.
LOCAL_OBJECT_BYTES = 256 * 1024 * 1024
_MAX_WORLD = 1 << 20
_U32 = 0xFFFFFFFF


# -- node identity and replica placement ------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw[:40]!r} is not an integer; torchrun sets it to one") \
            from None
    if value < 0:
        raise ValueError(f"environment variable {name}={value} is negative")
    return value


@dataclass(frozen=True)
class NodeIdentity:
    """Where this rank runs: node (torchrun's ``GROUP_RANK``), local rank and ranks per node.

    Without torchrun's variables every rank is taken to be on node 0 (one
    machine, one ``local_dir``), with its global rank as local rank.
    """

    node: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls, rank: int, world_size: int) -> NodeIdentity:
        """Read ``GROUP_RANK``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``."""
        return cls(_env_int("GROUP_RANK", 0), _env_int("LOCAL_RANK", rank), _env_int("LOCAL_WORLD_SIZE", world_size))


@dataclass(frozen=True)
class Topology:
    """Node and local rank of every rank of the group (index = group rank)."""

    nodes: tuple[int, ...]
    local_ranks: tuple[int, ...]

    @property
    def world_size(self) -> int:
        """Ranks in the group."""
        return len(self.nodes)

    @property
    def node_ids(self) -> tuple[int, ...]:
        """Distinct nodes, ascending."""
        return tuple(sorted(set(self.nodes)))

    def ranks_on(self, node: int) -> list[int]:
        """Ranks on ``node``, by local rank."""
        return sorted((r for r, n in enumerate(self.nodes) if n == node), key=lambda r: (self.local_ranks[r], r))

    def leader(self, node: int) -> int:
        """The lowest rank on ``node``: it alone writes node-wide files and cleans the node's directory."""
        return min(r for r, n in enumerate(self.nodes) if n == node)

    def is_leader(self, rank: int) -> bool:
        """True if ``rank`` is its node's leader."""
        return self.leader(self.nodes[rank]) == rank

    def partners(self, rank: int, replicas: int) -> list[int]:
        """Ranks holding copies of ``rank``'s objects: same local rank on the next ``replicas`` nodes."""
        order = self.node_ids
        here = order.index(self.nodes[rank])
        out: list[int] = []
        for k in range(1, min(replicas, len(order) - 1) + 1):
            there = self.ranks_on(order[(here + k) % len(order)])
            same = [r for r in there if self.local_ranks[r] == self.local_ranks[rank]]
            out.append(same[0] if same else there[self.local_ranks[rank] % len(there)])
        return out

    def node_holds(self, node: int, replicas: int) -> list[int]:
        """Ranks whose objects a committed copy on ``node`` holds: its own and those it hosts."""
        mine = set(self.ranks_on(node))
        held = set(mine)
        for r in range(self.world_size):
            if any(p in mine for p in self.partners(r, replicas)):
                held.add(r)
        return sorted(held)


# -- collectives that degrade to no-ops without a process group ------------------------------------------


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank(group: Any) -> int:
    d = _dist()
    return 0 if d is None else d.get_rank(group)


def _world(group: Any) -> int:
    d = _dist()
    return 1 if d is None else d.get_world_size(group)


def _global(group: Any, rank: int) -> int:
    d = _dist()
    return rank if d is None or group is None else d.get_global_rank(group, rank)


def _all_gather(obj: Any, group: Any) -> list[Any]:
    d = _dist()
    if d is None:
        return [obj]
    out: list[Any] = [None] * d.get_world_size(group)
    d.all_gather_object(out, obj, group=group)
    return out


def _broadcast(obj: Any, src: int, group: Any) -> Any:
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=_global(group, src), group=group)
    return box[0]


def _barrier(group: Any) -> None:
    d = _dist()
    if d is not None:
        d.barrier(group=group)


# -- files of the local tier ------------------------------------------------------------------------------


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read_capped(path: str, cap: int, what: str) -> bytes:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > cap:
            raise IntegrityError(f"{path} has {size} bytes, more than the {cap} a {what} may have; it is corrupt or "
                                 "not what its name says. Delete the step directory")
        return f.read(cap + 1)[:cap]


def read_marker(step_dir: str, step: int) -> dict[str, Any] | None:
    """The validated commit marker of a node's copy of ``step``, or None (uncommitted, damaged, foreign)."""
    path = os.path.join(step_dir, layout.NODE_COMMIT_NAME)
    try:
        doc = json.loads(_read_capped(path, MAX_MARKER_BYTES, "node commit marker"))
    except (OSError, ValueError, RecursionError, IntegrityError):
        return None
    ok = (isinstance(doc, dict) and doc.get("format") == MARKER_FORMAT and doc.get("step") == step
          and _uint(doc.get("world_size"), _MAX_WORLD) and doc["world_size"] >= 1
          and _uint(doc.get("metadata_crc32c"), _U32) and isinstance(doc.get("manifest"), str)
          and layout.is_manifest_name(doc["manifest"]) and _uint(doc.get("node"), 1 << 31)
          and isinstance(doc.get("ranks"), list)
          and all(_uint(r, _MAX_WORLD) and r < doc["world_size"] for r in doc["ranks"]))
    if not ok:
        log.warning("cloudckpt: ignoring the malformed node commit marker %s (the step counts as uncommitted there)",
                    path)
        return None
    return doc


def _uint(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def local_steps(local_dir: str) -> dict[int, str]:
    """Every canonically named step directory under ``local_dir``: step -> path."""
    try:
        names = os.listdir(local_dir)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        step = parse_step_name(name)
        path = os.path.join(local_dir, name)
        if step is not None and name == step_name(step) and os.path.isdir(path) and not os.path.islink(path):
            out[step] = path
    return dict(sorted(out.items()))


def _remove_step_dir(path: str) -> None:
    # The marker goes first: a removal that stops half-way leaves an uncommitted directory.
    try:
        os.unlink(os.path.join(path, layout.NODE_COMMIT_NAME))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def clean_local_dir(local_dir: str) -> list[int]:
    """Remove uncommitted step directories and temporary files; return the steps removed."""
    removed = []
    for step, path in local_steps(local_dir).items():
        if read_marker(path, step) is None:
            _remove_step_dir(path)
            removed.append(step)
            continue
        for name in os.listdir(path):
            if ".tmp-" in name:
                try:
                    os.unlink(os.path.join(path, name))
                except OSError:
                    pass
    if removed:
        log.info("cloudckpt: removed uncommitted local-tier steps %s under %s", removed, local_dir)
    return removed


def _objects_by_rank(manifest: Manifest, world_size: int, where: str) -> dict[int, list[str]]:
    """The manifest's data objects per saving rank (names validated: untrusted input)."""
    out: dict[int, list[str]] = {r: [] for r in range(world_size)}
    for name in manifest.objects:
        parsed = layout.parse_data_object_name(name)
        if parsed is None or name != os.path.basename(name) or parsed[0] >= world_size:
            raise IntegrityError(f"{where} lists the object {name[:200]!r}, which is not a data object of a rank "
                                 f"of a {world_size}-rank save; the manifest is corrupt or was tampered with")
        out[parsed[0]].append(name)
    for names in out.values():
        names.sort()
    return out


# -- moving objects between ranks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One object sent from rank ``src``'s node directory to rank ``dst``'s (group ranks)."""

    src: int
    dst: int
    name: str
    size: int
    crc32c: int


def _after_round(round_index: int) -> None:
    """Called on every rank after each send/recv round of :func:`exchange` (a seam for fault tests)."""


def _byte_view(t: torch.Tensor) -> memoryview:
    from cloudckpt.reader import writable_bytes

    return writable_bytes(t)


class _OutStream:
    """The objects one rank sends to one peer, read back to back in chunks."""

    def __init__(self, directory: str, items: list[Transfer]) -> None:
        self.directory = directory
        self.items = items
        self.left = sum(t.size for t in items)
        self._i = 0
        self._file: Any = None
        self._file_left = 0

    def fill(self, out: memoryview) -> int:
        n = 0
        while n < out.nbytes and self.left:
            if self._file_left == 0:
                self._open_next()
                continue
            k = self._file.readinto(out[n:n + min(out.nbytes - n, self._file_left)])
            if not k:
                raise ReplicationError(f"{self._file.name} is shorter than its manifest entry; the local copy is "
                                       "damaged")
            n += k
            self._file_left -= k
            self.left -= k
        return n

    def _open_next(self) -> None:
        self.close()
        item = self.items[self._i]
        self._i += 1
        self._file = open(os.path.join(self.directory, item.name), "rb", buffering=0)
        self._file_left = item.size

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _InStream:
    """The objects one rank receives from one peer: written to temp files, CRC-checked, renamed."""

    def __init__(self, directory: str, items: list[Transfer]) -> None:
        self.directory = directory
        self.items = items
        self.left = sum(t.size for t in items)
        self.errors: list[str] = []
        self._i = 0
        self._file: Any = None
        self._tmp = ""
        self._crc = 0
        self._file_left = 0
        self._advance()

    def _advance(self) -> None:
        # Open the next object; zero-length ones are published at once.
        while self._file is None and self._i < len(self.items):
            item = self.items[self._i]
            self._tmp = os.path.join(self.directory, f"{item.name}.tmp-{uuid.uuid4().hex}")
            self._file = open(self._tmp, "wb")
            self._crc = 0
            self._file_left = item.size
            if item.size == 0:
                self._finish()

    def _finish(self) -> None:
        item = self.items[self._i]
        self._file.close()
        self._file = None
        self._i += 1
        if self._crc != item.crc32c:
            os.unlink(self._tmp)
            self.errors.append(f"{item.name} from rank {item.src}: CRC32C {self._crc:08x}, manifest says "
                               f"{item.crc32c:08x}")
        else:
            os.replace(self._tmp, os.path.join(self.directory, item.name))

    def consume(self, data: memoryview) -> None:
        pos = 0
        while pos < data.nbytes:
            k = min(self._file_left, data.nbytes - pos)
            piece = data[pos:pos + k]
            self._file.write(piece)
            self._crc = crc.crc32c_extend(self._crc, piece)
            self._file_left -= k
            self.left -= k
            pos += k
            if self._file_left == 0:
                self._finish()
                self._advance()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            try:
                os.unlink(self._tmp)
            except OSError:
                pass


def exchange(transfers: Sequence[Transfer], rank: int, directory: str, group: Any, *,
             chunk_bytes: int = CHUNK_BYTES) -> None:
    """Run this rank's part of ``transfers`` (every rank passes the same list); collective.

    Per peer, the objects form one stream cut into ``chunk_bytes`` messages; in
    round ``k`` every rank posts chunk ``k`` of each of its streams (isend and
    irecv at once, so a pair exchanging both ways runs both directions
    together), then waits. Memory: one chunk buffer per peer. Received objects
    land in ``directory`` only once complete and matching the CRC32C of their
    transfer; any mismatch raises IntegrityError after the last round, so the
    peers' collectives stay aligned.
    """
    d = _dist()
    outs = {dst: _OutStream(directory, [t for t in transfers if t.src == rank and t.dst == dst])
            for dst in sorted({t.dst for t in transfers if t.src == rank and t.dst != rank})}
    ins = {src: _InStream(directory, [t for t in transfers if t.dst == rank and t.src == src])
           for src in sorted({t.src for t in transfers if t.dst == rank and t.src != rank})}
    if (outs or ins) and d is None:
        raise ReplicationError("replication needs an initialised process group")
    send_bufs = {p: torch.empty(min(chunk_bytes, max(s.left, 1)), dtype=torch.uint8) for p, s in outs.items()}
    recv_bufs = {p: torch.empty(min(chunk_bytes, max(s.left, 1)), dtype=torch.uint8) for p, s in ins.items()}
    round_index = 0
    try:
        while True:
            works, received = [], []
            for dst, out in outs.items():
                if out.left:
                    buf = send_bufs[dst]
                    n = out.fill(_byte_view(buf))
                    works.append(d.isend(buf[:n], _global(group, dst), group=group))
            for src, inc in ins.items():
                if inc.left:
                    n = min(recv_bufs[src].numel(), inc.left)
                    view = recv_bufs[src][:n]
                    works.append(d.irecv(view, _global(group, src), group=group))
                    received.append((inc, view))
            if not works:
                break
            for w in works:
                w.wait()
            for inc, view in received:
                inc.consume(_byte_view(view))
            _after_round(round_index)
            round_index += 1
    except BaseException:
        for inc in ins.values():
            inc.abort()
        raise
    finally:
        for out in outs.values():
            out.close()
    errors = [e for inc in ins.values() for e in inc.errors]
    if errors:
        raise IntegrityError(f"objects received into {directory} do not match their manifest checksums: "
                             f"{'; '.join(errors[:5])}; they were discarded")


# -- handles ------------------------------------------------------------------------------------------


def _async_checkpoint_cls() -> Any:
    from cloudckpt.manager import AsyncCheckpoint

    return AsyncCheckpoint


@dataclass
class TierTimes:
    """Seconds from the start of a save to each milestone (None until reached)."""

    blocked_s: float | None = None
    local_s: float | None = None
    replicated_s: float | None = None
    persisted_s: float | None = None


# -- the tiers --------------------------------------------------------------------------------------------


class TieredCheckpoints:
    """The local tier, its replicas and persistence, behind one :class:`~cloudckpt.manager.CheckpointManager`.

    Created by the manager when it is given ``local_dir``; every public method
    mirrors the manager's (and is collective where the manager's is).
    """

    def __init__(self, manager: Any, *, local_dir: str | os.PathLike[str], local_every: int,
                 persist_every: int | None, keep_local: int, replicas: int,
                 collective_timeout: float = 600.0) -> None:
        for name, value, low in (("local_every", local_every, 1), ("keep_local", keep_local, 1),
                                 ("replicas", replicas, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if persist_every is not None and (isinstance(persist_every, bool) or not isinstance(persist_every, int)
                                          or persist_every < 1 or persist_every % local_every):
            raise ValueError(f"persist_every must be None or a positive multiple of local_every={local_every}, "
                             f"got {persist_every!r}: a persisted step is copied from the local tier")
        self.mgr = manager
        self.local_dir = os.path.abspath(os.fspath(local_dir))
        self.local_every = local_every
        self.persist_every = persist_every
        self.keep_local = keep_local
        self.replicas = replicas
        self.collective_timeout = collective_timeout
        os.makedirs(self.local_dir, exist_ok=True)
        group = manager.process_group
        self.identity = NodeIdentity.from_env(_rank(group), _world(group))
        self._topology: Topology | None = None
        self._bg_group: Any = None
        self._persist_group: Any = None
        self._groups_ready = False
        self._lock = threading.Lock()
        self._local_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cloudckpt-tier")
        self._persist_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cloudckpt-persist")
        self._local_pending: list[Any] = []
        self._persisting: dict[int, concurrent.futures.Future] = {}
        #: Milestones of the latest save (see :class:`TierTimes`).
        self.last_times = TierTimes()
        self._closed = False
        if self.identity.local_rank == 0:
            clean_local_dir(self.local_dir)

    # -- set-up ---------------------------------------------------------------------------------------
    def step_dir(self, step: int) -> str:
        """This node's directory of local-tier step ``step``."""
        return os.path.join(self.local_dir, step_name(step))

    def topology(self, group: Any) -> Topology:
        """Every rank's node and local rank (one all-gather the first time; collective)."""
        if self._topology is None:
            pairs = _all_gather((self.identity.node, self.identity.local_rank), group)
            self._topology = Topology(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
        return self._topology

    def _setup(self) -> None:
        """Topology and the background groups, on the caller's thread (new_group order must match)."""
        group = self.mgr.process_group
        self.topology(group)
        d = _dist()
        if self._groups_ready or d is None:
            self._groups_ready = True
            return
        timeout = _dt.timedelta(seconds=self.collective_timeout)

        def new() -> Any:
            if group is None:
                return d.new_group(backend="gloo", timeout=timeout)
            return d.new_group(ranks=d.get_process_group_ranks(group), backend="gloo", timeout=timeout,
                               use_local_synchronization=True)
        self._bg_group = new()
        self._persist_group = new() if self.persist_every is not None else None
        self._groups_ready = True

    def _is_leader(self) -> bool:
        topo = self._topology
        return topo.is_leader(_rank(self.mgr.process_group)) if topo is not None else self.identity.local_rank == 0

    def due(self, step: int) -> bool:
        """True if ``step`` goes to the local tier (a multiple of ``local_every``)."""
        return step % self.local_every == 0

    def persist_due(self, step: int) -> bool:
        """True if ``step`` is also copied to the object store."""
        return self.persist_every is not None and step % self.persist_every == 0

    # -- saving ---------------------------------------------------------------------------------------
    def _prepare(self, step: int, group: Any) -> str:
        """Remove this node's copies of steps >= ``step`` (an abandoned timeline); collective."""
        if self._is_leader():
            with self._lock:
                busy = set(self._persisting)
            for s, path in local_steps(self.local_dir).items():
                if s >= step and s not in busy:
                    if read_marker(path, s) is not None:
                        log.warning("cloudckpt: replacing local-tier step %d under %s (saving step %d)",
                                    s, self.local_dir, step)
                    _remove_step_dir(path)
        _barrier(group)
        path = self.step_dir(step)
        os.makedirs(path, exist_ok=True)
        return path

    def _writer(self, step: int) -> Any:
        from cloudckpt.transfer import TransferOptions
        from cloudckpt.writer import LocalStorageWriter

        opts = TransferOptions(part_size=LOCAL_OBJECT_BYTES, target_object_size=LOCAL_OBJECT_BYTES)
        return LocalStorageWriter(self.step_dir(step), transfer_options=opts)

    def save(self, state_dict: dict[str, Any], step: int) -> Any:
        """Blocking save of ``step`` to the local tier (+ replicas); persistence is scheduled in the background.

        Returns the DCP Metadata, or None when ``step`` is not a multiple of ``local_every``.
        """
        from cloudckpt.api import save

        if self.mgr._preemption.stop_deadline() is not None:
            return self.emergency_save(state_dict, step)
        self.wait_local()
        if not self.due(step):
            log.debug("cloudckpt: step %d is not a multiple of local_every=%d: not saved", step, self.local_every)
            return None
        self._setup()
        group = self.mgr.process_group
        times = self.last_times = TierTimes()
        t0 = time.perf_counter()
        path = self._prepare(step, group)
        meta = save(state_dict, path, storage_writer=self._writer(step), process_group=group)
        times.local_s = time.perf_counter() - t0
        self._replicate(step, group)
        times.replicated_s = times.blocked_s = time.perf_counter() - t0
        if self.persist_due(step):
            self._schedule_persist(step, t0, times)
        return meta

    def async_save(self, state_dict: dict[str, Any], step: int) -> Any:
        """Stage ``state_dict``; write, replicate (and persist) ``step`` in the background.

        Returns an :class:`~cloudckpt.manager.AsyncCheckpoint` whose
        ``upload_completion`` resolves once every node committed its copy, with
        ``persist_completion`` (a Future, or None if the step is not persisted)
        and ``times`` (:class:`TierTimes`) added; None when ``step`` is not a
        multiple of ``local_every``. The DCP write runs on the manager's
        executor (thread or process); replication on a dedicated gloo group.
        """
        from cloudckpt.api import async_save
        from cloudckpt.manager import _typed

        t0 = time.perf_counter()
        self.wait_local()
        if not self.due(step):
            return None
        self._setup()
        group = self.mgr.process_group
        times = self.last_times = TierTimes()
        path = self._prepare(step, group)
        executor = self.mgr._executor()
        if self.mgr._stager is None:
            from cloudckpt.staging import Stager

            self.mgr._stager = Stager(shared_memory=getattr(executor, "needs_shared_memory", False))
        resp = async_save(state_dict, checkpoint_id=path, executor=executor, stager=self.mgr._stager,
                          storage_writer=self._writer(step), process_group=group)
        handle = _async_checkpoint_cls()(step=step, checkpoint_id=path, staging_completion=resp.staging_completion,
                                         upload_completion=concurrent.futures.Future())
        handle.persist_completion = concurrent.futures.Future() if self.persist_due(step) else None
        handle.times = times

        def job() -> Any:
            meta = resp.upload_completion.result()
            times.local_s = time.perf_counter() - t0
            self._replicate(step, self._bg_group)
            times.replicated_s = time.perf_counter() - t0
            if handle.persist_completion is not None:
                _chain(self._schedule_persist(step, t0, times), handle.persist_completion)
            return meta

        def done(fut: concurrent.futures.Future) -> None:
            exc = fut.exception()
            if exc is not None:
                if handle.persist_completion is not None and not handle.persist_completion.done():
                    handle.persist_completion.set_exception(_typed(exc))
                handle.upload_completion.set_exception(_typed(exc))
                return
            handle.upload_s = time.perf_counter() - t0 - handle.blocked_s
            handle.upload_completion.set_result(fut.result())

        self._local_pool.submit(job).add_done_callback(done)
        with self._lock:
            self._local_pending.append(handle)
        handle.blocked_s = times.blocked_s = time.perf_counter() - t0
        return handle

    def _read_commit_files(self, path: str) -> tuple[bytes, str, bytes]:
        """``.metadata``, the manifest's name and the manifest of the save in ``path`` (checked)."""
        from cloudckpt.safe_pickle import MAX_METADATA_BYTES, load_metadata

        meta_path = os.path.join(path, layout.METADATA_NAME)
        meta_blob = _read_capped(meta_path, MAX_METADATA_BYTES, ".metadata")
        save_id = getattr(getattr(load_metadata(meta_blob, meta_path), "storage_meta", None), "save_id", None)
        if not isinstance(save_id, str) or not layout.is_manifest_name(layout.manifest_name(save_id)):
            raise IntegrityError(f"{meta_path} records no usable save id; it was not written by cloudckpt's local tier")
        name = layout.manifest_name(save_id)
        blob = _read_capped(os.path.join(path, name), MAX_MANIFEST_BYTES, "manifest")
        check_metadata_bytes(meta_blob, open_manifest(blob, os.path.join(path, name)), meta_path)
        return meta_blob, name, blob

    def _share_commit_files(self, path: str, src: int, group: Any, *, write_here: bool,
                            want_crc: int | None = None) -> tuple[bytes, str, bytes, Manifest]:
        """Rank ``src`` reads .metadata + manifest from its node; every rank gets them; collective.

        Where ``write_here``, this node's leader stores them in ``path``.
        ``want_crc``: the CRC32C of ``.metadata`` the node commit markers recorded.
        """
        payload: Any = None
        if _rank(group) == src:
            try:
                payload = ("ok",) + self._read_commit_files(path)
            except (OSError, CloudCheckpointError) as exc:
                payload = ("error", f"{type(exc).__name__}: {exc}")
        payload = _broadcast(payload, src, group)
        if payload[0] != "ok":
            raise ReplicationError(f"rank {src} could not read the local-tier step it wrote: {payload[1]}")
        _, meta_blob, name, blob = payload
        if not layout.is_manifest_name(name) or name != os.path.basename(name):
            raise IntegrityError(f"rank {src} sent a manifest named {name[:200]!r}, which is not one")
        where = f"the manifest of {path} (from rank {src})"
        manifest = open_manifest(blob, where)
        check_metadata_bytes(meta_blob, manifest, f".metadata of {path} (from rank {src})")
        if want_crc is not None and crc.crc32c(meta_blob) != want_crc:
            raise IntegrityError(f".metadata of {path} on rank {src}'s node does not match the CRC32C its node commit "
                                 "marker recorded; the local copy is damaged")
        if write_here and self._is_leader():
            os.makedirs(path, exist_ok=True)
            _atomic_write(os.path.join(path, name), blob)
            _atomic_write(os.path.join(path, layout.METADATA_NAME), meta_blob)
        return meta_blob, name, blob, manifest

    def _replicate(self, step: int, group: Any) -> None:
        """Copy every rank's objects to its partners, then commit each node's copy; collective."""
        rank, topo, path = _rank(group), self.topology(group), self.step_dir(step)
        meta_blob, name, _, manifest = self._share_commit_files(
            path, 0, group, write_here=topo.nodes[rank] != topo.nodes[0])
        objects = _objects_by_rank(manifest, topo.world_size, f"the manifest of {path}")
        transfers = [Transfer(r, p, n, manifest.objects[n].size, manifest.objects[n].crc32c)
                     for r in range(topo.world_size) for p in topo.partners(r, self.replicas) for n in objects[r]]
        error = None
        try:
            exchange(transfers, rank, path, group)
        except (IntegrityError, ReplicationError, OSError) as exc:
            error = f"rank {rank}: {exc}"  # the rounds completed: the group is still usable
        for n in objects[rank]:
            p = os.path.join(path, n)
            if not os.path.isfile(p) or os.path.getsize(p) != manifest.objects[n].size:
                error = error or f"rank {rank}: its own object {p} is missing or has the wrong size"
        errors = [e for e in _all_gather(error, group) if e]
        if errors:
            raise ReplicationError(f"local-tier step {step} was not committed on any node: {'; '.join(errors[:4])}")
        if self._is_leader():
            node = topo.nodes[rank]
            _atomic_write(os.path.join(path, layout.NODE_COMMIT_NAME), json.dumps({
                "format": MARKER_FORMAT, "step": step, "node": node, "world_size": topo.world_size,
                "ranks": topo.node_holds(node, self.replicas), "metadata_crc32c": crc.crc32c(meta_blob),
                "manifest": name, "replicas": self.replicas,
                "committed": _dt.datetime.now(_dt.timezone.utc).isoformat()}).encode())
        # Retention only once every node committed: an older step stays until the new one is complete everywhere.
        _barrier(group)
        if self._is_leader():
            self._retain(step)

    def _retain(self, newest: int) -> list[int]:
        """Keep the ``keep_local`` newest committed steps here (and any being persisted)."""
        with self._lock:
            keep = set(self._persisting)
        steps = local_steps(self.local_dir)
        committed = [s for s, p in steps.items() if read_marker(p, s) is not None]
        keep.update(committed[-self.keep_local:])
        doomed = [s for s in steps if s not in keep and s <= newest]
        for s in doomed:
            _remove_step_dir(steps[s])
        if doomed:
            log.info("cloudckpt: local-tier retention removed steps %s under %s", doomed, self.local_dir)
        return doomed

    def wait_local(self) -> None:
        """Wait for in-flight local saves (and their replication); raise the first error."""
        from cloudckpt.manager import wait_all

        with self._lock:
            pending, self._local_pending = self._local_pending, []
        wait_all(pending)

    def wait(self) -> None:
        """Wait for local saves and persistence; raise the first error."""
        first: BaseException | None = None
        try:
            self.wait_local()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            first = exc
        with self._lock:
            persisting = list(self._persisting.values())
        for fut in persisting:
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                first = first or exc
        if first is not None:
            raise first

    # -- persistence ------------------------------------------------------------------------------------
    def _schedule_persist(self, step: int, t0: float, times: TierTimes) -> concurrent.futures.Future:
        def job() -> Any:
            result = self.persist(step, self._persist_group)
            times.persisted_s = time.perf_counter() - t0
            return result

        with self._lock:
            fut = self._persist_pool.submit(job)
            self._persisting[step] = fut

        def done(f: concurrent.futures.Future) -> None:
            with self._lock:
                if self._persisting.get(step) is f:
                    del self._persisting[step]
            if self._is_leader():
                self._retain(step)  # the step was protected while it was persisted
            if f.exception() is not None:
                log.warning("cloudckpt: persisting local-tier step %d to %s failed (the local copy is kept): %s",
                            step, self.mgr.checkpoint_uri(step), f.exception())
        fut.add_done_callback(done)
        return fut

    def persist(self, step: int, group: Any, deadline: float | None = None) -> str:
        """Copy local-tier ``step`` to ``{root}/step-N`` and commit it; collective over ``group``.

        Returns ``"committed"``, or ``"exists"`` if the object store already
        holds a committed checkpoint of ``step`` (nothing is uploaded then).
        ``deadline`` is a ``time.monotonic()`` instant the commit must happen by.
        """
        from cloudckpt.manager import _committed_uri, apply_retention, step_prefixes
        from cloudckpt.store import open_store
        from cloudckpt.transfer import TransferEngine
        from cloudckpt.uri import parse_uri
        from cloudckpt.writer import commit_metadata

        rank, world = _rank(group), _world(group)
        uri = parse_uri(self.mgr.checkpoint_uri(step))
        store = open_store(self.mgr.root, **self.mgr.store_options)
        exists: Any = None
        if rank == 0:
            try:
                exists = _committed_uri(store, step_prefixes(store, self.mgr.root).get(step, [])) is not None
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                exists = f"{type(exc).__name__}: {exc}"
        exists = _broadcast(exists, 0, group)
        if isinstance(exists, str):
            raise PersistError(f"could not check {uri} before persisting step {step}: {exists}")
        if exists:
            log.warning("cloudckpt: %s is already committed; local-tier step %d was not persisted again", uri, step)
            return "exists"
        path = self.step_dir(step)
        error, uploaded = None, []
        try:
            meta_blob, name, blob = self._read_commit_files(path)
            manifest = open_manifest(blob, os.path.join(path, name))
            mine = _objects_by_rank(manifest, world, f"the manifest of {path}")[rank] \
                if manifest.doc.get("world_size") == world else []
            uploaded = self._upload_objects(TransferEngine, store, uri, path, mine, manifest, world, deadline)
        except Exception as exc:  # noqa: BLE001 - shared with every rank below
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
        errors = [e for e in _all_gather(error, group) if e]
        outcome: Any = None
        if not errors and rank == 0:
            try:
                store.put(uri.key(name), [blob], crc32c=crc.crc32c(blob))
                commit_metadata(store, uri, meta_blob)
                outcome = "committed"
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                outcome = f"{type(exc).__name__}: {exc}"
        if not errors:
            outcome = _broadcast(outcome, 0, group)
            if outcome != "committed":
                errors = [f"rank 0 could not commit {uri}: {outcome}"]
        if errors:
            self._remove_uploads(store, uri, uploaded)
            raise PersistError(f"local-tier step {step} was not persisted to {uri}: {'; '.join(errors[:4])}. "
                               "Nothing was committed there; the local copy is kept")
        if rank == 0 and self.mgr.policy.active:
            try:
                apply_retention(store, self.mgr.root, self.mgr.policy, protect=(step,))
            except Exception as exc:  # noqa: BLE001 - the step is committed: cleanup must not fail it
                log.warning("cloudckpt: retention under %s failed after persisting step %d: %s",
                            self.mgr.root, step, exc)
        return "committed"

    def _upload_objects(self, engine_cls: Any, store: Any, uri: Any, path: str, names: list[str],
                        manifest: Manifest, world: int, deadline: float | None) -> list[str]:
        """Upload this rank's objects straight from memory-mapped local files; check their CRC32C."""
        from cloudckpt.transfer import ObjectUpload, TransferOptions

        opts = self.mgr.writer_options.get("transfer_options") or TransferOptions()
        overrides = {k: self.mgr.writer_options[k] for k in ("part_size", "max_concurrency", "target_object_size")
                     if self.mgr.writer_options.get(k) is not None}
        opts = dataclasses.replace(opts, **overrides)
        maps, uploads = [], []
        try:
            for n in names:
                facts = manifest.objects[n]
                with open(os.path.join(path, n), "rb") as f:
                    if os.fstat(f.fileno()).st_size != facts.size:
                        raise IntegrityError(f"{os.path.join(path, n)} has not the size its manifest records; the "
                                             "local copy is damaged")
                    body: Any = b"" if facts.size == 0 else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if facts.size:
                    maps.append(body)
                uploads.append(ObjectUpload(uri.key(n), [memoryview(body)], facts.size))
            engine = engine_cls(store, opts, world_size=world)
            done = engine.upload(uploads, deadline=deadline)
            for obj in done:
                want = manifest.objects[obj.key.rsplit("/", 1)[-1]].crc32c
                if obj.crc32c != want:
                    raise IntegrityError(f"the local copy of {obj.key} has CRC32C {obj.crc32c:08x}, its manifest "
                                         f"says {want:08x}: it was damaged on local disk; nothing was committed")
            return [u.key for u in uploads]
        finally:
            del uploads
            for m in maps:
                try:
                    m.close()
                except BufferError:
                    pass  # a view is still alive somewhere: the map closes when it is collected

    @staticmethod
    def _remove_uploads(store: Any, uri: Any, keys: list[str]) -> None:
        # Never under a committed checkpoint: a racing persist of the same step may have won.
        if not keys or store.head(uri.key(layout.METADATA_NAME)) is not None:
            return
        try:
            store.delete_many(keys)
        except Exception:  # noqa: BLE001 - best effort; `cloudckpt gc` removes uncommitted prefixes
            pass

    # -- preemption -------------------------------------------------------------------------------------
    def emergency_save(self, state_dict: dict[str, Any], step: int) -> Any:
        """The save after a preemption notice: local tier and replicas first, then the object store if time allows.

        Every branch is agreed across ranks (all-gathers on the trainer's group), because the
        persist that may follow is collective: a rank whose clock says "grace left" must never
        start it while another skips it.
        """
        from cloudckpt.api import save

        guard = self.mgr._preemption
        group = self.mgr.process_group
        # In-flight local saves are waited for in full, not for a share of the grace: they cannot be aborted
        # half-way through replication, and the emergency save must never write into a step directory a
        # background save is still writing or replicating. They are bounded by local disk and the network.
        with self._lock:
            pending, self._local_pending = self._local_pending, []
        done_same = None
        for h in pending:
            try:
                meta = h.upload_completion.result()
                if h.step == step:
                    done_same = meta
            except BaseException as exc:  # noqa: BLE001 - an earlier save's failure must not stop this one
                log.warning("cloudckpt: local-tier save of step %d failed before the emergency save: %s",
                            h.step, exc)
        self._setup()
        meta = done_same
        if not all(_all_gather(done_same is not None, group)):
            log.warning("cloudckpt: emergency checkpoint of step %d to the local tier %s and its replicas",
                        step, self.local_dir)
            path = self._prepare(step, group)
            meta = save(state_dict, path, storage_writer=self._writer(step), process_group=group)
            self._replicate(step, group)
        with self._lock:
            running = self._persisting.get(step)
        # One decision for every rank: wait for a background persist of this step wherever one runs,
        # else persist now only if every rank still has grace left.
        votes = _all_gather((guard.remaining() or 0.0, running is not None), group)
        left = min(v[0] for v in votes)
        try:
            if any(v[1] for v in votes):
                if running is not None:
                    running.result(timeout=max(left, 0.0))
            elif left > 0:
                self.persist(step, group, deadline=time.monotonic() + left)
            else:
                raise DeadlineExceededError(f"the preemption grace ran out before step {step} could be persisted")
        except (CloudCheckpointError, concurrent.futures.TimeoutError) as exc:
            log.warning("cloudckpt: emergency step %d is in the local tier and its replicas but not in %s: %s",
                        step, self.mgr.root, exc)
        return meta

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, state_dict: dict[str, Any], step: int | None = None) -> int | None:
        """Load the freshest step every rank can restore (local, then replicas, then the object store)."""
        self.wait_local()
        group = self.mgr.process_group
        inventory = {s: m for s, p in local_steps(self.local_dir).items()
                     if (step is None or s == step) and (m := read_marker(p, s)) is not None}
        # One all-gather for the inventory and (on a fresh manager) the topology: each costs a round trip.
        pairs = _all_gather(((self.identity.node, self.identity.local_rank), inventory), group)
        if self._topology is None:
            self._topology = Topology(tuple(p[0][0] for p in pairs), tuple(p[0][1] for p in pairs))
        topo = self._topology
        gathered = [p[1] for p in pairs]
        decision: Any = None
        if _rank(group) == 0:
            try:
                decision = self._choose(topo, gathered, step)
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                decision = ("error", f"{type(exc).__name__}: {exc}")
        decision = _broadcast(decision, 0, group)
        kind = decision[0]
        if kind == "error":
            raise CloudCheckpointError(f"rank 0 could not choose a checkpoint to restore: {decision[1]}")
        if kind == "none":
            self.mgr.last_load_tier = None
            return None
        if kind == "store":
            from cloudckpt.api import load

            load(state_dict, decision[2], process_group=group, **self.mgr.reader_options)
            self.mgr.last_load_tier = "object_store"
            return decision[1]
        _, chosen, holders, want_crc = decision
        self.mgr.last_load_tier = self._load_local(state_dict, chosen, holders, want_crc, topo, group)
        return chosen

    def _choose(self, topo: Topology, gathered: list[dict[int, dict]], step: int | None) -> tuple:
        """Rank 0: ("local", step, {node: ranks held}), ("store", step, uri) or ("none",)."""
        from cloudckpt.manager import _committed_uri, step_prefixes

        per_node: dict[int, dict[int, dict]] = {}
        for r, inv in enumerate(gathered):
            per_node.setdefault(topo.nodes[r], inv)
        best_local = None
        for s in sorted({s for inv in per_node.values() for s in inv}, reverse=True):
            markers = {n: inv[s] for n, inv in per_node.items() if s in inv}
            by_save: dict[tuple, dict[int, list[int]]] = {}
            for n, m in markers.items():
                by_save.setdefault((m["metadata_crc32c"], m["world_size"]), {})[n] = m["ranks"]
            for (meta_crc, world), holders in sorted(by_save.items(), key=lambda kv: -len(kv[1])):
                if set().union(*holders.values()) >= set(range(world)):
                    best_local = (s, holders, meta_crc)
                    break
            if best_local is not None:
                break
        store_step = store_uri = None
        try:
            store = self.mgr.store
            if step is None:
                # One listing, then a commit check only for steps newer than the local candidate, newest
                # first: an older committed step could never be chosen, so checking it is wasted time.
                dirs = step_prefixes(store, self.mgr.root)
                floor = -1 if best_local is None else best_local[0]
                for s in sorted((s for s in dirs if s > floor), reverse=True):
                    store_uri = _committed_uri(store, dirs[s])
                    if store_uri is not None:
                        store_step = s
                        break
            else:
                store_uri = _committed_uri(store, step_prefixes(store, self.mgr.root).get(step, []))
                store_step = step if store_uri is not None else None
        except CloudCheckpointError as exc:
            if best_local is None:
                raise
            log.warning("cloudckpt: could not list %s (%s); restoring from the local tier", self.mgr.root, exc)
        if best_local is not None and (store_step is None or best_local[0] >= store_step):
            return ("local",) + best_local
        if store_step is not None:
            return ("store", store_step, str(store_uri))
        if step is not None:
            from cloudckpt.errors import CheckpointNotFoundError

            raise CheckpointNotFoundError(f"step {step} is complete in no tier: not in the local tier of every "
                                          f"node and not committed under {self.mgr.root}")
        return ("none",)

    def _load_local(self, state_dict: dict[str, Any], step: int, holders: dict[int, list[int]], want_crc: int,
                    topo: Topology, group: Any) -> str:
        """Fetch what this node lacks from ranks on holding nodes, then dcp.load from this node's copy."""
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        from cloudckpt.api import _stateful_to_state_dict, load
        from cloudckpt.safe_pickle import load_metadata

        rank, path = _rank(group), self.step_dir(step)
        src = min(r for r in range(topo.world_size) if topo.nodes[r] in holders)
        holder_here = topo.nodes[rank] in holders
        if not holder_here and self._is_leader():
            _remove_step_dir(path)  # leftovers of another save must not be mistaken for this one's objects
            os.makedirs(path)
        meta_blob, _, _, manifest = self._share_commit_files(path, src, group, write_here=not holder_here,
                                                             want_crc=want_crc)
        saved_world = manifest.doc.get("world_size")
        if not isinstance(saved_world, int) or not _uint(saved_world, _MAX_WORLD) or saved_world < 1:
            raise IntegrityError(f"the manifest of {path} records no valid world size")
        objects = _objects_by_rank(manifest, saved_world, f"the manifest of {path}")
        owner = {n: r for r, names in objects.items() for n in names}
        metadata = load_metadata(meta_blob, os.path.join(path, layout.METADATA_NAME))
        planner = DefaultLoadPlanner()
        planner.set_up_planner(_stateful_to_state_dict(state_dict), metadata, rank == 0)
        needed = set()
        for item in planner.create_local_plan().items:
            info = metadata.storage_data.get(item.storage_index)
            rel = getattr(info, "relative_path", None)
            if rel not in owner:
                raise IntegrityError(f"the metadata of {path} points at {str(rel)[:200]!r}, which its manifest does "
                                     "not list; the checkpoint is corrupt or was tampered with")
            needed.add(rel)
        missing = sorted(n for n in needed if not os.path.isfile(os.path.join(path, n))
                         or os.path.getsize(os.path.join(path, n)) != manifest.objects[n].size)
        wants = _all_gather(missing, group)
        transfers, claimed = [], set()
        for dst, names in enumerate(wants):
            for i, n in enumerate(names):
                if (topo.nodes[dst], n) in claimed:
                    continue  # another rank of that node fetches it
                claimed.add((topo.nodes[dst], n))
                sources = [r for r in range(topo.world_size) if owner[n] in holders.get(topo.nodes[r], ())]
                if not sources:
                    raise ReplicationError(f"no node holds {n} of local-tier step {step}")
                transfers.append(Transfer(sources[(dst + i) % len(sources)], dst, n, manifest.objects[n].size,
                                          manifest.objects[n].crc32c))
        exchange(transfers, rank, path, group)
        reader_keys = ("verify", "max_concurrency", "read_gap_threshold", "transfer_options")
        load(state_dict, path, process_group=group,
             **{k: v for k, v in self.mgr.reader_options.items() if k in reader_keys})
        return "replica" if transfers else "local"

    # -- lifecycle --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for in-flight work (raising its error), then stop the workers and groups."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._local_pool.shutdown(wait=True)
            self._persist_pool.shutdown(wait=True)
            d = _dist()
            for g in (self._bg_group, self._persist_group):
                if g is not None and d is not None:
                    try:
                        d.destroy_process_group(g)
                    except Exception:  # noqa: BLE001 - the world may already be gone
                        pass


def _chain(src: concurrent.futures.Future, dst: concurrent.futures.Future) -> None:
    def copy(f: concurrent.futures.Future) -> None:
        exc = f.exception()
        if exc is not None:
            dst.set_exception(exc)
        else:
            dst.set_result(f.result())
    src.add_done_callback(copy)
