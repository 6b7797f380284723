#!/usr/bin/env python
"""Quality harness of the shapes world: every method against stock (dense) attention on the trained tiny models.

    python benchmarks/quality.py                          # tiny-flux, tiny-sd15, tiny-wan; 50 held-out prompts
    python benchmarks/quality.py --quick                  # smoke run: 2 prompts, 2 steps (random models if untrained)
    python benchmarks/quality.py --targets                # dense only, 100 prompts: the targets table
    python benchmarks/quality.py --models tiny-wan --methods radial,gna/quarter --prompts 20 --threads 2
    python benchmarks/quality.py --models tiny-flux-random,tiny-wan-random --prompts 2   # random weights
    DIFFUSION_ATTN_WEIGHTS=/path/to/weights python benchmarks/quality.py ...             # weights elsewhere

What is measured (CPU, fp32, batch 1, everything seeded; rerunning the same command gives the same images):

* **Prompts.** Held-out captions of the shapes world: prompt ``i`` is the caption of
  ``generate_image(HELD_OUT_SEED + i, 64, 64)`` (image models) or ``generate_video(HELD_OUT_SEED + i, 64, 64,
  num_frames=5)`` (video models), i.e. the training resolution and frame count (training uses the seeds below
  ``HELD_OUT_SEED``). Its object count (1-4) is kept for the per-count breakdown.
* **Dense.** Per model, each prompt is generated once with stock attention: ``pipe(prompt=..., generator=
  torch.Generator().manual_seed(i), **default_call_kwargs(model))`` (``--steps`` overrides the step count); the
  global torch RNG is also seeded with ``i`` before every call (HiDiffusion's default MSW-MSA shifts draw from
  it, as the official code does).
* **Methods.** Every registered method on every selected model whose family it supports, at its defaults
  (methods with required parameters take them from :data:`REQUIRED_DEFAULTS`, e.g. GNA's window = half the
  token grid) and at the sparsity variants of :data:`VARIANTS`; a method added to the registry later is picked
  up by itself when it needs no required parameter. Applied with ``diffusion_attn.apply`` for the whole run of
  prompts, same prompts and seeds as dense. Per (model, method, variant):

  - **PSNR / SSIM** of each output against the dense output of the same prompt and seed
    (``diffusion_attn.data.image_metrics``: scikit-image on uint8-quantised RGB; videos frame by frame).
    ``identical`` counts outputs equal to dense after quantisation (PSNR = inf); the PSNR column is the mean over
    the other prompts, ``inf`` only when every output is identical. SSIM is the plain mean.
  - **Scorer** (``score_image`` / ``score_video``, no learned weights): object accuracy, position accuracy
    (images), motion accuracy (videos) and duplication rate in %, of the method and, in parentheses, of dense.
  - **density**: allowed (query, key) pairs / S^2 of the method's pattern over the image / video tokens of the
    main token grid (text excluded; for a UNet the top level, where HiDiffusion's MSW-MSA acts),
    ``diffusion_attn.attention_mask``. **sparse steps**: steps that run the method (``dense_steps`` warm-up
    excluded). A method whose warm-up covers the whole run is identical to dense by construction; the notes
    under the table say so where it happens.
  - **time x**: median wall time of one pipeline call with the method / the same for dense, both measured in
    this process (after one untimed dense call). The machine may be shared: read ratios, not absolute times.

* **HiDiffusion at high resolution** (the paper's claim: no duplication at 2x-4x the training resolution, and
  40-60 % faster): every model HiDiffusion supports, at ``--highres-scales`` times its default height and
  width, dense and HiDiffusion on ``--highres-prompts`` prompts: duplication, object and position accuracy,
  PSNR / SSIM against dense at that size, time ratio.
* **Radial / GNA at higher sparsity** are the ``VARIANTS`` rows of the main table (GNA quarter-grid and blocked
  windows, radial without warm-up and without the first-frame sink).
* **Targets**: dense's own scorer numbers per model, overall and by the number of objects in the prompt (1-4).
  ``--targets`` measures only this, on 100 prompts by default.

Outputs: a markdown report (printed, and written to ``--out-md``) with the command line, machine and versions
at the top, and the raw numbers with every per-prompt value as JSON (``--out-json``; an infinite PSNR is written
as the string ``"inf"``). Progress goes to stderr. The exit status is 1 when a method failed on a model (the
others still run and are reported), 2 for a usage error such as missing trained weights.

Trained weights are read from ``diffusion_attn/models/weights/<name>`` or ``$DIFFUSION_ATTN_WEIGHTS/<name>``
(``diffusion-attn train <name>`` makes them); the random-weight models (``tiny-flux-random``, ``tiny-wan-random``,
``tiny-sd15-random``, ...) are accepted too, with their own default call kwargs (their images are noise: such a
run checks the harness, not the methods).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for _path in (ROOT, HERE):  # the package, and bench_attention.py next to this script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import diffusion_attn as da  # noqa: E402
from diffusion_attn.adapters import adapter_family, family_of, grid_rank  # noqa: E402
from diffusion_attn.data import (aggregate, generate_image, generate_video, image_metrics, score_image,  # noqa: E402
                                 score_video)
from diffusion_attn.models import EMBEDDED_MODELS, build_pipeline, default_call_kwargs, model_family  # noqa: E402
from diffusion_attn.models.world import WORLD_MODELS, available, weights_dir  # noqa: E402
from diffusion_attn.training import HELD_OUT_SEED, TrainConfig  # noqa: E402

#: the trained shapes-world models, measured by default
TRAINED_MODELS = tuple(WORLD_MODELS)
#: the prompts' resolution and frame count: those tiny-wan is trained on (TrainConfig's defaults)
_WAN_TRAINING = TrainConfig("tiny-wan")
PROMPT_SIZE, PROMPT_FRAMES = _WAN_TRAINING.resolution, _WAN_TRAINING.num_frames
#: methods measured at higher resolutions than the model's default (the paper's high-resolution claim)
HIGHRES_METHODS = ("hidiffusion",)
DEFAULT_PROMPTS, DEFAULT_TARGET_PROMPTS = 50, 100


def _half(grid: tuple[int, ...]) -> tuple[int, ...]:
    """Half of every grid axis, rounded up (at least 1)."""
    return tuple(max(1, -(-g // 2)) for g in grid)


def _quarter(grid: tuple[int, ...]) -> tuple[int, ...]:
    """A quarter of every grid axis, rounded up (at least 1)."""
    return tuple(max(1, -(-g // 4)) for g in grid)


#: Values of *required* parameters, from the denoiser's token grid (frames x height x width, or height x width):
#: what "the defaults" of such a method mean here. A registered method with a required parameter missing from
#: this table is skipped (and listed as skipped in the report).
#: At 64 x 64 px: tiny-flux 8 x 8 tokens -> window (4, 4); tiny-wan 3 x 8 x 8 -> (2, 4, 4).
REQUIRED_DEFAULTS: dict[str, Callable[[tuple[int, ...]], dict]] = {
    "gna": lambda grid: {"window": _half(grid)},
    # CLEAR's radius: r = 2 on the 8 x 8 tokens of the trained tiny-flux (an interior query sees 9 of 64
    # image tokens; the official 8 / 16 / 32 are for 64 x 64 tokens, where r = 8 covers 3 %)
    "clear": lambda grid: {"radius": 2},
}

#: Extra rows per method beyond "default": variant name -> parameters from the token grid (merged over the
#: required defaults). ``gna/full-window`` covers the whole grid, i.e. it is dense attention through the
#: method's machinery: its PSNR must be inf (a check of the harness and of the method's bookkeeping).
#: Radial on these grids (64 tokens per frame, 128-token blocks) keeps every frame pair within its 128-wide
#: band whatever ``decay_factor`` is, so its sparsity knobs here are the warm-up and the first-frame sink.
VARIANTS: dict[str, dict[str, Callable[[tuple[int, ...]], dict]]] = {
    "gna": {
        "full-window": lambda grid: {"window": tuple(grid)},
        "blocked": lambda grid: {"window": _half(grid), "stride": _half(grid)},
        "quarter": lambda grid: {"window": _quarter(grid)},
    },
    "radial": {
        "no-warmup": lambda grid: {"dense_steps": 0, "dense_layers": 0},
        "no-warmup-no-sink": lambda grid: {"dense_steps": 0, "dense_layers": 0, "sink": False},
    },
    # FreeSwim's default native size (480 x 832) covers the whole 64 x 64 tiny-wan: these make the trained
    # 64 x 64 model "native 32 x 32" (the window is half of a 4 x 4-token grid: 5 x 5 tokens of the 8 x 8)
    "freeswim": {
        "native-32": lambda grid: {"native_height": 32, "native_width": 32},
        "native-32-cache": lambda grid: {"native_height": 32, "native_width": 32, "mode": "cache", "cache_steps": 2},
    },
    "agent": {
        "tome-only": lambda grid: {"agents": False},
    },
}


def log(message: str) -> None:
    """Progress, on stderr."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# models, prompts, plan
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One held-out prompt: its index (also the generation seed), the caption and its number of objects."""

    index: int
    caption: str
    objects: int


@dataclass
class Model:
    """A loaded pipeline with what the harness needs to know about it."""

    name: str
    pipe: Any
    family: str  # model_family: flux, wan, unet-sd15, ...
    kwargs: dict  # call kwargs (default_call_kwargs + --steps)
    grid: tuple[int, ...]  # the denoiser's token grid at these kwargs
    video: bool

    @property
    def steps(self) -> int:
        return int(self.kwargs["num_inference_steps"])


@dataclass(frozen=True)
class Row:
    """One (method, variant) to measure on a model: the parameters given to ``diffusion_attn.apply``."""

    method: str
    variant: str
    params: dict = field(default_factory=dict)


def held_out_prompts(n: int, video: bool) -> list[Prompt]:
    """The first ``n`` held-out prompts of the shapes world (image or video captions, see the module doc)."""
    out = []
    for i in range(n):
        if video:
            sample = generate_video(HELD_OUT_SEED + i, PROMPT_SIZE, PROMPT_SIZE, num_frames=PROMPT_FRAMES)
        else:
            sample = generate_image(HELD_OUT_SEED + i, PROMPT_SIZE, PROMPT_SIZE)
        out.append(Prompt(i, sample.caption, len(sample.objects)))
    return out


class _Probed(Exception):
    """Raised by the token-grid probe to stop the pipeline at its first denoiser call."""


def token_grid(pipe, kwargs: dict) -> tuple[int, ...]:
    """The token grid of the pipeline's denoiser for these call kwargs, read by the package's own family
    adapter (``read_call``) at the first denoiser call of a one-step run, which is cut short there."""
    model = da.denoisers(pipe)[0]
    read_call = family_of(model).read_call
    found: dict = {}

    def hook(module, args, call_kwargs):
        found["grid"] = tuple(int(g) for g in read_call(module, args, call_kwargs)["grid"])
        raise _Probed

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt="", **{**kwargs, "num_inference_steps": 1})
    except _Probed:
        pass
    finally:
        handle.remove()
    return found["grid"]


def load_model(name: str, steps: int | None) -> Model:
    """Build (or load the trained weights of) embedded model ``name`` with its default call kwargs."""
    pipe = build_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    kwargs = default_call_kwargs(name, output_type="pt")
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    family = model_family(name)
    return Model(name, pipe, family, kwargs, token_grid(pipe, kwargs), grid_rank(family) == 3)


def _supports(spec, family: str) -> bool:
    return adapter_family(family) in spec.families or family in spec.families


def plan(model: Model, selected: set[str] | None) -> tuple[list[Row], list[dict]]:
    """The rows to measure on ``model`` (every registered method its family supports, default + variants) and
    the methods skipped with the reason. ``selected``: names ``method`` or ``method/variant`` (None = all)."""
    rows, skipped = [], []
    for name, spec in sorted(da.methods().items()):
        if not _supports(spec, model.family):
            continue
        required = [p.name for p in spec.params if p.required]
        base = REQUIRED_DEFAULTS[name](model.grid) if name in REQUIRED_DEFAULTS else {}
        missing = [p for p in required if p not in base]
        candidates = [Row(name, "default", base)] + [Row(name, v, {**base, **make(model.grid)})
                                                     for v, make in VARIANTS.get(name, {}).items()]
        candidates = [r for r in candidates
                      if selected is None or r.method in selected or f"{r.method}/{r.variant}" in selected]
        if not candidates:
            continue
        if missing:
            skipped.append(dict(model=model.name, method=name,
                                reason=f"required parameter(s) {', '.join(missing)} not in REQUIRED_DEFAULTS"))
            continue
        rows.extend(candidates)
    return rows, skipped


# ---------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """The outputs of one pass over the prompts: one image ``(3, H, W)`` or video ``(T, 3, H, W)`` in [0, 1]
    per prompt, the wall time of each pipeline call, the scorer's verdicts, and the resolved method config."""

    outputs: list[torch.Tensor]
    times: list[float]
    scores: list
    config: dict | None = None


