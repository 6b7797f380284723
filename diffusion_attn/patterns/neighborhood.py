"""Generalized Neighborhood Attention (GNA): sliding, strided and blocked windows, 1-3 D, with dilation.

Semantics follow NATTEN exactly (``natten.backends.flex.get_na_flex_mask``, non-causal), per axis of
length ``L`` with window ``k``, stride ``s`` and dilation ``d``:

* dilation splits the axis into ``d`` interleaved groups (``x % d``), each of length ``L_g``;
  attention stays inside a group, in group coordinates ``x // d``;
* ``left = k // 2``, ``right = k // 2 + k % 2 - 1`` (even windows allowed);
* a query's stride-group leader is ``min((q // s) * s + s // 2, L_g - 1)``;
* the window centre is the leader clamped inward, ``clamp(leader, left, L_g - 1 - right)``, so every
  query sees exactly ``k`` keys per axis, and the key is allowed iff it lies in ``[centre - left,
  centre + right]``.

``s = 1`` is standard neighborhood attention, ``s = k`` blocked (Swin-like) windows, ``1 < s < k``
strided sliding windows (``s`` queries share one window, so tiles aligned to the stride are dense).
Constraints (as NATTEN): ``1 <= k``, ``k * d <= L``, ``1 <= s <= k``.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from .base import AxisWindows, BoxPattern

__all__ = ["neighborhood_axis", "neighborhood_pattern", "normalize_per_axis"]


def normalize_per_axis(value, ndim: int, name: str) -> tuple[int, ...]:
    """Broadcast a scalar to ``ndim`` axes; check a sequence has ``ndim`` positive integers (entries are
    never truncated: ``2.5`` and ``True`` are refused, not read as 2 and 1)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,) * ndim
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of {ndim} ints, got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
        raise ValueError(f"{name} must be an int or a sequence of {ndim} ints, got {value!r}")
    value = tuple(int(v) for v in items)
    if len(value) != ndim:
        raise ValueError(f"{name} must have {ndim} entries for a {ndim}-D token grid, got {value!r}")
    if any(v < 1 for v in value):
        raise ValueError(f"{name} entries must be >= 1, got {value!r}")
    return value


def neighborhood_axis(length: int, window: int, stride: int = 1, dilation: int = 1) -> AxisWindows:
    """Per-axis NATTEN windows; the axis is permuted so each dilation group is contiguous."""
    if window * dilation > length:
        raise ValueError(
            f"window {window} x dilation {dilation} = {window * dilation} is larger than the axis ({length} tokens); "
            f"accepted: window * dilation <= {length}"
        )
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    left = window // 2
    right = window // 2 + window % 2 - 1
    perm, lo, hi = [], [], []
    offset = 0
    for g in range(dilation):
        members = torch.arange(g, length, dilation)
        n = members.numel()
        q = torch.arange(n)
        leader = torch.clamp((q // stride) * stride + stride // 2, max=n - 1)
        centre = torch.clamp(leader, min=left, max=n - 1 - right)
        perm.append(members)
        lo.append(offset + centre - left)
        hi.append(offset + centre + right + 1)
        offset += n
    return AxisWindows(torch.cat(perm), torch.cat(lo), torch.cat(hi))


def neighborhood_pattern(
    grid: Sequence[int],
    window,
    stride=1,
    dilation=1,
) -> BoxPattern:
    """GNA over a 1-, 2- or 3-D grid. Scalars broadcast to every axis."""
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    window = normalize_per_axis(window, nd, "window")
    stride = normalize_per_axis(stride, nd, "stride")
    dilation = normalize_per_axis(dilation, nd, "dilation")
    axes = []
    for i, (L, k, s, d) in enumerate(zip(grid, window, stride, dilation)):
        try:
            axes.append(neighborhood_axis(L, k, s, d))
        except ValueError as e:
            raise ValueError(f"axis {i} of grid {grid}: {e}") from None
    return BoxPattern(grid, axes)
