"""What every study shares: the digits data, the model families, run directories and output files.

A study is a module with ``NAME``, ``QUESTION`` (the seed it answers), ``add_arguments(parser)`` for its
own options and ``run(args, out: RunDir) -> dict`` that measures, writes its tables and figures through
``out`` and returns the results (written to ``results.json`` by the command line).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


# ---- data ---------------------------------------------------------------------------------------------

@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def features(self) -> int:
        return self.x_train.shape[1]

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1

    def batches(self, batch_size: int, generator: torch.Generator):
        """An endless stream of shuffled training batches (epoch after epoch)."""
        n = self.x_train.shape[0]
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = order[start:start + batch_size]
                yield self.x_train[idx], self.y_train[idx]


def digits(device: torch.device | str = "cpu", dtype=torch.float32, test_fraction: float = 0.25, seed: int = 0) -> Data:
    """scikit-learn's 8×8 digits (1797 images, ships with the package: no download), standardized with
    the training split's statistics, split deterministically by ``seed``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return Data(x[train].to(device, dtype), y[train].to(device), x[test].to(device, dtype), y[test].to(device))


# ---- models -------------------------------------------------------------------------------------------

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
VARIANTS = ("plain", "batchnorm", "residual")


class Residual(nn.Module):
    """x + f(x): the skip connection of a residual MLP block."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def mlp(inputs: int, width: int, depth: int, outputs: int, *, activation: str = "relu",
        variant: str = "plain") -> nn.Sequential:
    """An MLP as an ``nn.Sequential`` with one child per layer (so ``by_module`` gives one block per
    layer): ``depth`` hidden layers of ``width`` units, then a linear head.

    variant: "plain" (Linear, act), "batchnorm" (Linear, BatchNorm1d, act), "residual" (first layer
    Linear+act, then x + act(Linear(x)) blocks)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    for i in range(depth):
        fan_in = inputs if i == 0 else width
        if variant == "residual" and i > 0:
            layers.append(Residual(nn.Sequential(nn.Linear(fan_in, width), act())))
        elif variant == "batchnorm":
            layers.append(nn.Sequential(nn.Linear(fan_in, width), nn.BatchNorm1d(width), act()))
        else:
            layers.append(nn.Sequential(nn.Linear(fan_in, width), act()))
    layers.append(nn.Linear(width if depth > 0 else inputs, outputs))
    return nn.Sequential(*layers)


def layer_blocks(model: nn.Sequential):
    """One block per child of a Sequential (a whole layer, batch norm included), named ``layer{i}``."""
    from pyco.blocks import Blocks

    return Blocks([(f"layer{i}", [p for p in child.parameters() if p.requires_grad])
                   for i, child in enumerate(model) if any(True for _ in child.parameters())])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


# ---- outputs ------------------------------------------------------------------------------------------

class RunDir:
    """A study's output directory: CSV tables, PNG figures, report.md, results.json."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []

    def file(self, name: str) -> Path:
        self.files.append(name)
        return self.path / name

    def csv(self, name: str, rows: Sequence[dict]) -> Path:
        path = self.file(name)
        fields: list[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return path

    def json(self, name: str, data) -> Path:
        """Writes ``data`` as JSON, atomically: a run interrupted while writing leaves the previous file whole."""
        path = self.file(name)
        partial = path.with_name(path.name + ".tmp")
        with open(partial, "w") as f:
            json.dump(data, f, indent=2, default=_jsonable)
            f.write("\n")
        os.replace(partial, path)
        return path

    def text(self, name: str, text: str) -> Path:
        path = self.file(name)
        path.write_text(text)
        return path

    def figure(self, name: str, fig) -> Path:
        path = self.file(name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the studies draw figures with matplotlib: pip install 'pyco[studies]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def progress(iterable: Iterable, *, desc: str, total: int | None = None, enabled: bool = True):
    """tqdm progress bar on stderr (off when ``enabled`` is False or tqdm is missing)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def fmt(x: float, digits: int = 3) -> str:
    """A number for a report sentence: 3 significant digits, scientific when small or large."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"
