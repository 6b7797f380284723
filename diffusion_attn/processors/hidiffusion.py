"""HiDiffusion (Zhang et al., ECCV 2024) for SD 1.5 / 2.1, SDXL and SDXL-Turbo UNets.

Two training-free parts, each switchable, as the official ``apply_hidiffusion(pipe, apply_raunet,
apply_window_attn)`` (megvii-research/HiDiffusion, ``hidiffusion/hidiffusion.py``):

**MSW-MSA** (:class:`MSWMSAProcessor`): the self-attention ``attn1`` of the official blocks attends
inside a 2 x 2 grid of ``ceil(H/2) x ceil(W/2)`` windows after a cyclic shift of ``m * (window // 4)``
rows and columns, ``m`` drawn uniformly from {0, 1, 2, 3} at every call; no Swin mask for the wrapped
region; at every timestep. Blocks: SD 1.5/2.1 ``down_blocks.0.attentions.{0,1}.transformer_blocks.0``
and ``up_blocks.3.attentions.{0,1,2}.transformer_blocks.0``; SDXL / Turbo
``down_blocks.1.attentions.{0,1}.transformer_blocks.{0,1}`` and
``up_blocks.1.attentions.{0,1,2}.transformer_blocks.{0,1}``. The official partitions the normalized
hidden states and runs ``attn1`` on the 4B windows; q/k/v and the output projection are token-wise, so
that is exactly windowed attention cores on the unpartitioned sequence (tested against a direct
re-implementation of the official roll / partition / reverse). The shift: with ``seed=None`` one
``torch.rand(1)`` per call mapped as the official (``<= 0.25`` -> 0, ... ``> 0.75`` -> 3), so the same
global torch seed gives the official's shifts; with ``seed=int`` a hash of (seed, step, layer index,
call branch): reproducible, independent of the global RNG and of call order; ``shift=0..3`` fixes it.
As the official, a map with fewer than 8 rows is never shifted (the official rolls only when the row
shift ``ceil(H/2) // 4 * m`` is positive, which also drops the column shift).

**RAU-Net** (:mod:`diffusion_attn.patches.raunet`): downsampler conv at stride 4 + upsampling to the skip
size (conv variant), and avg-pool / bicubic inside the cross-attention blocks (block variant), during the
first steps, with the official per-model assignment and ``switching_threshold_ratio_dict`` schedules
(SDXL's aggressive mode included); ``t1_ratio`` / ``t2_ratio`` / ``aggressive`` override them.

Model variant: ``auto`` tells SD 1.5/2.1 from SDXL by the UNet's block layout (the official compares
module names against stored lists); SDXL-Turbo has the SDXL layout and cannot be detected: pass
``model_variant="sdxl-turbo"`` (T1 = 0.5 and no conv stage).

Odd sizes (never a crash, never a silent resize):

* MSW-MSA: the official bicubic-resizes an odd feature map to ``2 * ceil(L/2)`` and back (warning that
  quality "largely decreases"). Here nothing is resized: on an odd axis the second window is clamped
  inward and overlaps the first by one row/column (:func:`~diffusion_attn.patterns.shifted_window_pattern`),
  so every query attends to exactly ``ceil(H/2) x ceil(W/2)`` real tokens. Even sizes are exactly the
  official windows.
* RAU-Net: as the official, ``avg_pool2d(ceil_mode=True)`` and bicubic back to the stored size, and every
  ``Upsample2D`` hits its skip connection's size, whatever the latent size.

Other deviations from the official: no class swapping (processors + named diffusers hooks,
bit-exact ``remove()``); step-driven schedules instead of per-module call counters; the skip-size
forcing does not use the ``num_upsamplers += 12`` hack (see :mod:`diffusion_attn.patches.raunet`). Not supported:
ControlNet other than SDXL text-to-image (``StableDiffusionXLControlNetPipeline``, which RAU-Net supports
bit-exactly as the official, see :mod:`diffusion_attn.patches.raunet`) and T2I-Adapter pipelines with
RAU-Net: refused at ``apply``; a bare UNet given such residuals while a RAU-Net stage is on raises a
clear error. LoRA layers that wrap the RAD conv (peft) -- use ``apply_raunet=False`` there.
"""

from __future__ import annotations

import hashlib

import torch

from ..layout import TokenLayout
from ..patches.raunet import RAUNetConfig, apply_raunet, check_raunet_targets
from ..patterns import shifted_window_pattern
from ..registry import MethodConfig, MethodSpec, method_config, param, register
from .base import PatternProcessor
from .install import install_processors

