"""diffusion-attn train (diffusion_attn.training) and the shapes-world models (diffusion_attn.models.world):
word-level tokenizers, a few-step smoke run of every target, exact resume, export layout, bad input."""

import json
from pathlib import Path

import pytest
import torch

from diffusion_attn.cli import main
from diffusion_attn.models import world
from diffusion_attn.models.tokenizer import clip_tokenizer, t5_tokenizer
from diffusion_attn.training import TrainConfig, train


def test_word_tokenizers_give_one_token_per_world_word(tmp_path):
    from transformers import CLIPTokenizer, T5Tokenizer

    clip, t5 = clip_tokenizer(words=world.WORLD_WORDS), t5_tokenizer(words=world.WORLD_WORDS)
    for word in world.WORLD_WORDS:
        assert clip.tokenize(word) == [word + "</w>"], word
        assert t5.tokenize(word) == ["\u2581" + word], word
    # a word outside the world falls back to pieces (characters or word prefixes) and still round-trips
    for tokenizer in (clip, t5):
        pieces = tokenizer.tokenize("fox")
        ids = tokenizer("fox", add_special_tokens=False).input_ids
        assert len(pieces) > 1 and tokenizer.decode(ids).strip() == "fox"
    caption = "a red circle at the top left, a blue square at the bottom right and an orange triangle in the center"
    assert len(t5(caption).input_ids) == 23  # 22 words and the comma ... plus EOS
    clip.save_pretrained(tmp_path / "clip")
    t5.save_pretrained(tmp_path / "t5")
    assert CLIPTokenizer.from_pretrained(tmp_path / "clip")(caption).input_ids == clip(caption).input_ids
    assert T5Tokenizer.from_pretrained(tmp_path / "t5")(caption).input_ids == t5(caption).input_ids
    # the plain (character-level) tokenizers the random-weight models use are unchanged
    assert len(clip_tokenizer()) == 514


def _tiny(target, out, **kw):
    return TrainConfig(target, output_dir=str(out), data_size=16, batch_size=2, steps=kw.pop("steps", 2),
                       cache_dir=str(out / "cache"), progress=False, checkpoint_every=kw.pop("checkpoint_every", 100),
                       warmup_steps=1, **kw)


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """Every target trained for 2 steps on 16 samples (the smoke run of the training command)."""
    out = tmp_path_factory.mktemp("runs")
    finals = {t: train(_tiny(t, out)) for t in ("image-vae", "video-vae", "tiny-flux", "tiny-sd15", "tiny-wan")}
    return out, finals


def test_vae_export_carries_latent_statistics(trained_tiny):
    _, finals = trained_tiny
    image = json.loads((finals["image-vae"] / "config.json").read_text())
    video = json.loads((finals["video-vae"] / "config.json").read_text())
    assert image["scaling_factor"] > 0 and image["shift_factor"] is not None
    assert len(video["latents_mean"]) == len(video["latents_std"]) == 16 and min(video["latents_std"]) > 0
    assert image["scaling_factor"] != 0.18215  # not the config default: measured on the pool


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd15", "tiny-wan"])
def test_exported_pipeline_loads_with_from_pretrained_and_runs(trained_tiny, name):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    _, finals = trained_tiny
    final = finals[name]
    denoiser = "unet" if name == "tiny-sd15" else "transformer"
    weights = next((final / denoiser).glob("*.safetensors"))
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # shipped in fp16
    pipe = DiffusionPipeline.from_pretrained(str(final), dtype=torch.float32)
    assert type(pipe).__name__ == {"tiny-flux": "FluxPipeline", "tiny-sd15": "StableDiffusionPipeline",
                                   "tiny-wan": "WanPipeline"}[name]
    kwargs = dict(world.WORLD_MODELS[name].call_kwargs, num_inference_steps=2, output_type="pt")
    out = pipe(prompt="a red circle at the top left", generator=torch.Generator().manual_seed(0), **kwargs)[0]
    expected = (1, 5, 3, 64, 64) if name == "tiny-wan" else (1, 3, 64, 64)
    assert tuple(out.shape) == expected and torch.isfinite(out).all()


def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    straight = train(_tiny("image-vae", tmp_path / "a", steps=4, checkpoint_every=2))
    train(_tiny("image-vae", tmp_path / "b", steps=4, checkpoint_every=2, stop_at_step=2))
    resumed = train(_tiny("image-vae", tmp_path / "b", steps=4, checkpoint_every=2, resume=True))
    a = load_file(str(straight / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "training.json").read_text())["steps_done"] == 4


def test_denoiser_without_its_vae_says_which_command_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusion-attn train image-vae"):
        train(_tiny("tiny-flux", tmp_path))


@pytest.mark.parametrize("kwargs, match", [
    (dict(target="tiny-flx"), "unknown training target 'tiny-flx'"),
    (dict(target="tiny-flux", steps=0), "steps must be >= 1"),
    (dict(target="image-vae", resolution=40), "multiple of 16"),
    (dict(target="video-vae", num_frames=8), "4k \\+ 1"),
])
def test_bad_training_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_cli_train_smoke_and_errors(tmp_path, capsys):
    assert main(["train", "image-vae", "--output-dir", str(tmp_path), "--steps", "1", "--batch-size", "2",
                 "--data-size", "4", "--no-progress"]) == 0
    assert (tmp_path / "image-vae" / "final" / "config.json").is_file()
    assert main(["train", "tiny-wan", "--output-dir", str(tmp_path / "empty"), "--steps", "1"]) == 2
    assert "video-vae" in capsys.readouterr().err
    assert main(["train", "tiny-fluxx"]) == 2
    assert "did you mean tiny-flux" in capsys.readouterr().err


def test_missing_shipped_weights_name_the_training_command(tmp_path, monkeypatch):
    from diffusion_attn.models import build_pipeline

    monkeypatch.setenv("DIFFUSION_ATTN_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="diffusion-attn train tiny-wan"):
        build_pipeline("tiny-wan")


def test_wan_training_decode_is_the_pipeline_decode_without_its_clamp():
    from diffusion_attn.training.loop import _wan_decode_unclamped

    vae = world.video_vae().eval()
    z = 3 * torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clamped, free = vae.decode(z).sample, _wan_decode_unclamped(vae, z)
    assert free.abs().max() > 1  # it does overshoot: the clamp would zero those gradients
    torch.testing.assert_close(free.clamp(-1, 1), clamped, rtol=0, atol=0)


def test_decoder_only_finetune_keeps_the_latent_space(tmp_path):
    from safetensors.torch import load_file

    base = train(_tiny("image-vae", tmp_path / "base"))
    tuned = train(_tiny("image-vae", tmp_path / "tuned", init_from=str(base), decoder_only=True))
    a = load_file(str(base / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tuned / "diffusion_pytorch_model.safetensors"))
    encoder = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in a if k.startswith("decoder.")]
    assert encoder and all(torch.equal(a[k], b[k]) for k in encoder)
    assert any(not torch.equal(a[k], b[k]) for k in decoder)
    assert json.loads((tuned / "config.json").read_text())["scaling_factor"] == \
        json.loads((base / "config.json").read_text())["scaling_factor"]
    with pytest.raises(ValueError, match="decoder_only needs init_from"):
        TrainConfig("image-vae", decoder_only=True)
