#!/usr/bin/env python
"""AgentSD benchmark: one UNet step (one forward of an SD 1.5-shaped UNet) with AgentSD / ToMe vs stock
attention, random weights (seed 0), fp32, built in-process from the real SD 1.5 UNet config (no downloads).

    python benchmarks/bench_agent.py --quick                       # smoke run: a tiny-width UNet, seconds
    python benchmarks/bench_agent.py --out benchmarks/results/agent.md   # 512^2 (batch 2) + 1024^2 (batch 1)
    python benchmarks/bench_agent.py --sizes 512 --batch 2 --repeats 3 --threads 2

Variants (``diffusion_attn.apply(unet, "agent", switch=1.0, ...)``: one phase, so the bare UNet needs no
step count):

* ``dense``: the stock processors;
* ``agent-early``: the official early phase, ``sx=sy=4, ratio=0.4, agent_ratio=0.95`` (agents: m = N/16);
* ``tome``: ``sx=sy=2, ratio=0.4, agent_ratio=0.5``: the official late phase, where ``2m >= n`` gives no
  agents, i.e. ToMe for SD with the same settings (``agents=False`` computes exactly the same).

The last row estimates a whole 50-step AgentSD run from the two phases: ``0.4 * early + 0.6 * late``
(steps 0-19 early, 20-49 late).

Times: every variant gets one untimed warm-up call (not when ``--repeats`` is 1 for that size), then
``--repeats`` timed calls interleaved (D E T, then reversed), medians; also the process CPU time (all threads), which waiting for a core on a shared machine
does not inflate. Peak memory: the resident-set growth during one call (Linux ``VmHWM`` reset through
``/proc/self/clear_refs`` after ``malloc_trim``, minus ``VmRSS`` before the call: weights and inputs
excluded; the same method as ``bench_denoiser.py``), the largest over the timed calls. On CPU the stock
attention is SDPA (flash-style, O(N) memory), unlike the official's einsum attention with N x N scores
on which the paper's memory saving was measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusion_attn as da  # noqa: E402
from bench_denoiser import SD15_QUICK, SD15_UNET, machine_info, peak_growth, reset_peak  # noqa: E402

VARIANTS = {
    "dense": None,
    "agent-early": dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95),
    "tome": dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5),
}
SWITCH = 0.4  # official: step 20 of 50


def build_unet(quick: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**(SD15_QUICK if quick else SD15_UNET)).eval()


def one_call(unet, variant: str, inputs: dict) -> tuple[float, float, int | None]:
    params = VARIANTS[variant]
    handle = da.apply(unet, "agent", switch=1.0, **params) if params is not None else None
    try:
        rss = reset_peak()
        torch.manual_seed(0)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            unet(**inputs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu, peak_growth(rss)
    finally:
        if handle is not None:
            handle.remove()


def bench_size(unet, size: int, batch: int, repeats: int, quick: bool, log) -> dict:
    latent = size // 8
    g = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    inputs = dict(sample=torch.randn(batch, 4, latent, latent, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(batch, 77, width, generator=g), return_dict=False)
    names = list(VARIANTS)
    if repeats > 1:  # warm-up (skipped for single-call sizes, where it would double a long run)
        for name in names:
            one_call(unet, name, inputs)
    results = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            results[name].append(one_call(unet, name, inputs))
            log(f"  {size}^2 {name} repeat {i}: {results[name][-1][0]:.2f} s")
    out = {}
    for name, rows in results.items():
        out[name] = dict(wall=statistics.median(r[0] for r in rows), cpu=statistics.median(r[1] for r in rows),
                         peak=max((r[2] for r in rows if r[2] is not None), default=None),
                         walls=[r[0] for r in rows])
    tokens = latent * latent
    return dict(size=size, latent=latent, batch=batch, repeats=repeats, tokens=tokens, rows=out)


def fmt_mb(b):
    return "-" if b is None else f"{b / 2 ** 20:,.0f}"


def markdown(results: list[dict], meta: dict, command: str) -> str:
    lines = [
        "# AgentSD benchmark: one SD 1.5 UNet step, dense vs AgentSD / ToMe",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']} (CPU), diffusers {meta['diffusers']}, "
        f"Python {meta['python']}, {meta['threads']} threads, fp32. {meta['model']}; random weights (seed 0), "
        "77 random text tokens. The machine is shared with other processes: absolute times vary; the variants are "
        "interleaved in one process, so their ratios stay meaningful.",
        "",
        f"Command: `{command}` ({meta['date']}, {meta['minutes']:.1f} min, {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end).",
        "",
        "| size | latent | batch | variant | settings | tokens in attn1 (top level) | agents | n | step s | speedup | "
        "speedup (CPU time) | peak MB | memory ratio |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        rows, n = res["rows"], res["tokens"]
        dense = rows["dense"]
        for name, row in rows.items():
            params = VARIANTS[name]
            if params is None:
                settings, merged, agents = "stock attention (SDPA)", f"{n:,}", "-"
            else:
                settings = f"sx=sy={params['sx']}, ratio {params['ratio']}, agent_ratio {params['agent_ratio']}"
                r = int(n * params["ratio"])
                dst = (res["latent"] // params["sy"]) * (res["latent"] // params["sx"])
                m = n - min(int(n * params["agent_ratio"]), n - dst)
                merged = f"{n - r:,}"
                agents = f"{m:,}" if 2 * m < n - r else "none (ToMe)"
            speed = dense["wall"] / row["wall"]
            cpu = dense["cpu"] / row["cpu"]
            mem = (f"{dense['peak'] / row['peak']:.2f}x" if row["peak"] and dense["peak"] else "-")
            lines.append(f"| {res['size']}^2 | {res['latent']}^2 | {res['batch']} | {name} | {settings} | {merged} | "
                         f"{agents} | {res['repeats']} | {row['wall']:.2f} | **{speed:.2f}x** | {cpu:.2f}x | "
                         f"{fmt_mb(row['peak'])} | {mem} |")
        early, late = rows["agent-early"], rows["tome"]
        run = SWITCH * early["wall"] + (1 - SWITCH) * late["wall"]
        run_cpu = SWITCH * early["cpu"] + (1 - SWITCH) * late["cpu"]
        lines.append(f"| {res['size']}^2 | {res['latent']}^2 | {res['batch']} | AgentSD 50-step run (estimate) | "
                     f"{SWITCH:.0%} early + {1 - SWITCH:.0%} late | | | | {run:.2f} | **{dense['wall'] / run:.2f}x** | "
                     f"{dense['cpu'] / run_cpu:.2f}x | | |")
    lines += [
        "",
        "step s: median wall time of one UNet forward (n timed calls per variant). speedup = dense / variant (wall "
        "clock); speedup (CPU time): the same from the process CPU time (all threads). peak MB: resident-set growth "
        "during one call (VmHWM reset via /proc/self/clear_refs after malloc_trim, minus VmRSS before; weights and "
        "inputs excluded), the largest over the timed calls; memory ratio = dense / variant. tokens in attn1: the "
        "merged token count n at the full-latent level (max_downsample=1; the other levels are untouched); agents: m.",
        "",
        "The paper (agentsd/README.md, RTX 4090, fp16, 50 PLMS steps, 512^2): AgentSD 1.70x faster, 2.02x less "
        "memory than SD 1.5, whose LDM attention materialises N x N scores; here the stock attention is PyTorch SDPA "
        "on CPU (no N x N scores), so the memory saving is only the merged activations.",
        "",
        "Timed repeats (s): " + "; ".join(f"{r['size']}^2 {k}: " + ", ".join(f"{w:.2f}" for w in v["walls"])
                                           for r in results for k, v in r["rows"].items()),
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024", help="image sizes in px (latent = size / 8)")
    p.add_argument("--batch", default="2,1", help="batch per size (2 = one CFG step), comma-separated")
    p.add_argument("--repeats", default="3,1", help="timed calls per variant and size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny-width UNet at 256^2 and 512^2 (smoke run)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]

    def per_size(text):
        vals = [int(v) for v in text.split(",")]
        return (vals + vals[-1:] * len(sizes))[:len(sizes)]

    batches, repeats = per_size(args.batch), per_size(args.repeats)
    if args.quick:
        sizes, batches, repeats = [256, 512], [2, 1], [2, 1]
    meta = machine_info(args.threads)
    meta["model"] = ("SD 1.5-shaped UNet2DConditionModel, " + ("tiny widths (--quick)" if args.quick else
                     "the real config (block widths 320/640/1280/1280, 2 layers per block, 8 heads, cross-attention 768)"))
    start = time.time()
    unet = build_unet(args.quick)
    results = []
    for size, batch, rep in zip(sizes, batches, repeats):
        print(f"{size}^2, batch {batch}, {rep} repeats", flush=True)
        results.append(bench_size(unet, size, batch, rep, args.quick, lambda s: print(s, flush=True)))
    meta["minutes"] = (time.time() - start) / 60
    meta["date"] = datetime.date.today().isoformat()
    try:
        meta["load_end"] = "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        meta["load_end"] = "load n/a"
    command = "python benchmarks/bench_agent.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, meta, command.strip())
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
