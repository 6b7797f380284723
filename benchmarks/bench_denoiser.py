#!/usr/bin/env python
"""Denoiser benchmark: one denoising step (one forward call of the denoiser) with each method vs stock
attention, at real model widths with few blocks and random weights, built in-process (no downloads).

    python benchmarks/bench_denoiser.py --quick                  # smoke run: tiny widths and sizes, ~10 s
    python benchmarks/bench_denoiser.py --json benchmarks/results/denoiser.json   # default cases, ~18 min on 2 cores
    python benchmarks/bench_denoiser.py --all                    # every case and variant (~45 min or more)
    python benchmarks/bench_denoiser.py --only wan-33f --repeats 3 --threads 2
    python benchmarks/bench_denoiser.py --only gna-blocked,flux-1024 --json /tmp/d.json
    python benchmarks/bench_denoiser.py --only wan-81f --merge benchmarks/results/denoiser.json \
        --json benchmarks/results/denoiser.json                 # add a case to an earlier run's table
    python benchmarks/plot.py                                    # speedup.png from the JSON results

Models (random init, seed 0, fp32, batch 1; ``--list`` shows every case and variant):

* **Wan 2.1 1.3B-shaped** ``WanTransformer3DModel``: the real config (12 heads x 128 = 1536 wide, FFN
  8960, UMT5 text width 4096, 512 text tokens) with 1 of its 30 blocks (``--wan-blocks``), at 480 x 832:
  33 frames -> latent 9 x 60 x 104 -> 9 x 30 x 52 = 14,040 tokens; 81 frames (21 x 30 x 52 = 32,760
  tokens) with ``--all`` or ``--only wan-81f``.
* **FLUX.1-shaped** ``FluxTransformer2DModel``: the real config (24 heads x 128 = 3072 wide, T5 width
  4096, 512 text tokens first, guidance embedding) with 1 double + 1 single block (of 19 + 38) at
  1024^2 (64 x 64 image tokens) and 2048^2 (128 x 128).
* **SD 1.5-shaped** ``UNet2DConditionModel``: the real config (block widths 320/640/1280/1280, 2 layers per
  block, 8 heads, cross-attention 768, 77 text tokens) at 2048^2 (latent 256 x 256), whole UNet.

Variants per model: ``dense`` (the stock processors, no method applied) and the methods through
``diffusion_attn.apply(model, method, **params)``:

* radial: the Wan defaults (decay 0.2, first-frame sink) but ``dense_steps=0, dense_layers=0``, so the
  timed step is a sparse one in every layer; backend ``auto`` (compiled FlexAttention from 8,192 tokens
  where ``torch.compile`` works) and ``gather``;
* gna: configs at 10-20 % grid density (sliding, strided and blocked windows);
* hidiffusion: the official schedule at 2048^2 for SD 1.5 (T1 = 0.7, T2 = 0.3) with a 4-step run, so
  step 0 has RAU-Net's RAD conv + avg-pool, step 1 the conv only, step 2 neither (MSW-MSA only). The
  run context counts steps from timestep changes: before the timed call at step k the script calls the
  UNet at timesteps 0..k-1 on a small latent (untimed), then asserts the context is at step k.

Per variant: one untimed first call (per-layout builds: patterns, tile schedules, FlexAttention block
masks and its compile; reported as ``first call s``), then ``--repeats`` timed calls (3; 1 for the
slow cases) interleaved with the
dense ones in the same process (D S1 S2 ... then reversed, alternating), medians reported. Between calls
the method is applied and removed again (excluded from the times), and the per-layout cache of the
method's run context (``handle.context.cache``) is carried from one of its calls to the next, as it is
from one step to the next in a real run.

Columns: step s (median wall time of the forward), speedup = dense / method (wall clock; also from the
process's CPU time, all threads, which waiting for a core on a shared machine does not inflate); attention core s (time in
the attention core of the self-attention layers during the call -- Wan ``attn1``, every Flux ``attn``,
every UNet ``attn1`` --: SDPA for dense layers, the method's kernel for sparse ones; see
:class:`AttentionTimer`), core share (of the dense step), core speedup; self-attn modules s (the whole
modules: projections, norms, RoPE and core); density (the method's allowed (query, key) pairs / S^2 of
the replaced layers, text included), predicted (the tile-level upper bound of the attention speedup,
``diffusion-attn simulate`` for the backend), and end-to-end bounds by Amdahl's law:
``1 / ((1 - a) + a / s)`` with ``a`` the core share and ``s`` = 1 / density (ideal) or the predicted
attention speedup; peak MB: resident-set growth during one call
(Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` after ``malloc_trim``, minus ``VmRSS`` before the
call; weights and inputs excluded), the largest over the timed calls.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import diffusion_attn as da  # noqa: E402
from diffusion_attn import TokenLayout  # noqa: E402
from diffusion_attn.kernels import choose_backend, strip_plan  # noqa: E402
from diffusion_attn.kernels.simulate import predicted_speedup, simulate  # noqa: E402
from diffusion_attn.registry import get_method  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# model configs (the real checkpoints' configs; the number of blocks is set per case)
# ---------------------------------------------------------------------------------------------------------
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_QUICK = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, text_dim=64, freq_dim=32, ffn_dim=128)
FLUX_1 = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))
FLUX_QUICK = dict(FLUX_1, num_attention_heads=2, attention_head_dim=64, joint_attention_dim=64, pooled_projection_dim=32,
                  axes_dims_rope=(8, 28, 28))
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 layers_per_block=2, in_channels=4, out_channels=4, sample_size=64,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_QUICK = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32)

RADIAL_NOTE = ("radial: Wan defaults (decay 0.2, sink) with dense_steps=0, dense_layers=0 so that the timed step is "
               "sparse in every layer; a run with the full defaults keeps 12 of 50 steps and the first of 30 layers dense.")


# ---------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str  # dense | radial | gna-blocked | hidiffusion-s0 ... (unique within a case)
    method: str | None  # None = stock processors
    params: dict = field(default_factory=dict)
    config: str = ""  # the method's parameters, as shown in the table
    step: int = 0  # the denoising step the timed call is (hidiffusion)
    num_steps: int | None = None  # length of the run the step belongs to (hidiffusion)
    default: bool = True  # in the default run (else: --all, or named in --only)


@dataclass
class Case:
    name: str
    family: str  # wan | flux | unet
    model: str  # the table's model column
    reduced: str  # what differs from the real model
    config: dict
    blocks: dict  # num_layers / num_single_layers (transformers)
    latent: tuple[int, ...]  # wan: latent (C, T, H, W); flux: packed token grid (H, W); unet: latent (C, H, W)
    variants: list[Variant]
    default: bool = True
    repeats: int = 3  # default timed repeats (--repeats overrides)
    text_len: int = 512
    #: one untimed first call per method variant before the timed ones (per-layout builds, flex compile);
    #: off where the builds are trivial and a call is expensive (HiDiffusion's window schedules: ~0.02 s)
    first_call: bool = True

    @property
    def layout(self) -> TokenLayout:
        """The token layout of the self-attention layers the methods replace."""
        if self.family == "wan":
            _, t, h, w = self.latent
            p = self.config["patch_size"]
            return TokenLayout((t // p[0], h // p[1], w // p[2]), 0)
        if self.family == "flux":
            return TokenLayout(self.latent, self.text_len, "first")
        return TokenLayout(self.latent[1:], 0)  # UNet top level (HiDiffusion's MSW-MSA layers)


def gna(name, window, stride=1, default=True) -> Variant:
    stride_txt = "stride 1" if stride == 1 else ("stride = window" if stride == window else f"stride {stride}")
    return Variant(name, "gna", dict(window=window, stride=stride), f"window {window}, {stride_txt}", default=default)


def radial_variants(defaults=("radial",)) -> list[Variant]:
    base = dict(decay_factor=0.2, sink=True, dense_steps=0, dense_layers=0)
    cfg = "decay 0.2, sink, dense_steps 0, dense_layers 0"
    return [Variant("radial", "radial", dict(base), cfg + " (backend auto)", default="radial" in defaults),
            Variant("radial-gather", "radial", dict(base, backend="gather"), cfg + " (backend gather)",
                    default="radial-gather" in defaults)]


def hidiffusion_variants(num_steps: int, latent: int, default_steps=(0, 2)) -> list[Variant]:
    from diffusion_attn.patches.raunet import raunet_schedule

    sched = raunet_schedule("sd15", (latent, latent), num_steps)
    out = []
    for i in range(num_steps):
        on = [n for n, f in (("RAD conv", sched.conv_on), ("avg-pool", sched.block_on)) if f(i)]
        stage = ("RAU-Net " + " + ".join(on)) if on else "RAU-Net off"
        out.append(Variant(f"hidiffusion-s{i}", "hidiffusion", dict(num_steps=num_steps, seed=0),
                           f"step {i}/{num_steps}: {stage}, MSW-MSA", step=i, num_steps=num_steps,
                           default=i in default_steps))
        if not on:
            break  # later steps are the same as this one
    return out


def full_cases(wan_blocks: int = 1) -> list[Case]:
    wan_reduced = f"{wan_blocks} of 30 blocks"
    cases = [
        Case("wan-33f", "wan", "Wan2.1-1.3B 480x832 33f", wan_reduced, WAN_1_3B, dict(num_layers=wan_blocks),
             (16, 9, 60, 104), [
                 *radial_variants(("radial",)),
                 gna("gna-sliding", (5, 15, 26), 1, default=False),
                 gna("gna-strided", (5, 15, 26), (1, 5, 13)),
                 gna("gna-blocked", (5, 15, 26), (5, 15, 26)),
             ]),
        Case("wan-81f", "wan", "Wan2.1-1.3B 480x832 81f", wan_reduced, WAN_1_3B, dict(num_layers=wan_blocks),
             (16, 21, 60, 104), [
                 *radial_variants(("radial",)),
                 gna("gna-sliding", (11, 15, 26), 1, default=False),
                 gna("gna-strided", (11, 15, 26), (1, 5, 13)),
                 gna("gna-blocked", (11, 15, 26), (11, 15, 26)),
             ], default=False, repeats=1),
        Case("flux-1024", "flux", "FLUX.1 1024^2", "1 of 19 double + 1 of 38 single blocks", FLUX_1,
             dict(num_layers=1, num_single_layers=1), (64, 64), [
                 gna("gna-w32s16", (32, 32), (16, 16), default=False),
                 gna("gna-w24s8", (24, 24), (8, 8)),
             ]),
        Case("flux-2048", "flux", "FLUX.1 2048^2", "1 of 19 double + 1 of 38 single blocks", FLUX_1,
             dict(num_layers=1, num_single_layers=1), (128, 128), [
                 gna("gna-w48s16", (48, 48), (16, 16)),
                 gna("gna-w64s16", (64, 64), (16, 16), default=False),
             ], repeats=1),
        Case("sd15-2048", "unet", "SD 1.5 UNet 2048^2", "whole UNet", SD15_UNET, {}, (4, 256, 256),
             hidiffusion_variants(4, 256), repeats=1, text_len=77, first_call=False),
    ]
    return cases


def quick_cases() -> list[Case]:
    return [
        Case("wan-quick", "wan", "Wan-shaped (quick)", "2 heads x 32, 1 block", WAN_QUICK, dict(num_layers=1),
             (16, 5, 32, 64), [*radial_variants(("radial", "radial-gather")),
                               gna("gna-strided", (3, 8, 8), (1, 4, 4)), gna("gna-blocked", (2, 8, 8), (2, 8, 8))],
             text_len=32),
        Case("flux-quick", "flux", "Flux-shaped (quick)", "2 heads x 64, 1 double + 1 single", FLUX_QUICK,
             dict(num_layers=1, num_single_layers=1), (48, 48), [gna("gna-w16s8", (16, 16), (8, 8))], text_len=64),
        Case("sd15-quick", "unet", "SD 1.5-shaped (quick)", "widths 32,64,64,64", SD15_QUICK, {}, (4, 48, 48),
             hidiffusion_variants(4, 48, default_steps=(0, 1)), text_len=77, first_call=False),
    ]


def select(cases: list[Case], only: set[str], everything: bool) -> list[tuple[Case, list[Variant]]]:
    """(case, sparse variants) to run. ``only`` holds case names, method / variant names or ``case/variant``.

    Case names restrict the cases, method / variant names the variants (in every default case when no
    case is named); ``case/variant`` adds that one variant. Anything named explicitly runs even if it is
    off by default; ``everything`` (``--all``) turns every case and variant on.
    """
    case_tok = {t for t in only if t in {c.name for c in cases}}
    pair_tok = {tuple(t.split("/", 1)) for t in only if "/" in t}
    var_tok = only - case_tok - {"/".join(p) for p in pair_tok}
    out = []
    for c in cases:
        in_scope = c.name in case_tok if case_tok else (bool(var_tok) or not pair_tok)
        case_on = in_scope and (everything or c.default or c.name in case_tok)
        chosen = []
        for v in c.variants:
            var_on = (not var_tok or bool({v.name, v.method} & var_tok)) and (everything or v.default or v.name in var_tok)
            if (case_on and var_on) or (c.name, v.name) in pair_tok:
                chosen.append(v)
        if chosen:
            out.append((c, chosen))
    return out


# ---------------------------------------------------------------------------------------------------------
# models and inputs
# ---------------------------------------------------------------------------------------------------------
def build_model(case: Case):
    torch.manual_seed(0)
    if case.family == "wan":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(**dict(case.config, **case.blocks)).eval()
    if case.family == "flux":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(**dict(case.config, **case.blocks)).eval()
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**case.config).eval()


def make_inputs(case: Case, latent: tuple[int, ...] | None = None, seed: int = 0) -> Callable[[float], dict]:
    """``timestep -> forward kwargs`` for the case's latent (or ``latent``), fixed random tensors."""
    g = torch.Generator().manual_seed(seed)
    lat = latent or case.latent
    cfg = case.config
    if case.family == "wan":
        x = torch.randn(1, *lat, generator=g)
        enc = torch.randn(1, case.text_len, cfg["text_dim"], generator=g)
        return lambda t: dict(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=enc, return_dict=False)
    if case.family == "flux":
        h, w = lat
        x = torch.randn(1, h * w, cfg["in_channels"], generator=g)
        enc = torch.randn(1, case.text_len, cfg["joint_attention_dim"], generator=g)
        pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g)
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        img_ids = img_ids.reshape(h * w, 3)
        txt_ids = torch.zeros(case.text_len, 3)
        # the pipeline passes timestep / 1000 and guidance 3.5
        return lambda t: dict(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                              timestep=torch.tensor([t / 1000.0]), img_ids=img_ids, txt_ids=txt_ids,
                              guidance=torch.tensor([3.5]), return_dict=False)
    x = torch.randn(1, *lat, generator=g)
    enc = torch.randn(1, case.text_len, cfg["cross_attention_dim"], generator=g)
    return lambda t: dict(sample=x, timestep=torch.tensor([t]), encoder_hidden_states=enc, return_dict=False)


