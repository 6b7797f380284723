"""Applying a method to a ComfyUI ``MODEL`` (a ``ModelPatcher``): the entry point of the nodes.

The pieces, by responsibility (nothing imports ``comfy`` at module level; the few ComfyUI names used --
``WrappersMP``, ``optimized_attention`` -- are imported when a node runs):

* :mod:`.families` -- the ComfyUI model families: detection by class, the token-layout readers, the UNet
  block structure;
* :mod:`.runtime` -- placement (layers, step windows: :func:`~.runtime.in_step_window`), the pattern per
  layout and the shared kernel (``MethodSpec.grid_pattern`` +
  :func:`diffusion_attn.kernels.prepared_attention`, per-layout caches);
* :mod:`.dit` -- Flux, SD3, Wan, HunyuanVideo: an ``APPLY_MODEL`` wrapper + ``optimized_attention_override``
  (ComfyUI >= 0.3.60);
* :mod:`.unet` -- SD 1.5 / 2.1, SDXL: ``attn1`` replace patches (+ an ``APPLY_MODEL`` wrapper for the
  step window);
* here -- per-method support (:data:`SUPPORT`) and :func:`apply_method`, which checks everything that can
  be known before sampling (model family, parameters, tuple ranks, the backend on the model's device)
  and patches a clone.

File references are to Comfy-Org/ComfyUI; checked against ComfyUI 0.3.64 (see
``benchmarks/comfy_real_check.py``).
"""

from __future__ import annotations

import math

import torch

from ..kernels import choose_backend
from ..layout import TokenLayout
from ..registry import MethodSpec
from .dit import DiTCall, DiTPatch
from ..adapters.comfy import COMFY_FAMILIES, UNET_LAYOUTS, ComfyFamily, detect_family, unet_structure
from .runtime import (
    CallPlacement,
    ComfySupport,
    MethodRuntime,
    check_percents,
    in_step_window,
    key_padding_from_comfy_mask,
    step_index,
)
from .unet import PLACEMENT_KEY, UNetAttn1Patch, UNetPlacementPatch

__all__ = [
    "COMFY_FAMILIES",
    "CallPlacement",
    "ComfyFamily",
    "ComfySupport",
    "DiTCall",
    "DiTPatch",
    "MIN_COMFYUI",
    "MethodRuntime",
    "PLACEMENT_KEY",
    "SUPPORT",
    "comfy_methods",
    "UNetAttn1Patch",
    "UNetPlacementPatch",
    "WRAPPER_KEY",
    "apply_method",
    "check_backend",
    "detect_family",
    "in_step_window",
    "key_padding_from_comfy_mask",
    "step_index",
    "supported_models",
    "unet_structure",
]

#: key of the APPLY_MODEL wrapper on a patched ModelPatcher
WRAPPER_KEY = "diffusion_attn"
#: first ComfyUI release with ``optimized_attention_override`` (PR #9639, 2025-09-12)
MIN_COMFYUI = "0.3.60"


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
             "(ComfyUI's PatchModelAddDownscale node is the nearest built-in). Seeded shifts hash (seed, step within "
             "the sampler run, layer) with CFG branch 0 whether ComfyUI batches cond/uncond or not.",
    ),
    "agent": ComfySupport(
        unavailable="token merging changes the number of tokens around attn1 inside each transformer block, and "
                    "the ComfyUI runtime replaces the attention op only; ComfyUI's built-in TomePatchModel node "
                    "gives the ToMe half",
    ),
    "freeswim": ComfySupport(
        unavailable="the dual path (a full-attention branch in the batch whose cross-attention replaces the window "
                    "branch's) wraps the whole denoiser, and the ComfyUI runtime replaces the attention op only; use "
                    "diffusion_attn.pipelines.freeswim_generate with diffusers",
    ),
    "clear": ComfySupport(
        unavailable="CLEAR needs its distilled attention weights loaded into to_q/k/v/out (and, with down_factor > 1, "
                    "trainable pooled keys merged by log-sum-exp), and the ComfyUI runtime replaces the attention "
                    "op only; use diffusion_attn.apply(pipe, 'clear', weights=...) with diffusers",
    ),
}


def comfy_methods() -> dict:
    """The registered methods that have a ComfyUI node, by name: those with an attention pattern that
    the ComfyUI runtime can run and no ``unavailable`` reason in :data:`SUPPORT`."""
    from ..registry import methods

    return {name: spec for name, spec in methods().items()
            if spec.grid_pattern is not None and not SUPPORT.get(name, ComfySupport()).unavailable}


def unavailable_methods() -> dict[str, str]:
    """The registered methods without a ComfyUI node, with the reason."""
    from ..registry import methods

    have = comfy_methods()
    return {name: SUPPORT.get(name, ComfySupport()).unavailable or "it has no attention pattern for the ComfyUI runtime"
            for name in methods() if name not in have}


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



