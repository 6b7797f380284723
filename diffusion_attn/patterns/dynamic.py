"""A dynamic pattern: key blocks chosen per call from q and k (MoBA / VMoBA's top-k gate).

A *dynamic* pattern (capability ``"dynamic"``) has no mask until it sees the call's queries and keys:
``pattern.resolve(q, k, layout)`` returns the concrete :class:`~diffusion_attn.patterns.MaskMod` of
that call (usually head- and batch-dependent), which any kernel then runs like a static pattern.

:class:`TopKKeyBlocks` is a small example of the protocol, after VMoBA's ``topk`` mode
(KwaiVGI/VMoBA ``src/vmoba.py``, 1-D partition): the grid tokens (row-major) are cut into blocks of
``block_size`` consecutive tokens (the last may be shorter); each key block's centroid is the mean of
its keys (fp32); a grid query's gate score for block ``c`` is ``q . centroid_c`` (fp32, no scaling);
its own block is always selected and counts towards ``top_k``; the ``top_k`` best blocks are selected
(every block when ``top_k`` >= their number). Text stays dense (:func:`~diffusion_attn.patterns.text_dense`'s rule).
Differences from VMoBA: no 2-D / 3-D partitions, no threshold mode, selection is per query token and
head as in VMoBA's gate; it is an example of the protocol, not the method.
"""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from .mask_mod import MaskMod, in_segment

__all__ = ["TopKKeyBlocks", "BlockChoice"]


class BlockChoice(MaskMod):
    """A chosen set of key blocks per (batch row, head, grid query): ``selected`` (B, H, N, nb) bool.

    Grid query ``i`` may see grid key ``j`` iff ``selected[b, h, i, j // block_size]``; False off the grid."""

    _flags = frozenset({"head_dependent", "batch_dependent"})

    def __init__(self, selected: torch.Tensor, block_size: int):
        if selected.dim() != 4 or selected.dtype != torch.bool:
            raise ValueError(f"selected must be a (B, H, N, blocks) bool tensor, got {tuple(selected.shape)} {selected.dtype}")
        self.selected = selected
        self.block_size = int(block_size)

    def _build(self, layout, device):
        n = layout.num_image
        if self.selected.shape[2] != n:
            raise ValueError(f"the block choice covers {self.selected.shape[2]} grid queries, the layout "
                             f"{layout.describe()} has {n}")
        off, bs = layout.image_slice.start, self.block_size
        sel = self.selected.to(device) if device is not None else self.selected

        def fn(b, h, q_idx, kv_idx):
            qg, kg = q_idx - off, kv_idx - off
            inside = (qg >= 0) & (qg < n) & (kg >= 0) & (kg < n)
            return inside & sel[b, h, qg.clamp(0, n - 1), kg.clamp(0, n - 1) // bs]

        return fn

    def __repr__(self):
        return f"BlockChoice({tuple(self.selected.shape)}, block_size={self.block_size})"


class TopKKeyBlocks:
    """Top-k key blocks per grid query, chosen per call from q and k (see the module docstring)."""

    capabilities = frozenset({"dynamic", "head_dependent", "batch_dependent"})
    grid_pattern = None

    def __init__(self, block_size: int, top_k: int):
        for name, v in (("block_size", block_size), ("top_k", top_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TopKKeyBlocks {name} must be an int >= 1, got {v!r}")
        self.block_size, self.top_k = block_size, top_k

    def select(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """(B, H, N, blocks) bool: the blocks each grid query selects. ``q``, ``k``: (B, S, H, D)."""
        if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
            raise ValueError(f"q and k must be (B, S, heads, head_dim) with equal B, heads and head_dim, got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape[1] != layout.num_queries or k.shape[1] != layout.num_keys:
            raise ValueError(f"q / k lengths {q.shape[1]} / {k.shape[1]} do not match the layout {layout.describe()}")
        img = layout.image_slice
        qi, ki = q[:, img].float(), k[:, img].float()  # (B, N, H, D)
        B, N, H, D = ki.shape
        bs = self.block_size
        nb = -(-N // bs)
        block_of = torch.arange(N, device=k.device) // bs
        sums = ki.new_zeros(B, nb, H, D).index_add_(1, block_of, ki)
        counts = torch.bincount(block_of, minlength=nb).to(ki.dtype)
        centroids = sums / counts[None, :, None, None]
        scores = torch.einsum("bnhd,bchd->bhnc", qi, centroids)  # (B, H, N, nb)
        own = torch.nn.functional.one_hot(block_of, nb).bool()  # (N, nb)
        scores = scores.masked_fill(own[None, None], float("inf"))
        kk = min(self.top_k, nb)
        top = scores.topk(kk, dim=-1).indices
        return torch.zeros(B, H, N, nb, dtype=torch.bool, device=k.device).scatter_(-1, top, True)

    def resolve(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> MaskMod:
        """This call's pattern: the selected grid blocks, text dense, attached to ``layout``."""
        choice = BlockChoice(self.select(q, k, layout), self.block_size)
        return (choice | in_segment("text", "q") | in_segment("text", "kv")).on(layout)

    def is_full(self) -> bool:
        return False

    def dense_mask(self, *args, **kwargs):
        raise ValueError("TopKKeyBlocks is a dynamic pattern: its mask depends on q and k; "
                         "call .resolve(q, k, layout).dense_mask(batch=..., heads=...)")

    def __repr__(self):
        return f"TopKKeyBlocks(block_size={self.block_size}, top_k={self.top_k})"
