"""The shapes-world models: tiny real-family diffusers pipelines trained on :mod:`diffusion_attn.data`.

``tiny-flux`` (``FluxPipeline``), ``tiny-sd15`` (``StableDiffusionPipeline``) and ``tiny-wan``
(``WanPipeline``) are the real pipeline and model classes with small configs, trained from scratch by
``diffusion-attn train`` (:mod:`diffusion_attn.training`) and shipped as fp16 safetensors in
``save_pretrained`` folders under ``diffusion_attn/models/weights/<name>``. They load through the ordinary
``DiffusionPipeline.from_pretrained`` path and need no network.

The architecture, fixed here so that training and loading agree:

* **Image VAE** (shared by tiny-flux and tiny-sd15): ``AutoencoderKL``, 3 levels (/4 space), 8 latent
  channels, trained for reconstruction. 64 x 64 px -> latent 8 x 16 x 16. (With 4 channels, as SD 1.5,
  1500 steps gave blurred shapes: squares and triangles came back round, 20% of images intact.)
* **Video VAE** (tiny-wan): ``AutoencoderKLWan``, 3 levels, /4 space and /4 time (causal), 16 latent
  channels as the real Wan VAE; encoder width 12, decoder width 32 (Wan's decoder halves its channels at
  every upsampling, so with width 8 its full-resolution level had 4 channels under a per-voxel RMS norm, and
  it returned colourless blobs: 0% of the shapes intact after 1000 steps). 5 frames x 64 x 64 px -> latent
  16 x 2 x 16 x 16.
* **Text encoders**: frozen, seeded random towers (tiny CLIP / T5 / UMT5, 2 layers, width 64) over word-level
  tokenizers that give each word of the shapes world one token (:data:`WORLD_WORDS`; other words fall back
  to characters). Frozen because a random 2-layer transformer over word tokens keeps every word and its
  position distinct, which is all the denoiser needs to learn the binding; training it too would cost
  backward passes through it on every step of a CPU budget and would make the three models' text towers
  differ for no gain in this closed vocabulary.
* **tiny-flux**: ``FluxTransformer2DModel`` 2 double + 4 single blocks, 4 heads x 32, no guidance embedding
  (it is not guidance-distilled; use ``true_cfg_scale`` with a ``negative_prompt``), flow matching.
  64 x 64 px -> 8 x 8 image tokens + 32 T5 tokens.
* **tiny-sd15**: ``UNet2DConditionModel`` with the SD 1.5 block layout (2 layers per block, so every
  module HiDiffusion patches exists), channels (32, 64, 64, 64), 8 input channels (the image VAE's),
  epsilon prediction on SD 1.5's scaled-linear DDPM schedule. Self-attention grids 16 x 16, 8 x 8, 4 x 4.
* **tiny-wan**: ``WanTransformer3DModel`` 4 layers, 4 heads x 24, patch 1 x 2 x 2, flow matching.
  5 frames x 64 x 64 px -> 2 x 8 x 8 video tokens; cross-attention to 32 UMT5 tokens. (5 frames: the video
  VAE was trained on 5-frame windows, the first frame alone plus one chunk of 4, for time; a second chunk of
  4 frames, decoded with the first chunk's causal cache, it has not learnt.)

Captions are dropped (replaced by ``""``) 10% of the time in training, so classifier-free guidance works.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import tokenizer as tok

__all__ = ["IMAGE_PROMPT", "VIDEO_PROMPT", "WORLD_MODELS", "WORLD_WORDS", "WorldModel", "weights_dir", "build_untrained", "image_vae",
           "video_vae", "load_trained", "available"]

#: Every word the shapes world's captions use (:mod:`diffusion_attn.data.shapes`), one token each.
WORLD_WORDS: tuple[str, ...] = (
    "a", "an", "two", "three", "four", "red", "green", "blue", "yellow", "purple", "orange", "cyan",
    "circle", "square", "triangle", "circles", "squares", "triangles", "at", "the", "on", "in", "and",
    "top", "bottom", "left", "right", "center", "moving", "up", "down",
)
TEXT_WIDTH = 64
MAX_SEQUENCE_LENGTH = 32  # the longest caption (4 objects with positions) is 30 word tokens


IMAGE_PROMPT = "a red circle at the top left and a blue square at the bottom right"
VIDEO_PROMPT = "a red circle moving right and a blue square moving down"


@dataclass(frozen=True)
class WorldModel:
    """A trained shapes-world model: registry ``name``, ``family``, the ``vae`` it is trained on
    (``"image"`` or ``"video"``), ``objective`` and its default generation kwargs."""

    name: str
    family: str
    vae: str
    objective: str  # "flow" (flow matching, velocity = noise - x0) or "epsilon" (DDPM noise prediction)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""  # an example prompt the model draws (the CLI's and the UI's default)


WORLD_MODELS: dict[str, WorldModel] = {
    m.name: m
    for m in (
        WorldModel("tiny-flux", "flux", "image", "flow",
                   dict(height=64, width=64, num_inference_steps=20, true_cfg_scale=4.0, negative_prompt="",
                        max_sequence_length=MAX_SEQUENCE_LENGTH),
                   IMAGE_PROMPT),
        WorldModel("tiny-sd15", "unet-sd15", "image", "epsilon",
                   dict(height=64, width=64, num_inference_steps=25, guidance_scale=5.0), IMAGE_PROMPT),
        WorldModel("tiny-wan", "wan", "video", "flow",
                   dict(height=64, width=64, num_frames=5, num_inference_steps=20, guidance_scale=5.0,
                        max_sequence_length=MAX_SEQUENCE_LENGTH), VIDEO_PROMPT),
    )
}


def weights_dir(name: str) -> Path:
    """Where the shipped weights of ``name`` live (``DIFFUSION_ATTN_WEIGHTS`` overrides the root)."""
    root = os.environ.get("DIFFUSION_ATTN_WEIGHTS") or Path(__file__).parent / "weights"
    return Path(root) / name


def available(name: str) -> bool:
    """Whether the trained weights of ``name`` are present."""
    return (weights_dir(name) / "model_index.json").is_file()


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- components

def image_vae():
    """The untrained image VAE (see the module docstring)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, norm_num_groups=8, latent_channels=8, sample_size=64,
                         use_quant_conv=False, use_post_quant_conv=False)


