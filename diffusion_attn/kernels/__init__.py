"""Kernels: how a pattern is computed. Every kernel is tested against :func:`masked_attention`."""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from ..patterns.base import BlockPattern, BoxPattern
from . import natten_adapter, xformers_adapter
from .flex import block_occupancy, flex_attention_call, flex_available, flex_block_mask
from .gather import gather_attention
from .reference import check_inputs, full_mask, masked_attention, sdpa, text_query_attention
from .strips import StripPlan, strip_attention, strip_plan
from .tiling import build_schedule, choose_tiles
from .triton_sparse import build_triton_layout, triton_available, triton_pattern_attention
from .windows import WindowPlan, window_attention, window_partition

__all__ = [
    "BACKENDS",
    "build_schedule",
    "build_triton_layout",
    "choose_backend",
    "choose_tiles",
    "flex_available",
    "full_mask",
    "gather_attention",
    "masked_attention",
    "pattern_attention",
    "prepared_attention",
    "sdpa",
    "strip_attention",
    "strip_plan",
    "triton_available",
    "triton_pattern_attention",
    "window_attention",
    "window_partition",
]

#: ``auto`` picks one of: ``dense`` (plain SDPA, only for a pattern that allows everything),
#: ``windows`` (reshape into non-overlapping windows + SDPA; patterns whose windows partition the grid:
#: blocked GNA, HiDiffusion's shifted windows), ``reference`` (SDPA with the full boolean mask; small
#: sequences), ``strips`` (keys gathered once per column and sliced per tile; box patterns on CPU),
#: ``flex`` (compiled
#: FlexAttention, which skips masked blocks; block patterns on long sequences, where it runs) or
#: ``gather`` (tiled gather + SDPA; the rest).
#: Opt-in only: ``triton`` (the Triton block-sparse kernel, CUDA; until it has been validated and timed
#: on a GPU -- it is tested under TRITON_INTERPRET=1), ``natten`` (NATTEN's na1d/2d/3d for GNA
#: patterns) and ``xformers`` (CUDA, window partitions as one block-diagonal call).
BACKENDS = ("auto", "gather", "strips", "windows", "flex", "triton", "natten", "xformers", "reference", "dense")

#: Below this many tokens the masked dense call is cheaper than gathering tiles.
SMALL_SEQUENCE = 2048
#: From this many tokens block patterns go to compiled FlexAttention (its compile, ~15-60 s per shape on
#: CPU, is paid once per process and layout; below this the gather kernel is as fast).
FLEX_MIN_TOKENS = 8192


