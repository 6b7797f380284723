"""Compiled FlexAttention: block-sparse attention that skips the blocks a pattern masks out.

PyTorch's ``flex_attention`` (compiled with ``torch.compile``; a C++ kernel on CPU, Triton on GPU) visits
only the (query block, key block) pairs listed in a :class:`~torch.nn.attention.flex_attention.BlockMask`:
*full* blocks run unmasked, *partial* blocks evaluate a ``mask_mod`` per element. This module turns a
pattern and a :class:`~diffusion_attn.TokenLayout` into that BlockMask (built from block-level counts,
never from an S x S tensor for block patterns) and runs the compiled kernel.

Costs that are paid once: the BlockMask per layout (cached by the caller, like schedules) and the
compile per sequence shape (tens of seconds on CPU; ``torch.compile`` keeps it for the process). A
missing C++ compiler or an unsupported platform makes :func:`flex_available` false, and the automatic
backend choice then falls back to the gather kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..patterns.base import BlockPattern
from .backend import Backend
from .capabilities import grid_pattern_of, sequence_mask_mod
from .reference import SMALL_SEQUENCE

__all__ = ["BACKEND", "FLEX_BLOCK", "FLEX_MIN_TOKENS", "flex_available", "flex_block_mask", "flex_attention_call",
           "block_occupancy", "sequence_mask_mod"]

FLEX_BLOCK = 128

#: From this many tokens ``auto`` sends block patterns to compiled FlexAttention (its compile, ~15-60 s per
#: shape on CPU, is paid once per process and layout; below this the gather kernel is as fast).
FLEX_MIN_TOKENS = 8192

#: compiled variants kept per process; each new sequence shape compiles once
_RECOMPILE_LIMIT = 64


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError as e:  # torch < 2.5
        raise RuntimeError(f"FlexAttention needs torch >= 2.5 ({e})") from None
    return fa


@functools.lru_cache(maxsize=None)
def _compiled():
    fa = _flex_module()
    return torch.compile(fa.flex_attention, dynamic=False)


@functools.lru_cache(maxsize=None)
def flex_available(device_type: str = "cpu") -> bool:
    """Whether compiled FlexAttention runs on this device type (compiles one tiny call, once per process)."""
    try:
        fa = _flex_module()
        q = torch.randn(1, 1, 2 * FLEX_BLOCK, 16, device=device_type)
        bm = fa.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[2], q.shape[2], device=device_type)
        out = flex_attention_call(q, q, q, bm)
        return bool(torch.isfinite(out).all())
    except Exception:  # no C++ compiler, unsupported device, ...
        return False


def _sequence_index(layout: TokenLayout) -> tuple[int, int]:
    """(first image token, image token count) in the sequence."""
    return layout.image_slice.start, layout.num_image


def block_occupancy(pattern, layout: TokenLayout, block: int = FLEX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all): (nq, nk) booleans over ``block`` x ``block`` tiles of the whole sequence -- does the
    tile hold at least one allowed pair, and are all its (in-range) pairs allowed.

    Block patterns are coarsened exactly from their block mask (cheap). Other patterns are evaluated
    elementwise in row chunks (S^2 work, O(block * S) memory).
    """
    S = layout.num_tokens
    nb = -(-S // block)
    if isinstance(pattern, BlockPattern):
        return _coarsen_block_pattern(pattern, layout, block, nb)
    off, n = _sequence_index(layout)
    keys = torch.arange(S)
    any_, all_ = torch.zeros(nb, nb, dtype=torch.bool), torch.zeros(nb, nb, dtype=torch.bool)
    pad = nb * block - S
    rows_per_chunk = max(1, (1 << 22) // max(S, 1) // block) * block
    mod = sequence_mask_mod(pattern, layout)
    for r0 in range(0, S, rows_per_chunk):
        rows = torch.arange(r0, min(S, r0 + rows_per_chunk))
        m = mod(None, None, rows[:, None], keys[None, :])  # (r, S)
        r = rows.numel()
        rpad = (-r) % block
        any_m = torch.nn.functional.pad(m, (0, pad, 0, rpad), value=False)
        all_m = torch.nn.functional.pad(m, (0, pad, 0, rpad), value=True)
        rb = (r + rpad) // block
        b0 = r0 // block
        any_[b0 : b0 + rb] = any_m.view(rb, block, nb, block).any(3).any(1)
        all_[b0 : b0 + rb] = all_m.view(rb, block, nb, block).all(3).all(1)
    return any_, all_


def _coarsen_block_pattern(pattern: BlockPattern, layout: TokenLayout, block: int, nb: int):
    """Exact tile occupancy from the pattern's block mask: a sequence tile overlaps a few pattern blocks;
    it is non-empty if any overlapped pair is kept and full if all are (text parts are always allowed)."""
    S = layout.num_tokens
    off, n = _sequence_index(layout)
    pos = torch.arange(S) - off
    img = (pos >= 0) & (pos < n)
    pblock = torch.where(img, pos.clamp(0, n - 1) // pattern.block_size, -1)
    npb = pattern.block_mask.shape[0]
    overlap = torch.zeros(nb, npb + 1)  # last column collects text tokens
    tile = torch.arange(S) // block
    overlap[tile, torch.where(img, pblock, npb)] = 1.0
    has_text = overlap[:, npb] > 0
    o = overlap[:, :npb]
    kept = o @ pattern.block_mask.float() @ o.T  # overlapped kept pattern-block pairs
    total = o.sum(1)[:, None] * o.sum(1)[None, :]
    any_ = (kept > 0) | has_text[:, None] | has_text[None, :]
    all_ = kept == total
    return any_, all_


def flex_block_mask(pattern, layout: TokenLayout, *, key_padding_mask: torch.Tensor | None = None, device=None,
                    occupancy: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = FLEX_BLOCK):
    """The BlockMask of ``pattern`` on ``layout``. ``occupancy``: a cached :func:`block_occupancy` result.

    Without key padding the mask is batch-independent and can be cached per layout; with it, the text
    column tiles become partial and the ``mask_mod`` reads the padding, so it is built per call (cheap
    once the occupancy is cached)."""
    fa = _flex_module()
    any_, all_ = occupancy if occupancy is not None else block_occupancy(pattern, layout, block)
    if key_padding_mask is not None:  # text columns then need the per-element mask
        txt = torch.zeros(any_.shape[1], dtype=torch.bool)
        ts = layout.text_slice
        if layout.text_len:
            txt[ts.start // block : -(-ts.stop // block)] = True
        all_ = all_ & ~txt[None, :]
    partial = any_ & ~all_
    full = all_

    def indices(m):
        counts = m.sum(-1).to(torch.int32)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None].to(device), order[None, None].to(device)

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    S = layout.num_tokens
    kpm = None if key_padding_mask is None else key_padding_mask.bool().to(device)
    return fa.BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
        mask_mod=sequence_mask_mod(pattern, layout, kpm, device), seq_lengths=(S, S),
    )


def flex_attention_call(q, k, v, block_mask, scale: float | None = None) -> torch.Tensor:
    """Compiled flex attention on (B, heads, S, head_dim) tensors."""
    fa = _compiled()
    from torch._dynamo import config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    with dynamo_config.patch(**{name: max(getattr(dynamo_config, name), _RECOMPILE_LIMIT)}):
        return fa(q, k, v, block_mask=block_mask, scale=scale)




@dataclass
class FlexPrepared:
    """What the flex backend keeps per layout: the tile occupancy and the BlockMask without padding (a
    padded call builds its own from the occupancy). ``as_given``: a BlockMask handed in by the caller,
    used as it is."""

    occupancy: tuple | None
    block_mask: object
    as_given: bool = False


def _available(device_type: str):
    if flex_available(device_type):
        return None
    return (f"backend='flex' needs torch.compile to work on {device_type} (torch >= 2.5 and, on CPU, "
            "a C++ compiler)")


def _check(request):
    if request.requires_grad and request.device_type == "cpu":  # torch raises NotImplementedError
        return "backend='flex' has no backward on CPU (FlexAttention's own limit); inputs that require grad need another backend"
    return None


def _prepare(request):
    pattern = grid_pattern_of(request.pattern) or request.pattern
    occupancy = block_occupancy(pattern, request.layout)
    return FlexPrepared(occupancy, flex_block_mask(pattern, request.layout, device=request.device, occupancy=occupancy))


def _run(q, k, v, request, prepared, key_padding_mask, scale):
    pattern = grid_pattern_of(request.pattern) or request.pattern
    if prepared is None:
        block_mask = flex_block_mask(pattern, request.layout, key_padding_mask=key_padding_mask, device=q.device)
    elif prepared.as_given or key_padding_mask is None:
        block_mask = prepared.block_mask
    else:  # padding: the text columns become partial tiles; cheap from the cached occupancy
        block_mask = flex_block_mask(pattern, request.layout, key_padding_mask=key_padding_mask, device=q.device,
                                     occupancy=prepared.occupancy)
    out = flex_attention_call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask, scale)
    return out.transpose(1, 2)


def _auto(request) -> bool:
    caps = request.capabilities
    if "block" in caps:
        return request.num_tokens >= FLEX_MIN_TOKENS
    return "box" not in caps and request.num_tokens > SMALL_SEQUENCE  # generic patterns: no tiled kernel


BACKEND = Backend(
    "flex", "compiled FlexAttention, which skips masked blocks (any pattern with a mask; auto: block patterns "
    f"from {FLEX_MIN_TOKENS} tokens, generic ones past {SMALL_SEQUENCE})", _run,
    handles=frozenset({"dynamic", "refined"}), available=_available, check=_check, prepare=_prepare, auto=_auto,
)
