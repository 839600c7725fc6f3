"""``digits-mlp``: the tiny case. An MLP (He initialisation) on scikit-learn's 8×8 digits (1,797 images that
ship with scikit-learn: no download), standardised with the training split's statistics (a pixel that is
constant there is only centred); 1,348 train / 449 test, one fixed split whatever the seed. SGD with
momentum 0.9.

``init="torch"`` keeps the layers as ``nn.Linear`` builds them (uniform in ±1/√fan-in, weights and biases)
instead of He initialisation, and ``lr``/``momentum`` change the recipe: with ``init="torch", lr=0.1,
momentum=0`` and 150 steps it is the set-up of the first version of the orders study, whose gap-prediction
errors an outside review quoted."""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from pyco.studies.workload import Recipe, Workload, WorkloadError
from pyco.studies.workloads._common import (ClassificationEval, Shuffled, cross_entropy, he_init, human,
                                            layer_blocks, mlp, seeded, settings)

NAME = "digits-mlp"
SIZES = {
    "tiny": dict(depth=2, width=8, batch=32, steps=20, about="~700 parameters"),
    "cpu": dict(depth=3, width=32, batch=64, steps=300, about="~4.5k parameters"),
    "gpu": dict(depth=8, width=2048, batch=1024, steps=300, about="~29M parameters"),
}
LR, MOMENTUM = 0.05, 0.9
INITS = ("he", "torch")
TRAINS_TO = "96.2% test accuracy (95% interval 93.4-99.0%, 3 seeds) in 300 SGD steps"


@functools.lru_cache(maxsize=2)
def data(test_fraction: float = 0.25, split_seed: int = 0):
    """(x_train, y_train, x_test, y_test) as float32 CPU tensors, standardised with the training split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a pixel constant in training stays unscaled
    x = ((x - mean) / std).float()
    return x[train], y[train], x[test], y[test]


def make(seed: int, *, size: str = "cpu", depth: int | None = None, width: int | None = None,
         variant: str = "plain", activation: str = "relu", init: str = "he", lr: float = LR,
         momentum: float = MOMENTUM, device="cpu") -> Workload:
    """The digits MLP. variant: "plain", "batchnorm" or "residual"; one block per layer (``layer0``...).
    init: "he" (the default) or "torch" (``nn.Linear``'s own); lr, momentum: the recipe's SGD."""
    s, device = settings(NAME, SIZES, size, device, depth=depth, width=width)
    if init not in INITS:
        raise WorkloadError(f"workload {NAME!r}: init must be one of {INITS}, got {init!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise WorkloadError(f"workload {NAME!r}: momentum must be a number in [0, 1), got {momentum!r}")
    x_train, y_train, x_test, y_test = (t.to(device) for t in data())
    with seeded(seed):
        model = mlp(64, s["width"], s["depth"], 10, activation=activation, variant=variant)
        model = (he_init(model) if init == "he" else model).to(device)
    default = (size == "cpu" and depth is width is None and init == "he" and lr == LR and momentum == MOMENTUM)
    return Workload(
        name=NAME, model=model, loss_fn=cross_entropy,
        train_batches=Shuffled(x_train, y_train, s["batch"], seed),
        eval_fn=ClassificationEval(x_test, y_test), blocks=layer_blocks(model),
        recipe=Recipe(optimizer="sgd", lr=lr, momentum=float(momentum), steps=s["steps"]),
        chain_loss=F.cross_entropy,
        description=describe(s["depth"], s["width"], variant, measured=default, init=init),
        config={"size": size, "depth": s["depth"], "width": s["width"], "variant": variant, "activation": activation,
                "init": init,
                "batch": s["batch"], "data": "sklearn digits 8x8, 1348 train / 449 test"},
    )


def describe(depth: int = SIZES["cpu"]["depth"], width: int = SIZES["cpu"]["width"], variant: str = "plain",
             measured: bool = True, init: str = "he") -> str:
    """One line; ``measured``: with what the CPU size trains to (documented, 3 seeds)."""
    n = sum(p.numel() for p in mlp(64, width, depth, 10, variant=variant).parameters())
    kind = "ReLU MLP" if variant == "plain" else f"ReLU MLP ({variant})"
    kind += ", nn.Linear's own initialisation" if init == "torch" else ""
    line = f"{human(n)} params; {depth}x{width} {kind} on sklearn's 8x8 digits (1,348 train / 449 test)"
    return f"{line}; {TRAINS_TO}" if measured and variant == "plain" else line
