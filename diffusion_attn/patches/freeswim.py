"""FreeSwim's dual path as a named diffusers hook on a Wan denoiser (E7): the window and the full branch
in one batch, decided per call, without a copied model or pipeline file.

The official FreeSwim (WillWu111/FreeSwim, ``{nocache,cache}/pipeline_wan_video2video.py``) changes the
video-to-video pipeline's loop: before every transformer call ``latents = cat([latents, latents])`` (row
0 the *window* branch, row 1 the *full* branch), after ``scheduler.step`` ``latents = latents[0:1]``; its
modified ``WanTransformer3DModel`` passes ``cond`` / ``steps`` / cache flags down to the processors.
Keeping row 0 after a per-row scheduler step is the same as stepping with row 0 of the model output, so
here the whole fork lives around one denoiser call: :class:`FreeSwimDualPathHook` (``pre_forward``)
duplicates every per-sample input (latents, timestep, text states, image states) into ``[window rows;
full rows]`` and (``post_forward``) returns the window rows of the output. The stock pipeline never sees
the second branch; any batch size and ``num_videos_per_prompt`` work (B rows per branch).

Per call the hook publishes a :class:`CallPlan` in the run context's per-run state
(``context.run_state[PLAN_KEY]``), which the FreeSwim processors read:

* ``mode="nocache"`` (official ``nocache/``): every call (cond and uncond) runs both branches.
* ``mode="cache"`` (official ``cache/``): the cond call of a guide step (``step % cache_steps == 0``, or
  the first cond call of this denoiser in the run, e.g. after Wan 2.2 switches experts) runs both
  branches and stores each block's full-branch cross-attention output; the other cond calls run only the
  window branch with the stored cross-attention outputs; uncond calls run only the window branch with
  their own cross-attention (the official never computes the full branch for uncond). The official keeps
  the doubled batch in these calls with both rows identical (full row := window output, cross-attention
  := the same tensor for both rows); here those calls are not doubled at all, which gives the same
  window row at half the cost of the non-attention layers.

Which call is cond: the ``cache_context`` name the pipeline gives ("cond" / "uncond", ``WanPipeline``),
else the call's index within its step (0 = cond: ``WanVideoToVideoPipeline`` calls cond first, then
uncond, and gives no name). Per-run state (the plan, the stored outputs) lives in
``context.run_state``, which the run context empties at every run boundary.

The hook is a diffusers ``ModelHook`` registered under :data:`HOOK_NAME`; :func:`apply_freeswim_dual_path`
returns the exact undo (:mod:`.hooks`). ``enable_model_cpu_offload()`` must come *after* ``apply``
(accelerate puts back the ``forward`` it saved at the end of each pipeline call, which drops any hook
registered after its own); if the hook is ever bypassed, the processors see a batch that does not match
the plan and raise an error saying so instead of computing something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from .hooks import register_hook

__all__ = ["CallPlan", "FreeSwimDualPathConfig", "FreeSwimDualPathHook", "HOOK_NAME", "PLAN_KEY",
           "apply_freeswim_dual_path", "is_cond_call"]

HOOK_NAME = "diffusion_attn.freeswim.dual_path"
#: key of the current call's :class:`CallPlan` in ``RunContext.run_state``
PLAN_KEY = "freeswim.plan"
#: inputs of ``WanTransformer3DModel.forward`` that carry one row per sample
_PER_SAMPLE = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")


@dataclass(frozen=True)
class CallPlan:
    """What one denoiser call runs.

    ``batch``: rows per branch (the pipeline's batch); ``dual``: the processors get ``2 * batch`` rows,
    ``[window; full]``; ``store``: keep the full branch's cross-attention outputs (cache mode, guide
    call); ``reuse``: the cross-attention output is the stored one (cache mode, cond call between guide
    steps; the batch is not doubled)."""

    batch: int
    dual: bool
    store: bool = False
    reuse: bool = False

    @property
    def rows(self) -> int:
        return 2 * self.batch if self.dual else self.batch


@dataclass(frozen=True)
class FreeSwimDualPathConfig:
    """``mode``: "nocache" or "cache"; ``cache_steps``: guide-step interval of the cache mode."""

    mode: str = "nocache"
    cache_steps: int = 2

    def __post_init__(self):
        if self.mode not in ("nocache", "cache"):
            raise ValueError(f"mode must be 'nocache' or 'cache', got {self.mode!r}")
        if isinstance(self.cache_steps, bool) or not isinstance(self.cache_steps, int) or self.cache_steps < 1:
            raise ValueError(f"cache_steps must be an int >= 1 (a guide step every cache_steps steps), got "
                             f"{self.cache_steps!r}")


def is_cond_call(context) -> bool:
    """Whether the current denoiser call is the conditional (text) branch: by the ``cache_context`` name
    where the pipeline gives one ("cond" / "uncond"), else by position within the step (first = cond)."""
    name = getattr(context, "branch_name", None)
    if name in ("cond", "uncond"):
        return name == "cond"
    return getattr(context, "branch", 0) == 0


def _stored_key(module) -> tuple:
    return ("freeswim.stored", id(module))


class FreeSwimDualPathHook(ModelHook):
    """Forks each denoiser call into the window and the full branch (see the module docstring)."""

    def __init__(self, config: FreeSwimDualPathConfig, context):
        super().__init__()
        self.config, self.context = config, context
        self._plan: CallPlan | None = None

    def plan(self, module, batch: int) -> CallPlan:
        ctx = self.context
        if self.config.mode == "nocache":
            return CallPlan(batch, dual=True)
        if not is_cond_call(ctx):
            return CallPlan(batch, dual=False)
        step = max(int(getattr(ctx, "step", 0)), 0)
        stored = ctx.run_state.get(_stored_key(module))
        if step % self.config.cache_steps == 0 or stored is None or stored != batch:
            return CallPlan(batch, dual=True, store=True)
        return CallPlan(batch, dual=False, reuse=True)

    def pre_forward(self, module, *args, **kwargs):
        names = list(_PER_SAMPLE)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch = int(hidden.shape[0])
        plan = self.plan(module, batch)
        self._plan = plan
        self.context.run_state[PLAN_KEY] = plan
        if not plan.dual:
            return args, kwargs

        def double(x):
            if torch.is_tensor(x) and x.ndim >= 1 and x.shape[0] == batch:
                return torch.cat([x, x], 0)
            return x

        args = tuple(double(a) if i < len(names) else a for i, a in enumerate(args))
        kwargs = {k: double(v) if k in names else v for k, v in kwargs.items()}
        return args, kwargs

    def post_forward(self, module, output):
        plan, self._plan = self._plan, None
        if plan is None:
            return output
        if plan.store:
            self.context.run_state[_stored_key(module)] = plan.batch
        if not plan.dual:
            return output
        b = plan.batch
        if isinstance(output, tuple):
            return (output[0][:b],) + tuple(output[1:])
        output.sample = output.sample[:b]
        return output


def apply_freeswim_dual_path(module: torch.nn.Module, config: FreeSwimDualPathConfig, context):
    """Register the dual-path hook on a Wan denoiser; returns the exact undo."""
    return register_hook(module, FreeSwimDualPathHook(config, context), HOOK_NAME)
