"""Token layouts: where the image/video tokens and the text tokens sit in one attention sequence."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal

__all__ = ["TokenLayout"]


def _ints(values) -> tuple[int, ...] | None:
    """``values`` as ints, or None if one is not an integer (bools and 2.5 are refused, never truncated;
    numpy ints and torch's symbolic sizes, which have ``__index__``, are accepted)."""
    out = []
    for v in values:
        if isinstance(v, bool):
            return None
        try:
            out.append(operator.index(v))
        except TypeError:
            return None
    return tuple(out)


@dataclass(frozen=True)
class TokenLayout:
    """The shape of one attention call's token sequence.

    ``grid`` is the image/video token grid, row-major: ``(H, W)`` for images, ``(T, H, W)`` for video.
    ``text_len`` text tokens sit before (``text_position="first"``: Flux) or after (``"last"``: SD3,
    HunyuanVideo, Mochi) the grid tokens. Patterns are defined on the grid; text tokens are always dense
    (every image query sees every text key, every text query sees everything).
    """

    grid: tuple[int, ...]
    text_len: int = 0
    text_position: Literal["first", "last"] = "last"

    def __post_init__(self):
        grid = _ints(self.grid) if hasattr(self.grid, "__len__") and not isinstance(self.grid, str) else None
        if grid is None or not 1 <= len(grid) <= 3 or any(g < 1 for g in grid):
            raise ValueError(f"TokenLayout.grid must be 1 to 3 positive ints, got {self.grid!r}")
        text_len = _ints((self.text_len,))
        if text_len is None or text_len[0] < 0:
            raise ValueError(f"TokenLayout.text_len must be an int >= 0, got {self.text_len!r}")
        object.__setattr__(self, "text_len", text_len[0])
        if self.text_position not in ("first", "last"):
            raise ValueError(f"TokenLayout.text_position must be 'first' or 'last', got {self.text_position!r}")
        object.__setattr__(self, "grid", grid)

    @property
    def num_image(self) -> int:
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        return self.num_image + self.text_len

    @property
    def image_slice(self) -> slice:
        start = self.text_len if self.text_position == "first" else 0
        return slice(start, start + self.num_image)

    @property
    def text_slice(self) -> slice:
        start = 0 if self.text_position == "first" else self.num_image
        return slice(start, start + self.text_len)

    @property
    def frames(self) -> int:
        """Temporal size (1 for images)."""
        return self.grid[0] if len(self.grid) == 3 else 1

    @property
    def tokens_per_frame(self) -> int:
        return math.prod(self.grid[-2:]) if len(self.grid) >= 2 else self.grid[0]

    def describe(self) -> str:
        text = f" + {self.text_len} text ({self.text_position})" if self.text_len else ""
        return "x".join(map(str, self.grid)) + text
