"""Named diffusers hooks with exact undo: the one way ``diffusion_attn`` patches a module.

Every module patch is a diffusers :class:`~diffusers.hooks.ModelHook` registered under a name in the
module's :class:`~diffusers.hooks.HookRegistry` (``module._diffusers_hook``), as diffusers' own hooks
are (group offloading, layerwise casting, caches). Removal goes through the registry by name, so it
works whatever hooks were registered on the same module before or after ours: the registry re-links
the chain around the removed hook and the other hooks stay and keep working.

Registering a hook leaves two things behind that the registry's own ``remove_hook`` does not take
away: the registry itself (``module._diffusers_hook``) and an instance attribute ``forward`` (the
registry sets ``module.forward``; removing the last hook sets it back to the bound method, but as an
instance attribute). :func:`register_hook` records whether they existed and :func:`remove_hook` drops
them when ours was the last hook and they did not exist before, so the module's ``__dict__`` comes back
exactly as it was. Registering or removing a registry below a model makes the child-registry lists
that diffusers caches per registry stale: :func:`clear_child_registry_caches` on the model root after a
batch of changes. (``diffusion_attn.context.attach_context`` / ``detach_context`` do the same by hand
for the run-context hook; they can use these two functions.)
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

__all__ = ["register_hook", "remove_hook", "has_hook", "hook_names", "clear_child_registry_caches"]

_CREATED_REGISTRY = "_diffusion_attn_created_registry"
_HAD_FORWARD = "_diffusion_attn_had_instance_forward"


def register_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> Callable[[], None]:
    """Register ``hook`` on ``module`` under ``name``; returns the exact undo (``remove_hook(module, name)``).

    Refuses a name that is already registered on this module (the registry would refuse it too, after
    possibly creating itself).
    """
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(name) is not None:
        raise RuntimeError(
            f"a hook named {name!r} is already registered on this {type(module).__name__}; remove it first")
    created = registry is None
    had_forward = "forward" in module.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(module)
    setattr(hook, _CREATED_REGISTRY, created)
    setattr(hook, _HAD_FORWARD, had_forward)
    try:
        registry.register_hook(hook, name)
    except BaseException:
        if created and not registry.hooks:
            module.__dict__.pop("_diffusers_hook", None)
        raise
    return lambda: remove_hook(module, name, only=hook)


def remove_hook(module: torch.nn.Module, name: str, only: ModelHook | None = None) -> bool:
    """Remove the hook ``name`` from ``module`` through its registry (whatever was registered before or
    after it). When it was the last hook, also drop the registry and the instance ``forward`` if
    registering created them. ``only``: remove it only if it is this hook object (an undo must not remove
    a later registration under the same name). Returns whether a hook was removed (absent: nothing to do)."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(name) if registry is not None else None
    if hook is None or (only is not None and hook is not only):
        return False
    _remove_relinked(registry, name, hook)
    if not registry.hooks:
        if getattr(hook, _CREATED_REGISTRY, False):
            module.__dict__.pop("_diffusers_hook", None)
        if not getattr(hook, _HAD_FORWARD, True):
            module.__dict__.pop("forward", None)
    for attr in (_CREATED_REGISTRY, _HAD_FORWARD):
        hook.__dict__.pop(attr, None)
    return True


def _is_own_new_forward(fn_ref, hook) -> bool:
    return getattr(fn_ref.forward, "func", None) == hook.new_forward


def _remove_relinked(registry: HookRegistry, name: str, hook: ModelHook) -> None:
    """``registry.remove_hook(name)``, keeping hooks that replace ``forward`` (``new_forward``) in the chain.

    diffusers re-links the chain by writing the removed hook's previous forward into the *next* hook's
    ``fn_ref.forward``; for a next hook with ``new_forward`` that slot held its ``new_forward`` (the chain
    below it is ``original_forward``), which silently drops it from the chain. Here: the next hook keeps
    its ``new_forward`` and gets the removed hook's previous forward as ``original_forward``. Conversely, if
    diffusers already did that to ``hook`` (a hook below it was removed by someone else), its ``forward``
    slot holds the chain below it, which is what must be restored now.
    """
    order, refs = registry._hook_order, registry._fn_refs
    index = order.index(name)
    own = refs[index]
    if own.original_forward is not None and hasattr(hook, "new_forward") and not _is_own_new_forward(own, hook):
        own.original_forward = own.forward
    nxt = refs[index + 1] if index + 1 < len(refs) else None
    keep = nxt.forward if nxt is not None and nxt.original_forward is not None else None
    registry.remove_hook(name, recurse=False)
    if keep is not None:
        nxt.original_forward, nxt.forward = nxt.forward, keep


def has_hook(module: torch.nn.Module, name: str) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(name) is not None


def hook_names(module: torch.nn.Module) -> list[str]:
    """Names of the diffusers hooks on ``module``, innermost (registered first) to outermost."""
    registry = getattr(module, "_diffusers_hook", None)
    return list(registry._hook_order) if registry is not None else []


def clear_child_registry_caches(root: torch.nn.Module) -> None:
    """Clear the cached child-registry lists of every registry in ``root``'s tree (see
    ``HookRegistry.invalidate_child_registries_cache``) without creating a registry anywhere."""
    for _, m in root.named_modules():
        registry = m.__dict__.get("_diffusers_hook")
        if registry is not None and getattr(registry, "_child_registries_cache", None) is not None:
            registry._child_registries_cache = None
