"""The reshape-to-windows kernel equals the dense-mask reference; non-partitions get no plan."""

import random

import pytest
import torch

from diffusion_attn import TokenLayout
from diffusion_attn.kernels import masked_attention
from diffusion_attn.kernels.windows import axis_groups, window_attention, window_partition
from diffusion_attn.patterns import neighborhood_pattern, radial_pattern, shifted_window_pattern
from diffusion_attn.patterns.neighborhood import neighborhood_axis

from test_kernels import CountingCache

ATOL = 2e-6


def qkv(layout, batch=2, heads=3, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.num_tokens, heads, dim, generator=g).to(dtype) for _ in range(3)]


def padding(layout, batch, rng):
    """Random trailing text padding per row (at least one real text token); None without text."""
    if layout.text_len == 0:
        return None
    kpm = torch.ones(batch, layout.num_tokens, dtype=torch.bool)
    for b in range(batch):
        n_pad = rng.randint(0, layout.text_len - 1)
        if n_pad:
            kpm[b, layout.text_slice.stop - n_pad : layout.text_slice.stop] = False
    return kpm


def random_blocked_config(rng, ndim, blocked=True):
    """Random GNA config; ``blocked``: stride = window on every axis (a partition)."""
    grid, window, stride, dilation = [], [], [], []
    for _ in range(ndim):
        L = rng.randint(1, 10)
        d = rng.choice([1, 1, 1, 2, 3]) if L >= 2 else 1
        d = max(1, min(d, L))
        k = rng.randint(1, L // d)
        s = k if blocked else rng.randint(1, k)
        grid.append(L), window.append(k), stride.append(s), dilation.append(d)
    return tuple(grid), tuple(window), tuple(stride), tuple(dilation)


def check(pattern, layout, rng, seed, batch=2, **kw):
    plan = window_partition(pattern)
    assert plan is not None
    q, k, v = qkv(layout, batch=batch, seed=seed)
    kpm = padding(layout, batch, rng)
    ref = masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)
    out = window_attention(q, k, v, plan, layout, key_padding_mask=kpm, **kw)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    return plan


@pytest.mark.parametrize("seed", range(24))
def test_blocked_gna_equals_reference(seed):
    rng = random.Random(seed)
    cfg = random_blocked_config(rng, 1 + seed % 3)
    pattern = neighborhood_pattern(*cfg)
    layout = TokenLayout(cfg[0], rng.choice([0, 1, 6]), rng.choice(["first", "last"]))
    plan = check(pattern, layout, rng, seed)
    # windows never compute a masked pair: exactly the pattern's allowed pairs
    assert plan.visited_pairs == pattern.allowed_pairs()


@pytest.mark.parametrize("seed", range(12))
def test_any_gna_with_a_plan_equals_reference(seed):
    """Strides below the window sometimes give the same mask as a blocked window (e.g. window = axis
    length); whenever a plan exists it must be exact, and strided sliding windows get none."""
    rng = random.Random(100 + seed)
    for _ in range(4):
        cfg = random_blocked_config(rng, rng.choice([1, 2, 3]), blocked=False)
        pattern = neighborhood_pattern(*cfg)
        plan = window_partition(pattern)
        blocked = all(
            torch.equal(neighborhood_axis(L, k, k, d).lo, a.lo) and torch.equal(neighborhood_axis(L, k, k, d).hi, a.hi)
            for (L, k, d, a) in zip(cfg[0], cfg[1], cfg[3], pattern.axes)
        )
        assert (plan is not None) == blocked, cfg
        if plan is not None:
            check(pattern, TokenLayout(cfg[0], 3, rng.choice(["first", "last"])), rng, seed)


@pytest.mark.parametrize("grid", [(8, 12), (7, 9), (16, 15), (3, 2), (1, 5)])
def test_msw_msa_equals_reference(grid):
    rng = random.Random(sum(grid))
    for choice in range(4):
        pattern = shifted_window_pattern(grid, choice)
        for text, pos in [(0, "last"), (5, "first"), (4, "last")]:
            check(pattern, TokenLayout(grid, text, pos), rng, choice)


