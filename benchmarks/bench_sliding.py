#!/usr/bin/env python
"""Sliding-window kernels on CPU vs dense SDPA, side by side in one process (issue 11).

    OMP_NUM_THREADS=1 python benchmarks/bench_sliding.py                    # every case, 3 repeats
    OMP_NUM_THREADS=1 python benchmarks/bench_sliding.py --only wan-33f,wan-81f --repeats 5
    OMP_NUM_THREADS=1 python benchmarks/bench_sliding.py --markdown benchmarks/results/sliding.md

Per case it times dense SDPA (``diffusion_attn.kernels.sdpa``) and ``pattern_attention`` with each
listed backend on the same q, k, v (batch 1, fp32), repeats interleaved and rotated (D A B, A B D, ...)
so that load from other processes hits all alike, and reports medians: speedup = dense / sparse,
ideal = 1 / density, of ideal = speedup / ideal. The kernels' plans are built before timing (``build s``)
and reused, as the processors cache them per layout. The first sparse call of each backend runs under a
dispatch mode that records the largest tensor any op returns; it is asserted below S^2 elements. The
load average (``uptime``) is printed before and after. ``--dense-repeats`` times dense fewer times than
the kernels for the largest shapes (FreeSwim 21 frames: ~3 min per dense call on one core).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from diffusion_attn import TokenLayout  # noqa: E402
from diffusion_attn.kernels import pattern_attention, sdpa, strip_plan  # noqa: E402
from diffusion_attn.kernels.sliding import modelled_efficiency, sliding_plan  # noqa: E402
from diffusion_attn.patterns import neighborhood_pattern  # noqa: E402

from bench_attention import cpu_model, largest_tensor  # noqa: E402


@dataclass
class Case:
    name: str
    what: str
    grid: tuple
    window: tuple
    stride: object = 1
    heads: int = 1
    head_dim: int = 128
    text_len: int = 0
    backends: tuple = ("sliding", "strips")

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.grid, self.text_len, "first")


CASES = [
    Case("wan-33f", "GNA sliding, Wan 2.1 480p 33f", (9, 30, 52), (5, 15, 26)),
    Case("wan-33f-2h", "GNA sliding, Wan 2.1 480p 33f, 2 heads (as bench_attention.py)", (9, 30, 52), (5, 15, 26),
         heads=2),
    Case("wan-81f", "GNA sliding, Wan 2.1 480p 81f", (21, 30, 52), (11, 15, 26)),
    Case("wan-33f-strided", "GNA strided, Wan 2.1 480p 33f", (9, 30, 52), (5, 15, 26), (1, 5, 13)),
    Case("wan-81f-strided", "GNA strided, Wan 2.1 480p 81f", (21, 30, 52), (11, 15, 26), (1, 5, 13)),
    Case("freeswim-5f", "FreeSwim window branch, 5 frames", (5, 68, 120), (5, 31, 53)),
    Case("freeswim-9f", "FreeSwim window branch, 9 frames", (9, 68, 120), (9, 31, 53)),
    Case("freeswim-21f", "FreeSwim window branch, 21 frames", (21, 68, 120), (21, 31, 53), backends=("sliding",)),
]


def plan_for(backend, pattern):
    if backend == "sliding":
        return sliding_plan(pattern), {"backend": "sliding"}
    if backend == "strips":
        plan = strip_plan(pattern)
        return plan, {"backend": "strips", "strips": plan}
    raise ValueError(backend)


def run_case(case: Case, repeats: int, dense_repeats: int) -> dict:
    layout = case.layout
    pattern = neighborhood_pattern(case.grid, case.window, case.stride)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.num_tokens, case.heads, case.head_dim, generator=g) for _ in range(3))
    s = layout.num_tokens
    n, t = layout.num_image, layout.text_len
    density = (pattern.allowed_pairs() + 2 * n * t + t * t) / s**2
    fns, info = {}, {}
    for b in case.backends:
        t0 = time.perf_counter()
        plan, kw = plan_for(b, pattern)
        build = time.perf_counter() - t0
        if b == "sliding":  # the plan goes in through the backend's cache, as prepared_attention does
            from diffusion_attn.kernels.sliding import sliding_attention
            from diffusion_attn.kernels.gather import grid_with_text
            fn = (lambda plan=plan: grid_with_text(q, k, v, layout, None, None,
                                                   lambda *a, **kw_: sliding_attention(*a, plan, **kw_)))
        else:
            fn = (lambda kw=kw: pattern_attention(q, k, v, pattern, layout, **kw))
        _, rec = largest_tensor(fn)
        big = rec["numel"]
        assert big < s * s, f"{b} built a tensor of {big} >= S^2 elements"
        visited = plan.visited_pairs + n * t + t * s
        desc = getattr(plan, "kinds", None) or getattr(plan, "tiles", None)
        model = modelled_efficiency(pattern, plan) if b == "sliding" else float("nan")
        info[b] = {"model": model, "build": build, "largest": big / s**2, "visited": visited / s**2,
                   "plan": f"axis {plan.axis}: {desc}"}
        fns[b] = fn
    fns["dense"] = lambda: sdpa(q, k, v)
    times = {name: [] for name in fns}  # wall clock
    cpu = {name: [] for name in fns}  # this process' CPU time
    names = list(fns)
    for i in range(repeats):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            if name == "dense" and len(times["dense"]) >= dense_repeats:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"  {case.name} {name}: wall {times[name][-1]:.3f}s cpu {cpu[name][-1]:.3f}s", flush=True)
    dense, dense_cpu = statistics.median(times["dense"]), statistics.median(cpu["dense"])
    rows = []
    for b in case.backends:
        med, med_cpu = statistics.median(times[b]), statistics.median(cpu[b])
        speed, speed_cpu = dense / med, dense_cpu / med_cpu
        rows.append({"case": case.name, "what": case.what, "grid": "x".join(map(str, case.grid)), "tokens": s,
                     "window": case.window, "stride": case.stride, "heads": case.heads, "head_dim": case.head_dim,
                     "backend": b, "density": density, "dense_s": dense, "dense_n": len(times["dense"]),
                     "sparse_s": med, "sparse_n": len(times[b]), "speedup": speed, "ideal": 1 / density,
                     "of_ideal": speed * density, "dense_cpu": dense_cpu, "sparse_cpu": med_cpu,
                     "speedup_cpu": speed_cpu, "of_ideal_cpu": speed_cpu * density, **info[b]})
    return rows


def uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def markdown(rows, meta) -> str:
    head = ("| case | grid | window, stride | backend | plan (slide axis: per-axis pieces) | density | visited | "
            "bound (allowed / visited) | model | build s | dense CPU s | sparse CPU s | speedup (CPU time) | "
            "of ideal (CPU time) | dense wall s | "
            "sparse wall s | speedup (wall) | of ideal (wall) | ideal | largest tensor / S^2 |\n"
            "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['case']} | {r['grid']} | {r['window']}, {r['stride']} | {r['backend']} | {r['plan']} | "
        f"{100 * r['density']:.1f}% | {100 * r['visited']:.1f}% | {r['density'] / r['visited']:.2f} | "
        f"{r['model']:.2f} | {r['build']:.2f} | {r['dense_cpu']:.2f} "
        f"(n={r['dense_n']}) | {r['sparse_cpu']:.3f} (n={r['sparse_n']}) | {r['speedup_cpu']:.2f}x | "
        f"**{r['of_ideal_cpu']:.2f}** | {r['dense_s']:.2f} | {r['sparse_s']:.3f} | {r['speedup']:.2f}x | "
        f"{r['of_ideal']:.2f} | {r['ideal']:.1f}x | {r['largest']:.3f} |\n" for r in rows)
    return (f"Machine: {meta['cpu']}, torch {torch.__version__}, {meta['threads']} thread(s), fp32, batch 1, "
            f"1 head x 128 unless the case says 2 heads.\nCommand: `{meta['command']}`\nDate: {meta['date']}. Load average before / after: "
            f"{meta['load_before']} / {meta['load_after']}.\n\n" + head + body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-repeats", type=int, default=None, help="at most this many dense timings per case")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--markdown", default=None, help="write the table to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = {x for x in args.only.split(",") if x}
    cases = [c for c in CASES if not only or c.name in only]
    meta = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "load_before": uptime(),
            "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/bench_sliding.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.date.today().isoformat()}
    rows = []
    for c in cases:
        for r in run_case(c, args.repeats, args.dense_repeats or args.repeats):
            rows.append(r)
            print(f"{r['case']:18s} {r['backend']:8s} cpu: dense {r['dense_cpu']:.3f}s sparse {r['sparse_cpu']:.3f}s "
                  f"of ideal {r['of_ideal_cpu']:.2f} | wall: dense {r['dense_s']:.3f}s sparse {r['sparse_s']:.3f}s "
                  f"of ideal {r['of_ideal']:.2f} | ideal {r['ideal']:.1f}x  {r['plan']}", flush=True)
    meta["load_after"] = uptime()
    text = markdown(rows, meta)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
