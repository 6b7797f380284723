"""ComfyUI nodes, without ComfyUI: the ``comfy`` modules the nodes import lazily are stubbed (with
``wrap_attn`` / ``optimized_attention`` behaving as in Comfy-Org/ComfyUI ``comfy/ldm/modules/attention.py``),
and a FakeModelPatcher stands in for ``comfy.model_patcher.ModelPatcher``. The patched attention must be
the diffusers processors' kernel on the same q, k, v and layout."""

from __future__ import annotations

import ast
import asyncio
import copy
import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import diffusion_attn.comfy as dcomfy
from diffusion_attn.comfy import nodes as cnodes
from diffusion_attn.comfy import patching
from diffusion_attn.comfy.export import export_node_folder
from diffusion_attn.context import RunContext
from diffusion_attn.kernels import pattern_attention
from diffusion_attn.layout import TokenLayout
from diffusion_attn.patterns import neighborhood_pattern, radial_pattern, shifted_window_pattern
from diffusion_attn.processors import GNAProcessor, MSWMSAProcessor, RadialProcessor
from diffusion_attn.registry import get_method, methods

APPLY_MODEL = "apply_model"


# ------------------------------------------------------------------------------------------------------
# Stubs
# ------------------------------------------------------------------------------------------------------
def _wrap_attn(func):
    """As ComfyUI's: an ``optimized_attention_override`` in transformer_options gets ``(func, *args, **kw)``."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        remove = False
        try:
            if "_inside_attn_wrapper" not in kwargs:
                options = kwargs.get("transformer_options", None)
                remove = True
                kwargs["_inside_attn_wrapper"] = True
                if options is not None and "optimized_attention_override" in options:
                    return options["optimized_attention_override"](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if remove:
                del kwargs["_inside_attn_wrapper"]

    return wrapper


@_wrap_attn
def _attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """ComfyUI's ``attention_pytorch`` conventions (plain SDPA)."""
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


@pytest.fixture
def comfy(monkeypatch):
    """Stub ``comfy``, ``comfy.patcher_extension`` and ``comfy.ldm.modules.attention``."""
    mods = {name: types.ModuleType(name) for name in
            ("comfy", "comfy.patcher_extension", "comfy.ldm", "comfy.ldm.modules", "comfy.ldm.modules.attention")}
    mods["comfy.patcher_extension"].WrappersMP = SimpleNamespace(APPLY_MODEL=APPLY_MODEL, DIFFUSION_MODEL="diffusion_model")
    attention = mods["comfy.ldm.modules.attention"]
    attention.wrap_attn = _wrap_attn
    attention.optimized_attention = _attention_pytorch
    mods["comfy"].patcher_extension = mods["comfy.patcher_extension"]
    mods["comfy"].ldm = mods["comfy.ldm"]
    mods["comfy.ldm"].modules = mods["comfy.ldm.modules"]
    mods["comfy.ldm.modules"].attention = attention
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return attention


class FlowSampling:
    """``comfy.model_sampling.ModelSamplingDiscreteFlow``'s percent convention (shift 1: sigma = 1 - percent)."""

    sigma_max, sigma_min = 1.0, 0.001

    @staticmethod
    def percent_to_sigma(percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return 1.0 - percent


class FakeModelPatcher:
    """The parts of ``comfy.model_patcher.ModelPatcher`` the nodes use."""

    def __init__(self, diffusion_model):
        self.model = SimpleNamespace(diffusion_model=diffusion_model, model_sampling=FlowSampling())
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}

    def clone(self):
        n = FakeModelPatcher.__new__(FakeModelPatcher)
        n.model = self.model
        n.model_options = copy.deepcopy(self.model_options)  # as ModelPatcher.clone
        n.wrappers = {k: {k1: list(w) for k1, w in v.items()} for k, v in self.wrappers.items()}
        return n

    def get_model_object(self, name):
        return getattr(self.model, name)

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to = self.model_options["transformer_options"]
        to.setdefault("patches_replace", {}).setdefault("attn1", {})[block] = patch


class _Executor:
    """``comfy.patcher_extension.WrapperExecutor`` semantics."""

    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, wrappers, idx

    def __call__(self, *args, **kwargs):
        return _Executor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def run_model(patcher, forward, x, context=None, sigma=1.0, sample_sigmas=(1.0, 0.5, 0.0), **extras):
    """One ``BaseModel.apply_model`` call as ``calc_cond_batch`` makes it; ``forward(transformer_options)``
    plays the diffusion model and returns what it computed."""
    to = copy.copy(patcher.model_options["transformer_options"])
    to["sigmas"] = torch.tensor([sigma])
    to["sample_sigmas"] = torch.tensor(sample_sigmas)
    wrappers = [w for ws in patcher.wrappers.get(APPLY_MODEL, {}).values() for w in ws]

    def original(x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        return forward(transformer_options)

    return _Executor(original, patcher.model, wrappers).execute(x, torch.tensor([sigma]), None, context, None, to, **extras)


def fake_model(class_name, **attrs):
    """An object whose class has ComfyUI's diffusion-model class name (detection is by class name)."""
    return type(class_name, (), attrs)()


def wan_model():
    return fake_model("WanModel", patch_size=(1, 2, 2), ref_conv=None)


def apply(model, method, **values):
    """Run the generated V1 node with its widget defaults, overridden by ``values``."""
    spec = get_method(method)
    node = dcomfy.NODE_CLASS_MAPPINGS[cnodes.node_id(spec)]
    widgets = {name: opts[1]["default"] for name, opts in node.INPUT_TYPES()["required"].items() if name != "model"}
    widgets.update(values)
    (patched,) = getattr(node(), node.FUNCTION)(model, **widgets)
    return patched


def runtime_of(patched):
    return patched.wrappers[APPLY_MODEL][patching.WRAPPER_KEY][0].runtime


def qkv(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))


