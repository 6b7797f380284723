"""The sequence pattern protocol: layouts with segments, composable mask_mod predicates, capabilities,
the dense reference from the predicate, the circular and the dynamic pattern.

Oracles: explicit Python loops over (query, key) positions, and ``kernels.reference.full_mask`` of the
existing grid patterns (which test_patterns.py checks against NATTEN's formula and the official radial
algorithm)."""

import itertools
import math
import random

import pytest
import torch

from diffusion_attn.kernels.reference import full_mask
from diffusion_attn.layout import Segment, TokenLayout
from diffusion_attn.patterns import (
    CAPABILITIES,
    CircularWindow,
    MaskMod,
    TopKKeyBlocks,
    and_masks,
    as_sequence_pattern,
    batch_in,
    circular_pattern,
    grid_mask,
    heads_in,
    in_segment,
    neighborhood_pattern,
    not_mask,
    or_masks,
    radial_pattern,
    sequence_mask,
    shifted_window_pattern,
    text_dense,
)
from test_patterns import random_gna_config


def positions(layout, side):
    """{segment name: list of positions} written out by hand from the documented order."""
    core = [("text", layout.text_len), ("grid", math.prod(layout.grid))]
    if layout.text_position == "last":
        core.reverse()
    out, pos = {}, 0
    for name, n in core + [(s.name, s.length) for s in layout.extra if s.side in (side, "both")]:
        out[name] = list(range(pos, pos + n))
        pos += n
    return out


# ---------------------------------------------------------------------------------------------------
# layouts with segments
# ---------------------------------------------------------------------------------------------------
def test_layout_without_extra_is_unchanged():
    lay = TokenLayout((4, 5), 3, "first")
    assert lay.extra == () and lay.num_queries == lay.num_keys == lay.num_tokens == 23
    assert lay.segment("grid") == lay.segment("image") == lay.image_slice == slice(3, 23)
    assert lay.segment("text", "kv") == lay.text_slice == slice(0, 3)
    assert lay.describe() == "4x5 + 3 text (first)"
    assert lay.segment_names() == ("text", "grid")
    assert TokenLayout((4, 5)).segment_names("kv") == ("grid",)
    assert TokenLayout((4, 5)).segment("text") == slice(20, 20)  # empty, not an error


@pytest.mark.parametrize("text_position", ["first", "last"])
def test_layout_extra_segments(text_position):
    lay = TokenLayout((2, 3), 4, text_position, extra=[("pooled", 5), ("ref", 2, "both"), Segment("probe", 1, "q")])
    assert lay.extra == (Segment("pooled", 5, "kv"), Segment("ref", 2, "both"), Segment("probe", 1, "q"))
    assert (lay.num_tokens, lay.num_queries, lay.num_keys) == (10, 13, 17)
    for side in ("q", "kv"):
        expected = positions(lay, side)
        assert list(lay.segment_names(side)) == list(expected)
        for name, pos in expected.items():
            sl = lay.segment(name, side)
            assert list(range(sl.start, sl.stop)) == pos, (side, name)
    assert lay.describe() == f"2x3 + 4 text ({text_position}) + 5 pooled (kv) + 2 ref (both) + 1 probe (q)"
    assert lay != TokenLayout((2, 3), 4, text_position) and hash(lay) == hash(TokenLayout(
        (2, 3), 4, text_position, (Segment("pooled", 5), Segment("ref", 2, "both"), Segment("probe", 1, "q"))))


@pytest.mark.parametrize("extra,match", [
    ([("a", 2), ("a", 3)], "unique, repeated: a"),
    ([("text", 2)], "other than grid, image, text"),
    ([("a", 0)], "length must be an int >= 1"),
    ([("a", 2.5)], "length must be an int >= 1"),
    ([("a", True)], "length must be an int >= 1"),
    ([("a", 2, "keys")], "side must be one of kv, q, both"),
    ([("a",)], r"\(name, length\[, side\]\)"),
    (5, "sequence of Segment"),
])
def test_layout_extra_errors(extra, match):
    with pytest.raises(ValueError, match=match):
        TokenLayout((2, 2), 1, extra=extra)


