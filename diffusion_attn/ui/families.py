"""What the UI knows about a model before loading it: its family, default sizes, the token layout of its
main attention (for the pattern picture), the per-model defaults variant, and the method description."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..adapters import VARIANTS, adapter_family, variant_of_classes
from ..adapters import token_layout as variant_token_layout

__all__ = ["VIDEO_FAMILIES", "method_markdown", "model_family_of", "size_defaults", "token_layout"]

VIDEO_FAMILIES = tuple(v.name for v in VARIANTS.values() if v.video)


#: families found for non-embedded models after loading them once (hub ids have no local index)
_SEEN_FAMILIES: dict[str, str] = {}
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
        found = variant_of_classes(entry[1], str(info.get("_class_name", "")))
        if found is not None:
            return found
    return None


def size_defaults(model: str, family: str | None) -> dict:
    """Default height / width / num_frames / guidance for a model (embedded: the tiny sizes; else {})."""
    from ..models import EMBEDDED_MODELS, default_call_kwargs

    if model in EMBEDDED_MODELS:
        kw = default_call_kwargs(model)
        return {k: kw[k] for k in ("height", "width", "num_frames", "guidance_scale") if k in kw}
    return {}


def token_layout(model: str, family: str, height: int, width: int, num_frames: int | None = None):
    """The token layout of ``model``'s main attention at this size (see
    :func:`diffusion_attn.adapters.token_layout`): an embedded model's short text, else the full-size
    checkpoints' default."""
    from ..models import EMBEDDED_MODELS, default_call_kwargs

    seq = default_call_kwargs(model).get("max_sequence_length", 0) if model in EMBEDDED_MODELS else None
    return variant_token_layout(family, height, width, num_frames, max_sequence_length=seq)


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
