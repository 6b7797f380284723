"""AgentSD (ToMe + agent attention): the merge against PyPI tomesd (bit-exact, also end to end on the tiny
SD 1.5 pipeline), agent attention and a whole patched block against a re-derivation of the official
formulas, the schedule, end to end (CFG on/off, batch 1/2/3, odd sizes, SDXL), exact remove, and errors
that leave the pipeline untouched."""

import functools

import pytest
import torch
import torch.nn.functional as F

import diffusion_attn as da
from diffusion_attn.adapters.unet import UNET, level_grid, unet_level
from diffusion_attn.context import RunContext
from diffusion_attn.models.tiny import default_call_kwargs
from diffusion_attn.patches.hooks import hook_names
from diffusion_attn.patches.tome import (
    BLOCK_HOOK,
    ToMeConfig,
    ToMePhase,
    apply_tome,
    bipartite_merge,
    mergeable_blocks,
)
from diffusion_attn.processors import agent as agent_module
from diffusion_attn.processors.agent import AgentConfig, AgentProcessor, agent_attention
from pipes import fingerprint, pipe_cache

try:  # the parity reference (dev extra)
    import tomesd
    import tomesd.merge as tomesd_merge
except ImportError:  # pragma: no cover
    tomesd = tomesd_merge = None
needs_tomesd = pytest.mark.skipif(tomesd is None, reason="needs PyPI tomesd (pip install -e .[dev])")

pipe_for = pipe_cache()
FAMILY = {"tiny-sd15-random": "unet-sd15", "tiny-sdxl": "unet-sdxl"}
SIZES = {"even": dict(height=128, width=192),  # latent 16 x 24: divisible by 2 and 4
         "odd": dict(height=104, width=136)}  # latent 13 x 17: divisible by neither


def generate(pipe, name="tiny-sd15-random", size="even", batch=1, cfg=True, steps=3, seed=1):
    """Latents; the global RNG is seeded (tomesd and the merge fork their generator from it)."""
    kw = default_call_kwargs(FAMILY[name], **SIZES[size], num_inference_steps=steps, output_type="latent")
    if not cfg:
        kw["guidance_scale"] = 1.0
    torch.manual_seed(seed)
    return pipe(prompt=["a red fox in the snow"] * batch, generator=torch.Generator().manual_seed(0), **kw)[0]


@functools.lru_cache(maxsize=None)
def stock_output(name="tiny-sd15-random", **kw):
    return generate(pipe_for(name), name, **kw)


def module_state(pipe):
    out = {}
    for model in da.denoisers(pipe):
        for name, m in model.named_modules():
            attrs = {k: fingerprint(v) for k, v in m.__dict__.items()}
            out[(id(model), name)] = (id(m), type(m), attrs, {n: id(p) for n, p in m.attn_processors.items()} if name == "" else None)
    return out


def count_agent_calls(monkeypatch):
    calls = []

    def spy(q, k, v, agents, **kw):
        calls.append((q.shape[1], agents.shape[1]))
        return agent_attention(q, k, v, agents, **kw)

    monkeypatch.setattr(agent_module, "agent_attention", spy)
    return calls


