"""Method specs: the single source of every method's name, summary, parameters and model families.

The Python API validates kwargs against them, and the CLI, the Gradio UI, the ComfyUI nodes and the
README's method table are generated from them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Param", "MethodSpec", "register", "get_method", "methods", "suggest"]


@dataclass(frozen=True)
class Param:
    """One method parameter.

    ``type``: ``int``, ``float``, ``bool``, ``str`` or ``tuple`` (a tuple of ints, one per grid axis; a
    single int broadcasts). ``default=None`` with ``required=False`` means "per model family" (resolved
    from ``MethodSpec.family_defaults``). ``range`` is an inclusive ``(min, max)``, either end None.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    range: tuple[Any, Any] | None = None
    choices: tuple[Any, ...] | None = None
    required: bool = False

    def validate(self, value):
        if value is None:
            if self.required:
                raise ValueError(f"parameter {self.name!r} is required: {self.help}")
            return None
        if self.type is tuple:
            if isinstance(value, int) and not isinstance(value, bool):
                value = (value,)
            try:
                if isinstance(value, str):  # "18,24,24" or "18x24x24", as typed on a command line
                    value = value.replace("x", ",").split(",")
                value = tuple(int(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"parameter {self.name!r} must be an int or a tuple of ints, got {value!r}") from None
            items = value
        elif self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"parameter {self.name!r} must be True or False, got {value!r}")
            items = ()
        elif self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.type is int and not float(value).is_integer()):
                raise ValueError(f"parameter {self.name!r} must be {self.type.__name__}, got {value!r}")
            value = self.type(value)
            items = (value,)
        else:
            value = str(value)
            items = ()
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"parameter {self.name!r} must be one of {self.choices}, got {value!r}")
        if self.range is not None:
            lo, hi = self.range
            for v in items:
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    raise ValueError(f"parameter {self.name!r} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
        return value


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    ``install(model, family, context, params) -> list of undo callables`` puts the method on one
    denoiser; ``grid_pattern(layout, params)`` returns its pattern for the mask views; ``family_defaults``
    maps a family (or a variant such as ``"wan2.2"``) to parameter defaults.
    """

    name: str
    summary: str
    paper: str
    families: tuple[str, ...]
    kind: str
    params: tuple[Param, ...]
    install: Callable
    grid_pattern: Callable | None = None
    family_defaults: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(self, params: dict, variant: str | None = None) -> dict:
        """Validate user params and fill defaults (family/variant defaults over the spec's)."""
        names = [p.name for p in self.params]
        for key in params:
            if key not in names:
                hint = suggest(key, names)
                raise ValueError(f"method {self.name!r} has no parameter {key!r}{hint}; accepted: {', '.join(names)}")
        defaults = dict(self.family_defaults.get(variant, {})) if variant else {}
        out = {}
        for p in self.params:
            value = params.get(p.name, defaults.get(p.name, p.default))
            out[p.name] = p.validate(value)
        return out

    def describe(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "families": list(self.families),
            "kind": self.kind,
            "params": [
                {"name": p.name, "type": p.type.__name__, "default": p.default, "range": p.range,
                 "choices": p.choices, "required": p.required, "help": p.help}
                for p in self.params
            ],
            "family_defaults": self.family_defaults,
        }


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    for name in (spec.name, *spec.aliases):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = spec
    return spec


def suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_method(name: str) -> MethodSpec:
    _load_builtin()
    if name not in _REGISTRY:
        names = sorted({s.name for s in _REGISTRY.values()})
        raise ValueError(f"unknown method {name!r}{suggest(name, _REGISTRY)}; available: {', '.join(names)}")
    return _REGISTRY[name]


def methods() -> dict[str, MethodSpec]:
    """The registered methods, by name."""
    _load_builtin()
    return {s.name: s for s in _REGISTRY.values()}


def _load_builtin() -> None:
    from . import processors  # noqa: F401  (registers the built-in methods)
