"""Generalized Neighborhood Attention (GNA) processors for Flux, SD3, Wan and HunyuanVideo.

Pattern: :func:`diffusion_attn.patterns.neighborhood_pattern` (NATTEN semantics: windows clamped inward,
even windows allowed, stride groups, dilation). Text tokens are NATTEN ``additional_keys``: every image
query also attends to all text tokens, and text queries attend to everything. The GNA paper's configs
are accepted as given, e.g. Flux 4K ``window=(80, 80), stride=(16, 16)``, HunyuanVideo 720p
``window=(18, 24, 24), stride=(16, 8, 8)``. A window (times dilation) larger than the grid of the call
raises a ValueError naming the grid (as NATTEN does), rather than silently shrinking.
"""

from __future__ import annotations

from ..layout import TokenLayout
from ..patterns import neighborhood_pattern
from ..registry import MethodSpec, Param, register
from .base import PatternProcessor
from .install import install_processors

__all__ = ["GNAProcessor"]


class GNAProcessor(PatternProcessor):
    """Neighborhood attention over the token grid: ``window``, ``stride`` and ``dilation`` per axis
    (an int broadcasts to every axis; a tuple gives ``(H, W)`` for images, ``(T, H, W)`` for video)."""

    method = "gna"

    def __init__(self, window, stride=1, dilation=1, *, dense_layers: int = 0, dense_steps: int = 0, backend: str = "auto",
                 placement=None):
        super().__init__(dense_layers=dense_layers, dense_steps=dense_steps, backend=backend, placement=placement)
        self.window, self.stride, self.dilation = window, stride, dilation

    def pattern_key(self, layout: TokenLayout):
        return ("gna", layout.grid, self.window, self.stride, self.dilation)

    def pattern(self, layout: TokenLayout):
        return gna_grid_pattern(layout, window=self.window, stride=self.stride, dilation=self.dilation)


def _per_axis(value, ndim):
    value = (value,) if isinstance(value, int) else tuple(value)
    return value * ndim if len(value) == 1 else value


def gna_grid_pattern(layout: TokenLayout, window, stride=1, dilation=1, **_):
    nd = len(layout.grid)
    try:
        return neighborhood_pattern(layout.grid, _per_axis(window, nd), _per_axis(stride, nd), _per_axis(dilation, nd))
    except ValueError as e:
        raise ValueError(f"GNA does not fit the token grid {layout.describe()}: {e}") from None


def _install(model, family, context, params):
    def make(index, name):
        return GNAProcessor(params["window"], params["stride"], params["dilation"], dense_layers=params["dense_layers"],
                            dense_steps=params["dense_steps"], backend=params["backend"])

    return install_processors(model, family, context, make)


PLACEMENT = (
    Param("dense_layers", int, 0, "keep the first N attention layers dense", range=(0, None)),
    Param("dense_steps", int, 0, "keep the first N denoising steps dense (warm-up)", range=(0, None)),
    Param("backend", str, "auto", "kernel: auto, gather (tiled), strips (column slices; stride-aligned windows), "
          "windows (window partitions), flex (compiled FlexAttention), triton / natten / xformers (opt-in), "
          "reference (dense mask), dense",
          choices=("auto", "gather", "strips", "windows", "flex", "triton", "natten", "xformers", "reference", "dense")),
)

SPEC = register(MethodSpec(
    name="gna",
    summary="Generalized Neighborhood Attention: sliding / strided / blocked windows over the 2-D or 3-D token grid",
    paper="Hassani et al., Generalized Neighborhood Attention (arXiv 2504.16922)",
    families=("flux", "sd3", "wan", "hunyuanvideo", "mochi"),
    kind="training-free efficiency",
    params=(
        Param("window", tuple, None, "window per axis, (H, W) or (T, H, W); an int broadcasts", range=(1, None), required=True),
        Param("stride", tuple, 1, "stride per axis: 1 sliding, = window blocked, between: strided", range=(1, None)),
        Param("dilation", tuple, 1, "dilation per axis", range=(1, None)),
        *PLACEMENT,
    ),
    install=_install,
    grid_pattern=gna_grid_pattern,
    aliases=("neighborhood",),
))