def test_layout_segment_errors():
    lay = TokenLayout((2, 2), 1, extra=[("pooled", 3)])
    with pytest.raises(ValueError, match=r"unknown segment 'pool'.*accepted: 'grid', 'text', 'pooled'"):
        lay.segment("pool", "kv")
    with pytest.raises(ValueError, match="no tokens on the 'q' side"):
        lay.segment("pooled", "q")
    with pytest.raises(ValueError, match="side must be 'q'"):
        lay.segment("grid", "k")


# ---------------------------------------------------------------------------------------------------
# predicates and combinators against loops
# ---------------------------------------------------------------------------------------------------
LAYOUT = TokenLayout((3, 4), 3, "first", extra=[("pooled", 2), ("ref", 2, "both")])


def loop_mask(layout, pred, batch=None, heads=None):
    """(S_q, S_kv) or (B, H, S_q, S_kv) from a Python predicate pred(b, h, q, kv) -> bool."""
    B, H = batch or 1, heads or 1
    out = torch.zeros(B, H, layout.num_queries, layout.num_keys, dtype=torch.bool)
    for b, h, q, kv in itertools.product(range(B), range(H), range(layout.num_queries), range(layout.num_keys)):
        out[b, h, q, kv] = bool(pred(b, h, q, kv))
    return out if batch or heads else out[0, 0]


@pytest.mark.parametrize("name", ["grid", "text", "pooled", "ref"])
@pytest.mark.parametrize("side", ["q", "kv"])
def test_in_segment(name, side):
    pos = positions(LAYOUT, side)
    if name not in pos:
        with pytest.raises(ValueError, match="no tokens on the 'q' side"):
            in_segment(name, side, LAYOUT)
        return
    members = set(pos[name])
    expected = loop_mask(LAYOUT, lambda b, h, q, kv: (q if side == "q" else kv) in members)
    assert torch.equal(sequence_mask(in_segment(name, side), LAYOUT), expected)
    assert torch.equal(in_segment(name, side, LAYOUT).dense_mask(), expected)


def f_mod3(b, h, q, kv):
    return (q + kv) % 3 == 0


def f_lower(b, h, q, kv):
    return q >= kv


def test_combinators_and_operators_match_boolean_logic():
    txt_q = in_segment("text", "q")
    pooled = in_segment("pooled", "kv")
    text = set(positions(LAYOUT, "q")["text"])
    pool = set(positions(LAYOUT, "kv")["pooled"])
    cases = [
        (and_masks(f_mod3, f_lower), lambda b, h, q, kv: (q + kv) % 3 == 0 and q >= kv),
        (or_masks(f_mod3, f_lower, pooled), lambda b, h, q, kv: (q + kv) % 3 == 0 or q >= kv or kv in pool),
        (not_mask(f_lower), lambda b, h, q, kv: q < kv),
        (txt_q & f_lower, lambda b, h, q, kv: q in text and q >= kv),
        (f_lower & txt_q, lambda b, h, q, kv: q in text and q >= kv),
        (f_mod3 | ~txt_q, lambda b, h, q, kv: (q + kv) % 3 == 0 or q not in text),
        (~(txt_q | pooled) & f_mod3, lambda b, h, q, kv: not (q in text or kv in pool) and (q + kv) % 3 == 0),
        (and_masks(), lambda b, h, q, kv: True),
        (or_masks(), lambda b, h, q, kv: False),
    ]
    for mod, pred in cases:
        assert isinstance(mod, MaskMod)
        assert torch.equal(sequence_mask(mod, LAYOUT), loop_mask(LAYOUT, pred)), mod


