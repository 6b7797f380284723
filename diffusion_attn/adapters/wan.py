"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): ``attn1`` is video self-attention, ``attn2`` cross-attention.

Pattern processors replace ``attn1`` (:func:`_layers`). A processor with a ``cross_core(q, k, v,
attention_mask)`` method may also be installed on ``attn2`` (:func:`cross_layers`; FreeSwim's
cross-attention override): :func:`_run` then computes the stock cross-attention (I2V image context
included) and delegates only the text attention core to it.
"""

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


def cross_layers(model):
    """The cross-attention (``attn2``) processors, as ``(processor_name, block index)``."""
    return [(f"blocks.{i}.attn2.processor", i) for i in range(len(model.blocks))]


def _rope(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _run(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, temb=None):
    if encoder_hidden_states is not None:
        if not callable(getattr(proc, "cross_core", None)):
            raise ValueError("pattern processors replace Wan self-attention (attn1) only, not cross-attention")
        return _run_cross(proc, attn, hidden_states, encoder_hidden_states, attention_mask)
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


def _run_cross(proc, attn, hidden_states, encoder_hidden_states, attention_mask=None):
    """The stock ``WanAttnProcessor`` on a cross-attention module, with the text attention core
    ``proc.cross_core(q, k, v, attention_mask)``; the I2V image-context attention stays stock."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    context_img = None
    if attn.add_k_proj is not None:
        # as diffusers: the text context is the last 512 tokens, the image context before it
        image_context_length = encoder_hidden_states.shape[1] - 512
        context_img = encoder_hidden_states[:, :image_context_length]
        encoder_hidden_states = encoder_hidden_states[:, image_context_length:]
    q = attn.to_q(hidden_states)
    if getattr(attn, "fused_projections", False):
        k, v = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
    else:
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    out_img = None
    if context_img is not None:
        if getattr(attn, "fused_projections", False):
            k_img, v_img = attn.to_added_kv(context_img).chunk(2, dim=-1)
        else:
            k_img, v_img = attn.add_k_proj(context_img), attn.add_v_proj(context_img)
        k_img = attn.norm_added_k(k_img)
        k_img, v_img = (t.unflatten(2, (attn.heads, -1)) for t in (k_img, v_img))
        out_img = dispatch_attention_fn(q, k_img, v_img, attn_mask=None, dropout_p=0.0, is_causal=False,
                                        backend=proc._attention_backend, parallel_config=None)
        out_img = out_img.flatten(2, 3).type_as(q)
    out = proc.cross_core(q, k, v, attention_mask).flatten(2, 3).type_as(q)
    if out_img is not None:
        out = out + out_img
    return attn.to_out[1](attn.to_out[0](out))


WAN = Family("wan", ("WanTransformer3DModel",), _read_call, _layers, _run,
             "Wan 2.1 / 2.2 T2V (both experts of 2.2): video self-attention")
