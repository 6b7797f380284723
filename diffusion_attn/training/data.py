"""Training data from the shapes world: pools of seeded samples, cached on disk as uint8 arrays.

Seeds ``0 .. n-1`` (offset by ``seed_offset``) are the training pool; :data:`HELD_OUT_SEED` and up are
never used in training and are what the quality harness and the targets are measured on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..data import generate_image, generate_video

#: First seed of the held-out evaluation prompts (training pools use seeds below it).
HELD_OUT_SEED = 1_000_000


def _cache_path(cache_dir: Path | None, kind: str, **spec) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{kind}-{key}.npz"


def shapes_pool(kind: str, size: int, resolution: int = 64, num_frames: int = 9, seed_offset: int = 0,
                cache_dir: str | Path | None = None) -> tuple[np.ndarray, list[str]]:
    """``size`` samples of the shapes world: uint8 pixels ``(N, 3, H, W)`` (``kind="image"``) or
    ``(N, T, 3, H, W)`` (``kind="video"``) and their captions. Cached in ``cache_dir`` when given."""
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    if kind == "image":
        num_frames = 1
    path = _cache_path(cache_dir, kind, size=size, resolution=resolution, frames=num_frames, offset=seed_offset,
                       version=1)
    if path is not None and path.is_file():
        data = np.load(path, allow_pickle=False)
        return data["pixels"], [str(c) for c in data["captions"]]
    pixels, captions = [], []
    for i in range(size):
        seed = seed_offset + i
        if kind == "image":
            sample = generate_image(seed, resolution, resolution)
            x = sample.image
        else:
            sample = generate_video(seed, resolution, resolution, num_frames=num_frames)
            x = sample.video
        pixels.append((x * 255).round().to(torch.uint8).numpy())
        captions.append(sample.caption)
    pixels = np.ascontiguousarray(np.stack(pixels))  # the samples are channel-last views
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, pixels=pixels, captions=np.array(captions))
    return pixels, captions


def to_model_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in ``[-1, 1]`` (the VAEs' input range)."""
    x = torch.as_tensor(pixels).float()
    return (x / 127.5 - 1.0).contiguous()