def test_head_and_batch_dependent_predicates():
    mod = (text_dense(neighborhood_pattern((3, 4), 3), LAYOUT) & ~heads_in({0, 3})) | batch_in([1])
    assert {"head_dependent", "batch_dependent"} <= mod.capabilities
    grid = full_mask(neighborhood_pattern((3, 4), 3).dense_mask(), TokenLayout((3, 4), 3, "first"))

    def pred(b, h, q, kv):  # text is 0..2, the grid 3..14; text queries see the extra keys too
        dense = (q < 15 and kv < 15 and bool(grid[q, kv])) or q < 3 or kv < 3
        return (dense and h not in (0, 3)) or b == 1

    assert torch.equal(sequence_mask(mod, batch=2, heads=5), loop_mask(LAYOUT, pred, batch=2, heads=5))
    assert sequence_mask(heads_in({1}), LAYOUT, heads=3).shape == (1, 3, LAYOUT.num_queries, LAYOUT.num_keys)
    with pytest.raises(ValueError, match="depends on the head: pass heads="):
        sequence_mask(mod, batch=2)
    with pytest.raises(ValueError, match="depends on the batch row: pass batch="):
        sequence_mask(mod, heads=5)
    for bad in (set(), {-1}, {1.5}, {True}, 3):
        with pytest.raises(ValueError, match="head indices must be"):
            heads_in(bad)


def test_layout_is_required_and_checked():
    with pytest.raises(ValueError, match=r"needs a layout: attach one with \.on\(layout\)"):
        in_segment("text", "q").dense_mask()
    with pytest.raises(ValueError, match="needs a layout"):
        in_segment("text", "q")(torch.tensor(0), torch.tensor(0), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="unknown segment 'pooled'"):
        in_segment("pooled", "kv").on(TokenLayout((2, 2)))
    with pytest.raises(ValueError, match=r"grid \(3, 4\) does not match the layout 4x3"):
        text_dense(neighborhood_pattern((3, 4), 3), TokenLayout((4, 3)))
    with pytest.raises(ValueError, match="different layouts"):
        in_segment("text", "q", TokenLayout((2, 2), 1)) & in_segment("text", "q", TokenLayout((2, 3), 1))
    with pytest.raises(TypeError, match=r"grid_mask\(p\).*text_dense\(p\)"):
        in_segment("text", "q") | neighborhood_pattern((3, 4), 3)
    with pytest.raises(TypeError, match="must be callable"):
        and_masks(3)
    # a predicate that reads no positions needs no layout to be called
    assert bool(heads_in({2})(None, torch.tensor(2), torch.tensor(0), torch.tensor(0)))


# ---------------------------------------------------------------------------------------------------
# text_dense(grid pattern) reproduces what the kernels compute: full_mask(pattern.dense_mask(), layout)
# ---------------------------------------------------------------------------------------------------
def layouts_for(grid, rng):
    return [TokenLayout(grid), TokenLayout(grid, rng.randint(1, 5), "first"), TokenLayout(grid, rng.randint(1, 5), "last")]


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_text_dense_gna_equals_full_mask(ndim):
    rng = random.Random(10 + ndim)
    for _ in range(5):
        cfg = random_gna_config(rng, ndim)
        p = neighborhood_pattern(*cfg)
        for lay in layouts_for(cfg[0], rng):
            expected = full_mask(p.dense_mask(), lay)
            assert torch.equal(sequence_mask(text_dense(p), lay), expected), (cfg, lay)
            assert torch.equal(text_dense(p, lay).dense_mask(), expected)
            assert torch.equal(sequence_mask(p, lay), expected)  # a bare grid pattern is made text-dense


@pytest.mark.parametrize("grid,decay,sink,block", [((4, 4, 6), 0.5, True, 8), ((6, 3, 5), 1.0, False, 16), ((3, 7, 7), 0.2, True, 128)])
def test_text_dense_radial_equals_full_mask(grid, decay, sink, block):
    p = radial_pattern(grid, decay, sink, block)
    assert not p.is_full() or block == 128
    for lay in layouts_for(grid, random.Random(0)):
        assert torch.equal(sequence_mask(text_dense(p, lay)), full_mask(p.dense_mask(), lay)), lay


