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
from ..registry import MethodConfig, MethodSpec, method_config, param, register
from .base import PatternProcessor
from .gna import backend_field, dense_layers_field
from .install import install_processors

__all__ = ["RadialConfig", "RadialProcessor"]


@method_config
class RadialConfig(MethodConfig):
    """Radial attention: ``decay_factor`` and ``sink`` shape the block mask; ``dense_layers`` /
    ``dense_steps`` placement; ``backend`` kernel. Fields left None take the model family's defaults
    (from the official scripts; Mochi's are ours)."""

    decay_factor: float | None = param(
        None, role="pattern", range=(0.0, None), help="band width scale for distant frames (per model by default)",
        per_family={"wan": 0.2, "wan2.2": 0.8, "hunyuanvideo": 0.95, "mochi": 0.95})
    sink: bool | None = param(
        None, role="pattern", help="keep the first latent frame fully visible (Wan's attention sink)",
        per_family={"wan": True, "wan2.2": True, "hunyuanvideo": False, "mochi": False})
    dense_layers: int | None = dense_layers_field(
        None, per_family={"wan": 1, "wan2.2": 1, "hunyuanvideo": 0, "mochi": 0})
    dense_steps: int | None = param(
        None, role="placement", range=(0, None), help="keep the first N denoising steps dense",
        per_family={"wan": 12, "wan2.2": 11, "hunyuanvideo": 12, "mochi": 16})
    backend: str = backend_field()

    capabilities = frozenset({"block"})


class RadialProcessor(PatternProcessor):
    """Radial attention (energy-decay block mask over latent frames)."""

    method = "radial"

    def __init__(self, decay_factor: float = 1.0, sink: bool = False, *, dense_layers: int = 0, dense_steps: int = 0, backend: str = "auto",
                 placement=None):
        super().__init__(dense_layers=dense_layers, dense_steps=dense_steps, backend=backend, placement=placement)
        self.config = RadialConfig(decay_factor, sink, dense_layers, dense_steps, backend)
        self.decay_factor, self.sink = self.config.decay_factor, self.config.sink

    def pattern(self, layout: TokenLayout):
        return radial_grid_pattern(layout, **self.config.pattern_params())


def radial_grid_pattern(layout: TokenLayout, decay_factor=1.0, sink=False, **_):
    return radial_pattern(layout.grid, decay_factor, sink)


def _install(model, family, context, config: RadialConfig):
    return install_processors(model, family, context, lambda index, name: RadialProcessor.from_config(config))


SPEC = register(MethodSpec(
    name="radial",
    summary="Radial attention: static O(n log n) spatio-temporal energy-decay block mask for video DiTs",
    paper="Li et al., Radial Attention (NeurIPS 2025, arXiv 2506.19852)",
    families=("wan", "hunyuanvideo", "mochi"),
    kind="training-free efficiency",
    config=RadialConfig,
    install=_install,
    context_parallel=("ulysses", "ring"),
    grid_pattern=radial_grid_pattern,
))
