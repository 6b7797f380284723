#!/usr/bin/env python
"""Attention benchmark: each method's sparse attention vs dense SDPA, on realistic model shapes.

    python benchmarks/bench_attention.py                     # full run (~15-20 min on 2 CPU cores)
    python benchmarks/bench_attention.py --quick             # smoke run, a few seconds
    python benchmarks/bench_attention.py --only gna,radial --repeats 5 --threads 2

Per case (method x shape) it reports:

* grid, tokens (grid + text), heads x head_dim (timed / the model's; see below);
* density: allowed (query, key) pairs / S^2 over the whole sequence, text rows and columns included
  (text tokens are always dense); visited density: the pairs the tiles actually compute (masked pairs
  included) / S^2;
* build: wall time of the first call's setup, once per layout: the pattern plus its tile schedule
  (gather) or its BlockMask (flex), what the processors cache in the run context;
* dense / sparse: median wall time of dense SDPA (``diffusion_attn.kernels.sdpa``, what the stock
  processor runs) and of ``pattern_attention(..., backend=<case backend>, schedule= / block_mask=...)``
  on the same q, k, v. Backends: ``gather`` (tiled gather + SDPA), for sliding GNA ``sliding`` (exact key-side
  splits merged by log-sum-exp: what ``auto`` picks for windows sliding on two axes or more on CPU; see
  ``benchmarks/bench_sliding.py``), for GNA also ``strips`` (keys gathered
  once per column and sliced per tile; what ``auto`` picks for box patterns on CPU) and, for radial,
  ``flex`` (compiled FlexAttention; its first call compiles, reported as "first call s" and excluded from
  the medians).
  Dense and sparse repeats are interleaved (D S D S ..., order alternating) in the same process so that
  load from other processes on a shared machine hits both alike; the medians are reported;
* speedup = dense / sparse; ideal = 1 / density; efficiency = speedup / ideal = speedup * density
  (1.0 = the sparse kernel is as fast per allowed pair as dense SDPA is per pair);
* memory: each case is also run once in a fresh subprocess (same threads), which reports the peak
  resident set growth during one call (Linux ``VmHWM`` after resetting it via ``/proc/self/clear_refs``,
  minus ``VmRSS`` before the call; q, k, v and the prebuilt schedule are allocated before and not
  counted). Dense SDPA is measured once per shape. Printed next to S^2 bytes (one bool S x S mask) and
  heads * S^2 * 4 bytes (fp32 scores of all heads, what naive attention materialises);
* S x S check: the first (untimed) sparse call runs under a ``TorchDispatchMode`` that records the
  largest tensor any torch op returns; from ``ASSERT_MIN_TOKENS`` tokens on the script asserts it has
  fewer than S^2 elements (the fast path never builds an S x S tensor).

Timed heads: dense attention on 2 CPU cores costs ~1.5 s per head at 14K tokens, so large shapes are timed
with fewer heads than the model has (``heads`` column: timed/model). Heads are independent batch entries
for both kernels, so times scale linearly and the speedup does not depend on it.

``--only`` takes methods (``radial``, ``gna``, ``msw`` = HiDiffusion's MSW-MSA attention alone,
``hidiffusion`` = the whole method on an SD 1.5-shaped UNet) or case names.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffusion_attn import TokenLayout  # noqa: E402
from diffusion_attn.kernels import build_schedule, pattern_attention, sdpa, sliding_plan, strip_plan  # noqa: E402
from diffusion_attn.kernels.flex import FLEX_BLOCK, block_occupancy, flex_block_mask  # noqa: E402
from diffusion_attn.kernels.simulate import predicted_speedup  # noqa: E402
from diffusion_attn.patterns import neighborhood_pattern, radial_pattern, shifted_window_pattern  # noqa: E402

DATE = datetime.date.today().isoformat()  # the day of the run
#: The "no S x S tensor" assertion applies from this many tokens on. Below it the gather kernel may
#: legitimately put every tile into one chunk, whose per-tile masks then add up to about S^2 elements.
ASSERT_MIN_TOKENS = 8192


# ---------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str  # unique key, also accepted by --only
    method: str  # radial | gna | msw
    model: str  # what the shape is (for the table)
    grid: tuple[int, ...]
    config: str  # the method's parameters, as shown in the table
    make_pattern: Callable[[tuple[int, ...]], object]
    heads: int  # heads timed
    model_heads: int  # heads of the model
    head_dim: int
    text_len: int = 0
    text_position: str = "last"
    backend: str = "gather"  # gather | strips | sliding | flex

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.grid, self.text_len, self.text_position)


def _gna(window, stride=1, dilation=1):
    return lambda grid: neighborhood_pattern(grid, window, stride, dilation)


def _radial(decay_factor, sink):
    return lambda grid: radial_pattern(grid, decay_factor, sink)


def _msw(choice):
    return lambda grid: shifted_window_pattern(grid, choice)


def wan_cases(grid, heads, tag, window, strided_stride) -> list[Case]:
    t = f"Wan-1.3B 480p {tag}"
    return [
        Case(f"radial-wan-{tag}", "radial", t, grid, "decay 0.2, sink (Wan defaults)", _radial(0.2, True), heads, 12, 128),
        Case(f"radial-wan-{tag}-flex", "radial", t, grid, "decay 0.2, sink (Wan defaults)", _radial(0.2, True), heads, 12, 128,
             backend="flex"),
        *with_strips(Case(f"gna-sliding-wan-{tag}", "gna", t, grid, f"window {window}, stride 1", _gna(window, 1), heads, 12, 128)),
        Case(f"gna-sliding-wan-{tag}-sliding", "gna", t, grid, f"window {window}, stride 1", _gna(window, 1), heads, 12, 128,
             backend="sliding"),
        *with_strips(Case(f"gna-strided-wan-{tag}", "gna", t, grid, f"window {window}, stride {strided_stride}",
                          _gna(window, strided_stride), heads, 12, 128)),
        Case(f"gna-blocked-wan-{tag}", "gna", t, grid, f"window = stride = {window}", _gna(window, window), heads, 12, 128),
    ]


def with_strips(case: Case) -> list[Case]:
    """A gather case and the same case on the strip kernel (``<name>-strips``)."""
    return [case, dataclasses.replace(case, name=case.name + "-strips", backend="strips")]


def full_cases() -> list[Case]:
    cases = []
    # Wan 2.1 1.3B: 12 heads x 128. 480x832 -> latent 60x104 -> patch 2 -> 30x52 tokens per frame.
    # The same window for the three GNA strides, so they differ only in how queries share windows;
    # windows picked for 10-20 % density.
    cases += wan_cases((9, 30, 52), 2, "33f", (5, 15, 26), (1, 5, 13))
    cases += wan_cases((21, 30, 52), 1, "81f", (11, 15, 26), (1, 5, 13))
    # Flux.1: 24 heads x 128, 512 text tokens first; 1024^2 -> 64x64 tokens, 2048^2 -> 128x128.
    for grid, heads, tag, configs in (
        ((64, 64), 8, "1024", [((32, 32), (16, 16)), ((24, 24), (8, 8))]),
        ((128, 128), 2, "2048", [((64, 64), (16, 16)), ((48, 48), (16, 16))]),
    ):
        for window, stride in configs:
            cases += with_strips(Case(
                f"gna-flux-{tag}-w{window[0]}s{stride[0]}", "gna", f"Flux.1 {tag}^2", grid,
                f"window {window}, stride {stride}", _gna(window, stride), heads, 24, 128, 512, "first",
            ))
    # HiDiffusion's MSW-MSA (2x2 shifted windows) on SD 1.5's top UNet level (320 ch = 8 heads x 40):
    # 1024^2 -> latent 128x128, 2048^2 -> latent 256x256 tokens.
    cases.append(Case("msw-sd15-1024", "msw", "SD 1.5 top level 1024^2", (128, 128), "2x2 windows, shift choice 1", _msw(1), 4, 8, 40))
    cases.append(Case("msw-sd15-2048", "msw", "SD 1.5 top level 2048^2", (256, 256), "2x2 windows, shift choice 1", _msw(1), 1, 8, 40))
    return cases


def large_cases() -> list[Case]:
    """The issue's large shapes, one head timed (dense SDPA alone takes 20-70 s per head here):
    Wan 2.1 14B 720p 81 frames (40 heads x 128; 1280x720 -> latent 90x160 -> patch 2 -> 45x80 per
    frame), HunyuanVideo 720p in the GNA paper's layout (30x48x80, 24 heads x 128, 256 text tokens
    last), Mochi 1 at 480 x 848, 163 frames (24 heads x 128; latent 28 x 60 x 106 -> patch 2 -> 28x30x53,
    256 text tokens last) and Flux.1 at 4096^2 (256x256 + 512 text first) with the GNA paper's 4K
    window."""
    return [
        Case("radial-wan14b-720p-81f-flex", "radial", "Wan-14B 720p 81f", (21, 45, 80), "decay 0.2, sink (Wan defaults)",
             _radial(0.2, True), 1, 40, 128, backend="flex"),
        Case("radial-hunyuan-720p-flex", "radial", "HunyuanVideo 720p", (30, 48, 80), "decay 0.95 (HunyuanVideo defaults)",
             _radial(0.95, False), 1, 24, 128, 256, "last", backend="flex"),
        Case("radial-mochi-480p-163f-flex", "radial", "Mochi 1 480p 163f", (28, 30, 53),
             "decay 0.95, no sink (this pack's Mochi defaults)", _radial(0.95, False), 1, 24, 128, 256, "last", backend="flex"),
        *with_strips(Case("gna-hunyuan-720p-paper", "gna", "HunyuanVideo 720p", (30, 48, 80),
                          "window (18, 24, 24), stride (16, 8, 8) (GNA paper)", _gna((18, 24, 24), (16, 8, 8)), 1, 24, 128,
                          256, "last")),
        *with_strips(Case("gna-flux-4096-paper", "gna", "Flux.1 4096^2", (256, 256), "window (80, 80), stride (16, 16) (GNA paper)",
                          _gna((80, 80), (16, 16)), 1, 24, 128, 512, "first")),
    ]


def quick_cases() -> list[Case]:
    return [
        Case("radial-quick", "radial", "video (quick)", (4, 16, 32), "decay 0.2, sink", _radial(0.2, True), 2, 2, 64),
        Case("radial-quick-flex", "radial", "video (quick)", (4, 16, 32), "decay 0.2, sink", _radial(0.2, True), 2, 2, 64,
             backend="flex"),
        Case("gna-sliding-quick", "gna", "video (quick)", (4, 16, 32), "window (3, 7, 11), stride 1", _gna((3, 7, 11)), 2, 2, 64),
        Case("gna-sliding-quick-sliding", "gna", "video (quick)", (4, 16, 32), "window (3, 7, 11), stride 1", _gna((3, 7, 11)),
             2, 2, 64, backend="sliding"),
        *with_strips(Case("gna-strided-quick", "gna", "video (quick)", (4, 16, 32), "window (3, 8, 8), stride (1, 4, 4)",
                          _gna((3, 8, 8), (1, 4, 4)), 2, 2, 64)),
        Case("gna-blocked-quick", "gna", "video (quick)", (4, 16, 32), "window = stride = (2, 8, 8)", _gna((2, 8, 8), (2, 8, 8)), 2, 2, 64),
        Case("gna-flux-quick", "gna", "image + text (quick)", (48, 48), "window (16, 16), stride (8, 8)", _gna((16, 16), (8, 8)), 2, 2, 64, 64, "first"),
        Case("msw-quick", "msw", "UNet level (quick)", (48, 48), "2x2 windows, shift choice 1", _msw(1), 2, 2, 40),
    ]


def select(cases: list[Case], only: set[str] | None) -> list[Case]:
    if not only:
        return cases
    return [c for c in cases if c.method in only or c.name in only]


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------
def make_qkv(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, case.layout.num_tokens, case.heads, case.head_dim)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


def build(case: Case):
    """The pattern and what the kernel caches per layout (gather: tile schedule; strips: strip plan; flex:
    BlockMask), timed."""
    t0 = time.perf_counter()
    pattern = case.make_pattern(case.grid)
    if case.backend == "flex":
        prepared = flex_block_mask(pattern, case.layout, occupancy=block_occupancy(pattern, case.layout))
    elif case.backend == "strips":
        prepared = strip_plan(pattern)
    elif case.backend == "sliding":
        prepared = sliding_plan(pattern)
    else:
        prepared = build_schedule(pattern)
    return pattern, prepared, time.perf_counter() - t0


def seq_pairs(case: Case, pattern, prepared) -> tuple[float, float]:
    """(allowed, visited) pairs over the whole sequence: text rows and columns are dense."""
    n, t = case.layout.num_image, case.text_len
    s = n + t
    allowed = pattern.allowed_pairs() + 2 * n * t + t * t
    if case.backend == "flex":  # visited 128 x 128 tiles (the partial last tile counted whole)
        any_, _ = block_occupancy(pattern, case.layout)
        return allowed / s**2, min(1.0, float(any_.sum()) * FLEX_BLOCK**2 / s**2)
    visited = prepared.visited_pairs + n * t + t * s
    return allowed / s**2, visited / s**2


def runners(case: Case, pattern, prepared, q, k, v):
    layout = case.layout
    dense = lambda: sdpa(q, k, v)  # noqa: E731
    if case.backend == "flex":
        sparse = lambda: pattern_attention(q, k, v, pattern, layout, backend="flex", block_mask=prepared)  # noqa: E731
    elif case.backend == "strips":
        sparse = lambda: pattern_attention(q, k, v, pattern, layout, backend="strips", strips=prepared)  # noqa: E731
    elif case.backend == "sliding":
        sparse = lambda: pattern_attention(q, k, v, pattern, layout, backend="sliding", sliding=prepared)  # noqa: E731
    else:
        sparse = lambda: pattern_attention(q, k, v, pattern, layout, backend="gather", schedule=prepared)  # noqa: E731
    return dense, sparse


def interleaved(dense, sparse, repeats: int, warmup: int):
    for _ in range(warmup):
        dense(), sparse()
    td, ts = [], []
    for i in range(repeats):
        order = ((dense, td), (sparse, ts)) if i % 2 == 0 else ((sparse, ts), (dense, td))
        for fn, acc in order:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return td, ts


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) that any op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape, self.op = 0, (), ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape, self.op = t.numel(), tuple(t.shape), str(func)
        return out


def largest_tensor(fn):
    """Call ``fn`` once under :class:`LargestTensor`; returns (its output, the record)."""
    mode = LargestTensor()
    with mode:
        out = fn()
    return out, dict(numel=mode.numel, shape=list(mode.shape), op=mode.op)


def child_memory(case: Case, variant: str) -> dict:
    """Run once in this (fresh) process; report the peak RSS growth of the call."""
    q, k, v = make_qkv(case)
    pattern, prepared, _ = build(case)
    dense, sparse = runners(case, pattern, prepared, q, k, v)
    fn = dense if variant == "dense" else sparse
    if variant != "dense" and case.backend == "flex":
        fn()  # compile first: the steady-state call is what is measured
    import resource

    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        reset = False
    before = _proc_status()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()
    after = _proc_status()
    if reset:
        peak = after["VmHWM"] - before["VmRSS"]
    else:  # ru_maxrss is a lifetime maximum: only growth beyond the earlier peak shows
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - maxrss_before
    return dict(peak_bytes=peak, hwm_reset=reset, rss_before=before["VmRSS"])


def measure_memory(case: Case, variant: str, args) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", case.name, "--_variant", variant,
           "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    if args.large:
        cmd.append("--large")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    except subprocess.SubprocessError as e:
        print(f"  memory subprocess failed for {case.name} ({variant}): {e}", file=sys.stderr)
        if isinstance(e, subprocess.CalledProcessError):
            print(e.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_case(case: Case, args, cache: dict) -> dict:
    """``cache``: per-shape results shared by the cases of one shape (dense SDPA's memory)."""
    layout = case.layout
    s = layout.num_tokens
    q, k, v = make_qkv(case)
    pattern, prepared, build_s = build(case)
    density, visited = seq_pairs(case, pattern, prepared)
    dense, sparse = runners(case, pattern, prepared, q, k, v)
    shape_key = (case.grid, case.text_len, case.heads, case.head_dim)
    first_call_s = None
    if case.backend == "flex":
        # the first call compiles (once per process and shape); compiled code bypasses the dispatch-mode
        # probe, so the S x S check does not apply: flex reads block-level masks by construction
        t0 = time.perf_counter()
        out = sparse()
        first_call_s = time.perf_counter() - t0
        largest = dict(numel=0, shape=[], op="compiled flex_attention (not traced)")
    else:
        # first sparse call (untimed): the largest tensor any op returns during it
        out, largest = largest_tensor(sparse)
    assert out.shape == q.shape and bool(torch.isfinite(out).all()), f"{case.name}: bad sparse output"
    del out
    if s >= ASSERT_MIN_TOKENS and case.backend != "flex":
        assert largest["numel"] < s * s, (
            f"{case.name}: the sparse path built a tensor of {largest['numel']:,} >= S^2 = {s * s:,} elements "
            f"({largest['op']} {largest['shape']})")
    if shape_key not in cache:
        cache[shape_key] = {"largest": largest_tensor(dense)[1]}
    td, ts = interleaved(dense, sparse, args.repeats, args.warmup)
    row = dict(
        name=case.name, method=case.method, model=case.model, config=case.config, grid=list(case.grid),
        text_len=case.text_len, tokens=s, heads=case.heads, model_heads=case.model_heads, head_dim=case.head_dim,
        backend=case.backend, first_call_s=first_call_s, grid_density=pattern.density, density=density, visited_density=visited, build_s=build_s,
        dense_s=statistics.median(td), sparse_s=statistics.median(ts), dense_all=td, sparse_all=ts,
    )
    row["speedup"] = row["dense_s"] / row["sparse_s"]
    # tile-level upper bound: flex from the simulator's 128 x 128 tiles, gather from its exact schedule work
    row["predicted"] = predicted_speedup(pattern, layout, "flex").speedup if case.backend == "flex" else 1.0 / visited
    row["efficiency"] = row["speedup"] * density
    row["visited_efficiency"] = row["speedup"] * visited
    row["largest_sparse"], row["largest_dense"] = largest, cache[shape_key]["largest"]
    if args.memory:
        if "mem" not in cache[shape_key]:
            cache[shape_key]["mem"] = measure_memory(case, "dense", args)
        row["mem_dense"] = cache[shape_key]["mem"]
        row["mem_sparse"] = measure_memory(case, "sparse", args)
    return row


# ---------------------------------------------------------------------------------------------------------
# HiDiffusion end to end (UNet forward steps)
# ---------------------------------------------------------------------------------------------------------
def hidiffusion_available() -> bool:
    try:
        import diffusion_attn

        return "hidiffusion" in diffusion_attn.methods()
    except Exception:
        return False


SD15_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2, attention_head_dim=8, in_channels=4, out_channels=4, sample_size=64,
)