# ---------------------------------------------------------------------------------------------------
# Merge: bit-exact against tomesd's bipartite_soft_matching_random2d
# ---------------------------------------------------------------------------------------------------
@needs_tomesd
@pytest.mark.parametrize("grid,sx,sy", [((8, 12), 2, 2), ((13, 17), 2, 2), ((16, 24), 4, 4), ((9, 10), 4, 2), ((5, 7), 3, 2)])
@pytest.mark.parametrize("rand", [False, True])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_merge_equals_tomesd(grid, sx, sy, rand, ratio):
    h, w = grid
    n = h * w
    torch.manual_seed(0)
    metric, x, y = torch.randn(2, n, 16), torch.randn(2, n, 8), torch.randn(2, n, 8)
    r = int(n * ratio)
    gen = (lambda: torch.Generator().manual_seed(3)) if rand else (lambda: None)
    m, u = tomesd_merge.bipartite_soft_matching_random2d(metric, w, h, sx, sy, r, no_rand=not rand, generator=gen())
    plan = bipartite_merge(metric, grid, sx, sy, r, generator=gen())
    merged, agents = plan.merge(x)
    assert agents is None  # agent_r = 0: no agents
    assert torch.equal(merged, m(x))
    z = y[:, :merged.shape[1]]  # any (B, n, C) output of the merged tokens
    assert torch.equal(plan.unmerge(z), u(z))
    assert merged.shape[1] == n - min(r, n - (h // sy) * (w // sx))


@needs_tomesd
@pytest.mark.parametrize("grid,sx,sy,ratio,agent_ratio,expect", [
    ((16, 24), 4, 4, 0.4, 0.95, 24),  # official early phase: capped at #src -> m = N / 16 agents
    ((13, 17), 4, 4, 0.4, 0.95, 12),  # odd: the 12 dst of the 12 x 16 divisible region
    ((16, 24), 2, 2, 0.4, 0.5, None),  # official late phase: 2m >= n -> no agents (plain ToMe)
    ((16, 24), 2, 2, 0.2, 0.7, 116),  # int(384 * 0.7) = 268 merged away
])
@pytest.mark.parametrize("rand", [False, True])
def test_agents_are_the_same_matching_merged_further(grid, sx, sy, ratio, agent_ratio, expect, rand):
    """The agents equal tomesd's merge of the same matching with r = agent_r (same dst draw), and exist only
    when 2m < n (official condition)."""
    h, w = grid
    n = h * w
    torch.manual_seed(1)
    metric, x = torch.randn(2, n, 16), torch.randn(2, n, 8)
    r, agent_r = int(n * ratio), int(n * agent_ratio)
    gen = (lambda: torch.Generator().manual_seed(5)) if rand else (lambda: None)
    plan = bipartite_merge(metric, grid, sx, sy, r, agent_r, generator=gen())
    merged, agents = plan.merge(x)
    ref_m, _ = tomesd_merge.bipartite_soft_matching_random2d(metric, w, h, sx, sy, r, no_rand=not rand, generator=gen())
    assert torch.equal(merged, ref_m(x))
    if expect is None:
        assert agents is None and plan.agent_tokens is None
        return
    ref_a, _ = tomesd_merge.bipartite_soft_matching_random2d(metric, w, h, sx, sy, agent_r, no_rand=not rand, generator=gen())
    assert torch.equal(agents, ref_a(x))
    assert agents.shape[1] == expect == plan.agent_tokens and 2 * expect < merged.shape[1]


def test_no_merge_without_ratio_or_destinations():
    metric = torch.randn(1, 6, 4)
    assert bipartite_merge(metric, (2, 3), 2, 2, 0, 5) is None  # r = 0 (no draw either)
    assert bipartite_merge(metric, (2, 3), 4, 4, 3, 5) is None  # grid smaller than one cell (tomesd crashes)
    with pytest.raises(ValueError, match="does not hold"):
        bipartite_merge(metric, (2, 2), 2, 2, 1)


def test_unet_levels():
    assert unet_level((16, 24), 384) == (1, (16, 24))
    assert unet_level((13, 17), 63) == (2, (7, 9))
    assert unet_level((13, 17), 20) == (4, (4, 5))
    assert level_grid((13, 17), 20) == (4, 5)  # HiDiffusion's rule alone fails here
    with pytest.raises(ValueError, match="holds 100 tokens"):
        unet_level((16, 24), 100)


# ---------------------------------------------------------------------------------------------------
# Agent attention against the official formulas
# ---------------------------------------------------------------------------------------------------
def official_agent_attention(attn, x, agent, k_scale2=0.3, k_shortcut=0.075):
    """agentsd AgentAttention.forward with agents, re-derived: einsum scores, explicit softmaxes."""
    h = attn.heads
    q, k, v, a = attn.to_q(x), attn.to_k(x), attn.to_v(x), attn.to_q(agent)
    b, d = x.shape[0], q.shape[-1] // h

    def heads(t):
        return t.view(b, -1, h, d).transpose(1, 2).reshape(b * h, -1, d)

    q, k, v, a = map(heads, (q, k, v, a))
    scale = d ** -0.5
    agent_v = torch.einsum("bij,bjd->bid", torch.einsum("bid,bjd->bij", a, k).mul(scale).softmax(-1), v)
    attn2 = torch.einsum("bid,bjd->bij", q, a).mul(scale ** k_scale2).softmax(-1)
    out = torch.einsum("bij,bjd->bid", attn2, agent_v) + v * k_shortcut
    out = out.view(b, h, -1, d).transpose(1, 2).reshape(b, -1, h * d)
    return attn.to_out[1](attn.to_out[0](out))


def tiny_attention(channels=32, heads=2):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=channels, heads=heads, dim_head=channels // heads).eval()


@pytest.mark.parametrize("k_scale2,k_shortcut", [(0.3, 0.075), (1.0, 0.0), (0.5, 0.2)])
def test_agent_attention_equals_official_formulas(k_scale2, k_shortcut):
    attn = tiny_attention()
    x, agent = torch.randn(2, 40, 32), torch.randn(2, 7, 32)
    ref = official_agent_attention(attn, x, agent, k_scale2, k_shortcut)
    q, k, v, a = (f(t).view(2, -1, 2, 16) for f, t in ((attn.to_q, x), (attn.to_k, x), (attn.to_v, x), (attn.to_q, agent)))
    core = agent_attention(q, k, v, a, scale=attn.scale, k_scale2=k_scale2, k_shortcut=k_shortcut)
    out = attn.to_out[0](core.reshape(2, 40, 32))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    plain = attn.to_out[0](F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 40, 32))
    assert not torch.allclose(out, plain, atol=1e-3)


def test_fp32_precision_upcasts_everything():
    """bf16 inputs with fp32=True: the official formulas computed in fp32 (an einsum written here), cast back."""
    q, k, v, a = (torch.randn(1, n, 2, 8, dtype=torch.bfloat16) for n in (30, 30, 30, 5))
    scale = 8 ** -0.5
    out = agent_attention(q, k, v, a, scale=scale, k_scale2=0.3, k_shortcut=0.075, fp32=True)
    qf, kf, vf, af = (t.float() for t in (q, k, v, a))
    s1 = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", af, kf) * scale, -1)
    va = torch.einsum("bhmn,bnhd->bmhd", s1, vf)
    s2 = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", qf, af) * scale ** 0.3, -1)
    ref = torch.einsum("bhnm,bmhd->bnhd", s2, va) + 0.075 * vf
    assert out.dtype == torch.bfloat16
    # within one bf16 rounding of the fp32 result
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)


