"""ComfyUI nodes for the pack: one node per registered method, named by the method's proper name
("Generalized Neighborhood Attention (GNA)", "Radial Attention", "HiDiffusion (MSW-MSA)").

``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` are V1 node classes generated from the method
specs (:mod:`.nodes`); they are plain data, so ``import diffusion_attn.comfy`` works without ComfyUI.
When ``comfy_api`` imports (inside ComfyUI), ``comfy_entrypoint`` returns a V3 ``ComfyExtension`` with
the same nodes as ``io.ComfyNode`` classes. ComfyUI's loader prefers a module's ``NODE_CLASS_MAPPINGS``
over its ``comfy_entrypoint``, so the exported custom-node folder (``diffusion-attn export-comfy DIR``,
:mod:`.export`) defines only ``comfy_entrypoint`` where the V3 API imports, else only the V1 mappings.

Each node takes a ``MODEL`` and returns ``model.clone()`` patched through ComfyUI's model-patching API;
the attention is the diffusers processors' kernel (``MethodSpec.grid_pattern`` +
:func:`diffusion_attn.kernels.pattern_attention`). See :mod:`.patching` (and :mod:`.families`,
:mod:`.runtime`, :mod:`.dit`, :mod:`.unet`) for how the token layout, the step window and the layer index
are obtained; ``benchmarks/comfy_real_check.py`` runs the nodes in a real ComfyUI.

Supported ComfyUI models (ComfyUI >= 0.3.60 for the DiTs, which use ``optimized_attention_override``):

* ``gna``: FLUX.1 (text first), SD 3 / 3.5 (text first), Wan 2.1 / 2.2 (self-attention only, incl. I2V,
  FLF2V, TI2V-5B, VACE, Fun Camera), HunyuanVideo (text last, its text padding mask honoured);
* ``radial``: Wan 2.1 / 2.2 and HunyuanVideo;
* ``hidiffusion``: SD 1.5 / 2.1 and SDXL / SDXL-Turbo UNets, MSW-MSA only (``attn1`` replace in the
  official blocks); RAU-Net is not included.

Not supported (a clear error at the node): other model classes (Chroma, Lumina, Qwen-Image, HiDream, ...),
Flux Kontext reference latents and HunyuanVideo ``ref_latent`` inputs (extra tokens outside the grid),
Wan S2V / HuMo / Animate, regional (per-query) attention masks.
"""

from __future__ import annotations

import importlib.util

from .nodes import build_node_mappings, build_v3_nodes

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = build_node_mappings()


def _comfy_api_io():
    try:
        if importlib.util.find_spec("comfy_api") is None:
            return None
    except ValueError:  # in sys.modules without a spec
        pass
    try:
        from comfy_api.latest import ComfyExtension, io
    except Exception:  # an unrelated or broken comfy_api: no V3 entry point
        return None
    return ComfyExtension, io


_v3 = _comfy_api_io()
if _v3 is not None:
    _ComfyExtension, _io = _v3

    class DiffusionAttnExtension(_ComfyExtension):
        """V3 extension with one node per registered method."""

        async def get_node_list(self):
            return build_v3_nodes(_io)

    async def comfy_entrypoint() -> DiffusionAttnExtension:
        return DiffusionAttnExtension()

    __all__ += ["DiffusionAttnExtension", "comfy_entrypoint"]
