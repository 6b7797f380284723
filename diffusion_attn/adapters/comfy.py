"""ComfyUI model families: which ComfyUI diffusion-model classes the nodes support, and how a model
call's token layout is read from its inputs -- the ComfyUI readers, beside the diffusers adapters in
this package (model-family knowledge has one home); :mod:`diffusion_attn.comfy` asks them. Nothing here
imports ComfyUI: the readers take its model objects and tensors as they come.

* ``read(diffusion_model, x, context, extras) -> (TokenLayout, cross-attention key lengths)`` per DiT
  family: grid = latent size over the model's ``patch_size``, rounded up as ComfyUI's
  ``pad_to_patch_size`` does; text length and position per model (Flux and SD3 text first, HunyuanVideo
  text last, Wan self-attention over the video only).
* :func:`unet_structure` maps a ComfyUI ``UNetModel``'s transformer blocks to the diffusers names (and
  attn1 layer order) that the diffusers processors use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .unet import level_grid
from .variants import grid_rank
from ..layout import TokenLayout

__all__ = [
    "COMFY_FAMILIES",
    "ComfyFamily",
    "UNET_LAYOUTS",
    "detect_family",
    "unet_grid",
    "unet_structure",
]


# ------------------------------------------------------------------------------------------------------
# DiT readers
# ------------------------------------------------------------------------------------------------------
def _ceil_grid(spatial, patch) -> tuple[int, ...]:
    return tuple(-(-int(s) // int(p)) for s, p in zip(spatial, patch))


def _read_flux(dm, x, context, extras):
    if extras.get("ref_latents") is not None:
        raise ValueError("Flux reference latents (Kontext) append tokens that are not part of the image grid; "
                         "grid attention patterns do not support them")
    p = int(dm.patch_size)
    return TokenLayout(_ceil_grid(x.shape[-2:], (p, p)), 0 if context is None else context.shape[1], "first"), ()


def _read_sd3(dm, x, context, extras):
    p = int(dm.patch_size)
    text = (0 if context is None else context.shape[1]) + int(getattr(dm, "register_length", 0) or 0)
    return TokenLayout(_ceil_grid(x.shape[-2:], (p, p)), text, "first"), ()


def _read_wan(dm, x, context, extras):
    pt, ph, pw = (int(p) for p in dm.patch_size)
    frames = -(-x.shape[2] // pt)
    extra_frames = extras.get("time_dim_concat")
    if extra_frames is not None:
        frames += -(-extra_frames.shape[2] // pt)
    grid_hw = _ceil_grid(x.shape[-2:], (ph, pw))
    ref = extras.get("reference_latent")
    if ref is not None and getattr(dm, "ref_conv", None) is not None:
        # WanModel prepends the reference image's tokens and gives them RoPE frame 0 (t_len += 1)
        if tuple(s // p for s, p in zip(ref.shape[-2:], (ph, pw))) != grid_hw:
            raise ValueError("a Wan reference latent of another size than the video is not one frame of the grid")
        frames += 1
    cross = set()
    if context is not None:
        cross.add(int(context.shape[1]))
    clip = extras.get("clip_fea")
    if clip is not None:
        cross.add(int(clip.shape[-2]))
    return TokenLayout((frames, *grid_hw), 0), tuple(cross)


def _read_hunyuan(dm, x, context, extras):
    if extras.get("ref_latent") is not None:
        raise ValueError("HunyuanVideo ref_latent inputs prepend tokens that are not part of the video grid; "
                         "grid attention patterns do not support them")
    patch = tuple(int(p) for p in dm.patch_size)
    text = 0 if context is None else context.shape[1]
    byt5 = extras.get("txt_byt5")
    if byt5 is not None and getattr(dm, "byt5_in", None) is not None:
        text += byt5.shape[1]
    return TokenLayout(_ceil_grid(x.shape[2:], patch), text, "last"), ()


def _check_hunyuan(dm) -> str | None:
    if len(getattr(dm, "patch_size", ())) != 3:
        return "HunyuanVideo-class models with 2-D patches (HunyuanImage 2.1) are not supported"
    return None


@dataclass(frozen=True)
class ComfyFamily:
    """A ComfyUI model family: ``name`` is the diffusers family name used in ``MethodSpec.families``."""

    name: str
    classes: tuple[str, ...]
    description: str
    kind: str  # "dit" (attention override) or "unet" (attn1 replace)
    read: Callable | None = None  # (diffusion_model, x, context, extras) -> (TokenLayout, cross-attn key lengths)
    check: Callable | None = None  # (diffusion_model) -> reason it is unsupported, or None

    @property
    def grid_rank(self) -> int:
        """Axes of the token grid: 2 (images) or 3 (video), as the diffusers family of the same name has."""
        return grid_rank(self.name)


COMFY_FAMILIES: dict[str, ComfyFamily] = {f.name: f for f in (
    ComfyFamily("flux", ("Flux",), "FLUX.1 dev/schnell/Fill (comfy.ldm.flux.model.Flux): text first, double "
                "then single blocks", "dit", _read_flux),
    ComfyFamily("sd3", ("OpenAISignatureMMDITWrapper",), "SD 3 / 3.5 (comfy MMDiT joint blocks, text "
                "first; SD3.5-Medium's image-only second attention stays dense)", "dit", _read_sd3),
    ComfyFamily("wan", ("WanModel", "VaceWanModel", "CameraWanModel"), "Wan 2.1 / 2.2 T2V, I2V, FLF2V, TI2V-5B, "
                "VACE, Fun Camera (self-attention; cross-attention untouched)", "dit", _read_wan),
    ComfyFamily("hunyuanvideo", ("HunyuanVideo",), "HunyuanVideo T2V / I2V (video first, text last)", "dit",
                _read_hunyuan, _check_hunyuan),
    ComfyFamily("unet", ("UNetModel",), "SD 1.5 / 2.1 and SDXL UNets (attn1 of the transformer blocks)", "unet"),
)}


def detect_family(diffusion_model) -> ComfyFamily:
    """The family of a ComfyUI diffusion model, or a ValueError naming the supported classes."""
    name = type(diffusion_model).__name__
    for fam in COMFY_FAMILIES.values():
        if name in fam.classes:
            reason = fam.check(diffusion_model) if fam.check else None
            if reason:
                raise ValueError(f"diffusion_attn: {reason}")
            return fam
    supported = "; ".join(f"{f.description} [{', '.join(f.classes)}]" for f in COMFY_FAMILIES.values())
    raise ValueError(f"diffusion_attn does not support ComfyUI {name} models; supported: {supported}")


# ------------------------------------------------------------------------------------------------------
# UNets
# ------------------------------------------------------------------------------------------------------
def _transformer_depths(block):
    try:
        children = list(block)
    except TypeError:
        children = [block]
    found = [c for c in children if hasattr(c, "transformer_blocks")]
    if any(type(c).__name__ == "SpatialVideoTransformer" for c in found):
        raise ValueError("video UNets (SpatialVideoTransformer, e.g. SVD) are not supported")
    return [len(c.transformer_blocks) for c in found]


def unet_structure(dm):
    """``(blocks, attention_levels)`` of a ComfyUI ``UNetModel``.

    ``blocks``: ``((block_name, id, transformer_index), diffusers_block_name)`` for every transformer
    block, in diffusers' attn1 order (down blocks, up blocks, mid block); ``attention_levels``: per
    resolution level, whether its down blocks have attention.
    """
    nrb = [int(n) for n in dm.num_res_blocks]
    levels = len(nrb)
    input_map, idx = {}, 1
    for level in range(levels):
        for a in range(nrb[level]):
            input_map[idx] = (level, a)
            idx += 1
        idx += level != levels - 1  # downsampler
    output_map, idx = {}, 0
    for up, level in enumerate(reversed(range(levels))):
        for a in range(nrb[level] + 1):
            output_map[idx] = (up, a)
            idx += 1
    down, up, mid = [], [], []
    has_attn = [False] * levels
    for i, block in enumerate(dm.input_blocks):
        for depth in _transformer_depths(block):
            if i not in input_map:
                raise ValueError(f"unexpected transformer in UNet input block {i}")
            level, a = input_map[i]
            has_attn[level] = True
            down += [(("input", i, t), f"down_blocks.{level}.attentions.{a}.transformer_blocks.{t}") for t in range(depth)]
    if getattr(dm, "middle_block", None) is not None:
        for depth in _transformer_depths(dm.middle_block):
            mid += [(("middle", 0, t), f"mid_block.attentions.0.transformer_blocks.{t}") for t in range(depth)]
    for i, block in enumerate(dm.output_blocks):
        for depth in _transformer_depths(block):
            if i not in output_map:
                raise ValueError(f"unexpected transformer in UNet output block {i}")
            u, a = output_map[i]
            up += [(("output", i, t), f"up_blocks.{u}.attentions.{a}.transformer_blocks.{t}") for t in range(depth)]
    return down + up + mid, tuple(has_attn)


#: attention per resolution level -> HiDiffusion's UNet layout name
UNET_LAYOUTS = {(True, True, True, False): "sd15", (False, True, True): "sdxl"}


def unet_grid(extra_options: dict, tokens: int) -> tuple[int, int]:
    shape = extra_options.get("activations_shape")
    if shape is not None and int(shape[-2]) * int(shape[-1]) == tokens:
        return int(shape[-2]), int(shape[-1])
    original = extra_options.get("original_shape")
    if original is None:
        raise ValueError("diffusion_attn: the UNet level's feature size is unknown (no activations_shape/original_shape)")
    return level_grid(tuple(int(s) for s in original[-2:]), tokens)
