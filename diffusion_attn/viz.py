"""Pictures of attention patterns: which (query, key) pairs a method lets through, at any layout size.

:func:`render_pattern` draws the (query, key) mask of a method on a :class:`~diffusion_attn.TokenLayout`
(text tokens included) as an image of at most ``max_side`` pixels per side: every pixel cell is shaded by
the share of its token pairs the method allows (white = none, dark = all). The mask is never built as an
``S x S`` tensor: rows are computed in chunks from the pattern (per-axis windows of a ``BoxPattern``, the
block mask of a ``BlockPattern``) and summed into the cells at once, so a Wan 480p layout
(``9 x 30 x 52`` latent tokens + 512 text tokens = 14,552 tokens, ~212 M pairs) renders with a few MB.

Only PIL and numpy are used.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .api import method_pattern
from .layout import TokenLayout

__all__ = ["render_pattern", "density", "density_map", "colormap"]

#: at most this many (row, column) booleans are materialised at once
CHUNK_ELEMENTS = 1 << 21
#: above this many (query, key) pairs, row cells are estimated from a few query rows each (see _counts)
EXACT_PAIRS = 1 << 28
#: layouts up to this many grid tokens may use a pattern's dense mask when it offers nothing better
DENSE_FALLBACK_TOKENS = 4096

# colours
_BG = (255, 255, 255)
_INK = (30, 30, 30)
_MUTED = (110, 110, 110)
_TEXT_TOKENS = (232, 140, 40)
_IMAGE_TOKENS = ((70, 110, 170), (150, 180, 215))  # alternating per frame
_FRAME_LINE = (220, 70, 40, 150)
_ROW_LINE = (120, 120, 120, 70)
_TEXT_LINE = (232, 140, 40, 230)
_RAMP = np.array([[0.0, 255, 255, 255], [0.35, 150, 190, 228], [0.7, 50, 100, 175], [1.0, 12, 28, 80]])


def colormap(values) -> np.ndarray:
    """Density in [0, 1] -> RGB uint8 (white -> light blue -> dark navy); the colour ramp of the pictures."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    out = np.stack([np.interp(v, _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)], axis=-1)
    return np.round(out).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------
# The pattern and its rows
# ------------------------------------------------------------------------------------------------------


