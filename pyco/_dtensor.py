"""DTensor parameters (FSDP2's ``fully_shard``, or any DTensor sharded over a device mesh).

pyco's optimizers update the local shards (``to_local()``) in one launch, with state tensors that are
DTensors sharded like their parameters (torch.optim's layout under FSDP2, so distributed checkpoints load
either way). Whatever depends on the whole tensor is agreed over the mesh: the per-block statistics (all
four are sums: Σg², Σu², Σg·u, Σθ², all-reduced once, k×4 float64 numbers) and the decisions to skip
(``nonfinite="skip"``/``"skip-block"``, GradScaler's ``found_inf``), so that every rank holds the same
numbers and takes the same step.

Each element must be held by exactly one rank of the mesh dimensions summed over: the placements may be
``Shard`` (summed over) and ``Replicate`` (identical copies: not summed), on one mesh for every parameter,
with the same mesh dimensions sharded for every parameter. Anything else (``Partial`` placements, several
meshes, DTensor and plain parameters in one optimizer) is refused with ``NotImplementedError``.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["Sharding", "dtensor_type", "is_dtensor", "sharding_of", "refuse"]


def dtensor_type():
    """torch's DTensor class, or None when torch.distributed.tensor was never imported (no DTensor exists then:
    nothing is imported here for processes that do not use it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def first_dtensor(tensors):
    """The first DTensor among ``tensors``, or None."""
    cls = dtensor_type()
    if cls is None:
        return None
    return next((t for t in tensors if isinstance(t, cls)), None)


def refuse(what: str, fix: str, tensors) -> None:
    """Raises NotImplementedError when ``tensors`` hold a DTensor: ``what`` does not support them."""
    t = first_dtensor(tensors)
    if t is not None:
        raise NotImplementedError(
            f"{what} does not support DTensor parameters (FSDP2's fully_shard; found one of shape "
            f"{list(t.shape)} with placements {tuple(t.placements)}); {fix}")


class Sharding:
    """How an optimizer's DTensor parameters lie on their mesh: the process groups a sum over every element
    is all-reduced over (one per sharded mesh dimension; one for FSDP2)."""

    def __init__(self, mesh, shard_dims: tuple[int, ...]):
        self.mesh = mesh
        self.shard_dims = shard_dims
        self.groups = [mesh.get_group(d) for d in shard_dims]

    def _all_reduce(self, t: torch.Tensor, op) -> None:
        import torch.distributed as dist

        if not self.groups:
            return
        on = t if t.device.type == self.mesh.device_type else t.to(self.mesh.device_type)
        for group in self.groups:
            dist.all_reduce(on, op=op, group=group)
        if on is not t:
            t.copy_(on)

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """Sums ``values`` (the k×4 statistics) over the mesh in place: one all-reduce (per sharded mesh
        dimension); every rank gets the same numbers."""
        import torch.distributed as dist

        self._all_reduce(values, dist.ReduceOp.SUM)
        return values

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """``flags`` (a tensor of 0/1 or counts) with the maximum over the mesh, in place."""
        import torch.distributed as dist

        self._all_reduce(flags, dist.ReduceOp.MAX)
        return flags

    def any_true(self, flag: bool) -> bool:
        """True when ``flag`` is True on any rank of the mesh."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        return bool(self.any(t)[0] != 0)


def _spec(t) -> tuple:
    return t.device_mesh, tuple(t.placements)


def sharding_of(owner: str, params, describe) -> Sharding | None:
    """The Sharding of an optimizer's parameters (every parameter it holds, ``params``: [(where, tensor)]),
    None when none is a DTensor. Raises NotImplementedError for what pyco does not support."""
    cls = dtensor_type()
    if cls is None:
        return None
    first = next(((where, p) for where, p in params if isinstance(p, cls)), None)
    if first is None:
        return None
    from torch.distributed.tensor import Replicate, Shard

    where0, p0 = first
    mesh = p0.device_mesh
    shard_dims = None
    for where, p in params:
        if not isinstance(p, cls):
            raise NotImplementedError(
                f"{owner}: {describe(where, p)} is a plain tensor, but {describe(where0, p0)} is a DTensor; pyco "
                "updates DTensor parameters (FSDP2) only when every parameter of the optimizer is one: shard every "
                "module that owns parameters (fully_shard the root too), or give the plain parameters an "
                "optimizer of their own")
        if p.device_mesh != mesh:
            raise NotImplementedError(
                f"{owner}: {describe(where, p)} lies on another device mesh than {describe(where0, p0)}; pyco "
                "supports DTensor parameters on one mesh per optimizer: use one optimizer per mesh")
        dims = []
        for d, placement in enumerate(p.placements):
            if isinstance(placement, Shard):
                dims.append(d)
            elif not isinstance(placement, Replicate):
                raise NotImplementedError(
                    f"{owner}: {describe(where, p)} has placement {type(placement).__name__} ({placement}) on mesh "
                    f"dimension {d}; pyco updates DTensor parameters that are Shard or Replicate on every mesh "
                    "dimension")
        dims = tuple(dims)
        if shard_dims is None:
            shard_dims = dims
        elif dims != shard_dims:
            raise NotImplementedError(
                f"{owner}: {describe(where, p)} is sharded over mesh dimensions {list(dims)}, "
                f"{describe(where0, p0)} over {list(shard_dims)}; pyco's statistics need the same sharded "
                "mesh dimensions for every parameter of an optimizer: use one optimizer per layout")
    return Sharding(mesh, shard_dims)


def check_grad(owner: str, where: str, p, g) -> None:
    """A DTensor parameter's gradient must be a DTensor on the same mesh with the same placements."""
    if not is_dtensor(g):
        raise ValueError(f"{owner}: {where} is a DTensor but its gradient is a plain tensor "
                         f"({g.dtype}, shape {list(g.shape)}); it must be a DTensor placed like the parameter")
    if _spec(g) != _spec(p):
        raise ValueError(f"{owner}: {where} is placed {tuple(p.placements)}, its gradient "
                         f"{tuple(g.placements)}; they must be placed alike (redistribute the gradient)")


def local_state(owner: str, where: str, name: str, p, t):
    """The local shard of state tensor ``t`` of DTensor parameter ``p``, after checking that it is a DTensor
    placed like ``p`` (RuntimeError otherwise, as for any state tensor that does not fit)."""
    if not is_dtensor(t):
        raise RuntimeError(
            f"{owner}: {where}: state '{name}' is a plain tensor, but the parameter is a DTensor placed "
            f"{tuple(p.placements)}; the state must be sharded like its parameter. Load optimizer state of a "
            "sharded model with torch.distributed.checkpoint (set_optimizer_state_dict), or clear the entry "
            "(`optimizer.state[p].clear()`) to start this parameter afresh")
    if _spec(t) != _spec(p):
        raise RuntimeError(
            f"{owner}: {where}: state '{name}' is placed {tuple(t.placements)} on {t.device_mesh}, the parameter "
            f"{tuple(p.placements)} on {p.device_mesh}; the state must be sharded like its parameter")
    return t.to_local()