def block_context(latent, step=0, num_steps=None):
    ctx = RunContext("unet")
    ctx.latent_size, ctx.grid, ctx.step = tuple(latent), tuple(latent), step
    ctx._run_steps = num_steps
    return ctx


@needs_tomesd
@pytest.mark.parametrize("rand,batch", [(True, 2), (False, 2), (True, 3)])
@pytest.mark.parametrize("grid", [(16, 24), (13, 17)])
def test_patched_block_equals_official_block(grid, rand, batch):
    """A whole BasicTransformerBlock of the tiny UNet (metric = block input, merge of norm1's output, agent
    attention, unmerge, residual; attn2 and the MLP untouched) against a re-derivation of agentsd's block."""
    unet = pipe_for("tiny-sd15-random").unet
    name, block = mergeable_blocks(unet)[0]
    assert name.startswith("down_blocks.0")
    h, w = grid
    n = h * w
    x, text = torch.randn(batch, n, block.norm1.normalized_shape[0]), torch.randn(batch, 77, 32)
    ratio, agent_ratio, sx, sy = 0.4, 0.95, 4, 4
    r, agent_r = int(n * ratio), int(n * agent_ratio)

    # reference: matching by tomesd's function (r for the merge, agent_r for the agents), same generator fork
    torch.manual_seed(7)
    use_rand = rand and batch % 2 == 0
    gen = lambda: torch.Generator().set_state(torch.get_rng_state()) if use_rand else None  # noqa: E731
    m, u = tomesd_merge.bipartite_soft_matching_random2d(x, w, h, sx, sy, r, no_rand=not use_rand, generator=gen())
    m_a, _ = tomesd_merge.bipartite_soft_matching_random2d(x, w, h, sx, sy, agent_r, no_rand=not use_rand, generator=gen())
    with torch.no_grad():
        y = block.norm1(x)
        ref = u(official_agent_attention(block.attn1, m(y), m_a(y))) + x
        ref = block.attn2(block.norm2(ref), encoder_hidden_states=text) + ref
        ref = block.ff(block.norm3(ref)) + ref

    config = ToMeConfig(ToMePhase(ratio, agent_ratio, sx, sy), ToMePhase(ratio, agent_ratio, sx, sy), use_rand=rand)
    ctx = block_context(grid)
    undo, states = apply_tome(unet, config, ctx, blocks=[(name, block)])
    stock = block.attn1.processor
    block.attn1.set_processor(AgentProcessor(states[name], stock).bind(ctx, UNET, 0, f"{name}.attn1.processor"))
    try:
        assert hook_names(block) == [BLOCK_HOOK]
        torch.manual_seed(7)
        with torch.no_grad():
            out = block(x, encoder_hidden_states=text)
    finally:
        block.attn1.set_processor(stock)
        for fn in reversed(undo):
            fn()
    assert hook_names(block) == [] and "_diffusers_hook" not in block.__dict__
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------
def test_official_schedule_switches_at_step_20_of_50():
    cfg = AgentConfig().tome_config(1)
    early, late = cfg.early, cfg.late
    assert (early.sx, early.sy, early.ratio, early.agent_ratio) == (4, 4, 0.4, 0.95)
    assert (late.sx, late.sy, late.ratio, late.agent_ratio) == (2, 2, 0.4, 0.5)
    assert [cfg.phase(s, 50) for s in (0, 19, 20, 49)] == [early, early, late, late]
    assert cfg.phase(4, 10) is late and cfg.phase(3, 10) is early  # the fraction 0.4 of any run
    never = AgentConfig(switch=1.0).tome_config(1)
    assert never.phase(None, None) is never.early
    with pytest.raises(RuntimeError, match="number of steps"):
        cfg.phase(None, None)


