#!/usr/bin/env python
"""Plot the benchmark results: measured speedup against the ideal 1 / density, and predicted vs measured.

    python benchmarks/bench_attention.py --json benchmarks/results/attention.json
    python benchmarks/bench_denoiser.py --json benchmarks/results/denoiser.json
    python benchmarks/plot.py                      # reads both (whichever exists), writes benchmarks/results/speedup.png
    python benchmarks/plot.py --attention a.json --denoiser d.json --out /tmp/speedup.png

Panels:

1. **Attention: measured vs ideal.** x = 1 / density (the ideal speedup of a kernel that is as fast per
   allowed (query, key) pair as dense SDPA is per pair), y = measured speedup over dense, log-log, with
   the y = x line (ideal) and y = 1 (dense parity). Filled markers: ``bench_attention.py`` rows (the
   attention op alone); hollow markers: the attention core of the self-attention layers inside one
   denoiser step of ``bench_denoiser.py``. One marker shape per method, one colour per backend.
2. **Predicted vs measured.** x = the predicted upper bound, y = measured, y = x line. Attention rows:
   the tile-level bound (``predicted``; older JSON without it: 1 / visited density for the gather kernel);
   denoiser rows (hollow): the end-to-end bound by Amdahl's law from the attention share of the dense step.
3. **Denoiser step** (when denoiser results are given): the measured end-to-end speedup of one step per
   case / variant, with the Amdahl bounds (ideal from 1 / density, predicted from the tile bound) marked.

matplotlib is not a dependency of the package; this script imports it lazily (``pip install matplotlib``).
Rows that lack a field a panel needs are left out of that panel; a missing or unreadable file is
reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

MARKERS = {"gna": "o", "radial": "s", "msw": "^", "hidiffusion": "D"}
COLORS = {"gather": "tab:blue", "strips": "tab:olive", "flex": "tab:orange", "windows": "tab:cyan", "reference": "tab:green",
          "dense": "tab:gray", "triton": "tab:red", "natten": "tab:purple", "xformers": "tab:brown"}


def _num(x) -> float | None:
    """A finite positive float, else None."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def load(path: Path | None, what: str) -> list[dict]:
    """The ``rows`` of a benchmark JSON (a list of rows is accepted too); [] with a message when unusable."""
    if path is None:
        return []
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        print(f"plot.py: no {what} results at {path}; skipped", file=sys.stderr)
        return []
    except (OSError, json.JSONDecodeError) as e:
        print(f"plot.py: cannot read {what} results {path}: {e}; skipped", file=sys.stderr)
        return []
    rows = data.get("rows", []) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def attention_points(rows: list[dict]) -> list[dict]:
    """Plot points of ``bench_attention.py`` rows: name, method, backend, ideal, measured, predicted."""
    out = []
    for r in rows:
        density, speedup = _num(r.get("density")), _num(r.get("speedup"))
        if speedup is None and _num(r.get("dense_s")) and _num(r.get("sparse_s")):
            speedup = r["dense_s"] / r["sparse_s"]
        if density is None or speedup is None:
            continue
        backend = r.get("backend") or "gather"
        predicted = _num(r.get("predicted"))
        if predicted is None and backend == "gather" and _num(r.get("visited_density")):
            predicted = 1.0 / r["visited_density"]  # the gather kernel's own bound, as bench_attention computes it
        out.append(dict(name=str(r.get("name", "?")), method=str(r.get("method") or "?"), backend=backend,
                        ideal=1.0 / density, measured=speedup, predicted=predicted, tokens=r.get("tokens")))
    return out


def denoiser_points(rows: list[dict]) -> list[dict]:
    """Plot points of ``bench_denoiser.py`` rows (one per case / variant)."""
    out = []
    for r in rows:
        speedup = _num(r.get("speedup"))
        if speedup is None:
            continue
        density = _num(r.get("density"))
        out.append(dict(
            name=str(r.get("name") or f"{r.get('case')}/{r.get('variant')}"), method=str(r.get("method") or "?"),
            backend=r.get("backend") or "gather", measured=speedup,
            # self-attention inside the step vs 1 / density: only where the density is that of every timed
            # attention layer (HiDiffusion's is the top level's alone, and RAU-Net changes the rest)
            ideal=None if density is None or r.get("density_note") else 1.0 / density,
            attn=_num(r.get("attn_speedup")), predicted_e2e=_num(r.get("predicted_e2e")),
            ideal_e2e=_num(r.get("ideal_e2e")), share=r.get("attn_share"),
        ))
    return out


def _groups(points):
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["method"], p["backend"]), []).append(p)
    return groups


def _diagonal(ax, lo, hi, label="ideal (y = x)"):
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label=label, zorder=1)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":", zorder=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)


def _bounds(values, pad=1.25):
    values = [v for v in values if v]
    if not values:
        return 0.5, 10.0
    lo, hi = min(min(values), 1.0) / pad, max(values) * pad
    return lo, hi


def _scatter(ax, points, x: str, y: str, what: str, hollow: bool = False) -> None:
    """One marker series per (method, backend): filled for attention-op rows, hollow for denoiser rows."""
    for (method, backend), pts in sorted(_groups(points).items()):
        color = COLORS.get(backend, "black")
        style = dict(facecolors="none", edgecolors=color, s=60, linewidths=1.4) if hollow else dict(color=color, s=46)
        ax.scatter([p[x] for p in pts], [p[y] for p in pts], marker=MARKERS.get(method, "X"),
                   label=f"{method} ({backend}), {what}", zorder=3, **style)
        for p in pts:
            _label(ax, p, p[x], p[y])


