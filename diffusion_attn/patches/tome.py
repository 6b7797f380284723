"""Token merging (ToMe for SD, Bolya & Hoffman 2023) at the transformer-block level of a diffusers UNet,
with AgentSD's agent tokens (Han et al., Agent Attention, ECCV 2024), as named diffusers hooks.

What one patched ``BasicTransformerBlock`` does (PyPI ``tomesd`` 0.1.3 ``patch.py`` / ``merge.py`` and
LeapLabTHU/Agent-Attention ``agentsd/{patch,merge}.py``):

1. The **metric** is the block's input ``x`` (before ``norm1``), cosine-normalised.
2. **Bipartite soft matching** on the block's token grid ``(h, w)``: in every ``sy x sx`` cell one token is
   a *destination* (dst): a random one (``torch.randint(sy * sx)`` per cell from a generator forked from
   the global RNG, as tomesd) or the top-left one when ``use_rand`` is off *or the batch is odd* (an odd
   batch cannot hold matching cond/uncond halves). Every other token is a source (src), also the tokens
   right of / below the largest ``sy x sx``-divisible region (they are never dst). Each src picks its most
   similar dst; the src are ranked by that similarity.
3. The **main merge** mean-merges the ``r = int(N * ratio)`` best src into their dst (``scatter_reduce``
   mean, the dst itself included): ``n = N - r`` tokens, ordered ``[unmerged src..., dst...]``.
4. **Agents** (AgentSD): the same ranking merges ``agent_r = min(int(N * agent_ratio), #src)`` src into
   the *unmerged* dst: ``m = N - agent_r`` agent tokens, produced only if ``2 m < n`` (else plain ToMe).
5. ``attn1`` runs on the merged ``n`` tokens (with the agents, see
   :mod:`diffusion_attn.processors.agent`); its output is **unmerged**: each merged src copies its dst's
   output. ``attn2`` and the MLP are not merged (the official defaults ``merge_crossattn=False``,
   ``merge_mlp=False``).

Only blocks whose level is downsampled at most ``max_downsample`` times are merged (official default 1:
the full-latent levels). Nothing happens when ``r == 0`` (no random draw either, as tomesd).

Here the pieces are: :func:`bipartite_merge` (steps 1 to 4: a :class:`MergePlan` with ``merge`` /
``unmerge``), :class:`ToMeBlockHook` (a named diffusers ``ModelHook`` on each block, ``pre_forward``:
computes the block's plan from its input and the run context's step; ``post_forward``: drops it) and the
shared per-block :class:`BlockMergeState` that the ``attn1`` processor reads. :func:`apply_tome` installs
the hooks (diffusers' ``Config`` + ``apply_x`` style); the attention processor is installed by the
``agent`` method (:mod:`diffusion_attn.processors.agent`), which merges, attends and unmerges.

Differences from ``tomesd`` / ``agentsd``, on purpose:

* **No class swapping**: a named hook on each block (``diffusion_attn.tome.block``) and a processor on
  its ``attn1``; ``remove()`` is exact whatever else was registered. The stock ``BasicTransformerBlock``
  forward runs, so every diffusers block feature keeps working.
* **Generator per run**: tomesd forks its generator from the global RNG at the first merge after
  ``apply_patch`` and keeps it for the patch's lifetime; here it is forked at the first merge of every
  run (pipeline call), kept in the run context's per-run state: the first run after ``apply`` draws
  exactly tomesd's destinations (bit-exact, tested), and every run with the same global seed draws the
  same ones, whatever ran before.
* **Schedule**: the official README switches settings by calling ``apply_patch`` again at step 20 of 50;
  here both phases are one config and the switch is a fraction of the run (:class:`ToMeConfig`), read
  from the run context's step, never from a call counter.
* **Grids**: the level's grid comes from :func:`diffusion_attn.adapters.unet.unet_level` (the UNet's
  ceil-halving per level, checked against the token count); tomesd's ``ceil(sqrt(HW // N))`` equals it
  on every level tomesd handles correctly. A grid smaller than one ``sy x sx`` cell (no dst at all) is not
  merged (tomesd crashes there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks import ModelHook

from ..placement import StepWindow
from .hooks import clear_child_registry_caches, register_hook

__all__ = [
    "BLOCK_HOOK",
    "GENERATOR_KEY",
    "MergePlan",
    "ToMePhase",
    "ToMeConfig",
    "BlockMergeState",
    "ToMeBlockHook",
    "bipartite_merge",
    "dst_pattern",
    "fork_generator",
    "mergeable_blocks",
    "first_attention_level",
    "apply_tome",
]

BLOCK_HOOK = "diffusion_attn.tome.block"
#: key of the per-run generator in ``RunContext.run_state``
GENERATOR_KEY = "diffusion_attn.tome.generator"


# ------------------------------------------------------------------------------------------------------
# Bipartite soft matching
# ------------------------------------------------------------------------------------------------------
def dst_pattern(h: int, w: int, sx: int, sy: int, choice: torch.Tensor | None, device=None) -> torch.Tensor:
    """The token order ``[dst..., src...]`` of an ``h x w`` grid as a ``(1, N, 1)`` index tensor.

    ``choice``: ``(h // sy, w // sx, 1)`` int64, the dst's position (row-major ``sy x sx``) in each cell;
    None: the top-left token. Tokens outside the divisible region are src. The order within dst and src is
    the order ``argsort`` gives for the ``-1`` (dst) / ``0`` (src) flags, as tomesd's, so that merged
    sequences are laid out exactly as tomesd's.
    """
    hc, wc = h // sy, w // sx
    if choice is None:
        choice = torch.zeros(hc, wc, 1, dtype=torch.int64, device=device)
    flags = torch.zeros(hc, wc, sy * sx, dtype=torch.int64, device=choice.device)
    flags.scatter_(2, choice, torch.full_like(choice, -1))
    flags = flags.view(hc, wc, sy, sx).transpose(1, 2).reshape(hc * sy, wc * sx)
    if hc * sy < h or wc * sx < w:
        full = torch.zeros(h, w, dtype=torch.int64, device=choice.device)
        full[:hc * sy, :wc * sx] = flags
        flags = full
    return flags.reshape(1, -1, 1).argsort(dim=1)


class MergePlan:
    """One block call's merge: ``merge(x) -> (merged (B, n, C), agents (B, m, C) | None)`` and
    ``unmerge(y (B, n, C)) -> (B, N, C)``. Index tensors are shared by the whole batch except the
    similarity ranking, which is per sample."""

    def __init__(self, order, num_dst, unm_idx, src_idx, dst_idx, agent_idx, batch, tokens):
        self.order, self.num_dst = order, num_dst
        self.unm_idx, self.src_idx, self.dst_idx = unm_idx, src_idx, dst_idx
        self.agent_idx = agent_idx  # (agent unmerged, agent src, agent dst) or None
        self.batch, self.tokens = batch, tokens

    @property
    def merged_tokens(self) -> int:
        return self.tokens - self.src_idx.shape[1]

    @property
    def agent_tokens(self) -> int | None:
        return None if self.agent_idx is None else self.tokens - self.agent_idx[1].shape[1]

    def _split(self, x):
        c = x.shape[-1]
        b, n = x.shape[0], self.tokens
        src = torch.gather(x, 1, self.order[:, self.num_dst:].expand(b, n - self.num_dst, c))
        dst = torch.gather(x, 1, self.order[:, :self.num_dst].expand(b, self.num_dst, c))
        return src, dst

    @staticmethod
    def _reduce(src, dst, unm_idx, src_idx, dst_idx):
        b, _, c = src.shape
        kept = torch.gather(src, 1, unm_idx.expand(b, unm_idx.shape[1], c))
        moved = torch.gather(src, 1, src_idx.expand(b, src_idx.shape[1], c))
        dst = dst.scatter_reduce(1, dst_idx.expand(b, dst_idx.shape[1], c), moved, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def merge(self, x: torch.Tensor):
        src, dst = self._split(x)
        merged = self._reduce(src, dst, self.unm_idx, self.src_idx, self.dst_idx)
        agents = None if self.agent_idx is None else self._reduce(src, dst, *self.agent_idx)
        return merged, agents

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        b, c = y.shape[0], y.shape[-1]
        n_unm = self.unm_idx.shape[1]
        kept, dst = y[:, :n_unm], y[:, n_unm:]
        moved = torch.gather(dst, 1, self.dst_idx.expand(b, self.dst_idx.shape[1], c))
        src_pos = self.order[:, self.num_dst:].expand(b, self.order.shape[1] - self.num_dst, 1)
        out = torch.zeros(b, self.tokens, c, device=y.device, dtype=y.dtype)
        out.scatter_(1, self.order[:, :self.num_dst].expand(b, self.num_dst, c), dst)
        out.scatter_(1, torch.gather(src_pos, 1, self.unm_idx).expand(b, n_unm, c), kept)
        out.scatter_(1, torch.gather(src_pos, 1, self.src_idx).expand(b, self.src_idx.shape[1], c), moved)
        return out


def bipartite_merge(metric: torch.Tensor, grid: tuple[int, int], sx: int, sy: int, r: int, agent_r: int = 0,
                    generator: torch.Generator | None = None) -> MergePlan | None:
    """The merge plan of one block call (steps 1 to 4 of the module docstring), or None when nothing is
    merged (``r <= 0`` or no dst). ``metric``: (B, N, C), the block input; ``grid``: ``(h, w)`` with
    ``h * w == N``; ``generator``: draw random dst (None: top-left dst, no draw)."""
    b, n, _ = metric.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"token grid {grid} does not hold the block's {n} tokens")
    hc, wc = h // sy, w // sx
    num_dst = hc * wc
    if r <= 0 or num_dst == 0:
        return None
    with torch.no_grad():
        choice = None
        if generator is not None:
            choice = torch.randint(sy * sx, size=(hc, wc, 1), device=generator.device,
                                   generator=generator).to(metric.device)
        order = dst_pattern(h, w, sx, sy, choice, device=metric.device)
        plan = MergePlan(order, num_dst, None, None, None, None, b, n)
        unit = metric / metric.norm(dim=-1, keepdim=True)
        src, dst = plan._split(unit)
        best, best_dst = (src @ dst.transpose(-1, -2)).max(dim=-1)
        ranking = best.argsort(dim=-1, descending=True)[..., None]
        r = min(src.shape[1], r)
        plan.unm_idx, plan.src_idx = ranking[:, r:], ranking[:, :r]
        plan.dst_idx = torch.gather(best_dst[..., None], 1, plan.src_idx)
        agent_r = min(src.shape[1], agent_r)
        if (n - agent_r) * 2 < n - r:  # AgentSD: agents only when 2m < n
            agent_src = ranking[:, :agent_r]
            plan.agent_idx = (ranking[:, agent_r:], agent_src, torch.gather(best_dst[..., None], 1, agent_src))
    return plan


def fork_generator(device: torch.device) -> torch.Generator:
    """A generator forked from the global RNG of ``device`` (CPU for devices without their own, as tomesd)."""
    if device.type == "cuda":
        return torch.Generator(device=device).set_state(torch.cuda.get_rng_state(device))
    return torch.Generator(device="cpu").set_state(torch.get_rng_state())


# ------------------------------------------------------------------------------------------------------
# Config and schedule
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToMePhase:
    """The merge settings of one phase of the run."""

    ratio: float
    agent_ratio: float
    sx: int
    sy: int


@dataclass(frozen=True)
class ToMeConfig:
    """ToMe / AgentSD on one UNet, for :func:`apply_tome`.

    ``early`` applies before ``switch`` (a fraction of the run: step ``i`` of ``N`` is late when
    ``i / N >= switch``; 0.4 is the official step 20 of 50; 1.0 never switches), ``late`` after it.
    ``max_downsample``: merge blocks whose level is at most this many times downsampled (1, 2, 4, 8).
    ``use_rand``: random dst per cell (forced off for odd batches). ``agents``: produce agent tokens
    (False: plain ToMe whatever the agent ratios).
    """

    early: ToMePhase
    late: ToMePhase
    switch: float = 1.0
    max_downsample: int = 1
    use_rand: bool = True
    agents: bool = True

    def __post_init__(self):
        for name in ("early", "late"):
            p = getattr(self, name)
            if not 0.0 <= p.ratio < 1.0:
                raise ValueError(f"{name} ratio must be in [0, 1), got {p.ratio}")
            if not 0.0 <= p.agent_ratio <= 1.0:
                raise ValueError(f"{name} agent_ratio must be in [0, 1], got {p.agent_ratio}")
            if int(p.sx) < 1 or int(p.sy) < 1:
                raise ValueError(f"{name} sx / sy must be >= 1, got sx={p.sx}, sy={p.sy}")
        if not 0.0 <= self.switch <= 1.0:
            raise ValueError(f"switch must be a fraction of the run in [0, 1], got {self.switch}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")

    def phase(self, step: int | None, num_steps: int | None) -> ToMePhase:
        """The phase of step ``step`` of ``num_steps``."""
        if self.switch >= 1.0 or self.early == self.late:
            return self.early
        if self.switch <= 0.0:
            return self.late
        if step is None or step < 0 or not num_steps:
            raise RuntimeError(
                "the ToMe / AgentSD schedule switches at a fraction of the run, which needs the step and the number "
                "of steps: apply the method to the pipeline (not a bare UNet), or use switch=1.0 (never) / 0.0 (always late)")
        return self.late if StepWindow(float(self.switch)).contains(step, num_steps) else self.early


# ------------------------------------------------------------------------------------------------------
# Hooks
# ------------------------------------------------------------------------------------------------------
class BlockMergeState:
    """What one block's hook hands its ``attn1`` processor for the current call: the plan (None = no merge)."""

    def __init__(self, name: str):
        self.name = name
        self.plan: MergePlan | None = None


def mergeable_blocks(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The ``BasicTransformerBlock``\\ s ToMe can patch: layer-norm blocks with a self-attention ``attn1``
    and no positional embedding (every block of SD 1.x / 2.x / SDXL UNets)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    out = []
    for name, m in unet.named_modules():
        if not isinstance(m, BasicTransformerBlock):
            continue
        attn = getattr(m, "attn1", None)
        if (getattr(m, "norm_type", None) == "layer_norm" and getattr(m, "pos_embed", None) is None
                and not m.only_cross_attention and isinstance(attn, Attention) and not attn.is_cross_attention
                and attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection):
            out.append((name, m))
    return out


def first_attention_level(unet: torch.nn.Module) -> int | None:
    """The smallest downsampling factor of a UNet level with transformer blocks (SD 1.x / 2.x: 1; SDXL: 2),
    from the down blocks' layout; None if no down block has attentions."""
    for i, block in enumerate(getattr(unet, "down_blocks", [])):
        if len(getattr(block, "attentions", None) or []):
            return 2 ** i
    return None


class ToMeBlockHook(ModelHook):
    """``pre_forward``: the block's :class:`MergePlan` from its input, the run context's latent size and
    step; ``post_forward``: drops it. Changes neither the inputs nor the output."""

    _is_stateful = False

    def __init__(self, config: ToMeConfig, context, state: BlockMergeState):
        super().__init__()
        self.config, self.context, self.state = config, context, state

    def plan(self, x: torch.Tensor) -> MergePlan | None:
        from ..adapters.unet import unet_level

        ctx, cfg = self.context, self.config
        if ctx.latent_size is None:
            raise RuntimeError("a ToMe block was called outside a UNet forward pass (no latent size known)")
        factor, grid = unet_level(ctx.latent_size, x.shape[1])
        if factor > cfg.max_downsample:
            return None
        phase = cfg.phase(ctx.step, ctx.num_steps)
        n = x.shape[1]
        r = int(n * phase.ratio)
        agent_r = int(n * phase.agent_ratio) if cfg.agents else 0
        # tomesd forks its generator at the first merge-level call, whether it draws or not
        generator = ctx.run_state.get(GENERATOR_KEY)
        if generator is None or (generator.device != x.device and x.device.type in ("cpu", "cuda")):
            generator = ctx.run_state[GENERATOR_KEY] = fork_generator(x.device)
        if not cfg.use_rand or x.shape[0] % 2:  # tomesd: an odd batch cannot hold cond/uncond halves
            generator = None
        return bipartite_merge(x, grid, int(phase.sx), int(phase.sy), r, agent_r, generator)

    def pre_forward(self, module, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.state.plan = self.plan(x)
        return args, kwargs

    def post_forward(self, module, output):
        self.state.plan = None
        return output


def apply_tome(unet: torch.nn.Module, config: ToMeConfig, context,
               blocks: list[tuple[str, torch.nn.Module]] | None = None) -> tuple[list[Callable[[], None]], dict]:
    """Register :class:`ToMeBlockHook` (``diffusion_attn.tome.block``) on every mergeable block of ``unet``
    (or ``blocks``). Returns ``(undo list, {block name: BlockMergeState})``; the attention processors that
    merge / unmerge read the states."""
    blocks = mergeable_blocks(unet) if blocks is None else blocks
    undo: list[Callable[[], None]] = []
    states: dict[str, BlockMergeState] = {}
    try:
        for name, block in blocks:
            state = states[name] = BlockMergeState(name)
            undo.append(register_hook(block, ToMeBlockHook(config, context, state), BLOCK_HOOK))
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    finally:
        clear_child_registry_caches(unet)

    def clear():
        clear_child_registry_caches(unet)

    return [clear, *undo], states
