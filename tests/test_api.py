"""apply / remove / attach on the embedded tiny pipelines: full settings equal stock, sparse settings run
end to end (CFG on/off, batch 1/2), remove is exact, bad input leaves the pipeline untouched."""


import pytest
import torch

import diffusion_attn as da
from diffusion_attn.models.tiny import default_call_kwargs
from diffusion_attn.processors.install import get_processors
from pipes import pipe_cache

GRID = {"tiny-flux-random": (8, 12), "tiny-sd3": (8, 12), "tiny-wan-random": (3, 8, 12), "tiny-hunyuanvideo": (3, 8, 12), "tiny-mochi": (3, 8, 12)}
FAMILY = {"tiny-flux-random": "flux", "tiny-sd3": "sd3", "tiny-wan-random": "wan", "tiny-wan22": "wan", "tiny-hunyuanvideo": "hunyuanvideo",
          "tiny-mochi": "mochi"}


pipe_for = pipe_cache()


def generate(pipe, name, **overrides):
    kw = default_call_kwargs(FAMILY.get(name, name), **overrides)
    return pipe(prompt="a red fox in the snow", generator=torch.Generator().manual_seed(0), **kw)[0]


def snapshot(pipe):
    """Everything apply may touch: processor objects, hooks, the module's own attributes."""
    out = {}
    for m in da.denoisers(pipe):
        out[id(m)] = (get_processors(m), dict(getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) or {}), set(m.__dict__))
    return out


def assert_untouched(pipe, before):
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for key in before:
        procs_b, hooks_b, attrs_b = before[key]
        procs_a, hooks_a, attrs_a = after[key]
        assert procs_a.keys() == procs_b.keys() and all(procs_a[n] is procs_b[n] for n in procs_b)
        assert hooks_a.keys() == hooks_b.keys()
        assert attrs_a == attrs_b  # e.g. no instance ``forward`` / hook registry left behind


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(GRID))
def test_gna_full_window_reproduces_stock(name):
    pipe = pipe_for(name)
    stock = generate(pipe, name)
    with da.applied(pipe, "gna", window=GRID[name]):
        full = generate(pipe, name)
    torch.testing.assert_close(full, stock, atol=1e-6, rtol=0)
    assert torch.equal(generate(pipe, name), stock)


@pytest.mark.parametrize("name", list(GRID))
def test_gna_sparse_runs_and_remove_is_exact(name):
    pipe = pipe_for(name)
    stock = generate(pipe, name)
    window = tuple(max(1, g // 2) for g in GRID[name])
    before = snapshot(pipe)
    handle = da.apply(pipe, "gna", window=window, stride=1)
    sparse = generate(pipe, name)
    assert handle.context.grid == GRID[name] and handle.context.step == 1
    handle.remove()
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, stock)
    assert torch.equal(generate(pipe, name), stock)
    assert_untouched(pipe, before)


@pytest.mark.parametrize("name", ["tiny-flux-random", "tiny-wan-random"])
@pytest.mark.parametrize("cfg,batch", [(True, 1), (False, 2)])
def test_cfg_and_batch(name, cfg, batch):
    pipe = pipe_for(name)
    overrides = {"num_images_per_prompt" if name == "tiny-flux-random" else "num_videos_per_prompt": batch}
    if not cfg:
        overrides["guidance_scale"] = 1.0
    stock = generate(pipe, name, **overrides)
    with da.applied(pipe, "gna", window=3, stride=(1, 2) if name == "tiny-flux-random" else 1):
        out = generate(pipe, name, **overrides)
    assert out.shape == stock.shape and out.shape[0] == batch
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------
RADIAL_FRAMES = 25  # 7 latent frames x 8 x 12 = 672 tokens: 6 blocks, the last partial


@pytest.mark.parametrize("name", ["tiny-wan-random", "tiny-wan22", "tiny-hunyuanvideo", "tiny-mochi"])
def test_radial_runs_sparse_and_dense_steps_reproduce_stock(name):
    frames = 37 if name == "tiny-mochi" else RADIAL_FRAMES  # Mochi's VAE compresses time by 6 (-> 7 latent frames)
    pipe = pipe_for(name)
    family = FAMILY[name]
    layout = da.TokenLayout((7, 8, 12))
    assert da.attention_mask("radial", layout, family=family, decay_factor=0.05).float().mean() < 1.0
    stock = generate(pipe, name, num_frames=frames)
    with da.applied(pipe, "radial", dense_steps=2) as h:  # every step dense: stock
        assert torch.equal(generate(pipe, name, num_frames=frames), stock)
    with da.applied(pipe, "radial", dense_layers=1000, dense_steps=0):  # every layer dense: stock
        assert torch.equal(generate(pipe, name, num_frames=frames), stock)
    with da.applied(pipe, "radial", dense_steps=0, dense_layers=0, decay_factor=0.05) as h:
        sparse = generate(pipe, name, num_frames=frames)
        assert h.context.grid == (7, 8, 12)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, stock)
    assert torch.equal(generate(pipe, name, num_frames=frames), stock)


def test_radial_defaults_follow_official_scripts():
    assert da.apply(pipe_for("tiny-wan-random"), "radial").params == dict(decay_factor=0.2, sink=True, dense_layers=1, dense_steps=12, backend="auto")
    da.remove(pipe_for("tiny-wan-random"))
    h = da.apply(pipe_for("tiny-wan22"), "radial")
    assert (h.params["decay_factor"], h.params["dense_steps"]) == (0.8, 11)
    assert len(h.models) == 2  # transformer and transformer_2
    h.remove()
    h = da.apply(pipe_for("tiny-hunyuanvideo"), "radial")
    assert (h.params["decay_factor"], h.params["sink"], h.params["dense_layers"]) == (0.95, False, 0)
    h.remove()
    h = da.apply(pipe_for("tiny-mochi"), "radial")  # ours: the official code has no Mochi script
    assert (h.params["decay_factor"], h.params["sink"], h.params["dense_steps"]) == (0.95, False, 16)
    h.remove()


