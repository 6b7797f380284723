"""UNet2DConditionModel (SD 1.5 / 2.1 / SDXL): self-attention ``attn1`` of the transformer blocks.

Processors see ``(B, H*W, C)`` with no H/W; the context hook records the latent size and each level
derives its grid as HiDiffusion does: ``r = round(sqrt(latent_H * latent_W / N))``,
``grid = (ceil(latent_H / r), ceil(latent_W / r))``; where that does not hold the token count (deep levels of
odd latents), the level whose grid is the latent ceil-halved ``k`` times (:func:`unet_level`). A processor
with ``merged_tokens = True`` (ToMe / AgentSD, whose ``attn1`` input is a merged token set) gets a 1-D layout
of its token count instead.
"""

from __future__ import annotations

import math

from ..layout import TokenLayout
from .base import Family, call_info, first_tensor


#: the denoiser's attention kwargs, and the keys of them the model (or diffusers' attention modules, quietly)
#: takes itself
_CALL_KWARGS = "cross_attention_kwargs"
_MODEL_KEYS = ("scale", "gligen", "ip_adapter_masks", "ip_hidden_states")


def _read_call(model, args, kwargs):
    sample = first_tensor(args, kwargs, "sample", 0)
    size = tuple(int(s) for s in sample.shape[-2:])
    return dict(**call_info(kwargs, _CALL_KWARGS, _MODEL_KEYS, forwarded=True),
                grid=size, latent_size=size, text_len=0, batch_size=sample.shape[0],
                timestep=first_tensor(args, kwargs, "timestep", 1))


def _layers(model):
    names = [n for n in model.attn_processors if n.endswith("attn1.processor")]
    return [(n, i) for i, n in enumerate(names)]


def unet_level(latent_size: tuple[int, int], tokens: int) -> tuple[int, tuple[int, int]]:
    """``(factor, grid)`` of the UNet level with ``tokens`` tokens: the level downsampled ``factor`` (1, 2, 4,
    ...) times, whose grid is the latent size ceil-halved that often (what stride-2 convs with padding 1
    give: ``ceil(H / factor) x ceil(W / factor)``). A ValueError when no level holds ``tokens`` tokens."""
    h, w = (int(s) for s in latent_size)
    factor = 1
    while True:
        grid = (math.ceil(h / factor), math.ceil(w / factor))
        if grid[0] * grid[1] == tokens:
            return factor, grid
        if grid[0] * grid[1] < tokens or grid == (1, 1):
            raise ValueError(f"no UNet level of latent size {latent_size} holds {tokens} tokens")
        factor *= 2


def level_grid(latent_size: tuple[int, int], tokens: int) -> tuple[int, int]:
    """Grid of a UNet level with ``tokens`` tokens, given the latent size (HiDiffusion's rule; where it
    does not fit the token count, e.g. deep levels of odd latents, the ceil-halved level of
    :func:`unet_level`)."""
    h, w = latent_size
    r = max(1, round(math.sqrt(h * w / tokens)))
    grid = (math.ceil(h / r), math.ceil(w / r))
    if grid[0] * grid[1] != tokens:
        try:
            return unet_level(latent_size, tokens)[1]
        except ValueError:
            raise ValueError(f"cannot infer the feature grid of {tokens} tokens from latent size {latent_size}") from None
    return grid


def _run(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, temb=None):
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if encoder_hidden_states is not None:
        raise ValueError("pattern processors replace UNet self-attention (attn1) only, not cross-attention")
    b, n, _ = hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, n, b).view(b, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.view(b, -1, attn.heads, head_dim) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if getattr(proc, "merged_tokens", False):  # token-merged input (ToMe / AgentSD): a set, not a grid
        grid = (n,)
    else:
        grid = level_grid(proc.context.latent_size, n) if input_ndim == 3 else (h, w)
    out = proc.core(q, k, v, TokenLayout(grid, 0), attention_mask)
    out = out.reshape(b, -1, attn.heads * head_dim).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


UNET = Family("unet", ("UNet2DConditionModel",), _read_call, _layers, _run,
              "UNet2DConditionModel: SD 1.5 / 2.1, SDXL, SDXL-Turbo")
