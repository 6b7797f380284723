"""Embedded default models: tiny diffusers pipelines per family that run offline on a CPU.

``tiny-flux``, ``tiny-sd15`` and ``tiny-wan`` are trained on the shapes world (:mod:`.world`, shipped
weights); ``tiny-*-random`` and the other families are random-weight builders for fast tests (:mod:`.tiny`).

>>> from diffusion_attn.models import build_pipeline, default_call_kwargs, default_prompt
>>> pipe = build_pipeline("tiny-flux")
>>> image = pipe(prompt=default_prompt("tiny-flux"), **default_call_kwargs("tiny-flux"))[0]
"""

from .tiny import (
    EMBEDDED_MODELS,
    FAMILIES,
    EmbeddedModel,
    build_pipeline,
    default_call_kwargs,
    default_prompt,
    load_pipeline,
    model_family,
)

__all__ = [
    "EMBEDDED_MODELS",
    "FAMILIES",
    "EmbeddedModel",
    "build_pipeline",
    "default_call_kwargs",
    "default_prompt",
    "load_pipeline",
    "model_family",
]
