"""The method runtime of the ComfyUI nodes: placement (layers, step windows), the pattern per layout and
the shared kernel (:func:`diffusion_attn.kernels.prepared_attention`), independent of how attention is
hooked into the model (:mod:`.dit`, :mod:`.unet`).

Step windows (where in the denoising schedule the method runs; elsewhere attention stays dense) come in
two forms, decided in one place, :func:`in_step_window`:

* ``dense_steps`` (the method's spec parameter, as on the diffusers side): the first N steps *of one
  sampler run* are dense. The step is the position of the current sigma
  (``transformer_options["sigmas"]``) in the run's schedule ``transformer_options["sample_sigmas"]``
  (both set in ``comfy/samplers.py``), so a ``KSamplerAdvanced`` split (or Wan 2.2's second expert)
  restarts the count.
* ``start_percent`` / ``end_percent`` (node inputs, ComfyUI's convention, as in ``SkipLayerGuidanceDiT``
  and ``ControlNetApplyAdvanced``): the method runs while the current sigma lies between
  ``model_sampling.percent_to_sigma(start_percent)`` and ``percent_to_sigma(end_percent)``. Sigmas are
  positions on the model's noise scale, not counts, so the window is the same whether the schedule runs
  in one sampler or is split over several (and over Wan 2.2's two experts). The conversion happens per
  model call with the model's current ``model_sampling`` (a ``ModelSamplingSD3``-style shift node placed
  after ours is honoured).

Both apply: the method runs where the step is past ``dense_steps`` and the sigma lies in the percent
window; ``dense_layers`` then keeps the first layers dense.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels import prepared_attention
from ..layout import TokenLayout
from ..placement import Placement
from ..registry import MethodSpec

__all__ = [
    "CallPlacement",
    "ComfySupport",
    "MethodRuntime",
    "current_sigma",
    "in_step_window",
    "key_padding_from_comfy_mask",
    "step_index",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------
# Step, sigma, step windows
# ------------------------------------------------------------------------------------------------------
def current_sigma(transformer_options: dict) -> float | None:
    """The sigma of this model call (``transformer_options["sigmas"]``; its max over the batch)."""
    current = transformer_options.get("sigmas")
    if current is None:
        return None
    return float(torch.as_tensor(current).detach().float().max())


def step_index(transformer_options: dict) -> int | None:
    """0-based denoising step: where ``sigmas`` lies in ``sample_sigmas`` (None when either is missing)."""
    schedule = transformer_options.get("sample_sigmas")
    sigma = current_sigma(transformer_options)
    if schedule is None or sigma is None:
        return None
    schedule = torch.as_tensor(schedule).detach().float().flatten().cpu()
    tol = 1e-5 * max(abs(sigma), 1e-3)
    return max(int((schedule >= sigma - tol).sum()) - 1, 0)


def in_step_window(step: int | None, sigma: float | None, *, dense_steps: int = 0,
                   sigma_start: float | None = None, sigma_end: float | None = None) -> bool:
    """Whether the method runs at a model call (False: the call keeps dense attention).

    ``step``: the step within the sampler run (None: unknown, ``dense_steps`` does not apply);
    ``dense_steps``: the first N steps of the run are dense; ``sigma_start`` / ``sigma_end``: the method
    runs for ``sigma_end <= sigma <= sigma_start`` (ComfyUI's ``percent_to_sigma`` of the start / end
    percent, the comparison ``SkipLayerGuidanceDiT`` makes); None: no bound. An unknown ``sigma`` (a
    model called outside a sampler) is inside every sigma window.
    """
    if step is not None and step < dense_steps:
        return False
    if sigma is not None:
        if sigma_start is not None and sigma > sigma_start:
            return False
        if sigma_end is not None and sigma < sigma_end:
            return False
    return True


@dataclass(frozen=True)
class CallPlacement:
    """Where one model call stands: its step within the sampler run and whether the step window is open."""

    step: int | None
    active: bool = True


def key_padding_from_comfy_mask(mask, batch: int, seq: int) -> torch.Tensor | None:
    """A (B, S) keep-mask from a ComfyUI attention mask that only masks keys, else NotImplementedError.

    Accepts boolean masks (True = attend) and additive masks whose entries are 0 (keep) or very negative
    (drop), broadcastable as (b, 1, ..., 1, S) -- e.g. HunyuanVideo's text padding mask (1, 1, S).
    """
    if mask is None:
        return None
    m = torch.as_tensor(mask)
    if m.ndim == 0 or m.shape[-1] != seq or any(d != 1 for d in m.shape[1:-1]) or (m.ndim > 1 and m.shape[0] not in (1, batch)):
        raise NotImplementedError(
            f"attention masks of shape {tuple(m.shape)} (per-query or regional masks) are not supported by "
            "diffusion_attn patterns; only key-padding masks are")
    m = m.reshape(-1, seq)
    if m.dtype == torch.bool:
        keep = m
    else:
        keep = m == 0
        drop = (m <= -1e4) | torch.isneginf(m)
        if not bool((keep | drop).all()):
            raise NotImplementedError("additive attention biases are not supported by diffusion_attn patterns")
    return keep.expand(batch, seq)


def upcast(q, k, v, attn_precision):
    if attn_precision == torch.float32 and q.dtype != torch.float32:
        return q.float(), k.float(), v.float()
    return q, k, v


# ------------------------------------------------------------------------------------------------------
# Method runtime: placement + pattern + the shared kernel
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComfySupport:
    """What a method needs beyond the generic runtime in ComfyUI.

    ``hidden``: spec parameters that are not node inputs (their values come from ``fixed`` or the spec);
    ``unet_targets(params, unet_layout)``: diffusers names of the transformer blocks whose attn1 the
    method replaces (None: all); ``call_overrides(params, layout, step, layer)``: per-call pattern
    parameters; ``note``: shown in the node description; ``unavailable``: why the method has no ComfyUI
    node (empty: it has one); the exported README lists such methods with this reason.
    """

    hidden: tuple[str, ...] = ()
    fixed: dict = field(default_factory=dict)
    unet_targets: Callable | None = None
    call_overrides: Callable | None = None
    note: str = ""
    unavailable: str = ""


class MethodRuntime:
    """One node application: resolved params, placement, per-layout pattern/schedule cache.

    ``start_percent`` / ``end_percent``: the node's schedule window (0 and 1: the whole schedule).
    """

    def __init__(self, spec: MethodSpec, params: dict, support: ComfySupport | None = None, *,
                 start_percent: float = 0.0, end_percent: float = 1.0):
        self.spec, self.params = spec, dict(params)
        self.support = support or ComfySupport()
        self.dense_layers = int(params.get("dense_layers") or 0)
        self.dense_steps = int(params.get("dense_steps") or 0)
        #: the layers and steps (within one sampler run) the method acts on -- the same Placement the
        #: diffusers processors use; the sigma window (start/end percent) is ComfyUI's own, see placement()
        self.rule = Placement.from_dense(self.dense_layers, self.dense_steps)
        self.backend = params.get("backend") or "auto"
        self.start_percent, self.end_percent = float(start_percent), float(end_percent)
        self.cache: dict = {}
        self._warned_split = False

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; share, don't copy
        return self

    @property
    def whole_schedule(self) -> bool:
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    def placement(self, transformer_options: dict, model_sampling=None) -> CallPlacement:
        """The placement of one model call from its ``transformer_options`` (``sigmas``, ``sample_sigmas``)
        and the model's ``model_sampling`` (for the percent window; None: the window is not applied)."""
        step = step_index(transformer_options)
        sigma = current_sigma(transformer_options)
        sigma_start = sigma_end = None
        if model_sampling is not None and not self.whole_schedule:
            sigma_start = float(model_sampling.percent_to_sigma(self.start_percent))
            sigma_end = float(model_sampling.percent_to_sigma(self.end_percent))
        if self.dense_steps and step is not None and model_sampling is not None:
            self._warn_if_split(transformer_options, model_sampling)
        active = (step is None or self.rule.step_on(step)) and in_step_window(
            None, sigma, sigma_start=sigma_start, sigma_end=sigma_end)
        return CallPlacement(step, active)

    def _warn_if_split(self, transformer_options, model_sampling):
        if self._warned_split:
            return
        schedule = transformer_options.get("sample_sigmas")
        top = getattr(model_sampling, "sigma_max", None)
        if schedule is None or top is None:
            return
        first = float(torch.as_tensor(schedule).detach().float().flatten()[0])
        if first < float(top) * (1 - 1e-3):
            self._warned_split = True
            logger.warning(
                "diffusion_attn %s: this sampler run starts partway through the noise schedule (sigma %.4g < %.4g: "
                "KSamplerAdvanced start_at_step, a second expert, or denoise < 1); dense_steps=%d counts from the "
                "start of this run. Use start_percent (dense_steps=0) for a window that holds across split runs.",
                self.spec.name, first, float(top), self.dense_steps)

    def dense_now(self, placement: CallPlacement | None, layer: int) -> bool:
        return not self.rule.layer_on(layer) or (placement is not None and not placement.active)

    def _cached(self, key, build):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def attend(self, q, k, v, layout: TokenLayout, *, placement: CallPlacement | None, layer: int, key_padding_mask=None):
        """Attention on (B, S, heads, head_dim) tensors, or None where the call should stay dense."""
        if self.dense_now(placement, layer):
            return None
        step = placement.step if placement is not None else None
        overrides = {}
        if self.support.call_overrides is not None:
            overrides = self.support.call_overrides(self.params, layout, step, layer)
        # the pattern depends on the grid; what the kernels cache (block masks, occupancy) on the whole layout
        key = (layout, tuple(sorted(overrides.items())))
        pattern = self._cached(("pattern", layout.grid, key[1]),
                               lambda: self.spec.grid_pattern(layout, **{**self.params, **overrides}))
        if pattern is None or pattern.is_full():
            return None
        return prepared_attention(q, k, v, pattern, layout, cached=self._cached, key=key,
                                  key_padding_mask=key_padding_mask, backend=self.backend)


def check_percents(start_percent, end_percent) -> tuple[float, float]:
    """Validated ``(start_percent, end_percent)``: numbers in [0, 1] with start <= end."""
    out = []
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1] (a fraction of the denoising schedule), got {value!r}")
        out.append(float(value))
    if out[0] > out[1]:
        raise ValueError(f"start_percent ({out[0]}) is after end_percent ({out[1]}): the method would never run; "
                         "accepted: 0 <= start_percent <= end_percent <= 1")
    return out[0], out[1]
