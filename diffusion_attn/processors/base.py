"""The base class of every pattern processor: a diffusers attention processor whose attention core is
restricted by a pattern.

A processor is a plain callable, installable with ``model.set_attn_processor(...)``. It computes q, k, v
exactly as the stock processor of the model family does (the family adapter), and replaces only the
core: ``pattern(layout)`` returns the pattern for this call (``None`` = dense), which runs through
:func:`~diffusion_attn.kernels.pattern_attention`. The dense core is diffusers' own
``dispatch_attention_fn``, so a dense call equals the stock processor and honours
``model.set_attention_backend(...)``.

Processors get the token grid and the step from the run context (:mod:`diffusion_attn.context`);
``diffusion_attn.apply`` wires it. A user who installs processors with ``set_attn_processor`` calls
``diffusion_attn.attach(model)`` once afterwards.
"""

from __future__ import annotations

import torch

from ..kernels import prepared_attention
from ..layout import TokenLayout

__all__ = ["PatternProcessor", "key_padding_from_mask"]


def key_padding_from_mask(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """A (B, S) keep-mask from diffusers' boolean key masks ((B, S), (B, 1, 1, S)); None if absent."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dtype != torch.bool:
        raise NotImplementedError("pattern processors support boolean key-padding masks only, not additive masks")
    if m.ndim == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        m = m[:, 0, 0]
    if m.ndim != 2 or m.shape[-1] != seq:
        raise NotImplementedError(f"unsupported attention mask shape {tuple(attention_mask.shape)} for {seq} tokens")
    return m.expand(batch, seq)


class PatternProcessor:
    """Base class; subclasses implement :meth:`pattern` and declare ``method``."""

    _attention_backend = None
    _parallel_config = None
    method = "base"

    def __init__(self, *, dense_layers: int = 0, dense_steps: int = 0, backend: str = "auto", layer_index: int | None = None):
        self.dense_layers = int(dense_layers)
        self.dense_steps = int(dense_steps)
        self.backend = backend
        self.layer_index = layer_index
        self.context = None
        self.family = None

    def bind(self, context, family, layer_index: int) -> "PatternProcessor":
        """Attach to a run context and model family (done by ``apply`` / ``attach``)."""
        self.context, self.family, self.layer_index = context, family, layer_index
        return self

    # -- what subclasses define -------------------------------------------------------------------
    def pattern(self, layout: TokenLayout):
        """The pattern for this call, or None for dense attention."""
        raise NotImplementedError

    def pattern_key(self, layout: TokenLayout):
        """Cache key of :meth:`pattern`'s result: the whole layout and, for processors with a method
        config, every pattern-role field of it (derived from the config, never listed by hand)."""
        config = getattr(self, "config", None)
        return (layout, *(config.pattern_key() if config is not None else (self.method,)))

    @classmethod
    def from_config(cls, config) -> "PatternProcessor":
        """A processor from a method config: the config fields this class's constructor takes."""
        import inspect

        accepted = inspect.signature(cls).parameters
        return cls(**{name: value for name, value in config.items() if name in accepted})

    def is_dense_now(self) -> bool:
        """Placement: the first ``dense_layers`` layers and the first ``dense_steps`` steps stay dense."""
        return (self.layer_index or 0) < self.dense_layers or self.context.step < self.dense_steps

    # -- machinery -------------------------------------------------------------------------------
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        rotary_emb=None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ):
        if self.context is None or self.family is None:
            raise RuntimeError(
                f"{type(self).__name__} is installed but not attached to its model's run context: after "
                "model.set_attn_processor(...), call diffusion_attn.attach(model) once (or use diffusion_attn.apply)."
            )
        if self.context.grid is None:
            raise RuntimeError(f"{type(self).__name__} was called outside a denoiser forward pass; no token grid known")
        rotary = image_rotary_emb if image_rotary_emb is not None else rotary_emb
        return self.family.run(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb)

    def dense(self, q, k, v, attention_mask):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(
            q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )

    def core(self, q, k, v, layout: TokenLayout, attention_mask=None) -> torch.Tensor:
        """Attention core on (B, S, heads, head_dim) tensors laid out as ``layout``."""
        if self.is_dense_now():
            return self.dense(q, k, v, attention_mask)
        key = self.pattern_key(layout)
        pattern = None if key is None else self.context.cached(("pattern", key), lambda: self.pattern(layout))
        if pattern is None or pattern.is_full():
            return self.dense(q, k, v, attention_mask)
        kpm = key_padding_from_mask(attention_mask, q.shape[0], q.shape[1])
        return prepared_attention(q, k, v, pattern, layout, cached=self.context.cached, key=key,
                                  key_padding_mask=kpm, backend=self.backend)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_index}, dense_layers={self.dense_layers}, dense_steps={self.dense_steps})"
