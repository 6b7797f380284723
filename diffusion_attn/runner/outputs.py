"""Saving results: images (PNG with a metadata text chunk, JPEG, WebP), videos (MP4 or GIF), JSON
sidecars; checking an output path before a generation."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from .generation import GenerationResult, jsonable

__all__ = ["FPS", "save", "check_output", "video_encoder_available"]

#: frames per second of saved videos, per family (the models' native rates)
FPS = {"wan": 16, "hunyuanvideo": 24, "mochi": 30}


# ------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def video_encoder_available() -> bool:
    """Whether ``diffusers.utils.export_to_video`` can write MP4 here (imageio + imageio-ffmpeg, or OpenCV)."""
    import importlib.util

    if importlib.util.find_spec("imageio") is not None and importlib.util.find_spec("imageio_ffmpeg") is not None:
        return True
    return importlib.util.find_spec("cv2") is not None


def _mp4_available() -> bool:
    # looked up on the package, so that patching diffusion_attn.runner.video_encoder_available takes effect
    from .. import runner

    return runner.video_encoder_available()


def _save_frames(frames: list, is_video: bool, path: Path, meta: dict, fps: int) -> Path:
    """Write ``frames`` to ``path`` (suffix adjusted to what is written) and the JSON sidecar."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if not is_video:
        if suffix not in IMAGE_SUFFIXES:
            path, suffix = path.with_suffix(".png"), ".png"
        if suffix == ".png":
            info = PngInfo()
            info.add_text("diffusion_attn", json.dumps(jsonable(meta)))
            frames[0].save(path, pnginfo=info)
        else:
            frames[0].convert("RGB").save(path)
    else:
        want_mp4 = suffix == ".mp4" or suffix != ".gif"
        if want_mp4 and _mp4_available():
            from diffusers.utils import export_to_video

            path = path.with_suffix(".mp4")
            export_to_video(frames, str(path), fps=fps)
        else:
            if suffix == ".mp4":
                warnings.warn("no MP4 encoder (install imageio and imageio-ffmpeg, or opencv-python); writing a GIF instead",
                              stacklevel=3)
            path = path.with_suffix(".gif")
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0)
    path.with_suffix(".json").write_text(json.dumps(jsonable({**meta, "output": path.name}), indent=2))
    return path


def save(result: GenerationResult, path, *, fps: int | None = None) -> Path:
    """Save ``result`` and a JSON sidecar (``<path>.json``); returns the path written.

    Images: PNG (the metadata also in a ``diffusion_attn`` text chunk), or JPEG/WebP when ``path`` ends
    so. Videos: MP4 through ``diffusers.utils.export_to_video`` when an encoder is importable (imageio +
    imageio-ffmpeg, or OpenCV), else an animated GIF; ``.gif`` forces a GIF. The suffix of ``path`` is
    replaced by the format written. ``fps``: default the model family's native rate.
    """
    fps = fps or FPS.get(result.family, 16)
    return _save_frames(result.frames, result.is_video, Path(path), result.meta, fps)


def check_output(path) -> Path:
    """Fail before a generation when ``path`` (and its JSON sidecar) cannot be written: a folder in its
    place, a file where a parent folder should be, a folder that is not writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write the output {str(path)!r}: it is a folder; give a file path such as "
                         f"{str(path / 'result')!r}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write the output {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the output {str(path)!r}: the folder {str(parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write the output {str(path)!r}: the file is not writable")
    return path
