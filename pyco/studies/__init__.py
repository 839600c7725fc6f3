"""The studies: each answers one of the questions pyco exists for with measurements, tables, figures and a
report whose sentences are generated from the measured numbers, on a workload of your choice.

Every study consumes a :class:`Workload` (model, training batches, loss, held-out metrics, blocks) through
a factory ``make(seed) -> Workload``; the built-in workloads are in :mod:`pyco.studies.workloads`. Each
study module defines ``NAME``, ``QUESTION``, ``OPTIONS`` and ``run(workload_factory, **options) -> dict``
(see ``pyco/studies/_common.py``)::

    from pyco import studies
    results = studies.load("coadaptation").run("mnist1d-cnn", quick=True)        # a built-in workload
    results = studies.load("orders").run(studies.load_workload("mymodels:make"))  # your own factory

``pyco study --list`` shows the studies and the built-in workloads.
"""

from __future__ import annotations

import importlib

from pyco.studies.workload import Recipe, Workload, WorkloadError, WorkloadFactory
from pyco.studies.workload import load as load_workload

__all__ = ["Recipe", "Workload", "WorkloadError", "WorkloadFactory", "load", "load_workload", "names"]

# name -> module, in the order the seeds ask their questions
_MODULES = {
    "coadaptation": "pyco.studies.coadaptation",
    "orders": "pyco.studies.orders",
    "communication": "pyco.studies.communication",
    "step-size": "pyco.studies.step_size",
    "feature-drift": "pyco.studies.feature_drift",
    "dosage": "pyco.studies.dosage",
    "starvation": "pyco.studies.starvation",
    "edge-of-stability": "pyco.studies.edge_of_stability",
}


def names() -> list[str]:
    return list(_MODULES)


def load(name: str):
    """The study module called ``name`` (ValueError naming the known studies otherwise)."""
    if name not in _MODULES:
        raise ValueError(f"unknown study {name!r}; known studies: {', '.join(_MODULES) or 'none'}")
    return importlib.import_module(_MODULES[name])
