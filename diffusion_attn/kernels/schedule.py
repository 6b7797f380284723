"""Tile schedules: the kernels' plan of which query tiles gather which keys, for box and block patterns.

A :class:`Schedule` partitions a grid pattern's queries into buckets of equally shaped query tiles
(:class:`Bucket`), each with the key indices it gathers and, where a tile is not fully dense, a per-tile
mask built lazily per chunk -- the fast path never builds an N x N tensor. :func:`box_schedule` tiles a
:class:`~diffusion_attn.patterns.BoxPattern` from per-axis tiles (:func:`axis_tiles`, :class:`AxisTiles`,
:data:`RUNS`); :func:`block_schedule` tiles a :class:`~diffusion_attn.patterns.BlockPattern` by block
rows. The pattern only says who sees whom; choosing the tile sizes is :mod:`.tiling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..patterns.base import AxisWindows, BlockPattern, BoxPattern

__all__ = [
    "AxisTiles",
    "Bucket",
    "PairCounts",
    "RUNS",
    "Schedule",
    "axis_tiles",
    "block_schedule",
    "box_schedule",
    "combined_mask_fn",
    "mask_fn_on",
    "refined_mask_fn",
    "outer_combine",
]


@dataclass
class Bucket:
    """``G`` query tiles of ``tq`` queries, each gathering the same number ``tk`` of keys.

    ``qidx`` (G, tq) and ``kidx`` (G, tk) index the flattened grid; ``mask(g0, g1)`` returns the
    (g1 - g0, tq, tk) boolean mask of tiles ``g0:g1``, or ``None`` when every tile is fully dense.
    """

    qidx: torch.Tensor
    kidx: torch.Tensor
    mask_fn: Callable[[int, int], torch.Tensor] | None = None

    @property
    def num_tiles(self) -> int:
        return self.qidx.shape[0]

    def mask(self, g0: int, g1: int) -> torch.Tensor | None:
        return None if self.mask_fn is None else self.mask_fn(g0, g1)


class PairCounts:
    """Densities of a tiling with ``num_queries``, ``allowed_pairs`` and ``visited_pairs`` (over the grid)."""

    num_queries: int
    allowed_pairs: int
    visited_pairs: int

    @property
    def density(self) -> float:
        return self.allowed_pairs / float(self.num_queries) ** 2

    @property
    def visited_density(self) -> float:
        return self.visited_pairs / float(self.num_queries) ** 2

    def predicted_speedup(self, text_len: int = 0) -> float:
        """Tile-level upper bound on the speedup over dense attention: S^2 over the pairs computed (grid pairs
        of the plan; text queries see every key and grid queries every text key)."""
        n, t = self.num_queries, text_len
        return (n + t) ** 2 / float(self.visited_pairs + n * t + t * (n + t))


def mask_fn_on(fn, device):
    """A tile-mask function ``fn(i0, i1)`` whose masks land on ``device`` (None stays None)."""
    return None if fn is None else (lambda i0, i1: fn(i0, i1).to(device))


@dataclass
class Schedule(PairCounts):
    """A partition of the grid queries into tiles; every query is in exactly one tile."""

    buckets: list[Bucket]
    num_queries: int
    allowed_pairs: int  # exact number of (query, key) pairs the pattern allows
    visited_pairs: int = field(default=0)  # (query, key) pairs the tiles compute, masked ones included

    def __post_init__(self):
        self.visited_pairs = sum(b.qidx.numel() * b.kidx.shape[1] for b in self.buckets)

    def to(self, device) -> "Schedule":
        moved = [Bucket(b.qidx.to(device), b.kidx.to(device), mask_fn_on(b.mask_fn, device)) for b in self.buckets]
        return Schedule(moved, self.num_queries, self.allowed_pairs)


#: Per-axis tiling that follows the pattern: one tile per run of queries sharing a window (exact tiles).
RUNS = "runs"


@dataclass(frozen=True)
class AxisTiles:
    """``n`` query tiles of ``t`` positions on one axis, each gathering ``box`` consecutive permuted key
    positions from ``kstart``. ``qpos`` (n, t) and ``kstart`` (n,) are permuted positions; ``mask``
    (n, t, box) is None when every tile is dense."""

    perm: torch.Tensor
    qpos: torch.Tensor
    kstart: torch.Tensor
    box: int
    mask: torch.Tensor | None

    @property
    def queries(self) -> torch.Tensor:
        """(n, t) original coordinates of each tile's queries."""
        return self.perm[self.qpos]

    @property
    def keys(self) -> torch.Tensor:
        """(n, box) original coordinates of each tile's keys."""
        return self.perm[self.kstart[:, None] + torch.arange(self.box)[None, :]]


