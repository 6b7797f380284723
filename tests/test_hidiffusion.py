"""HiDiffusion: MSW-MSA against the official roll/partition/reverse and the dense-mask reference, seeded
shifts, the official RAU-Net schedules, end to end on the tiny SD 1.5 / SDXL pipelines (CFG on/off,
batch 1/2, odd sizes), exact remove, and errors that leave the pipeline untouched."""

import functools
import math

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.adapters.unet import UNET
from diffusion_attn.context import RunContext
from diffusion_attn.kernels import masked_attention
from diffusion_attn.layout import TokenLayout
from diffusion_attn.models.tiny import default_call_kwargs
from diffusion_attn.patches.raunet import raunet_schedule, run_length
from diffusion_attn.patterns import shifted_window_pattern
from diffusion_attn.processors.hidiffusion import (
    WINDOW_BLOCKS,
    MSWMSAProcessor,
    choose_shift,
    detect_variant,
    official_shift_choice,
)
from pipes import fingerprint, pipe_cache

FAMILY = {"tiny-sd15-random": "unet-sd15", "tiny-sdxl": "unet-sdxl", "tiny-flux-random": "flux"}
# the fewest steps for which every RAU-Net stage of the official schedule is on at some step
STEPS = {"tiny-sd15-random": 3, "tiny-sdxl": 7}
SIZES = {  # "odd": the MSW-MSA level has odd sides (sd15 level 0: 13 x 17; sdxl level 1: 9 x 13)
    "tiny-sd15-random": {"even": dict(height=128, width=192), "odd": dict(height=104, width=136)},
    "tiny-sdxl": {"even": dict(height=128, width=192), "odd": dict(height=144, width=208)},
}


pipe_for = pipe_cache()


def generate(pipe, name, size="even", **overrides):
    """Latents (the VAE plays no part in what is tested here)."""
    overrides.setdefault("num_inference_steps", STEPS.get(name, 2))
    kw = default_call_kwargs(FAMILY[name], **{**SIZES.get(name, {}).get(size, {}), **overrides})
    kw["output_type"] = "latent"
    return pipe(prompt="a red fox in the snow", generator=torch.Generator().manual_seed(0), **kw)[0]


@functools.lru_cache(maxsize=None)
def stock_output(name, size="even", **overrides):
    return generate(pipe_for(name), name, size, **overrides)


def module_state(pipe):
    """Every module of every denoiser: identity, class and attributes (hook dicts by content, objects by
    identity), the run-context hook's registry and instance ``forward`` included."""
    out = {}
    for model in da.denoisers(pipe):
        for name, m in model.named_modules():
            attrs = {k: fingerprint(v) for k, v in m.__dict__.items()}
            out[(id(model), name)] = (id(m), type(m), attrs, {n: id(p) for n, p in m.attn_processors.items()} if name == "" else None)
    return out


def fake_context(latent, step=0, branch=0):
    ctx = RunContext("unet")
    ctx.latent_size, ctx.grid, ctx.step, ctx.branch = tuple(latent), tuple(latent), step, branch
    return ctx


def tiny_attention(channels=32, heads=2):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=channels, heads=heads, dim_head=channels // heads).eval()


