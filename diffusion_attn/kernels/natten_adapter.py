"""Optional NATTEN backend: GNA patterns through ``natten.na1d / na2d / na3d`` (NATTEN >= 0.20).

NATTEN's functional API (0.20+) takes heads-last tensors ``[B, *grid, heads, head_dim]`` -- the
diffusers layout after a view -- with ``kernel_size``, ``stride``, ``dilation`` and ``is_causal`` per
axis, and ``additional_keys / additional_values``: extra tokens every query attends to in the same
softmax (NATTEN computes them as a separate attention and merges by log-sum-exp). That is exactly how
text tokens enter our patterns, so a GNA pattern with text maps one to one:

* image queries -> ``na{n}d(q_img, k_img, v_img, kernel_size, stride, dilation, is_causal=False,
  additional_keys=k_text, additional_values=v_text)``;
* text queries -> plain SDPA over the whole sequence (as :func:`~diffusion_attn.kernels.pattern_attention`);
* text padding: NATTEN has no key mask, so padded text keys are dropped -- batch rows with the same
  padding share one call, rows that differ get their own call;
* MSW-MSA (a blocked GNA after a cyclic shift): the grid is rolled, NATTEN runs on the rolled grid and
  the output is rolled back.

Which patterns: :func:`gna_params` recognises a :class:`~diffusion_attn.patterns.BoxPattern` by
reconstructing ``(window, stride, dilation, shift)`` per axis from its ``AxisWindows`` and checking that
:func:`~diffusion_attn.patterns.neighborhood.neighborhood_axis` rebuilds exactly the same windows (so
the result is the same pattern by construction, whatever stride the caller wrote: equivalent strides
give identical masks and the largest one is used). Radial / block patterns, strided patterns with a
cyclic shift and dilation together, and anything else return ``None``.

Performance note: NATTEN >= 0.20 has no CPU kernels; on CPU it runs FlexAttention uncompiled (slow,
and the Flex backend limits ``head_dim``). The automatic backend choice should use it on CUDA only.
Install: ``pip install --no-build-isolation "diffusion-attn[natten]"`` after torch (PyPI has only an sdist
whose build imports torch; an isolated build would fetch another torch). CUDA wheels: see
https://natten.org/install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..patterns.base import BoxPattern
from ..patterns.neighborhood import neighborhood_axis
from .backend import Backend, available_if
from .capabilities import grid_pattern_of
from .reference import check_inputs, text_query_attention

__all__ = ["BACKEND", "GNAParams", "available", "can_run", "gna_params", "natten_attention", "require", "supports"]

INSTALL_HINT = 'pip install --no-build-isolation "diffusion-attn[natten]" (after torch)'
MIN_VERSION = (0, 20)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in str(text).split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def require():
    """The imported ``natten`` module; ImportError naming the extra when it is missing or too old."""
    try:
        natten = importlib.import_module("natten")
    except ImportError as e:
        raise ImportError(f"the 'natten' backend needs the NATTEN package (>= 0.20): {INSTALL_HINT} ({e})") from e
    version = getattr(natten, "__version__", "0")
    if _version_tuple(version) < MIN_VERSION or not all(hasattr(natten, f"na{n}d") for n in (1, 2, 3)):
        raise ImportError(f"the 'natten' backend needs NATTEN >= 0.20 (stride support, functional na1d/na2d/na3d); "
                          f"found {version}: {INSTALL_HINT}")
    return natten


def available() -> bool:
    """Whether a usable NATTEN (>= 0.20) imports."""
    try:
        require()
        return True
    except ImportError:
        return False


@dataclass(frozen=True)
class GNAParams:
    """Per-axis NATTEN arguments of a pattern; ``shift``: the cyclic shift applied before NATTEN
    (permuted position ``p`` holds original coordinate ``(p + shift) % L``), 0 for plain GNA."""

    window: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    shift: tuple[int, ...]


def _axis_params(axis) -> tuple[int, int, int, int] | None:
    L = axis.length
    perm = axis.perm
    ar = torch.arange(L)
    widths = axis.hi - axis.lo
    k = int(widths[0])
    if not bool((widths == k).all()):
        return None
    # dilation order: the groups g, g + d, g + 2d, ... one after the other; or a cyclic shift (d = 1)
    candidates = []
    d = int(perm[1]) if L > 1 and int(perm[0]) == 0 else 1
    if d >= 1 and torch.equal(perm, torch.cat([torch.arange(g, L, d) for g in range(min(d, L))])):
        candidates.append((d, 0))
    shift = int(perm[0])
    if shift and torch.equal(perm, (ar + shift) % L):
        candidates.append((1, shift))
    for d, shift in candidates:
        if k * d > L:
            continue
        for s in range(k, 0, -1):  # the largest equivalent stride (blocked when possible)
            ref = neighborhood_axis(L, k, s, d)
            if torch.equal(ref.lo, axis.lo) and torch.equal(ref.hi, axis.hi) and (shift or torch.equal(ref.perm, perm)):
                return k, s, d, shift
    return None


def gna_params(pattern) -> GNAParams | None:
    """NATTEN arguments reproducing ``pattern`` exactly, or ``None`` when it is not a (shifted) GNA."""
    if not isinstance(pattern, BoxPattern) or not 1 <= len(pattern.grid) <= 3:
        return None
    per_axis = []
    for axis in pattern.axes:
        p = _axis_params(axis)
        if p is None:
            return None
        per_axis.append(p)
    w, s, d, sh = (tuple(x) for x in zip(*per_axis))
    return GNAParams(w, s, d, sh)


def supports(pattern, layout: TokenLayout) -> bool:
    """Whether NATTEN can compute ``pattern`` on ``layout`` (pattern-level check; see :func:`can_run`
    for the tensor-level one: device, dtype, head_dim)."""
    return tuple(getattr(pattern, "grid", ())) == tuple(layout.grid) and gna_params(pattern) is not None


def can_run(q: torch.Tensor, layout: TokenLayout) -> bool:
    """Whether the installed NATTEN has a backend for these tensors (device, dtype, head_dim), asking
    NATTEN's own backend chooser; False when NATTEN is missing."""
    try:
        require()
        from natten.backends import choose_backend
    except ImportError:
        return False
    x = q[:, layout.image_slice].reshape(q.shape[0], *layout.grid, *q.shape[2:])
    try:
        choose_backend(x, x, x, torch_compile=False)
        return True
    except Exception:
        return False


