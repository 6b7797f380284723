"""Requests and handlers: plain values in and out (no gradio); ValueError / OSError for the user's mistakes."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..runner import check_method
from ..models.world import VIDEO_PROMPT
from .controls import DEFAULT_CHOICE, collect_params
from .families import _SEEN_FAMILIES, VIDEO_FAMILIES, _variant, model_family_of, size_defaults, token_layout

__all__ = ["Request", "compare_outputs", "generate_outputs", "pattern_outputs"]

DEFAULT_MODEL = "tiny-wan"
DEFAULT_METHOD = "radial"
DEFAULT_PROMPT = VIDEO_PROMPT  # one the default model (tiny-wan) draws
#: steps of the UI's slider at start: the trained tiny models' own count
DEFAULT_STEPS = 20
#: largest token count the attention-pattern picture is drawn for (drawing time grows as tokens^2)
MAX_PATTERN_TOKENS = 65536
#: most video frames put in the output gallery (the video itself has them all)
MAX_GALLERY_FRAMES = 16


@dataclass
class Request:
    """Everything one click sends: the UI's values, already read out of the components."""

    model: str = DEFAULT_MODEL
    method: str = DEFAULT_METHOD
    params: dict = field(default_factory=dict)  # raw control values by parameter name
    use_default: dict = field(default_factory=dict)  # name -> True where a slider's "default" box is ticked
    prompt: str = DEFAULT_PROMPT
    height: Any = None
    width: Any = None
    num_frames: Any = None
    steps: Any = DEFAULT_STEPS
    guidance_scale: Any = None
    seed: Any = 0
    dtype: str = "float32"
    device: str = "cpu"
    attention_backend: str | None = None

    # -- derived -------------------------------------------------------------------------------------
    def model_name(self) -> str:
        model = (self.model or "").strip()
        if not model:
            raise ValueError("choose a model (an embedded tiny model, a local folder or a hub id)")
        return model

    def method_params(self) -> dict:
        return collect_params(self.method, self.params, self.use_default)

    def family(self) -> str | None:
        return model_family_of(self.model_name())

    def check_method(self) -> None:
        """Fail early (before loading anything) when the method cannot run on this model's family."""
        if self.method in (None, "", "none"):
            return
        check_method(self.method, self.family())

    def generate_kwargs(self) -> dict:
        family = self.family()
        kw = dict(prompt=self.prompt or "", height=_int_or_none("height", self.height),
                  width=_int_or_none("width", self.width), num_frames=_int_or_none("frames", self.num_frames),
                  steps=_int_or_none("steps", self.steps), guidance_scale=_float_or_none("guidance", self.guidance_scale),
                  seed=_int_or_none("seed", self.seed) or 0, dtype=self.dtype or "float32",
                  device=self.device or "cpu", attention_backend=_backend_or_none(self.attention_backend))
        if kw["steps"] is None or kw["steps"] < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        for key in ("height", "width", "num_frames"):
            if kw[key] is not None and kw[key] < 1:
                raise ValueError(f"{key.replace('num_', '')} must be a positive integer, got {kw[key]}")
        if family is not None and family not in VIDEO_FAMILIES:
            kw["num_frames"] = None  # image models take no frame count
        return kw

    def sizes(self) -> tuple[int | None, int | None, int | None]:
        """Height, width, frames as generation will use them (the embedded models' defaults for blanks)."""
        model = self.model_name()
        defaults = size_defaults(model, self.family())
        kw = self.generate_kwargs()
        return tuple(kw[k] if kw[k] is not None else defaults.get(k) for k in ("height", "width", "num_frames"))


def _number(label: str, value, cast):
    if isinstance(value, str):
        value = value.strip()
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, got {value!r}") from None
    if cast is int:
        if not number.is_integer():
            raise ValueError(f"{label} must be a whole number, got {value!r}")
        return int(number)
    return number


def _backend_or_none(value) -> str | None:
    value = (value or "").strip()
    return None if value in ("", DEFAULT_CHOICE) else value


def _int_or_none(label, value):
    return _number(label, value, int)


def _float_or_none(label, value):
    return _number(label, value, float)


def _progress_callback(progress: Callable | None, label: str):
    """A runner callback ``(step_index, total)`` that forwards to ``progress((done, total), desc)``."""
    if progress is None:
        return None

    def callback(step_index, total):
        progress((step_index + 1, total), desc=f"{label}: step {step_index + 1}/{total}")

    return callback


#: saved videos live here until Gradio has copied them to its cache; older than this (s) are pruned
OUTPUT_MAX_AGE = 3600


def _out_dir() -> Path:
    """A fresh folder for one request's files, under one per-user root whose old folders are pruned."""
    root = Path(tempfile.gettempdir()) / "diffusion-attn-ui"
    root.mkdir(exist_ok=True)
    now = time.time()
    for old in root.iterdir():
        try:
            if now - old.stat().st_mtime > OUTPUT_MAX_AGE:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(dir=root))


