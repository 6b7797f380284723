"""A scorer for the shapes world with no learned weights.

Detection (:func:`detect`): every pixel takes the nearest palette colour in RGB if it is within
``threshold`` of it, else it is background; a palette colour that covers most of the image border is
background too (a model may paint the background in a shape colour). Each colour's pixels are split into
8-connected components (``scipy.ndimage.label``), grown by hysteresis into the neighbouring pixels within
a looser ``grow`` distance (soft edges), components under ``min_area`` of the image are dropped,
and each component's shape is classified from its geometry:

* fill ratio = area / bounding-box area: square ~ 1, circle ~ pi/4 = 0.785, triangle ~ 0.5;
* corner occupancy of the bounding box (four corner patches of 1/5 of the side): a square fills all four,
  a circle none, an upward triangle the two bottom ones only; it settles the cases where the fill ratio is
  between two classes;
* components with an aspect ratio beyond 2.5 or a fill ratio under 0.3 are ``"unknown"``.

Scoring (:func:`score_image`, :func:`score_video`) compares the detections with a prompt (parsed with
:func:`~diffusion_attn.data.shapes.parse_caption`) or with ground truth, in the spirit of GenEval: an
image is object-correct when every requested (colour, shape) kind is present exactly the requested number
of times. :func:`aggregate` turns many scores into percentages. :func:`image_metrics` gives PSNR / SSIM
against a reference (dense) run from scikit-image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .shapes import PALETTE, ObjectSpec, Sample, ShapeObject, parse_caption, position_word

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)


@dataclass
class Detection:
    """One found shape: colour name, shape class (or ``"unknown"``), box as fractions, position word,
    pixel area and the geometric features it was classified from."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]
    position: str
    area: int
    fill: float
    aspect: float

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class Score:
    """The scorer's verdict on one image or video.

    ``object_correct``: every requested kind present with the right colour, shape and count (``False`` for a
    prompt with no object the parser understood).
    ``position_correct``: every object with a requested position found there (``None``: no position asked).
    ``mean_iou``: mean box IoU of ground-truth objects with their matched detections (0 for a missed
    object; ``None`` without ground truth). ``duplicated``: some requested kind was found more often than
    asked. Video only: ``motion_correct`` (every requested motion matched by a track of that kind),
    ``temporal_consistency`` (fraction of consecutive frame pairs where the same objects are found and each
    is linked to itself) and ``mean_frame_iou`` (mean IoU of a track's consecutive boxes).
    ``unparsed``: prompt words the parser did not understand."""

    specs: list[ObjectSpec]
    detections: list[Detection]
    object_correct: bool
    position_correct: bool | None
    duplicated: bool
    mean_iou: float | None = None
    motion_correct: bool | None = None
    temporal_consistency: float | None = None
    mean_frame_iou: float | None = None
    missing: list[tuple[str, str]] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- inputs

def to_uint8(image) -> np.ndarray:
    """A PIL image, or an (H, W, C) / (C, H, W) / (H, W) tensor or array (float in [0, 1] or uint8), as a
    uint8 (H, W, 3) array."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"expected one image (H, W, C) / (C, H, W) / (H, W), got shape {x.shape}")
    if x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = x.transpose(1, 2, 0)
    if x.dtype != np.uint8:
        x = (np.clip(x.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x[..., :3]


def to_frames(video) -> list[np.ndarray]:
    """A list of frames or a (T, ...) tensor / array as a list of uint8 (H, W, 3) frames."""
    if isinstance(video, Sample):
        video = video.video
    return [to_uint8(f) for f in video]


# ---------------------------------------------------------------------------------------------- detection

def _classify(comp: np.ndarray) -> tuple[str, float, float]:
    """Shape class, fill ratio and aspect ratio of one component cropped to its bounding box."""
    h, w = comp.shape
    fill = float(comp.mean())
    aspect = max(w, h) / min(w, h)
    if aspect > 2.5 or fill < 0.3:
        return "unknown", fill, aspect
    k = max(1, min(h, w) // 5)
    corners = [comp[:k, :k].mean(), comp[:k, -k:].mean(), comp[-k:, :k].mean(), comp[-k:, -k:].mean()]
    top, bottom = (corners[0] + corners[1]) / 2, (corners[2] + corners[3]) / 2
    if fill >= 0.9:
        return "square", fill, aspect
    if fill < 0.64:
        return "triangle", fill, aspect
    if fill >= 0.85:  # between circle and square: a square has full corners
        return ("square" if min(corners) > 0.8 else "circle"), fill, aspect
    if fill < 0.7:  # between triangle and circle: a triangle has full bottom corners and empty top ones
        return ("triangle" if bottom - top > 0.5 else "circle"), fill, aspect
    return "circle", fill, aspect


def _nearest(image) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour and the RGB distance to it, per pixel."""
    x = to_uint8(image).astype(np.float32)
    dist = np.linalg.norm(x[:, :, None, :] - _RGB[None, None], axis=-1)  # (H, W, P)
    return dist.argmin(-1), dist.min(-1)


