"""CLEAR: conv-like circular local attention for Flux (and SD3), with its distilled weights.

CLEAR (Liu et al., "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up",
NeurIPS 2025; code Huage001/CLEAR, ``attention_processor.py``) replaces every attention layer of
FLUX.1-dev (19 double + 38 single blocks, every step) by a local one:

* **local** (``down_factor=1``): an image query at ``(y, x)`` sees the image keys with
  ``(y - ky)**2 + (x - kx)**2 < radius**2`` (strict, truncated at the borders, no inward shift) plus every
  text key; text queries see everything (:class:`~diffusion_attn.patterns.CircularWindow`,
  :mod:`diffusion_attn.patterns.circular`).
* **down-sampled** (``down_factor=f > 1``): image queries also see ``(H/f)(W/f)`` pooled keys / values,
  made from the post-RoPE image keys and the values by a trainable ``f x f`` weighted sum
  (``spatial_weight``, shape ``(1, 1, 1, f, 1, f, 1)`` as the official, initialised to ``1/f**2``: average
  pooling); text queries do not see them. They are an extra key/value segment (E4a,
  :meth:`CLEARProcessor.extra_kv`) merged with the local part by log-sum-exp: one softmax over both,
  exactly the official's concatenated keys under its block mask.
* **weights** (``weights=``): the released distilled ``to_q/k/v/out`` (and ``spatial_weight``) of every
  attention layer, ``Huage001/CLEAR`` ``clear_local_{32,16,8}`` and ``clear_local_{16,8}_down_4``
  (FLUX.1-dev only). Without them quality drops: the method is training-free only in that these are
  reused. ``weights`` is a ``.safetensors`` file, a folder holding the released file name, a Hub repo id
  (the file name follows from ``radius`` / ``down_factor``: ``clear_local_{r}[_down_{f}].safetensors``,
  fetched with ``huggingface_hub.hf_hub_download``) or ``<repo id>/<file>.safetensors``. Keys are the
  transformer's state-dict keys (``transformer_blocks.0.attn.to_q.weight``,
  ``single_transformer_blocks.3.attn.to_k.bias``, ``transformer_blocks.0.attn.to_out.0.weight``) and the
  processors' ``<layer>.attn.processor.spatial_weight`` (the official ``distill.py`` saves every
  parameter whose name contains ``.attn.to_q.`` / ``.attn.to_k.`` / ``.attn.to_v.`` / ``.attn.to_out.`` /
  ``spatial_weight``; the notebooks load them with ``load_state_dict(sd, strict=False)``).
* **high resolution** (the official ``inference_t2i_highres.ipynb``): ``proportional_attention`` scales
  the logits by ``sqrt(log(N, 64**2 + 512) / d)`` instead of ``1/sqrt(d)`` (``N``: text + image keys;
  the down-sampled variant uses ``log(10 N, ...)``), and ``ntk_factor`` raises Flux's RoPE base to
  ``theta * ntk_factor`` (a named hook on ``pos_embed``, :mod:`diffusion_attn.patches.ntk_rope`).

Official defaults: 1024 x 1024, 20 steps, guidance 3.5, ``max_sequence_length=512``; released pairs
(radius, down_factor): (8, 1), (16, 1), (32, 1), (8, 4), (16, 4). Here ``radius`` is required (it must
match the weights used, and what is sparse depends on the token grid: at 1024 x 1024 the grid is 64 x 64)
and ``down_factor`` defaults to 1.

Deviations from the official code, and why:

* **Text length from the call.** The official hard-codes 512 text tokens in the mask and in
  ``key[:, :, 512:]``; FLUX.1-schnell (256) or any other ``max_sequence_length`` would misalign them. Here
  the layout of each call gives it.
* **Masks per layout, any resolution.** The official builds one global ``BLOCK_MASK`` (and ``HEIGHT`` /
  ``WIDTH``) that processors capture at construction; changing the resolution needs new processors. Here
  patterns are cached per layout in the run context.
* **``H, W`` not divisible by ``down_factor``** (the official's ``unflatten`` fails): the pooled grid is
  ``ceil(H/f) x ceil(W/f)``; a partial block at the bottom / right border pools the tokens it has with
  their ``spatial_weight`` entries, rescaled by ``sum(w) / sum(w over the present tokens)`` so it keeps the
  full block's total weight (with the initial weights: the mean of the present tokens). Divisible sizes
  are exactly the official.
* **Radius larger than the grid** is an error (the official silently runs a full mask): above
  :func:`~diffusion_attn.patterns.circular.covering_radius` (``isqrt((H-1)**2 + (W-1)**2) + 1``, the
  smallest radius that covers the grid) at the first call that sees the grid. A radius equal to it gives
  dense attention: with ``down_factor=1`` exactly the stock processor.
* **Proportional scale** is applied by multiplying the queries by ``sqrt(log_base(N))`` (= the new scale
  times ``sqrt(d)``) before the core, so every kernel and the log-sum-exp merge use it; equal to the
  official ``scale=`` up to rounding. It applies on every layer this method's processors run, as the
  official transformer passes ``proportional_attention`` to all blocks.
* **Weight loading** refuses (before anything changes) keys other than the attention projections and
  ``spatial_weight``, shapes that differ from the model's, ``spatial_weight`` of another factor, and
  fused projections; missing keys only warn (the official prints them). The original weights are kept
  (on the CPU) and ``remove()`` writes them back bit for bit.
* **Kernels**: the official compiles FlexAttention with a BlockMask; here the pattern goes through
  :mod:`diffusion_attn.kernels` (``auto``: the reference up to 2,048 tokens, compiled ``flex`` where it
  works, else ``chunked``). The down-sampled variant's local part is computed with its log-sum-exp from
  the S x S mask (the fast kernels do not return their LSE yet).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from ..patterns.circular import CircularWindow, check_radius, pooled_grid
from ..registry import MethodConfig, MethodSpec, method_config, param, register
from .gna import backend_field
from .install import install_processors, rollback_on_error
from .trainable import TrainableProcessor

__all__ = ["CLEARConfig", "CLEARProcessor", "HUB_REPO", "RELEASED", "TRAIN_TOKENS", "load_clear_weights",
           "pool_tokens", "proportional_factor", "released_filename", "resolve_weights"]

#: the Hub repository of the released weights and the (radius, down_factor) pairs released (FLUX.1-dev)
HUB_REPO = "Huage001/CLEAR"
RELEASED = ((8, 1), (16, 1), (32, 1), (8, 4), (16, 4))
#: the official ``train_seq_len`` (FLUX.1-dev at 1024 x 1024: 64 x 64 image + 512 text tokens)
TRAIN_TOKENS = 64 ** 2 + 512
#: parameter names the official distils and saves (``distill.py``)
_TRAINED = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")
_SPATIAL = "spatial_weight"


@method_config
class CLEARConfig(MethodConfig):
    """CLEAR: ``radius`` of the circular window (tokens), ``down_factor`` of the pooled keys (1: none),
    the distilled ``weights`` to load, the high-resolution options ``proportional_attention`` and
    ``ntk_factor``, and the ``backend``."""

    radius: int | None = param(None, role="pattern", required=True, range=(1, None),
                               help="circle radius r in tokens: image queries see image keys with dy^2+dx^2 < r^2 (released: 8, 16, 32)")
    down_factor: int = param(1, role="pattern", range=(1, None),
                             help="1: local only; f > 1: image queries also see (H/f)(W/f) keys pooled by a trainable f x f "
                                  "spatial_weight (released: 4, with radius 8 or 16)")
    weights: str | None = param(None, role="input",
                                help="distilled attention weights: a .safetensors file, a folder, or a Hub repo id such as "
                                     "Huage001/CLEAR (file clear_local_{r}[_down_{f}].safetensors); None: the model's own")
    proportional_attention: bool = param(False, role="pattern",
                                         help="high-res: logit scale sqrt(log(N, 64^2+512)/d) (down-sampled: log(10N, ...))")
    ntk_factor: float = param(1.0, role="pattern", range=(1.0, None),
                              help="high-res: NTK-scaled RoPE, base theta * ntk_factor (Flux; official high-res: 10)")
    backend: str = backend_field(choices=("auto", "sliding", "strips", "gather", "reference", "flex", "chunked"),
                                 help="kernel: auto (on CPU: sliding), sliding / strips / gather (the disc's bounding box "
                                      "with the disc as a tile mask), reference (dense mask), flex (compiled FlexAttention), "
                                      "chunked (mask by query chunks)")

    #: the disc is a box (its bounding square, truncated at borders) refined by the disc predicate
    capabilities = frozenset({"box", "refined"})

    def check(self) -> None:
        super().check()
        if isinstance(self.weights, str) and not self.weights.strip():
            raise ValueError("parameter 'weights' is empty: give a .safetensors path, a folder or a Hub repo id, or None")


# ------------------------------------------------------------------------------------------------------
# pieces (plain functions: the training loop and the tests use them too)
# ------------------------------------------------------------------------------------------------------
def proportional_factor(num_keys: int, down_factor: int = 1) -> float:
    """The factor the queries are multiplied by for the official proportional attention scale:
    ``sqrt(log(N, TRAIN_TOKENS) / d) * sqrt(d) = sqrt(log(N, TRAIN_TOKENS))`` with ``N = num_keys`` (text +
    image), ``10 * num_keys`` for the down-sampled variant (as the official)."""
    n = num_keys * (10 if down_factor > 1 else 1)
    return math.sqrt(math.log(n, TRAIN_TOKENS))


def pool_tokens(x: torch.Tensor, grid: tuple[int, int], weight: torch.Tensor) -> torch.Tensor:
    """CLEAR's pooled tokens of the grid tokens ``x`` (B, H*W, heads, D), row-major over ``grid``:
    ``sum_{i,j} w[i, j] * x[f*Y + i, f*X + j]`` per pooled token ``(Y, X)`` of the ``ceil(H/f) x ceil(W/f)``
    pooled grid, ``w`` = ``weight`` viewed as ``(f, f)`` (the official ``(1, 1, 1, f, 1, f, 1)``). A partial
    border block is rescaled by ``sum(w) / sum(w over its present tokens)`` (see the module docstring);
    where trained weights make that ratio unsafe (the present weights sum to zero, a tenth of the total or
    less, or the other sign), the block is the plain mean of its present tokens instead.
    Returns (B, ceil(H/f)*ceil(W/f), heads, D)."""
    f = weight.shape[-2] if weight.ndim == 7 else weight.shape[-1]
    w = weight.reshape(f, f).to(x.dtype)
    h, wd = grid
    ph, pw = pooled_grid(grid, f)
    t = x.unflatten(1, (h, wd))
    pad_h, pad_w = ph * f - h, pw * f - wd
    if pad_h or pad_w:
        t = F.pad(t, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
    t = t.unflatten(1, (ph, f)).unflatten(3, (pw, f))  # (B, ph, f, pw, f, heads, D)
    out = (t * w[None, None, :, None, :, None, None]).sum(dim=(2, 4))  # (B, ph, pw, heads, D)
    if pad_h or pad_w:
        present = torch.zeros(ph * f, pw * f, dtype=w.dtype, device=w.device)
        present[:h, :wd] = 1
        blocks = present.unflatten(0, (ph, f)).unflatten(2, (pw, f))  # (ph, f, pw, f)
        have = (blocks * w[None, :, None, :]).sum(dim=(1, 3))
        total = w.sum()
        safe = (have / total) > 0.1  # positive, same sign as the total, not a vanishing share of it
        scale = torch.where(safe, total / torch.where(safe, have, torch.ones_like(have)), torch.zeros_like(have))
        mean = t.sum(dim=(2, 4)) / blocks.sum(dim=(1, 3))[None, :, :, None, None]
        out = torch.where(safe[None, :, :, None, None], out * scale[None, :, :, None, None], mean)
    return out.flatten(1, 2)


class CLEARProcessor(TrainableProcessor):
    """CLEAR's attention processor (see the module docstring). ``spatial_weight`` exists for
    ``down_factor > 1``; it is a parameter of the processor, so ``model.state_dict()`` holds it as
    ``<layer>.attn.processor.spatial_weight`` (the official key)."""

    method = "clear"

    def __init__(self, radius: int, down_factor: int = 1, proportional_attention: bool = False, ntk_factor: float = 1.0,
                 *, backend: str = "auto", placement=None):
        super().__init__(backend=backend, placement=placement)
        self.config = CLEARConfig(radius=radius, down_factor=down_factor, proportional_attention=proportional_attention,
                                  ntk_factor=ntk_factor, backend=backend)
        self.radius, self.down_factor = self.config.radius, self.config.down_factor
        if self.down_factor > 1:
            f = self.down_factor
            self.spatial_weight = torch.nn.Parameter(torch.full((1, 1, 1, f, 1, f, 1), 1.0 / (f * f)))

    def pattern(self, layout: TokenLayout):
        return clear_grid_pattern(layout, self.radius)

    def local_core(self, q, k, v, layout: TokenLayout, attention_mask=None):
        # local_core, not core: under context parallelism this runs on the whole sequence (Ulysses)
        if len(layout.grid) != 2:
            raise ValueError(f"CLEAR works on 2-D image token grids, got {layout.describe()}")
        check_radius(layout.grid, self.radius)
        if self.config.proportional_attention:
            q = q * proportional_factor(layout.num_tokens, self.down_factor)
        return super().local_core(q, k, v, layout, attention_mask)

    def extra_kv(self, q, k, v, layout: TokenLayout) -> list:
        """The down-sampled variant's pooled keys / values, seen by the image queries only."""
        if self.down_factor == 1:
            return []
        from ..extensions import KVSegment

        img = layout.image_slice
        kp = pool_tokens(k[:, img], layout.grid, self.spatial_weight)
        vp = pool_tokens(v[:, img], layout.grid, self.spatial_weight)
        visible = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
        visible[img] = True
        return [KVSegment("pooled", kp, vp, visible)]

    def __repr__(self) -> str:
        return f"CLEARProcessor(layer={self.layer_index}, radius={self.radius}, down_factor={self.down_factor})"


