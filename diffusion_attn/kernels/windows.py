"""Reshape-to-windows SDPA: the fast path for box patterns that partition the grid into windows.

A :class:`~diffusion_attn.patterns.BoxPattern` is a *window partition* when, on every axis and in the
axis' permuted coordinates, the queries split into consecutive segments that share one key window and

* most segments are **exact**: the window is the segment itself (blocked GNA, ``stride == window``,
  with or without dilation; the 2 x 2 MSW-MSA windows after their cyclic shift), and
* the others are **clamped borders**: a partial segment right after an exact one whose window ends
  where the segment ends and reaches back into that exact segment. This is NATTEN's inward clamp of
  the last window when the axis length (or a dilation group's length) is not a multiple of the window,
  and HiDiffusion's second window on an odd axis. Border windows overlap their neighbour, so they are
  not a partition of the keys, but they are still one dense box per query segment.

Anything else (sliding or strided windows with ``stride < window``, radial / block patterns) is not a
partition: :func:`window_partition` returns ``None`` and the caller uses the gather kernel.

Computation (:func:`window_attention`). Per axis, segments of equal shape at a regular step form a
*group*: exact windows form one group (``Tensor.unfold(size=w, step=w)``, a view), every clamped
border forms a group of its own (or one with the same borders of the other dilation groups). The
product of the per-axis groups gives a handful of *window shapes* (``2 ** ndim`` at most for
undilated GNA); each is one SDPA call over ``(B * windows, heads, window_queries, head_dim)`` with
``window_keys`` keys, taken from the grid by ``unfold`` views and a single permute-copy per tensor.
Border windows need no gather: their queries and keys are strided slices too. A non-identity axis
permutation (dilation groups, cyclic shift) costs one ``index_select`` of q, k, v and one of the output.

Text tokens: every window gets all (non-padded) text keys appended as extra dense keys -- one softmax
over window keys and text keys, NATTEN's ``additional_keys`` semantics -- and text queries attend to
the whole sequence with plain SDPA, as :func:`~diffusion_attn.kernels.pattern_attention` does. Text
padding (``key_padding_mask``) becomes a boolean key mask on the appended text keys only; without
padding the SDPA calls are unmasked (flash kernels). Work is chunked along the axis with the most
windows so one call's key buffer stays under ``max_chunk_bytes``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from ..patterns.base import AxisWindows, BoxPattern
from .backend import Backend
from .reference import check_inputs, text_query_attention

__all__ = ["AxisGroup", "BACKEND", "WindowPlan", "window_attention", "window_partition", "MAX_WINDOW_SHAPES", "prepare_window_plan"]

#: More window shapes than this (only with heavily dilated, unevenly divided axes) are left to gather.
MAX_WINDOW_SHAPES = 64


@dataclass(frozen=True)
class AxisGroup:
    """``count`` query segments of ``q_size`` positions starting at ``q_start + j * step`` (permuted
    coordinates, ``j < count``), segment ``j`` seeing the keys ``[k_start + j * step, + k_size)``."""

    q_start: int
    count: int
    q_size: int
    k_start: int
    k_size: int
    step: int

    @property
    def q_span(self) -> int:
        return (self.count - 1) * self.step + self.q_size

    @property
    def k_span(self) -> int:
        return (self.count - 1) * self.step + self.k_size


@dataclass
class WindowPlan:
    """How :func:`window_attention` cuts a grid into windows; built by :func:`window_partition`.

    ``grid3`` is the grid padded to 3 axes with leading 1s; ``groups[a]`` lists axis ``a``'s groups;
    ``perm`` (N,) maps permuted flat position -> original flat grid index, ``None`` when every axis is
    in its natural order. Cache one plan per (pattern, layout); :meth:`to` moves it to a device.
    """

    grid: tuple[int, ...]
    grid3: tuple[int, int, int]
    groups: tuple[tuple[AxisGroup, ...], ...]
    perm: torch.Tensor | None = None
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def shapes(self) -> list[tuple[AxisGroup, ...]]:
        """One entry per window shape: a group per axis."""
        return list(itertools.product(*self.groups))

    @property
    def num_windows(self) -> int:
        return sum(math.prod(g.count for g in combo) for combo in self.shapes)

    @property
    def visited_pairs(self) -> int:
        """(query, key) grid pairs the SDPA calls compute (equals the pattern's allowed pairs)."""
        return sum(
            math.prod(g.count * g.q_size * g.k_size for g in combo) for combo in self.shapes
        )

    def describe(self) -> str:
        parts = []
        for combo in self.shapes:
            n = math.prod(g.count for g in combo)
            tq = "x".join(str(g.q_size) for g in combo)
            tk = "x".join(str(g.k_size) for g in combo)
            parts.append(f"{n} windows {tq} queries / {tk} keys")
        return "; ".join(parts)

    def perm_on(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(perm, inverse perm) on ``device``, cached in the plan."""
        if self.perm is None:
            return None
        key = str(torch.device(device))
        if key not in self._on:
            inv = torch.empty_like(self.perm)
            inv[self.perm] = torch.arange(self.perm.numel())
            self._on[key] = (self.perm.to(device), inv.to(device))
        return self._on[key]

    def to(self, device) -> "WindowPlan":
        self.perm_on(device)
        return self


# -- detection ----------------------------------------------------------------------------------------


def _segments(axis: AxisWindows):
    """Maximal runs of consecutive permuted positions with the same window: (qs, qe, lo, hi)."""
    lo, hi = axis.lo.tolist(), axis.hi.tolist()
    out, p, L = [], 0, axis.length
    while p < L:
        e = p + 1
        while e < L and lo[e] == lo[p] and hi[e] == hi[p]:
            e += 1
        out.append((p, e, lo[p], hi[p]))
        p = e
    return out


def axis_groups(axis: AxisWindows) -> tuple[AxisGroup, ...] | None:
    """The axis' window groups, or ``None`` when its windows are not a partition (module docstring)."""
    segs = _segments(axis)
    prev_exact = None
    for qs, qe, lo, hi in segs:
        if (lo, hi) == (qs, qe):
            prev_exact = (qs, qe)
            continue
        # a clamped border: follows an exact window, ends with its segment, reaches back into that window
        if prev_exact is None or prev_exact[1] != qs or hi != qe or not prev_exact[0] <= lo < qs:
            return None
        prev_exact = None  # two borders in a row would overlap more than a clamp does
    # bucket by shape, then split each bucket into arithmetic progressions of start positions
    buckets: dict[tuple[int, int, int], list[int]] = {}
    for qs, qe, lo, hi in segs:
        buckets.setdefault((qe - qs, hi - lo, lo - qs), []).append(qs)
    groups = []
    for (tq, tk, off), starts in buckets.items():
        i = 0
        while i < len(starts):
            if i + 1 == len(starts):
                groups.append(AxisGroup(starts[i], 1, tq, starts[i] + off, tk, max(tq, 1)))
                break
            step = starts[i + 1] - starts[i]
            j = i + 1
            while j + 1 < len(starts) and starts[j + 1] - starts[j] == step:
                j += 1
            groups.append(AxisGroup(starts[i], j - i + 1, tq, starts[i] + off, tk, step))
            i = j + 1
    return tuple(sorted(groups, key=lambda g: g.q_start))


def window_partition(pattern) -> WindowPlan | None:
    """The window plan of ``pattern``, or ``None`` when it is not a window partition.

    Pure function of the pattern (cheap: a pass over each axis); cache the result per layout.
    """
    if not isinstance(pattern, BoxPattern):
        return None
    groups = []
    for axis in pattern.axes:
        g = axis_groups(axis)
        if g is None:
            return None
        groups.append(g)
    if math.prod(len(g) for g in groups) > MAX_WINDOW_SHAPES:
        return None
    pad = 3 - len(pattern.grid)
    grid3 = (1,) * pad + tuple(pattern.grid)
    groups3 = tuple((AxisGroup(0, 1, 1, 0, 1, 1),) for _ in range(pad)) + tuple(groups)
    perm = None
    if any(not torch.equal(a.perm, torch.arange(a.length)) for a in pattern.axes):
        perm = torch.zeros((), dtype=torch.long)
        for a in pattern.axes:
            perm = perm[..., None] * a.length + a.perm
        perm = perm.reshape(-1)
    return WindowPlan(tuple(pattern.grid), grid3, groups3, perm)


# -- computation --------------------------------------------------------------------------------------


def _windows(x: torch.Tensor, combo, which: str, chunk_axis: int | None = None, c0: int = 0, c1: int = 0):
    """View of grid tensor ``x`` (B, L0, L1, L2, heads, D) as (B, n0, n1, n2, t0, t1, t2, heads, D):
    the query (``which="q"``) or key windows of one window shape; optionally only windows ``c0:c1``
    along ``chunk_axis``."""
    for a, g in enumerate(combo):
        start, size, span = (g.q_start, g.q_size, g.q_span) if which == "q" else (g.k_start, g.k_size, g.k_span)
        if a == chunk_axis:
            start, span = start + c0 * g.step, (c1 - c0 - 1) * g.step + size
        x = x.narrow(1 + a, start, span).unfold(1 + a, size, g.step)
    # x: (B, n0, n1, n2, heads, D, t0, t1, t2)
    return x.permute(0, 1, 2, 3, 6, 7, 8, 4, 5)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: WindowPlan,
    layout: TokenLayout,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    max_chunk_bytes: int = 256 * 2**20,
) -> torch.Tensor:
    """Attention of a window-partition pattern (``plan = window_partition(pattern)``) over a sequence
    laid out as ``layout``. Same contract as :func:`~diffusion_attn.kernels.pattern_attention`:
    ``q, k, v`` (B, S, heads, head_dim); ``key_padding_mask`` (B, S) bool, True = real token, only text
    tokens may be padded. Returns (B, S, heads, head_dim_v)."""
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    txt = layout.text_slice
    X = layout.text_len
    kpm, grids, out, og = window_grids(q, k, v, plan, layout, key_padding_mask)
    qg, kg, vg = grids
    if X:
        text_k, text_v = k[:, txt], v[:, txt]  # (B, X, H, D)
        tvalid = None if kpm is None else kpm[:, txt]

    for combo in plan.shapes:
        counts = [g.count for g in combo]
        tq = math.prod(g.q_size for g in combo)
        tk = math.prod(g.k_size for g in combo)
        # chunk along the axis with the most windows so one call's keys stay under max_chunk_bytes
        per_window = B * (tk + X) * H * (D + Dv) * q.element_size()
        axis = max(range(3), key=lambda a: counts[a])
        others = math.prod(counts) // counts[axis]
        step = max(1, min(counts[axis], max_chunk_bytes // max(per_window * others, 1)))
        for c0 in range(0, counts[axis], step):
            c1 = min(counts[axis], c0 + step)
            n = [c1 - c0 if a == axis else counts[a] for a in range(3)]
            nw = math.prod(n)
            qw = _windows(qg, combo, "q", axis, c0, c1).reshape(B * nw, tq, H, D)
            if X:
                kw = q.new_empty(B, *n, tk + X, H, D)
                vw = q.new_empty(B, *n, tk + X, H, Dv)
                gk = [g.k_size for g in combo]
                kw[..., :tk, :, :].unflatten(4, gk).copy_(_windows(kg, combo, "k", axis, c0, c1))
                vw[..., :tk, :, :].unflatten(4, gk).copy_(_windows(vg, combo, "k", axis, c0, c1))
                kw[..., tk:, :, :].copy_(text_k[:, None, None, None])
                vw[..., tk:, :, :].copy_(text_v[:, None, None, None])
                kw, vw = kw.view(B * nw, tk + X, H, D), vw.view(B * nw, tk + X, H, Dv)
            else:
                kw = _windows(kg, combo, "k", axis, c0, c1).reshape(B * nw, tk, H, D)
                vw = _windows(vg, combo, "k", axis, c0, c1).reshape(B * nw, tk, H, Dv)
            mask = None
            if X and tvalid is not None:
                m = torch.cat([torch.ones(B, tk, dtype=torch.bool, device=q.device), tvalid], dim=1)
                mask = m[:, None, None, :].expand(B, nw, 1, tk + X).reshape(B * nw, 1, 1, tk + X)
            o = F.scaled_dot_product_attention(qw.transpose(1, 2), kw.transpose(1, 2), vw.transpose(1, 2),
                                               attn_mask=mask, scale=scale)
            o = o.transpose(1, 2).reshape(B, *n, *(g.q_size for g in combo), H, Dv)
            _windows(og, combo, "q", axis, c0, c1).copy_(o)
    return finish_windows(out, og, q, k, v, plan, layout, kpm, scale)


def window_grids(q, k, v, plan: WindowPlan, layout: TokenLayout, key_padding_mask=None):
    """Set-up shared by the window kernels: checks the inputs, puts the grid tokens of ``q, k, v`` in the
    plan's order as (B, *plan.grid3, heads, D) tensors, and allocates the output.

    Returns ``(kpm, (qg, kg, vg), out, og)``: ``out`` (B, S, heads, Dv) is the result, ``og`` the
    (B, *plan.grid3, heads, Dv) grid output to fill (a view of ``out`` unless the plan permutes); hand
    both to :func:`finish_windows`."""
    if tuple(layout.grid) != tuple(plan.grid):
        raise ValueError(f"window plan is for grid {plan.grid}, layout has {layout.grid}")
    B, S, H, _ = q.shape
    Dv = v.shape[-1]
    kpm = check_inputs(q, k, layout, key_padding_mask)
    img = layout.image_slice
    grid = (q[:, img], k[:, img], v[:, img])
    perms = plan.perm_on(q.device)
    if perms is not None:
        grid = tuple(t.index_select(1, perms[0]) for t in grid)
    shape3 = (B, *plan.grid3, H)
    out = q.new_empty(B, S, H, Dv)
    out_img = q.new_empty(B, layout.num_image, H, Dv) if perms is not None else out[:, img]
    return kpm, tuple(t.reshape(*shape3, t.shape[-1]) for t in grid), out, out_img.view(*shape3, Dv)


def finish_windows(out, og, q, k, v, plan: WindowPlan, layout: TokenLayout, kpm, scale):
    """The end of a window kernel: grid outputs back in token order, text queries over every key."""
    perms = plan.perm_on(q.device)
    if perms is not None:
        out[:, layout.image_slice] = og.reshape(out.shape[0], layout.num_image, *out.shape[2:]).index_select(1, perms[1])
    if layout.text_len:
        out[:, layout.text_slice] = text_query_attention(q, k, v, layout, kpm, scale)
    return out


def prepare_window_plan(request):
    """The window plan of a request's pattern on its device (the windows and xformers backends' prepare)."""
    from .capabilities import window_plan_of

    return window_plan_of(request.pattern).to(request.device or "cpu")


def _run(q, k, v, request, prepared, key_padding_mask, scale):
    plan = prepared if prepared is not None else prepare_window_plan(request)
    return window_attention(q, k, v, plan, request.layout, key_padding_mask=key_padding_mask, scale=scale)


BACKEND = Backend(
    "windows", "reshape into non-overlapping windows + SDPA: window partitions (blocked GNA, HiDiffusion's "
    "shifted windows; measured as fast as gather on even windows, faster with borders or text)", _run,
    needs=(("partition",),), prepare=prepare_window_plan, auto=lambda r: True,
)