def build_unet(widths: tuple[int, ...], cross_dim: int):
    """An SD 1.5-shaped ``UNet2DConditionModel`` with random weights (seed 0)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=tuple(widths), cross_attention_dim=cross_dim, **SD15_BLOCKS).eval()


def run_hidiffusion(args) -> list[dict]:
    """One UNet forward, dense (stock processors) vs with ``hidiffusion`` at a RAU-Net-active step and at
    a step where RAU-Net is off (MSW-MSA only).

    The steps come from a tiny DDIM loop of ``--unet-steps`` steps (the method gets ``num_steps``; its run
    context counts steps from the falling timesteps), stopping at the first step where RAU-Net is off,
    so every RAU-Net stage schedule of that run (conv RAD / avg-pool) is timed once. Per repeat: one
    dense forward first, then the hidiffusion steps.
    """
    import diffusion_attn as da
    from diffusers import DDIMScheduler
    from diffusion_attn.patches.raunet import raunet_schedule

    widths = tuple(int(w) for w in args.unet_width.split(","))
    latent, steps = args.unet_latent, args.unet_steps
    cross = 32 if args.quick else 768
    t0 = time.perf_counter()
    unet = build_unet(widths, cross)
    print(f"hidiffusion: built UNet {widths} in {time.perf_counter() - t0:.1f}s; latent {latent}x{latent}", flush=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, latent, latent, generator=g)
    enc = torch.randn(1, 77, cross, generator=g)
    sched = raunet_schedule("sd15", (latent, latent), steps)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    last = next((i for i in range(steps) if not (sched.conv_on(i) or sched.block_on(i))), steps - 1)

    def stages(i):
        on = [n for n, f in (("RAD conv", sched.conv_on), ("avg-pool", sched.block_on)) if f(i)]
        return ("RAU-Net " + " + ".join(on) if on else "RAU-Net off") + ", MSW-MSA"

    def forward(x, t):
        t_start = time.perf_counter()
        with torch.no_grad():
            out = unet(x, t, enc).sample
        return out, time.perf_counter() - t_start

    # untimed warm-up (thread pools, oneDNN primitives, code paths) on a small latent, dense and hidiffusion
    w = torch.randn(1, 4, 32, 32, generator=g)
    with torch.no_grad():
        unet(w, scheduler.timesteps[0], enc)
        with da.applied(unet, "hidiffusion", num_steps=steps, seed=0):
            unet(w, scheduler.timesteps[0], enc)
    rows = {i: dict(method=[], dense=[]) for i in range(last + 1)}
    for rep in range(args.unet_repeats):
        # dense (stock processors, no method): its cost does not depend on the step; one forward per repeat
        _, dd = forward(x0, scheduler.timesteps[0])
        print(f"  dense forward: {dd:.1f}s", flush=True)
        for r in rows.values():
            r["dense"].append(dd)
        with da.applied(unet, "hidiffusion", num_steps=steps, seed=0) as handle:
            x = x0
            for i, t in enumerate(scheduler.timesteps[: last + 1]):
                out, dt = forward(x, t)
                assert handle.context.step == i, f"run context at step {handle.context.step}, expected {i}"
                rows[i]["method"].append(dt)
                print(f"  hidiffusion step {i}/{steps} ({stages(i)}): {dt:.1f}s", flush=True)
                x = scheduler.step(out, t, x).prev_sample
    res = []
    for i, r in rows.items():
        m, d = statistics.median(r["method"]), statistics.median(r["dense"])
        res.append(dict(unet=f"SD 1.5-shaped {widths}, random init, fp32", latent=f"{latent}x{latent} ({8 * latent}^2 px)",
                        step=f"{i}/{steps}: {stages(i)}", method_s=m, dense_s=d, speedup=d / m,
                        method_all=r["method"], dense_all=r["dense"]))
    return res


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------
def fmt_mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def grid_str(row) -> str:
    g = "x".join(map(str, row["grid"]))
    return g + (f" + {row['text_len']} text" if row["text_len"] else "")


def cpu_model() -> str:
    """``lscpu``'s model name (also used by bench_denoiser.py)."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def machine_info(threads: int) -> dict:
    return dict(cpu=cpu_model(), cores=os.cpu_count(), threads=threads, torch=torch.__version__,
                python=platform.python_version())


