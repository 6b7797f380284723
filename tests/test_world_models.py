"""The shipped shapes-world models (tiny-flux, tiny-sd15, tiny-wan): what is on disk, that they load through
the ordinary from_pretrained path with no network, that they draw what a simple prompt asks (judged by the
weight-free scorer on a few held-out prompts), and that methods run on them."""

import json
from pathlib import Path

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.data import parse_caption, score_image, score_video
from diffusion_attn.models import EMBEDDED_MODELS, build_pipeline, default_call_kwargs, default_prompt
from diffusion_attn.models.world import WORLD_MODELS, weights_dir

NAMES = list(WORLD_MODELS)


@pytest.fixture(scope="module")
def pipes():
    return {}


def _pipe(pipes, name):
    if name not in pipes:
        pipes[name] = build_pipeline(name)
    return pipes[name]


def test_shipped_weights_are_small_fp16_safetensors():
    from safetensors import safe_open

    total = 0
    for name in NAMES:
        root = weights_dir(name)
        assert (root / "model_index.json").is_file(), f"{name} is not shipped at {root}"
        files = list(root.rglob("*.safetensors"))
        assert files and not list(root.rglob("*.bin")), name
        for path in files:
            total += path.stat().st_size
            with safe_open(str(path), "pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
        record = json.loads((root / "training.json").read_text())
        assert record["steps_done"] > 0 and record["config"]["target"] == name
    assert total <= 25 * 2**20, f"shipped weights are {total / 2**20:.1f} MB, more than the 25 MB budget"


@pytest.mark.parametrize("name", NAMES)
def test_loads_offline_through_from_pretrained(name, pipes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = _pipe(pipes, name)
    assert EMBEDDED_MODELS[name].trained and EMBEDDED_MODELS[name].family == WORLD_MODELS[name].family
    assert type(pipe).__name__ == {"tiny-flux": "FluxPipeline", "tiny-sd15": "StableDiffusionPipeline",
                                   "tiny-wan": "WanPipeline"}[name]
    denoiser = pipe.unet if name == "tiny-sd15" else pipe.transformer
    assert next(denoiser.parameters()).dtype == torch.float32  # fp16 on disk, float32 to run on a CPU
    assert not parse_caption(default_prompt(name)).unparsed  # the example prompt is one the world speaks


# One single-object prompt per palette colour (seed = its index): how often a shape of the named colour is in
# the picture. Deterministic on a CPU, so a regression check on loading, the text path and the sampler, not a
# statistical claim (that is benchmarks/quality.py). Measured when the weights were shipped: tiny-flux 6/7,
# tiny-sd15 2/7, tiny-wan 2/7; the random-weight tiny-flux-random 0/7 (noise has no palette-coloured shape).
# Shape classes are not asserted: the shipped models draw colours and places far more often than crisp shapes.
COLOUR_HITS = {"tiny-flux": 5, "tiny-sd15": 2, "tiny-wan": 2, "tiny-flux-random": 0}


def _colour_hits(pipe, name):
    from diffusion_attn.data import PALETTE

    hits = 0
    for i, colour in enumerate(PALETTE):
        prompt = f"a {colour} {('circle', 'square', 'triangle')[i % 3]} " + (
            "moving right" if name == "tiny-wan" else "in the center")
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(i), **default_call_kwargs(name))[0]
        score = score_video(out[0], prompt) if name == "tiny-wan" else score_image(out[0], prompt)
        hits += colour in {d.colour for d in score.detections}
    return hits


@pytest.mark.parametrize("name", NAMES)
def test_draws_the_colour_a_simple_prompt_asks(name, pipes):
    assert _colour_hits(_pipe(pipes, name), name) >= COLOUR_HITS[name]
    if name == "tiny-flux":  # the same prompts on random weights: no colour is ever right
        assert _colour_hits(build_pipeline("tiny-flux-random"), "tiny-flux-random") == 0


@pytest.mark.parametrize("name, method, params", [
    ("tiny-flux", "gna", {"window": (8, 8)}),  # a window covering the 8 x 8 token grid: dense
    ("tiny-wan", "gna", {"window": (2, 8, 8)}),
])
def test_full_window_reproduces_stock_attention(name, method, params, pipes):
    pipe = _pipe(pipes, name)
    kwargs = default_call_kwargs(name, num_inference_steps=2)
    dense = pipe(prompt=default_prompt(name), generator=torch.Generator().manual_seed(0), **kwargs)[0]
    with da.applied(pipe, method, **params):
        out = pipe(prompt=default_prompt(name), generator=torch.Generator().manual_seed(0), **kwargs)[0]
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-4)


def test_hidiffusion_runs_at_twice_the_training_resolution(pipes):
    pipe = _pipe(pipes, "tiny-sd15")
    kwargs = default_call_kwargs("tiny-sd15", height=128, width=128, num_inference_steps=4)
    with da.applied(pipe, "hidiffusion"):
        out = pipe(prompt=default_prompt("tiny-sd15"), generator=torch.Generator().manual_seed(0), **kwargs)[0]
    assert tuple(out.shape) == (1, 3, 128, 128) and torch.isfinite(out).all()


def test_unknown_model_and_bad_resolution_errors():
    with pytest.raises(ValueError, match="Did you mean 'tiny-wan'"):
        build_pipeline("tiny-wann")
    from diffusion_attn.runner import generate

    with pytest.raises(ValueError, match="height=60 does not fit this flux model: .* multiples of 8 px.*56 or 64"):
        generate("tiny-flux", "none", prompt="a red circle", height=60, width=64, steps=1)
    with pytest.raises(ValueError, match="width=70 .* multiples of 8 px"):
        generate("tiny-wan", "none", prompt="a red circle moving up", height=64, width=70, steps=1)


def test_guidance_scale_sets_true_cfg_for_tiny_flux():
    kwargs = default_call_kwargs("tiny-flux", guidance_scale=7.0)
    assert kwargs["true_cfg_scale"] == 7.0 and "guidance_scale" not in kwargs
    assert Path(weights_dir("tiny-flux")).name == "tiny-flux"