def _border_colour(labels: np.ndarray) -> int:
    """The palette index covering over half of the image border, or ``-1``."""
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    values, counts = np.unique(border, return_counts=True)
    return int(values[counts.argmax()]) if counts.max() > border.size / 2 else -1


def segment(image, threshold: float = 45.0) -> np.ndarray:
    """Per-pixel palette index (``-1`` = background) of an image: the nearest palette colour within
    ``threshold`` (RGB distance); a palette colour covering over half of the border is background."""
    nearest, dist = _nearest(image)
    labels = np.where(dist <= threshold, nearest, -1)
    background = _border_colour(labels)
    if background >= 0:
        labels[labels == background] = -1
    return labels


def detect(image, threshold: float = 45.0, grow: float = 75.0, min_area: float = 0.0015,
           min_pixels: int = 12) -> list[Detection]:
    """The shapes in an image (see the module docstring).

    Hysteresis as in edge detection: a shape's pixels are the connected pixels nearest to its colour
    within ``grow`` that contain at least one pixel within ``threshold`` (soft, blurred or compressed edges
    join the shape they border; a background never comes within ``grow`` of the palette). ``min_area`` is a
    fraction of the image; a component smaller than that (or than ``min_pixels``) is noise and dropped."""
    from scipy import ndimage

    nearest, dist = _nearest(image)
    strict = np.where(dist <= threshold, nearest, -1)
    loose = np.where(dist <= max(grow, threshold), nearest, -1)
    background = _border_colour(strict)
    h, w = strict.shape
    smallest = max(min_pixels, min_area * h * w)
    found = []
    for index, name in enumerate(_NAMES):
        if index == background or not (strict == index).any():
            continue
        comps, n = ndimage.label(loose == index, structure=np.ones((3, 3), dtype=bool))
        seeded = np.zeros(n + 1, dtype=bool)
        seeded[np.unique(comps[strict == index])] = True
        for i, sl in enumerate(ndimage.find_objects(comps), start=1):
            comp = comps[sl] == i
            area = int(comp.sum())
            if not seeded[i] or area < smallest:
                continue
            shape, fill, aspect = _classify(comp)
            box = (sl[1].start / w, sl[0].start / h, sl[1].stop / w, sl[0].stop / h)
            found.append(Detection(name, shape, box, position_word(box), area, fill, aspect))
    return found


# ---------------------------------------------------------------------------------------------- matching

def box_iou(a, b) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _matches(spec: ObjectSpec, det: Detection) -> bool:
    return det.shape == spec.shape and (spec.colour is None or det.colour == spec.colour)


def _compare(specs: list[ObjectSpec], dets: list[Detection]) -> tuple[bool, bool | None, bool, list]:
    """Object correctness, position correctness, duplication and the missing kinds. A prompt with no
    object the parser understood is never object-correct (there is nothing to verify)."""
    asked: Counter = Counter()
    for s in specs:
        asked[(s.colour, s.shape)] += s.count
    object_ok, duplicated, missing = bool(specs), False, []
    for (colour, shape), n in asked.items():
        have = sum(_matches(ObjectSpec(1, colour, shape, None, None), d) for d in dets)
        if have != n:
            object_ok = False
        if have < n:
            missing.append((colour, shape))
        duplicated |= have > n
    position_ok = None
    if any(s.position for s in specs):
        position_ok, used = True, set()
        for s in sorted(specs, key=lambda s: s.colour is None):  # specific colours claim detections first
            if not s.position:
                continue
            hits = [i for i, d in enumerate(dets) if i not in used and _matches(s, d) and d.position == s.position]
            if len(hits) < s.count:
                position_ok = False
            used.update(hits[:s.count])
    return object_ok, position_ok, duplicated, missing


