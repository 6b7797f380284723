"""Refined box patterns (``BoxPattern(refine=...)``): CLEAR's circle on the box kernels.

The reference here is an explicit masked softmax in float64 whose mask is built from CLEAR's formula
(``dy**2 + dx**2 < r**2`` on the grid, text rows and columns dense), independently of the pattern and
kernel code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffusion_attn.kernels import prepared_attention
from diffusion_attn.kernels.backend import Request
from diffusion_attn.kernels.capabilities import capabilities_of, grid_pattern_of
from diffusion_attn.kernels.gather import gather_attention
from diffusion_attn.kernels.registry import check_backend, get_backend, resolve
from diffusion_attn.kernels.schedule import box_schedule
from diffusion_attn.kernels.sliding import sliding_attention, sliding_plan
from diffusion_attn.kernels.strips import strip_attention, strip_plan
from diffusion_attn.layout import TokenLayout
from diffusion_attn.patterns import BoxPattern
from diffusion_attn.patterns.base import AxisWindows
from diffusion_attn.patterns.circular import CircularWindow, circular_pattern

FAST = ("gather", "strips", "sliding")


def formula_mask(grid, radius, text_len=0, text_position="first"):
    """(S, S) bool: CLEAR's rule written out from the formula (coordinates by itertools, no pattern code)."""
    coords = list(itertools.product(*(range(g) for g in grid)))
    n = len(coords)
    img = torch.tensor([[sum((a - b) ** 2 for a, b in zip(p, k)) < radius**2 for k in coords] for p in coords])
    S = n + text_len
    full = torch.ones(S, S, dtype=torch.bool)
    off = text_len if text_position == "first" else 0
    full[off : off + n, off : off + n] = img
    return full


