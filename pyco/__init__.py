"""pyco: exact, measurable, swappable update orders for neural networks.

Fused optimizers that are drop-in replacements for torch.optim's and report per-block statistics of
every step (``pyco.optim``).
"""

__version__ = "0.1.0"

from pyco._ext import info
from pyco import optim
from pyco.stats import BlockStats

__all__ = ["BlockStats", "info", "optim", "__version__"]
