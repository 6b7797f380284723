"""FreeSwim (Wu et al., arXiv 2511.14712; WillWu111/FreeSwim) for Wan 2.1 / 2.2: training-free
high-resolution video by refining an upscaled native-resolution video with inward sliding-window
self-attention, a full-attention branch that overrides the cross-attention, and an optional cache.

**Window branch** (:func:`freeswim_window_pattern`): every query sees *all frames* and a fixed
``(2 d_h + 1) x (2 d_w + 1)`` spatial window of tokens, shifted inward at the borders, where ``(d_h,
d_w)`` is half the model's *native* token grid (official ``d_h = base_height // 16 // 2``: 15 x 26 for
480 x 832, 22 x 40 for 720 x 1280). The official ``init_mask_flex`` mask (``d_b, d_u, d_r, d_l``) is
exactly NATTEN neighborhood attention ``na3d(kernel_size=(T, 2 d_h + 1, 2 d_w + 1))``, stride 1
(tested against the official formula and against natten itself), so it is
:func:`~diffusion_attn.patterns.neighborhood_pattern` and runs on any box backend (``auto``: what the
kernels' rule picks for box patterns on the device; ``flex`` / ``natten`` / ``strips`` when named). An
axis not longer than the window is seen whole (the official formula does the same; NATTEN would refuse
the larger kernel, so the window is clamped to the axis).

**Attention scale** (``attention_scale="native"``, official): both self-attention branches use
``sqrt(log(2 n) / log(n) / head_dim)`` with ``n`` the native tokens per frame (the official hard-codes
``30 * 52``, the 1.3B 480p grid, for every model and resolution; here ``n`` comes from ``native_height``
x ``native_width``). Cross-attention keeps the default scale. ``"default"`` uses ``1 / sqrt(head_dim)``.

**Dual path** (:mod:`diffusion_attn.patches.freeswim`): the denoiser's batch is doubled into ``[window
rows; full rows]`` by a named diffusers hook; :class:`FreeSwimProcessor` (every ``attn1``) runs the two
branches through the E4d batch branches (window pattern / dense, both with the scale), and
:class:`FreeSwimCrossProcessor` (every ``attn2``) computes the text cross-attention of the full rows only
and gives it to both (the window branch's own cross-attention is discarded, as the official). Only the
window rows leave the denoiser.

**Cache mode** (``mode="cache"``, official ``cache/``): on guide steps (every ``cache_steps`` steps,
default 2 as the official pipeline signature; its ``inference.py`` suggests 5) the cond call runs both
branches and stores each block's full-branch cross-attention output; the other cond calls run the window
branch only and reuse the stored outputs; uncond calls never run the full branch. ``offload_cache`` keeps
the stored outputs on the CPU (the official README's advice for 24 GB GPUs). Cache mode without CFG
works (the official's cache decisions only look at the cond call, which every pipeline makes) and is
accepted.

Defaults: native 480 x 832 for Wan 2.1 (the official 1.3B recipe), 720 x 1280 for Wan 2.2 (the
official's advice for 14B models; the A14B pipelines with two experts get both experts patched); for
Wan 2.2 TI2V-5B (one transformer, VAE 16 x patch 2 = 32 px per token, read from the pipeline) pass its
native ``native_height=704, native_width=1280``. ``mode="nocache"`` as ``inference.py``. The coarse-to-fine recipe
(T2V at native size, upscale, V2V at strength 0.7 with ``flow_shift=9``) is
:func:`diffusion_attn.pipelines.freeswim_generate`.

Deviations from the official code:

* No copied ``WanTransformer3DModel`` / ``WanVideoToVideoPipeline``: processors + one named hook on the
  stock model, ``remove()`` bit-exact. Any batch size and ``num_videos_per_prompt`` (the official hard-codes
  rows 0 / 1 and batch 1 per CFG branch); text states are doubled with the latents (the official keeps
  them at batch 1 and duplicates K/V inside the processor).
* The scale and window come from the given native resolution instead of hard-coded constants, and the
  pixel-to-token factor from the pipeline's VAE and the model's patch (16 for Wan 2.1 / 2.2 A14B).
* Cache mode does not double the batch on the calls that skip the full branch (the official runs two
  identical rows there): same window output, half the cost of those calls.
* Every ``attn2`` call gets the override, also past the official's ``cover_step`` (40 in cache mode, 50
  without; the official's 35-step V2V never reaches it, and past it its processors would index an empty
  row 1).
* Masks are built per layout in the run context, not once in a module global (``BLOCK_MASK``), so other
  resolutions and frame counts in the same process work.
* A ``placement`` given to ``apply`` selects where the window branch uses the window (elsewhere the
  stock attention); the dual path and the cross-attention override run everywhere.
"""