# ---------------------------------------------------------------------------------------------------
# MSW-MSA
# ---------------------------------------------------------------------------------------------------
def official_msw_msa(attn, x, H, W, choice):
    """A direct re-implementation of the official window_partition / attn1 / window_reverse (even sizes)."""
    B, N, C = x.shape
    wh, ww = math.ceil(H / 2), math.ceil(W / 2)
    shift = (choice * (wh // 4), choice * (ww // 4))
    y = x.view(B, H, W, C)
    if shift[0] > 0:  # sic: the official tests only the row shift
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    y = y.view(B, 2, wh, 2, ww, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, wh * ww, C)
    y = attn(y)  # the stock processor
    y = y.view(B, 2, 2, wh, ww, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, 2 * wh, 2 * ww, C)
    if shift[0] > 0:
        y = torch.roll(y, shifts=shift, dims=(1, 2))
    return y.reshape(B, H * W, C)


def run_processor(attn, x, latent, **kw):
    proc = MSWMSAProcessor(**kw).bind(fake_context(latent), UNET, 0)
    stock = attn.processor
    attn.set_processor(proc)
    try:
        return attn(x), proc
    finally:
        attn.set_processor(stock)


@pytest.mark.parametrize("grid,latent", [((16, 24), (16, 24)), ((16, 24), (32, 48)), ((8, 8), (8, 8)), ((6, 16), (6, 16))])
@pytest.mark.parametrize("choice", [0, 1, 2, 3])
def test_msw_msa_equals_official_reshape(grid, latent, choice):
    attn = tiny_attention()
    x = torch.randn(2, grid[0] * grid[1], 32)
    ref = official_msw_msa(attn, x, *grid, choice)
    out, _ = run_processor(attn, x, latent, shift=choice)  # auto: the masked kernel at this size
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    if choice == 1:
        out, _ = run_processor(attn, x, latent, shift=choice, backend="gather")  # the tiled fast path
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(ref, attn(x), atol=1e-4)  # windows really restrict attention


@pytest.mark.parametrize("grid", [(7, 9), (5, 6), (9, 9), (8, 12), (13, 17)])
@pytest.mark.parametrize("choice", [0, 1, 2, 3])
def test_msw_msa_equals_dense_mask_reference(grid, choice):
    attn = tiny_attention()
    x = torch.randn(2, grid[0] * grid[1], 32)
    B, N, _ = x.shape
    q, k, v = (f(x).view(B, N, 2, 16) for f in (attn.to_q, attn.to_k, attn.to_v))
    eff = choice if -(-grid[0] // 2) // 4 else 0  # official: no shift when the row shift is 0
    core = masked_attention(q, k, v, shifted_window_pattern(grid, eff).dense_mask(), TokenLayout(grid))
    ref = attn.to_out[0](core.reshape(B, N, 32))
    out, _ = run_processor(attn, x, grid, shift=choice, backend="gather")  # the tiled fast path
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_unseeded_shifts_follow_torch_rand_like_official():
    attn = tiny_attention()
    x = torch.randn(1, 16 * 24, 32)
    proc = MSWMSAProcessor().bind(fake_context((16, 24)), UNET, 0)
    attn.set_processor(proc)
    torch.manual_seed(123)
    got = []
    for _ in range(24):
        attn(x)
        got.append(proc.choice)
    torch.manual_seed(123)
    assert got == [official_shift_choice(float(torch.rand(1))) for _ in range(24)]
    assert set(got) == {0, 1, 2, 3}


def test_seeded_shifts_are_deterministic_and_seed_dependent():
    def choices(seed):
        out = []
        for step in range(10):
            for layer in range(5):
                for branch in range(2):
                    out.append(choose_shift((16, 24), shift=None, seed=seed, step=step, layer=layer, branch=branch))
        return out

    torch.manual_seed(0)
    a = choices(7)
    torch.manual_seed(1)  # the global RNG plays no part
    assert choices(7) == a
    b = choices(8)
    assert a != b and set(a) == set(b) == {0, 1, 2, 3}
    assert sum(x != y for x, y in zip(a, b)) > len(a) // 2


def test_attention_mask_view():
    layout = TokenLayout((8, 12))
    mask = da.attention_mask("hidiffusion", layout, shift=2)
    assert torch.equal(mask, shifted_window_pattern((8, 12), 2).dense_mask())
    assert mask.sum(1).eq(4 * 6).all()


# ---------------------------------------------------------------------------------------------------
# RAU-Net schedule
# ---------------------------------------------------------------------------------------------------
def test_official_schedules():
    s = raunet_schedule("sd15", (128, 128), 50)  # 1024 px
    assert (s.t1_ratio, s.t2_ratio, s.conv, s.block, s.aggressive) == (0.4, 0.0, (0, 20), (0, 0), False)
    s = raunet_schedule("sd15", (256, 320), 50)  # 2048 px
    assert (s.conv, s.block) == ((0, 35), (0, 15))
    s = raunet_schedule("sd15", (255, 512), 50)  # either side below 256 -> the 1024 schedule (official)
    assert (s.conv, s.block) == ((0, 20), (0, 0))
    s = raunet_schedule("sdxl", (256, 256), 50)  # 2048 px: aggressive
    assert s.aggressive and (s.conv, s.block) == ((0, 8), (8, 20))
    s = raunet_schedule("sdxl", (512, 512), 50)  # 4096 px
    assert not s.aggressive and (s.conv, s.block) == ((0, 15), (0, 35))
    s = raunet_schedule("sdxl", (256, 256), 50, aggressive=False)  # e.g. the inpainting checkpoint
    assert (s.conv, s.block) == ((0, 0), (0, 20))
    s = raunet_schedule("sdxl", (256, 256), 25)
    assert (s.conv, s.block) == ((0, int(8 / 50 * 25)), (int(8 / 50 * 25), int(25 * 0.4)))
    s = raunet_schedule("sdxl-turbo", (128, 128), 4)
    assert (s.conv, s.block) == (None, (0, 2))
    s = raunet_schedule("sd15", (128, 128), 10, t1_ratio=0.5, t2_ratio=0.2)
    assert (s.conv, s.block) == ((0, 5), (0, 2))


def test_run_length_counts_context_steps():
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    ctx = RunContext("unet")
    assert run_length(ctx, 9) == 9
    with pytest.raises(RuntimeError, match="num_steps"):
        run_length(ctx)
    ctx.scheduler = EulerDiscreteScheduler()
    ctx.scheduler.set_timesteps(10)
    assert run_length(ctx) == 10
    ctx.scheduler.set_begin_index(4)  # img2img with strength 0.6
    assert run_length(ctx) == 6
    ctx.scheduler = HeunDiscreteScheduler()
    ctx.scheduler.set_timesteps(10)  # 19 timesteps: one step per model evaluation, as the pipeline loop counts
    assert len(ctx.scheduler.timesteps) == 19 and run_length(ctx) == 19
    ctx.pipeline = type("Pipe", (), {"_num_timesteps": 6})()  # in a pipeline run, what the pipeline publishes wins
    ctx.begin_run()
    ctx.observe(999.0, (16, 24), 0, 1, (16, 24))
    assert run_length(ctx) == 6 and run_length(ctx, 9) == 9


def _half(n):
    return (n + 1) // 2  # 3x3 conv, stride 2, padding 1 -- and avg_pool2d(2, ceil_mode=True)


def _rad(n):
    return (n - 1) // 4 + 1  # 3x3 conv, stride 4, padding 2, dilation 2


def expected_level2_input(variant, latent, sched, step):
    """Spatial size entering down_blocks.2 at ``step``, per the RAU-Net schedule."""
    out = []
    for n in latent:
        if variant == "sd15":
            x = _rad(n) if sched.conv_on(step) else _half(n)  # down_blocks.0 downsampler
            x = _half(x) if sched.block_on(step) else x  # avg-pool in down_blocks.1
            out.append(_half(x))  # down_blocks.1 downsampler
        else:
            x = _half(n)  # down_blocks.0 downsampler
            x = _half(x) if sched.block_on(step) else x  # avg-pool in down_blocks.1
            out.append(_rad(x) if sched.conv_on(step) else _half(x))  # down_blocks.1 downsampler
    return tuple(out)


def record_level2(unet, seen):
    """Record the spatial size entering down_blocks.2 at every UNet call (a test-owned hook)."""
    return unet.down_blocks[2].register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple((a[0] if a else kw["hidden_states"]).shape[-2:])), with_kwargs=True)


# ---------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cfg,batch,size,params", [
    ("tiny-sd15-random", True, 1, "even", {}),
    ("tiny-sd15-random", False, 2, "odd", {"t2_ratio": 0.4}),  # + the block stage (official at >= 2048 px)
    ("tiny-sdxl", True, 1, "even", {}),  # aggressive: conv stage at step 0, block stage at step 1
    ("tiny-sdxl", False, 2, "odd", {}),
    ("tiny-sdxl", True, 1, "even", {"model_variant": "sdxl-turbo", "steps": 2}),  # block stage only, step 0
])
def test_end_to_end_stages_and_exact_remove(name, cfg, batch, size, params):
    pipe = pipe_for(name)
    params = dict(params)
    n = params.pop("steps", STEPS[name])
    overrides = dict(num_images_per_prompt=batch) if batch > 1 else {}
    if not cfg:
        overrides["guidance_scale"] = 1.0
    if n != STEPS[name]:
        overrides["num_inference_steps"] = n
    stock = stock_output(name, size, **overrides)
    seen = []
    probe = record_level2(pipe.unet, seen)
    try:
        before = module_state(pipe)
        handle = da.apply(pipe, "hidiffusion", seed=1, **params)
        variant = detect_variant(pipe.unet, params.get("model_variant", "auto"))
        procs = [p for p in pipe.unet.attn_processors.values() if isinstance(p, MSWMSAProcessor)]
        assert len(procs) == len(WINDOW_BLOCKS[variant])
        out = generate(pipe, name, size, **overrides)
        latent = handle.context.latent_size
        if size == "odd":
            handle.remove()
        else:
            assert da.remove(pipe)
        assert not handle.active
        assert module_state(pipe) == before
        assert torch.equal(generate(pipe, name, size, **overrides), stock)
    finally:
        probe.remove()
    assert out.shape == stock.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, stock, atol=1e-4)
    # the RAU-Net stages ran exactly at the scheduled steps (CFG is batched: one UNet call per step)
    sched = raunet_schedule(variant, latent, n, params.get("t1_ratio"), params.get("t2_ratio"))
    assert seen[:n] == [expected_level2_input(variant, latent, sched, s) for s in range(n)]
    assert any(sched.conv_on(s) for s in range(n)) == (variant != "sdxl-turbo")
    assert any(sched.block_on(s) for s in range(n)) == (variant != "sd15" or "t2_ratio" in params)
    assert seen[n:] == [expected_level2_input(variant, latent, sched, n)] * n  # after remove: stock sizes


