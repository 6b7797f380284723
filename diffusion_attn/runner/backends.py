"""diffusers' attention dispatcher backends: listing, checking and setting them for one call."""

from __future__ import annotations

import warnings
from typing import Callable

__all__ = ["attention_backends"]

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
        from ..registry import suggest

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
