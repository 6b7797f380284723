"""Dense vs method, same seed: timings, pixel differences, image metrics, the shapes-world scorer's verdict
on both, and one side-by-side picture.

    from diffusion_attn.compare import compare, save
    cmp = compare("tiny-flux", "gna", {"window": (4, 4)}, prompt="a red circle at the top left", seed=0)
    print(cmp.speedup, cmp.psnr, cmp.ssim, cmp.scores["method"]["object_correct"])
    save(cmp, "outputs/compare")        # outputs/compare.png (dense left, method right) + .json
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .runner import FPS, GenerationResult, _save_frames, generate, jsonable

__all__ = ["CompareResult", "compare", "difference", "metrics", "save", "score_outputs", "side_by_side"]


@dataclass
class CompareResult:
    """``dense`` (stock attention) and ``method`` runs with the same seed and call.

    ``speedup``: dense seconds per step / method seconds per step (> 1: the method is faster).
    ``mean_abs_diff`` / ``max_abs_diff``: absolute pixel difference on the 0-255 scale over all frames,
    pixels and channels; ``psnr``: in dB (``inf`` for identical outputs) and ``ssim`` of the method's output
    against the dense one, from scikit-image (``ssim`` is ``None`` without the ``quality`` extra, and
    ``psnr`` then comes from the same formula in numpy). ``scores``: the shapes-world scorer's verdict on
    both outputs against the prompt (``{"dense": {...}, "method": {...}}``: object / position / motion
    correct, duplicated, shapes found), or ``None`` when the prompt names no shape the scorer knows
    (``meta["scorer_unparsed"]`` then lists the words it could not read). ``side_by_side``: one PIL image
    (a list of frames for video) with the dense output left, the method's right and a caption strip.
    """

    dense: GenerationResult
    method: GenerationResult
    speedup: float
    mean_abs_diff: float
    max_abs_diff: float
    psnr: float
    side_by_side: object
    meta: dict = field(default_factory=dict)
    ssim: float | None = None
    scores: dict | None = None

    @property
    def is_video(self) -> bool:
        return self.method.is_video

    def summary(self) -> dict:
        """The scalar results, JSON-able (``psnr`` is the string ``"inf"`` for identical outputs)."""
        return {
            "method": self.method.method,
            "params": self.method.params,
            "dense_seconds_per_step": round(self.dense.seconds_per_step, 5),
            "method_seconds_per_step": round(self.method.seconds_per_step, 5),
            "speedup": round(self.speedup, 4) if math.isfinite(self.speedup) else str(self.speedup),
            "mean_abs_diff": round(self.mean_abs_diff, 4),
            "max_abs_diff": self.max_abs_diff,
            "psnr": round(self.psnr, 3) if math.isfinite(self.psnr) else "inf",
            "ssim": None if self.ssim is None else round(self.ssim, 4),
            "scores": self.scores,
        }


def _verdict(score) -> dict:
    """The scorer's per-output verdict, JSON-able."""
    return {"object_correct": bool(score.object_correct), "position_correct": score.position_correct,
            "motion_correct": score.motion_correct, "duplicated": bool(score.duplicated),
            "found": [f"{d.colour} {d.shape}" for d in score.detections],
            "missing": [" ".join(w for w in m if w) for m in score.missing]}


def score_outputs(prompt: str, dense: GenerationResult, method: GenerationResult) -> tuple[dict | None, list[str]]:
    """The shapes-world scorer (:mod:`diffusion_attn.data.scorer`) on both outputs against ``prompt``:
    ``({"dense": verdict, "method": verdict}, unparsed words)``, or ``(None, unparsed)`` when the prompt
    names no shape the scorer understands (any prompt is fine for generation; only scoring needs this)."""
    from .data import parse_caption, score_image, score_video

    parsed = parse_caption(prompt)
    if not len(parsed):
        return None, parsed.unparsed
    if method.is_video:
        return {"dense": _verdict(score_video(dense.frames, prompt)),
                "method": _verdict(score_video(method.frames, prompt))}, parsed.unparsed
    return {"dense": _verdict(score_image(dense.frames[0], prompt)),
            "method": _verdict(score_image(method.frames[0], prompt))}, parsed.unparsed


