"""FreeSwim on Wan: the inward window against the official ``init_mask_flex`` formula (re-derived here by
loops) and against NATTEN ``na3d``; the dual path (window + full branch, cross-attention override, cache
mode) against a manual run of the stock Wan processors whose attention is an explicit masked softmax;
the full setting against the stock pipeline; ``remove()``; bad input; the coarse-to-fine recipe; the
mask views.

Expected values never come from the code under test: masks from :func:`official_mask` (loops over the
official formula), attention from :func:`softmax_attention` (float64 einsum + softmax), scales from
:func:`official_scale` (the official expression)."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from diffusers.models.transformers import transformer_wan

import diffusion_attn as da
from diffusion_attn.kernels import prepared_attention
from diffusion_attn.models import default_call_kwargs
from diffusion_attn.patches import hook_names, remove_hook
from diffusion_attn.patches.freeswim import HOOK_NAME, FreeSwimDualPathHook
from diffusion_attn.pipelines import freeswim_generate, upscale_video, video_to_video_pipeline
from diffusion_attn.processors.freeswim import (FreeSwimConfig, FreeSwimCrossProcessor, FreeSwimProcessor,
                                                freeswim_window_pattern)

from pipes import fingerprint, pipe_cache

pipe_for = pipe_cache()
NAME = "tiny-wan-random"
#: tiny-wan-random's default call: 9 frames x 128 x 192 px -> 3 x 8 x 12 tokens; native 64 x 96 px = 4 x 6
#: tokens, so (d_h, d_w) = (2, 3): a 5 x 7 window that is shifted inward on the 8 x 12 grid
GRID = (3, 8, 12)
NATIVE = dict(native_height=64, native_width=96)
HALF = (2, 3)


# ---------------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------------
def official_mask(T, H, W, d_h, d_w, inward=True) -> torch.Tensor:
    """The official ``init_mask_flex`` predicate, evaluated by loops: (N, N) bool over (t, h, w) row-major."""
    n = T * H * W
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qi in range(n):
        q_h, q_w = (qi % (H * W)) // W, qi % W
        d_b = max(d_h - q_h, 0) if inward else 0
        d_u = max(d_h + q_h - H + 1, 0) if inward else 0
        d_r = max(d_w - q_w, 0) if inward else 0
        d_l = max(d_w + q_w - W + 1, 0) if inward else 0
        for ki in range(n):
            k_h, k_w = (ki % (H * W)) // W, ki % W
            mask[qi, ki] = (q_h - d_h - d_u <= k_h <= q_h + d_h + d_b) and (q_w - d_w - d_l <= k_w <= q_w + d_w + d_r)
    return mask


def official_scale(native_tokens_h, native_tokens_w, head_dim):
    """The official ``math.sqrt(math.log(30 * 52 * 2, 30 * 52) / key.size(3))`` for another native grid."""
    n = native_tokens_h * native_tokens_w
    return math.sqrt(math.log(n * 2, n) / head_dim)


def softmax_attention(q, k, v, mask=None, scale=None):
    """Explicit attention on (B, S, heads, D) tensors in float64: softmax(q k^T * scale, masked) v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        s = s.masked_fill(~mask.to(s.device), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double()).to(q.dtype)


# ---------------------------------------------------------------------------------------------------
# the window pattern
# ---------------------------------------------------------------------------------------------------
def random_layouts(seed, count=6):
    rng = random.Random(seed)
    for _ in range(count):
        T, H, W = rng.randint(1, 3), rng.randint(2, 9), rng.randint(2, 9)
        yield (T, H, W), (rng.randint(0, H), rng.randint(0, W))  # d up to the axis: windows wider than it too


@pytest.mark.parametrize("seed", range(3))
def test_window_equals_official_formula(seed):
    for grid, half in random_layouts(seed):
        got = freeswim_window_pattern(grid, half).dense_mask()
        assert torch.equal(got, official_mask(*grid, *half)), (grid, half)


