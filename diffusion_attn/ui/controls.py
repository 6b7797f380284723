"""UI controls generated from the method specs: which control a parameter gets, what its raw value means,
its label and help text, and (given the gradio module) the component itself. No gradio import here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_CHOICE", "TRISTATE", "collect_params", "control_kind", "parse_control"]

#: "leave blank" entries of generated dropdowns and radios
DEFAULT_CHOICE = "default"
TRISTATE = (DEFAULT_CHOICE, "on", "off")


def control_kind(param) -> str:
    """Which control a :class:`~diffusion_attn.Param` gets.

    ``slider`` (int/float bounded at both ends; with a "default" checkbox when the default is per
    model), ``number`` (int/float otherwise: a number box, or a textbox where blank means "per model",
    as an untouched empty ``gr.Number`` reads as 0), ``checkbox`` (bool with a default), ``tristate``
    (bool whose default is per model: default / on / off), ``choice`` (a dropdown of ``choices``),
    ``tuple`` (a textbox like ``3,8,8``), ``image`` (masks and images: an image upload), ``text``
    (other strings, and the other input types -- boxes, prompt lists, head lists -- as typed text).
    """
    from ..registry import Image, Mask

    if param.type in (Mask, Image):
        return "image"
    if param.choices is not None:
        return "choice"
    if param.type is bool:
        return "checkbox" if isinstance(param.default, bool) else "tristate"
    if param.type in (int, float):
        bounded = param.range is not None and param.range[0] is not None and param.range[1] is not None
        return "slider" if bounded else "number"
    if param.type is tuple:
        return "tuple"
    return "text"


def parse_control(param, raw, use_default: bool = False):
    """The value a control's raw UI value stands for, validated; ``None`` = the default (or per model).

    Raises ValueError with a readable message (out of range, not a number, bad tuple text, a required
    parameter left blank).
    """
    kind = control_kind(param)
    value = raw
    if use_default:
        value = None
    elif kind == "tristate":
        value = {"on": True, "off": False, True: True, False: False}.get(raw)
    elif kind == "choice":
        value = None if raw in (None, "", DEFAULT_CHOICE) and DEFAULT_CHOICE not in param.choices else raw
    elif kind in ("tuple", "text", "number", "slider"):
        if isinstance(raw, str):
            value = raw.strip()
            if kind == "tuple":  # "3,8,8", "3x8x8", "(3, 8, 8)", "3 8 8"
                value = re.sub(r"(?<=\d)\s+(?=\d)", ",", value.strip("()[] "))
                value = re.sub(r"\s+", "", value)
            if value == "":
                value = None
            elif kind in ("number", "slider"):
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"parameter {param.name!r} must be a number, got {raw!r}") from None
                if not math.isfinite(value):
                    raise ValueError(f"parameter {param.name!r} must be a finite number, got {raw!r}")
        elif isinstance(raw, float) and math.isnan(raw):
            value = None
    if kind == "tuple" and isinstance(value, str) and any(not part for part in value.replace("x", ",").split(",")):
        raise ValueError(f"parameter {param.name!r} must be an int or a tuple of ints like 3,8,8, got {raw!r}")
    if value is None and not param.required:
        return None
    if param.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    return param.validate(value)


def collect_params(method: str, raw: dict[str, Any], use_default: dict[str, bool] | None = None) -> dict:
    """Method parameters from raw UI values (``{name: raw}``): blanks dropped, the rest validated."""
    if method in (None, "", "none"):
        return {}
    from ..registry import get_method

    spec = get_method(method)
    use_default = use_default or {}
    out = {}
    for p in spec.params:
        value = parse_control(p, raw.get(p.name), use_default.get(p.name, False))
        if value is not None:
            out[p.name] = value
    return out


def _control_label(spec, p) -> str:
    if p.required:
        return f"{p.name} (required)"
    return p.name


def _control_info(spec, p) -> str:
    bits = [p.help]
    if p.default is None and not p.required:
        unset = "blank" if control_kind(p) in ("number", "tuple", "text") else '"default"'
        per_model = any(p.name in d for d in spec.family_defaults.values())
        bits.append(f"{unset}: " + ("per model" if per_model else "automatic"))
    elif p.default is not None:
        bits.append(f"default: {p.default}")
    if p.range is not None:
        lo, hi = p.range
        bits.append(f"range {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
    if p.type is tuple:
        bits.append("e.g. 3,8,8 (an int broadcasts)")
    return "; ".join(b for b in bits if b)


@dataclass
class _Control:
    method: str
    param: Any
    kind: str
    component: Any
    use_default: Any = None  # the "default" checkbox next to a slider whose default is per model


def _make_control(gr, spec, p) -> _Control:
    kind = control_kind(p)
    label, info = _control_label(spec, p), _control_info(spec, p)
    elem = f"da-{spec.name}-{p.name}".replace("_", "-")
    use_default = None
    if kind == "slider":
        lo, hi = p.range
        step = 1 if p.type is int else (hi - lo) / 100
        with gr.Row():
            comp = gr.Slider(lo, hi, value=p.default if p.default is not None else lo, step=step, label=label,
                             info=info, elem_id=elem, scale=4)
            if p.default is None:
                use_default = gr.Checkbox(value=True, label="default", elem_id=elem + "-default", scale=1, min_width=80)
                # touching the slider means the user wants its value
                comp.input(lambda: False, None, use_default, queue=False, show_progress="hidden")
    elif kind == "number" and p.default is not None:
        comp = gr.Number(value=p.default, label=label, info=info, elem_id=elem)
    elif kind == "number":  # blank = per model: a textbox, as an empty gr.Number reads as 0 before it is edited
        comp = gr.Textbox("", label=label, info=info, elem_id=elem, max_lines=1, placeholder="blank = default")
    elif kind == "checkbox":
        comp = gr.Checkbox(value=p.default, label=label, info=info, elem_id=elem)
    elif kind == "image":  # a mask uploads as grayscale, an image as RGB; the parameter validates either
        from ..registry import Mask

        comp = gr.Image(type="pil", image_mode="L" if p.type is Mask else "RGB", label=f"{label}: {info}",
                        elem_id=elem, sources=["upload", "clipboard"])
    elif kind == "tristate":
        comp = gr.Radio(list(TRISTATE), value=DEFAULT_CHOICE, label=label, info=info, elem_id=elem)
    elif kind == "choice":
        choices = [str(c) if not isinstance(c, (str, int, float)) else c for c in p.choices]
        if p.default is None:
            choices = [DEFAULT_CHOICE, *choices]
        comp = gr.Dropdown(choices, value=p.default if p.default is not None else DEFAULT_CHOICE, label=label,
                           info=info, elem_id=elem)
    else:
        default = p.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        comp = gr.Textbox(value="" if default is None else str(default), label=label, info=info, elem_id=elem,
                          placeholder="blank = default" if not p.required else "e.g. 3,8,8", max_lines=1)
    return _Control(spec.name, p, kind, comp, use_default)
