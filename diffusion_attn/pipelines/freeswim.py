"""FreeSwim's coarse-to-fine recipe over stock diffusers Wan pipelines.

The official ``inference.py`` (WillWu111/FreeSwim): (1) text-to-video at the model's native resolution
(480 x 832, 81 frames, guidance 5.0); (2) every frame resized to the target with ``cv2.resize(...,
INTER_LINEAR)``; (3) video-to-video (SDEdit) at the target with ``strength=0.7``, guidance 5.0, the
scheduler's ``flow_shift`` set to 9.0, and the FreeSwim processors on the transformer.

:func:`freeswim_generate` does the same with the stock ``WanPipeline`` the user has and a stock
``WanVideoToVideoPipeline`` built from the same components (:func:`video_to_video_pipeline`; its
scheduler is a copy with ``flow_shift=9``, the user's scheduler is not touched). FreeSwim is installed
on the transformer with :func:`diffusion_attn.apply` for the refinement only and removed after it.
The upscale is ``F.interpolate(mode="bilinear", align_corners=False)`` (half-pixel centres, no
antialiasing: cv2's ``INTER_LINEAR``).

Accepted sizes: height and width multiples of 16 px (Wan's VAE 8 x patch 2; the stock pipelines refuse
others), for both the native and the target size, and a target at least the native size on both axes
(FreeSwim refines an *upscaled* video; a smaller target is an error). The official additionally asserts
a target <= 1920 x 1088 for the 1.3B model, as quality advice ("use 14B model at higher resolutions",
with native 720 x 1280): that is not a constraint of the method and is not enforced here; memory is the
limit (the window branch is ``T * (2 d_h + 1) * (2 d_w + 1)`` keys per query, the full branch is dense).
``num_frames`` as the stock pipeline takes it (``4k + 1``).

Wan 2.2 A14B pipelines (two experts) are refused unless ``transformer=`` names the expert to refine with:
the stock video-to-video pipeline has one transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FreeSwimOutput", "freeswim_generate", "upscale_video", "video_to_video_pipeline"]

#: the official recipe's settings
OFFICIAL_STRENGTH = 0.7
OFFICIAL_FLOW_SHIFT = 9.0


@dataclass
class FreeSwimOutput:
    """``frames``: the refined video(s) at the target size (the V2V pipeline's ``frames`` in its
    ``output_type``); ``base``: the native-size text-to-video result, (B, F, C, H, W) in [0, 1];
    ``applied``: what the refinement ran with (the method handle's text, e.g. ``Handle('freeswim', ...)``)."""

    frames: Any
    base: torch.Tensor
    applied: str = ""


def upscale_video(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (cv2 ``INTER_LINEAR``-like) of (B, F, C, H, W) frames in [0, 1] to ``size``."""
    b, f = video.shape[:2]
    out = F.interpolate(video.flatten(0, 1).float(), size=tuple(size), mode="bilinear", align_corners=False)
    return out.clamp(0, 1).unflatten(0, (b, f))


def video_to_video_pipeline(pipe, *, transformer=None, flow_shift: float | None = OFFICIAL_FLOW_SHIFT):
    """A stock ``WanVideoToVideoPipeline`` from ``pipe``'s components (shared, not copied), with a copy of
    its scheduler whose ``flow_shift`` is ``flow_shift`` (None: unchanged)."""
    from diffusers import WanVideoToVideoPipeline

    scheduler = pipe.scheduler
    if flow_shift is not None:
        if "flow_shift" not in scheduler.config:
            raise ValueError(f"{type(scheduler).__name__} has no flow_shift; the FreeSwim recipe sets flow_shift="
                             f"{flow_shift} (UniPCMultistepScheduler, as the Wan checkpoints ship); pass flow_shift=None "
                             "to keep the scheduler as it is")
        scheduler = type(scheduler).from_config(scheduler.config, flow_shift=float(flow_shift))
    v2v = WanVideoToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                  transformer=transformer if transformer is not None else pipe.transformer,
                                  scheduler=scheduler)
    v2v.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return v2v


def _size(value, name) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width) in pixels, got {value!r}") from None
    return h, w


def freeswim_generate(
    pipe,
    prompt,
    *,
    native_size=None,
    target_size=(1088, 1920),
    num_frames: int = 81,
    num_inference_steps: int = 50,
    guidance_scale: float = 5.0,
    strength: float = OFFICIAL_STRENGTH,
    flow_shift: float | None = OFFICIAL_FLOW_SHIFT,
    negative_prompt=None,
    num_videos_per_prompt: int = 1,
    generator=None,
    mode: str = "nocache",
    cache_steps: int | None = None,
    offload_cache: bool = False,
    attention_scale: str = "native",
    backend: str = "auto",
    transformer=None,
    output_type: str = "np",
    max_sequence_length: int = 512,
    t2v_kwargs: dict | None = None,
    v2v_kwargs: dict | None = None,
) -> FreeSwimOutput:
    """Text-to-video at ``native_size``, bilinear upscale to ``target_size``, then video-to-video at
    ``target_size`` (``strength`` 0.7, ``flow_shift`` 9.0) with FreeSwim on the transformer.

    ``pipe``: a ``WanPipeline`` (its components are shared with the refinement pipeline; nothing of it
    is changed). ``mode`` / ``cache_steps`` / ``offload_cache`` / ``attention_scale`` / ``backend``:
    :class:`~diffusion_attn.processors.freeswim.FreeSwimConfig`, whose native size is ``native_size``.
    ``native_size`` (height, width) px: default the model's native size (FreeSwim's per-model default: 480 x
    832 for Wan 2.1, 720 x 1280 for Wan 2.2). ``t2v_kwargs`` / ``v2v_kwargs``: extra arguments of each stage's
    pipeline call. Everything is validated before the first stage runs (FreeSwim is applied to the
    refinement pipeline and removed again, exactly, so that every check of ``apply`` runs first).
    """
    from ..api import apply
    from ..processors.freeswim import FreeSwimConfig, pixels_per_token

    if native_size is None:
        from ..registry import get_method

        defaults = get_method("freeswim").resolve({}, "wan2.2" if getattr(pipe, "transformer_2", None) is not None else "wan")
        native_size = (defaults["native_height"], defaults["native_width"])
    native, target = _size(native_size, "native_size"), _size(target_size, "target_size")
    if getattr(pipe, "transformer_2", None) is not None and transformer is None:
        raise ValueError("this Wan 2.2 pipeline has two experts (transformer, transformer_2) but the stock "
                         "video-to-video pipeline takes one: pass transformer=pipe.transformer or pipe.transformer_2")
    model = transformer if transformer is not None else pipe.transformer
    factor = pixels_per_token(model, pipe)
    for name, (h, w) in (("native_size", native), ("target_size", target)):
        if h % factor or w % factor or h <= 0 or w <= 0:
            raise ValueError(f"{name} {h} x {w} px: height and width must be positive multiples of {factor} px "
                             f"(VAE x patch of this model)")
    if target[0] < native[0] or target[1] < native[1]:
        raise ValueError(f"the native size {native[0]} x {native[1]} is larger than the target {target[0]} x "
                         f"{target[1]} on {'height' if target[0] < native[0] else 'width'}: FreeSwim refines an "
                         "upscaled video; give a target at least the native size on both axes")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    config = FreeSwimConfig(native_height=native[0], native_width=native[1], attention_scale=attention_scale,
                            mode=mode, cache_steps=cache_steps, offload_cache=offload_cache, backend=backend)
    v2v = video_to_video_pipeline(pipe, transformer=transformer, flow_shift=flow_shift)
    apply(v2v, config).remove()  # every check of apply (a method already on the transformer, backend, ...) now

    # the prompts are encoded once, by the text-to-video pipeline, for both stages (diffusers' video-to-video
    # pipeline cleans prompts with ftfy unconditionally, an optional dependency)
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        prompt, negative_prompt, do_classifier_free_guidance=guidance_scale > 1.0,
        num_videos_per_prompt=num_videos_per_prompt, max_sequence_length=max_sequence_length,
        device=pipe._execution_device)
    common = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, guidance_scale=guidance_scale,
                  num_inference_steps=num_inference_steps, generator=generator)
    base = pipe(height=native[0], width=native[1], num_frames=num_frames, output_type="pt",
                **common, **(t2v_kwargs or {})).frames
    video = upscale_video(base, target)
    handle = apply(v2v, config)
    applied = repr(handle)
    try:
        frames = v2v(video=video, height=target[0], width=target[1], strength=strength, output_type=output_type,
                     **common, **(v2v_kwargs or {})).frames
    finally:
        handle.remove()
    return FreeSwimOutput(frames, base, applied)
