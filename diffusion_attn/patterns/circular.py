"""CLEAR's circular window: a grid query sees the grid keys strictly inside a circle around it.

CLEAR (Huage001/CLEAR, ``attention_processor.py``): an image query at ``(y, x)`` attends to the image
keys with ``(y - ky)**2 + (x - kx)**2 < r**2`` (strict, radius ``r`` = the window size), truncated at the
borders (no inward shift, unlike NATTEN: border queries see fewer keys), plus every text key; text
queries see everything. The grid part is :class:`CircularWindow`; the whole rule is
``text_dense(CircularWindow(grid, r), layout)`` (:func:`circular_pattern`).

This is the proof that a new mask shape is a pattern file and nothing else: it is neither a box nor a
block pattern, so its only capability is the predicate (kernels run it through ``mask_mod`` / the dense
reference). It is not a registered method (CLEAR needs distilled weights).

Generalisation: 1-, 2- or 3-D grids, distance summed over every axis (3-D: a sphere).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..layout import TokenLayout
from .mask_mod import MaskMod, text_dense

__all__ = ["CircularWindow", "circular_pattern"]


class CircularWindow:
    """Grid pattern: query ``p`` sees key ``k`` iff ``sum_a (p_a - k_a)**2 < radius**2`` (row-major grid)."""

    #: a grid pattern with a predicate only: no box, block or partition structure
    capabilities = frozenset()

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
    def grid_pattern(self) -> "CircularWindow":
        return self

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
        return int(self.dense_mask().sum())

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
