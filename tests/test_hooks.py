"""Every module patch is a named diffusers hook: the shared helper (diffusion_attn.patches.hooks), RAU-Net
under other diffusers hooks registered after or before it (B2: group offloading, layerwise casting), an
honest Handle.remove, and ControlNet / T2I-Adapter pipelines refused by RAU-Net (B4)."""

import functools
import inspect

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook, apply_group_offloading, apply_layerwise_casting

import diffusion_attn as da
from diffusion_attn.models.tiny import default_call_kwargs
from diffusion_attn.patches.hooks import hook_names, register_hook, remove_hook
from diffusion_attn.patches.raunet import HOOK_NAMES, RAD_CONV_HOOK, RAUNET_TARGETS
from pipes import fingerprint, fresh

FAMILY = {"tiny-sd15-random": "unet-sd15", "tiny-sdxl": "unet-sdxl"}
# the fewest steps for which every RAU-Net stage of the official schedule is on at some step (the conv
# stage at step 0 in both)
STEPS = {"tiny-sd15-random": 3, "tiny-sdxl": 7}
VARIANT = {"tiny-sd15-random": "sd15", "tiny-sdxl": "sdxl"}


# ---------------------------------------------------------------------------------------------------
# The helper, on a bare module
# ---------------------------------------------------------------------------------------------------
class AddHook(ModelHook):
    """post_forward: output + value."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def post_forward(self, module, output):
        return output + self.value


class ScaleForwardHook(ModelHook):
    """new_forward: the chain below, times ``factor``."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def new_forward(self, module, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs) * self.factor


def ids(module):
    return {k: id(v) for k, v in module.__dict__.items()}


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 3), torch.randn(2, 3)


@pytest.mark.parametrize("ours", [AddHook(1.0), ScaleForwardHook(3.0)])
def test_register_then_remove_restores_the_module_dict(ours):
    lin, x = linear()
    base, before = lin(x), ids(lin)
    undo = register_hook(lin, ours, "diffusion_attn.test")
    assert "_diffusers_hook" in lin.__dict__ and "forward" in lin.__dict__
    expected = base + 1.0 if isinstance(ours, AddHook) else base * 3.0
    assert torch.equal(lin(x), expected)
    with pytest.raises(RuntimeError, match="already registered"):
        register_hook(lin, AddHook(2.0), "diffusion_attn.test")
    undo()
    assert ids(lin) == before  # no registry, no instance forward left behind
    assert torch.equal(lin(x), base)
    undo()  # a second undo finds nothing to do ...
    assert ids(lin) == before
    again = AddHook(5.0)
    register_hook(lin, again, "diffusion_attn.test")
    undo()  # ... and leaves a later registration under the same name alone
    assert hook_names(lin) == ["diffusion_attn.test"] and torch.equal(lin(x), base + 5.0)
    remove_hook(lin, "diffusion_attn.test")
    assert ids(lin) == before


@pytest.mark.parametrize("other", [AddHook(10.0), ScaleForwardHook(2.0)])
def test_remove_with_another_hook_registered_before(other):
    lin, x = linear()
    base = lin(x)
    HookRegistry.check_if_exists_or_initialize(lin).register_hook(other, "other")
    before = ids(lin)
    with_other = base + 10.0 if isinstance(other, AddHook) else base * 2.0
    undo = register_hook(lin, AddHook(1.0), "diffusion_attn.test")
    assert torch.equal(lin(x), with_other + 1.0)
    undo()
    assert ids(lin) == before  # the other hook's registry and forward, the same objects
    assert hook_names(lin) == ["other"] and torch.equal(lin(x), with_other)


