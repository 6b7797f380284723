"""Mochi 1 (``MochiTransformer3DModel``): joint attention, video tokens first, text appended.

The stock ``MochiAttnProcessor2_0`` drops each sample's padded text tokens (queries and keys), attends
over ``video + valid text`` per sample, and zero-pads the text outputs back to the padded length. This
adapter does the same per sample, with the attention core on the layout ``grid + valid text (last)``,
so a dense call is the stock computation and padded text never takes part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from .base import Family, call_info, first_tensor, grid_from_latent, qkv_heads


#: the denoiser's attention kwargs, and the keys of them the model (or diffusers' attention modules, quietly)
#: takes itself
_CALL_KWARGS = "attention_kwargs"
_MODEL_KEYS = ("scale",)


def _read_call(model, args, kwargs):
    hidden = first_tensor(args, kwargs, "hidden_states", 0)
    text = first_tensor(args, kwargs, "encoder_hidden_states", 1)
    return dict(**call_info(kwargs, _CALL_KWARGS, _MODEL_KEYS, forwarded=False),
                grid=grid_from_latent(hidden.shape, (1, model.config.patch_size, model.config.patch_size)),
                text_len=0 if text is None else text.shape[1], batch_size=hidden.shape[0],
                timestep=first_tensor(args, kwargs, "timestep", 2))


def _layers(model):
    return [(f"transformer_blocks.{i}.attn1.processor", i) for i in range(len(model.transformer_blocks))]


def _rope(x, cos, sin):
    """Mochi's rotary embedding on interleaved (even, odd) pairs, computed in fp32 as the stock does."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def _run(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, temb=None):
    if encoder_hidden_states is None:
        raise ValueError("the Mochi adapter expects the joint (video + text) attention of MochiTransformerBlock")
    q, k, v = qkv_heads(attn, hidden_states)
    eq, ek, ev = qkv_heads(attn, encoder_hidden_states, context=True)
    if rotary is not None:
        q, k = _rope(q, *rotary), _rope(k, *rotary)
    n_video, n_text = q.shape[1], eq.shape[1]
    outs = []
    for b in range(q.shape[0]):  # per sample: keep only its real text tokens, as the stock processor does
        valid = torch.arange(n_text, device=q.device) if attention_mask is None else torch.nonzero(attention_mask[b].flatten()).flatten()
        qb, kb, vb = (torch.cat([x[b : b + 1], e[b : b + 1, valid]], dim=1) for x, e in ((q, eq), (k, ek), (v, ev)))
        layout = TokenLayout(proc.context.grid, valid.numel(), "last")
        out = proc.core(qb, kb, vb, layout, None)
        outs.append(F.pad(out, (0, 0, 0, 0, 0, n_text - valid.numel())))
    out = torch.cat(outs, dim=0).flatten(2, 3)
    video, text = out.split_with_sizes((n_video, n_text), dim=1)
    video = attn.to_out[1](attn.to_out[0](video))
    if getattr(attn, "to_add_out", None) is not None:
        text = attn.to_add_out(text)
    return video, text


MOCHI = Family("mochi", ("MochiTransformer3DModel",), _read_call, _layers, _run,
               "Mochi 1: joint video + text attention, video first, padded text dropped per sample")
