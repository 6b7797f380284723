#!/usr/bin/env python
"""Context-parallel benchmark: one denoiser step on 1 process vs N processes (diffusers' Ulysses or ring
context parallelism, ``diffusion_attn.parallel``), stock attention and the methods.

    python benchmarks/bench_parallel.py                                  # 1 vs 2 ranks, Ulysses, gloo on CPU
    python benchmarks/bench_parallel.py --mode ring --device cuda        # GPUs with NCCL only (see below)
    python benchmarks/bench_parallel.py --md benchmarks/results/parallel.md

No multi-GPU machine was lent for this project: on CPU with gloo this is a **correctness run** (every
rank's output against the one-process output, max abs difference) with indicative timings. On a CPU the
N processes share the machine's cores and the all-to-all goes through gloo, so N ranks are not expected
to be faster; on GPUs with NCCL the same script measures the real scaling (``--device cuda``).

Model: a ``WanTransformer3DModel`` with random weights (seed 0), 4 heads x 32, 2 blocks, fp32, batch 1,
latent 5 x 32 x 48 -> 5 x 16 x 24 = 1,920 tokens (``--frames``, ``--height``, ``--width`` change it).
Variants: ``stock`` (diffusers' processors, through diffusers' own Ulysses / ring templates), ``gna``
(window 3 x 7 x 7), ``radial`` (decay 0.3) with ``dense_layers=0, dense_steps=0``. Per variant one
untimed call, then ``--repeats`` timed calls; the table gives the median seconds per step.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "stock": None,
    "gna": ("gna", dict(window=(3, 7, 7), dense_layers=0, dense_steps=0)),
    "radial": ("radial", dict(decay_factor=0.3, dense_layers=0, dense_steps=0)),
}


def _model(args):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=256, num_layers=2,
                                 rope_max_seq_len=64).eval()


def _inputs(args, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, args.frames, args.height, args.width, generator=g)
    text = torch.randn(1, 16, 32, generator=g)
    return dict(hidden_states=x.to(device), timestep=torch.tensor([500.0], device=device),
                encoder_hidden_states=text.to(device), return_dict=False)


def _worker(args, out_path: str) -> None:
    import diffusion_attn as da
    from diffusion_attn import parallel

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        parallel.init_distributed("nccl" if args.device == "cuda" else "gloo")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu"
    results = {}
    for name, method in VARIANTS.items():
        model = _model(args).to(device)
        if world > 1:
            degree = dict(ulysses_degree=world) if args.mode == "ulysses" else dict(ring_degree=world)
            parallel.enable_context_parallel(model, **degree)
        handle = da.apply(model, method[0], **method[1]) if method else None
        inputs = _inputs(args, device)
        times = []
        with torch.no_grad():
            out = model(**inputs)[0]
            for _ in range(args.repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(**inputs)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        if handle is not None:
            handle.remove()
        results[name] = dict(seconds=statistics.median(times), out=out.float().cpu())
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out_path)
    if world > 1:
        parallel.shutdown()


def _launch(args, ranks: int, out_path: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        cmd = [sys.executable, __file__, "--worker", out_path] + args.forward
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
    if any(p.wait() for p in procs):
        raise SystemExit(f"{ranks}-rank run failed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="processes of the parallel run (default: 2)")
    parser.add_argument("--mode", choices=("ulysses", "ring"), default="ulysses")
    parser.add_argument("--frames", type=int, default=5, help="latent frames (default: 5)")
    parser.add_argument("--height", type=int, default=32, help="latent height (default: 32)")
    parser.add_argument("--width", type=int, default=48, help="latent width (default: 48)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--md", help="write the markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    if args.worker:
        _worker(args, args.worker)
        return 0
    if args.mode == "ring" and args.device == "cpu":
        parser.error("--mode ring needs --device cuda here: this Wan model's cross-attention is diffusers' stock "
                     "processor, and diffusers' only CPU backend (native SDPA) has no ring op; ring on CPU is "
                     "checked on Flux / HunyuanVideo in tests/test_context_parallel.py")
    args.forward = ["--mode", args.mode, "--frames", str(args.frames), "--height", str(args.height), "--width",
                    str(args.width), "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = os.path.join(tmp, "1.pt"), os.path.join(tmp, "n.pt")
        _launch(args, 1, one)
        _launch(args, args.ranks, many)
        r1, rn = torch.load(one), torch.load(many)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    lines = [f"Wan-shaped transformer (4 heads x 32, 2 blocks, random), {tokens} tokens, fp32, {args.device}, "
             f"{args.threads} thread(s) per process; {args.mode} over {args.ranks} ranks vs 1 process.", "",
             f"| variant | 1 rank s/step | {args.ranks} ranks s/step | max abs diff vs 1 rank |", "|---|---|---|---|"]
    for name in VARIANTS:
        a, b = r1[name], rn[name]
        diff = (a["out"] - b["out"]).abs().max().item()
        lines.append(f"| {name} | {a['seconds']:.3f} | {b['seconds']:.3f} | {diff:.2e} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
