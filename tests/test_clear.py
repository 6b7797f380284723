"""CLEAR (circular local attention + pooled keys + distilled weights) against references re-derived from
the official code (Huage001/CLEAR ``attention_processor.py``), on the tiny Flux / SD3 pipelines."""

import math

import pytest
import torch
from safetensors.torch import save_file

import diffusion_attn as da
from diffusion_attn.context import RunContext
from diffusion_attn.layout import Segment, TokenLayout
from diffusion_attn.models.tiny import default_call_kwargs
from diffusion_attn.patterns import sequence_mask
from diffusion_attn.patterns.circular import circular_pattern, clear_pattern, covering_radius
from diffusion_attn.processors.clear import CLEARConfig, CLEARProcessor, released_filename

from pipes import fresh, pipe_cache

pipe_for = pipe_cache()


# ------------------------------------------------------------------------------------------------------
# references, written from the official formulas (text first, as Flux; index arithmetic as the official)
# ------------------------------------------------------------------------------------------------------
def official_local_mask(h, w, text, r):
    q = torch.arange(text + h * w)[:, None]
    k = torch.arange(text + h * w)[None, :]
    qy, qx, ky, kx = (q - text) // w, (q - text) % w, (k - text) // w, (k - text) % w
    return (q < text) | (k < text) | ((qy - ky) ** 2 + (qx - kx) ** 2 < r ** 2)


def official_down_mask(h, w, text, r, n_pooled):
    q = torch.arange(text + h * w)[:, None]
    k = torch.arange(text + h * w + n_pooled)[None, :]
    qy, qx, ky, kx = (q - text) // w, (q - text) % w, (k - text) // w, (k - text) % w
    text_rows = (q < text) & (k < text + h * w)
    image_rows = (q >= text) & ((k < text) | (k >= text + h * w) | ((qy - ky) ** 2 + (qx - kx) ** 2 < r ** 2))
    return text_rows | image_rows


