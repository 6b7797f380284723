"""The shapes world: a seedable generator of images and short videos of coloured shapes, with captions and
exact ground truth, and a parser for the captions it writes.

Everything is drawn with PIL without anti-aliasing, so every pixel of a shape has exactly its palette colour
and the masks are exact. All randomness comes from a ``numpy.random.Generator`` seeded by the caller: the
same seed and arguments give the same sample, bit for bit.

Conventions
-----------
* Boxes are ``(x0, y0, x1, y1)`` fractions of width / height in ``[0, 1]``; ``x1, y1`` are exclusive
  (a shape covering pixel columns ``a..b`` inclusive has ``x0 = a / W`` and ``x1 = (b + 1) / W``).
* The position word comes from the box centre ``(cx, cy)`` on a 3 x 3 grid: column ``left`` if
  ``cx < 1/3``, ``right`` if ``cx >= 2/3``, else the middle; row ``top`` if ``cy < 1/3``, ``bottom`` if
  ``cy >= 2/3``, else the middle. Words: ``top left, top, top right, left, center, right, bottom left,
  bottom, bottom right`` (see :func:`position_word`).
* Motion directions are ``left, right, up, down`` (image ``y`` grows downwards, so ``down`` is ``+y``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

#: Shape colours: well separated in RGB (pairwise distance >= 90) and far from every background colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 0),
    "cyan": (0, 200, 220),
}
#: Background colours: greys and near-neutral tints, all far (RGB distance >= 95) from the palette,
#: and so is every blend of two of them (gradients).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light grey": (200, 200, 200),
    "grey": (128, 128, 128),
    "dark grey": (60, 60, 60),
    "black": (15, 15, 15),
    "beige": (225, 215, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")
_MOTION_VECTOR = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def position_word(box: tuple[float, float, float, float]) -> str:
    """The 3 x 3 grid word of a box, from its centre (see the module docstring for the exact rule)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = "left" if cx < 1 / 3 else ("right" if cx >= 2 / 3 else "")
    row = "top" if cy < 1 / 3 else ("bottom" if cy >= 2 / 3 else "")
    return " ".join(w for w in (row, col) if w) or "center"


def position_phrase(position: str) -> str:
    """``"at the top left"``, ``"on the left"``, ``"in the center"``: the caption's words for a position."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


@dataclass
class ShapeObject:
    """Ground truth of one shape. For a video, ``box`` / ``mask`` / ``position`` are those of frame 0 and
    ``boxes`` / ``masks`` hold every frame; ``motion`` is its direction."""

    shape: str
    colour: str
    box: tuple[float, float, float, float]
    mask: torch.Tensor  # (H, W) bool
    position: str
    motion: str | None = None
    boxes: list[tuple[float, float, float, float]] | None = None
    masks: torch.Tensor | None = None  # (T, H, W) bool

    @property
    def phrase(self) -> str:
        """This object's part of a caption: ``"a red circle at the top left"`` / ``"a red circle moving up"``."""
        article = "an" if self.colour[0] in "aeiou" else "a"
        words = f"{article} {self.colour} {self.shape}"
        return f"{words} moving {self.motion}" if self.motion else f"{words} {position_phrase(self.position)}"


@dataclass
class Sample:
    """One generated image or video: pixels, caption and ground truth.

    ``image`` is ``(3, H, W)`` float in ``[0, 1]``; a video has ``video`` ``(T, 3, H, W)`` and ``image`` is
    its first frame."""

    image: torch.Tensor
    caption: str
    objects: list[ShapeObject]
    background: str
    seed: int
    video: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return self.image.shape[-1], self.image.shape[-2]

    def pil(self, frame: int | None = None) -> Image.Image:
        """The image (or one video frame) as a PIL image."""
        x = self.image if frame is None else self.video[frame]
        return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def caption_for(objects: list[ShapeObject]) -> str:
    """The plain-language caption of a list of objects: phrases joined by ``", "`` and a final ``" and "``."""
    phrases = [o.phrase for o in objects]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# --------------------------------------------------------------------------------------------- drawing

