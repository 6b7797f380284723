"""Expected attention masks built by explicit loops, for the tests' oracles.

Nothing here imports :mod:`diffusion_attn`: these are independent re-statements of the published
semantics, written for clarity on tiny grids, not for speed. The tests compare the package's kernels,
adapters and processors against attention computed with these masks (and, where the real package is
installed, check the masks themselves against NATTEN).

* :func:`gna_axis` -- NATTEN's generalized neighborhood attention on one axis (window, stride,
  dilation; non-causal), as documented by NATTEN (natten.org, "Generalized Neighborhood Attention"):
  the axis splits into ``dilation`` interleaved groups; inside a group, queries are grouped by
  ``stride`` and every query of a stride group uses the window of the group's centre query (the last
  query of the axis if the centre falls beyond it); a window of ``k`` keys is centred there
  (``k // 2`` keys before, ``k - 1 - k // 2`` after) and shifted inward at the borders, so it always
  holds exactly ``k`` keys.
* :func:`msw_axis` -- HiDiffusion's MSW-MSA on one axis (official ``window_partition``): the feature
  map is rolled by ``-shift`` (``torch.roll``), i.e. position ``p`` of the rolled map holds token
  ``(p + shift) % L``, and cut into two windows of ``ceil(L / 2)``; on an odd axis the second window
  is the last ``ceil(L / 2)`` rolled positions (the package's documented deviation: no resize).
* :func:`grid_mask` combines per-axis tables over a row-major grid (a pair is allowed iff it is allowed
  on every axis); :func:`with_text` adds the dense text tokens (text queries see every key, grid
  queries see every text key).
"""

from __future__ import annotations

import itertools
import math

import torch

__all__ = ["gna_axis", "msw_axis", "msw_shift", "grid_mask", "with_text", "gna_mask", "msw_mask", "masked_sdpa"]


def gna_axis(length: int, window: int, stride: int = 1, dilation: int = 1) -> list[list[bool]]:
    """``table[q][k]``: may query ``q`` attend to key ``k`` on this axis (NATTEN GNA semantics)."""
    assert 1 <= window and window * dilation <= length and 1 <= stride <= window, (length, window, stride, dilation)
    table = [[False] * length for _ in range(length)]
    for q in range(length):
        group = q % dilation
        members = list(range(group, length, dilation))  # the query's dilation group, in axis positions
        n = len(members)
        i = members.index(q)  # position inside the group
        centre = (i // stride) * stride + stride // 2  # the stride group's centre query ...
        if centre > n - 1:
            centre = n - 1  # ... or the last query of the group
        before = window // 2
        start = centre - before
        if start < 0:
            start = 0
        if start + window > n:
            start = n - window
        for j in range(start, start + window):
            table[q][members[j]] = True
    return table


def msw_shift(length: int, choice: int) -> int:
    """Official shift of one axis for shift multiple ``choice``: ``choice * (ceil(L/2) // 4)``."""
    return choice * (math.ceil(length / 2) // 4)


def msw_axis(length: int, shift: int) -> list[list[bool]]:
    """``table[q][k]`` of MSW-MSA on one axis rolled by ``-shift`` and cut in two windows."""
    w = math.ceil(length / 2)

    def window_of(token):
        p = (token - shift) % length  # where the token sits in the rolled map
        return (0, w) if p < w else (length - w, length)

    table = [[False] * length for _ in range(length)]
    for q in range(length):
        lo, hi = window_of(q)
        for k in range(length):
            table[q][k] = lo <= (k - shift) % length < hi
    return table


def grid_mask(grid, tables) -> torch.Tensor:
    """(N, N) bool over the row-major ``grid`` from one ``table[q][k]`` per axis."""
    cells = list(itertools.product(*(range(g) for g in grid)))
    n = len(cells)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for a, qa in enumerate(cells):
        for b, kb in enumerate(cells):
            if all(t[x][y] for t, x, y in zip(tables, qa, kb)):
                mask[a, b] = True
    return mask


def with_text(mask: torch.Tensor, text_len: int, text_first: bool) -> torch.Tensor:
    """(S, S) bool: the grid ``mask`` plus ``text_len`` dense text tokens before or after the grid."""
    n = mask.shape[0]
    s = n + text_len
    full = torch.ones(s, s, dtype=torch.bool)
    off = text_len if text_first else 0
    full[off : off + n, off : off + n] = mask
    return full


def _per_axis(value, nd):
    return (value,) * nd if isinstance(value, int) else tuple(value)


def gna_mask(grid, window, stride=1, dilation=1) -> torch.Tensor:
    """(N, N) GNA mask over ``grid`` (scalars broadcast to every axis)."""
    nd = len(grid)
    window, stride, dilation = (_per_axis(x, nd) for x in (window, stride, dilation))
    return grid_mask(grid, [gna_axis(*a) for a in zip(grid, window, stride, dilation)])


def msw_mask(grid, choice: int, official_row_rule: bool = True) -> torch.Tensor:
    """(N, N) MSW-MSA mask over a 2-D ``grid`` for shift multiple ``choice`` (0..3). With
    ``official_row_rule`` (the processor's behaviour), as the official: no shift at all when the row
    shift is 0 (maps under 8 rows), even if the column shift is not; without it, each axis its own shift
    (the bare pattern, ``shifted_window_pattern``)."""
    shifts = [msw_shift(g, choice) for g in grid]
    if official_row_rule and shifts[0] == 0:
        shifts = [0, 0]
    return grid_mask(grid, [msw_axis(g, s) for g, s in zip(grid, shifts)])


def masked_sdpa(q, k, v, grid_mask: torch.Tensor, text_len: int = 0, text_first: bool = False,
                key_padding: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention on (B, S, heads, D) tensors with the explicit (B, 1, S, S) boolean mask: ``grid_mask``
    plus dense text (:func:`with_text`), and-ed with ``key_padding`` ((B, S) bool, True = real key)."""
    mask = with_text(grid_mask, text_len, text_first)[None, None].to(q.device)
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