def reference(q, k, v, mask, scale=None):
    """Masked softmax attention in float64; q, k, v (B, S, H, D), mask (S, S) bool."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double()).to(q.dtype)


def qkv(S, B=2, H=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g) for _ in range(3)]


def run(backend, q, k, v, pattern, layout, key_padding_mask=None):
    return prepared_attention(q, k, v, pattern, layout, cached=lambda key, build: build(), key=None,
                              backend=backend, key_padding_mask=key_padding_mask)


def test_box_view_is_the_bounding_square_and_counts_the_circle_exactly():
    for grid, r in [((7, 9), 2.5), ((5, 5), 8), ((1, 6), 1.5), ((4, 3, 5), 2), ((11,), 3)]:
        cw = CircularWindow(grid, r)
        box = cw.grid_pattern
        assert isinstance(box, BoxPattern) and box.refine is cw
        m = math.ceil(r) - 1
        for a, L in zip(box.axes, grid):
            p = torch.arange(L)
            assert torch.equal(a.perm, p)
            assert torch.equal(a.lo, torch.clamp(p - m, min=0)) and torch.equal(a.hi, torch.clamp(p + m + 1, max=L))
        want = formula_mask(grid, r)
        # the circle lies inside its box (the refinement's contract) and the refined set is the circle
        unrefined = BoxPattern(grid, box.axes).dense_mask()
        assert bool((want <= unrefined).all())
        assert torch.equal(box.dense_mask(), want)
        assert box.allowed_pairs() == int(want.sum()) == cw.allowed_pairs()
        assert box.density == pytest.approx(int(want.sum()) / want.numel())
        i = torch.arange(cw.num_tokens)
        assert torch.equal(box.allowed(i[:, None], i[None, :]), want)
        assert box.is_full() == bool(want.all())


def test_capabilities_and_which_backends_take_it():
    layout = TokenLayout((9, 9), 4, "first")
    pattern = circular_pattern((9, 9), 3, layout)
    assert capabilities_of(CircularWindow((9, 9), 3)) == {"box", "refined"}
    assert {"box", "refined"} <= capabilities_of(pattern)
    assert isinstance(grid_pattern_of(pattern), BoxPattern)
    req = Request.make(pattern, layout)
    for name in FAST + ("reference", "chunked"):
        assert get_backend(name).supports(req) is None, name
    for name in ("natten", "windows", "triton"):
        reason = get_backend(name).supports(req)
        assert reason is not None and name in reason
    assert "refined" in get_backend("natten").pattern_reason(frozenset({"box", "refined"}))
    assert check_backend("natten", {"box", "refined"}) is not None
    assert check_backend("gather", {"box", "refined"}) is None
    # a plain box keeps its old capabilities and backends
    plain = BoxPattern((4, 4), [AxisWindows(torch.arange(4), torch.zeros(4, dtype=torch.long), torch.full((4,), 4))] * 2)
    assert "refined" not in capabilities_of(plain)


def test_bad_refinement_is_refused():
    axes = [AxisWindows(torch.arange(4), torch.zeros(4, dtype=torch.long), torch.full((4,), 4))] * 2
    with pytest.raises(TypeError, match="allowed_fn"):
        BoxPattern((4, 4), axes, refine=object())
    with pytest.raises(ValueError, match="grid"):
        BoxPattern((4, 4), axes, refine=CircularWindow((4, 5), 2))


CASES = [  # grid, radius, text_len, text position
    ((6, 7), 2, 5, "first"),
    ((5, 9), 1.5, 3, "last"),
    ((8, 8), 1, 0, "first"),
    ((3, 4), 5, 4, "first"),  # grid smaller than the disc: full on every axis
    ((9, 5), 5, 0, "first"),
    ((7, 11), 3.2, 6, "last"),
    ((13, 10), 4, 2, "first"),
]


@pytest.mark.parametrize("grid,radius,text_len,pos", CASES)
def test_kernels_equal_the_formula(grid, radius, text_len, pos):
    layout = TokenLayout(grid, text_len, pos)
    q, k, v = qkv(layout.num_tokens, seed=hash((grid, radius)) % 1000)
    want = reference(q, k, v, formula_mask(grid, radius, text_len, pos))
    pattern = circular_pattern(grid, radius, layout)
    for name in FAST + ("chunked", "reference"):
        got = run(name, q, k, v, pattern, layout)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=name)


def test_random_layouts_on_every_plan():
    """Random grids and radii (2-D, 1-D, 3-D), every kernel also with forced tilings (gather tiles, strips'
    slide axes, sliding's key chunks, which may hold a row with no key of its circle)."""
    rng = torch.Generator().manual_seed(1)
    for trial in range(10):
        d = [2, 2, 2, 1, 3][trial % 5]
        grid = tuple(int(x) for x in torch.randint(1, 9 if d < 3 else 5, (d,), generator=rng))
        radius = [1, 1.5, 2, 2.5, 3, 5][int(torch.randint(0, 6, (1,), generator=rng))]
        text = int(torch.randint(0, 4, (1,), generator=rng))
        pos = "first" if trial % 2 else "last"
        layout = TokenLayout(grid, text, pos)
        cw = CircularWindow(grid, radius)
        box = cw.grid_pattern
        q, k, v = qkv(layout.num_tokens, seed=trial)
        want = reference(q, k, v, formula_mask(grid, radius, text, pos))
        img, txt = layout.image_slice, layout.text_slice
        extra = dict(extra_k=k[:, txt], extra_v=v[:, txt]) if text else {}
        want_img = want[:, img]
        plans = [("gather", t, gather_attention, box_schedule(box, t)) for t in [(1,) * d, (2,) * d, (3,) * d]]
        plans += [("strips", a, strip_attention, strip_plan(box, axis=a, tiles=(2,) * d)) for a in range(d)]
        for a in range(d):
            kinds = tuple(("key", 2) if i == a else ("query", 2) for i in range(d))
            plans.append(("sliding", a, sliding_attention, sliding_plan(box, axis=a, kinds=kinds)))
            plans.append(("sliding", a, sliding_attention, sliding_plan(box, axis=a, kinds=(("runs", 1),) * d)))
        for name, detail, fn, plan in plans:
            got = fn(q[:, img], k[:, img], v[:, img], plan, **extra)
            torch.testing.assert_close(got, want_img, atol=2e-5, rtol=2e-5, msg=f"{name} {detail} {grid} r={radius}")


def test_padded_text_keys():
    layout = TokenLayout((6, 6), 4, "first")
    q, k, v = qkv(layout.num_tokens, seed=3)
    kpm = torch.ones(2, layout.num_tokens, dtype=torch.bool)
    kpm[1, 2:4] = False
    mask = formula_mask((6, 6), 2.5, 4, "first")
    want = torch.cat([reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask & kpm[b][None]) for b in range(2)])
    for name in FAST:
        got = run(name, q, k, v, circular_pattern((6, 6), 2.5, layout), layout, key_padding_mask=kpm)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=name)


def test_fast_path_builds_no_dense_mask(monkeypatch):
    """The box kernels never ask for an N x N mask (the pattern's dense views raise while they run)."""
    layout = TokenLayout((12, 12), 3, "first")
    q, k, v = qkv(layout.num_tokens, B=1, H=1)
    want = reference(q, k, v, formula_mask((12, 12), 3, 3, "first"))
    pattern = circular_pattern((12, 12), 3, layout)

    def boom(*a, **kw):
        raise AssertionError("dense mask built on the fast path")

    monkeypatch.setattr(CircularWindow, "dense_mask", boom)
    monkeypatch.setattr(BoxPattern, "dense_mask", boom)
    for name in FAST:
        got = run(name, q, k, v, pattern, layout)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=name)


