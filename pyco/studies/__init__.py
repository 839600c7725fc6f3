"""The studies: each answers one of the questions pyco exists for with measurements, tables, figures and a
report whose sentences are generated from the measured numbers.

Each study module defines ``NAME``, ``QUESTION``, ``add_arguments(parser)`` and ``run(args, out)``; see
``pyco/studies/_common.py``. ``pyco study --list`` shows them.
"""

from __future__ import annotations

import importlib

# name -> module, in the order the seeds ask their questions
_MODULES = {
    "coadaptation": "pyco.studies.coadaptation",
    "orders": "pyco.studies.orders",
    "step-size": "pyco.studies.step_size",
    "feature-drift": "pyco.studies.feature_drift",
    "dosage": "pyco.studies.dosage",
}


def names() -> list[str]:
    return list(_MODULES)


def load(name: str):
    """The study module called ``name`` (ValueError naming the known studies otherwise)."""
    if name not in _MODULES:
        raise ValueError(f"unknown study {name!r}; known studies: {', '.join(_MODULES) or 'none'}")
    return importlib.import_module(_MODULES[name])
