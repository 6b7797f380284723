"""The runtime behind the ComfyUI nodes: patching a ComfyUI ``MODEL`` (a ``ModelPatcher``) so that its
attention runs one of the pack's methods.

Nothing here imports ``comfy`` at module level; the few ComfyUI names used (``WrappersMP``,
``optimized_attention``) are imported when a node runs. The attention itself is the diffusers
processors' kernel: the method's pattern comes from ``MethodSpec.grid_pattern`` and runs through
:func:`diffusion_attn.kernels.pattern_attention` (tile schedules cached per layout).

How a patched model works (ComfyUI >= 0.3.60; file references are to Comfy-Org/ComfyUI):

* **DiTs** (Flux, SD3, Wan, HunyuanVideo). ``model.clone()`` gets one ``APPLY_MODEL`` wrapper
  (``ModelPatcher.add_wrapper_with_key``; ``comfy/patcher_extension.py``, called by
  ``BaseModel.apply_model`` in ``comfy/model_base.py``). Per model call it reads the latent ``x``, the
  text context ``c_crossattn`` and the extra conds, derives the token layout (grid = latent size over
  the model's ``patch_size``, rounded up as ``pad_to_patch_size`` does; text length and position per
  model), and calls the model with a copy of ``transformer_options`` whose
  ``optimized_attention_override`` is a per-call object. ``wrap_attn`` in
  ``comfy/ldm/modules/attention.py`` hands every attention call of the model to it as
  ``override(func, q, k, v, heads, mask=..., skip_reshape=..., skip_output_reshape=...,
  transformer_options=...)``. Calls whose query and key lengths both equal the layout's token count
  are the joint/self attention the method replaces; every other call (Wan cross-attention,
  HunyuanVideo's token refiner, SD3.5's image-only second attention) goes to ``func`` unchanged, as do
  dense placements and full patterns, so they keep ComfyUI's own attention backend (and any override
  another node installed, which is chained).
* **UNets** (SD 1.5 / 2.1, SDXL; HiDiffusion's MSW-MSA). ``set_model_attn1_replace`` on the
  transformer blocks the method targets (``BasicTransformerBlock.forward``: keys
  ``(block_name, id, block_index)`` from ``comfy/ldm/modules/diffusionmodules/openaimodel.py``).
  The replacement gets the projected ``q, k, v`` (B, S, heads * dim_head) and ``extra_options``
  (``n_heads``, ``dim_head``, ``activations_shape`` = the level's feature map, ``original_shape``).
  RAU-Net (HiDiffusion's down/upsampling schedule) changes UNet modules, not attention; it is not part
  of the ComfyUI node (ComfyUI's own "PatchModelAddDownscale" node is the closest equivalent).

Step and layer:

* step = position of the current sigma (``transformer_options["sigmas"]``) in the sampler's schedule
  ``transformer_options["sample_sigmas"]`` (both set in ``comfy/samplers.py``), i.e. the index of the
  step interval the sigma lies in. It counts within one sampler run: with ``KSamplerAdvanced``
  ``start_at_step > 0`` (e.g. Wan 2.2's low-noise expert) the count restarts at 0. Without a schedule
  (a model called outside a sampler) the step is unknown and ``dense_steps`` does not apply.
* layer (DiTs) = order of the replaced attention calls within one model call: Flux/HunyuanVideo double
  blocks then single blocks, Wan blocks, SD3 joint blocks -- the diffusers adapters' layer order. Wan
  VACE's control blocks run self-attention over the same grid and are counted as layers too.
  layer (UNets) = index among all ``attn1`` layers in diffusers' order (down, up, mid blocks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..adapters.unet import level_grid
from ..kernels import prepared_attention
from ..layout import TokenLayout
from ..registry import MethodSpec

__all__ = [
    "COMFY_FAMILIES",
    "ComfyFamily",
    "ComfySupport",
    "DiTPatch",
    "MIN_COMFYUI",
    "MethodRuntime",
    "SUPPORT",
    "UNetAttn1Patch",
    "WRAPPER_KEY",
    "apply_method",
    "detect_family",
    "key_padding_from_comfy_mask",
    "step_index",
    "supported_models",
    "unet_structure",
]

logger = logging.getLogger(__name__)

#: key of the APPLY_MODEL wrapper on a patched ModelPatcher
WRAPPER_KEY = "diffusion_attn"
#: first ComfyUI release with ``optimized_attention_override`` (PR #9639, 2025-09-12)
MIN_COMFYUI = "0.3.60"

_APPLY_MODEL_ARGS = ("x", "t", "c_concat", "c_crossattn", "control", "transformer_options")


# ------------------------------------------------------------------------------------------------------
# Model families
# ------------------------------------------------------------------------------------------------------
def _ceil_grid(spatial, patch) -> tuple[int, ...]:
    return tuple(-(-int(s) // int(p)) for s, p in zip(spatial, patch))


def _read_flux(dm, x, context, extras):
    if extras.get("ref_latents") is not None:
        raise ValueError("Flux reference latents (Kontext) append tokens that are not part of the image grid; "
                         "grid attention patterns do not support them")
    p = int(dm.patch_size)
    return TokenLayout(_ceil_grid(x.shape[-2:], (p, p)), 0 if context is None else context.shape[1], "first"), ()


def _read_sd3(dm, x, context, extras):
    p = int(dm.patch_size)
    text = (0 if context is None else context.shape[1]) + int(getattr(dm, "register_length", 0) or 0)
    return TokenLayout(_ceil_grid(x.shape[-2:], (p, p)), text, "first"), ()


def _read_wan(dm, x, context, extras):
    pt, ph, pw = (int(p) for p in dm.patch_size)
    frames = -(-x.shape[2] // pt)
    extra_frames = extras.get("time_dim_concat")
    if extra_frames is not None:
        frames += -(-extra_frames.shape[2] // pt)
    grid_hw = _ceil_grid(x.shape[-2:], (ph, pw))
    ref = extras.get("reference_latent")
    if ref is not None and getattr(dm, "ref_conv", None) is not None:
        # WanModel prepends the reference image's tokens and gives them RoPE frame 0 (t_len += 1)
        if tuple(s // p for s, p in zip(ref.shape[-2:], (ph, pw))) != grid_hw:
            raise ValueError("a Wan reference latent of another size than the video is not one frame of the grid")
        frames += 1
    cross = set()
    if context is not None:
        cross.add(int(context.shape[1]))
    clip = extras.get("clip_fea")
    if clip is not None:
        cross.add(int(clip.shape[-2]))
    return TokenLayout((frames, *grid_hw), 0), tuple(cross)


def _read_hunyuan(dm, x, context, extras):
    if extras.get("ref_latent") is not None:
        raise ValueError("HunyuanVideo ref_latent inputs prepend tokens that are not part of the video grid; "
                         "grid attention patterns do not support them")
    patch = tuple(int(p) for p in dm.patch_size)
    text = 0 if context is None else context.shape[1]
    byt5 = extras.get("txt_byt5")
    if byt5 is not None and getattr(dm, "byt5_in", None) is not None:
        text += byt5.shape[1]
    return TokenLayout(_ceil_grid(x.shape[2:], patch), text, "last"), ()


def _check_hunyuan(dm) -> str | None:
    if len(getattr(dm, "patch_size", ())) != 3:
        return "HunyuanVideo-class models with 2-D patches (HunyuanImage 2.1) are not supported"
    return None


@dataclass(frozen=True)
class ComfyFamily:
    """A ComfyUI model family: ``name`` is the diffusers family name used in ``MethodSpec.families``."""

    name: str
    classes: tuple[str, ...]
    description: str
    kind: str  # "dit" (attention override) or "unet" (attn1 replace)
    read: Callable | None = None  # (diffusion_model, x, context, extras) -> (TokenLayout, cross-attn key lengths)
    check: Callable | None = None  # (diffusion_model) -> reason it is unsupported, or None


COMFY_FAMILIES: dict[str, ComfyFamily] = {f.name: f for f in (
    ComfyFamily("flux", ("Flux",), "FLUX.1 dev/schnell/Fill (comfy.ldm.flux.model.Flux): text first, double "
                "then single blocks", "dit", _read_flux),
    ComfyFamily("sd3", ("OpenAISignatureMMDITWrapper",), "SD 3 / 3.5 (comfy MMDiT joint blocks, text "
                "first; SD3.5-Medium's image-only second attention stays dense)", "dit", _read_sd3),
    ComfyFamily("wan", ("WanModel", "VaceWanModel", "CameraWanModel"), "Wan 2.1 / 2.2 T2V, I2V, FLF2V, TI2V-5B, "
                "VACE, Fun Camera (self-attention; cross-attention untouched)", "dit", _read_wan),
    ComfyFamily("hunyuanvideo", ("HunyuanVideo",), "HunyuanVideo T2V / I2V (video first, text last)", "dit",
                _read_hunyuan, _check_hunyuan),
    ComfyFamily("unet", ("UNetModel",), "SD 1.5 / 2.1 and SDXL UNets (attn1 of the transformer blocks)", "unet"),
)}


def detect_family(diffusion_model) -> ComfyFamily:
    """The family of a ComfyUI diffusion model, or a ValueError naming the supported classes."""
    name = type(diffusion_model).__name__
    for fam in COMFY_FAMILIES.values():
        if name in fam.classes:
            reason = fam.check(diffusion_model) if fam.check else None
            if reason:
                raise ValueError(f"diffusion_attn: {reason}")
            return fam
    supported = "; ".join(f"{f.description} [{', '.join(f.classes)}]" for f in COMFY_FAMILIES.values())
    raise ValueError(f"diffusion_attn does not support ComfyUI {name} models; supported: {supported}")


# ------------------------------------------------------------------------------------------------------
# Step index, masks
# ------------------------------------------------------------------------------------------------------
def step_index(transformer_options: dict) -> int | None:
    """0-based denoising step: where ``sigmas`` lies in ``sample_sigmas`` (None when either is missing)."""
    schedule = transformer_options.get("sample_sigmas")
    current = transformer_options.get("sigmas")
    if schedule is None or current is None:
        return None
    sigma = float(torch.as_tensor(current).detach().float().max())
    schedule = torch.as_tensor(schedule).detach().float().flatten().cpu()
    tol = 1e-5 * max(abs(sigma), 1e-3)
    return max(int((schedule >= sigma - tol).sum()) - 1, 0)


def key_padding_from_comfy_mask(mask, batch: int, seq: int) -> torch.Tensor | None:
    """A (B, S) keep-mask from a ComfyUI attention mask that only masks keys, else NotImplementedError.

    Accepts boolean masks (True = attend) and additive masks whose entries are 0 (keep) or very negative
    (drop), broadcastable as (b, 1, ..., 1, S) -- e.g. HunyuanVideo's text padding mask (1, 1, S).
    """
    if mask is None:
        return None
    m = torch.as_tensor(mask)
    if m.ndim == 0 or m.shape[-1] != seq or any(d != 1 for d in m.shape[1:-1]) or (m.ndim > 1 and m.shape[0] not in (1, batch)):
        raise NotImplementedError(
            f"attention masks of shape {tuple(m.shape)} (per-query or regional masks) are not supported by "
            "diffusion_attn patterns; only key-padding masks are")
    m = m.reshape(-1, seq)
    if m.dtype == torch.bool:
        keep = m
    else:
        keep = m == 0
        drop = (m <= -1e4) | torch.isneginf(m)
        if not bool((keep | drop).all()):
            raise NotImplementedError("additive attention biases are not supported by diffusion_attn patterns")
    return keep.expand(batch, seq)


# ------------------------------------------------------------------------------------------------------
# Method runtime: placement + pattern + the shared kernel
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComfySupport:
    """What a method needs beyond the generic runtime in ComfyUI.

    ``hidden``: spec parameters that are not node inputs (their values come from ``fixed`` or the spec);
    ``unet_targets(params, unet_layout)``: diffusers names of the transformer blocks whose attn1 the
    method replaces (None: all); ``call_overrides(params, layout, step, layer)``: per-call pattern
    parameters; ``note``: shown in the node description.
    """

    hidden: tuple[str, ...] = ()
    fixed: dict = field(default_factory=dict)
    unet_targets: Callable | None = None
    call_overrides: Callable | None = None
    note: str = ""


class MethodRuntime:
    """One node application: resolved params, placement, per-layout pattern/schedule cache."""

    def __init__(self, spec: MethodSpec, params: dict, support: ComfySupport | None = None):
        self.spec, self.params = spec, dict(params)
        self.support = support or ComfySupport()
        self.dense_layers = int(params.get("dense_layers") or 0)
        self.dense_steps = int(params.get("dense_steps") or 0)
        self.backend = params.get("backend") or "auto"
        self.cache: dict = {}

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; share, don't copy
        return self

    def dense_now(self, step: int | None, layer: int) -> bool:
        return layer < self.dense_layers or (step is not None and step < self.dense_steps)

    def _cached(self, key, build):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def attend(self, q, k, v, layout: TokenLayout, *, step: int | None, layer: int, key_padding_mask=None):
        """Attention on (B, S, heads, head_dim) tensors, or None where the call should stay dense."""
        if self.dense_now(step, layer):
            return None
        overrides = {}
        if self.support.call_overrides is not None:
            overrides = self.support.call_overrides(self.params, layout, step, layer)
        key = (layout.grid, tuple(sorted(overrides.items())))
        pattern = self._cached(("pattern", key), lambda: self.spec.grid_pattern(layout, **{**self.params, **overrides}))
        if pattern is None or pattern.is_full():
            return None
        return prepared_attention(q, k, v, pattern, layout, cached=self._cached, key=key,
                                  key_padding_mask=key_padding_mask, backend=self.backend)


def _upcast(q, k, v, attn_precision):
    if attn_precision == torch.float32 and q.dtype != torch.float32:
        return q.float(), k.float(), v.float()
    return q, k, v


# ------------------------------------------------------------------------------------------------------
# DiTs: APPLY_MODEL wrapper + optimized_attention_override
# ------------------------------------------------------------------------------------------------------
def _arg(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


class _DiTCall:
    """The ``optimized_attention_override`` of one model call (its layout, step and layer counter)."""

    def __init__(self, runtime: MethodRuntime, layout: TokenLayout, step: int | None, previous=None):
        self.runtime, self.layout, self.step, self.previous = runtime, layout, step, previous
        self.matched = 0

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
        skip_reshape = bool(_arg(args, kwargs, 6, "skip_reshape", False))
        seq_dim = 2 if skip_reshape else 1
        n = self.layout.num_tokens
        if q.ndim != (4 if skip_reshape else 3) or q.shape[seq_dim] != n or k.shape[seq_dim] != n:
            return self._passthrough(func, args, kwargs)
        layer = self.matched
        self.matched += 1
        if self.runtime.dense_now(self.step, layer):
            return self._passthrough(func, args, kwargs)
        heads = _arg(args, kwargs, 3, "heads")
        batch = q.shape[0]
        if skip_reshape:  # (B, heads, S, D)
            q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        else:  # (B, S, heads * D)
            q4, k4, v4 = (t.unflatten(-1, (int(heads), -1)) for t in (q, k, v))
        kpm = key_padding_from_comfy_mask(_arg(args, kwargs, 4, "mask"), batch, n)
        q4, k4, v4 = _upcast(q4, k4, v4, _arg(args, kwargs, 5, "attn_precision"))
        out = self.runtime.attend(q4, k4, v4, self.layout, step=self.step, layer=layer, key_padding_mask=kpm)
        if out is None:
            return self._passthrough(func, args, kwargs)
        out = out.to(v.dtype)
        if _arg(args, kwargs, 7, "skip_output_reshape", False):
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
        x = _arg(args, kwargs, 0, "x")
        context = _arg(args, kwargs, 3, "c_crossattn")
        options = _arg(args, kwargs, 5, "transformer_options") or {}
        extras = {k: v for k, v in kwargs.items() if k not in _APPLY_MODEL_ARGS}
        dm = executor.class_obj.diffusion_model
        layout, cross_lengths = self.family.read(dm, x, context, extras)
        if layout.text_len == 0 and layout.num_tokens in cross_lengths:
            raise ValueError(
                f"diffusion_attn: the {layout.describe()} video has as many tokens ({layout.num_tokens}) as a "
                f"cross-attention context, so self- and cross-attention cannot be told apart; change the size or length")
        options = dict(options)
        call = _DiTCall(self.runtime, layout, step_index(options), options.get("optimized_attention_override"))
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


# ------------------------------------------------------------------------------------------------------
# UNets: attn1 replace
# ------------------------------------------------------------------------------------------------------
def _transformer_depths(block):
    try:
        children = list(block)
    except TypeError:
        children = [block]
    found = [c for c in children if hasattr(c, "transformer_blocks")]
    if any(type(c).__name__ == "SpatialVideoTransformer" for c in found):
        raise ValueError("video UNets (SpatialVideoTransformer, e.g. SVD) are not supported")
    return [len(c.transformer_blocks) for c in found]


def unet_structure(dm):
    """``(blocks, attention_levels)`` of a ComfyUI ``UNetModel``.

    ``blocks``: ``((block_name, id, transformer_index), diffusers_block_name)`` for every transformer
    block, in diffusers' attn1 order (down blocks, up blocks, mid block); ``attention_levels``: per
    resolution level, whether its down blocks have attention.
    """
    nrb = [int(n) for n in dm.num_res_blocks]
    levels = len(nrb)
    input_map, idx = {}, 1
    for level in range(levels):
        for a in range(nrb[level]):
            input_map[idx] = (level, a)
            idx += 1
        idx += level != levels - 1  # downsampler
    output_map, idx = {}, 0
    for up, level in enumerate(reversed(range(levels))):
        for a in range(nrb[level] + 1):
            output_map[idx] = (up, a)
            idx += 1
    down, up, mid = [], [], []
    has_attn = [False] * levels
    for i, block in enumerate(dm.input_blocks):
        for depth in _transformer_depths(block):
            if i not in input_map:
                raise ValueError(f"unexpected transformer in UNet input block {i}")
            level, a = input_map[i]
            has_attn[level] = True
            down += [(("input", i, t), f"down_blocks.{level}.attentions.{a}.transformer_blocks.{t}") for t in range(depth)]
    if getattr(dm, "middle_block", None) is not None:
        for depth in _transformer_depths(dm.middle_block):
            mid += [(("middle", 0, t), f"mid_block.attentions.0.transformer_blocks.{t}") for t in range(depth)]
    for i, block in enumerate(dm.output_blocks):
        for depth in _transformer_depths(block):
            if i not in output_map:
                raise ValueError(f"unexpected transformer in UNet output block {i}")
            u, a = output_map[i]
            up += [(("output", i, t), f"up_blocks.{u}.attentions.{a}.transformer_blocks.{t}") for t in range(depth)]
    return down + up + mid, tuple(has_attn)


_UNET_LAYOUTS = {(True, True, True, False): "sd15", (False, True, True): "sdxl"}


def _unet_grid(extra_options: dict, tokens: int) -> tuple[int, int]:
    shape = extra_options.get("activations_shape")
    if shape is not None and int(shape[-2]) * int(shape[-1]) == tokens:
        return int(shape[-2]), int(shape[-1])
    original = extra_options.get("original_shape")
    if original is None:
        raise ValueError("diffusion_attn: the UNet level's feature size is unknown (no activations_shape/original_shape)")
    return level_grid(tuple(int(s) for s in original[-2:]), tokens)


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
        layout = TokenLayout(_unet_grid(extra_options, tokens), 0)
        q4, k4, v4 = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        q4, k4, v4 = _upcast(q4, k4, v4, extra_options.get("attn_precision"))
        out = self.runtime.attend(q4, k4, v4, layout, step=step_index(extra_options), layer=self.layer)
        if out is None:
            return self._dense(q, k, v, heads, extra_options)
        return out.to(v.dtype).reshape(batch, tokens, -1)


# ------------------------------------------------------------------------------------------------------
# Per-method support
# ------------------------------------------------------------------------------------------------------
def _hidiffusion_targets(params, unet_layout):
    from ..processors.hidiffusion import WINDOW_BLOCKS

    requested = params.get("model_variant") or "auto"
    if unet_layout is None:
        raise ValueError("hidiffusion supports SD 1.5 / 2.1 UNets (attention in the first three levels) and SDXL "
                         "UNets (attention in levels 1 and 2); this UNet has neither layout")
    if requested != "auto" and requested.split("-")[0] != unet_layout:
        raise ValueError(f"model_variant={requested!r} does not match this UNet, which has the {unet_layout} layout; "
                         f"use {unet_layout!r} or 'auto'")
    return WINDOW_BLOCKS[unet_layout if requested == "auto" else requested]


def _hidiffusion_shift(params, layout, step, layer):
    from ..processors.hidiffusion import choose_shift

    return {"shift": choose_shift(layout.grid, shift=params.get("shift"), seed=params.get("seed"),
                                  step=step or 0, layer=layer, branch=0)}


SUPPORT: dict[str, ComfySupport] = {
    "hidiffusion": ComfySupport(
        hidden=("apply_raunet", "apply_window_attn", "t1_ratio", "t2_ratio", "aggressive", "num_steps"),
        fixed={"apply_raunet": False, "apply_window_attn": True},
        unet_targets=_hidiffusion_targets,
        call_overrides=_hidiffusion_shift,
        note="ComfyUI node: MSW-MSA only (attn1 replace in the official blocks); RAU-Net is not included "
             "(ComfyUI's PatchModelAddDownscale node is the nearest built-in). Seeded shifts hash (seed, step, "
             "layer) with CFG branch 0 whether ComfyUI batches cond/uncond or not.",
    ),
}


# ------------------------------------------------------------------------------------------------------
# Applying a method to a ModelPatcher
# ------------------------------------------------------------------------------------------------------
def _diffusion_model(model):
    getter = getattr(model, "get_model_object", None)
    if getter is not None:
        try:
            return getter("diffusion_model")
        except (AttributeError, KeyError):
            pass
    return model.model.diffusion_model


def _require_override_support():
    import comfy.ldm.modules.attention as attention

    if not hasattr(attention, "wrap_attn"):
        raise RuntimeError(f"diffusion_attn needs ComfyUI >= {MIN_COMFYUI} (optimized_attention_override, "
                           "Comfy-Org/ComfyUI PR #9639) for DiT models; please update ComfyUI")


def _already_applied(model) -> bool:
    getter = getattr(model, "get_wrappers", None)
    if getter is not None:
        from comfy.patcher_extension import WrappersMP

        if getter(WrappersMP.APPLY_MODEL, WRAPPER_KEY):
            return True
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    return any(isinstance(p, UNetAttn1Patch) for p in replaced.values())


def apply_method(model, spec: MethodSpec, params: dict | None = None, defaults_for: str | None = "auto"):
    """A clone of ComfyUI ``model`` (a ModelPatcher) with ``spec``'s attention; ``model`` is unchanged.

    ``params``: user values (missing ones take the defaults of ``defaults_for``: a key of
    ``spec.family_defaults``, or ``auto`` = the detected model family).
    """
    support = SUPPORT.get(spec.name, ComfySupport())
    if spec.grid_pattern is None:
        raise ValueError(f"method {spec.name!r} has no attention pattern; it is not available as a ComfyUI node")
    dm = _diffusion_model(model)
    family = detect_family(dm)
    if family.name not in spec.families:
        raise ValueError(f"method {spec.name!r} supports {', '.join(spec.families)} models; this ComfyUI model is "
                         f"{type(dm).__name__} ({family.description})")
    if _already_applied(model):
        raise ValueError("a diffusion_attn method is already applied to this model; use one Apply node per model")
    variant = family.name if defaults_for in (None, "", "auto") else defaults_for
    resolved = spec.resolve({**(params or {}), **support.fixed}, variant)
    runtime = MethodRuntime(spec, resolved, support)
    if family.kind == "dit":
        _require_override_support()
        from comfy.patcher_extension import WrappersMP

        patched = model.clone()
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, DiTPatch(runtime, family))
        return patched
    blocks, levels = unet_structure(dm)
    unet_layout = _UNET_LAYOUTS.get(levels)
    targets = None
    if support.unet_targets is not None:
        targets = set(support.unet_targets(resolved, unet_layout))
        missing = sorted(targets - {name for _, name in blocks})
        if missing:
            raise ValueError(f"this UNet lacks the blocks {', '.join(missing)} that {spec.name} patches")
    patched = model.clone()
    for layer, (key, name) in enumerate(blocks):
        if targets is None or name in targets:
            patched.set_model_attn1_replace(UNetAttn1Patch(runtime, layer), key[0], key[1], key[2])
    return patched


def supported_models(spec: MethodSpec) -> list[str]:
    """Descriptions of the ComfyUI models a method runs on."""
    return [f.description for f in COMFY_FAMILIES.values() if f.name in spec.families]
