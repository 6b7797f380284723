"""Installing per-layer processors on a denoiser, with an exact undo."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

__all__ = ["install_processors", "get_processors", "rollback_on_error", "set_processors"]


@contextmanager
def rollback_on_error(undo: list):
    """Install steps inside this block append their undo callables to ``undo``; if the block raises, they
    run in reverse order and the error propagates, so a failed install leaves the model as it was."""
    try:
        yield undo
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise


def get_processors(model) -> dict:
    """``{"<module path>.processor": processor}`` of every attention module, like diffusers'
    ``model.attn_processors``; also for models without it (``MochiTransformer3DModel``)."""
    if hasattr(type(model), "attn_processors"):
        return dict(model.attn_processors)
    return {f"{name}.processor": m.processor for name, m in model.named_modules()
            if name and getattr(m, "processor", None) is not None and callable(m.processor)}


def set_processors(model, processors: dict) -> None:
    """Install ``processors`` (a dict as from :func:`get_processors`), like ``model.set_attn_processor``."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(processors)
        return
    for key, proc in processors.items():
        module = model.get_submodule(key.removesuffix(".processor"))
        if module.processor is not proc:
            if "processor" in module._modules and not isinstance(proc, torch.nn.Module):
                del module._modules["processor"]  # a processor with parameters leaves (as diffusers' set_processor does)
            module.processor = proc


def install_processors(model, family, context, make: Callable[[int, str], object | None], layers=None) -> list:
    """Replace the processors of ``family.layers(model)`` (or ``layers``) by ``make(index, name)``.

    ``make`` may return None to leave a layer alone. Returns the undo list: re-installing the original
    processor objects, so ``remove`` is bit-exact.
    """
    original = get_processors(model)
    new = dict(original)
    for name, index in layers if layers is not None else family.layers(model):
        proc = make(index, name)
        if proc is not None:
            new[name] = proc.bind(context, family, index, name)
    set_processors(model, new)
    return [lambda: set_processors(model, original)]
