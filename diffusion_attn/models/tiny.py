"""Tiny random-weight diffusers pipelines, one per supported model family, built offline in-process.

Every builder makes the *real* diffusers pipeline class with real component classes, only with tiny
configs (hidden sizes ~16-64, 1-3 layers) and the in-process tokenizers of :mod:`.tokenizer`, so that
``pipe(prompt="a cat", **default_call_kwargs(name))`` follows the real code path on CPU in well under a
second. Weights are a deterministic function of ``seed``: every component is initialised under its own
derived seed inside a forked RNG (the global torch RNG is left untouched).

Default generation sizes (:func:`default_call_kwargs`) and the attention token grids they give
(frames x height x width; every grid is non-square so height/width mix-ups show):

* ``tiny-flux``: 128 x 192 px -> latent 16 x 24 -> 2x2 packing: **8 x 12** image tokens + 32 T5 tokens.
* ``tiny-sd3``: 128 x 192 px -> latent 16 x 24 -> patch 2: **8 x 12** image tokens + 77 CLIP + 32 T5 tokens.
* ``tiny-wan`` / ``tiny-wan22``: 9 frames x 128 x 192 px -> latent 3 x 16 x 24 (VAE /4 time, /8 space)
  -> patch 1x2x2: **3 x 8 x 12** video tokens; cross-attention to 32 UMT5 tokens.
* ``tiny-hunyuanvideo``: 9 frames x 128 x 192 px -> latent 3 x 16 x 24 -> patch 1x2x2:
  **3 x 8 x 12** video tokens + 32 Llama tokens.
* ``tiny-sd15``: 128 x 192 px -> latent 16 x 24; self-attention grids **16 x 24** (down_blocks.0,
  up_blocks.3), **8 x 12** (down_blocks.1, up_blocks.2), **4 x 6** (down_blocks.2, up_blocks.1),
  2 x 3 (mid_block); cross-attention to 77 CLIP tokens.
* ``tiny-sdxl``: 256 x 384 px -> latent 32 x 48; self-attention grids **16 x 24** (down_blocks.1,
  up_blocks.1) and **8 x 12** (down_blocks.2, up_blocks.0, mid_block); cross-attention to 77 tokens.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import tokenizer as tok

__all__ = [
    "EmbeddedModel",
    "EMBEDDED_MODELS",
    "FAMILIES",
    "build_pipeline",
    "load_pipeline",
    "model_family",
    "default_call_kwargs",
    "default_prompt",
]

FAMILIES = ("flux", "sd3", "wan", "hunyuanvideo", "unet-sd15", "unet-sdxl", "mochi")


# ----------------------------------------------------------------------------------------------------------
# Shared helpers: seeding and tiny text encoders
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, component: int):
    """Run the body with the CPU torch RNG seeded for one component, restoring the global RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + component)
        yield


def _clip_text_encoder(tokenizer, hidden_size: int = 32, projection_dim: int = 32, with_projection: bool = False,
                       num_heads: int = 2):
    """Tiny CLIP text tower (2 layers) matching :func:`tokenizer.clip_tokenizer` ids."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config).eval()


def _t5_text_encoder(tokenizer, d_model: int = 32, umt5: bool = False, buckets: int = 8):
    """Tiny T5 (or UMT5, as Wan uses) encoder, 2 layers, matching :func:`tokenizer.t5_tokenizer` ids."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=buckets,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model_cls(config).eval()


def _llama_text_encoder(tokenizer, hidden_size: int = 32):
    """Tiny Llama (3 layers: HunyuanVideo reads ``hidden_states[-3]``, i.e. the output of layer 1)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaModel(config).eval()


def _image_vae(latent_channels: int = 4, **config: Any):
    """Tiny ``AutoencoderKL`` with 4 levels, i.e. the real /8 spatial compression."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=64,
        **config,
    ).eval()


# ----------------------------------------------------------------------------------------------------------
# One builder per family
# ----------------------------------------------------------------------------------------------------------


