"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): ``attn1`` is video self-attention, ``attn2`` cross-attention."""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from .base import Family, call_info, first_tensor, grid_from_latent


#: the denoiser's attention kwargs, and the keys of them the model (or diffusers' attention modules, quietly)
#: takes itself
_CALL_KWARGS = "attention_kwargs"
_MODEL_KEYS = ("scale",)


def _read_call(model, args, kwargs):
    hidden = first_tensor(args, kwargs, "hidden_states", 0)
    return dict(**call_info(kwargs, _CALL_KWARGS, _MODEL_KEYS, forwarded=False),
                grid=grid_from_latent(hidden.shape, model.config.patch_size), text_len=0,
                batch_size=hidden.shape[0], timestep=first_tensor(args, kwargs, "timestep", 1))


def _layers(model):
    return [(f"blocks.{i}.attn1.processor", i) for i in range(len(model.blocks))]


def _rope(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _run(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, temb=None):
    if encoder_hidden_states is not None:
        raise ValueError("pattern processors replace Wan self-attention (attn1) only, not cross-attention")
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if rotary is not None:
        q, k = _rope(q, *rotary), _rope(k, *rotary)
    layout = TokenLayout(proc.context.grid, 0)
    out = proc.core(q, k, v, layout, attention_mask).flatten(2, 3).type_as(q)
    return attn.to_out[1](attn.to_out[0](out))


WAN = Family("wan", ("WanTransformer3DModel",), _read_call, _layers, _run,
             "Wan 2.1 / 2.2 T2V (both experts of 2.2): video self-attention")
