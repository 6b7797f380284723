"""What the kernels need to know about a pattern, in one place.

A pattern tells the kernels what it can offer through *capabilities* (names, see :data:`CAPABILITIES`):

* ``"box"``: per-axis windows on the grid (a :class:`~diffusion_attn.patterns.BoxPattern`: GNA, shifted
  windows) -- the gather, strips and NATTEN kernels use them;
* ``"block"``: a block mask over the flattened grid (a :class:`~diffusion_attn.patterns.BlockPattern`:
  radial) -- gather and the block occupancy of flex / triton use it;
* ``"partition"``: its windows partition the grid (:func:`~diffusion_attn.kernels.windows.window_partition`
  is not None) -- the windows and xformers kernels;
* ``"refined"``: the box carries a refinement (``BoxPattern.refine``, a predicate ANDed with the box:
  CLEAR's circle inside its bounding square); only kernels that apply it (``Backend.handles`` has
  ``"refined"``: gather, strips, sliding, and the predicate kernels flex, chunked, reference) run it;
* ``"mask_mod"``: a FlexAttention-style predicate over sequence indices (``pattern.mask_mod(b, h, q_idx,
  kv_idx)``); every pattern has at least a dense mask, from which the kernels derive rows;
* ``"head_dependent"`` / ``"batch_dependent"``: the predicate reads ``h`` / ``b``;
* ``"dynamic"``: the pattern is chosen per call (from q and k), so nothing built from it is cached.

Contract of ``"box"`` / ``"block"``: the kernels that use them compute the grid form with text rows and
columns dense (every grid query sees every unpadded text key; text queries see everything), so a
pattern declares them only when its whole-sequence mask is exactly that.

The pattern protocol (``diffusion_attn.patterns``) is being opened up: patterns will declare
``capabilities`` themselves and expose their box / block form as ``.grid_pattern``. Until then this
module derives both from today's classes; it is the only place in ``kernels/`` that looks at pattern
types, so the merge is a change here.

Grid patterns (box, block, circular) are defined on the grid (``dense_mask()`` is (N_img, N_img),
``allowed_fn(device)`` a predicate on flattened grid indices) and text rows / columns are dense. A pattern
with the ``"mask_mod"`` capability is defined on the whole sequence: ``dense_mask()`` (S, S) and
``mask_mod(b, h, q_idx, kv_idx)`` (or ``bind(layout, device)``) on sequence indices, text included. :func:`sequence_mask_mod` and :func:`sequence_dense_mask` accept both.
"""

from __future__ import annotations

import weakref

import torch

from ..layout import TokenLayout
from ..patterns.base import BlockPattern, BoxPattern
from ..patterns.mask_mod import CAPABILITIES  # the one list of capability names (re-exported)

__all__ = ["CAPABILITIES", "capabilities_of", "grid_pattern_of", "is_full_on", "resolve_dynamic",
           "sequence_dense_mask", "sequence_mask_mod", "window_plan_of"]

#: pattern object -> its window plan (or None): the partition test runs once per pattern object
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def grid_pattern_of(pattern):
    """The pattern's :class:`BoxPattern` / :class:`BlockPattern` form, or None (a generic pattern).
    ``grid_pattern`` is followed through a few levels (``text_dense(CircularWindow)`` -> the circle ->
    its refined box)."""
    inner = pattern
    for _ in range(4):
        if isinstance(inner, (BoxPattern, BlockPattern)):
            return inner
        nxt = getattr(inner, "grid_pattern", None)
        if nxt is None or nxt is inner:
            return None
        inner = nxt
    return inner if isinstance(inner, (BoxPattern, BlockPattern)) else None


def window_plan_of(pattern):
    """:func:`~diffusion_attn.kernels.windows.window_partition` of the pattern's box form, memoized per
    pattern object; None when it is not a window partition (or not a box pattern)."""
    from .windows import window_partition

    inner = grid_pattern_of(pattern)
    if not isinstance(inner, BoxPattern):
        return None
    try:
        return _PLANS[inner]
    except (KeyError, TypeError):
        pass
    plan = window_partition(inner)
    try:
        _PLANS[inner] = plan
    except TypeError:  # not weak-referenceable: not memoized
        pass
    return plan


#: pattern object -> {layout: is_full}: a sequence predicate answers by evaluating itself (S^2 work)
_FULL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def is_full_on(pattern, layout: TokenLayout) -> bool:
    """Whether ``pattern`` allows every pair on ``layout``: a grid pattern answers itself; a sequence
    predicate (``"mask_mod"``) is asked with the layout, once per pattern object and layout."""
    caps = capabilities_of(pattern)
    grid = grid_pattern_of(pattern)
    if grid is not None and caps & {"box", "block"}:  # text-dense around its grid form: the grid decides
        return bool(grid.is_full())
    if "mask_mod" not in caps or not hasattr(pattern, "bind"):
        return bool(pattern.is_full())
    try:
        memo = _FULL.setdefault(pattern, {})
    except TypeError:  # not weak-referenceable
        return bool(pattern.is_full(layout))
    if layout not in memo:
        memo[layout] = bool(pattern.is_full(layout))
    return memo[layout]


