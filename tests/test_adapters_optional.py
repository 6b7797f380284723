"""Optional NATTEN / xformers adapters: argument mapping (with fake modules), clear errors when the
package is missing, and equality with the dense-mask reference with the real package when present.

Expected outputs never come from the package's own patterns: they are SDPA with masks built by explicit
loops in :mod:`mask_oracle` (NATTEN's documented GNA semantics, HiDiffusion's roll-and-partition), and
with NATTEN installed the oracle itself is checked against ``natten.na1d/na2d/na3d``. NATTEN is an sdist
whose build imports torch, so it is not in the ``[dev]`` extra: CI (``.ci/run``) installs it after torch
with ``pip install --no-build-isolation natten``; without it the real-NATTEN tests skip."""

import math
import os
import random
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from diffusion_attn import TokenLayout
from diffusion_attn.kernels import natten_adapter, xformers_adapter
from diffusion_attn.kernels.windows import window_partition
from diffusion_attn.patterns import neighborhood_pattern, radial_pattern, shifted_window_pattern

from mask_oracle import gna_mask, masked_sdpa, msw_mask
from test_windows import padding, qkv, random_blocked_config

ATOL = 2e-6
NATTEN_MISSING = "natten not installed (CI installs it: pip install --no-build-isolation natten, after torch)"


def skip_without_natten(reason=NATTEN_MISSING):
    """Skip, unless the environment says NATTEN must be there (CI sets DIFFUSION_ATTN_REQUIRE_NATTEN=1, so the
    real comparison cannot silently stop running)."""
    if os.environ.get("DIFFUSION_ATTN_REQUIRE_NATTEN") == "1":
        pytest.fail(f"DIFFUSION_ATTN_REQUIRE_NATTEN=1 but the real NATTEN comparison cannot run: {reason}")
    pytest.skip(reason)


def oracle_attention(q, k, v, grid_mask, layout, key_padding=None):
    """SDPA with the explicit mask: ``grid_mask`` on the grid, text dense, padded keys dropped."""
    return masked_sdpa(q, k, v, grid_mask, layout.text_len, layout.text_position == "first", key_padding)


# -- NATTEN ----------------------------------------------------------------------------------------


def test_natten_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "natten", None)  # import natten -> ImportError
    assert not natten_adapter.available()
    layout = TokenLayout((4, 4))
    q, k, v = qkv(layout)
    with pytest.raises(ImportError, match=r'pip install --no-build-isolation "diffusion-attn\[natten\]" \(after torch\)'):
        natten_adapter.natten_attention(q, k, v, neighborhood_pattern((4, 4), 2), layout)
    assert not natten_adapter.can_run(q, layout)


def test_natten_too_old_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "natten", types.SimpleNamespace(__version__="0.17.5", na1d=None, na2d=None, na3d=None))
    assert not natten_adapter.available()
    with pytest.raises(ImportError, match="NATTEN >= 0.20"):
        natten_adapter.require()


@pytest.mark.parametrize("seed", range(8))
def test_gna_params_rebuild_the_pattern(seed):
    rng = random.Random(seed)
    for _ in range(6):
        cfg = random_blocked_config(rng, rng.choice([1, 2, 3]), blocked=False)
        pattern = neighborhood_pattern(*cfg)
        params = natten_adapter.gna_params(pattern)
        assert params is not None and params.window == cfg[1] and params.shift == (0,) * len(cfg[0])
        rebuilt = neighborhood_pattern(cfg[0], params.window, params.stride, params.dilation)
        assert torch.equal(rebuilt.dense_mask(), pattern.dense_mask()), cfg
        assert torch.equal(pattern.dense_mask(), gna_mask(*cfg)), cfg
        assert natten_adapter.supports(pattern, TokenLayout(cfg[0], 3))


