"""Generate with a method applied, and save the result with everything needed to reproduce it.

The one place that turns (model, method, parameters, prompt, seed, sizes) into frames; the CLI, the
Gradio UI and the examples call it::

    from diffusion_attn.runner import generate, save
    result = generate("tiny-wan", "radial", {"dense_steps": 0}, prompt="a fox in the snow", steps=2)
    save(result, "outputs/radial")          # outputs/radial.mp4 (or .gif) + outputs/radial.json

Loaded pipelines are kept in a small LRU cache keyed by (model, dtype, device), so repeated calls (the UI)
do not rebuild them; the method is always removed again after the call, so a cached pipeline stays stock.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import platform
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "GenerationResult",
    "generate",
    "save",
    "get_pipeline",
    "clear_cache",
    "set_cache_size",
    "attention_backends",
    "video_encoder_available",
    "IMAGE_FAMILIES",
    "VIDEO_FAMILIES",
    "DTYPES",
]

#: model families (as :func:`diffusion_attn.models.model_family` names them) whose output is one image
IMAGE_FAMILIES = ("flux", "sd3", "unet-sd15", "unet-sdxl")
#: model families whose output is a video
VIDEO_FAMILIES = ("wan", "hunyuanvideo", "mochi")
#: accepted ``dtype`` strings (the ``diffusers-cli run`` spellings) -> torch dtype name
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
#: frames per second of saved videos, per family (the models' native rates)
FPS = {"wan": 16, "hunyuanvideo": 24, "mochi": 30}


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
# Pipeline cache
# ------------------------------------------------------------------------------------------------------

_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_CACHE_SIZE = 2
_CACHE_LOCK = threading.RLock()
#: one generation at a time: apply/remove mutate the (shared, cached) pipeline
_RUN_LOCK = threading.RLock()


def set_cache_size(n: int) -> None:
    """Keep at most ``n`` loaded pipelines (default 2); 0 disables caching."""
    global _CACHE_SIZE
    with _CACHE_LOCK:
        _CACHE_SIZE = max(0, int(n))
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)


def clear_cache() -> None:
    """Drop every cached pipeline."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


def get_pipeline(model: str, dtype="float32", device: str = "cpu"):
    """The pipeline for ``model`` (embedded tiny model name, hub id or local folder), from the cache or
    loaded with :func:`diffusion_attn.models.load_pipeline` and cached."""
    from .models import EMBEDDED_MODELS, load_pipeline

    tdtype = _torch_dtype(dtype)
    key = (model, str(tdtype).replace("torch.", ""), str(device))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    pipe = load_pipeline(model, dtype=tdtype, device=device)
    if model in EMBEDDED_MODELS:
        pipe._diffusion_attn_embedded = model  # generate() then uses the tiny models' small call sizes
    with _CACHE_LOCK:
        if _CACHE_SIZE > 0:
            _CACHE[key] = pipe
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return pipe


# ------------------------------------------------------------------------------------------------------
# Attention backend (diffusers' dispatcher)
# ------------------------------------------------------------------------------------------------------


def attention_backends() -> list[str]:
    """The backend names diffusers' attention dispatcher accepts (``model.set_attention_backend``)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted(b.value for b in AttentionBackendName)


_UNET_BACKEND_MESSAGE = ("attention backends are not supported by {name}: its attention processors do not go through "
                         "diffusers' attention dispatcher (UNet pipelines use the legacy attention path); omit the attention backend")


def _check_backend_name(backend: str) -> None:
    accepted = attention_backends()
    if not isinstance(backend, str) or backend.lower() not in accepted:
        from .registry import suggest

        hint = suggest(backend.lower(), accepted) if isinstance(backend, str) else ""
        raise ValueError(f"unknown attention backend {backend!r}{hint}; accepted: {', '.join(accepted)}")


def _set_attention_backend(models: list, backend: str) -> Callable[[], None]:
    """Set ``backend`` on every denoiser; returns the function that restores the previous state (each
    processor's ``_attention_backend`` and the dispatcher's active backend)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    _check_backend_name(backend)
    missing = object()
    saved_procs = []
    for m in models:
        if not hasattr(m, "set_attention_backend"):
            raise ValueError(f"{type(m).__name__} has no set_attention_backend; attention backends need diffusers >= 0.35")
        procs = [mod.processor for mod in m.modules() if getattr(mod, "processor", None) is not None]
        procs = [p for p in procs if hasattr(p, "_attention_backend")]
        if not procs:
            raise ValueError(_UNET_BACKEND_MESSAGE.format(name=type(m).__name__))
        saved_procs.extend((p, p.__dict__.get("_attention_backend", missing)) for p in procs)
    saved_active = _AttentionBackendRegistry._active_backend

    def restore() -> None:
        for p, value in saved_procs:
            if value is missing:
                p.__dict__.pop("_attention_backend", None)
            else:
                p._attention_backend = value
        _AttentionBackendRegistry._active_backend = saved_active

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for m in models:
                m.set_attention_backend(backend.lower())
    except (RuntimeError, ImportError) as e:
        restore()
        raise ValueError(f"attention backend {backend!r} cannot be used here: {e}") from None
    except BaseException:
        restore()
        raise
    return restore


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
    from .registry import get_method

    spec = get_method(method)
    if family is not None and adapter_family(family) not in spec.families:
        raise ValueError(f"method {spec.name!r} does not support {family} models; supported families: {', '.join(spec.families)}")
    return spec


