"""Method specs and typed method configs: the single source of every method's name, summary, parameters
and model families.

Each method declares one frozen dataclass (``GNAConfig``, ``RadialConfig``, ``HiDiffusionConfig``) whose
fields are made with :func:`param`: a role (``pattern``, ``placement``, ``kernel`` or ``input``), a help
text, a range, choices and per-family defaults. Everything else is derived from it: the Python kwargs of
``diffusion_attn.apply(pipe, "radial", **kw)`` and the config form ``apply(pipe, RadialConfig(...))``,
processor construction, pattern cache keys (the pattern-role fields), the ``MethodSpec.params`` tuple of
:class:`Param` that the CLI flags, the Gradio controls, the ComfyUI inputs and the README's method table
are generated from.

Parameter values are checked strictly: numbers must be finite (NaN and infinity fail), tuple entries must
be ints (``2.5`` and ``True`` are refused, never truncated), and an explicit ``None`` means "the default"
only for a parameter whose default is ``None`` (documented as "per model" or with a meaning of its own,
e.g. HiDiffusion's ``seed=None``); for any other parameter ``None`` is an error.

Input types beyond numbers (for methods that take user inputs at call time): :class:`Boxes`,
:class:`Mask`, :class:`Image`, :class:`Prompts` and :class:`Heads`, each with validation and a
command-line form (see their docstrings).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

__all__ = [
    "ROLES",
    "Param",
    "MethodSpec",
    "MethodConfig",
    "method_config",
    "param",
    "Boxes",
    "Mask",
    "Image",
    "Prompts",
    "Heads",
    "check_backend",
    "check_mask_size",
    "register",
    "unregister",
    "get_method",
    "methods",
    "suggest",
]

#: what a parameter is for: the attention pattern (its fields make the pattern cache key), where and
#: when the method runs, which kernel computes it, or a user input given with the method
ROLES = ("pattern", "placement", "kernel", "input")


# ------------------------------------------------------------------------------------------------------
# Input types (markers for Param.type; the values are plain tuples / tensors / PIL images)
# ------------------------------------------------------------------------------------------------------


class Boxes:
    """A non-empty list of boxes ``(x0, y0, x1, y1)`` as fractions of the image width and height, in
    ``[0, 1]`` with ``x0 < x1`` and ``y0 < y1`` (resolution-independent: the same boxes hold at every
    size, on the pixels, the latent and the token grid). Command line: ``"0.1,0.1,0.5,0.5;0.5,0.5,0.9,0.9"``.
    The value is a tuple of 4-tuples of floats."""

    metavar = "X0,Y0,X1,Y1[;...]"


class Heads:
    """A non-empty list of distinct attention-head indices ``>= 0``; checked against the model's number
    of heads at ``apply``. Command line: ``"0,3,5"``. The value is a tuple of ints."""

    metavar = "H[,H...]"


class Prompts:
    """A non-empty list of non-empty prompts. Command line: ``"a red fox;a snowy forest"`` (``;``
    separates). The value is a tuple of strings."""

    metavar = "TEXT[;TEXT...]"


class Mask:
    """A mask: a ``(H, W)`` or ``(N, H, W)`` tensor or array with values in ``[0, 1]`` (bool or float), a
    PIL image (converted to grayscale) or an image file path. The value is a float tensor in ``[0, 1]``.
    Its size is checked against the call (:func:`check_mask_size`). Command line: a file path."""

    metavar = "PATH"


class Image:
    """An image: a PIL image, an image file path, or a ``(C, H, W)`` / ``(1, C, H, W)`` tensor with C in
    (1, 3) and values in ``[0, 1]``. The value is an RGB PIL image (tensors are kept). Command line: a
    file path."""

    metavar = "PATH"


INPUT_TYPES = (Boxes, Mask, Image, Prompts, Heads)


def _fail(p: "Param", message: str):
    raise ValueError(f"parameter {p.name!r} {message}")


def _check_number(p: "Param", value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(p, f"must be {p.type.__name__}, got {value!r}")
    if isinstance(value, numbers.Integral):
        return p.type(int(value))
    value = float(value)
    if not math.isfinite(value):
        _fail(p, f"must be a finite number, got {value!r}")
    if p.type is int:
        if not value.is_integer():
            _fail(p, f"must be int, got {value!r}")
        return int(value)
    return value


def _split(text: str, sep: str) -> list[str]:
    return [part.strip() for part in text.split(sep)]


def _check_int_tuple(p: "Param", value):
    bad = f"must be an int or a tuple of ints like 3,8,8 (one per grid axis; one int broadcasts), got {value!r}"
    if isinstance(value, str):  # "18,24,24", "18x24x24", "(18, 24, 24)", "18 24 24"
        parts = re.split(r"\s*[x,]\s*|\s+", value.strip().strip("()[]").strip().lower())
        try:
            value = tuple(int(s) for s in parts)
        except ValueError:
            _fail(p, bad)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value),)
    elif isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                _fail(p, f"entries must be ints, got {v!r} in {value!r}")
        value = tuple(int(v) for v in value)
    else:
        _fail(p, bad)
    if not value:
        _fail(p, "must not be empty: give an int or a tuple of ints")
    return value


def _check_str(p: "Param", value):
    if not isinstance(value, str):
        _fail(p, f"must be a string, got {value!r}")
    return value


def _check_bool(p: "Param", value):
    if not isinstance(value, bool):
        _fail(p, f"must be True or False, got {value!r}")
    return value


def _check_boxes(p: "Param", value):
    how = "boxes are (x0, y0, x1, y1) fractions of the width and height, like 0.1,0.1,0.5,0.5;0.5,0.5,0.9,0.9"
    if isinstance(value, str):
        if not value.strip():
            _fail(p, f"must be a non-empty list of boxes: {how}")
        try:
            value = [tuple(float(x) for x in _split(box, ",")) for box in _split(value.strip().strip(";"), ";")]
        except ValueError:
            _fail(p, f"must be a list of boxes: {how}; got {value!r}")
    if isinstance(value, (tuple, list)) and len(value) == 4 and all(isinstance(v, numbers.Real) for v in value):
        value = [value]  # one box
    if not isinstance(value, (tuple, list)):
        _fail(p, f"must be a list of boxes: {how}; got {value!r}")
    if not value:
        _fail(p, f"must be a non-empty list of boxes: {how}")
    out = []
    for i, box in enumerate(value):
        if not isinstance(box, (tuple, list)) or len(box) != 4 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) for v in box):
            _fail(p, f"box {i} must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            _fail(p, f"box {i} {box!r} lies outside the image: coordinates are fractions of the width and height, "
                     "in [0, 1]")
        if x0 >= x1 or y0 >= y1:
            _fail(p, f"box {i} {box!r} is empty: need x0 < x1 and y0 < y1 ({how})")
        out.append((x0, y0, x1, y1))
    return tuple(out)


def _check_heads(p: "Param", value):
    how = "a non-empty list of head indices >= 0 like 0,3,5"
    if isinstance(value, str):
        text = value.strip().strip("()[]")
        try:
            value = tuple(int(s) for s in _split(text, ",")) if text else ()
        except ValueError:
            _fail(p, f"must be {how}; got {value!r}")
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        _fail(p, f"must be {how}; got {value!r}")
    if not value:
        _fail(p, f"must be {how}; got an empty list")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            _fail(p, f"must be {how}; got {v!r} in {value!r}")
    value = tuple(int(v) for v in value)
    if len(set(value)) != len(value):
        _fail(p, f"lists a head twice: {value!r}")
    return value


def _check_prompts(p: "Param", value):
    how = "a non-empty list of non-empty prompts (separated by ; on the command line)"
    if isinstance(value, str):
        value = _split(value, ";")
    if not isinstance(value, (tuple, list)) or not value:
        _fail(p, f"must be {how}; got {value!r}")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            _fail(p, f"must be {how}; prompt {i} is {v!r}")
    return tuple(value)


def _load_image(p: "Param", path, mode: str):
    from PIL import Image as PILImage

    path = Path(path)
    if not path.is_file():
        _fail(p, f"names the file {str(path)!r}, which does not exist")
    try:
        with PILImage.open(path) as img:
            return img.convert(mode)
    except OSError as e:
        _fail(p, f"cannot read the image {str(path)!r}: {e}")


def _check_mask(p: "Param", value):
    import numpy as np
    import torch
    from PIL import Image as PILImage

    how = "a (H, W) or (N, H, W) tensor or array with values in [0, 1], a PIL image or an image file path"
    if isinstance(value, (str, Path)):
        value = _load_image(p, value, "L")
    if isinstance(value, PILImage.Image):
        value = torch.from_numpy(np.asarray(value.convert("L"), dtype=np.float32) / 255.0)
    elif isinstance(value, np.ndarray):
        value = torch.from_numpy(np.array(value))
    if not isinstance(value, torch.Tensor):
        _fail(p, f"must be {how}; got {type(value).__name__}")
    if value.ndim not in (2, 3):
        _fail(p, f"must be 2-D (H, W) or 3-D (N, H, W), got a {value.ndim}-D tensor of shape {tuple(value.shape)}")
    if value.numel() == 0:
        _fail(p, f"is empty (shape {tuple(value.shape)})")
    value = value.float() if value.dtype == torch.bool or not value.is_floating_point() else value
    if not bool(torch.isfinite(value).all()) or float(value.min()) < 0 or float(value.max()) > 1:
        _fail(p, "must have values in [0, 1]")
    return value


def _check_image(p: "Param", value):
    import torch
    from PIL import Image as PILImage

    if isinstance(value, (str, Path)):
        return _load_image(p, value, "RGB")
    if isinstance(value, PILImage.Image):
        return value.convert("RGB")
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        if not (value.ndim == 3 or (value.ndim == 4 and shape[0] == 1)) or shape[-3] not in (1, 3) or 0 in shape:
            _fail(p, f"as a tensor must be (C, H, W) or (1, C, H, W) with C 1 or 3, got shape {shape}")
        return value
    _fail(p, f"must be a PIL image, an image file path or a (C, H, W) tensor; got {type(value).__name__}")


_CHECKERS: dict[Any, Callable] = {
    int: _check_number, float: _check_number, bool: _check_bool, str: _check_str, tuple: _check_int_tuple,
    Boxes: _check_boxes, Heads: _check_heads, Prompts: _check_prompts, Mask: _check_mask, Image: _check_image,
}


def check_mask_size(mask, size: tuple[int, int], name: str = "mask", what: str = "the image") -> None:
    """Raise a ValueError unless ``mask``'s last two dimensions are ``size`` (height, width)."""
    got = tuple(mask.shape[-2:])
    if got != tuple(size):
        raise ValueError(f"{name} is {got[0]}x{got[1]} (height x width) but {what} is {size[0]}x{size[1]}; "
                         f"give a {name} of that size")