from __future__ import annotations

import math

import torch

from ..layout import TokenLayout
from ..patches.freeswim import PLAN_KEY, CallPlan, FreeSwimDualPathConfig, apply_freeswim_dual_path
from ..patterns import neighborhood_pattern
from ..registry import MethodConfig, MethodSpec, method_config, param, register
from .base import PatternProcessor
from .gna import backend_field
from .install import install_processors, rollback_on_error

__all__ = ["FreeSwimConfig", "FreeSwimCrossProcessor", "FreeSwimProcessor", "PIXELS_PER_TOKEN",
           "freeswim_attention_scale", "freeswim_grid_pattern", "freeswim_half_window", "freeswim_window_pattern",
           "native_token_grid"]

#: Wan 2.1 / 2.2 A14B: VAE 8 x patch 2 pixels per token side (the official's ``// 16``)
PIXELS_PER_TOKEN = 16
_CROSS_KEY = "freeswim.cross"


# ------------------------------------------------------------------------------------------------------
# the pieces: native grid, window, scale
# ------------------------------------------------------------------------------------------------------
def native_token_grid(native_height: int, native_width: int, pixels_per_token: int = PIXELS_PER_TOKEN, *,
                      where: str = ""):
    """The native per-frame token grid ``(h, w)`` of a ``native_height x native_width`` video; a ValueError
    when it has fewer than 2 tokens (the scale ``log(2n, n)`` needs them); ``where`` is added after "tokens" in
    the message."""
    grid = int(native_height) // pixels_per_token, int(native_width) // pixels_per_token
    if grid[0] * grid[1] < 2:
        raise ValueError(f"native size {native_height} x {native_width} px is {grid[0]} x {grid[1]} tokens"
                         f"{where} ({pixels_per_token} px per token); accepted: at least 2 tokens per frame")
    return grid


def freeswim_half_window(native_grid) -> tuple[int, int]:
    """``(d_h, d_w)``: half the native token grid (official ``base // 16 // 2``)."""
    return native_grid[0] // 2, native_grid[1] // 2


def freeswim_attention_scale(native_grid, head_dim: int) -> float:
    """The official self-attention scale ``sqrt(log(2 n, n) / head_dim)``, ``n`` = native tokens per frame."""
    n = native_grid[0] * native_grid[1]
    if n < 2:
        raise ValueError(f"the native token grid {native_grid} has {n} token(s) per frame; the FreeSwim scale "
                         "log(2n)/log(n) needs at least 2")
    return math.sqrt(math.log(2 * n, n) / head_dim)


def freeswim_window_pattern(grid, half_window):
    """The inward sliding window on a ``(T, H, W)`` (or ``(H, W)``) token grid: all frames, and
    ``min(2 d + 1, L)`` tokens per spatial axis, clamped inward (NATTEN ``na3d``, stride 1)."""
    grid = tuple(int(g) for g in grid)
    d_h, d_w = half_window
    spatial = (min(2 * d_h + 1, grid[-2]), min(2 * d_w + 1, grid[-1]))
    return neighborhood_pattern(grid, grid[:-2] + spatial)


def freeswim_grid_pattern(layout: TokenLayout, native_height=480, native_width=832, **_):
    """The window branch's pattern on ``layout`` (the mask views; Wan's 16 pixels per token)."""
    return freeswim_window_pattern(layout.grid, freeswim_half_window(native_token_grid(native_height, native_width)))