def markdown(rows: list[dict], hidi: list[dict] | str, meta: dict, errors=()) -> str:
    lines = [
        f"Machine: {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']} (CPU), {meta['threads']} threads, fp32, batch 1.",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}. Times are medians of {meta['repeats']} interleaved dense/sparse repeats (wall clock, shared machine).",
        "",
        "| case | model | config | backend | grid | tokens | heads x dim (timed/model) | density | visited | build s | first call s | dense s | sparse s | speedup | predicted | measured / predicted | ideal 1/density | efficiency | eff. vs visited | peak MB dense / sparse | largest sparse tensor / S^2 |",
        "|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        md, ms = r.get("mem_dense"), r.get("mem_sparse")
        mem = f"{fmt_mb(md and md['peak_bytes'])} / {fmt_mb(ms and ms['peak_bytes'])}" if "mem_sparse" in r else "not measured"
        largest = "n/a (compiled)" if r.get("backend") == "flex" else f"{r['largest_sparse']['numel'] / r['tokens']**2:.3f}"
        first = f"{r['first_call_s']:.1f}" if r.get("first_call_s") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['model']} | {r['config']} | {r.get('backend', 'gather')} | {grid_str(r)} | {r['tokens']:,} | "
            f"{r['heads']}/{r['model_heads']} x {r['head_dim']} | {r['density']:.1%} | {r['visited_density']:.1%} | "
            f"{r['build_s']:.2f} | {first} | {r['dense_s']:.2f} | {r['sparse_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['predicted']:.2f}x | {r['speedup'] / r['predicted']:.2f} | "
            f"{1 / r['density']:.1f}x | {r['efficiency']:.2f} | {r['visited_efficiency']:.2f} | {mem} | {largest} |"
        )
    lines += [
        "",
        "density / visited: allowed / computed (query, key) pairs over S^2, text rows and columns included. "
        "predicted: the tile-level upper bound on the speedup (`diffusion-attn simulate`; flex: 128 x 128 tiles, "
        "gather / strips: 1 / visited of its schedule / plan). "
        "efficiency = speedup x density; eff. vs visited = speedup x visited density (how fast the kernel is per "
        "computed pair, relative to dense SDPA: below 1 = gather / mask / small-tile overhead). peak MB: resident-set growth during one call in a fresh process "
        "(inputs and the prebuilt schedule excluded; flex: the call after the compiling one). first call s: flex's "
        "compile + first run, once per process and shape. largest sparse tensor: elements of the largest tensor "
        f"any op returned during the first sparse call, over S^2 (asserted < 1 from {ASSERT_MIN_TOKENS} tokens on: "
        "no S x S tensor).",
        "",
        *(f"**FAILED** {e}  " for e in errors),
        "",
        "### HiDiffusion end to end (UNet forward)",
        "",
    ]
    if isinstance(hidi, str):
        lines.append(hidi)
    else:
        lines += [
            "| unet | latent | step | hidiffusion s | dense s | speedup |",
            "|---|---|---|---:|---:|---:|",
        ]
        for h in hidi:
            lines.append(f"| {h['unet']} | {h['latent']} | {h['step']} | {h['method_s']:.2f} | {h['dense_s']:.2f} | {h['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def print_row(r: dict) -> None:
    ms, md = r.get("mem_sparse"), r.get("mem_dense")
    ls = r["largest_sparse"]
    mem = f" | largest sparse tensor {ls['numel'] / r['tokens']**2:.3f} S^2 ({ls['op']} {ls['shape']})"
    if ms is not None and md is not None:
        mem += (f" | peak dense {fmt_mb(md['peak_bytes'])} MB sparse {fmt_mb(ms['peak_bytes'])} MB"
                f" (S^2 bytes = {fmt_mb(r['tokens']**2)} MB, heads*S^2*4 = {fmt_mb(4 * r['heads'] * r['tokens']**2)} MB)")
    print(
        f"{r['name']:<28} {grid_str(r):<20} S={r['tokens']:>6} {r['heads']}/{r['model_heads']}x{r['head_dim']} "
        f"dens {r['density']:.3f} vis {r['visited_density']:.3f} build {r['build_s']:.2f}s "
        f"dense {r['dense_s']:.3f}s sparse {r['sparse_s']:.3f}s -> {r['speedup']:.2f}x (ideal {1 / r['density']:.1f}x, "
        f"eff {r['efficiency']:.2f}){mem}",
        flush=True,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, a few seconds (smoke test)")
    p.add_argument("--large", action="store_true",
                   help="the large shapes instead (Wan-14B 720p, HunyuanVideo 720p, Flux 4096^2; 1 head timed; ~20 min)")
    p.add_argument("--only", default="", help="comma-separated methods (radial, gna, msw, hidiffusion) or case names")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per kernel (default 3, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed dense+sparse calls per case (default 0 full, 1 quick)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--out", default=None,
                   help="markdown table output (default benchmarks/results/attention.md, quick: attention-quick.md)")
    p.add_argument("--json", default=None, help="also write raw results as JSON here")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="peak-RSS subprocess per case (default: on, off with --quick)")
    p.add_argument("--unet-width", default=None, help="hidiffusion UNet block_out_channels (default SD 1.5's 320,640,1280,1280)")
    p.add_argument("--unet-latent", type=int, default=None, help="hidiffusion latent size (default 128 = 1024^2 px)")
    p.add_argument("--unet-steps", type=int, default=None, help="steps of the hidiffusion DDIM loop (default 4)")
    p.add_argument("--unet-repeats", type=int, default=1, help="repeats of the hidiffusion loop (default 1)")
    p.add_argument("--merge", default=None, metavar="JSON",
                   help="keep the rows (and the HiDiffusion result) of an earlier --json of this script, replacing the "
                        "cases measured again; both commands are listed")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = quick_cases() if args.quick else large_cases() if args.large else full_cases()

    if args._child:
        case = next(c for c in cases if c.name == args._child)
        print(json.dumps(child_memory(case, args._variant)))
        return 0

    args.out = args.out or f"benchmarks/results/attention{'-quick' if args.quick else '-large' if args.large else ''}.md"
    args.unet_width = args.unet_width or ("32,64,64,64" if args.quick else "320,640,1280,1280")
    args.unet_latent = args.unet_latent or (48 if args.quick else 128)
    args.unet_steps = args.unet_steps or 4
    args.memory = (not args.quick) if args.memory is None else args.memory
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 0)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    known = {"radial", "gna", "msw", "hidiffusion"} | {c.name for c in cases}
    unknown = sorted((only or set()) - known)
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)}; accepted: radial, gna, msw, hidiffusion or a case name "
                f"from --list{' --quick' if args.quick else ''}")
    selected = select(cases, only)
    if args.list:
        for c in cases:
            print(f"{c.name:<28} {c.method:<7} {c.model:<26} {c.layout.describe():<20} {c.config}")
        return 0

    meta = machine_info(args.threads)
    meta.update(date=DATE, repeats=args.repeats,
                command="python " + " ".join([os.path.relpath(__file__, os.getcwd()), *(argv if argv is not None else sys.argv[1:])]))
    earlier_rows, earlier_hidi = [], None
    if args.merge:
        try:
            data = json.loads(Path(args.merge).read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--merge: cannot read {args.merge}: {e}")
        earlier_rows, earlier_hidi = data.get("rows", []), data.get("hidiffusion")
        meta["command"] = f"{data.get('meta', {}).get('command', '?')}`, then `{meta['command']}"
    print(f"# {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}, {args.threads} threads", flush=True)

    # global warm-up: first calls pay for thread pools and page faults
    w = torch.randn(1, 1024, 2, 64)
    sdpa(w, w, w)

    t_start = time.perf_counter()
    rows, shape_cache, errors = [], {}, []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pending = "not run yet (the run is still going)."
    for case in selected:
        try:
            rows.append(run_case(case, args, shape_cache))
        except Exception as e:  # keep the other cases; fail at the end
            errors.append(f"{case.name}: {type(e).__name__}: {e}")
            print(f"{case.name:<28} FAILED: {errors[-1]}", flush=True)
            continue
        print_row(rows[-1])
        out.write_text(markdown(rows, pending, meta, errors))  # partial results of a long run

    hidi: list[dict] | str
    if (only and "hidiffusion" not in only) or args.large:
        hidi = "not run (`--only` / `--large` excludes it)."
    elif not hidiffusion_available():
        hidi = ("**TODO(hidiffusion)**: `diffusion_attn.apply(unet, \"hidiffusion\")` was not available when this "
                "ran; the end-to-end UNet timing (dense vs RAU-Net active / inactive step) is still to be measured.")
        print("hidiffusion: not available yet (TODO)", flush=True)
    else:
        try:
            hidi = run_hidiffusion(args)
        except Exception as e:
            errors.append(f"hidiffusion: {type(e).__name__}: {e}")
            hidi = f"FAILED: {errors[-1]}"
            print(hidi, flush=True)
    print(f"# total {time.perf_counter() - t_start:.0f}s", flush=True)

    if args.merge:  # earlier rows in case order, this run's replacing those it measured again
        new = {r["name"]: r for r in rows}
        order = [c.name for c in cases]
        merged = {r["name"]: r for r in earlier_rows} | new
        rows = sorted(merged.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        if isinstance(hidi, str) and hidi.startswith("not run") and earlier_hidi is not None:
            hidi = earlier_hidi
    out.write_text(markdown(rows, hidi, meta, errors))
    print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows, hidiffusion=hidi, errors=errors), indent=1))
    for e in errors:
        print(f"FAILED {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