def _grid_rows(pattern) -> Callable[[np.ndarray], np.ndarray]:
    """A function: grid query indices (r,) -> their (r, N) boolean mask rows over the grid keys."""
    from .patterns.base import BlockPattern, BoxPattern

    if hasattr(pattern, "mask_rows"):  # a pattern may offer its own row access
        return lambda q: np.asarray(pattern.mask_rows(q), dtype=bool)
    if isinstance(pattern, BoxPattern):
        axes = [a.dense().numpy() for a in pattern.axes]  # (L, L) each, original coordinates
        grid = pattern.grid

        def rows(q):
            coords = np.unravel_index(q, grid)
            out = None
            n = len(axes)
            for i, (a, c) in enumerate(zip(axes, coords)):
                shape = [len(q)] + [1] * n
                shape[1 + i] = a.shape[1]
                term = a[c].reshape(shape)
                out = term if out is None else out & term
            return np.broadcast_to(out, (len(q), *grid)).reshape(len(q), -1)

        return rows
    if isinstance(pattern, BlockPattern):
        bm = pattern.block_mask.numpy()
        col_block = np.arange(pattern.num_tokens) // pattern.block_size
        return lambda q: bm[q // pattern.block_size][:, col_block]
    n = math.prod(pattern.grid)
    if n <= DENSE_FALLBACK_TOKENS:
        dense = pattern.dense_mask().cpu().numpy()
        return lambda q: dense[q]
    raise ValueError(
        f"{type(pattern).__name__} offers no row access (mask_rows) and {n} grid tokens are too many for its dense mask"
    )


def _cell_edges(size: int, cells: int) -> np.ndarray:
    """Token boundaries of ``cells`` near-equal cells over ``size`` tokens: (cells + 1,) ints."""
    return (np.arange(cells + 1) * size) // cells


def _counts(pattern, layout: TokenLayout, cells: int, exact_pairs: int | None = None):
    """Allowed (query, key) pairs per cell over the whole sequence: ``(counts (cells, cells) float64,
    cell edges, sampled)``. Rows are processed in chunks of whole row cells. When the sequence has more
    than ``exact_pairs`` pairs (default :data:`EXACT_PAIRS`; ``0`` = always exact), each row cell is
    estimated from a few evenly spaced query rows (every key column still counted exactly); ``sampled``
    is then the number of rows used per cell, else 0."""
    S = layout.num_tokens
    edges = _cell_edges(S, cells)
    starts = edges[:-1]
    widths = np.diff(edges)
    exact_pairs = EXACT_PAIRS if exact_pairs is None else exact_pairs
    k = 0
    if exact_pairs and S * S > exact_pairs:
        k = max(1, exact_pairs // (cells * S))
        if k >= int(widths.min()):
            k = 0
    # the query rows of every row cell (all of them, or k evenly spaced ones) and their weights
    if k:
        offs = ((np.arange(k) + 0.5) / k)
        cell_rows = [edges[c] + np.unique((offs * widths[c]).astype(np.int64)) for c in range(cells)]
    else:
        cell_rows = [np.arange(edges[c], edges[c + 1]) for c in range(cells)]
    img = layout.image_slice
    rows_fn = _grid_rows(pattern)
    counts = np.zeros((cells, cells), dtype=np.float64)
    max_rows = max(1, CHUNK_ELEMENTS // S)
    c0 = 0
    while c0 < cells:
        c1, n = c0, 0
        while c1 < cells and (c1 == c0 or n + len(cell_rows[c1]) <= max_rows):
            n += len(cell_rows[c1])
            c1 += 1
        seq = np.concatenate(cell_rows[c0:c1])
        is_img = (seq >= img.start) & (seq < img.stop)
        block = np.ones((len(seq), S), dtype=np.uint8)
        if is_img.any():
            block[is_img, img.start : img.stop] = rows_fn(seq[is_img] - img.start)
        per_col = np.add.reduceat(block, starts, axis=1, dtype=np.int32)  # (rows, cells)
        bounds = np.cumsum([0] + [len(r) for r in cell_rows[c0:c1]])[:-1]
        sums = np.add.reduceat(per_col, bounds, axis=0, dtype=np.int64).astype(np.float64)
        counts[c0:c1] = sums * (widths[c0:c1] / np.array([len(r) for r in cell_rows[c0:c1]]))[:, None]
        c0 = c1
    return counts, edges, k


def _allowed_grid_pairs(pattern) -> int | None:
    fn = getattr(pattern, "allowed_pairs", None)
    return int(fn()) if callable(fn) else None


def density_map(method: str, layout: TokenLayout, *, family: str | None = None, max_side: int = 768, **params) -> np.ndarray:
    """The share of allowed (query, key) pairs in each cell of a ``cells x cells`` partition of the whole
    sequence (``cells = min(tokens, max_side)``; cell ``i`` holds tokens ``[i*S//cells, (i+1)*S//cells)``),
    float64 in [0, 1]. Memory stays bounded (no ``S x S`` mask). Exact up to :data:`EXACT_PAIRS` pairs
    (a Wan 480p layout is exact); beyond, each row cell is estimated from a few evenly spaced query rows."""
    _, _, pattern = method_pattern(method, layout, family=family, **params)
    counts, edges, _ = _counts(pattern, layout, min(layout.num_tokens, int(max_side)))
    w = np.diff(edges).astype(np.float64)
    return counts / (w[:, None] * w[None, :])


def density(method: str, layout: TokenLayout, *, family: str | None = None, **params) -> float:
    """The share of (query, key) pairs of the whole sequence (text included) that ``method`` allows:
    ``attention_mask(method, layout, ...).float().mean()`` computed without the ``S x S`` mask."""
    _, _, pattern = method_pattern(method, layout, family=family, **params)
    return _density(pattern, layout)


def _density(pattern, layout: TokenLayout) -> float:
    S, N = layout.num_tokens, layout.num_image
    allowed = _allowed_grid_pairs(pattern)
    if allowed is None:  # count exactly, row by row
        counts, _, _ = _counts(pattern, layout, min(S, 512), exact_pairs=0)
        total = int(round(counts.sum()))
    else:
        total = S * S - N * N + allowed
    return total / float(S * S)


# ------------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    return int(math.ceil(font.getlength(text)))


def _wrap(font, text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and _text_width(font, trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(map(str, v)) + ")"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _param_text(spec, resolved: dict) -> str:
    shown = [f"{k}={_fmt(v)}" for k, v in resolved.items() if v is not None and k != "backend"]
    return ", ".join(shown) if shown else "defaults"


def render_pattern(method: str, layout: TokenLayout, *, family: str | None = None, max_side: int = 768, **params):
    """A picture (``PIL.Image``, RGB) of ``method``'s attention pattern on ``layout``.

    The (query, key) mask of the whole sequence -- rows are queries, columns keys, in sequence order,
    text tokens included -- downsampled to at most ``max_side`` pixels per side: each cell is coloured
    by the share of its pairs the method allows (:func:`colormap`: white none, dark navy all). Strips
    along the top and left mark text tokens (orange) and image/video tokens (blue, alternating shades
    per frame); thin lines mark the text/image boundary (orange), frame boundaries (red) and, when cells
    are large enough, grid rows (grey). A title gives the method, parameters, layout and overall
    density; a legend explains the colours.

    ``image.info`` carries ``"matrix_box"`` (left, top, right, bottom pixel box of the matrix),
    ``"cells"`` (cells per side), ``"density"`` and ``"cell_edges"`` (token boundaries of the cells).
    """
    from PIL import Image, ImageDraw

    max_side = int(max_side)
    if max_side < 8:
        raise ValueError(f"max_side must be >= 8, got {max_side}")
    spec, resolved, pattern = method_pattern(method, layout, family=family, **params)
    S, N = layout.num_tokens, layout.num_image
    cells = min(S, max_side)
    counts, edges, sampled = _counts(pattern, layout, cells)
    w = np.diff(edges).astype(np.float64)
    dens = counts / (w[:, None] * w[None, :])
    total_density = _density(pattern, layout)
    grid_density = None if layout.text_len == 0 else _allowed_grid_pairs(pattern)
    scale = max(1, max_side // cells)
    M = cells * scale

    # fonts and text
    f_title, f_body, f_small = _font(16), _font(13), _font(11)
    pad, strip, gap = 16, 10, 3
    tokens_per_px = S / M
    title = f"{spec.name}: {_param_text(spec, resolved)}"
    fam = family or spec.families[0]
    lines2 = [
        f"layout {layout.describe()} = {S:,} tokens" + (f" ({fam} defaults)" if spec.family_defaults else ""),
        f"density {100 * total_density:.2f}% of the {S:,} x {S:,} (query, key) pairs"
        + (f"; image-image {100 * grid_density / float(N) ** 2:.2f}%" if grid_density is not None else "")
        + (f"; 1 px ~ {tokens_per_px:.1f} tokens" if tokens_per_px > 1 else f"; 1 token = {scale} px"),
        "rows: queries, columns: keys (sequence order)"
        + (f"; cells estimated from {sampled} query rows each (density above is exact)" if sampled else ""),
    ]
    legend_w = 520
    content_w = max(strip + gap + M, legend_w)
    width = pad + content_w + pad
    title_lines = _wrap(f_title, title, width - 2 * pad)
    body_lines = [ln for text in lines2 for ln in _wrap(f_body, text, width - 2 * pad)]
    header_h = 20 * len(title_lines) + 17 * len(body_lines) + 8
    legend_h = 64
    height = pad + header_h + strip + gap + M + 12 + legend_h + pad

    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for ln in title_lines:
        draw.text((pad, y), ln, fill=_INK, font=f_title)
        y += 20
    for ln in body_lines:
        draw.text((pad, y), ln, fill=_MUTED, font=f_body)
        y += 17
    y += 8
    mx, my = pad + strip + gap, y + strip + gap  # matrix origin

    # the matrix
    rgb = colormap(dens)
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    canvas.paste(Image.fromarray(rgb, "RGB"), (mx, my))

    def px(token: int) -> int:  # token boundary -> pixel offset in the matrix
        return int(round(token * M / S))

    # token-type strips
    img0 = layout.image_slice.start
    segs = []
    if layout.text_len:
        t = layout.text_slice
        segs.append((t.start, t.stop, _TEXT_TOKENS))
    frames = layout.frames if len(layout.grid) == 3 else 1
    per_frame = N // frames
    for f in range(frames):
        segs.append((img0 + f * per_frame, img0 + (f + 1) * per_frame, _IMAGE_TOKENS[f % 2]))
    for a, b, col in segs:
        x0, x1 = px(a), max(px(a) + 1, px(b))
        draw.rectangle([mx + x0, y, mx + x1 - 1, y + strip - 1], fill=col)
        draw.rectangle([pad, my + x0, pad + strip - 1, my + x1 - 1], fill=col)

    # boundary lines on a transparent overlay
    overlay = Image.new("RGBA", (M, M), (0, 0, 0, 0))
    od = ImageDraw.Draw(overlay)

    def line(token: int, color) -> None:
        p = px(token)
        if 0 < p < M:
            od.line([(p, 0), (p, M - 1)], fill=color)
            od.line([(0, p), (M - 1, p)], fill=color)

    row_len = layout.grid[-1]
    if len(layout.grid) >= 2 and row_len * M / S >= 6:
        rows_total = N // row_len
        for r in range(1, rows_total):
            if r % (N // frames // row_len) != 0 or frames == 1:
                line(img0 + r * row_len, _ROW_LINE)
    if frames > 1 and per_frame * M / S >= 4:
        for f in range(1, frames):
            line(img0 + f * per_frame, _FRAME_LINE if frames <= 12 else _FRAME_LINE[:3] + (80,))
    if layout.text_len:
        line(layout.image_slice.start if layout.text_position == "first" else layout.image_slice.stop, _TEXT_LINE)
    base = canvas.crop((mx, my, mx + M, my + M)).convert("RGBA")
    canvas.paste(Image.alpha_composite(base, overlay).convert("RGB"), (mx, my))
    draw.rectangle([mx - 1, my - 1, mx + M, my + M], outline=(200, 200, 200))

    # legend: colour bar and swatches
    ly = my + M + 12
    bar_w = 160
    ramp = colormap(np.linspace(0, 1, bar_w))[None].repeat(10, axis=0)
    canvas.paste(Image.fromarray(ramp, "RGB"), (pad, ly))
    draw.rectangle([pad - 1, ly - 1, pad + bar_w, ly + 10], outline=(180, 180, 180))
    draw.text((pad, ly + 13), "0", fill=_MUTED, font=f_small)
    draw.text((pad + bar_w // 2 - 8, ly + 13), "0.5", fill=_MUTED, font=f_small)
    draw.text((pad + bar_w - 6, ly + 13), "1", fill=_MUTED, font=f_small)
    draw.text((pad, ly + 28), "share of pairs allowed per cell", fill=_MUTED, font=f_small)
    sx = pad + bar_w + 24
    items = []
    if layout.text_len:
        items.append((_TEXT_TOKENS, f"text tokens ({layout.text_len}, {layout.text_position})"))
    items.append((_IMAGE_TOKENS[0], "image/video tokens" + (f" ({frames} frames, shades alternate)" if frames > 1 else "")))
    if frames > 1 and per_frame * M / S >= 4:
        items.append((_FRAME_LINE[:3], "frame boundary"))
    for i, (col, label) in enumerate(items):
        yy = ly + i * 16
        draw.rectangle([sx, yy + 2, sx + 10, yy + 12], fill=col)
        draw.text((sx + 16, yy), label, fill=_INK, font=f_small)

    canvas.info.update({
        "matrix_box": (mx, my, mx + M, my + M),
        "cells": cells,
        "cell_edges": edges.tolist(),
        "density": total_density,
        "sampled_rows": sampled,
    })
    return canvas
