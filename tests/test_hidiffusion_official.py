"""HiDiffusion equals the official ``hidiffusion`` package (PyPI 0.1.10) bit for bit.

Tiny fp32 SD 1.5- and SDXL-shaped UNet pipelines whose module names contain the official's stored key
lists (so ``apply_hidiffusion`` recognises them as SD 1.5 / SDXL), Euler / DDIM / PNDM, text-to-image and
img2img (strength 0.6), at sizes and step counts where every RAU-Net stage of the official schedule is on
at some step. ``diffusion_attn.apply(pipe, "hidiffusion")`` (``seed=None``: one ``torch.rand(1)`` per
MSW-MSA call, as the official) against ``apply_hidiffusion(pipe)``, with the global RNG seeded the same
before each run. Regression test of B4: PNDM repeats its second timestep (N + 1 UNet calls, counted by
the official against ``pipe._num_timesteps``), and img2img on schedulers without ``begin_index`` runs
the truncated number of steps.

The official swaps module classes and leaves ``unet.num_upsamplers += 12`` behind after
``remove_hidiffusion``, so it runs on its own copy of the pipeline (same weights).
"""

import functools
import importlib
import sys

import pytest
import torch

if "diffusers.pipelines.controlnet.multicontrolnet" not in sys.modules:  # moved in diffusers >= 0.33
    try:
        sys.modules["diffusers.pipelines.controlnet.multicontrolnet"] = importlib.import_module(
            "diffusers.models.controlnets.multicontrolnet")
    except ImportError:
        pass
hidiffusion = pytest.importorskip("hidiffusion")

import diffusion_attn as da  # noqa: E402
from diffusion_attn.models.tiny import build_pipeline  # noqa: E402

# model -> (UNet config changes so the official's module key lists are contained, call size, steps)
MODELS = {
    # SD 1.5 has a conv shortcut in down_blocks.2 (320 -> 640 -> 1280 channels)
    "sd15": ("tiny-sd15-random", dict(block_out_channels=(16, 32, 64, 64)), dict(height=128, width=192), 5),
    # SDXL has 10 transformer layers in down_blocks.2 / up_blocks.0; 7 steps: both aggressive stages on
    "sdxl": ("tiny-sdxl", dict(transformer_layers_per_block=(1, 2, 10)), dict(height=128, width=192), 7),
}
SCHEDULERS = ("euler", "ddim", "pndm")


def _scheduler(kind, config):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    cls = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler}[kind]
    extra = dict(skip_prk_steps=True) if kind == "pndm" else {}  # as SD 1.5 ships it
    return cls.from_config(config, **extra)


@functools.lru_cache(maxsize=None)
def _pipeline(model, copy):
    """The tiny text-to-image pipeline of ``model`` with an official-shaped UNet (``copy`` 0: ours, 1: the
    official's); the same weights for both copies."""
    from diffusers import UNet2DConditionModel

    name, changes, _, _ = MODELS[model]
    pipe = build_pipeline(name)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        unet = UNet2DConditionModel(**{**pipe.unet.config, **changes}).eval()
    pipe.register_modules(unet=unet)
    pipe.register_to_config(_name_or_path=f"tiny-{model}")  # the official reads name_or_path
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _variant(pipe, img2img):
    if not img2img:
        return pipe
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    cls = StableDiffusionXLImg2ImgPipeline if "text_encoder_2" in pipe.components else StableDiffusionImg2ImgPipeline
    out = cls(**pipe.components)
    out.register_to_config(_name_or_path=pipe.name_or_path)
    out.set_progress_bar_config(disable=True)
    return out


def _run(pipe, model, img2img):
    _, _, size, steps = MODELS[model]
    kw = dict(prompt="a red fox in the snow", num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    if img2img:
        image = torch.rand(1, 3, size["height"], size["width"], generator=torch.Generator().manual_seed(1))
        kw.update(image=image, strength=0.6)
        steps = int(steps / 0.6) + 1  # so that the truncated run has at least as many steps
        kw["num_inference_steps"] = steps
    else:
        kw.update(size)
    torch.manual_seed(7)  # the MSW-MSA shifts: torch.rand(1) per windowed block call, here and in the official
    return pipe(**kw)[0]


def _official(model, scheduler, img2img):
    from hidiffusion import apply_hidiffusion, remove_hidiffusion

    base = _pipeline(model, 1)
    base.scheduler = _scheduler(scheduler, base.scheduler.config)
    pipe = _variant(base, img2img)
    apply_hidiffusion(pipe)
    try:
        return _run(pipe, model, img2img), pipe._num_timesteps
    finally:
        remove_hidiffusion(pipe)


@pytest.mark.parametrize("img2img", [False, True], ids=["t2i", "img2img"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("model", list(MODELS))
def test_equals_official(model, scheduler, img2img):
    base = _pipeline(model, 0)
    base.scheduler = _scheduler(scheduler, base.scheduler.config)
    pipe = _variant(base, img2img)
    stock = _run(pipe, model, img2img)
    with da.applied(pipe, "hidiffusion") as handle:
        ours = _run(pipe, model, img2img)
        steps, n = handle.context.step, handle.context.num_steps
    expected, official_n = _official(model, scheduler, img2img)
    assert n == official_n and steps == official_n - 1  # one run of N model evaluations, N = _num_timesteps
    assert not torch.equal(ours, stock)  # RAU-Net / MSW-MSA were on
    assert torch.equal(ours, expected), f"max abs diff {(ours - expected).abs().max():.3g}"
    assert torch.equal(_run(pipe, model, img2img), stock)  # remove() restores the stock output


def test_official_recognises_the_tiny_models():
    """The models above are what the official takes them for (else the comparison would be vacuous)."""
    from hidiffusion import apply_hidiffusion, remove_hidiffusion

    for model, kind in (("sd15", "sd15"), ("sdxl", "sdxl")):
        pipe = _pipeline(model, 1)
        apply_hidiffusion(pipe)
        try:
            assert pipe.unet.down_blocks[1].model == kind
        finally:
            remove_hidiffusion(pipe)
