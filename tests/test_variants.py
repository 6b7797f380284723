"""Model-variant knowledge (diffusion_attn.adapters.variants) against what the embedded pipelines
really do: detection from the denoiser and from class names, and the token layout of a call."""

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.adapters import adapter_family, token_layout, variant_of, variant_of_classes
from diffusion_attn.models import EMBEDDED_MODELS, build_pipeline, default_call_kwargs


@pytest.mark.parametrize("name", ["tiny-flux-random", "tiny-sd3", "tiny-wan-random", "tiny-hunyuanvideo", "tiny-mochi", "tiny-sd15-random"])
def test_token_layout_matches_the_run_context_of_a_real_call(name):
    pipe = build_pipeline(name)
    variant = EMBEDDED_MODELS[name].family
    kw = default_call_kwargs(name)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    assert variant_of(denoiser) == variant
    seen = {}
    with da.applied(pipe, "gna" if variant != "unet-sd15" else "hidiffusion",
                    **({"window": 1, "dense_steps": 100} if variant != "unet-sd15" else {"apply_raunet": False})) as h:
        def record(module, args, output):
            seen.setdefault("layout", (h.context.grid, h.context.text_len))

        hook = denoiser.register_forward_hook(record)
        try:
            pipe(prompt="a fox", generator=torch.Generator().manual_seed(0), **kw)
        finally:
            hook.remove()
    expected = token_layout(variant, kw["height"], kw["width"], kw.get("num_frames"),
                            max_sequence_length=kw.get("max_sequence_length"))
    grid, text = seen["layout"]
    assert grid == expected.grid
    if adapter_family(variant) != "wan":  # Wan's text is in cross-attention: not part of the layout
        assert text == expected.text_len


def test_detection_from_class_names():
    assert variant_of_classes("UNet2DConditionModel", "StableDiffusionXLPipeline") == "unet-sdxl"
    assert variant_of_classes("UNet2DConditionModel", "StableDiffusionPipeline") == "unet-sd15"
    assert variant_of_classes("WanTransformer3DModel") == "wan"
    assert variant_of_classes("SanaTransformer2DModel") is None
    assert adapter_family("unet-sdxl") == "unet" and adapter_family("flux") == "flux"


def test_token_layout_errors_name_the_variant():
    with pytest.raises(ValueError, match="too small for flux"):
        token_layout("flux", 8, 8)
    with pytest.raises(ValueError, match="no token layout known for 'sana'"):
        token_layout("sana", 512, 512)
