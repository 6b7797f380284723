"""The two pattern shapes every method in the pack reduces to, and their tile schedules.

A *pattern* says which grid token may attend to which (text tokens are handled by the kernel: always
dense). Two shapes cover the efficiency methods:

* :class:`BoxPattern` -- separable per-axis windows: on each axis ``a`` a query at position ``p`` sees the
  key positions ``[lo[p], hi[p])``, after relabelling the axis by a permutation (dilation groups, cyclic
  shifts). The allowed set of a query is the product of its per-axis intervals. Neighborhood attention
  (GNA: sliding / strided / blocked, with dilation) and (shifted) window attention are box patterns.
* :class:`BlockPattern` -- a boolean block mask over the flattened sequence (radial attention).

Both yield the dense boolean reference mask (the oracle; only for small sizes) and a :class:`Schedule`:
buckets of equally shaped query tiles, each with the key indices it gathers and, for box patterns, a
per-tile mask built lazily per chunk -- the fast path never builds an N x N tensor.

Both are *grid patterns* of the sequence pattern protocol (:mod:`diffusion_attn.patterns.mask_mod`):
``capabilities`` says ``"box"`` (+ ``"partition"`` when the windows partition the grid) or ``"block"``,
``grid_pattern`` is the pattern itself, and ``mask_mod(b, h, q_idx, kv_idx)`` is the predicate over
*grid* indices; :func:`~diffusion_attn.patterns.text_dense` places it in a call's whole sequence.

(Tile schedules -- :class:`Schedule`, :class:`Bucket` -- are kernel planning and belong in ``kernels/``;
they stay here until the kernels registry lands, to keep that branch and this one apart.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["AxisTiles", "AxisWindows", "RUNS", "PairCounts", "BoxPattern", "BlockPattern", "Bucket", "Schedule"]


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


@dataclass(frozen=True)
class AxisWindows:
    """One axis of a box pattern.

    The axis (length ``L``) is relabelled by ``perm``: permuted position ``p`` holds original coordinate
    ``perm[p]``. The query at permuted position ``p`` sees the keys at permuted positions
    ``[lo[p], hi[p])``. All three are int64 tensors of shape ``(L,)``.
    """

    perm: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def length(self) -> int:
        return self.perm.numel()

    def dense(self) -> torch.Tensor:
        """(L, L) boolean mask in original coordinates: ``[query, key]``."""
        L = self.length
        pos = torch.arange(L)
        allowed_perm = (pos[None, :] >= self.lo[:, None]) & (pos[None, :] < self.hi[:, None])
        out = torch.zeros(L, L, dtype=torch.bool)
        out[self.perm[:, None], self.perm[None, :]] = allowed_perm
        return out

    def run_starts(self) -> torch.Tensor:
        """Permuted positions where a run of queries with identical windows begins (the first is 0)."""
        change = torch.ones(self.length, dtype=torch.bool)
        change[1:] = (self.lo[1:] != self.lo[:-1]) | (self.hi[1:] != self.hi[:-1])
        return torch.nonzero(change).flatten()

    def tiles(self, tile: "int | str") -> list["AxisTiles"]:
        """Split the axis into query tiles, grouped by shape (one :class:`AxisTiles` per shape).

        ``tile`` an int: tiles of ``tile`` consecutive permuted positions (the last may be shorter); all
        tiles of a group gather the same number of keys: a box of consecutive permuted positions, clamped
        inside the axis, that holds the union of its queries' windows (masked where a query's window is
        smaller). ``tile == "runs"``: one tile per maximal run of queries with identical windows, so every
        tile is exact (no mask); runs are grouped by (length, window size).
        """
        L = self.length
        if tile == RUNS:
            starts = self.run_starts().tolist() + [L]
            spans = [(s, e, int(self.lo[s]), int(self.hi[s] - self.lo[s])) for s, e in zip(starts[:-1], starts[1:])]
        else:
            tile = max(1, min(int(tile), L))
            spans = []
            for s in range(0, L, tile):
                e = min(s + tile, L)
                spans.append((s, e, int(self.lo[s:e].min()), int(self.hi[s:e].max()) - int(self.lo[s:e].min())))
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
            mask = (kpos[:, None, :] >= self.lo[qpos][:, :, None]) & (kpos[:, None, :] < self.hi[qpos][:, :, None])
            groups.append(AxisTiles(self.perm, qpos, kstart, box, None if bool(mask.all()) else mask))
        return groups


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


class BoxPattern:
    """Separable per-axis windows over a grid (see module docstring)."""

    def __init__(self, grid: tuple[int, ...], axes: list[AxisWindows]):
        if len(grid) != len(axes) or any(a.length != g for a, g in zip(axes, grid)):
            raise ValueError(f"axes do not match the grid {grid}")
        self.grid = tuple(grid)
        self.axes = axes

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def allowed_pairs(self) -> int:
        return math.prod(int((a.hi - a.lo).sum()) for a in self.axes)

    @property
    def density(self) -> float:
        return self.allowed_pairs() / float(self.num_tokens) ** 2

    def is_full(self) -> bool:
        return all(bool((a.lo == 0).all() and (a.hi == a.length).all()) for a in self.axes)

    @property
    def capabilities(self) -> frozenset:
        """``{"box"}``, plus ``"partition"`` when the windows partition the grid (computed once)."""
        if getattr(self, "_capabilities", None) is None:
            from ..kernels.windows import window_partition  # kernels import patterns: import late

            part = window_partition(self) is not None
            self._capabilities = frozenset({"box", "partition"} if part else {"box"})
        return self._capabilities

    @property
    def grid_pattern(self) -> "BoxPattern":
        return self

    def mask_mod(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        """FlexAttention-style predicate over flattened *grid* indices (``b`` and ``h`` are ignored)."""
        return self.allowed(q_idx, kv_idx)

    def allowed(self, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """Elementwise: may flattened grid query ``qi`` see key ``ki``? (broadcasting int tensors)"""
        return self.allowed_fn(qi.device)(qi, ki)

    def allowed_fn(self, device=None):
        """:meth:`allowed` with its lookup tables prepared on ``device``: pure indexing and comparisons,
        so it can serve as (part of) a FlexAttention ``mask_mod``."""
        tables = []
        stride = self.num_tokens
        for axis, L in zip(self.axes, self.grid):
            stride //= L
            inv = torch.empty_like(axis.perm)
            inv[axis.perm] = torch.arange(L)
            tables.append((stride, L, inv.to(device), axis.lo.to(device), axis.hi.to(device)))

        def fn(qi, ki):
            ok = None
            for stride, L, inv, lo, hi in tables:
                qp = inv[(qi // stride) % L]
                kp = inv[(ki // stride) % L]
                term = (lo[qp] <= kp) & (kp < hi[qp])
                ok = term if ok is None else ok & term
            return ok

        return fn

    def dense_mask(self) -> torch.Tensor:
        """(N, N) boolean mask over the row-major flattened grid."""
        masks = [a.dense() for a in self.axes]
        n = len(masks)
        out = torch.ones((1,) * (2 * n), dtype=torch.bool)
        for i, m in enumerate(masks):
            shape = [1] * (2 * n)
            shape[i], shape[n + i] = m.shape
            out = out & m.view(shape)
        return out.reshape(self.num_tokens, self.num_tokens)

    def schedule(self, tile: tuple) -> Schedule:
        """Tile the grid with per-axis tiles ``tile``: per axis a size in permuted positions or
        :data:`RUNS` (see :meth:`AxisWindows.tiles`)."""
        strides = [math.prod(self.grid[i + 1 :]) for i in range(len(self.grid))]
        per_axis = [a.tiles(t) for a, t in zip(self.axes, tile)]
        buckets = []
        for combo in _product(per_axis):
            buckets.append(_box_bucket(combo, strides))
        return Schedule(buckets, self.num_tokens, self.allowed_pairs())


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


class BlockPattern:
    """A block mask over the flattened grid: block ``(i, j)`` kept means all of query block ``i``
    attends to all of key block ``j``. The last block may be partial (``num_tokens % block_size``)."""

    def __init__(self, grid: tuple[int, ...], block_mask: torch.Tensor, block_size: int):
        self.grid = tuple(grid)
        self.block_size = int(block_size)
        nb = -(-self.num_tokens // self.block_size)
        if tuple(block_mask.shape) != (nb, nb):
            raise ValueError(f"block mask must be {(nb, nb)} for {self.num_tokens} tokens, got {tuple(block_mask.shape)}")
        self.block_mask = block_mask.bool().cpu()

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def _block_sizes(self) -> torch.Tensor:
        nb = self.block_mask.shape[0]
        sizes = torch.full((nb,), self.block_size, dtype=torch.long)
        sizes[-1] = self.num_tokens - self.block_size * (nb - 1)
        return sizes

    def allowed_pairs(self) -> int:
        s = self._block_sizes().double()
        return int((s[:, None] * s[None, :] * self.block_mask).sum())

    @property
    def density(self) -> float:
        return self.allowed_pairs() / float(self.num_tokens) ** 2

    def is_full(self) -> bool:
        return bool(self.block_mask.all())

    #: the block occupancy is the pattern itself
    capabilities = frozenset({"block"})

    @property
    def grid_pattern(self) -> "BlockPattern":
        return self

    def mask_mod(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        """FlexAttention-style predicate over flattened *grid* indices (``b`` and ``h`` are ignored)."""
        return self.allowed(q_idx, kv_idx)

    def allowed(self, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """Elementwise: may flattened grid query ``qi`` see key ``ki``? (see :meth:`BoxPattern.allowed`)"""
        return self.allowed_fn(qi.device)(qi, ki)

    def allowed_fn(self, device=None):
        """:meth:`allowed` with the block mask on ``device`` (see :meth:`BoxPattern.allowed_fn`)."""
        blocks, bs = self.block_mask.to(device), self.block_size
        return lambda qi, ki: blocks[qi // bs, ki // bs]

    def dense_mask(self) -> torch.Tensor:
        sizes = self._block_sizes()
        return self.block_mask.repeat_interleave(sizes, 0).repeat_interleave(sizes, 1)

    def schedule(self, rows_per_tile: int = 1) -> Schedule:
        """Tiles of ``rows_per_tile`` consecutive query block rows, each gathering the union of its rows'
        key blocks (with a block-level mask where the rows differ). Bigger tiles run SDPA more
        efficiently on CPU at the price of some masked work. Tiles are bucketed by (queries, keys).

        Token-level tile masks are never stored: a bucket keeps its tiles' block-level masks
        (G, rows, key blocks) and broadcasts them to tokens per chunk (:func:`_block_mask_fn`).
        """
        bs, n = self.block_size, self.num_tokens
        nb = self.block_mask.shape[0]
        short = bs * nb - n  # tokens missing from the partial last block
        empty = torch.nonzero(~self.block_mask.any(1)).flatten()
        if empty.numel():
            raise ValueError(f"block row {int(empty[0])} attends to no key block; every query needs at least one")
        within = torch.arange(bs)
        groups: dict[tuple[int, int], list] = {}
        for r0 in range(0, nb, rows_per_tile):
            rows = self.block_mask[r0 : r0 + rows_per_tile]
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
        return Schedule(buckets, n, self.allowed_pairs())


def _block_mask_fn(blocks: torch.Tensor, block_size: int, tq: int, tk: int):
    """Token-level masks of tiles ``g0:g1`` from their block masks, by broadcasting (no copies kept)."""
    G, r, c = blocks.shape

    def mask_fn(g0: int, g1: int) -> torch.Tensor:
        sub = blocks[g0:g1, :, None, :, None].expand(g1 - g0, r, block_size, c, block_size)
        return sub.reshape(g1 - g0, r * block_size, c * block_size)[:, :tq, :tk]

    return mask_fn