# ------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------
@method_config
class FreeSwimConfig(MethodConfig):
    """FreeSwim: the model's native resolution (``native_height`` x ``native_width`` pixels; window and
    scale follow from it), the ``attention_scale``, the dual-path ``mode`` ("nocache" / "cache" with
    ``cache_steps`` and ``offload_cache``) and the window ``backend``."""

    native_height: int | None = param(None, role="pattern", range=(16, None),
                                      help="native height (px) of the model: the window is half its token grid",
                                      per_family={"wan": 480, "wan2.2": 720})
    native_width: int | None = param(None, role="pattern", range=(16, None),
                                     help="native width (px) of the model: the window is half its token grid",
                                     per_family={"wan": 832, "wan2.2": 1280})
    attention_scale: str = param("native", role="pattern", choices=("native", "default"),
                                 help="self-attention scale: native = sqrt(log(2n, n)/d) of the native grid "
                                      "(official), default = 1/sqrt(d)")
    mode: str = param("nocache", role="kernel", choices=("nocache", "cache"),
                      help="cache: run the full branch only every cache_steps steps (cond) and reuse its "
                           "cross-attention outputs in between")
    cache_steps: int | None = param(None, role="kernel", range=(1, None),
                                    help="cache mode: a guide step every N steps (default 2)")
    offload_cache: bool = param(False, role="kernel", help="cache mode: keep the cached outputs on the CPU")
    backend: str = backend_field()

    capabilities = frozenset({"box"})

    def check(self) -> None:
        super().check()
        if self.native_height is not None and self.native_width is not None:
            native_token_grid(self.native_height, self.native_width)  # at Wan's 16 px per token
        if self.mode != "cache":
            given = [n for n, v in (("cache_steps", self.cache_steps), ("offload_cache", self.offload_cache)) if v]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to mode='cache' (got mode={self.mode!r}); "
                                 "pass mode='cache' or drop them")

    @property
    def guide_interval(self) -> int:
        """The cache mode's guide-step interval (the official pipeline's default 2 when not given)."""
        return 2 if self.cache_steps is None else self.cache_steps


# ------------------------------------------------------------------------------------------------------
# processors
# ------------------------------------------------------------------------------------------------------
def current_plan(context, rows: int) -> CallPlan:
    """This call's plan from the dual-path hook, checked against the rows the processor got."""
    plan = context.run_state.get(PLAN_KEY)
    if plan is None or rows != plan.rows:
        got = "no plan" if plan is None else (
            f"{rows} rows where the plan has {plan.rows} ({'window + full branch' if plan.dual else 'window branch'} "
            f"of a batch of {plan.batch})")
        raise RuntimeError(
            f"FreeSwim's dual-path hook was bypassed in this denoiser call ({got}). Install FreeSwim with "
            "diffusion_attn.apply (not set_attn_processor), and call enable_model_cpu_offload() after apply, not "
            "before (accelerate drops hooks added after its own at the end of each pipeline call)")
    return plan


class FreeSwimProcessor(PatternProcessor):
    """FreeSwim self-attention (``attn1``): the window branch (inward sliding window, all frames) and,
    in dual calls, the full branch (dense), both with the FreeSwim scale."""

    method = "freeswim"

    def __init__(self, native_height: int = 480, native_width: int = 832, attention_scale: str = "native",
                 mode: str = "nocache", cache_steps: int | None = None, offload_cache: bool = False, *,
                 backend: str = "auto", placement=None, pixels_per_token: int = PIXELS_PER_TOKEN):
        super().__init__(backend=backend, placement=placement)
        self.config = FreeSwimConfig(native_height, native_width, attention_scale, mode, cache_steps, offload_cache,
                                     backend)
        self.pixels_per_token = int(pixels_per_token)
        self.native_grid = native_token_grid(native_height, native_width, self.pixels_per_token)
        self.half_window = freeswim_half_window(self.native_grid)

    def pattern(self, layout: TokenLayout):
        return freeswim_window_pattern(layout.grid, self.half_window)

    def pattern_key(self, layout: TokenLayout):
        return super().pattern_key(layout) + (("pixels_per_token", self.pixels_per_token),)

    def scale(self, head_dim: int) -> float | None:
        """Both branches' scale: the official ``sqrt(log(2n, n) / d)`` of the native grid, or None (default)."""
        if self.config.attention_scale == "default":
            return None
        return freeswim_attention_scale(self.native_grid, head_dim)

    # E4d: [window rows; full rows] in dual calls
    def branches(self, batch_size: int):
        plan = current_plan(self.context, batch_size)
        return [("window", plan.batch), ("full", plan.batch)] if plan.dual else None

    def branch_core(self, name: str):
        return self.full_core if name == "full" else self._extended_core

    def full_core(self, q, k, v, layout: TokenLayout, attention_mask=None) -> torch.Tensor:
        """The full branch: dense attention with the FreeSwim scale (the window branch is the base
        ``pattern_core``, which takes :meth:`scale` too)."""
        return self.dense(q, k, v, attention_mask, scale=self.scale(q.shape[-1]))