@pytest.mark.parametrize("grid", [(8, 12), (5, 7)])
@pytest.mark.parametrize("choice", [0, 1, 2, 3])
def test_text_dense_shifted_windows_equals_full_mask(grid, choice):
    p = shifted_window_pattern(grid, choice)
    for lay in layouts_for(grid, random.Random(choice)):
        assert torch.equal(sequence_mask(text_dense(p, lay)), full_mask(p.dense_mask(), lay))


def test_grid_mask_is_the_grid_block_only():
    p = neighborhood_pattern((3, 4), (2, 3), (1, 2))
    grid = p.dense_mask()
    img = set(positions(LAYOUT, "q")["grid"])
    off = min(img)
    expected = loop_mask(LAYOUT, lambda b, h, q, kv: q in img and kv in img and bool(grid[q - off, kv - off]))
    assert torch.equal(sequence_mask(grid_mask(p), LAYOUT), expected)
    # on a layout with extra keys, text_dense gives grid queries no extra keys and text queries all keys
    text = set(positions(LAYOUT, "q")["text"])
    td = loop_mask(LAYOUT, lambda b, h, q, kv: bool(expected[q, kv]) or q in text or kv in text)
    assert torch.equal(sequence_mask(text_dense(p), LAYOUT), td)


# ---------------------------------------------------------------------------------------------------
# usable directly as FlexAttention's mask_mod
# ---------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_create_mask_and_block_mask():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    lay = TokenLayout((5, 6), 2, "first")  # 32 tokens: 4 blocks of 8
    mod = text_dense(neighborhood_pattern((5, 6), (3, 3), (1, 2)), lay) & ~heads_in({1}) | in_segment("text", "kv", lay)
    B, H, S = 2, 3, lay.num_tokens
    ref = sequence_mask(mod, batch=B, heads=H).expand(B, H, S, S)
    assert torch.equal(fa.create_mask(mod.mask_mod, B, H, S, S, device="cpu"), ref)
    assert torch.equal(fa.create_mask(mod, B, H, S, S, device="cpu"), ref)  # the MaskMod itself is a mask_mod
    bm = fa.create_block_mask(mod.mask_mod, B, H, S, S, device="cpu", BLOCK_SIZE=8)
    occupied = ref.view(B, H, 4, 8, 4, 8).any(5).any(3)
    assert torch.equal(bm.to_dense().bool(), occupied)
    q, k, v = (torch.randn(B, H, S, 16) for _ in range(3))
    out = fa.flex_attention(q, k, v, block_mask=bm)  # eager (uncompiled) on CPU
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ref)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # extra key segments: S_q != S_kv (32 queries, 40 keys)
    extra = TokenLayout((5, 6), 2, "first", extra=[("pooled", 8)])
    mod = text_dense(neighborhood_pattern((5, 6), 3), extra) | in_segment("pooled", "kv", extra)
    ref = sequence_mask(mod)
    assert ref.shape == (32, 40) and ref[:, 32:].all() and not ref.all()
    assert torch.equal(fa.create_mask(mod.mask_mod, 1, 1, 32, 40, device="cpu")[0, 0], ref)
    bm = fa.create_block_mask(mod.mask_mod, 1, 1, 32, 40, device="cpu", BLOCK_SIZE=8)
    assert torch.equal(bm.to_dense()[0, 0].bool(), ref.view(4, 8, 5, 8).any(3).any(1))


def test_grid_patterns_mask_mod_over_grid_indices():
    i = torch.arange(30)
    for p in (neighborhood_pattern((5, 6), 3, 2), radial_pattern((2, 3, 5), 0.5, False, 8), CircularWindow((5, 6), 2.2)):
        assert torch.equal(p.mask_mod(None, None, i[:, None], i[None, :]), p.dense_mask())