# ------------------------------------------------------------------------------------------------------
# Param
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One method parameter (derived from a config field by :meth:`MethodConfig.params`).

    ``type``: ``int``, ``float``, ``bool``, ``str``, ``tuple`` (a tuple of ints, one per grid axis; a
    single int broadcasts) or an input type (:class:`Boxes`, :class:`Mask`, :class:`Image`,
    :class:`Prompts`, :class:`Heads`). ``default=None`` with ``required=False`` means "per model family"
    (resolved from ``MethodSpec.family_defaults``) or a documented meaning of None. ``range`` is an
    inclusive ``(min, max)``, either end None. ``role``: one of :data:`ROLES`.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    range: tuple[Any, Any] | None = None
    choices: tuple[Any, ...] | None = None
    required: bool = False
    role: str = "pattern"

    @property
    def metavar(self) -> str:
        if self.choices:
            return "{" + ",".join(map(str, self.choices)) + "}"
        if self.type is tuple:
            return "N[,N,N]"
        return getattr(self.type, "metavar", self.name.upper())

    def validate(self, value):
        """The checked (and normalised) value; a ValueError saying what is wrong and what is accepted.

        Strings are parsed as typed on a command line for tuples and input types.
        """
        if value is None:
            if self.required:
                raise ValueError(f"parameter {self.name!r} is required: {self.help}")
            if self.default is not None:
                raise ValueError(f"parameter {self.name!r} does not take None (its default is {self.default!r}); "
                                 "omit it to use the default")
            return None
        checker = _CHECKERS.get(self.type)
        if checker is None:
            raise TypeError(f"parameter {self.name!r} has an unsupported type {self.type!r}")
        value = checker(self, value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"parameter {self.name!r} must be one of {self.choices}, got {value!r}")
        if self.range is not None and self.type in (int, float, tuple):
            lo, hi = self.range
            for v in (value if isinstance(value, tuple) else (value,)):
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    raise ValueError(f"parameter {self.name!r} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
        return value


# ------------------------------------------------------------------------------------------------------
# Typed configs
# ------------------------------------------------------------------------------------------------------

_META = "diffusion_attn"


def param(default=None, *, role: str, help: str, range=None, choices=None, required: bool = False,
          per_family: dict | None = None, type=None):
    """A config field: ``default`` (None with ``per_family`` = per model family), ``role`` (one of
    :data:`ROLES`), ``help``, inclusive ``range``, ``choices``, ``per_family`` (family or variant ->
    default) and ``type`` (default: from the annotation)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    meta = dict(role=role, help=help, range=range, choices=tuple(choices) if choices is not None else None,
                required=required, per_family=dict(per_family or {}), type=type)
    return field(default=default, metadata={_META: meta})


def method_config(cls):
    """Class decorator for a method config: a frozen dataclass whose equality and hash come from
    :class:`MethodConfig` (tensor inputs compare by value)."""
    return dataclass(frozen=True, eq=False)(cls)


def _annotation_type(hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _annotation_type(args[0])
    if hint is tuple or origin is tuple:
        return tuple
    if hint in _CHECKERS:
        return hint
    raise TypeError(f"cannot derive a parameter type from the annotation {hint!r}; pass type=... to param()")


def _fingerprint(value):
    """A hashable stand-in for a field value (tensors and images by content)."""
    if isinstance(value, (tuple, list)):
        return tuple(_fingerprint(v) for v in value)
    if hasattr(value, "detach") and hasattr(value, "shape"):  # torch tensor
        t = value.detach().cpu().contiguous()
        data = t.double() if t.is_floating_point() else t
        return ("tensor", tuple(t.shape), str(t.dtype), data.numpy().tobytes())
    if hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # PIL image
        return ("image", value.mode, value.size, value.tobytes())
    return value


class MethodConfig:
    """Base of the typed method configs (declare subclasses with :func:`method_config`).

    Construction validates every field (:meth:`Param.validate`) and the checks that need no model
    (:meth:`check`); :meth:`check_family` and :meth:`check_model` run at ``apply``. A config is also a
    read-only mapping of its fields (``config["window"]``, ``**config``).
    """

    #: the method this config belongs to (set by :func:`register`)
    method: ClassVar[str] = ""
    #: what the method's patterns offer kernels (see :func:`check_backend`)
    capabilities: ClassVar[frozenset] = frozenset()

    def __post_init__(self):
        for p in self.params():
            object.__setattr__(self, p.name, p.validate(getattr(self, p.name)))
        self.check()

    # -- derived from the fields -----------------------------------------------------------------
    @classmethod
    def params(cls) -> tuple[Param, ...]:
        cached = cls.__dict__.get("_params_cache")
        if cached is not None:
            return cached
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must be declared with @method_config")
        if cls.__eq__ is not MethodConfig.__eq__:
            raise TypeError(f"{cls.__name__} must be declared with @method_config (dataclass(frozen=True, eq=False))")
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata.get(_META)
            if meta is None:
                raise TypeError(f"{cls.__name__}.{f.name} must be declared with diffusion_attn.registry.param(...)")
            out.append(Param(f.name, meta["type"] or _annotation_type(hints[f.name]), f.default, meta["help"],
                             meta["range"], meta["choices"], meta["required"], meta["role"]))
        out = tuple(out)
        setattr(cls, "_params_cache", out)
        return out

    @classmethod
    def family_defaults(cls) -> dict[str, dict]:
        """``{family or variant: {field: default}}`` from the fields' ``per_family``."""
        out: dict[str, dict] = {}
        for f in dataclasses.fields(cls):
            for fam, value in f.metadata[_META]["per_family"].items():
                out.setdefault(fam, {})[f.name] = value
        return out

    @classmethod
    def from_kwargs(cls, **kwargs) -> "MethodConfig":
        """The config from keyword arguments; an unknown name is an error naming the accepted ones."""
        names = [p.name for p in cls.params()]
        for key in kwargs:
            if key not in names:
                raise ValueError(f"method {cls.method or cls.__name__!r} has no parameter {key!r}"
                                 f"{suggest(key, names)}; accepted: {', '.join(names)}")
        return cls(**kwargs)

    def resolved(self, variant: str | None = None) -> "MethodConfig":
        """This config with the fields left None filled from ``variant``'s per-family defaults."""
        defaults = self.family_defaults().get(variant, {}) if variant else {}
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill) if fill else self

    def fields_with_role(self, role: str) -> dict:
        return {p.name: getattr(self, p.name) for p in self.params() if p.role == role}

    def pattern_params(self) -> dict:
        """The pattern-role fields: what the method's pattern is a function of (besides the layout)."""
        return self.fields_with_role("pattern")

    def pattern_key(self) -> tuple:
        """Cache key part of the pattern: every pattern-role field, derived (never listed by hand);
        computed once per config (configs are frozen)."""
        key = self.__dict__.get("_pattern_key")
        if key is None:
            key = (self.method or type(self).__name__,) + tuple(
                (name, _fingerprint(value)) for name, value in self.pattern_params().items())
            object.__setattr__(self, "_pattern_key", key)
        return key

    def to_dict(self) -> dict:
        return {p.name: getattr(self, p.name) for p in self.params()}

    # -- checks ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Checks across fields that need no model (subclasses add theirs; call super().check()).
        The default: a ``backend`` field must be able to run the method's patterns."""
        backend = getattr(self, "backend", None)
        caps = self.pattern_capabilities()
        if isinstance(backend, str) and caps:
            problem = check_backend(backend, caps)
            if problem:
                ok = [c for c in (self._param("backend").choices or ()) if not check_backend(c, caps)]
                problem = problem.replace(f"backend={backend!r} ", "it ", 1)
                raise ValueError(f"backend={backend!r} cannot run {self.method or 'this method'}: {problem}"
                                 + (f"; accepted: {', '.join(ok)}" if ok else ""))

    def pattern_capabilities(self) -> frozenset:
        """The capabilities of the patterns this config makes (the class's ``capabilities``; a config
        whose fields decide them, such as GNA's stride, overrides this)."""
        return type(self).capabilities

    def check_family(self, family: str) -> None:
        """Checks that need the model family: tuple parameters with one entry per grid axis must have 1
        (broadcast) or the family's grid rank entries."""
        from .adapters import grid_rank

        rank = grid_rank(family)
        if rank is None:
            return
        axes = "(H, W)" if rank == 2 else "(T, H, W)"
        for p in self.params():
            value = getattr(self, p.name)
            if p.type is tuple and isinstance(value, tuple) and len(value) not in (1, rank):
                raise ValueError(f"parameter {p.name!r}={value!r} has {len(value)} entries, but {family} models have a "
                                 f"{rank}-D token grid {axes}: give {rank} entries or one int that broadcasts")

    def check_model(self, model) -> None:
        """Checks that need the model: head lists against its number of attention heads."""
        heads = None
        for p in self.params():
            value = getattr(self, p.name)
            if p.type is Heads and value is not None:
                heads = _model_heads(model) if heads is None else heads
                if heads and max(value) >= heads:
                    raise ValueError(f"parameter {p.name!r}={value!r} names head {max(value)}, but this "
                                     f"{type(model).__name__} has {heads} attention heads (0..{heads - 1})")

    def _param(self, name: str) -> Param:
        return next(p for p in self.params() if p.name == name)

    # -- mapping / equality ----------------------------------------------------------------------
    def __getitem__(self, name: str):
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def keys(self):
        return [p.name for p in self.params()]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def get(self, name: str, default=None):
        return getattr(self, name, default) if name in self.__dataclass_fields__ else default

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.params())

    def __contains__(self, name) -> bool:
        return name in self.__dataclass_fields__

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return _fingerprint(tuple(self.to_dict().values())) == _fingerprint(tuple(other.to_dict().values()))

    def __hash__(self):
        return hash((type(self), _fingerprint(tuple(self.to_dict().values()))))


