"""Choosing query tiles for box and block patterns (the schedules themselves: :mod:`.schedule`).

The cost model is deliberately simple: a tile of ``tq`` queries that gathers ``tk`` keys costs
``tq * tk`` score pairs plus a gather overhead of about ``GATHER_COST`` pairs per key and query row, so
``cost = visited_pairs * (1 + GATHER_COST / tq)``. Masked tiles pay the same as dense ones.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..patterns.base import AxisWindows, BlockPattern, BoxPattern
from .schedule import RUNS, Schedule, block_schedule, box_schedule

__all__ = ["axis_box_size", "axis_options", "choose_tiles", "build_schedule", "MAX_TILE_QUERIES"]

GATHER_COST = 16.0
MAX_TILE_QUERIES = 2048
MAX_AXIS_TILE = 64


def tile_efficiency(tq: int) -> float:
    """Relative SDPA throughput by query-tile length on CPU (measured with torch 2.13's flash kernel,
    whose query split is 256 from 768 queries up, 64 from 192, else 32)."""
    if tq >= 768:
        return 1.0
    if tq >= 192:
        return 0.8
    return 0.4 if tq >= 64 else 0.2


def axis_box_size(axis: AxisWindows, tile: int) -> int:
    """Keys per tile on this axis: the widest union of the windows of ``tile`` consecutive queries."""
    L = axis.length
    pad = (-L) % tile
    lo = torch.cat([axis.lo, axis.lo[-1:].expand(pad)]).view(-1, tile).amin(1)
    hi = torch.cat([axis.hi, axis.hi[-1:].expand(pad)]).view(-1, tile).amax(1)
    return int((hi - lo).max())


def axis_options(axis: AxisWindows, limit: int = 6) -> list[tuple]:
    """Candidate tilings of one axis as ``(tile, groups)``, ``groups`` a list of ``(n tiles, tile
    length, keys per tile, masked)`` (``masked``: some tile of the group needs a mask).

    ``tile`` is a size (``L // t`` tiles of ``t`` positions and a shorter last one, all gathering the
    same ``k`` keys) or :data:`RUNS` (exact tiles, one per run of queries sharing a window). The best
    ``limit`` sizes by visited pairs and the ``limit`` largest are kept, plus runs.
    """
    L = axis.length
    opts = []
    for t in range(1, min(L, MAX_AXIS_TILE) + 1):
        k = axis_box_size(axis, t)
        pad = (-L) % t
        lo = torch.cat([axis.lo, axis.lo[-1:].expand(pad)]).view(-1, t)
        hi = torch.cat([axis.hi, axis.hi[-1:].expand(pad)]).view(-1, t)
        exact = (lo.amin(1) == lo.amax(1)) & (hi.amin(1) == hi.amax(1)) & (hi[:, 0] - lo[:, 0] == k)
        groups = [(L // t, t, k, not bool(exact[: L // t].all()))]
        if L % t:
            groups.append((1, L % t, k, not bool(exact[-1])))
        opts.append((t, groups))
    pairs = lambda o: sum(n * t * k for n, t, k, _ in o[1])  # noqa: E731
    keep = sorted(opts, key=lambda o: (pairs(o), -o[0]))[:limit] + sorted(opts, key=lambda o: -o[0])[:limit]
    starts = axis.run_starts()
    lengths = torch.diff(starts, append=torch.tensor([L]))
    sizes = (axis.hi - axis.lo)[starts]
    runs: dict[tuple[int, int], int] = {}
    for t, k in zip(lengths.tolist(), sizes.tolist()):
        runs[(t, k)] = runs.get((t, k), 0) + 1
    unique = {o[0]: o for o in keep}
    return [unique[t] for t in sorted(unique)] + [(RUNS, [(n, t, k, False) for (t, k), n in runs.items()])]


def choose_tiles(pattern: BoxPattern) -> tuple[int, ...]:
    """Per-axis query tile sizes minimising the cost model.

    Per axis, tile sizes are ranked twice: by keys visited per query on that axis
    (``ceil(L / t) * t * k / L`` for a tile of ``t`` positions gathering ``k`` keys) and by the tile size
    itself; the best few of each ranking are combined. Combinations over MAX_TILE_QUERIES queries are
    only taken when no combination fits.
    """
    candidates = []
    for axis in pattern.axes:
        L = axis.length
        opts = []
        for t in range(1, min(L, MAX_AXIS_TILE) + 1):
            k = axis_box_size(axis, t)
            opts.append((math.ceil(L / t) * t * k / L, t, k))
        by_keys = sorted(opts)[:6]
        by_size = sorted(opts, key=lambda o: -o[1])[:6]
        candidates.append(sorted({(t, k) for _, t, k in by_keys + by_size}))
    best = None
    for combo in itertools.product(*candidates):
        tq = math.prod(t for t, _ in combo)
        tiles = math.prod(math.ceil(a.length / t) for a, (t, _) in zip(pattern.axes, combo))
        visited = tiles * tq * math.prod(k for _, k in combo)
        cost = visited * (1.0 + GATHER_COST / tq) / tile_efficiency(tq)
        key = (tq > MAX_TILE_QUERIES, cost)
        if best is None or key < best[0]:
            best = (key, tuple(t for t, _ in combo))
    return best[1]


def build_schedule(pattern, tile: tuple[int, ...] | None = None) -> Schedule:
    if isinstance(pattern, BlockPattern):
        return _best(block_schedule(pattern, r) for r in (1, 2, 4, 8))
    if isinstance(pattern, BoxPattern):
        return box_schedule(pattern, tile or choose_tiles(pattern))
    raise TypeError(f"no schedule for pattern type {type(pattern).__name__}")


def _best(schedules):
    """The schedule with the lowest modelled cost."""
    def cost(s: Schedule) -> float:
        return sum(
            b.qidx.numel() * b.kidx.shape[1] * (1.0 + GATHER_COST / b.qidx.shape[1]) / tile_efficiency(b.qidx.shape[1])
            for b in s.buckets
        )
    return min(schedules, key=cost)
