"""What a backend is: a declaration of what it supports, a ``prepare`` for its per-layout artefacts and a
``run``. Each backend file ends with one ``BACKEND = Backend(...)``; :mod:`.registry` lists them.

A :class:`Request` describes one attention call without its tensors (pattern, layout, device, dtype, head
sizes, autograd). :meth:`Backend.supports` answers from it alone; :meth:`Backend.cache_key` derives the key
of the prepared artefacts from every field of the request, so an artefact is never reused for another
layout (grid, text length, text position, any segment a layout gains), device, dtype or pattern.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..layout import TokenLayout
from .capabilities import capabilities_of, is_full_on

__all__ = ["Backend", "Request"]

ANY_PATTERN = frozenset()

#: capabilities a backend must declare in ``handles`` to run a pattern that has them
HANDLED = frozenset({"head_dependent", "batch_dependent", "dynamic", "refined"})


@dataclass(frozen=True)
class Request:
    """One attention call as the backends see it. Fields with ``compare=False`` are the objects the others
    identify (the pattern by ``pattern_key``); every other field is part of every cache key.

    ``device_type`` is always known; ``device``, ``dtype``, ``head_dim``, ``value_dim`` are None when the
    request is made without tensors (:func:`~diffusion_attn.kernels.choose_backend`)."""

    pattern: object = field(compare=False, repr=False)
    capabilities: frozenset = field(compare=False)
    pattern_key: object
    layout: TokenLayout
    device_type: str
    device: str | None = None
    dtype: torch.dtype | None = None
    head_dim: int | None = None
    value_dim: int | None = None
    requires_grad: bool = False

    @classmethod
    def make(cls, pattern, layout: TokenLayout, *, q=None, k=None, v=None, device=None, pattern_key=None,
             capabilities: frozenset | None = None) -> "Request":
        """A request for ``pattern`` on ``layout``; from tensors ``q, k, v`` when given, else from ``device``.
        ``pattern_key``: the caller's cache key of the pattern (default: the pattern object itself)."""
        caps = capabilities_of(pattern) if capabilities is None else capabilities
        key = pattern_key if pattern_key is not None else _Identity(pattern)
        if q is None:
            dev = torch.device(device if device is not None else "cpu")
            return cls(pattern, caps, key, layout, dev.type)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return cls(pattern, caps, key, layout, q.device.type, str(q.device), q.dtype, q.shape[-1], v.shape[-1], grad)

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def is_full(self) -> bool:
        return is_full_on(self.pattern, self.layout)

    def key(self) -> tuple:
        """Every compared field, in declaration order: what anything built for this request depends on."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.compare)


class _Identity:
    """Hashes and compares by object identity (a pattern without a caller-given key)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.obj is self.obj


