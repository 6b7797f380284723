"""Model-family adapters: the only code that knows how q, k, v come out of a given diffusers model.

An adapter (:class:`Family`) provides

* ``read_call(model, args, kwargs)``: reads the denoiser call's token grid, text length, batch size,
  timestep and attention kwargs (:func:`call_info`) for the run context;
* ``layers(model)``: the attention layers a pattern method replaces, as ``(processor_name, index)``;
* ``run(proc, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb)``: the stock
  processor's computation (projections, qk-norm, RoPE, text/image order, output projections) with the
  attention core delegated to ``proc.core(q, k, v, layout, attention_mask)``. With a dense core it is
  the stock processor, bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Family", "call_info", "grid_from_latent", "layer_kind"]


@dataclass(frozen=True)
class Family:
    name: str
    model_classes: tuple[str, ...]
    read_call: Callable
    layers: Callable
    run: Callable
    description: str = ""
    #: the context-parallel plan (diffusers' ``_cp_plan`` format) for models whose diffusers class has
    #: none; used by :func:`diffusion_attn.parallel.enable_context_parallel`
    cp_plan: dict | None = None
    #: ``(model, context_parallel_config) -> None``: registers the named hooks a plan cannot express (run by
    #: :func:`diffusion_attn.parallel.enable_context_parallel` after ``enable_parallelism``)
    cp_hooks: Callable | None = None


#: layer kinds by the first component of a processor's module path (diffusers' names): dual-stream
#: joint blocks (Flux, SD3, HunyuanVideo, Mochi ``transformer_blocks``), Flux / HunyuanVideo
#: single-stream blocks, UNet levels; everything else (Wan's ``blocks``) is a plain ``block``.
_LAYER_KINDS = {"transformer_blocks": "double", "single_transformer_blocks": "single", "down_blocks": "down",
                "mid_block": "mid", "up_blocks": "up"}


def layer_kind(processor_name: str) -> str:
    """The kind of the layer a processor name (``"single_transformer_blocks.3.attn.processor"``) belongs
    to, as :class:`diffusion_attn.placement.Placement` selects layers: double, single, down, mid, up or
    block."""
    return _LAYER_KINDS.get(processor_name.split(".", 1)[0], "block")


def first_tensor(args, kwargs, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def call_info(kwargs, name: str, model_keys: tuple[str, ...], *, forwarded: bool) -> dict:
    """The part of ``read_call``'s answer about call-time inputs: the denoiser call's attention kwargs
    ``name`` (``call_kwargs``), the keys of them the model itself takes (``model_keys``) and whether the
    model passes them on to its attention processors (``forwarded``)."""
    return dict(call_kwargs=kwargs.get(name), call_kwargs_name=name, model_keys=model_keys, forwarded=forwarded)


def grid_from_latent(shape, patch) -> tuple[int, ...]:
    """Token grid of a ``(B, C, H, W)`` or ``(B, C, F, H, W)`` latent for a given patch size."""
    spatial = tuple(shape[2:])
    patch = (patch,) * len(spatial) if isinstance(patch, int) else tuple(patch)
    if len(patch) != len(spatial):
        patch = (1,) * (len(spatial) - len(patch)) + patch
    return tuple(s // p for s, p in zip(spatial, patch))


def qkv_heads(attn, x: torch.Tensor, *, context: bool = False):
    """q, k, v of ``x`` as (B, S, heads, head_dim), q and k normed where the module has norms, as the
    stock joint-attention processors compute them: the sample projections (``to_q/k/v``, ``norm_q/k``)
    or, with ``context``, the added text projections (``add_q/k/v_proj``, ``norm_added_q/k``)."""
    names = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k") if context else \
        ("to_q", "to_k", "to_v", "norm_q", "norm_k")
    q, k, v = (getattr(attn, n)(x).unflatten(2, (attn.heads, -1)) for n in names[:3])
    norm_q, norm_k = getattr(attn, names[3], None), getattr(attn, names[4], None)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v