def clear_grid_pattern(layout: TokenLayout, radius, **_):
    """The local pattern (what the mask views show; the down-sampled variant's pooled keys are an extra
    key segment, shown by :func:`diffusion_attn.patterns.circular.clear_pattern` on a layout that has it)."""
    if len(layout.grid) != 2:
        raise ValueError(f"CLEAR works on 2-D image token grids, got {layout.describe()}")
    check_radius(layout.grid, radius)
    return CircularWindow(layout.grid, radius)


# ------------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------------
def released_filename(radius: int, down_factor: int) -> str:
    """The released file name for ``(radius, down_factor)``: ``clear_local_{r}.safetensors`` or
    ``clear_local_{r}_down_{f}.safetensors``."""
    return f"clear_local_{radius}.safetensors" if down_factor == 1 else f"clear_local_{radius}_down_{down_factor}.safetensors"


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_weights(source: str, radius: int, down_factor: int) -> Path:
    """The local path of ``source``: an existing file; an existing folder holding
    :func:`released_filename`; else a Hub repo id (``owner/name``: that file name) or ``owner/name/file``,
    fetched with ``huggingface_hub.hf_hub_download`` (cached as the Hub does)."""
    path = Path(source).expanduser()
    name = released_filename(radius, down_factor)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / name).is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise ValueError(f"weights folder {str(path)!r} has no {name} (radius={radius}, down_factor={down_factor}); "
                             f"it holds {', '.join(found) or 'no .safetensors file'}: give the file itself")
        return path / name
    repo, filename = source, name
    parts = source.split("/")
    if len(parts) == 3 and parts[2].endswith(".safetensors"):
        repo, filename = "/".join(parts[:2]), parts[2]
    elif source.endswith(".safetensors") or path.is_absolute() or source.startswith((".", "~")):
        # a path, not a Hub id: never send a missing local file to the Hub
        raise ValueError(f"weights file {str(path)!r} does not exist (give an existing .safetensors file or folder, a "
                         f"Hub repo id such as {HUB_REPO}, or owner/name/file.safetensors)")
    if not _REPO_ID.match(repo):
        raise ValueError(f"weights={source!r} is neither an existing .safetensors file or folder nor a Hub repo id "
                         f"(owner/name, e.g. {HUB_REPO}, or owner/name/file.safetensors)")
    if repo == HUB_REPO and filename == name and (radius, down_factor) not in RELEASED:
        warnings.warn(f"{HUB_REPO} releases (radius, down_factor) in {RELEASED}; {name} may not exist", stacklevel=3)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - diffusers depends on it
        raise ImportError("loading CLEAR weights from the Hub needs huggingface_hub (pip install huggingface_hub)") from e
    return Path(hf_hub_download(repo_id=repo, filename=filename))