def test_pipeline_schedule_uses_agents_early_then_plain_tome(monkeypatch):
    calls = count_agent_calls(monkeypatch)
    pipe = pipe_for("tiny-sd15-random")
    seen = []
    orig = agent_module.AgentProcessor.__call__

    def watch(self, attn, hidden_states, *a, **kw):
        plan = self.state.plan
        seen.append((self.context.step, None if plan is None else plan.merged_tokens, None if plan is None else plan.agent_tokens,
                     hidden_states.shape[1]))
        return orig(self, attn, hidden_states, *a, **kw)

    monkeypatch.setattr(agent_module.AgentProcessor, "__call__", watch)
    with da.applied(pipe, "agent"):
        generate(pipe, steps=5)  # steps 0, 1: early (agents); 2..4: late (2 x 2 cells, plain ToMe)
    full = [s[:3] for s in seen if s[1] is not None]
    assert {s for s, _, _ in full} == {0, 1, 2, 3, 4}
    assert all(m == 384 - int(384 * 0.4) for _, m, _ in full)
    assert {a for s, _, a in full if s < 2} == {24} and {a for s, _, a in full if s >= 2} == {None}
    assert len(calls) == sum(1 for s, _, a in full if a is not None) > 0
    assert all(q == 231 and m == 24 for q, m in calls)
    # merged exactly at the full-latent level (max_downsample=1); the lower levels run stock
    assert all((merged is not None) == (tokens == 16 * 24) for _, merged, _, tokens in seen)


# ---------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------
@needs_tomesd
@pytest.mark.parametrize("use_rand", [True, False])
@pytest.mark.parametrize("cfg,batch,size", [(True, 1, "even"), (False, 1, "even"), (True, 2, "odd"), (False, 3, "odd")])
def test_tome_path_equals_tomesd_bit_exactly(use_rand, cfg, batch, size):
    pipe = pipe_for("tiny-sd15-random")
    tomesd.apply_patch(pipe, ratio=0.5, sx=2, sy=2, use_rand=use_rand)
    try:
        ref = generate(pipe, size=size, batch=batch, cfg=cfg)
    finally:
        tomesd.remove_patch(pipe)
    with da.applied(pipe, "agent", agents=False, ratio=0.5, sx=2, sy=2, switch=1.0, use_rand=use_rand):
        out = generate(pipe, size=size, batch=batch, cfg=cfg)
    assert torch.equal(out, ref)
    assert not torch.equal(out, stock_output(size=size, batch=batch, cfg=cfg))  # merging really happened