def _build_flux(seed: int):
    """FLUX.1-dev in miniature: guidance-distilled, 2 double + 2 single blocks, 2 heads x 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = tok.clip_tokenizer(), tok.t5_tokenizer()
    with _seeded(seed, 0):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packing
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 width
            pooled_projection_dim=32,  # CLIP width (pooler_output)
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
    with _seeded(seed, 1):
        vae = _image_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    with _seeded(seed, 2):
        text_encoder = _clip_text_encoder(tokenizer)
    with _seeded(seed, 3):
        text_encoder_2 = _t5_text_encoder(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def _build_sd3(seed: int):
    """SD3 in miniature: 2 joint blocks, 2 heads x 16, patch 2; CLIP-L/CLIP-G/T5 as tiny CLIP/CLIP/T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = tok.clip_tokenizer(), tok.clip_tokenizer(), tok.t5_tokenizer()
    with _seeded(seed, 0):
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=64,  # T5 width (the two CLIP hidden states, 32 + 32, are zero-padded to it)
            caption_projection_dim=32,
            pooled_projection_dim=64,  # the two CLIP projections, 32 + 32
            pos_embed_max_size=32,
        )
    with _seeded(seed, 1):
        vae = _image_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    with _seeded(seed, 2):
        text_encoder = _clip_text_encoder(tokenizer, with_projection=True)
    with _seeded(seed, 3):
        text_encoder_2 = _clip_text_encoder(tokenizer_2, with_projection=True)
    with _seeded(seed, 4):
        text_encoder_3 = _t5_text_encoder(tokenizer_3, d_model=64)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,  # UMT5 width
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def _build_wan(seed: int, two_experts: bool = False):
    """Wan 2.1 T2V in miniature (2 layers, 2 heads x 12); ``two_experts`` adds a Wan 2.2 A14B style
    low-noise ``transformer_2`` with ``boundary_ratio=0.875`` (with 2 steps, step 1 uses ``transformer``
    and step 2 ``transformer_2``)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    tokenizer = tok.t5_tokenizer()
    with _seeded(seed, 0):
        transformer = _wan_transformer()
    transformer_2 = None
    if two_experts:
        with _seeded(seed, 5):
            transformer_2 = _wan_transformer()
    with _seeded(seed, 1):
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()
    with _seeded(seed, 2):
        text_encoder = _t5_text_encoder(tokenizer, umt5=True)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.875 if two_experts else None,
    )


def _build_hunyuanvideo(seed: int):
    """HunyuanVideo in miniature: 1 dual-stream + 1 single-stream block (+1 token refiner), 2 heads x 12,
    patch 1x2x2, guidance-distilled; text encoders a tiny Llama (Llama-3 style tokenizer, so the default
    prompt template's ``crop_start=95`` is exact) and a tiny CLIP."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    tokenizer, tokenizer_2 = tok.llama_tokenizer(), tok.clip_tokenizer()
    with _seeded(seed, 0):
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=12,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=32,  # Llama width
            pooled_projection_dim=32,  # CLIP width (pooler_output)
            rope_axes_dim=(4, 4, 4),
        ).eval()
    with _seeded(seed, 1):
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        ).eval()
    with _seeded(seed, 2):
        text_encoder = _llama_text_encoder(tokenizer)
    with _seeded(seed, 3):
        text_encoder_2 = _clip_text_encoder(tokenizer_2)
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def _build_mochi(seed: int):
    """Mochi 1 in miniature: 2 joint blocks, 2 heads x 16, patch 2; a tiny T5 and a 1-layer-per-block
    Mochi VAE (13 frames -> 3 latent frames, /8 space)."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    tokenizer = tok.t5_tokenizer()
    with _seeded(seed, 0):
        transformer = MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=12,
            text_embed_dim=32,  # T5 width
            time_embed_dim=16,
            max_sequence_length=32,
        ).eval()
    with _seeded(seed, 1):
        vae = AutoencoderKLMochi(
            encoder_block_out_channels=(32, 32, 32, 32),  # GroupNorm(32) needs multiples of 32
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1),
            add_attention_block=(False,) * 5,
        ).eval()
    with _seeded(seed, 2):
        text_encoder = _t5_text_encoder(tokenizer)
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _build_sd15(seed: int):
    """SD 1.5 in miniature: the real UNet block layout (so module names match), channels (16, 32, 32, 32)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = tok.clip_tokenizer()
    with _seeded(seed, 0):
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=2,
            attention_head_dim=2,  # (diffusers naming) 2 heads per attention
            norm_num_groups=8,
            cross_attention_dim=32,  # CLIP width
        ).eval()
    with _seeded(seed, 1):
        vae = _image_vae(scaling_factor=0.18215)
    with _seeded(seed, 2):
        text_encoder = _clip_text_encoder(tokenizer)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int):
    """SDXL in miniature: the real UNet block layout, transformer depth (1, 2, 2), ``text_time`` conditioning,
    two CLIP text encoders (the second with projection)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = tok.clip_tokenizer(), tok.clip_tokenizer()
    with _seeded(seed, 0):
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 2),
            attention_head_dim=(2, 2, 4),  # (diffusers naming) heads per level, head width 16
            norm_num_groups=8,
            cross_attention_dim=64,  # 32 + 32, the two CLIP widths concatenated
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + CLIP-2 projection
        ).eval()
    with _seeded(seed, 1):
        vae = _image_vae(scaling_factor=0.13025)
    with _seeded(seed, 2):
        text_encoder = _clip_text_encoder(tokenizer)
    with _seeded(seed, 3):
        text_encoder_2 = _clip_text_encoder(tokenizer_2, with_projection=True)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Registry and public API
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    """An embedded tiny model: its registry ``name``, model ``family``, one-line ``description``, builder.

    ``trained``: the model is one of the shapes-world models of :mod:`.world`, loaded from its shipped
    weights (``builder`` is then unused); otherwise ``builder(seed)`` makes random weights."""

    name: str
    family: str
    description: str
    builder: Callable[[int], Any] | None
    trained: bool = False


_MODELS = (
    EmbeddedModel("tiny-flux", "flux", "FluxPipeline trained on the shapes world (64x64 px, 2 double + 4 single "
                  "blocks).", None, trained=True),
    EmbeddedModel("tiny-wan", "wan", "WanPipeline trained on the shapes world (9 frames x 64x64 px, 4 layers).",
                  None, trained=True),
    EmbeddedModel("tiny-sd15", "unet-sd15", "StableDiffusionPipeline (SD 1.5 UNet layout) trained on the shapes "
                  "world (64x64 px).", None, trained=True),
    EmbeddedModel(
        "tiny-flux-random", "flux", "FluxPipeline, random weights, guidance-distilled, 2 double + 2 single blocks.",
        _build_flux,
    ),
    EmbeddedModel(
        "tiny-sd3", "sd3", "StableDiffusion3Pipeline, 2 joint blocks, 2 heads, tiny CLIP/CLIP/T5.", _build_sd3
    ),
    EmbeddedModel("tiny-wan-random", "wan", "WanPipeline (Wan 2.1 T2V), random weights, 2 layers, 2 heads.",
                  _build_wan),
    EmbeddedModel(
        "tiny-wan22",
        "wan",
        "WanPipeline (Wan 2.2 A14B style): transformer + transformer_2, boundary_ratio 0.875.",
        functools.partial(_build_wan, two_experts=True),
    ),
    EmbeddedModel(
        "tiny-hunyuanvideo",
        "hunyuanvideo",
        "HunyuanVideoPipeline, 1 dual-stream + 1 single-stream block, tiny Llama + CLIP.",
        _build_hunyuanvideo,
    ),
    EmbeddedModel("tiny-mochi", "mochi", "MochiPipeline (Mochi 1), 2 joint blocks, 2 heads, tiny T5.", _build_mochi),
    EmbeddedModel("tiny-sd15-random", "unet-sd15", "StableDiffusionPipeline with an SD 1.5-shaped UNet, random "
                  "weights.", _build_sd15),
    EmbeddedModel("tiny-sdxl", "unet-sdxl", "StableDiffusionXLPipeline with an SDXL-shaped UNet.", _build_sdxl),
)
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.name: m for m in _MODELS}


def _unknown_name_error(name: str) -> ValueError:
    valid = ", ".join(EMBEDDED_MODELS)
    close = difflib.get_close_matches(name, list(EMBEDDED_MODELS), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown embedded model {name!r}.{hint} Valid names: {valid}.")


def build_pipeline(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Build the embedded tiny pipeline ``name`` on ``device`` in ``dtype``: random weights determined by
    ``seed``, or for a trained model (``tiny-flux``, ``tiny-wan``, ``tiny-sd15``) its shipped weights
    (``seed`` unused)."""
    if name not in EMBEDDED_MODELS:
        raise _unknown_name_error(name)
    if EMBEDDED_MODELS[name].trained:
        from .world import load_trained

        return load_trained(name, dtype=dtype, device=device)
    pipe = EMBEDDED_MODELS[name].builder(seed)
    if dtype != torch.float32:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                _cast_like_from_pretrained(component, dtype)
    return pipe.to(device)


