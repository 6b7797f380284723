"""Time the Triton block-sparse kernel against dense SDPA and compiled FlexAttention on a GPU.

Needs a CUDA GPU and ``pip install "diffusion-attn[kernels]"`` (``--quick`` also runs on CPU under
``TRITON_INTERPRET=1``, where the numbers mean nothing). ``--sweep`` also times block_m / block_n /
num_warps / num_stages variants per case. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffusion_attn import TokenLayout  # noqa: E402
from diffusion_attn.kernels import flex_available, pattern_attention, sdpa  # noqa: E402
from diffusion_attn.kernels.flex import flex_block_mask, sequence_mask_mod  # noqa: E402
from diffusion_attn.kernels.triton_sparse import _import_triton as import_triton  # noqa: E402
from diffusion_attn.kernels.triton_sparse import (  # noqa: E402
    build_triton_layout,
    default_config,
    triton_pattern_attention,
)
from diffusion_attn.patterns import neighborhood_pattern, radial_pattern  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_triton.py",
                                 description="Time the Triton block-sparse kernel against dense SDPA and flex on a GPU.")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (also runs on CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--sweep", action="store_true", help="also time block_m / block_n / num_warps / num_stages variants")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--block", type=int, default=128, help="layout tile size (64 or 128)")
    args = ap.parse_args(argv)
    triton = import_triton()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cases = [  # name, pattern, layout, heads, head_dim, padded text (the shapes of benchmarks/bench_attention.py)
        ("radial-wan-81f", radial_pattern((21, 30, 52), 0.2, True), TokenLayout((21, 30, 52)), 12, 128, False),
        ("gna-strided-wan-33f", neighborhood_pattern((9, 30, 52), (5, 15, 26), (1, 5, 13)), TokenLayout((9, 30, 52)), 12, 128, False),
        ("gna-flux-1024", neighborhood_pattern((64, 64), (32, 32), (16, 16)), TokenLayout((64, 64), 512, "first"), 24, 128, True),
    ]
    if args.quick:
        cases = [("radial-quick", radial_pattern((3, 8, 16), 0.2, True), TokenLayout((3, 8, 16), 7, "first"), 2, 64, True),
                 ("gna-quick", neighborhood_pattern((4, 8, 12), (3, 5, 5), (1, 2, 2)), TokenLayout((4, 8, 12)), 2, 64, False)]

    def bench(fn):
        if dev == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=200)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    for name, pattern, layout, heads, d, padded in cases:
        t0 = time.perf_counter()
        tl_layout = build_triton_layout(pattern, layout, args.block, device=dev)
        build_s = time.perf_counter() - t0
        S = layout.num_tokens
        q, k, v = (torch.randn(1, S, heads, d, device=dev, dtype=dtype) for _ in range(3))
        kpm = None
        if padded:  # the last 40 % of the text tokens are padding
            kpm = torch.ones(1, S, dtype=torch.bool, device=dev)
            kpm[:, layout.text_slice.stop - int(0.4 * layout.text_len) : layout.text_slice.stop] = False
        out = triton_pattern_attention(q, k, v, tl_layout, layout, kpm)
        # exactness on 256 sampled query rows: dense SDPA with the exact mask of those rows
        rows = torch.randperm(S, device=dev)[:256].sort().values
        mask = sequence_mask_mod(pattern, layout, kpm, dev)(0, None, rows[:, None], torch.arange(S, device=dev)[None, :])
        ref = sdpa(q[:, rows].float(), k.float(), v.float(), mask[None, None])
        row = {"case": name, "tokens": S, "density": round(tl_layout.density, 3), "visited": round(tl_layout.visited_density, 3),
               "partial tiles": tl_layout.num_partial, "layout MB": round(tl_layout.nbytes / 2**20, 1),
               "build s": round(build_s, 1), "max err": f"{(out[:, rows].float() - ref).abs().max().item():.1e}"}
        row["dense ms"] = round(bench(lambda: sdpa(q, k, v, None if kpm is None else kpm[:, None, None, :])), 3)
        row["triton ms"] = round(bench(lambda: triton_pattern_attention(q, k, v, tl_layout, layout, kpm)), 3)
        if dev == "cuda" and flex_available("cuda"):
            bm = flex_block_mask(pattern, layout, key_padding_mask=kpm, device=dev)
            run_flex = lambda: pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="flex", block_mask=bm)  # noqa: E731
            run_flex()  # compile
            row["flex ms"] = round(bench(run_flex), 3)
        row["speedup vs dense"] = round(row["dense ms"] / row["triton ms"], 2)
        print(row, flush=True)
        if args.sweep and dev == "cuda":
            print("   default:", default_config(args.block, d, dtype))
            for bm_ in (64, 128):
                for bn_ in (32, 64, 128):
                    for w in (4, 8):
                        for st in (1, 2, 3):
                            if bm_ > args.block or bn_ > args.block:
                                continue
                            cfg = dict(block_m=bm_, block_n=bn_, num_warps=w, num_stages=st)
                            try:
                                ms = f"{bench(lambda: triton_pattern_attention(q, k, v, tl_layout, layout, kpm, **cfg)):.3f} ms"
                            except Exception as e:  # out of shared memory, ...
                                ms = type(e).__name__
                            print(f"   {cfg}: {ms}", flush=True)



if __name__ == "__main__":
    main()