def specs_from_truth(objects: list[ShapeObject]) -> list[ObjectSpec]:
    """One spec per ground-truth object (count 1, its colour, shape, position and motion)."""
    return [ObjectSpec(1, o.colour, o.shape, o.position, o.motion) for o in objects]


def _truth_iou(objects, dets: list[Detection], frame: int = 0) -> float:
    """Mean IoU of ground-truth boxes with the same-kind detections, matched one to one (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    if not objects:
        return 1.0
    boxes = [o.boxes[frame] if o.boxes else o.box for o in objects]
    cost = np.zeros((len(objects), max(1, len(dets))))
    for i, (o, b) in enumerate(zip(objects, boxes)):
        for j, d in enumerate(dets):
            if d.colour == o.colour and d.shape == o.shape:
                cost[i, j] = box_iou(b, d.box)
    rows, cols = linear_sum_assignment(-cost)
    return float(cost[rows, cols].sum() / len(objects))


def _resolve(prompt, truth) -> tuple[list[ObjectSpec], list[str], list[ShapeObject] | None]:
    if isinstance(truth, Sample):
        truth = truth.objects
    if truth is not None:
        return specs_from_truth(truth), [], truth
    if prompt is None:
        raise ValueError("give a prompt or ground truth to score against")
    parsed = parse_caption(prompt)
    return list(parsed), parsed.unparsed, None


def score_image(image, prompt: str | None = None, truth=None, **detect_kwargs) -> Score:
    """Score one image against a prompt (parsed) or ground truth (a :class:`Sample` or its objects; this
    also gives the box IoU)."""
    specs, unparsed, objects = _resolve(prompt, truth)
    dets = detect(image, **detect_kwargs)
    object_ok, position_ok, duplicated, missing = _compare(specs, dets)
    iou = _truth_iou(objects, dets) if objects is not None else None
    return Score(specs, dets, object_ok, position_ok, duplicated, mean_iou=iou, missing=missing,
                 unparsed=unparsed)


def _link(prev: list[Detection], cur: list[Detection], max_shift: float) -> dict[int, int]:
    """Link detections of consecutive frames: same kind, one to one, nearest centres within ``max_shift``."""
    from scipy.optimize import linear_sum_assignment

    if not prev or not cur:
        return {}
    cost = np.full((len(prev), len(cur)), 1e6)
    for i, a in enumerate(prev):
        for j, b in enumerate(cur):
            if a.kind == b.kind:
                shift = np.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1])
                if shift <= max_shift:
                    cost[i, j] = shift
    rows, cols = linear_sum_assignment(cost)
    return {int(r): int(c) for r, c in zip(rows, cols) if cost[r, c] < 1e6}


def motion_direction(start: tuple[float, float], end: tuple[float, float], min_shift: float = 0.02) -> str | None:
    """``left/right/up/down`` from a centre's displacement (dominant axis), ``None`` if it moved less than
    ``min_shift`` (fraction of the image)."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    if max(abs(dx), abs(dy)) < min_shift:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def score_video(video, prompt: str | None = None, truth=None, max_shift: float = 0.25,
                **detect_kwargs) -> Score:
    """Score a video (list of frames, a (T, ...) tensor, or a :class:`Sample`) against a prompt or truth.

    Objects, positions and box IoU are judged on frame 0. Detections are linked frame to frame (same kind,
    nearest centre within ``max_shift``); a track's motion is the direction of its centre from its first
    to its last frame. A frame pair is consistent when both frames hold the same kinds and counts and every
    object is linked."""
    if isinstance(video, Sample) and truth is None and prompt is None:
        truth = video
    specs, unparsed, objects = _resolve(prompt, truth)
    frames = to_frames(video)
    per_frame = [detect(f, **detect_kwargs) for f in frames]
    object_ok, position_ok, duplicated, missing = _compare(specs, per_frame[0])
    iou = None
    if objects is not None:
        iou = float(np.mean([_truth_iou(objects, d, t) for t, d in enumerate(per_frame)]))
    # tracks: follow each frame-0 detection as long as it is linked
    tracks = [[d] for d in per_frame[0]]
    alive = list(range(len(tracks)))  # track index -> index of its detection in the current frame
    consistent, frame_ious = 0, []
    for t in range(1, len(frames)):
        prev, cur = per_frame[t - 1], per_frame[t]
        links = _link(prev, cur, max_shift)
        same = Counter(d.kind for d in prev) == Counter(d.kind for d in cur)
        consistent += same and len(links) == len(prev) == len(cur)
        new_alive = []
        for k, idx in enumerate(alive):
            if idx is not None and idx in links:
                det = cur[links[idx]]
                frame_ious.append(box_iou(tracks[k][-1].box, det.box))
                tracks[k].append(det)
                new_alive.append(links[idx])
            else:
                new_alive.append(None)
        alive = new_alive
    motion_ok = None
    if any(s.motion for s in specs):
        motion_ok, used = True, set()
        for s in specs:
            if not s.motion:
                continue
            hits = [k for k, tr in enumerate(tracks) if k not in used and len(tr) == len(frames)
                    and _matches(s, tr[0]) and motion_direction(tr[0].centre, tr[-1].centre) == s.motion]
            if len(hits) < s.count:
                motion_ok = False
            used.update(hits[:s.count])
    return Score(specs, per_frame[0], object_ok, position_ok, duplicated, mean_iou=iou, motion_correct=motion_ok,
                 temporal_consistency=consistent / max(1, len(frames) - 1),
                 mean_frame_iou=float(np.mean(frame_ious)) if frame_ious else None, missing=missing,
                 unparsed=unparsed)


