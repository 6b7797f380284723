"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): image tokens first, text appended (joint blocks)."""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from .base import Family, call_info, first_tensor, grid_from_latent


#: the denoiser's attention kwargs, and the keys of them the model (or diffusers' attention modules, quietly)
#: takes itself
_CALL_KWARGS = "joint_attention_kwargs"
_MODEL_KEYS = ("scale", "ip_adapter_image_embeds", "ip_hidden_states", "temb")


def _read_call(model, args, kwargs):
    hidden = first_tensor(args, kwargs, "hidden_states", 0)
    text = first_tensor(args, kwargs, "encoder_hidden_states", 1)
    return dict(**call_info(kwargs, _CALL_KWARGS, _MODEL_KEYS, forwarded=True),
                grid=grid_from_latent(hidden.shape, model.config.patch_size), text_len=0 if text is None else text.shape[1],
                batch_size=hidden.shape[0], timestep=kwargs.get("timestep"))


def _layers(model):
    return [(f"transformer_blocks.{i}.attn.processor", i) for i in range(len(model.transformer_blocks))]


def _split(t, b, heads):
    return t.view(b, -1, heads, t.shape[-1] // heads)


def _run(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, temb=None):
    b = hidden_states.shape[0]
    q, k, v = (_split(f(hidden_states), b, attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    # stock norms run on (B, heads, S, D); RMS/LayerNorm over the last dim give the same values here
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    text_len = 0
    if encoder_hidden_states is not None:
        eq, ek, ev = (_split(f(encoder_hidden_states), b, attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)
        text_len = encoder_hidden_states.shape[1]
    layout = TokenLayout(proc.context.grid, text_len, "last")
    out = proc.core(q, k, v, layout, None).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)  # stock SD3 takes no mask
    n_img = hidden_states.shape[1]
    img, txt = out[:, :n_img], out[:, n_img:]
    img = attn.to_out[1](attn.to_out[0](img))
    if encoder_hidden_states is None:
        return img
    if not attn.context_pre_only:
        txt = attn.to_add_out(txt)
    return img, txt


SD3 = Family("sd3", ("SD3Transformer2DModel",), _read_call, _layers, _run,
             "Stable Diffusion 3 / 3.5: joint blocks, image first")
