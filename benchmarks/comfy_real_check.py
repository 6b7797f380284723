"""Check the diffusion-attn ComfyUI nodes in a real ComfyUI, on CPU, with tiny random models built from
ComfyUI's own classes (not run by CI: it needs a ComfyUI checkout and its dependencies).

What it checks, through ComfyUI's executor (``execution.PromptExecutor``) and its ``KSampler`` /
``KSamplerAdvanced`` nodes:

* the nodes load from the exported custom-node folder (``diffusion-attn export-comfy``), as V3 nodes via
  ``comfy_entrypoint``; the V1 classes give bit-identical results in the same graph;
* per model (SD3, SD3.5-style MMDiT with image-only second attention, Flux, Wan 2.1, HunyuanVideo, SD 1.5-
  and SDXL-layout UNets): the patched model's sampled latent equals the unpatched model's sampled with a
  reference attention written here (SDPA with an explicit boolean mask; text dense; the grid and the text
  position are this script's own reading of each model's source);
* step windows: ``start_percent`` holds across a ``KSamplerAdvanced`` split (the sigmas at which the method
  runs are the same as in one full run), ``dense_steps`` restarts per run (documented);
* errors known at the node (a backend that cannot serve the pattern) are raised when the node runs;
* the seed input's ``control_after_generate`` is False, display names are the methods' names.

Set-up (ComfyUI 0.3.64; the torchvision / torchaudio wheels for torch 2.13 here are CUDA builds, so
stand-ins are put on sys.path when they do not import -- the checked code paths never use them)::

    python -m venv --system-site-packages /tmp/comfyvenv
    /tmp/comfyvenv/bin/pip install torchsde einops sentencepiece aiohttp yarl av alembic sqlalchemy
    # ComfyUI source in /tmp/ComfyUI (git clone https://github.com/Comfy-Org/ComfyUI; checkout v0.3.64)
    cd <diffusion-attn checkout>
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 /tmp/comfyvenv/bin/python benchmarks/comfy_real_check.py --comfyui /tmp/ComfyUI

Exit status 0 when every check passes; one line per check is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import sys
import tempfile
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"[{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)


# ------------------------------------------------------------------------------------------------------
# ComfyUI set-up
# ------------------------------------------------------------------------------------------------------
def _stand_in(name: str, folder: Path) -> None:
    """A package ``name`` whose attributes are inert placeholders (only referenced, never run, here)."""
    pkg = folder / name
    pkg.mkdir(parents=True, exist_ok=True)
    body = (
        '"""Stand-in written by comfy_real_check.py: the real package is not installable here."""\n'
        "class _Placeholder:\n"
        "    def __init__(self, *a, **k):\n"
        "        raise RuntimeError('%s stand-in: not available in this check')\n"
        "def __getattr__(name):\n"
        "    if name.startswith('__'):\n"
        "        raise AttributeError(name)\n"
        "    return _Placeholder\n" % name
    )
    (pkg / "__init__.py").write_text(body)
    for sub in ("transforms", "transforms/functional", "io", "ops", "functional"):
        path = pkg / sub
        path.mkdir(parents=True, exist_ok=True)
        (path / "__init__.py").write_text(body)


def setup_comfy(root: Path, scratch: Path):
    sys.path.insert(0, str(root))
    for name in ("torchvision", "torchaudio"):
        try:
            importlib.import_module(name)
        except Exception:
            sys.modules.pop(name, None)
            _stand_in(name, scratch / "standins")
    if str(scratch / "standins") not in sys.path:
        sys.path.insert(0, str(scratch / "standins"))
    from comfy.cli_args import args  # parses no command line unless comfy.options enables it (main.py does)

    args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import execution
    import nodes

    return nodes, execution


class _Server:
    """What ``PromptExecutor`` needs of ComfyUI's PromptServer."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self, *args, **kwargs):
        pass


# ------------------------------------------------------------------------------------------------------
# Helper nodes: in-process tiny models, conditioning and latents; capture of the sampled latent
# ------------------------------------------------------------------------------------------------------
STORE: dict = {}
CAPTURED: dict = {}


class TinyModel:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "check"

    def run(self, key):
        return (STORE[key],)


class TinyCond:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "check"

    def run(self, key):
        return (STORE[key],)


