"""Placement: layers, steps (indices and schedule fractions), branches and heads, and that the first
version's dense_layers / dense_steps keep their meaning through it."""

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.adapters import layer_kind
from diffusion_attn.placement import Placement, StepWindow, Where


def test_from_dense_is_the_first_versions_rule():
    p = Placement.from_dense(dense_layers=2, dense_steps=3)
    on = {(layer, step) for layer in range(4) for step in range(5)
          if p.active(Where(layer=layer, step=step, num_steps=5))}
    assert on == {(layer, step) for layer in (2, 3) for step in (3, 4)}
    assert Placement.from_dense().active(Where(layer=0, step=0))
    assert Placement().describe() == "everywhere"


def test_layer_selectors_indices_ranges_kinds():
    p = Placement(layers=(0, range(4, 6), "single"), skip_layers=(5,))
    assert [i for i in range(8) if p.layer_on(i, "double")] == [0, 4]
    assert [i for i in range(8) if p.layer_on(i, "single")] == [0, 1, 2, 3, 4, 6, 7]
    assert Placement(layers="up").layer_on(3, "up") and not Placement(layers="up").layer_on(3, "down")


def test_layer_kinds_from_diffusers_names():
    assert layer_kind("transformer_blocks.0.attn.processor") == "double"
    assert layer_kind("single_transformer_blocks.3.attn.processor") == "single"
    assert layer_kind("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor") == "down"
    assert layer_kind("mid_block.attentions.0.transformer_blocks.0.attn1.processor") == "mid"
    assert layer_kind("up_blocks.3.attentions.2.transformer_blocks.0.attn1.processor") == "up"
    assert layer_kind("blocks.7.attn1.processor") == "block"


def test_step_windows_by_index_and_by_fraction():
    by_index = StepWindow(2, 5)
    assert [s for s in range(8) if by_index.contains(s, 8)] == [2, 3, 4]
    by_fraction = StepWindow(0.25, 0.5)
    assert [s for s in range(8) if by_fraction.contains(s, 8)] == [2, 3]
    # the schedule position given directly (ComfyUI's sigmas): the window survives a sampler split
    assert by_fraction.contains(None, fraction=0.3) and not by_fraction.contains(None, fraction=0.5)
    assert StepWindow().contains(None)
    with pytest.raises(ValueError, match="number of steps"):
        by_fraction.contains(3)


@pytest.mark.parametrize("bad", [-1, 1.5, float("nan"), "3", True])
def test_step_window_rejects_bad_bounds(bad):
    with pytest.raises(ValueError, match="StepWindow"):
        StepWindow(bad)


def test_branches_and_heads():
    p = Placement(branches=("uncond", "perturbed"), heads=(3, 1, 3))
    assert p.branch_on("perturbed") and not p.branch_on("cond") and not p.branch_on(None)
    assert Placement().branch_on(None)
    assert p.heads == (1, 3)
    assert p.head_mask(4).tolist() == [False, True, False, True]
    assert Placement().head_mask(4) is None
    with pytest.raises(ValueError, match="has 2 heads"):
        p.head_mask(2)
    with pytest.raises(ValueError, match="branches"):
        Placement(branches=("conditional",))
    with pytest.raises(ValueError, match="heads"):
        Placement(heads=())
    with pytest.raises(ValueError, match="layer kind"):
        Placement(layers=("encoder",))


def test_processor_placement_by_kind_on_flux():
    """GNA placed on Flux's single-stream blocks only equals GNA installed on those blocks alone, with
    the stock processors left on the double-stream blocks; and differs from GNA everywhere."""
    from diffusion_attn.models.tiny import build_pipeline, default_call_kwargs

    pipe = build_pipeline("tiny-flux-random")
    model = pipe.transformer
    run = lambda: pipe(prompt="a fox", generator=torch.Generator().manual_seed(0), **default_call_kwargs("flux"))[0]  # noqa: E731
    original = dict(model.attn_processors)
    assert {layer_kind(n) for n in original} == {"double", "single"}
    try:
        model.set_attn_processor(da.GNAProcessor(window=3, placement=Placement(layers="single")))
        handle = da.attach(model)
        placed = run()
        handle.remove()
        only_single = {n: (da.GNAProcessor(window=3) if layer_kind(n) == "single" else p) for n, p in original.items()}
        model.set_attn_processor(only_single)
        handle = da.attach(model)
        assert torch.equal(run(), placed)
        handle.remove()
        model.set_attn_processor(da.GNAProcessor(window=3))
        handle = da.attach(model)
        everywhere = run()
        handle.remove()
    finally:
        model.set_attn_processor(original)
    assert not torch.allclose(everywhere, placed)


