"""The oracle: dense SDPA with the pattern's full boolean mask. Small sizes only (builds S x S)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from .backend import Backend

__all__ = ["BACKEND", "check_inputs", "full_mask", "masked_attention", "sdpa", "text_query_attention"]

#: ``auto`` uses the reference up to this many tokens (below it the masked dense call is cheaper than
#: gathering tiles).
SMALL_SEQUENCE = 2048


def check_inputs(q, k, layout: TokenLayout, key_padding_mask=None):
    """The checks every kernel entry shares: q / k lengths match ``layout``; ``key_padding_mask``
    (B, S) bool (True = real token) masks text tokens only. Returns the mask on ``q.device``, or None
    when absent or all True."""
    if q.shape[1] != layout.num_tokens or k.shape[1] != layout.num_tokens:
        raise ValueError(f"sequence length {q.shape[1]} does not match the layout {layout.describe()} ({layout.num_tokens} tokens)")
    if key_padding_mask is None:
        return None
    kpm = key_padding_mask.to(q.device).bool()
    if not bool(kpm[:, layout.image_slice].all()):
        raise ValueError("key_padding_mask may only mask text tokens")
    return None if bool(kpm.all()) else kpm


def sdpa(q, k, v, mask=None, scale=None):
    """SDPA in the diffusers layout ``(B, S, heads, head_dim)``; ``mask`` broadcasts to (B, heads, Sq, Sk)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def text_query_attention(q, k, v, layout: TokenLayout, key_padding_mask=None, scale=None):
    """The text tokens' rows: every text query attends to every (unpadded) key. (B, text_len, heads, D)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return sdpa(q[:, layout.text_slice], k, v, mask, scale)


def full_mask(grid_mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Embed an (N_img, N_img) grid mask into the (S, S) mask of the whole sequence: text rows and
    columns are dense."""
    s = layout.num_tokens
    out = torch.ones(s, s, dtype=torch.bool, device=grid_mask.device)
    img = layout.image_slice
    out[img, img] = grid_mask
    return out


def masked_attention(q, k, v, grid_mask, layout: TokenLayout, key_padding_mask=None, scale=None):
    """Reference attention: dense SDPA over the whole sequence with the pattern's mask.

    ``key_padding_mask`` (B, S) bool, True = real token (diffusers' text padding), applies to every query.
    """
    mask = full_mask(grid_mask.to(q.device), layout)[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    return sdpa(q, k, v, mask, scale)


def _run(q, k, v, request, prepared, key_padding_mask, scale):
    from .capabilities import grid_pattern_of, sequence_dense_mask
    from .chunked import chunked_attention

    pattern, layout = request.pattern, request.layout
    grid = grid_pattern_of(pattern)
    if grid is not None:  # box / block: the grid mask, text dense
        return masked_attention(q, k, v, grid.dense_mask(), layout, key_padding_mask, scale)
    if not request.capabilities & {"head_dependent", "batch_dependent"} and hasattr(pattern, "dense_mask"):
        mask = sequence_dense_mask(pattern, layout).to(q.device)[None, None]
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, None, :].bool()
        return sdpa(q, k, v, mask, scale)
    # a head- or batch-dependent predicate: its mask rows, in one chunk
    return chunked_attention(q, k, v, request, key_padding_mask, scale, max_rows=layout.num_tokens)


BACKEND = Backend(
    "reference", "SDPA with the pattern's full boolean mask (S x S; the oracle, small sequences)", _run,
    handles=frozenset({"head_dependent", "batch_dependent", "dynamic", "refined"}),
    auto=lambda r: r.num_tokens <= SMALL_SEQUENCE,
)
