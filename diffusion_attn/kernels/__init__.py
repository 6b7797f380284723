"""Kernels: how a pattern is computed. Every kernel is tested against :func:`masked_attention`.

Backends are registered in :mod:`.registry` (one file each, with a :class:`~.backend.Backend` declaration);
``auto`` picks by the rule written there. :func:`check_backend` answers at ``apply`` time, before any
layout or tensor, whether a named backend can ever run a method's pattern kind on a device.
"""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from .backend import Backend, Request
from .capabilities import capabilities_of, resolve_dynamic
from .flex import FLEX_MIN_TOKENS, FlexPrepared, block_occupancy, flex_attention_call, flex_available, flex_block_mask
from .gather import gather_attention
from .reference import SMALL_SEQUENCE, check_inputs, full_mask, masked_attention, sdpa, text_query_attention
from .registry import BACKENDS, REGISTRY, check_backend, get_backend, resolve
from .schedule import (
    RUNS,
    AxisTiles,
    Bucket,
    PairCounts,
    Schedule,
    axis_tiles,
    block_schedule,
    box_schedule,
    combined_mask_fn,
    mask_fn_on,
    outer_combine,
)
from .sliding import SlidingPlan, sliding_attention, sliding_plan
from .strips import StripPlan, strip_attention, strip_plan
from .tiling import build_schedule, choose_tiles
from .triton_sparse import build_triton_layout, triton_available, triton_pattern_attention
from .windows import WindowPlan, window_attention, window_partition

__all__ = [
    "AxisTiles",
    "BACKENDS",
    "Backend",
    "Bucket",
    "PairCounts",
    "REGISTRY",
    "RUNS",
    "Request",
    "Schedule",
    "axis_tiles",
    "block_schedule",
    "box_schedule",
    "build_schedule",
    "build_triton_layout",
    "capabilities_of",
    "check_backend",
    "choose_backend",
    "choose_tiles",
    "combined_mask_fn",
    "flex_available",
    "full_mask",
    "gather_attention",
    "get_backend",
    "mask_fn_on",
    "masked_attention",
    "outer_combine",
    "pattern_attention",
    "prepared_attention",
    "sdpa",
    "SlidingPlan",
    "sliding_attention",
    "sliding_plan",
    "strip_attention",
    "strip_plan",
    "triton_available",
    "triton_pattern_attention",
    "window_attention",
    "window_partition",
]


def choose_backend(pattern, layout: TokenLayout, backend: str = "auto", device=None,
                   window_plan: WindowPlan | None = None) -> str:
    """The name of the backend that runs ``pattern`` on ``layout`` on ``device`` (no tensors: dtype, head
    sizes and autograd unchecked): ``backend`` itself, checked, unless it is ``auto``. ``window_plan`` is
    accepted for compatibility (partitions are detected once per pattern object)."""
    return resolve(Request.make(pattern, layout, device=device), backend).name


def pattern_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    layout: TokenLayout,
    *,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    schedule=None,
    block_mask=None,
    triton_layout=None,
    window_plan: WindowPlan | None = None,
    strips: StripPlan | None = None,
    sliding: SlidingPlan | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over a sequence laid out as ``layout`` (grid + text), restricted by ``pattern``.

    ``q, k, v``: (B, S, heads, head_dim), ``S = layout.num_tokens``; ``v`` may have another head size.
    Text queries attend to every key, grid queries to their pattern's grid keys and to every text key
    (patterns defined on the whole sequence decide text rows themselves). ``key_padding_mask`` (B, S)
    bool, True = real token; only text tokens may be padded. ``schedule`` (gather), ``block_mask``
    (flex), ``triton_layout``, ``window_plan`` (windows / xformers), ``strips`` and ``sliding``: that backend's
    prebuilt artefact for this pattern, layout and device, used as given; otherwise it is built here
    (see :func:`prepared_attention` for the cached form).
    """
    if backend != "auto":
        get_backend(backend)
    kpm = check_inputs(q, k, layout, key_padding_mask)
    pattern = resolve_dynamic(pattern, q, k, layout)
    request = Request.make(pattern, layout, q=q, k=k, v=v)
    chosen = resolve(request, backend)
    given = {"gather": schedule, "strips": strips, "sliding": sliding, "windows": window_plan, "xformers": window_plan,
             "triton": triton_layout,
             "flex": None if block_mask is None else FlexPrepared(None, block_mask, as_given=True)}.get(chosen.name)
    return chosen.run(q, k, v, request, given, kpm, scale)  # None: the backend builds what it needs


def prepared_attention(q, k, v, pattern, layout: TokenLayout, *, cached, key, key_padding_mask=None,
                       backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """:func:`pattern_attention` with the chosen backend's per-layout artefacts (schedule, strip plan,
    window plan, BlockMask, Triton tile layout) cached: ``cached(cache_key, build)`` returns a stored value
    or stores ``build()`` (a run context's ``cached``, or a dict-backed equivalent); ``key`` identifies the
    pattern. The cache key is derived from the whole request (:meth:`Backend.cache_key`: backend, ``key``,
    layout, device, dtype, head sizes, autograd), so nothing built for one layout serves another. Text
    padding never enters a cached artefact (flex builds its padded BlockMask per call from the cached
    occupancy). Patterns with the ``dynamic`` capability are prepared per call."""
    if backend != "auto":
        get_backend(backend)
    kpm = check_inputs(q, k, layout, key_padding_mask)
    dynamic = "dynamic" in capabilities_of(pattern)
    pattern = resolve_dynamic(pattern, q, k, layout)
    request = Request.make(pattern, layout, q=q, k=k, v=v, pattern_key=key)
    chosen = resolve(request, backend)
    prepared = None
    if chosen.prepare is not None:
        build = lambda: chosen.prepare(request)  # noqa: E731
        prepared = build() if dynamic else cached(chosen.cache_key(request), build)
    return chosen.run(q, k, v, request, prepared, kpm, scale)
