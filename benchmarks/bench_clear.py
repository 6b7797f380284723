#!/usr/bin/env python
"""CLEAR benchmarks: Flux attention speed against dense SDPA, and the shapes-world quality of distillation.

    python benchmarks/bench_clear.py kernels                          # 64^2 / 128^2 / 256^2 image tokens, r 8/16/32
    python benchmarks/bench_clear.py kernels --sizes 64 --radii 8 --backends chunked,flex --repeats 3
    python benchmarks/bench_clear.py kernels --sizes 64,128 --radii 8,16,32 --backends auto,gather,strips,sliding,flex
    python benchmarks/bench_clear.py quality --weights /work/runs/clear/tiny-flux-r2/clear_local_2.safetensors --radius 2

**kernels**: one Flux attention call, 1 head, head_dim 128, fp32, CPU, ``H x W`` image tokens (``--sizes``:
64 = 1024 px, 128 = 2048 px, 256 = 4096 px) + 512 text tokens, text first. Per case: density (allowed pairs /
S^2 of CLEAR's mask, text included), dense SDPA time (``diffusion_attn.kernels.sdpa``, what the stock
processor runs), and CLEAR's time through ``diffusion_attn.kernels.prepared_attention`` with each backend
(``auto``: what the processor would pick), the pattern's preparation (BlockMask, ...) built once before the
timed calls and reported as "build" (flex: its first compile is in the first case's build). Dense is
timed once per size (``--repeats`` calls, one call from 20K tokens on), each backend ``--repeats`` calls;
medians of CPU time (``time.process_time``: the machine is shared, wall time would count other jobs).
``--backends auto,gather,strips,sliding,flex`` compares the box kernels (CLEAR's circle as its bounding box
refined by the disc, ``BoxPattern(refine=...)``) with compiled FlexAttention. A size whose dense call would take longer than ``--max-dense-s`` (estimated from the smaller
sizes) is skipped and said so.

**quality**: the trained ``tiny-flux`` (64 x 64 px -> 8 x 8 image tokens + 32 text) on ``--prompts`` held-out
shapes-world prompts (``benchmarks/quality.py``'s prompts, seeds and scorer): dense, CLEAR at ``--radius``
with the model's own weights ("no distillation") and with ``--weights`` (distilled by
``python -m diffusion_attn.training.clear``). Object / position accuracy and duplication (the scorer,
``diffusion_attn.data.score_image``) and PSNR / SSIM against dense.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _time(fn, repeats):
    """CPU seconds (``time.process_time``: this process only, so other jobs on a shared machine do not
    count) of ``repeats`` calls."""
    out = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return out


def kernels(args) -> list[str]:
    from diffusion_attn.kernels import prepared_attention, sdpa
    from diffusion_attn.kernels.registry import resolve
    from diffusion_attn.kernels.backend import Request
    from diffusion_attn.layout import TokenLayout
    from diffusion_attn.patterns.circular import CircularWindow
    from diffusion_attn.viz import density as method_density

    lines = ["| image tokens | S | r | density | dense s | backend | build s | CLEAR s | speedup | ideal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    per_pair = None  # dense seconds per (query, key) pair, from the first size
    for side in args.sizes:
        layout = TokenLayout((side, side), 512, "first")
        s = layout.num_tokens
        if per_pair is not None and per_pair * s * s > args.max_dense_s:
            lines.append(f"| {side}x{side} | {s:,} | - | - | ~{per_pair * s * s:.0f} (est.) | skipped | | | | |")
            print(f"skip {side}: dense estimated {per_pair * s * s:.0f} s > --max-dense-s", file=sys.stderr)
            continue
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, s, 1, 128, generator=g) for _ in range(3))
        sdpa(q, k, v)  # warm-up
        dense_t = statistics.median(_time(lambda: sdpa(q, k, v), args.repeats if s < 20000 else 1))
        per_pair = dense_t / (s * s)
        for r in args.radii:
            pattern = CircularWindow(layout.grid, r)
            dens = method_density("clear", layout, radius=r)
            for backend in args.backends:
                cache = {}
                cached = lambda key, build: cache[key] if key in cache else cache.setdefault(key, build())  # noqa: E731
                name = backend
                if backend == "auto":
                    name = "auto=" + resolve(Request.make(pattern, layout, q=q, k=k, v=v), "auto").name
                run = lambda: prepared_attention(q, k, v, pattern, layout, cached=cached, key=("clear", r),  # noqa: E731
                                                 backend=backend)
                try:
                    t0 = time.process_time()
                    run()  # builds (and compiles) what the backend caches
                    build = time.process_time() - t0
                    sparse = statistics.median(_time(run, args.repeats))
                    lines.append(f"| {side}x{side} | {s:,} | {r} | {dens:.4f} | {dense_t:.3f} | {name} | {build:.2f} | "
                                 f"{sparse:.3f} | {dense_t / sparse:.2f}x | {1 / dens:.1f}x |")
                except Exception as e:  # report and go on
                    lines.append(f"| {side}x{side} | {s:,} | {r} | {dens:.4f} | {dense_t:.3f} | {name} | failed: "
                                 f"{type(e).__name__}: {str(e)[:80]} | | | |")
                print(lines[-1], file=sys.stderr)
    return lines


def quality(args) -> list[str]:
    import diffusion_attn as da
    from diffusion_attn.data import image_metrics
    from quality import held_out_prompts, load_model, generate, score

    model = load_model("tiny-flux", args.steps)
    prompts = held_out_prompts(args.prompts, video=False)
    rows = [("dense", None)] + [(f"CLEAR r={args.radius}" + (f" f={args.down_factor}" if args.down_factor > 1 else "")
                                 + " (no distillation)", dict(radius=args.radius, down_factor=args.down_factor))]
    for w in args.weights or []:
        rows.append((f"CLEAR r={args.radius}" + (f" f={args.down_factor}" if args.down_factor > 1 else "")
                     + f" distilled ({Path(w).parent.name})", dict(radius=args.radius, down_factor=args.down_factor, weights=w)))
    lines = ["| attention | objects % | positions % | duplication % | PSNR vs dense dB | SSIM vs dense |",
             "|---|---|---|---|---|---|"]
    dense_out = None
    for name, params in rows:
        if params is None:
            outputs, _ = generate(model, prompts)
            dense_out = outputs
        else:
            with da.applied(model.pipe, "clear", **params):
                outputs, _ = generate(model, prompts)
        verdicts = score(outputs, prompts, False)
        obj = 100 * statistics.mean(float(v.object_correct) for v in verdicts)
        asked = [float(v.position_correct) for v in verdicts if v.position_correct is not None]
        pos = 100 * statistics.mean(asked) if asked else float("nan")
        dup = 100 * statistics.mean(float(v.duplicated) for v in verdicts)
        metrics = [image_metrics(a, b) for a, b in zip(outputs, dense_out)]
        psnrs = [m["psnr"] for m in metrics if math.isfinite(m["psnr"])]
        psnr = statistics.mean(psnrs) if psnrs else float("inf")
        ssim = statistics.mean(m["ssim"] for m in metrics)
        lines.append(f"| {name} | {obj:.1f} | {pos:.1f} | {dup:.1f} | {psnr:.2f} | {ssim:.3f} |")
        print(lines[-1], file=sys.stderr)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[64, 128, 256])
    k.add_argument("--radii", type=lambda t: [int(x) for x in t.split(",")], default=[8, 16, 32])
    k.add_argument("--backends", type=lambda t: t.split(","), default=["auto"])
    k.add_argument("--repeats", type=int, default=3)
    k.add_argument("--max-dense-s", dest="max_dense_s", type=float, default=300.0)
    k.add_argument("--threads", type=int, default=1)
    qa = sub.add_parser("quality")
    qa.add_argument("--radius", type=int, default=2)
    qa.add_argument("--down-factor", dest="down_factor", type=int, default=1)
    qa.add_argument("--weights", action="append", help="distilled weights file (repeatable)")
    qa.add_argument("--prompts", type=int, default=50)
    qa.add_argument("--steps", type=int, default=None)
    qa.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = kernels(args) if args.command == "kernels" else quality(args)
    print("\n".join([f"`python benchmarks/bench_clear.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
                     f"(torch {torch.__version__}, {args.threads} thread(s))", ""] + lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
