"""The Gradio web UI: pick a model and a method, set its parameters, generate, compare with dense.

    python app.py                        # or: diffusion-attn ui
    python -c "import diffusion_attn.ui as u; u.launch(port=7861)"

Every method control is generated from the method specs (``diffusion_attn.methods()``), so a newly
registered method shows up with no code here. Gradio is imported lazily: ``import diffusion_attn`` never
needs it, and a missing gradio gives an ImportError naming the ``ui`` extra.

The module is in three layers, so the tests can drive each one directly:

* plain helpers with no gradio: :func:`control_kind`, :func:`parse_control`, :func:`collect_params`,
  :func:`token_layout`, :class:`Request`;
* handlers taking a :class:`Request` (:func:`generate_outputs`, :func:`compare_outputs`,
  :func:`pattern_outputs`) that return plain Python values and raise ``ValueError``/``OSError`` for
  user errors;
* :func:`build_demo`, which wires them to components and turns every error into a ``gr.Error`` (a
  readable message in the page, never a stack trace).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .runner import adapter_family, check_method

__all__ = [
    "Request",
    "build_demo",
    "collect_params",
    "compare_outputs",
    "control_kind",
    "generate_outputs",
    "launch",
    "parse_control",
    "pattern_outputs",
    "token_layout",
]

GRADIO_MISSING = 'The web UI needs gradio, which is not installed: pip install "diffusion-attn[ui]"'

DEFAULT_MODEL = "tiny-wan"
DEFAULT_METHOD = "radial"
DEFAULT_PROMPT = "a red fox running through fresh snow, cinematic"
QUEUE_MAX_SIZE = 16
#: largest token count the attention-pattern picture is drawn for (drawing time grows as tokens^2)
MAX_PATTERN_TOKENS = 65536
#: most video frames put in the output gallery (the video itself has them all)
MAX_GALLERY_FRAMES = 16

VIDEO_FAMILIES = ("wan", "hunyuanvideo", "mochi")
#: "leave blank" entries of generated dropdowns and radios
DEFAULT_CHOICE = "default"
TRISTATE = (DEFAULT_CHOICE, "on", "off")


def _gradio():
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError(GRADIO_MISSING) from err
    return gr


# ----------------------------------------------------------------------------------------------------------
# Controls generated from the method specs (no gradio here)
# ----------------------------------------------------------------------------------------------------------


def control_kind(param) -> str:
    """Which control a :class:`~diffusion_attn.Param` gets.

    ``slider`` (int/float bounded at both ends; with a "default" checkbox when the default is per
    model), ``number`` (int/float otherwise: a number box, or a textbox where blank means "per model",
    as an untouched empty ``gr.Number`` reads as 0), ``checkbox`` (bool with a default), ``tristate``
    (bool whose default is per model: default / on / off), ``choice`` (a dropdown of ``choices``),
    ``tuple`` (a textbox like ``3,8,8``), ``text`` (other strings).
    """
    if param.choices is not None:
        return "choice"
    if param.type is bool:
        return "checkbox" if isinstance(param.default, bool) else "tristate"
    if param.type in (int, float):
        bounded = param.range is not None and param.range[0] is not None and param.range[1] is not None
        return "slider" if bounded else "number"
    if param.type is tuple:
        return "tuple"
    return "text"


def parse_control(param, raw, use_default: bool = False):
    """The value a control's raw UI value stands for, validated; ``None`` = the default (or per model).

    Raises ValueError with a readable message (out of range, not a number, bad tuple text, a required
    parameter left blank).
    """
    kind = control_kind(param)
    value = raw
    if use_default:
        value = None
    elif kind == "tristate":
        value = {"on": True, "off": False, True: True, False: False}.get(raw)
    elif kind == "choice":
        value = None if raw in (None, "", DEFAULT_CHOICE) and DEFAULT_CHOICE not in param.choices else raw
    elif kind in ("tuple", "text", "number", "slider"):
        if isinstance(raw, str):
            value = raw.strip()
            if kind == "tuple":  # "3,8,8", "3x8x8", "(3, 8, 8)", "3 8 8"
                value = re.sub(r"(?<=\d)\s+(?=\d)", ",", value.strip("()[] "))
                value = re.sub(r"\s+", "", value)
            if value == "":
                value = None
            elif kind in ("number", "slider"):
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"parameter {param.name!r} must be a number, got {raw!r}") from None
                if not math.isfinite(value):
                    raise ValueError(f"parameter {param.name!r} must be a finite number, got {raw!r}")
        elif isinstance(raw, float) and math.isnan(raw):
            value = None
    if kind == "tuple" and isinstance(value, str) and any(not part for part in value.replace("x", ",").split(",")):
        raise ValueError(f"parameter {param.name!r} must be an int or a tuple of ints like 3,8,8, got {raw!r}")
    if value is None and not param.required:
        return None
    if param.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    return param.validate(value)


def collect_params(method: str, raw: dict[str, Any], use_default: dict[str, bool] | None = None) -> dict:
    """Method parameters from raw UI values (``{name: raw}``): blanks dropped, the rest validated."""
    if method in (None, "", "none"):
        return {}
    from .registry import get_method

    spec = get_method(method)
    use_default = use_default or {}
    out = {}
    for p in spec.params:
        value = parse_control(p, raw.get(p.name), use_default.get(p.name, False))
        if value is not None:
            out[p.name] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Model family and token layout (for the attention-pattern picture)
# ----------------------------------------------------------------------------------------------------------

#: denoiser / pipeline class names in a checkpoint's model_index.json -> family
_CLASS_FAMILY = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuanvideo",
    "MochiTransformer3DModel": "mochi",
}
#: families found for non-embedded models after loading them once (hub ids have no local index)
_SEEN_FAMILIES: dict[str, str] = {}
#: text tokens in the joint attention of full-size checkpoints: (count, position); Wan's text is in
#: separate cross-attention layers and the UNets' too, so their self-attention has none
_REAL_TEXT = {"flux": (512, "first"), "sd3": (77 + 256, "last"), "hunyuanvideo": (256, "last"),
              "mochi": (256, "last")}


def model_family_of(model: str) -> str | None:
    """The family (as :func:`diffusion_attn.models.model_family` names it) of an embedded model name, a
    local diffusers folder, or a model loaded earlier in this process; None when unknown before loading."""
    from .models import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model].family
    if model in _SEEN_FAMILIES:
        return _SEEN_FAMILIES[model]
    index = Path(model) / "model_index.json"
    try:
        info = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    for key in ("transformer", "unet"):
        entry = info.get(key)
        if not isinstance(entry, list) or len(entry) != 2:
            continue
        if entry[1] in _CLASS_FAMILY:
            return _CLASS_FAMILY[entry[1]]
        if entry[1] == "UNet2DConditionModel":
            return "unet-sdxl" if "XL" in str(info.get("_class_name", "")) else "unet-sd15"
    return None


def size_defaults(model: str, family: str | None) -> dict:
    """Default height / width / num_frames / guidance for a model (embedded: the tiny sizes; else {})."""
    from .models import EMBEDDED_MODELS, default_call_kwargs

    if model in EMBEDDED_MODELS:
        kw = default_call_kwargs(model)
        return {k: kw[k] for k in ("height", "width", "num_frames", "guidance_scale") if k in kw}
    return {}


def token_layout(model: str, family: str, height: int, width: int, num_frames: int | None = None):
    """The token layout of ``model``'s main attention at this size: a :class:`~diffusion_attn.TokenLayout`.

    Transformers: the patchified latent grid (VAE /8 in space, /4 in time for Wan and HunyuanVideo, /6
    for Mochi; patch 2) and the text tokens of the joint attention (the embedded models' short text, or
    the full-size checkpoints' defaults). UNets: the largest self-attention grid (SD 1.5: latent size;
    SDXL: latent / 2, its first attention level).
    """
    from .layout import TokenLayout
    from .models import EMBEDDED_MODELS, default_call_kwargs

    h, w = int(height), int(width)
    if family in ("unet-sd15",):
        return TokenLayout((h // 8, w // 8))
    if family == "unet-sdxl":
        return TokenLayout((h // 16, w // 16))
    if model in EMBEDDED_MODELS:
        seq = default_call_kwargs(model).get("max_sequence_length", 0)
        text = {"flux": (seq, "first"), "sd3": (77 + seq, "last"), "hunyuanvideo": (seq, "last"),
                "mochi": (seq, "last")}.get(family, (0, "last"))
    else:
        text = _REAL_TEXT.get(family, (0, "last"))
    spatial = (h // 16, w // 16)
    if family in VIDEO_FAMILIES:
        frames = int(num_frames or 1)
        temporal = {"mochi": 6}.get(family, 4)
        grid = ((frames - 1) // temporal + 1, *spatial)
    elif family in ("flux", "sd3"):
        grid = spatial
    else:
        raise ValueError(f"no token layout known for family {family!r}")
    if min(grid) < 1:
        raise ValueError(f"{height} x {width} is too small for {family} (a token grid of {grid})")
    return TokenLayout(grid, text_len=text[0], text_position=text[1])


# ----------------------------------------------------------------------------------------------------------
# Requests and handlers (plain values in and out; ValueError / OSError for the user's mistakes)
# ----------------------------------------------------------------------------------------------------------


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
    steps: Any = 4
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


def _attention_backends() -> list[str]:
    from . import runner

    try:
        return runner.attention_backends()
    except Exception:  # noqa: BLE001 - an older diffusers without the dispatcher: offer none
        return []


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
    from .runner import jsonable

    return jsonable(value)


def _gallery_frames(frames: list) -> list:
    if len(frames) <= MAX_GALLERY_FRAMES:
        return list(frames)
    idx = [round(i * (len(frames) - 1) / (MAX_GALLERY_FRAMES - 1)) for i in range(MAX_GALLERY_FRAMES)]
    return [frames[i] for i in idx]


def generate_outputs(req: Request, progress: Callable | None = None) -> dict:
    """Generate with ``req`` and return ``{frames, video (path or None), is_video, info, pattern, note}``."""
    from . import runner

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
    from . import compare as compare_mod
    from . import runner

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
    from . import viz
    from .registry import get_method

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


def _variant(spec, model: str, family: str) -> str:
    """The family name whose per-model defaults apply (``wan2.2`` for two-expert Wan 2.2 checkpoints, where
    the spec has its own; :func:`diffusion_attn.apply` tells them by a ``transformer_2``)."""
    fam = adapter_family(family)
    if fam == "wan" and "wan2.2" in spec.family_defaults and _two_experts(model):
        return "wan2.2"
    return fam


def _two_experts(model: str) -> bool:
    """Whether a Wan model has a second expert (``transformer_2``), told without loading it: the
    embedded model's name, a local folder's model_index.json, a pipeline the runner already holds, or
    (hub ids) the Wan 2.2 A14B naming."""
    if model in ("tiny-wan22",):
        return True
    try:
        entry = json.loads((Path(model) / "model_index.json").read_text()).get("transformer_2")
        return isinstance(entry, list) and entry[-1] is not None
    except (OSError, ValueError):
        pass
    from . import runner

    for key, pipe in list(getattr(runner, "_CACHE", {}).items()):
        if key[0] == model:
            return getattr(pipe, "transformer_2", None) is not None
    return bool(re.search(r"wan-?2\.?2.*a14b", model, re.IGNORECASE))


def _safe_pattern(req: Request):
    try:
        return pattern_outputs(req)
    except Exception as err:  # the picture is a bonus next to a finished generation: say why, don't fail it
        return None, f"No pattern picture: {err}"


def method_markdown(method: str, model: str | None = None) -> str:
    """A short description of the method (summary, paper, families, per-model defaults)."""
    if method in (None, "", "none"):
        return "**none**: the model's stock (dense) attention, for reference."
    from .registry import get_method

    spec = get_method(method)
    lines = [f"**{spec.name}**: {spec.summary}", f"*{spec.paper}* · families: {', '.join(spec.families)} · {spec.kind}"]
    family = model_family_of(model) if model else None
    if family is not None:
        if adapter_family(family) not in spec.families:
            lines.append(f"⚠ {spec.name} does not run on {family} models.")
        else:
            defaults = spec.family_defaults.get(_variant(spec, model, family), {})
            if defaults:
                shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
                lines.append(f"Defaults for this model: {shown}. Leave a field blank to use them.")
    return "\n\n".join(lines)


def _control_label(spec, p) -> str:
    if p.required:
        return f"{p.name} (required)"
    return p.name


def _control_info(spec, p) -> str:
    bits = [p.help]
    if p.default is None and not p.required:
        unset = "blank" if control_kind(p) in ("number", "tuple", "text") else '"default"'
        per_model = any(p.name in d for d in spec.family_defaults.values())
        bits.append(f"{unset}: " + ("per model" if per_model else "automatic"))
    elif p.default is not None:
        bits.append(f"default: {p.default}")
    if p.range is not None:
        lo, hi = p.range
        bits.append(f"range {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
    if p.type is tuple:
        bits.append("e.g. 3,8,8 (an int broadcasts)")
    return "; ".join(b for b in bits if b)


# ----------------------------------------------------------------------------------------------------------
# The Blocks
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Control:
    method: str
    param: Any
    kind: str
    component: Any
    use_default: Any = None  # the "default" checkbox next to a slider whose default is per model


def _make_control(gr, spec, p) -> _Control:
    kind = control_kind(p)
    label, info = _control_label(spec, p), _control_info(spec, p)
    elem = f"da-{spec.name}-{p.name}".replace("_", "-")
    use_default = None
    if kind == "slider":
        lo, hi = p.range
        step = 1 if p.type is int else (hi - lo) / 100
        with gr.Row():
            comp = gr.Slider(lo, hi, value=p.default if p.default is not None else lo, step=step, label=label,
                             info=info, elem_id=elem, scale=4)
            if p.default is None:
                use_default = gr.Checkbox(value=True, label="default", elem_id=elem + "-default", scale=1, min_width=80)
                # touching the slider means the user wants its value
                comp.input(lambda: False, None, use_default, queue=False, show_progress="hidden")
    elif kind == "number" and p.default is not None:
        comp = gr.Number(value=p.default, label=label, info=info, elem_id=elem)
    elif kind == "number":  # blank = per model: a textbox, as an empty gr.Number reads as 0 before it is edited
        comp = gr.Textbox("", label=label, info=info, elem_id=elem, max_lines=1, placeholder="blank = default")
    elif kind == "checkbox":
        comp = gr.Checkbox(value=p.default, label=label, info=info, elem_id=elem)
    elif kind == "tristate":
        comp = gr.Radio(list(TRISTATE), value=DEFAULT_CHOICE, label=label, info=info, elem_id=elem)
    elif kind == "choice":
        choices = [str(c) if not isinstance(c, (str, int, float)) else c for c in p.choices]
        if p.default is None:
            choices = [DEFAULT_CHOICE, *choices]
        comp = gr.Dropdown(choices, value=p.default if p.default is not None else DEFAULT_CHOICE, label=label,
                           info=info, elem_id=elem)
    else:
        default = p.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        comp = gr.Textbox(value="" if default is None else str(default), label=label, info=info, elem_id=elem,
                          placeholder="blank = default" if not p.required else "e.g. 3,8,8", max_lines=1)
    return _Control(spec.name, p, kind, comp, use_default)


def _friendly(err: BaseException) -> str:
    """A one-paragraph message for the page (no traceback)."""
    if isinstance(err, (ValueError, OSError, ImportError, KeyError, TypeError, NotImplementedError)):
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        return text or type(err).__name__
    if "out of memory" in str(err).lower():
        return f"Out of memory: {err}. Try a smaller size, fewer frames or a lower-precision dtype."
    return f"{type(err).__name__}: {err}"


def build_demo():
    """The Gradio Blocks app (queued: one generation at a time, at most ``QUEUE_MAX_SIZE`` waiting)."""
    gr = _gradio()
    import torch

    from .models import EMBEDDED_MODELS
    from .registry import methods

    specs = methods()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
        ["mps"] if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else [])
    default_sizes = size_defaults(DEFAULT_MODEL, model_family_of(DEFAULT_MODEL))

    with gr.Blocks(title="diffusion-attn") as demo:
        gr.Markdown("# diffusion-attn\nPublished attention methods on diffusers pipelines. The embedded "
                    "`tiny-*` models are small random-weight pipelines that run offline on a CPU: their "
                    "pictures are noise, but every method, timing and pattern is real.")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    model_dd = gr.Dropdown(list(EMBEDDED_MODELS), value=DEFAULT_MODEL, label="Model",
                                           info="embedded tiny models (offline)", elem_id="da-model")
                    model_path = gr.Textbox(label="or a local folder / Hub id", max_lines=1,
                                            placeholder="e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                            info="used instead of the dropdown when filled", elem_id="da-model-path")
                method_dd = gr.Dropdown(["none", *specs], value=DEFAULT_METHOD, label="Method", elem_id="da-method")
                method_info = gr.Markdown(method_markdown(DEFAULT_METHOD, DEFAULT_MODEL), elem_id="da-method-info")
                controls: list[_Control] = []
                groups = {}
                for name, spec in specs.items():
                    with gr.Group(visible=name == DEFAULT_METHOD, elem_id=f"da-group-{name}") as group:
                        for p in spec.params:
                            controls.append(_make_control(gr, spec, p))
                    groups[name] = group
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=2, elem_id="da-prompt")
                # optional numbers are textboxes: blank = the model's default (shown as the placeholder)
                with gr.Row():
                    height = gr.Textbox("", label="Height", placeholder=str(default_sizes.get("height", "")),
                                        info="blank: model default", max_lines=1, elem_id="da-height")
                    width = gr.Textbox("", label="Width", placeholder=str(default_sizes.get("width", "")),
                                       info="blank: model default", max_lines=1, elem_id="da-width")
                    frames = gr.Textbox("", label="Frames", placeholder=str(default_sizes.get("num_frames", "")),
                                        info="video models", max_lines=1, elem_id="da-frames")
                with gr.Row():
                    steps = gr.Slider(1, 50, value=4, step=1, label="Steps", elem_id="da-steps")
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="da-seed")
                    guidance = gr.Textbox("", label="Guidance", info="blank: model default", max_lines=1,
                                          placeholder=str(default_sizes.get("guidance_scale", "")), elem_id="da-guidance")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        dtype = gr.Dropdown(["float32", "bfloat16", "float16"], value="float32", label="dtype",
                                            elem_id="da-dtype")
                        device = gr.Dropdown(devices, value=devices[0], label="Device", elem_id="da-device")
                        backend = gr.Dropdown([DEFAULT_CHOICE, *_attention_backends()], value=DEFAULT_CHOICE,
                                              label="diffusers attention backend", elem_id="da-backend",
                                              info="for the stock and dense layers")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="da-generate")
                    compare_btn = gr.Button("Compare with dense", elem_id="da-compare")
                    pattern_btn = gr.Button("Show pattern", elem_id="da-pattern-btn")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Output", columns=4, height="auto", elem_id="da-gallery")
                video = gr.Video(label="Video", visible=False, autoplay=True, loop=True, elem_id="da-video")
                animation = gr.Image(label="Video", type="filepath", visible=False, elem_id="da-animation")
                with gr.Row():
                    pattern_img = gr.Image(label="Attention pattern", type="pil", elem_id="da-pattern",
                                           interactive=False)
                pattern_note = gr.Markdown(elem_id="da-pattern-note")
                info = gr.JSON(label="Timing and metadata", elem_id="da-info")
                compare_gallery = gr.Gallery(label="Compare: dense (left) vs method (right)", columns=2,
                                             height="auto", elem_id="da-compare-gallery")
                compare_info = gr.JSON(label="Comparison: timings and differences", elem_id="da-compare-info")

        fixed = dict(model_dd=model_dd, model_path=model_path, method=method_dd, prompt=prompt, height=height,
                     width=width, num_frames=frames, steps=steps, guidance_scale=guidance, seed=seed, dtype=dtype,
                     device=device, attention_backend=backend)
        inputs = set(fixed.values()) | {c.component for c in controls} | {c.use_default for c in controls if c.use_default}

        def read(data: dict) -> Request:
            method = data[method_dd]
            own = [c for c in controls if c.method == method]
            return Request(
                model=(data[model_path] or "").strip() or data[model_dd], method=method,
                params={c.param.name: data[c.component] for c in own},
                use_default={c.param.name: bool(data[c.use_default]) for c in own if c.use_default is not None},
                **{k: data[comp] for k, comp in fixed.items() if k not in ("model_dd", "model_path", "method")},
            )

        def fail(err: BaseException):
            if isinstance(err, gr.Error):
                return err
            return gr.Error(_friendly(err))

        def on_generate(data, progress=gr.Progress()):
            try:
                out = generate_outputs(read(data), progress=progress)
            except Exception as err:  # noqa: BLE001 - shown in the page, the server stays up
                raise fail(err) from None
            path = out["video"]
            is_mp4 = bool(path) and path.endswith(".mp4")
            return (gr.update(value=_gallery_frames(out["frames"])),
                    gr.update(value=path if is_mp4 else None, visible=is_mp4),
                    gr.update(value=path if path and not is_mp4 else None, visible=bool(path) and not is_mp4),
                    out["pattern"], out["note"], out["info"])

        def on_compare(data, progress=gr.Progress()):
            try:
                out = compare_outputs(read(data), progress=progress)
            except Exception as err:  # noqa: BLE001
                raise fail(err) from None
            items = ([out["video"]] if out["video"] else []) + _gallery_frames(out["frames"])
            return items, out["info"]

        def on_pattern(data):
            try:
                return pattern_outputs(read(data))
            except Exception as err:  # noqa: BLE001
                raise fail(err) from None

        def on_method(method, model_name, path):
            model = (path or "").strip() or model_name
            return [gr.update(visible=name == method) for name in groups] + [method_markdown(method, model)]

        def on_model(model_name, path, method):
            model = (path or "").strip() or model_name
            family = model_family_of(model)
            sizes = size_defaults(model, family)
            is_video = family is None or family in VIDEO_FAMILIES
            return (method_markdown(method, model),
                    gr.update(placeholder=str(sizes.get("height", ""))),
                    gr.update(placeholder=str(sizes.get("width", ""))),
                    gr.update(placeholder=str(sizes.get("num_frames", "")), visible=is_video),
                    gr.update(placeholder=str(sizes.get("guidance_scale", ""))))

        # generate and compare share one pipeline cache: one queue slot for both
        model_events = dict(concurrency_id="pipeline", concurrency_limit=1)

        def progress_on(component) -> dict:  # show_progress_on is newer than gradio 5.0
            return {"show_progress_on": [component]} if "show_progress_on" in click_params else {}

        click_params = inspect.signature(generate_btn.click).parameters
        generate_btn.click(on_generate, inputs, [gallery, video, animation, pattern_img, pattern_note, info],
                           api_name="generate", **progress_on(gallery), **model_events)
        compare_btn.click(on_compare, inputs, [compare_gallery, compare_info], api_name="compare",
                          **progress_on(compare_gallery), **model_events)
        pattern_btn.click(on_pattern, inputs, [pattern_img, pattern_note], api_name="pattern")
        method_dd.change(on_method, [method_dd, model_dd, model_path], [*groups.values(), method_info],
                         queue=False, show_progress="hidden")
        for trigger in (model_dd.change, model_path.blur):
            trigger(on_model, [model_dd, model_path, method_dd], [method_info, height, width, frames, guidance],
                    queue=False, show_progress="hidden")

    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    demo.da_controls = controls  # for the tests: the generated controls, in order
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    """Build the app and serve it (blocking) at ``http://host:port``; ``share=True`` asks Gradio for a
    public link. Extra keyword arguments go to ``gr.Blocks.launch``."""
    demo = build_demo()
    kwargs.setdefault("show_error", True)
    return demo.launch(server_name=host, server_port=int(port), share=share, **kwargs)
