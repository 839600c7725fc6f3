"""pyco: exact, measurable, swappable update orders for neural networks.

Fused optimizers that are drop-in replacements for torch.optim's and report per-block statistics of
every step (``pyco.optim``).
"""

__version__ = "0.1.0"

from pyco._ext import info
from pyco import blocks, optim, orders
from pyco import probe
from pyco.orders import BlockCoordinate, ChainGaussSeidel, Coupled, GaussSeidel
from pyco.stats import BlockStats

__all__ = ["BlockCoordinate", "BlockStats", "ChainGaussSeidel", "Coupled", "GaussSeidel", "blocks", "info", "optim", "orders",
           "probe", "__version__"]
