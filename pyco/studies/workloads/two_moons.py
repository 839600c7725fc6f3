"""``two-moons``: the two-moons task of Pezeshki et al. 2021, "Gradient Starvation: A Learning Proclivity in
Neural Networks" (NeurIPS): two interleaved half-moons, folded so that the classes are linearly separable
along the first coordinate with a gap of ``2·delta``, while the second coordinate carries the moons' curved
structure. A ReLU network with one hidden layer of 500 units and one output logit, trained full batch with
the logistic loss (binary cross-entropy) by gradient descent with momentum.

The values are the paper's, from its reference code for the two-moons figures (1 and 3): scikit-learn's
``make_moons`` with 300 samples and noise 0.1, the fold with Δ = +0.1 (a shift of 0.5 along the first axis and
of ±0.3 along the second, centring, the fold, the gap, then the axes swapped), 500 hidden units, PyTorch's
default initialisation, SGD with lr 0.01 and momentum 0.9 on the full batch, no weight decay, 1,000 epochs
(its Figure 1; its longer runs train 10,000, as the starvation study's full configuration does). One
departure: the paper draws new moons for every seed, here the data is generated once, offline, and is the
same whatever the seed: the training set is ``make_moons(random_state=0)`` (300 points, the paper's seed-0
set), the test set ``make_moons(n_samples=1000, random_state=1)`` put through the same transformation
(centred with the training set's mean); ``make_moons`` draws from a generator of its own, numpy's global
random state is not touched. The seed moves the initialisation (and the order of the points inside the one
full batch, which does not change the gradient).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pyco.studies.workload import Recipe, Workload, WorkloadError
from pyco.studies.workloads._common import Shuffled, human, layer_blocks, seeded, settings

NAME = "two-moons"
SIZES = {
    "tiny": dict(depth=1, width=100, steps=300, about="~400 parameters"),
    "cpu": dict(depth=1, width=500, steps=1000, about="~2k parameters"),
    "gpu": dict(depth=1, width=5000, steps=10000, about="~20k parameters"),
}
N_TRAIN, N_TEST, NOISE, DELTA = 300, 1000, 0.1, 0.1
LR, MOMENTUM = 1e-2, 0.9
TRAINS_TO = "100.0% test accuracy on every one of 3 seeds in 1,000 full-batch SGD steps"


def fold(x: np.ndarray, y: np.ndarray, delta: float, center: float | None = None):
    """The paper's transformation of ``make_moons`` points: the classes end up on either side of the line
    ``x0 = 0``, at least ``delta`` from it. ``center``: the second coordinate's mean to remove (default this
    sample's). Returns (x, center)."""
    sign = 2.0 * y - 1.0
    x = x - np.stack([np.full_like(sign, 0.5), 0.3 * sign], 1)
    center = float(x[:, 1].mean()) if center is None else center
    x[:, 1] -= center
    x[:, 1] *= np.sign(-x[:, 1] * sign)
    x[:, 1] -= sign * delta
    return x[:, ::-1].copy(), center


@functools.lru_cache(maxsize=4)
def data(delta: float = DELTA):
    """(x_train, y_train, x_test, y_test): float32 inputs of shape (n, 2), int64 labels 0/1 (CPU tensors)."""
    try:
        from sklearn.datasets import make_moons
    except ImportError as exc:
        raise WorkloadError(f"the two-moons workload needs scikit-learn ({exc}): pip install 'pyco[studies]'") from None
    x, y = make_moons(n_samples=N_TRAIN, noise=NOISE, random_state=0)
    x, center = fold(x, y, delta)
    xt, yt = make_moons(n_samples=N_TEST, noise=NOISE, random_state=1)
    xt, _ = fold(xt, yt, delta, center)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x), as_y(y), as_x(xt), as_y(yt)


def net(width: int, depth: int) -> nn.Sequential:
    """``depth`` hidden ReLU layers of ``width`` units and one output logit, one child per layer."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Sequential(nn.Linear(2 if i == 0 else width, width), nn.ReLU()))
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def logistic(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The logistic loss of one logit per example, labels 0/1: mean log(1 + exp(-(2y-1)·output))."""
    return F.binary_cross_entropy_with_logits(output.reshape(-1), y.to(output.dtype))


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return logistic(model(x), y)


class BinaryEval:
    """``eval_fn``: the logistic loss and the accuracy (logit > 0 predicts class 1) on held-out points."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(self.x).reshape(-1)
        finally:
            model.train(was_training)
        return {"loss": logistic(out, self.y).item(), "accuracy": ((out > 0).long() == self.y).float().mean().item()}


def make(seed: int, *, size: str = "cpu", depth: int | None = None, width: int | None = None,
         delta: float = DELTA, device="cpu") -> Workload:
    """The two-moons network; ``delta``: the half-gap between the classes (the paper's Δ, +0.1; a negative
    value makes them overlap). One block per layer (``layer0``, ...)."""
    s, device = settings(NAME, SIZES, size, device, depth=depth, width=width)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise WorkloadError(f"workload {NAME!r}: delta must be a number, got {delta!r}")
    x_train, y_train, x_test, y_test = (t.to(device) for t in data(float(delta)))
    with seeded(seed):  # PyTorch's default initialisation, as in the paper
        model = net(s["width"], s["depth"]).to(device)
    return Workload(
        name=NAME, model=model, loss_fn=loss_fn,
        train_batches=Shuffled(x_train, y_train, x_train.shape[0], seed),  # the full batch
        eval_fn=BinaryEval(x_test, y_test), blocks=layer_blocks(model),
        recipe=Recipe(optimizer="sgd", lr=LR, momentum=MOMENTUM, steps=s["steps"]),
        chain_loss=logistic,
        description=describe(s["depth"], s["width"], measured=size == "cpu" and depth is width is None),
        config={"size": size, "depth": s["depth"], "width": s["width"], "delta": float(delta), "batch": N_TRAIN,
                "data": f"make_moons, noise {NOISE}, folded with delta {float(delta)}: {N_TRAIN} train "
                        f"(random_state 0) / {N_TEST} test (random_state 1)"},
    )


def describe(depth: int = SIZES["cpu"]["depth"], width: int = SIZES["cpu"]["width"], measured: bool = True) -> str:
    """One line; ``measured``: with what the CPU size trains to."""
    n = sum(p.numel() for p in net(width, depth).parameters())
    line = (f"{human(n)} params; {depth}x{width} ReLU MLP, one logit, on the folded two moons "
            f"({N_TRAIN} train / {N_TEST} test, full batch)")
    return f"{line}; {TRAINS_TO}" if measured else f"{line}; reports test accuracy"