# ---------------------------------------------------------------------------------------------------
# capabilities
# ---------------------------------------------------------------------------------------------------
def test_capabilities():
    lay = TokenLayout((6, 6), 2)
    sliding, blocked = neighborhood_pattern((6, 6), 3), neighborhood_pattern((6, 6), 3, 3)
    radial = radial_pattern((2, 6, 6), 0.5, False, 8)
    assert sliding.capabilities == {"box"} and blocked.capabilities == {"box", "partition"}
    assert shifted_window_pattern((6, 6), 1).capabilities == {"box", "partition"}
    assert radial.capabilities == {"block"}
    assert CircularWindow((6, 6), 2).capabilities == {"box", "refined"}  # its bounding square, refined by the disc
    for p in (sliding, blocked, radial):
        assert p.grid_pattern is p
    td = text_dense(blocked, lay)
    assert td.capabilities == {"mask_mod", "box", "partition"} and td.grid_pattern is blocked
    assert text_dense(radial, TokenLayout((2, 6, 6))).capabilities == {"mask_mod", "block"}
    assert circular_pattern((6, 6), 2, lay).capabilities == {"mask_mod", "box", "refined"}
    assert (td & heads_in({0})).capabilities == {"mask_mod", "head_dependent"}  # a composition is no box
    assert (td & heads_in({0})).grid_pattern is None
    assert TopKKeyBlocks(4, 2).capabilities == {"dynamic", "head_dependent", "batch_dependent"}
    every = [sliding.capabilities, radial.capabilities, td.capabilities, TopKKeyBlocks(4, 2).capabilities,
             (td | batch_in({0})).capabilities]
    assert all(c <= CAPABILITIES for c in every)
    assert as_sequence_pattern(blocked, lay).layout == lay
    # on a layout with extra keys the grid kernels cannot run it: no box / block capability
    extra = TokenLayout((6, 6), 2, extra=[("pooled", 4)])
    assert text_dense(blocked, extra).capabilities == {"mask_mod"}


def test_is_full():
    lay = TokenLayout((4, 5), 3, "first")
    assert text_dense(neighborhood_pattern((4, 5), (4, 5)), lay).is_full()
    assert not text_dense(neighborhood_pattern((4, 5), (4, 4)), lay).is_full()
    for r in (1, 4.9, 5, 5.01):  # the farthest pair is 3^2 + 4^2 = 25 apart: full iff 25 < r^2
        c = circular_pattern((4, 5), r, lay)
        assert c.is_full() == bool(sequence_mask(c).all()) == (r > 5)
        assert MaskMod.is_full(c) == (r > 5)  # the chunked predicate evaluation agrees with the grid shortcut
    extra = TokenLayout((4, 5), 3, extra=[("pooled", 2)])
    assert not text_dense(neighborhood_pattern((4, 5), (4, 5)), extra).is_full()  # grid queries miss pooled keys
    assert (text_dense(neighborhood_pattern((4, 5), (4, 5))) | in_segment("pooled", "kv")).is_full(extra)
    assert not (in_segment("text", "q") | heads_in({0})).is_full(lay)  # head-dependent: never claimed full


# ---------------------------------------------------------------------------------------------------
# circular window (CLEAR) against a brute-force loop
# ---------------------------------------------------------------------------------------------------
def circular_loop(layout, radius):
    grid = layout.grid
    coords = list(itertools.product(*[range(g) for g in grid]))
    img = positions(layout, "q")["grid"]
    off = img[0]
    S = layout.num_tokens
    out = torch.zeros(S, S, dtype=torch.bool)
    for q in range(S):
        for kv in range(S):
            if q not in img or kv not in img:
                out[q, kv] = True  # text queries see everything; image queries see all text
            else:
                qc, kc = coords[q - off], coords[kv - off]
                out[q, kv] = sum((a - b) ** 2 for a, b in zip(qc, kc)) < radius * radius
    return out


