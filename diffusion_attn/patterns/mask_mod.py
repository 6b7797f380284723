"""The pattern protocol over a call's whole sequence: composable ``mask_mod`` predicates.

A *pattern* says which query may see which key. Since core v2 it is a predicate over the whole sequence
of one attention call (grid, text and extra segments, see :class:`~diffusion_attn.TokenLayout`), in
FlexAttention's style::

    mask_mod(b, h, q_idx, kv_idx) -> bool tensor      # True = the query may attend to the key

evaluated on broadcasting integer index tensors (batch, head, query position, key position). A
:class:`MaskMod` is such a predicate *and* a node of an expression: ``&``, ``|``, ``~`` (or
:func:`and_masks`, :func:`or_masks`, :func:`not_mask`) compose them. Building blocks:

* :func:`in_segment` -- the query (``side="q"``) or the key (``side="kv"``) lies in a named segment;
* :func:`grid_mask` -- a grid pattern (:class:`~diffusion_attn.patterns.BoxPattern`,
  :class:`~diffusion_attn.patterns.BlockPattern`, :class:`~diffusion_attn.patterns.CircularWindow`, ...)
  on the grid segment, offset into the sequence by the layout (False outside the grid);
* :func:`text_dense` -- ``grid_mask(p) | in_segment("text", "q") | in_segment("text", "kv")``: the rule
  every kernel applied implicitly until now, written as a composition;
* :func:`heads_in`, :func:`batch_in` -- head- and batch-dependent predicates;
* any plain ``mask_mod`` function (wrapped by :func:`as_mask_mod`).

Layout. Leaves that need positions (segments, grids) read them from a layout: pass it when evaluating
(:meth:`MaskMod.bind`, :func:`sequence_mask`) or attach it once with :meth:`MaskMod.on` (or the
``layout=`` argument of the builders); an attached pattern is directly usable as FlexAttention's
``mask_mod`` (``create_block_mask(pattern.mask_mod, B, H, S_q, S_kv)``).

Capabilities. ``pattern.capabilities`` is a frozenset of names from :data:`CAPABILITIES`; kernels use
the optional ones when present and fall back to the predicate otherwise:

* ``"mask_mod"`` -- ``pattern.mask_mod`` and ``pattern.dense_mask()`` are over the *whole sequence*
  (queries x keys of the layout). Grid patterns (box, block, circular) lack it: their ``dense_mask()`` is
  over the grid, text being dense by convention (:func:`as_sequence_pattern` turns them into one);
* ``"box"`` / ``"block"`` -- ``pattern.grid_pattern`` is a :class:`BoxPattern` (per-axis windows and
  runs) / :class:`BlockPattern` (block occupancy), and the pattern is exactly text-dense around it on a
  layout of grid + text only (what the grid kernels compute; not claimed when the attached layout has
  extra segments);
* ``"partition"`` -- the box pattern's windows partition the grid
  (:func:`diffusion_attn.kernels.windows.window_partition` is not None);
* ``"head_dependent"`` / ``"batch_dependent"`` -- the predicate reads ``h`` / ``b``;
* ``"dynamic"`` -- chosen per call from q and k: ``pattern.resolve(q, k, layout)`` gives the concrete
  :class:`MaskMod` of that call (see :mod:`diffusion_attn.patterns.dynamic`).

The dense reference (:func:`sequence_mask`) evaluates the predicate on aranges: small sizes only.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch

from ..layout import TokenLayout

__all__ = [
    "CAPABILITIES",
    "MaskMod",
    "and_masks",
    "as_mask_mod",
    "as_sequence_pattern",
    "batch_in",
    "grid_mask",
    "heads_in",
    "in_segment",
    "not_mask",
    "or_masks",
    "sequence_mask",
    "text_dense",
]

#: Every capability name a pattern may report (see the module docstring).
CAPABILITIES = frozenset({"box", "block", "partition", "refined", "mask_mod", "head_dependent", "batch_dependent", "dynamic"})
#: Capabilities that travel through composition (a property of any part is a property of the whole).
_INHERITED = frozenset({"head_dependent", "batch_dependent", "dynamic"})


class MaskMod:
    """A composable ``mask_mod(b, h, q_idx, kv_idx) -> bool`` predicate over a call's sequence.

    Subclasses implement :meth:`_build` (``layout, device -> plain function``); ``needs_layout`` says
    whether they read positions. ``layout`` is the attached layout (None: give one when evaluating).
    """

    needs_layout: bool = True
    #: flags this node adds to :attr:`capabilities` (subset of ``head_dependent``, ``batch_dependent``)
    _flags: frozenset = frozenset()
    layout: TokenLayout | None = None
    #: the grid pattern a kernel may run instead of the predicate ("box" / "block"), else None
    grid_pattern = None

    # -- to implement ---------------------------------------------------------------------------------
    def _build(self, layout: TokenLayout | None, device) -> Callable:
        raise NotImplementedError

    def _children(self) -> tuple["MaskMod", ...]:
        return ()

    # -- the protocol ---------------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset:
        caps = {"mask_mod"} | set(self._flags)
        for c in self._children():
            caps |= c.capabilities & _INHERITED
        return frozenset(caps)

    @property
    def requires_layout(self) -> bool:
        """Whether evaluating needs a layout (this node or any part reads positions)."""
        return self.needs_layout or any(c.requires_layout for c in self._children())

    def bind(self, layout: TokenLayout | None = None, device=None) -> Callable:
        """A plain ``mask_mod(b, h, q_idx, kv_idx)`` function with its lookup tables on ``device``,
        positions taken from ``layout`` (default: the attached one). Raises early, naming the problem,
        when the layout is missing or does not fit (unknown segment, grid mismatch)."""
        layout = self._layout_for(layout)
        return self._build(layout, device)

    def on(self, layout: TokenLayout) -> "MaskMod":
        """A copy with ``layout`` attached (checked now: a bad segment name or grid fails here)."""
        if not isinstance(layout, TokenLayout):
            raise TypeError(f"on() takes a TokenLayout, got {type(layout).__name__}")
        self._build(layout, None)  # validate
        out = copy.copy(self)
        out.layout = layout
        out._fns = {}
        return out

    def __call__(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        """Evaluate on the attached layout (tables cached per device): FlexAttention's signature."""
        device = q_idx.device
        fns = self.__dict__.setdefault("_fns", {})
        fn = fns.get(device)
        if fn is None:
            fn = fns[device] = self.bind(None, device)
        return fn(b, h, q_idx, kv_idx)

    @property
    def mask_mod(self) -> Callable:
        """This predicate as a plain 4-argument function (on the attached layout)."""
        self._layout_for(None)

        def mask_mod(b, h, q_idx, kv_idx):
            return self(b, h, q_idx, kv_idx)

        return mask_mod

    def dense_mask(self, layout: TokenLayout | None = None, batch: int | None = None, heads: int | None = None):
        """The boolean mask over the whole sequence: :func:`sequence_mask` of this pattern."""
        return sequence_mask(self, layout, batch=batch, heads=heads)

    def is_full(self, layout: TokenLayout | None = None) -> bool:
        """Whether every query may see every key. Head- or batch-dependent predicates answer False
        (the number of heads / batch rows is not known here); otherwise the predicate is evaluated in
        row chunks (no S x S tensor), or the grid pattern answers when it decides alone."""
        layout = self._layout_for(layout)
        if self.capabilities & {"head_dependent", "batch_dependent", "dynamic"}:
            return False
        fn = self._build(layout, None)
        kv = torch.arange(layout.num_keys)[None, :]
        zero = torch.zeros((), dtype=torch.long)
        rows = max(1, (1 << 22) // max(1, layout.num_keys))
        for r0 in range(0, layout.num_queries, rows):
            q = torch.arange(r0, min(layout.num_queries, r0 + rows))[:, None]
            if not bool(torch.broadcast_to(fn(zero, zero, q, kv), (q.shape[0], kv.shape[1])).all()):
                return False
        return True

    # -- composition ----------------------------------------------------------------------------------
    def __and__(self, other) -> "MaskMod":
        return and_masks(self, other)

    def __rand__(self, other) -> "MaskMod":
        return and_masks(other, self)

    def __or__(self, other) -> "MaskMod":
        return or_masks(self, other)

    def __ror__(self, other) -> "MaskMod":
        return or_masks(other, self)

    def __invert__(self) -> "MaskMod":
        return not_mask(self)

    # -- helpers --------------------------------------------------------------------------------------
    def _layout_for(self, layout):
        layout = layout if layout is not None else self.layout
        if layout is None and self.requires_layout:
            raise ValueError(f"{self!r} reads token positions and needs a layout: attach one with .on(layout) "
                             "or pass layout= when evaluating")
        if layout is not None and not isinstance(layout, TokenLayout):
            raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
        return layout

    def __repr__(self) -> str:
        return type(self).__name__


# ---------------------------------------------------------------------------------------------------
# leaves
# ---------------------------------------------------------------------------------------------------
class _Fn(MaskMod):
    """A plain ``mask_mod`` function. It is assumed to read neither ``b`` nor ``h`` unless told."""

    needs_layout = False

    def __init__(self, fn: Callable, head_dependent: bool = False, batch_dependent: bool = False, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"a mask_mod must be callable (b, h, q_idx, kv_idx) -> bool tensor, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "mask_mod")
        self._flags = frozenset(n for n, on in (("head_dependent", head_dependent), ("batch_dependent", batch_dependent)) if on)

    def _build(self, layout, device):
        return self.fn

    def __repr__(self):
        return self.name


class _InSegment(MaskMod):
    def __init__(self, name: str, side: str):
        if side not in ("q", "kv"):
            raise ValueError(f"in_segment side must be 'q' (the query) or 'kv' (the key), got {side!r}")
        self.name, self.side = name, side

    def _build(self, layout, device):
        sl = layout.segment(self.name, self.side)
        start, stop = sl.start, sl.stop
        if self.side == "q":
            return lambda b, h, q_idx, kv_idx: (q_idx >= start) & (q_idx < stop)
        return lambda b, h, q_idx, kv_idx: (kv_idx >= start) & (kv_idx < stop)

    def __repr__(self):
        return f"in_segment({self.name!r}, side={self.side!r})"


class _IndexIn(MaskMod):
    """``b`` (or ``h``) is in a set of non-negative ints."""

    needs_layout = False

    def __init__(self, values, axis: str):
        self.axis = axis
        what = "head" if axis == "h" else "batch row"
        try:
            vals = sorted(set(values))
        except TypeError:
            raise ValueError(f"{what} indices must be a collection of ints >= 0, got {values!r}") from None
        if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in vals):
            raise ValueError(f"{what} indices must be a non-empty collection of ints >= 0, got {values!r}")
        self.values = tuple(vals)
        self._flags = frozenset({"head_dependent" if axis == "h" else "batch_dependent"})

    def _build(self, layout, device):
        n = self.values[-1] + 1
        table = torch.zeros(n, dtype=torch.bool, device=device)
        table[list(self.values)] = True

        def fn(b, h, q_idx, kv_idx):
            i = torch.as_tensor(h if self.axis == "h" else b, device=table.device)
            return (i < n) & table[i.clamp(0, n - 1)]

        return fn

    def __repr__(self):
        return f"{'heads_in' if self.axis == 'h' else 'batch_in'}({set(self.values)})"


class _Grid(MaskMod):
    """A grid pattern on the grid segment: both tokens in the grid and allowed by the pattern."""

    def __init__(self, pattern):
        if not hasattr(pattern, "allowed_fn") or not hasattr(pattern, "grid"):
            raise TypeError(f"grid_mask needs a grid pattern (with .grid and .allowed_fn(device)), got {type(pattern).__name__}")
        self.pattern = pattern

    def _build(self, layout, device):
        if tuple(self.pattern.grid) != tuple(layout.grid):
            raise ValueError(f"the pattern's grid {tuple(self.pattern.grid)} does not match the layout {layout.describe()}")
        off, n = layout.image_slice.start, layout.num_image
        allowed = self.pattern.allowed_fn(device)

        def fn(b, h, q_idx, kv_idx):
            qg, kg = q_idx - off, kv_idx - off
            inside = (qg >= 0) & (qg < n) & (kg >= 0) & (kg < n)
            return inside & allowed(qg.clamp(0, n - 1), kg.clamp(0, n - 1))

        return fn

    def __repr__(self):
        return f"grid_mask({type(self.pattern).__name__})"


# ---------------------------------------------------------------------------------------------------
# combinators
# ---------------------------------------------------------------------------------------------------
class _Combine(MaskMod):
    def __init__(self, parts: Iterable[MaskMod], op: str):
        self.parts = tuple(parts)
        self.op = op
        layouts = {p.layout for p in self.parts if p.layout is not None}
        if len(layouts) > 1:
            raise ValueError("cannot combine patterns attached to different layouts: "
                             + ", ".join(sorted(lay.describe() for lay in layouts)))
        self.layout = next(iter(layouts), None)

    needs_layout = False

    def _children(self):
        return self.parts

    def _build(self, layout, device):
        fns = [p._build(layout, device) for p in self.parts]
        if self.op == "not":
            (f,) = fns
            return lambda b, h, q_idx, kv_idx: ~f(b, h, q_idx, kv_idx)
        if not fns:
            const = self.op == "and"  # FlexAttention's convention: and_masks() allows all, or_masks() none

            def fn(b, h, q_idx, kv_idx):
                return torch.full(torch.broadcast_shapes(q_idx.shape, kv_idx.shape), const, dtype=torch.bool,
                                  device=q_idx.device)

            return fn
        if self.op == "and":
            def fn(b, h, q_idx, kv_idx):
                out = fns[0](b, h, q_idx, kv_idx)
                for f in fns[1:]:
                    out = out & f(b, h, q_idx, kv_idx)
                return out
        else:
            def fn(b, h, q_idx, kv_idx):
                out = fns[0](b, h, q_idx, kv_idx)
                for f in fns[1:]:
                    out = out | f(b, h, q_idx, kv_idx)
                return out
        return fn

    def __repr__(self):
        if self.op == "not":
            return f"~{self.parts[0]!r}"
        sym = " & " if self.op == "and" else " | "
        return "(" + sym.join(map(repr, self.parts)) + ")" if self.parts else f"{self.op}_masks()"


class _TextDense(_Combine):
    """``grid_mask(p) | in_segment("text", "q") | in_segment("text", "kv")`` exposing ``p``."""

    def __init__(self, pattern):
        super().__init__([_Grid(pattern), _InSegment("text", "q"), _InSegment("text", "kv")], "or")
        self.grid_pattern = pattern

    @property
    def capabilities(self) -> frozenset:
        grid_caps = frozenset(getattr(self.grid_pattern, "capabilities", frozenset()))
        kernel_caps = grid_caps & {"box", "block", "partition", "refined"}  # the grid kernels may run it ...
        if self.layout is not None and self.layout.extra:
            kernel_caps = frozenset()  # ... unless extra segments make q / k more than grid + text
        return frozenset({"mask_mod"}) | kernel_caps | (grid_caps & _INHERITED)

    def is_full(self, layout=None) -> bool:
        layout = self._layout_for(layout)
        if layout.extra:  # grid queries do not see extra keys
            return super().is_full(layout)
        return bool(self.grid_pattern.is_full())

    def __repr__(self):
        return f"text_dense({type(self.grid_pattern).__name__})"


def as_mask_mod(mod, *, head_dependent: bool = False, batch_dependent: bool = False) -> MaskMod:
    """``mod`` as a :class:`MaskMod`: a MaskMod is returned as is, a plain ``mask_mod`` function is
    wrapped (declare ``head_dependent`` / ``batch_dependent`` if it reads ``h`` / ``b``), a grid pattern
    (box, block, circular) becomes :func:`text_dense` of it."""
    if isinstance(mod, MaskMod):
        return mod
    if hasattr(mod, "allowed_fn") and hasattr(mod, "grid"):
        return _TextDense(mod)
    if "dynamic" in getattr(mod, "capabilities", ()):
        raise ValueError(f"{type(mod).__name__} is a dynamic pattern: call .resolve(q, k, layout) to get this call's mask")
    return _Fn(mod, head_dependent=head_dependent, batch_dependent=batch_dependent)


def _operand(mod) -> MaskMod:
    if isinstance(mod, MaskMod):
        return mod
    if hasattr(mod, "allowed_fn") and hasattr(mod, "grid"):
        raise TypeError(f"combine a grid pattern ({type(mod).__name__}) as grid_mask(p) (grid pairs only) or "
                        "text_dense(p) (grid pairs plus all text), not bare")
    return as_mask_mod(mod)


def and_masks(*mods) -> MaskMod:
    """Both / all predicates hold (FlexAttention's ``and_masks``; no argument: everything allowed)."""
    return _Combine([_operand(m) for m in mods], "and")


def or_masks(*mods) -> MaskMod:
    """Any predicate holds (FlexAttention's ``or_masks``; no argument: nothing allowed)."""
    return _Combine([_operand(m) for m in mods], "or")


def not_mask(mod) -> MaskMod:
    """The predicate does not hold."""
    return _Combine([_operand(mod)], "not")


def in_segment(name: str, side: str = "q", layout: TokenLayout | None = None) -> MaskMod:
    """The query (``side="q"``) or the key (``side="kv"``) lies in segment ``name`` (``"grid"`` /
    ``"image"``, ``"text"`` or an extra segment of the layout)."""
    mod = _InSegment(name, side)
    return mod.on(layout) if layout is not None else mod


def heads_in(heads) -> MaskMod:
    """The head index is in ``heads`` (a collection of ints >= 0). Head-dependent."""
    return _IndexIn(heads, "h")


def batch_in(rows) -> MaskMod:
    """The batch index is in ``rows`` (a collection of ints >= 0). Batch-dependent."""
    return _IndexIn(rows, "b")


def grid_mask(pattern, layout: TokenLayout | None = None) -> MaskMod:
    """The grid pattern's pairs, offset into the sequence by the layout: True only when query and key
    are both grid tokens and ``pattern`` allows the pair. ``pattern``: any object with ``.grid`` and
    ``.allowed_fn(device)`` (box, block and circular patterns)."""
    mod = _Grid(pattern)
    return mod.on(layout) if layout is not None else mod


def text_dense(pattern, layout: TokenLayout | None = None) -> MaskMod:
    """``grid_mask(pattern) | in_segment("text", "q") | in_segment("text", "kv")``: grid queries see
    their pattern's grid keys and every text key; text queries see every grid and text key. This is
    what the grid kernels compute; ``.grid_pattern`` is ``pattern`` and ``.capabilities`` carries its
    ``"box"`` / ``"block"`` / ``"partition"`` so those kernels are used. Keys of extra segments are
    seen by text queries only; add them with ``| in_segment(name, "kv")`` where every query needs them."""
    mod = _TextDense(pattern)
    return mod.on(layout) if layout is not None else mod


def as_sequence_pattern(pattern, layout: TokenLayout) -> MaskMod:
    """Any pattern as a :class:`MaskMod` over the whole sequence of ``layout``, attached to it: grid
    patterns become :func:`text_dense` (today's kernel convention), MaskMods get ``layout`` attached."""
    mod = as_mask_mod(pattern)
    if mod.layout is not None and mod.layout != layout:
        raise ValueError(f"the pattern is attached to {mod.layout.describe()}, not {layout.describe()}")
    return mod.on(layout)


def sequence_mask(pattern, layout: TokenLayout | None = None, batch: int | None = None, heads: int | None = None,
                  device=None) -> torch.Tensor:
    """The dense boolean reference of ``pattern`` on ``layout`` (default: the attached layout), computed
    by evaluating the predicate on aranges. Small sizes only (it builds S_q x S_kv).

    Returns ``(S_q, S_kv)`` (``layout.num_queries``, ``layout.num_keys``) when ``batch`` and ``heads``
    are None, else ``(batch or 1, heads or 1, S_q, S_kv)``. A head- (batch-) dependent pattern needs
    ``heads`` (``batch``). ``pattern``: a :class:`MaskMod`, a grid pattern (made :func:`text_dense`) or a
    plain ``mask_mod`` function (assumed head- and batch-independent)."""
    mod = as_mask_mod(pattern)
    layout = mod._layout_for(layout)
    if layout is None:
        raise ValueError("sequence_mask needs a layout (for the sequence lengths)")
    caps = mod.capabilities
    if "head_dependent" in caps and heads is None:
        raise ValueError(f"{mod!r} depends on the head: pass heads= (the number of heads)")
    if "batch_dependent" in caps and batch is None:
        raise ValueError(f"{mod!r} depends on the batch row: pass batch= (the batch size)")
    for name, val in (("batch", batch), ("heads", heads)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"sequence_mask {name} must be an int >= 1, got {val!r}")
    fn = mod._build(layout, device)
    sq, sk = layout.num_queries, layout.num_keys
    if batch is None and heads is None:
        zero = torch.zeros((), dtype=torch.long, device=device)
        q = torch.arange(sq, device=device)[:, None]
        kv = torch.arange(sk, device=device)[None, :]
        out = fn(zero, zero, q, kv)
        return torch.broadcast_to(torch.as_tensor(out, dtype=torch.bool), (sq, sk)).clone()
    B, H = batch or 1, heads or 1
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(sq, device=device).view(1, 1, sq, 1)
    kv = torch.arange(sk, device=device).view(1, 1, 1, sk)
    out = fn(b, h, q, kv)
    return torch.broadcast_to(torch.as_tensor(out, dtype=torch.bool), (B, H, sq, sk)).clone()
