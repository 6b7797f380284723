"""FLUX.1 (``FluxTransformer2DModel``): text tokens first; single blocks get ``[text, image]`` already joined."""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from .base import Family, call_info, first_tensor


#: the denoiser's attention kwargs, and the keys of them the model (or diffusers' attention modules, quietly)
#: takes itself
_CALL_KWARGS = "joint_attention_kwargs"
_MODEL_KEYS = ("scale", "ip_adapter_image_embeds", "ip_adapter_masks", "ip_hidden_states")


def _read_call(model, args, kwargs):
    hidden = first_tensor(args, kwargs, "hidden_states", 0)
    text = first_tensor(args, kwargs, "encoder_hidden_states", 1)
    img_ids = kwargs.get("img_ids")
    if img_ids is None:
        raise ValueError("Flux transformer called without img_ids; cannot tell the image token grid")
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != hidden.shape[1]:
        raise ValueError(
            f"Flux image tokens ({hidden.shape[1]}) are not one {h}x{w} grid (reference-image inputs such as "
            "Kontext are not supported by grid patterns)"
        )
    return dict(**call_info(kwargs, _CALL_KWARGS, _MODEL_KEYS, forwarded=True),
                grid=(h, w), text_len=0 if text is None else text.shape[1], batch_size=hidden.shape[0],
                timestep=kwargs.get("timestep"))


def _layers(model):
    out = [(f"transformer_blocks.{i}.attn.processor", i) for i in range(len(model.transformer_blocks))]
    n = len(out)
    out += [(f"single_transformer_blocks.{i}.attn.processor", n + i) for i in range(len(model.single_transformer_blocks))]
    return out


def _qkv(attn, x):
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def _run(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, temb=None):
    from diffusers.models.embeddings import apply_rotary_emb

    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in _qkv(attn, hidden_states))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if getattr(attn, "fused_projections", False):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            eq, ek, ev = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states), attn.add_v_proj(encoder_hidden_states)
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        text_len = encoder_hidden_states.shape[1]
    else:
        text_len = proc.context.text_len  # single block: text already prepended
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    layout = TokenLayout(proc.context.grid, text_len, "first")
    out = proc.core(q, k, v, layout, attention_mask).flatten(2, 3).to(q.dtype)
    if encoder_hidden_states is not None:
        txt, img = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())
    return out


FLUX = Family("flux", ("FluxTransformer2DModel",), _read_call, _layers, _run,
              "FLUX.1 dev/schnell: double and single stream blocks, text first")