# ------------------------------------------------------------------------------------------------------
# Import, nodes, specs
# ------------------------------------------------------------------------------------------------------
def test_package_has_no_top_level_comfy_import():
    for path in Path(dcomfy.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("comfy", "comfy_api") for n in names), (path.name, names)
    assert "comfy" not in sys.modules
    assert not hasattr(dcomfy, "comfy_entrypoint")  # no comfy_api here


@pytest.mark.parametrize("name", sorted(patching.comfy_methods()))
def test_every_method_has_a_node_matching_its_spec(name):
    spec = methods()[name]
    key = cnodes.node_id(spec)
    node = dcomfy.NODE_CLASS_MAPPINGS[key]
    proper = {"gna": "Generalized Neighborhood Attention (GNA)", "radial": "Radial Attention",
              "hidiffusion": "HiDiffusion (MSW-MSA)"}
    assert dcomfy.NODE_DISPLAY_NAME_MAPPINGS[key] == proper[name]
    assert node.RETURN_TYPES == ("MODEL",) and node.CATEGORY == "diffusion_attn"
    assert callable(getattr(node, node.FUNCTION))
    assert name in node.DESCRIPTION or spec.summary in node.DESCRIPTION
    required = node.INPUT_TYPES()["required"]
    assert required["model"][0] == "MODEL"
    hidden = patching.SUPPORT.get(name, patching.ComfySupport()).hidden
    expected = [p.name for p in spec.params if p.name not in hidden] + ["start_percent", "end_percent"]
    expected += [cnodes.DEFAULTS_INPUT] if spec.family_defaults else []
    assert list(required)[1:] == expected
    for percent, default in (("start_percent", 0.0), ("end_percent", 1.0)):
        kind, opts = required[percent]
        assert (kind, opts["default"], opts["min"], opts["max"]) == ("FLOAT", default, 0.0, 1.0)
    for p in spec.params:
        if p.name in hidden:
            continue
        kind, opts = required[p.name]
        assert opts["tooltip"].startswith(p.help)
        optional = p.default is None and not p.required
        if p.type in (int, float):
            assert kind == ("INT" if p.type is int else "FLOAT")
            # ComfyUI's frontend randomizes INT seeds after each run unless control_after_generate is False
            assert opts.get("control_after_generate") is (False if p.name == "seed" else None)
            lo, hi = p.range or (None, None)
            if optional:
                assert opts["default"] == opts["min"] == ((lo - 1) if lo is not None else -1)
            else:
                assert opts["default"] == p.default and (lo is None or opts["min"] == lo)
            assert hi is None or opts["max"] == hi
        elif p.type is bool:
            assert (kind, opts["default"]) == ((["default", "true", "false"], "default") if optional else ("BOOLEAN", p.default))
        elif p.choices:
            assert kind == (["default"] if optional else []) + list(p.choices)
            assert opts["default"] == ("default" if optional else p.default)
        else:
            assert kind == "STRING"
    if spec.family_defaults:
        assert required[cnodes.DEFAULTS_INPUT][0] == ["auto", *spec.family_defaults]


def test_widget_values_decode_to_spec_values(comfy):
    # radial left at its widget defaults = the per-model defaults of the detected family
    patched = apply(FakeModelPatcher(wan_model()), "radial")
    assert runtime_of(patched).params == get_method("radial").resolve({}, "wan")
    patched = apply(FakeModelPatcher(wan_model()), "radial", defaults_for="wan2.2", sink="false", dense_steps=3)
    assert runtime_of(patched).params == get_method("radial").resolve({"sink": False, "dense_steps": 3}, "wan2.2")
    # tuple parameters are typed as strings
    patched = apply(FakeModelPatcher(wan_model()), "gna", window="3,5x5", stride="")
    assert runtime_of(patched).params["window"] == (3, 5, 5) and runtime_of(patched).params["stride"] == (1,)
    with pytest.raises(ValueError, match="'window' is required"):
        apply(FakeModelPatcher(wan_model()), "gna")


