"""ComfyUI nodes generated from the method specs: one node per method, shown under the method's proper
name (:func:`display_name`).

The inputs come from ``MethodSpec.params`` (no per-method node code):

* ``int`` / ``float`` -> INT / FLOAT with the spec's range (``min``/``max``), ``step`` and the help as
  tooltip; ``bool`` -> BOOLEAN; ``str`` with choices -> a combo; other ``str`` -> STRING;
* ``tuple`` (one int per grid axis) -> STRING such as ``"3,8,8"`` (or ``"3x8x8"``; one int broadcasts);
* "not set / per-model default" (a parameter whose default is None): ``-1`` for numbers (the widget's
  minimum; a parameter whose range starts at ``lo`` uses ``lo - 1``), ``"default"`` in bool and choice
  combos, an empty STRING for tuples and strings;
* INT inputs named like a seed get ``control_after_generate: False`` (as ComfyUI's own nodes where a seed
  must stay as typed; otherwise the frontend adds a "randomize after generate" widget);
* every node gets ``start_percent`` / ``end_percent`` (FLOAT 0-1): the part of the denoising schedule where
  the method runs, ComfyUI's convention, which survives split sampling (:mod:`.runtime`);
* methods with per-model defaults get one more combo, ``defaults_for``: ``auto`` (the detected model
  family) or a ``family_defaults`` key such as ``wan2.2``.

V1 classes (``INPUT_TYPES`` / ``FUNCTION``) are plain data and need no ComfyUI; :func:`build_v3_nodes`
makes the same nodes as V3 ``io.ComfyNode`` classes from a ``comfy_api.latest.io`` module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..registry import Image, Mask, MethodSpec, Param, methods
from .patching import COMFY_FAMILIES, MIN_COMFYUI, SUPPORT, ComfySupport, apply_method, comfy_methods, supported_models

__all__ = [
    "CATEGORY",
    "DEFAULTS_INPUT",
    "NodeInput",
    "apply_node",
    "build_node_mappings",
    "build_v3_nodes",
    "description",
    "display_name",
    "node_id",
    "node_inputs",
    "PROPER_NAMES",
    "SCHEDULE_INPUTS",
]

CATEGORY = "diffusion_attn"
#: extra combo picking whose per-model defaults fill unset parameters
DEFAULTS_INPUT = "defaults_for"
#: node inputs (not spec parameters) of the schedule window, ComfyUI's start/end percent convention
SCHEDULE_INPUTS = ("start_percent", "end_percent")
INT_MAX = 0xFFFFFFFFFFFFFFFF
FLOAT_LIMIT = 1e6
_UNSET = object()


def node_id(spec: MethodSpec) -> str:
    return "DiffusionAttnApply_" + re.sub(r"\W", "_", spec.name)


#: the methods' proper names where the summary's head (before ":") is not one; a method missing here
#: shows ``<summary head> (<NAME>)`` or the summary head when it already names the method
PROPER_NAMES = {
    "gna": "Generalized Neighborhood Attention (GNA)",
    "radial": "Radial Attention",
    "hidiffusion": "HiDiffusion (MSW-MSA)",  # the node has no RAU-Net (see SUPPORT["hidiffusion"].note)
}


def display_name(spec: MethodSpec) -> str:
    """The node's display name: the method's proper name (:data:`PROPER_NAMES`, else from ``spec.summary``)."""
    if spec.name in PROPER_NAMES:
        return PROPER_NAMES[spec.name]
    head = spec.summary.split(":", 1)[0].strip() or spec.name
    if spec.name.lower() in head.lower().replace(" ", ""):
        return head
    return f"{head} ({spec.name.upper() if len(spec.name) <= 5 else spec.name})"


def _class_name(spec: MethodSpec) -> str:
    return "Apply" + "".join(part.capitalize() for part in re.split(r"\W|_", spec.name) if part) + "Attention"


def _fmt(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


@dataclass(frozen=True)
class NodeInput:
    """One node input derived from a spec parameter (or the ``defaults_for`` combo)."""

    name: str
    kind: str  # INT, FLOAT, BOOLEAN, STRING, COMBO; sockets: MASK, IMAGE
    default: Any
    tooltip: str
    param: Param | None = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    options: tuple = ()
    unset: Any = _UNSET  # the widget value that means "not set" (None -> spec/per-model default)
    #: INT only: ComfyUI's frontend adds a "control after generate" widget (randomize / increment / ...)
    #: to INT inputs named like a seed unless this is False; a method's seed must stay as typed
    control_after_generate: bool | None = None

    @property
    def socket(self) -> bool:
        """A connected input (ComfyUI's MASK / IMAGE sockets), not a widget; optional unless required."""
        return self.kind in ("MASK", "IMAGE")

    @property
    def optional(self) -> bool:
        return self.socket and not (self.param is not None and self.param.required)

    def v1(self) -> tuple:
        if self.socket:
            return (self.kind, {"tooltip": self.tooltip})
        opts = {"default": self.default, "tooltip": self.tooltip}
        if self.kind == "COMBO":
            return (list(self.options), opts)
        if self.kind in ("INT", "FLOAT"):
            opts.update(min=self.minimum, max=self.maximum, step=self.step)
        if self.control_after_generate is not None:
            opts["control_after_generate"] = self.control_after_generate
        if self.kind == "STRING":
            opts["multiline"] = False
        return (self.kind, opts)

    def v3(self, io):
        if self.socket:
            socket = io.Mask if self.kind == "MASK" else io.Image
            return socket.Input(self.name, optional=self.optional, tooltip=self.tooltip)
        common = dict(default=self.default, tooltip=self.tooltip)
        if self.kind == "INT":
            if self.control_after_generate is not None:
                common["control_after_generate"] = self.control_after_generate
            return io.Int.Input(self.name, min=self.minimum, max=self.maximum, step=self.step, **common)
        if self.kind == "FLOAT":
            return io.Float.Input(self.name, min=self.minimum, max=self.maximum, step=self.step, **common)
        if self.kind == "BOOLEAN":
            return io.Boolean.Input(self.name, **common)
        if self.kind == "COMBO":
            return io.Combo.Input(self.name, options=list(self.options), **common)
        return io.String.Input(self.name, multiline=False, **common)

    def decode(self, value):
        """The widget value as a spec value; :data:`_UNSET` leaves the parameter to its default."""
        if self.socket:
            if value is None:  # an optional socket left unconnected
                return _UNSET
            if self.kind == "IMAGE":  # ComfyUI's IMAGE is (B, H, W, C) in [0, 1]: the first image, as (C, H, W)
                return value[0].permute(2, 0, 1)
            return value  # ComfyUI's MASK is (B, H, W) or (H, W) in [0, 1], as a Mask parameter takes it
        if self.unset is not _UNSET:
            if self.kind == "FLOAT" and isinstance(value, (int, float)) and abs(value - self.unset) < 1e-9:
                return _UNSET
            if value == self.unset:
                return _UNSET
        if self.param is None:
            return value
        if self.kind == "COMBO" and self.param.type is bool:
            return value == "true"
        if self.kind == "STRING" and self.param.type is tuple:
            return value.strip()
        return value


def _default_note(spec: MethodSpec, p: Param, unset_text: str) -> str:
    per_model = [f"{fam}: {_fmt(d[p.name])}" for fam, d in spec.family_defaults.items() if p.name in d]
    if per_model:
        return f" [{unset_text} = per-model default ({'; '.join(per_model)})]"
    return f" [{unset_text} = not set]"


def _is_seed(name: str) -> bool:
    return name == "seed" or name.endswith("_seed")


def _param_input(spec: MethodSpec, p: Param) -> NodeInput:
    if p.type in (Mask, Image):  # ComfyUI's own MASK / IMAGE sockets (connected, not typed)
        return NodeInput(p.name, "MASK" if p.type is Mask else "IMAGE", None, p.help + (" (required)" if p.required else ""), p)
    lo, hi = p.range if p.range is not None else (None, None)
    optional = p.default is None and not p.required
    tip = p.help + (" (required)" if p.required else "")
    if p.type is bool:
        if optional:
            return NodeInput(p.name, "COMBO", "default", tip + _default_note(spec, p, "default"), p,
                             options=("default", "true", "false"), unset="default")
        return NodeInput(p.name, "BOOLEAN", bool(p.default), tip, p)
    if p.type in (int, float):
        is_int = p.type is int
        minimum = lo if lo is not None else (-INT_MAX if is_int else -FLOAT_LIMIT)
        maximum = hi if hi is not None else (INT_MAX if is_int else FLOAT_LIMIT)
        step = 1 if is_int else 0.01
        seed = False if (is_int and _is_seed(p.name)) else None
        if optional:
            sentinel = (lo - 1) if lo is not None else -1
            sentinel = int(sentinel) if is_int else float(sentinel)
            return NodeInput(p.name, "INT" if is_int else "FLOAT", sentinel, tip + _default_note(spec, p, _fmt(sentinel)), p,
                             minimum=sentinel, maximum=maximum, step=step, unset=sentinel, control_after_generate=seed)
        default = p.default if p.default is not None else (lo if lo is not None else 0)
        return NodeInput(p.name, "INT" if is_int else "FLOAT", p.type(default), tip, p,
                         minimum=p.type(minimum), maximum=p.type(maximum), step=step, control_after_generate=seed)
    if p.type is str and p.choices:
        options = tuple(map(str, p.choices))
        if optional:
            return NodeInput(p.name, "COMBO", "default", tip + _default_note(spec, p, "default"), p,
                             options=("default", *options), unset="default")
        return NodeInput(p.name, "COMBO", str(p.default), tip, p, options=options)
    if p.type is tuple:
        tip += " -- type ints separated by commas, e.g. 3,8,8"
    default = "" if p.default is None else _fmt(p.default)
    note = _default_note(spec, p, "empty") if optional else ""
    # an empty tuple is never a value, so empty means "the spec's default"; for strings only when that is None
    unset = "" if (p.type is tuple or p.default is None) else _UNSET
    return NodeInput(p.name, "STRING", default, tip + note, p, unset=unset)


def _schedule_inputs(spec: MethodSpec) -> list[NodeInput]:
    steps = " (dense_steps, which counts the steps of one sampler run, applies too)" if "dense_steps" in \
        {p.name for p in spec.params} else ""
    common = ("fraction of the denoising schedule (sigmas, ComfyUI's start/end percent as in ControlNet and "
              "SkipLayerGuidance; 0.0 = the first, noisiest step, 1.0 = the end); unlike a step count it holds "
              "across KSamplerAdvanced splits and Wan 2.2's two experts")
    return [
        NodeInput("start_percent", "FLOAT", 0.0, f"where {spec.name} starts: attention stays dense before this "
                  f"{common}{steps}", minimum=0.0, maximum=1.0, step=0.001),
        NodeInput("end_percent", "FLOAT", 1.0, f"where {spec.name} ends: attention is dense again after this "
                  f"{common}", minimum=0.0, maximum=1.0, step=0.001),
    ]


def node_inputs(spec: MethodSpec) -> list[NodeInput]:
    """The node inputs of a method (after ``model``): its parameters, ``start_percent`` / ``end_percent``,
    then ``defaults_for`` if any."""
    support = SUPPORT.get(spec.name, ComfySupport())
    names = [p.name for p in spec.params]
    for reserved in (DEFAULTS_INPUT, *SCHEDULE_INPUTS):
        if reserved in names:
            raise ValueError(f"method {spec.name!r} has a parameter named {reserved!r}, reserved by the ComfyUI nodes")
    out = [_param_input(spec, p) for p in spec.params if p.name not in support.hidden]
    out += _schedule_inputs(spec)
    if spec.family_defaults:
        keys = tuple(spec.family_defaults)
        tip = "whose defaults fill the parameters left unset: auto = the detected model family, or " + ", ".join(keys)
        if "wan2.2" in keys:
            tip += " (Wan 2.2 A14B loads with the Wan 2.1 architecture in ComfyUI, so auto gives wan: pick wan2.2)"
        out.append(NodeInput(DEFAULTS_INPUT, "COMBO", "auto", tip, options=("auto", *keys)))
    return out


def description(spec: MethodSpec) -> str:
    support = SUPPORT.get(spec.name, ComfySupport())
    models = supported_models(spec)
    lines = [f"{spec.summary}.", f"Paper: {spec.paper}."]
    if models:
        lines.append("ComfyUI models: " + "; ".join(models) + ".")
    else:
        lines.append(f"No ComfyUI model family supports this method (its families: {', '.join(spec.families)}).")
    missing = [f for f in spec.families if f not in COMFY_FAMILIES]
    if missing:
        lines.append(f"Not available in ComfyUI for: {', '.join(missing)}.")
    if support.note:
        lines.append(support.note)
    if any(COMFY_FAMILIES[f].kind == "dit" for f in spec.families if f in COMFY_FAMILIES):
        lines.append(f"DiT models need ComfyUI >= {MIN_COMFYUI}.")
    lines.append("start_percent / end_percent: where in the schedule the method runs (they hold across "
                 "KSamplerAdvanced splits and Wan 2.2's two experts); dense_steps counts the steps of one sampler run "
                 "(KSamplerAdvanced start_at_step restarts it). Layer indices follow the diffusers processors' layer order.")
    return "\n".join(lines)


def apply_node(spec: MethodSpec, model, values: dict):
    """Run a node: decode the widget ``values`` and patch a clone of ``model``."""
    values = dict(values)
    defaults_for = values.pop(DEFAULTS_INPUT, "auto")
    window = {name: values.pop(name) for name in SCHEDULE_INPUTS if name in values}
    params = {}
    for inp in node_inputs(spec):
        if inp.param is None or inp.name not in values:
            continue
        value = inp.decode(values[inp.name])
        if value is not _UNSET:
            params[inp.name] = value
    return apply_method(model, spec, params, defaults_for, **window)


MODEL_TOOLTIP = "the diffusion model to patch (a patched clone is returned; the input model is unchanged)"
OUTPUT_TOOLTIP = "the model with the attention method applied"


def _make_v1_node(spec: MethodSpec) -> type:
    inputs = node_inputs(spec)

    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        required = {"model": ("MODEL", {"tooltip": MODEL_TOOLTIP})}
        required.update((i.name, i.v1()) for i in inputs if not i.optional)
        optional = {i.name: i.v1() for i in inputs if i.optional}
        return {"required": required, "optional": optional} if optional else {"required": required}

    def patch(self, model, **values):
        return (apply_node(spec, model, values),)

    return type(_class_name(spec), (), {
        "__module__": __name__,
        "__doc__": f"ComfyUI node: {display_name(spec)} ({spec.summary}).",
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "RETURN_TYPES": ("MODEL",),
        "RETURN_NAMES": ("model",),
        "OUTPUT_TOOLTIPS": (OUTPUT_TOOLTIP,),
        "FUNCTION": "patch",
        "CATEGORY": CATEGORY,
        "DESCRIPTION": description(spec),
        "METHOD": spec.name,
        "patch": patch,
    })


def build_node_mappings() -> tuple[dict[str, type], dict[str, str]]:
    """``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)`` for the methods with a ComfyUI node (V1 nodes)."""
    classes, names = {}, {}
    for spec in comfy_methods().values():
        classes[node_id(spec)] = _make_v1_node(spec)
        names[node_id(spec)] = display_name(spec)
    return classes, names


def _make_v3_node(spec: MethodSpec, io) -> type:
    inputs = node_inputs(spec)

    def define_schema(cls):
        return io.Schema(
            node_id=node_id(spec),
            display_name=display_name(spec),
            category=CATEGORY,
            description=description(spec),
            inputs=[io.Model.Input("model", tooltip=MODEL_TOOLTIP), *(i.v3(io) for i in inputs)],
            outputs=[io.Model.Output(tooltip=OUTPUT_TOOLTIP)],
        )

    def execute(cls, model, **values):
        return io.NodeOutput(apply_node(spec, model, values))

    return type(_class_name(spec), (io.ComfyNode,), {
        "__module__": __name__,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
        "METHOD": spec.name,
    })


def build_v3_nodes(io) -> list[type]:
    """The same nodes as V3 ``io.ComfyNode`` classes (``io`` = ``comfy_api.latest.io``)."""
    return [_make_v3_node(spec, io) for spec in comfy_methods().values()]
