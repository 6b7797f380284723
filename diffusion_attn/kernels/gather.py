"""Tiled gather + SDPA: the portable fast path (CPU and GPU, any sequence length).

For each bucket of a :class:`~diffusion_attn.kernels.schedule.Schedule` the query tiles and the keys they need
are gathered into a batch of small dense problems and handed to SDPA, with a per-tile boolean mask only
where a tile is not fully dense. Extra dense keys (text tokens) are appended to every tile's keys, which
is exactly NATTEN's ``additional_keys`` semantics (one softmax over window keys and extra keys). Work is
chunked so the gathered keys stay under ``max_chunk_bytes``; nothing of size N x N is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import Backend
from .capabilities import grid_pattern_of
from .reference import text_query_attention
from .schedule import Schedule

__all__ = ["BACKEND", "gather_attention", "grid_with_text"]


def gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    schedule: Schedule,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_valid: torch.Tensor | None = None,
    scale: float | None = None,
    max_chunk_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """Attention of grid queries over grid keys (by ``schedule``) plus optional extra dense keys.

    ``q, k, v``: (B, N, heads, head_dim) grid tokens only. ``extra_k/v``: (B, X, heads, head_dim).
    ``extra_valid``: (B, X) bool, False for padded extra keys. Returns (B, N, heads, head_dim).
    """
    B, N, H, D = q.shape
    out = q.new_empty(B, N, H, v.shape[-1])
    X = 0 if extra_k is None else extra_k.shape[1]
    if extra_k is not None:
        ek = extra_k.permute(0, 2, 1, 3)[:, None]  # (B, 1, H, X, D)
        ev = extra_v.permute(0, 2, 1, 3)[:, None]
    qh, kh, vh = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # (B, H, N, D) views
    for bucket in schedule.buckets:
        G, tq = bucket.qidx.shape
        tk = bucket.kidx.shape[1]
        per_tile = B * H * (tk + X) * D * q.element_size() * 2
        chunk = max(1, min(G, max_chunk_bytes // max(per_tile, 1)))
        for g0 in range(0, G, chunk):
            g1 = min(G, g0 + chunk)
            g = g1 - g0
            qi, ki = bucket.qidx[g0:g1], bucket.kidx[g0:g1]
            qg = qh[:, :, qi].permute(0, 2, 1, 3, 4)  # (B, g, H, tq, D)
            kg = kh[:, :, ki].permute(0, 2, 1, 3, 4)  # (B, g, H, tk, D)
            vg = vh[:, :, ki].permute(0, 2, 1, 3, 4)
            if X:
                kg = torch.cat([kg, ek.expand(B, g, H, X, D)], dim=3)
                vg = torch.cat([vg, ev.expand(B, g, H, X, ev.shape[-1])], dim=3)
            mask = bucket.mask(g0, g1)  # (g, tq, tk) or None
            if mask is not None or extra_valid is not None:
                if mask is None:
                    mask = torch.ones(g, tq, tk, dtype=torch.bool, device=q.device)
                mask = mask.to(q.device)[None, :, None]  # (1, g, 1, tq, tk)
                if X:
                    ext = torch.ones(B, 1, 1, 1, X, dtype=torch.bool, device=q.device)
                    if extra_valid is not None:
                        ext = extra_valid.bool()[:, None, None, None, :]
                    mask = torch.cat([mask.expand(B, g, 1, tq, tk), ext.expand(B, g, 1, tq, X)], dim=-1)
                mask = mask.expand(B, g, 1, tq, tk + X).reshape(B * g, 1, tq, tk + X)
            o = F.scaled_dot_product_attention(
                qg.reshape(B * g, H, tq, D),
                kg.reshape(B * g, H, tk + X, D),
                vg.reshape(B * g, H, tk + X, vg.shape[-1]),
                attn_mask=mask,
                scale=scale,
            )
            out[:, qi] = o.view(B, g, H, tq, -1).permute(0, 1, 3, 2, 4)
    return out


def grid_with_text(q, k, v, layout, key_padding_mask, scale, grid_kernel):
    """A grid kernel's contract (grid queries over grid keys plus the text keys as extra dense keys)
    applied to a whole sequence: ``grid_kernel(q_img, k_img, v_img, extra_k=, extra_v=, extra_valid=,
    scale=)`` for the grid queries, plain SDPA for the text queries."""
    img, txt = layout.image_slice, layout.text_slice
    has_text = layout.text_len > 0
    out_img = grid_kernel(
        q[:, img], k[:, img], v[:, img],
        extra_k=k[:, txt] if has_text else None,
        extra_v=v[:, txt] if has_text else None,
        extra_valid=None if key_padding_mask is None else key_padding_mask[:, txt],
        scale=scale,
    )
    if not has_text:
        return out_img
    out_txt = text_query_attention(q, k, v, layout, key_padding_mask, scale)
    parts = [out_txt, out_img] if layout.text_position == "first" else [out_img, out_txt]
    return torch.cat(parts, dim=1)


def _prepare(request):
    from .tiling import build_schedule

    return build_schedule(grid_pattern_of(request.pattern)).to(request.device or "cpu")


def grid_backend_run(prepare, attention):
    """A backend's ``run`` for a grid kernel: ``attention(q, k, v, plan, **kw)`` on the grid part, the
    text handled by :func:`grid_with_text`; ``plan`` is the prepared artefact (or ``prepare(request)``)."""

    def run(q, k, v, request, prepared, key_padding_mask, scale):
        plan = prepared if prepared is not None else prepare(request)
        return grid_with_text(q, k, v, request.layout, key_padding_mask, scale,
                              lambda *a, **kw: attention(*a, plan, **kw))

    return run


_run = grid_backend_run(_prepare, gather_attention)


BACKEND = Backend(
    "gather", "tiled gather + SDPA: box and block patterns, any device, any length", _run,
    needs=(("box",), ("block",)), handles=frozenset({"refined"}), prepare=_prepare, auto=lambda r: True,
)
