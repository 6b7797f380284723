"""Every fast path equals the dense-mask reference (fp32, tight tolerance)."""

import random

import pytest
import torch

from diffusion_attn import TokenLayout
from diffusion_attn.kernels import build_schedule, choose_backend, masked_attention, pattern_attention, sdpa
from diffusion_attn.patterns import neighborhood_pattern, radial_pattern, shifted_window_pattern

from test_patterns import random_gna_config

ATOL = 2e-6


def qkv(layout, batch=2, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.num_tokens, heads, dim, generator=g) for _ in range(3)]


class CountingCache:
    """A dict-backed ``cached(key, build)`` for ``prepared_attention`` that records the kind (``key[0]``) of
    everything it builds."""

    def __init__(self):
        self.store, self.builds = {}, []

    def __call__(self, key, build):
        if key not in self.store:
            self.builds.append(key[0])
            self.store[key] = build()
        return self.store[key]


def padding(layout, batch, rng):
    kpm = torch.ones(batch, layout.num_tokens, dtype=torch.bool)
    if layout.text_len > 1:
        for b in range(batch):
            n_pad = rng.randint(0, layout.text_len - 1)
            if n_pad:
                kpm[b, layout.text_slice.stop - n_pad : layout.text_slice.stop] = False
    return kpm


def random_gna_case(seed):
    """A random GNA pattern (rank 1-3, any stride / dilation) on a layout with random text and padding,
    inputs and the dense-mask reference: ``(rng, pattern, layout, (q, k, v), kpm, ref)``."""
    rng = random.Random(seed)
    pattern = neighborhood_pattern(*random_gna_config(rng, rng.choice([1, 2, 3])))
    layout = TokenLayout(pattern.grid, rng.choice([0, 1, 5, 17]), rng.choice(["first", "last"]))
    q, k, v = qkv(layout, batch=rng.choice([1, 2]), seed=seed)
    kpm = padding(layout, q.shape[0], rng)
    return rng, pattern, layout, (q, k, v), kpm, masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)


@pytest.mark.parametrize("seed", range(16))
def test_gather_equals_reference_gna(seed):
    rng, pattern, layout, (q, k, v), kpm, ref = random_gna_case(seed)
    tile = tuple(rng.randint(1, g) for g in pattern.grid)
    out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="gather", schedule=build_schedule(pattern, tile))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    auto = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="gather")
    torch.testing.assert_close(auto, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("grid,decay,sink,text", [((5, 6, 20), 0.2, True, 0), ((7, 8, 9), 0.95, False, 13), ((3, 10, 30), 1.0, True, 4)])
def test_gather_equals_reference_radial(grid, decay, sink, text):
    pattern = radial_pattern(grid, decay, sink)
    layout = TokenLayout(grid, text, "last")
    q, k, v = qkv(layout)
    kpm = padding(layout, 2, random.Random(0))
    ref = masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)
    for rows in (1, 2, 4):
        out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="gather", schedule=pattern.schedule(rows))
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("grid", [(8, 12), (7, 9)])
def test_gather_equals_reference_shifted_windows(grid):
    layout = TokenLayout(grid)
    q, k, v = qkv(layout)
    for choice in range(4):
        p = shifted_window_pattern(grid, choice)
        ref = masked_attention(q, k, v, p.dense_mask(), layout)
        torch.testing.assert_close(pattern_attention(q, k, v, p, layout, backend="gather"), ref, atol=ATOL, rtol=1e-5)


def test_full_pattern_is_plain_sdpa():
    layout = TokenLayout((4, 6), 5, "first")
    q, k, v = qkv(layout)
    p = neighborhood_pattern((4, 6), (4, 6))
    assert choose_backend(p, layout) == "dense"
    assert torch.equal(pattern_attention(q, k, v, p, layout), sdpa(q, k, v))


def test_backend_errors():
    layout = TokenLayout((4, 6))
    p = neighborhood_pattern((4, 6), 3)
    q, k, v = qkv(layout)
    with pytest.raises(ValueError, match="unknown backend"):
        pattern_attention(q, k, v, p, layout, backend="flash")
    with pytest.raises(ValueError, match="only valid when the pattern is full"):
        pattern_attention(q, k, v, p, layout, backend="dense")
    with pytest.raises(ValueError, match="does not match the layout"):
        pattern_attention(q[:, :-1], k[:, :-1], v[:, :-1], p, layout)


def test_low_precision_close_to_reference():
    layout = TokenLayout((6, 8), 4, "first")
    p = neighborhood_pattern((6, 8), (3, 4), (1, 2))
    q, k, v = qkv(layout)
    ref = masked_attention(q, k, v, p.dense_mask(), layout)
    out = pattern_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), p, layout, backend="gather")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