class FreeSwimCrossProcessor(PatternProcessor):
    """FreeSwim cross-attention (``attn2``): in dual calls the full rows' text attention is given to both
    branches; in cache mode it is stored on guide calls and reused by the cond calls between them."""

    method = "freeswim"

    def __init__(self, offload_cache: bool = False):
        super().__init__()
        self.offload_cache = bool(offload_cache)

    def pattern(self, layout: TokenLayout):
        return None

    def cross_core(self, q, k, v, attention_mask=None) -> torch.Tensor:
        plan = current_plan(self.context, q.shape[0])
        key = (_CROSS_KEY, id(self))
        if plan.dual:
            b = plan.batch
            mask = attention_mask
            if mask is not None and mask.shape[0] == q.shape[0] and q.shape[0] > 1:
                mask = mask[b:]
            full = self._cross_dense(q[b:], k[b:], v[b:], mask)
            if plan.store:
                self.context.run_state[key] = full.to("cpu") if self.offload_cache else full
            return torch.cat([full, full], 0)
        if plan.reuse:
            stored = self.context.run_state.get(key)
            if stored is None:
                raise RuntimeError("FreeSwim cache mode: no stored cross-attention output for this layer in this run")
            return stored.to(device=q.device, dtype=q.dtype)
        return self._cross_dense(q, k, v, attention_mask)

    def _cross_dense(self, q, k, v, attention_mask):
        """Stock cross-attention. As diffusers' ``WanAttnProcessor``, with no context-parallel exchange: under
        context parallelism each rank's query tokens attend to the whole text locally."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=None)


# ------------------------------------------------------------------------------------------------------
# install
# ------------------------------------------------------------------------------------------------------
def pixels_per_token(model, pipeline=None) -> int:
    """Pixels per token side: the VAE spatial factor (``pipeline``'s, else Wan's 8) x the model's spatial
    patch."""
    from ..adapters.variants import VARIANTS

    vae = getattr(pipeline, "vae_scale_factor_spatial", None) or VARIANTS["wan"].vae[1]
    patch = model.config.patch_size
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    return int(vae) * int(patch)


def _install(model, family, context, config: FreeSwimConfig):
    from ..adapters.wan import cross_layers

    factor = pixels_per_token(model, getattr(context, "pipeline", None))
    native_token_grid(config.native_height, config.native_width, factor, where=" for this model")
    if not all(getattr(b, "attn2", None) is not None for b in model.blocks):
        raise ValueError("FreeSwim needs the cross-attention (attn2) of every Wan block")

    def make(index, name):
        if ".attn2." in name:
            return FreeSwimCrossProcessor(config.offload_cache)
        return FreeSwimProcessor(config.native_height, config.native_width, config.attention_scale, config.mode,
                                 config.cache_steps, config.offload_cache, backend=config.backend,
                                 pixels_per_token=factor)

    undo = install_processors(model, family, context, make, layers=family.layers(model) + cross_layers(model))
    with rollback_on_error(undo):
        undo.append(apply_freeswim_dual_path(model, FreeSwimDualPathConfig(config.mode, config.guide_interval), context))
    return undo


SPEC = register(MethodSpec(
    name="freeswim",
    summary="FreeSwim: inward sliding-window self-attention + full-branch cross-attention override (+ cache) "
            "for high-resolution Wan video refinement",
    paper="Wu et al., FreeSwim: Revisiting Sliding-Window Attention Mechanisms for Training-Free "
          "Ultra-High-Resolution Video Generation (arXiv 2511.14712)",
    families=("wan",),
    kind="training-free high resolution",
    config=FreeSwimConfig,
    install=_install,
    grid_pattern=freeswim_grid_pattern,
))