@pytest.mark.parametrize("ours", [AddHook(1.0), ScaleForwardHook(3.0)])
@pytest.mark.parametrize("other", [AddHook(10.0), ScaleForwardHook(2.0)])
def test_remove_with_another_hook_registered_after(ours, other):
    lin, x = linear()
    base = lin(x)
    undo = register_hook(lin, ours, "diffusion_attn.test")
    HookRegistry.check_if_exists_or_initialize(lin).register_hook(other, "other")
    undo()
    # the other hook stays and works (diffusers alone would drop a new_forward hook registered after the
    # removed one from the chain); ours is gone
    assert hook_names(lin) == ["other"]
    assert torch.equal(lin(x), base + 10.0 if isinstance(other, AddHook) else base * 2.0)
    lin._diffusers_hook.remove_hook("other", recurse=False)
    assert torch.equal(lin(x), base)


def test_remove_after_diffusers_removed_a_hook_below_ours():
    lin, x = linear()
    base = lin(x)
    HookRegistry.check_if_exists_or_initialize(lin).register_hook(AddHook(10.0), "other")
    undo = register_hook(lin, ScaleForwardHook(3.0), "diffusion_attn.test")
    assert torch.equal(lin(x), (base + 10.0) * 3.0)
    lin._diffusers_hook.remove_hook("other", recurse=False)  # diffusers re-links around it
    undo()
    assert hook_names(lin) == [] and torch.equal(lin(x), base)  # the removed hook does not come back


# ---------------------------------------------------------------------------------------------------
# RAU-Net under group offloading and layerwise casting (B2)
# ---------------------------------------------------------------------------------------------------
def generate(pipe, name):
    kw = default_call_kwargs(FAMILY[name], num_inference_steps=STEPS[name], output_type="latent")
    return pipe(prompt="a red fox in the snow", generator=torch.Generator().manual_seed(0), **kw)[0]


def module_state(unet):
    """Every module: identity, class, attributes (dicts by content, objects by identity), hook names."""
    return {name: (id(m), type(m), {k: fingerprint(v) for k, v in m.__dict__.items()}, tuple(hook_names(m)))
            for name, m in unet.named_modules()}


def structure(unet):
    """Per module: attribute names and hook names (comparable across two pipelines)."""
    return {name: (tuple(sorted(m.__dict__)), tuple(hook_names(m))) for name, m in unet.named_modules()}


OTHERS = {
    "offload-leaf": lambda unet: apply_group_offloading(unet, onload_device="cpu", offload_device="cpu",
                                                        offload_type="leaf_level"),
    "offload-block": lambda unet: apply_group_offloading(unet, onload_device="cpu", offload_device="cpu",
                                                         offload_type="block_level", num_blocks_per_group=1),
    "casting": lambda unet: apply_layerwise_casting(unet, storage_dtype=torch.bfloat16, compute_dtype=torch.float32),
}


def round_like_casting(ref_unet, cast_unet):
    """The weights that layerwise casting stores in bf16, rounded the same way on a hook-free twin: the
    independent reference for a pipeline under layerwise casting (fp32 compute)."""
    n = 0
    for name, m in cast_unet.named_modules():
        if "layerwise_casting" in hook_names(m):
            twin = ref_unet.get_submodule(name)
            for p in twin.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16).to(torch.float32)
            n += 1
    assert n > 0


@functools.lru_cache(maxsize=None)
def references(name, other):
    """(stock, hidiffusion) latents of a pipeline with no hooks (weights rounded as the other hooks
    store them, for casting)."""
    pipe = fresh(name)
    if other == "casting":
        probe = fresh(name)
        OTHERS[other](probe.unet)
        round_like_casting(pipe.unet, probe.unet)
    stock = generate(pipe, name)
    with da.applied(pipe, "hidiffusion", seed=1):
        hid = generate(pipe, name)
    return stock, hid


