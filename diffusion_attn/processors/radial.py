"""Radial attention processors for Wan 2.1 / 2.2, HunyuanVideo and Mochi 1.

Pattern: :func:`diffusion_attn.patterns.radial_pattern` (the official block mask; see its docstring for
the generalisation to any token count). Placement follows the official scripts: the first
``dense_layers`` layers and the first ``dense_steps`` steps are dense. Defaults per model come from the
official scripts (Wan 2.1: decay 0.2, 1 dense layer, 12 dense steps, first-frame sink; Wan 2.2: decay
0.8, 1 layer, 11 steps, sink; HunyuanVideo: decay 0.95, 0 layers, 12 steps, no sink). Mochi 1 is
named by the paper but absent from the official code; its defaults are ours: HunyuanVideo's (decay
0.95, no sink, 0 dense layers) with 16 dense steps, the same quarter of Mochi's 64 default steps that
12 is of HunyuanVideo's 50.

Deviations from the official code: any resolution and frame count (the official crashes unless the
token count divides by 128), batch > 1, masks cached per layout in the run context (the official caches
one mask in a class attribute and goes stale when the size changes), and on HunyuanVideo text queries
respect the text padding mask as the stock processor does (the official attends to padded text there).
"""

from __future__ import annotations

from ..layout import TokenLayout
from ..patterns import radial_pattern
from ..registry import MethodSpec, Param, register
from .base import PatternProcessor
from .gna import PLACEMENT
from .install import install_processors

__all__ = ["RadialProcessor"]


class RadialProcessor(PatternProcessor):
    """Radial attention (energy-decay block mask over latent frames)."""

    method = "radial"

    def __init__(self, decay_factor: float = 1.0, sink: bool = False, *, dense_layers: int = 0, dense_steps: int = 0, backend: str = "auto",
                 placement=None):
        super().__init__(dense_layers=dense_layers, dense_steps=dense_steps, backend=backend, placement=placement)
        self.decay_factor, self.sink = float(decay_factor), bool(sink)

    def pattern_key(self, layout: TokenLayout):
        return ("radial", layout.grid, self.decay_factor, self.sink)

    def pattern(self, layout: TokenLayout):
        return radial_grid_pattern(layout, decay_factor=self.decay_factor, sink=self.sink)


def radial_grid_pattern(layout: TokenLayout, decay_factor=1.0, sink=False, **_):
    return radial_pattern(layout.grid, decay_factor, sink)


def _install(model, family, context, params):
    def make(index, name):
        return RadialProcessor(params["decay_factor"], params["sink"], dense_layers=params["dense_layers"],
                               dense_steps=params["dense_steps"], backend=params["backend"])

    return install_processors(model, family, context, make)


SPEC = register(MethodSpec(
    name="radial",
    summary="Radial attention: static O(n log n) spatio-temporal energy-decay block mask for video DiTs",
    paper="Li et al., Radial Attention (NeurIPS 2025, arXiv 2506.19852)",
    families=("wan", "hunyuanvideo", "mochi"),
    kind="training-free efficiency",
    params=(
        Param("decay_factor", float, None, "band width scale for distant frames (per model by default)", range=(0.0, None)),
        Param("sink", bool, None, "keep the first latent frame fully visible (Wan's attention sink)"),
        Param("dense_layers", int, None, "keep the first N attention layers dense", range=(0, None)),
        Param("dense_steps", int, None, "keep the first N denoising steps dense", range=(0, None)),
        PLACEMENT[2],
    ),
    install=_install,
    grid_pattern=radial_grid_pattern,
    family_defaults={
        "wan": dict(decay_factor=0.2, sink=True, dense_layers=1, dense_steps=12),
        "wan2.2": dict(decay_factor=0.8, sink=True, dense_layers=1, dense_steps=11),
        "hunyuanvideo": dict(decay_factor=0.95, sink=False, dense_layers=0, dense_steps=12),
        "mochi": dict(decay_factor=0.95, sink=False, dense_layers=0, dense_steps=16),
    },
))
