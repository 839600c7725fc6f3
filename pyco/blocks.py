"""Partitions of an optimizer's parameters into named blocks (the unit of pyco's statistics)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

BlockSpec = Mapping[str, Iterable[torch.Tensor]] | Sequence[tuple[str, Iterable[torch.Tensor]]]


def describe_param(group_index: int, param_index: int, p: torch.Tensor) -> str:
    return f"param {param_index} of group {group_index} (shape {list(p.shape)}, {p.dtype})"


def default_names(param_groups: Sequence[dict]) -> list[str]:
    """One block per param group, named by the group's "name" entry or ``group{i}``."""
    return [str(g.get("name", f"group{i}")) for i, g in enumerate(param_groups)]


def resolve(param_groups: Sequence[dict], blocks: BlockSpec | None) -> tuple[tuple[str, ...], dict[int, int]]:
    """Returns the block names and a map id(param) -> block index covering every parameter exactly once.

    ``blocks=None`` gives one block per param group. Otherwise ``blocks`` maps names to tensors (a dict, or
    a list of (name, tensors) pairs); every parameter of the optimizer must be in exactly one block and
    every tensor named must be one of the optimizer's parameters.
    """
    if blocks is None:
        names = default_names(param_groups)
        if len(set(names)) != len(names):
            raise ValueError(f"param group names must be unique to serve as block names, got {names}")
        return tuple(names), {id(p): gi for gi, g in enumerate(param_groups) for p in g["params"]}

    items = list(blocks.items()) if isinstance(blocks, Mapping) else list(blocks)
    owners: dict[int, str] = {}
    index: dict[int, int] = {}
    where = {id(p): (gi, pi, p) for gi, g in enumerate(param_groups) for pi, p in enumerate(g["params"])}
    names: list[str] = []
    for bi, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"blocks must map names (str) to tensors; entry {bi} is {type(item).__name__}")
        name, tensors = item
        if name in names:
            raise ValueError(f"block name {name!r} appears twice")
        names.append(name)
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        for p in tensors:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"block {name!r} holds a {type(p).__name__}, expected tensors (parameters)")
            if id(p) not in where:
                raise ValueError(
                    f"block {name!r} holds a tensor of shape {list(p.shape)} that is not a parameter of this "
                    "optimizer; blocks must be built from the same parameters the optimizer was given"
                )
            if id(p) in owners:
                gi, pi, _ = where[id(p)]
                raise ValueError(
                    f"blocks {owners[id(p)]!r} and {name!r} overlap: both hold {describe_param(gi, pi, p)}"
                )
            owners[id(p)] = name
            index[id(p)] = bi
    missing = [describe_param(gi, pi, p) for key, (gi, pi, p) in where.items() if key not in index]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{', '.join(missing[:3])}{more} in no block: every parameter needs exactly one block")
    return tuple(names), index
