"""Strip kernel for box patterns: keys are gathered once per column and sliced per tile, never copied
per tile.

The gather kernel copies every tile's keys. When the windows of neighbouring tiles overlap a lot (a
sliding axis: GNA with stride 1 in time, window 11 of 21 frames), that copy costs as much as the
attention itself. Here one axis of the grid is the *slide axis*; every other axis is tiled as usual
(:func:`~diffusion_attn.kernels.tiling.axis_options`), and a *column* is one tile of those other axes
taken over the whole slide axis. For a column, the keys of its box on the other axes are gathered once
for every slide position, slide-major, into ``(slide length x keys per column)``. The slide axis is tiled
in runs (:data:`~diffusion_attn.kernels.schedule.RUNS`: queries that share a window), so a tile's keys are
one contiguous slice of the column: SDPA reads it as a view. Per slide tile one SDPA call runs over a
chunk of columns (a batch); tiles at the slide axis' borders hold every query that shares the clamped
window, which makes them large.

A refined box (``BoxPattern.refine``, CLEAR's circle) gets its predicate evaluated on each tile's (query,
key) indices and ANDed with the tile's box mask: per tile a (columns, tq, tk) boolean mask.

Extra dense keys (text tokens) are not appended to the slices (that would be a copy per tile): grid
queries attend to the grid keys and to the text keys separately and the two results are merged by their
log-sum-exp, which is one softmax over both (NATTEN's ``additional_keys`` semantics, as the gather
kernel). On CPU the grid part's LSE comes from ATen's flash kernel; elsewhere from an explicit
matmul-softmax (correct, slower; ``auto`` uses this kernel on CPU only).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..patterns.base import BoxPattern
from .backend import Backend
from .capabilities import grid_pattern_of
from .gather import grid_backend_run
from .reference import SMALL_SEQUENCE
from .schedule import RUNS, AxisTiles, PairCounts, axis_tiles, combined_mask_fn, mask_fn_on, outer_combine
from .tiling import axis_options

__all__ = ["BACKEND", "StripPlan", "strip_plan", "strip_attention", "attention_lse"]

#: Modelled cost of gathering one key row into a column, in (query, key) pairs.
KEY_COPY_COST = 4.0


@dataclass
class StripColumns:
    """Columns sharing one tile shape on the other axes: ``qcols`` (C, tq) and ``kcols`` (C, K) are
    flattened-grid offsets without the slide axis; ``mask(c0, c1)`` the (c, tq, K) masks or None."""

    qcols: torch.Tensor
    kcols: torch.Tensor
    mask_fn: object = None

    def mask(self, c0: int, c1: int):
        return None if self.mask_fn is None else self.mask_fn(c0, c1)


@dataclass
class StripPlan(PairCounts):
    """Everything :func:`strip_attention` needs for one pattern, built once per layout."""

    axis: int  # the slide axis
    slide_offsets: torch.Tensor  # (L,) flattened-grid offset of each permuted slide position
    slide_tiles: list[AxisTiles]  # runs of the slide axis (exact: no masks)
    columns: list[StripColumns]
    tiles: tuple  # per-axis tiling, the slide axis' entry is RUNS
    num_queries: int
    allowed_pairs: int
    visited_pairs: int
    refine: object = None  # a refined box's predicate fn(qi, ki) over flattened grid indices, ANDed per tile

    def to(self, device) -> "StripPlan":
        cols = [StripColumns(c.qcols.to(device), c.kcols.to(device), mask_fn_on(c.mask_fn, device)) for c in self.columns]
        return StripPlan(self.axis, self.slide_offsets.to(device), self.slide_tiles, cols, self.tiles,
                         self.num_queries, self.allowed_pairs, self.visited_pairs, self.refine)


def sdpa_efficiency(tq: int) -> float:
    """Relative CPU SDPA throughput per (query, key) pair for a batch of tiles of ``tq`` queries, each
    with its own keys (measured with torch 2.13 at 4,290 keys: 0.07 at 1 query, 0.21 at 4, 0.43 at 16,
    0.68 at 32, 0.77 at 64, 0.86 at 195, 0.92 at 390, 1.0 from 768)."""
    if tq < 32:
        return 0.68 * max(tq, 1) / 32
    return min(1.0, 0.68 + 0.08 * math.log2(tq / 32))


#: Cost factor of a boolean mask in CPU SDPA (measured 1.45-1.6x per pair).
MASK_COST = 1.55


def _plan_cost(pattern: BoxPattern, axis: int, combo) -> float:
    """Modelled cost of sliding along ``axis`` with the axes tiled as ``combo`` (options of
    :func:`axis_options`, the slide axis' entry being its runs): SDPA pairs by tile efficiency and mask,
    plus the column gathers."""
    cost = 0.0
    for groups in itertools.product(*(g for _, g in combo)):
        n = math.prod(x[0] for x in groups)
        tq = math.prod(x[1] for x in groups)
        tk = math.prod(x[2] for x in groups)
        masked = any(x[3] for x in groups)
        cost += n * tq * tk / sdpa_efficiency(tq) * (MASK_COST if masked else 1.0)
    L = pattern.grid[axis]
    others = [g for i, (_, g) in enumerate(combo) if i != axis]
    for groups in itertools.product(*others):
        cost += KEY_COPY_COST * L * math.prod(x[0] for x in groups) * math.prod(x[2] for x in groups)
    return cost


def choose_strips(pattern: BoxPattern) -> tuple[int, tuple]:
    """The slide axis and per-axis tiling with the lowest modelled cost: ``(axis, tiles)``."""
    options = [axis_options(a) for a in pattern.axes]
    best = None
    for axis in range(len(pattern.axes)):
        runs = options[axis][-1]
        assert runs[0] == RUNS
        choices = [[runs] if i == axis else opts for i, opts in enumerate(options)]
        for combo in itertools.product(*choices):
            cost = _plan_cost(pattern, axis, combo)
            if best is None or cost < best[0]:
                best = (cost, axis, tuple(t for t, _ in combo))
    return best[1], best[2]


def strip_plan(pattern: BoxPattern, axis: int | None = None, tiles: tuple | None = None) -> StripPlan:
    """Plan ``pattern`` for :func:`strip_attention`; ``axis`` / ``tiles`` override the modelled choice
    (``tiles[axis]`` is ignored: the slide axis is always tiled in runs)."""
    if not isinstance(pattern, BoxPattern):
        raise TypeError(f"the strips kernel runs box patterns (GNA, shifted windows), got {type(pattern).__name__}")
    if axis is None or tiles is None:
        chosen_axis, chosen_tiles = choose_strips(pattern)
        axis = chosen_axis if axis is None else axis
        tiles = chosen_tiles if tiles is None else tiles
    if not 0 <= axis < len(pattern.grid):
        raise ValueError(f"slide axis must be in [0, {len(pattern.grid)}), got {axis}")
    tiles = tuple(RUNS if i == axis else t for i, t in enumerate(tiles))
    strides = [math.prod(pattern.grid[i + 1 :]) for i in range(len(pattern.grid))]
    slide = pattern.axes[axis]
    slide_tiles = axis_tiles(slide, RUNS)
    per_axis = [axis_tiles(a, t) for i, (a, t) in enumerate(zip(pattern.axes, tiles)) if i != axis]
    other_strides = [s for i, s in enumerate(strides) if i != axis]
    columns = []
    for combo in itertools.product(*per_axis):
        if combo:
            qcols = outer_combine([c.queries for c in combo], other_strides, "sum")
            kcols = outer_combine([c.keys for c in combo], other_strides, "sum")
        else:  # a 1-D grid: one column, the slide axis itself
            qcols = kcols = torch.zeros(1, 1, dtype=torch.long)
        columns.append(StripColumns(qcols, kcols, combined_mask_fn(combo) if combo else None))
    visited = sum(
        st.qpos.numel() * st.box * c.qcols.numel() * c.kcols.shape[1] for st in slide_tiles for c in columns
    )
    return StripPlan(axis, slide.perm * strides[axis], slide_tiles, columns, tiles,
                     pattern.num_tokens, pattern.allowed_pairs(), visited, pattern.refine_fn())


def attention_lse(q, k, v, mask=None, scale=None):
    """SDPA that also returns the log-sum-exp of each query's scores: ``(out, lse)``, ``lse`` float32
    (B, H, L). ``q, k, v``: (B, H, L, D) (strided views are fine; ``v`` may have another head size);
    ``mask``: boolean, broadcastable to (B, H, Lq, Lk), True = attend. On CPU this is ATen's flash
    kernel; elsewhere, whenever autograd records (the flash kernel's backward ignores the gradient of its
    LSE output) and when ``v``'s head size differs (the flash kernel needs one), an explicit softmax."""
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # the CPU flash kernel needs one head size for q, k and v
    if q.device.type == "cpu" and not recording and v.shape[-1] == q.shape[-1]:
        float_mask = None
        if mask is not None:
            float_mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=float_mask, scale=scale)
        return out, lse.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with no allowed key: zeros
    return torch.matmul(weights, v.float()).to(v.dtype), lse