def test_tomesd_parity_on_later_runs_with_the_same_seed():
    """The generator is forked per run: a second run with the same global seed draws the first run's dst."""
    pipe = pipe_for("tiny-sd15-random")
    with da.applied(pipe, "agentsd", agents=False, ratio=0.5, sx=2, sy=2, switch=1.0):
        a, b = generate(pipe), generate(pipe)
        c = generate(pipe, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("agents", [True, False])
def test_zero_ratio_is_stock_exactly(agents):
    pipe = pipe_for("tiny-sd15-random")
    with da.applied(pipe, "agent", ratio=0.0, late_ratio=0.0, agents=agents):
        out = generate(pipe)
    assert torch.equal(out, stock_output())


@pytest.mark.parametrize("cfg,batch,size", [(True, 1, "even"), (False, 1, "odd"), (True, 2, "odd"), (False, 3, "even")])
def test_agents_end_to_end_and_exact_remove(monkeypatch, cfg, batch, size):
    calls = count_agent_calls(monkeypatch)
    pipe = pipe_for("tiny-sd15-random")
    before = module_state(pipe)
    stock = stock_output(size=size, batch=batch, cfg=cfg)
    with da.applied(pipe, "agent") as handle:
        assert all(BLOCK_HOOK in hook_names(b) for _, b in mergeable_blocks(pipe.unet))
        out = generate(pipe, size=size, batch=batch, cfg=cfg)
        assert handle.active
    assert calls and torch.isfinite(out).all() and not torch.equal(out, stock)
    with da.applied(pipe, "agent", agents=False):
        tome_only = generate(pipe, size=size, batch=batch, cfg=cfg)
    assert not torch.equal(out, tome_only)  # the agents change the result
    assert module_state(pipe) == before
    assert torch.equal(generate(pipe, size=size, batch=batch, cfg=cfg), stock)


@pytest.mark.parametrize("precision,upcast,expect", [("auto", False, False), ("auto", True, True), ("fp32", False, True),
                                                     ("none", True, False)])
def test_attn_precision_selects_fp32_agent_attention(monkeypatch, precision, upcast, expect):
    """auto = fp32 where the model's attention upcasts (diffusers' upcast_attention: the SD 2.1 configs)."""
    seen = []

    def spy(q, k, v, agents, **kw):
        seen.append(kw["fp32"])
        return agent_attention(q, k, v, agents, **kw)

    monkeypatch.setattr(agent_module, "agent_attention", spy)
    pipe = pipe_for("tiny-sd15-random")
    attns = [b.attn1 for _, b in mergeable_blocks(pipe.unet)]
    for a in attns:
        monkeypatch.setattr(a, "upcast_attention", upcast)
    with da.applied(pipe, "agent", attn_precision=precision):
        out = generate(pipe, steps=1)
    assert seen and set(seen) == {expect}
    with da.applied(pipe, "agent", attn_precision="none"):
        ref = generate(pipe, steps=1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # an fp32 model: the same up to rounding


class ForeignHook:
    """A user's diffusers hook on the same blocks (records calls, changes nothing)."""

    @staticmethod
    def make():
        from diffusers.hooks import ModelHook

        class Hook(ModelHook):
            calls = 0

            def pre_forward(self, module, *args, **kwargs):
                type(self).calls += 1
                return args, kwargs

        return Hook()


@pytest.mark.parametrize("ours_first", [True, False])
@pytest.mark.parametrize("remove_ours_first", [True, False])
def test_composes_with_other_block_hooks(ours_first, remove_ours_first):
    """A user's diffusers hook on the same blocks, registered before or after apply, removed before or
    after remove(): both keep working, and once both are gone the pipeline is exactly as it was (up to
    the empty registry diffusers leaves behind for the user's hook)."""
    from diffusers.hooks import HookRegistry

    pipe = pipe_for("tiny-sd15-random")
    initial = module_state(pipe)
    blocks = [b for _, b in mergeable_blocks(pipe.unet)]
    hook = ForeignHook.make()
    handle = da.apply(pipe, "agent") if ours_first else None
    for b in blocks:
        HookRegistry.check_if_exists_or_initialize(b).register_hook(hook, "user.hook")
    if not ours_first:
        handle = da.apply(pipe, "agent")
    out = generate(pipe)
    calls = type(hook).calls
    assert calls > 0
    if remove_ours_first:
        handle.remove()
        assert all(hook_names(b) == ["user.hook"] for b in blocks)
        assert torch.equal(generate(pipe), stock_output())  # the user's hook alone: stock
        assert type(hook).calls > calls
    for b in blocks:
        b._diffusers_hook.remove_hook("user.hook")
    if not remove_ours_first:
        assert all(hook_names(b) == [BLOCK_HOOK] for b in blocks)
        assert torch.equal(generate(pipe), out)  # ours keeps working alone
        handle.remove()
    assert torch.equal(generate(pipe), stock_output())
    for b in blocks:
        if "_diffusers_hook" in b.__dict__:  # the user's leftovers (diffusers' own remove_hook keeps them)
            assert not b._diffusers_hook.hooks
            del b.__dict__["_diffusers_hook"]
            b.__dict__.pop("forward", None)
    assert module_state(pipe) == initial


def test_sdxl_option_merges_the_first_attention_level(monkeypatch):
    calls = count_agent_calls(monkeypatch)
    pipe = pipe_for("tiny-sdxl")
    before = module_state(pipe)
    kw = dict(height=256, width=384, num_inference_steps=2, output_type="latent")
    torch.manual_seed(0)
    stock = pipe("a fox", generator=torch.Generator().manual_seed(0), **default_call_kwargs("unet-sdxl", **kw))[0]
    with da.applied(pipe, "agent"):  # max_downsample None -> 2 on SDXL
        torch.manual_seed(0)
        out = pipe("a fox", generator=torch.Generator().manual_seed(0), **default_call_kwargs("unet-sdxl", **kw))[0]
    assert calls and all(q == 384 - int(384 * 0.4) for q, _ in calls)  # the 16 x 24 level
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    assert module_state(pipe) == before
    with pytest.raises(ValueError, match="max_downsample=1 merges nothing"):
        da.apply(pipe, "agent", max_downsample=1)
    assert module_state(pipe) == before


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,match", [
    (dict(ratio=1.0), r"'ratio' must be in \[0, 1\)"),
    (dict(ratio=-0.1), "'ratio' must be in"),
    (dict(late_ratio=1.0), "'late_ratio' must be in"),
    (dict(agent_ratio=1.5), "'agent_ratio' must be in"),
    (dict(sx=0), "'sx' must be in"),
    (dict(late_sy=0), "'late_sy' must be in"),
    (dict(switch=1.5), "'switch' must be in"),
    (dict(switch=-0.2), "'switch' must be in"),
    (dict(max_downsample=3), "'max_downsample' must be one of"),
    (dict(attn_precision="fp16"), "'attn_precision' must be one of"),
    (dict(k_scale2=float("nan")), "k_scale2"),
    (dict(windw=3), "no parameter 'windw'"),
])
def test_bad_params_leave_pipeline_untouched(params, match):
    pipe = pipe_for("tiny-sd15-random")
    before = module_state(pipe)
    with pytest.raises(ValueError, match=match):
        da.apply(pipe, "agent", **params)
    with pytest.raises(ValueError, match=match):
        AgentConfig(**params) if "windw" not in params else AgentConfig.from_kwargs(**params)
    assert module_state(pipe) == before


