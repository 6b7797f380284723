"""HiDiffusion's MSW-MSA pattern: a 2 x 2 grid of large windows after a cyclic shift.

Official (``make_diffusers_transformer_block``): the feature map ``(H, W)`` is rolled by ``(-sh, -sw)``
and cut into a 2 x 2 grid of ``ceil(H/2) x ceil(W/2)`` windows; there is no Swin mask for the wrapped
region. Here the roll is an axis permutation (permuted position ``p`` holds ``(p + shift) % L``) and the
windows are NATTEN blocked windows (window = stride = ``ceil(L/2)``) in permuted coordinates.

Odd sizes: the official code bicubic-resizes the normalized features to ``2 * ceil(L/2)`` and back (and
warns that quality "largely decreases"). We never resize: on an odd axis the second window is clamped
inward (NATTEN's rule) and overlaps the first by one row, so every query still sees exactly
``ceil(L/2)`` keys on that axis. Even sizes give exactly the official windows.
"""

from __future__ import annotations

import torch

from .base import AxisWindows, BoxPattern
from .neighborhood import neighborhood_axis

__all__ = ["shifted_window_pattern", "msw_shift"]


def msw_shift(window: int, choice: int) -> int:
    """Official shift for choice ``m`` in {0, 1, 2, 3}: ``m * (window // 4)``."""
    return choice * (window // 4)


def shifted_window_pattern(grid: tuple[int, int], choice: int = 0) -> BoxPattern:
    """2 x 2 windows over ``grid`` after the cyclic shift picked by ``choice`` (0..3)."""
    if choice not in (0, 1, 2, 3):
        raise ValueError(f"shift choice must be 0, 1, 2 or 3, got {choice}")
    axes = []
    for L in grid:
        w = -(-L // 2)
        shift = msw_shift(w, choice)
        base = neighborhood_axis(L, w, w, 1)  # identity perm, blocked windows
        perm = (torch.arange(L) + shift) % L
        axes.append(AxisWindows(perm, base.lo, base.hi))
    return BoxPattern(tuple(grid), axes)