def small_latent(case: Case) -> tuple[int, ...]:
    """A cheap latent of the same family: warm-up calls and advancing the run context's step."""
    if case.family == "wan":
        return (case.latent[0], 1, 8, 8)
    if case.family == "flux":
        return (8, 8)
    return (case.latent[0], 16 if case.latent[1] < 128 else 32, 16 if case.latent[1] < 128 else 32)


def timesteps(num_steps: int) -> list[float]:
    """Falling timesteps of a ``num_steps`` run (DDIM-like spacing over 1000)."""
    stride = 1000 // num_steps
    return [float(999 - i * stride) for i in range(num_steps)]


def self_attention_modules(model, family: str) -> list[torch.nn.Module]:
    if family == "wan":
        return [b.attn1 for b in model.blocks]
    if family == "flux":
        return [b.attn for b in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]
    return [m for n, m in model.named_modules() if n.endswith("attn1")]


class AttentionTimer:
    """Wall time of the self-attention layers during a call (CPU calls are synchronous).

    * ``module_s``: inside the self-attention modules (forward pre/post hooks): q/k/v and output
      projections, norms, RoPE and the attention core;
    * ``core_s``: inside the attention core of those modules alone: ``torch.nn.functional
      .scaled_dot_product_attention`` (stock processors and dense layers) and the method's
      ``prepared_attention`` (its sparse kernel: gather, flex or reference, with everything it does per
      call), both wrapped while this timer is active and counted only inside a self-attention module and
      not nested. ``sparse_calls`` counts the method's kernel calls (a check that the wrapper saw them).
    """

    def __init__(self, modules):
        import diffusion_attn.processors.base as processor_base

        self.module_s = self.core_s = 0.0
        self.sparse_calls = 0
        self._depth = self._core_depth = 0
        self._t0 = 0.0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))
        self._base = processor_base
        self._sdpa = torch.nn.functional.scaled_dot_product_attention
        self._prepared = processor_base.prepared_attention
        torch.nn.functional.scaled_dot_product_attention = self._wrap(self._sdpa, sparse=False)
        processor_base.prepared_attention = self._wrap(self._prepared, sparse=True)

    def reset(self):
        self.module_s = self.core_s = 0.0
        self.sparse_calls = 0

    def _pre(self, module, args):
        if self._depth == 0:
            self._t0 = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, output):
        self._depth -= 1
        if self._depth == 0:
            self.module_s += time.perf_counter() - self._t0

    def _wrap(self, fn, sparse: bool):
        def timed(*args, **kwargs):
            if self._depth == 0 or self._core_depth > 0:
                return fn(*args, **kwargs)
            self._core_depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.core_s += time.perf_counter() - t0
                self._core_depth -= 1
                self.sparse_calls += sparse

        return timed

    def remove(self):
        for h in self._handles:
            h.remove()
        torch.nn.functional.scaled_dot_product_attention = self._sdpa
        self._base.prepared_attention = self._prepared


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def _proc_status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS")):
                    key, val = line.split(":")
                    out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak() -> int | None:
    """Release freed heap memory, reset ``VmHWM`` to the current RSS; returns the RSS (None: no procfs)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status().get("VmRSS")


def peak_growth(rss_before: int | None) -> int | None:
    if rss_before is None:
        return None
    hwm = _proc_status().get("VmHWM")
    return None if hwm is None else hwm - rss_before


@dataclass
class Runner:
    """Times single forward calls of one case's model, dense or with a method."""

    case: Case
    model: torch.nn.Module
    inputs: Callable[[float], dict]
    small: Callable[[float], dict]
    timer: AttentionTimer
    caches: dict = field(default_factory=dict)  # variant name -> carried run-context cache

    def call(self, v: Variant) -> dict:
        """One forward at ``v``'s step: wall and CPU time, attention core and module time, peak RSS growth."""
        handle = None
        ts = timesteps(v.num_steps or 1)
        if v.method is not None:
            handle = da.apply(self.model, v.method, **v.params)
            handle.context.cache.update(self.caches.get(v.name, {}))
        try:
            with torch.no_grad():
                for j in range(v.step):  # advance the run context to step v.step (untimed, small latent)
                    self.model(**self.small(ts[j]))
                kwargs = self.inputs(ts[v.step])
                rss = reset_peak()
                self.timer.reset()
                c0, t0 = time.process_time(), time.perf_counter()
                out = self.model(**kwargs)[0]
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                peak = peak_growth(rss)
                module_s, core_s, sparse_calls = self.timer.module_s, self.timer.core_s, self.timer.sparse_calls
            if handle is not None:
                assert handle.context.step == v.step, f"run context at step {handle.context.step}, expected {v.step}"
                self.caches[v.name] = dict(handle.context.cache)
        finally:
            if handle is not None:
                handle.remove()
        assert bool(torch.isfinite(out).all()), f"{self.case.name}/{v.name}: non-finite output"
        if v.method is not None and sparse_calls == 0:
            core_s = None  # the method's kernel was not seen: its core time is unknown
        return dict(s=dt, cpu=cpu, attn_s=core_s, module_s=module_s, peak=peak)


