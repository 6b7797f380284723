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
off and its ControlNet pipeline uses T1 = 0.5: pass ``aggressive=False`` / ``t1_ratio=0.5``.)

How this differs from the official code, on purpose:

* **Stateless steps.** The official keeps a ``timestep`` counter in every patched module (``+= 1`` per
  call, wrapping at ``pipeline._num_timesteps``); an interrupted run, a UNet called twice per step or
  img2img desynchronises them. Here every decision reads ``context.step`` (the run context's step,
  derived from the timesteps) and :func:`run_length`.
* **No class swapping, no attribute mutation.** The official swaps ``module.__class__`` and mutates the
  conv's ``stride/padding/dilation`` during the call. Here: torch forward hooks on the two attention
  models of the block variant, a forward pre-hook on each ``Downsample2D`` (records its input size) and
  on each ``Upsample2D`` (passes the skip size), and a per-instance ``forward`` wrapper on the RAD conv
  that calls ``F.conv2d`` with the RAD geometry. ``remove()`` deletes them; nothing else changed.
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
* **Odd sizes**: as the official, ``avg_pool2d(ceil_mode=True)`` then bicubic back to the exact stored
  size, and ``Upsample2D`` always hits the skip size exactly (nearest), so any latent size runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

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
    "install_raunet",
    "wrap_forward",
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
# Patch primitives
# ------------------------------------------------------------------------------------------------------
def wrap_forward(module: torch.nn.Module, make: Callable[[Callable], Callable], name: str = "") -> Callable[[], None]:
    """Replace ``module.forward`` on this instance by ``make(previous_forward)``; returns the exact undo.

    The undo restores the previous instance attribute (or deletes ours when there was none, so the class
    method shows again). If something else replaced ``forward`` after us, the undo refuses rather than
    silently dropping it.
    """
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    wrapper = make(module.forward)
    module.forward = wrapper

    def undo():
        if module.__dict__.get("forward") is not wrapper:
            raise RuntimeError(
                f"the forward of {name or type(module).__name__} was replaced after hidiffusion patched it; "
                "remove that patch first"
            )
        if had:
            module.forward = previous
        else:
            del module.forward

    return undo


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
# Install
# ------------------------------------------------------------------------------------------------------
def install_raunet(unet: torch.nn.Module, variant: str, context, *, t1_ratio: float | None = None,
                   t2_ratio: float | None = None, aggressive: bool | None = None,
                   num_steps: int | None = None) -> list[Callable[[], None]]:
    """Patch ``unet`` (an SD 1.5/2.1- or SDXL-shaped UNet2DConditionModel) with RAU-Net for ``variant``.

    Decisions read ``context.step`` and ``context.latent_size`` (the run context of ``diffusion_attn``)
    and :func:`run_length`. Returns the undo callables (run them in reverse order).
    """
    if variant not in RAUNET_TARGETS:
        raise ValueError(f"unknown HiDiffusion model variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    problems = check_raunet_targets(unet, variant)
    if problems:
        raise ValueError(f"RAU-Net ({variant}) cannot be installed; expected: {'; '.join(problems)}")
    targets = RAUNET_TARGETS[variant]
    state: dict = {"skip": {}, "pool_size": None, "steps": {}}

    def schedule() -> RAUNetSchedule:
        if context.latent_size is None:
            raise RuntimeError("RAU-Net module called outside a UNet forward pass (no latent size known)")
        n = run_length(context, num_steps, state["steps"])
        return raunet_schedule(variant, context.latent_size, n, t1_ratio, t2_ratio, aggressive)

    undo: list = []
    try:
        # -- RAD: the downsampler conv at stride 4 / padding 2 / dilation 2 while the conv stage is on
        if targets["conv"]:
            conv = unet.get_submodule(targets["conv"])

            def make_rad(inner, conv=conv):
                def rad_forward(hidden_states, *args, **kwargs):
                    if schedule().conv_on(context.step):
                        return F.conv2d(hidden_states, conv.weight, conv.bias, RAD_STRIDE, RAD_PADDING,
                                        RAD_DILATION, conv.groups)
                    return inner(hidden_states, *args, **kwargs)

                return rad_forward

            undo.append(wrap_forward(conv, make_rad, targets["conv"]))

        # -- avg-pool after the first (resnet, attention) pair of the down block ...
        def pool_hook(module, args, output):
            if not schedule().block_on(context.step):
                state["pool_size"] = None
                return None
            sample = _sample_of(output)
            state["pool_size"] = tuple(sample.shape[-2:])
            return _with_sample(output, F.avg_pool2d(sample, kernel_size=(2, 2), ceil_mode=True))

        # -- ... and bicubic back to the stored size after the second pair of the up block
        def unpool_hook(module, args, output):
            size = state["pool_size"]
            if size is None:
                return None
            return _with_sample(output, F.interpolate(_sample_of(output), size=size, mode="bicubic"))

        undo.append(unet.get_submodule(targets["pool"]).register_forward_hook(pool_hook).remove)
        undo.append(unet.get_submodule(targets["unpool"]).register_forward_hook(unpool_hook).remove)

        # -- RAU and odd sizes: every Upsample2D hits its skip connection's size
        n = len(unet.down_blocks)
        for j, block in enumerate(unet.down_blocks):
            if getattr(block, "downsamplers", None):
                def record(module, args, kwargs, j=j):
                    x = args[0] if args else kwargs["hidden_states"]
                    state["skip"][j] = tuple(x.shape[-2:])
                    return None

                undo.append(block.downsamplers[0].register_forward_pre_hook(record, with_kwargs=True).remove)
        for i, block in enumerate(unet.up_blocks):
            if getattr(block, "upsamplers", None):
                def to_skip(module, args, kwargs, j=n - 2 - i):
                    given = args[1] if len(args) > 1 else kwargs.get("output_size")
                    if given is not None:
                        return None  # diffusers already forwards the skip size
                    x = args[0] if args else kwargs["hidden_states"]
                    target = state["skip"].get(j)
                    if target is None or target == (2 * x.shape[-2], 2 * x.shape[-1]):
                        return None
                    if len(args) > 1:
                        return (args[0], target) + tuple(args[2:]), kwargs
                    return args, {**kwargs, "output_size": target}

                undo.append(block.upsamplers[0].register_forward_pre_hook(to_skip, with_kwargs=True).remove)
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    return undo
