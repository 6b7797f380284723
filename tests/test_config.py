"""One typed config per method: the dataclass is the single source of the kwargs, the config form of
``apply``, processor construction, pattern cache keys, CLI flags, UI controls, ComfyUI inputs and docs;
input types (boxes, masks, images, prompts, head lists) validate and parse from the command line."""

import collections.abc
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion_attn as da
from diffusion_attn.models.tiny import default_call_kwargs
from diffusion_attn.processors.install import get_processors
from diffusion_attn.registry import (
    Boxes,
    Heads,
    MethodConfig,
    MethodSpec,
    Prompts,
    check_mask_size,
    method_config,
    param,
    register,
    unregister,
)
from diffusion_attn.registry import Image as ImageInput
from diffusion_attn.registry import Mask as MaskInput
from pipes import pipe_cache


pipe_for = pipe_cache()


def run(pipe, family, **overrides):
    kw = default_call_kwargs(family, **overrides)
    return pipe(prompt="a red fox in the snow", generator=torch.Generator().manual_seed(0), **kw)[0]


def processors(pipe):
    return {id(m): get_processors(m) for m in da.denoisers(pipe)}


def assert_same_processors(pipe, before):
    after = processors(pipe)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].keys() == before[k].keys() and all(after[k][n] is before[k][n] for n in before[k])


# ---------------------------------------------------------------------------------------------------
# the configs and what is derived from them
# ---------------------------------------------------------------------------------------------------


def test_configs_are_exported_and_specs_derive_their_params():
    expected = {
        da.GNAConfig: {"window": "pattern", "stride": "pattern", "dilation": "pattern", "dense_layers": "placement",
                       "dense_steps": "placement", "backend": "kernel"},
        da.RadialConfig: {"decay_factor": "pattern", "sink": "pattern", "dense_layers": "placement",
                          "dense_steps": "placement", "backend": "kernel"},
    }
    for cls, roles in expected.items():
        spec = da.get_method(cls)
        assert spec.config is cls and da.get_method(spec.name) is spec
        assert {p.name: p.role for p in spec.params} == roles
        assert [p.name for p in spec.params] == [f.name for f in dataclasses.fields(cls)]
    hid = da.get_method("hidiffusion")
    assert hid.config is da.HiDiffusionConfig and [p.name for p in hid.params][:3] == ["apply_raunet", "apply_window_attn",
                                                                                      "model_variant"]
    assert all(p.role in ("pattern", "placement", "kernel", "input") and p.help for s in da.methods().values()
               for p in s.params)
    # radial's per-family defaults, written out here from the official scripts (Mochi's are ours)
    assert da.get_method("radial").family_defaults == {
        "wan": dict(decay_factor=0.2, sink=True, dense_layers=1, dense_steps=12),
        "wan2.2": dict(decay_factor=0.8, sink=True, dense_layers=1, dense_steps=11),
        "hunyuanvideo": dict(decay_factor=0.95, sink=False, dense_layers=0, dense_steps=12),
        "mochi": dict(decay_factor=0.95, sink=False, dense_layers=0, dense_steps=16),
    }
    assert da.RadialConfig().resolved("wan2.2") == da.RadialConfig(0.8, True, 1, 11, "auto")
    assert da.RadialConfig(decay_factor=0.5).resolved("wan").decay_factor == 0.5  # a given value wins


