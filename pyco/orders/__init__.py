"""Update orders around any torch optimizer: exact Gauss–Seidel sweeps, block-coordinate steps
and coupled steps (each block's share of the proposal chosen from the step's exact quadratic model).

    opt = pyco.GaussSeidel(inner, pyco.blocks.by_module(model), sweep="backward")    # step(closure)
    opt = pyco.ChainGaussSeidel(inner, sequential_model, loss_fn)                   # step(input, target)
    opt = pyco.BlockCoordinate(inner, pyco.blocks.by_module(model), schedule="cyclic", every=10)
    opt = pyco.Coupled(inner, pyco.blocks.by_module(model), trust=2.0)                # step(closure)

Each wrapper behaves as the inner optimizer (param groups, state, lr schedulers, state_dict with the order's
own state added) and moves only whole blocks; "same batch" semantics are exact (see pyco.GaussSeidel).
"""

from pyco.orders.block_coordinate import STATE_POLICIES, BlockCoordinate
from pyco.orders.chain import ChainGaussSeidel
from pyco.orders.coupled import Coupled
from pyco.orders.gauss_seidel import SWEEPS, GaussSeidel
from pyco.orders.schedules import SCHEDULES

__all__ = ["BlockCoordinate", "ChainGaussSeidel", "Coupled", "GaussSeidel", "SCHEDULES", "STATE_POLICIES", "SWEEPS"]
