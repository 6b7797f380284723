"""Helpers the test modules share: the embedded tiny pipelines, and fingerprints of module state."""

from __future__ import annotations

import functools

from diffusion_attn.models import build_pipeline


def fresh(name: str):
    """A newly built embedded pipeline (progress bars off)."""
    pipe = build_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_cache():
    """A ``pipe_for(name)`` that builds each pipeline once; each test module makes its own, so no state
    travels between modules."""
    return functools.lru_cache(maxsize=None)(fresh)


def fingerprint(v):
    """An attribute value as module-state comparisons see it: plain values by value, dicts by their
    keys and the identity of their values, anything else by identity."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple) and all(isinstance(x, (bool, int, float, str)) for x in v):
        return v
    if isinstance(v, dict):
        return ("dict", id(v), tuple((k, id(x)) for k, x in v.items()))
    return ("obj", id(v))