def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str]:
    """A plain, two-tone (split vertically or horizontally) or linear-gradient background, uint8 (H, W, 3)."""
    names = list(BACKGROUNDS)
    kind = rng.choice(["plain", "two-tone", "gradient"])
    a = names[rng.integers(len(names))]
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUNDS[a]
    if kind == "plain":
        return canvas, a
    b = names[(names.index(a) + 1 + rng.integers(len(names) - 1)) % len(names)]
    ca, cb = np.array(BACKGROUNDS[a], float), np.array(BACKGROUNDS[b], float)
    horizontal = bool(rng.integers(2))
    n = width if horizontal else height
    if kind == "two-tone":
        t = (np.arange(n) >= n // 2).astype(float)
    else:
        t = np.linspace(0.0, 1.0, n)
    ramp = (ca[None] * (1 - t[:, None]) + cb[None] * t[:, None]).round().astype(np.uint8)  # (n, 3)
    canvas[:] = ramp[None, :, :] if horizontal else ramp[:, None, :]
    return canvas, f"{kind} {a} / {b}"


def _draw_mask(shape: str, x: int, y: int, d: int, width: int, height: int) -> np.ndarray:
    """The exact (H, W) bool mask of a shape whose bounding box is the ``d x d`` square at pixel ``(x, y)``.

    Circles fill ~pi/4 of their box, squares all of it, upward triangles about half."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    x1, y1 = x + d - 1, y + d - 1
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(x + (d - 1) / 2, y), (x1, y1), (x, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.asarray(img) > 0


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The box of a mask as width/height fractions (exclusive ends)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (float(xs.min() / w), float(ys.min() / h), float((xs.max() + 1) / w), float((ys.max() + 1) / h))


def _place(rng: np.random.Generator, count: int, width: int, height: int, frames: int, attempts: int,
           min_frac: float, max_frac: float) -> list[tuple[int, int, int, int, int]]:
    """Non-overlapping placements ``(x, y, d, dx, dy)`` (pixel box corner, side, per-frame step).

    For a video the swept box over all frames is what must not overlap. Each object gets ``attempts``
    random tries; an object that finds no free place is dropped (at least one is always placed)."""
    short = min(width, height)
    gap = max(2, short // 32)
    taken: list[tuple[int, int, int, int]] = []
    out = []
    for _ in range(count):
        for _ in range(attempts):
            d = int(max(8, round(short * rng.uniform(min_frac, max_frac))))
            dx = dy = 0
            if frames > 1:
                vx, vy = _MOTION_VECTOR[MOTIONS[rng.integers(len(MOTIONS))]]
                span = width if vx else height
                travel = int(round(span * rng.uniform(0.15, 0.3)))
                step = max(1, travel // (frames - 1))
                dx, dy = vx * step, vy * step
            sx, sy = abs(dx) * (frames - 1), abs(dy) * (frames - 1)  # swept extent
            if d + sx > width or d + sy > height:
                continue
            x = int(rng.integers(0, width - d - sx + 1)) + (sx if dx < 0 else 0)
            y = int(rng.integers(0, height - d - sy + 1)) + (sy if dy < 0 else 0)
            x0, x1 = min(x, x + dx * (frames - 1)), max(x, x + dx * (frames - 1)) + d
            y0, y1 = min(y, y + dy * (frames - 1)), max(y, y + dy * (frames - 1)) + d
            if all(x1 + gap <= a0 or a1 + gap <= x0 or y1 + gap <= b0 or b1 + gap <= y0
                   for a0, b0, a1, b1 in taken):
                taken.append((x0, y0, x1, y1))
                out.append((x, y, d, dx, dy))
                break
    if not out:  # cannot happen for sensible sizes: one object alone always fits
        raise ValueError(f"no shape fits in {width}x{height}")
    return out


def _generate(seed: int, width: int, height: int, num_objects: int | None, frames: int,
              attempts: int, min_size: float, max_size: float) -> Sample:
    if width < 16 or height < 16:
        raise ValueError(f"the shapes world needs at least 16x16 pixels, got {width}x{height}")
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 5)) if num_objects is None else int(num_objects)
    if not 1 <= count <= 6:
        raise ValueError(f"num_objects must be 1..6, got {count}")
    background, bg_name = _background(rng, width, height)
    places = _place(rng, count, width, height, frames, attempts, min_size, max_size)
    colours, shapes = list(PALETTE), list(SHAPES)
    kinds = [(colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]) for _ in places]
    pixels = np.repeat(background[None], frames, axis=0)  # (T, H, W, 3)
    objects = []
    for (colour, shape), (x, y, d, dx, dy) in zip(kinds, places):
        masks = np.stack([_draw_mask(shape, x + dx * t, y + dy * t, d, width, height) for t in range(frames)])
        pixels[masks] = PALETTE[colour]
        boxes = [_mask_box(m) for m in masks]
        motion = None
        if frames > 1:
            motion = {(-1, 0): "left", (1, 0): "right", (0, -1): "up", (0, 1): "down"}[(int(np.sign(dx)),
                                                                                        int(np.sign(dy)))]
        objects.append(ShapeObject(shape=shape, colour=colour, box=boxes[0], mask=torch.from_numpy(masks[0]),
                                   position=position_word(boxes[0]), motion=motion,
                                   boxes=boxes if frames > 1 else None,
                                   masks=torch.from_numpy(masks) if frames > 1 else None))
    video = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return Sample(image=video[0], caption=caption_for(objects), objects=objects, background=bg_name, seed=seed,
                  video=video if frames > 1 else None)


def generate_image(seed: int, width: int = 256, height: int = 256, num_objects: int | None = None, *,
                   attempts: int = 50, min_size: float = 0.14, max_size: float = 0.3) -> Sample:
    """A seeded image of 1-4 shapes (``num_objects`` to fix the count), its caption and ground truth.

    ``min_size`` / ``max_size`` are the shape side as a fraction of the shorter image side. Objects never
    overlap (with a small gap); placements are resampled up to ``attempts`` times per object and an object
    that does not fit is dropped, so ``len(sample.objects)`` may be below ``num_objects`` on small canvases."""
    return _generate(seed, width, height, num_objects, 1, attempts, min_size, max_size)


def generate_video(seed: int, width: int = 128, height: int = 128, num_frames: int = 8,
                   num_objects: int | None = None, *, attempts: int = 50, min_size: float = 0.14,
                   max_size: float = 0.25) -> Sample:
    """A seeded short video of 1-4 shapes, each moving in a straight line (left, right, up or down) by
    15-30% of the image over the clip; caption ``"a green triangle moving right and ..."``."""
    if num_frames < 2:
        raise ValueError("a video needs at least 2 frames")
    return _generate(seed, width, height, num_objects, num_frames, attempts, min_size, max_size)


def generate_images(seeds, sizes=((256, 256),), **kwargs) -> list[Sample]:
    """One image per seed; seed ``i`` uses ``sizes[i % len(sizes)]`` (``(width, height)`` pairs)."""
    return [generate_image(s, *sizes[i % len(sizes)], **kwargs) for i, s in enumerate(seeds)]


# --------------------------------------------------------------------------------------------- parsing

class ObjectSpec(NamedTuple):
    """One requested kind of object: ``count`` of ``colour`` ``shape`` (``None`` = not said)."""

    count: int
    colour: str | None
    shape: str | None
    position: str | None
    motion: str | None


class ParsedCaption(list):
    """A list of :class:`ObjectSpec` with ``unparsed``: the words the parser did not understand."""

    def __init__(self, specs=(), unparsed=()):
        super().__init__(specs)
        self.unparsed: list[str] = list(unparsed)


_FILLER = {"the", "at", "on", "in", "of", "to", "with", "and", "is", "are", "there", "image", "picture",
           "photo", "video", "showing", "shapes", "shape", "side", "corner", "moving", "going", "which", "that",
           "background", "plain"}
_SHAPE_WORDS = {"circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle", "ball": "circle",
                "square": "square", "squares": "square", "triangle": "triangle", "triangles": "triangle"}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_CENTRE = {"center", "centre", "middle"}
_MOTION_WORDS = {"left": "left", "right": "right", "up": "up", "upwards": "up", "upward": "up", "down": "down",
                 "downwards": "down", "downward": "down"}
_COLOUR_WORDS = {**{c: c for c in PALETTE}, "violet": "purple"}


def parse_caption(text: str) -> ParsedCaption:
    """Parse a caption of the generator's grammar (and simple variants) into :class:`ObjectSpec` s.

    Clauses are split on ``","`` and ``"and"``; each names a count (``a``/``an``/``one``..``six`` or
    digits), a colour, a shape (singular or plural), optionally a position (``at the top left``,
    ``on the left``, ``in the center``, ``upper``/``lower``/``middle`` also understood) and a motion
    (``moving right``). A spec's ``colour`` is ``None`` when none was named (any colour matches). Words it
    does not know (an unknown colour such as ``pink``, an unknown shape such
    as ``star``) are collected in ``.unparsed``; a clause without a known shape gives no spec. Never raises
    on text."""
    specs, unparsed = [], []
    text = text.lower().replace("top-left", "top left").replace("top-right", "top right")
    text = text.replace("bottom-left", "bottom left").replace("bottom-right", "bottom right")
    for clause in re.split(r",|;|\band\b|\.", text):
        words = re.findall(r"[a-z0-9]+", clause)
        if not words:
            continue
        count, colour, shape, vert, horiz, centre, motion = None, None, None, None, None, False, None
        i = 0
        while i < len(words):
            w = words[i]
            if w in ("moving", "going", "heading") and i + 1 < len(words) and words[i + 1] in _MOTION_WORDS:
                motion = _MOTION_WORDS[words[i + 1]]
                i += 2
                continue
            if w in _NUMBERS and count is None:
                count = _NUMBERS[w]
            elif w.isdigit() and count is None:
                count = int(w)
            elif w in PALETTE or w == "violet":
                colour = _COLOUR_WORDS[w]
            elif w in _SHAPE_WORDS:
                shape = _SHAPE_WORDS[w]
            elif w in _VERTICAL:
                vert = _VERTICAL[w]
            elif w in _HORIZONTAL:
                horiz = _HORIZONTAL[w]
            elif w in _CENTRE:
                centre = True
            elif w not in _FILLER:
                unparsed.append(w)
            i += 1
        position = " ".join(p for p in (vert, horiz) if p) or ("center" if centre else None)
        if shape is None:
            continue
        specs.append(ObjectSpec(count or 1, colour, shape, position, motion))
    return ParsedCaption(specs, unparsed)


def spec_phrase(spec: ObjectSpec) -> str:
    """Words for one spec, the inverse of :func:`parse_caption` for one clause (``"two red circles"``)."""
    noun = spec.shape + ("s" if spec.count > 1 else "")
    number = _NUMBER_WORDS.get(spec.count, str(spec.count))
    if number == "a" and (spec.colour or spec.shape)[0] in "aeiou":
        number = "an"
    words = " ".join(w for w in (number, spec.colour, noun) if w)
    if spec.motion:
        words += f" moving {spec.motion}"
    if spec.position:
        words += " " + position_phrase(spec.position)
    return words