def generate(model: Model, prompts: list[Prompt], kwargs: dict | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """One pipeline call per prompt, seeded by the prompt index (generator and global RNG); outputs and times."""
    kwargs = model.kwargs if kwargs is None else kwargs
    outputs, times = [], []
    for p in prompts:
        torch.manual_seed(p.index)
        start = time.perf_counter()
        out = model.pipe(prompt=p.caption, generator=torch.Generator().manual_seed(p.index), **kwargs)[0]
        times.append(time.perf_counter() - start)
        outputs.append(out[0].detach().float().cpu())
    return outputs, times


def score(outputs: list[torch.Tensor], prompts: list[Prompt], video: bool) -> list:
    """The scorer's verdict on each output against its prompt."""
    scorer = score_video if video else score_image
    return [scorer(out, p.caption) for out, p in zip(outputs, prompts)]


def measure_dense(model: Model, prompts: list[Prompt], kwargs: dict | None = None) -> Run:
    """Stock attention on every prompt (after one untimed call, so that one-time setup is not timed)."""
    kwargs = model.kwargs if kwargs is None else kwargs
    generate(model, prompts[:1], kwargs)
    outputs, times = generate(model, prompts, kwargs)
    return Run(outputs, times, score(outputs, prompts, model.video))


def measure_method(model: Model, prompts: list[Prompt], row: Row, kwargs: dict | None = None) -> Run:
    """``row``'s method applied for the whole pass over the prompts (removed afterwards, also on errors)."""
    with da.applied(model.pipe, row.method, **row.params) as handle:
        outputs, times = generate(model, prompts, kwargs)
        config = handle.config.to_dict()
    return Run(outputs, times, score(outputs, prompts, model.video), config)


def compare(run: Run, dense: Run) -> list[dict]:
    """PSNR / SSIM of each output of ``run`` against the dense output of the same prompt."""
    return [image_metrics(a, b) for a, b in zip(run.outputs, dense.outputs)]


def pattern_density(method: str, params: dict, family: str, grid: tuple[int, ...]) -> float | None:
    """Allowed pairs / S^2 of the method's mask over the token grid (no text); None without a pattern."""
    spec = da.get_method(method)
    fam = family if family in spec.family_defaults else adapter_family(family)
    try:
        mask = da.attention_mask(method, da.TokenLayout(grid, 0), family=fam, **params)
    except ValueError:
        return None
    return float(mask.float().mean())


def sparse_steps(config: dict | None, steps: int) -> int:
    """Steps of a run that use the method: those after its ``dense_steps`` warm-up (if it has one)."""
    warmup = (config or {}).get("dense_steps") or 0
    return max(0, steps - int(warmup))


def summarise(model: Model, prompts: list[Prompt], row: Row, run: Run, dense: Run, kwargs: dict) -> dict:
    """The table row (and its JSON record) of one method run against the dense run of the same prompts."""
    metrics = compare(run, dense)
    finite = [m["psnr"] for m in metrics if math.isfinite(m["psnr"])]
    steps = int(kwargs["num_inference_steps"])
    return dict(
        model=model.name, method=row.method, variant=row.variant, params=row.params, config=run.config,
        height=kwargs.get("height"), width=kwargs.get("width"), steps=steps,
        sparse_steps=sparse_steps(run.config, steps),
        density=pattern_density(row.method, row.params, model.family, model.grid),
        n=len(prompts), identical=len(metrics) - len(finite),
        psnr=(statistics.fmean(finite) if finite else math.inf),
        ssim=statistics.fmean(m["ssim"] for m in metrics),
        scores=aggregate(run.scores), dense_scores=aggregate(dense.scores),
        time_ratio=statistics.median(run.times) / statistics.median(dense.times),
        median_s=statistics.median(run.times), dense_median_s=statistics.median(dense.times),
        per_prompt=[dict(index=p.index, psnr=m["psnr"], ssim=m["ssim"], time_s=t, object_correct=s.object_correct,
                         position_correct=s.position_correct, motion_correct=s.motion_correct,
                         duplicated=s.duplicated)
                    for p, m, t, s in zip(prompts, metrics, run.times, run.scores)],
    )


def model_record(model: Model, prompts: list[Prompt], dense: Run) -> dict:
    """The JSON record of a model: settings, token grid, prompts and its dense run (scores, per-prompt verdicts)."""
    return dict(
        family=model.family, grid=model.grid, n=len(prompts), steps=model.steps, height=model.kwargs.get("height"),
        width=model.kwargs.get("width"), num_frames=model.kwargs.get("num_frames"),
        weights=str(weights_dir(model.name)) if EMBEDDED_MODELS[model.name].trained else None,
        call_kwargs=dict(model.kwargs), prompts=[dataclasses.asdict(p) for p in prompts],
        dense=dict(scores=aggregate(dense.scores), median_s=statistics.median(dense.times), times=dense.times,
                   per_prompt=[dict(index=p.index, object_correct=s.object_correct, position_correct=s.position_correct,
                                    motion_correct=s.motion_correct, duplicated=s.duplicated)
                               for p, s in zip(prompts, dense.scores)]))


def failure(model: Model, row: Row, kwargs: dict, err: BaseException) -> dict:
    """The record of a method that could not be applied or run."""
    return dict(model=model.name, method=row.method, variant=row.variant, params=row.params,
                height=kwargs.get("height"), width=kwargs.get("width"), error=f"{type(err).__name__}: {err}")


def measure_rows(model: Model, prompts: list[Prompt], rows: list[Row], dense: Run) -> list[dict]:
    """Every planned (method, variant) on ``model`` at its default call kwargs against ``dense``."""
    out = []
    for row in rows:
        start = time.perf_counter()
        try:
            run = measure_method(model, prompts, row)
        except Exception as err:  # noqa: BLE001 - reported in the table, the other rows still run
            log(f"[{model.name}] {row.method}/{row.variant}: FAILED {type(err).__name__}: {err}")
            out.append(failure(model, row, model.kwargs, err))
            continue
        result = summarise(model, prompts, row, run, dense, model.kwargs)
        log(f"[{model.name}] {row.method}/{row.variant}: {len(prompts)} prompts in {time.perf_counter() - start:.1f}s, "
            f"PSNR {_fmt_db(result['psnr'])}, time {result['time_ratio']:.2f}x")
        out.append(result)
    return out


def measure_targets(model: Model, prompts: list[Prompt], dense: Run) -> list[dict]:
    """Dense's scorer numbers on ``model``: over all prompts and by the number of objects in the prompt."""
    groups = [("all", list(range(len(prompts))))]
    groups += [(str(k), [i for i, p in enumerate(prompts) if p.objects == k]) for k in range(1, 5)]
    return [dict(model=model.name, objects=label, steps=model.steps, **aggregate([dense.scores[i] for i in idx]))
            for label, idx in groups if idx]


def measure_highres(model: Model, prompts: list[Prompt], scales: list[int], selected: set[str] | None) -> list[dict]:
    """HIGHRES_METHODS (at their defaults) vs dense at ``scales`` x the model's default height and width."""
    methods = [m for m in HIGHRES_METHODS if _supports(da.get_method(m), model.family)
               and (selected is None or m in selected or f"{m}/default" in selected)]
    out = []
    for scale in scales if methods else []:
        kwargs = {**model.kwargs, "height": model.kwargs["height"] * scale, "width": model.kwargs["width"] * scale}
        runnable = []
        for method in methods:  # apply checks everything it can before a call: skip dense if nothing applies
            try:
                da.apply(model.pipe, method).remove()
                runnable.append(method)
            except Exception as err:  # noqa: BLE001 - reported
                log(f"[{model.name}] {method} at {scale}x: FAILED {type(err).__name__}: {err}")
                out.append(dict(failure(model, Row(method, "default"), kwargs, err), scale=scale))
        if not runnable:
            continue
        start = time.perf_counter()
        dense = measure_dense(model, prompts, kwargs)
        log(f"[{model.name}] dense at {kwargs['height']}x{kwargs['width']}: {time.perf_counter() - start:.1f} s")
        for method in runnable:
            row = Row(method, "default")
            try:
                run = measure_method(model, prompts, row, kwargs)
            except Exception as err:  # noqa: BLE001 - reported
                log(f"[{model.name}] {method} at {scale}x: FAILED {type(err).__name__}: {err}")
                out.append(dict(failure(model, row, kwargs, err), scale=scale))
                continue
            result = dict(summarise(model, prompts, row, run, dense, kwargs), scale=scale)
            result["density"] = None  # the grid differs from the default-size one; not shown for this table
            log(f"[{model.name}] {method} at {scale}x: time {result['time_ratio']:.2f}x")
            out.append(result)
    return out


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def _fmt_db(x) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.1f}")