@pytest.mark.parametrize("name,other", [
    ("tiny-sd15-random", "offload-leaf"), ("tiny-sd15-random", "casting"),
    ("tiny-sdxl", "offload-leaf"), ("tiny-sdxl", "casting"), ("tiny-sdxl", "offload-block"),
])
@pytest.mark.parametrize("order", ["hooks-after-apply", "hooks-before-apply"])
def test_hidiffusion_with_other_diffusers_hooks(name, other, order):
    stock, hid = references(name, other)
    assert not torch.equal(stock, hid)
    control = fresh(name)  # the other hooks alone: the structure remove() must leave
    OTHERS[other](control.unet)
    pipe = fresh(name)
    untouched = module_state(pipe.unet)
    if order == "hooks-before-apply":
        OTHERS[other](pipe.unet)
        before = module_state(pipe.unet)
    handle = da.apply(pipe, "hidiffusion", seed=1)
    if order == "hooks-after-apply":
        OTHERS[other](pipe.unet)
    conv = pipe.unet.get_submodule(RAUNET_TARGETS[VARIANT[name]]["conv"])
    if other != "offload-block":  # leaf-level hooks share the RAD conv with RAU-Net, in the order applied
        assert len(hook_names(conv)) == 2 and hook_names(conv).index(RAD_CONV_HOOK) == (order == "hooks-before-apply")
    assert torch.equal(generate(pipe, name), hid)  # RAU-Net (conv stage at step 0) + MSW-MSA, under the hooks
    handle.remove()
    assert not handle.active
    assert not any(h.startswith("diffusion_attn.") for _, m in pipe.unet.named_modules() for h in hook_names(m))
    assert structure(pipe.unet) == structure(control.unet)
    if order == "hooks-before-apply":
        assert module_state(pipe.unet) == before  # bit-exact: every registry, forward and attribute as before
    else:  # modules without the other hooks are exactly as before apply
        now = module_state(pipe.unet)
        assert all(now[n] == untouched[n] for n, m in control.unet.named_modules() if not hook_names(m))
    assert torch.equal(generate(pipe, name), stock)  # the other hooks still work, RAU-Net is gone


def test_remove_then_reapply_under_other_hooks():
    name = "tiny-sd15-random"
    stock, hid = references(name, "offload-leaf")
    pipe = fresh(name)
    handle = da.apply(pipe, "hidiffusion", seed=1)
    OTHERS["offload-leaf"](pipe.unet)
    handle.remove()
    with da.applied(pipe, "hidiffusion", seed=1):
        assert torch.equal(generate(pipe, name), hid)
    assert torch.equal(generate(pipe, name), stock)


# ---------------------------------------------------------------------------------------------------
# Handle.remove never reports what it did not achieve
# ---------------------------------------------------------------------------------------------------
def test_failed_undo_keeps_the_handle_active_and_can_be_retried():
    name = "tiny-sd15-random"
    stock, _ = references(name, "offload-leaf")
    pipe = fresh(name)
    handle = da.apply(pipe, "hidiffusion", seed=1)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk on fire")

    handle._undo.insert(1, flaky)  # an undo step that fails once
    with pytest.raises(RuntimeError, match="stays active.*disk on fire"):
        handle.remove()
    assert handle.active and "active" in repr(handle)
    assert getattr(pipe.unet, "_diffusion_attn_handle", None) is handle
    assert torch.equal(generate(pipe, name), stock)  # every other step was undone
    with pytest.raises(ValueError, match="already applied"):
        da.apply(pipe, "hidiffusion")
    handle.remove()  # retries only what failed
    assert not handle.active and len(calls) == 2
    assert getattr(pipe.unet, "_diffusion_attn_handle", None) is None


