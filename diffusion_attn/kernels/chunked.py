"""The ``chunked`` backend: the reference computed a chunk of query rows at a time, for any pattern.

For patterns no fast kernel runs (a head-dependent predicate, anything with only a ``mask_mod`` or a
dense mask) at sizes where an S x S mask is too large: per chunk of queries the
pattern's mask rows are evaluated (``mask_mod`` over sequence indices, or rows of a grid pattern's
predicate) and SDPA runs with that boolean mask over every key. Memory per chunk: the chunk's rows of
the mask and of the scores, bounded by ``max_chunk_bytes``; nothing S x S is ever built -- except for a
pattern that has nothing but ``dense_mask()`` (then its boolean S x S mask, built once per layout by
``prepare``). Compute is dense (S^2); it is correct everywhere, fast nowhere.
"""

from __future__ import annotations

import torch

from .backend import Backend
from .capabilities import capabilities_of, sequence_dense_mask, sequence_mask_mod
from .reference import sdpa

__all__ = ["BACKEND", "chunked_attention"]


def _needs_dense(pattern) -> bool:
    """Whether the pattern has nothing but ``dense_mask()`` (no sequence predicate, no grid predicate)."""
    return "mask_mod" not in capabilities_of(pattern) and not hasattr(pattern, "allowed_fn")


def chunked_attention(q, k, v, request, key_padding_mask=None, scale=None, *, dense=None,
                      max_chunk_bytes: int = 64 * 2**20, max_rows: int | None = None) -> torch.Tensor:
    """Attention of ``q, k, v`` (B, S, heads, D) by ``request.pattern`` on ``request.layout``, chunk by
    chunk of query rows. ``dense``: the (S, S) mask of a pattern with nothing but ``dense_mask()``
    (built here when needed). ``key_padding_mask`` (B, S), True = real token."""
    pattern, layout, caps = request.pattern, request.layout, request.capabilities
    B, S, H, _ = q.shape
    dev = q.device
    if dense is None and _needs_dense(pattern):
        dense = sequence_dense_mask(pattern, layout)
    mod = None if dense is not None else sequence_mask_mod(pattern, layout, device=dev)
    if dense is not None:
        dense = dense.to(dev)
    b = torch.arange(B, device=dev)[:, None, None, None] if "batch_dependent" in caps else None
    h = torch.arange(H, device=dev)[None, :, None, None] if "head_dependent" in caps else None
    keys = torch.arange(S, device=dev)
    kpm = None if key_padding_mask is None else key_padding_mask.to(dev).bool()[:, None, None, :]
    # per query row: scores and the float mask SDPA makes of the boolean one (B * H * S floats each)
    rows = max(1, max_chunk_bytes // max(1, B * H * S * 8))
    if max_rows is not None:
        rows = max(rows, max_rows)
    out = q.new_empty(B, S, H, v.shape[-1])
    for r0 in range(0, S, rows):
        r = torch.arange(r0, min(S, r0 + rows), device=dev)
        if dense is not None:
            m = dense[r][None, None]
        else:
            m = mod(b, h, r[None, None, :, None], keys[None, None, None, :])
        if kpm is not None:
            m = m & kpm
        out[:, r0 : r0 + r.numel()] = sdpa(q[:, r0 : r0 + r.numel()], k, v, m, scale)
    return out


def _prepare(request):
    return sequence_dense_mask(request.pattern, request.layout) if _needs_dense(request.pattern) else None


def _run(q, k, v, request, prepared, key_padding_mask, scale):
    return chunked_attention(q, k, v, request, key_padding_mask, scale, dense=prepared)


BACKEND = Backend(
    "chunked", "the reference by chunks of query rows (any pattern, any size; dense compute)", _run,
    handles=frozenset({"head_dependent", "batch_dependent", "dynamic", "refined"}),
    prepare=_prepare, auto=lambda r: True,
)
