"""UNets (SD 1.5 / 2.1, SDXL; HiDiffusion's MSW-MSA): ``attn1`` replacement patches.

``set_model_attn1_replace`` on the transformer blocks the method targets (``BasicTransformerBlock.forward``:
keys ``(block_name, id, block_index)`` from ``comfy/ldm/modules/diffusionmodules/openaimodel.py``). The
replacement gets the projected ``q, k, v`` (B, S, heads * dim_head) and ``extra_options`` (a copy of
``transformer_options`` plus ``n_heads``, ``dim_head``, ``activations_shape`` = the level's feature map,
``original_shape``). An ``APPLY_MODEL`` wrapper (:class:`UNetPlacementPatch`) puts each model call's
placement (step, step window, which needs the model's ``model_sampling``) into ``transformer_options``
under :data:`PLACEMENT_KEY`, where every attn1 patch of that call reads it.

RAU-Net (HiDiffusion's down/upsampling schedule) changes UNet modules, not attention; it is not part of
the ComfyUI node (ComfyUI's own "PatchModelAddDownscale" node is the closest equivalent).
Layer = index among all ``attn1`` layers in diffusers' order (down, up, mid blocks).
"""

from __future__ import annotations

from ..layout import TokenLayout
from .dit import arg
from ..adapters.comfy import unet_grid
from .runtime import MethodRuntime, upcast

__all__ = ["PLACEMENT_KEY", "UNetAttn1Patch", "UNetPlacementPatch"]

#: transformer_options key of the per-call :class:`~.runtime.CallPlacement`
PLACEMENT_KEY = "diffusion_attn_placement"


class UNetPlacementPatch:
    """``APPLY_MODEL`` wrapper: the call's placement, for the attn1 patches (``transformer_options``)."""

    def __init__(self, runtime: MethodRuntime):
        self.runtime = runtime

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        args = list(args)
        options = dict(arg(args, kwargs, 5, "transformer_options") or {})
        options[PLACEMENT_KEY] = self.runtime.placement(options, getattr(executor.class_obj, "model_sampling", None))
        if "transformer_options" in kwargs or len(args) <= 5:
            kwargs["transformer_options"] = options
        else:
            args[5] = options
        return executor(*args, **kwargs)


class UNetAttn1Patch:
    """``attn1`` replacement for one transformer block: ``(q, k, v, extra_options) -> out``."""

    def __init__(self, runtime: MethodRuntime, layer: int):
        self.runtime, self.layer = runtime, layer

    def __deepcopy__(self, memo):
        return self

    @staticmethod
    def _dense(q, k, v, heads, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))

    def __call__(self, q, k, v, extra_options, mask=None):
        heads = int(extra_options["n_heads"])
        batch, tokens = q.shape[0], q.shape[1]
        if k.shape[1] != tokens or mask is not None:
            return self._dense(q, k, v, heads, extra_options)
        placement = extra_options.get(PLACEMENT_KEY)
        if placement is None:  # called without the wrapper (a bare model call): the step, no percent window
            placement = self.runtime.placement(extra_options, None)
        if self.runtime.dense_now(placement, self.layer):
            return self._dense(q, k, v, heads, extra_options)
        layout = TokenLayout(unet_grid(extra_options, tokens), 0)
        q4, k4, v4 = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        q4, k4, v4 = upcast(q4, k4, v4, extra_options.get("attn_precision"))
        out = self.runtime.attend(q4, k4, v4, layout, placement=placement, layer=self.layer)
        if out is None:
            return self._dense(q, k, v, heads, extra_options)
        return out.to(v.dtype).reshape(batch, tokens, -1)
