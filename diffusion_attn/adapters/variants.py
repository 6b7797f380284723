"""What the pack knows about each model variant without running it: the one home of that knowledge.

A *variant* is what a user picks (``flux``, ``sd3``, ``wan``, ``hunyuanvideo``, ``mochi``,
``unet-sd15``, ``unet-sdxl``); its *family* is the adapter that runs it (the two UNet variants share
the ``unet`` adapter). The runner, the UI, the tiny models and the ComfyUI nodes ask here for:
detection (from a loaded denoiser or a checkpoint's ``model_index.json`` class names), the VAE's
compression, the patch size, the text position and the full-size checkpoints' text length, and so the
token layout of a call of a given size.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout import TokenLayout

__all__ = ["Variant", "VARIANTS", "adapter_family", "grid_rank", "token_layout", "variant_of", "variant_of_classes"]


@dataclass(frozen=True)
class Variant:
    """One model variant.

    ``vae``: (temporal, spatial) compression of the VAE; ``patch``: (temporal, spatial) patch of the
    denoiser over the latent (UNets: the factor from the latent to their first self-attention level);
    ``text_position``: where the joint attention puts text (``None``: text has separate cross-attention
    layers); ``max_sequence_length``: the pipeline's default for its long text encoder (T5 / Llama);
    ``extra_text``: text tokens the joint attention has beyond it (SD3's 77 CLIP tokens).
    """

    name: str
    family: str
    model_class: str
    video: bool = False
    vae: tuple[int, int] = (1, 8)
    patch: tuple[int, int] = (1, 2)
    text_position: str | None = None
    max_sequence_length: int = 0
    extra_text: int = 0


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("flux", "flux", "FluxTransformer2DModel", text_position="first", max_sequence_length=512),
    Variant("sd3", "sd3", "SD3Transformer2DModel", text_position="last", max_sequence_length=256,
            extra_text=77),
    Variant("wan", "wan", "WanTransformer3DModel", video=True, vae=(4, 8)),
    Variant("hunyuanvideo", "hunyuanvideo", "HunyuanVideoTransformer3DModel", video=True, vae=(4, 8),
            text_position="last", max_sequence_length=256),
    Variant("mochi", "mochi", "MochiTransformer3DModel", video=True, vae=(6, 8), text_position="last",
            max_sequence_length=256),
    Variant("unet-sd15", "unet", "UNet2DConditionModel", patch=(1, 1)),
    Variant("unet-sdxl", "unet", "UNet2DConditionModel", patch=(1, 2)),  # first attention level: latent / 2
)}


def adapter_family(variant: str) -> str:
    """The adapter family of a variant (``unet-sdxl`` -> ``unet``); a family name maps to itself."""
    v = VARIANTS.get(variant)
    return v.family if v is not None else variant


def grid_rank(family: str) -> int | None:
    """Rank of the token grid of a family or variant: 2 for images (H, W), 3 for video (T, H, W); None
    for an unknown name."""
    ranks = {3 if v.video else 2 for v in VARIANTS.values() if family in (v.name, v.family)}
    return ranks.pop() if len(ranks) == 1 else None


def variant_of(model) -> str | None:
    """The variant of a loaded denoiser (``torch.compile`` wrappers are looked through), or None."""
    model = getattr(model, "_orig_mod", model)
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        config = getattr(model, "config", {}) or {}
        return "unet-sdxl" if config.get("addition_embed_type") == "text_time" else "unet-sd15"
    return next((v.name for v in VARIANTS.values() if v.model_class == name and v.family != "unet"), None)


def variant_of_classes(denoiser_class: str, pipeline_class: str = "") -> str | None:
    """The variant from class names, as a checkpoint's ``model_index.json`` gives them (denoiser class,
    pipeline ``_class_name``), or None."""
    if denoiser_class == "UNet2DConditionModel":
        return "unet-sdxl" if "XL" in pipeline_class else "unet-sd15"
    return next((v.name for v in VARIANTS.values() if v.model_class == denoiser_class and v.family != "unet"), None)


def token_layout(variant: str, height: int, width: int, num_frames: int | None = None,
                 max_sequence_length: int | None = None) -> TokenLayout:
    """The token layout of the variant's main attention for an output of ``height`` x ``width`` (and
    ``num_frames``): the patchified latent grid (UNets: their first self-attention level) and the joint
    attention's text for the pipeline's ``max_sequence_length`` (default: the pipeline's default)."""
    v = VARIANTS.get(variant)
    if v is None:
        raise ValueError(f"no token layout known for {variant!r}; known: {', '.join(VARIANTS)}")
    (vt, vs), (pt, ps) = v.vae, v.patch
    spatial = (int(height) // (vs * ps), int(width) // (vs * ps))
    grid = spatial
    if v.video:
        frames = int(num_frames or 1)
        grid = (((frames - 1) // vt + 1) // pt, *spatial)
    if min(grid) < 1:
        raise ValueError(f"{height} x {width} is too small for {variant} (a token grid of {grid})")
    seq = v.max_sequence_length if max_sequence_length is None else int(max_sequence_length)
    text = 0 if v.text_position is None else v.extra_text + seq
    return TokenLayout(grid, text_len=text, text_position=v.text_position or "last")