collections.abc.Mapping.register(MethodConfig)


def _model_heads(model) -> int | None:
    """The smallest ``heads`` of the model's attention modules (None if it has none)."""
    found = [m.heads for m in model.modules() if getattr(m, "processor", None) is not None
             and isinstance(getattr(m, "heads", None), int)]
    return min(found) if found else None


def _legacy_config(name: str, params: tuple[Param, ...], family_defaults: dict) -> type:
    """A config class for a spec declared with ``params`` (the older form)."""
    per_family = {p.name: {fam: d[p.name] for fam, d in family_defaults.items() if p.name in d} for p in params}
    fields = [(p.name, object, param(p.default, role=p.role, help=p.help, range=p.range, choices=p.choices,
                                     required=p.required, per_family=per_family[p.name], type=p.type))
              for p in params]
    cls_name = "".join(part.capitalize() for part in re.split(r"\W|_", name) if part) + "Config"
    return dataclasses.make_dataclass(cls_name, fields, bases=(MethodConfig,), frozen=True, eq=False)


# ------------------------------------------------------------------------------------------------------
# Backends (apply-time check)
# ------------------------------------------------------------------------------------------------------

def check_backend(backend: str, capabilities, device_type: str | None = None) -> str | None:
    """Why ``backend`` can never run patterns with ``capabilities`` (None when it may), from the kernels'
    registry (:func:`diffusion_attn.kernels.check_backend`). Without ``device_type`` only the pattern
    capabilities are checked (a config does not know where it will run); with it, also the environment
    (installed packages, compile) and the device."""
    from .kernels import registry as kernels

    if device_type is not None:
        return kernels.check_backend(backend, capabilities, device_type)
    if backend == "auto" or backend not in kernels.BACKENDS:  # unknown names: the field's choices refuse them
        return None
    chosen = kernels.get_backend(backend)
    return None if chosen.full_only else chosen.pattern_reason(frozenset(capabilities))