class TinyLatent:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    CATEGORY = "check"

    def run(self, key):
        return ({"samples": STORE[key].clone()},)


class Capture:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "check"

    def run(self, samples, key):
        CAPTURED[key] = samples["samples"].clone()
        return ()


class Reference:
    """Puts this script's reference attention on a clone of the unpatched model."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"model": ("MODEL",), "key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "check"

    def run(self, model, key):
        m = model.clone()
        ref = STORE[key]
        if ref["kind"] == "dit":
            m.model_options["transformer_options"]["optimized_attention_override"] = DiTReference(ref, m)
        else:
            for block in ref["blocks"]:
                m.set_model_attn1_replace(UNetReference(ref, m), *block)
        return (m,)


# ------------------------------------------------------------------------------------------------------
# Reference attention (independent of diffusion_attn's runtime: own layout, own placement, own masks)
# ------------------------------------------------------------------------------------------------------
def sliding_window_mask(grid, window):
    """Neighborhood attention: per axis, query i sees the ``w`` keys from ``clamp(i - w // 2, 0, L - w)``."""
    coords = torch.cartesian_prod(*(torch.arange(n) for n in grid)).reshape(-1, len(grid))
    allowed = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for axis, (n, w) in enumerate(zip(grid, window)):
        start = (coords[:, axis] - w // 2).clamp(0, n - w)
        key = coords[:, axis]
        allowed &= (key[None, :] >= start[:, None]) & (key[None, :] < start[:, None] + w)
    return allowed


def sequence_mask(grid_mask, text: int, text_first: bool):
    n = grid_mask.shape[0]
    mask = torch.ones(n + text, n + text, dtype=torch.bool)
    img = slice(text, text + n) if text_first else slice(0, n)
    mask[img, img] = grid_mask
    return mask


def masked_sdpa(q4, k4, v4, mask):
    """(B, S, H, D) inputs, SDPA with a boolean mask."""
    return F.scaled_dot_product_attention(q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def in_window(ref, transformer_options, model_sampling) -> bool:
    sigma = float(transformer_options["sigmas"].max())
    lo = model_sampling.percent_to_sigma(ref.get("end_percent", 1.0))
    hi = model_sampling.percent_to_sigma(ref.get("start_percent", 0.0))
    return lo <= sigma <= hi


class DiTReference:
    def __init__(self, ref, patcher):
        self.ref, self.patcher = ref, patcher

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, transformer_options=None, **kwargs):
        ref = self.ref
        n = ref["mask"].shape[0]
        seq = q.shape[2] if skip_reshape else q.shape[1]
        ms = self.patcher.model.model_sampling
        if seq != n or k.shape[2 if skip_reshape else 1] != n or not in_window(ref, transformer_options, ms):
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, transformer_options=transformer_options, **kwargs)
        b = q.shape[0]
        if skip_reshape:
            q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        else:  # as ComfyUI's attention_pytorch: t.view(b, -1, heads, dim_head) works for v as (B, S, H, D) too
            d = q.shape[-1] // heads
            q4, k4, v4 = (t.reshape(b, -1, heads, d) for t in (q, k, v))
        full = ref["mask"]
        if mask is not None:  # key padding (HunyuanVideo text): keep where the additive mask is 0
            keep = (mask.reshape(-1, n) == 0)[:, None, None, :]
            full = full[None, None] & keep
        out = masked_sdpa(q4, k4, v4, full)
        if skip_output_reshape:
            return out.transpose(1, 2)
        return out.reshape(b, n, -1)


class UNetReference:
    def __init__(self, ref, patcher):
        self.ref, self.patcher = ref, patcher

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options, mask=None):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        shape = extra_options["activations_shape"]
        grid = (int(shape[-2]), int(shape[-1]))
        if not in_window(self.ref, extra_options, self.patcher.model.model_sampling):
            return optimized_attention(q, k, v, heads)
        b, n = q.shape[:2]
        q4, k4, v4 = (t.reshape(b, n, heads, -1) for t in (q, k, v))
        return masked_sdpa(q4, k4, v4, self.ref["grid_mask"](grid)).reshape(b, n, -1)