@dataclass(frozen=True)
class Backend:
    """A backend's declaration.

    * ``needs``: alternative capability sets; the pattern must have every name of at least one
      (empty tuple: any pattern). ``handles``: which of ``head_dependent`` / ``batch_dependent`` /
      ``dynamic`` / ``refined`` (:data:`HANDLED`) it accepts (a pattern with another one is refused).
    * ``devices`` / ``dtypes``: accepted device types / dtypes (None: any). ``head_dims``: (min, max) of
      the q/k head size or None. ``value_dim``: whether values may have another head size than queries.
    * ``autograd``: whether its backward is correct (tested against the reference).
    * ``full_only``: runs only patterns that allow everything (``dense``).
    * ``available(device_type) -> None | reason``: whether the environment can run it at all.
    * ``check(request) -> None | reason``: anything else, per request (pattern details).
    * ``prepare(request) -> artefact``: per-layout work, cached by the caller under :meth:`cache_key`.
    * ``run(q, k, v, request, prepared, key_padding_mask, scale) -> out``.
    * ``auto(request) -> bool``: whether ``auto`` prefers it for this request (None: opt-in only).
    """

    name: str
    summary: str
    run: Callable
    needs: tuple = ()
    handles: frozenset = frozenset()
    devices: frozenset | None = None
    dtypes: frozenset | None = None
    head_dims: tuple | None = None
    value_dim: bool = True
    autograd: bool = True
    full_only: bool = False
    available: Callable | None = None
    check: Callable | None = None
    prepare: Callable | None = None
    auto: Callable | None = None

    def pattern_reason(self, caps: frozenset) -> str | None:
        """Why the capabilities ``caps`` rule this backend out, or None."""
        if self.needs and not any(set(n) <= caps for n in self.needs):
            have = ", ".join(sorted(caps)) or "none: a mask only"
            return f"backend={self.name!r} runs {self.describe_needs()}; this pattern's capabilities: {have}"
        extra = (caps & HANDLED) - self.handles
        if extra:
            names = " / ".join("refined-box (e.g. CLEAR's circle)" if c == "refined" else c.replace("_", "-")
                               for c in sorted(extra))
            return f"backend={self.name!r} does not run {names} patterns"
        return None

    def describe_needs(self) -> str:
        names = {"box": "box patterns (GNA, shifted windows)", "block": "block patterns (radial)",
                 "partition": "patterns whose windows partition the grid (blocked GNA with stride == window, "
                              "HiDiffusion's shifted windows)"}
        return " or ".join(" with ".join(names.get(c, c) for c in sorted(n)) for n in self.needs)

    def environment_reason(self, device_type: str) -> str | None:
        """Why this machine cannot run it on ``device_type`` (device, installed packages, compile), or None."""
        if self.devices is not None and device_type not in self.devices:
            return f"backend={self.name!r} runs on {' / '.join(sorted(self.devices))} only, not {device_type}"
        return None if self.available is None else self.available(device_type)

    def static_reason(self, caps: frozenset, device_type: str) -> str | None:
        """What can be said without a layout or tensors: environment, device, pattern capabilities."""
        return self.environment_reason(device_type) or (None if self.full_only else self.pattern_reason(caps))

    def supports(self, request: Request) -> str | None:
        """None when this backend can run ``request``, else the reason it cannot (one sentence)."""
        if self.full_only:
            if not request.is_full:
                return f"backend={self.name!r} ignores the pattern; it is only valid when the pattern is full"
        reason = self.static_reason(request.capabilities, request.device_type)
        if reason:
            return reason
        if self.dtypes is not None and request.dtype is not None and request.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in sorted(self.dtypes, key=str))
            return f"backend={self.name!r} runs {names}, not {str(request.dtype).replace('torch.', '')}"
        if self.head_dims is not None and request.head_dim is not None:
            lo, hi = self.head_dims
            if not lo <= request.head_dim <= hi:
                return f"backend={self.name!r} runs head sizes {lo}..{hi}, not {request.head_dim}"
        if not self.value_dim and request.value_dim is not None and request.value_dim != request.head_dim:
            return (f"backend={self.name!r} needs values of the queries' head size ({request.head_dim}), "
                    f"got {request.value_dim}")
        if request.requires_grad and not self.autograd:
            return f"backend={self.name!r} has no backward; inputs that require grad need another backend"
        if self.check is not None:
            return self.check(request)
        return None

    def cache_key(self, request: Request) -> tuple:
        """The key of :meth:`prepare`'s result for ``request``: the backend and every compared field of the
        request (derived, so a field added to :class:`Request` or :class:`TokenLayout` is in it)."""
        return (self.name, *request.key())


def available_if(require: Callable[[], object]) -> Callable[[str], str | None]:
    """An ``available`` check for an optional package: ``require()`` raises ImportError (naming the
    extra to install) when it is missing; the check returns that message, or None when it imports."""

    def available(device_type: str) -> str | None:
        try:
            require()
        except ImportError as e:
            return str(e)
        return None

    return available