def _fmt_pct(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _pair(r: dict, key: str) -> str:
    """``method (dense)`` percentages of one scorer criterion."""
    a, b = r["scores"][key], r["dense_scores"][key]
    return "-" if a is None and b is None else f"{_fmt_pct(a)} ({_fmt_pct(b)})"


def _params(params: dict) -> str:
    if not params:
        return "defaults"
    return ", ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in params.items())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def methods_table(rows: list[dict]) -> list[str]:
    """The main table: one line per (model, method, variant)."""
    header = ["model", "method", "variant", "params", "density", "sparse steps", "PSNR dB", "SSIM", "identical",
              "object % (dense)", "position % (dense)", "motion % (dense)", "duplication % (dense)", "time x"]
    lines = []
    for r in rows:
        if "error" in r:
            continue
        density = "-" if r["density"] is None else f"{100 * r['density']:.0f}%"
        lines.append([r["model"], r["method"], r["variant"], _params(r["params"]), density,
                      f"{r['sparse_steps']}/{r['steps']}", _fmt_db(r["psnr"]), f"{r['ssim']:.3f}",
                      f"{r['identical']}/{r['n']}", _pair(r, "object_accuracy"), _pair(r, "position_accuracy"),
                      _pair(r, "motion_accuracy"), _pair(r, "duplication_rate"), f"{r['time_ratio']:.2f}"])
    return _table(header, lines)


def highres_table(rows: list[dict]) -> list[str]:
    """HiDiffusion (and any other HIGHRES_METHODS) vs dense at 2x / 4x the default resolution."""
    header = ["model", "method", "size", "scale", "duplication % (dense)", "object % (dense)", "position % (dense)",
              "PSNR dB", "SSIM", "time x", "n"]
    lines = [[r["model"], r["method"], f"{r['height']}x{r['width']}", f"{r['scale']}x", _pair(r, "duplication_rate"),
              _pair(r, "object_accuracy"), _pair(r, "position_accuracy"), _fmt_db(r["psnr"]), f"{r['ssim']:.3f}",
              f"{r['time_ratio']:.2f}", str(r["n"])] for r in rows if "error" not in r]
    return _table(header, lines)


def targets_table(rows: list[dict]) -> list[str]:
    """Dense's scorer numbers per model, overall and by object count."""
    header = ["model", "objects in prompt", "n", "object %", "position %", "motion %", "duplication %", "steps"]
    lines = [[r["model"], r["objects"], str(r["n"]), _fmt_pct(r["object_accuracy"]), _fmt_pct(r["position_accuracy"]),
              _fmt_pct(r["motion_accuracy"]), _fmt_pct(r["duplication_rate"]), str(r["steps"])] for r in rows]
    return _table(header, lines)


def notes(rows: list[dict]) -> list[str]:
    """Warnings about rows whose numbers need reading with care."""
    out = []
    for r in rows:
        if "error" not in r and r["sparse_steps"] == 0:
            warmup = (r["config"] or {}).get("dense_steps")
            out.append(f"* {r['model']} {r['method']}/{r['variant']}: its warm-up (dense_steps={warmup}) covers all "
                       f"{r['steps']} steps, so every step is dense: identical to dense by construction, not a "
                       "measurement of the method. See the no-warmup variant.")
    return out


def git_revision() -> str:
    """``git describe``-like revision of the checkout (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(threads: int) -> dict:
    """CPU, cores, torch threads, versions, load, git revision."""
    import diffusers

    from bench_attention import cpu_model  # same folder

    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return dict(cpu=cpu_model(), cores=os.cpu_count(), threads=threads, torch=torch.__version__,
                diffusers=diffusers.__version__, python=platform.python_version(), load_start=load,
                git=git_revision(), date=datetime.date.today().isoformat())


def markdown(result: dict) -> str:
    """The report: command, machine, then the tables that this run measured."""
    m = result["machine"]
    lines = ["# Shapes-world quality harness", "", "```", result["command"], "```", "",
             f"{m['date']}, git {m['git']}; torch {m['torch']}, diffusers {m['diffusers']}, Python {m['python']}; "
             f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, load at start {m['load_start']}; "
             "CPU, fp32, batch 1.", ""]
    for name, info in result["models"].items():
        weights = f", weights {info['weights']}" if info.get("weights") else ""
        lines.append(f"* **{name}** ({info['family']}{weights}): {info['height']}x{info['width']}"
                     + (f", {info['num_frames']} frames" if info.get("num_frames") else "")
                     + f", {info['steps']} steps, token grid {'x'.join(map(str, info['grid']))}, {info['n']} prompts")
    if any("error" not in r for r in result["rows"]):
        lines += ["", "## Methods vs dense (same prompts, same seeds)", "",
                  "PSNR / SSIM against the dense output (PSNR: mean over the prompts not identical to dense); "
                  "scorer percentages of the method (and of dense); density over the image/video tokens "
                  "(text excluded; UNet: top level); time x = median call time / dense's.", ""]
        lines += methods_table(result["rows"])
        extra = notes(result["rows"])
        if extra:
            lines += ["", *extra]
    if result["highres"]:
        lines += ["", "## HiDiffusion at higher resolution than training", "",
                  "Paper (Zhang et al., ECCV 2024): no duplication at 2x-4x the training resolution, "
                  "40-60 % faster.", ""]
        if any("error" not in r for r in result["highres"]):
            lines += highres_table(result["highres"])
        else:
            lines.append("Every run failed: see below.")
    if result["targets"]:
        source = "--targets run" if result["settings"]["targets"] else "dense runs above"
        lines += ["", f"## Dense targets ({source})", ""]
        lines += targets_table(result["targets"])
    failed = [r for r in result["rows"] + result["highres"] if "error" in r]
    if failed or result["skipped"]:
        lines += ["", "## Failed / skipped", ""]
        lines += [f"* {r['model']} {r['method']}/{r['variant']} at {r['height']}x{r['width']}: {r['error']}"
                  for r in failed]
        lines += [f"* {s['model']} {s['method']}: skipped, {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def _jsonable(value):
    """``value`` with infinities as the string ``"inf"`` and tuples as lists (strict JSON)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def isolated(threads: int):
    """The harness's process settings for the duration of a run, restored afterwards (so that ``main`` can be
    called from a test): ``threads`` torch threads, a forked global RNG (the harness seeds it per call), and
    diffusers' / transformers' warnings (e.g. prompt truncation by the random models' character-level
    tokenizers) and loading progress bars silenced, so that stderr shows the harness's progress."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
                 for lib in (diffusers_logging, transformers_logging)]
    previous_threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(threads)
            for lib, _, _ in libraries:
                lib.set_verbosity_error()
                lib.disable_progress_bar()
            yield
    finally:
        torch.set_num_threads(previous_threads)
        for lib, verbosity, bars in libraries:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


def _csv(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated embedded model names (default: {','.join(TRAINED_MODELS)}; random-weight "
                        "models such as tiny-flux-random are accepted)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods or method/variant (e.g. gna,radial/no-warmup; default: all)")
    p.add_argument("--prompts", type=int, default=None,
                   help=f"held-out prompts per model (default {DEFAULT_PROMPTS}; --targets {DEFAULT_TARGET_PROMPTS}; "
                        "--quick 2)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: each model's own; --quick 2)")
    p.add_argument("--targets", action="store_true",
                   help="dense only: the scorer's numbers per model and object count (the targets table)")
    p.add_argument("--highres-scales", default=None,
                   help="scales of the default size for HiDiffusion vs dense (default 2,4; --quick 2; 'none' = skip)")
    p.add_argument("--highres-prompts", type=int, default=None,
                   help="prompts per high-resolution run (default: min(--prompts, 20))")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 prompts, 2 steps, scale 2 only; the random-weight models stand in for trained "
                        "ones whose weights are absent")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--out-json", default="benchmarks/results/quality.json", help="raw results (default %(default)s)")
    p.add_argument("--out-md", default="benchmarks/results/quality.md", help="markdown report (default %(default)s)")
    return p.parse_args(argv), p


def resolve_models(args, parser) -> list[str]:
    """The model names to measure; usage errors for unknown names and for trained models without weights."""
    names = _csv(args.models) or list(TRAINED_MODELS)
    for name in names:
        if name not in EMBEDDED_MODELS:
            parser.error(f"--models: unknown model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    out = []
    for name in names:
        if EMBEDDED_MODELS[name].trained and not available(name):
            if args.quick and args.models is None and f"{name}-random" in EMBEDDED_MODELS:
                log(f"{name}: no trained weights at {weights_dir(name)}; --quick uses {name}-random instead")
                out.append(f"{name}-random")
                continue
            parser.error(f"the trained weights of {name!r} are not at {weights_dir(name)}: train them "
                         f"(`diffusion-attn train {name}`), set DIFFUSION_ATTN_WEIGHTS, or pass --models {name}-random")
        out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the harness; returns the exit status (0 ok, 1 a method failed on a model)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, parser = parse_args(argv)
    with isolated(args.threads):
        return run(args, parser, argv)


def settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The run's derived settings (prompts, steps, high-resolution scales and prompts, selected methods), with
    usage errors for values out of range or unknown method names."""
    n = args.prompts or (2 if args.quick else DEFAULT_TARGET_PROMPTS if args.targets else DEFAULT_PROMPTS)
    steps = args.steps or (2 if args.quick else None)
    scales_text = args.highres_scales or ("2" if args.quick else "2,4")
    try:
        scales = [] if scales_text.strip().lower() == "none" else [int(s) for s in _csv(scales_text)]
    except ValueError:
        parser.error(f"--highres-scales: integers such as 2,4 or 'none', got {scales_text!r}")
    for flag, value in (("--prompts", args.prompts), ("--steps", args.steps),
                        ("--highres-prompts", args.highres_prompts), *(("--highres-scales", v) for v in scales)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    selected = set(_csv(args.methods)) or None
    known = {*da.methods(), *(f"{m}/default" for m in da.methods()),
             *(f"{m}/{v}" for m in VARIANTS for v in VARIANTS[m])}
    if selected and selected - known:
        parser.error(f"--methods: unknown {', '.join(sorted(selected - known))}; known: {', '.join(sorted(known))}")
    return dict(prompts=n, steps=steps, targets=args.targets, highres_scales=scales,
                highres_prompts=args.highres_prompts or min(n, 20), methods=sorted(selected) if selected else None,
                held_out_seed=HELD_OUT_SEED, prompt_size=PROMPT_SIZE, prompt_frames=PROMPT_FRAMES)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Every measurement the arguments ask for, then the report (see :func:`main`)."""
    config = settings(args, parser)
    models = resolve_models(args, parser)
    n, steps, selected = config["prompts"], config["steps"], set(config["methods"] or ()) or None

    script = os.path.relpath(__file__, os.getcwd())
    result = dict(command=f"python {script} {shlex.join(argv)}".rstrip(), machine=machine_info(args.threads),
                  settings=config, models={}, rows=[], highres=[], targets=[], skipped=[])
    for name in models:
        start = time.perf_counter()
        model = load_model(name, steps)
        prompts = held_out_prompts(n, model.video)
        log(f"[{name}] {model.family}, token grid {model.grid}, {model.steps} steps, {n} prompts")
        dense = measure_dense(model, prompts)
        log(f"[{name}] dense: {time.perf_counter() - start:.1f} s")
        result["models"][name] = model_record(model, prompts, dense)
        result["targets"] += measure_targets(model, prompts, dense)
        if not args.targets:
            rows, skipped = plan(model, selected)
            result["skipped"] += skipped
            result["rows"] += measure_rows(model, prompts, rows, dense)
            result["highres"] += measure_highres(model, prompts[:config["highres_prompts"]], config["highres_scales"],
                                                 selected)
        del model, dense

    text = markdown(result)
    print(text)
    for path, content in ((args.out_md, text), (args.out_json, json.dumps(_jsonable(result), indent=1,
                                                                           allow_nan=False) + "\n")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(content)
    log(f"wrote {args.out_md} and {args.out_json}")
    return 1 if any("error" in r for r in result["rows"] + result["highres"]) else 0


if __name__ == "__main__":
    sys.exit(main())