def natten_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    layout: TokenLayout,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    params: GNAParams | None = None,
) -> torch.Tensor:
    """:func:`~diffusion_attn.kernels.pattern_attention` for a GNA pattern, computed by NATTEN.

    ``params``: :func:`gna_params` of ``pattern`` (pass it when cached; computed otherwise)."""
    natten = require()
    params = params if params is not None else gna_params(pattern)
    if params is None:
        raise ValueError("the 'natten' backend runs generalized neighborhood attention patterns only "
                         "(GNA, optionally cyclically shifted); use backend='gather'")
    B, S, H, D = q.shape
    img, txt = layout.image_slice, layout.text_slice
    grid = tuple(layout.grid)
    nd = len(grid)
    kpm = check_inputs(q, k, layout, key_padding_mask)
    shifts = tuple(-s for s in params.shift) if any(params.shift) else None
    dims = tuple(range(1, nd + 1))

    def to_grid(x):
        x = x[:, img].reshape(x.shape[0], *grid, *x.shape[2:])
        return torch.roll(x, shifts, dims) if shifts else x

    qg, kg, vg = to_grid(q), to_grid(k), to_grid(v)
    fn = getattr(natten, f"na{nd}d")
    kwargs = dict(kernel_size=params.window, stride=params.stride, dilation=params.dilation,
                  is_causal=(False,) * nd, scale=scale)

    def run(rows, text_keep):
        extra = {}
        if layout.text_len:
            tk, tv = k[rows][:, txt], v[rows][:, txt]
            if text_keep is not None:
                tk, tv = tk[:, text_keep], tv[:, text_keep]
            if tk.shape[1]:
                extra = dict(additional_keys=tk, additional_values=tv)
        try:
            return fn(qg[rows], kg[rows], vg[rows], **kwargs, **extra)
        except NotImplementedError as e:
            raise RuntimeError(f"NATTEN has no backend for {q.dtype} head_dim={D} on {q.device.type} ({e}); "
                               "use backend='windows' or 'gather'") from e

    if kpm is None:
        og = run(slice(None), None)
    else:
        og = qg.new_empty(*qg.shape[:-1], v.shape[-1])
        text_valid = kpm[:, txt]
        done = torch.zeros(B, dtype=torch.bool)
        for b in range(B):
            if done[b]:
                continue
            same = (text_valid == text_valid[b]).all(1).cpu() & ~done
            rows = torch.nonzero(same).flatten().to(q.device)
            og[rows] = run(rows, text_valid[b])
            done |= same
    if shifts:
        og = torch.roll(og, tuple(-s for s in shifts), dims)
    out = q.new_empty(B, S, H, v.shape[-1])
    out[:, img] = og.reshape(B, layout.num_image, H, v.shape[-1])
    if layout.text_len:
        out[:, txt] = text_query_attention(q, k, v, layout, kpm, scale)
    return out




def _check(request):
    pattern = grid_pattern_of(request.pattern)
    if not supports(pattern, request.layout):
        return ("backend='natten' runs generalized neighborhood attention patterns only "
                "(GNA, optionally cyclically shifted)")
    if min(gna_params(pattern).window) < 2:
        return "backend='natten' needs windows of at least 2 on every axis (NATTEN's limit)"
    if request.requires_grad and request.device_type == "cpu":  # NATTEN runs uncompiled flex on CPU
        return "backend='natten' has no backward on CPU (NATTEN runs FlexAttention there); inputs that require grad need another backend"
    if request.dtype is not None and request.head_dim is not None:  # ask NATTEN's own backend chooser
        x = torch.empty(1, request.layout.num_image, 1, request.head_dim, device=request.device, dtype=request.dtype)
        if not can_run(x, TokenLayout(request.layout.grid)):
            return (f"backend='natten': the installed NATTEN has no kernel for {str(request.dtype).replace('torch.', '')} "
                    f"head size {request.head_dim} on {request.device_type}")
    return None


def _prepare(request):
    return gna_params(grid_pattern_of(request.pattern))


def _run(q, k, v, request, prepared, key_padding_mask, scale):
    return natten_attention(q, k, v, grid_pattern_of(request.pattern), request.layout,
                            key_padding_mask=key_padding_mask, scale=scale, params=prepared)


BACKEND = Backend(
    "natten", "NATTEN's na1d/na2d/na3d for GNA patterns, text as additional keys (opt-in; fast on CUDA)", _run,
    needs=(("box",),), value_dim=False, available=available_if(require), check=_check, prepare=_prepare,
)
