"""Radial attention's static O(n log n) spatio-temporal energy-decay mask (block level).

Follows ``radial_attn/attn_mask.py::gen_log_mask_shrinked`` of mit-han-lab/radial-attention (@72788d4):
for every latent frame pair ``(i, j)`` with ``dist = |i - j|`` a token-level mask over the flattened
within-frame indices is built, shrunk to 128 x 128 blocks, and OR-ed into the block mask:

* ``dist <= 1``: the whole frame pair (width = tokens per frame ``tpf``);
* otherwise a 1-D diagonal band ``|col - row| <= width`` with
  ``width = max(2**bit_length(tpf) / 2**bit_length(dist) * decay_factor, 128)``;
* diagonal split: with ``decay = 2**bit_length(tpf) / 2**bit_length(dist)`` (no decay factor), when
  ``decay < 128`` the pair is kept only if ``dist % int(128 / decay) == 0``;
* ``sink`` (Wan): pairs with ``j == 0`` are full (attention sink on the first latent frame);
* shrink rule: within a block, a column is "dense" if more than 1/3 of the block's rows attend to it;
  the block is kept iff more than 60% of its non-empty columns are dense. Each frame pair only looks at
  ``ceil(tpf / 128)`` block rows and columns from its first block, as the official code does.

Generalisations (the official code requires the token count to be a multiple of 128 and crashes
otherwise): the last block may be partial, and its column densities are taken relative to the rows that
exist in it; the block diagonal is always kept so that no query is left without keys (for
``tpf >= 43``, every real resolution, the official mask keeps it anyway). For token counts that are a
multiple of 128 and ``tpf >= 43`` the mask is exactly the official one.
"""

from __future__ import annotations

import math

import torch

from .base import BlockPattern

__all__ = ["radial_block_mask", "radial_pattern", "RADIAL_BLOCK"]

RADIAL_BLOCK = 128


def _window_width(dist: int, tpf: int, decay_factor: float, block: int) -> float:
    if dist <= 1:
        return float(tpf)
    decay = 2 ** tpf.bit_length() / 2 ** dist.bit_length() * decay_factor
    return max(decay, float(block))


def _split_keep(dist: int, tpf: int, block: int) -> bool:
    decay = 2 ** tpf.bit_length() / 2 ** dist.bit_length()
    if decay >= block:
        return True
    return dist % int(block / decay) == 0


def _pair_blocks(width, row0, col0, tpf, nbp, block, rows_in_block):
    """Shrunk (nbp, nbp) block mask of one frame pair.

    ``row0`` / ``col0``: global offsets of the two frames; ``width``: band half-width (inf = full);
    ``rows_in_block``: number of real rows of each global block row (the density denominator).
    """
    rb0, cb0 = row0 // block, col0 // block
    c = torch.arange(tpf)
    cblock = (col0 + c) // block - cb0  # pair-local block column of each column
    valid_c = cblock < nbp
    w = tpf if math.isinf(width) else int(math.floor(width))
    keep = torch.zeros(nbp, nbp, dtype=torch.bool)
    for rb in range(nbp):
        g0 = (rb0 + rb) * block
        a = max(g0, row0) - row0  # this frame's rows inside the block, local coordinates [a, b)
        b = min(g0 + block, row0 + tpf) - row0
        if b <= a:
            continue
        n = (torch.minimum(torch.full_like(c, b - 1), c + w) - torch.maximum(torch.full_like(c, a), c - w) + 1).clamp(min=0)
        den = rows_in_block(rb0 + rb)
        high = (3 * n > den) & valid_c
        nonzero = (n > 0) & valid_c
        hi_count = torch.zeros(nbp, dtype=torch.long).index_add_(0, cblock[valid_c], high[valid_c].long())
        nz_count = torch.zeros(nbp, dtype=torch.long).index_add_(0, cblock[valid_c], nonzero[valid_c].long())
        keep[rb] = 5 * hi_count > 3 * nz_count
    return keep


def radial_block_mask(
    frames: int,
    tokens_per_frame: int,
    decay_factor: float = 1.0,
    sink: bool = False,
    block: int = RADIAL_BLOCK,
) -> torch.Tensor:
    """(nb, nb) boolean block mask over ``frames * tokens_per_frame`` video tokens."""
    tpf = int(tokens_per_frame)
    n = frames * tpf
    nb = -(-n // block)
    nbp = (tpf - 1) // block + 1

    def rows_in_block(bi: int) -> int:
        return min(block, n - bi * block)

    out = torch.zeros(nb, nb, dtype=torch.bool)
    cache: dict = {}
    for i in range(frames):
        for j in range(frames):
            dist = abs(i - j)
            if sink and j == 0:
                width = math.inf
            elif _split_keep(dist, tpf, block):
                width = _window_width(dist, tpf, decay_factor, block)
            else:
                continue
            row0, col0 = i * tpf, j * tpf
            # the result depends on the offsets inside a block and on where the (maybe partial) last
            # global block falls in the pair's block range
            key = (width, row0 % block, col0 % block, nb - 1 - row0 // block if row0 // block + nbp >= nb else -1)
            if key not in cache:
                cache[key] = _pair_blocks(width, row0, col0, tpf, nbp, block, rows_in_block)
            blocks = cache[key]
            r0, c0 = row0 // block, col0 // block
            r1, c1 = min(r0 + nbp, nb), min(c0 + nbp, nb)
            out[r0:r1, c0:c1] |= blocks[: r1 - r0, : c1 - c0]
    out |= torch.eye(nb, dtype=torch.bool)
    return out


def radial_pattern(grid: tuple[int, ...], decay_factor: float = 1.0, sink: bool = False, block: int = RADIAL_BLOCK) -> BlockPattern:
    """Radial pattern for a video grid ``(T, H, W)`` (an image grid counts as one frame)."""
    grid = tuple(int(g) for g in grid)
    frames = grid[0] if len(grid) == 3 else 1
    tpf = math.prod(grid[-2:]) if len(grid) >= 2 else grid[0]
    return BlockPattern(grid, radial_block_mask(frames, tpf, decay_factor, sink, block), block)