# ---------------------------------------------------------------------------------------------------
# ControlNet (B4): SDXL text-to-image as the official (bit-exact), the rest refused with RAU-Net
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def controlnet_pipe(name, official=False):
    from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline,
                           StableDiffusionXLControlNetPipeline)

    base = fresh(name)
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    with torch.no_grad():  # from_unet zero-initialises the output convs: the residuals would all be 0
        for m in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            m.weight.normal_(0, 0.3)
            m.bias.normal_(0, 0.1)
        controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0, 0.3)
    cls = StableDiffusionControlNetPipeline if name == "tiny-sd15-random" else StableDiffusionXLControlNetPipeline
    accepted = inspect.signature(cls.__init__).parameters
    parts = {k: v for k, v in base.components.items() if k in accepted}
    if "requires_safety_checker" in accepted:
        parts["requires_safety_checker"] = False
    pipe = cls(controlnet=controlnet, **parts)
    pipe.set_progress_bar_config(disable=True)
    if official:  # the official recognises its models by name or by the full-size module names
        pipe.register_to_config(_name_or_path="stabilityai/stable-diffusion-xl-base-1.0")
    return pipe


def generate_cn(pipe, name, steps=None, **overrides):
    kw = default_call_kwargs(FAMILY[name], num_inference_steps=steps or STEPS[name], output_type="latent")
    kw.update(overrides)
    image = torch.rand(1, 3, kw["height"], kw["width"], generator=torch.Generator().manual_seed(2))
    # 0.8: the official ControlNet pipeline's default (diffusers': 1.0)
    torch.manual_seed(3)  # MSW-MSA with seed=None draws its shifts from the global RNG, as the official
    return pipe(prompt="a red fox in the snow", image=image, controlnet_conditioning_scale=0.8,
                generator=torch.Generator().manual_seed(0), **kw)[0]


def official_hidiffusion():
    import importlib
    import sys

    # hidiffusion 0.1.10 imports MultiControlNetModel from where diffusers < 0.30 had it
    sys.modules.setdefault("diffusers.pipelines.controlnet.multicontrolnet",
                           importlib.import_module("diffusers.models.controlnets.multicontrolnet"))
    return pytest.importorskip("hidiffusion")


@pytest.mark.parametrize("steps,window,overrides", [
    (7, False, {}),  # aggressive: conv stage at step 0, block stage steps 1-2 (T1 0.5); ControlNet steps 0-4
    (10, True, {}),  # + MSW-MSA (the official's torch.rand shifts)
    (8, False, dict(guidance_scale=1.0, num_images_per_prompt=2, height=288, width=416)),  # odd sizes, batch 2
])
def test_sdxl_controlnet_equals_the_official(steps, window, overrides):
    official = official_hidiffusion()
    name = "tiny-sdxl"
    ref_pipe = controlnet_pipe(name, official=True)
    official.apply_hidiffusion(ref_pipe, apply_window_attn=window)
    try:
        expected = generate_cn(ref_pipe, name, steps, **overrides)
    finally:
        official.remove_hidiffusion(ref_pipe)
    pipe = controlnet_pipe(name)
    stock = generate_cn(pipe, name, steps, **overrides)
    before, cn_before = module_state(pipe.unet), module_state(pipe.controlnet)
    with da.applied(pipe, "hidiffusion", apply_window_attn=window):
        assert hook_names(pipe.controlnet) == ["diffusion_attn.raunet.controlnet"]
        out = generate_cn(pipe, name, steps, **overrides)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, stock, atol=1e-3)
    assert module_state(pipe.unet) == before and module_state(pipe.controlnet) == cn_before
    assert torch.equal(generate_cn(pipe, name, steps, **overrides), stock)


def test_sd15_controlnet_pipeline_is_refused_with_raunet_and_runs_without():
    name = "tiny-sd15-random"
    pipe = controlnet_pipe(name)
    stock = generate_cn(pipe, name)
    before = module_state(pipe.unet)
    with pytest.raises(ValueError, match=r"supports ControlNet only as the official does.*"
                                         r"StableDiffusionControlNetPipeline.*apply_raunet=False"):
        da.apply(pipe, "hidiffusion")
    assert module_state(pipe.unet) == before
    assert torch.equal(generate_cn(pipe, name), stock)
    with da.applied(pipe, "hidiffusion", apply_raunet=False, seed=1):  # MSW-MSA alone works with ControlNet
        out = generate_cn(pipe, name)
    assert torch.isfinite(out).all() and not torch.allclose(out, stock, atol=1e-4)
    assert module_state(pipe.unet) == before and torch.equal(generate_cn(pipe, name), stock)


