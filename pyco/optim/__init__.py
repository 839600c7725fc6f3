"""Drop-in replacements for torch.optim's SGD, Adam and AdamW on pyco's fused kernels, with per-block
statistics of every step in ``optimizer.last_stats``."""

from pyco.optim.adam import Adam, AdamW
from pyco.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]

