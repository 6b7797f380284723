"""Tests for the embedded tiny models (diffusion_attn.models): offline, CPU, a few seconds each."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusion_attn.models import (  # noqa: E402
    EMBEDDED_MODELS,
    FAMILIES,
    build_pipeline,
    default_call_kwargs,
    load_pipeline,
    model_family,
)
from diffusion_attn.models.tokenizer import (  # noqa: E402
    HUNYUAN_TEMPLATE_CROP_START,
    clip_tokenizer,
    llama_tokenizer,
    t5_tokenizer,
)

NAMES = [name for name, m in EMBEDDED_MODELS.items() if not m.trained]  # random weights: seeds matter, fast
VIDEO_FAMILIES = {"wan", "hunyuanvideo", "mochi"}
# Latent shape each default gives (batch 1): this is what fixes the attention token grids of the docs.
EXPECTED_LATENTS = {
    "tiny-flux-random": (1, 8 * 12, 16),  # packed: 8 x 12 tokens of 4 channels x 2 x 2
    "tiny-sd3": (1, 4, 16, 24),  # patch 2 -> 8 x 12 tokens
    "tiny-wan-random": (1, 16, 3, 16, 24),  # patch 1x2x2 -> 3 x 8 x 12 tokens
    "tiny-wan22": (1, 16, 3, 16, 24),
    "tiny-hunyuanvideo": (1, 4, 3, 16, 24),  # patch 1x2x2 -> 3 x 8 x 12 tokens
    "tiny-mochi": (1, 12, 3, 16, 24),  # 13 frames / VAE 6x time, 8x space; patch 2 -> 3 x 8 x 12 tokens
    "tiny-sd15-random": (1, 4, 16, 24),
    "tiny-sdxl": (1, 4, 32, 48),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The models are tiny: one intra-op thread is fastest, and robust to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def cached_pipeline(name, seed=0):
    pipe = build_pipeline(name, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, name, prompt="a cat", seed=0, **overrides):
    """Run the pipeline with the default kwargs; returns the images / frames tensor."""
    kwargs = default_call_kwargs(name, **overrides)
    if isinstance(seed, list):
        generator = [torch.Generator().manual_seed(s) for s in seed]
    else:
        generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(prompt=prompt, generator=generator, **kwargs)[0]


def expected_shape(name, batch=1):
    kwargs = default_call_kwargs(name)
    if model_family(name) in VIDEO_FAMILIES:
        return (batch, kwargs["num_frames"], 3, kwargs["height"], kwargs["width"])
    return (batch, 3, kwargs["height"], kwargs["width"])


def cfg_kwargs(name):
    """(CFG on, CFG off) kwargs: true CFG with a negative prompt for the guidance-distilled families."""
    if model_family(name) in ("flux", "hunyuanvideo"):
        return dict(negative_prompt="blurry", true_cfg_scale=3.0), dict(true_cfg_scale=1.0)
    return dict(guidance_scale=5.0), dict(guidance_scale=1.0)


# --------------------------------------------------------------------------------------------------------
# Every embedded model
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_text_prompt_runs(name):
    pipe = cached_pipeline(name)
    out = generate(pipe, name)
    assert tuple(out.shape) == expected_shape(name)
    assert torch.isfinite(out).all()
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.01
    # the prompt reaches the denoiser
    assert not torch.equal(out, generate(pipe, name, prompt="a dog"))


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_by_seed(name):
    out = generate(cached_pipeline(name), name)
    fresh = build_pipeline(name, seed=0)
    assert torch.equal(out, generate(fresh, name))
    other = build_pipeline(name, seed=1)
    assert not torch.equal(out, generate(other, name))


@pytest.mark.parametrize("name", NAMES)
def test_default_token_grid(name):
    latents = generate(cached_pipeline(name), name, output_type="latent")
    assert tuple(latents.shape) == EXPECTED_LATENTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_save_load_roundtrip(name, tmp_path):
    pipe = cached_pipeline(name)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for key, component in pipe.components.items():
        if hasattr(component, "get_vocab"):  # tokenizers round-trip exactly
            assert getattr(loaded, key).get_vocab() == component.get_vocab()
    assert torch.equal(generate(pipe, name), generate(loaded, name))


@pytest.mark.parametrize("name", NAMES)
def test_model_family(name):
    pipe = cached_pipeline(name)
    family = EMBEDDED_MODELS[name].family
    assert family in FAMILIES
    assert model_family(pipe) == family
    assert model_family(pipe.unet if family.startswith("unet") else pipe.transformer) == family
    assert model_family(name) == family


# --------------------------------------------------------------------------------------------------------
# CFG and batching (images and videos)
# --------------------------------------------------------------------------------------------------------

CFG_BATCH_NAMES = ["tiny-flux-random", "tiny-sd15-random", "tiny-sdxl", "tiny-wan-random", "tiny-hunyuanvideo"]


@pytest.mark.parametrize("name", CFG_BATCH_NAMES)
def test_cfg_on_off(name):
    pipe = cached_pipeline(name)
    on, off = cfg_kwargs(name)
    out_on, out_off = generate(pipe, name, **on), generate(pipe, name, **off)
    assert torch.isfinite(out_on).all() and torch.isfinite(out_off).all()
    assert (out_on - out_off).abs().max() > 1e-3


@pytest.mark.parametrize("name", CFG_BATCH_NAMES)
def test_batch_of_two(name):
    pipe = cached_pipeline(name)
    # two prompts, one generator each: every item equals its single-prompt run
    batch = generate(pipe, name, prompt=["a cat", "a dog"], seed=[0, 1])
    assert tuple(batch.shape) == expected_shape(name, batch=2)
    torch.testing.assert_close(batch[0], generate(pipe, name, prompt="a cat", seed=0)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batch[1], generate(pipe, name, prompt="a dog", seed=1)[0], atol=1e-4, rtol=0)
    # two samples of one prompt
    per_prompt = "num_videos_per_prompt" if model_family(name) in VIDEO_FAMILIES else "num_images_per_prompt"
    pair = generate(pipe, name, **{per_prompt: 2})
    assert tuple(pair.shape) == expected_shape(name, batch=2)
    assert not torch.equal(pair[0], pair[1])


def test_wan22_uses_both_experts():
    pipe = cached_pipeline("tiny-wan22")
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    calls = {"transformer": 0, "transformer_2": 0}
    handles = [
        getattr(pipe, key).register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        for key in calls
    ]
    try:
        generate(pipe, "tiny-wan22")
    finally:
        for handle in handles:
            handle.remove()
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0


def test_build_dtype():
    pipe = build_pipeline("tiny-wan-random", dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == torch.bfloat16
    dtypes = {name: p.dtype for name, p in pipe.transformer.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["scale_shift_table"] == torch.float32  # kept in fp32, as from_pretrained does


# --------------------------------------------------------------------------------------------------------
# Module layouts the attention methods rely on
# --------------------------------------------------------------------------------------------------------


def test_unet_module_names():
    sd15 = dict(cached_pipeline("tiny-sd15-random").unet.named_modules())
    for key in (
        "down_blocks.0.attentions.1.transformer_blocks.0",
        "down_blocks.0.downsamplers.0.conv",
        "up_blocks.2.upsamplers.0.conv",
        "up_blocks.3.attentions.2",
    ):
        assert key in sd15
    assert "down_blocks.3.attentions.0" not in sd15
    sdxl = dict(cached_pipeline("tiny-sdxl").unet.named_modules())
    for i in (0, 1):
        for j in (0, 1):
            assert f"down_blocks.1.attentions.{i}.transformer_blocks.{j}" in sdxl
    for i in (0, 1, 2):
        for j in (0, 1):
            assert f"up_blocks.1.attentions.{i}.transformer_blocks.{j}" in sdxl
    assert "down_blocks.0.attentions.0" not in sdxl


def test_transformer_blocks():
    flux = cached_pipeline("tiny-flux-random").transformer
    assert len(flux.transformer_blocks) >= 1 and len(flux.single_transformer_blocks) >= 1
    assert flux.config.num_attention_heads == 2 and flux.config.guidance_embeds
    hunyuan = cached_pipeline("tiny-hunyuanvideo").transformer
    assert len(hunyuan.transformer_blocks) >= 1 and len(hunyuan.single_transformer_blocks) >= 1
    wan = cached_pipeline("tiny-wan-random").transformer
    assert len(wan.blocks) == 2 and wan.config.num_attention_heads == 2


# --------------------------------------------------------------------------------------------------------
# Names, errors, families, tokenizers
# --------------------------------------------------------------------------------------------------------


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="tiny-flux-random"):
        build_pipeline("tiny-flx")
    with pytest.raises(ValueError, match="tiny-sdxl"):
        load_pipeline("tiny-sdx")


def test_load_pipeline_missing_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises((OSError, ValueError), match="no-such-model"):
        load_pipeline(missing)


def test_model_family_errors_and_mochi():
    with pytest.raises(ValueError, match="unet-sdxl"):
        model_family(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="flux"):
        model_family("not-a-model")
    from diffusers import MochiTransformer3DModel

    mochi = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        pooled_projection_dim=16,
        in_channels=12,
        text_embed_dim=32,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    )
    assert model_family(mochi) == "mochi"


@pytest.mark.parametrize("family", FAMILIES)
def test_default_call_kwargs_by_family(family):
    kwargs = default_call_kwargs(family)
    assert kwargs["num_inference_steps"] == 2 and kwargs["output_type"] == "pt"
    assert kwargs["height"] != kwargs["width"]  # non-square token grids
    assert default_call_kwargs(family, num_inference_steps=3)["num_inference_steps"] == 3


def test_tokenizers():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    llama = llama_tokenizer()
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(llama(prefix).input_ids) == HUNYUAN_TEMPLATE_CROP_START == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    ids = llama(DEFAULT_PROMPT_TEMPLATE["template"].format("a cat")).input_ids
    assert llama.decode(ids[HUNYUAN_TEMPLATE_CROP_START:], skip_special_tokens=True) == "a cat"
    assert llama.padding_side == "right"

    clip = clip_tokenizer()
    assert clip.model_max_length == 77 and clip.pad_token_id == clip.eos_token_id
    body = clip("a cat", add_special_tokens=False).input_ids
    assert clip("a cat").input_ids == [clip.bos_token_id, *body, clip.eos_token_id]
    t5 = t5_tokenizer()
    assert t5("a cat").input_ids[-1] == t5.eos_token_id and t5.pad_token_id == 0
    assert t5_tokenizer().get_vocab() == t5.get_vocab()
