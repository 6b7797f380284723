"""Generation: (model, method, parameters, prompt, seed, sizes) -> frames, timings and the metadata that
reproduces the run."""

from __future__ import annotations

import copy
import math
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .backends import _UNET_BACKEND_MESSAGE, _check_backend_name, _set_attention_backend
from .loading import _torch_dtype, check_device, get_pipeline

__all__ = ["GenerationResult", "generate", "jsonable", "adapter_family", "check_method", "IMAGE_FAMILIES",
           "VIDEO_FAMILIES", "MIN_STEPS"]

#: model families (as :func:`diffusion_attn.models.model_family` names them) whose output is one image
IMAGE_FAMILIES = ("flux", "sd3", "unet-sd15", "unet-sdxl")
#: model families whose output is a video
VIDEO_FAMILIES = ("wan", "hunyuanvideo", "mochi")
#: fewest denoising steps a family's pipeline runs: Mochi's linear-quadratic sigma schedule splits the
#: steps into a linear and a quadratic half and divides by the linear half's length (0 at one step)
MIN_STEPS = {"mochi": 2}
#: one generation at a time: apply/remove mutate the (shared, cached) pipeline
_RUN_LOCK = threading.RLock()


@dataclass
class GenerationResult:
    """One generation.

    ``frames``: PIL images (one for an image model, one per frame for a video model); ``params``: the
    method's resolved parameters (JSON-able; ``{}`` for ``method="none"``); ``seconds``: the whole
    pipeline call; ``seconds_per_step``: the denoising loop only (first denoiser call to the last step's
    end) divided by the number of steps; ``meta``: everything needed to reproduce the run (what
    :func:`save` writes next to the output).
    """

    frames: list
    is_video: bool
    family: str
    method: str
    params: dict
    seconds: float
    seconds_per_step: float
    meta: dict = field(default_factory=dict)

    @property
    def image(self):
        """The first (for images: the only) frame."""
        return self.frames[0]


# ------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------


def jsonable(value):
    """``value`` as plain JSON data (tuples -> lists, inf/nan and other objects -> strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def adapter_family(family: str) -> str:
    """A :func:`model_family` name as the method specs name it (``unet-sdxl`` -> ``unet``)."""
    return "unet" if family.startswith("unet") else family


def check_method(method: str, family: str | None):
    """The method's spec (None for "none"); fails early when the method does not support ``family``."""
    if method in (None, "none"):
        return None
    from ..registry import get_method

    spec = get_method(method)
    if family is not None and adapter_family(family) not in spec.families:
        raise ValueError(f"method {spec.name!r} does not support {family} models; supported families: {', '.join(spec.families)}")
    return spec


def default_steps(model) -> int:
    """The denoising steps ``generate`` runs when none are given: a trained embedded model's own default
    (20-25, :data:`diffusion_attn.models.world.WORLD_MODELS`), else 4."""
    from ..models import EMBEDDED_MODELS, default_call_kwargs

    name = model if isinstance(model, str) else getattr(model, "_diffusion_attn_embedded", None)
    if name in EMBEDDED_MODELS and EMBEDDED_MODELS[name].trained:
        return int(default_call_kwargs(name)["num_inference_steps"])
    return 4


def size_multiple(pipe, family: str) -> int:
    """The multiple of pixels a pipeline's height and width must be: the VAE's spatial factor times the
    denoiser's patch size (Flux packs 2 x 2 latents; a UNet takes any latent size)."""
    denoiser = getattr(pipe, "transformer", None)
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", 0) or getattr(pipe, "vae_scale_factor", 0) or 8)
    if family == "flux":
        return spatial * 2
    if family.startswith("unet") or denoiser is None:
        return spatial
    patch = denoiser.config.get("patch_size", 1) if hasattr(denoiser.config, "get") else 1
    patch = patch[-1] if isinstance(patch, (list, tuple)) else (patch or 1)
    return spatial * int(patch)