def test_gna_params_shift_and_unsupported():
    p = natten_adapter.gna_params(shifted_window_pattern((8, 12), 3))
    assert (p.window, p.stride, p.dilation, p.shift) == ((4, 6), (4, 6), (1, 1), (3, 3))
    p = natten_adapter.gna_params(neighborhood_pattern((9, 30, 52), (3, 15, 26), (3, 15, 26)))
    assert p.stride == (3, 15, 26) and p.shift == (0, 0, 0)
    radial = radial_pattern((4, 8, 8), 0.5, False)
    assert natten_adapter.gna_params(radial) is None
    assert not natten_adapter.supports(radial, TokenLayout((4, 8, 8)))
    assert not natten_adapter.supports(neighborhood_pattern((4, 6), 3), TokenLayout((6, 4)))  # wrong grid


def _fake_natten(calls):
    """A stand-in for NATTEN >= 0.20's functional API: records the arguments and computes NATTEN's
    semantics from the arguments it receives, with the loop-built oracle mask (heads-last tensors, extra
    keys in the same softmax)."""

    def make(nd):
        def na(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
               additional_keys=None, additional_values=None, **kwargs):
            assert query.dim() == nd + 3
            grid = tuple(query.shape[1 : 1 + nd])
            calls.append(dict(nd=nd, grid=grid, kernel_size=kernel_size, stride=stride, dilation=dilation,
                              is_causal=is_causal, extra=None if additional_keys is None else additional_keys.shape[1],
                              batch=query.shape[0]))
            B, H = query.shape[0], query.shape[-2]
            mask = gna_mask(grid, kernel_size, stride, dilation)
            qf, kf, vf = (t.reshape(B, -1, H, t.shape[-1]) for t in (query, key, value))
            if additional_keys is not None:
                kf, vf = torch.cat([kf, additional_keys], 1), torch.cat([vf, additional_values], 1)
                mask = torch.cat([mask, torch.ones(mask.shape[0], additional_keys.shape[1], dtype=torch.bool)], 1)
            o = F.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2),
                                               attn_mask=mask, scale=scale)
            return o.transpose(1, 2).reshape(*query.shape[:-1], value.shape[-1])

        return na

    return types.SimpleNamespace(__version__="0.21.7", na1d=make(1), na2d=make(2), na3d=make(3))


