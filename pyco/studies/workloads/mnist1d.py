"""``mnist1d-mlp`` and ``mnist1d-cnn``: MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning"), ten
1D digit templates padded, scaled, translated, sheared and noised into 40-sample signals.

The data is generated here, offline, by the ``mnist1d`` package's ``make_dataset`` with its default
arguments: 5,000 signals, 4,000 train / 1,000 test, its fixed seed 42 (the data is the same whatever the
workload's seed). Nothing is downloaded: ``make_dataset`` only computes (the package's ``get_dataset``,
which may download, is never called), and numpy's and Python's global random states are put back after
it. The paper's anchors on this split: logistic regression ~32%, MLP ~68%, CNN ~94% test accuracy.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pyco.blocks import by_module
from pyco.studies.workload import Recipe, Workload, WorkloadError
from pyco.studies.workloads._common import (ClassificationEval, Shuffled, cross_entropy, he_init, human,
                                            layer_blocks, mlp, seeded, settings)

MLP_SIZES = {
    "tiny": dict(depth=1, width=16, batch=50, steps=20, about="~800 parameters"),
    "cpu": dict(depth=2, width=100, batch=100, steps=3000, about="~15k parameters"),
    "gpu": dict(depth=4, width=4096, batch=1000, steps=3000, about="~50M parameters"),
}
CNN_SIZES = {
    "tiny": dict(depth=1, width=4, batch=50, steps=20, about="~250 parameters"),
    "cpu": dict(depth=3, width=32, batch=100, steps=1500, about="~19k parameters"),
    "gpu": dict(depth=8, width=256, batch=500, steps=3000, about="~3.2M parameters"),
}
MLP_LR, CNN_LR = 1e-2, 3e-3
MLP_TRAINS_TO = "66.0% test accuracy (95% interval 63.5-68.5%, 3 seeds) in 3,000 Adam steps"
CNN_TRAINS_TO = "97.9% test accuracy (95% interval 94.2-101.7%, 3 seeds) in 1,500 Adam steps"
LENGTH, CLASSES = 40, 10


@functools.lru_cache(maxsize=1)
def generate() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D from ``mnist1d.data.make_dataset`` with its default arguments: (x, y, x_test, y_test) as
    numpy arrays, 4,000 and 1,000 signals of 40 samples. Deterministic; numpy's and Python's global random
    states are left as they were."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise WorkloadError(f"the MNIST-1D workloads need the mnist1d package ({exc}): pip install "
                            f"'pyco[studies]'") from None
    args = get_dataset_args()  # num_samples 5000, train_split 0.8: 4,000 train / 1,000 test
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def data(device) -> tuple[torch.Tensor, ...]:
    x, y, xt, yt = generate()
    as_x = lambda a: torch.tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64, device=device)  # noqa: E731
    return as_x(x), as_y(y), as_x(xt), as_y(yt)


# ---- the MLP --------------------------------------------------------------------------------------------

def make_mlp(seed: int, *, size: str = "cpu", depth: int | None = None, width: int | None = None,
             variant: str = "plain", activation: str = "relu", device="cpu") -> Workload:
    """An MLP (He initialisation) on the 40 samples; one block per layer (``layer0``...). Adam.
    variant: "plain", "batchnorm" or "residual"; activation: "relu" (the default), "gelu", "tanh"..."""
    s, device = settings("mnist1d-mlp", MLP_SIZES, size, device, depth=depth, width=width)
    x, y, xt, yt = data(device)
    with seeded(seed):
        model = he_init(mlp(LENGTH, s["width"], s["depth"], CLASSES, activation=activation, variant=variant)).to(device)
    return Workload(
        name="mnist1d-mlp", model=model, loss_fn=cross_entropy, train_batches=Shuffled(x, y, s["batch"], seed),
        eval_fn=ClassificationEval(xt, yt), blocks=layer_blocks(model),
        recipe=Recipe(optimizer="adam", lr=MLP_LR, steps=s["steps"]), chain_loss=F.cross_entropy,
        description=describe_mlp(s["depth"], s["width"], variant, activation,
                                 measured=size == "cpu" and depth is width is None and variant == "plain"
                                 and activation == "relu"),
        config={"size": size, "depth": s["depth"], "width": s["width"], "batch": s["batch"], "variant": variant,
                "activation": activation,
                "data": "MNIST-1D make_dataset defaults, 4000 train / 1000 test"},
    )


def describe_mlp(depth: int = MLP_SIZES["cpu"]["depth"], width: int = MLP_SIZES["cpu"]["width"],
                 variant: str = "plain", activation: str = "relu", measured: bool = True) -> str:
    n = sum(p.numel() for p in mlp(LENGTH, width, depth, CLASSES, variant=variant).parameters())
    kind = f"{ {'relu': 'ReLU', 'gelu': 'GELU'}.get(activation, activation)} MLP"
    line = (f"{human(n)} params; {depth}x{width} {kind}{'' if variant == 'plain' else f' ({variant})'} on MNIST-1D "
            f"(4,000 train / 1,000 test)")
    return f"{line}; {MLP_TRAINS_TO}" if measured else line


# ---- the CNN --------------------------------------------------------------------------------------------

class Signal(nn.Module):
    """[batch, 40] -> [batch, 1, 40]: the signal as one input channel."""

    def forward(self, x):
        return x.unsqueeze(1)


class ResidualConv(nn.Module):
    """relu(x + BN(conv(relu(BN(conv(x)))))): a residual block of two 3-tap convolutions with batch norm."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm1d(channels))

    def forward(self, x):
        return F.relu(x + self.body(x))