def _changed(before, after):
    return {key[1] for key in before if before[key] != after[key]}


@pytest.mark.parametrize("name", ["tiny-sd15-random", "tiny-sdxl"])
def test_parts_are_separable_and_exact_when_off(name):
    pipe = pipe_for(name)
    stock = stock_output(name, num_inference_steps=2)
    before = module_state(pipe)
    with da.applied(pipe, "hidiffusion", apply_raunet=False, apply_window_attn=False):
        assert _changed(before, module_state(pipe)) <= {""}  # the root: apply's handle attribute only
        assert torch.equal(generate(pipe, name, num_inference_steps=2), stock)
    with da.applied(pipe, "hidiffusion", apply_raunet=False):
        changed = _changed(before, module_state(pipe))
        assert changed and all(n == "" or n.endswith("attn1") for n in changed)  # processors only
    with da.applied(pipe, "hidiffusion", apply_window_attn=False):
        assert not any(isinstance(p, MSWMSAProcessor) for p in pipe.unet.attn_processors.values())
        assert any(n.endswith("conv") for n in _changed(before, module_state(pipe)))
        # 2 steps: the official schedule keeps every RAU-Net stage off, so the installed hooks and the
        # wrapped conv must pass everything through bit for bit
        assert torch.equal(generate(pipe, name, num_inference_steps=2), stock)
    assert module_state(pipe) == before


