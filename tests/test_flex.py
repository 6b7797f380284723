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
    monkeypatch.setattr("diffusion_attn.kernels.flex_available", lambda device_type="cpu": True)
    assert choose_backend(radial, TokenLayout(big)) == "flex"
    assert choose_backend(gna, TokenLayout(big)) == "strips"  # box patterns: column strips (measured faster)
    assert choose_backend(radial_pattern((3, 8, 8), 0.2, True), TokenLayout((3, 8, 8))) == "reference"
    monkeypatch.setattr("diffusion_attn.kernels.flex_available", lambda device_type="cpu": False)
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
    assert sorted(builds) == ["flex-mask", "flex-occupancy"]
    kpm = padding(layout, 2, random.Random(3))
    out = prepared_attention(q, k, v, pattern, layout, cached=cached, key="radial", key_padding_mask=kpm, backend="flex")
    torch.testing.assert_close(out, masked_attention(q, k, v, pattern.dense_mask(), layout, kpm), atol=ATOL, rtol=1e-5)
    assert len(builds) == 2  # padded calls reuse the occupancy and build only the (cheap) BlockMask
