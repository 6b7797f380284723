"""AgentSD (Han et al., Agent Attention, ECCV 2024): ToMe token merging + agent attention for SD 1.x / 2.x
UNets (SDXL as an option), training-free.

In every UNet ``BasicTransformerBlock`` of the full-latent levels (``max_downsample``), ``attn1`` runs on
tokens merged by ToMe's bipartite soft matching (``ratio``: ``r = int(N * ratio)`` merged away, ``n = N - r``
left) and, where a second, stronger merge of the same matching gives few enough tokens (``m`` agents with
``2 m < n``; ``agent_ratio``), as **agent attention**: with ``A = W_q a`` (the agents through the *query*
projection), per head of size ``d``::

    V_A = softmax(A K^T d^-0.5) V                      # (m, d): the agents gather from all tokens
    O   = softmax(Q A^T (d^-0.5)^k_scale2) V_A + k_shortcut V   # the tokens read from the agents

then ``W_out`` and the unmerge (merged tokens copy their destination's output). Without agents it is plain
ToMe for SD (softmax attention on the merged tokens, the model's own processor). The merging is
:mod:`diffusion_attn.patches.tome` (a named hook on each block computes the merge from the block input);
this module's :class:`AgentProcessor` on ``attn1`` merges its input, attends and unmerges.

**Official defaults.** ``agentsd.apply_patch`` defaults to ``ratio=0.5, sx=sy=2, agent_ratio=0.8,
k_scale2=0.3, k_shortcut=0.075, max_downsample=1, use_rand=True``; its README recommends (50 PLMS steps,
SD 1.5 at 512^2) ``sx=sy=4, ratio=0.4, agent_ratio=0.95`` up to step 20, then ``sx=sy=2, ratio=0.4,
agent_ratio=0.5`` (then ``2m >= n``: plain ToMe) and ``attn_precision="fp32"`` on SD 2.1. The defaults
here are that recommended schedule, with the switch at the fraction ``0.4`` of the run (step 20 of 50).
With ``sx=sy=4, agent_ratio=0.95`` the agent merge is capped at the src count: ``m = N / 16`` agents (256
on a 64 x 64 latent) for ``n = 0.6 N`` queries.

**Where and why this deviates from the official code** (LeapLabTHU/Agent-Attention ``agentsd``):

* It runs in diffusers (the official patch does not: issue #18) with CFG, any batch and any latent size
  (tokens outside the ``sy x sx``-divisible region stay src, as ToMe does; a level smaller than one cell
  is not merged). No class swapping: a named block hook + an ``attn1`` processor, exact ``remove()``.
* The two softmax attentions run through diffusers' ``dispatch_attention_fn`` (SDPA or the model's
  attention backend) instead of explicit einsum score matrices: the same function, O(n m) memory at most.
* ``attn_precision="fp32"`` computes both attentions entirely in fp32 (q, k, v and agents upcast, output
  cast back). The official upcasts only the two score products and leaves the softmax-times-V products to
  autocast (it runs under autocast in the LDM code; a diffusers fp16 pipeline has no autocast, where its
  mix would fail). ``auto`` (default) does that where the model's attention asks for upcasting
  (``upcast_attention``: the SD 2.1 configs), which is the official's advice for SD 2.1.
* The random destinations use a generator forked from the global RNG at the first merge of every run
  (tomesd: of the patch's lifetime); see :mod:`diffusion_attn.patches.tome`.
* ``max_downsample=None`` (default) picks the UNet's highest-resolution level with transformer blocks:
  1 on SD 1.x / 2.x (the official default), 2 on SDXL, whose full-latent levels have no attention (the
  official never ran SDXL: untested territory).
* Only ``attn1`` is merged (the official defaults; its ``merge_crossattn`` / ``merge_mlp`` options are
  not offered: with agents its cross-attention path fails on the shortcut's shape).
"""

from __future__ import annotations

import torch

from ..patches.tome import ToMeConfig, ToMePhase, apply_tome, first_attention_level, mergeable_blocks
from ..registry import MethodConfig, MethodSpec, method_config, param, register
from .base import PatternProcessor
from .install import get_processors, install_processors, rollback_on_error

__all__ = ["AgentConfig", "AgentProcessor", "agent_attention"]

PRECISIONS = ("auto", "fp32", "none")