def pattern_stats(case: Case, v: Variant) -> dict:
    """Density, the backend ``auto`` (or the variant's ``backend``) picks, and the tile-level predicted
    attention speedup of ``v`` on the case's layout (analysis, not measurement: same as the processors'
    choice, :func:`diffusion_attn.kernels.choose_backend`)."""
    layout = case.layout
    if v.method is None:
        return dict(density=1.0, backend="dense", predicted=None)
    if v.method == "hidiffusion":  # MSW-MSA: 2 x 2 windows on the top level, 25 % by construction
        from diffusion_attn.patterns import shifted_window_pattern

        p = shifted_window_pattern(layout.grid, 0)
        return dict(density=p.density, backend=choose_backend(p, layout, v.params.get("backend", "auto")),
                    predicted=None, density_note="top-level attn1 only (MSW-MSA)")
    spec = get_method(v.method)
    resolved = spec.resolve(v.params, case.family)
    pattern = spec.grid_pattern(layout, **resolved)
    backend = choose_backend(pattern, layout, resolved.get("backend", "auto"))
    density, predicted = simulate(pattern, layout, q_tile=128, kv_tile=128).density, None
    if backend == "windows":  # the windows partition the grid: no masked work, the bound is 1 / density
        predicted = 1.0 / density
    elif backend == "strips":  # pairs its plan computes
        predicted = strip_plan(pattern).predicted_speedup(layout.text_len)
    else:
        try:
            predicted = predicted_speedup(pattern, layout, backend).speedup
        except (ValueError, TypeError):  # no tile model for this backend
            pass
    return dict(density=density, backend=backend, predicted=predicted, grid_density=pattern.density)


