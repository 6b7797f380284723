"""Patterns against independent oracles, and schedules against their pattern's dense mask."""

import itertools
import math
import random

import pytest
import torch

from diffusion_attn.patterns import neighborhood_pattern, radial_block_mask, radial_pattern, shifted_window_pattern
from diffusion_attn.kernels.schedule import Schedule, block_schedule, box_schedule


# ---------------------------------------------------------------------------------------------------
# GNA: NATTEN's formula, written per (query, key) coordinate pair
# ---------------------------------------------------------------------------------------------------
def natten_allowed(q: int, kv: int, L: int, k: int, s: int, d: int) -> bool:
    if q % d != kv % d:
        return False
    g = q % d
    Lg = len(range(g, L, d))
    qq, kk = q // d, kv // d
    left, right = k // 2, k // 2 + k % 2 - 1
    leader = min((qq // s) * s + s // 2, Lg - 1)
    centre = min(max(leader, left), Lg - 1 - right)
    return centre - left <= kk <= centre + right


def natten_mask(grid, window, stride, dilation):
    coords = list(itertools.product(*[range(g) for g in grid]))
    n = len(coords)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            m[i, j] = all(natten_allowed(a, b, L, k, s, d) for a, b, L, k, s, d in zip(qc, kc, grid, window, stride, dilation))
    return m


def random_gna_config(rng, ndim):
    grid, window, stride, dilation = [], [], [], []
    for _ in range(ndim):
        L = rng.randint(1, 9)
        d = rng.choice([1, 1, 2, 3]) if L >= 2 else 1
        d = max(1, min(d, L))
        k = rng.randint(1, L // d)
        s = rng.randint(1, k)
        grid.append(L), window.append(k), stride.append(s), dilation.append(d)
    return tuple(grid), tuple(window), tuple(stride), tuple(dilation)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_gna_matches_natten_formula(ndim):
    rng = random.Random(ndim)
    for _ in range(12 if ndim < 3 else 6):
        cfg = random_gna_config(rng, ndim)
        ours = neighborhood_pattern(*cfg).dense_mask()
        assert torch.equal(ours, natten_mask(*cfg)), cfg


def test_gna_every_query_sees_window_keys():
    p = neighborhood_pattern((7, 10), (4, 5), (2, 3), (1, 2))
    assert (p.dense_mask().sum(1) == 4 * 5).all()


@pytest.mark.parametrize(
    "grid,window,stride,dilation",
    [((5,), (5,), (1,), (2,)), ((4, 4), (5, 1), (1, 1), (1, 1)), ((4, 4), (2, 2), (3, 1), (1, 1))],
)
def test_gna_rejects_what_natten_rejects(grid, window, stride, dilation):
    with pytest.raises(ValueError, match="axis"):
        neighborhood_pattern(grid, window, stride, dilation)


@pytest.mark.parametrize("window", [(2.5, 3), (True, 3), ("2", 3), 2.0, [2, None]])
def test_gna_per_axis_entries_must_be_ints(window):
    # B10: entries went through int(): (2.5, 3) became (2, 3) and (True, 3) became (1, 3)
    with pytest.raises(ValueError, match=r"window must be an int or a sequence of 2 ints"):
        neighborhood_pattern((6, 6), window)


def test_gna_paper_configs_density():
    # Flux 4K (256 x 256 tokens) window 80x80: (80/256)^2 ~ 9.8 % dense; HunyuanVideo 720p ~ 9 %
    flux = neighborhood_pattern((256, 256), (80, 80), (16, 16))
    assert flux.density == pytest.approx((80 / 256) ** 2)
    hy = neighborhood_pattern((30, 48, 80), (18, 24, 24), (16, 8, 8))
    assert hy.density == pytest.approx(18 / 30 * 24 / 48 * 24 / 80)


# ---------------------------------------------------------------------------------------------------
# Schedules cover each query once and reproduce the pattern's mask exactly
# ---------------------------------------------------------------------------------------------------
def schedule_mask(schedule: Schedule, n: int) -> torch.Tensor:
    m = torch.zeros(n, n, dtype=torch.bool)
    seen = torch.zeros(n, dtype=torch.long)
    for b in schedule.buckets:
        tile_mask = b.mask(0, b.num_tiles)
        for g in range(b.num_tiles):
            q, k = b.qidx[g], b.kidx[g]
            seen[q] += 1
            allowed = torch.ones(q.numel(), k.numel(), dtype=torch.bool) if tile_mask is None else tile_mask[g]
            sub = m[q][:, k] | allowed
            m[q[:, None], k[None, :]] = sub
    assert (seen == 1).all(), "every query must be in exactly one tile"
    return m


@pytest.mark.parametrize("seed", range(6))
def test_box_schedules_reproduce_mask(seed):
    rng = random.Random(100 + seed)
    cfg = random_gna_config(rng, rng.choice([1, 2, 3]))
    p = neighborhood_pattern(*cfg)
    for tile in [tuple(rng.randint(1, g) for g in cfg[0]) for _ in range(3)]:
        s = box_schedule(p, tile)
        assert torch.equal(schedule_mask(s, p.num_tokens), p.dense_mask()), (cfg, tile)
        assert s.allowed_pairs == int(p.dense_mask().sum())


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_block_schedules_reproduce_mask(rows):
    p = radial_pattern((7, 6, 50), decay_factor=0.5, sink=True)  # 2100 tokens, partial last block
    s = block_schedule(p, rows)
    assert torch.equal(schedule_mask(s, p.num_tokens), p.dense_mask())


# ---------------------------------------------------------------------------------------------------
# Radial: the official algorithm, written naively (token-level masks per frame pair, then shrink)
# ---------------------------------------------------------------------------------------------------
def official_radial(frames, tpf, decay_factor, wan, block=128):
    n = frames * tpf
    assert n % block == 0
    nb = n // block
    out = torch.zeros(nb, nb, dtype=torch.bool)
    r = torch.arange(tpf)[:, None]
    c = torch.arange(tpf)[None, :]
    for i in range(frames):
        for j in range(frames):
            dist = abs(i - j)
            if j == 0 and wan:
                local = torch.ones(tpf, tpf, dtype=torch.bool)
            else:
                if dist <= 1:
                    width = tpf
                else:
                    width = max(2 ** tpf.bit_length() / 2 ** dist.bit_length() * decay_factor, block)
                local = (c - r).abs() <= width
                decay = 2 ** tpf.bit_length() / 2 ** dist.bit_length()
                if decay < block and dist % int(block / decay) != 0:
                    local = torch.zeros_like(local)
            rr, rc = (i * tpf) % block, (j * tpf) % block
            nbp = (tpf - 1) // block + 1
            padded = torch.zeros(rr + nbp * block, rc + nbp * block, dtype=torch.bool)
            padded[rr : rr + tpf, rc : rc + tpf] = local
            padded = padded[: nbp * block, : nbp * block].reshape(nbp, block, nbp, block)
            dens = padded.sum(1).float() / block
            frac = (dens > 1 / 3).sum(-1) / ((dens > 0).sum(-1) + 1e-9)
            blk = frac > 0.6
            r0, c0 = (i * tpf) // block, (j * tpf) // block
            r1, c1 = min(r0 + nbp, nb), min(c0 + nbp, nb)
            out[r0:r1, c0:c1] |= blk[: r1 - r0, : c1 - c0]
    return out


@pytest.mark.parametrize(
    "frames,tpf,decay,wan",
    [(8, 160, 0.2, True), (16, 96, 1.0, False), (6, 320, 0.5, True), (12, 64, 0.95, False), (32, 48, 0.2, True)],
)
def test_radial_matches_official_algorithm(frames, tpf, decay, wan):
    ours = radial_block_mask(frames, tpf, decay, sink=wan)
    assert torch.equal(ours, official_radial(frames, tpf, decay, wan))


def test_radial_any_token_count_and_density_decays():
    # 30 x 52 per frame (Wan 480p) with 9 frames: 14,040 tokens, not a multiple of 128
    p = radial_pattern((9, 30, 52), decay_factor=0.2, sink=True)
    assert p.block_mask.shape == (math.ceil(14040 / 128),) * 2
    assert p.block_mask.diagonal().all()
    longer = radial_pattern((21, 30, 52), decay_factor=0.2, sink=True)
    assert longer.density < p.density < 1.0


# ---------------------------------------------------------------------------------------------------
# Shifted windows (MSW-MSA): the official roll + 2x2 partition
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(8, 12), (6, 6), (4, 10)])
@pytest.mark.parametrize("choice", [0, 1, 2, 3])
def test_shifted_windows_match_roll_partition(grid, choice):
    H, W = grid
    wh, ww = H // 2, W // 2
    sh, sw = choice * (wh // 4), choice * (ww // 4)
    idx = torch.arange(H * W).view(H, W)
    rolled = torch.roll(idx, (-sh, -sw), dims=(0, 1))
    windows = rolled.view(2, wh, 2, ww).permute(0, 2, 1, 3).reshape(4, -1)
    expected = torch.zeros(H * W, H * W, dtype=torch.bool)
    for w in windows:
        expected[w[:, None], w[None, :]] = True
    assert torch.equal(shifted_window_pattern(grid, choice).dense_mask(), expected)


def test_shifted_windows_odd_sizes_clamp_inward():
    p = shifted_window_pattern((5, 7), 1)
    assert (p.dense_mask().sum(1) == 3 * 4).all()