def test_non_unet_pipeline_is_rejected():
    pipe = pipe_for("tiny-flux-random")
    before = module_state(pipe)
    with pytest.raises(ValueError, match="supported families: unet"):
        da.apply(pipe, "agent")
    assert module_state(pipe) == before


def test_bare_unet_needs_the_pipeline_for_the_schedule():
    pipe = pipe_for("tiny-sd15-random")
    before = module_state(pipe)
    with pytest.raises(ValueError, match="number of steps"):
        da.apply(pipe.unet, "agent")
    assert module_state(pipe) == before
    with da.applied(pipe.unet, "agent", switch=1.0):  # one phase: no step count needed
        out = generate(pipe)
    assert torch.isfinite(out).all() and module_state(pipe) == before


def test_stacking_on_another_attn1_processor_is_refused():
    from diffusion_attn.processors.hidiffusion import MSWMSAProcessor

    pipe = pipe_for("tiny-sd15-random")
    name = f"{mergeable_blocks(pipe.unet)[0][0]}.attn1.processor"
    stock = pipe.unet.attn_processors
    pipe.unet.set_attn_processor({**stock, name: MSWMSAProcessor()})
    try:
        before = module_state(pipe)
        with pytest.raises(ValueError, match="MSWMSAProcessor"):
            da.apply(pipe, "agent")
        assert module_state(pipe) == before
    finally:
        pipe.unet.set_attn_processor(stock)
