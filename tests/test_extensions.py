"""Attention beyond a mask: the four extension points, each against a direct computation with SDPA and
explicit masks (built here by hand, not by the package's pattern code)."""

import pytest
import torch
import torch.nn.functional as F

from diffusion_attn.context import RunContext
from diffusion_attn.extensions import (KVSegment, PairMerge, attention_with_lse, head_blend, merge_by_lse,
                                       run_branches, with_kv_segments)
from diffusion_attn.layout import TokenLayout
from diffusion_attn.processors import GNAProcessor

torch.manual_seed(0)


def sdpa(q, k, v, mask=None):
    """(B, S, H, D) SDPA; ``mask`` broadcastable to (B, H, Sq, Sk)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def rand(b, s, h=2, d=8):
    return torch.randn(b, s, h, d, dtype=torch.float64)


def window_mask_1d(n, radius):
    """NATTEN's 1-D neighborhood of 2 * radius + 1 keys, shifted inward at the borders, by explicit loops."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        start = min(max(i - radius, 0), n - (2 * radius + 1))
        for j in range(start, start + 2 * radius + 1):
            m[i, j] = True
    return m


def test_merge_by_lse_is_one_softmax_over_disjoint_key_sets():
    q, k, v = rand(2, 10), rand(2, 14), rand(2, 14)
    mask = torch.rand(2, 2, 10, 14) < 0.5
    mask[0, 0, 3] = False  # a query that sees nothing in either part
    a, b = slice(0, 6), slice(6, 14)
    parts = [attention_with_lse(q, k[:, s], v[:, s], mask[..., s]) for s in (a, b)]
    merged = merge_by_lse(parts)
    expected = sdpa(q, k, v, mask).nan_to_num(0.0)  # SDPA gives NaN for the empty row
    assert torch.allclose(merged, expected, atol=1e-6)
    assert torch.equal(merged[0, 3, 0], torch.zeros(8, dtype=torch.float64))


def test_kv_segments_equal_attention_over_concatenated_keys():
    q, k, v = rand(2, 12), rand(2, 12), rand(2, 12)
    pooled_k, pooled_v = rand(2, 3), rand(2, 3)
    ref_k, ref_v = rand(2, 5), rand(2, 5)
    visible = torch.zeros(12, dtype=torch.bool)
    visible[4:] = True  # only the last 8 queries see the pooled segment
    main_mask = window_mask_1d(12, 2)
    main = attention_with_lse(q, k, v, main_mask[None, None])
    out = with_kv_segments(main, q, [KVSegment("pooled", pooled_k, pooled_v, visible), KVSegment("ref", ref_k, ref_v)])
    full_k, full_v = torch.cat([k, pooled_k, ref_k], 1), torch.cat([v, pooled_v, ref_v], 1)
    mask = torch.cat([main_mask, visible[:, None].expand(12, 3), torch.ones(12, 5, dtype=torch.bool)], 1)
    assert torch.allclose(out, sdpa(q, full_k, full_v, mask[None, None]), atol=1e-6)


def test_kv_segment_shape_errors_are_clear():
    q = rand(2, 4)
    with pytest.raises(ValueError, match="KV segment 'x'"):
        with_kv_segments(attention_with_lse(q, q, q), q, [KVSegment("x", rand(1, 3), rand(1, 3))])


