"""Compiled FlexAttention backend: block occupancy, BlockMask and outputs against the dense reference."""

import random

import pytest
import torch
import torch.nn.functional as F

from diffusion_attn import TokenLayout
from diffusion_attn.kernels import choose_backend, full_mask, masked_attention, pattern_attention, prepared_attention
from diffusion_attn.kernels.flex import block_occupancy, flex_available, sequence_mask_mod
from diffusion_attn.patterns import neighborhood_pattern, radial_pattern

from test_kernels import ATOL, CountingCache, padding, qkv
from test_patterns import random_gna_config


def pooled_occupancy(pattern, layout, block):
    """Oracle: pool the full (S, S) mask into block x block tiles."""
    m = full_mask(pattern.dense_mask(), layout)
    S = layout.num_tokens
    nb = -(-S // block)
    pad = nb * block - S
    any_ = F.pad(m, (0, pad, 0, pad), value=False).view(nb, block, nb, block).any(3).any(1)
    all_ = F.pad(m, (0, pad, 0, pad), value=True).view(nb, block, nb, block).all(3).all(1)
    return any_, all_


@pytest.mark.parametrize("seed", range(8))
def test_block_occupancy_equals_pooled_mask(seed):
    rng = random.Random(seed)
    if seed % 2:
        grid = (rng.randint(2, 6), rng.randint(2, 8), rng.randint(3, 12))
        pattern = radial_pattern(grid, rng.choice([0.2, 0.5, 1.0]), rng.random() < 0.5)
    else:
        cfg = random_gna_config(rng, rng.choice([2, 3]))
        grid, pattern = cfg[0], neighborhood_pattern(*cfg)
    layout = TokenLayout(grid, rng.choice([0, 3, 40]), rng.choice(["first", "last"]))
    block = rng.choice([8, 16, 32])
    any_, all_ = block_occupancy(pattern, layout, block)
    ref_any, ref_all = pooled_occupancy(pattern, layout, block)
    assert torch.equal(any_, ref_any)
    assert torch.equal(all_, ref_all)


def test_mask_mod_equals_dense_mask():
    grid = (3, 5, 7)
    for pattern in (radial_pattern(grid, 0.5, True), neighborhood_pattern(grid, (3, 3, 3), (1, 2, 1), (1, 1, 2))):
        layout = TokenLayout(grid, 6, "first")
        i = torch.arange(layout.num_tokens)
        got = sequence_mask_mod(pattern, layout)(None, None, i[:, None], i[None, :])
        assert torch.equal(got, full_mask(pattern.dense_mask(), layout))


def test_auto_backend_choice(monkeypatch):
    big = (8, 32, 40)  # 10,240 tokens
    radial = radial_pattern(big, 0.2, True)
    gna = neighborhood_pattern(big, (3, 9, 9))
    monkeypatch.setattr("diffusion_attn.kernels.flex.flex_available", lambda device_type="cpu": True)
    assert choose_backend(radial, TokenLayout(big)) == "flex"
    assert choose_backend(gna, TokenLayout(big)) == "sliding"  # sliding box patterns on CPU (measured faster)
    assert choose_backend(radial_pattern((3, 8, 8), 0.2, True), TokenLayout((3, 8, 8))) == "reference"
    monkeypatch.setattr("diffusion_attn.kernels.flex.flex_available", lambda device_type="cpu": False)
    assert choose_backend(radial, TokenLayout(big)) == "gather"
    with pytest.raises(RuntimeError, match="backend='flex' needs torch.compile"):
        choose_backend(radial, TokenLayout(big), "flex")


needs_flex = pytest.mark.skipif(not flex_available("cpu"), reason="compiled FlexAttention does not run on this machine")


@needs_flex
@pytest.mark.parametrize("case", ["radial-text-first-padded", "gna-text-last"])
def test_flex_equals_reference(case):
    rng = random.Random(0)
    if case.startswith("radial"):
        grid = (5, 8, 9)  # 360 grid tokens: the last 128-block is partial
        pattern, layout = radial_pattern(grid, 0.5, True), TokenLayout(grid, 21, "first")
    else:
        grid = (4, 9, 10)
        pattern, layout = neighborhood_pattern(grid, (3, 5, 5), (1, 2, 2)), TokenLayout(grid, 9, "last")
    q, k, v = qkv(layout, batch=2)
    kpm = padding(layout, 2, rng) if "padded" in case else None
    ref = masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)
    out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="flex")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