def _read(path: Path) -> dict:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ValueError(f"CLEAR weights are .safetensors files; got {str(path)!r}")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot read the CLEAR weights {str(path)!r}: {e}") from e


def plan_weights(model, family, state: dict, down_factor: int, source: str = "the weights") -> tuple[dict, dict]:
    """Check ``state`` against ``model`` and split it into ``(parameters, spatial weights)``; a ValueError
    naming every problem before anything changes. Missing keys warn."""
    params = dict(model.named_parameters())
    layers = [name for name, _ in family.layers(model)]
    base, spatial, unexpected, shapes, factors = {}, {}, [], [], set()
    want = (1, 1, 1, down_factor, 1, down_factor, 1)
    for key, t in state.items():
        if key.endswith("." + _SPATIAL):
            owner = key[: -len(_SPATIAL) - 1]
            if owner not in layers:
                unexpected.append(key)
            elif t.ndim != 7 or t.shape[3] != t.shape[5] or any(t.shape[i] != 1 for i in (0, 1, 2, 4, 6)):
                shapes.append(f"{key} {tuple(t.shape)} (expected (1, 1, 1, f, 1, f, 1))")
            else:
                factors.add(int(t.shape[3]))
                spatial[owner] = t
        elif key in params and any(s in key for s in _TRAINED):
            if tuple(t.shape) != tuple(params[key].shape):
                shapes.append(f"{key} {tuple(t.shape)} (the model's: {tuple(params[key].shape)})")
            elif not t.is_floating_point():
                shapes.append(f"{key} has dtype {t.dtype}, not a floating point type")
            else:
                base[key] = t
        else:
            unexpected.append(key)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} keys that are not this {type(model).__name__}'s attention projections "
                        f"(*.attn.to_q/to_k/to_v/to_out.*) or processor spatial weights (*.attn.processor.spatial_weight): "
                        + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
    if shapes:
        problems.append("shapes that do not fit: " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
    if factors and factors != {down_factor}:
        problems.append(f"spatial_weight for down_factor {sorted(factors)}, but down_factor={down_factor}"
                        + ("" if down_factor > 1 else " (these are the weights of a down-sampled variant)"))
    if problems:
        raise ValueError(f"CLEAR weights {source} do not fit this model: " + "; ".join(problems))
    if not base and not spatial:
        raise ValueError(f"CLEAR weights {source} hold no tensors")
    expected = [k for k in params if any(s in k for s in _TRAINED) and ".processor." not in k]
    missing = [k for k in expected if k not in base]
    if down_factor > 1:
        missing += [f"{name}.{_SPATIAL}" for name in layers if name not in spatial]
    if missing:
        warnings.warn(f"CLEAR weights {source}: {len(missing)} attention weights missing (kept as they are): "
                      + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""), stacklevel=3)
    return base, {k: v for k, v in spatial.items() if tuple(v.shape) == want}