@pytest.mark.parametrize("seed", range(10))
def test_natten_mapping_with_fake_module(monkeypatch, seed):
    calls = []
    monkeypatch.setitem(sys.modules, "natten", _fake_natten(calls))
    assert natten_adapter.available()
    rng = random.Random(seed)
    if seed % 3 == 2:
        grid = (rng.randint(2, 9), rng.randint(2, 9))
        pattern, expected_mask = shifted_window_pattern(grid, seed % 4), msw_mask(grid, seed % 4, official_row_rule=False)
    else:
        cfg = random_blocked_config(rng, 1 + seed % 3, blocked=False)
        grid, pattern, expected_mask = cfg[0], neighborhood_pattern(*cfg), gna_mask(*cfg)
    layout = TokenLayout(grid, rng.choice([0, 1, 6]), rng.choice(["first", "last"]))
    q, k, v = qkv(layout, seed=seed)
    kpm = padding(layout, 2, rng)
    ref = oracle_attention(q, k, v, expected_mask, layout, kpm)
    out = natten_adapter.natten_attention(q, k, v, pattern, layout, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    params = natten_adapter.gna_params(pattern)
    for c in calls:
        assert c["nd"] == len(grid) and c["grid"] == grid
        assert (c["kernel_size"], c["stride"], c["dilation"]) == (params.window, params.stride, params.dilation)
        assert c["is_causal"] == (False,) * len(grid)
    # padding: rows with the same real text share one call; padded text keys are dropped
    text_valid = None if kpm is None else kpm[:, layout.text_slice]
    if text_valid is None or bool((text_valid[0] == text_valid[1]).all()):
        assert len(calls) == 1 and calls[0]["batch"] == 2
    else:
        assert len(calls) == 2 and [c["extra"] for c in calls] == text_valid.sum(1).tolist()
    if layout.text_len == 0:
        assert calls[0]["extra"] is None


def test_natten_rejects_non_gna(monkeypatch):
    monkeypatch.setitem(sys.modules, "natten", _fake_natten([]))
    layout = TokenLayout((4, 8, 8))
    q, k, v = qkv(layout)
    with pytest.raises(ValueError, match="neighborhood attention patterns only"):
        natten_adapter.natten_attention(q, k, v, radial_pattern((4, 8, 8), 0.5, False), layout)


# (grid, window, stride, dilation): sliding, strided, blocked, dilated, even windows, 1-3 D (NATTEN
# requires windows >= 2)
REAL_NATTEN_CASES = [
    ((9,), (4,), (1,), (2,)),
    ((7,), (3,), (3,), (1,)),
    ((5, 7), (3, 4), (2, 4), (1, 1)),
    ((8, 6), (2, 3), (2, 2), (2, 1)),
    ((6, 9), (6, 2), (3, 2), (1, 3)),
    ((3, 4, 6), (2, 3, 3), (1, 3, 3), (1, 1, 2)),
    ((4, 5, 6), (3, 2, 5), (2, 1, 5), (1, 2, 1)),
]


@pytest.mark.parametrize("grid,window,stride,dilation", REAL_NATTEN_CASES)
def test_real_natten_equals_the_loop_oracle(grid, window, stride, dilation):
    """The oracle's GNA semantics are NATTEN's: natten.na{n}d itself against SDPA with gna_mask."""
    if not natten_adapter.available():
        skip_without_natten()
    import natten

    g = torch.Generator().manual_seed(len(grid))
    q, k, v = (torch.randn(2, *grid, 2, 32, generator=g) for _ in range(3))
    if not natten_adapter.can_run(q.flatten(1, -3), TokenLayout(grid)):
        skip_without_natten("installed NATTEN has no backend for these tensors on this device")
    out = getattr(natten, f"na{len(grid)}d")(q, k, v, kernel_size=window, stride=stride, dilation=dilation)
    flat = [t.flatten(1, len(grid)) for t in (q, k, v)]
    ref = masked_sdpa(*flat, gna_mask(grid, window, stride, dilation))
    torch.testing.assert_close(out.flatten(1, len(grid)), ref, atol=1e-5, rtol=1e-5)


def test_real_natten_equals_reference():
    if not natten_adapter.available():
        skip_without_natten()
    rng = random.Random(0)
    cases = [
        (neighborhood_pattern((5, 7), (3, 4), (2, 4), (1, 1)), gna_mask((5, 7), (3, 4), (2, 4), (1, 1)),
         TokenLayout((5, 7), 4, "first")),
        (shifted_window_pattern((7, 6), 1), msw_mask((7, 6), 1, official_row_rule=False), TokenLayout((7, 6), 3, "last")),
        (neighborhood_pattern((3, 4, 6), (2, 3, 3), (1, 3, 3), (1, 1, 2)), gna_mask((3, 4, 6), (2, 3, 3), (1, 3, 3), (1, 1, 2)),
         TokenLayout((3, 4, 6))),
    ]
    for pattern, expected_mask, layout in cases:
        q, k, v = qkv(layout, dim=32)
        if not natten_adapter.can_run(q, layout):
            skip_without_natten("installed NATTEN has no backend for these tensors on this device")
        kpm = padding(layout, 2, rng)
        ref = oracle_attention(q, k, v, expected_mask, layout, kpm)
        out = natten_adapter.natten_attention(q, k, v, pattern, layout, key_padding_mask=kpm)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# -- xformers --------------------------------------------------------------------------------------


def test_xformers_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    assert not xformers_adapter.available()
    layout = TokenLayout((4, 4))
    q, k, v = qkv(layout)
    plan = window_partition(neighborhood_pattern((4, 4), 2, 2))
    with pytest.raises(ImportError, match=r'pip install "diffusion-attn\[xformers\]"'):
        xformers_adapter.xformers_attention(q, k, v, plan, layout)


def test_xformers_supports_window_partitions_only():
    layout = TokenLayout((8, 8))
    assert xformers_adapter.supports(neighborhood_pattern((8, 8), 3, 3), layout)
    assert xformers_adapter.supports(shifted_window_pattern((8, 8), 2), layout)
    assert not xformers_adapter.supports(neighborhood_pattern((8, 8), 3, 1), layout)
    assert not xformers_adapter.supports(radial_pattern((2, 8, 8), 0.5, False), TokenLayout((2, 8, 8)))


class _FakeBlockDiagonalMask:
    def __init__(self, q_seqlen, kv_seqlen):
        self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)


