"""Installing per-layer processors on a denoiser, with an exact undo."""

from __future__ import annotations

from typing import Callable

__all__ = ["install_processors"]


def install_processors(model, family, context, make: Callable[[int, str], object | None], layers=None) -> list:
    """Replace the processors of ``family.layers(model)`` (or ``layers``) by ``make(index, name)``.

    ``make`` may return None to leave a layer alone. Returns the undo list: re-installing the original
    processor objects, so ``remove`` is bit-exact.
    """
    original = dict(model.attn_processors)
    new = dict(original)
    for name, index in layers if layers is not None else family.layers(model):
        proc = make(index, name)
        if proc is not None:
            new[name] = proc.bind(context, family, index)
    model.set_attn_processor(new)
    return [lambda: model.set_attn_processor(original)]
