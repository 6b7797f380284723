"""Token layouts: where the image/video tokens, the text tokens and any extra tokens sit in one attention call.

A call's sequence is made of named *segments*:

* ``"grid"`` (alias ``"image"``): the image/video tokens, row-major over ``grid``;
* ``"text"``: ``text_len`` text tokens, before (``text_position="first"``) or after (``"last"``) the grid;
* extra segments (:class:`Segment`), appended after grid + text in the order given, on the key side only
  (``side="kv"``: pooled keys, a reference image's keys / values), the query side only (``"q"``) or both.

Grid and text occupy the same positions on the query and the key side, so ``segment("text")`` is one
slice for both; an extra segment's slice depends on the side (``segment(name, side="kv")``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal

__all__ = ["Segment", "TokenLayout", "SEGMENT_SIDES"]

#: Where an extra segment's tokens exist: only among the keys / values, only among the queries, or both.
SEGMENT_SIDES = ("kv", "q", "both")
#: Names reserved for the grid and text segments.
_CORE_NAMES = ("grid", "image", "text")


@dataclass(frozen=True)
class Segment:
    """An extra run of ``length`` tokens named ``name``, present on ``side`` (``"kv"``, ``"q"`` or
    ``"both"``) of the attention call, after the grid and text tokens."""

    name: str
    length: int
    side: Literal["kv", "q", "both"] = "kv"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name in _CORE_NAMES:
            raise ValueError(f"Segment.name must be a non-empty string other than {', '.join(_CORE_NAMES)}, got {self.name!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"Segment {self.name!r}: length must be an int >= 1, got {self.length!r}")
        if self.side not in SEGMENT_SIDES:
            raise ValueError(f"Segment {self.name!r}: side must be one of {', '.join(SEGMENT_SIDES)}, got {self.side!r}")

    def on(self, side: str) -> bool:
        """Whether this segment has tokens on ``side`` (``"q"`` or ``"kv"``)."""
        return self.side == "both" or self.side == side


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
    HunyuanVideo, Mochi) the grid tokens. ``extra``: further named segments after grid + text
    (:class:`Segment` objects, or ``(name, length)`` / ``(name, length, side)`` tuples), e.g. pooled keys
    or a reference image's tokens on the key side only.

    ``num_tokens`` counts grid + text (the part queries and keys share: what the grid kernels run on);
    ``num_queries`` / ``num_keys`` add the extra segments of each side. Grid patterns (box, block) say
    nothing about text: the kernels make text dense, which the pattern protocol writes as
    :func:`~diffusion_attn.patterns.text_dense`.
    """

    grid: tuple[int, ...]
    text_len: int = 0
    text_position: Literal["first", "last"] = "last"
    extra: tuple[Segment, ...] = ()

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
        object.__setattr__(self, "extra", _normalize_segments(self.extra))

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

    @property
    def num_queries(self) -> int:
        """Length of the query sequence: grid + text + extra segments present on the query side."""
        return self.num_tokens + sum(s.length for s in self.extra if s.on("q"))

    @property
    def num_keys(self) -> int:
        """Length of the key / value sequence: grid + text + extra segments present on the key side."""
        return self.num_tokens + sum(s.length for s in self.extra if s.on("kv"))

    def segment_names(self, side: str = "q") -> tuple[str, ...]:
        """Names of the non-empty segments on ``side``, in sequence order."""
        _check_side(side)
        core = ("text", "grid") if self.text_position == "first" else ("grid", "text")
        core = tuple(n for n in core if n == "grid" or self.text_len)
        return core + tuple(s.name for s in self.extra if s.on(side))

    def segment(self, name: str, side: str = "q") -> slice:
        """The positions of segment ``name`` (``"grid"`` / ``"image"``, ``"text"``, or an extra
        segment's name) in the query (``side="q"``) or key (``side="kv"``) sequence. The text slice is
        empty (not an error) when ``text_len == 0``."""
        _check_side(side)
        if name in ("grid", "image"):
            return self.image_slice
        if name == "text":
            return self.text_slice
        start = self.num_tokens
        for seg in self.extra:
            if seg.name == name:
                if not seg.on(side):
                    raise ValueError(f"segment {name!r} has no tokens on the {side!r} side (it is on {seg.side!r})")
                return slice(start, start + seg.length)
            if seg.on(side):
                start += seg.length
        names = ", ".join(repr(n) for n in ("grid", "text") + tuple(s.name for s in self.extra))
        raise ValueError(f"unknown segment {name!r} in layout {self.describe()}; accepted: {names}")

    def describe(self) -> str:
        text = f" + {self.text_len} text ({self.text_position})" if self.text_len else ""
        extra = "".join(f" + {s.length} {s.name} ({s.side})" for s in self.extra)
        return "x".join(map(str, self.grid)) + text + extra


def _check_side(side: str) -> None:
    if side not in ("q", "kv"):
        raise ValueError(f"side must be 'q' (queries) or 'kv' (keys / values), got {side!r}")


def _normalize_segments(extra) -> tuple[Segment, ...]:
    """``extra`` as a tuple of :class:`Segment` with unique names (tuples are converted)."""
    if isinstance(extra, Segment):
        extra = (extra,)
    try:
        items = tuple(extra)
    except TypeError:
        raise ValueError(f"TokenLayout.extra must be a sequence of Segment or (name, length[, side]) tuples, "
                         f"got {extra!r}") from None
    out = []
    for item in items:
        if not isinstance(item, Segment):
            if not isinstance(item, (tuple, list)) or not 2 <= len(item) <= 3:
                raise ValueError(f"TokenLayout.extra entries must be Segment or (name, length[, side]) tuples, got {item!r}")
            item = Segment(*item)
        out.append(item)
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"TokenLayout.extra segment names must be unique, repeated: {', '.join(dupes)}")
    return tuple(out)
