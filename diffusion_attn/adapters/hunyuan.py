"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): video tokens first, text appended, text padding masked."""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from .base import Family, call_info, first_tensor, grid_from_latent, qkv_heads


#: the denoiser's attention kwargs, and the keys of them the model (or diffusers' attention modules, quietly)
#: takes itself
_CALL_KWARGS = "attention_kwargs"
_MODEL_KEYS = ("scale",)


def _read_call(model, args, kwargs):
    hidden = first_tensor(args, kwargs, "hidden_states", 0)
    text = first_tensor(args, kwargs, "encoder_hidden_states", 2)
    cfg = model.config
    grid = grid_from_latent(hidden.shape, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size))
    return dict(**call_info(kwargs, _CALL_KWARGS, _MODEL_KEYS, forwarded=False),
                grid=grid, text_len=0 if text is None else text.shape[1], batch_size=hidden.shape[0],
                timestep=first_tensor(args, kwargs, "timestep", 1))


def _layers(model):
    out = [(f"transformer_blocks.{i}.attn.processor", i) for i in range(len(model.transformer_blocks))]
    n = len(out)
    out += [(f"single_transformer_blocks.{i}.attn.processor", n + i) for i in range(len(model.single_transformer_blocks))]
    return out


def _run(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, temb=None):
    from diffusers.models.embeddings import apply_rotary_emb

    joined = attn.add_q_proj is None and encoder_hidden_states is not None  # single-stream block
    if joined:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    q, k, v = qkv_heads(attn, hidden_states)
    if rotary is not None:
        if joined:
            n_txt = encoder_hidden_states.shape[1]
            q = torch.cat([apply_rotary_emb(q[:, :-n_txt], rotary, sequence_dim=1), q[:, -n_txt:]], dim=1)
            k = torch.cat([apply_rotary_emb(k[:, :-n_txt], rotary, sequence_dim=1), k[:, -n_txt:]], dim=1)
        else:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        eq, ek, ev = qkv_heads(attn, encoder_hidden_states, context=True)
        q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)
    text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    layout = TokenLayout(proc.context.grid, text_len, "last")
    out = proc.core(q, k, v, layout, attention_mask).flatten(2, 3).to(q.dtype)
    if encoder_hidden_states is None:
        return out, encoder_hidden_states
    img, txt = out[:, :-text_len], out[:, -text_len:]
    if getattr(attn, "to_out", None) is not None:
        img = attn.to_out[1](attn.to_out[0](img))
    if getattr(attn, "to_add_out", None) is not None:
        txt = attn.to_add_out(txt)
    return img, txt


HUNYUAN = Family("hunyuanvideo", ("HunyuanVideoTransformer3DModel",), _read_call, _layers, _run,
                 "HunyuanVideo T2V: dual and single stream blocks, video first")