def _jsonable(value):
    from ..runner import jsonable

    return jsonable(value)


def _gallery_frames(frames: list) -> list:
    if len(frames) <= MAX_GALLERY_FRAMES:
        return list(frames)
    idx = [round(i * (len(frames) - 1) / (MAX_GALLERY_FRAMES - 1)) for i in range(MAX_GALLERY_FRAMES)]
    return [frames[i] for i in idx]


def generate_outputs(req: Request, progress: Callable | None = None) -> dict:
    """Generate with ``req`` and return ``{frames, video (path or None), is_video, info, pattern, note}``."""
    from .. import runner

    params = req.method_params()
    req.check_method()
    kwargs = req.generate_kwargs()
    if progress is not None:
        progress(0, desc="loading the model and applying the method")
    start = time.perf_counter()
    result = runner.generate(req.model_name(), req.method or "none", params,
                             callback=_progress_callback(progress, req.method or "none"), **kwargs)
    total = time.perf_counter() - start
    if result.family:
        _SEEN_FAMILIES.setdefault(req.model_name(), result.family)
    video = None
    if result.is_video:
        suffix = ".mp4" if runner.video_encoder_available() else ".gif"
        video = str(runner.save(result, _out_dir() / f"result{suffix}"))
    info = {"seconds": round(float(result.seconds), 3), "seconds_per_step": round(float(result.seconds_per_step), 4),
            "seconds_with_loading": round(total, 3)}
    info.update({k: v for k, v in _jsonable(result.meta).items() if k not in info})
    info.setdefault("family", result.family)
    info.setdefault("params", _jsonable(result.params))
    # the pattern for the size actually generated (blank sizes are filled in by the pipeline)
    first = result.frames[0]
    ran = dataclasses.replace(req, height=first.height, width=first.width,
                              num_frames=len(result.frames) if result.is_video else None)
    pattern, note = _safe_pattern(ran)
    return dict(frames=list(result.frames), video=video, is_video=bool(result.is_video), info=info,
                pattern=pattern, note=note)


def compare_outputs(req: Request, progress: Callable | None = None) -> dict:
    """Run the method and dense with the same seed; ``{frames, video, info}``: the side-by-side picture
    (frames for video, plus the side-by-side video file), timings, speed-up and pixel differences."""
    from .. import compare as compare_mod
    from .. import runner

    if req.method in (None, "", "none"):
        raise ValueError("choose a method to compare with dense attention")
    params = req.method_params()
    req.check_method()
    kwargs = req.generate_kwargs()
    if progress is not None:
        progress(0, desc="loading the model")
    result = compare_mod.compare(req.model_name(), req.method, params,
                                 callback=_progress_callback(progress, f"{req.method}, then dense"), **kwargs)
    side = result.side_by_side
    frames = list(side) if isinstance(side, (list, tuple)) else [side]
    video = None
    if result.is_video:
        suffix = ".mp4" if runner.video_encoder_available() else ".gif"
        video = str(compare_mod.save(result, _out_dir() / f"compare{suffix}"))
    info = _jsonable(result.summary())
    info.update(model=req.model_name(), dense_seconds=round(float(result.dense.seconds), 3),
                method_seconds=round(float(result.method.seconds), 3))
    return dict(frames=frames, video=video, info=info)


def pattern_outputs(req: Request):
    """``(PIL image or None, note)``: the method's attention pattern on this model's token layout."""
    from .. import viz
    from ..registry import get_method

    if req.method in (None, "", "none"):
        return None, "Dense attention: every token attends to every token."
    spec = get_method(req.method)
    params = req.method_params()
    model = req.model_name()
    family = req.family()
    if family is None:
        return None, (f"The pattern is drawn once the model's family is known: generate once with {model!r}, "
                      "or use a local folder with a model_index.json.")
    check_method(req.method, family)
    if spec.grid_pattern is None:
        return None, f"{spec.name} has no attention pattern to draw."
    height, width, frames = req.sizes()
    if height is None or width is None:
        return None, "Enter a height and width to see the pattern for this model."
    layout = token_layout(model, family, height, width, frames)
    if layout.num_tokens > MAX_PATTERN_TOKENS:
        return None, (f"Token layout {layout.describe()} ({layout.num_tokens} tokens) is too large to draw; "
                      "lower the size or frame count to see the pattern.")
    variant = _variant(spec, model, family)
    image = viz.render_pattern(spec.name, layout, family=variant, **params)
    return image, f"{spec.name} on the {layout.describe()} token layout of {model} at this size."


def _safe_pattern(req: Request):
    try:
        return pattern_outputs(req)
    except Exception as err:  # the picture is a bonus next to a finished generation: say why, don't fail it
        return None, f"No pattern picture: {err}"
