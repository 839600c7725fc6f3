"""What every study shares: the workload it runs on, its options, run directories and output files.

A study is a module with ``NAME``, ``QUESTION`` (the seed it answers), ``OPTIONS`` (its own options and
their defaults) and ``run(workload_factory, **options) -> dict``: it builds its workloads with
``workload_factory(seed)`` (a :class:`~pyco.studies.Workload` factory, or a SPEC naming one), measures,
writes its tables, figures and report through ``out`` when given one, and returns the results, whose
``config`` names the workload. The command line calls ``run`` and writes the results to ``results.json``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from pyco.studies.workload import Workload, WorkloadFactory, load

COMMON = ("steps", "lrs", "seed", "seeds", "quick", "full", "out", "show_progress")
QUICK_SEEDS, FULL_SEEDS = 3, 5


# ---- workloads and options ------------------------------------------------------------------------------

def factory_of(workload_factory) -> WorkloadFactory:
    """A :class:`WorkloadFactory` from a factory, a SPEC or a plain ``make(seed)`` function."""
    return load(workload_factory)


def options(study: str, given: Mapping, defaults: Mapping) -> dict:
    """The study's own options: ``defaults`` updated with ``given`` (None keeps the default); an unknown
    name is an error that lists the known ones."""
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise TypeError(f"study {study!r}: unknown option {unknown[0]!r}; its options are "
                        f"{', '.join([*COMMON, *defaults])}")
    return {k: (given[k] if given.get(k) is not None else v) for k, v in defaults.items()}


def check_common(steps, lrs, seed) -> list[float] | None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if lrs is None:
        return None
    lrs = [lrs] if isinstance(lrs, (int, float)) else list(lrs)
    if not lrs or any(isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 for lr in lrs):
        raise ValueError(f"learning rates must be numbers > 0, got {lrs!r}")
    return [float(lr) for lr in lrs]


class StudyOptionError(ValueError):
    """An option a study cannot honour (rather than silently ignore): the message says what it takes."""


def one_lr(study: str, lrs: list[float] | None, what: str = "trains at one learning rate") -> list[float] | None:
    """``lrs`` when it holds at most one learning rate; a study that uses one refuses several."""
    if lrs is not None and len(lrs) != 1:
        raise StudyOptionError(f"study {study!r} {what}: give one --lr, got {len(lrs)} ({', '.join(map(str, lrs))})")
    return lrs


def size(quick: bool, full: bool) -> str:
    """The study's configuration: ``"full"`` (``--full``) or ``"quick"`` (``--quick``, the default)."""
    if quick and full:
        raise ValueError("quick and full are exclusive: pick one configuration")
    return "full" if full else "quick"


def seed_list(seed: int, seeds: int | None, full: bool) -> list[int]:
    """The seeds a study runs: ``seeds`` of them from ``seed`` on (default 3, or 5 with ``full``)."""
    n = (FULL_SEEDS if full else QUICK_SEEDS) if seeds is None else seeds
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    return [seed + i for i in range(n)]


def begin(study: str, workload_factory, steps, lrs, seed, seeds, quick: bool, full: bool, given: Mapping,
          defaults: Mapping, full_defaults: Mapping | None = None):
    """What every study's ``run`` starts with: (factory, checked lrs, "quick" or "full", its options with the
    full configuration's defaults applied where not given, the seeds, the first seed's workload)."""
    factory = factory_of(workload_factory)
    lrs = check_common(steps, lrs, seed)
    configuration = size(quick, full)
    opts = options(study, given, defaults)
    if configuration == "full" and full_defaults:
        opts.update({k: v for k, v in full_defaults.items() if given.get(k) is None})
    seed_ids = seed_list(seed, seeds, full)
    return factory, lrs, configuration, opts, seed_ids, factory(seed_ids[0])


def provenance() -> dict:
    """How a result was made: the command line, the date (UTC), the versions and the build."""
    import datetime
    import platform
    import sys

    import pyco

    argv = list(sys.argv)
    return {"command": argv, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "pyco": pyco.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or None,
            "threads": torch.get_num_threads(), "info": pyco.info()}


def config(factory: WorkloadFactory, workload: Workload, **settings) -> dict:
    """What a study's results name the run by: the workload (SPEC, options, its summary), the settings
    (``seeds`` a list) and how the run was made (:func:`provenance`)."""
    return {"workload": workload.name, "spec": factory.spec, "workload_options": dict(factory.options),
            "workload_summary": workload.summary(), **settings, **provenance()}