def test_mask_view_and_native_grid():
    """``attention_mask`` shows the window branch: native 64 x 96 px = 4 x 6 tokens -> d = (2, 3)."""
    layout = da.TokenLayout((2, 6, 9))
    assert torch.equal(da.attention_mask("freeswim", layout, **NATIVE), official_mask(2, 6, 9, *HALF))
    # Wan 2.1 default: 480 x 832 -> d = (15, 26), covering this small grid entirely
    assert bool(da.attention_mask("freeswim", layout).all())
    big = freeswim_window_pattern((1, 68, 120), (15, 26))  # the official 1088 x 1920 layout, one frame
    assert int(big.dense_mask().sum(1).min()) == 31 * 53 == int(big.dense_mask().sum(1).max())


def test_cli_mask_and_simulate(tmp_path, capsys):
    from diffusion_attn.cli import main

    assert main(["mask", "--method", "freeswim", "--grid", "2x6x9", "--native-height", "64", "--native-width", "96",
                 "--output", str(tmp_path / "m.png")]) == 0
    density = official_mask(2, 6, 9, *HALF).double().mean().item()
    printed = float(re.search(r"density ([0-9.]+)", capsys.readouterr().out).group(1))
    assert printed == pytest.approx(density, abs=1e-3)
    # the official layout: 34,503 of 171,360 keys per query
    assert main(["simulate", "--method", "freeswim", "--grid", "21x68x120", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["density"] == pytest.approx(21 * 31 * 53 / (21 * 68 * 120), abs=1e-6)


@pytest.mark.parametrize("backend", ["reference", "strips", "gather", "chunked"])
def test_window_attention_with_scale_equals_dense_reference(backend):
    g = torch.Generator().manual_seed(1)
    for grid, half in random_layouts(4, count=4):
        layout = da.TokenLayout(grid)
        q, k, v = (torch.randn(2, layout.num_tokens, 2, 16, generator=g) for _ in range(3))
        pattern = freeswim_window_pattern(grid, half)
        scale = official_scale(4, 6, 16)
        cache = {}
        out = prepared_attention(q, k, v, pattern, layout, cached=lambda key, build: cache.setdefault(key, build()),
                                 key=("fs", grid, half), backend="dense" if pattern.is_full() else backend, scale=scale)
        ref = softmax_attention(q, k, v, official_mask(*grid, *half), scale)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_window_equals_real_natten_na3d():
    from diffusion_attn.kernels import natten_adapter

    if not natten_adapter.available():
        pytest.skip("natten not installed")
    import natten

    g = torch.Generator().manual_seed(2)
    for grid, half in [((3, 8, 12), (2, 3)), ((2, 9, 7), (3, 1)), ((4, 5, 6), (1, 2))]:
        q, k, v = (torch.randn(1, *grid, 2, 32, generator=g) for _ in range(3))
        if not natten_adapter.can_run(q.flatten(1, 3), da.TokenLayout(grid)):
            pytest.skip("installed NATTEN has no backend for these tensors on this device")
        scale = official_scale(4, 6, 32)
        kernel = (grid[0], 2 * half[0] + 1, 2 * half[1] + 1)
        want = natten.na3d(q, k, v, kernel_size=kernel, stride=1, dilation=1, scale=scale).flatten(1, 3)
        ours = prepared_attention(*(t.flatten(1, 3) for t in (q, k, v)), freeswim_window_pattern(grid, half),
                                  da.TokenLayout(grid), cached=lambda key, build: build(), key=None, scale=scale)
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
        ref = softmax_attention(*(t.flatten(1, 3) for t in (q, k, v)), official_mask(*grid, *half), scale)
        torch.testing.assert_close(want, ref, atol=1e-5, rtol=1e-5)


def test_official_scale_constant():
    assert FreeSwimProcessor(480, 832).scale(128) == pytest.approx(official_scale(30, 52, 128), abs=0)
    assert official_scale(30, 52, 128) == pytest.approx(0.0925, abs=5e-5)  # the brief's number
    assert FreeSwimProcessor(720, 1280).scale(128) == pytest.approx(official_scale(45, 80, 128), abs=0)
    assert FreeSwimProcessor(480, 832, attention_scale="default").scale(128) is None


@pytest.mark.parametrize("i2v", [False, True])
def test_wan_cross_attention_path_is_the_stock_processor(i2v):
    """The adapter's attn2 path (used by FreeSwimCrossProcessor) with a stock core is diffusers'
    WanAttnProcessor bit for bit, the I2V image context (before the last 512 tokens) included."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    from diffusion_attn.adapters.wan import WAN

    class StockCore:
        _attention_backend = None

        def cross_core(self, q, k, v, attention_mask=None):
            return dispatch_attention_fn(q, k, v, attn_mask=attention_mask)

    torch.manual_seed(0)
    attn = WanAttention(dim=24, heads=2, dim_head=12, added_kv_proj_dim=24 if i2v else None,
                        cross_attention_dim_head=12).eval()
    x, context = torch.randn(2, 10, 24), torch.randn(2, 512 + (5 if i2v else 0), 24)
    with torch.no_grad():
        assert torch.equal(WAN.run(StockCore(), attn, x, context), WanAttnProcessor()(attn, x, context))


# ---------------------------------------------------------------------------------------------------
# manual dual path: stock Wan processors, their attention replaced by explicit softmax
# ---------------------------------------------------------------------------------------------------
class ManualAttention:
    """A stand-in for ``transformer_wan.dispatch_attention_fn`` (the stock Wan processor's attention):
    self-attention = window mask + FreeSwim scale on the window rows, dense + scale on the full rows;
    cross-attention = the full rows' output for both (``mode="dual"``); ``mode="window"``: window rows
    only, own cross-attention; ``"reuse"``: window rows, cross-attention from ``stored``."""

    def __init__(self, grid, half, scale):
        self.mask, self.scale = official_mask(*grid, *half), scale
        self.mode, self.stored, self.calls = "dual", [], 0

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=None, parallel_config=None,
                 scale=None, **_):
        cross = k.shape[1] != q.shape[1]
        if self.mode == "dual":
            b = q.shape[0] // 2
            if cross:
                full = softmax_attention(q[b:], k[b:], v[b:])
                self.stored.append(full)
                return torch.cat([full, full])
            return torch.cat([softmax_attention(q[:b], k[:b], v[:b], self.mask, self.scale),
                              softmax_attention(q[b:], k[b:], v[b:], None, self.scale)])
        if cross:
            if self.mode == "reuse":
                out = self.stored[self.calls]
                self.calls += 1
                return out
            return softmax_attention(q, k, v)
        return softmax_attention(q, k, v, self.mask, self.scale)


def manual_call(model, manual, mode, x, t, text):
    """One stock transformer call under ``manual`` (dual: on the doubled batch, window rows kept)."""
    manual.mode, manual.calls = mode, 0
    if mode == "dual":
        manual.stored = []
        x, t, text = (torch.cat([a, a]) for a in (x, t, text))
    out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    return out[: out.shape[0] // 2] if mode == "dual" else out


def model_inputs(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.config.in_channels, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=g)
    texts = [torch.randn(batch, 7, model.config.text_dim, generator=g) for _ in range(2)]
    return x, texts


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode", ["nocache", "cache"])
def test_transformer_calls_equal_manual_dual_path(monkeypatch, batch, mode):
    """A bare transformer driven like a CFG pipeline (cond, uncond per step; steps by timestep): nocache
    runs the dual path in every call; cache (cache_steps=2) stores on step 0 and 2, reuses on step 1."""
    model = pipe_for(NAME).transformer
    x, (cond, uncond) = model_inputs(model, batch)
    manual = ManualAttention(GRID, HALF, official_scale(4, 6, model.config.attention_head_dim))
    steps = [900.0, 700.0, 500.0]
    expected = []
    with monkeypatch.context() as m:
        m.setattr(transformer_wan, "dispatch_attention_fn", manual)
        for i, t in enumerate(steps):
            tt = torch.full((batch,), t)
            if mode == "nocache":
                plan = [("dual", cond), ("dual", uncond)]
            else:
                plan = [("dual" if i % 2 == 0 else "reuse", cond), ("window", uncond)]
            expected += [manual_call(model, manual, kind, x, tt, text) for kind, text in plan]
    kw = dict(mode="cache", cache_steps=2) if mode == "cache" else {}
    got = []
    with da.applied(model, "freeswim", **NATIVE, **kw):
        for t in steps:
            tt = torch.full((batch,), t)
            got += [model(hidden_states=x, timestep=tt, encoder_hidden_states=text, return_dict=False)[0]
                    for text in (cond, uncond)]
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"call {i}")
    # the override matters: without it (window rows' own cross-attention) the output differs
    assert not torch.allclose(got[0], model(hidden_states=x, timestep=torch.full((batch,), steps[0]),
                                             encoder_hidden_states=cond, return_dict=False)[0], atol=1e-3)


def _manual_pipeline_hooks(model):
    """Torch hooks doubling a call into [window; full] and keeping the window rows (test-side dual path)."""
    names = ("hidden_states", "timestep", "encoder_hidden_states")

    def pre(module, args, kwargs):
        return args, {k: torch.cat([v, v]) if k in names else v for k, v in kwargs.items()}

    def post(module, args, kwargs, output):
        return (output[0][: output[0].shape[0] // 2],)

    return [model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True)]


def run(pipe, seed=0, **overrides):
    kw = default_call_kwargs(NAME, **{"output_type": "latent", **overrides})
    return pipe(prompt="a red fox in the snow", generator=torch.Generator().manual_seed(seed), **kw)[0]


@pytest.mark.parametrize("cfg,videos", [(5.0, 2), (1.0, 1)])
def test_pipeline_nocache_equals_manual_dual_path(monkeypatch, cfg, videos):
    pipe = pipe_for(NAME)
    manual = ManualAttention(GRID, HALF, official_scale(4, 6, pipe.transformer.config.attention_head_dim))
    handles = _manual_pipeline_hooks(pipe.transformer)
    try:
        with monkeypatch.context() as m:
            m.setattr(transformer_wan, "dispatch_attention_fn", manual)
            expected = run(pipe, guidance_scale=cfg, num_videos_per_prompt=videos)
    finally:
        for h in handles:
            h.remove()
    with da.applied(pipe, "freeswim", **NATIVE):
        got = run(pipe, guidance_scale=cfg, num_videos_per_prompt=videos)
    assert got.shape[0] == videos
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["nocache", "cache"])
def test_batch_rows_are_independent(mode):
    """Batch 2 (CFG on): each sample equals its own batch-1 run (no row of one sample leaks into another)."""
    pipe = pipe_for(NAME)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 16, *GRID[:1], 16, 24, generator=g)
    kw = dict(mode="cache", cache_steps=2) if mode == "cache" else {}
    with da.applied(pipe, "freeswim", **NATIVE, **kw):
        both = run(pipe, latents=latents, num_videos_per_prompt=2, num_inference_steps=3)
        one = run(pipe, latents=latents[1:], num_inference_steps=3)
    torch.testing.assert_close(both[1:], one, atol=2e-5, rtol=1e-4)


def test_per_run_state_is_cleared_between_runs():
    """Cache mode keeps per-run state only: the cache lives during the run and is freed after its last step
    (it can be gigabytes); a second run (another batch size in between) repeats the first."""
    pipe = pipe_for(NAME)

    def cached(handle):
        return any(key[0] == "freeswim.cross" for key in handle.context.run_state if isinstance(key, tuple))

    with da.applied(pipe, "freeswim", **NATIVE, mode="cache", cache_steps=2) as handle:
        seen = []

        def watch(p, i, t, kw):
            seen.append(cached(handle))
            return kw

        first = run(pipe, num_inference_steps=3, callback_on_step_end=watch)
        assert seen == [True, True, False]  # after each step; freed after the last
        assert not handle.context.run_state
        run(pipe, num_inference_steps=2, num_videos_per_prompt=2)
        again = run(pipe, num_inference_steps=3)
    assert torch.equal(first, again)


def test_cache_without_cfg_every_step_equals_nocache():
    """Cache mode without CFG is accepted: with cache_steps=1 every cond call is a guide call, which is the
    nocache dual path exactly."""
    pipe = pipe_for(NAME)
    with da.applied(pipe, "freeswim", **NATIVE):
        nocache = run(pipe, guidance_scale=1.0, num_inference_steps=3)
    with da.applied(pipe, "freeswim", **NATIVE, mode="cache", cache_steps=1, offload_cache=True):
        cache = run(pipe, guidance_scale=1.0, num_inference_steps=3)
    with da.applied(pipe, "freeswim", **NATIVE, mode="cache", cache_steps=2):
        sparse = run(pipe, guidance_scale=1.0, num_inference_steps=3)
    assert torch.equal(cache, nocache)
    assert not torch.allclose(sparse, nocache, atol=1e-4)


@pytest.mark.parametrize("cfg,videos", [(5.0, 1), (5.0, 2), (1.0, 2)])
@pytest.mark.parametrize("mode", ["nocache", "cache"])
def test_full_setting_reproduces_stock_pipeline(cfg, videos, mode):
    """native == target and the default scale: the window covers the grid, both branches are the same
    attention, the override gives each row its own value: the stock pipeline's output. (Cache mode reuses a
    past step's cross-attention between guide steps, an approximation even with a full window: with
    cache_steps=1 there is none.)"""
    pipe = pipe_for(NAME)
    stock = run(pipe, guidance_scale=cfg, num_videos_per_prompt=videos)
    kw = dict(mode="cache", cache_steps=1) if mode == "cache" else {}
    with da.applied(pipe, "freeswim", native_height=128, native_width=192, attention_scale="default", **kw):
        got = run(pipe, guidance_scale=cfg, num_videos_per_prompt=videos)
    # not bit for bit: the doubled batch goes through the linear layers as a GEMM of another size
    torch.testing.assert_close(got, stock, atol=1e-5, rtol=1e-4)


def test_full_window_call_is_the_stock_processor_bit_for_bit():
    """A window-only call (cache mode, uncond) with the window covering the grid and the default scale:
    exactly the stock Wan processors (same batch, dense core = diffusers' dispatch_attention_fn)."""
    model = pipe_for(NAME).transformer
    x, (cond, uncond) = model_inputs(model, 2)
    t = torch.full((2,), 900.0)
    stock = model(hidden_states=x, timestep=t, encoder_hidden_states=uncond, return_dict=False)[0]
    with da.applied(model, "freeswim", native_height=128, native_width=192, attention_scale="default", mode="cache"):
        model(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)
        got = model(hidden_states=x, timestep=t, encoder_hidden_states=uncond, return_dict=False)[0]
    assert torch.equal(got, stock)


def test_wan22_cache_starts_each_expert_with_a_guide_call(monkeypatch):
    """Wan 2.2 (two experts): the stored outputs belong to one expert; the first cond call of the other
    expert is a guide call even off the interval."""
    pipe = pipe_for("tiny-wan22")
    plans = []
    original = FreeSwimDualPathHook.plan

    def record(self, module, batch):
        plan = original(self, module, batch)
        plans.append((module is pipe.transformer_2, self.context.step, plan.dual, plan.store, plan.reuse))
        return plan

    monkeypatch.setattr(FreeSwimDualPathHook, "plan", record)
    with da.applied(pipe, "freeswim", **NATIVE, mode="cache", cache_steps=5):
        out = run(pipe, num_inference_steps=2)
        again = run(pipe, num_inference_steps=2)  # per-run state: transformer_2's outputs of run 1 are gone
    assert torch.isfinite(out).all() and torch.equal(out, again)
    # step 0 on transformer (cond: guide; uncond: window), step 1 on transformer_2 (cond: guide again)
    assert plans == 2 * [(False, 0, True, True, False), (False, 0, False, False, False),
                         (True, 1, True, True, False), (True, 1, False, False, False)]


def test_video_to_video_pipeline_calls_cond_then_uncond(monkeypatch):
    """WanVideoToVideoPipeline names no cache_context: cond / uncond come from the call order in the step."""
    pipe = pipe_for(NAME)
    v2v = video_to_video_pipeline(pipe)
    plans = []
    original = FreeSwimDualPathHook.plan

    def record(self, module, batch):
        plan = original(self, module, batch)
        plans.append((self.context.step, self.context.branch_name, plan.dual, plan.store, plan.reuse))
        return plan

    monkeypatch.setattr(FreeSwimDualPathHook, "plan", record)
    video = torch.rand(1, 5, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    embeds, negative = pipe.encode_prompt("a fox", max_sequence_length=32)
    with da.applied(v2v, "freeswim", **NATIVE, mode="cache", cache_steps=2):
        v2v(prompt_embeds=embeds, negative_prompt_embeds=negative, video=video, height=128, width=192, strength=1.0,
            num_inference_steps=3, output_type="latent")
    guide, window, reuse = (True, True, False), (False, False, False), (False, False, True)
    assert plans == [(0, None, *guide), (0, None, *window), (1, None, *reuse), (1, None, *window),
                     (2, None, *guide), (2, None, *window)]


# ---------------------------------------------------------------------------------------------------
# remove, errors
# ---------------------------------------------------------------------------------------------------
def model_state(model):
    return ({k: id(p) for k, p in model.attn_processors.items()},
            {n: {k: fingerprint(v) for k, v in m.__dict__.items()} for n, m in model.named_modules()})


def test_remove_is_bit_exact():
    pipe = pipe_for(NAME)
    before, stock = model_state(pipe.transformer), run(pipe)
    handle = da.apply(pipe, "freeswim", **NATIVE, mode="cache")
    procs = pipe.transformer.attn_processors
    assert sum(isinstance(p, FreeSwimProcessor) for p in procs.values()) == len(pipe.transformer.blocks)
    assert sum(isinstance(p, FreeSwimCrossProcessor) for p in procs.values()) == len(pipe.transformer.blocks)
    assert HOOK_NAME in hook_names(pipe.transformer)
    assert not torch.allclose(run(pipe), stock, atol=1e-4)
    handle.remove()
    assert HOOK_NAME not in hook_names(pipe.transformer)
    assert model_state(pipe.transformer) == before
    assert torch.equal(run(pipe), stock)


@pytest.mark.parametrize("params,match", [
    (dict(mode="cache", cache_steps=0), "cache_steps"),
    (dict(mode="cache", cache_steps=1.5), "cache_steps"),
    (dict(cache_steps=3), "only apply to mode='cache'"),
    (dict(offload_cache=True), "only apply to mode='cache'"),
    (dict(mode="always"), "mode"),
    (dict(attention_scale="paper"), "attention_scale"),
    (dict(native_height=16, native_width=16), "at least 2 tokens"),
    (dict(native_height=8), "native_height"),
    (dict(backend="windows"), "backend"),
])
def test_bad_params_leave_pipeline_untouched(params, match):
    pipe = pipe_for(NAME)
    before = model_state(pipe.transformer)
    with pytest.raises(ValueError, match=match):
        da.apply(pipe, "freeswim", **params)
    with pytest.raises(ValueError, match=match):
        FreeSwimConfig(**params)
    assert model_state(pipe.transformer) == before


def test_bypassed_hook_is_an_error_not_a_silent_change():
    pipe = pipe_for(NAME)
    handle = da.apply(pipe, "freeswim", **NATIVE)
    try:
        remove_hook(pipe.transformer, HOOK_NAME)  # what accelerate's offload does to hooks added after it
        with pytest.raises(RuntimeError, match="dual-path hook was bypassed.*enable_model_cpu_offload"):
            run(pipe)
    finally:
        handle.remove()


def test_model_cpu_offload_after_apply():
    pipe = pipe_for(NAME)
    with da.applied(pipe, "freeswim", **NATIVE):
        expected = run(pipe)
        pipe.enable_model_cpu_offload(device="cpu")
        try:
            first, second = run(pipe), run(pipe)
        finally:
            pipe.remove_all_hooks()
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


# ---------------------------------------------------------------------------------------------------
# the coarse-to-fine recipe
# ---------------------------------------------------------------------------------------------------
def recipe_state(pipe):
    return model_state(pipe.transformer), id(pipe.scheduler), dict(pipe.scheduler.config)


@pytest.mark.parametrize("kw,match", [
    (dict(native_size=(128, 192), target_size=(64, 192)), "larger than the target"),
    (dict(native_size=(64, 96), target_size=(120, 192)), "multiples of 16"),
    (dict(native_size=(64, 96), target_size=(128, 192), mode="nocache", cache_steps=2), "only apply"),
    (dict(native_size=(64, 96), target_size=(128, 192), strength=0.0), "strength"),
])
def test_recipe_bad_input_runs_nothing(kw, match):
    pipe = pipe_for(NAME)
    before = recipe_state(pipe)
    with pytest.raises(ValueError, match=match):
        freeswim_generate(pipe, "a fox", num_frames=5, num_inference_steps=2, **kw)
    assert recipe_state(pipe) == before


def test_recipe_checks_apply_before_the_first_stage(monkeypatch):
    """A method already on the transformer (or anything else apply refuses) stops the recipe before the
    text-to-video stage runs, and leaves the pipeline as it was."""
    pipe = pipe_for(NAME)
    calls = []
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: calls.append(1))
    with da.applied(pipe, "gna", window=3):
        before = recipe_state(pipe)
        with pytest.raises(ValueError, match="already applied"):
            freeswim_generate(pipe, "a fox", native_size=(64, 96), target_size=(128, 192), num_frames=5)
        assert recipe_state(pipe) == before
    assert calls == []


def test_recipe_native_size_defaults_to_the_models(monkeypatch):
    """Without native_size the recipe takes FreeSwim's per-model default (Wan 2.1: 480 x 832), so a target
    below it is refused as smaller than the native size."""
    with pytest.raises(ValueError, match="native size 480 x 832 is larger than the target"):
        freeswim_generate(pipe_for(NAME), "a fox", target_size=(128, 192), num_frames=5)


def test_recipe_refuses_two_expert_pipelines_without_a_choice():
    with pytest.raises(ValueError, match="transformer_2"):
        freeswim_generate(pipe_for("tiny-wan22"), "a fox", native_size=(64, 96), target_size=(128, 192))


def test_recipe_end_to_end_matches_stock_stages():
    """native -> 2x target, batch 2, cache mode: the recipe equals the same stages run by hand (stock T2V,
    the upscale, apply + stock V2V with flow_shift 9); the pipeline is unchanged afterwards."""
    from diffusers.hooks import HookRegistry

    pipe = pipe_for(NAME)
    HookRegistry.check_if_exists_or_initialize(pipe.transformer)  # what the stock pipeline's first call creates
    before = recipe_state(pipe)
    common = dict(num_frames=5, num_inference_steps=3, guidance_scale=5.0, max_sequence_length=32)
    out = freeswim_generate(pipe, "a fox", native_size=(64, 96), target_size=(128, 192), num_videos_per_prompt=2,
                            generator=torch.Generator().manual_seed(0), output_type="pt", mode="cache", **common)
    assert out.frames.shape == (2, 5, 3, 128, 192) and out.base.shape == (2, 5, 3, 64, 96)
    assert recipe_state(pipe) == before

    g = torch.Generator().manual_seed(0)
    embeds, negative = pipe.encode_prompt("a fox", None, num_videos_per_prompt=2, max_sequence_length=32)
    steps = dict(num_inference_steps=3, guidance_scale=5.0, generator=g, prompt_embeds=embeds,
                 negative_prompt_embeds=negative)
    base = pipe(height=64, width=96, num_frames=5, output_type="pt", **steps).frames
    up = torch.nn.functional.interpolate(base.flatten(0, 1), size=(128, 192), mode="bilinear").clamp(0, 1)
    v2v = video_to_video_pipeline(pipe)
    assert v2v.scheduler.config.flow_shift == 9.0 and v2v.transformer is pipe.transformer
    with da.applied(v2v, "freeswim", native_height=64, native_width=96, mode="cache"):
        frames = v2v(video=up.unflatten(0, (2, 5)), height=128, width=192, strength=0.7, output_type="pt", **steps).frames
    torch.testing.assert_close(out.base, base)
    torch.testing.assert_close(out.frames, frames)


def test_upscale_is_bilinear_half_pixel():
    """cv2 INTER_LINEAR: output pixel i samples input (i + 0.5) / 2 - 0.5 (clamped at the border)."""
    video = torch.rand(1, 2, 3, 4, 6)
    up = upscale_video(video, (8, 12))
    torch.testing.assert_close(up[..., 0, 0], video[..., 0, 0])
    v = video
    want = (0.75 * 0.75 * v[..., 1, 1] + 0.75 * 0.25 * v[..., 1, 2] + 0.25 * 0.75 * v[..., 2, 1]
            + 0.25 * 0.25 * v[..., 2, 2])  # output (3, 3) samples input (1.25, 1.25)
    torch.testing.assert_close(up[..., 3, 3], want, atol=1e-6, rtol=0)