def _fake_xformers(calls):
    """``xformers.ops`` stand-in: memory_efficient_attention with a BlockDiagonalMask, block by block."""

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, **kwargs):
        assert query.shape[0] == 1 and isinstance(attn_bias, _FakeBlockDiagonalMask)
        assert sum(attn_bias.q_seqlen) == query.shape[1] and sum(attn_bias.kv_seqlen) == key.shape[1]
        calls.append((list(attn_bias.q_seqlen), list(attn_bias.kv_seqlen)))
        out, qs, ks = [], 0, 0
        for tq, tk in zip(attn_bias.q_seqlen, attn_bias.kv_seqlen):
            qq, kk, vv = (t[:, s : s + n].transpose(1, 2) for t, s, n in ((query, qs, tq), (key, ks, tk), (value, ks, tk)))
            out.append(F.scaled_dot_product_attention(qq, kk, vv, scale=scale).transpose(1, 2))
            qs, ks = qs + tq, ks + tk
        return torch.cat(out, 1)

    fmha = types.SimpleNamespace(BlockDiagonalMask=_FakeBlockDiagonalMask)
    ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention, fmha=fmha)
    return ops


@pytest.mark.parametrize("seed", range(8))
def test_xformers_mapping_with_fake_module(monkeypatch, seed):
    calls = []
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", _fake_xformers(calls))
    rng = random.Random(seed)
    if seed % 2:
        grid = (rng.randint(2, 9), rng.randint(2, 9))
        pattern, expected_mask = shifted_window_pattern(grid, seed % 4), msw_mask(grid, seed % 4, official_row_rule=False)
    else:
        cfg = random_blocked_config(rng, rng.choice([1, 2, 3]))
        grid, pattern, expected_mask = cfg[0], neighborhood_pattern(*cfg), gna_mask(*cfg)
    plan = window_partition(pattern)
    layout = TokenLayout(grid, rng.choice([0, 2, 7]), rng.choice(["first", "last"]))
    q, k, v = qkv(layout, seed=seed)
    kpm = padding(layout, 2, rng)
    ref = oracle_attention(q, k, v, expected_mask, layout, kpm)
    out = xformers_adapter.xformers_attention(q, k, v, plan, layout, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    assert len(calls) == 1  # every window shape and batch row in one call
    q_lens, kv_lens = calls[0]
    assert len(q_lens) == 2 * plan.num_windows and sum(q_lens) == 2 * layout.num_image
    real_text = [layout.text_len] * 2 if kpm is None else kpm[:, layout.text_slice].sum(1).tolist()
    window_keys = sum(math.prod(g.count * g.k_size for g in combo) for combo in plan.shapes)
    assert sum(kv_lens) == 2 * window_keys + plan.num_windows * sum(real_text)


@pytest.mark.skipif(not xformers_adapter.available(), reason="xformers with CUDA not available")
def test_real_xformers_equals_reference():
    rng = random.Random(0)
    for pattern, expected_mask, layout in [
        (neighborhood_pattern((5, 7, 9), (2, 3, 4), (2, 3, 4)), gna_mask((5, 7, 9), (2, 3, 4), (2, 3, 4)),
         TokenLayout((5, 7, 9), 6, "first")),
        (shifted_window_pattern((9, 11), 1), msw_mask((9, 11), 1, official_row_rule=False), TokenLayout((9, 11), 5, "last")),
    ]:
        q, k, v = (t.cuda() for t in qkv(layout, dim=32))
        kpm = padding(layout, 2, rng).cuda()
        ref = oracle_attention(q, k, v, expected_mask, layout, kpm)
        out = xformers_adapter.xformers_attention(q, k, v, window_partition(pattern), layout, key_padding_mask=kpm)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
