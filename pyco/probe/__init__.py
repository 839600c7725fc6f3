"""The exact probe: split a step's loss change into first-order, within-block, cross-block (co-adaptation)
and higher-order parts, from exact Hessian-vector products.

    report = pyco.probe.cross_terms(loss_fn, blocks, update)   # a given step Δ
    report = pyco.probe.record(optimizer, closure, blocks)     # the step an optimizer takes
    monitor = pyco.probe.Monitor(optimizer, blocks, every=100, out="runs/probe")  # a training run's log
    print(report.table()); report.plot("step.png"); report.to_dict()

``pyco.probe.reference`` holds the dense (full-Hessian) twin used by the tests.
"""

from pyco.probe import reference
from pyco.probe.cross_terms import block_dot, cross_terms
from pyco.probe.monitor import Monitor, read_log
from pyco.probe.record import record
from pyco.probe.report import CrossTerms

__all__ = ["CrossTerms", "Monitor", "block_dot", "cross_terms", "read_log", "record", "reference"]