def cnn(channels: int, blocks: int) -> nn.Sequential:
    """Stem (5-tap conv, batch norm, ReLU), ``blocks`` residual blocks, global average pooling, linear head:
    an ``nn.Sequential`` (a chain)."""
    return nn.Sequential(
        Signal(), nn.Conv1d(1, channels, 5, padding=2, bias=False), nn.BatchNorm1d(channels), nn.ReLU(),
        *[ResidualConv(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(channels, CLASSES))


def make_cnn(seed: int, *, size: str = "cpu", depth: int | None = None, width: int | None = None,
             device="cpu") -> Workload:
    """The 1D residual CNN with batch norm (depth: residual blocks, width: channels; He initialisation);
    one block per module that owns parameters (each convolution, each batch norm, the head). Adam."""
    s, device = settings("mnist1d-cnn", CNN_SIZES, size, device, depth=depth, width=width)
    x, y, xt, yt = data(device)
    with seeded(seed):
        model = he_init(cnn(s["width"], s["depth"])).to(device)
    return Workload(
        name="mnist1d-cnn", model=model, loss_fn=cross_entropy, train_batches=Shuffled(x, y, s["batch"], seed),
        eval_fn=ClassificationEval(xt, yt), blocks=by_module(model),
        recipe=Recipe(optimizer="adam", lr=CNN_LR, steps=s["steps"]), chain_loss=F.cross_entropy,
        description=describe_cnn(s["depth"], s["width"], measured=size == "cpu" and depth is width is None),
        config={"size": size, "residual_blocks": s["depth"], "channels": s["width"], "batch": s["batch"],
                "data": "MNIST-1D make_dataset defaults, 4000 train / 1000 test"},
    )


def describe_cnn(depth: int = CNN_SIZES["cpu"]["depth"], width: int = CNN_SIZES["cpu"]["width"],
                 measured: bool = True) -> str:
    n = sum(p.numel() for p in cnn(width, depth).parameters())
    line = f"{human(n)} params; 1D residual CNN ({depth} blocks x {width} channels, batch norm) on MNIST-1D"
    return f"{line}; {CNN_TRAINS_TO}" if measured else line