#: backends whose fitness for a pattern and device is checked when the node runs (``auto``, ``gather`` and
#: ``reference`` run every pattern; ``dense`` depends on whether the grid makes the pattern full)
_CHECKED_BACKENDS = ("windows", "strips", "flex", "triton", "natten", "xformers")
_PROBE_AXIS = 16


def _probe_layout(spec: MethodSpec, params: dict, family: ComfyFamily) -> TokenLayout:
    """A grid of the family's rank that every tuple parameter fits (each axis a multiple of the product of
    the parameters' values on it), for the checks that do not depend on the real grid."""
    rank = family.grid_rank
    axes = []
    for axis in range(rank):
        m = 1
        for p in spec.params:
            value = params.get(p.name)
            if p.type is tuple and value:
                m *= int(value[axis] if len(value) == rank else value[0])
        axes.append(m * math.ceil(_PROBE_AXIS / m))
    return TokenLayout(tuple(axes), 0)


def _model_device(model):
    device = getattr(model, "load_device", None)
    try:
        return torch.device(device) if device is not None else torch.device("cpu")
    except (TypeError, RuntimeError):
        return torch.device("cpu")


def check_backend(spec: MethodSpec, params: dict, family: ComfyFamily, device=None) -> None:
    """Refuse, when the node runs, a backend that cannot serve the method's pattern on ``device`` (it would
    otherwise fail at the first sampler step): the pattern is built on a probe grid of the family's rank."""
    backend = params.get("backend") or "auto"
    if backend not in _CHECKED_BACKENDS or spec.grid_pattern is None:
        return
    layout = _probe_layout(spec, params, family)
    try:
        pattern = spec.grid_pattern(layout, **params)
    except ValueError:  # depends on the real grid: checked at the first model call, naming the grid
        return
    if pattern is None or pattern.is_full():
        return
    try:
        choose_backend(pattern, layout, backend, device)
    except (ValueError, RuntimeError, ImportError) as e:
        accepted = ", ".join(spec.param("backend").choices or ())
        raise ValueError(f"{spec.name}: backend={backend!r} cannot run this method on {torch.device(device or 'cpu').type}: "
                         f"{e} (accepted backends: {accepted})") from None


def apply_method(model, spec: MethodSpec, params: dict | None = None, defaults_for: str | None = "auto", *,
                 start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of ComfyUI ``model`` (a ModelPatcher) with ``spec``'s attention; ``model`` is unchanged.

    ``params``: user values (missing ones take the defaults of ``defaults_for``: a key of
    ``spec.family_defaults``, or ``auto`` = the detected model family). ``start_percent`` /
    ``end_percent``: the part of the denoising schedule where the method runs (ComfyUI's percent
    convention, see :mod:`.runtime`). Everything that can be known here is checked here.
    """
    support = SUPPORT.get(spec.name, ComfySupport())
    if spec.grid_pattern is None:
        raise ValueError(f"method {spec.name!r} has no attention pattern; it is not available as a ComfyUI node")
    start_percent, end_percent = check_percents(start_percent, end_percent)
    dm = _diffusion_model(model)
    family = detect_family(dm)
    if family.name not in spec.families:
        raise ValueError(f"method {spec.name!r} supports {', '.join(spec.families)} models; this ComfyUI model is "
                         f"{type(dm).__name__} ({family.description})")
    if _already_applied(model):
        raise ValueError("a diffusion_attn method is already applied to this model; use one Apply node per model")
    variant = family.name if defaults_for in (None, "", "auto") else defaults_for
    # the config's checks, the family's grid rank included (as diffusion_attn.apply makes them)
    resolved = spec.make_config({**(params or {}), **support.fixed}, variant, family=family.name).to_dict()
    check_backend(spec, resolved, family, _model_device(model))
    runtime = MethodRuntime(spec, resolved, support, start_percent=start_percent, end_percent=end_percent)
    from comfy.patcher_extension import WrappersMP

    if family.kind == "dit":
        _require_override_support()
        patched = model.clone()
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, DiTPatch(runtime, family))
        return patched
    blocks, levels = unet_structure(dm)
    unet_layout = UNET_LAYOUTS.get(levels)
    targets = None
    if support.unet_targets is not None:
        targets = set(support.unet_targets(resolved, unet_layout))
        missing = sorted(targets - {name for _, name in blocks})
        if missing:
            raise ValueError(f"this UNet lacks the blocks {', '.join(missing)} that {spec.name} patches")
    patched = model.clone()
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, UNetPlacementPatch(runtime))
    for layer, (key, name) in enumerate(blocks):
        if targets is None or name in targets:
            patched.set_model_attn1_replace(UNetAttn1Patch(runtime, layer), key[0], key[1], key[2])
    return patched


def supported_models(spec: MethodSpec) -> list[str]:
    """Descriptions of the ComfyUI models a method runs on."""
    return [f.description for f in COMFY_FAMILIES.values() if f.name in spec.families]