def metrics(dense: GenerationResult, method: GenerationResult) -> tuple[float | None, float | None]:
    """(PSNR, SSIM) of the method's frames against the dense ones from scikit-image, or ``(None, None)``
    when scikit-image (the ``quality`` extra) is not installed."""
    from .data import image_metrics

    try:
        m = image_metrics(method.frames, dense.frames)
    except ImportError:
        return None, None
    return m["psnr"], m["ssim"]


def _score_text(scores: dict | None) -> str:
    if scores is None:
        return ""

    def one(v):
        ok = [k for k in ("object", "position", "motion") if v[f"{k}_correct"] is not None]
        marks = ", ".join(f"{k} {'ok' if v[f'{k}_correct'] else 'wrong'}" for k in ok)
        return marks + (", duplicated" if v["duplicated"] else "")

    return f"scorer: dense {one(scores['dense'])}; method {one(scores['method'])}"


def difference(a: GenerationResult, b: GenerationResult) -> tuple[float, float, float]:
    """(mean absolute difference, max absolute difference, PSNR in dB) between two results' frames,
    on the 0-255 scale."""
    if len(a.frames) != len(b.frames) or a.frames[0].size != b.frames[0].size:
        raise ValueError(f"outputs differ in shape: {len(a.frames)} x {a.frames[0].size} vs {len(b.frames)} x {b.frames[0].size}")
    x = np.stack([np.asarray(f.convert("RGB"), dtype=np.float64) for f in a.frames])
    y = np.stack([np.asarray(f.convert("RGB"), dtype=np.float64) for f in b.frames])
    d = np.abs(x - y)
    mse = float((d**2).mean())
    psnr = math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    return float(d.mean()), float(d.max()), psnr


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _wrap(font, text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def _fmt_params(params: dict) -> str:
    def fmt(v):
        if isinstance(v, (list, tuple)):
            return "x".join(map(str, v))
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items() if v is not None and k != "backend")


def _psnr_text(psnr: float) -> str:
    return "identical" if math.isinf(psnr) else f"PSNR {psnr:.1f} dB"


def side_by_side(dense: GenerationResult, method: GenerationResult, *, speedup: float, mean_abs_diff: float,
                 max_abs_diff: float, psnr: float, ssim: float | None = None, scores: dict | None = None):
    """Dense output left, method output right, caption strip below (one image, or a list for video)."""
    from PIL import Image, ImageDraw

    w, h = dense.frames[0].size
    gap = 8
    width = 2 * w + gap
    f_label, f_small = _font(13), _font(11)
    left = f"dense: {dense.seconds_per_step:.3f} s/step"
    right = f"{method.method}: {method.seconds_per_step:.3f} s/step"
    summary = (f"speed {speedup:.2f}x; |diff| mean {mean_abs_diff:.2f}, max {max_abs_diff:.0f} (0-255); "
               f"{_psnr_text(psnr)}" + ("" if ssim is None or math.isinf(psnr) else f", SSIM {ssim:.3f}"))
    if scores is not None:
        summary += "; " + _score_text(scores)
    params = _fmt_params(method.params)
    left_lines = _wrap(f_label, left, w - 8)
    right_lines = _wrap(f_label, right, w - 8)
    small_lines = _wrap(f_small, summary, width - 12) + (_wrap(f_small, params, width - 12) if params else [])
    label_h = 16 * max(len(left_lines), len(right_lines))
    strip_h = 6 + label_h + 4 + 14 * len(small_lines) + 6
    out = []
    for fd, fm in zip(dense.frames, method.frames):
        canvas = Image.new("RGB", (width, h + strip_h), (255, 255, 255))
        canvas.paste(fd.convert("RGB"), (0, 0))
        canvas.paste(fm.convert("RGB"), (w + gap, 0))
        draw = ImageDraw.Draw(canvas)
        y = h + 6
        for i, ln in enumerate(left_lines):
            draw.text((4, y + 16 * i), ln, fill=(30, 30, 30), font=f_label)
        for i, ln in enumerate(right_lines):
            draw.text((w + gap + 4, y + 16 * i), ln, fill=(30, 30, 30), font=f_label)
        y += label_h + 4
        for i, ln in enumerate(small_lines):
            draw.text((6, y + 14 * i), ln, fill=(100, 100, 100), font=f_small)
        out.append(canvas)
    return out if method.is_video else out[0]