# ------------------------------------------------------------------------------------------------------
# Specs
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    ``config``: the method's config class (:class:`MethodConfig`), from which ``params`` and
    ``family_defaults`` are derived; a spec may instead give ``params`` (and ``family_defaults``)
    directly, and gets a generated config class. ``install(model, family, context, config) -> list of
    undo callables`` puts the method on one denoiser (``config`` is the resolved config, also readable
    as a mapping); ``grid_pattern(layout, **pattern params)`` returns its pattern for the mask views.

    ``context_parallel``: the modes of diffusers' context parallelism the method runs under
    (:mod:`diffusion_attn.parallel`): ``"ulysses"`` (every rank holds the whole sequence for its heads: any
    pattern processor on a DiT, hence the default) and ``"ring"`` (the processor's pattern is evaluated per
    query chunk / key chunk pair and merged by log-sum-exp: pattern methods without extension points that
    need the whole sequence). ``()`` refuses context parallelism; families without a plan (UNets) refuse it
    whatever the method says.
    """

    name: str
    summary: str
    paper: str
    families: tuple[str, ...]
    kind: str
    params: tuple[Param, ...] = ()
    install: Callable | None = None
    grid_pattern: Callable | None = None
    family_defaults: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    config: type | None = None
    context_parallel: tuple[str, ...] = ("ulysses",)

    def __post_init__(self):
        if self.install is None:
            raise TypeError(f"method {self.name!r} needs an install function")
        modes = ("ulysses", "ring")
        cp = self.context_parallel
        if isinstance(cp, str) or not all(m in modes for m in cp) or len(set(cp)) != len(tuple(cp)):
            raise TypeError(f"method {self.name!r}: context_parallel must be a tuple of distinct modes from {modes}, got {cp!r}")
        object.__setattr__(self, "context_parallel", tuple(cp))
        if self.config is not None:
            if self.params or self.family_defaults:
                raise TypeError(f"method {self.name!r}: params and family_defaults are derived from its config; "
                                "give either config or params")
            object.__setattr__(self, "params", self.config.params())
            object.__setattr__(self, "family_defaults", self.config.family_defaults())
        else:
            object.__setattr__(self, "config", _legacy_config(self.name, tuple(self.params), self.family_defaults))

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def make_config(self, params=None, variant: str | None = None, *, family: str | None = None) -> MethodConfig:
        """The validated config from ``params`` (a dict of kwargs or a config of this method), with the
        fields left None filled from ``variant``'s defaults; ``family`` adds the family checks."""
        if isinstance(params, MethodConfig):
            if type(params) is not self.config:
                raise ValueError(f"{type(params).__name__} is not a config of method {self.name!r} "
                                 f"(that is {self.config.__name__})")
            config = params
        else:
            config = self.config.from_kwargs(**dict(params or {}))
        config = config.resolved(variant)
        if family is not None:
            config.check_family(family)
        return config

    def resolve(self, params, variant: str | None = None) -> dict:
        """Validate user params and fill defaults (family/variant defaults over the spec's): a dict."""
        return self.make_config(params, variant).to_dict()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "families": list(self.families),
            "kind": self.kind,
            "config": self.config.__name__,
            "params": [
                {"name": p.name, "type": p.type.__name__, "role": p.role, "default": p.default, "range": p.range,
                 "choices": p.choices, "required": p.required, "help": p.help}
                for p in self.params
            ],
            "family_defaults": self.family_defaults,
            "context_parallel": list(self.context_parallel),
        }


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    for name in (spec.name, *spec.aliases):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
    for name in (spec.name, *spec.aliases):
        _REGISTRY[name] = spec
    if not spec.config.method:
        spec.config.method = spec.name
    return spec


