"""Functional attention API for people who build their own models, in NATTEN's style.

One verb per operation, the same keywords everywhere, scalars broadcast to every grid axis::

    from diffusion_attn import ops
    out = ops.neighborhood_attention(q, k, v, window=7, stride=2, dilation=1, grid=(32, 48), text_len=77)
    out = ops.neighborhood_attention(q_img, k_img, v_img, window=(3, 7, 7))   # q_img: (B, T, H, W, heads, D)
    out = ops.radial_attention(q, k, v, grid=(21, 30, 52), decay_factor=0.2, sink=True)
    out = ops.shifted_window_attention(q, k, v, choice=1, grid=(64, 64))
    out = ops.masked_attention(q, k, v, my_mask_mod, layout)                  # any predicate

Tensors. ``q, k`` share one shape; ``v`` may have another head size (``Dv != D``). Two layouts:

* *sequence*: ``(B, S, heads, D)`` -- diffusers' layout. ``grid`` is required (it is never guessed from
  ``S``); ``S = prod(grid) + text_len``, the text tokens sitting after (``text_position="last"``: SD3,
  HunyuanVideo, Mochi) or before (``"first"``: Flux) the grid. A 1-D grid is ``grid=(L,)``.
* *grid*: ``(B, *grid, heads, D)`` with a 2-D or 3-D grid -- NATTEN's ``na2d`` / ``na3d`` layout; the grid
  is read from the shape (``grid=``, if given, must agree), there is no text, and the output has the same
  layout.

Common keywords: ``key_padding_mask`` (B, S) bool, True = real token (diffusers' text padding; only text
tokens may be padded for the grid verbs); ``backend`` (see :data:`diffusion_attn.kernels.BACKENDS`,
``"auto"`` picks by a documented rule); ``scale`` (default ``D ** -0.5``). Semantics: grid queries see
their pattern's grid keys and every text key in one softmax; text queries see every key
(:func:`~diffusion_attn.patterns.text_dense`). The output has ``v``'s head size.

Every verb builds its pattern and calls :func:`diffusion_attn.kernels.pattern_attention`; bad input
raises ``ValueError`` naming what was wrong and what is accepted.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .layout import TokenLayout
from .patterns import neighborhood_pattern, radial_pattern, shifted_window_pattern
from .patterns.mask_mod import MaskMod, as_mask_mod
from .patterns.radial import RADIAL_BLOCK

__all__ = ["masked_attention", "neighborhood_attention", "radial_attention", "shifted_window_attention"]

#: the backends masked_attention accepts for a predicate that is not a box / block pattern
PREDICATE_BACKENDS = ("auto", "reference")
#: mask elements evaluated per query chunk by the predicate path (bounds its memory)
_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------------
# input handling shared by the verbs
# ---------------------------------------------------------------------------------------------------
def _check_tensors(q, k, v, verb: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{verb}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() < 4:
        raise ValueError(f"{verb}: q must be (B, S, heads, head_dim) or (B, *grid, heads, head_dim), got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{verb}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"{verb}: v must match q's shape except the head size: {tuple(q.shape[:-1])} + (Dv,), got {tuple(v.shape)}")


def _check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be None (head_dim ** -0.5) or a finite number > 0, got {scale!r}")


def _int_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _flatten(q, k, v, grid, text_len, text_position, key_padding_mask, verb: str, ranks=(1, 2, 3)):
    """(q, k, v) in the sequence layout, the TokenLayout, and a function restoring the caller's layout."""
    _check_tensors(q, k, v, verb)
    text_len = _int_count(text_len, "text_len")
    if grid is not None:
        try:
            grid = tuple(grid)
        except TypeError:
            raise ValueError(f"{verb}: grid must be a sequence of {'/'.join(map(str, ranks))} ints, got {grid!r}") from None
        if any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
            raise ValueError(f"{verb}: grid entries must be ints >= 1, got {grid!r}")
    if q.dim() == 4:  # sequence layout
        if grid is None:
            raise ValueError(f"{verb}: q is (B, S, heads, head_dim): pass grid= (the token grid; S = prod(grid) + text_len), "
                             f"or give q as (B, *grid, heads, head_dim) with a 2-D or 3-D grid")
        if len(grid) not in ranks:
            raise ValueError(f"{verb}: grid must have {' or '.join(map(str, ranks))} axes, got {grid!r}")
        layout = TokenLayout(grid, text_len, text_position)
        if q.shape[1] != layout.num_tokens:
            raise ValueError(f"{verb}: sequence length {q.shape[1]} does not match grid {grid} + {text_len} text tokens "
                             f"= {layout.num_tokens}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != (q.shape[0], q.shape[1]):
                got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
                raise ValueError(f"{verb}: key_padding_mask must be a (B, S) = {(q.shape[0], q.shape[1])} bool tensor "
                                 f"(True = real token), got {got}")
        return q, k, v, layout, key_padding_mask, (lambda out: out)
    shape_grid = tuple(q.shape[1:-2])
    if len(shape_grid) not in ranks or len(shape_grid) < 2:
        raise ValueError(f"{verb}: grid-shaped q must be (B, *grid, heads, head_dim) with a "
                         f"{' or '.join(str(r) for r in ranks if r >= 2)}-D grid, got shape {tuple(q.shape)}")
    if grid is not None and grid != shape_grid:
        raise ValueError(f"{verb}: grid={grid} does not match q's grid {shape_grid}")
    if text_len or key_padding_mask is not None:
        raise ValueError(f"{verb}: grid-shaped inputs carry no text tokens (text_len / key_padding_mask); pass "
                         "(B, S, heads, head_dim) tensors with grid= and text_len= for a sequence with text")
    B, H = q.shape[0], q.shape[-2]
    n = math.prod(shape_grid)
    layout = TokenLayout(shape_grid, 0)

    def flat(t):
        return t.reshape(B, n, H, t.shape[-1])

    return flat(q), flat(k), flat(v), layout, None, (lambda out: out.reshape(B, *shape_grid, H, out.shape[-1]))


def _run(q, k, v, pattern, layout, key_padding_mask, backend, scale):
    from .kernels import pattern_attention  # kernels import patterns; keep the import order one-way

    _check_scale(scale)
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a backend name string (e.g. 'auto'), got {backend!r}")
    return pattern_attention(q, k, v, pattern, layout, key_padding_mask=key_padding_mask, backend=backend, scale=scale)


# ---------------------------------------------------------------------------------------------------
# the verbs
# ---------------------------------------------------------------------------------------------------
def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window,
    stride=1,
    dilation=1,
    *,
    grid: Sequence[int] | None = None,
    text_len: int = 0,
    text_position: str = "last",
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Generalized neighborhood attention (GNA; NATTEN's ``na1d/na2d/na3d``, non-causal) over a 1-3 D grid.

    ``window``, ``stride``, ``dilation``: an int (every axis) or one int per axis. Per axis of length
    ``L``: ``window * dilation <= L`` and ``1 <= stride <= window`` (NATTEN's constraints). Every grid
    query sees exactly ``prod(window)`` grid keys (windows are clamped inward at borders), plus every
    text key. ``stride == window``: blocked windows; ``stride == 1``: sliding windows.
    See the module docstring for the tensor layouts and the common keywords.
    """
    verb = "neighborhood_attention"
    q2, k2, v2, layout, kpm, restore = _flatten(q, k, v, grid, text_len, text_position, key_padding_mask, verb)
    pattern = neighborhood_pattern(layout.grid, window, stride, dilation)
    return restore(_run(q2, k2, v2, pattern, layout, kpm, backend, scale))


def radial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int] | None = None,
    decay_factor: float = 1.0,
    sink: bool = False,
    *,
    block_size: int = RADIAL_BLOCK,
    text_len: int = 0,
    text_position: str = "last",
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Radial attention's static spatio-temporal energy-decay mask (mit-han-lab/radial-attention).

    ``grid``: ``(T, H, W)`` video tokens (a 2-D or 1-D grid counts as one frame). ``decay_factor`` > 0
    scales the band of distant frames; ``sink``: the first frame is seen by every query (Wan). The mask
    is built over ``block_size`` x ``block_size`` token blocks (128 in the official code; smaller values
    give finer masks on small grids). See :mod:`diffusion_attn.patterns.radial`.
    """
    verb = "radial_attention"
    if isinstance(decay_factor, bool) or not isinstance(decay_factor, (int, float)) or not math.isfinite(decay_factor) \
            or decay_factor <= 0:
        raise ValueError(f"{verb}: decay_factor must be a finite number > 0, got {decay_factor!r}")
    if not isinstance(sink, bool):
        raise ValueError(f"{verb}: sink must be True or False, got {sink!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{verb}: block_size must be an int >= 1, got {block_size!r}")
    q2, k2, v2, layout, kpm, restore = _flatten(q, k, v, grid, text_len, text_position, key_padding_mask, verb)
    pattern = radial_pattern(layout.grid, decay_factor, sink, block_size)
    return restore(_run(q2, k2, v2, pattern, layout, kpm, backend, scale))


def shifted_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    choice: int = 0,
    *,
    grid: Sequence[int] | None = None,
    text_len: int = 0,
    text_position: str = "last",
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """HiDiffusion's MSW-MSA: a 2 x 2 grid of ``ceil(H/2) x ceil(W/2)`` windows after a cyclic shift of
    ``choice * (window // 4)`` per axis (``choice`` in 0..3). 2-D grids only. On an odd axis the second
    window is clamped inward (no resize; see :mod:`diffusion_attn.patterns.shifted_window`).
    """
    verb = "shifted_window_attention"
    if isinstance(choice, bool) or choice not in (0, 1, 2, 3):
        raise ValueError(f"{verb}: choice must be 0, 1, 2 or 3, got {choice!r}")
    q2, k2, v2, layout, kpm, restore = _flatten(q, k, v, grid, text_len, text_position, key_padding_mask, verb, ranks=(2,))
    pattern = shifted_window_pattern(layout.grid, choice)
    return restore(_run(q2, k2, v2, pattern, layout, kpm, backend, scale))


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod,
    layout: TokenLayout,
    *,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Attention restricted by any pattern of the protocol (:mod:`diffusion_attn.patterns.mask_mod`).

    ``mask_mod``: a :class:`~diffusion_attn.patterns.MaskMod`, a plain ``mask_mod(b, h, q_idx, kv_idx)``
    function over sequence positions (assumed to read neither ``b`` nor ``h``; wrap it with
    ``as_mask_mod(fn, head_dependent=True)`` if it does), a grid pattern (made text-dense) or a dynamic
    pattern (resolved from this call's q and k). ``layout``: the call's :class:`~diffusion_attn.TokenLayout`;
    ``q`` is ``(B, layout.num_queries, heads, D)``, ``k`` / ``v`` ``(B, layout.num_keys, heads, D / Dv)``
    (extra segments may make them differ). ``key_padding_mask``: (B, num_keys), True = real token.

    Text-dense box / block patterns on a layout without extra segments run on the grid kernels
    (:func:`~diffusion_attn.kernels.pattern_attention`, any ``backend``). Other predicates run as SDPA with
    the predicate's boolean mask, evaluated per query chunk (backends ``"auto"`` / ``"reference"``). Every
    query must see at least one key.
    """
    verb = "masked_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{verb}: {name} must be a (B, S, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"{verb}: layout must be a TokenLayout, got {type(layout).__name__}")
    B, Sq, H, D = q.shape
    if q.shape[1] != layout.num_queries or k.shape[1] != layout.num_keys:
        raise ValueError(f"{verb}: q / k lengths {q.shape[1]} / {k.shape[1]} do not match the layout {layout.describe()} "
                         f"({layout.num_queries} queries, {layout.num_keys} keys)")
    if k.shape[0] != B or k.shape[2:] != q.shape[2:] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{verb}: k must be (B, S_kv, heads, D) like q {tuple(q.shape)} and v (B, S_kv, heads, Dv), "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_scale(scale)
    if "dynamic" in getattr(mask_mod, "capabilities", ()):
        mask_mod = mask_mod.resolve(q, k, layout)
    mod = as_mask_mod(mask_mod)
    if mod.layout is not None and mod.layout != layout:
        raise ValueError(f"{verb}: the pattern is attached to {mod.layout.describe()}, the call's layout is {layout.describe()}")
    caps = mod.capabilities
    if caps & {"box", "block"} and mod.grid_pattern is not None and not layout.extra:
        return _run(q, k, v, mod.grid_pattern, layout, key_padding_mask, backend, scale)
    if backend not in PREDICATE_BACKENDS:
        raise ValueError(f"{verb}: backend={backend!r} cannot run this pattern (capabilities: {', '.join(sorted(caps))}); "
                         f"accepted for a general predicate: {', '.join(PREDICATE_BACKENDS)}")
    return _predicate_attention(q, k, v, mod, layout, key_padding_mask, scale)


def _predicate_attention(q, k, v, mod: MaskMod, layout: TokenLayout, key_padding_mask, scale):
    """SDPA with the predicate's mask, evaluated per query chunk (never more than ~16M mask elements)."""
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    kpm = None
    if key_padding_mask is not None:
        kpm = torch.as_tensor(key_padding_mask).to(q.device)
        if kpm.shape != (B, Sk):
            raise ValueError(f"masked_attention: key_padding_mask must be (B, S_kv) = {(B, Sk)}, got {tuple(kpm.shape)}")
        kpm = kpm.bool()
    caps = mod.capabilities
    fn = mod.bind(layout, q.device)
    nb = B if "batch_dependent" in caps else 1
    nh = H if "head_dependent" in caps else 1
    b = torch.arange(nb, device=q.device).view(nb, 1, 1, 1)
    h = torch.arange(nh, device=q.device).view(1, nh, 1, 1)
    kv = torch.arange(Sk, device=q.device).view(1, 1, 1, Sk)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rows = max(1, _CHUNK_ELEMENTS // max(1, B * H * Sk))
    out = []
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        qi = torch.arange(r0, r1, device=q.device).view(1, 1, r1 - r0, 1)
        m = torch.broadcast_to(torch.as_tensor(fn(b, h, qi, kv), dtype=torch.bool), (nb, nh, r1 - r0, Sk))
        if kpm is not None:
            m = m & kpm[:, None, None, :]
        empty = ~m.any(-1)
        if bool(empty.any()):
            bi, hi, ri = (int(x) for x in torch.nonzero(empty)[0])
            raise ValueError(f"masked_attention: query {r0 + ri} (batch row {bi}, head {hi}) may attend to no key; "
                             "every query needs at least one allowed, unpadded key")
        out.append(torch.nn.functional.scaled_dot_product_attention(qt[:, :, r0:r1], kt, vt, attn_mask=m, scale=scale))
    return torch.cat(out, dim=2).transpose(1, 2)
