"""The built-in workloads, one module per family: ``digits`` (digits-mlp), ``mnist1d`` (mnist1d-mlp,
mnist1d-cnn), ``stdlib_gpt`` (stdlib-gpt). Each factory is ``make(seed, *, size="cpu", depth=None,
width=None, device="cpu", ...) -> Workload``; ``size`` is "tiny" (tests), "cpu" (the default, minutes on
2 cores) or "gpu" (the same recipe sized for a GPU, refused on a CPU)."""

from __future__ import annotations

import importlib

# name -> (module, factory, description function)
_BUILTIN = {
    "digits-mlp": ("pyco.studies.workloads.digits", "make", "describe"),
    "mnist1d-mlp": ("pyco.studies.workloads.mnist1d", "make_mlp", "describe_mlp"),
    "mnist1d-cnn": ("pyco.studies.workloads.mnist1d", "make_cnn", "describe_cnn"),
    "stdlib-gpt": ("pyco.studies.workloads.stdlib_gpt", "make", "describe"),
    "two-moons": ("pyco.studies.workloads.two_moons", "make", "describe"),
}
DEFAULT = "digits-mlp"


def names() -> list[str]:
    return list(_BUILTIN)


def factory(name: str):
    """The factory function of the built-in workload ``name``."""
    module, make, _ = _BUILTIN[name]
    return getattr(importlib.import_module(module), make)


def describe(name: str) -> str:
    """One line: parameters at the CPU size, data, what it trains to in its default budget."""
    module, _, describe_fn = _BUILTIN[name]
    return getattr(importlib.import_module(module), describe_fn)()
