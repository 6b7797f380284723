"""Sliding-window kernel for box patterns on CPU: exact key-side splits along one axis, merged by
log-sum-exp, in big batched SDPA calls (issue 11, "Sliding windows on CPU").

Why. With a sliding window (GNA stride 1) every query has its own window, so a query tile big enough for
an efficient SDPA call (ATen's CPU flash kernel: 0.55 of its dense throughput per pair at 32 queries,
0.75 at 128, 0.85 from 192) gathers the union of its queries' windows and computes many masked pairs: on
each axis a tile of ``t`` queries with window ``w`` visits ``w + t - 1`` keys per query. Over three axes
the product kept the ``strips`` kernel at 0.29-0.41 of the ideal ``1 / density`` on Wan 480p's sliding
windows.

How. As in :mod:`.strips`, one axis is the *slide axis*; every other axis is tiled into query tiles and a
*column* is one tile of those other axes taken over the whole slide axis. A column's keys and values are
gathered once, slide-major (one copy per column, into buffers reused across calls, see
:class:`Workspace`), and so are its queries, so any contiguous range of slide positions is a strided view
of both: no copy per tile. Along the slide axis the band of allowed (query, key) positions is covered by
*pieces* (query range x key range), of one of three kinds:

* ``runs``: one piece per run of queries sharing a window (exact; what ``strips`` does);
* ``query`` tiles of ``t`` positions gathering the union of their windows (masked), runs of at least
  ``t`` positions kept whole (exact);
* ``key`` chunks of ``b`` key positions with *every query that sees any of them*: a query's window is
  split over several pieces, so many queries share each SDPA call (FreeSwim: all frames of a spatial
  tile), at a waste of only the ``b - 1`` corner positions per side. The partial results are merged
  exactly by their log-sum-exp (one softmax over the union), in place in per-column fp32 accumulators
  (rows a piece reaches first are written, not merged).

The other axes use ``runs`` or ``query`` tiles (the border runs of NATTEN's inward clamp stay exact
tiles). Columns whose tile masks coincide (all interior tiles of a sliding axis have the same relative
window) form one group with one mask, so each SDPA call takes one ``(tq, tk)`` additive mask broadcast
over a batch of columns. The plan (slide axis, piece kind and size, the other axes' tiles) minimises a
cost model measured on CPU (:func:`sdpa_efficiency`, :data:`MASK_COST`, :data:`MERGE_COST`,
:data:`KEY_COPY_COST`; within 0.01-0.03 of the measured efficiency on the Wan layouts);
:attr:`SlidingPlan.visited_pairs` is its tile-level bound (:meth:`SlidingPlan.predicted_speedup`).

A refined box (``BoxPattern.refine``, CLEAR's circle inside its bounding square) gets its predicate
evaluated per piece and chunk of columns on the piece's (query, key) indices and added to the shared
mask; a translation-invariant one (``refine.translation_invariant``, the circle) once per piece and column
group, the groups being split so that their columns are translates of each other. A key chunk may then
hold none of a query's keys (a corner of its square): such rows get weight 0 in the merge (the CPU flash
kernel returns lse 0, not -inf, for a row with no key).

Semantics are NATTEN's (any :class:`~diffusion_attn.patterns.BoxPattern`: GNA with any stride, dilation,
even windows; shifted windows), text keys merged by log-sum-exp as in :mod:`.strips` (NATTEN's
``additional_keys``). There is no official kernel to follow: NATTEN's fused kernels visit tiles of the
union of windows (the ``simulate`` bound); splitting windows across pieces is this pack's own scheme.
The fast path never builds an S x S tensor: the largest temporaries are one chunk's gathered columns
(``max_chunk_bytes``) and one piece's ``(tq, tk)`` mask. No backward (the merges are in place): ``auto``
goes on to ``strips`` when autograd records. ``auto`` takes it on CPU for box patterns with a sliding
axis (:func:`sliding_axes`).
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..patterns.base import AxisWindows, BoxPattern
from .backend import Backend
from .capabilities import grid_pattern_of
from .gather import grid_backend_run
from .reference import SMALL_SEQUENCE
from .schedule import PairCounts, outer_combine
from .strips import attention_lse, merge_extra_keys

__all__ = ["BACKEND", "Piece", "SlidingPlan", "axis_pieces", "modelled_efficiency", "sdpa_efficiency",
           "sliding_attention", "sliding_plan"]

#: piece kinds along an axis (``runs`` and ``query`` may tile any axis, ``key`` only the slide axis)
KINDS = ("runs", "query", "key")
#: candidate sizes of ``query`` tiles and ``key`` chunks searched by :func:`choose_plan`
SIZES = (2, 3, 4, 5, 6, 8, 10, 12, 16)
#: Cost of a masked SDPA call relative to an unmasked one, per pair, with one mask broadcast over the batch
#: (measured with torch 2.13 on CPU, fp32, head size 128: 1.02-1.15, plus building it).
MASK_COST = 1.12
#: Cost of one log-sum-exp merge of a query's partial result, in (query, key) pairs (two fp32 passes
#: over the output row plus the LSE update).
MERGE_COST = 14.0
#: Cost of gathering one key row (keys and values) into a column, in (query, key) pairs.
KEY_COPY_COST = 16.0


_EFFICIENCY = ((16, 0.40), (32, 0.55), (64, 0.65), (128, 0.75), (192, 0.85), (512, 0.90), (1024, 0.95))


def sdpa_efficiency(tq, tk):
    """Relative CPU SDPA throughput per (query, key) pair of a batch of calls with ``tq`` queries and
    ``tk`` keys each, against one dense call (measured with torch 2.13's CPU flash kernel, fp32, head size
    128, one thread: 0.40 at 16 queries, 0.55 at 32, 0.65 at 64, 0.75 at 128, 0.85 at 192, 0.90 at 512,
    0.95 from 1,024, where ATen's query block grows; about 10 % less at 256 keys). Numbers or float
    tensors (elementwise)."""
    scalar = not isinstance(tq, torch.Tensor)
    tq = torch.as_tensor(tq, dtype=torch.float64)
    tk = torch.as_tensor(tk, dtype=torch.float64)
    xs = torch.tensor([math.log2(a) for a, _ in _EFFICIENCY], dtype=torch.float64)
    ys = torch.tensor([e for _, e in _EFFICIENCY], dtype=torch.float64)
    x = torch.log2(tq.clamp(min=1)).clamp(max=float(xs[-1]))
    i = torch.searchsorted(xs, x).clamp(1, len(xs) - 1)
    e = ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    e = torch.where(tq <= 16, 0.40 * tq.clamp(min=1) / 16, e)
    e = e * (0.8 + 0.2 * tk / 512).clamp(max=1.0)
    return float(e) if scalar else e


@dataclass(frozen=True)
class Piece:
    """Queries ``[qa, qb)`` with keys ``[ka, kb)`` on one axis (permuted positions); ``mask``
    (qb - qa, kb - ka) bool, or None when every query sees every key of the piece."""

    qa: int
    qb: int
    ka: int
    kb: int
    mask: torch.Tensor | None = field(default=None, compare=False)

    @property
    def tq(self) -> int:
        return self.qb - self.qa

    @property
    def tk(self) -> int:
        return self.kb - self.ka


def _piece(axis: AxisWindows, qa: int, qb: int, ka: int, kb: int) -> Piece:
    kpos = torch.arange(ka, kb)
    mask = (kpos[None, :] >= axis.lo[qa:qb, None]) & (kpos[None, :] < axis.hi[qa:qb, None])
    return Piece(qa, qb, ka, kb, None if bool(mask.all()) else mask)


def axis_pieces(axis: AxisWindows, kind: str, size: int = 1) -> list[Piece]:
    """Cover the band of allowed (query, key) positions of one axis by pieces (see the module docstring).

    ``runs``: one exact piece per run of queries sharing a window. ``query``: tiles of ``size`` queries
    with the union of their windows; a run of at least ``size`` queries stays one exact piece and tiles
    stop before it. ``key``: chunks of ``size`` keys, each with the (contiguous) range of queries that see
    any of them; ValueError if those queries are not contiguous. Every query is in exactly one ``runs`` /
    ``query`` piece; in ``key`` pieces every allowed (query, key) pair is in exactly one piece."""
    L = axis.length
    lo, hi = axis.lo.tolist(), axis.hi.tolist()
    starts = axis.run_starts().tolist() + [L]
    runs = list(zip(starts[:-1], starts[1:]))
    if kind == "runs" or (kind == "query" and size <= 1):
        return [Piece(s, e, lo[s], hi[s]) for s, e in runs]
    if kind == "query":
        pieces, pending = [], []

        def flush():
            for i in range(0, len(pending), size):
                qa, qb = pending[i], pending[min(i + size, len(pending)) - 1] + 1
                pieces.append(_piece(axis, qa, qb, min(lo[qa:qb]), max(hi[qa:qb])))
            pending.clear()

        for s, e in runs:
            if e - s >= size:
                flush()
                pieces.append(Piece(s, e, lo[s], hi[s]))
            else:
                pending.extend(range(s, e))
        flush()
        return pieces
    if kind == "key":
        pieces = []
        for ka in range(0, L, size):
            kb = min(ka + size, L)
            sees = (axis.lo < kb) & (axis.hi > ka)
            idx = torch.nonzero(sees).flatten()
            if idx.numel() == 0:
                continue
            qa, qb = int(idx[0]), int(idx[-1]) + 1
            if qb - qa != idx.numel():
                raise ValueError("key pieces need the queries that see a key range to be contiguous")
            pieces.append(_piece(axis, qa, qb, ka, kb))
        return pieces
    raise ValueError(f"unknown piece kind {kind!r}; accepted: {', '.join(KINDS)}")


@dataclass
class ColumnGroup:
    """``C`` columns with one tile shape and one mask on the other axes: ``qcols`` (C, tq) and ``kcols``
    (C, K) flattened-grid offsets without the slide axis; ``mask`` (tq, K) bool or None."""

    qcols: torch.Tensor
    kcols: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class SlidingPlan(PairCounts):
    """Everything :func:`sliding_attention` needs for one pattern, built once per layout."""

    axis: int  # the slide axis
    kinds: tuple  # per axis (kind, size); the slide axis' entry may be ("key", b)
    slide_offsets: torch.Tensor  # (L,) flattened-grid offset of each permuted slide position
    pieces: list[Piece]
    columns: list[ColumnGroup]
    overlap: bool  # some query is in more than one slide piece (its results are merged)
    num_queries: int
    allowed_pairs: int
    visited_pairs: int
    refine: object = None  # a refined box's predicate fn(qi, ki) over flattened grid indices, ANDed per piece
    refine_shared: bool = False  # the refinement is translation-invariant: one mask per piece and column group

    def to(self, device) -> "SlidingPlan":
        cols = [ColumnGroup(c.qcols.to(device), c.kcols.to(device), None if c.mask is None else c.mask.to(device))
                for c in self.columns]
        pieces = [Piece(p.qa, p.qb, p.ka, p.kb, None if p.mask is None else p.mask.to(device)) for p in self.pieces]
        return SlidingPlan(self.axis, self.kinds, self.slide_offsets.to(device), pieces, cols, self.overlap,
                           self.num_queries, self.allowed_pairs, self.visited_pairs, self.refine, self.refine_shared)


def _mask_key(m):
    return None if m is None else (tuple(m.shape), m.numpy().tobytes())


def _axis_groups(axis: AxisWindows, pieces: list[Piece]):
    """Pieces of a non-slide axis grouped by shape: ``[(queries (n, t), keys (n, k), mask ids (n,),
    masks by id)]`` in original coordinates."""
    shapes: dict[tuple[int, int], list[Piece]] = {}
    for p in pieces:
        shapes.setdefault((p.tq, p.tk), []).append(p)
    groups = []
    for members in shapes.values():
        ids, masks = [], {}
        for p in members:
            key = _mask_key(p.mask)
            if key not in masks:
                masks[key] = (len(masks), p.mask)
            ids.append(masks[key][0])
        queries = torch.stack([axis.perm[p.qa : p.qb] for p in members])
        keys = torch.stack([axis.perm[p.ka : p.kb] for p in members])
        groups.append((queries, keys, torch.tensor(ids), [m for _, m in sorted(masks.values(), key=lambda x: x[0])]))
    return groups


def _outer_mask(masks, shapes):
    """AND of per-axis (t_a, k_a) masks (None: all True) as one (prod t_a, prod k_a) mask, or None."""
    if all(m is None for m in masks):
        return None
    d = len(masks)
    out = None
    for i, (m, (t, k)) in enumerate(zip(masks, shapes)):
        if m is None:
            continue
        shape = [1] * (2 * d)
        shape[i], shape[d + i] = t, k
        out = m.view(shape) if out is None else out & m.view(shape)
    full = [t for t, _ in shapes] + [k for _, k in shapes]
    return out.expand(full).reshape(math.prod(t for t, _ in shapes), -1)


def _split_by_offsets(columns: list[ColumnGroup]) -> list[ColumnGroup]:
    """Column groups split so that within a group every column has the same query and key offsets
    relative to its first query: a translation-invariant refinement then has one mask per piece and
    group (the columns of a group are translates of each other)."""
    out = []
    for g in columns:
        base = g.qcols[:, :1]
        sig = torch.cat([g.qcols - base, g.kcols - base], 1)
        uniq, inverse = torch.unique(sig, dim=0, return_inverse=True)
        for u in range(uniq.shape[0]):
            sel = torch.nonzero(inverse == u).flatten()
            out.append(ColumnGroup(g.qcols[sel], g.kcols[sel], g.mask))
    return out


def _column_groups(pattern: BoxPattern, axis: int, kinds) -> list[ColumnGroup]:
    others = [i for i in range(len(pattern.grid)) if i != axis]
    if not others:  # a 1-D grid: one column, the slide axis itself
        zero = torch.zeros(1, 1, dtype=torch.long)
        return [ColumnGroup(zero, zero, None)]
    strides = [math.prod(pattern.grid[i + 1 :]) for i in range(len(pattern.grid))]
    per_axis = [_axis_groups(pattern.axes[i], axis_pieces(pattern.axes[i], *kinds[i])) for i in others]
    ostrides = [strides[i] for i in others]
    columns = []
    for combo in itertools.product(*per_axis):
        qcols = outer_combine([g[0] for g in combo], ostrides, "sum")
        kcols = outer_combine([g[1] for g in combo], ostrides, "sum")
        ids = torch.stack(torch.meshgrid(*[g[2] for g in combo], indexing="ij"), -1).reshape(qcols.shape[0], -1)
        uniq, inverse = torch.unique(ids, dim=0, return_inverse=True)
        shapes = [(g[0].shape[1], g[1].shape[1]) for g in combo]
        for u in range(uniq.shape[0]):
            sel = torch.nonzero(inverse == u).flatten()
            mask = _outer_mask([g[3][int(j)] for g, j in zip(combo, uniq[u])], shapes)
            columns.append(ColumnGroup(qcols[sel], kcols[sel], mask))
    return columns


def _summary(pieces: list[Piece]):
    """Per piece (tq, tk, masked) as float tensors."""
    return (torch.tensor([float(p.tq) for p in pieces]), torch.tensor([float(p.tk) for p in pieces]),
            torch.tensor([p.mask is not None for p in pieces]))


def _column_summary(groups_per_axis):
    """Products of per-axis piece summaries: (n columns, tq, K, masked) per combination of pieces."""
    n, tq, tk, masked = torch.ones(1), torch.ones(1), torch.ones(1), torch.zeros(1, dtype=torch.bool)
    for t, k, m in groups_per_axis:
        n = n[:, None].expand(-1, t.numel()).reshape(-1)
        tq = (tq[:, None] * t[None]).reshape(-1)
        tk = (tk[:, None] * k[None]).reshape(-1)
        masked = (masked[:, None] | m[None]).reshape(-1)
    return n, tq, tk, masked


def _costs(pattern: BoxPattern, axis: int, slides: list[list[Piece]], other) -> torch.Tensor:
    """Modelled cost (in dense SDPA pairs) of sliding along ``axis`` with each of ``slides`` (the slide
    axis' pieces of several options) and the other axes' pieces summarised by ``other`` (per axis
    :func:`_summary`): SDPA pairs by efficiency and mask, LSE merges of split queries, column gathers."""
    _, cq, ck, cm = _column_summary(other)
    option = torch.cat([torch.full((len(s),), i) for i, s in enumerate(slides)])
    sq, sk, sm = _summary([p for s in slides for p in s])
    tq = cq[:, None] * sq[None]
    tk = ck[:, None] * sk[None]
    work = tq * tk / sdpa_efficiency(tq, tk) * torch.where(cm[:, None] | sm[None], MASK_COST, 1.0)
    cost = torch.zeros(len(slides), dtype=torch.float64).index_add_(0, option, work.sum(0).double())
    N, L = pattern.num_tokens, pattern.grid[axis]
    per_query = torch.zeros(len(slides), dtype=torch.float64).index_add_(0, option, sq.double()) / L
    return cost + MERGE_COST * N * (per_query - 1.0) + KEY_COPY_COST * L * float(ck.sum())


def _options(axis: AxisWindows, slide: bool) -> list[tuple[str, int]]:
    L = axis.length
    opts = [("runs", 1)] + [("query", t) for t in SIZES if t < L]
    if slide:
        opts += [("key", b) for b in SIZES if b < L]
    return opts


def choose_plan(pattern: BoxPattern) -> tuple[int, tuple]:
    """The slide axis and per-axis piece kinds with the lowest modelled cost: ``(axis, kinds)``."""
    d = len(pattern.grid)
    pieces: dict = {}
    for i, a in enumerate(pattern.axes):
        for opt in _options(a, True):
            try:
                pieces[(i, opt)] = axis_pieces(a, *opt)
            except ValueError:  # key pieces on an axis whose windows are not monotone
                pass
    summaries = {key: _summary(p) for key, p in pieces.items()}
    best = None
    for axis in range(d):
        others = [i for i in range(d) if i != axis]
        sopts = [o for o in _options(pattern.axes[axis], True) if (axis, o) in pieces]
        slides = [pieces[(axis, o)] for o in sopts]
        for combo in itertools.product(*[_options(pattern.axes[i], False) for i in others]):
            costs = _costs(pattern, axis, slides, [summaries[(i, o)] for i, o in zip(others, combo)])
            j = int(costs.argmin())
            if best is None or float(costs[j]) < best[0]:
                kinds = [None] * d
                kinds[axis] = sopts[j]
                for i, o in zip(others, combo):
                    kinds[i] = o
                best = (float(costs[j]), axis, tuple(kinds))
    return best[1], best[2]


def modelled_efficiency(pattern: BoxPattern, plan: SlidingPlan) -> float:
    """What the cost model predicts for ``plan``: its speedup over dense SDPA divided by ``1 / density``
    (grid only, text excluded)."""
    others = [i for i in range(len(pattern.grid)) if i != plan.axis]
    summ = [_summary(axis_pieces(pattern.axes[i], *plan.kinds[i])) for i in others]
    return pattern.allowed_pairs() / float(_costs(pattern, plan.axis, [plan.pieces], summ)[0])


_PLAN_CHOICES: dict = {}


def sliding_plan(pattern: BoxPattern, axis: int | None = None, kinds: tuple | None = None) -> SlidingPlan:
    """Plan ``pattern`` for :func:`sliding_attention`. ``axis`` (the slide axis) and ``kinds`` (per axis
    ``(kind, size)``, :data:`KINDS`; only the slide axis may be ``("key", b)``) override the modelled
    choice."""
    if not isinstance(pattern, BoxPattern):
        raise TypeError(f"the sliding kernel runs box patterns (GNA, shifted windows), got {type(pattern).__name__}")
    d = len(pattern.grid)
    if axis is None or kinds is None:
        key = (pattern.grid,
               tuple((tuple(a.perm.tolist()), tuple(a.lo.tolist()), tuple(a.hi.tolist())) for a in pattern.axes))
        if key not in _PLAN_CHOICES:
            _PLAN_CHOICES[key] = choose_plan(pattern)
        chosen_axis, chosen_kinds = _PLAN_CHOICES[key]
        axis = chosen_axis if axis is None else axis
        kinds = chosen_kinds if kinds is None else kinds
    if not 0 <= axis < d:
        raise ValueError(f"slide axis must be in [0, {d}), got {axis}")
    kinds = tuple(tuple(k) for k in kinds)
    if len(kinds) != d:
        raise ValueError(f"kinds needs one (kind, size) per axis ({d}), got {kinds!r}")
    for i, (kind, size) in enumerate(kinds):
        if kind not in KINDS or (kind == "key" and i != axis) or int(size) < 1:
            raise ValueError(f"axis {i}: kind must be runs / query (any axis) or key (slide axis only) with size >= 1, "
                             f"got {(kind, size)!r}")
    pieces = axis_pieces(pattern.axes[axis], *kinds[axis])
    columns = _column_groups(pattern, axis, kinds)
    shared = pattern.refine is not None and bool(getattr(pattern.refine, "translation_invariant", False))
    if shared:
        columns = _split_by_offsets(columns)
    strides = [math.prod(pattern.grid[i + 1 :]) for i in range(d)]
    L = pattern.grid[axis]
    visited = sum(p.tq * p.tk * c.qcols.numel() * c.kcols.shape[1] for p in pieces for c in columns)
    overlap = sum(p.tq for p in pieces) != L
    return SlidingPlan(axis, kinds, pattern.axes[axis].perm * strides[axis], pieces, columns, overlap,
                       pattern.num_tokens, pattern.allowed_pairs(), visited, pattern.refine_fn(), shared)


def _additive(mask, dtype):
    """A bool mask as an additive float mask (0 / -inf), or None."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _float_mask(slide, col, tq_s, tk_s, tq_o, K):
    """The additive (1, 1, tq_s * tq_o, tk_s * K) mask of one piece on one column group from their additive
    factors (``slide`` (tq_s, tk_s), ``col`` (tq_o, K), None = no mask): one broadcast add, or None."""
    if slide is None and col is None:
        return None
    shape = (tq_s, tq_o, tk_s, K)
    if col is None:
        m = slide[:, None, :, None].expand(shape)
    elif slide is None:
        m = col[None, :, None, :].expand(shape)
    else:
        m = slide[:, None, :, None] + col[None, :, None, :]
    return m.reshape(1, 1, tq_s * tq_o, tk_s * K)


class Workspace:
    """Flat buffers reused by every call of one plan (per thread): gathered columns of 10-60 MB freshly
    allocated per chunk cost more in page faults than the copy itself (measured 550 vs 110 ns per 512-byte
    row on CPU), so they are allocated once and kept with the plan (about ``max_chunk_bytes``)."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
            buf = torch.empty(n, dtype=dtype, device=device)
            self.buffers[name] = buf
        return buf[:n].view(shape)


def _workspace(plan) -> Workspace:
    spaces = plan.__dict__.setdefault("_workspaces", {})
    return spaces.setdefault(threading.get_ident(), Workspace())


def sliding_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SlidingPlan,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_valid: torch.Tensor | None = None,
    scale: float | None = None,
    max_chunk_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """Attention of grid queries over grid keys (by ``plan``) plus optional extra dense keys: the
    contract of :func:`~diffusion_attn.kernels.gather.gather_attention`. ``max_chunk_bytes`` bounds the
    gathered columns (queries, keys, values, accumulators) held at once; columns are chunked, and so are
    heads when one column of all heads exceeds it."""
    B, N, H, D = q.shape
    Dv = v.shape[-1]
    out = q.new_empty(B, N, H, Dv)
    need_lse = extra_k is not None and extra_k.shape[1] > 0
    lse_grid = torch.empty(B, H, N, dtype=torch.float32, device=q.device) if need_lse else None
    L = plan.slide_offsets.numel()
    ws = _workspace(plan)
    slide_masks = [_additive(p.mask, q.dtype) for p in plan.pieces]
    for cols in plan.columns:
        C, K = cols.kcols.shape
        tq_o = cols.qcols.shape[1]
        per_head = B * L * (K * (D + Dv) * q.element_size() + tq_o * (D * q.element_size() + Dv * 4 + 8))
        heads = max(1, min(H, max_chunk_bytes // max(per_head, 1)))
        chunk = max(1, min(C, max_chunk_bytes // max(per_head * heads, 1)))
        masks: dict[int, torch.Tensor | None] = {}  # per piece, shared by the chunks of this group
        col_mask = _additive(cols.mask, q.dtype)
        for h0 in range(0, H, heads):
            hs = slice(h0, min(H, h0 + heads))
            lse_h = None if lse_grid is None else lse_grid[:, hs]
            for c0 in range(0, C, chunk):
                _column_chunk(q[:, :, hs], k[:, :, hs], v[:, :, hs], plan, cols, c0, min(C, c0 + chunk), ws,
                              slide_masks, col_mask, masks, out[:, :, hs], lse_h, scale)
    if not need_lse:
        return out
    return merge_extra_keys(q, out, lse_grid, extra_k, extra_v, extra_valid, scale)


def _column_chunk(q, k, v, plan, cols, c0, c1, ws, slide_masks, col_mask, masks, out, lse_out, scale):
    """Columns ``c0:c1`` of one group for the heads of ``q, k, v`` (views): gather, every piece, merge,
    write into ``out`` (B, N, h, Dv) and ``lse_out`` (B, h, N) (views)."""
    B, N, H, D = q.shape
    Dv = v.shape[-1]
    dev = q.device
    C, K = cols.kcols.shape
    tq_o = cols.qcols.shape[1]
    c = c1 - c0
    L = plan.slide_offsets.numel()
    merge = plan.overlap
    offsets = plan.slide_offsets
    kidx = (offsets[None, :, None] + cols.kcols[c0:c1, None, :]).reshape(-1)
    qidx = (offsets[None, :, None] + cols.qcols[c0:c1, None, :]).reshape(c, L * tq_o)
    kg = torch.index_select(k, 1, kidx, out=ws.get("k", (B, c * L * K, H, D), k.dtype, dev))
    vg = torch.index_select(v, 1, kidx, out=ws.get("v", (B, c * L * K, H, Dv), v.dtype, dev))
    qg = torch.index_select(q, 1, qidx.reshape(-1), out=ws.get("q", (B, c * L * tq_o, H, D), q.dtype, dev))
    kc = kg.view(B * c, L * K, H, D).transpose(1, 2)  # (B*c, H, L*K, D) strided views
    vc = vg.view(B * c, L * K, H, Dv).transpose(1, 2)
    qc = qg.view(B * c, L * tq_o, H, D).transpose(1, 2)
    oc = ws.get("o", (B * c, H, L * tq_o, Dv), torch.float32 if merge else q.dtype, dev)
    lc = None
    if merge or lse_out is not None:
        lc = ws.get("lse", (B * c, H, L * tq_o), torch.float32, dev)
    # pieces in order of their first query: rows from the high-water mark on are written, not merged
    in_order = merge and all(a.qa <= b.qa for a, b in zip(plan.pieces, plan.pieces[1:]))
    if merge and not in_order:
        oc.zero_()
        lc.fill_(float("-inf"))
    high = 0  # slide positions below it hold a result
    for i, p in enumerate(plan.pieces):
        qs = slice(p.qa * tq_o, p.qb * tq_o)
        ks = slice(p.ka * K, p.kb * K)
        if i not in masks:
            masks[i] = _float_mask(slide_masks[i], col_mask, p.tq, p.tk, tq_o, K)
        mask = masks[i]
        empty = None
        if plan.refine_shared:  # one mask per piece for the whole group: from its first column, broadcast
            if ("refined", i) not in masks:
                masks[("refined", i)] = _refined_mask(plan.refine, qidx[:1, qs], kidx.view(c, L * K)[:1, ks], mask,
                                                      1, q.dtype)
            mask, empty = masks[("refined", i)]
        elif plan.refine is not None:
            mask, empty = _refined_mask(plan.refine, qidx[:, qs], kidx.view(c, L * K)[:, ks], mask, B, q.dtype)
        if lc is None:
            oc[:, :, qs] = F.scaled_dot_product_attention(qc[:, :, qs], kc[:, :, ks], vc[:, :, ks],
                                                          attn_mask=mask, scale=scale)
            continue
        o, lse = _lse_call(qc[:, :, qs], kc[:, :, ks], vc[:, :, ks], mask, scale)
        if empty is not None:  # rows the refinement leaves without a key in this piece: weight 0 in the merge
            lse = lse.masked_fill(empty, float("-inf"))
            o = o.masked_fill(empty[..., None], 0.0)
        split = max(p.qa, min(high, p.qb)) if in_order else p.qb  # [qa, split): merge; [split, qb): write
        if not merge:
            split = p.qa
        m = (split - p.qa) * tq_o
        if m:
            done = slice(p.qa * tq_o, split * tq_o)
            old = lc[:, :, done]
            new = torch.logaddexp(old, lse[:, :, :m])
            w_old = (old - new).exp_().unsqueeze(-1)
            w_new = (lse[:, :, :m] - new).exp_().unsqueeze(-1)
            if empty is not None:  # a row with no key in either part so far: -inf - -inf, weight 0
                w_old.nan_to_num_(0.0)
                w_new.nan_to_num_(0.0)
            oc[:, :, done].mul_(w_old).addcmul_(o[:, :, :m].float(), w_new)
            lc[:, :, done] = new
        if split < p.qb:
            oc[:, :, split * tq_o : p.qb * tq_o] = o[:, :, m:]
            lc[:, :, split * tq_o : p.qb * tq_o] = lse[:, :, m:]
        high = max(high, p.qb)
    out[:, qidx] = oc.view(B, c, H, L * tq_o, Dv).transpose(2, 3).to(out.dtype)
    if lse_out is not None:
        lse_out[:, :, qidx] = lc.view(B, c, H, L * tq_o).transpose(1, 2)


def _refined_mask(refine, qi, ki, shared, B, dtype):
    """A refined box's additive mask for one piece on ``c`` columns: ``refine(qi, ki)`` ((c, tq) queries x
    (c, tk) keys, flattened grid indices) ANDed with the piece's shared additive mask ``shared`` (1, 1, tq,
    tk) or None; returns ``(mask (B*c, 1, tq, tk), empty)``, ``empty`` (B*c, 1, tq) bool for the rows with
    no allowed key (a piece may hold only a corner of a query's circle), or None when there are none."""
    ok = refine(qi[:, :, None], ki[:, None, :])  # (c, tq, tk)
    if shared is not None:
        ok = ok & (shared[0] == 0)
    c, tq, tk = ok.shape
    mask = _additive(ok, dtype)[None].expand(B, c, tq, tk).reshape(B * c, 1, tq, tk)
    empty = ~ok.any(-1)
    if not bool(empty.any()):
        return mask, None
    return mask, empty[None].expand(B, c, tq).reshape(B * c, 1, tq)


def _lse_call(q, k, v, float_mask, scale):
    """(out, lse) of one piece; on CPU with equal head sizes ATen's flash kernel with the additive mask
    as given (broadcast over the batch), else :func:`~.strips.attention_lse`."""
    if q.device.type == "cpu" and v.shape[-1] == q.shape[-1]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=float_mask, scale=scale)[:2]
        return out, lse.float()
    return attention_lse(q, k, v, None if float_mask is None else float_mask == 0, scale)


