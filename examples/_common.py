"""Shared bits of the examples: loading (embedded tiny model or real checkpoint), call sizes, saving."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_attn.models import EMBEDDED_MODELS, default_call_kwargs, default_prompt, load_pipeline
from diffusion_attn.runner.generation import default_steps


def parser(description: str, model: str, output: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=model, help=f"embedded tiny model ({', '.join(EMBEDDED_MODELS)}) or a hub id / local folder")
    p.add_argument("--prompt", help="default: one the trained tiny model draws (e.g. for tiny-wan "
                                    "'a red circle moving right and a blue square moving down')")
    p.add_argument("--steps", type=int, help="default: the trained tiny models' own (20-25), else 4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=output, help="output path without suffix")
    return p


def finish(args) -> argparse.Namespace:
    """Fill the model-dependent defaults: the prompt and the step count."""
    if args.prompt is None:
        args.prompt = default_prompt(args.model)
    if args.steps is None:
        args.steps = default_steps(args.model)
    return args


def load(model: str, device: str):
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return load_pipeline(model, dtype=dtype, device=device)


def call_kwargs(model: str, pipe, steps: int, **extra) -> dict:
    """Embedded tiny models: their default sizes (the trained ones: their training resolution); real
    checkpoints: the pipeline's own defaults."""
    if model in EMBEDDED_MODELS:
        kwargs = default_call_kwargs(model, num_inference_steps=steps, **extra)
        kwargs.pop("output_type", None)
        return kwargs
    return dict(num_inference_steps=steps, **extra)


def save(output, path: str) -> Path:
    """An image -> PNG; a video (list of frames) -> MP4 if an encoder is installed, else GIF."""
    from diffusers.utils import export_to_gif, export_to_video

    from diffusion_attn.runner import video_encoder_available

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(output, (list, tuple)):
        frames = [f for f in output]
        if video_encoder_available():
            return Path(export_to_video(frames, str(path.with_suffix(".mp4")), fps=16))
        return Path(export_to_gif(frames, str(path.with_suffix(".gif")), fps=16))
    output.save(path.with_suffix(".png"))
    return path.with_suffix(".png")
