"""The Gradio UI without a browser: controls generated from the specs, the handlers, errors, the queue.

Everything runs on the embedded tiny models with 2 steps at small sizes (a few seconds in all).
"""

import subprocess
import sys

import pytest

from diffusion_attn import TokenLayout, methods
from diffusion_attn.models import EMBEDDED_MODELS
from diffusion_attn.ui import (
    GRADIO_MISSING,
    Request,
    collect_params,
    compare_outputs,
    control_kind,
    generate_outputs,
    parse_control,
    pattern_outputs,
    token_layout,
)

pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")


def _param(method, name):
    return methods()[method].param(name)


class Progress:
    """Records ``progress(...)`` calls like gr.Progress would receive them."""

    def __init__(self):
        self.calls = []

    def __call__(self, value, desc=None, **_):
        self.calls.append((value, desc))


# ---------------------------------------------------------------------------------------------------------
# gradio is optional
# ---------------------------------------------------------------------------------------------------------


def test_import_never_needs_gradio():
    code = "import sys, diffusion_attn, diffusion_attn.ui; assert 'gradio' not in sys.modules, 'gradio imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_gradio_names_the_extra(monkeypatch):
    import diffusion_attn.ui as ui

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    for call in (ui.build_demo, ui.launch):
        with pytest.raises(ImportError) as err:
            call()
        assert 'pip install "diffusion-attn[ui]"' in str(err.value)
    assert 'pip install "diffusion-attn[ui]"' in GRADIO_MISSING


# ---------------------------------------------------------------------------------------------------------
# Controls from the specs and their values
# ---------------------------------------------------------------------------------------------------------


def test_control_kinds_follow_the_spec():
    assert control_kind(_param("gna", "window")) == "tuple"
    assert control_kind(_param("gna", "backend")) == "choice"
    assert control_kind(_param("gna", "dense_layers")) == "number"  # (0, None): open-ended
    assert control_kind(_param("radial", "decay_factor")) == "number"
    assert control_kind(_param("radial", "sink")) == "tristate"  # default per model: default / on / off
    assert control_kind(_param("hidiffusion", "apply_raunet")) == "checkbox"
    assert control_kind(_param("hidiffusion", "t1_ratio")) == "slider"  # (0.0, 1.0)
    assert control_kind(_param("hidiffusion", "shift")) == "slider"  # (0, 3)
    assert control_kind(_param("hidiffusion", "seed")) == "number"


def test_parse_control_values():
    window = _param("gna", "window")
    for text in ("3,8,8", "3x8x8", "(3, 8, 8)", " 3 8 8 ", "[3,8,8]"):
        assert parse_control(window, text) == (3, 8, 8), text
    assert parse_control(window, "4") == (4,)
    stride = _param("gna", "stride")
    assert parse_control(stride, "") is None and parse_control(stride, "   ") is None  # blank = default
    decay = _param("radial", "decay_factor")
    assert parse_control(decay, "0.5") == 0.5 and parse_control(decay, "") is None
    dense_steps = _param("radial", "dense_steps")
    assert parse_control(dense_steps, "0") == 0  # 0 is a value, not "blank"
    assert parse_control(dense_steps, 3.0) == 3 and isinstance(parse_control(dense_steps, 3.0), int)
    sink = _param("radial", "sink")
    assert [parse_control(sink, v) for v in ("default", "on", "off")] == [None, True, False]
    shift = _param("hidiffusion", "shift")
    assert parse_control(shift, 2) == 2 and parse_control(shift, 2, use_default=True) is None
    backend = _param("gna", "backend")
    assert parse_control(backend, "gather") == "gather"
    assert parse_control(_param("hidiffusion", "apply_raunet"), False) is False


