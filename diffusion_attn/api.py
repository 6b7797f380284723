"""The public verbs: apply / remove / applied / attach, and the mask view."""

from __future__ import annotations

import contextlib
import copy

import torch

from .adapters import FAMILIES, family_of
from .context import RunContext, SchedulerWatch, attach_context, detach_context, find_context
from .kernels import full_mask
from .layout import TokenLayout
from .parallel import check_model_parallel, parallel_of, sync_parallel
from .placement import Placement
from .processors.base import PatternProcessor
from .processors.install import get_processors, set_processors
from .registry import MethodConfig, get_method

__all__ = ["Handle", "apply", "remove", "applied", "attach", "attention_mask", "denoisers", "method_pattern"]

_HANDLE_ATTR = "_diffusion_attn_handle"


class Handle:
    """What ``apply`` installed; ``remove()`` undoes it exactly (also usable as a context manager).
    ``config``: the resolved method config (None for :func:`attach`); ``placement``: the
    :class:`~diffusion_attn.placement.Placement` given to ``apply`` (None: the config's own)."""

    config = None
    placement = None

    def __init__(self, method: str, params: dict, context: RunContext, models: list, undo: list):
        self.method, self.params, self.context = method, params, context
        self.models = models
        self._undo = undo

    @property
    def active(self) -> bool:
        return self._undo is not None

    def remove(self) -> None:
        """Undo everything. If an undo step fails, the others still run, the handle stays active holding
        the failed steps (``remove()`` again retries them) and the first error is raised."""
        if self._undo is None:
            return
        failed = _run_undo(self._undo)
        if failed:
            self._undo = [fn for fn, _ in failed]
            raise RuntimeError(
                f"{self.method}: {len(failed)} undo step(s) failed, the handle stays active with them: {failed[-1][1]}"
            ) from failed[-1][1]
        self._undo = None
        # the context outlives the handle's user references: free its per-run state and cached plans
        self.context.run_state.clear()
        self.context.cache.clear()
        for m in self.models:
            if getattr(m, _HANDLE_ATTR, None) is self:
                delattr(m, _HANDLE_ATTR)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Handle({self.method!r}, {self.params}, {state})"


def _run_undo(undo: list) -> list:
    """Run the undo steps in reverse order, all of them; returns the failed ones as ``(fn, error)`` in
    their original order (the last one is the first that failed)."""
    failed = []
    for fn in reversed(undo):
        try:
            fn()
        except Exception as e:  # keep undoing the rest, then report
            failed.append((fn, e))
    return failed[::-1]


def denoisers(pipe_or_model) -> list[torch.nn.Module]:
    """The denoiser(s) of a pipeline (``transformer``, ``transformer_2``, ``unet``), or the model itself."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return [pipe_or_model]
    found = [getattr(pipe_or_model, a, None) for a in ("transformer", "transformer_2", "unet")]
    found = [m for m in found if isinstance(m, torch.nn.Module)]
    if not found:
        raise ValueError(f"{type(pipe_or_model).__name__} has no denoiser (transformer, transformer_2 or unet) to patch")
    return found


def _variant(pipe_or_model, family: str) -> str:
    if family == "wan" and getattr(pipe_or_model, "transformer_2", None) is not None:
        return "wan2.2"
    return family


def _method_and_params(method, params: dict):
    """(spec, params or config) from ``apply``'s arguments: a method name with kwargs, or a config."""
    if isinstance(method, MethodConfig):
        if params:
            raise ValueError(f"give the parameters either in the {type(method).__name__} or as keyword arguments, "
                             f"not both (got {', '.join(params)})")
        return get_method(method), method
    return get_method(method), params  # a name, or a config class with keyword arguments


def _check_backend_here(config) -> None:
    """A ``backend`` that can never run on this machine (its package missing, no CUDA for a CUDA-only
    kernel, no working compile for flex) is refused at ``apply``: the accelerator if torch has one (models
    are often moved or offloaded to it after ``apply``), else the CPU."""
    from .registry import check_backend

    backend = getattr(config, "backend", None)
    if not isinstance(backend, str) or backend in ("auto", "dense"):
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = check_backend(backend, config.pattern_capabilities(), device)
    if problem:
        raise ValueError(f"backend={backend!r} cannot run {config.method} on this machine ({device}): {problem}")