# ------------------------------------------------------------------------------------------------------
# Same kernel as the diffusers processors
# ------------------------------------------------------------------------------------------------------
def test_radial_on_wan_equals_processor_and_pattern_attention(comfy):
    patched = apply(FakeModelPatcher(wan_model()), "radial", decay_factor=0.2, sink="true", dense_layers=0, dense_steps=0)
    B, heads, D = 2, 2, 8
    x = torch.zeros(1, 16, 8, 16, 16)  # 8 latent frames of 16 x 16 -> grid (8, 8, 8), 512 tokens
    layout = TokenLayout((8, 8, 8), 0)
    q, k, v = qkv(B, 512, heads * D)
    kc, vc = qkv(B, 7, heads * D, seed=1)[:2]

    def forward(to):  # WanSelfAttention then WanT2VCrossAttention, as comfy/ldm/wan/model.py calls them
        self_out = comfy.optimized_attention(q, k, v, heads=heads, transformer_options=to)
        cross_out = comfy.optimized_attention(q, kc, vc, heads=heads, transformer_options=to)
        return self_out, cross_out

    self_out, cross_out = run_model(patched, forward, x, context=torch.zeros(1, 7, 32))
    pattern = radial_pattern((8, 8, 8), 0.2, True)
    assert not pattern.is_full()
    q4, k4, v4 = (t.unflatten(-1, (heads, D)) for t in (q, k, v))
    expected = pattern_attention(q4, k4, v4, pattern, layout).reshape(B, 512, -1)
    torch.testing.assert_close(self_out, expected, rtol=0, atol=0)
    ctx = RunContext("wan")
    ctx.step = 0
    proc = RadialProcessor(0.2, True).bind(ctx, None, 0)
    torch.testing.assert_close(self_out, proc.core(q4, k4, v4, layout).reshape(B, 512, -1), rtol=0, atol=0)
    assert not torch.allclose(self_out, _attention_pytorch(q, k, v, heads))
    assert torch.equal(cross_out, _attention_pytorch(q, kc, vc, heads))


def test_gna_on_flux_text_first_equals_processor(comfy):
    patched = apply(FakeModelPatcher(fake_model("Flux", patch_size=2)), "gna", window="3,5")
    B, heads, D, text = 2, 2, 8, 5
    x = torch.zeros(1, 16, 11, 16)  # padded to 12 x 16 -> grid (6, 8)
    layout = TokenLayout((6, 8), text, "first")
    q, k, v = qkv(B, heads, layout.num_tokens, D)  # comfy/ldm/flux/math.py: (B, heads, S, D), skip_reshape=True

    def forward(to):
        return comfy.optimized_attention(q, k, v, heads, skip_reshape=True, mask=None, transformer_options=to)

    out = run_model(patched, forward, x, context=torch.zeros(1, text, 32))
    q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
    pattern = neighborhood_pattern((6, 8), (3, 5), (1, 1), (1, 1))
    expected = pattern_attention(q4, k4, v4, pattern, layout).reshape(B, layout.num_tokens, -1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    ctx = RunContext("flux")
    ctx.step = 0
    proc = GNAProcessor((3, 5)).bind(ctx, None, 0)
    torch.testing.assert_close(out, proc.core(q4, k4, v4, layout).reshape(B, layout.num_tokens, -1), rtol=0, atol=0)
    assert not torch.allclose(out, _attention_pytorch(q, k, v, heads, skip_reshape=True))


def test_full_window_is_plain_attention(comfy):
    patched = apply(FakeModelPatcher(fake_model("Flux", patch_size=2)), "gna", window="6,8")
    q, k, v = qkv(1, 2, 5 + 48, 8)

    def forward(to):
        return comfy.optimized_attention(q, k, v, 2, skip_reshape=True, transformer_options=to)

    out = run_model(patched, forward, torch.zeros(1, 16, 12, 16), context=torch.zeros(1, 5, 32))
    assert torch.equal(out, _attention_pytorch(q, k, v, 2, skip_reshape=True))


def test_hunyuan_text_last_with_padding_mask_and_refiner_passthrough(comfy):
    dm = fake_model("HunyuanVideo", patch_size=[1, 2, 2], byt5_in=None)
    patched = apply(FakeModelPatcher(dm), "gna", window="3")
    B, heads, D, text = 2, 2, 4, 6
    layout = TokenLayout((4, 4, 4), text, "last")
    q, k, v = qkv(B, heads, layout.num_tokens, D)
    mask = torch.zeros(1, 1, layout.num_tokens)
    mask[..., -2:] = -torch.finfo(torch.float32).max  # HunyuanVideo.forward_orig: padded text keys
    rq, rk, rv = qkv(B, text, heads * D, seed=3)

    def forward(to):
        refined = comfy.optimized_attention(rq, rk, rv, heads, transformer_options=to)  # token refiner
        return refined, comfy.optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=to)

    refined, out = run_model(patched, forward, torch.zeros(1, 16, 4, 8, 8), context=torch.zeros(1, text, 32))
    assert torch.equal(refined, _attention_pytorch(rq, rk, rv, heads))
    keep = torch.ones(B, layout.num_tokens, dtype=torch.bool)
    keep[:, -2:] = False
    q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
    pattern = neighborhood_pattern((4, 4, 4), (3, 3, 3), (1, 1, 1), (1, 1, 1))
    expected = pattern_attention(q4, k4, v4, pattern, layout, key_padding_mask=keep).reshape(B, layout.num_tokens, -1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["flux", "sd3", "wan-i2v-ref", "hunyuan-byt5"])
