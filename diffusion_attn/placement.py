"""Placement: where and when a method acts -- layers, steps, branches, heads -- as one object.

Every method answers "which layers, which denoising steps, which guidance branch, which heads" the same
way, so the answer is one value, :class:`Placement`, shared by the diffusers processors and the ComfyUI
runtime:

* **layers** -- ``None`` (all), or a tuple of selectors, any of: an ``int`` layer index, a ``range``,
  a layer *kind* (``"double"`` / ``"single"`` for Flux's two block types, ``"down"`` / ``"mid"`` /
  ``"up"`` for UNet levels, ``"block"`` for the plain blocks of the other DiTs; see
  :func:`diffusion_attn.adapters.layer_kind`). ``skip_layers`` removes layers again (same selectors).
* **steps** -- a :class:`StepWindow` ``[start, end)``: ints are 0-based step indices, floats in
  ``[0, 1]`` are fractions of the schedule (``step / num_steps`` in diffusers; ComfyUI maps its sigmas
  to the same fraction, so a window survives a ``KSamplerAdvanced`` split or Wan 2.2's two experts).
* **branches** -- ``None`` (every call), or names out of :data:`BRANCHES` (``cond``, ``uncond``,
  ``perturbed``, ``reference``): the run context names a call's branch from diffusers'
  ``cache_context`` when the pipeline sets one.
* **heads** -- ``None`` (all heads) or the head indices the method touches (HeadHunter); the others
  keep the model's own attention (:meth:`Placement.head_mask`).

The first version's ``dense_layers`` / ``dense_steps`` parameters are a placement:
``Placement.from_dense(dense_layers=1, dense_steps=12)`` skips layer 0 and the first 12 steps, exactly
as before.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

__all__ = ["BRANCHES", "LAYER_KINDS", "Placement", "StepWindow", "Where"]

#: the named guidance branches a placement may select
BRANCHES = ("cond", "uncond", "perturbed", "reference")
#: layer kinds an adapter may report (see :func:`diffusion_attn.adapters.layer_kind`)
LAYER_KINDS = ("double", "single", "down", "mid", "up", "block")


def _check_bound(value, what: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"StepWindow.{what} must be an int step index or a float fraction in [0, 1], got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"StepWindow.{what} as a fraction of the schedule must be in [0, 1], got {value!r}")
    elif value < 0:
        raise ValueError(f"StepWindow.{what} as a step index must be >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class StepWindow:
    """The steps ``[start, end)`` a method is on. Ints are step indices, floats fractions of the
    schedule; ``end=None`` runs to the end. ``StepWindow()`` is every step."""

    start: int | float = 0
    end: int | float | None = None

    def __post_init__(self):
        _check_bound(self.start, "start")
        _check_bound(self.end, "end")

    @property
    def is_everything(self) -> bool:
        return self.start in (0, 0.0) and self.end is None

    def contains(self, step: int | None, num_steps: int | None = None, fraction: float | None = None) -> bool:
        """Whether ``step`` (of ``num_steps``) lies in the window. ``fraction`` (the position in the
        schedule, 0 at the first step) is used for float bounds when given; else ``step / num_steps``.
        An unknown step (None) is inside only a window that covers everything."""
        if self.is_everything:
            return True
        if step is None and fraction is None:
            return False
        lo = self._position(self.start, step, num_steps, fraction)
        if lo is not None and not lo:
            return False
        if self.end is None:
            return True
        hi = self._position(self.end, step, num_steps, fraction, upper=True)
        return bool(hi)

    @staticmethod
    def _position(bound, step, num_steps, fraction, upper: bool = False) -> bool | None:
        """``position >= bound`` (lower) or ``position < bound`` (upper)."""
        if isinstance(bound, float):
            if fraction is None:
                if step is None or not num_steps:
                    raise ValueError("a step window given as a fraction of the schedule needs the number of "
                                     "steps (apply the method to a pipeline, or give the window as step indices)")
                fraction = step / num_steps
            return fraction < bound if upper else fraction >= bound
        if step is None:
            raise ValueError("a step window given as step indices needs the step index of the call")
        return step < bound if upper else step >= bound


def _as_selectors(value, what: str) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (int, range, str)) and not isinstance(value, bool):
        value = (value,)
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, range, str)):
            raise ValueError(f"Placement.{what} takes layer indices, ranges or kinds {LAYER_KINDS}, got {item!r}")
        if isinstance(item, int) and item < 0:
            raise ValueError(f"Placement.{what}: layer indices are >= 0, got {item}")
        if isinstance(item, str) and item not in LAYER_KINDS:
            raise ValueError(f"Placement.{what}: unknown layer kind {item!r}; accepted: {', '.join(LAYER_KINDS)}")
        out.append(item)
    return tuple(out)


def _matches(selectors: tuple, index: int, kind: str | None) -> bool:
    for s in selectors:
        if isinstance(s, str):
            if kind == s:
                return True
        elif isinstance(s, range):
            if index in s:
                return True
        elif index == s:
            return True
    return False


@dataclass(frozen=True)
class Where:
    """One attention call, as a placement sees it."""

    layer: int = 0
    kind: str | None = None
    step: int | None = None
    num_steps: int | None = None
    fraction: float | None = None
    branch: str | None = None


@dataclass(frozen=True)
class Placement:
    """Where and when a method acts (see the module docstring)."""

    layers: tuple | None = None
    skip_layers: tuple | None = None
    steps: StepWindow = field(default_factory=StepWindow)
    branches: frozenset | None = None
    heads: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", _as_selectors(self.layers, "layers"))
        object.__setattr__(self, "skip_layers", _as_selectors(self.skip_layers, "skip_layers"))
        if not isinstance(self.steps, StepWindow):
            raise ValueError(f"Placement.steps must be a StepWindow, got {self.steps!r}")
        if self.branches is not None:
            names = frozenset([self.branches] if isinstance(self.branches, str) else self.branches)
            unknown = sorted(n for n in names if n not in BRANCHES)
            if unknown or not names:
                raise ValueError(f"Placement.branches must name some of {BRANCHES}, got {sorted(names) or 'nothing'}")
            object.__setattr__(self, "branches", names)
        if self.heads is not None:
            heads = tuple(self.heads)
            if not heads or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in heads):
                raise ValueError(f"Placement.heads must be a non-empty list of head indices >= 0, got {self.heads!r}")
            object.__setattr__(self, "heads", tuple(sorted(set(heads))))

    @classmethod
    def from_dense(cls, dense_layers: int = 0, dense_steps: int = 0, **kw) -> "Placement":
        """The first version's placement: the first ``dense_layers`` layers and the first
        ``dense_steps`` steps stay dense."""
        skip = (range(0, int(dense_layers)),) if dense_layers else None
        return cls(skip_layers=skip, steps=StepWindow(int(dense_steps)), **kw)

    @classmethod
    def parse(cls, layers: str | None = None, steps: str | None = None, branches: str | None = None,
              heads: str | None = None) -> "Placement | None":
        """A placement from command-line text, None when every part is empty. ``layers``: comma-separated
        indices, ranges ``a-b`` (inclusive) and kinds (``single,0-3``); ``steps``: ``START,END`` of the step
        window, ints (indices) or fractions with a decimal point (``0.25,1.0``); ``END`` may be empty (to the
        end); ``branches``: comma-separated names; ``heads``: comma-separated head indices."""
        def items(text):
            return [t.strip() for t in text.split(",") if t.strip()] if text and text.strip() else []

        selectors = []
        for item in items(layers):
            if re.fullmatch(r"\d+", item):
                selectors.append(int(item))
            elif re.fullmatch(r"\d+-\d+", item):
                lo, hi = (int(x) for x in item.split("-"))
                if hi < lo:
                    raise ValueError(f"layer range {item!r} ends before it starts; accepted: a-b with a <= b")
                selectors.append(range(lo, hi + 1))
            else:
                selectors.append(item)  # a kind: checked by Placement
        window = StepWindow()
        if steps and steps.strip():
            parts = [t.strip() for t in steps.split(",")]
            if len(parts) != 2:
                raise ValueError(f"a step window is START,END (END may be empty), got {steps!r}")

            def bound(text):
                if text == "":
                    return None
                try:
                    return float(text) if "." in text else int(text)
                except ValueError:
                    raise ValueError(f"step window bound {text!r} is neither a step index nor a fraction like 0.25") from None

            start, end = bound(parts[0]), bound(parts[1])
            window = StepWindow(0 if start is None else start, end)
        names = tuple(items(branches)) or None
        head_list = items(heads)
        try:
            head_idx = tuple(int(h) for h in head_list) or None
        except ValueError:
            raise ValueError(f"heads are comma-separated head indices, got {heads!r}") from None
        if not selectors and window.is_everything and names is None and head_idx is None:
            return None
        return cls(layers=tuple(selectors) or None, steps=window, branches=names, heads=head_idx)

    # -- questions --------------------------------------------------------------------------------
    def layer_on(self, index: int, kind: str | None = None) -> bool:
        if self.skip_layers is not None and _matches(self.skip_layers, index, kind):
            return False
        return self.layers is None or _matches(self.layers, index, kind)

    def step_on(self, step: int | None, num_steps: int | None = None, fraction: float | None = None) -> bool:
        return self.steps.contains(step, num_steps, fraction)

    def branch_on(self, branch: str | None) -> bool:
        """Whether a call of branch ``branch`` is selected; a call whose branch is unknown (None) is
        selected only when every branch is."""
        return self.branches is None or branch in self.branches

    def active(self, where: Where) -> bool:
        """Whether the method acts on this call (all four questions)."""
        return (self.layer_on(where.layer, where.kind) and self.branch_on(where.branch)
                and self.step_on(where.step, where.num_steps, where.fraction))

    def head_mask(self, num_heads: int, device=None) -> torch.Tensor | None:
        """(num_heads,) bool, True where the method acts; None when it acts on every head. A head index
        the model does not have is an error naming the model's head count."""
        if self.heads is None:
            return None
        bad = [h for h in self.heads if h >= num_heads]
        if bad:
            raise ValueError(f"Placement.heads {bad} do not exist: this attention layer has {num_heads} heads (0..{num_heads - 1})")
        mask = torch.zeros(num_heads, dtype=torch.bool, device=device)
        mask[list(self.heads)] = True
        return mask

    def describe(self) -> str:
        parts = []
        if self.layers is not None:
            parts.append(f"layers {_text(self.layers)}")
        if self.skip_layers is not None:
            parts.append(f"not layers {_text(self.skip_layers)}")
        if not self.steps.is_everything:
            end = "end" if self.steps.end is None else self.steps.end
            parts.append(f"steps [{self.steps.start}, {end})")
        if self.branches is not None:
            parts.append("branches " + ", ".join(sorted(self.branches)))
        if self.heads is not None:
            parts.append("heads " + ",".join(map(str, self.heads)))
        return "; ".join(parts) or "everywhere"


def _text(selectors: Iterable) -> str:
    out = []
    for s in selectors:
        out.append(f"{s.start}-{s.stop - 1}" if isinstance(s, range) else str(s))
    return ",".join(out)
