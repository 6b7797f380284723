"""Smoke test of ``benchmarks/quality.py`` (the shapes-world quality harness) on the random-weight models.

One run of the harness's ``main`` on ``tiny-flux-random`` and ``tiny-wan-random`` (1 prompt, 2 steps), then
checks on its markdown and JSON: the expected rows and columns, and the rows that must reproduce dense
exactly (GNA with a window covering the whole grid; radial whose default 12-step warm-up covers the 2 steps)
against a row that must not (GNA with a quarter-grid window).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def _load_harness():
    spec = importlib.util.spec_from_file_location("quality_harness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(exit status, markdown, JSON) of one small harness run."""
    harness = _load_harness()
    out = tmp_path_factory.mktemp("quality")
    md, js = out / "quality.md", out / "quality.json"
    status = harness.main(["--models", "tiny-flux-random,tiny-wan-random", "--methods",
                           "gna,radial/default,radial/no-warmup", "--prompts", "1", "--steps", "2", "--threads", "1",
                           "--highres-scales", "none", "--out-md", str(md), "--out-json", str(js)])
    return status, md.read_text(), json.loads(js.read_text())


def _row(result: dict, model: str, method: str, variant: str) -> dict:
    found = [r for r in result["rows"] if (r["model"], r["method"], r["variant"]) == (model, method, variant)]
    assert len(found) == 1, f"expected one {model} {method}/{variant} row, got {len(found)}"
    return found[0]


def test_quality_harness_smoke(report):
    status, md, result = report
    assert status == 0
    assert [r for r in result["rows"] if "error" in r] == []

    # the command line and the machine at the top, the main table's columns
    assert md.startswith("# Shapes-world quality harness")
    assert "--models tiny-flux-random,tiny-wan-random" in md.split("\n## ")[0]
    assert f"torch {result['machine']['torch']}" in md
    header = next(line for line in md.splitlines() if line.startswith("| model | method | variant"))
    for column in ("PSNR dB", "SSIM", "object % (dense)", "position % (dense)", "motion % (dense)",
                   "duplication % (dense)", "time x", "sparse steps", "density"):
        assert f"| {column} |" in header

    # every selected (model, method, variant), and nothing else: radial is video-only
    expected = {("tiny-flux-random", "gna", v) for v in ("default", "full-window", "blocked", "quarter")}
    expected |= {("tiny-wan-random", "gna", v) for v in ("default", "full-window", "blocked", "quarter")}
    expected |= {("tiny-wan-random", "radial", v) for v in ("default", "no-warmup")}
    assert {(r["model"], r["method"], r["variant"]) for r in result["rows"]} == expected
    for model, method, variant in expected:
        assert f"| {model} | {method} | {variant} |" in md

    # the token grids the harness probed, and the GNA windows derived from them (half / whole / quarter grid)
    assert tuple(result["models"]["tiny-flux-random"]["grid"]) == (8, 12)
    assert tuple(result["models"]["tiny-wan-random"]["grid"]) == (3, 8, 12)
    assert _row(result, "tiny-flux-random", "gna", "default")["params"] == {"window": [4, 6]}
    assert _row(result, "tiny-wan-random", "gna", "quarter")["params"] == {"window": [1, 2, 3]}

    for model in ("tiny-flux-random", "tiny-wan-random"):
        # a window covering the whole grid is dense attention: bit-identical output
        full = _row(result, model, "gna", "full-window")
        assert full["psnr"] == "inf" and full["ssim"] == 1.0 and full["identical"] == full["n"] == 1
        assert full["density"] == 1.0
        # a quarter-grid window changes the output (the method really ran)
        quarter = _row(result, model, "gna", "quarter")
        assert math.isfinite(quarter["psnr"]) and quarter["ssim"] < 1.0 and quarter["identical"] == 0
        assert quarter["density"] < 0.1 and quarter["sparse_steps"] == 2
        assert quarter["time_ratio"] > 0
        assert set(quarter["dense_scores"]) >= {"object_accuracy", "duplication_rate", "n"}

    # radial's default warm-up (12 dense steps) covers a 2-step run: reported as such, identical to dense
    radial = _row(result, "tiny-wan-random", "radial", "default")
    assert radial["sparse_steps"] == 0 and radial["config"]["dense_steps"] == 12 and radial["psnr"] == "inf"
    assert "radial/default: its warm-up (dense_steps=12) covers all 2 steps" in md
    assert math.isfinite(_row(result, "tiny-wan-random", "radial", "no-warmup")["psnr"])

    # video rows score motion, image rows position
    assert _row(result, "tiny-wan-random", "gna", "default")["scores"]["motion_accuracy"] is not None
    assert _row(result, "tiny-flux-random", "gna", "default")["scores"]["position_accuracy"] is not None

    # the dense targets: one "all" row per model, no high-resolution runs (neither model is a UNet)
    assert {(t["model"], t["objects"]) for t in result["targets"] if t["objects"] == "all"} == {
        ("tiny-flux-random", "all"), ("tiny-wan-random", "all")}
    assert result["highres"] == []