def _versions() -> dict:
    import diffusers
    import torch

    from . import __version__

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
    steps: int = 4,
    guidance_scale: float | None = None,
    seed: int = 0,
    dtype="float32",
    device: str = "cpu",
    attention_backend: str | None = None,
    callback: Callable[[int, int], None] | None = None,
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
    given, the pipeline's own tqdm bar is off.

    The method is removed again before returning (also on errors), so a cached pipeline stays stock.
    Raises ``ValueError`` for bad methods, parameters and sizes, ``OSError`` when a model cannot load.
    """
    import torch

    from .api import apply, denoisers
    from .models import EMBEDDED_MODELS, default_call_kwargs, model_family

    method = method or "none"
    params = {k: v for k, v in (params or {}).items() if v is not None}  # None = "default", as in the UI
    if method == "none" and params:
        raise ValueError(f"method 'none' takes no parameters, got {', '.join(params)}")
    if steps is None or int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    # fail before loading anything when we can tell the family from the name
    early_family = EMBEDDED_MODELS[model].family if isinstance(model, str) and model in EMBEDDED_MODELS else None
    spec = check_method(method, early_family)
    if attention_backend is not None:
        _check_backend_name(attention_backend)
        if early_family is not None and early_family.startswith("unet"):
            raise ValueError(_UNET_BACKEND_MESSAGE.format(name="UNet2DConditionModel"))

    pipe = get_pipeline(model, dtype, device) if isinstance(model, str) else model
    family = model_family(pipe)
    if spec is not None:
        check_method(method, family)
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
        call_kwargs = default_call_kwargs(family, **overrides)  # the tiny models' small sizes
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
            handle = apply(pipe, method, **params) if spec is not None else None
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
        "call_kwargs": jsonable({k: v for k, v in call_kwargs.items() if k != "output_type"}),
        "size": {"width": frames[0].width, "height": frames[0].height, "frames": len(frames)},
        "seconds": round(seconds, 4),
        "seconds_per_step": round(loop / n_steps, 5),
        "versions": _versions(),
    }
    return GenerationResult(frames=frames, is_video=is_video, family=family, method=meta["method"], params=params_out,
                            seconds=seconds, seconds_per_step=loop / n_steps, meta=meta)


# ------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def video_encoder_available() -> bool:
    """Whether ``diffusers.utils.export_to_video`` can write MP4 here (imageio + imageio-ffmpeg, or OpenCV)."""
    import importlib.util

    if importlib.util.find_spec("imageio") is not None and importlib.util.find_spec("imageio_ffmpeg") is not None:
        return True
    return importlib.util.find_spec("cv2") is not None


def _save_frames(frames: list, is_video: bool, path: Path, meta: dict, fps: int) -> Path:
    """Write ``frames`` to ``path`` (suffix adjusted to what is written) and the JSON sidecar."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if not is_video:
        if suffix not in IMAGE_SUFFIXES:
            path, suffix = path.with_suffix(".png"), ".png"
        if suffix == ".png":
            info = PngInfo()
            info.add_text("diffusion_attn", json.dumps(jsonable(meta)))
            frames[0].save(path, pnginfo=info)
        else:
            frames[0].convert("RGB").save(path)
    else:
        want_mp4 = suffix == ".mp4" or suffix != ".gif"
        if want_mp4 and video_encoder_available():
            from diffusers.utils import export_to_video

            path = path.with_suffix(".mp4")
            export_to_video(frames, str(path), fps=fps)
        else:
            if suffix == ".mp4":
                warnings.warn("no MP4 encoder (install imageio and imageio-ffmpeg, or opencv-python); writing a GIF instead",
                              stacklevel=3)
            path = path.with_suffix(".gif")
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0)
    path.with_suffix(".json").write_text(json.dumps(jsonable({**meta, "output": path.name}), indent=2))
    return path


def save(result: GenerationResult, path, *, fps: int | None = None) -> Path:
    """Save ``result`` and a JSON sidecar (``<path>.json``); returns the path written.

    Images: PNG (the metadata also in a ``diffusion_attn`` text chunk), or JPEG/WebP when ``path`` ends
    so. Videos: MP4 through ``diffusers.utils.export_to_video`` when an encoder is importable (imageio +
    imageio-ffmpeg, or OpenCV), else an animated GIF; ``.gif`` forces a GIF. The suffix of ``path`` is
    replaced by the format written. ``fps``: default the model family's native rate.
    """
    fps = fps or FPS.get(result.family, 16)
    return _save_frames(result.frames, result.is_video, Path(path), result.meta, fps)