def test_layouts_per_model(comfy, case):
    if case == "flux":
        dm, x, ctx, extras, want = fake_model("Flux", patch_size=2), (1, 16, 13, 9), 7, {}, TokenLayout((7, 5), 7, "first")
    elif case == "sd3":
        dm = fake_model("OpenAISignatureMMDITWrapper", patch_size=2, register_length=0)
        x, ctx, extras, want = (1, 16, 8, 12), 10, {}, TokenLayout((4, 6), 10, "first")
    elif case == "wan-i2v-ref":
        dm = fake_model("WanModel", patch_size=(1, 2, 2), ref_conv=object())
        x, ctx = (1, 36, 3, 8, 10), 20
        extras = dict(clip_fea=torch.zeros(1, 257, 8), reference_latent=torch.zeros(1, 16, 8, 10),
                      time_dim_concat=torch.zeros(1, 16, 2, 8, 10))
        want = TokenLayout((6, 4, 5), 0)
    else:
        dm = fake_model("HunyuanVideo", patch_size=[1, 2, 2], byt5_in=object())
        x, ctx, extras, want = (1, 16, 2, 6, 6), 9, dict(txt_byt5=torch.zeros(1, 3, 8)), TokenLayout((2, 3, 3), 12, "last")
    patched = apply(FakeModelPatcher(dm), "gna", window="1")
    seen = run_model(patched, lambda to: to["optimized_attention_override"].layout, torch.zeros(x),
                     context=torch.zeros(1, ctx, 8), **extras)
    assert seen == want


def test_dense_steps_and_layers(comfy):
    patched = apply(FakeModelPatcher(wan_model()), "radial", decay_factor=0.2, sink="true", dense_layers=1, dense_steps=1)
    q, k, v = qkv(1, 512, 16)
    plain = _attention_pytorch(q, k, v, 2)

    def forward(to):
        return [comfy.optimized_attention(q, k, v, heads=2, transformer_options=to) for _ in range(2)]

    sigmas = (1.0, 0.6, 0.3, 0.0)
    x, ctx = torch.zeros(1, 16, 8, 16, 16), torch.zeros(1, 7, 8)
    step0 = run_model(patched, forward, x, ctx, sigma=1.0, sample_sigmas=sigmas)
    assert all(torch.equal(o, plain) for o in step0)
    layer0, layer1 = run_model(patched, forward, x, ctx, sigma=0.6, sample_sigmas=sigmas)
    assert torch.equal(layer0, plain) and not torch.allclose(layer1, plain)
    assert patching.step_index({"sigmas": torch.tensor([0.45]), "sample_sigmas": torch.tensor(sigmas)}) == 1
    assert patching.step_index({}) is None


def test_clone_leaves_original_untouched(comfy):
    original = FakeModelPatcher(wan_model())
    patched = apply(original, "radial")
    assert patched is not original
    assert original.model_options == {"transformer_options": {}} and original.wrappers == {}
    assert patched.get_wrappers(APPLY_MODEL, patching.WRAPPER_KEY)
    unet = FakeModelPatcher(sd15_unet())
    patched = apply(unet, "hidiffusion")
    assert unet.model_options == {"transformer_options": {}} and unet.wrappers == {}
    assert patched.get_wrappers(APPLY_MODEL, patching.WRAPPER_KEY)  # the step-window wrapper of the attn1 patches


def test_unsupported_models_and_setups_raise(comfy, monkeypatch):
    with pytest.raises(ValueError, match="does not support ComfyUI Chroma models"):
        apply(FakeModelPatcher(fake_model("Chroma")), "gna", window="3")
    with pytest.raises(ValueError, match="supports wan, hunyuanvideo"):
        apply(FakeModelPatcher(fake_model("Flux", patch_size=2)), "radial")
    with pytest.raises(ValueError, match="supports unet"):
        apply(FakeModelPatcher(wan_model()), "hidiffusion")
    with pytest.raises(ValueError, match="2-D patches"):
        apply(FakeModelPatcher(fake_model("HunyuanVideo", patch_size=[2, 2])), "gna", window="3")
    with pytest.raises(ValueError, match="already applied"):
        apply(apply(FakeModelPatcher(wan_model()), "radial"), "gna", window="3")
    patched = apply(FakeModelPatcher(fake_model("Flux", patch_size=2)), "gna", window="3")
    with pytest.raises(ValueError, match="Kontext"):
        run_model(patched, lambda to: None, torch.zeros(1, 16, 8, 8), torch.zeros(1, 4, 8), ref_latents=[torch.zeros(1, 16, 8, 8)])
    patched = apply(FakeModelPatcher(wan_model()), "radial")
    with pytest.raises(ValueError, match="cannot be told apart"):  # 2 x 4 x 4 = 32 video tokens, 32 text tokens
        run_model(patched, lambda to: None, torch.zeros(1, 16, 2, 8, 8), torch.zeros(1, 32, 8))
    monkeypatch.delattr(comfy, "wrap_attn")
    with pytest.raises(RuntimeError, match="0.3.60"):
        apply(FakeModelPatcher(wan_model()), "radial")