@needs_flex
def test_prepared_attention_caches_per_layout(monkeypatch):
    grid = (5, 8, 9)
    pattern, layout = radial_pattern(grid, 0.5, True), TokenLayout(grid, 21, "first")
    q, k, v = qkv(layout, batch=2)
    cached = CountingCache()
    builds = cached.builds

    ref = masked_attention(q, k, v, pattern.dense_mask(), layout)
    for _ in range(2):
        out = prepared_attention(q, k, v, pattern, layout, cached=cached, key="radial", backend="flex")
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    assert builds == ["flex"]  # occupancy + BlockMask: one artefact per backend and request
    kpm = padding(layout, 2, random.Random(3))
    out = prepared_attention(q, k, v, pattern, layout, cached=cached, key="radial", key_padding_mask=kpm, backend="flex")
    torch.testing.assert_close(out, masked_attention(q, k, v, pattern.dense_mask(), layout, kpm), atol=ATOL, rtol=1e-5)
    assert builds == ["flex"]  # padded calls reuse the occupancy and build only the (cheap) BlockMask


@needs_flex
def test_generic_pattern_runs_on_flex():
    """B3 where compiled flex runs: ``auto`` sends a generic pattern (a circular window with a mask_mod,
    2,320 tokens) to flex, whose BlockMask comes from the mask_mod; equals SDPA with the explicit mask."""
    from test_kernels import CircularWindow, circular_reference_mask, reference_sdpa

    layout = TokenLayout((48, 48), 16, "first")
    pattern = CircularWindow(layout, 5.5)
    assert choose_backend(pattern, layout) == "flex"
    q, k, v = qkv(layout, batch=1, heads=2, dim=16)
    kpm = padding(layout, 1, random.Random(4))
    ref = reference_sdpa(q, k, v, circular_reference_mask(layout, 5.5), kpm)
    out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


@needs_flex
def test_flex_cache_follows_the_text_length():
    """B5 at the kernel level: one cache, one pattern key, the same grid with two text lengths. The
    BlockMask used to be cached per grid only and raised 'block_mask was created for ...'."""
    grid = (5, 8, 9)
    pattern = radial_pattern(grid, 0.5, True)
    cached = CountingCache()
    for text in (21, 30, 21):
        layout = TokenLayout(grid, text, "first")
        q, k, v = qkv(layout, batch=2)
        out = prepared_attention(q, k, v, pattern, layout, cached=cached, key=("radial", grid), backend="flex")
        torch.testing.assert_close(out, masked_attention(q, k, v, pattern.dense_mask(), layout), atol=ATOL, rtol=1e-5)
    assert cached.builds == ["flex", "flex"]


@needs_flex
def test_mochi_prompts_of_different_lengths_on_flex():
    """B5 end to end: tiny-mochi, radial on flex, CFG with two prompts of different lengths (Mochi
    attends over each sample's own text, so one grid meets several text lengths). Used to raise
    'block_mask was created for (289, 289) but got 295'; equals the reference backend."""
    import diffusion_attn as da
    from diffusion_attn.models.tiny import build_pipeline, default_call_kwargs

    pipe = build_pipeline("tiny-mochi")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a fox", "a red fox running through fresh snow at dawn"]
    kw = default_call_kwargs("mochi", num_inference_steps=2)
    assert kw["guidance_scale"] > 1

    def run(backend):
        with da.applied(pipe, "radial", dense_steps=0, decay_factor=0.0, backend=backend):
            return pipe(prompt=prompts, negative_prompt=prompts, generator=torch.Generator().manual_seed(0), **kw)[0]

    torch.testing.assert_close(run("flex"), run("reference"), atol=1e-5, rtol=1e-5)
