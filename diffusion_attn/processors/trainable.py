"""Processors that own parameters (CLEAR's distilled weights and ``spatial_weight``, VMoBA, PT-DiT,
LaMamba): a :class:`TrainableProcessor` is a ``torch.nn.Module`` *and* a pattern processor.

diffusers registers an ``nn.Module`` processor as the ``processor`` submodule of its attention module
(as it does for IP-Adapter's processors), so the parameters travel with the model: ``model.to(...)``,
``model.parameters()``, ``model.state_dict()`` (keys ``<attention module>.processor.<name>``),
``save_pretrained`` and safetensors all see them, and an optimizer over ``model.parameters()`` trains
them. ``remove()`` re-installs the original (plain) processors, which takes the submodules away again:
the model's ``state_dict`` keys and values are exactly what they were before ``apply``.

A subclass calls ``super().__init__(...)`` with the pattern processor's keywords, then creates its
parameters; ``forward`` is the processor call, so module hooks (``register_forward_hook``) see it.
"""

from __future__ import annotations

import torch

from .base import PatternProcessor

__all__ = ["TrainableProcessor"]


class TrainableProcessor(torch.nn.Module, PatternProcessor):
    """Base class of processors with parameters (see the module docstring)."""

    def __init__(self, **processor_kwargs):
        torch.nn.Module.__init__(self)
        PatternProcessor.__init__(self, **processor_kwargs)

    def forward(self, *args, **kwargs):
        return PatternProcessor.__call__(self, *args, **kwargs)

    __call__ = torch.nn.Module.__call__

    def __repr__(self) -> str:  # nn.Module's repr lists the parameters; keep the placement visible too
        return torch.nn.Module.__repr__(self)
