"""Loading pipelines (embedded tiny models, hub ids, local folders), the pipeline cache, dtypes and
devices."""

from __future__ import annotations

import collections
import threading
from typing import Any

__all__ = ["DTYPES", "get_pipeline", "clear_cache", "set_cache_size", "check_device"]

#: accepted ``dtype`` strings (the ``diffusers-cli run`` spellings) -> torch dtype name
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


# ------------------------------------------------------------------------------------------------------
# Pipeline cache
# ------------------------------------------------------------------------------------------------------

_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_CACHE_SIZE = 2
_CACHE_LOCK = threading.RLock()


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
    from ..models import EMBEDDED_MODELS, load_pipeline

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


def check_device(device) -> None:
    """Fail early (before loading anything) when ``device`` is not a torch device usable here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e}); accepted: cpu, cuda, cuda:N, mps, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise ValueError(f"device {device!r} is not available: {why} (torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available (no MPS backend in this torch); use cpu")