def _extra_keys_lse(q, extra_k, extra_v, extra_valid, scale):
    """Grid queries (B, N, H, D) over the extra keys only: ``(out (B, N, H, Dv), lse (B, H, N))``; the
    queries of a sample with no valid extra key get lse = -inf and out = 0."""
    mask = None if extra_valid is None else extra_valid.bool()[:, None, None, :]
    out, lse = attention_lse(q.transpose(1, 2), extra_k.transpose(1, 2), extra_v.transpose(1, 2), mask, scale)
    if extra_valid is not None:
        empty = ~extra_valid.bool().any(1)  # (B,)
        if bool(empty.any()):
            out = out.masked_fill(empty[:, None, None, None], 0.0)
            lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    return out.transpose(1, 2), lse


def strip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: StripPlan,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_valid: torch.Tensor | None = None,
    scale: float | None = None,
    max_chunk_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """Attention of grid queries over grid keys (by ``plan``) plus optional extra dense keys: the same
    contract as :func:`~diffusion_attn.kernels.gather.gather_attention`. ``max_chunk_bytes`` bounds the
    gathered column keys and values (and masks) held at once."""
    B, N, H, D = q.shape
    Dv = v.shape[-1]
    out = q.new_empty(B, N, H, Dv)
    need_lse = extra_k is not None and extra_k.shape[1] > 0
    lse_grid = torch.empty(B, H, N, dtype=torch.float32, device=q.device) if need_lse else None
    offsets = plan.slide_offsets
    L = offsets.numel()
    t_max = max(st.qpos.shape[1] for st in plan.slide_tiles)
    box_max = max(st.box for st in plan.slide_tiles)
    for cols in plan.columns:
        C, K = cols.kcols.shape
        tq_o = cols.qcols.shape[1]
        per_col = B * H * L * K * (D + Dv) * q.element_size()  # gathered keys and values
        if cols.mask_fn is not None or plan.refine is not None:  # the tile mask, as SDPA's float mask
            per_col += B * t_max * tq_o * box_max * K * 4
        chunk = max(1, min(C, max_chunk_bytes // max(per_col, 1)))
        for c0 in range(0, C, chunk):
            c1 = min(C, c0 + chunk)
            c = c1 - c0
            kidx = (offsets[None, :, None] + cols.kcols[c0:c1, None, :]).reshape(c, L * K)
            kc = k[:, kidx].reshape(B * c, L * K, H, D).transpose(1, 2)  # (B*c, H, L*K, D) view
            vc = v[:, kidx].reshape(B * c, L * K, H, Dv).transpose(1, 2)
            colmask = cols.mask(c0, c1)  # (c, tq_o, K) or None
            for st in plan.slide_tiles:
                t, box = st.qpos.shape[1], st.box
                tq, tk = t * tq_o, box * K
                mask = base = None
                if colmask is not None:
                    base = colmask[:, None, :, None, :].expand(c, t, tq_o, box, K).reshape(c, tq, tk)
                    if plan.refine is None:  # a refined box builds its mask per tile below
                        mask = base[None].expand(B, c, tq, tk).reshape(B * c, 1, tq, tk)
                qslide = offsets[st.qpos]  # (n, t)
                for j in range(st.qpos.shape[0]):
                    qidx = (qslide[j][None, :, None] + cols.qcols[c0:c1, None, :]).reshape(c, tq)
                    qg = q[:, qidx].reshape(B * c, tq, H, D).transpose(1, 2)
                    k0 = int(st.kstart[j]) * K
                    if plan.refine is not None:  # a refined box: its predicate on this tile's pairs
                        mask = plan.refine(qidx[:, :, None], kidx[:, None, k0 : k0 + tk])
                        mask = mask if base is None else mask & base
                        mask = mask[None].expand(B, c, tq, tk).reshape(B * c, 1, tq, tk)
                    kk, vv = kc[:, :, k0 : k0 + tk], vc[:, :, k0 : k0 + tk]
                    if need_lse:
                        o, lse = attention_lse(qg, kk, vv, mask, scale)
                        lse_grid[:, :, qidx] = lse.view(B, c, H, tq).transpose(1, 2)
                    else:
                        o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask, scale=scale)
                    out[:, qidx] = o.view(B, c, H, tq, Dv).transpose(2, 3)
            del kc, vc, kk, vv, colmask, mask  # free this chunk before gathering the next
    if not need_lse:
        return out
    return merge_extra_keys(q, out, lse_grid, extra_k, extra_v, extra_valid, scale)


def merge_extra_keys(q, out, lse_grid, extra_k, extra_v, extra_valid, scale):
    """The grid part ``out`` (B, N, H, Dv) with its ``lse_grid`` (B, H, N), merged by log-sum-exp with the
    grid queries' attention to the extra dense keys (text): one softmax over both."""
    out_x, lse_x = _extra_keys_lse(q, extra_k, extra_v, extra_valid, scale)
    total = torch.logaddexp(lse_grid, lse_x)
    w_grid = torch.exp(lse_grid - total).transpose(1, 2)[..., None]  # (B, N, H, 1)
    w_x = torch.exp(lse_x - total).transpose(1, 2)[..., None]
    return (out.float() * w_grid + out_x.float() * w_x).to(out.dtype)


def _prepare(request):
    return strip_plan(grid_pattern_of(request.pattern)).to(request.device or "cpu")


_run = grid_backend_run(_prepare, strip_attention)


BACKEND = Backend(
    "strips", "keys gathered once per column and sliced per tile: box patterns (auto: on CPU, measured "
    "1.03-1.70x gather's speed)", _run,
    needs=(("box",),), handles=frozenset({"refined"}), prepare=_prepare,
    auto=lambda r: r.device_type == "cpu" and r.num_tokens > SMALL_SEQUENCE,
)
