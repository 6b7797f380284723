"""The two pattern shapes every method in the pack reduces to.

A *pattern* says which grid token may attend to which (text tokens are handled by the kernel: always
dense). Two shapes cover the efficiency methods:

* :class:`BoxPattern` -- separable per-axis windows: on each axis ``a`` a query at position ``p`` sees the
  key positions ``[lo[p], hi[p])``, after relabelling the axis by a permutation (dilation groups, cyclic
  shifts). The allowed set of a query is the product of its per-axis intervals. Neighborhood attention
  (GNA: sliding / strided / blocked, with dilation) and (shifted) window attention are box patterns.
* :class:`BlockPattern` -- a boolean block mask over the flattened sequence (radial attention).

Both yield the dense boolean reference mask (the oracle; only for small sizes), their exact number of
allowed pairs and density. How a kernel tiles them (:class:`~diffusion_attn.kernels.schedule.Schedule`,
``box_schedule``, ``block_schedule``, ``axis_tiles``) is kernel planning and lives in
:mod:`diffusion_attn.kernels.schedule`; patterns never import kernels' tile planning.

A box pattern may carry a *refinement* (``refine``): a second grid predicate that is ANDed with the box,
for shapes whose allowed set is not a product of intervals but has a small bounding box per query --
CLEAR's circular window (:class:`~diffusion_attn.patterns.CircularWindow`) is the box of the disc's
bounding square refined by the disc. The box kernels that claim the ``"refined"`` capability AND it into
their tile masks; the others refuse such a pattern (:mod:`diffusion_attn.kernels.capabilities`).

Both are *grid patterns* of the sequence pattern protocol (:mod:`diffusion_attn.patterns.mask_mod`):
``capabilities`` says ``"box"`` (+ ``"partition"`` when the windows partition the grid) or ``"block"``,
``grid_pattern`` is the pattern itself, and ``mask_mod(b, h, q_idx, kv_idx)`` is the predicate over
*grid* indices; :func:`~diffusion_attn.patterns.text_dense` places it in a call's whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AxisWindows", "BoxPattern", "BlockPattern"]


@dataclass(frozen=True)
class AxisWindows:
    """One axis of a box pattern.

    The axis (length ``L``) is relabelled by ``perm``: permuted position ``p`` holds original coordinate
    ``perm[p]``. The query at permuted position ``p`` sees the keys at permuted positions
    ``[lo[p], hi[p])``. All three are int64 tensors of shape ``(L,)``.
    """

    perm: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def length(self) -> int:
        return self.perm.numel()

    def dense(self) -> torch.Tensor:
        """(L, L) boolean mask in original coordinates: ``[query, key]``."""
        L = self.length
        pos = torch.arange(L)
        allowed_perm = (pos[None, :] >= self.lo[:, None]) & (pos[None, :] < self.hi[:, None])
        out = torch.zeros(L, L, dtype=torch.bool)
        out[self.perm[:, None], self.perm[None, :]] = allowed_perm
        return out

    def run_starts(self) -> torch.Tensor:
        """Permuted positions where a run of queries with identical windows begins (the first is 0)."""
        change = torch.ones(self.length, dtype=torch.bool)
        change[1:] = (self.lo[1:] != self.lo[:-1]) | (self.hi[1:] != self.hi[:-1])
        return torch.nonzero(change).flatten()


class BoxPattern:
    """Separable per-axis windows over a grid (see module docstring), optionally refined.

    ``refine``: None, or a grid predicate on the same grid whose allowed set lies inside the box (the box
    bounds it: every pair it allows, the box allows): an object with ``grid``, ``allowed_fn(device)``
    (elementwise over flattened grid indices, broadcasting), ``allowed_pairs()`` and ``is_full()``, e.g.
    a :class:`~diffusion_attn.patterns.CircularWindow`. The pattern's allowed set is then the box AND
    the refinement (= the refinement's set); :meth:`allowed_pairs`, :attr:`density` and
    :meth:`dense_mask` count the refined set exactly, and ``capabilities`` says ``"refined"`` (never
    ``"partition"``): a kernel must apply :meth:`refine_fn` inside its tiles to run it. A refinement
    with ``translation_invariant = True`` (it reads the offset ``k - q`` only, as the circle) lets a kernel
    share one tile mask among tiles that are translates of each other (``sliding`` does).
    """

    def __init__(self, grid: tuple[int, ...], axes: list[AxisWindows], refine=None):
        if len(grid) != len(axes) or any(a.length != g for a, g in zip(axes, grid)):
            raise ValueError(f"axes do not match the grid {grid}")
        if refine is not None:
            if not all(callable(getattr(refine, f, None)) for f in ("allowed_fn", "allowed_pairs")):
                raise TypeError(f"a box refinement needs allowed_fn(device) and allowed_pairs(), "
                                f"got {type(refine).__name__}")
            if tuple(getattr(refine, "grid", grid)) != tuple(grid):
                raise ValueError(f"the refinement's grid {tuple(refine.grid)} is not the box's grid {tuple(grid)}")
        self.grid = tuple(grid)
        self.axes = axes
        self.refine = refine

    def refine_fn(self, device=None):
        """The refinement's elementwise predicate ``fn(qi, ki)`` over flattened grid indices on ``device``,
        or None for a plain box. Box kernels AND it into the mask of every tile they compute."""
        return None if self.refine is None else self.refine.allowed_fn(device)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def allowed_pairs(self) -> int:
        if self.refine is not None:  # the refinement lies inside the box: its pairs are the pattern's
            return int(self.refine.allowed_pairs())
        return math.prod(int((a.hi - a.lo).sum()) for a in self.axes)

    @property
    def density(self) -> float:
        return self.allowed_pairs() / float(self.num_tokens) ** 2

    def is_full(self) -> bool:
        box_full = all(bool((a.lo == 0).all() and (a.hi == a.length).all()) for a in self.axes)
        return box_full and (self.refine is None or bool(self.refine.is_full()))

    @property
    def capabilities(self) -> frozenset:
        """``{"box"}``, plus ``"partition"`` when the windows partition the grid (computed once);
        ``{"box", "refined"}`` with a refinement."""
        if self.refine is not None:
            return frozenset({"box", "refined"})
        if getattr(self, "_capabilities", None) is None:
            from ..kernels.windows import window_partition  # kernels import patterns: import late

            part = window_partition(self) is not None
            self._capabilities = frozenset({"box", "partition"} if part else {"box"})
        return self._capabilities

    @property
    def grid_pattern(self) -> "BoxPattern":
        return self

    def mask_mod(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        """FlexAttention-style predicate over flattened *grid* indices (``b`` and ``h`` are ignored)."""
        return self.allowed(q_idx, kv_idx)

    def allowed(self, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """Elementwise: may flattened grid query ``qi`` see key ``ki``? (broadcasting int tensors)"""
        return self.allowed_fn(qi.device)(qi, ki)

    def allowed_fn(self, device=None):
        """:meth:`allowed` with its lookup tables prepared on ``device``: pure indexing and comparisons,
        so it can serve as (part of) a FlexAttention ``mask_mod``."""
        tables = []
        stride = self.num_tokens
        for axis, L in zip(self.axes, self.grid):
            stride //= L
            inv = torch.empty_like(axis.perm)
            inv[axis.perm] = torch.arange(L)
            tables.append((stride, L, inv.to(device), axis.lo.to(device), axis.hi.to(device)))
        refine = self.refine_fn(device)

        def fn(qi, ki):
            ok = None
            for stride, L, inv, lo, hi in tables:
                qp = inv[(qi // stride) % L]
                kp = inv[(ki // stride) % L]
                term = (lo[qp] <= kp) & (kp < hi[qp])
                ok = term if ok is None else ok & term
            return ok if refine is None else ok & refine(qi, ki)

        return fn

    def dense_mask(self) -> torch.Tensor:
        """(N, N) boolean mask over the row-major flattened grid."""
        masks = [a.dense() for a in self.axes]
        n = len(masks)
        out = torch.ones((1,) * (2 * n), dtype=torch.bool)
        for i, m in enumerate(masks):
            shape = [1] * (2 * n)
            shape[i], shape[n + i] = m.shape
            out = out & m.view(shape)
        out = out.reshape(self.num_tokens, self.num_tokens)
        if self.refine is not None:
            i = torch.arange(self.num_tokens)
            out = out & self.refine.allowed_fn(None)(i[:, None], i[None, :])
        return out


class BlockPattern:
    """A block mask over the flattened grid: block ``(i, j)`` kept means all of query block ``i``
    attends to all of key block ``j``. The last block may be partial (``num_tokens % block_size``)."""

    def __init__(self, grid: tuple[int, ...], block_mask: torch.Tensor, block_size: int):
        self.grid = tuple(grid)
        self.block_size = int(block_size)
        nb = -(-self.num_tokens // self.block_size)
        if tuple(block_mask.shape) != (nb, nb):
            raise ValueError(f"block mask must be {(nb, nb)} for {self.num_tokens} tokens, got {tuple(block_mask.shape)}")
        self.block_mask = block_mask.bool().cpu()

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def _block_sizes(self) -> torch.Tensor:
        nb = self.block_mask.shape[0]
        sizes = torch.full((nb,), self.block_size, dtype=torch.long)
        sizes[-1] = self.num_tokens - self.block_size * (nb - 1)
        return sizes

    def allowed_pairs(self) -> int:
        s = self._block_sizes().double()
        return int((s[:, None] * s[None, :] * self.block_mask).sum())

    @property
    def density(self) -> float:
        return self.allowed_pairs() / float(self.num_tokens) ** 2

    def is_full(self) -> bool:
        return bool(self.block_mask.all())

    #: the block occupancy is the pattern itself
    capabilities = frozenset({"block"})

    @property
    def grid_pattern(self) -> "BlockPattern":
        return self

    def mask_mod(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        """FlexAttention-style predicate over flattened *grid* indices (``b`` and ``h`` are ignored)."""
        return self.allowed(q_idx, kv_idx)

    def allowed(self, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """Elementwise: may flattened grid query ``qi`` see key ``ki``? (see :meth:`BoxPattern.allowed`)"""
        return self.allowed_fn(qi.device)(qi, ki)

    def allowed_fn(self, device=None):
        """:meth:`allowed` with the block mask on ``device`` (see :meth:`BoxPattern.allowed_fn`)."""
        blocks, bs = self.block_mask.to(device), self.block_size
        return lambda qi, ki: blocks[qi // bs, ki // bs]

    def dense_mask(self) -> torch.Tensor:
        sizes = self._block_sizes()
        return self.block_mask.repeat_interleave(sizes, 0).repeat_interleave(sizes, 1)
