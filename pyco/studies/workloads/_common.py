"""What the built-in workloads share: sizes, seeded initialisation, shuffled batches, classification metrics."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F

from pyco.studies.workload import WorkloadError

SIZES = ("tiny", "cpu", "gpu")


def settings(name: str, sizes: dict, size: str, device, **overrides) -> tuple[dict, torch.device]:
    """The settings of ``size`` with the given overrides (None: keep), and the device, checked: the GPU size
    is refused on a CPU."""
    if size not in sizes:
        raise WorkloadError(f"workload {name!r}: size must be one of {tuple(sizes)}, got {size!r}")
    device = torch.device(device)
    if size == "gpu" and device.type != "cuda":
        raise WorkloadError(f"workload {name!r}: size 'gpu' ({sizes['gpu']['about']}) is sized for a GPU and is "
                            f"refused on {device.type}; run it with --device cuda on a machine with one, or use "
                            f"size 'cpu'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WorkloadError(f"workload {name!r}: device {device} requested but no CUDA device is available")
    out = dict(sizes[size])
    for key, value in overrides.items():
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkloadError(f"workload {name!r}: {key} must be an int >= 1, got {value!r}")
            out[key] = value
    return out, device


@contextlib.contextmanager
def seeded(seed: int):
    """torch's CPU random state set to ``seed`` inside, and put back as it was on exit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal initialisation for every Linear and Conv layer (fan-in, ReLU gain), zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


class Shuffled:
    """Training batches ``(x, y)``: each pass over it is one epoch in a fresh order drawn from its own
    generator (seeded), full batches only. Re-iterable: a study that needs more batches iterates it again."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        if batch_size > x.shape[0]:
            raise WorkloadError(f"batch size {batch_size} exceeds the {x.shape[0]} training examples")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(self.x.shape[0], generator=self.generator).to(self.x.device)
        for start in range(0, self.x.shape[0] - self.batch_size + 1, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return self.x.shape[0] // self.batch_size


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


class ClassificationEval:
    """``eval_fn``: mean cross-entropy and accuracy on held-out (x, y), in eval mode, without gradients."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024):
        self.x, self.y, self.chunk = x, y, chunk

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss, correct = 0.0, 0
        try:
            with torch.no_grad():
                for start in range(0, self.x.shape[0], self.chunk):
                    x, y = self.x[start:start + self.chunk], self.y[start:start + self.chunk]
                    logits = model(x)
                    loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
                    correct += int((logits.argmax(1) == y).sum())
        finally:
            model.train(was_training)
        n = self.x.shape[0]
        return {"loss": loss / n, "accuracy": correct / n}


def human(n: int) -> str:
    """A parameter count for a description line: 2.41k, 1.85M."""
    if n < 1000:
        return str(n)
    exp = min(int(math.log10(n)) // 3, 3)
    return f"{n / 10 ** (3 * exp):.3g}{'kMG'[exp - 1]}"


# ---- MLPs ------------------------------------------------------------------------------------------------

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
VARIANTS = ("plain", "batchnorm", "residual")


class Residual(nn.Module):
    """x + f(x): the skip connection of a residual block."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def mlp(inputs: int, width: int, depth: int, outputs: int, *, activation: str = "relu",
        variant: str = "plain") -> nn.Sequential:
    """An MLP as an ``nn.Sequential`` with one child per layer: ``depth`` hidden layers of ``width`` units,
    then a linear head. variant: "plain" (Linear, act), "batchnorm" (Linear, BatchNorm1d, act), "residual"
    (first layer Linear+act, then x + act(Linear(x)) blocks)."""
    if variant not in VARIANTS:
        raise WorkloadError(f"unknown MLP variant {variant!r}; expected one of {VARIANTS}")
    if activation not in ACTIVATIONS:
        raise WorkloadError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
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
    """One block per child of a Sequential that has parameters (a whole layer, batch norm included), named
    ``layer{i}`` in order."""
    from pyco.blocks import Blocks

    children = [child for child in model if any(p.requires_grad for p in child.parameters())]
    return Blocks([(f"layer{i}", [p for p in child.parameters() if p.requires_grad])
                   for i, child in enumerate(children)],
                  {id(p): n for n, p in model.named_parameters()}, model)