def resolve_dynamic(pattern, q, k, layout: TokenLayout):
    """A ``"dynamic"`` pattern chosen from this call's q and k (``pattern.resolve(q, k, layout)``, the
    protocol of :mod:`diffusion_attn.patterns.dynamic`); any other pattern as it is."""
    if "dynamic" in capabilities_of(pattern) and hasattr(pattern, "resolve"):
        return pattern.resolve(q, k, layout)
    return pattern


def capabilities_of(pattern) -> frozenset:
    """The capability names of ``pattern`` (module docstring). Declared ones (``pattern.capabilities``, the
    pattern protocol of :mod:`diffusion_attn.patterns.mask_mod`) win; otherwise: BoxPattern -> box
    (+ partition), BlockPattern -> block, a callable ``mask_mod`` -> mask_mod (over the sequence), anything
    else (a grid predicate or a dense mask only) -> none."""
    declared = getattr(pattern, "capabilities", None)
    if declared is not None:
        caps = frozenset(declared() if callable(declared) else declared)
        unknown = caps - CAPABILITIES
        if unknown:
            raise ValueError(f"unknown pattern capabilities {sorted(unknown)}; known: {sorted(CAPABILITIES)}")
        return caps | _refined(pattern, caps)
    caps = set()
    inner = grid_pattern_of(pattern)
    if isinstance(inner, BoxPattern):
        caps.add("box")
        if window_plan_of(inner) is not None:
            caps.add("partition")
    elif isinstance(inner, BlockPattern):
        caps.add("block")
    if callable(getattr(pattern, "mask_mod", None)):
        caps.add("mask_mod")
    return frozenset(caps) | _refined(pattern, caps)


def _refined(pattern, caps) -> frozenset:
    """``{"refined"}`` when the pattern's box form carries a refinement: a wrapper that passes ``"box"``
    on (``text_dense``) may not know the name, and a kernel that ignores the refinement must not run it."""
    if "box" in caps:
        inner = grid_pattern_of(pattern)
        if isinstance(inner, BoxPattern) and inner.refine is not None:
            return frozenset({"refined"})
    return frozenset()


def _index(x, like: torch.Tensor) -> torch.Tensor:
    """``b`` / ``h`` as an index tensor (FlexAttention passes tensors; our own callers may pass None)."""
    return torch.zeros((), dtype=torch.long, device=like.device) if x is None else x


def sequence_mask_mod(pattern, layout: TokenLayout, key_padding_mask: torch.Tensor | None = None, device=None):
    """The FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of a pattern on a layout, over sequence indices.

    A pattern with its own ``mask_mod`` (sequence level) is used as is. A grid pattern (``allowed_fn``:
    box, block and today's generic patterns) gets dense text rows and columns. Otherwise the dense mask
    is looked up (an (N, N) grid mask or an (S, S) sequence mask). Padded text keys are masked
    (``key_padding_mask`` (B, S), True = real)."""
    if "mask_mod" in capabilities_of(pattern):  # a predicate over the whole sequence
        own = pattern.bind(layout, device) if hasattr(pattern, "bind") else pattern.mask_mod

        def base(b, h, qi, ki):
            return own(_index(b, qi), _index(h, qi), qi, ki)
    elif hasattr(pattern, "allowed_fn"):  # a grid predicate: text rows and columns dense
        off, n = layout.image_slice.start, layout.num_image
        allowed = pattern.allowed_fn(device)

        def base(b, h, qi, ki):
            qg, kg = qi - off, ki - off
            q_img = (qg >= 0) & (qg < n)
            k_img = (kg >= 0) & (kg < n)
            return allowed(qg.clamp(0, n - 1), kg.clamp(0, n - 1)) | ~q_img | ~k_img
    else:
        table = sequence_dense_mask(pattern, layout).to(device)

        def base(b, h, qi, ki):
            return table[qi, ki]

    if key_padding_mask is None:
        return base

    def mask_mod(b, h, qi, ki):
        return base(b, h, qi, ki) & key_padding_mask[_index(b, qi), ki]

    return mask_mod


def sequence_dense_mask(pattern, layout: TokenLayout) -> torch.Tensor:
    """The (S, S) boolean mask of the pattern on ``layout`` (grid masks get dense text rows / columns)."""
    from .reference import full_mask

    if "mask_mod" in capabilities_of(pattern) and hasattr(pattern, "bind"):  # the protocol's MaskMod
        m = pattern.dense_mask(layout)
    else:
        m = pattern.dense_mask()
    S, n = layout.num_tokens, layout.num_image
    if tuple(m.shape) == (S, S):
        return m.bool()
    if tuple(m.shape) == (n, n):
        return full_mask(m.bool(), layout)
    raise ValueError(f"the pattern's dense_mask() is {tuple(m.shape)}; expected ({n}, {n}) for the grid of "
                     f"{layout.describe()} or ({S}, {S}) for the whole sequence")