def _placement_given(spec, method, params: dict) -> list[str]:
    """The placement-role parameters given explicitly (kwargs present, or config fields off their default)."""
    from .registry import MethodConfig

    names = [p.name for p in spec.config.params() if p.role == "placement"]
    if isinstance(method, MethodConfig):
        return [p.name for p in method.params() if p.role == "placement" and getattr(method, p.name) not in (None, p.default)]
    return [n for n in names if params.get(n) is not None]


def apply(pipe_or_model, method, *, placement: Placement | None = None, **params) -> Handle:
    """Install ``method`` on a pipeline (all its denoisers) or on a denoiser model.

    ``placement``: a :class:`~diffusion_attn.placement.Placement` (layers by index, range or kind, step
    windows by index or schedule fraction, branches, heads) instead of the method's ``dense_layers`` /
    ``dense_steps`` (and their per-family defaults); giving both is an error.

    ``method``: a method name with its parameters as keyword arguments
    (``apply(pipe, "radial", decay_factor=0.2)``), or a method config
    (``apply(pipe, RadialConfig(decay_factor=0.2))``); fields left None take the model family's defaults.
    Validates everything that can be known before the first call (parameter values, their combination,
    the model family's grid rank, the backend, head lists against the model) before touching the model;
    on any error the model is left exactly as it was. Returns a :class:`Handle` (``handle.config``: the
    resolved config; ``handle.params``: the same as a dict); ``handle.remove()`` or
    ``diffusion_attn.remove(pipe)`` restores the original processors and modules bit-exactly.

    Given a pipeline, each pipeline call is one run (the run context watches its scheduler's
    ``set_timesteps`` and ``step``, see :mod:`diffusion_attn.context`); given a bare denoiser, steps are
    inferred from the timesteps of its calls.
    """
    spec, params = _method_and_params(method, params)
    if placement is not None:
        if not isinstance(placement, Placement):
            raise ValueError(f"placement must be a diffusion_attn.placement.Placement, got {type(placement).__name__}")
        both = _placement_given(spec, method, params if isinstance(params, dict) else {})
        if both:
            raise ValueError(f"give the placement either as placement= or as {', '.join(both)}, not both")
    models = denoisers(pipe_or_model)
    families = [family_of(m) for m in models]
    for fam in families:
        if fam.name not in spec.families:
            raise ValueError(
                f"method {spec.name!r} does not support {fam.name} models ({fam.description}); "
                f"supported families: {', '.join(spec.families)}"
            )
    for m in models:
        if getattr(m, _HANDLE_ATTR, None) is not None or find_context(m) is not None:
            active = getattr(m, _HANDLE_ATTR, None)
            what = f"{active.method!r}" if active is not None else "a diffusion_attn method"
            raise ValueError(f"{what} is already applied to this {type(m).__name__}; call remove() first")
    config = spec.make_config(params, _variant(pipe_or_model, families[0].name), family=families[0].name)
    for m, fam in zip(models, families):
        config.check_model(m)
        check_model_parallel(m, fam, spec.name, spec.context_parallel)  # enable_parallelism came first
    _check_backend_here(config)
    resolved = config.to_dict()
    context = RunContext(families[0].name)
    undo: list = []
    try:
        watch = None
        if not isinstance(pipe_or_model, torch.nn.Module):
            # a pipeline: explicit run boundary at each call, steps from what diffusers publishes
            context.pipeline = pipe_or_model
            watch = SchedulerWatch(context, pipe_or_model)
            undo.append(watch.remove)
        for m, fam in zip(models, families):
            attach_context(m, context, fam.read_call, watch)
            undo.append(lambda m=m: detach_context(m))
            # runs after the processors are restored: a model made parallel after apply hands its config
            # to the restored stock processors, as enable_parallelism would have
            undo.append(lambda m=m: sync_parallel(m))
            undo.extend(spec.install(m, fam, context, config))
            for proc in get_processors(m).values():
                if isinstance(proc, PatternProcessor) and proc.context is context:
                    if placement is not None:  # the processors this apply installed act where the placement says
                        proc.placement = placement
                    # a model made parallel before apply: its new processors take part (enable_parallelism
                    # sets this on the processors it finds; after apply it finds these)
                    proc._parallel_config = parallel_of(m)
    except BaseException:
        failed = _run_undo(undo)
        if failed:
            raise failed[-1][1]
        raise
    handle = Handle(spec.name, resolved, context, models, undo)
    handle.config, handle.placement = config, placement
    for m in models:
        setattr(m, _HANDLE_ATTR, handle)
    return handle


