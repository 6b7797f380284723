#!/usr/bin/env python
"""FreeSwim benchmarks (CPU): the window branch's attention at the official layout, and one denoiser step
with and without the cache.

    python benchmarks/bench_freeswim.py --dense-fraction 0.125 # both parts (~10-15 min on 2 loaded CPU cores)
    python benchmarks/bench_freeswim.py --part attention --heads 2 --repeats 2
    python benchmarks/bench_freeswim.py --part step --quick    # smoke run, seconds
    python benchmarks/bench_freeswim.py --write benchmarks/results/freeswim.md

**attention**: the official 1088 x 1920 x 81-frame layout of Wan 2.1 1.3B (21 x 68 x 120 = 171,360 video
tokens, no text in self-attention), ``heads`` heads (the model has 12; heads are independent, times scale
linearly) x head_dim 128, fp32, batch 1. The window branch: FreeSwim's inward window for native 480 x 832
(all 21 frames x 31 x 53 tokens = 34,503 keys per query, 20.1%) with the official scale, through
``prepared_attention`` with the backend ``auto`` picks on this machine (or ``--backend``); its per-layout
plan is built once (reported as "build s") and reused, as the processors do. Dense: torch SDPA with the
same scale on the same q, k, v (what the full branch and the stock processor run). Dense and window
repeats are interleaved in one process (D W D W ...) so machine load hits both alike; medians reported.

**step**: one denoising step (a cond and an uncond call, as Wan pipelines with CFG make) of a small
random ``WanTransformer3DModel`` (``--layers`` blocks, 2 heads x 128, FFN 512) on a 6 x 24 x 32 token grid
(target 384 x 512 px, 21 frames) with native 192 x 256 px (window 6 x 13 x 17 tokens, 28.8%): stock
(no FreeSwim), FreeSwim nocache (every call runs both branches) and FreeSwim cache with
``cache_steps`` N (a guide step, then N - 1 steps that skip the full branch; the time per step averaged
over one cycle). The official README claims "> 2x" for the cache; the ratio nocache / cache(N) is that
claim's measure here.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusion_attn as da  # noqa: E402
from diffusion_attn.kernels import choose_backend, prepared_attention  # noqa: E402
from diffusion_attn.processors.freeswim import (freeswim_attention_scale, freeswim_half_window,  # noqa: E402
                                                freeswim_window_pattern, native_token_grid)


def _interleaved(fns: dict, repeats: int) -> dict:
    times = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def _window_density(grid, half) -> float:
    """Keys per query / tokens: all frames x the spatial window (clamped to the grid)."""
    return math.prod(min(2 * d + 1, n) for d, n in zip(half, grid[1:])) / (grid[1] * grid[2])


def bench_attention(heads: int, repeats: int, backend: str, grid=(21, 68, 120), native=(480, 832),
                    dense_fraction: float = 1.0) -> dict:
    layout = da.TokenLayout(grid)
    half = freeswim_half_window(native_token_grid(*native))
    pattern = freeswim_window_pattern(grid, half)
    scale = freeswim_attention_scale(native_token_grid(*native), 128)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.num_tokens, heads, 128, generator=g) for _ in range(3))
    name = choose_backend(pattern, layout, backend, device=q.device)
    cache: dict = {}
    cached = lambda key, build: cache[key] if key in cache else cache.setdefault(key, build())  # noqa: E731

    def window():
        return prepared_attention(q, k, v, pattern, layout, cached=cached, key=("freeswim", grid), backend=name,
                                  scale=scale)

    rows = max(1, int(round(layout.num_tokens * dense_fraction)))
    q_dense = q[:, :rows]

    def dense():
        # SDPA's cost is linear in the number of queries for a fixed key set: with dense_fraction < 1 the
        # first rows x all keys are timed and the time is scaled by 1 / dense_fraction
        return torch.nn.functional.scaled_dot_product_attention(q_dense.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2), scale=scale)

    t = time.perf_counter()
    window()  # builds the plan once, as the run context caches it
    first = time.perf_counter() - t
    med = _interleaved({"dense": dense, "window": window}, repeats)
    med["dense"] *= layout.num_tokens / rows
    density = _window_density(grid, half)
    return dict(grid="x".join(map(str, grid)), tokens=layout.num_tokens, heads=heads, backend=name,
                density=density, first=first, dense_rows=rows, dense=med["dense"], window=med["window"],
                speedup=med["dense"] / med["window"])


def _small_wan(layers: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                 out_channels=16, text_dim=64, freq_dim=64, ffn_dim=512, num_layers=layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024).eval()


def bench_step(layers: int, cache_steps: list[int], quick: bool, repeats: int = 1) -> dict:
    grid = (2, 8, 12) if quick else (6, 24, 32)
    native = (64, 96) if quick else (192, 256)
    model = _small_wan(layers)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, grid[0], 2 * grid[1], 2 * grid[2], generator=g)
    cond, uncond = (torch.randn(1, 64, 64, generator=g) for _ in range(2))

    def steps(n, start=999.0):
        """Run n steps (cond + uncond per step, decreasing timesteps); per-step wall times. On a bare model
        the run context starts a new run when the timestep goes up (per-run state emptied)."""
        out = []
        for i in range(n):
            t = torch.tensor([start - 10 * i])
            start = time.perf_counter()
            with torch.no_grad():
                for text in (cond, uncond):
                    model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
            out.append(time.perf_counter() - start)
        return out

    result = dict(grid="x".join(map(str, grid)), tokens=math.prod(grid), layers=layers, repeats=repeats,
                  window_density=_window_density(grid, freeswim_half_window(native_token_grid(*native))), rows={})
    configs = {"stock (dense, no FreeSwim)": (None, 1), "FreeSwim nocache": ({}, 1)}
    for n in cache_steps:
        configs[f"FreeSwim cache, cache_steps={n}"] = (dict(mode="cache", cache_steps=n), max(n, 2))

    def cycle(kw, n):
        """Under ``kw`` (None: stock): a warm-up step (builds the window plan, kept in the run context),
        then one run of n steps (timesteps restart: a new run, per-run state emptied)."""
        if kw is None:
            steps(1, start=500.0)
            return steps(n)
        with da.applied(model, "freeswim", native_height=native[0], native_width=native[1], **kw):
            steps(1, start=500.0)
            return steps(n)

    times = {name: [] for name in configs}
    order = list(configs)
    for r in range(repeats):  # configurations interleaved, order alternating: machine load hits all alike
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(cycle(*configs[name]))
    for name, (kw, n) in configs.items():
        runs = times[name]
        if kw is None or "cache_steps" not in kw:
            result["rows"][name] = statistics.median(t for run in runs for t in run)
            continue
        k = kw["cache_steps"]
        result["rows"][f"{name} (guide step)"] = statistics.median(run[0] for run in runs)
        if k > 1:
            result["rows"][f"{name} (other steps)"] = statistics.median(t for run in runs for t in run[1:k])
        result["rows"][f"{name} (mean over a cycle)"] = statistics.median(sum(run[:k]) / k for run in runs)
    return result


def markdown(att, step, command: str) -> str:
    lines = [f"# FreeSwim benchmarks", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1. Shared machine: wall-clock medians.",
             f"Command: `{command}`  ", f"Date: {datetime.date.today()}.", ""]
    if att is not None:
        lines += ["## Window branch vs dense SDPA at the official 1088 x 1920 x 81-frame layout", "",
                  "| grid | tokens | heads x dim (timed / model) | window backend | density | build + first call s | "
                  "dense s | window s | speedup | ideal 1/density |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
                  f"| {att['grid']} | {att['tokens']:,} | {att['heads']}/12 x 128 | {att['backend']} | "
                  f"{att['density']:.1%} | {att['first']:.1f} | {att['dense']:.1f} | {att['window']:.1f} | "
                  f"{att['speedup']:.2f}x | {1 / att['density']:.1f}x |", "",
                  f"Dense: SDPA of {att['dense_rows']:,} of the {att['tokens']:,} queries against all keys, scaled by "
                  f"{att['tokens'] / att['dense_rows']:.2f} (SDPA is linear in the number of queries)."
                  if att["dense_rows"] < att["tokens"] else "Dense: SDPA over all queries.", ""]
    if step is not None:
        base = step["rows"].get("FreeSwim nocache")
        lines += [f"## One denoiser step (cond + uncond) of a small Wan transformer",
                  "", f"{step['layers']} blocks, 2 heads x 128, grid {step['grid']} ({step['tokens']:,} tokens), "
                  f"window {step['window_density']:.1%} of each frame; medians over {step['repeats']} interleaved "
                  "round(s) of all configurations.", "",
                  "| configuration | s per step | nocache / this |", "|---|---:|---:|"]
        for name, t in step["rows"].items():
            lines.append(f"| {name} | {t:.2f} | {base / t:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "attention", "step"), default="all")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="attention: interleaved repeats; step: interleaved rounds")
    p.add_argument("--backend", default="auto", help="window backend (default: what auto picks)")
    p.add_argument("--dense-fraction", type=float, default=1.0,
                   help="time dense SDPA on this fraction of the queries (all keys) and scale up (linear in queries)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--cache-steps", default="2,5", help="cache intervals to time (official default 2; inference.py: 5)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--write", help="write the markdown results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    att = step = None
    if args.part in ("all", "attention"):
        grid = (3, 12, 20) if args.quick else (21, 68, 120)
        native = (96, 160) if args.quick else (480, 832)
        att = bench_attention(args.heads, args.repeats, args.backend, grid, native, args.dense_fraction)
        print(att, flush=True)
    if args.part in ("all", "step"):
        step = bench_step(args.layers, [int(n) for n in args.cache_steps.split(",")], args.quick, args.repeats)
        print(step, flush=True)
    command = "python benchmarks/bench_freeswim.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(att, step, command.strip())
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")


if __name__ == "__main__":
    main()