def axis_tiles(axis: AxisWindows, tile: "int | str") -> list[AxisTiles]:
    """Split ``axis`` into query tiles, grouped by shape (one :class:`AxisTiles` per shape).

    ``tile`` an int: tiles of ``tile`` consecutive permuted positions (the last may be shorter); all
    tiles of a group gather the same number of keys: a box of consecutive permuted positions, clamped
    inside the axis, that holds the union of its queries' windows (masked where a query's window is
    smaller). ``tile == "runs"``: one tile per maximal run of queries with identical windows, so every
    tile is exact (no mask); runs are grouped by (length, window size).
    """
    L = axis.length
    if tile == RUNS:
        starts = axis.run_starts().tolist() + [L]
        spans = [(s, e, int(axis.lo[s]), int(axis.hi[s] - axis.lo[s])) for s, e in zip(starts[:-1], starts[1:])]
    else:
        tile = max(1, min(int(tile), L))
        spans = []
        for s in range(0, L, tile):
            e = min(s + tile, L)
            spans.append((s, e, int(axis.lo[s:e].min()), int(axis.hi[s:e].max()) - int(axis.lo[s:e].min())))
        box = max(sp[3] for sp in spans)
        spans = [(s, e, min(lo, L - box), box) for s, e, lo, _ in spans]
    shapes: dict[tuple[int, int], list] = {}
    for s, e, kstart, box in spans:
        shapes.setdefault((e - s, box), []).append((s, kstart))
    pos = torch.arange(L)
    groups = []
    for (t, box), members in shapes.items():
        qpos = torch.stack([pos[s : s + t] for s, _ in members])  # (n, t) permuted
        kstart = torch.tensor([k for _, k in members])
        kpos = kstart[:, None] + torch.arange(box)[None, :]
        mask = (kpos[:, None, :] >= axis.lo[qpos][:, :, None]) & (kpos[:, None, :] < axis.hi[qpos][:, :, None])
        groups.append(AxisTiles(axis.perm, qpos, kstart, box, None if bool(mask.all()) else mask))
    return groups


def box_schedule(pattern: BoxPattern, tile: tuple) -> Schedule:
    """Tile ``pattern``'s grid with per-axis tiles ``tile``: per axis a size in permuted positions or
    :data:`RUNS` (see :func:`axis_tiles`)."""
    strides = [math.prod(pattern.grid[i + 1 :]) for i in range(len(pattern.grid))]
    per_axis = [axis_tiles(a, t) for a, t in zip(pattern.axes, tile)]
    refine = pattern.refine_fn()
    buckets = []
    for combo in _product(per_axis):
        bucket = _box_bucket(combo, strides)
        if refine is not None:
            bucket.mask_fn = refined_mask_fn(bucket.mask_fn, refine, bucket.qidx, bucket.kidx)
        buckets.append(bucket)
    return Schedule(buckets, pattern.num_tokens, pattern.allowed_pairs())


def refined_mask_fn(mask_fn, refine, qidx: torch.Tensor, kidx: torch.Tensor):
    """A refined box's tile masks: ``refine(q, k)`` (elementwise over flattened grid indices) ANDed with
    the box's own tile masks ``mask_fn(i0, i1)`` (None: dense), for tiles whose queries are ``qidx[i0:i1]``
    (n, tq) and keys ``kidx[i0:i1]`` (n, tk). Built per chunk (n, tq, tk), never stored."""

    def fn(i0: int, i1: int) -> torch.Tensor:
        m = refine(qidx[i0:i1, :, None], kidx[i0:i1, None, :])
        return m if mask_fn is None else m & mask_fn(i0, i1)

    return fn


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for rest in _product(lists[1:]):
            yield (head,) + rest


def outer_combine(tensors, strides, op):
    """Combine per-axis (n_a, x_a) tensors into (prod n_a, prod x_a) by row-major broadcasting."""
    n = len(tensors)
    out = None
    for i, (t, s) in enumerate(zip(tensors, strides)):
        shape = [1] * (2 * n)
        shape[i], shape[n + i] = t.shape
        term = t.view(shape) if op == "and" else t.view(shape) * s
        out = term if out is None else (out & term if op == "and" else out + term)
    g = math.prod(t.shape[0] for t in tensors)
    return out.expand(*[t.shape[0] for t in tensors], *[t.shape[1] for t in tensors]).reshape(g, -1)