@pytest.mark.parametrize("grid,radius", [((6, 7), 2), ((6, 7), 2.5), ((5, 5), 1), ((9,), 3), ((3, 4, 5), 2), ((7, 8), 3.2)])
@pytest.mark.parametrize("text", [(0, "last"), (4, "first"), (3, "last")])
def test_circular_matches_loop(grid, radius, text):
    lay = TokenLayout(grid, *text)
    assert torch.equal(circular_pattern(grid, radius, lay).dense_mask(), circular_loop(lay, radius))


def test_circular_strict_and_truncated():
    counts = CircularWindow((20, 20), 2).dense_mask().sum(1).view(20, 20)
    assert counts[10, 10] == 9  # the 3x3 square: (+-2, 0) has dy^2 + dx^2 = 4, not < 4 (strict)
    assert counts[0, 0] == 4  # truncated at the corner, not shifted inward
    assert CircularWindow((20, 20), 2.01).dense_mask().sum(1).view(20, 20)[10, 10] == 13
    for bad in (0, -1, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="radius must be a finite number > 0"):
            CircularWindow((4, 4), bad)
    with pytest.raises(ValueError, match="grid must be 1 to 3 ints"):
        CircularWindow((4, 2.5), 2)


# ---------------------------------------------------------------------------------------------------
# dynamic pattern: top-k key blocks chosen from q and k
# ---------------------------------------------------------------------------------------------------
def topk_loop(q, k, layout, block_size, top_k):
    """(B, H, S, S) by hand: centroids as Python sums, scores as dot products, own block first."""
    B, _, H, D = q.shape
    img = positions(layout, "q")["grid"]
    n = len(img)
    blocks = [img[i : i + block_size] for i in range(0, n, block_size)]
    S = layout.num_tokens
    out = torch.ones(B, H, S, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            cents = [[sum(float(k[b, j, h, d]) for j in blk) / len(blk) for d in range(D)] for blk in blocks]
            for qi, qpos in enumerate(img):
                own = qi // block_size
                score = [sum(float(q[b, qpos, h, d]) * c[d] for d in range(D)) for c in cents]
                others = sorted((c for c in range(len(blocks)) if c != own), key=lambda c: -score[c])
                chosen = {own, *others[: top_k - 1]}
                for kj, kpos in enumerate(img):
                    out[b, h, qpos, kpos] = (kj // block_size) in chosen
    return out


@pytest.mark.parametrize("layout,block_size,top_k", [
    (TokenLayout((4, 5), 3, "first"), 4, 2),
    (TokenLayout((3, 7), 2, "last"), 5, 3),  # partial last block
    (TokenLayout((2, 2, 3)), 3, 1),  # own block only
    (TokenLayout((2, 5), 1), 3, 9),  # top_k above the number of blocks: everything
])
def test_topk_blocks_match_direct_computation(layout, block_size, top_k):
    torch.manual_seed(0)
    B, H, D = 2, 3, 4
    q, k = torch.randn(B, layout.num_tokens, H, D), torch.randn(B, layout.num_tokens, H, D)
    dyn = TopKKeyBlocks(block_size, top_k)
    resolved = dyn.resolve(q, k, layout)
    assert {"head_dependent", "batch_dependent"} <= resolved.capabilities and resolved.layout == layout
    assert torch.equal(resolved.dense_mask(batch=B, heads=H), topk_loop(q, k, layout, block_size, top_k))
    with pytest.raises(ValueError, match="dynamic pattern.*resolve"):
        dyn.dense_mask()
    with pytest.raises(ValueError, match="dynamic pattern.*resolve"):
        sequence_mask(dyn, layout)


def test_topk_blocks_errors():
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            TopKKeyBlocks(bad, 2)
    q = torch.randn(1, 10, 2, 4)
    with pytest.raises(ValueError, match="do not match the layout"):
        TopKKeyBlocks(2, 2).select(q, q, TokenLayout((3, 3)))
