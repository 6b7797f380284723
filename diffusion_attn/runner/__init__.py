"""Generate with a method applied, and save the result with everything needed to reproduce it.

The one place that turns (model, method, parameters, prompt, seed, sizes) into frames; the CLI, the
Gradio UI and the examples call it::

    from diffusion_attn.runner import generate, save
    result = generate("tiny-wan", "radial", {"dense_steps": 0}, prompt="a fox in the snow", steps=2)
    save(result, "outputs/radial")          # outputs/radial.mp4 (or .gif) + outputs/radial.json

Loaded pipelines are kept in a small LRU cache keyed by (model, dtype, device), so repeated calls (the UI)
do not rebuild them; the method is always removed again after the call, so a cached pipeline stays stock.

By responsibility: :mod:`.loading` (pipelines, the cache, dtypes, devices), :mod:`.backends` (diffusers'
attention dispatcher), :mod:`.generation` (one run and its metadata), :mod:`.outputs` (saving, output
paths). Everything is re-exported here: ``from diffusion_attn.runner import ...`` works as before.
"""

from .backends import _UNET_BACKEND_MESSAGE, _check_backend_name, _set_attention_backend, attention_backends
from .generation import (
    IMAGE_FAMILIES,
    MIN_STEPS,
    VIDEO_FAMILIES,
    GenerationResult,
    adapter_family,
    check_method,
    generate,
    jsonable,
)
from .loading import _CACHE, DTYPES, _torch_dtype, check_device, clear_cache, get_pipeline, set_cache_size
from .outputs import FPS, IMAGE_SUFFIXES, _save_frames, check_output, save, video_encoder_available

__all__ = [
    "GenerationResult",
    "generate",
    "save",
    "check_output",
    "check_device",
    "get_pipeline",
    "clear_cache",
    "set_cache_size",
    "attention_backends",
    "video_encoder_available",
    "IMAGE_FAMILIES",
    "VIDEO_FAMILIES",
    "MIN_STEPS",
    "DTYPES",
    "FPS",
]