_SLIDING_AXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def sliding_axes(pattern: BoxPattern) -> int:
    """How many axes of ``pattern`` slide: have at least two queries whose windows no other query shares
    (stride 1 inside the borders). Cached per pattern object."""
    n = _SLIDING_AXES.get(pattern)
    if n is None:
        n = 0
        for a in pattern.axes:
            lengths = torch.diff(a.run_starts(), append=torch.tensor([a.length]))
            n += int((lengths == 1).sum()) >= 2
        _SLIDING_AXES[pattern] = n
    return n


def _auto(request) -> bool:
    """``auto`` prefers this kernel on CPU past the small-sequence size for box patterns with a sliding
    axis (measured faster than ``strips`` on every such layout of the benchmark, strided GNA with a
    sliding time axis included); windows without one (blocked / strided on every axis) stay on
    ``strips``, whose tiles are exact there."""
    if request.device_type != "cpu" or request.num_tokens <= SMALL_SEQUENCE:
        return False
    pattern = grid_pattern_of(request.pattern)
    return isinstance(pattern, BoxPattern) and sliding_axes(pattern) >= 1


def _prepare(request):
    return sliding_plan(grid_pattern_of(request.pattern)).to(request.device or "cpu")


_run = grid_backend_run(_prepare, sliding_attention)


BACKEND = Backend(
    "sliding", "exact key-side splits along one axis merged by log-sum-exp, shared tile masks, keys and "
    "queries gathered once per column: box patterns (auto: on CPU, with a sliding axis)", _run,
    needs=(("box",),), handles=frozenset({"refined"}), prepare=_prepare, autograd=False,
    auto=_auto,
)
