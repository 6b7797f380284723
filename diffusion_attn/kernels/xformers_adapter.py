"""Optional xformers backend (CUDA): window-partition patterns as one block-diagonal attention call.

Where it maps cleanly: a pattern with a :class:`~diffusion_attn.kernels.windows.WindowPlan` (blocked
GNA, MSW-MSA) is a set of independent dense problems, one per window -- exactly what
``xformers.ops.memory_efficient_attention`` computes with a ``BlockDiagonalMask``: the windows of every
shape and every batch row are packed into one ``(1, total, heads, head_dim)`` sequence, window ``i``
contributing ``q_i`` queries and ``k_i`` keys (``BlockDiagonalMask.from_seqlens(q_seqlens,
kv_seqlens)``). Unequal windows (clamped borders, odd MSW-MSA sizes) therefore cost one call, not one
per window shape, and text padding is handled without a mask: each window of batch row ``b`` simply
packs only ``b``'s real text keys after its window keys. Text queries attend to the whole sequence
with plain SDPA, as in :func:`~diffusion_attn.kernels.pattern_attention`.

Overlapping windows (sliding / strided GNA, radial) do not map to a block-diagonal bias and are not
supported here. xformers has no CPU kernels: :func:`available` is False without CUDA.
Install: ``pip install "diffusion-attn[xformers]"`` (a build matching your torch).
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch

from ..layout import TokenLayout
from .backend import Backend, available_if
from .windows import WindowPlan, _windows, finish_windows, prepare_window_plan, window_grids, window_partition

__all__ = ["BACKEND", "available", "require", "supports", "xformers_attention"]

INSTALL_HINT = 'pip install "diffusion-attn[xformers]"'


def require():
    """``xformers.ops``; ImportError naming the extra when xformers is missing."""
    try:
        return importlib.import_module("xformers.ops")
    except ImportError as e:
        raise ImportError(f"the 'xformers' backend needs the xformers package: {INSTALL_HINT} ({e})") from e


def available() -> bool:
    """Whether xformers imports and a CUDA device is present (xformers has no CPU kernels)."""
    if not torch.cuda.is_available():
        return False
    try:
        require()
        return True
    except ImportError:
        return False


def supports(pattern, layout: TokenLayout) -> bool:
    """Whether the pattern is a window partition (see :func:`~diffusion_attn.kernels.windows.window_partition`)."""
    return tuple(getattr(pattern, "grid", ())) == tuple(layout.grid) and window_partition(pattern) is not None


def _block_diagonal(xops, q_seqlens, kv_seqlens, device):
    fmha = getattr(xops, "fmha", None) or importlib.import_module("xformers.ops.fmha")
    cls = fmha.BlockDiagonalMask
    if "device" in inspect.signature(cls.from_seqlens).parameters:
        return cls.from_seqlens(q_seqlens, kv_seqlens, device=device)
    return cls.from_seqlens(q_seqlens, kv_seqlens)


def xformers_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: WindowPlan,
    layout: TokenLayout,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`~diffusion_attn.kernels.windows.window_attention` with the windows' attention in one
    ``memory_efficient_attention`` call (same contract and result)."""
    xops = require()
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    txt = layout.text_slice
    kpm, (qg, kg, vg), out, og = window_grids(q, k, v, plan, layout, key_padding_mask)
    text = []  # per batch row: (text keys, text values) actually attended
    for b in range(B):
        tk, tv = k[b, txt], v[b, txt]
        if kpm is not None:
            keep = kpm[b, txt]
            tk, tv = tk[keep], tv[keep]
        text.append((tk, tv))

    q_parts, k_parts, v_parts, q_lens, kv_lens, combos = [], [], [], [], [], plan.shapes
    for combo in combos:
        n = math.prod(g.count for g in combo)
        tq = math.prod(g.q_size for g in combo)
        tk = math.prod(g.k_size for g in combo)
        qw = _windows(qg, combo, "q").reshape(B, n * tq, H, D)
        kw = _windows(kg, combo, "k").reshape(B, n, tk, H, D)
        vw = _windows(vg, combo, "k").reshape(B, n, tk, H, Dv)
        for b in range(B):
            X = text[b][0].shape[0]
            q_parts.append(qw[b])
            if X:
                k_parts.append(torch.cat([kw[b], text[b][0][None].expand(n, X, H, D)], dim=1).reshape(-1, H, D))
                v_parts.append(torch.cat([vw[b], text[b][1][None].expand(n, X, H, Dv)], dim=1).reshape(-1, H, Dv))
            else:
                k_parts.append(kw[b].reshape(-1, H, D))
                v_parts.append(vw[b].reshape(-1, H, Dv))
            q_lens += [tq] * n
            kv_lens += [tk + X] * n
    bias = _block_diagonal(xops, q_lens, kv_lens, q.device)
    packed = xops.memory_efficient_attention(
        torch.cat(q_parts)[None], torch.cat(k_parts)[None], torch.cat(v_parts)[None], attn_bias=bias, scale=scale,
    )[0]  # (total queries, H, Dv)

    pos = 0
    for combo in combos:
        n = math.prod(g.count for g in combo)
        tq = math.prod(g.q_size for g in combo)
        counts = [g.count for g in combo]
        sizes = [g.q_size for g in combo]
        o = packed[pos : pos + B * n * tq].view(B, *counts, *sizes, H, Dv)
        _windows(og, combo, "q").copy_(o)
        pos += B * n * tq
    return finish_windows(out, og, q, k, v, plan, layout, kpm, scale)




def _run(q, k, v, request, prepared, key_padding_mask, scale):
    plan = prepared if prepared is not None else prepare_window_plan(request)
    return xformers_attention(q, k, v, plan, request.layout, key_padding_mask=key_padding_mask, scale=scale)


BACKEND = Backend(
    "xformers", "xformers' memory-efficient attention, window partitions as one block-diagonal call (CUDA; "
    "opt-in)", _run,
    needs=(("partition",),), devices=frozenset({"cuda"}), available=available_if(require), prepare=prepare_window_plan,
)
