"""What the UI knows about a model before loading it: its family, default sizes, the token layout of its
main attention (for the pattern picture), the per-model defaults variant, and the method description."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..runner import adapter_family

__all__ = ["VIDEO_FAMILIES", "method_markdown", "model_family_of", "size_defaults", "token_layout"]

VIDEO_FAMILIES = ("wan", "hunyuanvideo", "mochi")


#: denoiser / pipeline class names in a checkpoint's model_index.json -> family
_CLASS_FAMILY = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuanvideo",
    "MochiTransformer3DModel": "mochi",
}
#: families found for non-embedded models after loading them once (hub ids have no local index)
_SEEN_FAMILIES: dict[str, str] = {}
#: text tokens in the joint attention of full-size checkpoints: (count, position); Wan's text is in
#: separate cross-attention layers and the UNets' too, so their self-attention has none
_REAL_TEXT = {"flux": (512, "first"), "sd3": (77 + 256, "last"), "hunyuanvideo": (256, "last"),
              "mochi": (256, "last")}


def model_family_of(model: str) -> str | None:
    """The family (as :func:`diffusion_attn.models.model_family` names it) of an embedded model name, a
    local diffusers folder, or a model loaded earlier in this process; None when unknown before loading."""
    from ..models import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model].family
    if model in _SEEN_FAMILIES:
        return _SEEN_FAMILIES[model]
    index = Path(model) / "model_index.json"
    try:
        info = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    for key in ("transformer", "unet"):
        entry = info.get(key)
        if not isinstance(entry, list) or len(entry) != 2:
            continue
        if entry[1] in _CLASS_FAMILY:
            return _CLASS_FAMILY[entry[1]]
        if entry[1] == "UNet2DConditionModel":
            return "unet-sdxl" if "XL" in str(info.get("_class_name", "")) else "unet-sd15"
    return None


def size_defaults(model: str, family: str | None) -> dict:
    """Default height / width / num_frames / guidance for a model (embedded: the tiny sizes; else {})."""
    from ..models import EMBEDDED_MODELS, default_call_kwargs

    if model in EMBEDDED_MODELS:
        kw = default_call_kwargs(model)
        return {k: kw[k] for k in ("height", "width", "num_frames", "guidance_scale") if k in kw}
    return {}


def token_layout(model: str, family: str, height: int, width: int, num_frames: int | None = None):
    """The token layout of ``model``'s main attention at this size: a :class:`~diffusion_attn.TokenLayout`.

    Transformers: the patchified latent grid (VAE /8 in space, /4 in time for Wan and HunyuanVideo, /6
    for Mochi; patch 2) and the text tokens of the joint attention (the embedded models' short text, or
    the full-size checkpoints' defaults). UNets: the largest self-attention grid (SD 1.5: latent size;
    SDXL: latent / 2, its first attention level).
    """
    from ..layout import TokenLayout
    from ..models import EMBEDDED_MODELS, default_call_kwargs

    h, w = int(height), int(width)
    if family in ("unet-sd15",):
        return TokenLayout((h // 8, w // 8))
    if family == "unet-sdxl":
        return TokenLayout((h // 16, w // 16))
    if model in EMBEDDED_MODELS:
        seq = default_call_kwargs(model).get("max_sequence_length", 0)
        text = {"flux": (seq, "first"), "sd3": (77 + seq, "last"), "hunyuanvideo": (seq, "last"),
                "mochi": (seq, "last")}.get(family, (0, "last"))
    else:
        text = _REAL_TEXT.get(family, (0, "last"))
    spatial = (h // 16, w // 16)
    if family in VIDEO_FAMILIES:
        frames = int(num_frames or 1)
        temporal = {"mochi": 6}.get(family, 4)
        grid = ((frames - 1) // temporal + 1, *spatial)
    elif family in ("flux", "sd3"):
        grid = spatial
    else:
        raise ValueError(f"no token layout known for family {family!r}")
    if min(grid) < 1:
        raise ValueError(f"{height} x {width} is too small for {family} (a token grid of {grid})")
    return TokenLayout(grid, text_len=text[0], text_position=text[1])


def _variant(spec, model: str, family: str) -> str:
    """The family name whose per-model defaults apply (``wan2.2`` for two-expert Wan 2.2 checkpoints, where
    the spec has its own; :func:`diffusion_attn.apply` tells them by a ``transformer_2``)."""
    fam = adapter_family(family)
    if fam == "wan" and "wan2.2" in spec.family_defaults and _two_experts(model):
        return "wan2.2"
    return fam


def _two_experts(model: str) -> bool:
    """Whether a Wan model has a second expert (``transformer_2``), told without loading it: the
    embedded model's name, a local folder's model_index.json, a pipeline the runner already holds, or
    (hub ids) the Wan 2.2 A14B naming."""
    if model in ("tiny-wan22",):
        return True
    try:
        entry = json.loads((Path(model) / "model_index.json").read_text()).get("transformer_2")
        return isinstance(entry, list) and entry[-1] is not None
    except (OSError, ValueError):
        pass
    from .. import runner

    for key, pipe in list(getattr(runner, "_CACHE", {}).items()):
        if key[0] == model:
            return getattr(pipe, "transformer_2", None) is not None
    return bool(re.search(r"wan-?2\.?2.*a14b", model, re.IGNORECASE))


def method_markdown(method: str, model: str | None = None) -> str:
    """A short description of the method (summary, paper, families, per-model defaults)."""
    if method in (None, "", "none"):
        return "**none**: the model's stock (dense) attention, for reference."
    from ..registry import get_method

    spec = get_method(method)
    lines = [f"**{spec.name}**: {spec.summary}", f"*{spec.paper}* · families: {', '.join(spec.families)} · {spec.kind}"]
    family = model_family_of(model) if model else None
    if family is not None:
        if adapter_family(family) not in spec.families:
            lines.append(f"⚠ {spec.name} does not run on {family} models.")
        else:
            defaults = spec.family_defaults.get(_variant(spec, model, family), {})
            if defaults:
                shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
                lines.append(f"Defaults for this model: {shown}. Leave a field blank to use them.")
    return "\n\n".join(lines)