def _fp32_module_names(model: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    """Module names ``from_pretrained(..., dtype)`` keeps in float32: diffusers' ``_keep_in_fp32_modules``
    always; transformers' ``_keep_in_fp32_modules_strict`` always, its ``_keep_in_fp32_modules`` for fp16 only."""
    from transformers import PreTrainedModel

    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not isinstance(model, PreTrainedModel) or dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return keep


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` but keep in float32 what ``from_pretrained`` would keep (see :func:`_fp32_module_names`)."""
    torch.nn.Module.to(model, dtype)  # the plain cast: ModelMixin.to would warn about the fp32 modules
    keep = _fp32_module_names(model, dtype)
    if not keep:
        return
    for module_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if keep.intersection(f"{module_name}.{name}".split(".")) and tensor.is_floating_point():
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = tensor.data.float()
                else:
                    setattr(module, name, tensor.float())


def load_pipeline(
    model: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
):
    """An embedded model name -> :func:`build_pipeline`; anything else (hub id or local folder) ->
    ``DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)`` moved to ``device`` (``seed`` unused)."""
    if model in EMBEDDED_MODELS:
        return build_pipeline(model, seed=seed, dtype=dtype, device=device)

    import os

    import diffusers
    from diffusers import DiffusionPipeline

    if not os.path.isdir(model) and difflib.get_close_matches(model, list(EMBEDDED_MODELS), n=1, cutoff=0.8):
        raise _unknown_name_error(model)  # a typo of an embedded name, not a path or hub id
    where = "local folder" if os.path.isdir(model) else "Hugging Face Hub id (or missing local path)"
    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name still works, with a deprecation warning).
    dtype_kwarg = "dtype" if _version_at_least(diffusers.__version__, "0.42") else "torch_dtype"
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **{dtype_kwarg: dtype})
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise OSError(
            f"Could not load a diffusers pipeline from {model!r}: tried DiffusionPipeline.from_pretrained on it as a "
            f"{where} ({type(err).__name__}: {err}). Embedded models: {', '.join(EMBEDDED_MODELS)}."
        ) from err
    pipe.to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            _realign_cpu_tensors(component)
    return pipe


def _version_at_least(version: str, minimum: str) -> bool:
    from packaging.version import Version

    return Version(version) >= Version(minimum)


@torch.no_grad()
def _realign_cpu_tensors(model: torch.nn.Module) -> None:
    """Copy CPU weights that are views into a loaded file (not 64-byte aligned) into fresh memory.

    The CPU matmul kernels pick their code path by pointer alignment, so unaligned weights give
    slightly (~1e-7) different results than the same weights in freshly allocated memory: with this,
    a saved and reloaded pipeline reproduces the original bit for bit.
    """
    model._apply(lambda t: t.clone() if t.device.type == "cpu" and t.data_ptr() % 64 else t)


def _denoiser_family(model: Any) -> str | None:
    from ..adapters import variant_of

    return variant_of(model)


def model_family(pipe_or_model: Any) -> str:
    """Family of a pipeline (via its ``transformer``/``transformer_2``/``unet``), a denoiser model, an embedded
    model name or a family name: one of :data:`FAMILIES`. Raises ``ValueError`` otherwise."""
    if isinstance(pipe_or_model, str):
        if pipe_or_model in FAMILIES:
            return pipe_or_model
        if pipe_or_model in EMBEDDED_MODELS:
            return EMBEDDED_MODELS[pipe_or_model].family
        raise ValueError(
            f"{pipe_or_model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) "
            f"nor a supported family ({', '.join(FAMILIES)})."
        )
    candidates = [getattr(pipe_or_model, attr, None) for attr in ("transformer", "transformer_2", "unet")]
    for model in [pipe_or_model] + [c for c in candidates if c is not None]:
        family = _denoiser_family(model)
        if family is not None:
            return family
    raise ValueError(
        f"Unsupported model {type(pipe_or_model).__name__}: no supported denoiser found. "
        f"Supported families: {', '.join(FAMILIES)}."
    )


_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    # 128 x 192 px -> latent 16 x 24 -> 2x2 packed: 8 x 12 image tokens.
    "flux": dict(height=128, width=192, guidance_scale=3.5, max_sequence_length=32),
    # 128 x 192 px -> latent 16 x 24 -> patch 2: 8 x 12 image tokens.
    "sd3": dict(height=128, width=192, guidance_scale=4.5, max_sequence_length=32),
    # 9 frames x 128 x 192 px -> latent 3 x 16 x 24 -> patch 1x2x2: 3 x 8 x 12 video tokens.
    "wan": dict(height=128, width=192, num_frames=9, guidance_scale=5.0, max_sequence_length=32),
    # 9 frames x 128 x 192 px -> latent 3 x 16 x 24 -> patch 1x2x2: 3 x 8 x 12 video tokens.
    "hunyuanvideo": dict(height=128, width=192, num_frames=9, guidance_scale=6.0, max_sequence_length=32),
    # 13 frames x 128 x 192 px -> latent 3 x 16 x 24 (VAE /6 time, /8 space) -> patch 2: 3 x 8 x 12 tokens.
    "mochi": dict(height=128, width=192, num_frames=13, guidance_scale=4.5, max_sequence_length=32),
    # 128 x 192 px -> latent 16 x 24: attention grids 16x24, 8x12, 4x6 (and 2x3 in the mid block).
    "unet-sd15": dict(height=128, width=192, guidance_scale=7.5),
    # 256 x 384 px -> latent 32 x 48: attention grids 16x24 (down_blocks.1) and 8x12 (down_blocks.2).
    "unet-sdxl": dict(height=256, width=384, guidance_scale=5.0),
}


#: The prompt of the CLI and the UI for a model without one of its own (the random and hub models).
GENERIC_PROMPT = "a red fox running through fresh snow, cinematic"


def default_prompt(model: Any) -> str:
    """An example prompt for ``model``: a trained shapes-world model's own (one it draws), else a generic one."""
    if isinstance(model, str) and model in EMBEDDED_MODELS and EMBEDDED_MODELS[model].trained:
        from .world import WORLD_MODELS

        return WORLD_MODELS[model].prompt
    return GENERIC_PROMPT


def default_call_kwargs(name_or_family: Any, **overrides: Any) -> dict[str, Any]:
    """Small generation kwargs for an embedded model name, a family name, or a pipeline/denoiser:
    2 steps, ``output_type="pt"``, CFG on (``guidance_scale`` > 1; embedded guidance for flux/hunyuanvideo),
    non-square token grids (see the module docstring). A trained model's name gives its own defaults instead
    (its training resolution and enough steps for a clean sample, :data:`.world.WORLD_MODELS`); for the
    trained ``tiny-flux`` (true classifier-free guidance, no guidance embedding) a ``guidance_scale``
    override sets ``true_cfg_scale``.
    ``overrides`` are merged on top."""
    if isinstance(name_or_family, str) and name_or_family in EMBEDDED_MODELS and EMBEDDED_MODELS[name_or_family].trained:
        from .world import WORLD_MODELS

        kwargs = dict(output_type="pt", **WORLD_MODELS[name_or_family].call_kwargs)
        if "true_cfg_scale" in kwargs and "guidance_scale" in overrides:
            # tiny-flux is not guidance-distilled: its guidance is true classifier-free guidance
            overrides = dict(overrides)
            kwargs["true_cfg_scale"] = overrides.pop("guidance_scale")
        kwargs.update(overrides)
        return kwargs
    family = model_family(name_or_family)
    kwargs = dict(num_inference_steps=2, output_type="pt", **_DEFAULT_KWARGS[family])
    kwargs.update(overrides)
    return kwargs