def test_regional_masks_are_refused(comfy):
    patched = apply(FakeModelPatcher(fake_model("Flux", patch_size=2)), "gna", window="3")
    q, k, v = qkv(1, 2, 4 + 16, 8)
    mask = torch.zeros(1, 1, 20, 20)

    def forward(to):
        return comfy.optimized_attention(q, k, v, 2, skip_reshape=True, mask=mask, transformer_options=to)

    with pytest.raises(NotImplementedError, match="key-padding"):
        run_model(patched, forward, torch.zeros(1, 16, 8, 8), torch.zeros(1, 4, 8))


# ------------------------------------------------------------------------------------------------------
# UNet: HiDiffusion MSW-MSA through attn1 replace
# ------------------------------------------------------------------------------------------------------
def _st(depth):
    return SimpleNamespace(transformer_blocks=[None] * depth)


def sd15_unet():
    """ComfyUI UNetModel block layout of SD 1.5 (attention in levels 0-2, 2 res blocks per level)."""
    attn_in = {1, 2, 4, 5, 7, 8}
    attn_out = set(range(3, 12))
    return fake_model(
        "UNetModel", num_res_blocks=[2, 2, 2, 2],
        input_blocks=[["res", _st(1)] if i in attn_in else ["res"] for i in range(12)],
        middle_block=["res", _st(1), "res"],
        output_blocks=[["res", _st(1)] if i in attn_out else ["res"] for i in range(12)],
    )


def sdxl_unet():
    return fake_model(
        "UNetModel", num_res_blocks=[2, 2, 2],
        input_blocks=[["res", _st(2 if i in (4, 5) else 10)] if i in (4, 5, 7, 8) else ["res"] for i in range(9)],
        middle_block=["res", _st(10), "res"],
        output_blocks=[["res", _st(10 if i < 3 else 2)] if i < 6 else ["res"] for i in range(9)],
    )


def test_unet_structure_maps_to_diffusers_names():
    blocks, levels = patching.unet_structure(sd15_unet())
    assert levels == (True, True, True, False)
    names = [n for _, n in blocks]
    assert names[:2] == ["down_blocks.0.attentions.0.transformer_blocks.0", "down_blocks.0.attentions.1.transformer_blocks.0"]
    assert names[6] == "up_blocks.1.attentions.0.transformer_blocks.0" and blocks[6][0] == ("output", 3, 0)
    assert names[-1] == "mid_block.attentions.0.transformer_blocks.0" and blocks[-1][0] == ("middle", 0, 0)
    blocks, levels = patching.unet_structure(sdxl_unet())
    assert levels == (False, True, True)
    assert dict(blocks)[("input", 5, 1)] == "down_blocks.1.attentions.1.transformer_blocks.1"
    assert dict(blocks)[("output", 4, 1)] == "up_blocks.1.attentions.1.transformer_blocks.1"


@pytest.mark.parametrize("variant,unet,keys", [
    ("sd15", sd15_unet, {("input", 1, 0): 0, ("input", 2, 0): 1, ("output", 9, 0): 12, ("output", 10, 0): 13, ("output", 11, 0): 14}),
    ("sdxl", sdxl_unet, {("input", i, t): None for i in (4, 5) for t in (0, 1)} | {("output", i, t): None for i in (3, 4, 5) for t in (0, 1)}),
])
def test_hidiffusion_targets_official_blocks(comfy, variant, unet, keys):
    patched = apply(FakeModelPatcher(unet()), "hidiffusion")
    replaced = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert set(replaced) == set(keys)
    for key, layer in keys.items():
        assert layer is None or replaced[key].layer == layer
    other = "sdxl" if variant == "sd15" else "sd15"
    with pytest.raises(ValueError, match="does not match this UNet"):
        apply(FakeModelPatcher(unet()), "hidiffusion", model_variant=other)