def aggregate(scores: list[Score]) -> dict:
    """Percentages over many scores: object / position / motion accuracy, duplication rate, temporal
    consistency (mean, %) and mean box IoU (0-1). A criterion no score has is ``None``; ``n`` is the count."""
    def pct(values):
        values = [v for v in values if v is not None]
        return 100.0 * float(np.mean(values)) if values else None

    ious = [s.mean_iou for s in scores if s.mean_iou is not None]
    return {"n": len(scores),
            "object_accuracy": pct([s.object_correct for s in scores]),
            "position_accuracy": pct([s.position_correct for s in scores]),
            "duplication_rate": pct([s.duplicated for s in scores]),
            "motion_accuracy": pct([s.motion_correct for s in scores]),
            "temporal_consistency": pct([s.temporal_consistency for s in scores]),
            "mean_iou": float(np.mean(ious)) if ious else None,
            "unparsed": sorted({w for s in scores for w in s.unparsed})}


# ---------------------------------------------------------------------------------------------- PSNR / SSIM

def image_metrics(a, b) -> dict:
    """PSNR (dB) and SSIM of image ``a`` against reference ``b`` (e.g. a method's output against the dense
    run), from scikit-image, on [0, 1] RGB (``data_range=1``). Inputs as :func:`to_uint8` takes them, or
    videos as (T, ...) tensors / lists of frames (metrics averaged over frames; PSNR from the mean MSE).
    Identical images give ``psnr = inf`` and ``ssim = 1``."""
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('image_metrics needs scikit-image: pip install "diffusion-attn[quality]"') from e

    def frames(x):
        if isinstance(x, (list, tuple)) or (hasattr(x, "ndim") and x.ndim == 4):
            return [to_uint8(f) for f in x]
        return [to_uint8(x)]

    fa, fb = frames(a), frames(b)
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb)):
        raise ValueError(f"image_metrics needs inputs of one shape, got {[x.shape for x in fa[:1]]} and "
                         f"{[y.shape for y in fb[:1]]} ({len(fa)} vs {len(fb)} frames)")
    xa = np.stack(fa).astype(np.float64) / 255
    xb = np.stack(fb).astype(np.float64) / 255
    with np.errstate(divide="ignore"):
        psnr = float(peak_signal_noise_ratio(xb, xa, data_range=1.0))
    side = min(xa.shape[1], xa.shape[2])
    win = min(7, side if side % 2 else side - 1)
    ssim = float(np.mean([structural_similarity(y, x, data_range=1.0, channel_axis=-1, win_size=win)
                          for x, y in zip(xa, xb)]))
    return {"psnr": psnr, "ssim": ssim}
