"""Pattern pictures: the cells show the mask's density exactly, memory stays bounded on real layouts."""

import tracemalloc

import numpy as np
import pytest

import diffusion_attn as da
from diffusion_attn import viz
from diffusion_attn.viz import colormap, density, density_map, render_pattern


def _pooled(mask: np.ndarray, cells: int) -> np.ndarray:
    """Reference: the dense mask averaged over the cells the viz uses."""
    e = (np.arange(cells + 1) * mask.shape[0]) // cells
    sums = np.add.reduceat(np.add.reduceat(mask.astype(np.float64), e[:-1], axis=0), e[:-1], axis=1)
    w = np.diff(e).astype(np.float64)
    return sums / np.outer(w, w)


def test_small_layout_pixels_are_the_mask():
    layout = da.TokenLayout((4, 6), 3, "first")
    mask = da.attention_mask("gna", layout, window=(3, 3)).numpy()
    img = render_pattern("gna", layout, window=(3, 3), max_side=270)
    x0, y0, x1, y1 = img.info["matrix_box"]
    S = layout.num_tokens
    assert img.info["cells"] == S and (x1 - x0) == (y1 - y0) == 270  # 10 px per token
    px = np.asarray(img.convert("RGB"))
    centers = px[y0 + 5 : y1 : 10, x0 + 5 : x1 : 10]  # the centre pixel of every token cell
    assert centers.shape[:2] == (S, S)
    dark, light = colormap(1.0), colormap(0.0)
    assert (centers[mask] == dark).all() and (centers[~mask] == light).all()
    assert dark.sum() < 200 and light.min() == 255  # allowed = dark, masked = white
    assert img.info["density"] == pytest.approx(mask.mean())


@pytest.mark.parametrize("method, layout, params", [
    ("radial", da.TokenLayout((3, 8, 12), 16, "last"), {}),
    ("radial", da.TokenLayout((5, 8, 12), 0), {"family": "hunyuanvideo"}),
    ("gna", da.TokenLayout((3, 8, 12), 16, "first"), {"window": (2, 4, 4), "stride": (1, 2, 2)}),
    ("gna", da.TokenLayout((9, 14), 7, "last"), {"window": (4, 5), "dilation": (2, 1)}),
    ("hidiffusion", da.TokenLayout((10, 14), 0), {"shift": 2}),
])
def test_density_map_equals_pooled_mask(method, layout, params):
    mask = da.attention_mask(method, layout, **params).numpy()
    for cells in (37, 50, min(layout.num_tokens, 400)):  # uneven cells, and one token per cell
        np.testing.assert_allclose(density_map(method, layout, max_side=cells, **params), _pooled(mask, cells), atol=1e-12)
    assert density(method, layout, **params) == pytest.approx(mask.mean(), abs=1e-12)


def test_rendered_cells_follow_density_map():
    layout = da.TokenLayout((3, 8, 12), 16, "last")
    img = render_pattern("radial", layout, max_side=100)
    x0, y0, x1, y1 = img.info["matrix_box"]
    cells = img.info["cells"]
    scale = (x1 - x0) // cells
    expected = colormap(density_map("radial", layout, max_side=100))
    px = np.asarray(img.convert("RGB"))[y0:y1, x0:x1]
    assert scale == 1 and cells == 100
    off = (px != expected).any(-1)
    # only the boundary lines differ: frames (96 tokens each) and the text block after them
    lines = [round(t * 100 / layout.num_tokens) for t in (96, 192, 288)]
    on_line = np.zeros((100, 100), dtype=bool)
    on_line[lines, :] = True
    on_line[:, lines] = True
    assert off.any() and not off[~on_line].any()


def test_wan_480p_layout_is_memory_bounded():
    layout = da.TokenLayout((9, 30, 52), 512, "last")  # 14,552 tokens
    S, N = layout.num_tokens, layout.num_image
    tracemalloc.start()
    try:
        img = render_pattern("radial", layout, max_side=768)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64e6  # an S x S bool mask alone is 212 MB
    x0, y0, x1, y1 = img.info["matrix_box"]
    assert x1 - x0 <= 768 and img.info["cells"] == 768 and img.info["sampled_rows"] == 0
    _, resolved, pattern = da.method_pattern("radial", layout)
    exact = (S * S - N * N + pattern.allowed_pairs()) / S**2
    assert img.info["density"] == pytest.approx(exact, abs=1e-12)
    dm = density_map("radial", layout, max_side=768)
    w = np.diff(np.asarray(img.info["cell_edges"])).astype(np.float64)
    assert (dm * np.outer(w, w)).sum() / S**2 == pytest.approx(exact, abs=1e-9)
    assert (dm[-1] == 1).all() and (dm[:, -1] == 1).all()  # text rows and columns (last) are dense


def test_huge_layouts_estimate_cells_but_density_is_exact(monkeypatch):
    layout = da.TokenLayout((4, 16, 24), 32, "first")
    monkeypatch.setattr(viz, "EXACT_PAIRS", 60_000)
    img = render_pattern("gna", layout, window=(2, 6, 8), max_side=64)
    assert img.info["sampled_rows"] > 0
    mask = da.attention_mask("gna", layout, window=(2, 6, 8)).numpy()
    assert img.info["density"] == pytest.approx(mask.mean(), abs=1e-12)
    estimate = density_map("gna", layout, window=(2, 6, 8), max_side=64)
    assert np.abs(estimate - _pooled(mask, 64)).mean() < 0.05


def test_errors():
    with pytest.raises(ValueError, match="did you mean 'radial'"):
        render_pattern("radail", da.TokenLayout((4, 4)))
    with pytest.raises(ValueError, match="'window' is required"):
        render_pattern("gna", da.TokenLayout((4, 4)))
    with pytest.raises(ValueError, match="2-D token grids"):
        render_pattern("hidiffusion", da.TokenLayout((2, 4, 4)))
    with pytest.raises(ValueError, match="radial does not support 'flux'"):
        render_pattern("radial", da.TokenLayout((2, 4, 4)), family="flux")