def _label(ax, p, x, y):
    ax.annotate(p["name"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color="dimgray")


def plot(att: list[dict], den: list[dict], out: Path, title: str = "") -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator
    except ImportError:
        sys.exit("plot.py needs matplotlib, which is not a dependency of diffusion_attn: pip install matplotlib")

    panels = 3 if den else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 5.6), constrained_layout=True)
    fmt = FuncFormatter(lambda v, _: f"{v:g}x")

    def logaxes(ax):
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            axis.set_major_formatter(fmt)
            axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.grid(True, which="major", alpha=0.3)

    def _panel(ax, series, diagonal_label, xlabel, title, empty_text):
        """One log-log scatter panel: ``series`` = [(points, x key, y key, label, hollow)], with the y = x
        diagonal over the range of every point."""
        values = [p[key] for pts, x, y, _, _ in series for p in pts for key in (x, y)]
        lo, hi = _bounds(values)
        _diagonal(ax, lo, hi, diagonal_label)
        for pts, x, y, label, hollow in series:
            _scatter(ax, pts, x, y, label, hollow=hollow)
        logaxes(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("measured speedup over dense")
        ax.set_title(title)
        if values:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, empty_text, transform=ax.transAxes, ha="center")

    # -- 1: measured vs ideal 1 / density --------------------------------------------------------------
    den_attn = [p for p in den if p["ideal"] and p["attn"]]
    _panel(axes[0], [(att, "ideal", "measured", "attention op", False),
                     (den_attn, "ideal", "attn", "attention core in a denoiser step", True)],
           "ideal (y = x)", "ideal speedup 1 / density", "Attention: measured vs ideal", "no attention rows")

    # -- 2: predicted vs measured ------------------------------------------------------------------------
    att_pred = [p for p in att if p["predicted"]]
    den_pred = [p for p in den if p["predicted_e2e"]]
    _panel(axes[1], [(att_pred, "predicted", "measured", "attention op (tile bound)", False),
                     (den_pred, "predicted_e2e", "measured", "denoiser step (Amdahl bound)", True)],
           "measured = predicted", "predicted upper bound", "Predicted vs measured", "no rows with a prediction")

    # -- 3: denoiser step, end to end ----------------------------------------------------------------------
    if den:
        ax = axes[2]
        ys = list(range(len(den)))[::-1]
        colors = [COLORS.get(p["backend"], "black") for p in den]
        ax.barh(ys, [p["measured"] for p in den], color=colors, alpha=0.75, height=0.6)
        for backend in dict.fromkeys(p["backend"] for p in den):  # legend entries: one bar colour per backend
            ax.barh([ys[0]], [0], color=COLORS.get(backend, "black"), alpha=0.75, label=f"measured step speedup ({backend})")
        ideal = [(y, p["ideal_e2e"]) for y, p in zip(ys, den) if p["ideal_e2e"]]
        pred = [(y, p["predicted_e2e"]) for y, p in zip(ys, den) if p["predicted_e2e"]]
        attn = [(y, p["attn"]) for y, p in zip(ys, den) if p["attn"]]
        if ideal:
            ax.scatter([v for _, v in ideal], [y for y, _ in ideal], marker="|", s=220, color="black",
                       label="ideal (Amdahl, 1 / density)", zorder=3)
        if pred:
            ax.scatter([v for _, v in pred], [y for y, _ in pred], marker="|", s=220, color="tab:red",
                       label="predicted (Amdahl, tile bound)", zorder=3)
        if attn:
            ax.scatter([v for _, v in attn], [y for y, _ in attn], marker="o", s=22, facecolors="none",
                       edgecolors="dimgray", label="attention-core speedup in the step", zorder=3)
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{p['name']}" + (f"  ({p['share']:.0%} attn core)" if isinstance(p["share"], (int, float)) else "")
                            for p in den], fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel("speedup of one denoiser step over dense")
        ax.set_title("Denoiser step, end to end")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)

    if title:
        fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def _default(path: Path) -> Path | None:
    return path if path.exists() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", default=None,
                   help="bench_attention.py --json output (default benchmarks/results/attention.json if present)")
    p.add_argument("--denoiser", default=None,
                   help="bench_denoiser.py --json output (default benchmarks/results/denoiser.json if present)")
    p.add_argument("--out", default=str(RESULTS / "speedup.png"), help="PNG to write (default benchmarks/results/speedup.png)")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(argv)
    att_path = Path(args.attention) if args.attention else _default(RESULTS / "attention.json")
    den_path = Path(args.denoiser) if args.denoiser else _default(RESULTS / "denoiser.json")
    att = attention_points(load(att_path, "attention"))
    den = denoiser_points(load(den_path, "denoiser"))
    if not att and not den:
        print("plot.py: nothing to plot: give --attention and/or --denoiser JSON from bench_attention.py / "
              "bench_denoiser.py --json", file=sys.stderr)
        return 1
    out = plot(att, den, Path(args.out), args.title)
    print(f"wrote {out} ({len(att)} attention rows, {len(den)} denoiser rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
