"""NTK-scaled RoPE on Flux's ``pos_embed`` as a named diffusers hook (CLEAR's high-resolution mode).

CLEAR (Huage001/CLEAR, ``transformer_flux.py``) generates beyond the training resolution with NTK-aware
RoPE: its copy of ``FluxPosEmbed.forward`` takes ``ntk_factor`` and passes it to diffusers'
``get_1d_rotary_pos_embed``, which raises the base to ``theta * ntk_factor`` on every axis
(``inference_t2i_highres.ipynb``: ``ntk_factor=10`` at 2048 x 4096).

Here the model file is not copied: :func:`apply_ntk_rope` registers a :class:`NTKRopeHook` under the name
:data:`NTK_ROPE_HOOK` on the transformer's ``pos_embed`` (a diffusers ``FluxPosEmbed``). Its
``new_forward`` is ``FluxPosEmbed.forward`` with ``ntk_factor`` passed on (the same calls, dtypes and
concatenation; with ``ntk_factor=1`` it equals the stock output bit for bit, tested). The returned undo
removes it by name (:mod:`.hooks`), whatever was registered on the module before or after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks import ModelHook

from .hooks import clear_child_registry_caches, register_hook, remove_hook

__all__ = ["NTK_ROPE_HOOK", "NTKRopeConfig", "NTKRopeHook", "apply_ntk_rope", "check_ntk_target", "remove_ntk_rope"]

NTK_ROPE_HOOK = "diffusion_attn.ntk_rope"


@dataclass(frozen=True)
class NTKRopeConfig:
    """``ntk_factor``: the RoPE base becomes ``theta * ntk_factor`` (a finite number > 0; 1 = stock)."""

    ntk_factor: float = 1.0

    def __post_init__(self):
        f = self.ntk_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"ntk_factor must be a finite number > 0 (1 = stock RoPE), got {f!r}")


def check_ntk_target(pos_embed) -> None:
    """A ValueError unless ``pos_embed`` is a diffusers ``FluxPosEmbed`` (``theta`` and ``axes_dim``)."""
    if pos_embed is None or type(pos_embed).__name__ != "FluxPosEmbed" or not hasattr(pos_embed, "axes_dim"):
        raise ValueError(f"NTK-scaled RoPE patches a Flux transformer's pos_embed (FluxPosEmbed), got "
                         f"{type(pos_embed).__name__}")


class NTKRopeHook(ModelHook):
    """``FluxPosEmbed.forward(ids)`` with the rotary base ``theta * ntk_factor``."""

    def __init__(self, config: NTKRopeConfig):
        super().__init__()
        self.config = config

    def new_forward(self, module, ids: torch.Tensor, *args, **kwargs):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        if args or kwargs:
            raise TypeError(f"FluxPosEmbed takes ids only, got {len(args)} more arguments and {sorted(kwargs)}")
        freqs_dtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64  # as diffusers
        pos = ids.float()
        cos_out, sin_out = [], []
        for i in range(ids.shape[-1]):
            cos, sin = get_1d_rotary_pos_embed(
                module.axes_dim[i], pos[:, i], theta=module.theta, ntk_factor=self.config.ntk_factor,
                repeat_interleave_real=True, use_real=True, freqs_dtype=freqs_dtype)
            cos_out.append(cos)
            sin_out.append(sin)
        return torch.cat(cos_out, dim=-1).to(ids.device), torch.cat(sin_out, dim=-1).to(ids.device)


def apply_ntk_rope(transformer: torch.nn.Module, config: NTKRopeConfig) -> Callable[[], None]:
    """Register :class:`NTKRopeHook` on ``transformer.pos_embed``; returns the exact undo."""
    if not isinstance(config, NTKRopeConfig):
        raise TypeError(f"config must be an NTKRopeConfig, got {type(config).__name__}")
    pos_embed = getattr(transformer, "pos_embed", None)
    check_ntk_target(pos_embed)
    undo = register_hook(pos_embed, NTKRopeHook(config), NTK_ROPE_HOOK)
    clear_child_registry_caches(transformer)

    def remove():
        undo()
        clear_child_registry_caches(transformer)

    return remove


def remove_ntk_rope(transformer: torch.nn.Module) -> bool:
    """Remove the NTK RoPE hook from ``transformer.pos_embed`` by name; returns whether one was there."""
    removed = remove_hook(transformer.pos_embed, NTK_ROPE_HOOK)
    clear_child_registry_caches(transformer)
    return removed
