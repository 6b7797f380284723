"""Attention patterns: who may see whom, as pure functions of a token grid and the method's parameters."""

from .base import AxisWindows, BlockPattern, BoxPattern, Bucket, Schedule
from .neighborhood import neighborhood_pattern
from .radial import radial_block_mask, radial_pattern
from .shifted_window import shifted_window_pattern

__all__ = [
    "AxisWindows",
    "BlockPattern",
    "BoxPattern",
    "Bucket",
    "Schedule",
    "neighborhood_pattern",
    "radial_block_mask",
    "radial_pattern",
    "shifted_window_pattern",
]
