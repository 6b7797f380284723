"""Kernels: how a pattern is computed. Every kernel is tested against :func:`masked_attention`."""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from .gather import gather_attention
from .reference import full_mask, masked_attention, sdpa
from .tiling import build_schedule, choose_tiles

__all__ = [
    "BACKENDS",
    "build_schedule",
    "choose_backend",
    "choose_tiles",
    "full_mask",
    "gather_attention",
    "masked_attention",
    "pattern_attention",
    "sdpa",
]

#: ``auto`` picks one of the others: ``dense`` (plain SDPA, only for a pattern that allows everything),
#: ``reference`` (SDPA with the full boolean mask; small sequences) or ``gather`` (tiled gather + SDPA).
BACKENDS = ("auto", "gather", "reference", "dense")

#: Below this many tokens the masked dense call is cheaper than gathering tiles.
SMALL_SEQUENCE = 2048


def choose_backend(pattern, layout: TokenLayout, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if pattern.is_full():
        return "dense"
    if backend == "dense":
        raise ValueError("backend='dense' ignores the pattern; it is only valid when the pattern is full")
    if backend != "auto":
        return backend
    return "reference" if layout.num_tokens <= SMALL_SEQUENCE else "gather"


def pattern_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    layout: TokenLayout,
    *,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    schedule=None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over a sequence laid out as ``layout`` (grid + text), restricted by ``pattern`` on the grid.

    ``q, k, v``: (B, S, heads, head_dim), ``S = layout.num_tokens``. Text queries attend to every key,
    grid queries to their pattern's grid keys and to every text key. ``key_padding_mask`` (B, S) bool,
    True = real token; only text tokens may be padded. ``schedule``: a prebuilt schedule for ``pattern``
    on ``q.device`` (callers cache it per layout).
    """
    if q.shape[1] != layout.num_tokens or k.shape[1] != layout.num_tokens:
        raise ValueError(f"sequence length {q.shape[1]} does not match the layout {layout.describe()} ({layout.num_tokens} tokens)")
    kpm = None if key_padding_mask is None else key_padding_mask.bool()
    if kpm is not None and not bool(kpm[:, layout.image_slice].all()):
        raise ValueError("key_padding_mask may only mask text tokens")
    if kpm is not None and bool(kpm.all()):
        kpm = None
    chosen = choose_backend(pattern, layout, backend)
    if chosen == "dense":
        return sdpa(q, k, v, None if kpm is None else kpm[:, None, None, :], scale)
    if chosen == "reference":
        return masked_attention(q, k, v, pattern.dense_mask(), layout, kpm, scale)
    img, txt = layout.image_slice, layout.text_slice
    if schedule is None:
        schedule = build_schedule(pattern).to(q.device)
    has_text = layout.text_len > 0
    out_img = gather_attention(
        q[:, img], k[:, img], v[:, img], schedule,
        extra_k=k[:, txt] if has_text else None,
        extra_v=v[:, txt] if has_text else None,
        extra_valid=None if kpm is None else kpm[:, txt],
        scale=scale,
    )
    if not has_text:
        return out_img
    out_txt = sdpa(q[:, txt], k, v, None if kpm is None else kpm[:, None, None, :], scale)
    parts = [out_txt, out_img] if layout.text_position == "first" else [out_img, out_txt]
    return torch.cat(parts, dim=1)
