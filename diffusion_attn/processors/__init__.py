"""The method processors. Importing this package registers the built-in methods."""

from .agent import AgentProcessor
from .base import PatternProcessor
from .clear import CLEARProcessor
from .freeswim import FreeSwimProcessor
from .gna import GNAProcessor
from .hidiffusion import MSWMSAProcessor
from .radial import RadialProcessor
from .trainable import TrainableProcessor

__all__ = ["PatternProcessor", "GNAProcessor", "MSWMSAProcessor", "RadialProcessor", "TrainableProcessor"]