def choose_backend(pattern, layout: TokenLayout, backend: str = "auto", device=None,
                   window_plan: WindowPlan | None = None) -> str:
    """The backend that runs ``pattern`` on ``layout``: ``backend`` itself unless it is ``auto``.
    ``window_plan``: a cached :func:`window_partition` of ``pattern`` (computed here when needed)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if pattern.is_full():
        return "dense"
    if backend == "dense":
        raise ValueError("backend='dense' ignores the pattern; it is only valid when the pattern is full")
    device_type = torch.device(device if device is not None else "cpu").type
    if backend == "flex" and not flex_available(device_type):
        raise RuntimeError(f"backend='flex' needs torch.compile to work on {device_type} (torch >= 2.5 and, on CPU, "
                           "a C++ compiler); use backend='gather' or 'auto'")
    if backend == "triton" and not triton_available(device_type):
        raise RuntimeError(f"backend='triton' needs triton (pip install \"diffusion-attn[kernels]\") and a CUDA device, "
                           f"got {device_type}; use backend='gather' or 'auto'")
    plan = window_plan
    if plan is None and backend in ("auto", "windows", "xformers"):
        plan = window_partition(pattern)
    if backend in ("windows", "xformers") and plan is None:
        raise ValueError(f"backend={backend!r} needs a pattern whose windows partition the grid (blocked GNA with "
                         "stride == window, HiDiffusion's shifted windows); use backend='gather' or 'auto'")
    if backend == "xformers":
        xformers_adapter.require()
        if device_type != "cuda":
            raise RuntimeError("backend='xformers' runs on CUDA only; use backend='windows' on CPU")
    if backend == "strips" and not isinstance(pattern, BoxPattern):
        raise ValueError("backend='strips' runs box patterns (GNA, shifted windows); use backend='gather' or 'auto'")
    if backend == "natten":
        natten_adapter.require()
        if not natten_adapter.supports(pattern, layout):
            raise ValueError("backend='natten' runs generalized neighborhood attention patterns only "
                             "(GNA, optionally cyclically shifted); use backend='gather' or 'auto'")
    if backend != "auto":
        return backend
    if plan is not None:  # measured: as fast as gather on even windows, faster with borders or text
        return "windows"
    if layout.num_tokens <= SMALL_SEQUENCE:
        return "reference"
    if isinstance(pattern, BlockPattern) and layout.num_tokens >= FLEX_MIN_TOKENS and flex_available(device_type):
        return "flex"
    if isinstance(pattern, BoxPattern) and device_type == "cpu":  # measured on CPU: 1.03-1.70x gather's speed
        return "strips"
    return "gather"


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
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over a sequence laid out as ``layout`` (grid + text), restricted by ``pattern`` on the grid.

    ``q, k, v``: (B, S, heads, head_dim), ``S = layout.num_tokens``. Text queries attend to every key,
    grid queries to their pattern's grid keys and to every text key. ``key_padding_mask`` (B, S) bool,
    True = real token; only text tokens may be padded. ``schedule``: a prebuilt schedule for ``pattern``
    on ``q.device`` (callers cache it per layout); ``block_mask`` (flex), ``triton_layout``,
    ``window_plan`` and ``strips`` likewise for their backends (see :func:`prepared_attention`).
    """
    kpm = check_inputs(q, k, layout, key_padding_mask)
    chosen = choose_backend(pattern, layout, backend, q.device, window_plan)
    if chosen == "dense":
        return sdpa(q, k, v, None if kpm is None else kpm[:, None, None, :], scale)
    if chosen == "reference":
        return masked_attention(q, k, v, pattern.dense_mask(), layout, kpm, scale)
    if chosen == "flex":
        if block_mask is None:
            block_mask = flex_block_mask(pattern, layout, key_padding_mask=kpm, device=q.device)
        out = flex_attention_call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask, scale)
        return out.transpose(1, 2)
    if chosen in ("windows", "xformers"):
        plan = window_plan if window_plan is not None else window_partition(pattern)
        run = window_attention if chosen == "windows" else xformers_adapter.xformers_attention
        return run(q, k, v, plan, layout, key_padding_mask=kpm, scale=scale)
    if chosen == "natten":
        return natten_adapter.natten_attention(q, k, v, pattern, layout, key_padding_mask=kpm, scale=scale)
    if chosen == "triton":
        if triton_layout is None:
            triton_layout = build_triton_layout(pattern, layout, device=q.device)
        return triton_pattern_attention(q, k, v, triton_layout, layout, kpm, scale)
    img, txt = layout.image_slice, layout.text_slice
    has_text = layout.text_len > 0
    extra = dict(
        extra_k=k[:, txt] if has_text else None,
        extra_v=v[:, txt] if has_text else None,
        extra_valid=None if kpm is None else kpm[:, txt],
        scale=scale,
    )
    if chosen == "strips":
        plan = strips if strips is not None else strip_plan(pattern).to(q.device)
        out_img = strip_attention(q[:, img], k[:, img], v[:, img], plan, **extra)
    else:
        if schedule is None:
            schedule = build_schedule(pattern).to(q.device)
        out_img = gather_attention(q[:, img], k[:, img], v[:, img], schedule, **extra)
    if not has_text:
        return out_img
    out_txt = text_query_attention(q, k, v, layout, kpm, scale)
    parts = [out_txt, out_img] if layout.text_position == "first" else [out_img, out_txt]
    return torch.cat(parts, dim=1)


def prepared_attention(q, k, v, pattern, layout: TokenLayout, *, cached, key, key_padding_mask=None,
                       backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """:func:`pattern_attention` with its per-layout work cached: ``cached(cache_key, build)`` returns a
    stored value or stores ``build()`` (a run context's ``cached``, or a dict-backed equivalent);
    ``key`` identifies the pattern. The gather schedule and the flex block occupancy are built once
    per layout and device; the flex BlockMask too unless text padding makes it per call."""
    window_plan = None
    if isinstance(pattern, BoxPattern):
        window_plan = cached(("window-plan", key), lambda: window_partition(pattern))
    chosen = choose_backend(pattern, layout, backend, q.device, window_plan)
    kpm = None if key_padding_mask is None or bool(key_padding_mask.all()) else key_padding_mask
    schedule = block_mask = triton_layout = strips = None
    dev = str(q.device)
    if chosen == "strips":
        strips = cached(("strip-plan", key, dev), lambda: strip_plan(pattern).to(q.device))
    elif chosen == "gather":
        schedule = cached(("schedule", key, dev), lambda: build_schedule(pattern).to(q.device))
    elif chosen == "flex":
        occupancy = cached(("flex-occupancy", key), lambda: block_occupancy(pattern, layout))
        build = lambda: flex_block_mask(pattern, layout, key_padding_mask=kpm, device=q.device, occupancy=occupancy)  # noqa: E731
        block_mask = build() if kpm is not None else cached(("flex-mask", key, dev), build)
    elif chosen == "triton":  # padding is applied in the kernel: the layout is cached even with padding
        occupancy = cached(("flex-occupancy", key), lambda: block_occupancy(pattern, layout))  # the flex cache: block 128
        triton_layout = cached(("triton-layout", key, dev),
                               lambda: build_triton_layout(pattern, layout, occupancy=occupancy, device=q.device))
    if window_plan is not None:
        window_plan.to(q.device)
    return pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend=chosen, schedule=schedule,
                             block_mask=block_mask, triton_layout=triton_layout, window_plan=window_plan,
                             strips=strips, scale=scale)
