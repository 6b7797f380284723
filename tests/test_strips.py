"""The strip kernel (``backend="strips"``) equals the dense-mask reference, and ``auto`` picks it for
box patterns on CPU."""

import random

import pytest
import torch

from diffusion_attn import TokenLayout, kernels
from diffusion_attn.kernels import masked_attention, pattern_attention, strip_attention, strip_plan
from diffusion_attn.kernels.strips import _extra_keys_lse, attention_lse
from diffusion_attn.patterns import neighborhood_pattern, radial_pattern, shifted_window_pattern
from diffusion_attn.kernels.schedule import RUNS, axis_tiles

from test_kernels import ATOL, CountingCache, padding, qkv, random_gna_case


@pytest.mark.parametrize("seed", range(16))
def test_strips_equal_reference_gna(seed):
    """Random GNA (any rank, stride, dilation), every slide axis, random tiles of the other axes, text
    first / last / none with random padding, and a chunk budget small enough to split the columns."""
    rng, pattern, layout, (q, k, v), kpm, ref = random_gna_case(seed)
    grid = pattern.grid
    for axis in range(len(grid)):
        tiles = tuple(rng.choice([RUNS, rng.randint(1, g)]) for g in grid)
        plan = strip_plan(pattern, axis=axis, tiles=tiles)
        assert plan.axis == axis and plan.tiles[axis] == RUNS
        out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="strips", strips=plan)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    img = layout.image_slice
    grid_only = masked_attention(q[:, img], k[:, img], v[:, img], pattern.dense_mask(), TokenLayout(grid))
    out = strip_attention(q[:, img], k[:, img], v[:, img], strip_plan(pattern), max_chunk_bytes=1)
    torch.testing.assert_close(out, grid_only, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("grid", [(8, 12), (7, 9)])
def test_strips_equal_reference_shifted_windows(grid):
    layout = TokenLayout(grid, 3, "last")
    q, k, v = qkv(layout)
    for choice in range(4):
        p = shifted_window_pattern(grid, choice)
        ref = masked_attention(q, k, v, p.dense_mask(), layout)
        out = pattern_attention(q, k, v, p, layout, backend="strips")
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def test_runs_are_exact_tiles():
    """``axis_tiles(axis, RUNS)``: every query in exactly one tile, no masks, and each tile's keys are exactly its
    queries' (shared) window."""
    rng = random.Random(0)
    for _ in range(20):
        L = rng.randint(1, 40)
        d = rng.choice([1, 2]) if L >= 2 else 1
        kw = rng.randint(1, L // d)
        pattern = neighborhood_pattern((L,), kw, rng.randint(1, kw), d)
        axis = pattern.axes[0]
        seen = []
        for g in axis_tiles(axis, RUNS):
            assert g.mask is None
            for qs, ks in zip(g.queries, g.keys):
                seen += qs.tolist()
                dense = axis.dense()
                for qi in qs.tolist():
                    assert set(torch.nonzero(dense[qi]).flatten().tolist()) == set(ks.tolist())
        assert sorted(seen) == list(range(L))


def test_exact_plan_for_stride_aligned_windows():
    """Strided GNA with windows on stride boundaries (the Wan 480p configuration): the plan visits
    exactly the allowed pairs, slides along time, and tiles are whole stride groups."""
    pattern = neighborhood_pattern((21, 30, 52), (11, 15, 26), (1, 5, 13))
    plan = strip_plan(pattern)
    assert plan.visited_pairs == plan.allowed_pairs == pattern.allowed_pairs()
    assert plan.axis == 0 and plan.tiles == (RUNS, RUNS, 13)
    sliding = strip_plan(neighborhood_pattern((9, 30, 52), (5, 15, 26), 1))
    assert sliding.visited_pairs > sliding.allowed_pairs  # sliding windows: exact tiles would be too small
    assert min(st.qpos.shape[1] * c.qcols.shape[1] for st in sliding.slide_tiles for c in sliding.columns) > 1


def test_auto_choice_and_caching():
    strided = neighborhood_pattern((6, 30, 26), (3, 15, 13), (3, 5, 13))  # strided on every axis
    sliding = neighborhood_pattern((6, 30, 26), (3, 15, 13), (1, 5, 13))  # stride 1 in time
    layout = TokenLayout((6, 30, 26), 8, "first")  # 4,688 tokens: past the dense-mask size
    assert kernels.choose_backend(strided, layout) == "strips"
    assert kernels.choose_backend(sliding, layout) == "sliding"  # a sliding axis: tests/test_sliding.py
    assert kernels.choose_backend(sliding, layout, "strips") == "strips"
    blocked = neighborhood_pattern((6, 30, 26), (3, 15, 13), (3, 15, 13))
    assert kernels.choose_backend(blocked, layout) == "windows"  # a partition: reshaped windows
    assert kernels.choose_backend(strided, TokenLayout((2, 10, 26)), "auto") == "reference"  # small
    assert kernels.choose_backend(strided, layout, "auto", device="meta") == "gather"  # CPU only
    with pytest.raises(ValueError, match="box patterns"):
        kernels.choose_backend(radial_pattern((3, 10, 30), 0.2, True), TokenLayout((3, 10, 30)), "strips")
    q, k, v = qkv(layout, batch=1, heads=1, dim=8)
    kpm = padding(layout, 1, random.Random(1))
    cached = CountingCache()
    for _ in range(2):
        out = kernels.prepared_attention(q, k, v, strided, layout, cached=cached, key="gna", key_padding_mask=kpm)
    assert cached.builds == ["strips"]  # one artefact per backend and request
    ref = kernels.pattern_attention(q, k, v, strided, layout, key_padding_mask=kpm, backend="gather")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def test_lse_paths_agree():
    """The CPU flash path and the explicit path of ``attention_lse`` give the same output and the exact
    log-sum-exp; extra keys of a fully padded sample contribute nothing."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.3
    mask[..., 0] = True
    scores = (q @ k.transpose(-1, -2)) * 0.3
    want_lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    out, lse = attention_lse(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    out, lse = attention_lse(q.to("meta"), k.to("meta"), v.to("meta"), mask.to("meta"), 0.3)  # explicit path
    assert out.shape == want.shape and lse.shape == want_lse.shape
    valid = torch.tensor([[True, False, True], [False, False, False]])
    ek, ev = torch.randn(2, 3, 3, 16, generator=g), torch.randn(2, 3, 3, 16, generator=g)
    out, lse = _extra_keys_lse(q.transpose(1, 2), ek, ev, valid, None)
    assert torch.isneginf(lse[1]).all() and not out[1].any() and torch.isfinite(lse[0]).all()


def test_low_precision_close_to_reference():
    layout = TokenLayout((6, 8, 10), 4, "first")
    p = neighborhood_pattern((6, 8, 10), (3, 4, 5), (1, 2, 5))
    q, k, v = qkv(layout)
    ref = masked_attention(q, k, v, p.dense_mask(), layout)
    out = pattern_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), p, layout, backend="strips")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_gradients_match_reference():
    """Autograd through the strip kernel (with text keys: the LSE merge) gives the reference's gradients."""
    pattern = neighborhood_pattern((4, 6, 8), (3, 3, 4), (1, 3, 4))
    layout = TokenLayout((4, 6, 8), 3, "last")
    q, k, v = qkv(layout, batch=1, heads=2, dim=8)
    weights = torch.randn(q.shape)

    def grads(backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = pattern_attention(*leaves, pattern, layout, backend=backend)
        (out * weights).sum().backward()
        return [t.grad for t in leaves]

    for got, want in zip(grads("strips"), grads("reference")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