def agent_attention(q, k, v, agents, *, scale: float, k_scale2: float = 0.3, k_shortcut: float = 0.075,
                    fp32: bool = False, backend=None) -> torch.Tensor:
    """Agent attention in the diffusers layout: q, k, v (B, n, H, d), agents (B, m, H, d) (already through
    the query projection). ``softmax(Q A^T scale^k_scale2) softmax(A K^T scale) V + k_shortcut V``."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    dtype = q.dtype
    if fp32:
        q, k, v, agents = (t.float() for t in (q, k, v, agents))
        backend = None  # the native SDPA takes fp32 everywhere

    def attend(query, key, value, s):
        return dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False, scale=s, backend=backend)

    agent_v = attend(agents, k, v, scale)
    out = attend(q, agents, agent_v, scale ** k_scale2)
    return (out + k_shortcut * v).to(dtype)


class AgentProcessor(PatternProcessor):
    """``attn1`` of one ToMe-patched block: merges its input with the block's current plan, runs agent
    attention (agents present) or the block's original processor (plain ToMe), and unmerges the output.
    Without a plan (a level or step that is not merged) it is the original processor, untouched."""

    method = "agent"
    #: the family adapter lays merged tokens out as a 1-D set, not the level's grid
    merged_tokens = True

    def __init__(self, state, original, *, k_scale2: float = 0.3, k_shortcut: float = 0.075,
                 attn_precision: str = "auto"):
        super().__init__()
        if attn_precision not in PRECISIONS:
            raise ValueError(f"attn_precision must be one of {PRECISIONS}, got {attn_precision!r}")
        self.state, self.original = state, original
        self.k_scale2, self.k_shortcut, self.attn_precision = float(k_scale2), float(k_shortcut), attn_precision
        self._agents = None
        self._scale = None
        self._fp32 = False

    def _original(self, attn, hidden_states, encoder_hidden_states, attention_mask, extra):
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **extra)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 rotary_emb=None, temb=None, **kwargs):
        extra = {k: v for k, v in dict(kwargs, temb=temb).items() if v is not None}
        plan = self.state.plan
        if plan is None:
            return self._original(attn, hidden_states, encoder_hidden_states, attention_mask, extra)
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("ToMe / AgentSD merges self-attention without an attention mask on (B, N, C) tokens; "
                             f"{self.state.name}.attn1 got encoder states / a mask / a {hidden_states.ndim}-D input")
        merged, agents = plan.merge(hidden_states)
        if agents is None:  # plain ToMe: the model's own attention on the merged tokens (= tomesd)
            return plan.unmerge(self._original(attn, merged, None, None, extra))
        a = attn.to_q(agents)
        a = a.view(a.shape[0], -1, attn.heads, a.shape[-1] // attn.heads)
        if attn.norm_q is not None:
            a = attn.norm_q(a)
        self._agents, self._scale = a, attn.scale
        self._fp32 = self.attn_precision == "fp32" or (self.attn_precision == "auto" and bool(getattr(attn, "upcast_attention", False)))
        try:
            out = super().__call__(attn, merged, temb=temb, **kwargs)
        finally:
            self._agents = None
        return plan.unmerge(out)

    def core(self, q, k, v, layout, attention_mask=None):
        if self._agents is None:
            raise RuntimeError("AgentProcessor.core runs only inside an agent call")
        return agent_attention(q, k, v, self._agents, scale=self._scale, k_scale2=self.k_scale2,
                               k_shortcut=self.k_shortcut, fp32=self._fp32, backend=self._attention_backend)

    def pattern(self, layout):
        return None

    def __repr__(self) -> str:
        return f"AgentProcessor({self.state.name}.attn1, k_scale2={self.k_scale2}, k_shortcut={self.k_shortcut})"


@method_config
class AgentConfig(MethodConfig):
    """AgentSD: ToMe merge settings before (``ratio``, ``agent_ratio``, ``sx``, ``sy``) and after
    (``late_*``) the ``switch`` fraction of the run; the agent attention's ``k_scale2`` / ``k_shortcut`` /
    ``attn_precision``; ``agents`` off = ToMe for SD only. Defaults: the official recommended schedule."""

    ratio: float = param(0.4, role="pattern", range=(0.0, 1.0),
                         help="ToMe: fraction of attn1's tokens merged away, r = int(N * ratio); in [0, 1)")
    agent_ratio: float = param(0.95, role="pattern", range=(0.0, 1.0),
                               help="agent merge: int(N * agent_ratio) tokens merged away (capped at the src count); "
                                    "agents only when 2 * agents < merged tokens")
    sx: int = param(4, role="pattern", range=(1, None), help="ToMe cell width: one destination token per sy x sx cell")
    sy: int = param(4, role="pattern", range=(1, None), help="ToMe cell height")
    switch: float = param(0.4, role="placement", range=(0.0, 1.0),
                          help="fraction of the run from which the late_* settings apply (official: step 20 of 50); "
                               "1 = never")
    late_ratio: float = param(0.4, role="pattern", range=(0.0, 1.0), help="ratio after the switch")
    late_agent_ratio: float = param(0.5, role="pattern", range=(0.0, 1.0),
                                    help="agent_ratio after the switch (official 0.5: no agents, plain ToMe)")
    late_sx: int = param(2, role="pattern", range=(1, None), help="sx after the switch")
    late_sy: int = param(2, role="pattern", range=(1, None), help="sy after the switch")
    agents: bool = param(True, role="pattern", help="agent attention where the merge allows it; off: ToMe for SD only")
    k_scale2: float = param(0.3, role="pattern", range=(0.0, None),
                            help="second softmax scale = head_dim ** (-0.5 * k_scale2)")
    k_shortcut: float = param(0.075, role="pattern", range=(0.0, None), help="weight of the V shortcut: O += k_shortcut * V")
    attn_precision: str = param("auto", role="kernel", choices=PRECISIONS,
                                help="agent attention in fp32: auto = where the model upcasts attention (SD 2.1)")
    use_rand: bool = param(True, role="pattern",
                           help="random destination per cell (forced off for odd batches, as tomesd); off: top-left")
    max_downsample: int | None = param(None, role="placement", choices=(1, 2, 4, 8),
                                       help="merge levels downsampled at most this much (None: the UNet's first "
                                            "attention level: 1 on SD 1.x/2.x, 2 on SDXL)")

    def check(self) -> None:
        super().check()
        for name in ("ratio", "late_ratio"):
            if getattr(self, name) >= 1.0:
                raise ValueError(f"parameter {name!r} must be in [0, 1) (the fraction of tokens merged away), "
                                 f"got {getattr(self, name)!r}")

    def tome_config(self, max_downsample: int) -> ToMeConfig:
        return ToMeConfig(ToMePhase(self.ratio, self.agent_ratio, self.sx, self.sy),
                          ToMePhase(self.late_ratio, self.late_agent_ratio, self.late_sx, self.late_sy),
                          switch=self.switch, max_downsample=max_downsample, use_rand=self.use_rand,
                          agents=self.agents)


def _install(model, family, context, config: AgentConfig):
    blocks = mergeable_blocks(model)
    if not blocks:
        raise ValueError(f"agent (AgentSD / ToMe) needs BasicTransformerBlocks with layer norm and a self-attention "
                         f"attn1 (SD 1.x / 2.x / SDXL UNets); this {type(model).__name__} has none")
    first = first_attention_level(model) or 1
    max_downsample = config.max_downsample or first
    if max_downsample < first:
        raise ValueError(f"max_downsample={max_downsample} merges nothing on this UNet: its highest-resolution transformer "
                         f"blocks are {first}x downsampled (SDXL: 2); use max_downsample={first} or None")
    tome = config.tome_config(max_downsample)
    if tome.early != tome.late and 0.0 < tome.switch < 1.0 and getattr(context, "scheduler", None) is None:
        raise ValueError("agent's schedule switches at a fraction of the run, which needs the number of steps: apply "
                         "it to the pipeline (its scheduler tells), or use switch=1.0 (never) / 0.0 (always late)")
    undo, states = apply_tome(model, tome, context, blocks)
    with rollback_on_error(undo):
        wanted = {f"{name}.attn1.processor": name for name, _ in blocks}
        layers = [(name, i) for name, i in family.layers(model) if name in wanted]
        original = get_processors(model)
        taken = [f"{name} ({type(original[name]).__name__})" for name, _ in layers
                 if isinstance(original[name], PatternProcessor)]
        if taken:
            raise ValueError(f"agent merges the input of attn1, which another method's processor handles here: "
                             f"{', '.join(taken)}; remove that method first")

        def make(index, name):
            return AgentProcessor(states[wanted[name]], original[name], k_scale2=config.k_scale2,
                                  k_shortcut=config.k_shortcut, attn_precision=config.attn_precision)

        undo.extend(install_processors(model, family, context, make, layers=layers))
    return undo


SPEC = register(MethodSpec(
    name="agent",
    summary="AgentSD: ToMe token merging + agent attention (m agent tokens gather from all tokens, every token "
            "reads from the agents) in the full-resolution UNet self-attention; fast SD 1.x / 2.x, training-free",
    paper="Han et al., Agent Attention (ECCV 2024, arXiv 2312.08874); Bolya & Hoffman, ToMe for SD (2023)",
    families=("unet",),
    kind="training-free efficiency",
    config=AgentConfig,
    install=_install,
    context_parallel=(),  # UNets: diffusers has no context-parallel plan for them
    aliases=("agentsd",),
))
