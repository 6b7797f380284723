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

import itertools

import torch

from ..adapters.base import layer_kind
from ..kernels import pattern_attention, prepared_attention
from ..layout import TokenLayout
from ..placement import Placement, Where

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


def _mask_heads(mask, index, heads: int):
    """An attention mask restricted to the heads ``index``: masks with a head axis ((B, heads, Sq, Sk))
    are sliced; masks that broadcast over heads are returned as they are."""
    if mask is None or mask.ndim != 4 or mask.shape[1] != heads or heads == 1:
        return mask
    return mask[:, index]


class PatternProcessor:
    """Base class; subclasses implement :meth:`pattern` and declare ``method``."""

    _attention_backend = None
    #: set by diffusers' ``enable_parallelism`` (or by ``apply`` on a model that already is parallel):
    #: under context parallelism :meth:`core` runs through :func:`diffusion_attn.parallel.parallel_core`
    _parallel_config = None
    #: while a context-parallel op runs :meth:`local_core`: what this rank holds
    #: (:class:`diffusion_attn.parallel.Shard`: its global heads); None otherwise
    _cp_shard = None
    method = "base"
    #: names of the call-time inputs this processor reads from ``self.context.call_kwargs`` (the denoiser
    #: call's ``cross_attention_kwargs`` / ``joint_attention_kwargs`` / ``attention_kwargs``); any other key
    #: there that nothing takes is an error at the denoiser call (see :mod:`diffusion_attn.context`)
    call_inputs: tuple[str, ...] = ()

    def __init__(self, *, dense_layers: int = 0, dense_steps: int = 0, backend: str = "auto", layer_index: int | None = None,
                 placement: Placement | None = None):
        self.dense_layers = int(dense_layers)
        self.dense_steps = int(dense_steps)
        #: where and when the pattern acts; ``dense_layers`` / ``dense_steps`` are its first-version form
        self.placement = placement if placement is not None else Placement.from_dense(self.dense_layers, self.dense_steps)
        self.backend = backend
        self.layer_index = layer_index
        self.layer_kind: str | None = None
        self.context = None
        self.family = None

    def bind(self, context, family, layer_index: int, name: str | None = None) -> "PatternProcessor":
        """Attach to a run context and model family (done by ``apply`` / ``attach``); ``name`` (the
        processor's module path) gives the layer kind placements select on."""
        self.context, self.family, self.layer_index = context, family, layer_index
        self.layer_kind = None if name is None else layer_kind(name)
        if self.call_inputs and context is not None:
            context.call_inputs.update(self.call_inputs)
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

    def where(self) -> Where:
        """This call as the placement sees it: layer, its kind, step (of how many) and branch name."""
        ctx = self.context
        return Where(layer=self.layer_index or 0, kind=self.layer_kind, step=ctx.step,
                     num_steps=getattr(ctx, "num_steps", None), branch=getattr(ctx, "branch_name", None))

    def is_dense_now(self) -> bool:
        """Placement: outside its layers, steps or branches the call stays dense (the stock attention)."""
        return not self.placement.active(self.where())

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
        if kwargs:
            # diffusers' attention modules drop (with a warning) kwargs a processor does not name; those that
            # still reach here would be lost: refuse them, as diffusers' own processors (TypeError) do
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword arguments {sorted(kwargs)}; it takes attn, "
                "hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb / rotary_emb and temb. "
                "Per-call inputs reach processors through the run context (context.call_kwargs): pass them in the "
                "pipeline's cross_attention_kwargs / joint_attention_kwargs / attention_kwargs"
            )
        rotary = image_rotary_emb if image_rotary_emb is not None else rotary_emb
        return self.family.run(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb)

    def dense(self, q, k, v, attention_mask, scale: float | None = None):
        """The model's own attention (``dispatch_attention_fn``); ``scale`` None: ``1/sqrt(head_dim)``."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(
            q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self.dispatch_parallel_config, scale=scale,
        )

    def scale(self, head_dim: int) -> float | None:
        """The softmax scale of the method's own attention (:meth:`pattern_core`, also where its pattern is
        full; :meth:`pattern_core_lse`); None: ``1/sqrt(head_dim)``. Where the placement keeps the stock
        attention (:meth:`dense` from :meth:`local_core`) it does not apply."""
        return None

    @property
    def dispatch_parallel_config(self):
        """The ``parallel_config`` for a ``dispatch_attention_fn`` call made by this processor: the model's,
        except inside a context-parallel op, whose tensors already hold the whole sequence (no second
        exchange)."""
        return self._parallel_config if self._cp_shard is None else None

    def global_heads(self, num_heads: int, device=None) -> torch.Tensor:
        """The model's indices of the ``num_heads`` heads of this call: ``0..num_heads-1`` on one device,
        this rank's slice of the model's heads under Ulysses context parallelism. Per-head data of a
        method (head lists, per-head weights) is indexed with these."""
        offset = 0 if self._cp_shard is None else self._cp_shard.head_offset
        return torch.arange(offset, offset + num_heads, device=device)

    def _head_mask(self, num_heads: int, device):
        """``placement.head_mask`` for this call's heads (global indices under context parallelism)."""
        shard = self._cp_shard
        if shard is None or shard.heads_total == num_heads:
            return self.placement.head_mask(num_heads, device)
        mask = self.placement.head_mask(shard.heads_total, device)
        return None if mask is None else mask[shard.head_offset:shard.head_offset + num_heads]

    # -- extension points (diffusion_attn.extensions): the defaults do nothing ------------------------
    def reduce(self, q, k, v, layout: TokenLayout):
        """Token reduction: None, or ``(q, k, v, layout, restore)`` with ``restore(out) -> out``."""
        return None

    def extra_kv(self, q, k, v, layout: TokenLayout) -> list:
        """Extra key/value segments (:class:`~diffusion_attn.extensions.KVSegment`) for this call."""
        return []

    def blend(self, out, q, k, v, layout: TokenLayout):
        """Per-head output blend (e.g. :func:`~diffusion_attn.extensions.head_blend`); identity here."""
        return out

    def branches(self, batch_size: int):
        """Batch branches: None, or ``[(name, size), ...]`` splitting the batch; each part runs
        :meth:`branch_core` of its name."""
        return None

    def branch_core(self, name: str):
        """The core of a named batch branch: a callable like :meth:`core` without branches."""
        return self._extended_core

    # -- the core ----------------------------------------------------------------------------------
    def core(self, q, k, v, layout: TokenLayout, attention_mask=None) -> torch.Tensor:
        """Attention core on (B, S, heads, head_dim) tensors laid out as ``layout``: the placement decides
        dense or not; then the extension points, around the pattern core. Under diffusers' context
        parallelism (``enable_parallelism``) the rank's local tensors go through
        :func:`diffusion_attn.parallel.parallel_core`, which runs :meth:`local_core` on whole sequences."""
        if self._parallel_config is not None and self._cp_shard is None:
            from ..parallel import cp_config, parallel_core

            if cp_config(self._parallel_config) is not None:
                return parallel_core(self, q, k, v, layout, attention_mask)
        return self.local_core(q, k, v, layout, attention_mask)

    def local_core(self, q, k, v, layout: TokenLayout, attention_mask=None) -> torch.Tensor:
        """:meth:`core` on tensors that hold the whole sequence of ``layout`` (one device, or one Ulysses
        rank's heads)."""
        if self.is_dense_now():
            return self.dense(q, k, v, attention_mask)
        heads = self._head_mask(q.shape[2], q.device)
        if heads is None or bool(heads.all()):
            return self._branched_core(q, k, v, layout, attention_mask)
        # head selection: the method on the placement's heads, the model's own attention on the others
        n = q.shape[2]
        on, off = heads.nonzero().flatten(), (~heads).nonzero().flatten()
        sparse = self._branched_core(q[:, :, on], k[:, :, on], v[:, :, on], layout, _mask_heads(attention_mask, on, n))
        dense = self.dense(q[:, :, off], k[:, :, off], v[:, :, off], _mask_heads(attention_mask, off, n))
        out = sparse.new_empty(*sparse.shape[:2], n, sparse.shape[3])
        out[:, :, on], out[:, :, off] = sparse, dense.to(sparse.dtype)
        return out

    def _branched_core(self, q, k, v, layout: TokenLayout, attention_mask=None) -> torch.Tensor:
        parts = self.branches(q.shape[0])
        if not parts:
            return self._extended_core(q, k, v, layout, attention_mask)
        from ..extensions import run_branches

        names = [name for name, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"batch branch names must be distinct, got {names}")
        starts = dict(zip(names, [0] + list(itertools.accumulate(n for _, n in parts))))
        sizes = dict(parts)

        def run(name, qi, ki, vi):
            mask = attention_mask
            if mask is not None and mask.shape[0] == q.shape[0] and q.shape[0] > 1:  # per-sample masks
                mask = mask[starts[name]:starts[name] + sizes[name]]
            return self.branch_core(name)(qi, ki, vi, layout, mask)

        return run_branches(q, k, v, parts, run)

    def _extended_core(self, q, k, v, layout: TokenLayout, attention_mask=None) -> torch.Tensor:
        reduced = self.reduce(q, k, v, layout)
        restore = None
        if reduced is not None:
            q, k, v, layout, restore = reduced
        segments = self.extra_kv(q, k, v, layout)
        if segments:
            from ..extensions import with_kv_segments

            out = with_kv_segments(self.pattern_core_lse(q, k, v, layout, attention_mask), q, segments)
        else:
            out = self.pattern_core(q, k, v, layout, attention_mask)
        out = self.blend(out, q, k, v, layout)
        return out if restore is None else restore(out)

    def current_pattern(self, layout: TokenLayout):
        """This call's pattern (cached per key in the run context), or None for dense."""
        key = self.pattern_key(layout)
        return None if key is None else self.context.cached(("pattern", key), lambda: self.pattern(layout))

    def pattern_core(self, q, k, v, layout: TokenLayout, attention_mask=None) -> torch.Tensor:
        """The pattern over the same q, k, v, through the kernels."""
        dynamic = self.call_pattern(q, k, layout)
        key = self.pattern_key(layout) if dynamic is None else None
        pattern = self.current_pattern(layout) if dynamic is None else dynamic
        pattern, key = self._sharded(pattern, key)
        scale = self.scale(q.shape[-1])
        if pattern is None or pattern.is_full():
            return self.dense(q, k, v, attention_mask, scale=scale)
        kpm = key_padding_from_mask(attention_mask, q.shape[0], q.shape[1])
        if dynamic is not None:  # chosen from this call's q and k: nothing to cache
            return pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend=self.backend, scale=scale)
        return prepared_attention(q, k, v, pattern, layout, cached=self.context.cached, key=key,
                                  key_padding_mask=kpm, backend=self.backend, scale=scale)

    def _sharded(self, pattern, key):
        """A head-dependent pattern on a Ulysses rank reads global head indices (its cache key says so)."""
        shard = self._cp_shard
        if pattern is None or shard is None or not shard.head_offset or \
                "head_dependent" not in getattr(pattern, "capabilities", ()):
            return pattern, key
        from ..parallel import shift_heads

        return shift_heads(pattern, shard.head_offset), (None if key is None else (key, "heads+", shard.head_offset))

    def call_pattern(self, q, k, layout: TokenLayout):
        """A dynamic pattern chosen from this call's ``q`` and ``k`` (e.g. top-k key blocks per query
        block, VMoBA), or None to use the static, cached :meth:`pattern`. Not cached."""
        return None

    def pattern_core_lse(self, q, k, v, layout: TokenLayout, attention_mask=None):
        """``(out, lse)`` of :meth:`pattern_core`, for merging with extra key/value segments. Computed
        with the pattern's full mask (the reference; S x S), so keep such calls small until the fast
        kernels that return their LSE (strips, triton) are wired here."""
        from ..extensions import attention_with_lse
        from ..patterns import sequence_mask

        pattern, _ = self._sharded(self.call_pattern(q, k, layout) or self.current_pattern(layout), None)
        mask = None
        if pattern is not None and not pattern.is_full():  # grid patterns with dense text, or any predicate
            mask = sequence_mask(pattern, layout, batch=q.shape[0], heads=q.shape[2], device=q.device)
        kpm = key_padding_from_mask(attention_mask, q.shape[0], q.shape[1])
        if kpm is not None:
            kpm = kpm[:, None, None, :]
            mask = kpm if mask is None else mask & kpm
        return attention_with_lse(q, k, v, mask, scale=self.scale(q.shape[-1]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_index}, dense_layers={self.dense_layers}, dense_steps={self.dense_steps})"
