"""Every model family's adapter in sparse mode equals the STOCK diffusers processor of that attention
class given the pattern's full boolean mask.

Methods: GNA on every transformer family (sliding, strided, dilated and even windows), radial on the
video families (at a size where the official block algorithm applies), HiDiffusion's MSW-MSA on the
UNets (SD 1.5, SDXL), each with several backends.

The expected values never come from the package: the masks are built by explicit loops
(:mod:`mask_oracle`; radial: the naive official algorithm of tests/test_patterns.py), and the attention is computed by diffusers' own processor object (the one the
model had before ``apply``), called on the very inputs our processor received during a real pipeline
run (tiny random models, fp32, 2 steps with CFG, so padded text and both CFG branches take part).

How the mask reaches the stock processor, per attention class (diffusers 0.42):

* ``FluxAttnProcessor`` (Flux double- and single-stream blocks), ``WanAttnProcessor``,
  ``HunyuanVideoAttnProcessor2_0`` (dual and single blocks) pass ``attention_mask`` to
  ``dispatch_attention_fn``: we pass the full ``(B, 1, S, S)`` mask (for HunyuanVideo and-ed with the
  model's own text padding mask, which the stock processor receives).
* ``AttnProcessor2_0`` (UNet ``attn1``) honours ``attention_mask`` through ``prepare_attention_mask``:
  we pass a ``(B, S, S)`` mask (it repeats it per head).
* ``JointAttnProcessor2_0`` (SD3) and ``MochiAttnProcessor2_0`` accept ``attention_mask`` but ignore it
  for the attention core (SD3 drops it; Mochi uses it only to select each sample's real text tokens and
  calls ``F.scaled_dot_product_attention`` without a mask). For these two the stock processor runs
  unchanged -- its own projections, norms, RoPE, text selection and output projections -- while
  ``torch.nn.functional.scaled_dot_product_attention`` is replaced, for that call only, by SDPA with the
  mask for the sequence it receives (for Mochi: the video tokens plus that sample's real text tokens).

Each comparison also checks that the mask was honoured: the stock processor with the mask differs from
the stock processor without it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import diffusion_attn as da
from diffusion_attn.models.tiny import default_call_kwargs

from mask_oracle import gna_axis, gna_mask, msw_mask, with_text
from pipes import pipe_cache

ATOL = RTOL = 1e-5

# model -> (token grid of the default call, text position, attention module name prefixes by block kind)
MODELS = {
    "tiny-flux-random": ((8, 12), "first", {"double": "transformer_blocks.", "single": "single_transformer_blocks."}),
    "tiny-sd3": ((8, 12), "last", {"joint": "transformer_blocks."}),
    "tiny-wan-random": ((3, 8, 12), None, {"self": "blocks."}),
    "tiny-hunyuanvideo": ((3, 8, 12), "last", {"dual": "transformer_blocks.", "single": "single_transformer_blocks."}),
    "tiny-mochi": ((3, 8, 12), "last", {"joint": "transformer_blocks."}),
}
ATTN_SUFFIX = {"tiny-flux-random": ".attn", "tiny-sd3": ".attn", "tiny-wan-random": ".attn1", "tiny-hunyuanvideo": ".attn",
               "tiny-mochi": ".attn1"}
# a sliding, strided, dilated or even window on each family (stride <= window, window * dilation <= size)
GNA = {
    "tiny-flux-random": dict(window=(3, 5), stride=(2, 3), dilation=(2, 1)),
    "tiny-sd3": dict(window=(4, 5), stride=(4, 1), dilation=(1, 2)),
    "tiny-wan-random": dict(window=(2, 3, 5), stride=(1, 2, 2), dilation=(1, 2, 1)),
    "tiny-hunyuanvideo": dict(window=(1, 4, 3), stride=(1, 1, 3), dilation=(1, 1, 3)),
    "tiny-mochi": dict(window=(3, 3, 4), stride=(1, 3, 2), dilation=(1, 2, 2)),
}
# UNet: HiDiffusion's MSW-MSA blocks (official lists) and their self-attention grid at the default size
UNET = {
    "tiny-sd15-random": ((16, 24), [f"down_blocks.0.attentions.{a}.transformer_blocks.0.attn1" for a in (0, 1)]
                  + [f"up_blocks.3.attentions.{a}.transformer_blocks.0.attn1" for a in (0, 1, 2)]),
    "tiny-sdxl": ((16, 24), [f"down_blocks.1.attentions.{a}.transformer_blocks.{t}.attn1" for a in (0, 1) for t in (0, 1)]
                  + [f"up_blocks.1.attentions.{a}.transformer_blocks.{t}.attn1" for a in (0, 1, 2) for t in (0, 1)]),
}
PROMPT = "a red fox in the snow"  # shorter than max_sequence_length: padded text in every family
NEGATIVE = "blurry, dark, low quality, watermark"  # another real length than the prompt's


pipe_for = pipe_cache()


@functools.lru_cache(maxsize=None)
def cached_gna_mask(grid, window, stride, dilation):
    return gna_mask(grid, window, stride, dilation)


@functools.lru_cache(maxsize=None)
def cached_msw_mask(grid, choice):
    return msw_mask(grid, choice)


def call_inputs(module, args, kwargs) -> dict:
    """The arguments of one ``module.forward`` call by name (``**cross_attention_kwargs`` flattened)."""
    sig = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def run_and_capture(pipe, family, modules, method, params, **call):
    """Apply ``method``, run the pipeline (2 steps, CFG; ``call`` overrides the tiny defaults), and
    return for every call of ``modules``: (module name, module, stock processor, inputs, our output)."""
    stock = {name: m.processor for name, m in modules.items()}
    captured = []
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out, name=name: captured.append(
        (name, mod, call_inputs(mod, args, kwargs), out)), with_kwargs=True) for name, m in modules.items()]
    try:
        with da.applied(pipe, method, **params):
            for name, m in modules.items():
                assert m.processor is not stock[name], f"{method} did not replace the processor of {name}"
            kw = default_call_kwargs(family, output_type="latent", **call)
            pipe(prompt=PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(0), **kw)
    finally:
        for h in hooks:
            h.remove()
    for name, m in modules.items():
        assert m.processor is stock[name]
    return [(name, mod, stock[name], inputs, out) for name, mod, inputs, out in captured]


@contextlib.contextmanager
def sdpa_masked(mask_for_length):
    """Within the block, ``F.scaled_dot_product_attention`` without a mask gets ``mask_for_length(S)``."""
    real = F.scaled_dot_product_attention
    calls = []

    def masked(query, key, value, attn_mask=None, *args, **kwargs):
        assert attn_mask is None, "the stock processor passed its own mask; the patch would replace it"
        calls.append(query.shape[-2])
        return real(query, key, value, mask_for_length(query.shape[-2]).to(query.device), *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = masked
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_matches_stock(name, kind, ours, masked, unmasked):
    ours, masked, unmasked = as_tuple(ours), as_tuple(masked), as_tuple(unmasked)
    assert len(ours) == len(masked), (name, len(ours), len(masked))
    for i, (o, e) in enumerate(zip(ours, masked)):
        if e is None:
            assert o is None, (name, i)
            continue
        torch.testing.assert_close(o, e, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} ({kind}) output {i}: {m}")
    # the mask was honoured (a stock processor that ignored it would give the unmasked result)
    assert max((m - u).abs().max().item() for m, u in zip(masked, unmasked) if m is not None) > 1e-3, name


@pytest.mark.parametrize("backend", ["reference", "gather", "strips", "auto"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gna_adapter_equals_stock_processor_with_full_mask(name, backend):
    grid = MODELS[name][0]
    params = GNA[name]
    grid_mask = cached_gna_mask(grid, params["window"], params["stride"], params["dilation"])
    check_transformer(name, "gna", dict(params, backend=backend), grid, grid_mask)


# radial at 9 latent frames of 8 x 16 tokens: 128 tokens per frame, so the official algorithm (which needs
# a multiple of 128 tokens) applies and 128-token blocks are frames; video frames for 9 latent frames
RADIAL_FRAMES = {"tiny-wan-random": 33, "tiny-hunyuanvideo": 33, "tiny-mochi": 49}
RADIAL = {"tiny-wan-random": (0.2, True), "tiny-hunyuanvideo": (0.95, False), "tiny-mochi": (0.95, False)}


@pytest.mark.parametrize("backend", ["reference", "gather", "auto"])
@pytest.mark.parametrize("name", list(RADIAL))
def test_radial_adapter_equals_stock_processor_with_full_mask(name, backend):
    """Radial's block mask from a naive re-statement of the official algorithm (tests/test_patterns.py's
    ``official_radial``), expanded to tokens: the block-pattern kernels through each video family."""
    from test_patterns import official_radial

    decay, sink = RADIAL[name]
    grid = (9, 8, 16)
    blocks = official_radial(grid[0], grid[1] * grid[2], decay, sink)
    assert 0.3 < blocks.float().mean() < 0.9  # sparse, and not trivially so
    grid_mask = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)
    params = dict(decay_factor=decay, sink=sink, dense_layers=0, dense_steps=0, backend=backend)
    check_transformer(name, "radial", params, grid, grid_mask, height=128, width=256, num_frames=RADIAL_FRAMES[name])


def check_transformer(name, method, params, grid, grid_mask, **call):
    """Run ``method`` on the tiny pipeline ``name`` and compare every captured call of every replaced
    attention module with the stock processor given ``grid_mask`` (+ dense text) as a full mask."""
    _, text_position, kinds = MODELS[name]
    pipe = pipe_for(name)
    denoiser = pipe.transformer
    modules = {n: m for n, m in denoiser.named_modules()
               if n.endswith(ATTN_SUFFIX[name]) and any(n.startswith(p) for p in kinds.values())}
    n_grid = math.prod(grid)
    assert grid_mask.shape == (n_grid, n_grid)
    calls = run_and_capture(pipe, name, modules, method, params, **call)
    seen = {kind: 0 for kind in kinds}
    for mod_name, attn, stock, inputs, ours in calls:
        kind = next(k for k, p in kinds.items() if mod_name.startswith(p))
        seen[kind] += 1
        accepted = set(inspect.signature(stock.__call__).parameters)
        args = {k: v for k, v in inputs.items() if k in accepted}
        hidden, text = args["hidden_states"], args.get("encoder_hidden_states")
        batch = hidden.shape[0]
        if name == "tiny-flux-random" and text is None:  # single blocks: [text, image] already joined
            text_len = hidden.shape[1] - n_grid
        elif name == "tiny-wan-random":
            assert text is None and hidden.shape[1] == n_grid
            text_len = 0
        else:
            text_len = text.shape[1]
        assert hidden.shape[1] in (n_grid, n_grid + text_len) and (name == "tiny-wan-random") == (text_len == 0), mod_name

        if name in ("tiny-sd3", "tiny-mochi"):
            def mask_for(length):  # video/image tokens first, then this call's (real) text tokens
                assert length >= n_grid
                return with_text(grid_mask, length - n_grid, text_first=False)

            with sdpa_masked(mask_for) as sdpa_calls:
                expected = stock(attn, **args)
            assert len(sdpa_calls) == (1 if name == "tiny-sd3" else batch), (mod_name, sdpa_calls)
            if name == "tiny-mochi":  # per sample: the video plus that sample's real text tokens
                real_text = inputs["attention_mask"].sum(1).tolist()
                assert sdpa_calls == [n_grid + t for t in real_text] and len(set(real_text)) == 2, sdpa_calls
        else:
            full = with_text(grid_mask, text_len, text_position == "first")
            mask = full.expand(batch, 1, *full.shape)
            if name == "tiny-hunyuanvideo":
                padding = args["attention_mask"]  # the model's own (B, 1, 1, S) text padding mask
                assert padding.dtype == torch.bool and padding.shape == (batch, 1, 1, full.shape[0])
                assert not bool(padding.all()), "the test needs padded text"
                mask = mask & padding
            else:
                assert args.get("attention_mask") is None, mod_name
            expected = stock(attn, **dict(args, attention_mask=mask))
        unmasked = stock(attn, **args)
        assert_matches_stock(mod_name, kind, ours, expected, unmasked)
    per_module = collections.Counter(c[0] for c in calls)
    assert set(per_module) == set(modules) and min(per_module.values()) >= 2, per_module  # every layer, both steps
    assert all(seen.values()), seen  # every block kind (Flux / HunyuanVideo: double and single)


@pytest.mark.parametrize("backend", ["reference", "gather", "strips", "windows", "auto"])
@pytest.mark.parametrize("shift", [1, 3])
@pytest.mark.parametrize("name", list(UNET))
def test_msw_msa_adapter_equals_stock_processor_with_full_mask(name, shift, backend):
    grid, targets = UNET[name]
    pipe = pipe_for(name)
    modules = {n: pipe.unet.get_submodule(n) for n in targets}
    mask = cached_msw_mask(grid, shift)
    params = dict(apply_raunet=False, shift=shift, backend=backend)
    calls = run_and_capture(pipe, "unet-sdxl" if name == "tiny-sdxl" else "unet-sd15", modules, "hidiffusion", params)
    assert sorted({c[0] for c in calls}) == sorted(targets)
    for mod_name, attn, stock, inputs, ours in calls:
        accepted = set(inspect.signature(stock.__call__).parameters)
        args = {k: v for k, v in inputs.items() if k in accepted}
        hidden = args["hidden_states"]
        assert hidden.ndim == 3 and hidden.shape[1] == math.prod(grid) and args.get("attention_mask") is None
        assert args.get("encoder_hidden_states") is None  # attn1: self-attention
        expected = stock(attn, **dict(args, attention_mask=mask.expand(hidden.shape[0], *mask.shape)))
        unmasked = stock(attn, **args)
        assert_matches_stock(mod_name, "attn1", ours, expected, unmasked)


# ---------------------------------------------------------------------------------------------------------
# The oracles themselves (NATTEN's own check is in test_adapters_optional.py, with natten installed)
# ---------------------------------------------------------------------------------------------------------


def _rows(table):
    return [[k for k, ok in enumerate(row) if ok] for row in table]


def test_gna_oracle_hand_examples():
    """Hand-written 1-D cases (each also what natten.na1d 0.21.7 gives on CPU)."""
    # sliding window 3 on 5 tokens: clamped inward at both borders
    assert _rows(gna_axis(5, 3)) == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]
    # even window 2: one key before, none after (NATTEN), clamped at the start
    assert _rows(gna_axis(4, 2)) == [[0, 1], [0, 1], [1, 2], [2, 3]]
    # blocked (stride = window = 2) on 5 tokens: the last, partial block shares the window of its centre
    assert _rows(gna_axis(5, 2, 2)) == [[0, 1], [0, 1], [2, 3], [2, 3], [3, 4]]
    # strided: window 3, stride 2 on 6 tokens: pairs of queries share the window of the pair's centre
    assert _rows(gna_axis(6, 3, 2)) == [[0, 1, 2], [0, 1, 2], [2, 3, 4], [2, 3, 4], [3, 4, 5], [3, 4, 5]]
    # dilation 2 on 6 tokens, window 2: even and odd positions separately
    assert _rows(gna_axis(6, 2, 1, 2)) == [[0, 2], [1, 3], [0, 2], [1, 3], [2, 4], [3, 5]]


def test_msw_oracle_is_the_official_roll_and_partition():
    """msw_mask on even grids against HiDiffusion's own steps: torch.roll by -shift, 2 x 2 windows."""
    for grid in [(8, 12), (16, 24), (4, 6)]:
        H, W = grid
        for choice in range(4):
            sh, sw = (choice * (H // 2 // 4), choice * (W // 2 // 4))
            tokens = torch.arange(H * W).view(H, W)
            if sh > 0:  # the official rolls only when the row shift is positive
                tokens = torch.roll(tokens, shifts=(-sh, -sw), dims=(0, 1))
            windows = tokens.view(2, H // 2, 2, W // 2).permute(0, 2, 1, 3).reshape(4, -1)
            expected = torch.zeros(H * W, H * W, dtype=torch.bool)
            for win in windows:
                expected[win[:, None], win[None, :]] = True
            assert torch.equal(msw_mask(grid, choice), expected), (grid, choice)


def test_with_text_places_dense_text():
    m = torch.tensor([[True, False], [False, True]])
    first = with_text(m, 1, text_first=True)
    assert first.tolist() == [[True, True, True], [True, True, False], [True, False, True]]
    last = with_text(m, 1, text_first=False)
    assert last.tolist() == [[True, False, True], [False, True, True], [True, True, True]]
    assert gna_mask((3, 4), 3).sum(1).tolist() == [9] * 12  # every query sees exactly 3 x 3 keys
