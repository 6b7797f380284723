"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): video tokens first, text appended, text padding masked."""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from .base import Family, call_info, first_tensor, grid_from_latent, qkv_heads


#: the denoiser's attention kwargs, and the keys of them the model (or diffusers' attention modules, quietly)
#: takes itself
_CALL_KWARGS = "attention_kwargs"
_MODEL_KEYS = ("scale",)


def _read_call(model, args, kwargs):
    hidden = first_tensor(args, kwargs, "hidden_states", 0)
    text = first_tensor(args, kwargs, "encoder_hidden_states", 2)
    cfg = model.config
    grid = grid_from_latent(hidden.shape, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size))
    return dict(**call_info(kwargs, _CALL_KWARGS, _MODEL_KEYS, forwarded=False),
                grid=grid, text_len=0 if text is None else text.shape[1], batch_size=hidden.shape[0],
                timestep=first_tensor(args, kwargs, "timestep", 1))


def _layers(model):
    out = [(f"transformer_blocks.{i}.attn.processor", i) for i in range(len(model.transformer_blocks))]
    n = len(out)
    out += [(f"single_transformer_blocks.{i}.attn.processor", n + i) for i in range(len(model.single_transformer_blocks))]
    return out


def _run(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, temb=None):
    from diffusers.models.embeddings import apply_rotary_emb

    joined = attn.add_q_proj is None and encoder_hidden_states is not None  # single-stream block
    if joined:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    q, k, v = qkv_heads(attn, hidden_states)
    if rotary is not None:
        if joined:
            n_txt = encoder_hidden_states.shape[1]
            q = torch.cat([apply_rotary_emb(q[:, :-n_txt], rotary, sequence_dim=1), q[:, -n_txt:]], dim=1)
            k = torch.cat([apply_rotary_emb(k[:, :-n_txt], rotary, sequence_dim=1), k[:, -n_txt:]], dim=1)
        else:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        eq, ek, ev = qkv_heads(attn, encoder_hidden_states, context=True)
        q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)
    text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    layout = TokenLayout(proc.context.grid, text_len, "last")
    out = proc.core(q, k, v, layout, attention_mask).flatten(2, 3).to(q.dtype)
    if encoder_hidden_states is None:
        return out, encoder_hidden_states
    img, txt = out[:, :-text_len], out[:, -text_len:]
    if getattr(attn, "to_out", None) is not None:
        img = attn.to_out[1](attn.to_out[0](img))
    if getattr(attn, "to_add_out", None) is not None:
        txt = attn.to_add_out(txt)
    return img, txt


def _cp_plan() -> dict:
    """Context-parallel plan (diffusers 0.42 has none for HunyuanVideo): the RoPE tables and, at the first
    dual-stream block, the video and the (refined) text streams are split over the ranks, so each rank's
    joint sequence is ``[video_r, text_r]``; the output is gathered after ``proj_out``. The text refiner
    runs before the split on every rank (its processors take no parallel config). The text-padding mask,
    which the model hands every block whole, is cut to the rank's ``[video_r, text_r]`` by
    :func:`_cp_hooks` (registered by ``diffusion_attn.parallel.enable_context_parallel``), so stock
    processors and the pack's see a local key mask, which diffusers' Ulysses template gathers."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
                 1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},
        "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
                                 "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


#: name of the hook that cuts the text-padding mask to a rank's tokens
CP_MASK_HOOK = "diffusion_attn.cp_text_mask"


def _cp_hooks(model, cp) -> None:
    """Register, on every dual- and single-stream block, a named diffusers hook that cuts the
    whole-sequence text-padding mask ``(B, 1, 1, video + text)`` to this rank's ``[video_r, text_r]``
    keys (``tensor_split`` chunks, as diffusers' sharders cut)."""
    import torch.distributed as dist
    from diffusers.hooks import ModelHook
    from diffusers.models._modeling_parallel import gather_size_by_comm

    mesh = cp._flattened_mesh
    group, world = mesh.get_group(), mesh.size()
    rank = dist.get_rank(group)
    anything = cp.ulysses_anything or cp.ring_anything

    class _TextMaskShard(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            args = list(args)
            hidden = args[0] if args else kwargs["hidden_states"]
            text = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            in_args = len(args) > 3
            mask = args[3] if in_args else kwargs.get("attention_mask")
            if mask is None or text is None or mask.ndim != 4:
                return tuple(args), kwargs
            n_video, n_text = hidden.shape[1], text.shape[1]
            if n_video + n_text != mask.shape[-1]:  # after the split: this rank's share of each stream
                if anything:
                    n_video, n_text = sum(gather_size_by_comm(n_video, group)), sum(gather_size_by_comm(n_text, group))
                else:
                    n_video, n_text = n_video * world, n_text * world
                if n_video + n_text != mask.shape[-1]:
                    return tuple(args), kwargs  # already a local mask
            keep = torch.cat([torch.arange(n_video).tensor_split(world)[rank],
                              n_video + torch.arange(n_text).tensor_split(world)[rank]]).to(mask.device)
            mask = mask[..., keep]
            if in_args:
                args[3] = mask
            else:
                kwargs["attention_mask"] = mask
            return tuple(args), kwargs

    from ..patches.hooks import clear_child_registry_caches, register_hook

    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        register_hook(block, _TextMaskShard(), CP_MASK_HOOK)
    clear_child_registry_caches(model)


HUNYUAN = Family("hunyuanvideo", ("HunyuanVideoTransformer3DModel",), _read_call, _layers, _run,
                 "HunyuanVideo T2V: dual and single stream blocks, video first", cp_plan=_cp_plan(),
                 cp_hooks=_cp_hooks)
