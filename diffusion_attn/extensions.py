"""Attention beyond a mask: the four named extension points of a processor's attention core.

A pattern says *who may see whom* among the same q, k, v. Several methods need more than that; they
plug in at one of these points of :meth:`diffusion_attn.processors.PatternProcessor.core`, in this order:

1. **Token reduction** (:class:`TokenReduction`): q, k, v are reduced before attention and the output
   is restored after it -- token merging (ToMe / AgentSD), proxy tokens (PT-DiT), pooled queries.
   Processor hook: ``reduce(q, k, v, layout) -> (q, k, v, layout, restore)``.
2. **Extra key/value segments** (:class:`KVSegment`): keys the sequence does not have -- CLEAR's
   pooled keys, a reference image's keys (IR-Diffusion, AlignedGen). Each segment says which queries
   see it; the softmax runs over the pattern's keys and the segment's keys together. The two parts are
   computed separately and merged exactly by their log-sum-exp (:func:`merge_by_lse`), so the pattern
   part keeps its own kernel. Processor hook: ``extra_kv(q, k, v, layout) -> list[KVSegment]``.
3. **Per-head output blend** (:func:`head_blend`): the output of some heads moves toward another
   output -- SoftPAG's blend toward identity attention (:func:`identity_attention`, the output each
   query would get attending only to itself). Processor hook: ``blend(out, q, k, v, layout) -> out``.
4. **Batch branches** (:func:`run_branches`): the batch is split into named parts that each run their
   own core -- FreeSwim's window and full branches in one batch, or a CFG half. Processor hook:
   ``branches(batch_size) -> list[(name, size)] | None`` and ``branch_core(name)``.

Each hook's default does nothing, so a processor that overrides none is exactly the pattern core.
Everything here is plain tensor code in the diffusers layout ``(B, S, heads, head_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["KVSegment", "TokenReduction", "PairMerge", "attention_with_lse", "head_blend", "identity_attention",
           "merge_by_lse", "run_branches", "with_kv_segments"]


# ------------------------------------------------------------------------------------------------------
# log-sum-exp pieces
# ------------------------------------------------------------------------------------------------------
def attention_with_lse(q, k, v, mask=None, scale=None):
    """Attention in the diffusers layout that also returns each query's log-sum-exp:
    ``(out (B, Sq, H, Dv), lse (B, H, Sq) float32)``. ``mask``: bool, broadcastable to (B, H, Sq, Sk).
    A query with no allowed key gets out = 0 and lse = -inf (it then contributes nothing to a merge)."""
    from .kernels.strips import attention_lse

    out, lse = attention_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale)
    if mask is not None:
        empty = ~mask.expand(*lse.shape, mask.shape[-1]).any(-1)  # (B, H, Sq)
        if bool(empty.any()):
            lse = lse.masked_fill(empty, float("-inf"))
            out = out.masked_fill(empty[..., None], 0.0)
    return out.transpose(1, 2), lse


def merge_by_lse(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over the union of disjoint key sets, from each set's ``(out (B, S, H, D), lse (B, H, S))``:
    ``out = sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i``. Exact; -inf parts drop out."""
    lses = torch.stack([lse for _, lse in parts])  # (P, B, H, S)
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).nan_to_num(0.0)  # a query no part covers: all zero
    out = sum(w.transpose(1, 2)[..., None] * o.float() for w, (o, _) in zip(weights, parts))
    return out.to(parts[0][0].dtype)


# ------------------------------------------------------------------------------------------------------
# 2. extra key/value segments
# ------------------------------------------------------------------------------------------------------
@dataclass
class KVSegment:
    """Keys/values appended to the attention of a call.

    ``k`` (B, Sk, H, D), ``v`` (B, Sk, H, Dv). ``visible``: which queries see the segment: None (all),
    a (Sq,) or (B, Sq) bool tensor, or a (Sq, Sk) / (B, H, Sq, Sk) bool mask for finer control.
    """

    name: str
    k: torch.Tensor
    v: torch.Tensor
    visible: torch.Tensor | None = None

    def mask(self, num_queries: int) -> torch.Tensor | None:
        """The segment's (B|1, H|1, Sq, Sk) boolean mask, or None when every query sees every key."""
        m = self.visible
        if m is None:
            return None
        if m.ndim == 1:  # (Sq,)
            return m[None, None, :, None]
        if m.ndim == 2 and m.shape == (self.k.shape[0], num_queries) and m.shape[1] != self.k.shape[1]:
            return m[:, None, :, None]  # (B, Sq)
        if m.ndim == 2:  # (Sq, Sk)
            return m[None, None]
        return m


