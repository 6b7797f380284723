"""Context parallelism: the pack's methods under diffusers' ``enable_parallelism`` (Ulysses and ring).

diffusers splits one generation over several processes with
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` (or ``ring_degree``):
split hooks from the model's ``_cp_plan`` shard the token sequence at the first block, every attention
call goes through ``dispatch_attention_fn(..., parallel_config=...)``, whose context-parallel template
(``_templated_context_parallel_attention``) does the communication around a backend's *forward op*, and a
gather hook reassembles the output. This module plugs the pack's attention core into that template as the
forward op, so the communication stays diffusers' own (no second copy of it):

* **Ulysses** (all-to-all over heads): the op receives the *whole* sequence for ``heads / N`` heads. The
  processor's core (placement, branches, token reduction, extra key/value segments, blends, the pattern
  and the kernels) runs there unchanged in meaning. Two things differ from one device and are handled
  here: (1) the gathered sequence is the concatenation of every rank's local sequence, and a rank's local
  sequence is its chunk of *each* stream (Flux: ``[text_r, image_r]``; HunyuanVideo: ``[video_r,
  text_r]``), so the op reorders q, k, v into the single-device order (:func:`gathered_order`), runs the
  core on the single-device layout and reorders the output back; (2) a rank holds heads ``[offset,
  offset + heads / N)``: head-dependent patterns and ``Placement.heads`` use these global indices
  (:class:`Shard`; :meth:`PatternProcessor.global_heads` for methods' own per-head data).
* **Ring** (keys and values passed around, partial results merged by log-sum-exp by diffusers): the op
  is called once per key chunk with this rank's queries; it evaluates the pattern's predicate on exactly
  that (query chunk, key chunk) pair and returns ``(out, lse)`` from an exact masked softmax
  (:func:`~diffusion_attn.extensions.attention_with_lse`). Only pattern methods whose processors override
  no extension point that needs the whole sequence (reduce, extra_kv, blend, branches, dynamic patterns)
  can do this; a method declares it with ``MethodSpec(context_parallel=("ulysses", "ring"))``.

Which modes a method supports is declared on its :class:`~diffusion_attn.registry.MethodSpec`
(``context_parallel``; the default ``("ulysses",)`` holds for any pattern processor on a DiT). Families
need a context-parallel plan: diffusers' ``_cp_plan`` (Wan, Flux) or the family's own
(``Family.cp_plan``: HunyuanVideo, which diffusers 0.42 does not plan). UNets have none: methods on UNets
(HiDiffusion) refuse it.

Checks happen at ``apply`` when the model is already parallel (``enable_parallelism`` then ``apply``),
at :func:`enable_context_parallel` when a method is already applied, and at the first attention call in
any case (``apply`` then a bare ``model.enable_parallelism``): a mode the method does not support, a head
count the Ulysses degree does not divide (without ``ulysses_anything``), ring and Ulysses together, a
process group that is not initialised.

**CPU.** diffusers 0.42's ``ModelMixin._resolve_parallel_config`` picks the rank's device as
``rank % torch.accelerator.device_count()``, which divides by zero on a machine without an accelerator.
:func:`enable_context_parallel` makes that count 1 for the duration of the call on such machines only
(the device is then ``cpu``; nothing else is touched), so gloo runs on CPU work (the tests and the CLI
use it). Runs are inference-only: the ops have no backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

__all__ = ["MODES", "Shard", "ContextParallelError", "cp_config", "cp_mode", "check_context_parallel",
           "check_model_parallel", "parallel_of", "sync_parallel", "gathered_order", "parallel_core", "enable_context_parallel",
           "init_distributed", "is_main_process", "parallel_pipeline", "shift_heads", "shutdown"]

#: the context-parallel modes a method can declare
MODES = ("ulysses", "ring")


class ContextParallelError(ValueError):
    """A method, model or setting that cannot run under the requested context parallelism."""


@dataclass(frozen=True)
class Shard:
    """What one rank holds inside a context-parallel attention op: ``mode``, its ``rank`` in the group of
    ``world`` processes, and the global heads ``[head_offset, head_offset + local heads)`` of
    ``heads_total``."""

    mode: str
    rank: int
    world: int
    head_offset: int
    heads_total: int


# ---------------------------------------------------------------------------------------------------
# reading the configuration
# ---------------------------------------------------------------------------------------------------
def cp_config(parallel_config):
    """The ``ContextParallelConfig`` of a diffusers ``ParallelConfig`` (or the config itself), or None."""
    if parallel_config is None:
        return None
    if hasattr(parallel_config, "ulysses_degree"):  # a ContextParallelConfig itself
        return parallel_config
    return getattr(parallel_config, "context_parallel_config", None)


def parallel_of(model):
    """The model's diffusers ``ParallelConfig`` if it has context parallelism, else None (tensor
    parallelism leaves attention processors alone, as diffusers does)."""
    pc = getattr(model, "_parallel_config", None)
    return pc if cp_config(pc) is not None else None


def sync_parallel(model) -> None:
    """Give a context-parallel model's config to its attention processors that take one and have none
    (stock processors restored by ``remove()`` after ``enable_parallelism``); no-op on other models."""
    pc = parallel_of(model)
    if pc is None:
        return
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if proc is not None and hasattr(proc, "_parallel_config") and proc._parallel_config is None:
            proc._parallel_config = pc


def cp_mode(cp) -> str:
    """``"ulysses"``, ``"ring"`` or ``"unified"`` (both degrees above 1) of a ContextParallelConfig."""
    ring, ulysses = cp.ring_degree or 1, cp.ulysses_degree or 1
    if ring > 1 and ulysses > 1:
        return "unified"
    return "ring" if ring > 1 else "ulysses"


def _degree(cp) -> int:
    return cp.ring_degree if cp_mode(cp) == "ring" else cp.ulysses_degree


def method_modes(method: str) -> tuple[str, ...]:
    """The context-parallel modes ``method`` declares (``MethodSpec.context_parallel``); ``("ulysses",)``
    for a processor whose method is not registered (a user's subclass)."""
    from .registry import get_method

    try:
        return tuple(get_method(method).context_parallel)
    except (KeyError, ValueError):
        return ("ulysses",)


def _supported_text(modes) -> str:
    if not modes:
        return "it runs on one device per generation only (use one process per prompt instead)"
    return "it supports " + " and ".join(f"{m} ({'ulysses_degree' if m == 'ulysses' else 'ring_degree'}=N)" for m in modes)


def check_context_parallel(method: str, modes, cp, heads: int | None, *, family: str | None = None) -> None:
    """Raise :class:`ContextParallelError` if ``method`` (declaring ``modes``) cannot run under the
    ContextParallelConfig ``cp`` on a model with ``heads`` attention heads."""
    if cp is None:
        return
    mode = cp_mode(cp)
    where = f" on {family}" if family else ""
    if mode == "unified":
        raise ContextParallelError(
            f"{method}{where}: context parallelism with both ring_degree ({cp.ring_degree}) and ulysses_degree "
            f"({cp.ulysses_degree}) above 1 is not supported by diffusion_attn methods; use ulysses_degree=N or "
            f"ring_degree=N alone ({_supported_text(modes)})")
    if mode not in modes:
        flag = "ulysses_degree" if mode == "ulysses" else "ring_degree"
        raise ContextParallelError(f"method {method!r}{where} cannot run under {mode} context parallelism "
                                   f"({flag}={_degree(cp)}); {_supported_text(modes)}")
    if mode == "ring" and getattr(cp, "ring_anything", False):
        raise ContextParallelError(f"method {method!r}{where}: ring_anything (unequal sequence chunks) is not supported; "
                                   "use a sequence length the ring degree divides, or ulysses_degree=N")
    if mode == "ulysses" and heads is not None and heads % cp.ulysses_degree and not getattr(cp, "ulysses_anything", False):
        raise ContextParallelError(
            f"method {method!r}{where}: the model has {heads} attention heads, which ulysses_degree={cp.ulysses_degree} "
            f"does not divide; use a degree that divides {heads}, ContextParallelConfig(ulysses_anything=True), "
            f"or ring_degree=N" + ("" if "ring" in modes else f" (not supported by {method!r})"))


def _model_heads(model) -> int | None:
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    return heads if isinstance(heads, int) else None


def check_model_parallel(model, family, method: str, modes, cp=None) -> None:
    """The ``apply``-time check: ``model`` is (or, with ``cp``, will be) context-parallel; can ``method``
    run on it? A family without a context-parallel plan (UNets) is refused with the reason."""
    cp = cp if cp is not None else cp_config(getattr(model, "_parallel_config", None))
    if cp is None:
        return
    if getattr(model, "_cp_plan", None) is None and getattr(family, "cp_plan", None) is None:
        raise ContextParallelError(
            f"method {method!r}: {type(model).__name__} ({family.name}) has no context-parallel plan in diffusers "
            "(UNets have none): it cannot be split over processes; run one generation per process instead")
    check_context_parallel(method, modes, cp, _model_heads(model), family=family.name)


# ---------------------------------------------------------------------------------------------------
# sequence order and heads
# ---------------------------------------------------------------------------------------------------
def gathered_order(layout, world: int) -> torch.Tensor:
    """The single-device position of each token of the gathered sequence: ``order[i]`` is the token at
    position ``i`` of the concatenation of every rank's local sequence, when each rank holds its chunk
    (``tensor_split``, as diffusers' sharders cut) of each stream (grid, text) in the layout's order."""
    g, t = layout.num_image, layout.text_len
    streams = [(0, t), (t, g)] if layout.text_position == "first" else [(0, g), (g, t)]
    pieces = [torch.arange(start, start + n).tensor_split(world)[r]
              for r in range(world) for start, n in streams if n]
    return torch.cat(pieces)


def shift_heads(pattern, offset: int):
    """``pattern`` evaluated with head index ``h + offset``: a rank's local head ``h`` is global head
    ``h + offset``. Head-independent patterns are returned as they are."""
    from .patterns.mask_mod import MaskMod, as_mask_mod

    mod = as_mask_mod(pattern)
    if not offset or "head_dependent" not in mod.capabilities:
        return pattern

    class _Shifted(MaskMod):
        needs_layout = False
        _flags = frozenset({"head_dependent"})

        def _children(self):
            return (mod,)

        def _build(self, layout, device):
            fn = mod.bind(layout, device)
            return lambda b, h, q_idx, kv_idx: fn(b, h + offset, q_idx, kv_idx)

        def __repr__(self):
            return f"shift_heads({mod!r}, {offset})"

    out = _Shifted()
    return out.on(mod.layout) if mod.layout is not None else out


# ---------------------------------------------------------------------------------------------------
# the attention core under context parallelism
# ---------------------------------------------------------------------------------------------------
_RING_FREE_HOOKS = ("reduce", "extra_kv", "blend", "branches", "branch_core", "call_pattern")


def _check_call(proc, pc, heads: int) -> None:
    """The first-call check of a processor under ``pc`` (covers ``apply`` then ``enable_parallelism``)."""
    import torch.distributed as dist

    if getattr(proc, "_cp_checked", None) is pc:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{type(proc).__name__}: the model is context-parallel but torch.distributed is not "
                           "initialised (launch with torchrun and call diffusion_attn.parallel.init_distributed())")
    cp = cp_config(pc)
    modes = getattr(type(proc), "context_parallel", None) or method_modes(proc.method)
    family = getattr(proc.family, "name", None)
    check_context_parallel(proc.method, modes, cp, heads, family=family)
    if cp_mode(cp) == "ring":
        from .processors.base import PatternProcessor

        over = [n for n in _RING_FREE_HOOKS if getattr(type(proc), n) is not getattr(PatternProcessor, n)]
        if over:
            raise ContextParallelError(f"{type(proc).__name__} overrides {', '.join(over)}, which need the whole sequence "
                                       "on one rank: it cannot run under ring attention; use ulysses_degree=N")
    proc._cp_checked = pc