__all__ = ["HiDiffusionConfig", "MSWMSAProcessor", "WINDOW_BLOCKS", "detect_variant", "official_shift_choice", "seeded_shift_choice"]

#: official ``windown_attn_module_key`` per variant (BasicTransformerBlocks whose attn1 gets MSW-MSA)
_SD15_WINDOWS = tuple(f"down_blocks.0.attentions.{a}.transformer_blocks.0" for a in (0, 1)) + tuple(
    f"up_blocks.3.attentions.{a}.transformer_blocks.0" for a in (0, 1, 2))
_SDXL_WINDOWS = tuple(f"down_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in (0, 1) for t in (0, 1)) + tuple(
    f"up_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in (0, 1, 2) for t in (0, 1))
WINDOW_BLOCKS = {"sd15": _SD15_WINDOWS, "sdxl": _SDXL_WINDOWS, "sdxl-turbo": _SDXL_WINDOWS}

#: UNet block layouts (class names of down_blocks / up_blocks)
_LAYOUTS = {
    "sd15": (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}
_LAYOUT_TEXT = {
    "sd15": "SD 1.5/2.1 (down blocks CrossAttnDownBlock2D x3 + DownBlock2D, up blocks UpBlock2D + CrossAttnUpBlock2D x3)",
    "sdxl": "SDXL / SDXL-Turbo (down blocks DownBlock2D + CrossAttnDownBlock2D x2, up blocks CrossAttnUpBlock2D x2 + UpBlock2D)",
}
VARIANT_CHOICES = ("auto", "sd15", "sdxl", "sdxl-turbo")


# ------------------------------------------------------------------------------------------------------
# Shift choice
# ------------------------------------------------------------------------------------------------------
def official_shift_choice(rand: float) -> int:
    """The official mapping of ``torch.rand(1)`` to the shift multiple ``m`` (shift = ``m * (window // 4)``)."""
    if rand <= 0.25:
        return 0
    if rand <= 0.5:
        return 1
    if rand <= 0.75:
        return 2
    return 3


def seeded_shift_choice(seed: int, step: int, layer: int, branch: int) -> int:
    """Deterministic, uniform shift multiple for (seed, step, layer index, call branch)."""
    digest = hashlib.blake2b(f"hidiffusion:{seed}:{step}:{layer}:{branch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 4


def choose_shift(grid: tuple[int, ...], *, shift: int | None, seed: int | None, step: int, layer: int, branch: int) -> int:
    """The shift multiple of one MSW-MSA call: fixed ``shift``, else seeded, else the official
    ``torch.rand(1)`` draw; 0 on maps under 8 rows (the official rolls only when the row shift
    ``ceil(H/2) // 4 * m`` is positive). Shared by the diffusers processor and the ComfyUI node."""
    if shift is not None:
        choice = shift
    elif seed is not None:
        choice = seeded_shift_choice(seed, step, layer, branch)
    else:
        choice = official_shift_choice(float(torch.rand(1)))
    return 0 if -(-grid[0] // 2) // 4 == 0 else choice


# ------------------------------------------------------------------------------------------------------
# Processor
# ------------------------------------------------------------------------------------------------------
class MSWMSAProcessor(PatternProcessor):
    """MSW-MSA: ``attn1`` inside a 2 x 2 grid of shifted windows (see the module docstring).

    ``seed``: None = one ``torch.rand(1)`` per call as the official; an int = a hash of (seed, step,
    layer, branch). ``shift``: fix the shift multiple (0..3) instead. ``backend``: kernel choice of
    :func:`~diffusion_attn.kernels.pattern_attention`.
    """

    method = "hidiffusion"

    def __init__(self, seed: int | None = None, shift: int | None = None, *, backend: str = "auto"):
        super().__init__(backend=backend)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if shift is not None and shift not in (0, 1, 2, 3):
            raise ValueError(f"shift must be 0, 1, 2, 3 or None, got {shift!r}")
        self.seed, self.shift = seed, shift
        self.choice = 0  # shift multiple of the current call

    def core(self, q, k, v, layout: TokenLayout, attention_mask=None):
        self.choice = choose_shift(layout.grid, shift=self.shift, seed=self.seed, step=self.context.step,
                                   layer=self.layer_index or 0, branch=self.context.branch)
        return super().core(q, k, v, layout, attention_mask)

    def pattern_key(self, layout: TokenLayout):
        return ("hidiffusion", layout.grid, self.choice)

    def pattern(self, layout: TokenLayout):
        return shifted_window_pattern(layout.grid, self.choice)

    def __repr__(self) -> str:
        return f"MSWMSAProcessor(layer={self.layer_index}, seed={self.seed}, shift={self.shift})"


def hidiffusion_grid_pattern(layout: TokenLayout, shift=None, **_):
    """The MSW-MSA pattern for the mask views (``shift`` None shows shift 0)."""
    if len(layout.grid) != 2:
        raise ValueError(f"MSW-MSA works on 2-D token grids, got {layout.describe()}")
    return shifted_window_pattern(layout.grid, shift or 0)


# ------------------------------------------------------------------------------------------------------
# Model variant
# ------------------------------------------------------------------------------------------------------
def _block_layout(unet) -> tuple[tuple[str, ...], tuple[str, ...]]:
    down = tuple(type(b).__name__ for b in getattr(unet, "down_blocks", []))
    up = tuple(type(b).__name__ for b in getattr(unet, "up_blocks", []))
    return down, up


def _missing_windows(unet, variant: str) -> list[str]:
    procs = unet.attn_processors
    return [key for key in WINDOW_BLOCKS[variant] if f"{key}.attn1.processor" not in procs]


def detect_variant(unet, requested: str = "auto") -> str:
    """``sd15`` / ``sdxl`` / ``sdxl-turbo`` for this UNet, checking ``requested`` against its structure.

    Raises a ValueError naming the expected structure when the UNet matches neither layout or lacks an
    official HiDiffusion block.
    """
    if requested not in VARIANT_CHOICES:
        raise ValueError(f"unknown model_variant {requested!r}; accepted: {', '.join(VARIANT_CHOICES)}")
    layout = _block_layout(unet)
    found = next((name for name, lay in _LAYOUTS.items() if lay == layout), None)
    if found is None:
        raise ValueError(
            f"hidiffusion supports {_LAYOUT_TEXT['sd15']} and {_LAYOUT_TEXT['sdxl']} UNets; this "
            f"{type(unet).__name__} has down blocks {', '.join(layout[0]) or 'none'} and up blocks "
            f"{', '.join(layout[1]) or 'none'}"
        )
    if requested != "auto" and requested.split("-")[0] != found:
        raise ValueError(
            f"model_variant={requested!r} does not match this UNet, which has the {_LAYOUT_TEXT[found]} layout; "
            f"use model_variant={found!r} or 'auto'"
        )
    variant = found if requested == "auto" else requested
    missing = _missing_windows(unet, variant)
    if missing:
        raise ValueError(
            f"this {_LAYOUT_TEXT[found]} UNet lacks the HiDiffusion blocks {', '.join(missing)} "
            f"(expected {len(WINDOW_BLOCKS[variant])} BasicTransformerBlocks with attn1)"
        )
    return variant


# ------------------------------------------------------------------------------------------------------
# Install + spec
# ------------------------------------------------------------------------------------------------------
def _controlnet_mode(pipe, variant: str):
    """The ControlNet model when ``pipe`` is a ControlNet pipeline that RAU-Net supports (the official's
    SDXL ControlNet text-to-image: ``StableDiffusionXLControlNetPipeline`` with one ``ControlNetModel``),
    None for a pipeline without ControlNet / T2I-Adapter; any other such pipeline is refused: its residuals
    have the UNet's full-resolution feature sizes, which RAU-Net changes in the first steps."""
    if pipe is None:
        return None
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None:
        from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

        supported = type(pipe) is StableDiffusionXLControlNetPipeline and type(controlnet) is ControlNetModel
        if supported and variant == "sdxl":
            return controlnet
        raise ValueError(
            "hidiffusion's RAU-Net supports ControlNet only as the official does, in "
            "StableDiffusionXLControlNetPipeline (SDXL text-to-image) with one ControlNetModel; got "
            f"{type(pipe).__name__} with {type(controlnet).__name__} ({variant}), whose residuals have the UNet's "
            "full-resolution feature sizes, which RAU-Net changes in the first steps; use apply_raunet=False "
            "(MSW-MSA alone works with it)"
        )
    if getattr(pipe, "adapter", None) is not None:
        raise ValueError(
            f"hidiffusion's RAU-Net does not support T2I-Adapter pipelines ({type(pipe).__name__}): the adapter "
            "residuals have the UNet's full-resolution feature sizes, which RAU-Net changes in the first steps; "
            "use apply_raunet=False (MSW-MSA alone works with it)"
        )
    return None


def _install(model, family, context, params: "HiDiffusionConfig"):
    variant = detect_variant(model, params["model_variant"])
    if params["aggressive"] and variant != "sdxl":
        raise ValueError(f"aggressive RAU-Net is an SDXL mode (official); not available for {variant}")
    if params["t2_ratio"] is not None and variant == "sdxl-turbo":
        raise ValueError("sdxl-turbo has no T2 stage (official: avg-pool RAU-Net only); drop t2_ratio")
    if params["apply_raunet"]:
        if params["num_steps"] is None and getattr(context, "scheduler", None) is None:
            raise ValueError(
                "hidiffusion's RAU-Net needs the number of denoising steps: apply it to the pipeline (its "
                "scheduler tells), or pass num_steps=..., or apply_raunet=False"
            )
        problems = check_raunet_targets(model, variant)
        if problems:
            raise ValueError(f"RAU-Net ({variant}) cannot be installed on this UNet; expected: {'; '.join(problems)}")
        controlnet = _controlnet_mode(getattr(context, "pipeline", None), variant)
    undo: list = []
    try:
        if params["apply_window_attn"]:
            wanted = {f"{key}.attn1.processor" for key in WINDOW_BLOCKS[variant]}
            layers = [(name, i) for name, i in family.layers(model) if name in wanted]

            def make(index, name):
                return MSWMSAProcessor(params["seed"], params["shift"], backend=params["backend"])

            undo.extend(install_processors(model, family, context, make, layers=layers))
        if params["apply_raunet"]:
            config = RAUNetConfig(variant, t1_ratio=params["t1_ratio"], t2_ratio=params["t2_ratio"],
                                  aggressive=params["aggressive"], num_steps=params["num_steps"],
                                  controlnet=controlnet is not None)
            undo.extend(apply_raunet(model, config, context, controlnet=controlnet))
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    return undo


@method_config
class HiDiffusionConfig(MethodConfig):
    """HiDiffusion: the two parts (``apply_raunet``, ``apply_window_attn``), the UNet variant, MSW-MSA's
    shift (``seed``, ``shift``), RAU-Net's schedule (``t1_ratio``, ``t2_ratio``, ``aggressive``,
    ``num_steps``) and the kernel. None means the official behaviour where a field's help says so."""

    apply_raunet: bool = param(True, role="placement",
                               help="RAU-Net: resolution-aware downsampling/upsampling in the first steps")
    apply_window_attn: bool = param(True, role="placement",
                                    help="MSW-MSA: 2x2 shifted-window self-attention in the top blocks")
    model_variant: str = param("auto", role="placement", choices=VARIANT_CHOICES,
                               help="UNet variant; auto tells sd15 (also 2.1) from sdxl; Turbo must be given")
    seed: int | None = param(None, role="pattern",
                             help="MSW-MSA shifts: None = torch.rand per call (official); int = hash of (seed, step, layer)")
    shift: int | None = param(None, role="pattern", range=(0, 3),
                              help="fix the MSW-MSA shift multiple (shift = m * window // 4) instead of drawing it")
    t1_ratio: float | None = param(None, role="placement", range=(0.0, 1.0),
                                   help="RAU-Net T1 = int(steps * t1_ratio) (None: official per model/resolution)")
    t2_ratio: float | None = param(None, role="placement", range=(0.0, 1.0),
                                   help="RAU-Net T2 = int(steps * t2_ratio) (None: official per model/resolution)")
    aggressive: bool | None = param(None, role="placement",
                                    help="SDXL aggressive RAU-Net (None: official, on below 4096 px)")
    num_steps: int | None = param(None, role="placement", range=(1, None),
                                  help="denoising steps of a run (None: from the pipeline's scheduler)")
    backend: str = param("auto", role="kernel", choices=("auto", "windows", "gather", "strips", "flex", "triton", "xformers", "reference"),
                         help="kernel: auto, windows (the 2 x 2 windows reshaped), gather (tiled), strips "
                              "(column slices), flex (compiled FlexAttention), triton / xformers (opt-in), reference (dense mask)")

    capabilities = frozenset({"box", "partition"})


SPEC = register(MethodSpec(
    name="hidiffusion",
    summary="HiDiffusion: MSW-MSA (2x2 shifted-window self-attention in the top UNet blocks) + RAU-Net "
            "(resolution-aware down/upsampling in the early steps) for fast, duplication-free high-res SD/SDXL",
    paper="Zhang et al., HiDiffusion (ECCV 2024, arXiv 2311.17528)",
    families=("unet",),
    kind="training-free efficiency",
    config=HiDiffusionConfig,
    install=_install,
    context_parallel=(),  # UNets: diffusers has no context-parallel plan for them
    grid_pattern=hidiffusion_grid_pattern,
))
