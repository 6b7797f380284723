"""CLEAR's circular window: a grid query sees the grid keys strictly inside a circle around it.

CLEAR (Huage001/CLEAR, ``attention_processor.py``): an image query at ``(y, x)`` attends to the image
keys with ``(y - ky)**2 + (x - kx)**2 < r**2`` (strict, radius ``r`` = the window size), truncated at the
borders (no inward shift, unlike NATTEN: border queries see fewer keys), plus every text key; text
queries see everything. The grid part is :class:`CircularWindow`; the whole rule is
``text_dense(CircularWindow(grid, r), layout)`` (:func:`circular_pattern`).

This is the proof that a new mask shape is a pattern file and nothing else. The circle is no product of
intervals, but it has a small bounding box per query, so its kernel view (``grid_pattern``) is a *refined
box* (:class:`~diffusion_attn.patterns.BoxPattern` with ``refine=`` the circle): per axis the window
``[max(0, p - m), min(L, p + m + 1))`` with ``m = ceil(r) - 1`` the largest offset with ``m**2 < r**2``
(the disc's bounding square, truncated at the borders, identity permutation), refined by the disc
predicate inside each tile. Its capabilities are ``{"box", "refined"}``: the box kernels that apply the
refinement (``gather``, ``strips``, ``sliding``) and the predicate kernels (``flex``, ``chunked``,
``reference``) run it; ``natten``, ``windows``, ``triton`` refuse it. The registered method is ``clear``
(:mod:`diffusion_attn.processors.clear`).

CLEAR's down-sampled variant adds ``(H/f)(W/f)`` pooled keys after the sequence (a key-side segment
``"pooled"``): image queries see them, text queries do not. :func:`clear_pattern` is that whole rule on a
layout with such a segment (``sequence_mask(clear_pattern(...), layout)``; the method's mask views,
``attention_mask`` / ``diffusion-attn mask`` / ``simulate``, show the local part over grid + text); the
processor itself merges the pooled keys by log-sum-exp (:mod:`diffusion_attn.extensions`), so its kernels
only ever see :class:`CircularWindow`.

"Larger than the grid": :func:`covering_radius` is the smallest integer radius whose circle around every
query covers the whole grid (``isqrt(sum((g - 1)**2)) + 1``); :func:`check_radius` refuses radii above it.

Generalisation: 1-, 2- or 3-D grids, distance summed over every axis (3-D: a sphere).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from ..layout import TokenLayout
from .base import AxisWindows, BoxPattern
from .mask_mod import MaskMod, grid_mask, in_segment, text_dense

__all__ = ["CircularWindow", "circular_pattern", "clear_pattern", "check_radius", "covering_radius", "pooled_grid"]


class CircularWindow:
    """Grid pattern: query ``p`` sees key ``k`` iff ``sum_a (p_a - k_a)**2 < radius**2`` (row-major grid)."""

    #: its kernel view is a box (the bounding square) refined by the circle (:attr:`grid_pattern`)
    capabilities = frozenset({"box", "refined"})
    #: the predicate depends on the offset ``k - q`` only (kernels may share one tile mask among translates)
    translation_invariant = True

    def __init__(self, grid: Sequence[int], radius: float):
        grid = tuple(grid)
        if not 1 <= len(grid) <= 3 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
            raise ValueError(f"CircularWindow grid must be 1 to 3 ints >= 1, got {grid!r}")
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
            raise ValueError(f"CircularWindow radius must be a finite number > 0 (in tokens), got {radius!r}")
        self.grid = grid
        self.radius = radius
        self._r2 = float(radius) ** 2

    @property
    def reach(self) -> int:
        """The largest per-axis offset inside the circle: ``ceil(r) - 1`` (``m**2 < r**2``)."""
        return math.ceil(self.radius) - 1

    @property
    def grid_pattern(self) -> BoxPattern:
        """The kernel view: the circle's bounding box per axis, truncated at the borders (no inward shift),
        refined by the circle itself (built once)."""
        box = getattr(self, "_box", None)
        if box is None:
            m = self.reach
            axes = []
            for L in self.grid:
                pos = torch.arange(L)
                axes.append(AxisWindows(pos, (pos - m).clamp(min=0), (pos + m + 1).clamp(max=L)))
            box = self._box = BoxPattern(self.grid, axes, refine=self)
        return box

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def allowed_fn(self, device=None):
        """``fn(qi, ki)``: elementwise predicate over flattened grid indices (pure tensor arithmetic)."""
        strides = [math.prod(self.grid[i + 1 :]) for i in range(len(self.grid))]
        axes = list(zip(strides, self.grid))
        r2 = self._r2

        def fn(qi, ki):
            d2 = None
            for stride, L in axes:
                d = (qi // stride) % L - (ki // stride) % L
                d2 = d * d if d2 is None else d2 + d * d
            return d2 < r2

        return fn

    def allowed(self, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        return self.allowed_fn(qi.device)(qi, ki)

    def mask_mod(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        """FlexAttention-style predicate over flattened *grid* indices."""
        return self.allowed(q_idx, kv_idx)

    def dense_mask(self) -> torch.Tensor:
        """(N, N) boolean mask over the row-major flattened grid."""
        i = torch.arange(self.num_tokens)
        return self.allowed(i[:, None], i[None, :])

    def allowed_pairs(self) -> int:
        """Allowed (query, key) grid pairs, counted per offset ``d`` inside the circle (each offset is
        allowed for ``prod_a (L_a - |d_a|)`` queries): no N x N mask, so large grids are cheap."""
        reach = [min(L - 1, math.ceil(self.radius)) for L in self.grid]
        total = 0
        for d in itertools.product(*(range(-m, m + 1) for m in reach)):
            if sum(x * x for x in d) < self._r2:
                total += math.prod(L - abs(x) for L, x in zip(self.grid, d))
        return total

    @property
    def density(self) -> float:
        return self.allowed_pairs() / float(self.num_tokens) ** 2

    def is_full(self) -> bool:
        """True when the circle around every query covers the whole grid."""
        return sum((g - 1) ** 2 for g in self.grid) < self._r2

    def __repr__(self) -> str:
        return f"CircularWindow(grid={self.grid}, radius={self.radius})"


def circular_pattern(grid: Sequence[int], radius: float, layout: TokenLayout | None = None) -> MaskMod:
    """CLEAR's rule on a call's sequence: ``text_dense(CircularWindow(grid, radius))``, attached to
    ``layout`` when given."""
    return text_dense(CircularWindow(grid, radius), layout)


def covering_radius(grid: Sequence[int]) -> int:
    """The smallest integer radius whose circle around every query of ``grid`` covers the whole grid:
    ``sum((g - 1)**2) < r**2`` (the two opposite corners are the farthest pair)."""
    return math.isqrt(sum((int(g) - 1) ** 2 for g in grid)) + 1


def check_radius(grid: Sequence[int], radius: int) -> None:
    """Refuse a radius larger than the grid: above :func:`covering_radius`, where a smaller radius already
    gives dense attention. (A radius equal to it is accepted: that is the method's "full" setting.)"""
    full = covering_radius(grid)
    if radius > full:
        raise ValueError(
            f"CLEAR radius {radius} is larger than the {'x'.join(map(str, grid))} token grid: radius {full} already "
            f"covers it (every image query sees every image key); use a radius <= {full}, or a larger image")


def pooled_grid(grid: Sequence[int], factor: int) -> tuple[int, ...]:
    """The grid of CLEAR's pooled tokens: ``ceil(g / factor)`` per axis (a partial border block is a
    pooled token of its own; see :func:`diffusion_attn.processors.clear.pool_tokens`)."""
    return tuple(-(-int(g) // factor) for g in grid)


def clear_pattern(grid: Sequence[int], radius: float, layout: TokenLayout | None = None, pooled: str = "pooled") -> MaskMod:
    """CLEAR's whole rule on a layout whose key side may have a segment ``pooled`` (the down-sampled
    variant's pooled keys): image queries see the text keys, the image keys inside their circle and every
    pooled key; text queries see the text and image keys, not the pooled ones. Without such a segment it
    is :func:`circular_pattern`."""
    local = CircularWindow(grid, radius)
    if layout is None or pooled not in {s.name for s in layout.extra if s.on("kv")}:
        return text_dense(local, layout)
    text_q, grid_q = in_segment("text", "q"), in_segment("grid", "q")
    text_k, grid_k, pooled_k = in_segment("text", "kv"), in_segment("grid", "kv"), in_segment(pooled, "kv")
    mod = grid_mask(local) | (text_q & (text_k | grid_k)) | (grid_q & (text_k | pooled_k))
    return mod.on(layout)
