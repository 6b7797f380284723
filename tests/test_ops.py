"""The functional API (diffusion_attn.ops) against SDPA with an explicit boolean mask built independently
(NATTEN's formula per coordinate pair, the official radial algorithm, roll + 2x2 partition, Python loops),
and against NATTEN's own na1d / na2d / na3d when natten imports."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

import diffusion_attn
from diffusion_attn import ops
from diffusion_attn.layout import TokenLayout
from diffusion_attn.patterns import (
    CircularWindow,
    TopKKeyBlocks,
    heads_in,
    in_segment,
    neighborhood_pattern,
    text_dense,
)
from test_mask_mod import circular_loop, topk_loop
from test_patterns import natten_mask, official_radial, random_gna_config

ATOL = 1e-5


def embed(grid_mask, layout):
    """The whole-sequence mask by hand: grid block from ``grid_mask``, text rows and columns all True."""
    S, n, t = layout.num_tokens, grid_mask.shape[0], layout.text_len
    out = torch.ones(S, S, dtype=torch.bool)
    g0 = t if layout.text_position == "first" else 0
    out[g0 : g0 + n, g0 : g0 + n] = grid_mask
    return out


def oracle(q, k, v, mask, key_padding_mask=None, scale=None):
    """SDPA in (B, S, H, D) with a (S_q, S_kv) or (B, H, S_q, S_kv) boolean mask."""
    m = mask if mask.dim() == 4 else mask[None, None]
    if key_padding_mask is not None:
        m = m & key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, scale=scale)
    return out.transpose(1, 2)


def qkv(B, S, H=2, D=8, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, D, generator=g),
            torch.randn(B, S, H, Dv or D, generator=g))


def text_padding(layout, B, rng):
    """(B, S) True = real; a random number of trailing text tokens padded per row (at least one kept)."""
    kpm = torch.ones(B, layout.num_tokens, dtype=torch.bool)
    if layout.text_len:
        t0 = layout.text_slice.start
        for b in range(B):
            keep = rng.randint(1, layout.text_len)
            kpm[b, t0 + keep : t0 + layout.text_len] = False
    return kpm


# ---------------------------------------------------------------------------------------------------
# neighborhood_attention
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("text", [(0, "last"), (3, "first"), (4, "last")])
def test_neighborhood_attention_matches_masked_sdpa(ndim, text):
    rng = random.Random(ndim * 10 + text[0])
    for trial in range(3):
        grid, window, stride, dilation = random_gna_config(rng, ndim)
        layout = TokenLayout(grid, *text)
        q, k, v = qkv(2, layout.num_tokens, Dv=5, seed=trial)
        kpm = text_padding(layout, 2, rng) if text[0] else None
        expected = oracle(q, k, v, embed(natten_mask(grid, window, stride, dilation), layout), kpm)
        for backend in ("auto", "reference", "gather"):
            out = ops.neighborhood_attention(q, k, v, window, stride, dilation, grid=grid, text_len=text[0],
                                             text_position=text[1], key_padding_mask=kpm, backend=backend)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL, msg=f"{grid} {window} {stride} {dilation} {backend}")


@pytest.mark.parametrize("grid,window,stride,dilation", [
    ((5, 7), 3, (1, 2), 1),
    ((6, 6), 3, 3, 1),  # blocked: the windows backend
    ((3, 4, 6), (2, 3, 3), (1, 3, 3), (1, 1, 2)),
])
def test_neighborhood_attention_grid_layout(grid, window, stride, dilation):
    nd = len(grid)
    wins, strides, dils = (tuple(x) if isinstance(x, tuple) else (x,) * nd for x in (window, stride, dilation))
    B, H = 2, 3
    q = torch.randn(B, *grid, H, 8)
    k, v = torch.randn_like(q), torch.randn(B, *grid, H, 4)
    out = ops.neighborhood_attention(q, k, v, window, stride, dilation)
    assert out.shape == (B, *grid, H, 4)
    n = math.prod(grid)
    flat = lambda t: t.reshape(B, n, H, t.shape[-1])  # noqa: E731
    expected = oracle(flat(q), flat(k), flat(v), natten_mask(grid, wins, strides, dils))
    torch.testing.assert_close(out.reshape(B, n, H, 4), expected, atol=ATOL, rtol=ATOL)
    out2 = ops.neighborhood_attention(q, k, v, window, stride, dilation, grid=grid)  # an agreeing grid= is fine
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


def test_neighborhood_attention_scale_and_full_window():
    layout = TokenLayout((4, 5), 3, "first")
    q, k, v = qkv(1, layout.num_tokens)
    mask = embed(natten_mask((4, 5), (3, 3), (1, 1), (1, 1)), layout)
    out = ops.neighborhood_attention(q, k, v, 3, grid=(4, 5), text_len=3, text_position="first", scale=0.3)
    torch.testing.assert_close(out, oracle(q, k, v, mask, scale=0.3), atol=ATOL, rtol=ATOL)
    full = ops.neighborhood_attention(q, k, v, (4, 5), grid=(4, 5), text_len=3, text_position="first")
    torch.testing.assert_close(full, oracle(q, k, v, torch.ones(23, 23, dtype=torch.bool)), atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------------
# radial_attention / shifted_window_attention
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,decay,sink,block", [((6, 4, 4), 1.0, False, 16), ((8, 3, 4), 0.2, False, 4), ((6, 4, 5), 0.2, True, 4)])
@pytest.mark.parametrize("text", [(0, "last"), (5, "first")])
def test_radial_attention_matches_official_mask(grid, decay, sink, block, text):
    frames, tpf = grid[0], grid[1] * grid[2]
    blocks = official_radial(frames, tpf, decay, sink, block)
    assert not blocks.all()
    tokens = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)  # n is a multiple of block here
    layout = TokenLayout(grid, *text)
    q, k, v = qkv(2, layout.num_tokens, Dv=6)
    kpm = text_padding(layout, 2, random.Random(1)) if text[0] else None
    expected = oracle(q, k, v, embed(tokens, layout), kpm)
    for backend in ("auto", "gather"):
        out = ops.radial_attention(q, k, v, grid, decay, sink, block_size=block, text_len=text[0], text_position=text[1],
                                   key_padding_mask=kpm, backend=backend)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    q5, k5, v5 = (t[:, :math.prod(grid)].reshape(2, *grid, 2, t.shape[-1]) for t in (q, k, v))
    if not text[0]:  # grid-shaped input, no text
        out = ops.radial_attention(q5, k5, v5, decay_factor=decay, sink=sink, block_size=block)
        torch.testing.assert_close(out.reshape(2, -1, 2, 6), expected, atol=ATOL, rtol=ATOL)


def roll_partition_mask(H, W, choice):
    wh, ww = H // 2, W // 2
    sh, sw = choice * (wh // 4), choice * (ww // 4)
    idx = torch.roll(torch.arange(H * W).view(H, W), (-sh, -sw), dims=(0, 1))
    out = torch.zeros(H * W, H * W, dtype=torch.bool)
    for w in idx.view(2, wh, 2, ww).permute(0, 2, 1, 3).reshape(4, -1):
        out[w[:, None], w[None, :]] = True
    return out


@pytest.mark.parametrize("choice", [0, 1, 2, 3])
def test_shifted_window_attention_matches_roll_partition(choice):
    layout = TokenLayout((8, 12), 4, "last")
    q, k, v = qkv(2, layout.num_tokens, Dv=3)
    kpm = text_padding(layout, 2, random.Random(choice))
    expected = oracle(q, k, v, embed(roll_partition_mask(8, 12, choice), layout), kpm)
    for backend in ("auto", "reference", "windows", "gather"):
        out = ops.shifted_window_attention(q, k, v, choice, grid=(8, 12), text_len=4, key_padding_mask=kpm, backend=backend)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    g = lambda t: t[:, :96].reshape(2, 8, 12, 2, t.shape[-1])  # noqa: E731
    out = ops.shifted_window_attention(g(q), g(k), g(v), choice)
    torch.testing.assert_close(out.reshape(2, 96, 2, 3), oracle(q[:, :96], k[:, :96], v[:, :96], roll_partition_mask(8, 12, choice)),
                               atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------------
# masked_attention: any predicate
# ---------------------------------------------------------------------------------------------------
def test_masked_attention_circular_with_pooled_keys_and_heads():
    """CLEAR-like: circular window + text, every query also sees 3 pooled keys; head 1 is dense."""
    layout = TokenLayout((5, 6), 4, "first", extra=[("pooled", 3)])
    base = TokenLayout((5, 6), 4, "first")
    circ = circular_loop(base, 2.3)  # (34, 34)
    B, H = 2, 3
    mod = (text_dense(CircularWindow((5, 6), 2.3)) | in_segment("pooled", "kv")) | heads_in({1})
    mask = torch.zeros(B, H, 34, 37, dtype=torch.bool)
    for h in range(H):
        mask[:, h, :, :34] = circ if h != 1 else True
        mask[:, h, :, 34:] = True
    q = torch.randn(B, 34, H, 8)
    k, v = torch.randn(B, 37, H, 8), torch.randn(B, 37, H, 5)
    kpm = torch.ones(B, 37, dtype=torch.bool)
    kpm[0, 35:] = False  # padded pooled keys: allowed on the generic path
    out = ops.masked_attention(q, k, v, mod, layout, key_padding_mask=kpm)
    torch.testing.assert_close(out, oracle(q, k, v, mask, kpm), atol=ATOL, rtol=ATOL)


def test_masked_attention_plain_function_and_grid_patterns():
    layout = TokenLayout((4, 6), 2, "last")
    q, k, v = qkv(2, layout.num_tokens)  # Dv == D: strips with Dv != D is B7, fixed in kernels/

    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 3

    S = layout.num_tokens
    expected = torch.tensor([[abs(i - j) <= 3 for j in range(S)] for i in range(S)])
    torch.testing.assert_close(ops.masked_attention(q, k, v, band, layout), oracle(q, k, v, expected), atol=ATOL, rtol=ATOL)
    # a text-dense box pattern runs on the grid kernels (any backend) and equals the loop mask
    gna = embed(natten_mask((4, 6), (3, 3), (2, 1), (1, 2)), layout)
    p = neighborhood_pattern((4, 6), 3, (2, 1), (1, 2))
    for pattern in (p, text_dense(p), text_dense(p, layout)):
        for backend in ("auto", "gather", "strips"):
            out = ops.masked_attention(q, k, v, pattern, layout, backend=backend)
            torch.testing.assert_close(out, oracle(q, k, v, gna), atol=ATOL, rtol=ATOL)


def test_masked_attention_predicate_gradients():
    layout = TokenLayout((4, 5), 2, "last", extra=[("pooled", 2)])
    mod = text_dense(CircularWindow((4, 5), 1.6)) | in_segment("pooled", "kv") | heads_in({0})
    mask = mod.dense_mask(layout, heads=2)
    q = torch.randn(2, 22, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 24, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 24, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 22, 2, 4, dtype=torch.float64)
    grads = torch.autograd.grad((ops.masked_attention(q, k, v, mod, layout) * w).sum(), (q, k, v))
    mask_by_hand = torch.ones(1, 2, 22, 24, dtype=torch.bool)
    mask_by_hand[0, 1, :, :22] = circular_loop(TokenLayout((4, 5), 2, "last"), 1.6)
    assert torch.equal(mask, mask_by_hand)
    expected = torch.autograd.grad((oracle(q, k, v, mask_by_hand) * w).sum(), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


def test_masked_attention_dynamic_pattern():
    layout = TokenLayout((4, 5), 3, "first")
    B, H = 2, 2
    q, k, v = qkv(B, layout.num_tokens, H=H, D=4, Dv=3, seed=3)
    expected = oracle(q, k, v, topk_loop(q, k, layout, 4, 2))
    torch.testing.assert_close(ops.masked_attention(q, k, v, TopKKeyBlocks(4, 2), layout), expected, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------------
# errors: clear, early, naming what is accepted
# ---------------------------------------------------------------------------------------------------
def test_errors():
    q, k, v = qkv(1, 20)
    na = ops.neighborhood_attention
    with pytest.raises(ValueError, match="pass grid="):
        na(q, k, v, 3)
    with pytest.raises(ValueError, match=r"sequence length 20 does not match grid \(4, 4\) \+ 3 text tokens = 19"):
        na(q, k, v, 3, grid=(4, 4), text_len=3)
    with pytest.raises(ValueError, match="window must be an int or a sequence of 2 ints"):
        na(q, k, v, (2.5, 3), grid=(4, 5))
    with pytest.raises(ValueError, match="window must be an int or a sequence of 2 ints"):
        na(q, k, v, (True, 3), grid=(4, 5))
    with pytest.raises(ValueError, match=r"stride must be in \[1, window=2\]"):
        na(q, k, v, 2, stride=3, grid=(4, 5))
    with pytest.raises(ValueError, match="backend must be a backend name"):
        na(q, k, v, 3, grid=(4, 5), backend=None)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        na(q, k, v, 3, grid=(4, 5), backend="fast")
    with pytest.raises(ValueError, match="scale must be None"):
        na(q, k, v, 3, grid=(4, 5), scale=float("nan"))
    with pytest.raises(ValueError, match="text_len must be an int >= 0"):
        na(q, k, v, 3, grid=(4, 4), text_len=4.0)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a \(B, S\) = \(1, 20\) bool tensor"):
        na(q, k, v, 3, grid=(4, 4), text_len=4, key_padding_mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask may only mask text tokens"):
        na(q, k, v, 3, grid=(4, 4), text_len=4, key_padding_mask=torch.zeros(1, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must have q's shape"):
        na(q, k[:, :19], v, 3, grid=(4, 5))
    with pytest.raises(ValueError, match="v must match q's shape except the head size"):
        na(q, k, v[:, :, :1], 3, grid=(4, 5))
    g = torch.randn(1, 4, 5, 2, 8)
    with pytest.raises(ValueError, match=r"grid=\(5, 4\) does not match q's grid \(4, 5\)"):
        na(g, g, g, 3, grid=(5, 4))
    with pytest.raises(ValueError, match="grid-shaped inputs carry no text tokens"):
        na(g, g, g, 3, text_len=2)
    with pytest.raises(ValueError, match="choice must be 0, 1, 2 or 3"):
        ops.shifted_window_attention(g, g, g, 4)
    with pytest.raises(ValueError, match="grid must have 2 axes"):
        ops.shifted_window_attention(q, k, v, 0, grid=(20,))
    for bad in (float("nan"), 0, -1.0, True):
        with pytest.raises(ValueError, match="decay_factor must be a finite number > 0"):
            ops.radial_attention(g, g, g, decay_factor=bad)
    layout = TokenLayout((4, 5))
    circ = text_dense(CircularWindow((4, 5), 2), layout)
    with pytest.raises(ValueError, match="backend='gather' cannot run this pattern.*accepted for a general predicate: auto, reference"):
        ops.masked_attention(q, k, v, circ | in_segment("text", "q"), layout, backend="gather")  # a composition: no box
    with pytest.raises(ValueError, match="query 0 .* may attend to no key"):
        ops.masked_attention(q, k, v, ~in_segment("grid", "kv"), layout)
    with pytest.raises(ValueError, match="do not match the layout 4x5 \\+ 2 pooled"):
        ops.masked_attention(q, k, v, circ, TokenLayout((4, 5), extra=[("pooled", 2)]))
    with pytest.raises(ValueError, match="attached to 4x5, the call's layout is 2x10"):
        ops.masked_attention(q, k, v, circ, TokenLayout((2, 10)))


def test_ops_is_exported():
    assert diffusion_attn.ops is ops and "ops" in diffusion_attn.__all__


# ---------------------------------------------------------------------------------------------------
# NATTEN's own functions (the package runs on CPU); fp32 tolerance
# ---------------------------------------------------------------------------------------------------
NATTEN_CASES = [
    ((9,), (3,), (2,), (2,)),
    ((5, 7), (3, 4), (2, 4), (1, 1)),
    ((6, 8), (3, 3), (1, 1), (2, 2)),
    ((3, 4, 6), (2, 3, 3), (1, 3, 3), (1, 1, 2)),
]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile", "ignore:return_lse is deprecated")
@pytest.mark.parametrize("grid,window,stride,dilation", NATTEN_CASES)
def test_matches_natten(grid, window, stride, dilation):
    natten = pytest.importorskip("natten")
    nd = len(grid)
    fn = getattr(natten, f"na{nd}d")
    B, H, D = 1, 2, 32
    torch.manual_seed(nd)
    q, k, v = (torch.randn(B, *grid, H, D) for _ in range(3))
    try:
        ref = fn(q, k, v, kernel_size=window, stride=stride, dilation=dilation)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        pytest.skip(f"installed NATTEN has no CPU backend for this case: {e}")
    if nd >= 2:
        out = ops.neighborhood_attention(q, k, v, window, stride, dilation)
    else:
        out = ops.neighborhood_attention(q.reshape(B, -1, H, D), k.reshape(B, -1, H, D), v.reshape(B, -1, H, D),
                                         window, stride, dilation, grid=grid).reshape(ref.shape)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    # text tokens are NATTEN's additional keys; text queries attend to everything
    T = 4
    layout = TokenLayout(grid, T, "first")
    tq, tk, tv = (torch.randn(B, T, H, D) for _ in range(3))
    flat = lambda x: x.reshape(B, -1, H, D)  # noqa: E731
    seq = [torch.cat([t, flat(x)], 1) for t, x in ((tq, q), (tk, k), (tv, v))]
    out = ops.neighborhood_attention(*seq, window, stride, dilation, grid=grid, text_len=T, text_position="first")
    ref_img = fn(q, k, v, kernel_size=window, stride=stride, dilation=dilation, additional_keys=tk, additional_values=tv)
    torch.testing.assert_close(out[:, layout.image_slice], flat(ref_img), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out[:, layout.text_slice], oracle(seq[0][:, :T], seq[1], seq[2], torch.ones(T, layout.num_tokens, dtype=torch.bool)),
                               atol=ATOL, rtol=ATOL)