def official_pool(x, h, w, f, weight):
    """The official pooling, (B, heads, S_img, D) layout, H and W divisible by f."""
    return (x.unflatten(2, (h // f, f, w // f, f)) * weight).sum(dim=(3, 5)).flatten(2, 3)


def loop_pool(x, h, w, f, weight):
    """Pooling token by token (B, heads, S_img, D): ceil(H/f) x ceil(W/f) blocks; a partial block is
    sum(w * x over present tokens) * sum(w) / sum(w over present tokens)."""
    wf = weight.reshape(f, f)
    out = []
    for by in range(-(-h // f)):
        for bx in range(-(-w // f)):
            acc, have = 0, 0
            for i in range(f):
                for j in range(f):
                    y, xx = by * f + i, bx * f + j
                    if y < h and xx < w:
                        acc = acc + wf[i, j] * x[:, :, y * w + xx]
                        have = have + wf[i, j]
            out.append(acc * (wf.sum() / have))
    return torch.stack(out, 2)


def softmax_attention(q, k, v, mask, scale):
    """Explicit masked softmax in float64, (B, heads, S, D) layout."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.double()).float()


def bound(proc, grid):
    ctx = RunContext("flux")
    ctx.grid, ctx.step = grid, 0
    return proc.bind(ctx, None, 0)


LAYOUTS = [((5, 7), 9, 2), ((6, 6), 3, 3), ((4, 9), 0, 4), ((7, 5), 12, 1), ((3, 8), 5, 8)]


# ------------------------------------------------------------------------------------------------------
# pattern
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,text,r", LAYOUTS)
def test_local_pattern_is_the_official_mask(grid, text, r):
    layout = TokenLayout(grid, text, "first")
    want = official_local_mask(*grid, text, r)
    assert torch.equal(sequence_mask(circular_pattern(grid, r), layout), want)
    assert torch.equal(da.attention_mask("clear", layout, radius=r), want)


@pytest.mark.parametrize("grid,text,r", LAYOUTS)
@pytest.mark.parametrize("f", [2, 3])
def test_down_sampled_pattern_is_the_official_mask(grid, text, r, f):
    n = -(-grid[0] // f) * -(-grid[1] // f)
    layout = TokenLayout(grid, text, "first", extra=(Segment("pooled", n, "kv"),))
    assert torch.equal(sequence_mask(clear_pattern(grid, r, layout), layout), official_down_mask(*grid, text, r, n))


def test_covering_radius_and_too_large_radius():
    for grid in [(8, 8), (8, 12), (1, 5), (30, 41)]:
        full = covering_radius(grid)
        assert official_local_mask(*grid, 0, full).all() and not official_local_mask(*grid, 0, full - 1).all()
    layout = TokenLayout((8, 12), 5, "first")
    da.attention_mask("clear", layout, radius=14)  # covering: accepted
    with pytest.raises(ValueError, match=r"radius 15 is larger than the 8x12 token grid: radius 14 already covers it"):
        da.attention_mask("clear", layout, radius=15)


# ------------------------------------------------------------------------------------------------------
# the attention core against the explicit softmax
# ------------------------------------------------------------------------------------------------------
def _qkv(grid, text, heads=2, d=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = text + grid[0] * grid[1]
    return [torch.randn(batch, s, heads, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("grid,text,r", LAYOUTS[:3])
def test_local_core_matches_reference(grid, text, r, backend):
    q, k, v = _qkv(grid, text)
    proc = bound(CLEARProcessor(radius=r, backend=backend), grid)
    out = proc.core(q, k, v, TokenLayout(grid, text, "first"))
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    want = softmax_attention(t(q), t(k), t(v), official_local_mask(*grid, text, r), q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, t(want), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("grid,text,r,f", [((8, 8), 7, 3, 4), ((6, 9), 5, 2, 3), ((5, 7), 3, 2, 2), ((7, 10), 4, 3, 4)])
@pytest.mark.parametrize("proportional", [False, True])
def test_down_sampled_core_matches_reference(grid, text, r, f, proportional):
    h, w = grid
    q, k, v = _qkv(grid, text, seed=1)
    proc = bound(CLEARProcessor(radius=r, down_factor=f, proportional_attention=proportional, backend="reference"), grid)
    with torch.no_grad():  # trained-looking weights, not the average-pool init
        proc.spatial_weight.copy_(torch.rand(1, 1, 1, f, 1, f, 1, generator=torch.Generator().manual_seed(2)))
    out = proc.core(q, k, v, TokenLayout(grid, text, "first"))

    t = lambda x: x.transpose(1, 2)  # noqa: E731
    qt, kt, vt = t(q), t(k), t(v)
    sw = proc.spatial_weight.detach()
    divisible = h % f == 0 and w % f == 0
    pool = (lambda x: official_pool(x[:, :, text:], h, w, f, sw)) if divisible else \
        (lambda x: loop_pool(x[:, :, text:], h, w, f, sw))
    kp, vp = pool(kt), pool(vt)
    d = q.shape[-1]
    n = text + h * w  # the official key.size(2): pooled keys not counted
    scale = math.sqrt(math.log(10 * n, 64 ** 2 + 512) / d) if proportional else 1 / math.sqrt(d)
    mask = official_down_mask(h, w, text, r, kp.shape[2])
    want = softmax_attention(qt, torch.cat([kt, kp], 2), torch.cat([vt, vp], 2), mask, scale)
    torch.testing.assert_close(out, t(want), atol=5e-6, rtol=1e-5)


def test_proportional_local_scale():
    grid, text, r = (6, 6), 4, 2
    q, k, v = _qkv(grid, text, seed=3)
    proc = bound(CLEARProcessor(radius=r, proportional_attention=True, backend="reference"), grid)
    out = proc.core(q, k, v, TokenLayout(grid, text, "first"))
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    scale = math.sqrt(math.log(text + 36, 64 ** 2 + 512) / q.shape[-1])
    torch.testing.assert_close(out, t(softmax_attention(t(q), t(k), t(v), official_local_mask(*grid, text, r), scale)),
                               atol=2e-6, rtol=1e-5)


def test_spatial_weight_and_projections_get_gradients():
    grid, text = (4, 4), 3
    q, k, v = (x.requires_grad_() for x in _qkv(grid, text, seed=4))
    proc = bound(CLEARProcessor(radius=2, down_factor=2, backend="reference"), grid)
    proc.core(q, k, v, TokenLayout(grid, text, "first")).square().sum().backward()
    assert proc.spatial_weight.grad is not None and proc.spatial_weight.grad.abs().sum() > 0
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))


# ------------------------------------------------------------------------------------------------------
# on the model: one layer against the official processor, full radius = stock, end to end
# ------------------------------------------------------------------------------------------------------
def official_flux_attention(attn, x, enc, rotary, text, h, w, r, f, weight):
    """The official LocalDownsampleFlexAttnProcessor / LocalFlexAttnProcessor (double block), (B, heads,
    S, D) layout, with the mask as a dense boolean and text length ``text`` instead of 512."""
    from diffusers.models.embeddings import apply_rotary_emb

    b = x.shape[0]
    split = lambda t: t.view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
    q, k = attn.norm_q(q), attn.norm_k(k)
    eq, ek, ev = split(attn.add_q_proj(enc)), split(attn.add_k_proj(enc)), split(attn.add_v_proj(enc))
    eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
    q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
    q, k = apply_rotary_emb(q, rotary), apply_rotary_emb(k, rotary)
    if f > 1:
        k = torch.cat([k, official_pool(k[:, :, text:], h, w, f, weight)], 2)
        v = torch.cat([v, official_pool(v[:, :, text:], h, w, f, weight)], 2)
        mask = official_down_mask(h, w, text, r, (h // f) * (w // f))
    else:
        mask = official_local_mask(h, w, text, r)
    out = softmax_attention(q, k, v, mask, attn.head_dim ** -0.5).transpose(1, 2).flatten(2)
    return attn.to_out[0](out[:, text:]), attn.to_add_out(out[:, :text])


@pytest.mark.parametrize("r,f", [(3, 1), (2, 4)])
def test_flux_layer_matches_official_processor(r, f):
    pipe = pipe_for("tiny-flux-random")
    tr = pipe.transformer
    h, w, text = 8, 12, 32  # the tiny pipeline's grid; 32 text tokens (not 512)
    g = torch.Generator().manual_seed(5)
    attn = tr.transformer_blocks[0].attn
    x = torch.randn(2, h * w, attn.query_dim, generator=g)
    enc = torch.randn(2, text, attn.added_kv_proj_dim, generator=g)
    ids = torch.cat([torch.zeros(text, 3), image_ids(h, w)])
    rotary = tr.pos_embed(ids)
    with da.applied(pipe, "clear", radius=r, down_factor=f, backend="reference") as handle:
        handle.context.grid, handle.context.step, handle.context.text_len = (h, w), 0, text
        proc = attn.processor
        if f > 1:
            with torch.no_grad():
                proc.spatial_weight.copy_(torch.rand(proc.spatial_weight.shape, generator=g))
        with torch.no_grad():
            img, txt = attn(hidden_states=x, encoder_hidden_states=enc, image_rotary_emb=rotary)
            want_img, want_txt = official_flux_attention(attn, x, enc, rotary, text, h, w, r, f,
                                                         proc.spatial_weight if f > 1 else None)
    torch.testing.assert_close(img, want_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, want_txt, atol=1e-5, rtol=1e-5)


def image_ids(h, w):
    """Flux's image position ids (0, y, x), row-major."""
    return torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"),
                       -1).reshape(-1, 3)


def _run(pipe, name, **kw):
    return pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **default_call_kwargs(name, **kw))[0]


@pytest.mark.parametrize("name", ["tiny-flux-random", "tiny-sd3"])
def test_covering_radius_reproduces_stock_pipeline(name):
    pipe = pipe_for(name)
    stock = _run(pipe, name)
    with da.applied(pipe, "clear", radius=14):  # 8 x 12 grid: covering radius 14
        out = _run(pipe, name)
    assert torch.equal(out, stock)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
@pytest.mark.parametrize("batch", [1, 2])
def test_flux_end_to_end(cfg, batch):
    pipe = pipe_for("tiny-flux-random")
    kw = dict(num_images_per_prompt=batch, true_cfg_scale=cfg)
    if cfg > 1:
        kw["negative_prompt"] = "blue"
    stock = _run(pipe, "tiny-flux-random", **kw)
    with da.applied(pipe, "clear", radius=3, down_factor=4) as handle:
        out = _run(pipe, "tiny-flux-random", **kw)
        assert handle.context.text_len == 32
    assert out.shape == stock.shape and out.shape[0] == batch and torch.isfinite(out).all()
    assert not torch.allclose(out, stock, atol=1e-4)  # sparse: not the dense result


def test_batch_rows_are_independent():
    pipe = pipe_for("tiny-flux-random")
    tr = pipe.transformer
    g = torch.Generator().manual_seed(6)
    h, w, text = 8, 12, 32
    img_ids = image_ids(h, w)
    kw = dict(hidden_states=torch.randn(2, h * w, tr.config.in_channels, generator=g),
              encoder_hidden_states=torch.randn(2, text, tr.config.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(2, tr.config.pooled_projection_dim, generator=g),
              timestep=torch.tensor([0.5, 0.5]), img_ids=img_ids.float(), txt_ids=torch.zeros(text, 3),
              guidance=torch.tensor([3.5, 3.5]) if tr.config.guidance_embeds else None, return_dict=False)
    with da.applied(tr, "clear", radius=3, down_factor=2), torch.no_grad():
        both = tr(**kw)[0]
        one = tr(**{k: (v[1:] if isinstance(v, torch.Tensor) and v.shape[0] == 2 and k not in ("img_ids", "txt_ids") else v)
                    for k, v in kw.items()})[0]
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# weights, NTK hook, remove
# ------------------------------------------------------------------------------------------------------
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def clear_file(model, path, down_factor=1, seed=7, **overrides):
    """A weight file with the official key names: every *.attn.to_q/k/v/out.* parameter, and the
    processors' spatial_weight for a down-sampled variant."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(p.shape, generator=g) for k, p in model.named_parameters()
             if any(s in k for s in (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out."))}
    if down_factor > 1:
        for name in model.attn_processors:
            state[f"{name}.spatial_weight"] = torch.rand(1, 1, 1, down_factor, 1, down_factor, 1, generator=g)
    state.update(overrides)
    state = {k: v for k, v in state.items() if v is not None}
    save_file(state, str(path))
    return state


def test_weights_load_and_remove_restores_bit_exactly(tmp_path):
    pipe = fresh("tiny-flux-random")
    tr = pipe.transformer
    path = tmp_path / released_filename(3, 4)
    state = clear_file(tr, path, down_factor=4)
    before, procs, pos_dict = _snapshot(tr), dict(tr.attn_processors), dict(tr.pos_embed.__dict__)
    stock = _run(pipe, "tiny-flux-random")
    handle = da.apply(pipe, "clear", radius=3, down_factor=4, weights=str(tmp_path), ntk_factor=10.0)
    assert torch.equal(tr.transformer_blocks[1].attn.to_k.weight, state["transformer_blocks.1.attn.to_k.weight"])
    assert torch.equal(tr.transformer_blocks[0].attn.to_out[0].bias, state["transformer_blocks.0.attn.to_out.0.bias"])
    sd = tr.state_dict()
    key = "single_transformer_blocks.1.attn.processor.spatial_weight"
    assert torch.equal(sd[key], state[key])  # the official key name, in the model's state dict
    assert "diffusion_attn.ntk_rope" in da.patches.hook_names(tr.pos_embed)
    _run(pipe, "tiny-flux-random")
    handle.remove()
    assert _same(tr, before)
    assert dict(tr.attn_processors) == procs and dict(tr.pos_embed.__dict__) == pos_dict
    assert torch.equal(_run(pipe, "tiny-flux-random"), stock)


def test_hub_id_goes_through_hf_hub_download(tmp_path, monkeypatch):
    pipe = pipe_for("tiny-flux-random")
    path = tmp_path / "file.safetensors"
    state = clear_file(pipe.transformer, path)
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with da.applied(pipe, "clear", radius=8, weights="Huage001/CLEAR"):
        w = pipe.transformer.single_transformer_blocks[0].attn.to_v.weight
        assert torch.equal(w, state["single_transformer_blocks.0.attn.to_v.weight"])
    with da.applied(pipe, "clear", radius=16, down_factor=4, weights="someone/other/mine.safetensors"):
        pass
    assert calls == [("Huage001/CLEAR", "clear_local_8.safetensors"), ("someone/other", "mine.safetensors")]


@pytest.mark.parametrize("case,match", [
    ("key", "not this FluxTransformer2DModel's attention projections"),
    ("shape", "shapes that do not fit"),
    ("spatial_for_local", "down-sampled variant"),
    ("empty_folder", "has no clear_local_3.safetensors"),
    ("not_a_path", "neither an existing .safetensors file or folder nor a Hub repo id"),
])
def test_bad_weights_leave_the_pipeline_untouched(tmp_path, case, match):
    pipe = pipe_for("tiny-flux-random")
    tr = pipe.transformer
    path = tmp_path / "w.safetensors"
    source = str(path)
    if case == "key":
        clear_file(tr, path, **{"transformer_blocks.0.ff.net.0.proj.weight": torch.zeros(2, 2)})
    elif case == "shape":
        clear_file(tr, path, **{"transformer_blocks.0.attn.to_q.weight": torch.zeros(3, 3)})
    elif case == "spatial_for_local":
        clear_file(tr, path, down_factor=4)
    elif case == "empty_folder":
        source = str(tmp_path)
    else:
        source = "not a path"
    before, procs = _snapshot(tr), dict(tr.attn_processors)
    with pytest.raises(ValueError, match=match):
        da.apply(pipe, "clear", radius=3, weights=source)
    assert _same(tr, before) and dict(tr.attn_processors) == procs
    assert not da.remove(pipe) and not da.patches.hook_names(tr.pos_embed)


def test_bad_config_and_family():
    with pytest.raises(ValueError, match="'radius' is required"):
        CLEARConfig()
    with pytest.raises(ValueError, match="radius"):
        CLEARConfig(radius=0)
    with pytest.raises(ValueError, match="down_factor"):
        CLEARConfig(radius=3, down_factor=0)
    pipe = pipe_for("tiny-sd3")
    procs = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match="ntk_factor scales Flux's RoPE"):
        da.apply(pipe, "clear", radius=3, ntk_factor=10.0)
    assert dict(pipe.transformer.attn_processors) == procs


def test_radius_larger_than_the_call_grid_is_refused():
    pipe = pipe_for("tiny-flux-random")
    with da.applied(pipe, "clear", radius=20):
        with pytest.raises(ValueError, match="larger than the 8x12 token grid"):
            _run(pipe, "tiny-flux-random")


def test_ntk_hook_matches_the_ntk_formula():
    from diffusion_attn.patches.ntk_rope import NTKRopeConfig, apply_ntk_rope

    tr = pipe_for("tiny-flux-random").transformer
    ids = torch.stack(torch.meshgrid(torch.arange(2.0), torch.arange(3.0), torch.arange(5.0), indexing="ij"), -1).reshape(-1, 3)
    stock = tr.pos_embed(ids)
    undo = apply_ntk_rope(tr, NTKRopeConfig(1.0))
    same = tr.pos_embed(ids)
    undo()
    assert all(torch.equal(a, b) for a, b in zip(same, stock))
    undo = apply_ntk_rope(tr, NTKRopeConfig(10.0))
    cos, sin = tr.pos_embed(ids)
    undo()
    parts = []
    for i, dim in enumerate(tr.pos_embed.axes_dim):  # NTK: base theta * factor
        inv = 1.0 / (tr.pos_embed.theta * 10.0) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(torch.outer(ids[:, i].double(), inv))
    ang = torch.cat([p.repeat_interleave(2, dim=1) for p in parts], 1)
    torch.testing.assert_close(cos, ang.cos().float())
    torch.testing.assert_close(sin, ang.sin().float())
    assert all(torch.equal(a, b) for a, b in zip(tr.pos_embed(ids), stock))


def test_cli_mask_and_simulate(tmp_path, capsys):
    from diffusion_attn.cli import main

    assert main(["mask", "--method", "clear", "--grid", "8x12", "--text", "5", "--radius", "3",
                 "--output", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").is_file()
    assert main(["simulate", "--method", "clear", "--grid", "16x16", "--text", "7", "--radius", "4"]) == 0
    out = capsys.readouterr().out
    density = float(out.split("density ")[2].split()[0])
    want = official_local_mask(16, 16, 7, 4).float().mean().item()
    assert abs(density - want) < 1e-6


# ------------------------------------------------------------------------------------------------------
# distillation loop
# ------------------------------------------------------------------------------------------------------
def test_distillation_trains_only_attention_weights_and_saves_the_official_keys(tmp_path):
    from safetensors.torch import load_file

    from diffusion_attn.models import build_pipeline
    from diffusion_attn.training.clear import DistillConfig, _attn_layers, distill

    cfg = DistillConfig(model="tiny-flux-random", radius=2, down_factor=2, steps=2, batch_size=2, data_size=4,
                        lr=1e-2, attn_every=1, output=str(tmp_path), log_every=1)
    path = distill(cfg)
    assert path.name == "clear_local_2_down_2.safetensors"
    saved = load_file(str(path))
    base = build_pipeline("tiny-flux-random").transformer
    params = dict(base.named_parameters())
    assert "single_transformer_blocks.0.attn.processor.spatial_weight" in saved
    assert {k for k in saved if "spatial_weight" not in k} == {
        k for k in params if any(s in k for s in (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out."))}
    assert any(not torch.equal(saved[k], params[k]) for k in saved if k in params)  # trained
    assert _attn_layers(base, 4) == []  # the official rule on 2 double + 2 single blocks selects none
    assert _attn_layers(base, 1) == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    pipe = fresh("tiny-flux-random")
    with da.applied(pipe, "clear", radius=2, down_factor=2, weights=str(path)):
        assert torch.equal(pipe.transformer.transformer_blocks[0].attn.to_q.weight,
                           saved["transformer_blocks.0.attn.to_q.weight"])
        _run(pipe, "tiny-flux-random")


def test_allowed_pairs_counts_the_official_mask():
    from diffusion_attn.patterns.circular import CircularWindow

    for grid, r in [((5, 7), 2), ((8, 8), 3), ((6, 9), 5), ((4, 4), 9)]:
        assert CircularWindow(grid, r).allowed_pairs() == int(official_local_mask(*grid, 0, r).sum())


def test_sd3_end_to_end_text_last():
    pipe = pipe_for("tiny-sd3")
    stock = _run(pipe, "tiny-sd3")
    with da.applied(pipe, "clear", radius=3, down_factor=3) as handle:  # 8 x 12 grid: partial pooled blocks
        out = _run(pipe, "tiny-sd3")
        assert handle.context.grid == (8, 12)
    assert torch.isfinite(out).all() and not torch.allclose(out, stock, atol=1e-4)


def test_auto_runs_the_circle_on_a_box_kernel_past_2048_tokens():
    """Past the small-sequence size ``auto`` runs CLEAR's circle as a refined box (its bounding square and
    the circle as a tile predicate) on a box kernel, equal to the official mask's explicit softmax."""
    from diffusion_attn import kernels

    grid, text, r = (44, 46), 32, 5
    layout = TokenLayout(grid, text, "first")
    assert kernels.choose_backend(circular_pattern(grid, r, layout), layout) in ("sliding", "strips", "gather")
    q, k, v = _qkv(grid, text, heads=1, batch=1)
    out = bound(CLEARProcessor(radius=r), grid).core(q, k, v, layout)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    want = softmax_attention(t(q), t(k), t(v), official_local_mask(*grid, text, r), q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, t(want), atol=2e-6, rtol=1e-5)


def test_pooling_a_partial_block_with_trained_weights_stays_finite():
    """A partial border block whose present weights sum to ~0 or the other sign (trained weights can be
    negative) is the mean of its present tokens, not a division by ~0; a safe block keeps the rescale rule."""
    from diffusion_attn.processors.clear import pool_tokens

    x = torch.randn(1, 9, 2, 4)  # a 3 x 3 grid, f = 2 -> 2 x 2 pooled blocks, three of them partial
    w = torch.tensor([[0.5, -0.5], [0.3, 0.2]]).reshape(1, 1, 1, 2, 1, 2, 1)
    out = pool_tokens(x, (3, 3), w)
    assert torch.isfinite(out).all()
    g = x.reshape(3, 3, 2, 4)
    # top-right block (column 2 only: weights 0.5 and 0.3 present, total 0.5): ratio 0.8 -> rescaled
    torch.testing.assert_close(out[0, 1], (0.5 * g[0, 2] + 0.3 * g[1, 2]) * (0.5 / 0.8))
    # bottom-left block (row 2 only: weights 0.5 and -0.5 present, sum 0): the mean of its two tokens
    torch.testing.assert_close(out[0, 2], (g[2, 0] + g[2, 1]) / 2)


def test_missing_local_weights_file_is_not_sent_to_the_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: pytest.fail(f"sent to the Hub: {kw}"))
    for source in ("weights/clear_local_8.safetensors", "./clear", "/no/such/folder"):
        with pytest.raises(ValueError, match="does not exist"):
            da.apply(pipe_for("tiny-flux-random"), "clear", radius=2, weights=source)


@pytest.mark.parametrize("backend", ["sliding", "strips", "gather"])
def test_named_box_kernels_run_clear(backend):
    """The disc as a refined box on the named box kernels equals the reference kernel."""
    pipe = pipe_for("tiny-flux-random")
    kw = dict(num_inference_steps=2, output_type="latent", height=128, width=192, max_sequence_length=32)
    outs = {}
    for name in ("reference", backend):
        with da.applied(pipe, "clear", radius=3, backend=name):
            outs[name] = pipe("a red ball", generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(outs[backend], outs["reference"], atol=2e-5, rtol=1e-4)
