"""Tile-level simulator: which (query tile, key tile) pairs a block-sparse kernel must visit.

A block-sparse attention kernel (FlexAttention, a Triton kernel, NATTEN's FNA) splits the sequence into
query tiles and key tiles and computes every (query tile, key tile) pair that holds at least one allowed
(query, key) pair; a *partial* tile pair (some pairs masked) costs as much as a *full* one. So the best
speedup such a kernel can reach over dense attention with the same tiles is

    speedup = total tile pairs / visited tile pairs,

below the FLOP ideal ``1 / density`` as soon as tiles straddle the pattern's edges. This module counts
those pairs exactly (this is the "NATTENSim" analysis of the GNA paper, arXiv 2504.16922, written anew:
NATTEN has not released its simulator) for every pattern of the pack on a whole
:class:`~diffusion_attn.TokenLayout` (grid + text tokens; text rows and columns are dense), without ever
building an S x S tensor.

Two tile orders:

* ``"sequence"`` (``q_tile`` / ``kv_tile`` are ints): 1-D tiles of consecutive tokens of the sequence as
  the model lays it out (row-major grid, text first or last), which is what FlexAttention and a plain
  Triton kernel see. A 1-D tile over a 2-D/3-D grid is *not* a sub-box of the grid.
* ``"tiled"`` (per-axis tuples, e.g. ``(1, 8, 16)`` = 128 tokens): the GNA paper's multi-dimensional
  tiling. Tokens are permuted so that each tile is a sub-box of the grid (tiles at the far border of an
  axis that does not divide are smaller, as with NATTEN's padding); text tokens form their own 1-D tiles
  of ``prod(tile)`` tokens. For a :class:`~diffusion_attn.patterns.BoxPattern` the sub-boxes are taken in
  the pattern's relabelled axis coordinates (``permute=True``, the default): each dilation group is
  contiguous (as NATTEN's token permutation does) and a cyclic shift is undone (HiDiffusion rolls the
  feature map). ``permute=False`` tiles the original coordinates.

Complexity (``d`` = grid rank, ``nq`` / ``nk`` = query / key tiles):

* BoxPattern, tiled order: separable. The allowed set is a product of per-axis sets and a tile pair is a
  product of per-axis interval pairs, so per axis the interval-pair occupancy is pooled from an
  ``L x L`` mask and visited / full / pair counts are products of per-axis sums: ``O(sum L^2)``,
  independent of the number of tiles.
* BoxPattern, sequence order: a 1-D tile ``[a, b)`` of the row-major grid is split into at most
  ``2d - 1`` sub-boxes (partial row, full rows, full planes, ...); the allowed pairs of a box pair are
  the product of per-axis counts, each read in O(1) from a 2-D prefix sum of the per-axis mask. Exact
  allowed count per tile pair in ``O(nq * nk * (2d - 1)^2 * d)``, chunked over query tiles.
* BlockPattern (any order): every tile's overlap with the pattern's blocks (text = one extra, always
  allowed block) gives the allowed count per tile pair as ``O_q @ M @ O_k^T``: ``O(nq * nb * (nb + nk))``.
* Any other pattern with ``allowed_fn`` and ``grid``: chunked elementwise evaluation, ``O(S^2)`` time,
  ``O(S * nk)`` memory per chunk. Exact, but slow for long sequences.

Enumerating tile pairs (all but the separable case) is refused above :data:`MAX_TILE_PAIRS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..patterns.base import BlockPattern, BoxPattern

__all__ = ["SimulationResult", "simulate", "predicted_speedup", "plan_speedup", "parse_tile", "MAX_TILE_PAIRS"]

#: tile-pair enumeration limit (the separable box / tiled case has none)
MAX_TILE_PAIRS = 1 << 27
#: elements per intermediate tensor in the chunked loops
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class SimulationResult:
    """What a block-sparse kernel with these tiles must compute for one pattern on one layout.

    Counts are over the whole sequence (text included). ``visited_pairs`` counts the (query, key) token
    pairs inside visited tile pairs, masked ones included (padding of partial border tiles excluded).
    """

    layout: TokenLayout
    order: str  # "sequence" | "tiled"
    q_tile: int | tuple[int, ...]
    kv_tile: int | tuple[int, ...]
    q_tiles: int  # number of query tiles
    kv_tiles: int  # number of key tiles
    visited_tiles: int  # tile pairs holding at least one allowed pair
    full_tiles: int  # visited tile pairs whose pairs are all allowed (no mask needed)
    allowed_pairs: int  # allowed (query, key) pairs
    visited_pairs: int  # token pairs computed in visited tile pairs

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def q_tile_tokens(self) -> int:
        """Tokens per (whole) query tile."""
        return self.q_tile if isinstance(self.q_tile, int) else math.prod(self.q_tile)

    @property
    def kv_tile_tokens(self) -> int:
        return self.kv_tile if isinstance(self.kv_tile, int) else math.prod(self.kv_tile)

    @property
    def total_pairs(self) -> int:
        return self.num_tokens**2

    @property
    def total_tiles(self) -> int:
        return self.q_tiles * self.kv_tiles

    @property
    def partial_tiles(self) -> int:
        return self.visited_tiles - self.full_tiles

    @property
    def density(self) -> float:
        """Allowed pairs / S^2."""
        return self.allowed_pairs / self.total_pairs

    @property
    def tile_density(self) -> float:
        """Visited tile pairs / all tile pairs."""
        return self.visited_tiles / self.total_tiles

    @property
    def speedup(self) -> float:
        """Predicted upper-bound speedup over dense with the same tiles: total / visited tile pairs."""
        return self.total_tiles / self.visited_tiles

    @property
    def ideal_speedup(self) -> float:
        """The FLOP ideal, 1 / density (every masked pair skipped)."""
        return self.total_pairs / self.allowed_pairs

    @property
    def efficiency(self) -> float:
        """Efficiency upper bound: density * S^2 / visited pairs = allowed / computed token pairs."""
        return self.allowed_pairs / self.visited_pairs

    @property
    def wasted(self) -> float:
        """Fraction of the computed token pairs that are masked out (1 - efficiency)."""
        return 1.0 - self.efficiency

    @property
    def fraction_of_ideal(self) -> float:
        """speedup / ideal_speedup."""
        return self.speedup / self.ideal_speedup

    def describe_tile(self, which: str = "q") -> str:
        t = self.q_tile if which == "q" else self.kv_tile
        return str(t) if isinstance(t, int) else "x".join(map(str, t))

    def to_dict(self) -> dict:
        return {
            "layout": {"grid": list(self.layout.grid), "text_len": self.layout.text_len,
                       "text_position": self.layout.text_position, "num_tokens": self.num_tokens},
            "order": self.order,
            "q_tile": self.q_tile if isinstance(self.q_tile, int) else list(self.q_tile),
            "kv_tile": self.kv_tile if isinstance(self.kv_tile, int) else list(self.kv_tile),
            "q_tiles": self.q_tiles,
            "kv_tiles": self.kv_tiles,
            "total_tiles": self.total_tiles,
            "visited_tiles": self.visited_tiles,
            "full_tiles": self.full_tiles,
            "partial_tiles": self.partial_tiles,
            "allowed_pairs": self.allowed_pairs,
            "visited_pairs": self.visited_pairs,
            "total_pairs": self.total_pairs,
            "density": self.density,
            "tile_density": self.tile_density,
            "speedup": self.speedup,
            "ideal_speedup": self.ideal_speedup,
            "efficiency": self.efficiency,
            "wasted": self.wasted,
            "fraction_of_ideal": self.fraction_of_ideal,
        }

    def __str__(self) -> str:
        return (f"{self.order} tiles q {self.describe_tile('q')} / kv {self.describe_tile('kv')} on "
                f"{self.layout.describe()}: {self.visited_tiles:,} of {self.total_tiles:,} tile pairs visited "
                f"({self.full_tiles:,} full + {self.partial_tiles:,} partial), speedup <= {self.speedup:.2f}x "
                f"(ideal {self.ideal_speedup:.2f}x), wasted {100 * self.wasted:.1f}%")


# ------------------------------------------------------------------------------------------------------
# Tiles
# ------------------------------------------------------------------------------------------------------


def parse_tile(text) -> int | tuple[int, ...]:
    """``"128"`` -> 128 (sequence tile); ``"1x8x16"`` -> (1, 8, 16) (per-axis tile)."""
    s = str(text).strip().lower()
    parts = s.split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values) or len(values) > 3:
        raise ValueError(f"tile must be a positive token count like 128 or per-axis sizes like 1x8x16, got {text!r}")
    return values[0] if len(values) == 1 and "x" not in s else tuple(values)


def _check_tiles(q_tile, kv_tile, order, layout: TokenLayout):
    kinds = []
    out = []
    for name, t in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        if isinstance(t, bool):
            raise ValueError(f"{name} must be an int or a tuple of ints, got {t!r}")
        if isinstance(t, int):
            kinds.append("sequence")
            out.append(int(t))
            continue
        try:
            t = tuple(int(v) for v in t)
        except TypeError:
            raise ValueError(f"{name} must be an int (sequence tile) or a tuple of per-axis sizes, got {t!r}") from None
        kinds.append("tiled")
        out.append(t)
    if kinds[0] != kinds[1]:
        raise ValueError(f"q_tile {q_tile!r} and kv_tile {kv_tile!r} must both be ints (sequence order) "
                         "or both per-axis tuples (tiled order)")
    inferred = kinds[0]
    order = inferred if order is None else order
    if order not in ("sequence", "tiled"):
        raise ValueError(f"order must be 'sequence' or 'tiled', got {order!r}")
    if order != inferred:
        need = "ints" if order == "sequence" else f"tuples of {len(layout.grid)} per-axis sizes"
        raise ValueError(f"order={order!r} needs q_tile and kv_tile as {need}, got {q_tile!r} and {kv_tile!r}")
    grid = layout.grid
    for name, t in zip(("q_tile", "kv_tile"), out):
        label = t if isinstance(t, int) else "x".join(map(str, t))
        if order == "sequence":
            if t < 1:
                raise ValueError(f"{name} must be >= 1, got {t}")
            if t > layout.num_tokens:
                raise ValueError(f"{name} {label} is larger than the sequence "
                                 f"({layout.num_tokens:,} tokens of {layout.describe()})")
        else:
            if len(t) != len(grid):
                raise ValueError(f"{name} {label} has {len(t)} axes; the grid {'x'.join(map(str, grid))} has {len(grid)}")
            for a, (v, L) in enumerate(zip(t, grid)):
                if v < 1:
                    raise ValueError(f"{name} {label}: sizes must be >= 1")
                if v > L:
                    raise ValueError(f"{name} {label} does not fit the grid {'x'.join(map(str, grid))}: "
                                     f"{v} > {L} tokens on axis {a}")
    return order, out[0], out[1]


def _seq_tiles(S: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(0, S, t, dtype=torch.long)
    return starts, torch.clamp(starts + t, max=S)


def _token_tiles(layout: TokenLayout, order: str, tile, perms=None) -> tuple[torch.Tensor, int]:
    """(tile index of every sequence token (S,), number of tiles). Tiled order: grid tiles (row-major over
    the tile grid, in the coordinates relabelled by ``perms`` when given) come first, text tiles after."""
    S = layout.num_tokens
    if order == "sequence":
        return torch.arange(S) // tile, -(-S // tile)
    grid = layout.grid
    ntile = [-(-L // t) for L, t in zip(grid, tile)]
    coords = torch.stack(torch.meshgrid(*[torch.arange(L) for L in grid], indexing="ij"), -1).reshape(-1, len(grid))
    gid = torch.zeros(coords.shape[0], dtype=torch.long)
    for a, (L, t, n) in enumerate(zip(grid, tile, ntile)):
        pos = coords[:, a]
        if perms is not None:
            inv = torch.empty_like(perms[a])
            inv[perms[a]] = torch.arange(L)
            pos = inv[pos]
        gid = gid * n + pos // t
    n_grid = math.prod(ntile)
    P = math.prod(tile)
    out = torch.empty(S, dtype=torch.long)
    out[layout.image_slice] = gid
    out[layout.text_slice] = n_grid + torch.arange(layout.text_len) // P
    return out, n_grid + -(-layout.text_len // P)


# ------------------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------------------


class _Tally:
    """Accumulates the statistics from chunks of per-tile-pair allowed counts."""

    def __init__(self):
        self.visited = self.full = self.allowed = self.work = 0

    def add(self, counts: torch.Tensor, qsize: torch.Tensor, ksize: torch.Tensor) -> None:
        area = qsize[:, None] * ksize[None, :]
        hit = counts > 0
        self.visited += int(hit.sum())
        self.full += int((counts == area).sum())
        self.allowed += int(counts.sum())
        self.work += int((area * hit).sum())


def _check_pairs(nq: int, nk: int) -> None:
    if nq * nk > MAX_TILE_PAIRS:
        raise ValueError(f"{nq:,} x {nk:,} tile pairs is too many to enumerate (limit {MAX_TILE_PAIRS:,}); use larger tiles")


def _prefix(mask: torch.Tensor) -> torch.Tensor:
    """(L+1, L+1) int64 2-D prefix sums: P[i, j] = mask[:i, :j].sum()."""
    P = torch.zeros(mask.shape[0] + 1, mask.shape[1] + 1, dtype=torch.long)
    P[1:, 1:] = mask.long().cumsum(0).cumsum(1)
    return P


def _axis_masks(pattern: BoxPattern, permuted: bool) -> list[torch.Tensor]:
    out = []
    for axis in pattern.axes:
        if permuted:
            pos = torch.arange(axis.length)
            out.append((pos[None, :] >= axis.lo[:, None]) & (pos[None, :] < axis.hi[:, None]))
        else:
            out.append(axis.dense())
    return out


def _separable_box(pattern: BoxPattern, layout: TokenLayout, q_tile, kv_tile, permute: bool):
    """Tiled order on a box pattern: per-axis interval-pair occupancy, combined as products."""
    visited = full = allowed = work = 1
    nq_grid = nk_grid = 1
    for m, tq, tk in zip(_axis_masks(pattern, permute), q_tile, kv_tile):
        L = m.shape[0]
        P = _prefix(m)
        qb = torch.clamp(torch.arange(0, L + tq, tq), max=L).unique_consecutive()
        kb = torch.clamp(torch.arange(0, L + tk, tk), max=L).unique_consecutive()
        q0, q1, k0, k1 = qb[:-1, None], qb[1:, None], kb[None, :-1], kb[None, 1:]
        cnt = P[q1, k1] - P[q0, k1] - P[q1, k0] + P[q0, k0]  # allowed pairs per interval pair
        area = (qb[1:] - qb[:-1])[:, None] * (kb[1:] - kb[:-1])[None, :]
        hit = cnt > 0
        visited *= int(hit.sum())
        full *= int((cnt == area).sum())
        allowed *= int(cnt.sum())
        work *= int((area * hit).sum())
        nq_grid *= qb.numel() - 1
        nk_grid *= kb.numel() - 1
    T, N, S = layout.text_len, layout.num_image, layout.num_tokens
    nq_text = -(-T // math.prod(q_tile))
    nk_text = -(-T // math.prod(kv_tile))
    nq, nk = nq_grid + nq_text, nk_grid + nk_text
    dense_tiles = nq_text * nk + nq_grid * nk_text  # text rows and columns: full tiles
    dense_pairs = T * S + N * T
    return nq, nk, visited + dense_tiles, full + dense_tiles, allowed + dense_pairs, work + dense_pairs


def _row_major_boxes(a: int, b: int, dims: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """Split the flat row-major range ``[a, b)`` of a grid ``dims`` into sub-boxes (at most 2d - 1),
    each a list of per-axis ``(start, stop)``."""
    if a >= b:
        return []
    if len(dims) == 1:
        return [[(a, b)]]
    inner = math.prod(dims[1:])
    r0, c0 = divmod(a, inner)
    r1, c1 = divmod(b, inner)
    if r0 == r1:
        return [[(r0, r0 + 1)] + box for box in _row_major_boxes(c0, c1, dims[1:])]
    out = []
    if c0:
        out += [[(r0, r0 + 1)] + box for box in _row_major_boxes(c0, inner, dims[1:])]
        r0 += 1
    if r1 > r0:
        out.append([(r0, r1)] + [(0, L) for L in dims[1:]])
    if c1:
        out += [[(r1, r1 + 1)] + box for box in _row_major_boxes(0, c1, dims[1:])]
    return out


def _seq_side(layout: TokenLayout, t: int):
    """Sequence tiles of one side: sizes, grid-token counts and (n, 2d-1, d) box starts / stops."""
    S, N, off = layout.num_tokens, layout.num_image, layout.image_slice.start
    starts, stops = _seq_tiles(S, t)
    g0 = torch.clamp(starts - off, 0, N)
    g1 = torch.clamp(stops - off, 0, N)
    d = len(layout.grid)
    nb = 2 * d - 1
    lo = torch.zeros(starts.numel(), nb, d, dtype=torch.long)
    hi = torch.zeros_like(lo)
    used = 1
    for i, (a, b) in enumerate(zip(g0.tolist(), g1.tolist())):
        boxes = _row_major_boxes(a, b, layout.grid)
        used = max(used, len(boxes))
        for j, box in enumerate(boxes):
            lo[i, j] = torch.tensor([s for s, _ in box])
            hi[i, j] = torch.tensor([e for _, e in box])
    return stops - starts, g1 - g0, lo[:, :used].contiguous(), hi[:, :used].contiguous()


def _sequence_box(pattern: BoxPattern, layout: TokenLayout, q_tile: int, kv_tile: int):
    """Sequence order on a box pattern: sub-box decomposition of 1-D tiles + per-axis prefix sums."""
    qsize, qgrid, qlo, qhi = _seq_side(layout, q_tile)
    ksize, kgrid, klo, khi = _seq_side(layout, kv_tile)
    nq, nk = qsize.numel(), ksize.numel()
    _check_pairs(nq, nk)
    # per axis: the distinct query / key intervals and their (distinct q, distinct k) allowed counts
    tables, qids, kids = [], [], []
    for a, m in enumerate(_axis_masks(pattern, permuted=False)):
        W = m.shape[0] + 1
        P = _prefix(m)
        uq, qid = torch.unique(qlo[..., a] * W + qhi[..., a], return_inverse=True)
        uk, kid = torch.unique(klo[..., a] * W + khi[..., a], return_inverse=True)
        q0, q1, k0, k1 = (uq // W)[:, None], (uq % W)[:, None], (uk // W)[None, :], (uk % W)[None, :]
        tables.append((P[q1, k1] - P[q0, k1] - P[q1, k0] + P[q0, k0]).flatten())
        qids.append(qid * uk.numel())
        kids.append(kid)
    nbq, nbk = qlo.shape[1], klo.shape[1]
    tally = _Tally()
    chunk = max(1, _CHUNK_ELEMENTS // (nbq * nbk * nk))
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        grid_counts = None
        for table, qid, kid in zip(tables, qids, kids):
            c = table[qid[c0:c1, :, None, None] + kid[None, None]]  # (c, boxes, nk, boxes)
            grid_counts = c if grid_counts is None else grid_counts * c
        grid_counts = grid_counts.sum((1, 3))
        qs, qg = qsize[c0:c1], qgrid[c0:c1]
        counts = qs[:, None] * ksize[None, :] - qg[:, None] * kgrid[None, :] + grid_counts
        tally.add(counts, qs, ksize)
    return nq, nk, tally


def _block(pattern: BlockPattern, layout: TokenLayout, order: str, q_tile, kv_tile):
    """Any order on a block pattern: tile / pattern-block overlaps, ``O_q @ M @ O_k^T``."""
    nb = pattern.block_mask.shape[0]
    M = torch.ones(nb + 1, nb + 1, dtype=torch.float64)  # last row / column: text, always allowed
    M[:nb, :nb] = pattern.block_mask.double()
    block_of = torch.full((layout.num_tokens,), nb, dtype=torch.long)
    block_of[layout.image_slice] = torch.arange(layout.num_image) // pattern.block_size

    def overlaps(tile):
        tile_of, n = _token_tiles(layout, order, tile)
        O = torch.zeros(n, nb + 1, dtype=torch.float64)
        O.index_put_((tile_of, block_of), torch.ones(tile_of.numel(), dtype=torch.float64), accumulate=True)
        return O

    Oq, Ok = overlaps(q_tile), overlaps(kv_tile)
    nq, nk = Oq.shape[0], Ok.shape[0]
    _check_pairs(nq, nk)
    qsize, ksize = Oq.sum(1).long(), Ok.sum(1).long()
    OkT = Ok.T.contiguous()
    tally = _Tally()
    chunk = max(1, _CHUNK_ELEMENTS // max(nk, nb + 1))
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        counts = torch.round((Oq[c0:c1] @ M) @ OkT).long()  # exact: integers far below 2^53
        tally.add(counts, qsize[c0:c1], ksize)
    return nq, nk, tally


def _scan(pattern, layout: TokenLayout, order: str, q_tile, kv_tile):
    """Any pattern with ``allowed_fn``: chunked elementwise evaluation over token rows (O(S^2))."""
    S, N, off = layout.num_tokens, layout.num_image, layout.image_slice.start
    q_of, nq = _token_tiles(layout, order, q_tile)
    k_of, nk = _token_tiles(layout, order, kv_tile)
    _check_pairs(nq, nk)
    allowed = pattern.allowed_fn(None)
    keys = torch.arange(S)
    kg = keys - off
    k_img = (kg >= 0) & (kg < N)
    counts = torch.zeros(nq, nk, dtype=torch.long)
    rows = max(1, _CHUNK_ELEMENTS // max(S, nk))
    for r0 in range(0, S, rows):
        r = torch.arange(r0, min(S, r0 + rows))
        qg = r - off
        q_img = (qg >= 0) & (qg < N)
        ok = allowed(qg.clamp(0, N - 1)[:, None], kg.clamp(0, N - 1)[None, :]) | ~q_img[:, None] | ~k_img[None, :]
        per_key_tile = torch.zeros(r.numel(), nk, dtype=torch.long).index_add_(1, k_of, ok.long())
        counts.index_add_(0, q_of[r], per_key_tile)
    qsize = torch.bincount(q_of, minlength=nq)
    ksize = torch.bincount(k_of, minlength=nk)
    tally = _Tally()
    tally.add(counts, qsize, ksize)
    return nq, nk, tally


def simulate(pattern, layout: TokenLayout, *, q_tile, kv_tile, order: str | None = None,
             permute: bool = True) -> SimulationResult:
    """Count the (query tile, key tile) pairs a block-sparse kernel visits for ``pattern`` on ``layout``.

    ``q_tile`` / ``kv_tile``: ints for 1-D tiles of consecutive sequence tokens (``order="sequence"``,
    what FlexAttention with ``BLOCK_SIZE`` or a plain Triton kernel sees), or per-axis tuples for
    multi-dimensional tiles (``order="tiled"``: tokens permuted so every tile is a sub-box of the grid,
    text tokens in 1-D tiles of ``prod(tile)``). ``order`` defaults to the one the tiles imply.
    ``permute``: tiled order on a box pattern tiles its relabelled axes (dilation groups contiguous,
    cyclic shift undone), as a token-permuting kernel would; False tiles the original coordinates.
    Text rows and columns are dense. Exact; never builds an S x S tensor (see the module docstring for
    the cost of each case). Raises ``ValueError`` for tiles that do not fit the layout.
    """
    if tuple(pattern.grid) != tuple(layout.grid):
        raise ValueError(f"the pattern's grid {'x'.join(map(str, pattern.grid))} does not match the layout {layout.describe()}")
    order, q_tile, kv_tile = _check_tiles(q_tile, kv_tile, order, layout)
    if isinstance(pattern, BoxPattern) and order == "tiled":
        nq, nk, visited, full, allowed, work = _separable_box(pattern, layout, q_tile, kv_tile, permute)
    else:
        if isinstance(pattern, BoxPattern):
            nq, nk, tally = _sequence_box(pattern, layout, q_tile, kv_tile)
        elif isinstance(pattern, BlockPattern):
            nq, nk, tally = _block(pattern, layout, order, q_tile, kv_tile)
        elif hasattr(pattern, "allowed_fn"):
            nq, nk, tally = _scan(pattern, layout, order, q_tile, kv_tile)
        else:
            raise TypeError(f"cannot simulate a {type(pattern).__name__}: it needs to be a BoxPattern, a BlockPattern "
                            "or have allowed_fn()")
        visited, full, allowed, work = tally.visited, tally.full, tally.allowed, tally.work
    return SimulationResult(layout, order, q_tile, kv_tile, nq, nk, visited, full, allowed, work)


def predicted_speedup(pattern, layout: TokenLayout, backend: str) -> SimulationResult:
    """:func:`simulate` with the tiles a backend of this pack uses; ``.speedup`` is its upper bound.

    * ``"flex"``: FlexAttention's ``FLEX_BLOCK`` x ``FLEX_BLOCK`` (128) tiles in sequence order.
    * ``"gather"``: box patterns: the per-axis query tiles of :func:`~diffusion_attn.kernels.choose_tiles`
      in relabelled coordinates, keys counted one by one (the union of the tile's windows). The gather
      kernel pads each tile's key box to the widest on the axis, so its real work is a bit higher (its
      ``Schedule.visited_pairs`` is exact). Block patterns: one pattern block per query tile and per key
      tile (the kernel's ``rows_per_tile`` > 1 only adds work).
    """
    from .flex import FLEX_BLOCK
    from .tiling import choose_tiles

    if backend == "flex":
        return simulate(pattern, layout, q_tile=FLEX_BLOCK, kv_tile=FLEX_BLOCK)
    if backend == "gather":
        if isinstance(pattern, BoxPattern):
            return simulate(pattern, layout, q_tile=choose_tiles(pattern), kv_tile=(1,) * len(layout.grid))
        if isinstance(pattern, BlockPattern):
            return simulate(pattern, layout, q_tile=pattern.block_size, kv_tile=pattern.block_size)
        raise TypeError(f"no gather tiling for a {type(pattern).__name__}")
    raise ValueError(f"no tile model for backend {backend!r}; accepted: flex, gather")


def plan_speedup(pattern, layout: TokenLayout, backend: str) -> float:
    """The tile-level bound of the kernels that do not visit a fixed grid of tiles: S^2 over the (query,
    key) pairs their plan computes for ``pattern`` on ``layout`` (text rows and columns dense).

    * ``"strips"``: :func:`~diffusion_attn.kernels.strip_plan` (each query's tile holds the union of its
      tile's windows, runs of the slide axis exact);
    * ``"sliding"``: :func:`~diffusion_attn.kernels.sliding_plan` (windows split into pieces along the slide
      axis: only the corners of each key chunk are masked).
    """
    from .sliding import sliding_plan
    from .strips import strip_plan

    plans = {"strips": strip_plan, "sliding": sliding_plan}
    if backend not in plans:
        raise ValueError(f"no plan model for backend {backend!r}; accepted: {', '.join(plans)}")
    if not isinstance(pattern, BoxPattern):
        raise TypeError(f"the {backend} kernel runs box patterns, got {type(pattern).__name__}")
    if tuple(pattern.grid) != tuple(layout.grid):
        raise ValueError(f"the pattern's grid {'x'.join(map(str, pattern.grid))} does not match the layout {layout.describe()}")
    return plans[backend](pattern).predicted_speedup(layout.text_len)
