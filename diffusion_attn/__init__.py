"""diffusion-attn: published attention methods for Hugging Face diffusers, as drop-in processors.

    import diffusion_attn as da
    handle = da.apply(pipe, "radial")          # or "gna", "hidiffusion"
    handle = da.apply(pipe, da.RadialConfig(decay_factor=0.2))   # the same, typed
    video = pipe(prompt).frames
    handle.remove()                            # bit-exact restore
"""

from . import ops
from .api import Handle, apply, applied, attach, attention_mask, denoisers, method_pattern, remove
from .layout import TokenLayout
from .processors import GNAProcessor, MSWMSAProcessor, PatternProcessor, RadialProcessor
from .processors.gna import GNAConfig
from .processors.hidiffusion import HiDiffusionConfig
from .processors.radial import RadialConfig
from .registry import MethodConfig, MethodSpec, Param, get_method
from .registry import methods as _method_specs

__version__ = "0.1.0"

__all__ = [
    "GNAConfig",
    "GNAProcessor",
    "Handle",
    "HiDiffusionConfig",
    "MSWMSAProcessor",
    "MethodConfig",
    "MethodSpec",
    "Param",
    "PatternProcessor",
    "RadialConfig",
    "RadialProcessor",
    "TokenLayout",
    "apply",
    "applied",
    "attach",
    "attention_mask",
    "denoisers",
    "get_method",
    "method_pattern",
    "methods",
    "ops",
    "remove",
]


def methods() -> dict[str, MethodSpec]:
    """Registered methods by name: summary, paper, families, kind and parameter specs
    (``spec.describe()`` gives a plain dict)."""
    return _method_specs()