def test_auto_takes_a_box_kernel_past_the_small_size():
    layout = TokenLayout((48, 48), 16, "first")
    req = Request.make(circular_pattern((48, 48), 8, layout), layout)
    assert resolve(req).name in FAST
    full = TokenLayout((4, 4), 2, "first")
    assert resolve(Request.make(circular_pattern((4, 4), 5, full), full)).name == "dense"


class Ring:
    """A refinement written for this test: keys in the query's own row at squared distance in [1, r**2)
    (the query itself excluded), so a piece of a window split across rows holds none of a query's keys."""

    def __init__(self, grid, radius):
        self.grid, self.r2 = tuple(grid), radius**2

    def allowed_fn(self, device=None):
        W = self.grid[1]

        def fn(qi, ki):
            d2 = (qi % W - ki % W) ** 2
            return (qi // W == ki // W) & (d2 >= 1) & (d2 < self.r2)

        return fn

    def allowed_pairs(self):
        return int(ring_mask(self.grid, self.r2).sum())

    def is_full(self):
        return False


def ring_mask(grid, r2):
    coords = list(itertools.product(*(range(g) for g in grid)))
    return torch.tensor([[p[0] == k[0] and 1 <= (p[1] - k[1]) ** 2 < r2 for k in coords] for p in coords])


@pytest.mark.parametrize("shared", [False, True])
def test_generic_refinement_with_empty_pieces(shared):
    """Per-chunk refinement masks and, for a translation-invariant refinement, one per piece and group."""
    grid, radius = (7, 6), 3
    box = CircularWindow(grid, radius).grid_pattern
    refine = Ring(grid, radius)
    refine.translation_invariant = shared
    ring = BoxPattern(grid, box.axes, refine=refine)
    img_mask = ring_mask(grid, radius**2)
    assert ring.allowed_pairs() == int(img_mask.sum()) and torch.equal(ring.dense_mask(), img_mask)
    L = grid[1]  # the same refinement in a box that is whole on the column axis
    whole = AxisWindows(torch.arange(L), torch.zeros(L, dtype=torch.long), torch.full((L,), L))
    wide = BoxPattern(grid, [box.axes[0], whole], refine=refine)
    assert torch.equal(wide.dense_mask(), img_mask)
    layout = TokenLayout(grid, 3, "first")
    q, k, v = qkv(layout.num_tokens, seed=5)
    full = torch.ones(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    full[3:, 3:] = img_mask
    want = reference(q, k, v, full)[:, 3:]
    img, txt = layout.image_slice, layout.text_slice
    for a, pattern in itertools.product(range(2), (ring, wide)):
        kinds = tuple(("key", 1) if i == a else ("query", 2) for i in range(2))
        plan = sliding_plan(pattern, axis=a, kinds=kinds)
        assert plan.refine_shared == shared
        got = sliding_attention(q[:, img], k[:, img], v[:, img], plan, extra_k=k[:, txt], extra_v=v[:, txt])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for fn, plan in [(gather_attention, box_schedule(ring, (2, 2))), (strip_attention, strip_plan(ring, axis=1, tiles=(2, 2)))]:
        got = fn(q[:, img], k[:, img], v[:, img], plan, extra_k=k[:, txt], extra_v=v[:, txt])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_shared_masks_only_among_translates():
    """Columns with the same keys but other queries are no translates: they get groups of their own."""
    from diffusion_attn.kernels.sliding import ColumnGroup, _split_by_offsets

    keys = torch.arange(4)[None].expand(3, 4)
    groups = _split_by_offsets([ColumnGroup(torch.tensor([[0, 1], [2, 3], [5, 6]]), keys, None)])
    assert sorted(g.qcols[:, 0].tolist() for g in groups) == [[0], [2], [5]]
    same = _split_by_offsets([ColumnGroup(torch.tensor([[0, 1], [4, 5]]), torch.tensor([[0, 1, 2], [4, 5, 6]]), None)])
    assert len(same) == 1 and same[0].qcols.shape[0] == 2


def test_gradients_through_the_refined_box():
    """gather and strips have a backward (sliding has none: auto goes on to strips when autograd records)."""
    grid, r = (6, 7), 2.5
    layout = TokenLayout(grid, 3, "last")
    mask = formula_mask(grid, r, 3, "last")
    pattern = circular_pattern(grid, r, layout)
    base = qkv(layout.num_tokens, B=1, H=2, seed=7)
    ref_in = [t.clone().requires_grad_() for t in base]
    reference(*ref_in, mask).square().sum().backward()
    for name in ("gather", "strips"):
        inp = [t.clone().requires_grad_() for t in base]
        run(name, *inp, pattern, layout).square().sum().backward()
        for a, b in zip(inp, ref_in):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    req = Request.make(pattern, layout, q=ref_in[0], k=ref_in[1], v=ref_in[2])
    with torch.enable_grad():
        assert get_backend("sliding").supports(req) is not None