def test_head_placement_runs_the_method_on_the_chosen_heads_only():
    """Placement(heads=(1,)): head 1 gets GNA, heads 0 and 2 the plain attention (SDPA, no mask)."""
    import torch.nn.functional as F

    from diffusion_attn.context import RunContext
    from diffusion_attn.layout import TokenLayout

    layout = TokenLayout((10,), 0)
    ctx = RunContext("wan")
    ctx.grid, ctx.step = layout.grid, 0
    proc = da.GNAProcessor(window=3, backend="reference", placement=Placement(heads=(1,))).bind(ctx, None, 0)
    q, k, v = (torch.randn(2, 10, 3, 4, dtype=torch.float64) for _ in range(3))
    out = proc.core(q, k, v, layout)
    window = torch.zeros(10, 10, dtype=torch.bool)
    for i in range(10):  # NATTEN's window of 3, shifted inward at the borders
        start = min(max(i - 1, 0), 7)
        window[i, start:start + 3] = True
    sdpa = lambda m: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # noqa: E731
                                                    attn_mask=m).transpose(1, 2)
    plain, windowed = sdpa(None), sdpa(window)
    assert torch.allclose(out[:, :, 1], windowed[:, :, 1], atol=1e-10)
    assert torch.allclose(out[:, :, [0, 2]], plain[:, :, [0, 2]], atol=1e-10)
    assert not torch.allclose(windowed[:, :, 1], plain[:, :, 1])
    with pytest.raises(ValueError, match="has 3 heads"):
        da.GNAProcessor(window=3, placement=Placement(heads=(5,))).bind(ctx, None, 0).core(q, k, v, layout)


def test_apply_takes_a_placement():
    """apply(..., placement=) equals the processors placed by hand; a step window as a fraction of the
    schedule equals the same window as indices; placement= with dense_steps is an error that leaves
    the pipeline untouched."""
    from diffusion_attn.models.tiny import build_pipeline, default_call_kwargs

    pipe = build_pipeline("tiny-flux-random")
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    run = lambda **kw: pipe(prompt="a fox", generator=torch.Generator().manual_seed(0),  # noqa: E731
                            **default_call_kwargs("flux", num_inference_steps=4, **kw))[0]
    original = dict(model.attn_processors)
    stock = run()
    with da.applied(pipe, "gna", window=3, placement=Placement(layers="single")) as h:
        assert h.placement.layers == ("single",)
        placed = run()
    only_single = {n: (da.GNAProcessor(window=3) if layer_kind(n) == "single" else p) for n, p in original.items()}
    model.set_attn_processor(only_single)
    handle = da.attach(model)
    try:
        assert torch.equal(run(), placed)
    finally:
        handle.remove()
        model.set_attn_processor(dict(original))  # diffusers empties the dict it is given
    with da.applied(pipe, "gna", window=3, dense_steps=2):
        by_index = run()
    with da.applied(pipe, "gna", window=3, placement=Placement(steps=StepWindow(0.5))):
        assert torch.equal(run(), by_index)
    assert not torch.equal(by_index, stock) and not torch.equal(placed, stock)
    with pytest.raises(ValueError, match="either as placement= or as dense_steps"):
        da.apply(pipe, "gna", window=3, dense_steps=1, placement=Placement(layers="single"))
    with pytest.raises(ValueError, match="either as placement= or as dense_layers"):
        da.apply(pipe, da.GNAConfig(window=3, dense_layers=1), placement=Placement())
    assert dict(model.attn_processors) == original and not da.remove(pipe)
    assert torch.equal(run(), stock)
