"""Attention patterns: who may see whom.

Grid patterns (pure functions of a token grid and the method's parameters): :class:`BoxPattern`
(GNA, shifted windows), :class:`BlockPattern` (radial), :class:`CircularWindow` (CLEAR).
The sequence protocol (:mod:`.mask_mod`): composable ``mask_mod(b, h, q_idx, kv_idx)`` predicates over a
call's whole sequence (grid, text, extra segments) with ``capabilities`` kernels use when present;
dynamic patterns (:mod:`.dynamic`) are resolved per call from q and k.

A new mask shape, two ways:

* a grid pattern class (see :mod:`.circular`): ``grid``, ``allowed_fn(device) -> fn(qi, ki)`` over
  flattened grid indices, ``dense_mask()`` (N x N), ``is_full()``, ``capabilities = frozenset()``; the
  call's pattern is then ``text_dense(p, layout)``;
* a composition of predicates, e.g. ``text_dense(p) & ~heads_in({0}) | in_segment("pooled", "kv")``.

Tile schedules (``Schedule``, ``box_schedule``, ``block_schedule``) are kernel planning: see
:mod:`diffusion_attn.kernels.schedule`. Give every pattern to a kernel as ``as_sequence_pattern(p, layout)``: its ``capabilities`` then say
what a fast kernel may use (``grid_pattern`` for "box" / "block"), ``mask_mod`` and ``dense_mask()``
cover the whole sequence.
"""

from .base import AxisWindows, BlockPattern, BoxPattern
from .circular import CircularWindow, circular_pattern
from .dynamic import BlockChoice, TopKKeyBlocks
from .mask_mod import (
    CAPABILITIES,
    MaskMod,
    and_masks,
    as_mask_mod,
    as_sequence_pattern,
    batch_in,
    grid_mask,
    heads_in,
    in_segment,
    not_mask,
    or_masks,
    sequence_mask,
    text_dense,
)
from .neighborhood import neighborhood_pattern
from .radial import radial_block_mask, radial_pattern
from .shifted_window import shifted_window_pattern

__all__ = [
    "AxisWindows",
    "BlockChoice",
    "BlockPattern",
    "BoxPattern",
    "CAPABILITIES",
    "CircularWindow",
    "MaskMod",
    "TopKKeyBlocks",
    "and_masks",
    "as_mask_mod",
    "as_sequence_pattern",
    "batch_in",
    "circular_pattern",
    "grid_mask",
    "heads_in",
    "in_segment",
    "neighborhood_pattern",
    "not_mask",
    "or_masks",
    "radial_block_mask",
    "radial_pattern",
    "sequence_mask",
    "shifted_window_pattern",
    "text_dense",
]