@pytest.mark.parametrize("mode", [dict(shift=1), dict(seed=3)])
def test_hidiffusion_attn1_replace_equals_processor(comfy, mode):
    patched = apply(FakeModelPatcher(sd15_unet()), "hidiffusion", **mode)
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn1"][("output", 9, 0)]
    B, heads, D, grid = 2, 2, 8, (16, 24)
    q, k, v = qkv(B, grid[0] * grid[1], heads * D)
    extra = {"n_heads": heads, "dim_head": D, "activations_shape": [B, 16, *grid], "original_shape": [B, 4, *grid],
             "block": ("output", 9), "block_index": 0, "sigmas": torch.tensor([0.5]), "sample_sigmas": torch.tensor([1.0, 0.5, 0.0])}
    out = patch(q, k, v, extra)
    q4, k4, v4 = (t.unflatten(-1, (heads, D)) for t in (q, k, v))
    layout = TokenLayout(grid, 0)
    ctx = RunContext("unet")
    ctx.step, ctx.branch = 1, 0
    proc = MSWMSAProcessor(seed=mode.get("seed"), shift=mode.get("shift")).bind(ctx, None, patch.layer)
    torch.testing.assert_close(out, proc.core(q4, k4, v4, layout).reshape(B, -1, heads * D), rtol=0, atol=0)
    if "shift" in mode:
        expected = pattern_attention(q4, k4, v4, shifted_window_pattern(grid, 1), layout).reshape(B, -1, heads * D)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # without activations_shape (older ComfyUI) the level grid comes from the latent size
    del extra["activations_shape"]
    torch.testing.assert_close(patch(q, k, v, extra), out, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# V3 schema and the exported folder
# ------------------------------------------------------------------------------------------------------
def _stub_io():
    class _Spec:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    def kind(name):
        return type(name, (), {"Input": type("Input", (_Spec,), {}), "Output": type("Output", (_Spec,), {})})

    return SimpleNamespace(
        Schema=_Spec, NodeOutput=type("NodeOutput", (_Spec,), {}), ComfyNode=type("ComfyNode", (), {}),
        Model=kind("Model"), Int=kind("Int"), Float=kind("Float"), Boolean=kind("Boolean"), String=kind("String"),
        Combo=kind("Combo"),
    )


def _package_with_comfy_api(monkeypatch, io):
    """A stand-in ``comfy_api.latest`` (with ``io`` and ``ComfyExtension``) in sys.modules, and a second
    instance of the ``diffusion_attn.comfy`` package module executed against it (same name, not put in
    sys.modules; nothing reloaded). Returns ``(module, latest)``."""
    api = types.ModuleType("comfy_api")
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, type("ComfyExtension", (), {})
    monkeypatch.setitem(sys.modules, "comfy_api", api)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    spec = importlib.util.spec_from_file_location("diffusion_attn.comfy", dcomfy.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, latest


def test_v3_nodes_mirror_v1(comfy, monkeypatch):
    io = _stub_io()
    v3 = {cls.define_schema().kwargs["node_id"]: cls for cls in cnodes.build_v3_nodes(io)}
    assert set(v3) == set(dcomfy.NODE_CLASS_MAPPINGS)
    for key, cls in v3.items():
        schema = cls.define_schema().kwargs
        v1 = dcomfy.NODE_CLASS_MAPPINGS[key].INPUT_TYPES()["required"]
        assert [i.args[0] for i in schema["inputs"]] == list(v1)
        assert schema["category"] == "diffusion_attn" and schema["display_name"] == dcomfy.NODE_DISPLAY_NAME_MAPPINGS[key]
    schema = v3[cnodes.node_id(get_method("radial"))].define_schema().kwargs
    values = {i.args[0]: i.kwargs["default"] for i in schema["inputs"][1:]}
    result = v3[cnodes.node_id(get_method("radial"))].execute(model=FakeModelPatcher(wan_model()), **values)
    assert runtime_of(result.args[0]).params == get_method("radial").resolve({}, "wan")

    # comfy_entrypoint appears when comfy_api imports
    module, latest = _package_with_comfy_api(monkeypatch, io)
    extension = asyncio.run(module.comfy_entrypoint())
    assert isinstance(extension, latest.ComfyExtension)
    assert len(asyncio.run(extension.get_node_list())) == len(patching.comfy_methods())
    assert sys.modules["diffusion_attn.comfy"] is dcomfy and not hasattr(dcomfy, "comfy_entrypoint")


def test_export_node_folder_is_importable(tmp_path):
    folder = tmp_path / "diffusion_attn_nodes"
    written = export_node_folder(folder)
    assert {p.name for p in written} >= {"__init__.py", "pyproject.toml", "README.md"}
    assert all(p.is_file() and p.parent == folder for p in written)
    spec = importlib.util.spec_from_file_location("exported_diffusion_attn_nodes", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = sys.modules["diffusion_attn.comfy"]
    assert module.NODE_CLASS_MAPPINGS is current.NODE_CLASS_MAPPINGS
    assert module.NODE_DISPLAY_NAME_MAPPINGS == current.NODE_DISPLAY_NAME_MAPPINGS
    assert len(module.NODE_CLASS_MAPPINGS) == len(patching.comfy_methods())
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((folder / "pyproject.toml").read_text())
    assert meta["project"]["name"] and meta["project"]["version"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
    readme = (folder / "README.md").read_text()
    assert all(cnodes.display_name(spec) in readme for spec in patching.comfy_methods().values())
    assert all(f"`{name}`: {why}" in readme for name, why in patching.unavailable_methods().items())
    assert not hasattr(module, "comfy_entrypoint")  # no comfy_api here: the V1 mappings


# ------------------------------------------------------------------------------------------------------
# Conventions observed in the real ComfyUI 0.3.64 (benchmarks/comfy_real_check.py)
# ------------------------------------------------------------------------------------------------------
def _sliding_window_mask(grid, window):
    """Neighborhood attention written out independently: per axis, query i sees the ``w`` keys starting at
    ``clamp(i - w // 2, 0, L - w)`` (NATTEN's sliding window, stride 1, dilation 1); axes combine by AND."""
    coords = torch.cartesian_prod(*(torch.arange(n) for n in grid)).reshape(-1, len(grid))
    allowed = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for axis, (n, w) in enumerate(zip(grid, window)):
        start = (coords[:, axis] - w // 2).clamp(0, n - w)
        key = coords[:, axis]
        allowed &= (key[None, :] >= start[:, None]) & (key[None, :] < start[:, None] + w)
    return allowed


def _text_first_reference(q4, k4, v4, grid_mask, text):
    """SDPA with an explicit boolean mask over [text, grid]: text rows and columns dense."""
    n = grid_mask.shape[0]
    mask = torch.ones(text + n, text + n, dtype=torch.bool)
    mask[text:, text:] = grid_mask
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q4, k4, v4)), attn_mask=mask).transpose(1, 2)


def test_sd3_mmdit_v_unflattened_equals_dense_mask_reference(comfy):
    """ComfyUI's MMDiT (``_block_mixing`` in comfy/ldm/modules/diffusionmodules/mmdit.py) passes q and k as
    (B, S, heads * D) but v from ``split_qkv`` as (B, S, heads, D), without skip_reshape (B9: crashed)."""
    dm = fake_model("OpenAISignatureMMDITWrapper", patch_size=2, register_length=0)
    patched = apply(FakeModelPatcher(dm), "gna", window="3")
    B, heads, D, text, grid = 2, 2, 8, 5, (4, 6)
    n = text + grid[0] * grid[1]
    q, k, v = qkv(B, n, heads * D)
    v4_in = v.view(B, n, heads, D)

    def forward(to):
        return comfy.optimized_attention(q, k, v4_in, heads=heads, transformer_options=to)

    out = run_model(patched, forward, torch.zeros(1, 16, 8, 12), context=torch.zeros(1, text, 32))
    assert out.shape == (B, n, heads * D)
    q4, k4 = (t.view(B, n, heads, D) for t in (q, k))
    expected = _text_first_reference(q4, k4, v4_in, _sliding_window_mask(grid, (3, 3)), text).reshape(B, n, -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the same call with v flattened gives the same result (both layouts accepted, as ComfyUI's own functions)
    flat = run_model(patched, lambda to: comfy.optimized_attention(q, k, v, heads=heads, transformer_options=to),
                     torch.zeros(1, 16, 8, 12), context=torch.zeros(1, text, 32))
    assert torch.equal(flat, out)
    assert not torch.allclose(out, _attention_pytorch(q, k, v4_in, heads))


def _sparse_calls(patched, comfy, sigmas):
    """Per model call at each sigma of ``sigmas`` (one sampler run): whether the method changed attention."""
    q, k, v = qkv(1, 5 + 48, 16)
    plain = _attention_pytorch(q, k, v, 2)
    out = []
    for sigma in sigmas[:-1]:
        got = run_model(patched, lambda to: comfy.optimized_attention(q, k, v, heads=2, transformer_options=to),
                        torch.zeros(1, 16, 12, 16), torch.zeros(1, 5, 8), sigma=sigma, sample_sigmas=sigmas)
        out.append(not torch.equal(got, plain))
    return out


def test_percent_step_window_survives_a_split(comfy):
    """KSamplerAdvanced split: the second run's sample_sigmas start mid-schedule. start/end percent are sigma
    bounds (percent_to_sigma), so both halves together place the method as one full run does; dense_steps
    counts the steps of each run (documented), so it restarts."""
    sigmas = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)
    first, second = sigmas[:4], sigmas[3:]  # KSamplerAdvanced end_at_step=3 / start_at_step=3
    model = FakeModelPatcher(fake_model("Flux", patch_size=2))
    windowed = apply(model, "gna", window="3", start_percent=0.3, end_percent=0.7)
    full = _sparse_calls(windowed, comfy, sigmas)
    assert full == [False, False, True, True, False]  # sigma in [0.3, 0.7] (flow: sigma = 1 - percent)
    assert _sparse_calls(windowed, comfy, first) + _sparse_calls(windowed, comfy, second) == full
    by_steps = apply(model, "gna", window="3", dense_steps=2)
    assert _sparse_calls(by_steps, comfy, sigmas) == [False, False, True, True, True]
    assert _sparse_calls(by_steps, comfy, first) + _sparse_calls(by_steps, comfy, second) == [False, False, True, False, False]
    everywhere = apply(model, "gna", window="3")
    assert _sparse_calls(everywhere, comfy, sigmas) == [True] * 5


def test_percent_step_window_on_unet_attn1(comfy):
    patched = apply(FakeModelPatcher(sd15_unet()), "hidiffusion", shift=1, start_percent=0.5)
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn1"][("output", 9, 0)]
    B, heads, D, grid = 1, 2, 8, (8, 8)
    q, k, v = qkv(B, 64, heads * D)
    plain = _attention_pytorch(q, k, v, heads)
    sigmas = (1.0, 0.75, 0.5, 0.25, 0.0)

    def forward(sigma):
        def call(to):  # BasicTransformerBlock: extra_options = transformer_options + n_heads, dim_head, ...
            extra = {**to, "n_heads": heads, "dim_head": D, "activations_shape": [B, 16, *grid]}
            return patch(q, k, v, extra)
        return run_model(patched, call, torch.zeros(1, 4, 64, 64), torch.zeros(1, 7, 8), sigma=sigma, sample_sigmas=sigmas)

    changed = [not torch.equal(forward(s), plain) for s in sigmas[:-1]]
    assert changed == [False, False, True, True]


@pytest.mark.parametrize("method,values,match", [
    ("gna", dict(window="3", backend="windows"), "backend='windows'"),  # sliding windows do not partition
    ("gna", dict(window="3", backend="triton"), "backend='triton'"),  # CUDA only
    ("radial", dict(backend="strips"), "backend='strips'"),  # radial is a block pattern, not boxes
    ("gna", dict(window="3,5"), "3-D token grid"),  # a 2-D window on a video model
    ("gna", dict(window="3", start_percent=0.8, end_percent=0.2), "start_percent"),
    ("gna", dict(window="3", end_percent=float("nan")), "end_percent must be a number in"),
])
def test_errors_known_at_the_node_are_raised_there(comfy, method, values, match):
    """B9: what cannot run fails when the node runs (not at the first KSampler step), and the input model
    stays untouched."""
    model = FakeModelPatcher(wan_model())
    with pytest.raises(ValueError, match=match):
        apply(model, method, **values)
    assert model.model_options == {"transformer_options": {}} and model.wrappers == {}


def test_node_time_backend_check_accepts_what_runs(comfy):
    # blocked GNA partitions the grid: 'windows' is accepted and runs
    patched = apply(FakeModelPatcher(fake_model("Flux", patch_size=2)), "gna", window="2", stride="2", backend="windows")
    q, k, v = qkv(1, 2, 5 + 48, 8)
    out = run_model(patched, lambda to: comfy.optimized_attention(q, k, v, 2, skip_reshape=True, transformer_options=to),
                    torch.zeros(1, 16, 12, 16), context=torch.zeros(1, 5, 32))
    layout = TokenLayout((6, 8), 5, "first")
    q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
    pattern = neighborhood_pattern((6, 8), (2, 2), (2, 2), (1, 1))
    torch.testing.assert_close(out, pattern_attention(q4, k4, v4, pattern, layout, backend="reference").reshape(1, 53, -1))
    apply(FakeModelPatcher(sd15_unet()), "hidiffusion", backend="windows")  # shifted windows partition


def test_v3_seed_keeps_its_value_and_exported_folder_exposes_v3(comfy, monkeypatch, tmp_path):
    io = _stub_io()
    (node,) = [c for c in cnodes.build_v3_nodes(io) if c.METHOD == "hidiffusion"]
    seed = [i for i in node.define_schema().kwargs["inputs"] if i.args[0] == "seed"][0]
    assert seed.kwargs["control_after_generate"] is False
    others = [i for i in node.define_schema().kwargs["inputs"][1:] if i.args[0] != "seed"]
    assert all("control_after_generate" not in i.kwargs for i in others)

    with_v3, _ = _package_with_comfy_api(monkeypatch, io)
    monkeypatch.setitem(sys.modules, "diffusion_attn.comfy", with_v3)
    monkeypatch.setattr(sys.modules["diffusion_attn"], "comfy", with_v3)
    folder = tmp_path / "nodes"
    export_node_folder(folder)
    spec = importlib.util.spec_from_file_location("exported_v3_nodes", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # ComfyUI's loader (nodes.py load_custom_node) reads NODE_CLASS_MAPPINGS first, comfy_entrypoint otherwise
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")
    extension = asyncio.run(module.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    assert {n.define_schema().kwargs["display_name"] for n in nodes} == set(dcomfy.NODE_DISPLAY_NAME_MAPPINGS.values())


@pytest.mark.skipif(not __import__("diffusion_attn.kernels", fromlist=["flex_available"]).flex_available("cpu"),
                    reason="compiled FlexAttention does not run on this machine")
def test_text_length_change_with_the_same_grid_rebuilds_kernel_caches(comfy):
    """B5 in the ComfyUI runtime: HunyuanVideo prompts of different lengths on the same video grid; the
    flex block mask cached for one sequence length must not serve the other."""
    dm = fake_model("HunyuanVideo", patch_size=[1, 2, 2], byt5_in=None)
    patched = apply(FakeModelPatcher(dm), "radial", decay_factor=0.5, sink="true", dense_layers=0, dense_steps=0,
                    backend="flex")
    grid, heads, D = (5, 8, 9), 2, 8
    pattern = radial_pattern(grid, 0.5, True)
    assert not pattern.is_full()
    for text in (6, 9, 6):
        layout = TokenLayout(grid, text, "last")
        q, k, v = qkv(1, heads, layout.num_tokens, D, seed=text)
        out = run_model(patched, lambda to: comfy.optimized_attention(q, k, v, heads, skip_reshape=True, transformer_options=to),
                        torch.zeros(1, 16, 5, 16, 18), context=torch.zeros(1, text, 32))
        mask = torch.ones(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
        n = pattern.num_tokens
        mask[:n, :n] = pattern.dense_mask()
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, layout.num_tokens, -1)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
