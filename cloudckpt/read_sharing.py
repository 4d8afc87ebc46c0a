"""Plan a load's byte ranges so that each is fetched from the store once per job.

DCP calls ``read_data`` on every rank with that rank's own plan, so a fully
replicated state (DDP) makes every rank fetch every byte: N ranks, N times the
egress. The coordinator sees all plans in ``prepare_global_plan``; there
:func:`plan_sharing` cuts the union of every rank's byte ranges into pieces at
every range boundary, gives each piece to exactly one of the ranks that need it
(the least loaded), and orders the pieces into rounds of bounded size. In
``read_data`` each rank fetches the pieces it owns and then sends them to the
other ranks that need them (point-to-point on the load's process group), one
round after another, so a byte range is read from the store once per load and
no rank holds more than about one round of buffers.

The same plan with one rank is the plain single-rank load: pieces are that
rank's coalesced ranges, rounds bound its buffers.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

__all__ = ["Piece", "SharePlan", "merge_ranges", "plan_sharing", "find_span"]

#: Pieces needed by several ranks are not cut smaller than this (each piece is one GET).
MIN_SHARED_PIECE = 4 * 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of object ``rel``: fetched by ``owner``, sent to the other ``needers``."""

    tag: int  # index within its round: the point-to-point message tag
    rel: str
    start: int
    end: int
    owner: int
    needers: tuple[int, ...]

    @property
    def size(self) -> int:
        """Bytes in the piece."""
        return self.end - self.start


@dataclass
class SharePlan:
    """One rank's part of a job-wide read plan (carried in ``LoadPlan.storage_data``).

    ``needs`` are the rank's buffers (coalesced byte ranges, sorted, disjoint);
    ``rounds`` has one entry per global round (the same count on every rank, as
    every rank takes part in every round's collectives) holding the pieces this
    rank fetches or receives in that round.
    """

    rank: int
    world: int
    needs: list[tuple[str, int, int]] = field(default_factory=list)
    rounds: list[list[Piece]] = field(default_factory=list)

    @property
    def shared(self) -> bool:
        """Whether the plan exchanges bytes between ranks (a world of more than one rank)."""
        return self.world > 1


def merge_ranges(ranges: list[tuple[int, int]], gap: int, max_size: int) -> list[tuple[int, int]]:
    """Disjoint sorted ranges covering ``ranges``: overlaps always merge, gaps <= ``gap`` within ``max_size``."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out:
            cs, ce = out[-1]
            if s < ce or (s - ce <= gap and max(e, ce) - cs <= max_size):
                out[-1] = (cs, max(ce, e))
                continue
        out.append((s, e))
    return out


def find_span(sorted_starts: list[int], spans: list[tuple[int, int]], start: int, end: int) -> int | None:
    """Index of the span in ``spans`` (sorted, disjoint) that contains ``[start, end)``, else None."""
    i = bisect.bisect_right(sorted_starts, start) - 1
    if i >= 0 and spans[i][0] <= start and end <= spans[i][1]:
        return i
    return None


def _elementary(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, tuple[int, ...]]]:
    """Cut ``(start, end, rank)`` spans at every boundary: ``(start, end, ranks needing it)``."""
    starts: dict[int, list[int]] = defaultdict(list)
    ends: dict[int, list[int]] = defaultdict(list)
    for s, e, r in spans:
        if e > s:
            starts[s].append(r)
            ends[e].append(r)
    bounds = sorted(set(starts) | set(ends))
    active: Counter[int] = Counter()
    out: list[tuple[int, int, tuple[int, ...]]] = []
    for a, b in zip(bounds, bounds[1:] + [None], strict=True):
        for r in ends.get(a, ()):
            active[r] -= 1
            if not active[r]:
                del active[r]
        for r in starts.get(a, ()):
            active[r] += 1
        if b is not None and active:
            out.append((a, b, tuple(sorted(active))))
    return out


def plan_sharing(needs_by_rank: list[list[tuple[str, int, int]]], *, round_bytes: int, max_piece: int,
                 min_piece: int = MIN_SHARED_PIECE) -> list[SharePlan]:
    """Assign every needed byte to exactly one reading rank; one :class:`SharePlan` per rank.

    ``needs_by_rank[r]`` holds rank ``r``'s buffers ``(object, start, end)``
    (disjoint per rank, as :func:`merge_ranges` makes them). Pieces needed by
    several ranks are split about evenly between them (at least ``min_piece``,
    at most ``max_piece`` bytes each) and owned by the least loaded of their
    needers; a round closes once it holds ``round_bytes``.
    """
    world = len(needs_by_rank)
    by_rel: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for r, needs in enumerate(needs_by_rank):
        for rel, s, e in needs:
            by_rel[rel].append((s, e, r))
    load = [0] * world
    rounds: list[list[Piece]] = [[]]
    in_round = 0
    for rel in sorted(by_rel):
        for a, b, needers in _elementary(by_rel[rel]):
            n = b - a
            step = n if len(needers) == 1 else min(max_piece, max(min_piece, math.ceil(n / len(needers))))
            for s in range(a, b, max(step, 1)):
                e = min(b, s + step)
                owner = min(needers, key=lambda r: (load[r], r))
                load[owner] += e - s
                if in_round >= round_bytes:
                    rounds.append([])
                    in_round = 0
                rounds[-1].append(Piece(len(rounds[-1]), rel, s, e, owner, needers))
                in_round += e - s
    if rounds == [[]]:
        rounds = []
    return [SharePlan(r, world, sorted(needs_by_rank[r]),
                      [[p for p in rnd if r in p.needers] for rnd in rounds]) for r in range(world)]