def load_clear_weights(source: str, radius: int, down_factor: int) -> tuple[dict, str]:
    """``(state dict, path)`` of ``source`` (see :func:`resolve_weights`)."""
    path = resolve_weights(source, radius, down_factor)
    return _read(path), str(path)


def _write_base(model, base: dict):
    """Copy ``base`` into the model's parameters; returns the exact undo (originals kept on the CPU)."""
    originals = {}
    try:
        with torch.no_grad():
            for key, t in base.items():
                p = model.get_parameter(key)
                originals[key] = p.detach().to("cpu", copy=True)
                p.copy_(t.to(device=p.device, dtype=p.dtype))
    except BaseException:
        _restore(model, originals)
        raise
    return lambda: _restore(model, originals)


def _restore(model, originals: dict) -> None:
    with torch.no_grad():
        for key, t in originals.items():
            p = model.get_parameter(key)
            p.copy_(t.to(device=p.device, dtype=p.dtype))


# ------------------------------------------------------------------------------------------------------
# install + spec
# ------------------------------------------------------------------------------------------------------
def _install(model, family, context, config: CLEARConfig):
    if config.ntk_factor != 1.0:
        if family.name != "flux":
            raise ValueError(f"ntk_factor scales Flux's RoPE; {family.name} models have none: use ntk_factor=1")
        from ..patches.ntk_rope import check_ntk_target

        check_ntk_target(getattr(model, "pos_embed", None))
    layers = family.layers(model)
    attns = {name: model.get_submodule(name.removesuffix(".processor")) for name, _ in layers}
    if config.weights is not None and any(getattr(a, "fused_projections", False) for a in attns.values()):
        raise ValueError("CLEAR weights load into to_q / to_k / to_v; this model has fused projections: call "
                         "model.unfuse_qkv_projections() first")
    base, spatial = {}, {}
    if config.weights is not None:
        state, path = load_clear_weights(config.weights, config.radius, config.down_factor)
        base, spatial = plan_weights(model, family, state, config.down_factor, repr(path))

    def make(index, name):
        proc = CLEARProcessor.from_config(config)
        weight = attns[name].to_k.weight
        proc.to(device=weight.device, dtype=weight.dtype)
        if name in spatial:
            with torch.no_grad():
                proc.spatial_weight.copy_(spatial[name].to(proc.spatial_weight.dtype))
        return proc

    undo: list = []
    with rollback_on_error(undo):
        undo.extend(install_processors(model, family, context, make))
        if config.ntk_factor != 1.0:
            from ..patches.ntk_rope import NTKRopeConfig, apply_ntk_rope

            undo.append(apply_ntk_rope(model, NTKRopeConfig(config.ntk_factor)))
        if base:
            undo.append(_write_base(model, base))
    return undo


SPEC = register(MethodSpec(
    name="clear",
    summary="CLEAR: circular local attention (radius r, plus optional pooled keys) with distilled attention weights",
    paper="Liu et al., CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up (NeurIPS 2025, arXiv 2412.16112)",
    families=("flux", "sd3"),
    kind="distilled efficiency",
    config=CLEARConfig,
    install=_install,
    grid_pattern=clear_grid_pattern,
))
