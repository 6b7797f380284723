"""Removable module patches (forward hooks and per-instance forward wrappers) with exact undo.

Methods that change more than attention (HiDiffusion's RAU-Net) patch specific module *instances*:
never their classes, never their attributes. Every helper returns an undo callable; running it puts
the module back exactly as it was (same object, same ``__dict__``).
"""

from .raunet import (
    RAUNetSchedule,
    install_raunet,
    official_ratios,
    raunet_schedule,
    run_length,
    wrap_forward,
)

__all__ = ["RAUNetSchedule", "install_raunet", "official_ratios", "raunet_schedule", "run_length", "wrap_forward"]
