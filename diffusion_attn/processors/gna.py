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
from ..kernels import BACKENDS
from ..registry import MethodConfig, MethodSpec, method_config, param, register
from .base import PatternProcessor
from .install import install_processors

__all__ = ["GNAConfig", "GNAProcessor"]

#: the kernels (``backend``) of the pattern methods
BACKEND_CHOICES = BACKENDS
BACKEND_HELP = ("kernel: auto, gather (tiled), strips (column slices; stride-aligned windows), windows (window "
                "partitions), flex (compiled FlexAttention), chunked (dense mask by query chunks), triton / natten / "
                "xformers (opt-in), reference (dense mask), dense")


def dense_layers_field(default=0, per_family=None):
    return param(default, role="placement", help="keep the first N attention layers dense", range=(0, None),
                 per_family=per_family)


def backend_field(choices=BACKEND_CHOICES, help=BACKEND_HELP):
    return param("auto", role="kernel", help=help, choices=choices)


def _axes(value, n):
    return value * n if len(value) == 1 else value


@method_config
class GNAConfig(MethodConfig):
    """Generalized Neighborhood Attention: ``window``, ``stride`` and ``dilation`` per grid axis (an int
    or a 1-tuple broadcasts; ``(H, W)`` for images, ``(T, H, W)`` for video), NATTEN's rules
    (``1 <= stride <= window``); ``dense_layers`` / ``dense_steps`` placement; ``backend`` kernel."""

    window: tuple[int, ...] | None = param(None, role="pattern", required=True, range=(1, None),
                                           help="window per axis, (H, W) or (T, H, W); an int broadcasts")
    stride: tuple[int, ...] = param(1, role="pattern", range=(1, None),
                                    help="stride per axis: 1 sliding, = window blocked, between: strided")
    dilation: tuple[int, ...] = param(1, role="pattern", range=(1, None), help="dilation per axis")
    dense_layers: int = dense_layers_field()
    dense_steps: int = param(0, role="placement", help="keep the first N denoising steps dense (warm-up)",
                             range=(0, None))
    backend: str = backend_field()

    capabilities = frozenset({"box", "partition"})

    def pattern_capabilities(self) -> frozenset:
        """Box patterns; their windows partition the grid only when blocked (stride == window)."""
        n = max(len(self.window), len(self.stride))
        blocked = all(s == w for s, w in zip(_axes(self.stride, n), _axes(self.window, n)))
        return frozenset({"box", "partition"} if blocked else {"box"})

    def check(self) -> None:
        super().check()
        sizes = {name: getattr(self, name) for name in ("window", "stride", "dilation")}
        lengths = {len(v) for v in sizes.values()} - {1}
        if len(lengths) > 1:
            raise ValueError("window, stride and dilation must have the same number of entries (or one that "
                             "broadcasts), got " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
        n = max(lengths, default=1)
        window, stride = _axes(self.window, n), _axes(self.stride, n)
        if any(s > w for s, w in zip(stride, window)):
            raise ValueError(f"stride must be <= window on every axis (1 = sliding, = window = blocked), got "
                             f"window={self.window}, stride={self.stride}")


class GNAProcessor(PatternProcessor):
    """Neighborhood attention over the token grid: ``window``, ``stride`` and ``dilation`` per axis
    (an int broadcasts to every axis; a tuple gives ``(H, W)`` for images, ``(T, H, W)`` for video)."""

    method = "gna"

    def __init__(self, window, stride=1, dilation=1, *, dense_layers: int = 0, dense_steps: int = 0, backend: str = "auto",
                 placement=None):
        super().__init__(dense_layers=dense_layers, dense_steps=dense_steps, backend=backend, placement=placement)
        self.config = GNAConfig(window, stride, dilation, dense_layers, dense_steps, backend)
        self.window, self.stride, self.dilation = window, stride, dilation

    def pattern(self, layout: TokenLayout):
        return gna_grid_pattern(layout, **self.config.pattern_params())


def _per_axis(value, ndim):
    value = (value,) if isinstance(value, int) else tuple(value)
    return value * ndim if len(value) == 1 else value


def gna_grid_pattern(layout: TokenLayout, window, stride=1, dilation=1, **_):
    nd = len(layout.grid)
    try:
        return neighborhood_pattern(layout.grid, _per_axis(window, nd), _per_axis(stride, nd), _per_axis(dilation, nd))
    except ValueError as e:
        raise ValueError(f"GNA does not fit the token grid {layout.describe()}: {e}") from None


def _install(model, family, context, config: GNAConfig):
    return install_processors(model, family, context, lambda index, name: GNAProcessor.from_config(config))


SPEC = register(MethodSpec(
    name="gna",
    summary="Generalized Neighborhood Attention: sliding / strided / blocked windows over the 2-D or 3-D token grid",
    paper="Hassani et al., Generalized Neighborhood Attention (arXiv 2504.16922)",
    families=("flux", "sd3", "wan", "hunyuanvideo", "mochi"),
    kind="training-free efficiency",
    config=GNAConfig,
    install=_install,
    context_parallel=("ulysses", "ring"),
    grid_pattern=gna_grid_pattern,
    aliases=("neighborhood",),
))
