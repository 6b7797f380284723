"""Recipes over stock diffusers pipelines for methods that need more than a denoiser call (E12): extra
generations, upscaling, video-to-video refinement. No copied pipeline code: each recipe builds stock
pipelines from the user's components and drives them, with the method installed by
:func:`diffusion_attn.apply` where it acts."""

from .freeswim import FreeSwimOutput, freeswim_generate, upscale_video, video_to_video_pipeline

__all__ = ["FreeSwimOutput", "freeswim_generate", "upscale_video", "video_to_video_pipeline"]