def run_case(case: Case, variants: list[Variant], args, log) -> list[dict]:
    t0 = time.perf_counter()
    model = build_model(case)
    n_params = sum(p.numel() for p in model.parameters())
    inputs, small = make_inputs(case), make_inputs(case, small_latent(case), seed=1)
    log(f"{case.name}: built {type(model).__name__} ({case.reduced}, {n_params / 1e6:.0f}M params) in "
        f"{time.perf_counter() - t0:.1f}s; layout {case.layout.describe()}")
    timer = AttentionTimer(self_attention_modules(model, case.family))
    try:
        return _run_case(case, variants, args, log, model, n_params, Runner(case, model, inputs, small, timer))
    finally:
        timer.remove()


def _run_case(case, variants, args, log, model, n_params, runner) -> list[dict]:
    small = runner.small
    dense = Variant("dense", None, config="stock attention processors")
    # warm-up on the small latent (thread pools, code paths, oneDNN primitives): dense and each method
    with torch.no_grad():
        model(**small(999.0))
    first = {}
    for v in variants if case.first_call else ():
        t = time.perf_counter()
        res = runner.call(v)  # untimed first call: per-layout builds, flex compile
        first[v.name] = time.perf_counter() - t
        log(f"  {v.name}: first call {first[v.name]:.1f}s (forward {res['s']:.1f}s)")
    repeats = args.repeats or case.repeats
    times = {v.name: [] for v in [dense, *variants]}
    order = [dense, *variants]
    for r in range(repeats):
        for v in (order if r % 2 == 0 else order[::-1]):
            res = runner.call(v)
            times[v.name].append(res)
            log(f"  repeat {r + 1}/{repeats} {v.name}: {res['s']:.2f}s (CPU {res['cpu']:.1f}s, attention core {fmt_s(res['attn_s'])}, "
                f"self-attn modules {res['module_s']:.2f}s, peak {fmt_mb(res['peak'])} MB)")

    def summary(name):
        rs = times[name]
        peaks = [x["peak"] for x in rs if x["peak"] is not None]
        core = [x["attn_s"] for x in rs]
        return dict(s=statistics.median(x["s"] for x in rs), cpu=statistics.median(x["cpu"] for x in rs),
                    cpu_all=[x["cpu"] for x in rs],
                    attn_s=None if None in core else statistics.median(core),
                    module_s=statistics.median(x["module_s"] for x in rs),
                    all=[x["s"] for x in rs], attn_all=core, module_all=[x["module_s"] for x in rs],
                    peak=max(peaks) if peaks else None)

    d = summary("dense")
    rows = []
    layout = case.layout
    for v in variants:
        m = summary(v.name)
        row = dict(
            name=f"{case.name}/{v.name}", case=case.name, variant=v.name, method=v.method, model=case.model,
            reduced=case.reduced, params_m=n_params / 1e6, config=v.config, params=v.params, step=v.step,
            grid=list(layout.grid), text_len=case.text_len, tokens=layout.num_tokens, first_call_s=first.get(v.name),
            dense_s=d["s"], sparse_s=m["s"], dense_all=d["all"], sparse_all=m["all"],
            dense_cpu_s=d["cpu"], sparse_cpu_s=m["cpu"], dense_cpu_all=d["cpu_all"], sparse_cpu_all=m["cpu_all"],
            cpu_speedup=d["cpu"] / m["cpu"] if m["cpu"] > 0 else None,
            attn_dense_s=d["attn_s"], attn_sparse_s=m["attn_s"], attn_dense_all=d["attn_all"], attn_sparse_all=m["attn_all"],
            module_dense_s=d["module_s"], module_sparse_s=m["module_s"], module_dense_all=d["module_all"],
            module_sparse_all=m["module_all"],
            peak_dense=d["peak"], peak_sparse=m["peak"], repeats=repeats,
        )
        row["speedup"] = d["s"] / m["s"]
        row["attn_share"] = d["attn_s"] / d["s"] if d["s"] > 0 and d["attn_s"] is not None else None
        row["attn_speedup"] = d["attn_s"] / m["attn_s"] if m["attn_s"] and d["attn_s"] else None
        row["module_share"] = d["module_s"] / d["s"] if d["s"] > 0 else 0.0
        rows.append(analyse(row, case, v))
    return rows