def _gather_key_mask(kpm, cp, group_mesh) -> torch.Tensor:
    """A (B, S_local) key mask from every rank, concatenated in rank order (the gathered order)."""
    from diffusers.hooks.context_parallel import _all_gather_anything

    return _all_gather_anything(kpm.to(torch.uint8).contiguous(), 1, group_mesh.get_group()).bool()


def parallel_core(proc, q, k, v, layout, attention_mask=None) -> torch.Tensor:
    """``proc.core`` of a rank's local q, k, v ((B, S_local, heads, D)) under context parallelism, through
    diffusers' context-parallel template with the processor's own core as the forward op."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    from .layout import TokenLayout
    from .processors.base import key_padding_from_mask

    pc = proc._parallel_config
    cp = cp_config(pc)
    heads = q.shape[2]
    _check_call(proc, pc, heads)
    if layout.extra:
        raise ContextParallelError("context parallelism needs a call of grid and text tokens only (extra segments: "
                                   f"{[s.name for s in layout.extra]})")
    mode, world = cp_mode(cp), _degree(cp)
    s_local, batch = q.shape[1], q.shape[0]
    # key masks: a local one (S_local keys) is gathered here; a whole-sequence one (HunyuanVideo's text
    # padding as the model hands it to every block, when its mask hook is not installed) is already in
    # single-device order
    kpm, local_mask = None, False
    if attention_mask is not None:
        if attention_mask.ndim == 4 and attention_mask.shape[2] != 1:
            raise NotImplementedError("context parallelism supports key-padding masks only, not per-query masks")
        local_mask = attention_mask.shape[-1] == s_local
        kpm = key_padding_from_mask(attention_mask, batch, attention_mask.shape[-1])
        if local_mask:
            kpm = _gather_key_mask(kpm, cp, cp._flattened_mesh)
    if mode == "ring":
        s_global = s_local * world
    state = dict(step=0)

    def global_layout(s_global):
        text = s_global - layout.num_image
        if text < 0 or (text and not layout.text_len):
            raise RuntimeError(f"{type(proc).__name__}: {s_global} gathered tokens do not fit the grid {layout.grid} "
                               f"(+ text); the model's context-parallel plan must split every stream (grid, text)")
        return TokenLayout(layout.grid, text, layout.text_position)

    def order_on(glayout, device):
        """The gathered order of ``glayout`` (cached per layout and device in the run context)."""
        return proc.context.cached(("cp-order", glayout, world, str(device)),
                                   lambda: gathered_order(glayout, world).to(device))

    def canonical_mask(glayout, order):
        if kpm is None:
            return None
        if kpm.shape[-1] != glayout.num_tokens:
            raise RuntimeError(f"attention mask over {kpm.shape[-1]} keys for {glayout.num_tokens} tokens")
        if not local_mask:
            return kpm
        out = torch.empty_like(kpm)
        out[:, order.to(kpm.device)] = kpm
        return out

    def ulysses_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if return_lse:
            raise NotImplementedError("diffusion_attn's Ulysses op does not return the log-sum-exp")
        glayout = global_layout(query.shape[1])
        order = order_on(glayout, query.device)
        h_local = query.shape[2]
        rank = cp._ulysses_local_rank
        shard = Shard("ulysses", rank, world, rank * (-(-heads // world)), heads)

        def canon(x):
            out = torch.empty_like(x)
            out[:, order] = x
            return out

        out = _run_local(proc, shard, canon(query), canon(key), canon(value), glayout, canonical_mask(glayout, order))
        assert out.shape[2] == h_local
        return out[:, order]

    def ring_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False, return_lse=True, _save_ctx=True, _parallel_config=None):
        glayout = global_layout(s_global)
        order = order_on(glayout, query.device)
        rank = cp._ring_local_rank
        chunk = (rank + state["step"]) % world  # diffusers' ring visits the key chunks from its own rank on
        state["step"] += 1
        qpos = order[rank * s_local:(rank + 1) * s_local]
        kpos = order[chunk * s_local:(chunk + 1) * s_local]
        shard = Shard("ring", rank, world, 0, heads)
        mask = _ring_mask(proc, shard, glayout, qpos, kpos, query)
        if "cmask" not in state:  # the same for every ring step of this call
            state["cmask"] = canonical_mask(glayout, order)
        cmask = state["cmask"]
        if cmask is not None:
            keep = cmask[:, kpos][:, None, None, :]
            mask = keep if mask is None else mask & keep
        from .extensions import attention_with_lse

        out, lse = attention_with_lse(query, key, value, mask, scale)
        # a query chunk with no allowed key in this key chunk: lse -inf; diffusers' merge needs it finite
        # when no earlier chunk had a key either (radial and GNA always see their own chunk's diagonal)
        lse = lse.clamp_min(-1e4).transpose(1, 2)  # (B, S, H)
        return (out, lse) if return_lse else out

    def no_backward(*_, **__):
        raise NotImplementedError("diffusion_attn's context-parallel attention is inference-only (no backward)")

    op = ring_op if mode == "ring" else ulysses_op
    return _templated_context_parallel_attention(q, k, v, None, 0.0, False, None, False, False,
                                                 forward_op=op, backward_op=no_backward, _parallel_config=pc)


def _run_local(proc, shard, q, k, v, layout, kpm):
    """The processor's one-device core on a rank's whole-sequence, local-head tensors."""
    mask = None if kpm is None else kpm[:, None, None, :]
    previous = proc._cp_shard
    proc._cp_shard = shard
    try:
        return proc.local_core(q, k, v, layout, mask)
    finally:
        proc._cp_shard = previous


def _ring_mask(proc, shard, layout, qpos, kpos, query):
    """The pattern's (B|1, H|1, Sq_chunk, Sk_chunk) mask on one (query chunk, key chunk) pair, or None
    where the call is dense (placement off, full pattern)."""
    from .patterns.mask_mod import as_mask_mod

    previous, proc._cp_shard = proc._cp_shard, shard
    try:
        pattern = None if proc.is_dense_now() else proc.current_pattern(layout)
        heads = proc.placement.head_mask(query.shape[2], query.device) if pattern is not None else None
    finally:
        proc._cp_shard = previous
    if pattern is None or pattern.is_full():
        return None
    fn = as_mask_mod(pattern).bind(layout, query.device)
    h = torch.arange(query.shape[2], device=query.device)[None, :, None, None]
    b = torch.arange(query.shape[0], device=query.device)[:, None, None, None]
    mask = torch.broadcast_to(fn(b, h, qpos.to(query.device)[:, None], kpos.to(query.device)[None, :]),
                              (query.shape[0], query.shape[2], qpos.numel(), kpos.numel()))
    if heads is not None:  # Placement.heads: the other heads stay dense
        mask = mask | ~heads[None, :, None, None]
    return mask


# ---------------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _accelerator_count_for_cpu():
    """diffusers 0.42 computes ``rank % torch.accelerator.device_count()``; on a machine without an
    accelerator that count is 0. Report 1 there for the duration (the device is then ``cpu``)."""
    accel = getattr(torch, "accelerator", None)
    if accel is None or accel.device_count() > 0:
        yield
        return
    original = accel.device_count
    accel.device_count = lambda: 1
    try:
        yield
    finally:
        accel.device_count = original


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) if it is not yet: NCCL with CUDA (each rank on ``cuda:LOCAL_RANK``),
    gloo otherwise. Returns ``(rank, world_size)``."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; context parallelism needs it")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("context parallelism needs a process group: launch with "
                               "`torchrun --nproc-per-node N -m diffusion_attn generate ... --context-parallel ulysses`")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
        _OWN_GROUP[0] = True
    return dist.get_rank(), dist.get_world_size()


_OWN_GROUP = [False]


def shutdown(wait: bool = True) -> None:
    """Destroy the process group if :func:`init_distributed` created it; with ``wait``, after every rank
    reached this point (``wait=False`` on an error path: a rank that failed alone must not hang at a
    barrier the others never reach)."""
    import torch.distributed as dist

    if _OWN_GROUP[0] and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        _OWN_GROUP[0] = False


def is_main_process() -> bool:
    """Rank 0, or no process group: the process that writes outputs."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _as_cp_config(config=None, *, ulysses_degree=None, ring_degree=None, **kw):
    from diffusers import ContextParallelConfig

    if config is None:
        return ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, **kw)
    if ulysses_degree is not None or ring_degree is not None or kw:
        raise ValueError("give either a ContextParallelConfig or ulysses_degree / ring_degree, not both")
    cp = cp_config(config)
    if cp is None:
        raise ValueError(f"expected a diffusers ContextParallelConfig, got {type(config).__name__}")
    return cp