def test_bare_unet_needs_num_steps():
    pipe = pipe_for("tiny-sd15-random")
    before = module_state(pipe)
    with pytest.raises(ValueError, match="num_steps"):
        da.apply(pipe.unet, "hidiffusion")
    assert module_state(pipe) == before
    with da.applied(pipe, "hidiffusion", seed=3):
        via_pipe = generate(pipe, "tiny-sd15-random")
    with da.applied(pipe.unet, "hidiffusion", seed=3, num_steps=STEPS["tiny-sd15-random"]):
        via_unet = generate(pipe, "tiny-sd15-random")
    assert torch.equal(via_pipe, via_unet)  # also: seeded runs are reproducible


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
def test_non_unet_model_is_rejected():
    pipe = pipe_for("tiny-flux-random")
    before = module_state(pipe)
    with pytest.raises(ValueError, match="supported families: unet"):
        da.apply(pipe, "hidiffusion")
    assert module_state(pipe) == before


@pytest.mark.parametrize("params,match", [
    (dict(model_variant="sd3"), "model_variant"),
    (dict(model_variant="sd15"), "does not match"),  # an SDXL UNet
    (dict(model_variant="sdxl-turbo", t2_ratio=0.2), "no T2 stage"),
    (dict(t1_ratio=1.5), "t1_ratio"),
    (dict(shift=4), "shift"),
    (dict(seed=1.5), "seed"),
    (dict(window=8), "no parameter"),
])
def test_bad_params_leave_pipeline_untouched(params, match):
    pipe = pipe_for("tiny-sdxl")
    before = module_state(pipe)
    with pytest.raises(ValueError, match=match):
        da.apply(pipe, "hidiffusion", **params)
    assert module_state(pipe) == before


def test_pipeline_runs_stock_after_errors():
    pipe = pipe_for("tiny-sdxl")
    for params in (dict(model_variant="sd15"), dict(model_variant="sdxl-turbo", t2_ratio=0.2)):
        with pytest.raises(ValueError):
            da.apply(pipe, "hidiffusion", **params)
    assert torch.equal(generate(pipe, "tiny-sdxl", num_inference_steps=2), stock_output("tiny-sdxl", num_inference_steps=2))


def test_aggressive_is_sdxl_only():
    pipe = pipe_for("tiny-sd15-random")
    before = module_state(pipe)
    with pytest.raises(ValueError, match="SDXL"):
        da.apply(pipe, "hidiffusion", aggressive=True)
    assert module_state(pipe) == before


def test_applying_twice_is_rejected():
    pipe = pipe_for("tiny-sd15-random")
    before = module_state(pipe)
    handle = da.apply(pipe, "hidiffusion")
    during = module_state(pipe)
    with pytest.raises(ValueError, match="already applied"):
        da.apply(pipe, "hidiffusion")
    assert module_state(pipe) == during
    handle.remove()
    assert module_state(pipe) == before


def test_unknown_unet_structure_is_rejected():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
        norm_num_groups=8, cross_attention_dim=16,
    )
    with pytest.raises(ValueError, match=r"SD 1\.5/2\.1 .*SDXL"):
        da.apply(unet, "hidiffusion", num_steps=4)
    assert not any(isinstance(p, MSWMSAProcessor) for p in unet.attn_processors.values())
    assert da.remove(unet) is False