def test_controlnet_guess_mode_is_refused_when_the_controlnet_would_be_skipped():
    name = "tiny-sdxl"
    pipe = controlnet_pipe(name)
    with da.applied(pipe, "hidiffusion", apply_window_attn=False):
        with pytest.raises(ValueError, match="does not support guess_mode"):
            generate_cn(pipe, name, guess_mode=True)


@pytest.mark.parametrize("name", ["tiny-sd15-random", "tiny-sdxl"])
def test_bare_unet_with_controlnet_residuals_gets_a_clear_error(name):
    pipe = controlnet_pipe(name)
    stock = generate_cn(pipe, name)
    before = module_state(pipe.unet)
    handle = da.apply(pipe.unet, "hidiffusion", num_steps=STEPS[name])  # the pipeline is not told
    try:
        with pytest.raises(ValueError, match=r"RAU-Net cannot run with down_block_additional_residuals / "
                                             r"mid_block_additional_residual .*step 0.*apply_raunet=False"):
            generate_cn(pipe, name)
    finally:
        handle.remove()
    assert module_state(pipe.unet) == before and torch.equal(generate_cn(pipe, name), stock)


def test_hook_names_are_namespaced():
    assert all(n.startswith("diffusion_attn.raunet.") for n in HOOK_NAMES) and len(set(HOOK_NAMES)) == len(HOOK_NAMES)
    pipe = fresh("tiny-sdxl")
    with da.applied(pipe, "hidiffusion", apply_window_attn=False):
        found = {h for _, m in pipe.unet.named_modules() for h in hook_names(m)}
    controlnet_only = {n for n in HOOK_NAMES if ".controlnet" in n}
    # the run context is a torch forward pre-hook (see diffusion_attn.context), not a registry entry
    assert len(controlnet_only) == 3 and found == set(HOOK_NAMES) - controlnet_only


def test_t2i_adapter_pipeline_is_refused_with_raunet():
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    base = fresh("tiny-sd15-random")
    adapter = T2IAdapter(in_channels=3, channels=[16, 32, 32, 32], num_res_blocks=1, downscale_factor=8)
    accepted = inspect.signature(StableDiffusionAdapterPipeline.__init__).parameters
    parts = {k: v for k, v in base.components.items() if k in accepted}
    pipe = StableDiffusionAdapterPipeline(adapter=adapter, **{**parts, "requires_safety_checker": False})
    before = module_state(pipe.unet)
    with pytest.raises(ValueError, match=r"does not support T2I-Adapter pipelines.*apply_raunet=False"):
        da.apply(pipe, "hidiffusion")
    assert module_state(pipe.unet) == before
    da.apply(pipe, "hidiffusion", apply_raunet=False).remove()
    assert module_state(pipe.unet) == before


def test_remove_raunet_by_name_then_handle_remove():
    from diffusion_attn.patches.raunet import remove_raunet

    pipe = fresh("tiny-sdxl")
    before = module_state(pipe.unet)
    handle = da.apply(pipe, "hidiffusion", apply_window_attn=False)
    OTHERS["offload-leaf"](pipe.unet)
    assert remove_raunet(pipe.unet) == 1 + 2 + 2 + 2 + 1  # rad_conv, pool/unpool, 2 skip_record, 2 skip_size, residuals
    assert not any(h.startswith("diffusion_attn.raunet.") for _, m in pipe.unet.named_modules() for h in hook_names(m))
    handle.remove()  # finds the RAU-Net hooks gone and undoes the rest
    assert not handle.active
    assert all(module_state(pipe.unet)[n] == before[n] for n, m in pipe.unet.named_modules() if not hook_names(m))
