"""diffusion-attn: published attention methods for Hugging Face diffusers, as drop-in processors.

    import diffusion_attn as da
    handle = da.apply(pipe, "radial")          # or "gna", "hidiffusion"
    video = pipe(prompt).frames
    handle.remove()                            # bit-exact restore
"""

from . import ops
from .api import Handle, apply, applied, attach, attention_mask, denoisers, method_pattern, remove
from .layout import TokenLayout
from .processors import GNAProcessor, MSWMSAProcessor, PatternProcessor, RadialProcessor
from .registry import MethodSpec, Param, get_method
from .registry import methods as _method_specs

__version__ = "0.1.0"

__all__ = [
    "GNAProcessor",
    "Handle",
    "MSWMSAProcessor",
    "MethodSpec",
    "Param",
    "PatternProcessor",
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
