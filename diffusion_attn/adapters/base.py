"""Model-family adapters: the only code that knows how q, k, v come out of a given diffusers model.

An adapter (:class:`Family`) provides

* ``read_call(model, args, kwargs)``: reads the denoiser call's token grid, text length, batch size and
  timestep for the run context;
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

__all__ = ["Family", "grid_from_latent"]


@dataclass(frozen=True)
class Family:
    name: str
    model_classes: tuple[str, ...]
    read_call: Callable
    layers: Callable
    run: Callable
    description: str = ""


def first_tensor(args, kwargs, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def grid_from_latent(shape, patch) -> tuple[int, ...]:
    """Token grid of a ``(B, C, H, W)`` or ``(B, C, F, H, W)`` latent for a given patch size."""
    spatial = tuple(shape[2:])
    patch = (patch,) * len(spatial) if isinstance(patch, int) else tuple(patch)
    if len(patch) != len(spatial):
        patch = (1,) * (len(spatial) - len(patch)) + patch
    return tuple(s // p for s, p in zip(spatial, patch))


def heads_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))