# ------------------------------------------------------------------------------------------------------
# Tiny models from ComfyUI's classes
# ------------------------------------------------------------------------------------------------------
def _init_weights(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.dtype.is_floating_point:
                continue
            if t.ndim > 1:  # ComfyUI's disable_weight_init layers start uninitialized: fan-in scaled normal
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(max(1, t[0].numel())))
            elif name.endswith("weight") or name.endswith("scale"):  # norms
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def make_patcher(config_cls, unet_config: dict, seed: int = 0):
    import comfy.model_management as mm
    import comfy.model_patcher

    config = config_cls(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=torch.device("cpu"))
    _init_weights(base.diffusion_model, seed)
    base.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=torch.device("cpu"))


def models():
    import comfy.supported_models as sm

    sd3 = dict(in_channels=16, pos_embed_scaling_factor=None, depth=2, patch_size=2, adm_in_channels=32,
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
               pos_embed_max_size=16, num_patches=256, qk_norm=None)
    flux = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=128,
                mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 24, 24], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=False)
    wan = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=64, ffn_dim=128,
               freq_dim=64, text_dim=64, out_dim=16, num_heads=2, num_layers=2)
    hunyuan = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                   hidden_size=128, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 24, 24],
                   theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False)
    unet_common = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                       adm_in_channels=None, in_channels=4, model_channels=32, use_linear_in_transformer=True,
                       context_dim=32, num_heads=2, num_head_channels=-1, use_temporal_attention=False,
                       use_temporal_resblock=False)
    sd15 = dict(unet_common, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])  # popped from the end
    sdxl = dict(unet_common, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 1, 1],
                transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 2, 2, 2, 1, 1, 1])
    return {
        "sd3": (sm.SD3, sd3),
        "sd35": (sm.SD3, dict(sd3, x_block_self_attn_layers=[0])),
        "flux": (sm.Flux, flux),
        "wan": (sm.WAN21_T2V, wan),
        "hunyuanvideo": (sm.HunyuanVideo, hunyuan),
        "sd15": (sm.SD15, sd15),
        "sdxl": (sm.SD15, sdxl),  # SDXL's block layout (attention in levels 1-2, depth 2 at level 1), no ADM
    }


