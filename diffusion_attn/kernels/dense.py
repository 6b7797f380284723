"""The ``dense`` backend: plain SDPA for a pattern that allows every pair (what the stock processor runs)."""

from __future__ import annotations

from .backend import Backend
from .reference import sdpa

__all__ = ["BACKEND"]


def _run(q, k, v, request, prepared, key_padding_mask, scale):
    return sdpa(q, k, v, None if key_padding_mask is None else key_padding_mask[:, None, None, :], scale)


BACKEND = Backend(
    "dense", "plain SDPA; only valid when the pattern allows everything", _run,
    full_only=True, auto=lambda r: r.is_full,
)