def remove(pipe_or_model) -> bool:
    """Remove whatever diffusion_attn installed on this pipeline or model. Returns whether anything was."""
    handles = {id(h): h for h in (getattr(m, _HANDLE_ATTR, None) for m in denoisers(pipe_or_model)) if h is not None}
    for h in handles.values():
        h.remove()
    return bool(handles)


@contextlib.contextmanager
def applied(pipe_or_model, method, **params):
    """``with applied(pipe, "radial"): pipe(...)`` (or ``applied(pipe, RadialConfig(...))``) -- apply for
    the block, remove after it."""
    handle = apply(pipe_or_model, method, **params)
    try:
        yield handle
    finally:
        handle.remove()


def attach(model: torch.nn.Module) -> Handle:
    """Wire processors a user installed with ``model.set_attn_processor(...)`` to a run context.

    A processor instance shared by several layers is copied per layer (placement needs the layer index).
    """
    family = family_of(model)
    if find_context(model) is not None:
        raise ValueError(f"a run context is already attached to this {type(model).__name__}")
    original = get_processors(model)
    index = {name: i for name, i in family.layers(model)}
    context = RunContext(family.name)
    new, seen, found = dict(original), set(), []
    for name, proc in original.items():
        if not isinstance(proc, PatternProcessor):
            continue
        if name not in index:
            raise ValueError(f"{type(proc).__name__} cannot run on {name}: it replaces {family.name} layers "
                             f"{', '.join(list(index)[:3])}, ...")
        if id(proc) in seen:
            proc = copy.copy(proc)
        seen.add(id(proc))
        new[name] = proc.bind(context, family, index[name], name)
        proc._parallel_config = parallel_of(model)
        found.append(proc.method)
    if not found:
        raise ValueError("no diffusion_attn processor is installed on this model; nothing to attach")
    set_processors(model, new)
    attach_context(model, context, family.read_call)
    undo = [lambda: sync_parallel(model), lambda: set_processors(model, original), lambda: detach_context(model)]
    handle = Handle(found[0], {}, context, [model], undo)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def method_pattern(method, layout: TokenLayout, *, family: str | None = None, **params):
    """``(spec, resolved params, pattern)`` of ``method`` on ``layout``: what :func:`attention_mask`, the
    pattern pictures and ``diffusion-attn simulate`` show. ``family`` (or a variant such as ``wan2.2``)
    picks per-model defaults; default: the method's first family. A family the method does not support
    is an error."""
    spec, params = _method_and_params(method, params)
    if spec.grid_pattern is None:
        raise ValueError(f"method {spec.name!r} has no attention pattern to show")
    if family is not None and family not in spec.family_defaults and family not in spec.families:
        what = "does not support" if family in FAMILIES else "has no family"
        raise ValueError(f"{spec.name} {what} {family!r}; supported families: {', '.join(spec.families)}"
                         + (f" (defaults for {', '.join(spec.family_defaults)})" if spec.family_defaults else ""))
    config = spec.make_config(params, family or spec.families[0])
    resolved = config.to_dict()
    return spec, resolved, spec.grid_pattern(layout, **resolved)


def attention_mask(method, layout: TokenLayout, *, family: str | None = None, **params) -> torch.Tensor:
    """The dense boolean mask ``(queries, keys)`` that ``method`` applies on ``layout``.

    For inspection and plotting (and the tests' oracle): it is S x S, so keep layouts small. ``family``
    picks per-model defaults (e.g. radial's Wan sink); default: the method's first family.
    """
    _, _, pattern = method_pattern(method, layout, family=family, **params)
    return full_mask(pattern.dense_mask(), layout)