def video_vae():
    """The untrained video VAE (see the module docstring); ``latents_mean``/``latents_std`` are set from
    data after training."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=12, decoder_base_dim=32, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[True, True], scale_factor_spatial=4, scale_factor_temporal=4,
                            latents_mean=[0.0] * 16, latents_std=[1.0] * 16)


def _clip(tokenizer, seed: int):
    from .tiny import _clip_text_encoder

    with _seeded(seed):
        model = _clip_text_encoder(tokenizer, hidden_size=TEXT_WIDTH, projection_dim=TEXT_WIDTH, num_heads=4)
    return model.requires_grad_(False)


def _t5(tokenizer, seed: int, umt5: bool = False):
    from .tiny import _t5_text_encoder

    with _seeded(seed):
        model = _t5_text_encoder(tokenizer, d_model=TEXT_WIDTH, umt5=umt5, buckets=16)
    return model.requires_grad_(False)


def build_untrained(name: str, vae=None, seed: int = 0):
    """The pipeline of world model ``name`` with a freshly initialised denoiser (seeded), the frozen text
    encoders and ``vae`` (a trained VAE; an untrained one when ``None``)."""
    if name not in WORLD_MODELS:
        raise ValueError(f"unknown world model {name!r}; known: {', '.join(WORLD_MODELS)}")
    if name == "tiny-flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        with _seeded(seed):
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=32, num_layers=2, num_single_layers=4,
                                                 attention_head_dim=32, num_attention_heads=4,
                                                 joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
                                                 guidance_embeds=False, axes_dims_rope=(8, 12, 12))
        clip_tok = tok.clip_tokenizer(words=WORLD_WORDS)
        t5_tok = tok.t5_tokenizer(words=WORLD_WORDS)
        # Real Flux's resolution-dependent shift, rescaled to this model's token counts (64 at 64 x 64 px).
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=64, max_image_seq_len=1024)
        return FluxPipeline(scheduler=scheduler, vae=vae if vae is not None else image_vae(),
                            text_encoder=_clip(clip_tok, seed + 1), tokenizer=clip_tok,
                            text_encoder_2=_t5(t5_tok, seed + 2), tokenizer_2=t5_tok, transformer=transformer)
    if name == "tiny-sd15":
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        with _seeded(seed):
            unet = UNet2DConditionModel(sample_size=16, in_channels=8, out_channels=8,
                                        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                        block_out_channels=(32, 64, 64, 64), layers_per_block=2,
                                        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=8)
        clip_tok = tok.clip_tokenizer(words=WORLD_WORDS)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae=vae if vae is not None else image_vae(),
                                       text_encoder=_clip(clip_tok, seed + 1), tokenizer=clip_tok, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    with _seeded(seed):
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24,
                                            in_channels=16, out_channels=16, text_dim=TEXT_WIDTH, freq_dim=64,
                                            ffn_dim=256, num_layers=4, cross_attn_norm=True,
                                            qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    t5_tok = tok.t5_tokenizer(words=WORLD_WORDS)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0)
    return WanPipeline(tokenizer=t5_tok, text_encoder=_t5(t5_tok, seed + 1, umt5=True),
                       vae=vae if vae is not None else video_vae(), scheduler=scheduler, transformer=transformer)


# ---------------------------------------------------------------------------------------------- loading

def load_trained(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The shipped trained pipeline ``name`` via ``DiffusionPipeline.from_pretrained`` (fp16 on disk, cast to
    ``dtype``). Raises ``FileNotFoundError`` naming the training command when the weights are absent."""
    from diffusers import DiffusionPipeline

    path = weights_dir(name)
    if not available(name):
        raise FileNotFoundError(
            f"The trained weights of {name!r} are not at {path}. Train them with "
            f"`diffusion-attn train {name}` (see docs/training.md), or use the random-weight "
            f"'{name}-random' for a quick check.")
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return pipe.to(device)