def enable_context_parallel(pipe_or_model, config=None, *, ulysses_degree: int | None = None,
                            ring_degree: int | None = None, **config_kwargs) -> list:
    """``enable_parallelism`` on every denoiser of a pipeline (or on a model), with the family's plan when
    diffusers has none (HunyuanVideo), working on CPU-only machines (gloo), and checking first that the
    method applied (if any) supports the mode: on error nothing is changed. ``config``: a diffusers
    ``ContextParallelConfig`` (or ``ParallelConfig``), or give ``ulysses_degree`` / ``ring_degree`` (and
    ``ulysses_anything=True`` ...). Returns the denoisers."""
    import torch.distributed as dist

    from .adapters import family_of
    from .api import _HANDLE_ATTR, denoisers

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun and call "
                           "diffusion_attn.parallel.init_distributed() (or torch.distributed.init_process_group) first")
    cp = _as_cp_config(config, ulysses_degree=ulysses_degree, ring_degree=ring_degree, **config_kwargs)
    total = cp.ring_degree * cp.ulysses_degree
    if total > dist.get_world_size():
        raise ValueError(f"context parallelism over {total} processes, but the world has {dist.get_world_size()}")
    models = denoisers(pipe_or_model)
    plans = []
    for m in models:
        family = family_of(m)
        if getattr(m, "_parallel_config", None) is not None:
            raise ValueError(f"{type(m).__name__} is already parallel (enable_parallelism was called)")
        plan = getattr(m, "_cp_plan", None) or getattr(family, "cp_plan", None)
        handle = getattr(m, _HANDLE_ATTR, None)
        if plan is None:
            applied = f" ({handle.method!r} is applied)" if handle is not None else ""
            raise ContextParallelError(f"{type(m).__name__} ({family.name}){applied} has no context-parallel plan in "
                                       "diffusers (UNets have none): it cannot be split over processes; run one "
                                       "generation per process instead")
        if handle is not None:
            check_model_parallel(m, family, handle.method, method_modes(handle.method), cp)
        else:
            heads = _model_heads(m)
            if cp_mode(cp) == "ulysses" and heads and heads % cp.ulysses_degree and not cp.ulysses_anything:
                raise ContextParallelError(f"{type(m).__name__} has {heads} heads, which ulysses_degree="
                                           f"{cp.ulysses_degree} does not divide (or use ulysses_anything=True)")
        plans.append(plan if getattr(m, "_cp_plan", None) is None else None)
    with _accelerator_count_for_cpu():
        for m, plan in zip(models, plans):
            m.enable_parallelism(config=dataclasses.replace(cp), cp_plan=plan)
            hooks = getattr(family_of(m), "cp_hooks", None)
            if hooks is not None:
                hooks(m, m._parallel_config.context_parallel_config)
    return models


