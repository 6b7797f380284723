"""The run context: run boundary per pipeline call (B1), steps and run length from what diffusers
publishes (B4's step counting), offload hooks before or after apply (B6), cache_context names, the bare
model fallback, call-time inputs (item 8), and an exact remove."""


import pytest
import torch

import diffusion_attn as da
from diffusion_attn.context import ContextHook, find_context
from diffusion_attn.models.tiny import build_pipeline, default_call_kwargs
from diffusion_attn.processors.gna import GNAProcessor
from pipes import pipe_cache

FAMILY = {"tiny-sd15-random": "unet-sd15", "tiny-sdxl": "unet-sdxl", "tiny-wan-random": "wan", "tiny-wan22": "wan",
          "tiny-hunyuanvideo": "hunyuanvideo", "tiny-mochi": "mochi", "tiny-flux-random": "flux"}
PROMPT = "a red fox in the snow"


pipe_for = pipe_cache()


def generate(pipe, name, **overrides):
    kw = default_call_kwargs(FAMILY[name], **overrides)
    kw["output_type"] = "latent"
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kw)[0]


def record_calls(pipe, handle):
    """Append (step, branch, branch_name, num_steps, source) at every denoiser call; returns (list, undo)."""
    seen, hooks = [], []
    for model in da.denoisers(pipe):
        c = handle.context
        hooks.append(model.register_forward_hook(
            lambda m, a, o: seen.append((c.step, c.branch, c.branch_name, c.num_steps, c.source))))
    return seen, lambda: [h.remove() for h in hooks]


def untouched(pipe):
    """What apply may touch outside the processors: the denoisers' torch hooks and instance attributes and
    the scheduler's instance attributes."""
    state = []
    for m in da.denoisers(pipe):
        state.append((dict(m._forward_pre_hooks), dict(m._forward_hooks), set(m.__dict__),
                      dict(m.attn_processors) if hasattr(m, "attn_processors") else None))
    state.append(set(pipe.scheduler.__dict__))
    return state


# ---------------------------------------------------------------------------------------------------
# B1: every pipeline call is one run
# ---------------------------------------------------------------------------------------------------
def test_repeated_one_step_runs_are_identical():
    """B1: three one-step calls with hidiffusion(seed=1) each see (step 0, branch 0) and give the same output."""
    pipe = pipe_for("tiny-sd15-random")
    with da.applied(pipe, "hidiffusion", seed=1) as h:
        seen, undo = record_calls(pipe, h)
        try:
            outs = [generate(pipe, "tiny-sd15-random", num_inference_steps=1) for _ in range(3)]
        finally:
            undo()
    assert [s[:2] for s in seen] == [(0, 0)] * 3 and {s[4] for s in seen} == {"pipeline"}
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bare_model_falls_back_to_timesteps():
    """Applied to the bare UNet, the step comes from the timesteps (documented fallback): a repeated
    one-step run is then indistinguishable from a second branch -- what apply(pipe) fixes."""
    pipe = pipe_for("tiny-sd15-random")
    with da.applied(pipe.unet, "hidiffusion", seed=1, num_steps=1) as h:
        seen, undo = record_calls(pipe, h)
        try:
            for _ in range(2):
                generate(pipe, "tiny-sd15-random", num_inference_steps=1)
            generate(pipe, "tiny-sd15-random", num_inference_steps=3)
        finally:
            undo()
    assert [s[:2] for s in seen] == [(0, 0), (0, 1), (0, 0), (1, 0), (2, 0)]
    assert {s[4] for s in seen} == {"timestep"}


# ---------------------------------------------------------------------------------------------------
# Steps and run length from the pipeline
# ---------------------------------------------------------------------------------------------------
def _with_scheduler(pipe, kind):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler

    cls = dict(ddim=DDIMScheduler, pndm=PNDMScheduler, euler=EulerDiscreteScheduler, heun=HeunDiscreteScheduler)[kind]
    return cls.from_config(pipe.scheduler.config, **(dict(skip_prk_steps=True) if kind == "pndm" else {}))


@pytest.mark.parametrize("kind,steps,calls", [("ddim", 4, 4), ("euler", 4, 4), ("pndm", 4, 5), ("heun", 3, 5)])
def test_step_is_the_pipeline_loop_index(kind, steps, calls):
    """One step per pipeline loop iteration (= model evaluation), N = ``pipe._num_timesteps``: PNDM
    repeats its second timestep (N + 1 calls), Heun evaluates twice per step (2N - 1 calls)."""
    base = pipe_for("tiny-sd15-random")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**base.components)
    pipe.scheduler = _with_scheduler(base, kind)
    pipe.set_progress_bar_config(disable=True)
    with da.applied(pipe, "hidiffusion", seed=0) as h:
        seen, undo = record_calls(pipe, h)
        try:
            generate(pipe, "tiny-sd15-random", num_inference_steps=steps)
        finally:
            undo()
    assert pipe._num_timesteps == calls
    assert [s[:2] for s in seen] == [(i, 0) for i in range(calls)]
    assert {s[3] for s in seen} == {calls}


