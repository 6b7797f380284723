"""The CLI, the runner and compare: flags generated from the specs, outputs with their metadata, clean
pipelines after every run, clear errors."""

import json
import re
import sys
import types

import numpy as np
import pytest
from PIL import Image

import diffusion_attn as da
from diffusion_attn import runner
from diffusion_attn.cli import build_parser, main
from diffusion_attn.runner import GenerationResult


def _video_suffix():
    return ".mp4" if runner.video_encoder_available() else ".gif"


# ------------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------------


def test_generate_writes_video_and_metadata(tmp_path, capsys):
    out = tmp_path / "radial"
    assert main(["generate", "--method", "radial", "--model", "tiny-wan-random", "--steps", "2", "--dense-steps", "0",
                 "--decay-factor", "0.5", "--no-progress", "--output", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["method"] == "radial" and meta["params"]["decay_factor"] == 0.5 and meta["params"]["dense_steps"] == 0
    assert meta["params"]["sink"] is True  # Wan default from the official scripts
    assert meta["family"] == "wan" and meta["seed"] == 0 and meta["steps"] == 2
    assert meta["call_kwargs"]["num_frames"] == 9 and meta["size"] == {"width": 192, "height": 128, "frames": 9}
    assert meta["seconds_per_step"] > 0 and set(meta["versions"]) >= {"diffusers", "torch", "diffusion_attn"}
    written = out.with_suffix(_video_suffix())
    assert written.stat().st_size > 0 and meta["output"] == written.name
    assert str(written) in capsys.readouterr().out


def test_generate_image_png(tmp_path):
    out = tmp_path / "gna"
    assert main(["generate", "--method", "gna", "--window", "4x6", "--stride", "2,3", "--model", "tiny-flux-random",
                 "--steps", "2", "--no-progress", "--output", str(out)]) == 0
    img = Image.open(out.with_suffix(".png"))
    assert img.size == (192, 128)
    meta = json.loads(img.text["diffusion_attn"])
    assert meta["params"]["window"] == [4, 6] and meta["params"]["stride"] == [2, 3]
    assert meta["prompt"] and meta["model"] == "tiny-flux-random" and meta["call_kwargs"]["num_inference_steps"] == 2
    assert json.loads(out.with_suffix(".json").read_text())["params"] == meta["params"]


def test_generate_progress_bar(tmp_path, capsys):
    assert main(["generate", "--method", "none", "--model", "tiny-flux-random", "--steps", "2", "--output", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "none on tiny-flux-random" in err and "2/2" in err


def test_runner_callback_cache_and_clean_pipeline():
    calls = []
    pipe = runner.get_pipeline("tiny-flux-random")
    stock = {k: type(v) for k, v in pipe.transformer.attn_processors.items()}
    result = runner.generate("tiny-flux-random", "gna", {"window": (4, 6)}, prompt="a cat", steps=3,
                             callback=lambda i, total: calls.append((i, total)))
    assert calls == [(0, 3), (1, 3), (2, 3)]
    assert runner.get_pipeline("tiny-flux-random") is pipe  # cached
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == stock  # method removed
    assert not da.remove(pipe)
    assert result.params["window"] == [4, 6] and not result.is_video and len(result.frames) == 1
    json.dumps(result.meta)  # JSON-able

    def boom(i, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        runner.generate(pipe, "gna", {"window": (4, 6)}, prompt="a cat", steps=2, callback=boom)
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == stock  # removed on errors too
    assert not da.remove(pipe)


def test_runner_attention_backend_is_restored():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    pipe = runner.get_pipeline("tiny-flux-random")
    before = _AttentionBackendRegistry._active_backend
    procs = list(pipe.transformer.attn_processors.values())
    result = runner.generate("tiny-flux-random", "gna", {"window": (4, 6)}, prompt="a cat", steps=2, attention_backend="flex")
    assert result.meta["attention_backend"] == "flex"
    assert _AttentionBackendRegistry._active_backend == before
    assert all("_attention_backend" not in vars(p) for p in procs)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flexx' \(did you mean 'flex'\?\); accepted: .*native"):
        runner.generate("tiny-flux-random", prompt="a cat", steps=1, attention_backend="flexx")


def test_save_video_formats(tmp_path, monkeypatch):
    frames = [Image.new("RGB", (32, 16), (10 * i, 0, 0)) for i in range(3)]
    result = GenerationResult(frames=frames, is_video=True, family="wan", method="none", params={}, seconds=1.0,
                              seconds_per_step=0.5, meta={"method": "none"})
    monkeypatch.setattr(runner, "video_encoder_available", lambda: False)
    with pytest.warns(UserWarning, match="no MP4 encoder"):
        path = runner.save(result, tmp_path / "v.mp4")
    assert path.suffix == ".gif" and Image.open(path).n_frames == 3
    assert json.loads(path.with_suffix(".json").read_text())["output"] == "v.gif"

    written = {}

    def fake_export(video_frames, output_video_path, fps=10, **kw):
        written.update(n=len(video_frames), fps=fps)
        open(output_video_path, "wb").write(b"mp4")
        return output_video_path

    import diffusers.utils

    monkeypatch.setattr(runner, "video_encoder_available", lambda: True)
    monkeypatch.setattr(diffusers.utils, "export_to_video", fake_export)
    path = runner.save(result, tmp_path / "v2")
    assert path.suffix == ".mp4" and written == {"n": 3, "fps": 16}
    assert runner.save(result, tmp_path / "v3.gif").suffix == ".gif"  # .gif forces a GIF


@pytest.mark.skipif(not runner.video_encoder_available(), reason="no MP4 encoder (imageio-ffmpeg / opencv) installed")
def test_generate_mp4(tmp_path):
    out = tmp_path / "wan.mp4"
    assert main(["generate", "--method", "none", "--model", "tiny-wan-random", "--steps", "1", "--no-progress", "--output", str(out)]) == 0
    assert out.stat().st_size > 0 and out.with_suffix(".json").exists()


# ------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------


def test_errors_exit_nonzero(capsys):
    assert main(["generate", "--method", "radial", "--window", "3"]) == 2
    assert "does not take --window" in capsys.readouterr().err
    assert main(["generate", "--method", "radail"]) == 2
    assert "did you mean 'radial'" in capsys.readouterr().err
    assert main(["generate", "--method", "gna", "--model", "tiny-flux-random", "--no-progress"]) == 2
    assert "'window' is required" in capsys.readouterr().err
    assert main(["generate", "--method", "radial", "--model", "tiny-flux-random"]) == 2
    assert "supported families: wan, hunyuanvideo" in capsys.readouterr().err
    assert main(["generate", "--method", "radial", "--decay-factor", "-1", "--model", "tiny-wan-random"]) == 2
    assert "'decay_factor' must be in [0.0, inf]" in capsys.readouterr().err
    assert main(["generate", "--method", "gna", "--windw", "3"]) == 2
    assert "unrecognized arguments: --windw 3 (did you mean --window?)" in capsys.readouterr().err
    assert main(["generate", "--method", "none", "--model", "tiny-fluxx"]) == 2
    assert "Did you mean 'tiny-flux'?" in capsys.readouterr().err
    assert main(["generate", "--method", "none", "--model", "/nonexistent/model-dir"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusion-attn: error: Could not load a diffusers pipeline") and err.count("\n") == 1
    assert main(["generate", "--method", "hidiffusion", "--model", "tiny-sd15-random", "--attention-backend", "native"]) == 2
    assert "attention backends are not supported by UNet2DConditionModel" in capsys.readouterr().err
    assert main(["generate", "--method", "none", "--model", "tiny-flux-random", "--num-frames", "9"]) == 2
    assert "num_frames is for video models" in capsys.readouterr().err
    assert main(["compare", "--method", "none", "--model", "tiny-flux-random"]) == 2
    assert "compare needs a method" in capsys.readouterr().err


def test_help_on_every_command(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"generate", "compare", "mask", "methods", "simulate", "ui", "export-comfy", "train"}
    for name in commands:
        assert main([name, "--help"]) == 0
        assert f"usage: diffusion-attn {name}" in capsys.readouterr().out
    assert main(["--help"]) == 0


def test_methods_table(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "--window" in text and "--decay-factor" in text and "per model" in text and "--hidiffusion-seed" in text
    assert main(["methods", "--json"]) == 0
    specs = json.loads(capsys.readouterr().out)
    assert set(specs) == set(da.methods()) and specs["gna"]["params"][0]["name"] == "window"


# ------------------------------------------------------------------------------------------------------
# mask
# ------------------------------------------------------------------------------------------------------


def _printed_density(text):
    return float(re.search(r"density ([0-9.]+)", text).group(1))


@pytest.mark.parametrize("argv, method, layout, params", [
    (["--method", "radial", "--grid", "3x8x12", "--text", "16"], "radial", da.TokenLayout((3, 8, 12), 16), {}),
    (["--method", "gna", "--window", "8", "--stride", "4", "--grid", "64x64", "--text", "32", "--text-position", "first",
      "--max-side", "300"], "gna", da.TokenLayout((64, 64), 32, "first"), {"window": 8, "stride": 4}),
    (["--method", "radial", "--family", "hunyuanvideo", "--grid", "4x8x16"], "radial", da.TokenLayout((4, 8, 16)),
     {"family": "hunyuanvideo"}),
])
def test_mask_command(tmp_path, capsys, argv, method, layout, params):
    from diffusion_attn.viz import render_pattern

    out = tmp_path / "mask.png"
    assert main(["mask", *argv, "--output", str(out)]) == 0
    printed = _printed_density(capsys.readouterr().out)
    expected = da.attention_mask(method, layout, **params).double().mean().item()
    assert printed == pytest.approx(expected, abs=1e-6)
    img = Image.open(out)
    max_side = 300 if "--max-side" in argv else 768
    ref = render_pattern(method, layout, max_side=max_side, **params)
    assert img.size == ref.size
    x0, y0, x1, y1 = ref.info["matrix_box"]
    assert x1 - x0 == y1 - y0 <= max_side and x1 - x0 >= max_side - layout.num_tokens


def test_mask_errors(capsys, tmp_path):
    assert main(["mask", "--method", "gna", "--grid", "8x12", "--output", str(tmp_path / "m.png")]) == 2
    assert "'window' is required" in capsys.readouterr().err
    assert main(["mask", "--method", "gna", "--window", "0", "--grid", "8x12"]) == 2
    assert "'window' must be in [1, inf]" in capsys.readouterr().err
    assert main(["mask", "--method", "gan", "--grid", "8x12"]) == 2
    assert "did you mean 'gna'" in capsys.readouterr().err
    assert main(["mask", "--method", "radial", "--grid", "8xa"]) == 2
    assert "--grid must be" in capsys.readouterr().err
    assert main(["mask", "--method", "radial", "--grid", "3x8x12", "--family", "flux"]) == 2
    assert "radial does not support 'flux'; supported families: wan, hunyuanvideo" in capsys.readouterr().err
    assert main(["mask", "--method", "radial", "--grid", "3x8x12", "--family", "wan2.2", "--output", str(tmp_path / "m.png")]) == 0


# ------------------------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------------------------


def test_compare_full_window_is_identical(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--method", "gna", "--window", "8,12", "--model", "tiny-flux-random", "--steps", "2",
                 "--no-warmup", "--no-progress", "--output", str(out)]) == 0
    assert "identical" in capsys.readouterr().out
    img = Image.open(out.with_suffix(".png"))
    assert img.width == 2 * 192 + 8 and img.height > 128
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["compare"]["mean_abs_diff"] == 0 and meta["compare"]["max_abs_diff"] == 0 and meta["compare"]["psnr"] == "inf"
    assert meta["method"]["params"]["window"] == [8, 12] and meta["dense"]["method"] == "none"
    assert meta["method"]["seed"] == meta["dense"]["seed"]


def test_compare_api_reports_difference():
    from diffusion_attn.compare import compare

    calls = []
    cmp = compare("tiny-flux-random", "gna", {"window": (2, 3)}, prompt="a cat", seed=1, steps=2,
                  callback=lambda i, total: calls.append((i, total)))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert cmp.mean_abs_diff > 0 and cmp.max_abs_diff > 0 and 0 < cmp.psnr < 100
    dense = np.asarray(cmp.dense.frames[0], dtype=np.float64)
    method = np.asarray(cmp.method.frames[0], dtype=np.float64)
    assert cmp.mean_abs_diff == pytest.approx(np.abs(dense - method).mean())
    assert cmp.speedup == pytest.approx(cmp.dense.seconds_per_step / cmp.method.seconds_per_step)
    assert cmp.side_by_side.size == (2 * 192 + 8, cmp.side_by_side.height)
    assert cmp.side_by_side.crop((0, 0, 192, 128)).tobytes() == cmp.dense.frames[0].tobytes()
    assert cmp.side_by_side.crop((200, 0, 392, 128)).tobytes() == cmp.method.frames[0].tobytes()
    assert json.dumps(cmp.summary())


def test_compare_reports_ssim_and_the_scorers_verdict():
    from skimage.metrics import structural_similarity

    from diffusion_attn.compare import compare

    cmp = compare("tiny-flux-random", "gna", {"window": (2, 3)}, prompt="a red circle at the top left", seed=1, steps=2)
    dense = np.asarray(cmp.dense.frames[0], dtype=np.float64) / 255
    method = np.asarray(cmp.method.frames[0], dtype=np.float64) / 255
    expected = structural_similarity(dense, method, data_range=1.0, channel_axis=-1, win_size=7)
    assert cmp.ssim == pytest.approx(expected) and cmp.ssim < 1
    # random weights draw noise: the scorer finds no red circle in either output, and says so per output
    assert set(cmp.scores) == {"dense", "method"}
    for verdict in cmp.scores.values():
        assert verdict["object_correct"] is False and verdict["missing"] == ["red circle"]
    summary = cmp.summary()
    assert summary["ssim"] == round(cmp.ssim, 4) and summary["scores"] == cmp.scores
    # a prompt the world cannot draw: generated all the same, not scored, the unknown words reported
    cmp = compare("tiny-flux-random", "gna", {"window": (2, 3)}, prompt="a pink star", seed=1, steps=2)
    assert cmp.scores is None and cmp.meta["scorer_unparsed"] == ["pink", "star"]


# ------------------------------------------------------------------------------------------------------
# ui / export-comfy wiring (the modules are others'; here only the CLI's calls)
# ------------------------------------------------------------------------------------------------------


def test_ui_and_export_comfy_wiring(monkeypatch, tmp_path, capsys):
    seen = {}
    ui = types.ModuleType("diffusion_attn.ui")
    ui.launch = lambda host, port, share: seen.update(ui=(host, port, share))
    comfy = types.ModuleType("diffusion_attn.comfy.export")
    comfy.export_node_folder = lambda d: [tmp_path / "x" / "__init__.py", tmp_path / "x" / "README.md"]
    monkeypatch.setitem(sys.modules, "diffusion_attn.ui", ui)
    monkeypatch.setitem(sys.modules, "diffusion_attn.comfy.export", comfy)
    assert main(["ui", "--host", "0.0.0.0", "--port", "7861", "--share"]) == 0
    assert seen["ui"] == ("0.0.0.0", 7861, True)
    assert main(["export-comfy", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "__init__.py" in out and "wrote 2 files" in out

    def no_gradio(*a):
        raise ImportError("No module named 'gradio'")

    ui.launch = no_gradio
    assert main(["ui"]) == 2
    assert "No module named 'gradio'" in capsys.readouterr().err


def test_generate_from_a_saved_checkpoint_uses_its_own_defaults(tmp_path):
    from diffusion_attn.models import build_pipeline

    build_pipeline("tiny-flux-random").save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "real"
    assert main(["generate", "--method", "gna", "--window", "4,6", "--model", str(tmp_path / "ckpt"), "--height", "128",
                 "--width", "192", "--steps", "1", "--no-progress", "--output", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["family"] == "flux" and meta["size"] == {"width": 192, "height": 128, "frames": 1}
    # only what was given is passed; the tiny models' small-size defaults are not forced on a checkpoint
    assert meta["call_kwargs"] == {"num_inference_steps": 1, "height": 128, "width": 192}


# ------------------------------------------------------------------------------------------------------
# B10: one-line argparse errors, device, steps, `--method none` flags, output path -- before any loading
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a pipeline gets loaded."""
    from diffusion_attn.runner import generation

    def refuse(*a, **k):
        raise AssertionError("a pipeline was loaded before the error")

    monkeypatch.setattr(generation, "get_pipeline", refuse)
    monkeypatch.setattr(runner, "get_pipeline", refuse)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--method", "gna", "--widnow", "3"], "unrecognized arguments: --widnow 3 (did you mean --window?)"),
    (["generate", "--dtype", "float33"], "argument --dtype: invalid choice: 'float33'"),
    (["generate", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["generate", "--window"], "argument --window: expected one argument"),
    (["mask", "--method", "gna", "--grid", "8x8", "--text-position", "middle"], "invalid choice: 'middle'"),
    (["mask", "--grid", "8x8"], "the following arguments are required: --method"),
    (["generat", "--method", "gna"], "invalid choice: 'generat'"),
    (["generat"], "(did you mean generate?)"),
    ([], "the following arguments are required: COMMAND"),
])
def test_argparse_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "usage:" not in err, err


def test_device_cuda_without_cuda_is_one_line_before_loading(capsys, monkeypatch, tmp_path, no_loading):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in ("generate", "compare"):
        assert main([command, "--method", "gna", "--window", "3", "--model", "tiny-flux-random", "--device", "cuda",
                     "--no-progress", "--output", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "device 'cuda' is not available" in err and "use cpu" in err and err.count("\n") == 1
    assert main(["generate", "--method", "none", "--model", "tiny-flux-random", "--device", "gpu0"]) == 2
    assert "unknown device 'gpu0'" in capsys.readouterr().err


def test_mochi_needs_two_steps(capsys, tmp_path, no_loading):
    assert main(["generate", "--method", "none", "--model", "tiny-mochi", "--steps", "1", "--no-progress",
                 "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "mochi pipelines need at least 2 denoising steps" in err and "got steps=1" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="at least 2 denoising steps"):
        runner.generate("tiny-mochi", prompt="a fox", steps=1)


def test_method_none_with_method_flags_is_an_error(capsys, no_loading):
    assert main(["generate", "--method", "none", "--window", "3", "--decay-factor", "0.5", "--model", "tiny-flux-random"]) == 2
    err = capsys.readouterr().err
    assert "--method none (stock attention) takes no method flags, got --window, --decay-factor" in err


def test_unwritable_output_is_reported_before_generating(capsys, tmp_path, no_loading):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for command in ("generate", "compare"):
        assert main([command, "--method", "gna", "--window", "3", "--model", "tiny-flux-random", "--no-progress",
                     "--output", str(blocker / "sub" / "out")]) == 2
        err = capsys.readouterr().err
        assert f"cannot write the output '{blocker / 'sub' / 'out'}': '{blocker}' is a file, not a folder" in err
    assert main(["generate", "--method", "none", "--model", "tiny-flux-random", "--no-progress", "--output", str(tmp_path)]) == 2
    assert "it is a folder" in capsys.readouterr().err


def test_bad_method_values_fail_before_loading(capsys, no_loading):
    assert main(["generate", "--method", "radial", "--model", "tiny-wan-random", "--decay-factor", "nan"]) == 2
    assert "'decay_factor' must be a finite number, got nan" in capsys.readouterr().err
    assert main(["generate", "--method", "gna", "--model", "tiny-flux-random", "--window", "2.5,3"]) == 2
    assert "'window' must be an int or a tuple of ints" in capsys.readouterr().err
    assert main(["generate", "--method", "radial", "--model", "tiny-wan-random", "--backend", "strips"]) == 2
    assert "backend='strips' cannot run radial" in capsys.readouterr().err


def test_placement_flags(tmp_path, capsys):
    """--place-layers / --place-steps give the same image as apply(..., placement=...); the placement is in
    the metadata; with dense flags, with --method none, or malformed, it fails before loading."""
    from diffusion_attn.placement import Placement, StepWindow

    out = tmp_path / "placed"
    assert main(["generate", "--method", "gna", "--window", "3", "--model", "tiny-flux-random", "--steps", "4", "--no-progress",
                 "--place-layers", "single,0", "--place-steps", "0.5,", "--output", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["placement"] == "layers single,0; steps [0.5, end)"
    placement = Placement(layers=("single", 0), steps=StepWindow(0.5))
    by_api = runner.generate("tiny-flux-random", "gna", {"window": 3}, prompt=meta["prompt"], steps=4, placement=placement)
    by_cli = runner.generate("tiny-flux-random", "gna", {"window": 3}, prompt=meta["prompt"], steps=4,
                             placement=Placement.parse("single,0", "0.5,"))
    stock = runner.generate("tiny-flux-random", "none", prompt=meta["prompt"], steps=4)
    assert np.array_equal(np.asarray(by_api.image), np.asarray(by_cli.image))
    assert not np.array_equal(np.asarray(by_api.image), np.asarray(stock.image))
    assert Placement.parse("0-2,up", "2,10", "cond", "1,3") == Placement(
        layers=(range(0, 3), "up"), steps=StepWindow(2, 10), branches=("cond",), heads=(1, 3))
    assert Placement.parse(None, " ", "", None) is None


@pytest.mark.parametrize("argv, message", [
    (["--place-layers", "single", "--dense-steps", "1"], "either as --place-* flags or as --dense-steps, not both"),
    (["--place-layers", "encoder"], "unknown layer kind 'encoder'"),
    (["--place-layers", "3-1"], "layer range '3-1' ends before it starts"),
    (["--place-steps", "0.5"], "a step window is START,END"),
    (["--place-steps", "a,b"], "step window bound 'a' is neither a step index nor a fraction"),
    (["--place-steps", "1.5,"], "must be in [0, 1]"),
    (["--place-heads", "x"], "heads are comma-separated head indices"),
])
def test_placement_flag_errors_before_loading(capsys, no_loading, argv, message):
    assert main(["generate", "--method", "gna", "--window", "3", "--model", "tiny-flux-random", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert main(["generate", "--method", "none", "--model", "tiny-flux-random", "--place-steps", "1,2"]) == 2
    assert "takes no placement flags" in capsys.readouterr().err