def analyse(row: dict, case: Case, v: Variant) -> dict:
    """Add the analytical columns to a measured row: density, backend, predicted core speedup and the
    end-to-end bounds (Amdahl over the attention core's share of the dense step)."""
    st = pattern_stats(case, v)
    row.update(backend=st["backend"], density=st["density"], grid_density=st.get("grid_density"),
               density_note=st.get("density_note"), predicted=st["predicted"])
    a = row.get("attn_share")
    if v.method != "hidiffusion" and a is not None:
        row["ideal_e2e"] = 1.0 / ((1 - a) + a * st["density"])
        row["predicted_e2e"] = None if st["predicted"] is None else 1.0 / ((1 - a) + a / st["predicted"])
    else:  # hidiffusion: RAU-Net changes the rest of the UNet too, Amdahl over attention does not apply
        row["ideal_e2e"] = row["predicted_e2e"] = None
    return row


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------
def fmt_mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def fmt_s(x) -> str:
    return "n/a" if x is None else f"{x:.2f}s"


def fmt_pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def fmt_x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def machine_info(threads: int) -> dict:
    from bench_attention import cpu_model  # same folder (the script's own directory is on sys.path)

    model = cpu_model()
    import diffusers

    try:
        load = "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "load n/a"
    return dict(cpu=model, cores=os.cpu_count(), threads=threads, torch=torch.__version__,
                diffusers=diffusers.__version__, python=platform.python_version(), load_start=load)