def parallel_pipeline(model: str, mode: str, degree: int | None = None, *, dtype="float32", device: str = "cpu",
                      ulysses_anything: bool = False):
    """For ``diffusion-attn generate --context-parallel MODE`` under torchrun: the process group (gloo on
    CPU, NCCL with CUDA), the pipeline of ``model`` loaded on this rank's device (``cuda`` becomes
    ``cuda:LOCAL_RANK``) and made context-parallel over ``degree`` processes (default: all). Returns
    ``(pipeline, device)``."""
    from .runner.loading import get_pipeline

    if mode not in MODES:
        raise ValueError(f"context parallel mode must be one of {', '.join(MODES)}, got {mode!r}")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    _, world = init_distributed(backend)
    degree = world if degree is None else int(degree)
    if degree < 2 or degree > world:
        raise ValueError(f"--cp-degree must be between 2 and the number of processes ({world}), got {degree}; "
                         "launch with torchrun --nproc-per-node N")
    if world % degree:
        raise ValueError(f"--cp-degree {degree} must divide the number of processes {world}")
    if str(device) == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    pipe = get_pipeline(model, dtype, device)
    config = dict(ulysses_degree=degree) if mode == "ulysses" else dict(ring_degree=degree)
    if ulysses_anything:
        config["ulysses_anything"] = True
    enable_context_parallel(pipe, **config)
    return pipe, device
