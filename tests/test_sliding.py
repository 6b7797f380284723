"""The sliding-window kernel (``backend="sliding"``) equals the dense-mask reference; its pieces cover
every allowed pair exactly once; ``auto`` picks it for sliding windows on CPU; it never builds an S x S
tensor."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_attn import TokenLayout, kernels
from diffusion_attn.kernels import masked_attention, pattern_attention, registry
from diffusion_attn.kernels.backend import Request
from diffusion_attn.kernels.gather import grid_with_text
from diffusion_attn.kernels.sliding import axis_pieces, sliding_attention, sliding_axes, sliding_plan
from diffusion_attn.patterns import AxisWindows, neighborhood_pattern, shifted_window_pattern
from diffusion_attn.patterns.base import BoxPattern

from test_kernels import ATOL, CountingCache, padding, qkv, random_gna_case


def run_plan(q, k, v, layout, kpm, plan, **kw):
    return grid_with_text(q, k, v, layout, kpm, None, lambda *a, **kw_: sliding_attention(*a, plan, **kw, **kw_))


def random_kinds(rng, grid, axis):
    kinds = []
    for i, g in enumerate(grid):
        opts = [("runs", 1), ("query", rng.randint(1, g))]
        if i == axis:
            opts.append(("key", rng.randint(1, g)))
        kinds.append(rng.choice(opts))
    return tuple(kinds)


@pytest.mark.parametrize("seed", range(12))
def test_sliding_equals_reference_gna(seed):
    """Random GNA (rank 1-3, stride, dilation, even windows), every slide axis with random piece kinds
    (key chunks, query tiles, runs), text first / last / none with padding, batch 1-2, three heads, and
    chunk budgets that split the columns (the reused workspace then changes shape between chunks)."""
    rng, pattern, layout, (q, k, v), kpm, ref = random_gna_case(seed)
    for axis in range(len(pattern.grid)):
        plan = sliding_plan(pattern, axis, random_kinds(rng, pattern.grid, axis))
        for budget in (1, 64 * 2**20):
            out = run_plan(q, k, v, layout, kpm, plan, max_chunk_bytes=budget)
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="sliding")  # modelled plan
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("grid,window,text", [
    ((6, 10, 14), (6, 5, 7), 4),  # FreeSwim's window branch: every frame, inward-clamped spatial window
    ((5, 9, 16), (3, 4, 6), 0),  # Wan-like sliding GNA, even windows
    ((7, 12), (3, 5), 6),
    ((40,), 9, 3),
])
def test_sliding_layouts_of_issue_11(grid, window, text):
    """The issue's layouts in small: the modelled plan and every kind on every axis equal the reference,
    with Dv != D and in bf16."""
    pattern = neighborhood_pattern(grid, window, 1)
    layout = TokenLayout(grid, text, "last")
    q, k, v = qkv(layout, batch=2, heads=2, dim=16)
    kpm = padding(layout, 2, random.Random(3))
    ref = masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)
    torch.testing.assert_close(pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="sliding"),
                               ref, atol=ATOL, rtol=1e-5)
    for axis in range(len(grid)):
        for kind in ("runs", "query", "key"):
            kinds = tuple((kind, 2) if i == axis else ("query", 3) for i in range(len(grid)))
            out = run_plan(q, k, v, layout, kpm, sliding_plan(pattern, axis, kinds))
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    v2 = torch.randn(*v.shape[:-1], 24, generator=torch.Generator().manual_seed(5))  # values of another head size
    ref2 = masked_attention(q, k, v2, pattern.dense_mask(), layout, kpm)
    out2 = pattern_attention(q, k, v2, pattern, layout, key_padding_mask=kpm, backend="sliding")
    torch.testing.assert_close(out2, ref2, atol=ATOL, rtol=1e-5)
    low = pattern_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pattern, layout, key_padding_mask=kpm,
                            backend="sliding")
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


def test_shifted_windows_and_scale():
    grid = (8, 12)
    layout = TokenLayout(grid, 3, "first")
    q, k, v = qkv(layout)
    for choice in range(4):
        p = shifted_window_pattern(grid, choice)
        ref = masked_attention(q, k, v, p.dense_mask(), layout, scale=0.3)
        out = pattern_attention(q, k, v, p, layout, backend="sliding", scale=0.3)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def test_pieces_cover_every_allowed_pair_once():
    """Per axis: ``runs`` / ``query`` pieces hold every query once and their keys hold its window; ``key``
    pieces hold every allowed (query, key) position pair exactly once (counted from the axis' dense mask)
    and each piece's mask is exactly the allowed pairs inside it."""
    rng = random.Random(0)
    for _ in range(40):
        L = rng.randint(1, 30)
        d = rng.choice([1, 2]) if L >= 2 else 1
        kw = rng.randint(1, L // d)
        axis = neighborhood_pattern((L,), kw, rng.randint(1, kw), d).axes[0]
        pos = torch.arange(L)
        band = (pos[None, :] >= axis.lo[:, None]) & (pos[None, :] < axis.hi[:, None])  # permuted coordinates
        for kind, size in (("runs", 1), ("query", rng.randint(1, L)), ("key", rng.randint(1, L))):
            count = torch.zeros(L, L, dtype=torch.long)
            for p in axis_pieces(axis, kind, size):
                inside = band[p.qa : p.qb, p.ka : p.kb]
                want_mask = None if bool(inside.all()) else inside
                assert (p.mask is None) == (want_mask is None) and (p.mask is None or torch.equal(p.mask, inside))
                count[p.qa : p.qb, p.ka : p.kb] += inside.long()
                if kind != "key":
                    assert bool(band[p.qa : p.qb].sum(1).eq(inside.sum(1)).all())  # whole windows inside
            assert torch.equal(count, band.long())


def test_key_pieces_need_contiguous_queries():
    """Windows whose queries of a key range are not contiguous are refused for key pieces, clearly."""
    axis = AxisWindows(torch.arange(4), torch.tensor([0, 2, 0, 2]), torch.tensor([2, 4, 2, 4]))
    with pytest.raises(ValueError, match="contiguous"):
        axis_pieces(axis, "key", 2)
    pattern = BoxPattern((4, 6), [axis, neighborhood_pattern((6,), 3).axes[0]])
    layout = TokenLayout((4, 6), 2)
    q, k, v = qkv(layout)
    ref = masked_attention(q, k, v, pattern.dense_mask(), layout)
    out = pattern_attention(q, k, v, pattern, layout, backend="sliding")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def test_plan_arguments_are_checked():
    pattern = neighborhood_pattern((4, 6, 8), 3)
    with pytest.raises(ValueError, match="slide axis"):
        sliding_plan(pattern, 3, (("runs", 1),) * 3)
    with pytest.raises(ValueError, match="key \\(slide axis only\\)"):
        sliding_plan(pattern, 0, (("runs", 1), ("key", 2), ("runs", 1)))
    with pytest.raises(ValueError, match="one \\(kind, size\\) per axis"):
        sliding_plan(pattern, 0, (("runs", 1),))
    with pytest.raises(TypeError, match="box patterns"):
        sliding_plan(object())


def test_plan_counts_for_the_wan_layouts():
    """The modelled plans of the issue's Wan layouts split keys along one axis and visit far fewer
    pairs than the strip plan (whose tiles hold every query's whole window); allowed pairs are the
    pattern's."""
    for grid, window in (((9, 30, 52), (5, 15, 26)), ((21, 30, 52), (11, 15, 26))):
        pattern = neighborhood_pattern(grid, window, 1)
        plan = sliding_plan(pattern)
        strips = kernels.strip_plan(pattern)
        assert plan.allowed_pairs == pattern.allowed_pairs()
        assert plan.overlap and plan.kinds[plan.axis][0] == "key"
        assert plan.visited_pairs < 0.8 * strips.visited_pairs
        assert 1.0 < plan.visited_pairs / plan.allowed_pairs < 1.25


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_s_by_s_tensor():
    """One head of a 9,360-token sliding GNA with text: no op returns a tensor of S^2 elements or more."""
    grid = (6, 30, 52)
    pattern = neighborhood_pattern(grid, (3, 15, 26), 1)
    layout = TokenLayout(grid, 16, "first")
    q, k, v = qkv(layout, batch=1, heads=1, dim=8)
    plan = sliding_plan(pattern)
    mode = LargestTensor()
    with mode:
        run_plan(q, k, v, layout, None, plan)
    assert 0 < mode.numel < layout.num_tokens**2 / 4


def test_auto_choice_caching_and_autograd():
    """``auto``: sliding for windows with a sliding axis on CPU (strided GNA with stride 1 in time too),
    strips for windows strided on every axis, gather off CPU, strips under autograd (no backward here);
    the plan is cached once."""
    grid = (6, 30, 26)
    layout = TokenLayout(grid, 8, "first")  # 4,688 tokens: past the dense-mask size
    sliding = neighborhood_pattern(grid, (3, 15, 13), 1)
    strided = neighborhood_pattern(grid, (3, 15, 13), (1, 5, 13))
    freeswim = neighborhood_pattern(grid, (6, 15, 13), 1)  # every frame: time does not slide
    no_slide = neighborhood_pattern(grid, (3, 15, 13), (3, 5, 13))
    assert sliding_axes(sliding) == 3 and sliding_axes(strided) == 1 and sliding_axes(freeswim) == 2
    assert sliding_axes(no_slide) == 0
    for p in (sliding, strided, freeswim):
        assert kernels.choose_backend(p, layout) == "sliding"
    assert kernels.choose_backend(no_slide, layout) == "strips"
    assert kernels.choose_backend(sliding, layout, device="meta") == "gather"
    assert kernels.choose_backend(sliding, TokenLayout((2, 10, 26))) == "reference"  # small
    q, k, v = qkv(layout, batch=1, heads=1, dim=8)
    kpm = padding(layout, 1, random.Random(1))
    cached = CountingCache()
    for _ in range(2):
        out = kernels.prepared_attention(q, k, v, sliding, layout, cached=cached, key="gna", key_padding_mask=kpm)
    assert cached.builds == ["sliding"]
    ref = masked_attention(q, k, v, sliding.dense_mask(), layout, kpm)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    q.requires_grad_()
    assert registry.resolve(Request.make(sliding, layout, q=q, k=k, v=v)).name == "strips"
    with pytest.raises(ValueError, match="backend='sliding' has no backward"):
        registry.resolve(Request.make(sliding, layout, q=q, k=k, v=v), "sliding")


def test_plan_speedup_bound():
    """``plan_speedup``: a partition computes exactly the allowed pairs (bound = 1 / density, text
    included); a sliding window's plan bound lies between the strip plan's and 1 / density."""
    from diffusion_attn.kernels.simulate import plan_speedup

    grid = (4, 12, 12)
    layout = TokenLayout(grid, 5, "first")
    blocked = neighborhood_pattern(grid, (2, 4, 6), (2, 4, 6))
    s, n, t = layout.num_tokens, layout.num_image, layout.text_len
    ideal = s**2 / (blocked.allowed_pairs() + 2 * n * t + t * t)
    assert plan_speedup(blocked, layout, "sliding") == pytest.approx(ideal)
    sliding = neighborhood_pattern(grid, (3, 5, 5), 1)
    ideal = s**2 / (sliding.allowed_pairs() + 2 * n * t + t * t)
    assert plan_speedup(sliding, layout, "strips") < plan_speedup(sliding, layout, "sliding") <= ideal
    with pytest.raises(ValueError, match="no plan model"):
        plan_speedup(sliding, layout, "gather")
