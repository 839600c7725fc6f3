"""Workload factories written as a user would write them, in a module of their own: the studies import them
by ``--workload user_workloads:make`` (this directory on ``sys.path``). ``make`` is a proper one; the others
each break the interface in one way, for the error tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pyco.studies import Recipe, Workload


class TwoTower(nn.Module):
    """Not a chain: two towers over the same input whose logits add, then a shared head."""

    def __init__(self, inputs: int = 6, width: int = 8, classes: int = 3):
        super().__init__()
        self.left = nn.Sequential(nn.Linear(inputs, width), nn.Tanh())
        self.right = nn.Sequential(nn.Linear(inputs, width), nn.Tanh())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.left(x) + self.right(x))


def data(n: int = 96, inputs: int = 6, classes: int = 3):
    gen = torch.Generator().manual_seed(1234)  # the data stays the same whatever the seed
    x = torch.randn(n, inputs, generator=gen)
    w = torch.randn(inputs, classes, generator=gen)
    return x, (x @ w).argmax(1)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def make(seed: int) -> Workload:
    x, y = data()
    torch.manual_seed(seed)
    model = TwoTower()
    order = torch.randperm(64, generator=torch.Generator().manual_seed(seed))
    batches = [(x[order[i:i + 16]], y[order[i:i + 16]]) for i in range(0, 64, 16)]  # a finite list: it cycles

    def evaluate(m):
        with torch.no_grad():
            logits = m(x[64:])
        return {"loss": F.cross_entropy(logits, y[64:]).item(), "accuracy": (logits.argmax(1) == y[64:]).float().mean().item()}

    return Workload(name="two-tower", model=model, loss_fn=loss_fn, train_batches=batches, eval_fn=evaluate,
                    recipe=Recipe(optimizer="sgd", lr=0.1, momentum=0.5, steps=8))


def make_sized(seed: int, width: int = 8) -> Workload:
    """Takes an option of its own: ``--width`` reaches it."""
    w = make(seed)
    torch.manual_seed(seed)
    model = TwoTower(width=width)
    return Workload(name=f"two-tower-{width}", model=model, loss_fn=loss_fn, train_batches=w.train_batches,
                    eval_fn=w.eval_fn, recipe=w.recipe)


def make_dict(seed: int):
    return {"model": TwoTower(), "loss_fn": loss_fn}


def make_vector_loss(seed: int) -> Workload:
    w = make(seed)
    w.loss_fn = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], reduction="none")
    return w


def make_missing_blocks(seed: int) -> Workload:
    model = TwoTower()
    x, y = data()
    blocks = [("left", list(model.left.parameters())), ("head", list(model.head.parameters()))]  # no "right"
    return Workload(name="two-tower-missing", model=model, loss_fn=loss_fn, train_batches=[(x, y)], blocks=blocks)


NOT_A_FUNCTION = 3
