"""The run context: what processors need to know about the current denoiser call.

diffusers never tells an attention processor the token grid, the denoising step or the batch layout.
A :class:`ContextHook` on each denoiser reads them from the denoiser's inputs and publishes them into a
:class:`RunContext` shared by the processors of one ``apply``. Processors read it; nothing lives at module
or class level. Per-layout artefacts (patterns, tile schedules) are cached in ``RunContext.cache``.

Where the step comes from
-------------------------
**Given a pipeline** (``apply(pipe, ...)``), the context reads what diffusers publishes:

* *Run boundary*: every diffusers pipeline calls ``self.scheduler.set_timesteps(...)`` (directly or via
  ``retrieve_timesteps``) once at the start of ``__call__``, before the first denoiser call. A
  :class:`SchedulerWatch` wraps that method *on the scheduler instance* (``functools.wraps`` keeps the
  signature that ``retrieve_timesteps`` inspects) and opens a new run there: step and branch restart, so
  repeated pipeline calls see the same steps (B1). Pipelines are not ``nn.Module`` and their ``__call__``
  cannot be wrapped per instance; ``set_timesteps`` is the one call every pipeline makes exactly once per
  run. If the pipeline's scheduler is replaced after ``apply`` (``pipe.scheduler = X.from_config(...)``),
  the watch moves to the new scheduler at the next denoiser call, which then opens the run.
* *Step index*: the pipeline's loop index ``i`` (``for i, t in enumerate(timesteps)``): the
  ``step_index`` a pipeline passes to ``denoiser.cache_context(name, step_index=i, ...)`` where it does
  (Wan), else the number of ``scheduler.step(...)`` calls since the run began (the watch wraps ``step``
  too: every pipeline calls it once per loop iteration). So a scheduler that repeats a timestep (PNDM's
  second timestep, Heun / KDPM2's second-order evaluations) counts each evaluation as one step, exactly as
  the pipeline's loop and the official ``hidiffusion`` package (which counts calls) do; img2img runs start
  at 0 whether or not the scheduler has ``begin_index``. A call whose timestep differs from the previous
  call's also starts a step (a safety net for pipelines that drive another scheduler object).
* *Number of steps* (:attr:`RunContext.num_steps`): the pipeline's ``_num_timesteps`` (set before its
  denoising loop: the truncated count for img2img / ``denoising_end``), else the ``num_inference_steps``
  of ``cache_context``, else the scheduler's timesteps from ``begin_index`` on.
* *Branch*: ``branch`` is the index of the call within its step (0, then 1 for a second CFG call, ...);
  ``branch_name`` is the ``cache_context`` name the pipeline gave the call ("cond", "uncond",
  "cond_uncond", ...) where it gives one, else None.

**Bare model** (``apply(model, ...)``, ``attach(model)``, ComfyUI-like callers that drive the denoiser
themselves): the timestep heuristic is the fallback, and only that: a new step starts when the timestep
changes; a timestep larger than the previous one starts a new run at step 0; the same timestep again is
another branch of the same step. It cannot tell a repeated one-step run from a CFG branch, nor a repeated
timestep (PNDM, Heun) from a second branch: apply to the pipeline for that.

Why a torch forward pre-hook and not a diffusers ``HookRegistry`` hook
--------------------------------------------------------------------
diffusers' ``HookRegistry`` and accelerate's ``add_hook_to_module`` both rewrite the instance's
``forward``; accelerate's ``remove_hook_from_module`` (which ``enable_model_cpu_offload`` runs at the end
of every pipeline call, in ``maybe_free_model_hooks``, before re-adding its hook) puts back the
``forward`` it saved, which drops any hook registered after it from the chain: the context stopped seeing
calls after the first one (B6). torch's ``_forward_pre_hooks`` run in ``Module.__call__`` before whatever
``forward`` is installed, and neither accelerate nor diffusers rewrite them: the context sees every call
whatever was added before or after it, and ``remove()`` deletes exactly its own entry.

Call-time inputs
----------------
The denoiser's attention kwargs (``cross_attention_kwargs`` for UNets, ``joint_attention_kwargs`` for
Flux / SD3, ``attention_kwargs`` for Wan / HunyuanVideo / Mochi) are published as
:attr:`RunContext.call_kwargs` (read-only) for every call, also for the families whose models never
forward them to their attention processors. A processor that takes a call input declares its name in
``call_inputs``; a key that no processor of the pack, no other processor of the model and not the model
itself takes is an error at the denoiser call (diffusers would drop it silently or with a warning).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable

import torch

__all__ = [
    "RunContext",
    "ContextHook",
    "SchedulerWatch",
    "HOOK_NAME",
    "attach_context",
    "detach_context",
    "find_context",
]

HOOK_NAME = "diffusion_attn.context"
_EMPTY: MappingProxyType = MappingProxyType({})


@dataclass
class RunContext:
    """State of the current denoiser call, shared by the processors of one ``apply``.

    * ``grid``: image/video token grid of the current call, ``(H, W)`` or ``(T, H, W)``;
    * ``text_len``: text tokens of the current call (0 if none);
    * ``step``: 0-based denoising step of the call (see the module docstring for where it comes from);
    * ``branch``: index of the call within its step (0, 1 for the second CFG call, ...);
    * ``branch_name``: the pipeline's ``cache_context`` name of the call ("cond", "uncond", ...) or None;
    * ``num_steps``: number of steps of the current run (None when unknown, e.g. a bare model);
    * ``latent_size``: spatial size of the latent input, ``(H, W)`` (UNet levels derive theirs from it);
    * ``call_kwargs``: the denoiser call's attention kwargs (read-only mapping; empty when none);
    * ``source``: ``"pipeline"`` when the step came from the pipeline, ``"timestep"`` for the fallback.
    """

    family: str
    scheduler: Any = None
    pipeline: Any = None
    grid: tuple[int, ...] | None = None
    text_len: int = 0
    latent_size: tuple[int, int] | None = None
    batch_size: int = 0
    step: int = -1
    branch: int = 0
    branch_name: str | None = None
    timestep: float | None = None
    call_kwargs: Any = field(default_factory=lambda: _EMPTY, repr=False)
    source: str = "timestep"
    cache: dict = field(default_factory=dict)
    #: per-run state of the processors (caches across steps, stored maps): emptied at every run boundary
    #: (a pipeline call; for a bare model, a timestep larger than the previous one), never across runs, and
    #: freed after a pipeline run's last step (FreeSwim's cache can be gigabytes)
    run_state: dict = field(default_factory=dict)
    #: call-input names the processors bound to this context take (see ``PatternProcessor.call_inputs``)
    call_inputs: set = field(default_factory=set)
    # -- run state (pipeline mode) -------------------------------------------------------------------
    _run_open: bool = field(default=False, repr=False)
    _steps_done: int = field(default=0, repr=False)
    _seen_steps: int = field(default=0, repr=False)
    _run_steps: int | None = field(default=None, repr=False)
    _cache_context: Any = field(default=None, repr=False)

    # -- what processors read ------------------------------------------------------------------------
    @property
    def num_steps(self) -> int | None:
        """Number of denoising steps of the current run, as :attr:`step` counts them (None if unknown)."""
        if self._run_steps is not None:
            return self._run_steps
        return _scheduler_steps(self.scheduler)

    def cached(self, key, build: Callable[[], Any]):
        """Per-layout cache: ``build()`` once per key."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    # -- what the hooks call -------------------------------------------------------------------------
    def begin_run(self) -> None:
        """Run boundary: the pipeline started a new ``__call__`` (its scheduler's ``set_timesteps``)."""
        self.step, self.branch, self.timestep, self.branch_name = -1, 0, None, None
        self._run_open, self._steps_done, self._seen_steps, self._run_steps = True, 0, 0, None
        self.run_state.clear()

    def end_step(self) -> None:
        """Step boundary: the pipeline's scheduler took a step. After the run's last step the per-run state
        is freed (nothing reads it after the denoising loop; the next run starts empty anyway)."""
        self._steps_done += 1
        if self._run_open and self._run_steps is not None and self._steps_done >= self._run_steps:
            self.run_state.clear()

    def reset(self) -> None:
        self.step, self.branch, self.timestep, self.branch_name = -1, 0, None, None
        self._run_open, self._steps_done, self._seen_steps, self._run_steps = False, 0, 0, None

    def observe(self, timestep: float | None, grid, text_len: int, batch_size: int, latent_size=None) -> None:
        """Record one denoiser call."""
        cache_ctx = self._cache_context
        if self._run_open:
            given = getattr(cache_ctx, "step_index", None)
            if given is not None:
                step = int(given)
            elif self.step < 0:
                step = 0
            elif self._steps_done != self._seen_steps or (timestep is not None and timestep != self.timestep):
                step = self.step + 1
            else:
                step = self.step
            self.branch = self.branch + 1 if step == self.step else 0
            self.step, self._seen_steps = step, self._steps_done
            if self._run_steps is None:
                self._run_steps = self._published_steps(cache_ctx)
            self.source = "pipeline"
        else:
            # fallback for a bare model: the timestep heuristic (see the module docstring)
            if timestep is None or self.timestep is None or timestep > self.timestep:
                self.step, self.branch = 0, 0
                self.run_state.clear()
            elif timestep != self.timestep:
                self.step, self.branch = self.step + 1, 0
            else:
                self.branch += 1
            self.source = "timestep"
        self.branch_name = getattr(cache_ctx, "name", None)
        self.timestep = timestep
        self.grid = tuple(int(g) for g in grid) if grid is not None else None
        self.text_len = int(text_len)
        self.batch_size = int(batch_size)
        self.latent_size = latent_size

    def _published_steps(self, cache_ctx) -> int | None:
        n = getattr(self.pipeline, "_num_timesteps", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
        n = getattr(cache_ctx, "num_inference_steps", None)
        if n is not None:
            return int(n)
        return _scheduler_steps(self.scheduler)


def _scheduler_steps(scheduler) -> int | None:
    """The scheduler's timesteps from ``begin_index`` on (None without timesteps)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    return max(0, len(timesteps) - int(begin))


def _timestep_value(t) -> float | None:
    if t is None:
        return None
    if torch.is_tensor(t):
        return float(t.detach().float().max()) if t.numel() else None
    return float(t)


# ----------------------------------------------------------------------------------------------------------
# Scheduler watch: the run boundary and the step boundary of a pipeline
# ----------------------------------------------------------------------------------------------------------
def _wrap_method(obj, name: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Set ``obj.<name>`` (instance attribute) to ``make(current bound method)``; returns the exact undo.

    The undo restores a previous instance attribute or deletes ours; if something replaced ours after us,
    ours is switched off (it calls straight through) instead of dropping the later wrapper.
    """
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    inner = getattr(obj, name)
    state = {"on": True}
    body = make(inner)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        if state["on"]:
            return body(*args, **kwargs)
        return inner(*args, **kwargs)

    setattr(obj, name, wrapper)

    def undo():
        state["on"] = False
        if obj.__dict__.get(name) is not wrapper:
            return  # wrapped again after us: stay in its chain as a pass-through
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    return undo


class SchedulerWatch:
    """Wraps ``set_timesteps`` (run boundary) and ``step`` (step boundary) of a pipeline's scheduler
    instance; follows the pipeline if its scheduler is replaced; :meth:`remove` undoes it exactly."""

    def __init__(self, context: RunContext, pipeline):
        self.context, self.pipeline = context, pipeline
        self.scheduler = None
        self._undo: list = []
        self.watch(getattr(pipeline, "scheduler", None))

    def watch(self, scheduler) -> None:
        self.remove()
        self.scheduler = scheduler
        self.context.scheduler = scheduler
        if scheduler is None or not callable(getattr(scheduler, "set_timesteps", None)):
            return
        ctx = self.context

        def make_set_timesteps(inner):
            def set_timesteps(*args, **kwargs):
                out = inner(*args, **kwargs)
                ctx.begin_run()
                return out
            return set_timesteps

        def make_step(inner):
            def step(*args, **kwargs):
                out = inner(*args, **kwargs)
                ctx.end_step()
                return out
            return step

        self._undo.append(_wrap_method(scheduler, "set_timesteps", make_set_timesteps))
        if callable(getattr(scheduler, "step", None)):
            self._undo.append(_wrap_method(scheduler, "step", make_step))

    def check(self) -> None:
        """Called at each denoiser call: follow a scheduler replaced on the pipeline (then this call is the
        first of a run whose ``set_timesteps`` we could not see)."""
        current = getattr(self.pipeline, "scheduler", None)
        if current is not self.scheduler:
            self.watch(current)
            if current is not None:
                self.context.begin_run()

    def remove(self) -> None:
        undo, self._undo = self._undo, []
        for fn in reversed(undo):
            fn()


# ----------------------------------------------------------------------------------------------------------
# The denoiser hook
# ----------------------------------------------------------------------------------------------------------
class ContextHook:
    """Publishes the call's grid, text length, batch, step and attention kwargs into a :class:`RunContext`.

    Registered as a torch forward pre-hook (``with_kwargs=True``) on the denoiser (see the module docstring
    for why). ``read_call(module, args, kwargs) -> dict(grid=..., text_len=..., batch_size=...,
    timestep=..., latent_size=..., call_kwargs=..., model_keys=..., forwarded=...)`` is the model family's
    input reader: ``call_kwargs`` the call's attention kwargs, ``model_keys`` the keys of them the model
    itself (or diffusers' attention modules, quietly) takes, ``forwarded`` whether the model passes them on
    to its attention processors (then a key another processor of the model names is taken too).
    """

    name = HOOK_NAME

    def __init__(self, context: RunContext, read_call, watch: SchedulerWatch | None = None):
        self.context = context
        self.read_call = read_call
        self.watch = watch

    def __call__(self, module, args, kwargs):
        info = self.read_call(module, args, kwargs)
        call_kwargs = info.get("call_kwargs") or {}
        if call_kwargs:
            _check_call_kwargs(module, self.context, call_kwargs, info)
        if self.watch is not None:
            self.watch.check()
        self.context.observe(
            _timestep_value(info.get("timestep")),
            info.get("grid"),
            info.get("text_len", 0),
            info.get("batch_size", 0),
            info.get("latent_size"),
        )
        self.context.call_kwargs = MappingProxyType(dict(call_kwargs)) if call_kwargs else _EMPTY
        return None


def _processor_arg_names(module) -> set:
    """Keyword names that processors of ``module`` other than diffusion_attn's take by name."""
    from .processors.base import PatternProcessor
    from .processors.install import get_processors

    names: set = set()
    for proc in get_processors(module).values():
        if isinstance(proc, PatternProcessor):
            continue
        try:
            names |= set(inspect.signature(proc.__call__).parameters)
        except (TypeError, ValueError):
            continue
    return names


def _check_call_kwargs(module, context: RunContext, call_kwargs, info) -> None:
    known = set(context.call_inputs) | set(info.get("model_keys", ()))
    unknown = [k for k in call_kwargs if k not in known]
    if unknown and info.get("forwarded"):
        others = _processor_arg_names(module)
        unknown = [k for k in unknown if k not in others]
    if unknown:
        name = info.get("call_kwargs_name", "attention kwargs")
        accepted = sorted(known)
        raise ValueError(
            f"{name} {sorted(unknown)} are not taken by the diffusion_attn processors of this "
            f"{type(module).__name__} nor by the model or its other attention processors; accepted: "
            f"{', '.join(accepted) if accepted else 'none'}"
        )


def attach_context(model: torch.nn.Module, context: RunContext, read_call, watch: SchedulerWatch | None = None) -> None:
    """Register the context hook on ``model`` (a torch forward pre-hook; :func:`detach_context` undoes it)."""
    if find_context(model) is not None:
        raise RuntimeError("a diffusion_attn run context is already attached to this model")
    hook = ContextHook(context, read_call, watch)
    hook.handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    hook.cache_undo = _watch_cache_context(model, context)


def _watch_cache_context(model, context: RunContext) -> Callable[[], None] | None:
    """Wrap the model's ``cache_context`` (diffusers' ``CacheMixin``) on the instance, so the context
    sees the name and loop position a pipeline gives each denoiser call."""
    if not callable(getattr(model, "cache_context", None)):
        return None

    def make(inner):
        @contextlib.contextmanager
        def cache_context(name, **kwargs):
            from diffusers.hooks.hooks import CacheContext

            previous = context._cache_context
            try:
                context._cache_context = CacheContext(name, **kwargs)
            except TypeError:  # fields this diffusers version does not know: keep the name
                context._cache_context = CacheContext(name)
            try:
                with inner(name, **kwargs):
                    yield
            finally:
                context._cache_context = previous

        return cache_context

    return _wrap_method(model, "cache_context", make)


def _find_hook(model) -> ContextHook | None:
    for hook in getattr(model, "_forward_pre_hooks", {}).values():
        if isinstance(hook, ContextHook):
            return hook
    return None


def find_context(model: torch.nn.Module) -> RunContext | None:
    hook = _find_hook(model)
    return None if hook is None else hook.context


def detach_context(model: torch.nn.Module) -> None:
    """Remove the context hook (and the ``cache_context`` wrapper) from ``model``, exactly."""
    hook = _find_hook(model)
    if hook is None:
        return
    hook.handle.remove()
    if hook.cache_undo is not None:
        hook.cache_undo()
