"""Embedded default models: tiny random-weight diffusers pipelines per family, built offline in-process.

>>> from diffusion_attn.models import build_pipeline, default_call_kwargs
>>> pipe = build_pipeline("tiny-flux", seed=0)
>>> images = pipe(prompt="a cat", **default_call_kwargs("tiny-flux")).images
"""

from .tiny import (
    EMBEDDED_MODELS,
    FAMILIES,
    EmbeddedModel,
    build_pipeline,
    default_call_kwargs,
    load_pipeline,
    model_family,
)

__all__ = [
    "EMBEDDED_MODELS",
    "FAMILIES",
    "EmbeddedModel",
    "build_pipeline",
    "default_call_kwargs",
    "load_pipeline",
    "model_family",
]
