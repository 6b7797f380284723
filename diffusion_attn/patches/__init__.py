"""Removable module patches: named diffusers hooks with exact undo.

Methods that change more than attention (HiDiffusion's RAU-Net) patch specific module *instances*:
never their classes, never their attributes. Every patch is a diffusers ``ModelHook`` registered under a
``diffusion_attn.*`` name (:mod:`.hooks`); its undo removes it by name through the module's registry,
whatever was registered before or after it, and puts the module's ``__dict__`` back as it was.
"""

from .hooks import clear_child_registry_caches, has_hook, hook_names, register_hook, remove_hook
from .raunet import (
    HOOK_NAMES,
    RAUNetConfig,
    RAUNetSchedule,
    apply_raunet,
    install_raunet,
    official_ratios,
    raunet_schedule,
    remove_raunet,
    run_length,
)

__all__ = [
    "HOOK_NAMES", "RAUNetConfig", "RAUNetSchedule", "apply_raunet", "clear_child_registry_caches", "has_hook",
    "hook_names", "install_raunet", "official_ratios", "raunet_schedule", "register_hook", "remove_hook",
    "remove_raunet", "run_length",
]