def test_plan_shapes():
    # divisible blocked GNA: one window shape, no permutation
    plan = window_partition(neighborhood_pattern((9, 30, 52), (3, 15, 26), (3, 15, 26)))
    assert plan.perm is None and len(plan.shapes) == 1 and plan.num_windows == 12
    # clamped borders on two axes: 2 x 2 window shapes, border keys reach back into the last full window
    plan = window_partition(neighborhood_pattern((7, 9), (3, 4), (3, 4)))
    assert len(plan.shapes) == 4 and plan.num_windows == 9
    border = plan.groups[1][-1]
    assert (border.q_start, border.q_size, border.k_start, border.k_size) == (6, 1, 4, 3)
    # MSW-MSA: the cyclic shift is a permutation; odd axis -> unequal 2 x 2 windows
    plan = window_partition(shifted_window_pattern((7, 9), 1))
    assert plan.perm is not None and plan.num_windows == 4 and len(plan.shapes) == 4
    # dilation groups of equal length merge into one progression of windows
    groups = axis_groups(neighborhood_axis(12, 3, 3, 2))
    assert len(groups) == 1 and groups[0].count == 4


def test_non_partitions_return_none():
    assert window_partition(neighborhood_pattern((10,), 3)) is None  # sliding window
    assert window_partition(neighborhood_pattern((8, 8), (4, 4), (2, 2))) is None  # strided
    assert window_partition(neighborhood_pattern((6, 8), (6, 4), (1, 2))) is None  # one axis strided
    assert window_partition(radial_pattern((4, 8, 8), 0.5, False)) is None  # block pattern
    assert window_partition(neighborhood_pattern((4, 6), (4, 6))) is not None  # full: one window


def test_chunked_and_batch_one():
    rng = random.Random(7)
    pattern = neighborhood_pattern((4, 9, 10), (2, 3, 4), (2, 3, 4))
    layout = TokenLayout((4, 9, 10), 5, "last")
    check(pattern, layout, rng, 1, max_chunk_bytes=1)  # one window row per SDPA call
    check(pattern, layout, rng, 2, batch=1, max_chunk_bytes=20_000)


def test_scale_and_low_precision():
    layout = TokenLayout((6, 8), 4, "first")
    p = neighborhood_pattern((6, 8), (3, 4), (3, 4))
    plan = window_partition(p)
    q, k, v = qkv(layout)
    ref = masked_attention(q, k, v, p.dense_mask(), layout, scale=0.3)
    torch.testing.assert_close(window_attention(q, k, v, plan, layout, scale=0.3), ref, atol=ATOL, rtol=1e-5)
    out = window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan, layout, scale=0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_errors():
    p = neighborhood_pattern((4, 6), (2, 3), (2, 3))
    plan = window_partition(p)
    layout = TokenLayout((4, 6), 2)
    q, k, v = qkv(layout)
    with pytest.raises(ValueError, match="window plan is for grid"):
        window_attention(q, k, v, plan, TokenLayout((6, 4), 2))
    with pytest.raises(ValueError, match="does not match the layout"):
        window_attention(q[:, :-1], k[:, :-1], v[:, :-1], plan, layout)
    kpm = torch.ones(2, layout.num_tokens, dtype=torch.bool)
    kpm[0, 0] = False
    with pytest.raises(ValueError, match="only mask text"):
        window_attention(q, k, v, plan, layout, key_padding_mask=kpm)


def test_backend_wiring():
    """``backend="windows"`` through ``pattern_attention`` / ``prepared_attention`` and the automatic
    choice, once the backend is wired into ``diffusion_attn.kernels``."""
    from diffusion_attn import kernels

    if "windows" not in kernels.BACKENDS:
        pytest.skip("backend='windows' is not wired into diffusion_attn.kernels yet")
    rng = random.Random(3)
    grid = (5, 9, 8)
    pattern = neighborhood_pattern(grid, (2, 4, 4), (2, 4, 4))
    layout = TokenLayout(grid, 6, "first")
    q, k, v = qkv(layout)
    kpm = padding(layout, 2, rng)
    ref = masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)
    assert kernels.choose_backend(pattern, layout) == "windows"
    assert kernels.choose_backend(shifted_window_pattern((9, 7), 2), TokenLayout((9, 7))) == "windows"
    assert kernels.choose_backend(neighborhood_pattern(grid, (2, 4, 4), (1, 2, 2)), layout, "auto") != "windows"
    for backend in ("windows", "auto"):
        out = kernels.pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend=backend)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    cached = CountingCache()
    builds = cached.builds

    for _ in range(2):
        out = kernels.prepared_attention(q, k, v, pattern, layout, cached=cached, key="gna", key_padding_mask=kpm)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    assert builds == ["windows"]  # one artefact per backend and request
    with pytest.raises(ValueError, match="partition"):
        kernels.pattern_attention(q, k, v, neighborhood_pattern(grid, 3), layout, backend="windows")