@pytest.mark.parametrize("method, name, raw, message", [
    ("gna", "window", "", "'window' is required"),
    ("gna", "window", "4,abc", "tuple of ints"),
    ("gna", "window", "3,,8", "tuple of ints"),
    ("gna", "window", "0,4", "must be in [1"),
    ("radial", "decay_factor", "-1", "must be in [0.0"),
    ("radial", "decay_factor", "fast", "must be a number"),
    ("radial", "decay_factor", "nan", "finite"),
    ("radial", "dense_steps", "2.5", "must be int"),
    ("hidiffusion", "t1_ratio", 1.5, "must be in [0.0, 1.0]"),
    ("gna", "backend", "cuda", "must be one of"),
])
def test_parse_control_errors_are_readable(method, name, raw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_control(_param(method, name), raw)


def test_collect_params_keeps_only_what_was_set():
    raw = {"window": "4,6", "stride": "", "dilation": "1", "dense_layers": 0, "dense_steps": 0, "backend": "auto"}
    assert collect_params("gna", raw) == {"window": (4, 6), "dilation": (1,), "dense_layers": 0, "dense_steps": 0,
                                          "backend": "auto"}
    assert collect_params("none", {"anything": 1}) == {}
    assert collect_params("radial", {"decay_factor": "", "sink": "default", "dense_steps": "0"}) == {"dense_steps": 0}


# ---------------------------------------------------------------------------------------------------------
# Token layouts for the pattern picture
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-flux-random", "tiny-sd3", "tiny-wan-random", "tiny-hunyuanvideo"])
def test_token_layout_matches_the_run_context(name):
    """The layout the UI draws is the one the processors see in a real run (grid and text tokens)."""
    import diffusion_attn as da
    from diffusion_attn.models import build_pipeline, default_call_kwargs

    family = EMBEDDED_MODELS[name].family
    frames = 5 if family in ("wan", "hunyuanvideo") else None
    kwargs = default_call_kwargs(name, num_inference_steps=1, height=64, width=96)
    if frames:
        kwargs["num_frames"] = frames
    pipe = build_pipeline(name)
    with da.applied(pipe, "gna", window=2) as handle:
        pipe(prompt="a cat", **kwargs)
        seen = TokenLayout(handle.context.grid, handle.context.text_len)
    layout = token_layout(name, family, 64, 96, frames)
    assert (layout.grid, layout.text_len) == (seen.grid, seen.text_len)
    assert layout.text_position == ("first" if family == "flux" else "last")


def test_token_layout_unets_and_full_size_models():
    assert token_layout("tiny-sd15-random", "unet-sd15", 128, 192).grid == (16, 24)
    assert token_layout("tiny-sdxl", "unet-sdxl", 256, 384).grid == (16, 24)
    flux = token_layout("black-forest-labs/FLUX.1-dev", "flux", 1024, 1024)
    assert (flux.grid, flux.text_len, flux.text_position) == ((64, 64), 512, "first")
    wan = token_layout("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan", 480, 832, 81)
    assert (wan.grid, wan.text_len) == ((21, 30, 52), 0)
    with pytest.raises(ValueError, match="too small"):
        token_layout("tiny-flux-random", "flux", 8, 8)


# ---------------------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------------------


def test_generate_image_with_progress_metadata_and_pattern():
    from PIL import Image

    progress = Progress()
    req = Request(model="tiny-flux-random", method="gna", params={"window": "4,6", "stride": "2,3"}, steps=2, seed=3)
    out = generate_outputs(req, progress=progress)
    assert not out["is_video"] and out["video"] is None
    assert len(out["frames"]) == 1 and out["frames"][0].size == (192, 128)
    info = out["info"]
    assert info["method"] == "gna" and info["params"]["window"] == [4, 6] and info["params"]["stride"] == [2, 3]
    assert info["seed"] == 3 and info["steps"] == 2 and info["seconds"] > 0 and info["seconds_per_step"] > 0
    assert ((2, 2), "gna: step 2/2") in progress.calls  # the runner's per-step callback reached the bar
    assert isinstance(out["pattern"], Image.Image) and "8x12 + 32 text" in out["note"]


def test_generate_video_and_blank_fields_mean_defaults():
    req = Request(model="tiny-wan-random", method="radial", params={"decay_factor": "", "sink": "default", "dense_steps": "0"},
                  steps="2", num_frames="5", height="", width=" ", guidance_scale="")
    out = generate_outputs(req)
    assert out["is_video"] and len(out["frames"]) == 5
    assert out["video"] and out["video"].endswith((".mp4", ".gif"))
    params = out["info"]["params"]
    assert params["dense_steps"] == 0 and params["decay_factor"] == 0.2 and params["sink"] is True  # Wan defaults
    assert out["info"]["call_kwargs"]["height"] == 128


def test_compare_with_dense():
    req = Request(model="tiny-flux-random", method="gna", params={"window": "4,6"}, steps=2)
    progress = Progress()
    out = compare_outputs(req, progress=progress)
    assert len(out["frames"]) == 1 and out["frames"][0].width > 2 * 192  # dense | method, with a caption strip
    info = out["info"]
    assert info["method"] == "gna" and info["mean_abs_diff"] > 0 and 0 < info["psnr"] < 100  # a 4x6 window changes the image
    assert info["speedup"] == pytest.approx(info["dense_seconds_per_step"] / info["method_seconds_per_step"], rel=1e-2)
    assert info["dense_seconds"] > 0 and info["method_seconds"] > 0
    assert progress.calls[-1][0] == (4, 4)  # both runs' steps
    with pytest.raises(ValueError, match="choose a method"):
        compare_outputs(Request(model="tiny-flux-random", method="none"))


def test_pattern_outputs():
    image, note = pattern_outputs(Request(model="tiny-sd15-random", method="hidiffusion", height="128", width="192"))
    assert image is not None and "16x24" in note
    assert pattern_outputs(Request(method="none"))[0] is None
    image, note = pattern_outputs(Request(model="tiny-wan-random", method="radial", height="2048", width="2048",
                                          num_frames="121"))
    assert image is None and "too large" in note
    image, note = pattern_outputs(Request(model="some-org/unknown-model", method="gna", params={"window": "3"}))
    assert image is None and "family is known" in note
    with pytest.raises(ValueError, match="does not support flux"):
        pattern_outputs(Request(model="tiny-flux-random", method="radial"))


@pytest.mark.parametrize("req, message", [
    (Request(model="tiny-flux-random", method="radial", steps=2), "does not support flux models"),
    (Request(model="tiny-flux-random", method="gna", params={"window": "4,abc"}), "tuple of ints"),
    (Request(model="tiny-wan-random", method="radial", params={"decay_factor": "-1"}), r"must be in \[0\.0"),
    (Request(model="tiny-flux-random", method="none", steps="0"), "steps must be a positive integer"),
    (Request(model="tiny-flux-random", method="none", height="abc"), "height must be a number"),
    (Request(model="", method="none"), "choose a model"),
])
def test_user_errors_raise_before_any_run(req, message):
    with pytest.raises(ValueError, match=message):
        generate_outputs(req)


# ---------------------------------------------------------------------------------------------------------
# The Blocks
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[ui]")')
    from diffusion_attn.ui import build_demo

    return build_demo()


def _fn(demo, name):
    return next(f for f in demo.fns.values() if f.name == name)


def _data(fn, **by_elem_id):
    """The event's input dict as the browser would send it (initial values), with some overridden."""
    data = {c: c.value for c in fn.inputs}
    for c in fn.inputs:
        if c.elem_id in by_elem_id:
            data[c] = by_elem_id.pop(c.elem_id)
    assert not by_elem_id, f"no such inputs: {by_elem_id}"
    return data


def test_blocks_have_a_control_per_parameter_and_a_queue(demo):
    import gradio as gr

    assert isinstance(demo, gr.Blocks)
    generated = {(c.method, c.param.name) for c in demo.da_controls}
    assert generated == {(s.name, p.name) for s in methods().values() for p in s.params}
    kinds = {(c.method, c.param.name): type(c.component).__name__ for c in demo.da_controls}
    assert kinds[("gna", "window")] == "Textbox" and kinds[("gna", "backend")] == "Dropdown"
    assert kinds[("hidiffusion", "apply_raunet")] == "Checkbox" and kinds[("hidiffusion", "t1_ratio")] == "Slider"
    assert kinds[("radial", "sink")] == "Radio" and kinds[("gna", "dense_layers")] == "Number"
    t1 = next(c for c in demo.da_controls if c.param.name == "t1_ratio")
    assert (t1.component.minimum, t1.component.maximum) == (0.0, 1.0) and t1.use_default is not None
    assert demo._queue.max_size is not None and demo._queue.default_concurrency_limit == 1
    gen, cmp = _fn(demo, "on_generate"), _fn(demo, "on_compare")
    assert gen.concurrency_id == cmp.concurrency_id and gen.concurrency_limit == 1  # one pipeline user at a time


def test_method_choice_shows_only_its_controls(demo):
    fn = _fn(demo, "on_method")
    *groups, info = fn.fn("gna", "tiny-flux-random", "")
    names = list(methods())
    assert [g["visible"] for g in groups] == [n == "gna" for n in names]
    assert "Generalized Neighborhood" in info or "gna" in info
    *groups, info = fn.fn("none", "tiny-flux-random", "")
    assert not any(g["visible"] for g in groups) and "stock" in info
    *_, info = fn.fn("radial", "tiny-flux-random", "")
    assert "does not run on flux" in info


def test_model_choice_updates_defaults(demo):
    from diffusion_attn.models.world import IMAGE_PROMPT
    from diffusion_attn.ui import DEFAULT_PROMPT

    on_model = _fn(demo, "on_model").fn
    info, prompt, height, width, frames, guidance = on_model("tiny-sdxl", "", "hidiffusion", DEFAULT_PROMPT)
    assert height["placeholder"] == "256" and width["placeholder"] == "384" and frames["visible"] is False
    info, *_, frames, _ = on_model("tiny-wan-random", "", "radial", DEFAULT_PROMPT)
    assert frames["visible"] is True and frames["placeholder"] == "9" and "decay_factor=0.2" in info
    info, *_ = on_model("tiny-wan22", "", "radial", DEFAULT_PROMPT)
    assert "decay_factor=0.8" in info  # Wan 2.2's own defaults
    # an untouched example prompt follows the model (a trained image model gets one it draws) ...
    _, prompt, height, *_ = on_model("tiny-flux", "", "gna", DEFAULT_PROMPT)
    assert prompt["value"] == IMAGE_PROMPT and height["placeholder"] == "64"
    # ... a prompt the user wrote stays
    _, prompt, *_ = on_model("tiny-flux", "", "gna", "a purple square on the right")
    assert "value" not in prompt


def test_generate_event_end_to_end(demo):
    from PIL import Image

    fn = _fn(demo, "on_generate")
    data = _data(fn, **{"da-model": "tiny-flux-random", "da-method": "gna", "da-gna-window": "4,6", "da-steps": 2})
    gallery, video, animation, pattern, note, info = fn.fn(data, Progress())
    assert len(gallery["value"]) == 1 and isinstance(gallery["value"][0], Image.Image)
    assert video["visible"] is False and animation["visible"] is False
    assert isinstance(pattern, Image.Image) and info["method"] == "gna"
    # video: the file goes to the video player (MP4) or the animated image (GIF)
    data = _data(fn, **{"da-model": "tiny-wan-random", "da-steps": 2, "da-frames": "5",
                        "da-radial-dense-steps": "0"})  # + radial
    gallery, video, animation, pattern, note, info = fn.fn(data, Progress())
    assert len(gallery["value"]) == 5 and (video["visible"] or animation["visible"])
    assert info["params"]["dense_steps"] == 0 and "2x8x12" in note  # the pattern of the size generated


def test_errors_reach_the_page_as_gr_error(demo, tmp_path):
    import gradio as gr

    fn = _fn(demo, "on_generate")
    cases = [
        ({"da-model": "tiny-flux-random", "da-method": "radial"}, "does not support flux"),
        ({"da-model": "tiny-flux-random", "da-method": "gna", "da-gna-window": "4,abc"}, "tuple of ints"),
        ({"da-radial-decay-factor": "-1"}, "decay_factor"),
        ({"da-model-path": str(tmp_path), "da-method": "none"}, "Could not load a diffusers pipeline"),
        ({"da-method": "none", "da-steps": 1, "da-backend": "no-such-backend"}, "unknown attention backend"),
    ]
    for overrides, message in cases:
        with pytest.raises(gr.Error, match=message) as err:
            fn.fn(_data(fn, **overrides), Progress())
        assert "Traceback" not in str(err.value)
    with pytest.raises(gr.Error, match="tuple of ints"):
        _fn(demo, "on_compare").fn(_data(fn, **{"da-method": "gna", "da-model": "tiny-flux-random",
                                                 "da-gna-window": "x"}), Progress())
    with pytest.raises(gr.Error, match="does not support"):
        _fn(demo, "on_pattern").fn(_data(fn, **{"da-model": "tiny-sd15-random"}))  # radial on a UNet


def test_unexpected_errors_are_shown_without_traceback(demo, monkeypatch):
    import gradio as gr

    from diffusion_attn import runner

    def boom(*args, **kwargs):
        raise RuntimeError("the accelerator caught fire")

    monkeypatch.setattr(runner, "generate", boom)
    fn = _fn(demo, "on_generate")
    with pytest.raises(gr.Error, match="RuntimeError: the accelerator caught fire"):
        fn.fn(_data(fn), Progress())


def test_request_blanks_and_defaults():
    kw = Request(model="tiny-flux-random", method="none", attention_backend="default", num_frames="9", seed=None).generate_kwargs()
    assert kw["attention_backend"] is None and kw["num_frames"] is None and kw["seed"] == 0  # image model: no frames
    kw = Request(model="tiny-wan-random", method="none", attention_backend="native", num_frames="5", steps=2.0).generate_kwargs()
    assert (kw["attention_backend"], kw["num_frames"], kw["steps"]) == ("native", 5, 2)