def compare(
    model,
    method: str,
    params: dict | None = None,
    *,
    prompt: str,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    dtype="float32",
    device: str = "cpu",
    attention_backend: str | None = None,
    callback: Callable[[int, int], None] | None = None,
    warmup: bool = False,
    placement=None,
) -> CompareResult:
    """Run ``model`` with stock attention and with ``method`` (same seed, prompt and call) and compare.

    Arguments as :func:`diffusion_attn.runner.generate`. ``callback(step_index, total)`` counts the
    steps of both runs together (``total = 2 * steps``). ``warmup``: first run one untimed dense step, so
    the first timed run does not pay one-off costs.
    """
    if method in (None, "none"):
        raise ValueError("compare needs a method other than 'none' (it always runs the dense baseline too)")
    kwargs = dict(prompt=prompt, seed=seed, height=height, width=width, num_frames=num_frames, steps=steps,
                  guidance_scale=guidance_scale, dtype=dtype, device=device, attention_backend=attention_backend)
    from .models import EMBEDDED_MODELS
    from .runner import check_method

    # fail on a bad method before spending a dense run
    check_method(method, EMBEDDED_MODELS[model].family if isinstance(model, str) and model in EMBEDDED_MODELS else None)
    if warmup:
        generate(model, "none", callback=lambda i, total: None, **{**kwargs, "steps": 1})  # (no tqdm bar)
    from .runner.generation import default_steps

    offset, seen = [0], [int(steps) if steps is not None else default_steps(model)]

    def cb(i, total):
        seen[0] = total
        if callback is not None:
            callback(offset[0] + i, 2 * total)

    # the method first: one-off costs of a fresh pipeline land on the method, never flatter it
    method_result = generate(model, method, params, callback=cb, placement=placement, **kwargs)
    offset[0] = seen[0]
    dense_result = generate(model, "none", callback=cb, **kwargs)
    mean_d, max_d, psnr = difference(dense_result, method_result)
    lib_psnr, ssim = metrics(dense_result, method_result)
    psnr = psnr if lib_psnr is None else lib_psnr
    scores, unparsed = score_outputs(prompt, dense_result, method_result)
    speedup = dense_result.seconds_per_step / method_result.seconds_per_step if method_result.seconds_per_step > 0 else math.nan
    picture = side_by_side(dense_result, method_result, speedup=speedup, mean_abs_diff=mean_d, max_abs_diff=max_d,
                           psnr=psnr, ssim=ssim, scores=scores)
    result = CompareResult(dense=dense_result, method=method_result, speedup=speedup, mean_abs_diff=mean_d,
                           max_abs_diff=max_d, psnr=psnr, side_by_side=picture, ssim=ssim, scores=scores)
    result.meta = jsonable({"compare": result.summary(), "layout": "dense left, method right",
                             "scorer_unparsed": unparsed, "method": method_result.meta, "dense": dense_result.meta})
    return result


def save(result: CompareResult, path, *, fps: int | None = None) -> Path:
    """Write the side-by-side picture (PNG; MP4 or GIF for video, as :func:`diffusion_attn.runner.save`)
    and a JSON sidecar with both runs' metadata and the comparison; returns the path written."""
    frames = result.side_by_side if isinstance(result.side_by_side, list) else [result.side_by_side]
    fps = fps or FPS.get(result.method.family, 16)
    return _save_frames(frames, result.is_video, Path(path), result.meta, fps)