def conditioning(family: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if family in ("sd15", "sdxl"):
        return [[torch.randn(1, 7, 32, generator=g), {}]]
    if family == "wan":
        return [[torch.randn(1, 7, 64, generator=g), {}]]
    extra = {"pooled_output": torch.randn(1, 32, generator=g)}
    if family == "flux":
        extra["guidance"] = None
    return [[torch.randn(1, 6 if family == "hunyuanvideo" else 7, 64, generator=g), extra]]


def latent(family: str):
    g = torch.Generator().manual_seed(7)
    shape = {"sd3": (1, 16, 16, 16), "sd35": (1, 16, 16, 16), "flux": (1, 16, 16, 16), "wan": (1, 16, 8, 16, 16),
             "hunyuanvideo": (1, 16, 8, 16, 16), "sd15": (1, 4, 32, 32), "sdxl": (1, 4, 32, 32)}[family]
    return torch.randn(shape, generator=g) * 0.1


# ------------------------------------------------------------------------------------------------------
# Graphs
# ------------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, nodes, execution):
        self.nodes, self.execution = nodes, execution
        self.executor = execution.PromptExecutor(_Server())

    def run(self, prompt: dict, outputs: list[str]):
        self.executor.reset()
        self.executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
        if not self.executor.success:
            errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
            msg = errors[0].get("exception_message", "") if errors else str(self.executor.status_messages[-1:])
            raise RuntimeError(msg.strip())


def graph(model_key, cond_keys, latent_key, capture_key, attn=None, reference=None, split=None, steps=4,
          sampler="euler", scheduler="simple", seed=3, cfg=2.0):
    """A prompt: TinyModel -> [attention node | Reference] -> KSampler (or a KSamplerAdvanced split) -> Capture."""
    p = {
        "m": {"class_type": "DATinyModel", "inputs": {"key": model_key}},
        "pos": {"class_type": "DATinyCond", "inputs": {"key": cond_keys[0]}},
        "neg": {"class_type": "DATinyCond", "inputs": {"key": cond_keys[1]}},
        "lat": {"class_type": "DATinyLatent", "inputs": {"key": latent_key}},
    }
    model = ["m", 0]
    if attn is not None:
        node_id, values = attn
        p["attn"] = {"class_type": node_id, "inputs": {"model": model, **values}}
        model = ["attn", 0]
    if reference is not None:
        p["ref"] = {"class_type": "DAReference", "inputs": {"model": model, "key": reference}}
        model = ["ref", 0]
    common = dict(model=model, cfg=cfg, sampler_name=sampler, scheduler=scheduler, positive=["pos", 0], negative=["neg", 0])
    if split is None:
        p["ks"] = {"class_type": "KSampler", "inputs": dict(common, seed=seed, steps=steps, latent_image=["lat", 0], denoise=1.0)}
        last = "ks"
    else:
        adv = dict(common, noise_seed=seed, steps=steps)
        p["ks1"] = {"class_type": "KSamplerAdvanced", "inputs": dict(adv, add_noise="enable", latent_image=["lat", 0],
                                                                       start_at_step=0, end_at_step=split,
                                                                       return_with_leftover_noise="enable")}
        p["ks2"] = {"class_type": "KSamplerAdvanced", "inputs": dict(adv, add_noise="disable", latent_image=["ks1", 0],
                                                                       start_at_step=split, end_at_step=10000,
                                                                       return_with_leftover_noise="disable")}
        last = "ks2"
    p["cap"] = {"class_type": "DACapture", "inputs": {"samples": [last, 0], "key": capture_key}}
    return p


def node_values(node_cls, **values):
    """Widget defaults of a (V1) node, overridden by ``values``."""
    req = node_cls.INPUT_TYPES()["required"]
    out = {name: opts[1]["default"] for name, opts in req.items() if name != "model"}
    out.update(values)
    return out


# ------------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", type=Path, required=True, help="ComfyUI source folder (0.3.64)")
    ap.add_argument("--steps", type=int, default=4)
    opts = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="comfy_real_check_"))
    torch.manual_seed(0)
    nodes, execution = setup_comfy(opts.comfyui.resolve(), scratch)
    import comfyui_version

    print(f"ComfyUI {comfyui_version.__version__} from {opts.comfyui}; torch {torch.__version__}", flush=True)

    from diffusion_attn.comfy import nodes as cnodes
    from diffusion_attn.comfy.export import export_node_folder
    from diffusion_attn.comfy.runtime import MethodRuntime
    from diffusion_attn.patterns import radial_pattern, shifted_window_pattern
    from diffusion_attn.registry import get_method

    # -- the exported folder loads through ComfyUI's own loader, as V3 nodes
    folder = scratch / "custom_nodes" / "diffusion_attn_nodes"
    export_node_folder(folder)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    loaded = asyncio.run(nodes.load_custom_node(str(folder)))
    ours = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
    import diffusion_attn.comfy as dcomfy

    v3 = {k: nodes.NODE_CLASS_MAPPINGS[k] for k in ours}
    report("exported folder loads via load_custom_node", loaded and set(ours) == set(dcomfy.NODE_CLASS_MAPPINGS),
           f"{len(ours)} nodes: {', '.join(ours)}")
    from comfy_api.latest import io as comfy_io

    report("loaded nodes are V3 (comfy_entrypoint)", all(issubclass(c, comfy_io.ComfyNode) for c in v3.values()))
    names = {k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in ours}
    report("display names", all(names[k] == dcomfy.NODE_DISPLAY_NAME_MAPPINGS[k] and not names[k].startswith("Apply ")
                                for k in ours), "; ".join(names.values()))
    hid = cnodes.node_id(get_method("hidiffusion"))
    info = v3[hid].GET_SCHEMA().get_v1_info(v3[hid]) if hasattr(v3[hid], "GET_SCHEMA") else None
    seed_v3 = None
    if info is not None:
        seed_v3 = info.input["required"]["seed"][1].get("control_after_generate")
    seed_v1 = dcomfy.NODE_CLASS_MAPPINGS[hid].INPUT_TYPES()["required"]["seed"][1].get("control_after_generate")
    report("hidiffusion seed: control_after_generate False (V3 schema as the frontend gets it, V1)",
           seed_v3 is False and seed_v1 is False, f"V3 {seed_v3}, V1 {seed_v1}")

    for name, cls in (("DATinyModel", TinyModel), ("DATinyCond", TinyCond), ("DATinyLatent", TinyLatent),
                      ("DACapture", Capture), ("DAReference", Reference)):
        nodes.NODE_CLASS_MAPPINGS[name] = cls
    runner = Runner(nodes, execution)
    steps = opts.steps

    def use_v1(node_id):
        nodes.NODE_CLASS_MAPPINGS[node_id] = dcomfy.NODE_CLASS_MAPPINGS[node_id]

    def use_v3(node_id):
        nodes.NODE_CLASS_MAPPINGS[node_id] = v3[node_id]

    gna_id, radial_id = cnodes.node_id(get_method("gna")), cnodes.node_id(get_method("radial"))
    built = {}
    for family, (cfg_cls, unet_config) in models().items():
        try:
            built[family] = make_patcher(cfg_cls, unet_config)
        except Exception as e:  # noqa: BLE001
            report(f"{family}: tiny model from ComfyUI's classes", False, f"{type(e).__name__}: {e}")
            continue
        STORE[f"model:{family}"] = built[family]
        STORE[f"pos:{family}"] = conditioning(family, 1)
        STORE[f"neg:{family}"] = conditioning(family, 2)
        STORE[f"lat:{family}"] = latent(family)
        report(f"{family}: tiny model from ComfyUI's classes", True, type(built[family].model.diffusion_model).__name__)

    def keys(family):
        return f"model:{family}", (f"pos:{family}", f"neg:{family}"), f"lat:{family}"

    # what each case runs: (family, node id, widget values, reference mask / UNet blocks)
    cases = []
    for family, grid, text, first in (("sd3", (8, 8), 7, True), ("sd35", (8, 8), 7, True), ("flux", (8, 8), 7, True),
                                      ("wan", (8, 8, 8), 0, True), ("hunyuanvideo", (8, 8, 8), 6, False)):
        window = (3,) * len(grid)
        cases.append((family, "gna", gna_id, dict(window="3"),
                      dict(kind="dit", mask=sequence_mask(sliding_window_mask(grid, window), text, first))))
    for family, grid, text, first, defaults in (("wan", (8, 8, 8), 0, True, dict(decay_factor=0.2, sink=True)),
                                                 ("hunyuanvideo", (8, 8, 8), 6, False, dict(decay_factor=0.95, sink=False))):
        pattern = radial_pattern(grid, defaults["decay_factor"], defaults["sink"])
        if pattern.is_full():
            report(f"{family}: radial pattern is sparse on the tiny grid {grid}", False)
            continue
        cases.append((family, "radial", radial_id, dict(dense_layers=0, dense_steps=0),
                      dict(kind="dit", mask=sequence_mask(pattern.dense_mask(), text, first))))
    unet_blocks = {"sd15": [("input", 1, 0), ("input", 2, 0), ("output", 9, 0), ("output", 10, 0), ("output", 11, 0)],
                   "sdxl": [(b, i, t) for b, ids in (("input", (4, 5)), ("output", (3, 4, 5))) for i in ids for t in (0, 1)]}
    for family, blocks in unet_blocks.items():
        cases.append((family, "hidiffusion", hid, dict(shift=1),
                      dict(kind="unet", blocks=blocks, grid_mask=lambda g: shifted_window_pattern(g, 1).dense_mask())))

    # a schedule window, on a flow model (Flux) and a discrete EPS model (SD 1.5): the reference places it by sigma
    window = dict(start_percent=0.3, end_percent=0.8)
    cases.append(("flux", "gna", gna_id, dict(window="3", **window),
                  dict(kind="dit", mask=sequence_mask(sliding_window_mask((8, 8), (3, 3)), 7, True), **window)))
    cases.append(("sd15", "hidiffusion", hid, dict(shift=1, **window),
                  dict(kind="unet", blocks=unet_blocks["sd15"], **window,
                       grid_mask=lambda g: shifted_window_pattern(g, 1).dense_mask())))

    for family, method, node_id, values, ref in cases:
        if family not in built:
            continue
        label = f"{family} / {method}" + (f" {values['start_percent']}-{values['end_percent']} of the schedule"
                                          if "start_percent" in values else "")
        mk, ck, lk = keys(family)
        try:
            use_v3(node_id)
            widgets = node_values(dcomfy.NODE_CLASS_MAPPINGS[node_id], **values)
            runner.run(graph(mk, ck, lk, "v3", attn=(node_id, widgets), steps=steps), ["cap"])
            use_v1(node_id)
            runner.run(graph(mk, ck, lk, "v1", attn=(node_id, widgets), steps=steps), ["cap"])
            use_v3(node_id)
            STORE[f"ref:{label}"] = ref
            runner.run(graph(mk, ck, lk, "ref", reference=f"ref:{label}", steps=steps), ["cap"])
            runner.run(graph(mk, ck, lk, "plain", steps=steps), ["cap"])
        except Exception as e:  # noqa: BLE001
            report(f"{label}: KSampler through the executor", False, f"{type(e).__name__}: {e}")
            continue
        out, ref_out, plain = CAPTURED["v3"], CAPTURED["ref"], CAPTURED["plain"]
        diff = (out - ref_out).abs().max().item()
        scale = ref_out.abs().max().item()
        changed = (out - plain).abs().max().item()
        report(f"{label}: KSampler through the executor, V1 == V3", torch.equal(CAPTURED["v1"], out))
        report(f"{label}: equals the dense-mask reference", diff <= 1e-4 * max(scale, 1.0) and changed > 10 * diff,
               f"max |patched - reference| {diff:.2e} (latent max {scale:.2f}); max |patched - unpatched| {changed:.2e}")

    # -- step windows across a KSamplerAdvanced split (Flux, GNA): record where the method ran
    if "flux" in built:
        mk, ck, lk = keys("flux")
        seen: list = []
        original = MethodRuntime.placement

        def recording(self, options, model_sampling=None):
            placement = original(self, options, model_sampling)
            seen.append((round(float(options["sigmas"].max()), 6), placement.active))
            return placement

        MethodRuntime.placement = recording
        try:
            def active_sigmas(values, split):
                seen.clear()
                widgets = node_values(dcomfy.NODE_CLASS_MAPPINGS[gna_id], window="3", **values)
                runner.run(graph(mk, ck, lk, "w", attn=(gna_id, widgets), steps=8, split=split, cfg=1.0), ["cap"])
                return [s for s, a in seen if a], [s for s, _ in seen], CAPTURED["w"]

            pct = dict(start_percent=0.3, end_percent=0.8)
            full_on, full_all, full_out = active_sigmas(pct, None)
            split_on, split_all, split_out = active_sigmas(pct, 4)
            report("flux: start/end percent survive a KSamplerAdvanced split",
                   full_all == split_all and full_on == split_on and 0 < len(full_on) < len(full_all),
                   f"method at sigmas {full_on} of {full_all} in both; max |full - split| latent {(full_out - split_out).abs().max().item():.2e}")
            steps_full, _, _ = active_sigmas(dict(dense_steps=3), None)
            steps_split, _, _ = active_sigmas(dict(dense_steps=3), 4)
            report("flux: dense_steps counts per sampler run (restarts after a split, as documented)",
                   len(steps_split) == len(steps_full) - 3, f"active calls: full {len(steps_full)}, split {len(steps_split)}")
        finally:
            MethodRuntime.placement = original

    # -- errors known at the node are raised when the node runs (before sampling)
    if "flux" in built:
        mk, ck, lk = keys("flux")
        for values, expect in ((dict(window="3", backend="windows"), "backend='windows'"),
                               (dict(window="3,3,3"), "2-D token grid")):
            widgets = node_values(dcomfy.NODE_CLASS_MAPPINGS[gna_id], **values)
            p = graph(mk, ck, lk, "x", attn=(gna_id, widgets), steps=2)
            try:
                runner.run(p, ["cap"])
                report(f"refused at the node: {values}", False, "ran")
            except RuntimeError as e:
                failed = [d for ev, d in runner.executor.status_messages if ev == "execution_error"]
                node = failed[0].get("node_id") if failed else None
                report(f"refused at the node: {values}", expect in str(e) and node == "attn", f"node {node}: {str(e)[:150]}")

    failed = [r for r in RESULTS if not r[1]]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
