"""DiTs (Flux, SD3, Wan, HunyuanVideo): an ``APPLY_MODEL`` wrapper that installs a per-call
``optimized_attention_override`` (ComfyUI >= 0.3.60).

``model.clone()`` gets one ``APPLY_MODEL`` wrapper (``ModelPatcher.add_wrapper_with_key``;
``comfy/patcher_extension.py``, called by ``BaseModel.apply_model`` in ``comfy/model_base.py``). Per
model call it reads the latent ``x``, the text context ``c_crossattn`` and the extra conds, derives the
token layout (:mod:`.families`) and the placement (:mod:`.runtime`), and calls the model with a copy of
``transformer_options`` whose ``optimized_attention_override`` is a per-call object. ``wrap_attn`` in
``comfy/ldm/modules/attention.py`` hands every attention call of the model to it as
``override(func, q, k, v, heads, mask=..., skip_reshape=..., skip_output_reshape=...,
transformer_options=...)``. Calls whose query and key lengths both equal the layout's token count are
the joint/self attention the method replaces; every other call (Wan cross-attention, HunyuanVideo's
token refiner, SD3.5's image-only second attention) goes to ``func`` unchanged, as do dense placements
and full patterns, so they keep ComfyUI's own attention backend (and any override another node
installed, which is chained).

Tensor layouts, as ComfyUI's own attention functions accept them (``attention_pytorch``,
``attention_basic``): with ``skip_reshape`` q, k, v are (B, heads, S, D); without it q and k are
(B, S, heads * D) and v is either (B, S, heads * D) or already (B, S, heads, D) -- ComfyUI's MMDiT (SD3 /
SD3.5, ``comfy/ldm/modules/diffusionmodules/mmdit.py``) passes ``v`` from ``split_qkv`` unflattened.

Layer = order of the replaced attention calls within one model call: Flux/HunyuanVideo double blocks
then single blocks, Wan blocks, SD3 joint blocks -- the diffusers adapters' layer order. Wan VACE's
control blocks run self-attention over the same grid and are counted as layers too.
"""

from __future__ import annotations

import logging

from ..layout import TokenLayout
from ..adapters.comfy import ComfyFamily
from .runtime import CallPlacement, MethodRuntime, key_padding_from_comfy_mask, upcast

__all__ = ["APPLY_MODEL_ARGS", "DiTCall", "DiTPatch", "arg", "to_heads_layout"]

logger = logging.getLogger(__name__)

APPLY_MODEL_ARGS = ("x", "t", "c_concat", "c_crossattn", "control", "transformer_options")


def arg(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def to_heads_layout(t, heads: int, batch: int, skip_reshape: bool):
    """(B, S, heads, D) from one of ComfyUI's attention inputs: (B, heads, S, D) with ``skip_reshape``,
    else (B, S, heads * D) or (B, S, heads, D) (MMDiT's ``v``)."""
    if skip_reshape:
        return t.transpose(1, 2)
    if t.ndim == 4:
        if t.shape[2] != heads:
            raise ValueError(f"diffusion_attn: a 4-D attention input of shape {tuple(t.shape)} without skip_reshape "
                             f"must be (B, S, heads={heads}, D)")
        return t
    return t.reshape(batch, t.shape[1], heads, -1)


class DiTCall:
    """The ``optimized_attention_override`` of one model call (its layout, placement and layer counter)."""

    def __init__(self, runtime: MethodRuntime, layout: TokenLayout, placement: CallPlacement | None, previous=None):
        self.runtime, self.layout, self.placement, self.previous = runtime, layout, placement, previous
        self.matched = 0

    @property
    def step(self) -> int | None:
        return None if self.placement is None else self.placement.step

    def __deepcopy__(self, memo):
        return self

    def _passthrough(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        # ComfyUI attention signature: (q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
        # skip_output_reshape=False, **kwargs)
        q, k, v = args[0], args[1], args[2]
        skip_reshape = bool(arg(args, kwargs, 6, "skip_reshape", False))
        seq_dim = 2 if skip_reshape else 1
        n = self.layout.num_tokens
        if q.ndim != (4 if skip_reshape else 3) or q.shape[seq_dim] != n or k.shape[seq_dim] != n:
            return self._passthrough(func, args, kwargs)
        layer = self.matched
        self.matched += 1
        if self.runtime.dense_now(self.placement, layer):
            return self._passthrough(func, args, kwargs)
        heads = int(arg(args, kwargs, 3, "heads"))
        batch = q.shape[0]
        q4, k4, v4 = (to_heads_layout(t, heads, batch, skip_reshape) for t in (q, k, v))
        kpm = key_padding_from_comfy_mask(arg(args, kwargs, 4, "mask"), batch, n)
        q4, k4, v4 = upcast(q4, k4, v4, arg(args, kwargs, 5, "attn_precision"))
        out = self.runtime.attend(q4, k4, v4, self.layout, placement=self.placement, layer=layer, key_padding_mask=kpm)
        if out is None:
            return self._passthrough(func, args, kwargs)
        out = out.to(v.dtype)
        if arg(args, kwargs, 7, "skip_output_reshape", False):
            return out.transpose(1, 2)
        return out.reshape(batch, n, -1)


class DiTPatch:
    """``APPLY_MODEL`` wrapper: installs a per-call attention override for the call's token layout."""

    def __init__(self, runtime: MethodRuntime, family: ComfyFamily):
        self.runtime, self.family = runtime, family
        self._warned = False

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        args = list(args)
        x = arg(args, kwargs, 0, "x")
        context = arg(args, kwargs, 3, "c_crossattn")
        options = arg(args, kwargs, 5, "transformer_options") or {}
        extras = {k: v for k, v in kwargs.items() if k not in APPLY_MODEL_ARGS}
        base_model = executor.class_obj
        dm = base_model.diffusion_model
        layout, cross_lengths = self.family.read(dm, x, context, extras)
        if layout.text_len == 0 and layout.num_tokens in cross_lengths:
            raise ValueError(
                f"diffusion_attn: the {layout.describe()} video has as many tokens ({layout.num_tokens}) as a "
                f"cross-attention context, so self- and cross-attention cannot be told apart; change the size or length")
        options = dict(options)
        placement = self.runtime.placement(options, getattr(base_model, "model_sampling", None))
        call = DiTCall(self.runtime, layout, placement, options.get("optimized_attention_override"))
        options["optimized_attention_override"] = call
        if "transformer_options" in kwargs or len(args) <= 5:
            kwargs["transformer_options"] = options
        else:
            args[5] = options
        out = executor(*args, **kwargs)
        if call.matched == 0 and not self._warned:
            self._warned = True
            logger.warning(
                "diffusion_attn %s: no attention call of this %s model matched the %s token layout, so nothing "
                "was changed (an unsupported model variant, or a caching node that skipped the model)",
                self.runtime.spec.name, type(dm).__name__, layout.describe())
        return out