@pytest.mark.parametrize("kind,calls", [("ddim", 6), ("pndm", 7), ("euler", 6)])
def test_img2img_runs_the_truncated_steps(kind, calls):
    """img2img at strength 0.6 of 10 steps: the last 6 timesteps (PNDM: 7 of its 11), with or without the
    scheduler's begin_index: steps 0, 1, ... and N = ``pipe._num_timesteps``."""
    from diffusers import StableDiffusionImg2ImgPipeline

    base = pipe_for("tiny-sd15-random")
    pipe = StableDiffusionImg2ImgPipeline(**base.components)
    pipe.scheduler = _with_scheduler(base, kind)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(1))
    with da.applied(pipe, "hidiffusion", seed=0) as h:
        seen, undo = record_calls(pipe, h)
        try:
            pipe(prompt=PROMPT, image=image, strength=0.6, num_inference_steps=10, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
        finally:
            undo()
    assert pipe._num_timesteps == calls
    assert [s[:2] for s in seen] == [(i, 0) for i in range(calls)] and {s[3] for s in seen} == {calls}


def test_cfg_as_two_calls_and_cache_context_names():
    """Wan runs CFG as two calls per step inside ``cache_context("cond"/"uncond", step_index=i)``."""
    pipe = pipe_for("tiny-wan-random")
    with da.applied(pipe, "gna", window=(3, 4, 6)) as h:
        seen, undo = record_calls(pipe, h)
        try:
            generate(pipe, "tiny-wan-random", num_inference_steps=3)
            generate(pipe, "tiny-wan-random", num_inference_steps=2)
        finally:
            undo()
    expected = [(i, b, name, n, "pipeline") for n in (3, 2) for i in range(n) for b, name in enumerate(("cond", "uncond"))]
    assert seen == expected


def test_scheduler_replaced_after_apply():
    """``pipe.scheduler = X.from_config(...)`` after apply: the context follows it and undoes both."""
    pipe = pipe_for("tiny-sd15-random")
    original = pipe.scheduler
    before = set(original.__dict__)
    try:
        with da.applied(pipe, "hidiffusion", seed=0) as h:
            assert "set_timesteps" in original.__dict__ and "step" in original.__dict__
            pipe.scheduler = _with_scheduler(pipe, "pndm")
            seen, undo = record_calls(pipe, h)
            try:
                for _ in range(2):
                    generate(pipe, "tiny-sd15-random", num_inference_steps=2)
            finally:
                undo()
            assert set(original.__dict__) == before  # the old scheduler was released, exactly
            replaced = pipe.scheduler
        assert "set_timesteps" not in replaced.__dict__ and "step" not in replaced.__dict__
        assert [s[:2] for s in seen] == [(0, 0), (1, 0), (2, 0)] * 2
    finally:
        pipe.scheduler = original


def test_remove_is_exact_and_stock_again():
    pipe = pipe_for("tiny-wan22")
    stock = generate(pipe, "tiny-wan22")
    before = untouched(pipe)
    with da.applied(pipe, "gna", window=(3, 4, 6)):
        assert all(isinstance(find_context(m), da.context.RunContext) for m in da.denoisers(pipe))
        assert "cache_context" in pipe.transformer.__dict__ and "set_timesteps" in pipe.scheduler.__dict__
        sparse = generate(pipe, "tiny-wan22")
    assert untouched(pipe) == before
    assert all(find_context(m) is None for m in da.denoisers(pipe))
    assert not torch.equal(sparse, stock) and torch.equal(generate(pipe, "tiny-wan22"), stock)


# ---------------------------------------------------------------------------------------------------
# B6: offloading before or after apply, any sequence of resolutions
# ---------------------------------------------------------------------------------------------------
OFFLOAD = {  # model -> (method, params), the second resolution
    "tiny-wan22": (("gna", dict(window=(3, 4, 6))), dict(height=192, width=192)),
    "tiny-hunyuanvideo": (("gna", dict(window=(3, 4, 6))), dict(height=192, width=192)),
    "tiny-mochi": (("radial", dict(dense_steps=0, decay_factor=0.0)), dict(height=192, width=192)),
    "tiny-sd15-random": (("hidiffusion", dict(seed=0)), dict(height=192, width=192)),
    "tiny-sdxl": (("hidiffusion", dict(seed=0)), dict(height=320, width=384)),
}


def _offload_hooks_present(pipe):
    return all(hasattr(m, "_hf_hook") for m in da.denoisers(pipe))


@pytest.mark.parametrize("order", ["offload-then-apply", "apply-then-offload"])
@pytest.mark.parametrize("name", list(OFFLOAD))
def test_model_cpu_offload_before_or_after_apply(name, order):
    """B6: with ``enable_model_cpu_offload`` (accelerate rewrites ``forward`` and, at the end of every
    call, puts back the ``forward`` it saved) the context sees every call, at changing resolutions."""
    (method, params), other = OFFLOAD[name]
    kw = dict(num_inference_steps=2)
    reference = build_pipeline(name)
    reference.set_progress_bar_config(disable=True)
    with da.applied(reference, method, **params):
        expected = [generate(reference, name, **kw), generate(reference, name, **kw, **other)]
    stock = generate(reference, name, **kw)

    pipe = build_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    if order == "offload-then-apply":
        pipe.enable_model_cpu_offload(device="cpu")
        handle = da.apply(pipe, method, **params)
    else:
        handle = da.apply(pipe, method, **params)
        pipe.enable_model_cpu_offload(device="cpu")
    assert _offload_hooks_present(pipe)
    try:
        outs = [generate(pipe, name, **kw), generate(pipe, name, **kw, **other), generate(pipe, name, **kw)]
    finally:
        handle.remove()
    assert torch.equal(outs[0], expected[0]) and torch.equal(outs[1], expected[1]) and torch.equal(outs[2], expected[0])
    assert not torch.equal(outs[0], stock)
    for m in da.denoisers(pipe):
        assert not any(isinstance(h, ContextHook) for h in m._forward_pre_hooks.values())
        assert "cache_context" not in m.__dict__
    assert "set_timesteps" not in pipe.scheduler.__dict__ and "step" not in pipe.scheduler.__dict__
    assert _offload_hooks_present(pipe)
    assert torch.equal(generate(pipe, name, **kw), stock)


# ---------------------------------------------------------------------------------------------------
# Item 8: call-time inputs
# ---------------------------------------------------------------------------------------------------
class ProbeProcessor(GNAProcessor):
    """GNA that takes a call input ``probe`` and records what it saw."""

    call_inputs = ("probe",)
    seen: list

    def core(self, q, k, v, layout, attention_mask=None):
        self.seen.append(self.context.call_kwargs.get("probe"))
        return super().core(q, k, v, layout, attention_mask)


def test_call_inputs_reach_processors_through_the_context():
    """Wan's model never forwards ``attention_kwargs`` to its processors: they get them from the context."""
    pipe = build_pipeline("tiny-wan-random")
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    probe = ProbeProcessor(window=(3, 4, 6))
    probe.seen = []  # shared by the per-layer copies attach makes
    model.set_attn_processor({n: probe if n.endswith("attn1.processor") else p for n, p in model.attn_processors.items()})
    handle = da.attach(model)
    assert handle.context.call_kwargs == {} and "probe" in handle.context.call_inputs
    calls = 2 * 2 * len(model.blocks)  # 2 steps x (cond, uncond) x layers
    generate(pipe, "tiny-wan-random", attention_kwargs={"probe": 3, "scale": 1.0})  # scale: the LoRA scale (diffusers)
    assert probe.seen == [3] * calls
    with pytest.raises(TypeError):
        handle.context.call_kwargs["probe"] = 4  # read-only
    generate(pipe, "tiny-wan-random")
    assert probe.seen[calls:] == [None] * calls


@pytest.mark.parametrize("name,kwarg", [("tiny-wan-random", "attention_kwargs"), ("tiny-flux-random", "joint_attention_kwargs")])
def test_unused_call_inputs_are_an_error(name, kwarg):
    """A key no processor, nor the model takes is an error (diffusers drops it silently for Wan, with a
    warning for Flux), raised before any layer runs."""
    pipe = pipe_for(name)
    window = (3, 4, 6) if name == "tiny-wan-random" else (4, 6)
    with da.applied(pipe, "gna", window=window):
        with pytest.raises(ValueError, match=rf"{kwarg} \['boxs'\] are not taken"):
            generate(pipe, name, **{kwarg: {"boxs": [0, 0, 1, 1]}})
        generate(pipe, name, **{kwarg: {"scale": 1.0}})  # the LoRA scale: taken by diffusers


def test_processor_refuses_unknown_keyword_arguments():
    """Kwargs that reach a processor and that it does not take are an error, as with diffusers' own
    processors (Wan's attention passes its kwargs through unfiltered)."""
    pipe = pipe_for("tiny-wan-random")
    attn = pipe.transformer.blocks[0].attn1
    x = torch.randn(1, 288, attn.inner_dim)
    with pytest.raises(TypeError):
        attn(x, bogus=1)  # stock WanAttnProcessor
    with da.applied(pipe, "gna", window=(3, 4, 6)) as h:
        h.context.grid = (3, 8, 12)
        with pytest.raises(TypeError, match=r"unexpected keyword arguments \['bogus'\].*call_kwargs"):
            attn(x, bogus=1)


def test_run_state_lives_for_one_pipeline_call():
    """Processors' per-run state (RunContext.run_state) is there across the steps of a call and empty at
    the start of the next call."""
    pipe = pipe_for("tiny-wan-random")
    sizes = []
    with da.applied(pipe, "gna", window=(3, 8, 12)) as h:
        def record(module, args, output):
            h.context.run_state["calls"] = h.context.run_state.get("calls", 0) + 1
            sizes.append(h.context.run_state["calls"])

        hook = pipe.transformer.register_forward_hook(record)
        try:
            for _ in range(2):
                generate(pipe, "tiny-wan-random", num_inference_steps=2)
        finally:
            hook.remove()
    assert sizes == [1, 2, 3, 4, 1, 2, 3, 4]  # CFG as two calls x 2 steps, then a fresh run