def test_head_blend_per_head():
    out, other = rand(1, 5, h=3), rand(1, 5, h=3)
    got = head_blend(out, other, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(got[:, :, 0], out[:, :, 0].float().to(out.dtype))
    assert torch.allclose(got[:, :, 1], other[:, :, 1])
    assert torch.allclose(got[:, :, 2], 0.75 * out[:, :, 2] + 0.25 * other[:, :, 2], atol=1e-6)
    with pytest.raises(ValueError, match="2 weights for 3 heads"):
        head_blend(out, other, [0.5, 0.5])


def test_run_branches_splits_and_joins_in_order():
    q = rand(5, 4)
    out = run_branches(q, q, q, [("window", 2), ("full", 3)], lambda name, a, b, c: a * (1 if name == "window" else -1))
    assert torch.equal(out[:2], q[:2]) and torch.equal(out[2:], -q[2:])
    with pytest.raises(ValueError, match="do not split a batch of 5"):
        run_branches(q, q, q, [("a", 2), ("b", 2)], lambda *a: a[1])


# ---------------------------------------------------------------------------------------------------
# the hooks on a processor: small examples, not methods
# ---------------------------------------------------------------------------------------------------
LAYOUT = TokenLayout((10,), text_len=3, text_position="first")


def seq_mask(radius):
    """The sequence mask of 1-D GNA with a window of 2*radius+1 on LAYOUT (text first, dense)."""
    s = LAYOUT.num_tokens
    m = torch.ones(s, s, dtype=torch.bool)
    m[3:, 3:] = window_mask_1d(10, radius)
    return m


def bound(proc):
    ctx = RunContext("wan")
    ctx.grid, ctx.step = LAYOUT.grid, 0
    return proc.bind(ctx, None, 0)


class ExtraKVProcessor(GNAProcessor):
    def __init__(self, segment, **kw):
        super().__init__(window=5, backend="reference", **kw)
        self.segment = segment

    def extra_kv(self, q, k, v, layout):
        return [self.segment]


class SoftIdentityProcessor(GNAProcessor):
    """SoftPAG-like: heads blended toward identity attention."""

    def __init__(self, weights, **kw):
        super().__init__(window=5, backend="reference", **kw)
        self.weights = weights

    def blend(self, out, q, k, v, layout):
        return head_blend(out, v, self.weights)


class MergedProcessor(GNAProcessor):
    def reduce(self, q, k, v, layout):
        merge = PairMerge()
        q, k, v, small = merge.reduce(q, k, v, layout)
        return q, k, v, small, merge.restore


class TwoBranchProcessor(GNAProcessor):
    """FreeSwim-like: the first half of the batch windowed, the second half dense."""

    def branches(self, batch_size):
        return [("window", batch_size // 2), ("full", batch_size - batch_size // 2)]

    def branch_core(self, name):
        if name == "full":
            return lambda q, k, v, layout, mask: self.dense(q, k, v, mask)
        return super().branch_core(name)


def test_processor_with_extra_kv():
    q, k, v = rand(2, 13), rand(2, 13), rand(2, 13)
    ek, ev = rand(2, 4), rand(2, 4)
    proc = bound(ExtraKVProcessor(KVSegment("ref", ek, ev)))
    out = proc.core(q, k, v, LAYOUT)
    mask = torch.cat([seq_mask(2), torch.ones(13, 4, dtype=torch.bool)], 1)
    assert torch.allclose(out, sdpa(q, torch.cat([k, ek], 1), torch.cat([v, ev], 1), mask[None, None]), atol=1e-6)


def test_processor_with_head_blend_toward_identity():
    q, k, v = rand(1, 13, h=3), rand(1, 13, h=3), rand(1, 13, h=3)
    out = bound(SoftIdentityProcessor(torch.tensor([0.0, 1.0, 0.5]))).core(q, k, v, LAYOUT)
    windowed = sdpa(q, k, v, seq_mask(2)[None, None])
    assert torch.allclose(out[:, :, 0], windowed[:, :, 0], atol=1e-6)
    assert torch.allclose(out[:, :, 1], v[:, :, 1], atol=1e-6)
    assert torch.allclose(out[:, :, 2], 0.5 * windowed[:, :, 2] + 0.5 * v[:, :, 2], atol=1e-6)


def test_processor_with_token_reduction():
    q, k, v = rand(1, 13), rand(1, 13), rand(1, 13)
    proc = bound(MergedProcessor(window=3, backend="reference"))
    small = TokenLayout((5,), 3, "first")
    out = proc.core(q, k, v, LAYOUT)

    def merge(t):  # pairs of grid tokens averaged, by hand
        grid = t[:, 3:]
        return torch.cat([t[:, :3], torch.stack([(grid[:, 2 * i] + grid[:, 2 * i + 1]) / 2 for i in range(5)], 1)], 1)

    m = torch.ones(8, 8, dtype=torch.bool)
    m[3:, 3:] = window_mask_1d(5, 1)
    reduced = sdpa(merge(q), merge(k), merge(v), m[None, None])
    expected = torch.cat([reduced[:, :3], reduced[:, 3:].repeat_interleave(2, dim=1)], 1)
    assert small.num_tokens == 8 and torch.allclose(out, expected, atol=1e-6)


def test_processor_with_batch_branches_and_per_sample_masks():
    q, k, v = rand(4, 13), rand(4, 13), rand(4, 13)
    keep = torch.ones(4, 13, dtype=torch.bool)
    keep[1, :2] = False  # sample 1 (window branch) and sample 3 (full branch) pad some text
    keep[3, 2] = False
    out = bound(TwoBranchProcessor(window=5, backend="reference")).core(q, k, v, LAYOUT, keep)
    windowed = sdpa(q[:2], k[:2], v[:2], seq_mask(2)[None, None] & keep[:2, None, None, :])
    full = sdpa(q[2:], k[2:], v[2:], keep[2:, None, None, :])
    assert torch.allclose(out, torch.cat([windowed, full]), atol=1e-6)


def test_no_hooks_is_exactly_the_pattern_core():
    q, k, v = rand(2, 13), rand(2, 13), rand(2, 13)
    proc = bound(GNAProcessor(window=5, backend="reference"))
    assert torch.equal(proc.core(q, k, v, LAYOUT), proc.pattern_core(q, k, v, LAYOUT))
    assert torch.allclose(proc.core(q, k, v, LAYOUT), sdpa(q, k, v, seq_mask(2)[None, None]), atol=1e-6)