def spread_note(rows: list[dict]) -> str:
    """The largest spread (max / min - 1) of the repeated step times, for the rows with n > 1."""
    def spread(xs):
        return max(xs) / min(xs) - 1 if xs and min(xs) > 0 else 0.0

    rep = [r for r in rows if len(r.get("dense_all") or []) > 1]
    if not rep:
        return ""
    worst = max(rep, key=lambda r: max(spread(r["dense_all"]), spread(r["sparse_all"])))
    return (f"Spread of the repeated step times (max / min - 1): at most {spread(worst['dense_all']):.0%} dense and "
            f"{spread(worst['sparse_all']):.0%} method ({worst['name']}); every repeat is in the JSON.")


def markdown(rows: list[dict], meta: dict, errors=(), pending: str = "") -> str:
    runs = meta.get("runs") or [meta]
    lines = [
        "# Denoiser benchmark: one denoising step, dense vs method",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']} (CPU), diffusers {meta['diffusers']}, "
        f"Python {meta['python']}, {meta['threads']} threads, fp32, batch 1. Random weights (seed 0), models built "
        "in-process at the real configs with fewer blocks (`reduced`). The machine is shared: other processes ran "
        "during the runs, so absolute times vary; dense and method calls are interleaved in the same process, so the "
        "ratios stay meaningful.",
        "",
        "Command" + ("s (rows of a case come from the command that ran it):" if len(runs) > 1 else ":"),
        "",
        *(f"* `{r['command']}`: {', '.join(r.get('cases') or [])}; {r.get('date')}, {(r.get('total_s') or 0) / 60:.1f} min, "
          f"{r.get('load_start', 'load n/a')} at the start" + (f", {r['load_end']} at the end" if r.get("load_end") else "")
          for r in runs),
        *([f"* analytical columns (density, backend, predicted, bounds) recomputed by `{meta['rendered']}`"]
          if meta.get("rendered") else []),
        "",
        "| case | model (reduced) | variant | config | backend | tokens | density | n | dense step s | method step s | "
        "speedup | speedup (CPU time) | attn core s dense / method | core share | core speedup | predicted core | ideal e2e | predicted e2e | "
        "self-attn modules s dense / method | first call s | peak MB dense / method |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        first = "-" if r.get("first_call_s") is None else f"{r['first_call_s']:.1f}"
        dens = f"{r['density']:.1%}" + (" (top level)" if r.get("density_note") else "")
        tok = f"{r['tokens']:,}" + (f" ({r['text_len']} text)" if r["method"] != "hidiffusion" and r["text_len"] and
                                    r["case"].startswith("flux") else "")
        lines.append(
            f"| {r['case']} | {r['model']} ({r['reduced']}) | {r['variant']} | {r['config']} | {r['backend']} | {tok} | "
            f"{dens} | {r['repeats']} | {r['dense_s']:.2f} | {r['sparse_s']:.2f} | **{r['speedup']:.2f}x** | {fmt_x(r.get('cpu_speedup'))} | "
            f"{fmt_s(r['attn_dense_s'])} / {fmt_s(r['attn_sparse_s'])} | {fmt_pct(r['attn_share'])} | "
            f"{fmt_x(r['attn_speedup'])} | {fmt_x(r['predicted'])} | {fmt_x(r['ideal_e2e'])} | {fmt_x(r['predicted_e2e'])} | "
            f"{r['module_dense_s']:.2f} / {r['module_sparse_s']:.2f} | {first} | "
            f"{fmt_mb(r['peak_dense'])} / {fmt_mb(r['peak_sparse'])} |"
        )
    lines += [
        "",
        "n: timed calls of each (dense and method, interleaved); times are their medians (n = 1: a single call each). "
        "speedup = dense step / method step (one forward of the denoiser), wall clock; speedup (CPU time): the same "
        "from the process's CPU time (all threads), less sensitive to other processes taking the cores (time waiting "
        "for a core does not count; spinning threads and cache pressure still do). attn core s: time in the attention core of "
        "the self-attention layers during the step (Wan `attn1`, Flux `attn` of every block, UNet `attn1` of every "
        "level): SDPA in dense layers, the method's kernel (`prepared_attention`: gather / strips / windows / flex / reference, "
        "with its per-call work) in sparse ones. backend: what `auto` picks for the layout. core share: its share of the dense step. self-attn modules s: the whole "
        "modules (q/k/v/output projections, norms, RoPE and core). density: the method's allowed "
        "(query, key) pairs / S^2 of the replaced layers (text included). predicted core: the tile-level upper bound "
        "of the attention speedup for the backend (`diffusion-attn simulate`; windows: 1 / density, no masked work). ideal / predicted e2e: Amdahl, "
        "1 / ((1 - share) + share / s) with s = 1 / density or the predicted attention speedup. first call s: the "
        "untimed first call (per-layout pattern + schedule builds; flex: also its compile); '-': none, the first "
        "timed call includes the builds (HiDiffusion: ~0.02 s of window schedules). peak MB: resident-set "
        "growth during one call (weights and inputs excluded).",
        "",
        spread_note(rows),
        RADIAL_NOTE if any(r["method"] == "radial" for r in rows) else "",
        "HiDiffusion rows: one step of a 4-step run (`num_steps=4, seed=0`; the official SD 1.5 RAU-Net schedule for "
        "the latent size, at 2048^2 T1 = 0.7, T2 = 0.3: RAD conv in steps 0-1, avg-pool in step 0); "
        "density is that of MSW-MSA's 2 x 2 windows on the top-level `attn1` layers only (the other levels stay "
        "dense); RAU-Net shrinks the feature maps of every deeper level in its steps, so Amdahl over attention does "
        "not apply." if any(r["method"] == "hidiffusion" for r in rows) else "",
        "",
        *(f"**FAILED** {e}  " for e in errors),
        pending,
    ]
    return "\n".join(lines).rstrip() + "\n"


def render(args, parser) -> int:
    try:
        data = json.loads(Path(args.render).read_text())
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"--render: cannot read {args.render}: {e}")
    known = {(c.name, v.name): (c, v) for c in full_cases(args.wan_blocks) + quick_cases() for v in c.variants}
    for row in data.get("rows", []):
        if (row.get("case"), row.get("variant")) in known:
            analyse(row, *known[(row["case"], row["variant"])])
    out = Path(args.out or "benchmarks/results/denoiser.md")
    data["meta"]["rendered"] = "python " + " ".join([os.path.relpath(__file__, os.getcwd()), *sys.argv[1:]])
    out.write_text(markdown(data.get("rows", []), data["meta"], data.get("errors", [])))
    Path(args.render).write_text(json.dumps(data, indent=1))
    print(f"wrote {out} and {args.render}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny widths and sizes: checks that everything runs (seconds)")
    p.add_argument("--only", default="", help="comma-separated case names (--list), methods (radial, gna, hidiffusion), "
                                               "variant names or case/variant")
    p.add_argument("--all", action="store_true", help="every case and variant, also those off by default")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default: per case, 3; 1 for the slow ones)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--wan-blocks", type=int, default=1, help="transformer blocks of the Wan model (default 1 of 30)")
    p.add_argument("--out", default=None, help="markdown output (default benchmarks/results/denoiser.md, quick: "
                                                "denoiser-quick.md); rewritten after every case")
    p.add_argument("--json", default=None, help="also write the raw results (every repeat) as JSON here")
    p.add_argument("--merge", default=None, help="keep the rows of an earlier --json of this script (replacing those "
                                                  "measured again) and list both commands; e.g. to add a case later")
    p.add_argument("--list", action="store_true", help="list the cases and variants and exit")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: recompute the analytical columns (density, backend, predicted, bounds) of the "
                        "rows of an earlier --json with the current code, rewrite that JSON and the markdown (--out)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = quick_cases() if args.quick else full_cases(args.wan_blocks)
    if args.render:
        return render(args, p)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    known = {c.name for c in cases} | {v.name for c in cases for v in c.variants} | {"radial", "gna", "hidiffusion"}
    known |= {f"{c.name}/{v.name}" for c in cases for v in c.variants}
    unknown = sorted(only - known)
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)}; see --list{' --quick' if args.quick else ''}")
    if args.list:
        for c in cases:
            print(f"{c.name:<11} {c.model} ({c.reduced}), layout {c.layout.describe()}{'' if c.default else '  [--all]'}")
            for v in c.variants:
                print(f"    {v.name:<16} {v.config}{'' if v.default else '  [--all]'}")
        return 0
    selected = select(cases, only, args.all)
    if not selected:
        p.error("--only selects nothing")
    args.out = args.out or f"benchmarks/results/denoiser{'-quick' if args.quick else ''}.md"

    meta = machine_info(args.threads)
    run = dict(command="python " + " ".join([os.path.relpath(__file__, os.getcwd()), *(argv if argv is not None else sys.argv[1:])]),
               date=datetime.date.today().isoformat(), cases=[c.name for c, _ in selected], load_start=meta.pop("load_start"))
    earlier_rows, runs = [], []
    if args.merge:  # rows of an earlier run, kept unless this run measures the same case / variant again
        try:
            data = json.loads(Path(args.merge).read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--merge: cannot read {args.merge}: {e}")
        earlier_rows, old = data.get("rows", []), data.get("meta", {})
        runs = old.get("runs") or [dict({k: old.get(k) for k in ("command", "date", "total_s", "load_start", "load_end")},
                                        cases=sorted({r.get("case") for r in earlier_rows}))]
    runs.append(run)
    meta["runs"] = runs
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    log(f"{meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}, {args.threads} threads; "
        f"{sum(len(v) for _, v in selected)} variants in {len(selected)} cases")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, errors = [], []

    def write(pending=""):
        run["total_s"] = time.perf_counter() - t_start
        new = {r["name"] for r in rows}
        all_rows = [r for r in earlier_rows if r.get("name") not in new] + rows
        order = {c.name: i for i, c in enumerate(cases)}
        all_rows.sort(key=lambda r: order.get(r.get("case"), len(order)))  # stable: variants keep their order
        out.write_text(markdown(all_rows, meta, errors, pending))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(dict(meta=meta, rows=all_rows, errors=errors), indent=1))

    for i, (case, variants) in enumerate(selected):
        try:
            new = run_case(case, variants, args, log)
        except Exception as e:  # keep the other cases; fail at the end
            errors.append(f"{case.name}: {type(e).__name__}: {e}")
            log(f"{case.name} FAILED: {errors[-1]}")
            continue
        for r in new:
            log(f"{r['name']}: dense {r['dense_s']:.2f}s, {r['variant']} {r['sparse_s']:.2f}s -> {r['speedup']:.2f}x "
                f"(CPU time {fmt_x(r['cpu_speedup'])}) "
                f"(attention core {fmt_s(r['attn_dense_s'])} -> {fmt_s(r['attn_sparse_s'])}, share {fmt_pct(r['attn_share'])})")
        rows += new
        rest = [c.name for c, _ in selected[i + 1:]]
        write(f"\n_Partial: still to run: {', '.join(rest)}._" if rest else "")
    try:
        run["load_end"] = "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    write()
    log(f"wrote {out}" + (f" and {args.json}" if args.json else ""))
    for e in errors:
        print(f"FAILED {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
