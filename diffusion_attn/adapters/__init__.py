"""Model-family adapters (see :mod:`.base`)."""

from __future__ import annotations

from .base import Family, layer_kind
from .flux import FLUX
from .hunyuan import HUNYUAN
from .mochi import MOCHI
from .sd3 import SD3
from .unet import UNET, level_grid
from .variants import VARIANTS, Variant, adapter_family, grid_rank, token_layout, variant_of, variant_of_classes
from .wan import WAN

__all__ = ["FAMILIES", "Family", "VARIANTS", "Variant", "adapter_family", "family_of", "grid_rank", "layer_kind", "level_grid",
           "token_layout", "variant_of", "variant_of_classes"]

FAMILIES: dict[str, Family] = {f.name: f for f in (FLUX, SD3, WAN, HUNYUAN, MOCHI, UNET)}


def family_of(model) -> Family:
    """The adapter for a denoiser model, or a ValueError naming the supported model classes."""
    name = type(model).__name__
    for fam in FAMILIES.values():
        if name in fam.model_classes:
            return fam
    supported = ", ".join(c for f in FAMILIES.values() for c in f.model_classes)
    raise ValueError(f"unsupported model {name}; supported denoisers: {supported}")