def with_kv_segments(main: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, segments: Sequence[KVSegment],
                     scale: float | None = None) -> torch.Tensor:
    """The output of attending to the pattern's keys (``main = (out, lse)``) and to ``segments``, as one
    softmax over all of them."""
    parts = [main]
    for seg in segments:
        if seg.k.shape[0] != q.shape[0] or seg.k.shape[2] != q.shape[2]:
            raise ValueError(f"KV segment {seg.name!r} has batch/heads {tuple(seg.k.shape[::2])}, the queries "
                             f"{(q.shape[0], q.shape[2])}")
        parts.append(attention_with_lse(q, seg.k, seg.v, seg.mask(q.shape[1]), scale))
    return merge_by_lse(parts)


# ------------------------------------------------------------------------------------------------------
# 3. per-head blend
# ------------------------------------------------------------------------------------------------------
def identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output of attention whose map is the identity (each query attends only to its own key): ``v``.
    PAG / SoftPAG perturb toward it. Needs as many queries as keys."""
    if q.shape[1] != v.shape[1]:
        raise ValueError(f"identity attention needs as many queries as keys, got {q.shape[1]} and {v.shape[1]}")
    return v


def head_blend(out: torch.Tensor, other: torch.Tensor, weight) -> torch.Tensor:
    """``(1 - w_h) * out + w_h * other`` per head ``h``. ``weight``: a scalar, or (H,) with one weight per
    head (0 keeps a head as it is, 1 replaces it). ``out``, ``other``: (B, S, H, D)."""
    w = torch.as_tensor(weight, dtype=torch.float32, device=out.device)
    if w.ndim == 1:
        if w.numel() != out.shape[2]:
            raise ValueError(f"head_blend: {w.numel()} weights for {out.shape[2]} heads")
        w = w[None, None, :, None]
    elif w.ndim != 0:
        raise ValueError(f"head_blend: weight must be a scalar or one value per head, got shape {tuple(w.shape)}")
    return ((1 - w) * out.float() + w * other.float()).to(out.dtype)


# ------------------------------------------------------------------------------------------------------
# 1. token reduction
# ------------------------------------------------------------------------------------------------------
class TokenReduction:
    """Reduce q, k, v before the core and restore the core's output after it.

    Subclasses implement ``reduce(q, k, v, layout) -> (q, k, v, layout)`` and ``restore(out) -> out``
    (the state between the two lives on the instance for one call). A reduction may drop queries only,
    keys only (pooled KV) or both (merged tokens)."""

    def reduce(self, q, k, v, layout):
        raise NotImplementedError

    def restore(self, out):
        raise NotImplementedError


class PairMerge(TokenReduction):
    """An example reduction (not a method): the grid tokens are averaged in consecutive pairs along the
    flattened grid (q, k, v), attention runs on the half-length grid with text untouched, and each
    output is copied back to both tokens of its pair. Needs an even number of grid tokens in a 1-D grid
    or an even last axis."""

    def reduce(self, q, k, v, layout):
        from .layout import TokenLayout

        if layout.grid[-1] % 2:
            raise ValueError(f"PairMerge needs an even last grid axis, got {layout.describe()}")
        img = layout.image_slice
        self._layout = layout

        def merge(t):
            g = t[:, img]
            merged = g.unflatten(1, (-1, 2)).mean(2)
            parts = [t[:, :img.start], merged, t[:, img.stop:]]
            return torch.cat(parts, 1)

        grid = layout.grid[:-1] + (layout.grid[-1] // 2,)
        return merge(q), merge(k), merge(v), TokenLayout(grid, layout.text_len, layout.text_position)

    def restore(self, out):
        layout = self._layout
        n = layout.num_image // 2
        start = layout.image_slice.start
        img = out[:, start:start + n].repeat_interleave(2, dim=1)
        return torch.cat([out[:, :start], img, out[:, start + n:]], 1)


# ------------------------------------------------------------------------------------------------------
# 4. batch branches
# ------------------------------------------------------------------------------------------------------
def run_branches(q, k, v, branches: Sequence[tuple[str, int]], core: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
    """Split the batch into consecutive named parts ``[(name, size), ...]`` and run ``core(name, q, k, v)``
    on each; the outputs are joined back in order. The sizes must add up to the batch."""
    sizes = [size for _, size in branches]
    if sum(sizes) != q.shape[0] or any(s <= 0 for s in sizes):
        raise ValueError(f"branches {list(branches)} do not split a batch of {q.shape[0]}")
    outs = [core(name, qi, ki, vi) for (name, _), qi, ki, vi in
            zip(branches, q.split(sizes), k.split(sizes), v.split(sizes))]
    return torch.cat(outs, 0)
