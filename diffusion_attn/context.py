"""The run context: what processors need to know about the current denoiser call.

diffusers never tells an attention processor the token grid, the denoising step or the batch layout.
One :class:`ContextHook` (a diffusers ``ModelHook``) on each denoiser reads them from the denoiser's
inputs and publishes them into a :class:`RunContext` shared by the processors of one ``apply``.
Processors read it; nothing counts calls and nothing lives at module or class level. Per-layout
artefacts (patterns, tile schedules) are cached in ``RunContext.cache``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

__all__ = ["RunContext", "ContextHook", "HOOK_NAME", "attach_context", "detach_context", "find_context"]

HOOK_NAME = "diffusion_attn.context"


@dataclass
class RunContext:
    """State of the current denoiser call, shared by the processors of one ``apply``.

    * ``grid``: image/video token grid of the current call, ``(H, W)`` or ``(T, H, W)``;
    * ``text_len``: text tokens of the current call (0 if none);
    * ``step``: 0-based denoising step. A new step starts when the timestep changes; a timestep larger
      than the previous one starts a new run at step 0. So CFG run as two calls (Wan, HunyuanVideo), as
      one batched call (UNets), and the two experts of Wan 2.2 all see the right step;
    * ``branch``: index of the call within the current step (0, 1 for the second CFG call, ...);
    * ``num_steps``: length of the scheduler's timestep list when a pipeline was given, else None;
    * ``latent_size``: spatial size of the latent input, ``(H, W)`` (UNet levels derive theirs from it).
    """

    family: str
    scheduler: Any = None
    grid: tuple[int, ...] | None = None
    text_len: int = 0
    latent_size: tuple[int, int] | None = None
    batch_size: int = 0
    step: int = -1
    branch: int = 0
    timestep: float | None = None
    cache: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int | None:
        timesteps = getattr(self.scheduler, "timesteps", None)
        return None if timesteps is None else len(timesteps)

    def observe(self, timestep: float | None, grid, text_len: int, batch_size: int, latent_size=None) -> None:
        """Record one denoiser call."""
        if timestep is None or self.timestep is None or timestep > self.timestep:
            self.step, self.branch = 0, 0
        elif timestep != self.timestep:
            self.step, self.branch = self.step + 1, 0
        else:
            self.branch += 1
        self.timestep = timestep
        self.grid = tuple(int(g) for g in grid) if grid is not None else None
        self.text_len = int(text_len)
        self.batch_size = int(batch_size)
        self.latent_size = latent_size

    def reset(self) -> None:
        self.step, self.branch, self.timestep = -1, 0, None

    def cached(self, key, build: Callable[[], Any]):
        """Per-layout cache: ``build()`` once per key."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


def _timestep_value(t) -> float | None:
    if t is None:
        return None
    if torch.is_tensor(t):
        return float(t.detach().float().max()) if t.numel() else None
    return float(t)


class ContextHook(ModelHook):
    """Publishes the call's grid, text length, batch and step into a :class:`RunContext`.

    ``read_call(module, args, kwargs) -> dict(grid=..., text_len=..., batch_size=..., timestep=...,
    latent_size=...)`` is the model family's input reader.
    """

    _is_stateful = False

    def __init__(self, context: RunContext, read_call):
        super().__init__()
        self.context = context
        self.read_call = read_call

    def pre_forward(self, module, *args, **kwargs):
        info = self.read_call(module, args, kwargs)
        self.context.observe(
            _timestep_value(info.get("timestep")),
            info.get("grid"),
            info.get("text_len", 0),
            info.get("batch_size", 0),
            info.get("latent_size"),
        )
        return args, kwargs


def attach_context(model: torch.nn.Module, context: RunContext, read_call) -> None:
    created_registry = not hasattr(model, "_diffusers_hook")
    had_instance_forward = "forward" in model.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(HOOK_NAME) is not None:
        raise RuntimeError("a diffusion_attn run context is already attached to this model")
    hook = ContextHook(context, read_call)
    # what detach must undo beyond the registry's own remove_hook, so the module comes back bit-exactly
    hook.created_registry, hook.had_instance_forward = created_registry, had_instance_forward
    registry.register_hook(hook, HOOK_NAME)


def find_context(model: torch.nn.Module) -> RunContext | None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return None if hook is None else hook.context


def detach_context(model: torch.nn.Module) -> None:
    """Remove the context hook; when it was the only hook, also drop the registry and the instance
    ``forward`` that diffusers' HookRegistry leaves behind, if attaching created them."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    if hook is None:
        return
    registry.remove_hook(HOOK_NAME, recurse=False)
    if registry.hooks:
        return
    if hook.created_registry:
        del model._diffusers_hook
    if not hook.had_instance_forward:
        model.__dict__.pop("forward", None)
