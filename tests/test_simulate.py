"""The tile-level simulator: exact (query tile, key tile) counts against brute force on the dense mask,
the known closed forms, real layouts without S x S tensors, and the ``simulate`` command."""

import json
import math
import random

import pytest
import torch

from diffusion_attn import TokenLayout
from diffusion_attn.cli import main
from diffusion_attn.kernels import build_schedule, choose_tiles, full_mask
from diffusion_attn.kernels.flex import block_occupancy
from diffusion_attn.kernels.simulate import parse_tile, predicted_speedup, simulate
from diffusion_attn.patterns import BoxPattern, neighborhood_pattern, radial_pattern, shifted_window_pattern

# ------------------------------------------------------------------------------------------------------
# brute force: pool the dense (S, S) mask into tiles
# ------------------------------------------------------------------------------------------------------


def _tile_of(layout, order, tile, perms=None):
    """Tile index of every sequence token, written independently of the module under test."""
    S = layout.num_tokens
    if order == "sequence":
        return torch.arange(S) // tile
    grid = layout.grid
    ntiles = [-(-L // t) for L, t in zip(grid, tile)]
    flat = torch.arange(layout.num_image)
    gid = torch.zeros_like(flat)
    rest = flat
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    for a, (L, t, n, st) in enumerate(zip(grid, tile, ntiles, strides)):
        coord = (rest // st) % L
        if perms is not None:  # position of this coordinate in the relabelled axis
            coord = torch.argsort(perms[a])[coord]
        gid = gid * n + coord // t
    out = torch.empty(S, dtype=torch.long)
    out[layout.image_slice] = gid
    out[layout.text_slice] = math.prod(ntiles) + torch.arange(layout.text_len) // math.prod(tile)
    return out


def brute_force(pattern, layout, q_tile, kv_tile, permute=True):
    order = "sequence" if isinstance(q_tile, int) else "tiled"
    m = full_mask(pattern.dense_mask(), layout).long()
    perms = [a.perm for a in pattern.axes] if order == "tiled" and permute and isinstance(pattern, BoxPattern) else None
    qo, ko = _tile_of(layout, order, q_tile, perms), _tile_of(layout, order, kv_tile, perms)
    nq, nk = int(qo.max()) + 1, int(ko.max()) + 1
    counts = torch.zeros(nq, layout.num_tokens, dtype=torch.long).index_add_(0, qo, m)
    counts = torch.zeros(nq, nk, dtype=torch.long).index_add_(1, ko, counts)
    area = torch.bincount(qo, minlength=nq)[:, None] * torch.bincount(ko, minlength=nk)[None, :]
    hit = counts > 0
    return dict(q_tiles=nq, kv_tiles=nk, visited_tiles=int(hit.sum()), full_tiles=int((counts == area).sum()),
                allowed_pairs=int(m.sum()), visited_pairs=int((area * hit).sum()))


def _fields(r):
    return dict(q_tiles=r.q_tiles, kv_tiles=r.kv_tiles, visited_tiles=r.visited_tiles, full_tiles=r.full_tiles,
                allowed_pairs=r.allowed_pairs, visited_pairs=r.visited_pairs)


def _random_case(rng):
    kind = rng.choice(["sliding", "strided", "blocked", "radial", "shifted"])
    d = rng.randint(1, 3) if kind not in ("radial", "shifted") else (2 if kind == "shifted" else rng.randint(2, 3))
    grid = tuple(rng.randint(2, 9) for _ in range(d))
    if kind == "radial":
        pattern = radial_pattern(grid, rng.choice([0.2, 1.0]), rng.random() < 0.5, block=rng.choice([4, 8, 16]))
    elif kind == "shifted":
        pattern = shifted_window_pattern(grid, rng.randint(0, 3))
    else:
        dil = tuple(rng.randint(1, max(1, L // 2)) if rng.random() < 0.4 else 1 for L in grid)
        win = tuple(rng.randint(1, L // dd) for L, dd in zip(grid, dil))
        stride = {"sliding": (1,) * d, "blocked": win}.get(kind) or tuple(rng.randint(1, w) for w in win)
        pattern = neighborhood_pattern(grid, win, stride, dil)
    layout = TokenLayout(grid, rng.choice([0, 0, 3, 8]), rng.choice(["first", "last"]))
    return kind, pattern, layout


@pytest.mark.parametrize("seed", range(4))
def test_exact_against_brute_force_random(seed):
    rng = random.Random(seed)
    for _ in range(25):
        kind, pattern, layout = _random_case(rng)
        S = layout.num_tokens
        for q_tile, kv_tile in [
            (rng.randint(1, S), rng.randint(1, min(S, 24))),
            (tuple(rng.randint(1, L) for L in layout.grid), tuple(rng.randint(1, L) for L in layout.grid)),
        ]:
            permute = rng.random() < 0.7
            got = simulate(pattern, layout, q_tile=q_tile, kv_tile=kv_tile, permute=permute)
            assert _fields(got) == brute_force(pattern, layout, q_tile, kv_tile, permute), (kind, layout, q_tile, kv_tile)


@pytest.mark.parametrize("pattern, layout", [
    (neighborhood_pattern((6, 7, 9), (3, 3, 5)), TokenLayout((6, 7, 9), 5, "first")),  # sliding 3-D
    (neighborhood_pattern((6, 8, 10), (4, 5, 6), (2, 3, 4)), TokenLayout((6, 8, 10), 7, "last")),  # strided
    (neighborhood_pattern((12, 10), (4, 5), (4, 5)), TokenLayout((12, 10), 16, "first")),  # blocked
    (neighborhood_pattern((9, 12), (3, 4), (1, 2), (3, 2)), TokenLayout((9, 12))),  # dilation
    (neighborhood_pattern((40,), 7, 3, 2), TokenLayout((40,), 6, "last")),  # 1-D
    (radial_pattern((5, 6, 8), 0.5, True, block=16), TokenLayout((5, 6, 8), 9, "first")),
    (shifted_window_pattern((10, 14), 1), TokenLayout((10, 14), 4, "last")),
])
@pytest.mark.parametrize("tiles", ["seq-even", "seq-odd", "tiled"])
def test_exact_against_brute_force_named(pattern, layout, tiles):
    if tiles == "seq-even":
        q, k = 16, 16
    elif tiles == "seq-odd":
        q, k = 13, 7
    else:
        q = tuple(max(1, L // 3) for L in layout.grid)
        k = tuple(min(L, 2) for L in layout.grid)
    for permute in (True, False):
        assert _fields(simulate(pattern, layout, q_tile=q, kv_tile=k, permute=permute)) == brute_force(pattern, layout, q, k, permute)


def test_generic_pattern_by_scanning():
    """Patterns that are neither box nor block are evaluated through allowed_fn, still exactly."""

    class Custom:
        def __init__(self, inner):
            self.inner, self.grid = inner, inner.grid

        def allowed_fn(self, device=None):
            return self.inner.allowed_fn(device)

        def dense_mask(self):
            return self.inner.dense_mask()

    rng = random.Random(11)
    for _ in range(10):
        _, inner, layout = _random_case(rng)
        pattern = Custom(inner)
        for q, k in [(min(5, layout.num_tokens), min(3, layout.num_tokens)), (tuple(min(2, L) for L in layout.grid), tuple(min(3, L) for L in layout.grid))]:
            # tiles of a generic pattern are taken in the original coordinates
            assert _fields(simulate(pattern, layout, q_tile=q, kv_tile=k)) == brute_force(pattern, layout, q, k, permute=False)


# ------------------------------------------------------------------------------------------------------
# closed forms and consistency
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, window", [((4, 12, 16), (2, 4, 8)), ((16, 24), (8, 6)), ((64,), (16,))])
def test_blocked_windows_with_window_tiles_visit_only_their_window(grid, window):
    pattern = neighborhood_pattern(grid, window, window)
    layout = TokenLayout(grid)
    r = simulate(pattern, layout, q_tile=window, kv_tile=window)
    tiles = math.prod(L // w for L, w in zip(grid, window))
    assert (r.q_tiles, r.kv_tiles, r.visited_tiles, r.full_tiles, r.partial_tiles) == (tiles, tiles, tiles, tiles, 0)
    assert r.speedup == pytest.approx(1 / r.density) == pytest.approx(r.ideal_speedup) == tiles
    assert r.wasted == 0 and r.efficiency == 1 and r.fraction_of_ideal == pytest.approx(1.0)
    # the same tiles as 1-D sequence tiles only line up with the windows on a 1-D grid
    seq = simulate(pattern, layout, q_tile=math.prod(window), kv_tile=math.prod(window))
    assert (seq.speedup == pytest.approx(tiles)) == (len(grid) == 1)


def test_dense_pattern_and_result_fields():
    layout = TokenLayout((8, 8), 16, "first")
    pattern = neighborhood_pattern((8, 8), 8)  # window = grid: everything allowed
    r = simulate(pattern, layout, q_tile=32, kv_tile=16)
    assert r.density == 1 and r.speedup == 1 and r.visited_tiles == r.full_tiles == r.total_tiles == 3 * 5
    d = r.to_dict()
    assert d["q_tile"] == 32 and d["order"] == "sequence" and d["layout"]["num_tokens"] == 80
    assert d["partial_tiles"] == 0 and d["wasted"] == 0
    assert json.loads(json.dumps(simulate(pattern, layout, q_tile=(4, 8), kv_tile=(2, 2)).to_dict()))["kv_tile"] == [2, 2]
    assert "speedup" in str(r)


def test_matches_flex_block_occupancy():
    """The 128 x 128 sequence tiles are FlexAttention's: same visited / full blocks as its BlockMask."""
    layout = TokenLayout((5, 16, 24), 64, "first")
    for pattern in (neighborhood_pattern(layout.grid, (3, 7, 9), (1, 2, 3)), radial_pattern(layout.grid, 0.3, True)):
        any_, all_ = block_occupancy(pattern, layout)
        r = simulate(pattern, layout, q_tile=128, kv_tile=128)
        assert r.visited_tiles == int(any_.sum()) and r.full_tiles == int((any_ & all_).sum())
        assert predicted_speedup(pattern, layout, "flex") == r


def test_gather_prediction_bounds_the_schedule():
    layout = TokenLayout((6, 20, 30), 32, "last")
    pattern = neighborhood_pattern(layout.grid, (3, 9, 11), (1, 3, 4))
    r = predicted_speedup(pattern, layout, "gather")
    assert r.order == "tiled" and r.q_tile == choose_tiles(pattern) and r.kv_tile == (1, 1, 1)
    N, T, S = layout.num_image, layout.text_len, layout.num_tokens
    gather_work = build_schedule(pattern).visited_pairs + N * T + T * S  # what the kernel computes
    assert r.allowed_pairs <= r.visited_pairs <= gather_work
    block = radial_pattern(layout.grid, 0.5, False)
    assert predicted_speedup(block, layout, "gather").q_tile == block.block_size
    with pytest.raises(ValueError, match="no tile model"):
        predicted_speedup(pattern, layout, "reference")


def test_real_layouts_are_fast_and_exact_in_totals():
    """Wan 480p 81 frames (32,760 tokens): no S x S tensor; totals agree with the patterns' own counts."""
    layout = TokenLayout((21, 30, 52))
    radial = radial_pattern(layout.grid, 0.2, True)
    gna = neighborhood_pattern(layout.grid, (11, 15, 26), (1, 5, 13))
    for pattern, tiles in ((radial, [(128, 128), ((1, 8, 16), (1, 8, 16))]), (gna, [(128, 128), ((3, 5, 13), (3, 5, 13))])):
        for q, k in tiles:
            r = simulate(pattern, layout, q_tile=q, kv_tile=k)
            assert r.allowed_pairs == pattern.allowed_pairs() and r.density == pytest.approx(pattern.density)
            assert r.full_tiles <= r.visited_tiles <= r.total_tiles and 1 <= r.speedup
            assert r.allowed_pairs <= r.visited_pairs <= r.visited_tiles * r.q_tile_tokens * r.kv_tile_tokens
    # radial's mask is made of 128-token blocks: sequence tiles of 128 are all full and reach the ideal
    r = simulate(radial, layout, q_tile=128, kv_tile=128)
    # (32,760 is not a multiple of 128: the partial last tile makes the tile ratio differ slightly)
    assert r.partial_tiles == 0 and r.wasted == 0 and r.speedup == pytest.approx(r.ideal_speedup, rel=1e-3)
    # strided GNA with tiles aligned to the stride beats 1-D tiles
    assert simulate(gna, layout, q_tile=(1, 5, 13), kv_tile=(1, 5, 13)).speedup > simulate(gna, layout, q_tile=128, kv_tile=128).speedup
    # HunyuanVideo 720p (115,456 tokens), the GNA paper's config, tiled: separable, instant
    hv = TokenLayout((30, 48, 80), 256, "last")
    r = simulate(neighborhood_pattern(hv.grid, (18, 24, 24), (16, 8, 8)), hv, q_tile=(16, 8, 8), kv_tile=(2, 8, 8))
    assert r.partial_tiles == 0 and r.speedup > 9


# ------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------


def test_errors():
    layout = TokenLayout((4, 6, 8), 8)
    pattern = neighborhood_pattern(layout.grid, 3)
    with pytest.raises(ValueError, match="does not fit the grid 4x6x8: 9 > 8 tokens on axis 2"):
        simulate(pattern, layout, q_tile=(1, 2, 9), kv_tile=(1, 2, 2))
    with pytest.raises(ValueError, match="has 2 axes"):
        simulate(pattern, layout, q_tile=(2, 2), kv_tile=(2, 2))
    with pytest.raises(ValueError, match="larger than the sequence"):
        simulate(pattern, layout, q_tile=1000, kv_tile=8)
    with pytest.raises(ValueError, match="must both be ints"):
        simulate(pattern, layout, q_tile=8, kv_tile=(1, 2, 2))
    with pytest.raises(ValueError, match="order='tiled' needs"):
        simulate(pattern, layout, q_tile=8, kv_tile=8, order="tiled")
    with pytest.raises(ValueError, match="must be >= 1"):
        simulate(pattern, layout, q_tile=0, kv_tile=8)
    with pytest.raises(ValueError, match="does not match the layout"):
        simulate(pattern, TokenLayout((4, 6, 9)), q_tile=8, kv_tile=8)
    assert parse_tile("128") == 128 and parse_tile(" 1x8x16 ") == (1, 8, 16) and parse_tile("8") == 8
    for bad in ("abc", "0", "1x0", "1x2x3x4", "", "64x"):
        with pytest.raises(ValueError, match="tile must be"):
            parse_tile(bad)


# ------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------


def test_cli_table(capsys):
    assert main(["simulate", "--method", "gna", "--window", "3,5,7", "--stride", "1,2,3", "--grid", "4x12x16",
                 "--text", "16", "--text-position", "first", "--q-tile", "64,32", "--q-tile", "2x4x8"]) == 0
    out = capsys.readouterr().out
    layout = TokenLayout((4, 12, 16), 16, "first")
    pattern = neighborhood_pattern(layout.grid, (3, 5, 7), (1, 2, 3))
    lines = out.splitlines()
    assert lines[0].startswith("gna on 4x12x16 + 16 text (first) (784 tokens)") and "window=(3, 5, 7)" in lines[0]
    assert "ideal speedup" in lines[1] and lines[2].split()[:3] == ["order", "q", "tile"]
    for q in (64, 32, (2, 4, 8)):
        r = simulate(pattern, layout, q_tile=q, kv_tile=q)
        text = str(q) if isinstance(q, int) else "2x4x8"
        row = next(line for line in lines if line.split()[1:3] == [text, text])
        assert f"{r.visited_tiles:,} (" in row and f"{r.speedup:.2f}x" in row


def test_cli_json_and_tile_pairing(capsys):
    argv = ["simulate", "--method", "radial", "--grid", "3x8x16", "--q-tile", "64,1x4x8", "--kv-tile", "32", "--kv-tile", "1x2x8,64", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "radial" and data["family"] == "wan" and data["params"] == {"decay_factor": 0.2, "sink": True}
    pairs = [(r["q_tile"], r["kv_tile"]) for r in data["results"]]
    assert pairs == [(64, 32), (64, 64), ([1, 4, 8], [1, 2, 8])]
    layout = TokenLayout((3, 8, 16))
    expected = simulate(radial_pattern(layout.grid, 0.2, True), layout, q_tile=(1, 4, 8), kv_tile=(1, 2, 8))
    assert data["results"][2] == json.loads(json.dumps(expected.to_dict()))
    assert data["density"] == pytest.approx(expected.density)


@pytest.mark.parametrize("argv, message", [
    (["--method", "gna", "--window", "3", "--grid", "4x6x8", "--q-tile", "1x8x8"], "does not fit the grid 4x6x8"),
    (["--method", "gna", "--window", "3", "--grid", "4x6x8", "--q-tile", "12a"], "--q-tile takes tile sizes"),
    (["--method", "gna", "--window", "3", "--grid", "4x6x8", "--q-tile", "64", "--kv-tile", "1x2x2"], "give both in the same form"),
    (["--method", "gna", "--window", "9", "--grid", "4x6x8"], "GNA does not fit"),
    (["--method", "radial", "--grid", "4x6x8", "--window", "3"], "does not take --window"),
])
def test_cli_errors(capsys, argv, message):
    assert main(["simulate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusion-attn: error:") and message in err and err.count("\n") == 1