def _box_bucket(combo, strides) -> Bucket:
    qidx = outer_combine([c.queries for c in combo], strides, "sum")
    kidx = outer_combine([c.keys for c in combo], strides, "sum")
    mask_fn = combined_mask_fn(combo)
    return Bucket(qidx, kidx, mask_fn)


def combined_mask_fn(combo):
    """For a combination of per-axis tile groups (:class:`AxisTiles`): ``fn(g0, g1)`` -> the
    (g1 - g0, tq, tk) token masks of tiles ``g0:g1`` (row-major over the axes' tile counts), or None
    when every axis is dense."""
    if all(c.mask is None for c in combo):
        return None
    counts = [c.qpos.shape[0] for c in combo]
    # per-axis masks (n_a, t_a, K_a), all-True where the axis is dense
    masks = [
        c.mask if c.mask is not None else torch.ones(c.qpos.shape[0], c.qpos.shape[1], c.box, dtype=torch.bool)
        for c in combo
    ]

    def mask_fn(g0: int, g1: int) -> torch.Tensor:
        # tile g -> per-axis tile indices (row-major over the axes' tile counts)
        g = torch.arange(g0, g1)
        idx = []
        for n in reversed(counts):
            idx.append(g % n)
            g = g // n
        idx.reverse()
        d = len(masks)
        out = None
        for i, (m, ii) in enumerate(zip(masks, idx)):
            sel = m[ii]  # (G, t_i, K_i)
            shape = [g1 - g0] + [1] * (2 * d)
            shape[1 + i], shape[1 + d + i] = sel.shape[1], sel.shape[2]
            term = sel.view(shape)
            out = term if out is None else out & term
        tq = math.prod(m.shape[1] for m in masks)
        return out.expand(g1 - g0, *[m.shape[1] for m in masks], *[m.shape[2] for m in masks]).reshape(g1 - g0, tq, -1)

    return mask_fn


def block_schedule(pattern: BlockPattern, rows_per_tile: int = 1) -> Schedule:
    """Tiles of ``rows_per_tile`` consecutive query block rows of ``pattern``, each gathering the union of
    its rows' key blocks (with a block-level mask where the rows differ). Bigger tiles run SDPA more
    efficiently on CPU at the price of some masked work. Tiles are bucketed by (queries, keys).

    Token-level tile masks are never stored: a bucket keeps its tiles' block-level masks
    (G, rows, key blocks) and broadcasts them to tokens per chunk (:func:`_block_mask_fn`).
    """
    bs, n = pattern.block_size, pattern.num_tokens
    nb = pattern.block_mask.shape[0]
    short = bs * nb - n  # tokens missing from the partial last block
    empty = torch.nonzero(~pattern.block_mask.any(1)).flatten()
    if empty.numel():
        raise ValueError(f"block row {int(empty[0])} attends to no key block; every query needs at least one")
    within = torch.arange(bs)
    groups: dict[tuple[int, int], list] = {}
    for r0 in range(0, nb, rows_per_tile):
        rows = pattern.block_mask[r0 : r0 + rows_per_tile]
        cols = torch.nonzero(rows.any(0)).flatten()
        keys = (cols[:, None] * bs + within).flatten()
        if int(cols[-1]) == nb - 1 and short:
            keys = keys[: keys.numel() - short]  # the last block is the highest column and is partial
        q = torch.arange(r0 * bs, min((r0 + rows_per_tile) * bs, n))
        groups.setdefault((q.numel(), keys.numel()), []).append((q, keys, rows[:, cols]))
    buckets = []
    for (tq, tk), tiles in groups.items():
        blocks = torch.stack([t[2] for t in tiles])  # (G, rows, key blocks)
        fn = None if bool(blocks.all()) else _block_mask_fn(blocks, bs, tq, tk)
        buckets.append(Bucket(torch.stack([t[0] for t in tiles]), torch.stack([t[1] for t in tiles]), fn))
    return Schedule(buckets, n, pattern.allowed_pairs())


def _block_mask_fn(blocks: torch.Tensor, block_size: int, tq: int, tk: int):
    """Token-level masks of tiles ``g0:g1`` from their block masks, by broadcasting (no copies kept)."""
    G, r, c = blocks.shape

    def mask_fn(g0: int, g1: int) -> torch.Tensor:
        sub = blocks[g0:g1, :, None, :, None].expand(g1 - g0, r, block_size, c, block_size)
        return sub.reshape(g1 - g0, r * block_size, c * block_size)[:, :tq, :tk]

    return mask_fn