def unregister(name: str) -> MethodSpec:
    """Remove a registered method (and its aliases); returns its spec."""
    spec = get_method(name)
    for n in (spec.name, *spec.aliases):
        _REGISTRY.pop(n, None)
    return spec


def suggest(name: str, options) -> str:
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, [o for o in options if isinstance(o, str)], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_method(name) -> MethodSpec:
    """The spec of a method: by name, or by its config (class or instance)."""
    _load_builtin()
    if isinstance(name, MethodConfig) or (isinstance(name, type) and issubclass(name, MethodConfig)):
        cls = name if isinstance(name, type) else type(name)
        for spec in _REGISTRY.values():
            if spec.config is cls:
                return spec
        raise ValueError(f"{cls.__name__} is not the config of a registered method")
    names = sorted({s.name for s in _REGISTRY.values()})
    if not isinstance(name, str):
        raise ValueError(f"method must be a method name (one of {', '.join(names)}) or a method config, got {name!r}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}{suggest(name, _REGISTRY)}; available: {', '.join(names)}")
    return _REGISTRY[name]


def methods() -> dict[str, MethodSpec]:
    """The registered methods, by name."""
    _load_builtin()
    return {s.name: s for s in _REGISTRY.values()}


def _load_builtin() -> None:
    from . import processors  # noqa: F401  (registers the built-in methods)
