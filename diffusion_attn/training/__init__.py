"""Training the shapes-world models (``diffusion-attn train``): see :mod:`.loop` and docs/training.md."""

from .data import HELD_OUT_SEED, shapes_pool
from .loop import DEFAULTS, TARGETS, TrainConfig, train

__all__ = ["DEFAULTS", "HELD_OUT_SEED", "TARGETS", "TrainConfig", "shapes_pool", "train"]