def _check_size(pipe, family: str, height, width) -> None:
    multiple = size_multiple(pipe, family)
    for key, value in (("height", height), ("width", width)):
        if value is not None and int(value) % multiple:
            low = max(multiple, int(value) // multiple * multiple)
            raise ValueError(f"{key}={int(value)} does not fit this {family} model: height and width must be "
                             f"multiples of {multiple} px (VAE downsampling x patch size); nearest: {low} or "
                             f"{low + multiple}")


def _check_steps(family: str | None, steps) -> None:
    need = MIN_STEPS.get(family, 1)
    if int(steps) < need:
        raise ValueError(f"{family} pipelines need at least {need} denoising steps (Mochi's sigma schedule divides "
                         f"by half the step count), got steps={int(steps)}")


def _versions() -> dict:
    import diffusers
    import torch

    from .. import __version__

    return {"diffusion_attn": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def _to_frames(output) -> tuple[list, bool]:
    """Pipeline output (``output_type="pt"``: (B, C, H, W) images or (B, F, C, H, W) videos in [0, 1])
    -> (PIL frames of the first sample, is_video)."""
    import numpy as np
    from PIL import Image

    arr = output.detach().float().cpu().numpy() if hasattr(output, "detach") else np.asarray(output, dtype=np.float32)
    if arr.ndim == 4:
        frames, is_video = arr[:1], False
    elif arr.ndim == 5:
        frames, is_video = arr[0], True
    else:
        raise ValueError(f"unexpected pipeline output shape {arr.shape}")
    to8 = lambda f: Image.fromarray((f.transpose(1, 2, 0).clip(0, 1) * 255).round().astype("uint8"))  # noqa: E731
    return [to8(f) for f in frames], is_video


def _accepts(pipe, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _model_name(model) -> str:
    if isinstance(model, str):
        return model
    return getattr(model, "name_or_path", None) or type(model).__name__


def generate(
    model,
    method: str = "none",
    params: dict | None = None,
    *,
    prompt: str,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    dtype="float32",
    device: str = "cpu",
    attention_backend: str | None = None,
    callback: Callable[[int, int], None] | None = None,
    placement=None,
) -> GenerationResult:
    """Run ``model`` with ``method`` applied and return the frames, timings and reproduction metadata.

    ``model``: an embedded tiny model name (``tiny-wan``, ...), a hub id or local folder (loaded once and
    cached), or a diffusers pipeline object. ``method``: a registered method or ``"none"`` (stock
    attention); ``params``: its parameters (validated against the spec; defaults per model family).
    ``height`` / ``width`` / ``num_frames`` / ``guidance_scale``: ``None`` keeps the defaults -- the
    small sizes of :func:`diffusion_attn.models.default_call_kwargs` for embedded tiny models, the
    pipeline's own defaults for real checkpoints and pipeline objects; ``num_frames`` is for video models
    only (an error on image models). ``attention_backend``: one of :func:`attention_backends`, set on the
    denoiser(s) with ``set_attention_backend`` for this call and restored afterwards (dense layers and the
    stock processors use it). ``callback(step_index, total)`` is called after every denoising step
    (``step_index`` 0-based, so ``step_index + 1`` of ``total`` steps are done); while a callback is
    given, the pipeline's own tqdm bar is off. ``placement``: a :class:`~diffusion_attn.placement.Placement`
    for the method (see :func:`diffusion_attn.apply`); ignored for ``"none"``.

    The method is removed again before returning (also on errors), so a cached pipeline stays stock.
    Raises ``ValueError`` for bad methods, parameters and sizes, ``OSError`` when a model cannot load.
    """
    import torch

    from ..api import apply, denoisers
    from ..models import EMBEDDED_MODELS, default_call_kwargs, model_family

    method = method or "none"
    params = {k: v for k, v in (params or {}).items() if v is not None}  # None = "default", as in the UI
    if method == "none" and params:
        raise ValueError(f"method 'none' takes no parameters, got {', '.join(params)}")
    if steps is None:  # a trained embedded model's own step count; 4 otherwise
        steps = default_steps(model)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    # fail before loading anything when we can tell the family from the name
    early_family = EMBEDDED_MODELS[model].family if isinstance(model, str) and model in EMBEDDED_MODELS else None
    spec = check_method(method, early_family)
    _check_steps(early_family, steps)
    if isinstance(model, str):
        check_device(device)
    if attention_backend is not None:
        _check_backend_name(attention_backend)
        if early_family is not None and early_family.startswith("unet"):
            raise ValueError(_UNET_BACKEND_MESSAGE.format(name="UNet2DConditionModel"))

    pipe = get_pipeline(model, dtype, device) if isinstance(model, str) else model
    family = model_family(pipe)
    if spec is not None:
        check_method(method, family)
    _check_steps(family, steps)
    _check_size(pipe, family, height, width)
    is_video_family = family in VIDEO_FAMILIES
    overrides: dict[str, Any] = {"num_inference_steps": int(steps)}
    for key, value in (("height", height), ("width", width), ("guidance_scale", guidance_scale)):
        if value is not None:
            overrides[key] = value
    if num_frames is not None:
        if not is_video_family:
            raise ValueError(f"num_frames is for video models; {_model_name(model)} is an image model ({family})")
        overrides["num_frames"] = int(num_frames)
    if getattr(pipe, "_diffusion_attn_embedded", None):
        call_kwargs = default_call_kwargs(pipe._diffusion_attn_embedded, **overrides)  # the tiny models' sizes
        if not is_video_family:
            call_kwargs.pop("num_frames", None)
    else:  # a real checkpoint: its pipeline's own defaults for everything not given
        call_kwargs = overrides
    call_kwargs["output_type"] = "pt"

    models = denoisers(pipe)
    gen_device = device if isinstance(model, str) else getattr(pipe, "device", "cpu")
    times: dict[str, float] = {}
    done = [0]

    def on_step_end(p, i, t, callback_kwargs):
        times["last"] = time.perf_counter()
        done[0] = i + 1
        if callback is not None:
            callback(int(i), int(getattr(p, "num_timesteps", None) or steps))
        return callback_kwargs

    def first_call(module, args, kwargs=None):
        times.setdefault("first", time.perf_counter())

    with _RUN_LOCK:
        handle = None
        restore_backend = None
        hooks = []
        bar_config = copy.deepcopy(getattr(pipe, "_progress_bar_config", None))
        try:
            handle = apply(pipe, method, placement=placement, **params) if spec is not None else None
            if attention_backend is not None:
                restore_backend = _set_attention_backend(models, attention_backend)
            hooks = [m.register_forward_pre_hook(first_call) for m in models]
            if callback is not None:
                pipe.set_progress_bar_config(disable=True)
            generator = torch.Generator(str(gen_device)).manual_seed(int(seed))
            start = time.perf_counter()
            if _accepts(pipe, "callback_on_step_end"):
                call_kwargs_run = dict(call_kwargs, callback_on_step_end=on_step_end)
            else:  # an old-style pipeline: no per-step callback, timing over the whole call
                call_kwargs_run = call_kwargs
            output = pipe(prompt=prompt, generator=generator, **call_kwargs_run)[0]
            seconds = time.perf_counter() - start
        finally:
            for h in hooks:
                h.remove()
            if bar_config is None:
                pipe.__dict__.pop("_progress_bar_config", None)
            else:
                pipe._progress_bar_config = bar_config
            resolved = dict(handle.params) if handle is not None else {}
            try:
                if restore_backend is not None:
                    restore_backend()
            finally:
                if handle is not None:
                    handle.remove()

    frames, is_video = _to_frames(output)
    n_steps = done[0] or int(steps)
    loop = times["last"] - times["first"] if "last" in times and "first" in times else seconds
    params_out = jsonable(resolved)
    meta = {
        "method": method if spec is None else spec.name,
        "params": params_out,
        "model": _model_name(model),
        "family": family,
        "prompt": prompt,
        "seed": int(seed),
        "steps": int(steps),
        "dtype": str(_torch_dtype(dtype) if isinstance(model, str) else getattr(pipe, "dtype", "")).replace("torch.", ""),
        "device": str(gen_device),
        "attention_backend": attention_backend,
        "placement": None if placement is None or spec is None else placement.describe(),
        "call_kwargs": jsonable({k: v for k, v in call_kwargs.items() if k != "output_type"}),
        "size": {"width": frames[0].width, "height": frames[0].height, "frames": len(frames)},
        "seconds": round(seconds, 4),
        "seconds_per_step": round(loop / n_steps, 5),
        "versions": _versions(),
    }
    return GenerationResult(frames=frames, is_video=is_video, family=family, method=meta["method"], params=params_out,
                            seconds=seconds, seconds_per_step=loop / n_steps, meta=meta)
