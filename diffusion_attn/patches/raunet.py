"""HiDiffusion's RAU-Net (resolution-aware UNet) as removable patches on specific UNet module instances.

RAU-Net makes the deep UNet levels run at the resolution the model was trained for during the first,
high-noise denoising steps, which removes the object duplication of high-resolution sampling. Two
mechanisms, exactly as the official ``hidiffusion.py`` (megvii-research/HiDiffusion):

* **RAD / RAU (conv variant)**: the 3 x 3 downsampler conv of one level runs with ``stride=(4, 4),
  padding=(2, 2), dilation=(2, 2)`` (4x down instead of 2x) and the matching ``Upsample2D`` interpolates
  to the skip connection's size (4x up instead of 2x); its conv is unchanged.
* **Avg-pool / bicubic (block variant)**: inside a cross-attention down block, the output of the first
  (resnet, attention) pair is ``F.avg_pool2d(kernel_size=2, ceil_mode=True)``-ed (the pre-pool size is
  stored); in the matching up block the output of the second pair is bicubic-interpolated back to the
  stored size.

Official assignment (``sd15_hidiffusion_key`` / ``sdxl_hidiffusion_key`` / ``sdxl_turbo_hidiffusion_key``)
and schedule (``switching_threshold_ratio_dict``; ``T = int(num_steps * ratio)``, step 0-based):

=============  ==========================================  =============================================
variant        conv RAD/RAU                                avg-pool / bicubic
=============  ==========================================  =============================================
sd15 / sd21    ``down_blocks.0.downsamplers.0.conv`` +     ``down_blocks.1`` / ``up_blocks.2``,
               ``up_blocks.2.upsamplers.0``, step < T1     step < T2
sdxl           ``down_blocks.1.downsamplers.0.conv`` +     ``down_blocks.1`` / ``up_blocks.1``, step < T1
               ``up_blocks.0.upsamplers.0``, step < T2
sdxl (aggr.)   step < int(8/50 N)                          int(8/50 N) <= step < T1
sdxl-turbo     --                                          ``down_blocks.1`` / ``up_blocks.1``, step < T1
=============  ==========================================  =============================================

Ratios (T1, T2): sd15 latent < 256 on either side (image < 2048 px) 0.4, 0; otherwise 0.7, 0.3. sdxl
latent < 512 on either side (image < 4096 px) 0.4, 0 with aggressive mode on; otherwise 0.7, 0.3
without it. sdxl-turbo 0.5. (The official's inpainting / Playground checkpoints switch aggressive mode
off: pass ``aggressive=False``. Its SDXL ControlNet mode is :class:`RAUNetConfig` ``controlnet=True``.)

How this differs from the official code, on purpose:

* **Stateless steps.** The official keeps a ``timestep`` counter in every patched module (``+= 1`` per
  call, wrapping at ``pipeline._num_timesteps``); an interrupted run, a UNet called twice per step or
  img2img desynchronises them. Here every decision reads ``context.step`` (the run context's step,
  derived from the timesteps) and :func:`run_length`.
* **No class swapping, no attribute mutation: named diffusers hooks.** The official swaps
  ``module.__class__`` and mutates the conv's ``stride/padding/dilation`` during the call. Here every
  patch is a diffusers ``ModelHook`` registered under a name (:data:`HOOK_NAMES`,
  ``diffusion_attn.raunet.*``) in the module's ``HookRegistry``, as diffusers' own hooks are
  (:class:`RAUNetConfig` + :func:`apply_raunet`): ``post_forward`` hooks on the two attention models of
  the block variant, ``pre_forward`` hooks on each ``Downsample2D`` (records its input size) and on each
  ``Upsample2D`` (passes the skip size), and a ``new_forward`` hook on the RAD conv that calls
  ``F.conv2d`` with the RAD geometry. Removal goes by name through the registry, so it works whatever
  hooks (group offloading, layerwise casting) were registered before or after, and restores each
  module's ``__dict__`` (:mod:`diffusion_attn.patches.hooks`).
* **Skip sizes without the ``num_upsamplers += 12`` hack.** The official bumps ``unet.num_upsamplers``
  so that ``UNet2DConditionModel.forward`` always passes ``upsample_size`` (the skip size) to every up
  block. Here each ``Upsample2D`` of ``up_blocks[i]`` gets, when diffusers passes no size, the input size
  of ``down_blocks[n - 2 - i].downsamplers[0]``, recorded in the same UNet call: that tensor *is* the
  skip ``down_block_res_samples[-1]`` diffusers would have passed. The size is only forced when it is
  not 2x (i.e. when RAU-Net changed the sizes); a forced 2x nearest upsample equals ``scale_factor=2``
  anyway, so outputs equal the official's.
* **Run length.** ``N`` is the number of steps of the run as ``context.step`` counts them
  (:func:`run_length`: the run context's ``num_steps``, i.e. the pipeline's ``_num_timesteps``), which is
  the official's ``N`` for text-to-image, img2img (also without ``begin_index``), PNDM's repeated
  timestep and SDXL's ``denoising_end``.
  Aggressive mode is decided per call from the latent size (the official leaves a stale per-module flag
  on after a < 4096 px run, so its following 4096 px runs would stay aggressive).
* **SDXL ControlNet** (``RAUNetConfig(controlnet=True)``, chosen by hidiffusion for a
  ``StableDiffusionXLControlNetPipeline``): the official replaces the pipeline's ``__call__`` and the
  UNet's ``forward``; here the stock pipeline runs and hooks do the same: on the ControlNet (input
  resized to 1024 px for steps ``i < 0.6 N``, not run after), on the UNet (its residual arguments are
  taken off the call), on the up blocks and the mid block (residuals bicubic-resized to each skip / the
  mid output and added, as the official's UNet does), and T1 = 0.5 below 4096 px. Bit-exact with the
  official's (tests/test_hooks.py). The official pipeline defaults ``controlnet_conditioning_scale`` to
  0.8 where diffusers' has 1.0: pass it. ``guess_mode`` is refused once the ControlNet stops running
  (the stock pipeline cannot take its missing residuals); img2img / inpaint ControlNet, MultiControlNet,
  SD 1.5 ControlNet and T2I-Adapter pipelines are refused at apply (``apply_raunet=False``).
* **Odd sizes**: as the official, ``avg_pool2d(ceil_mode=True)`` then bicubic back to the exact stored
  size, and ``Upsample2D`` always hits the skip size exactly (nearest), so any latent size runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from .hooks import clear_child_registry_caches, register_hook, remove_hook

__all__ = [
    "RAD_STRIDE",
    "RAD_PADDING",
    "RAD_DILATION",
    "AGGRESSIVE_STEP",
    "OFFICIAL_RATIOS",
    "RAUNET_TARGETS",
    "RAUNetSchedule",
    "official_ratios",
    "raunet_schedule",
    "run_length",
    "check_raunet_targets",
    "HOOK_NAMES",
    "RAUNetConfig",
    "CONTROLNET_RATIOS",
    "apply_raunet",
    "remove_raunet",
    "install_raunet",
]

RAD_STRIDE = (4, 4)
RAD_PADDING = (2, 2)
RAD_DILATION = (2, 2)
#: official ``aggressive_step``: the conv stage of SDXL's aggressive mode lasts ``int(8 / 50 * N)`` steps
AGGRESSIVE_STEP = 8

#: official ``switching_threshold_ratio_dict``: (T1_ratio, T2_ratio)
OFFICIAL_RATIOS = {
    "sd15_1024": (0.4, 0.0),
    "sd15_2048": (0.7, 0.3),
    "sdxl_2048": (0.4, 0.0),
    "sdxl_4096": (0.7, 0.3),
    "sdxl_turbo_1024": (0.5, 0.0),
}

#: official module assignment per variant: ``conv`` (RAD conv), ``rau`` (the Upsample2D that undoes it),
#: ``pool`` / ``unpool`` (the attention models after which the block variant pools / interpolates),
#: and which ratio drives each stage.
RAUNET_TARGETS = {
    "sd15": dict(conv="down_blocks.0.downsamplers.0.conv", rau="up_blocks.2.upsamplers.0",
                 pool="down_blocks.1.attentions.0", unpool="up_blocks.2.attentions.1",
                 conv_ratio="T1", block_ratio="T2"),
    "sdxl": dict(conv="down_blocks.1.downsamplers.0.conv", rau="up_blocks.0.upsamplers.0",
                 pool="down_blocks.1.attentions.0", unpool="up_blocks.1.attentions.1",
                 conv_ratio="T2", block_ratio="T1"),
    "sdxl-turbo": dict(conv=None, rau=None,
                       pool="down_blocks.1.attentions.0", unpool="up_blocks.1.attentions.1",
                       conv_ratio=None, block_ratio="T1"),
}

VARIANTS = tuple(RAUNET_TARGETS)


# ------------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------------
def official_ratios(variant: str, latent_size: tuple[int, int]) -> tuple[str, float, float, bool]:
    """``(table key, T1_ratio, T2_ratio, aggressive)`` the official picks for this latent size."""
    h, w = latent_size
    if variant == "sd15":
        key = "sd15_1024" if (h < 256 or w < 256) else "sd15_2048"
        aggressive = False
    elif variant == "sdxl":
        small = h < 512 or w < 512
        key = "sdxl_2048" if small else "sdxl_4096"
        aggressive = small  # official: is_aggressive_raunet = True, set only below 4096 px
    elif variant == "sdxl-turbo":
        key, aggressive = "sdxl_turbo_1024", False
    else:
        raise ValueError(f"unknown HiDiffusion model variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    t1, t2 = OFFICIAL_RATIOS[key]
    return key, t1, t2, aggressive


@dataclass(frozen=True)
class RAUNetSchedule:
    """When each RAU-Net stage is on: ``conv`` and ``block`` are half-open step ranges ``[start, stop)``
    (0-based denoising steps); ``conv`` is None where the variant has no conv stage."""

    variant: str
    num_steps: int
    t1_ratio: float
    t2_ratio: float
    aggressive: bool
    conv: tuple[int, int] | None
    block: tuple[int, int]

    def conv_on(self, step: int) -> bool:
        return self.conv is not None and self.conv[0] <= step < self.conv[1]

    def block_on(self, step: int) -> bool:
        return self.block[0] <= step < self.block[1]


def raunet_schedule(variant: str, latent_size: tuple[int, int], num_steps: int, t1_ratio: float | None = None,
                    t2_ratio: float | None = None, aggressive: bool | None = None) -> RAUNetSchedule:
    """The official RAU-Net schedule (``None`` = the official value for this variant and latent size).

    The integer arithmetic is the official's, expression for expression: ``int(N * ratio)`` and
    ``int(8 / 50 * N)``.
    """
    _, t1, t2, aggr = official_ratios(variant, latent_size)
    t1 = t1 if t1_ratio is None else float(t1_ratio)
    t2 = t2 if t2_ratio is None else float(t2_ratio)
    aggr = aggr if aggressive is None else bool(aggressive)
    n = int(num_steps)
    if variant == "sd15":
        conv, block = (0, int(n * t1)), (0, int(n * t2))
    elif variant == "sdxl":
        if aggr:
            split = int(AGGRESSIVE_STEP / 50 * n)
            conv, block = (0, split), (split, int(n * t1))
        else:
            conv, block = (0, int(n * t2)), (0, int(n * t1))
    else:  # sdxl-turbo
        conv, block = None, (0, int(n * t1))
    return RAUNetSchedule(variant, n, t1, t2, aggr, conv, block)


def run_length(context, num_steps: int | None = None, cache: dict | None = None) -> int:
    """Number of denoising steps of the current run, as ``context.step`` counts them.

    ``num_steps`` (the method's parameter) wins. Otherwise the run context's :attr:`num_steps`: the
    pipeline's ``_num_timesteps`` (what the official ``hidiffusion`` divides by: the truncated count for
    img2img, with or without ``begin_index``, and one step per model evaluation for schedulers that repeat
    timesteps, e.g. PNDM's N + 1), else the scheduler's timesteps from ``begin_index`` on. ``cache`` is
    ignored (kept for callers).
    """
    if num_steps is not None:
        return int(num_steps)
    n = getattr(context, "num_steps", None)
    if n is None:
        raise RuntimeError(
            "hidiffusion's RAU-Net needs the number of denoising steps, which is unknown here (the method was "
            "applied to a bare UNet, or the scheduler has no timesteps): apply it to the pipeline, or pass "
            "num_steps=... (or apply_raunet=False)"
        )
    return int(n)


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------
def _sample_of(output):
    """The sample tensor of a Transformer2DModel output (tuple or output dataclass)."""
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _with_sample(output, sample):
    if isinstance(output, tuple):
        return (sample,) + tuple(output[1:])
    return type(output)(sample=sample)


def _get(unet, name: str):
    try:
        return unet.get_submodule(name)
    except AttributeError:
        return None


def check_raunet_targets(unet: torch.nn.Module, variant: str) -> list[str]:
    """Problems that keep RAU-Net from being installed on ``unet`` as ``variant`` (empty list = fine)."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    targets = RAUNET_TARGETS[variant]
    problems = []
    conv = _get(unet, targets["conv"]) if targets["conv"] else None
    if targets["conv"]:
        if not isinstance(conv, torch.nn.Conv2d):
            problems.append(f"{targets['conv']} (a 3x3 nn.Conv2d, got {type(conv).__name__ if conv is not None else 'nothing'})")
        elif conv.kernel_size != (3, 3) or conv.padding_mode != "zeros":
            problems.append(f"{targets['conv']} (a 3x3 zero-padded conv, got kernel {conv.kernel_size}, {conv.padding_mode})")
    for key in ("pool", "unpool"):
        mod = _get(unet, targets[key])
        if mod is None:
            problems.append(targets[key])
    down, up = list(getattr(unet, "down_blocks", [])), list(getattr(unet, "up_blocks", []))
    n = len(down)
    for i, block in enumerate(up):
        ups = getattr(block, "upsamplers", None)
        if not ups:
            continue
        j = n - 2 - i
        downs = getattr(down[j], "downsamplers", None) if 0 <= j < n else None
        if not isinstance(ups[0], Upsample2D) or ups[0].use_conv_transpose or not ups[0].interpolate:
            problems.append(f"up_blocks.{i}.upsamplers.0 (an interpolating Upsample2D)")
        if not downs or not isinstance(downs[0], Downsample2D):
            problems.append(f"down_blocks.{j}.downsamplers.0 (the Downsample2D paired with up_blocks.{i})")
    if targets["rau"] and _get(unet, targets["rau"]) is None:
        problems.append(targets["rau"])
    return problems


# ------------------------------------------------------------------------------------------------------
# Hooks
# ------------------------------------------------------------------------------------------------------
HOOK_PREFIX = "diffusion_attn.raunet"
RAD_CONV_HOOK = f"{HOOK_PREFIX}.rad_conv"  #: on the RAD conv: stride 4 / padding 2 / dilation 2 while on
POOL_HOOK = f"{HOOK_PREFIX}.pool"  #: on the ``pool`` attention model: avg-pool its output while on
UNPOOL_HOOK = f"{HOOK_PREFIX}.unpool"  #: on the ``unpool`` attention model: bicubic back to the stored size
SKIP_RECORD_HOOK = f"{HOOK_PREFIX}.skip_record"  #: on every Downsample2D: records its input size
SKIP_SIZE_HOOK = f"{HOOK_PREFIX}.skip_size"  #: on every Upsample2D: upsamples to the paired skip's size
RESIDUALS_HOOK = f"{HOOK_PREFIX}.residuals"  #: on the UNet: notes ControlNet / adapter residuals of a call
#: ControlNet mode: on the ControlNet (downsampled input, first 60 % of the steps), on the up blocks and the
#: mid block (the ControlNet residuals, bicubic-resized to the UNet's sizes, added to the skips / mid output)
CONTROLNET_HOOK = f"{HOOK_PREFIX}.controlnet"
CN_SKIP_HOOK = f"{HOOK_PREFIX}.controlnet_skip"
CN_MID_HOOK = f"{HOOK_PREFIX}.controlnet_mid"
HOOK_NAMES = (RAD_CONV_HOOK, POOL_HOOK, UNPOOL_HOOK, SKIP_RECORD_HOOK, SKIP_SIZE_HOOK, RESIDUALS_HOOK,
              CONTROLNET_HOOK, CN_SKIP_HOOK, CN_MID_HOOK)

#: official ``text_to_img_controlnet_switching_threshold_ratio_dict['sdxl_2048']`` (SDXL latent < 512 on
#: either side; at and above it the ControlNet mode keeps ``sdxl_4096``) and ``controlnet_apply_steps_rate``
CONTROLNET_RATIOS = (0.5, 0.0)
CONTROLNET_STEPS_RATE = 0.6
#: official: the ControlNet runs on the latent resized so that its longer side is 128 (1024 px) ...
CONTROLNET_LATENT = (128, 128)
#: ... and on the control image resized to that size times the VAE factor (hard-coded 8)
CONTROLNET_VAE_FACTOR = 8

#: UNet2DConditionModel.forward arguments that add residuals of the full-resolution feature sizes
#: (ControlNet, T2I-Adapter), with their positions
_RESIDUAL_ARGS = ((8, "down_block_additional_residuals"), (9, "mid_block_additional_residual"),
                  (10, "down_intrablock_additional_residuals"))


@dataclass(frozen=True)
class RAUNetConfig:
    """RAU-Net on one UNet, for :func:`apply_raunet` (diffusers' ``Config`` + ``apply_x`` style).

    ``variant``: ``sd15`` (also 2.1), ``sdxl`` or ``sdxl-turbo``. ``t1_ratio`` / ``t2_ratio`` /
    ``aggressive``: None = the official value for the variant and latent size (:func:`raunet_schedule`).
    ``num_steps``: steps of a run; None = from the pipeline's scheduler (:func:`run_length`).
    ``controlnet``: the official's SDXL ControlNet text-to-image mode (:func:`apply_raunet` with the
    ControlNet model): below 4096 px T1 = 0.5; the ControlNet runs on an input resized to 1024 px for the
    first 60 % of the steps, not after; its residuals are bicubic-resized to the UNet's feature sizes.
    """

    variant: str
    t1_ratio: float | None = None
    t2_ratio: float | None = None
    aggressive: bool | None = None
    num_steps: int | None = None
    controlnet: bool = False

    def __post_init__(self):
        if self.controlnet and self.variant != "sdxl":
            raise ValueError(
                f"RAU-Net's ControlNet mode is the official's SDXL text-to-image mode; not {self.variant!r}")
        if self.variant not in RAUNET_TARGETS:
            raise ValueError(f"unknown HiDiffusion model variant {self.variant!r}; accepted: {', '.join(VARIANTS)}")


class RAUNetState:
    """What the hooks of one :func:`apply_raunet` share: the config, the run context and the sizes seen
    in the current UNet call. Every decision reads ``context.step`` and ``context.latent_size``."""

    def __init__(self, config: RAUNetConfig, context):
        self.config, self.context = config, context
        self.skip: dict[int, tuple[int, int]] = {}  # down level -> input size of its Downsample2D
        self.pool_size: tuple[int, int] | None = None  # size before the avg-pool, while the block stage is on
        self.steps: dict = {}  # run_length cache
        self.residuals: tuple[str, ...] = ()  # residual arguments given to the current UNet call
        self.cn_down: tuple | None = None  # ControlNet mode: the current call's residuals, taken off the UNet call
        self.cn_mid: torch.Tensor | None = None

    def schedule(self) -> RAUNetSchedule:
        if self.context.latent_size is None:
            raise RuntimeError("RAU-Net module called outside a UNet forward pass (no latent size known)")
        cfg = self.config
        n = run_length(self.context, cfg.num_steps, self.steps)
        t1, t2 = cfg.t1_ratio, cfg.t2_ratio
        if cfg.controlnet and official_ratios(cfg.variant, self.context.latent_size)[0] == "sdxl_2048":
            t1 = CONTROLNET_RATIOS[0] if t1 is None else t1
            t2 = CONTROLNET_RATIOS[1] if t2 is None else t2
        return raunet_schedule(cfg.variant, self.context.latent_size, n, t1, t2, cfg.aggressive)

    def conv_on(self) -> bool:
        return self._checked(self.schedule().conv_on(self.context.step))

    def block_on(self) -> bool:
        return self._checked(self.schedule().block_on(self.context.step))

    def _checked(self, on: bool) -> bool:
        if on and self.residuals:
            raise ValueError(
                f"hidiffusion's RAU-Net cannot run with {' / '.join(self.residuals)} (ControlNet or T2I-Adapter "
                "residuals): they have the UNet's full-resolution feature sizes, which RAU-Net changes in the first "
                f"steps (step {self.context.step} here); apply hidiffusion with apply_raunet=False"
            )
        return on


def _inner_hooks(module: torch.nn.Module, hook: ModelHook) -> list[ModelHook]:
    """The diffusers hooks registered on ``module`` before ``hook`` (inside it in the chain), outermost first."""
    registry = module._diffusers_hook
    names = registry._hook_order
    index = next(i for i, n in enumerate(names) if registry.hooks[n] is hook)
    return [registry.hooks[n] for n in reversed(names[:index])]


class RADConvHook(ModelHook):
    """RAD: while the conv stage is on, the downsampler conv runs at ``stride=(4, 4), padding=(2, 2),
    dilation=(2, 2)`` (``F.conv2d`` with the conv's own weights); otherwise the conv's forward, untouched.

    Hooks registered on the conv before this one (group offloading, layerwise casting: they onload or
    cast the weights in ``pre_forward`` and undo it in ``post_forward``) run around the RAD conv as they
    would around the conv's own forward.
    """

    def __init__(self, state: RAUNetState):
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        if not self.state.conv_on():
            return self.fn_ref.original_forward(*args, **kwargs)
        inner = _inner_hooks(module, self)
        replacing = [type(h).__name__ for h in inner if hasattr(h, "new_forward")]
        if replacing:
            raise RuntimeError(
                f"RAU-Net's RAD conv cannot run inside {', '.join(replacing)} (registered on the conv before "
                "hidiffusion, it replaces the conv's forward): apply hidiffusion first, or apply_raunet=False"
            )
        for h in inner:
            args, kwargs = h.pre_forward(module, *args, **kwargs)
        x = args[0] if args else kwargs["input"]
        out = F.conv2d(x, module.weight, module.bias, RAD_STRIDE, RAD_PADDING, RAD_DILATION, module.groups)
        for h in reversed(inner):
            out = h.post_forward(module, out)
        return out


class PoolHook(ModelHook):
    """Block variant, down side: avg-pool (2 x 2, ``ceil_mode``) the attention model's output while the
    block stage is on, storing the size before."""

    def __init__(self, state: RAUNetState):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        state = self.state
        if not state.block_on():
            state.pool_size = None
            return output
        sample = _sample_of(output)
        state.pool_size = tuple(sample.shape[-2:])
        return _with_sample(output, F.avg_pool2d(sample, kernel_size=(2, 2), ceil_mode=True))


class UnpoolHook(ModelHook):
    """Block variant, up side: bicubic-interpolate the attention model's output back to the stored size."""

    def __init__(self, state: RAUNetState):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        size = self.state.pool_size
        if size is None:
            return output
        return _with_sample(output, F.interpolate(_sample_of(output), size=size, mode="bicubic"))


class SkipRecordHook(ModelHook):
    """On the Downsample2D of down level ``level``: records its input size (the skip connection that the
    paired up level's Upsample2D must reach)."""

    def __init__(self, state: RAUNetState, level: int):
        super().__init__()
        self.state, self.level = state, level

    def pre_forward(self, module, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.state.skip[self.level] = tuple(x.shape[-2:])
        return args, kwargs


class SkipSizeHook(ModelHook):
    """On an Upsample2D: when diffusers passes no ``output_size`` and the recorded skip size of the paired
    down level is not 2x the input (RAU-Net changed the sizes), pass that size."""

    def __init__(self, state: RAUNetState, level: int):
        super().__init__()
        self.state, self.level = state, level

    def pre_forward(self, module, *args, **kwargs):
        given = args[1] if len(args) > 1 else kwargs.get("output_size")
        if given is not None:
            return args, kwargs  # diffusers already forwards the skip size
        x = args[0] if args else kwargs["hidden_states"]
        target = self.state.skip.get(self.level)
        if target is None or target == (2 * x.shape[-2], 2 * x.shape[-1]):
            return args, kwargs
        if len(args) > 1:
            return (args[0], target) + tuple(args[2:]), kwargs
        return args, {**kwargs, "output_size": target}


class ResidualsHook(ModelHook):
    """On the UNet: notes which residual arguments (ControlNet, T2I-Adapter) the current call got, so that
    a RAU-Net stage refuses to run with them (a clear error instead of a shape mismatch deep in the UNet)."""

    def __init__(self, state: RAUNetState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        state = self.state
        state.residuals = tuple(name for i, name in _RESIDUAL_ARGS
                                if (args[i] if len(args) > i else kwargs.get(name)) is not None)
        state.cn_down = state.cn_mid = None
        if state.config.controlnet and len(args) <= 8:
            # ControlNet mode: the residuals are added here, resized (ControlNetSkipHook / ControlNetMidHook)
            down, mid = kwargs.get("down_block_additional_residuals"), kwargs.get("mid_block_additional_residual")
            if down is not None and mid is not None:
                state.cn_down, state.cn_mid = tuple(down), mid
                kwargs = {**kwargs, "down_block_additional_residuals": None, "mid_block_additional_residual": None}
                state.residuals = tuple(n for n in state.residuals if n not in
                                        ("down_block_additional_residuals", "mid_block_additional_residual"))
        return args, kwargs

    def post_forward(self, module, output):
        self.state.cn_down = self.state.cn_mid = None
        return output


class ControlNetHook(ModelHook):
    """ControlNet mode, on the ControlNet model (the official's SDXL ControlNet pipeline): for steps
    ``i < 0.6 N`` it runs on the latent resized (nearest) so that its longer side is 128 (sides floored to
    multiples of 8) and on the control image resized to 8x that; from then on it does not run and returns
    no residuals (the UNet then runs without them, as the official's)."""

    def __init__(self, state: RAUNetState):
        super().__init__()
        self.state = state

    def new_forward(self, module, sample, timestep, *args, **kwargs):
        state = self.state
        n = run_length(state.context, state.config.num_steps, state.steps)
        timesteps = state.context.scheduler.timesteps
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        hits = (timesteps.float() == t).nonzero().flatten().tolist() if torch.is_tensor(timesteps) else []
        if not hits:
            raise RuntimeError(f"RAU-Net's ControlNet mode: timestep {t} is not in the scheduler's timesteps")
        begin = getattr(state.context.scheduler, "begin_index", None) or 0
        step = hits[0] - begin
        if step < CONTROLNET_STEPS_RATE * n:
            h, w = sample.shape[-2:]
            factor = max(h / CONTROLNET_LATENT[0], w / CONTROLNET_LATENT[1])
            size = (int(h // factor) // 8 * 8, int(w // factor) // 8 * 8)
            pixel = [size[0] * CONTROLNET_VAE_FACTOR, size[1] * CONTROLNET_VAE_FACTOR]
            sample = F.interpolate(sample, size)
            if "controlnet_cond" in kwargs:
                kwargs["controlnet_cond"] = F.interpolate(kwargs["controlnet_cond"], pixel)
            else:
                args = (args[0], F.interpolate(args[1], pixel)) + tuple(args[2:])
            return self.fn_ref.original_forward(sample, timestep, *args, **kwargs)
        if kwargs.get("guess_mode"):
            raise ValueError("hidiffusion's RAU-Net ControlNet mode (the official's) does not support guess_mode; "
                             "use guess_mode=False or apply_raunet=False")
        return (None, None) if not kwargs.get("return_dict", True) else _controlnet_output(None, None)


def _controlnet_output(down, mid):
    from diffusers.models.controlnets.controlnet import ControlNetOutput

    return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


def _resized_sum(base: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The official's ``base + F.interpolate(residual, base's size, mode='bicubic')``."""
    return base + F.interpolate(residual, tuple(base.shape[-2:]), mode="bicubic")


class ControlNetSkipHook(ModelHook):
    """ControlNet mode, on up block ``index``: adds the ControlNet residuals of the skips it consumes,
    bicubic-resized to each skip's size (the official's UNet adds them to ``down_block_res_samples``,
    which only the up blocks read)."""

    def __init__(self, state: RAUNetState, start: int, stop: int):
        super().__init__()
        self.state, self.start, self.stop = state, start, stop

    def pre_forward(self, module, *args, **kwargs):
        residuals = self.state.cn_down
        if residuals is None:
            return args, kwargs
        skips = kwargs["res_hidden_states_tuple"]
        mine = residuals[self.start:self.stop]
        kwargs = {**kwargs, "res_hidden_states_tuple": tuple(_resized_sum(s, r) for s, r in zip(skips, mine))}
        return args, kwargs


class ControlNetMidHook(ModelHook):
    """ControlNet mode, on the mid block: adds the ControlNet mid residual, bicubic-resized."""

    def __init__(self, state: RAUNetState):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        mid = self.state.cn_mid
        return output if mid is None else _resized_sum(output, mid)


# ------------------------------------------------------------------------------------------------------
# Apply / remove
# ------------------------------------------------------------------------------------------------------
def apply_raunet(unet: torch.nn.Module, config: RAUNetConfig, context,
                 controlnet: torch.nn.Module | None = None) -> list[Callable[[], None]]:
    """Register RAU-Net's named diffusers hooks on ``unet`` (an SD 1.5/2.1- or SDXL-shaped
    UNet2DConditionModel) for ``config.variant``; returns the undo callables (run them in reverse order).

    Hooks (:data:`HOOK_NAMES`): ``rad_conv`` on the RAD conv, ``pool`` / ``unpool`` on the block variant's
    attention models, ``skip_record`` on every Downsample2D, ``skip_size`` on every Upsample2D,
    ``residuals`` on the UNet; in ControlNet mode (``config.controlnet``, ``controlnet`` = the pipeline's
    ControlNetModel) also ``controlnet`` on it and ``controlnet_skip`` / ``controlnet_mid`` on the up
    blocks and the mid block. Each undo removes one hook by name through the module's registry, which
    works whatever hooks were registered on the module before or after, and leaves the module's
    ``__dict__`` as it was (:mod:`diffusion_attn.patches.hooks`). Decisions read ``context.step`` and
    ``context.latent_size`` (the run context of ``diffusion_attn``) and :func:`run_length`.
    """
    if not isinstance(config, RAUNetConfig):
        raise TypeError(f"config must be a RAUNetConfig, got {type(config).__name__}")
    variant = config.variant
    problems = check_raunet_targets(unet, variant)
    if problems:
        raise ValueError(f"RAU-Net ({variant}) cannot be installed; expected: {'; '.join(problems)}")
    if config.controlnet and controlnet is None:
        raise ValueError("RAU-Net's ControlNet mode needs the pipeline's ControlNetModel (controlnet=...)")
    if config.controlnet and getattr(getattr(context, "scheduler", None), "timesteps", None) is None:
        raise ValueError("RAU-Net's ControlNet mode needs the pipeline's scheduler (apply it to the pipeline)")
    targets = RAUNET_TARGETS[variant]
    state = RAUNetState(config, context)
    undo: list = [lambda: clear_child_registry_caches(unet)]  # runs last
    try:
        if targets["conv"]:
            undo.append(register_hook(unet.get_submodule(targets["conv"]), RADConvHook(state), RAD_CONV_HOOK))
        undo.append(register_hook(unet.get_submodule(targets["pool"]), PoolHook(state), POOL_HOOK))
        undo.append(register_hook(unet.get_submodule(targets["unpool"]), UnpoolHook(state), UNPOOL_HOOK))
        n = len(unet.down_blocks)
        for j, block in enumerate(unet.down_blocks):
            if getattr(block, "downsamplers", None):
                undo.append(register_hook(block.downsamplers[0], SkipRecordHook(state, j), SKIP_RECORD_HOOK))
        for i, block in enumerate(unet.up_blocks):
            if getattr(block, "upsamplers", None):
                undo.append(register_hook(block.upsamplers[0], SkipSizeHook(state, n - 2 - i), SKIP_SIZE_HOOK))
        undo.append(register_hook(unet, ResidualsHook(state), RESIDUALS_HOOK))
        if config.controlnet:
            undo.append(register_hook(controlnet, ControlNetHook(state), CONTROLNET_HOOK))
            stop = 1 + sum(len(b.resnets) + bool(getattr(b, "downsamplers", None)) for b in unet.down_blocks)
            for block in unet.up_blocks:
                start = stop - len(block.resnets)
                undo.append(register_hook(block, ControlNetSkipHook(state, start, stop), CN_SKIP_HOOK))
                stop = start
            undo.append(register_hook(unet.mid_block, ControlNetMidHook(state), CN_MID_HOOK))
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    clear_child_registry_caches(unet)
    return undo


def remove_raunet(unet: torch.nn.Module, controlnet: torch.nn.Module | None = None) -> int:
    """Remove every RAU-Net hook from ``unet`` (and ``controlnet``, ControlNet mode) by name, whatever else
    is registered; returns how many."""
    removed = 0
    modules = list(unet.modules()) + (list(controlnet.modules()) if controlnet is not None else [])
    for module in modules:
        for name in HOOK_NAMES:
            removed += remove_hook(module, name)
    clear_child_registry_caches(unet)
    return removed


def install_raunet(unet: torch.nn.Module, variant: str, context, *, t1_ratio: float | None = None,
                   t2_ratio: float | None = None, aggressive: bool | None = None,
                   num_steps: int | None = None) -> list[Callable[[], None]]:
    """``apply_raunet(unet, RAUNetConfig(variant, ...), context)`` (the keyword form)."""
    return apply_raunet(unet, RAUNetConfig(variant, t1_ratio, t2_ratio, aggressive, num_steps), context)