def results(study: str, question: str, cfg: dict, summary, **extra) -> dict:
    """The results every study returns and writes to ``results.json``: ``study``, ``question``, ``config``,
    ``summary`` (name -> ``{"mean", "ci95", "n"}``, the numbers the report's sentences come from), ``partial``
    and the study's own tables in ``extra``."""
    return {"study": study, "question": question, "config": cfg,
            "summary": summary.to_dict() if hasattr(summary, "to_dict") else dict(summary), "partial": False, **extra}


def keep(out, section: str, item) -> None:
    """Keeps one finished configuration in ``out`` (a :class:`RunDir`; nothing without one), so that a run
    interrupted or failing later still reports it (see :meth:`RunDir.keep`)."""
    if isinstance(out, RunDir):
        out.keep(section, item)


def run_dir(out) -> "RunDir | None":
    if out is None or isinstance(out, RunDir):
        return out
    return RunDir(out)


def closure_for(workload: Workload, opt, batch, counter: list | None = None):
    """The closure an optimizer or an order calls: zero the gradients, the loss of ``batch``, backward."""
    def closure():
        if counter is not None:
            counter[0] += 1
        opt.zero_grad()
        loss = workload.loss(batch)
        loss.backward()
        return loss

    return closure


SMALL_MODEL = 100_000  # parameters: below this a CPU model runs on one intra-op thread (few_threads)


@contextlib.contextmanager
def few_threads(workload: Workload, limit: int = SMALL_MODEL):
    """One intra-op thread while a small CPU model (fewer than ``limit`` parameters) runs inside, the previous
    setting put back after: at that size more threads only add synchronisation, and on a shared machine a
    descheduled thread stalls every operation."""
    before = torch.get_num_threads()
    small = workload.device.type == "cpu" and workload.parameters < limit and before > 1
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def train(workload: Workload, opt, batches, steps: int, *, show: bool = False, desc: str = "") -> list[float]:
    """``steps`` plain steps of ``opt`` on ``batches``; the batch losses."""
    losses = []
    for _ in progress(range(steps), desc=desc, enabled=show):
        losses.append(opt.step(closure_for(workload, opt, next(batches))).detach().item())
    return losses


def metrics_text(metrics: Mapping[str, float]) -> str:
    """Eval metrics for a report: accuracy as a percentage, others to 4 significant digits."""
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k} {v:.1%}" if k == "accuracy" else f"{k} {v:.4g}")
    return ", ".join(parts) if parts else "no held-out metrics"


# ---- outputs ------------------------------------------------------------------------------------------

class RunDir:
    """A study's output directory: CSV tables, PNG figures, report.md, results.json."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []
        self.finished: dict[str, list] = {}

    def keep(self, section: str, item) -> None:
        """Keeps one finished configuration's results (``item``, JSON-ready) under ``section``: a run that is
        interrupted or fails later still writes them to results.json, marked partial."""
        self.finished.setdefault(section, []).append(item)

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

    def tables(self, prefix: str, summary=None, **tables: Sequence[dict]) -> None:
        """``prefix_<key>.csv`` for each table, and ``prefix_summary.csv`` (name, mean, lo, hi, n) of ``summary``."""
        for key, rows in tables.items():
            self.csv(f"{prefix}_{key}.csv", rows)
        if summary is not None:
            self.csv(f"{prefix}_summary.csv", [{"name": n, "mean": e.mean, "lo": e.lo, "hi": e.hi, "n": e.n}
                                               for n, e in summary.items()])

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


LOG = logging.getLogger("pyco.studies")
LOG_EVERY_S = 10.0  # off a terminal: a plain progress line at most this often (and for the first and last item)


def progress(iterable: Iterable, *, desc: str, total: int | None = None, enabled: bool = True):
    """Progress over ``iterable``: a tqdm bar on stderr when it is a terminal (bars nest: a study's loop over
    its runs holds the bar of each run's steps), plain log lines on the ``pyco.studies`` logger otherwise
    ("desc: 3/54, 12 s"), at most one every ``LOG_EVERY_S`` seconds besides the first and the last; nothing
    when ``enabled`` is False."""
    import sys

    if not enabled:
        return iterable
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return _log_lines(iterable, desc, total)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _log_lines(iterable, desc, total)
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _log_lines(iterable: Iterable, desc: str, total: int | None):
    import time

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    start = last = time.monotonic()
    of = f"/{total}" if total is not None else ""
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if i == 1 or i == total or now - last >= LOG_EVERY_S:
            LOG.info("%s: %d%s, %.0f s", desc, i, of, now - start)
            last = now


def fmt(x: float, digits: int = 3) -> str:
    """A number for a report sentence: 3 significant digits, scientific when small or large."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"