def test_config_is_a_mapping_and_compares_by_value():
    c = da.GNAConfig(window=(4, 6), stride=2)
    assert c["window"] == (4, 6) and c["stride"] == (2,) and dict(**c)["backend"] == "auto"
    assert isinstance(c, collections.abc.Mapping) and "window" in c and "foo" not in c and len(c) == 6
    assert list(c) == ["window", "stride", "dilation", "dense_layers", "dense_steps", "backend"] == list(dict(c))
    assert c == da.GNAConfig(window=[4, 6], stride=(2,)) and hash(c) == hash(da.GNAConfig(window=(4, 6), stride=2))
    assert c != da.GNAConfig(window=(4, 6), stride=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.window = 3


def test_pattern_key_is_derived_from_the_pattern_fields_only():
    base = da.GNAConfig(window=(4, 6))
    assert {name for name, _ in base.pattern_key()[1:]} == {"window", "stride", "dilation"}
    for change in (dict(window=(4, 4)), dict(stride=2), dict(dilation=2)):
        assert dataclasses.replace(base, **change).pattern_key() != base.pattern_key()
    for change in (dict(dense_layers=3), dict(dense_steps=2), dict(backend="gather")):
        assert dataclasses.replace(base, **change).pattern_key() == base.pattern_key()
    radial = da.RadialConfig(0.5, False, 0, 0)
    assert {name for name, _ in radial.pattern_key()[1:]} == {"decay_factor", "sink"}
    assert dataclasses.replace(radial, sink=True).pattern_key() != radial.pattern_key()
    # the processors' cache key: the whole layout (grid and text) plus the config's pattern fields
    proc = da.GNAProcessor.from_config(base)
    assert proc.config == base
    same_grid = [da.TokenLayout((8, 12), 5, "first"), da.TokenLayout((8, 12), 7, "first")]
    assert proc.pattern_key(same_grid[0]) != proc.pattern_key(same_grid[1])
    assert proc.pattern_key(same_grid[0]) == da.GNAProcessor((4, 6)).pattern_key(da.TokenLayout((8, 12), 5, "first"))


def test_processor_from_config_takes_every_field():
    cfg = da.RadialConfig(0.3, True, 2, 5, "gather")
    proc = da.RadialProcessor.from_config(cfg)
    assert (proc.decay_factor, proc.sink, proc.dense_layers, proc.dense_steps, proc.backend) == (0.3, True, 2, 5, "gather")
    with pytest.raises(ValueError, match="'decay_factor' must be a finite number"):
        da.RadialProcessor(decay_factor=float("nan"))


def test_apply_with_a_config_equals_the_string_form():
    pipe = pipe_for("tiny-wan-random")
    kw = dict(decay_factor=0.05, dense_steps=0, dense_layers=0)
    with da.applied(pipe, "radial", **kw) as h:
        by_name = run(pipe, "wan", num_inference_steps=1)
        params = h.params
    with da.applied(pipe, da.RadialConfig(**kw)) as h:
        by_config = run(pipe, "wan", num_inference_steps=1)
        assert h.params == params == dict(kw, sink=True, backend="auto")  # sink: Wan's default filled in
        assert h.config == da.RadialConfig(0.05, True, 0, 0, "auto")
    assert torch.equal(by_config, by_name)
    before = processors(pipe)
    with pytest.raises(ValueError, match="either in the RadialConfig or as keyword arguments"):
        da.apply(pipe, da.RadialConfig(), decay_factor=0.1)
    with pytest.raises(ValueError, match="GNAConfig is not a config of method 'radial'"):
        da.get_method("radial").make_config(da.GNAConfig(window=3))
    assert_same_processors(pipe, before)
    # the mask view takes configs too
    layout = da.TokenLayout((3, 4, 6))
    assert torch.equal(da.attention_mask(da.GNAConfig(window=(1, 2, 3)), layout),
                       da.attention_mask("gna", layout, window=(1, 2, 3)))
    assert torch.equal(da.attention_mask(da.GNAConfig, layout, window=(1, 2, 3)),  # the class names the method
                       da.attention_mask("gna", layout, window=(1, 2, 3)))


# ---------------------------------------------------------------------------------------------------
# input types, on a small method registered for the test
# ---------------------------------------------------------------------------------------------------


@method_config
class ToyConfig(MethodConfig):
    boxes: Boxes | None = param(None, role="input", help="regions")
    heads: Heads | None = param(None, role="input", help="heads to change")
    prompts: Prompts | None = param(None, role="input", help="one prompt per region")
    mask: MaskInput | None = param(None, role="input", help="a region mask")
    image: ImageInput | None = param(None, role="input", help="a reference image")
    strength: float = param(0.5, role="pattern", range=(0.0, 1.0), help="how much")


@pytest.fixture
def toy():
    calls = []

    def install(model, family, context, config):
        calls.append(config)
        return []

    spec = register(MethodSpec(name="toy-inputs", summary="a test method", paper="none", families=("flux",),
                               kind="training-free test", config=ToyConfig, install=install))
    try:
        yield spec, calls
    finally:
        unregister("toy-inputs")
    assert "toy-inputs" not in da.methods()


def test_input_types_validate(toy, tmp_path):
    spec, _ = toy
    assert [p.type for p in spec.params[:5]] == [Boxes, Heads, Prompts, MaskInput, ImageInput]
    c = ToyConfig(boxes=[(0.1, 0.1, 0.5, 0.5), [0, 0, 1, 1]], heads=[0, 3], prompts=["a", "b"])
    assert c.boxes == ((0.1, 0.1, 0.5, 0.5), (0.0, 0.0, 1.0, 1.0)) and c.heads == (0, 3) and c.prompts == ("a", "b")
    assert ToyConfig(boxes=(0.1, 0.2, 0.3, 0.4)).boxes == ((0.1, 0.2, 0.3, 0.4),)  # one box
    bad = [
        (dict(boxes=[(0.1, 0.1, 1.2, 0.5)]), r"box 0 .* lies outside the image: .* in \[0, 1\]"),
        (dict(boxes=[(0.5, 0.1, 0.5, 0.4)]), r"box 0 .* is empty: need x0 < x1 and y0 < y1"),
        (dict(boxes=[]), "non-empty list of boxes"),
        (dict(boxes=[(0.1, 0.1, 0.5)]), "box 0 must be 4 finite numbers"),
        (dict(boxes=[(0.1, float("nan"), 0.5, 0.6)]), "box 0 must be 4 finite numbers"),
        (dict(heads=[]), "got an empty list"),
        (dict(heads=[0, -1]), "head indices >= 0"),
        (dict(heads=[1, 1]), "lists a head twice"),
        (dict(heads=[0, 1.5]), "head indices >= 0"),
        (dict(prompts=[]), "non-empty list of non-empty prompts"),
        (dict(prompts=["a", " "]), "prompt 1 is ' '"),
        (dict(mask=torch.zeros(1, 1, 4, 4)), r"must be 2-D \(H, W\) or 3-D \(N, H, W\), got a 4-D tensor"),
        (dict(mask=torch.full((4, 4), 2.0)), r"values in \[0, 1\]"),
        (dict(mask=tmp_path / "missing.png"), "does not exist"),
        (dict(mask=[1, 2]), "got list"),
        (dict(image=torch.zeros(5, 8, 8)), r"\(C, H, W\) or \(1, C, H, W\)"),
        (dict(strength=float("nan")), "finite"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            ToyConfig(**kwargs)
    Image.fromarray(np.full((6, 10), 255, np.uint8)).save(tmp_path / "m.png")
    m = ToyConfig(mask=str(tmp_path / "m.png")).mask
    assert m.shape == (6, 10) and m.dtype == torch.float32 and bool((m == 1).all())
    assert ToyConfig(mask=np.zeros((3, 5), bool)).mask.shape == (3, 5)
    Image.new("RGB", (7, 5), (255, 0, 0)).save(tmp_path / "ref.png")
    assert ToyConfig(image=tmp_path / "ref.png").image.size == (7, 5)
    check_mask_size(m, (6, 10))
    with pytest.raises(ValueError, match=r"mask is 6x10 \(height x width\) but the image is 64x64"):
        check_mask_size(m, (64, 64))
    # tensors compare by value
    assert ToyConfig(mask=torch.ones(2, 2)) == ToyConfig(mask=torch.ones(2, 2)) != ToyConfig(mask=torch.zeros(2, 2))


def test_input_types_parse_from_the_command_line(toy, tmp_path, capsys):
    from diffusion_attn.cli import _method_params, build_parser, main

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "m.png")
    args = build_parser().parse_args(["generate", "--method", "toy-inputs", "--boxes", "0.1,0.1,0.5,0.5;0.5,0.5,0.9,0.9",
                                      "--heads", "0,3,5", "--prompts", "a fox;a snowy forest", "--mask", str(tmp_path / "m.png")])
    given = _method_params(args)
    c = ToyConfig.from_kwargs(**given)
    assert c.boxes == ((0.1, 0.1, 0.5, 0.5), (0.5, 0.5, 0.9, 0.9)) and c.heads == (0, 3, 5)
    assert c.prompts == ("a fox", "a snowy forest") and c.mask.shape == (4, 4)
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "--boxes" in out and "Boxes" in out and "--heads" in out
    assert main(["generate", "--method", "toy-inputs", "--model", "tiny-flux-random", "--boxes", "0.1,0.1,0.5", "--no-progress",
                 "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "box 0 must be 4 finite numbers" in err and err.count("\n") == 1


def test_heads_are_checked_against_the_model_at_apply(toy):
    spec, calls = toy
    pipe = pipe_for("tiny-flux-random")  # 2 attention heads
    before = processors(pipe)
    with pytest.raises(ValueError, match=r"'heads'=\(0, 2\) names head 2, but this FluxTransformer2DModel has 2 "
                                         r"attention heads \(0\.\.1\)"):
        da.apply(pipe, "toy-inputs", heads=(0, 2))
    assert calls == [] and not da.remove(pipe)
    assert_same_processors(pipe, before)
    with da.applied(pipe, "toy-inputs", heads="1", boxes="0,0,0.5,0.5") as h:
        assert h.config.heads == (1,) and calls[0] is h.config


def test_ui_comfy_and_docs_follow_the_config(toy):
    from diffusion_attn.comfy.nodes import SCHEDULE_INPUTS, node_inputs
    from diffusion_attn.ui import control_kind

    spec, _ = toy  # ComfyUI adds its schedule window (start/end percent) to every node
    assert [i.name for i in node_inputs(spec)] == [p.name for p in spec.params] + list(SCHEDULE_INPUTS)
    assert control_kind(spec.param("strength")) == "slider"
    gna = da.get_method("gna")
    assert [i.name for i in node_inputs(gna)] == [f.name for f in dataclasses.fields(da.GNAConfig)] + list(SCHEDULE_INPUTS)


def test_readme_table_lists_the_config_fields(toy):
    from diffusion_attn.docs import method_table

    row = next(line for line in method_table().splitlines() if line.startswith("| `toy-inputs`"))
    assert "`boxes` (input), `heads` (input), `prompts` (input), `mask` (input), `image` (input), `strength` |" in row


def test_a_spec_declared_with_params_gets_a_generated_config():
    from diffusion_attn.registry import Param

    params = (Param("a", float, None, "a help", range=(0.0, 1.0)),
              Param("w", tuple, 1, "w help", range=(1, None)),
              Param("backend", str, "auto", "kernel", choices=("auto", "gather"), role="kernel"))
    spec = register(MethodSpec(name="legacy-params", summary="s", paper="p", families=("wan",), kind="k", params=params,
                               install=lambda *a: [], family_defaults={"wan": {"a": 0.5}}))
    try:
        assert spec.params == params and spec.family_defaults == {"wan": {"a": 0.5}}
        assert spec.resolve({}, "wan") == {"a": 0.5, "w": (1,), "backend": "auto"}
        config = spec.config(a=0.25, w="2,3")
        assert da.get_method(config) is spec and config.pattern_key() == ("legacy-params", ("a", 0.25), ("w", (2, 3)))
        with pytest.raises(ValueError, match="'a' must be a finite number"):
            spec.resolve({"a": float("nan")})
    finally:
        unregister("legacy-params")


def test_pattern_cache_key_covers_the_text_length_b5():
    """B5: Mochi, CFG, two prompts of different lengths: the flex block mask is cached per layout (text
    length included), not per grid, so the second call does not reuse a mask built for another length."""
    from diffusion_attn.kernels import flex_available

    if not flex_available("cpu"):
        pytest.skip("FlexAttention cannot compile on this CPU")
    pipe = pipe_for("tiny-mochi")
    prompts = ["a fox", "a red fox running through fresh snow at dawn, cinematic and detailed"]
    kw = default_call_kwargs("mochi", num_inference_steps=2)
    outs = {}
    for backend in ("flex", "reference"):
        with da.applied(pipe, "radial", dense_steps=0, decay_factor=0.0, backend=backend):
            outs[backend] = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kw)[0]
    torch.testing.assert_close(outs["flex"], outs["reference"], atol=1e-4, rtol=0)


def test_masks_and_images_get_image_controls_and_comfy_sockets(toy):
    """Mask / Image parameters: an image upload in the UI (PIL in, validated tensor / image out) and
    ComfyUI's own MASK / IMAGE sockets (optional when not required; IMAGE (B, H, W, C) -> (C, H, W))."""
    from PIL import Image as PILImage

    from diffusion_attn.comfy.nodes import _make_v1_node, node_inputs
    from diffusion_attn.ui import control_kind, parse_control

    spec, _ = toy
    mask_p, image_p = spec.param("mask"), spec.param("image")
    assert control_kind(mask_p) == control_kind(image_p) == "image"
    upload = PILImage.new("L", (6, 4), color=255)
    mask = parse_control(mask_p, upload)
    assert torch.is_tensor(mask) and mask.shape[-2:] == (4, 6) and float(mask.min()) == 1.0
    assert parse_control(mask_p, None) is None
    rgb = parse_control(image_p, PILImage.new("RGB", (6, 4), color=(255, 0, 0)))
    assert rgb.size == (6, 4)

    inputs = {i.name: i for i in node_inputs(spec)}
    assert (inputs["mask"].kind, inputs["image"].kind) == ("MASK", "IMAGE")
    types = _make_v1_node(spec).INPUT_TYPES()
    assert types["optional"]["mask"][0] == "MASK" and types["optional"]["image"][0] == "IMAGE"
    assert "mask" not in types["required"] and "boxes" in types["required"]
    comfy_image = torch.rand(2, 4, 6, 3)  # ComfyUI: (B, H, W, C)
    decoded = inputs["image"].decode(comfy_image)
    assert torch.equal(decoded, comfy_image[0].permute(2, 0, 1))
    assert torch.is_tensor(image_p.validate(decoded))
    comfy_mask = torch.rand(1, 4, 6)
    assert torch.equal(mask_p.validate(inputs["mask"].decode(comfy_mask)), comfy_mask)