def test_mochi_drops_padded_text_per_sample_like_stock():
    """Two prompts of different lengths (CFG off, batch 2): each sample attends over its own real text
    tokens only; a window covering the grid reproduces the stock processor exactly."""
    pipe = pipe_for("tiny-mochi")
    prompts = ["a fox", "a red fox running through fresh snow at dawn, cinematic and detailed"]
    kw = default_call_kwargs("mochi", guidance_scale=1.0)
    run = lambda: pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kw)[0]  # noqa: E731
    stock = run()
    with da.applied(pipe, "gna", window=(3, 8, 12)):
        assert torch.equal(run(), stock)
    with da.applied(pipe, "radial", dense_steps=0, decay_factor=0.0):
        sparse = run()
    assert sparse.shape[0] == 2 and torch.isfinite(sparse).all() and not torch.allclose(sparse, stock)
    assert torch.equal(run(), stock)


def test_step_index_with_cfg_as_two_calls():
    """Wan runs CFG as two transformer calls per step: both must see the same step index."""
    pipe = pipe_for("tiny-wan-random")
    seen = []
    with da.applied(pipe, "gna", window=(3, 8, 12)) as h:
        hook = pipe.transformer.register_forward_hook(lambda m, a, o: seen.append((h.context.step, h.context.branch)))
        try:
            generate(pipe, "tiny-wan-random", num_inference_steps=3)
        finally:
            hook.remove()
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


# ---------------------------------------------------------------------------------------------------
def test_set_attn_processor_needs_attach_then_matches_apply():
    pipe = pipe_for("tiny-flux-random")
    model = pipe.transformer
    original = dict(model.attn_processors)
    with da.applied(pipe, "gna", window=(4, 6), stride=(2, 3)):
        via_apply = generate(pipe, "tiny-flux-random")
    model.set_attn_processor(da.GNAProcessor(window=(4, 6), stride=(2, 3)))
    try:
        with pytest.raises(RuntimeError, match=r"diffusion_attn\.attach\(model\)"):
            generate(pipe, "tiny-flux-random")
        handle = da.attach(model)
        assert torch.equal(generate(pipe, "tiny-flux-random"), via_apply)
        handle.remove()
    finally:
        model.set_attn_processor(original)


def test_methods_listing():
    specs = da.methods()
    assert {"gna", "radial"} <= set(specs)
    d = specs["gna"].describe()
    assert d["families"] == ["flux", "sd3", "wan", "hunyuanvideo", "mochi"]
    assert [p["name"] for p in d["params"]][:3] == ["window", "stride", "dilation"]
    assert all(p["help"] for p in d["params"])


def test_attention_mask_shape_and_text():
    layout = da.TokenLayout((4, 6), 3, "first")
    m = da.attention_mask("gna", layout, window=(2, 3))
    assert m.shape == (27, 27) and m[:3].all() and m[:, :3].all()
    assert m[3:, 3:].sum(1).eq(6).all()


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,params,match",
    [
        ("gnaa", {"window": 3}, "did you mean 'gna'"),
        ("radial", {}, "supported families: wan, hunyuanvideo, mochi"),
        ("gna", {}, "'window' is required"),
        ("gna", {"window": 3, "strid": 2}, "did you mean 'stride'"),
        ("gna", {"window": 0}, r"must be in \[1"),
        ("gna", {"window": 3, "backend": "flash"}, "must be one of"),
        ("gna", {"window": "big"}, "tuple of ints"),
    ],
)
def test_bad_input_is_rejected_and_pipeline_untouched(method, params, match):
    pipe = pipe_for("tiny-flux-random")
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=match):
        da.apply(pipe, method, **params)
    assert_untouched(pipe, before)


def test_window_larger_than_grid_and_applying_twice():
    pipe = pipe_for("tiny-flux-random")
    before = snapshot(pipe)
    with da.applied(pipe, "gna", window=(9, 4)):
        with pytest.raises(ValueError, match=r"does not fit the token grid 8x12.*larger than the axis \(8 tokens\)"):
            generate(pipe, "tiny-flux-random")
        with pytest.raises(ValueError, match="'gna' is already applied"):
            da.apply(pipe, "gna", window=3)
    assert_untouched(pipe, before)
    assert not da.remove(pipe)


def test_unsupported_model_lists_supported():
    with pytest.raises(ValueError, match="unsupported model Linear; supported denoisers: FluxTransformer2DModel"):
        da.apply(torch.nn.Linear(2, 2), "gna", window=3)


def test_attention_mask_rejects_a_family_the_method_does_not_support():
    with pytest.raises(ValueError, match="radial does not support 'flux'; supported families: wan, hunyuanvideo, mochi"):
        da.attention_mask("radial", da.TokenLayout((3, 4, 5)), family="flux")
    with pytest.raises(ValueError, match="radial has no family 'wan3'"):
        da.attention_mask("radial", da.TokenLayout((3, 4, 5)), family="wan3")
    layout = da.TokenLayout((5, 32, 48))  # frames wide enough for decay 0.2 and 0.8 to give different bands
    wan22 = da.attention_mask("radial", layout, family="wan2.2")  # a variant: its own defaults (decay 0.8)
    assert wan22.float().mean() > da.attention_mask("radial", layout, family="wan").float().mean()
