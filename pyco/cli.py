"""The ``pyco`` command: studies, benchmarks, build information. The only module that parses arguments
and prints."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path

BENCHMARKS = ("update", "orders", "probe", "workloads")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one readable line (and exit status 2), never a traceback."""

    def error(self, message):
        self.exit(2, f"pyco: error: {message}\n")


def _add_common_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default=None, metavar="SPEC",
                   help="what the study runs on: a built-in workload (see --list) or module.path:function naming "
                        "your own make(seed) -> pyco.studies.Workload, imported from sys.path (default digits-mlp)")
    p.add_argument("--size", choices=("tiny", "cpu", "gpu"),
                   help="a built-in workload's size: tiny, cpu (default) or gpu (needs --device cuda)")
    p.add_argument("--depth", type=int, help="the workload's depth (built-ins: layers or residual blocks)")
    p.add_argument("--width", type=int, help="the workload's width (built-ins: units, channels or model width)")
    p.add_argument("--workload-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword passed to the workload factory (repeatable), e.g. variant=batchnorm")
    p.add_argument("--steps", type=int, help="training steps (default: the workload's budget)")
    p.add_argument("--lr", type=float, nargs="+", help="learning rate(s) (default: from the workload's recipe)")
    p.add_argument("--device", default=None, help="cpu or cuda, passed to the workload factory (built-ins: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same numbers (default 0)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", help="run directory (default runs/<study>-<time>)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="each study's small configuration, the default (at most 5 minutes on 2 CPU cores)")
    size.add_argument("--full", action="store_true",
                      help="each study's full configuration, more seeds (at most 30 minutes on 2 CPU cores)")
    p.add_argument("--seeds", type=int, help="seeds per measurement (default 3, or 5 with --full)")
    p.add_argument("--force", action="store_true", help="replace a complete run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress (bars on a terminal, plain lines otherwise)")


def _study_help(name: str) -> str | None:
    """The epilog of `pyco study NAME --help`: the study's question, what it does, and its own defaults."""
    from pyco import studies

    try:
        module = studies.load(name)
    except (ValueError, ImportError):
        return None
    doc = (module.__doc__ or "").strip().split("\n\n")
    lines = [module.QUESTION, "", *doc[:2], ""]
    options = getattr(module, "OPTIONS", {})
    if options:
        lines.append(f"{name}'s own defaults (set them from Python: pyco.studies.load({name!r}).run(..., key=value)):")
        lines += [f"  {k} = {v!r}" for k, v in options.items()]
    for label in ("QUICK", "FULL"):
        sizes = getattr(module, label, None)
        if sizes:
            lines.append(f"--{label.lower()} sets: " + ", ".join(f"{k}={v!r}" for k, v in sizes.items()))
    workload = getattr(module, "DEFAULT_WORKLOAD", None)
    if workload:
        lines.append(f"default workload: {workload}")
    return "\n".join(lines)


def build_parser(argv=None) -> argparse.ArgumentParser:
    from pyco import __version__

    parser = _Parser(prog="pyco", description="Exact, measurable update orders for neural networks.")
    parser.add_argument("--version", action="version", version=f"pyco {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{study,bench,plot,info}", parser_class=_Parser)

    argv = list(sys.argv[1:] if argv is None else argv)
    epilog = _study_help(argv[1]) if len(argv) > 1 and argv[0] == "study" and not argv[1].startswith("-") else None
    study = sub.add_parser("study", help="run a study: pyco study NAME, or pyco study --list", epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_argument("name", nargs="?", help="the study to run (see --list)")
    study.add_argument("--list", action="store_true", help="list the studies and the built-in workloads")
    _add_common_study_arguments(study)

    bench = sub.add_parser("bench", help="run a benchmark (update, orders, probe, workloads) and write its JSON")
    bench.add_argument("subject", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to benchmarks/bench_<subject>.py")

    plot = sub.add_parser("plot", help="draw the figures of a pyco.probe.Monitor log: pyco plot DIR")
    plot.add_argument("log", help="the Monitor's out directory (or its probe.jsonl)")
    plot.add_argument("--out", help="the PNG to write (default DIR/probe.png)")

    sub.add_parser("info", help="what was built: kernels, versions, threads, devices")
    return parser


def _workload_options(args, parser) -> dict:
    """The keywords for the workload factory: --size, --depth, --width, --device and each --workload-option."""
    import ast

    options = {}
    for item in args.workload_option:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            parser.error(f"--workload-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    for key in ("size", "depth", "width", "device"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _list() -> int:
    from pyco import studies
    from pyco.studies import workloads

    print("studies (pyco study NAME):")
    for name in studies.names():
        print(f"  {name:14s} {studies.load(name).QUESTION}")
    print("\nworkloads (--workload NAME, or --workload module.path:function for your own make(seed) -> Workload):")
    for name in workloads.names():
        print(f"  {name:14s} {workloads.describe(name)}")
    return 0


def _complete(path: Path) -> bool:
    """Whether results.json at ``path`` is a finished run (an unreadable one counts as finished: kept)."""
    try:
        return json.loads(path.read_text()).get("partial") is False
    except (OSError, ValueError, AttributeError):
        return True


def _study(args, parser) -> int:
    from pyco import studies

    if args.list or not args.name:
        if not args.list:
            parser.error("study: name a study, or use --list")
        return _list()
    try:
        module = studies.load(args.name)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            parser.error(f"--device expects cpu or cuda (or cuda:N), got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    for name in ("steps", "depth", "width", "threads", "seeds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.lr is not None and any(not (lr > 0) for lr in args.lr):
        parser.error(f"--lr values must be > 0, got {args.lr}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_path = Path(args.out) if args.out else None
    if out_path is not None and out_path.exists():
        if not out_path.is_dir():
            parser.error(f"--out {args.out}: is a file; name a directory for the run")
        previous = out_path / "results.json"
        if previous.is_file() and not args.force and _complete(previous):
            parser.error(f"--out {args.out} holds a complete run (results.json); choose a new --out, or pass --force "
                         f"to replace it")
    try:
        from pyco.studies._common import pyplot

        pyplot()
    except ImportError as exc:
        parser.error(f"{exc}")
    from pyco.studies import WorkloadError, load_workload, workloads
    from pyco.studies._common import RunDir, StudyOptionError

    # The workload is loaded and built once before anything is written: a bad SPEC, a factory that returns
    # something else or a loss that is not a scalar is one line, and no run directory.
    try:
        factory = load_workload(args.workload or getattr(module, "DEFAULT_WORKLOAD", workloads.DEFAULT),
                               **_workload_options(args, parser))
        factory(args.seed).check()
    except WorkloadError as exc:
        parser.error(str(exc))
    path = Path(args.out or os.path.join("runs", f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    created = not path.exists()
    out = RunDir(path)
    start = time.perf_counter()
    results = {"study": args.name, "partial": True, "config": factory.to_dict()}
    if not args.no_progress:
        _log_progress()
    try:
        given = dict(steps=args.steps, lrs=args.lr, seed=args.seed or None, seeds=args.seeds, quick=args.quick or None,
                     full=args.full or None, show_progress=not args.no_progress or None)  # defaults are not passed
        results = module.run(factory, out=out, **{k: v for k, v in given.items() if v is not None})
        results["partial"] = False
    except KeyboardInterrupt:
        results["interrupted"] = True
    except (WorkloadError, StudyOptionError) as exc:  # refused before measuring anything: one line
        if not out.files and not out.finished:
            if created:
                path.rmdir()
            parser.error(f"study {args.name}: {exc}")
        raise
    finally:  # also on an error: every configuration finished so far, marked partial
        results["seconds"] = time.perf_counter() - start
        if results["partial"] and path.is_dir():
            results["finished"] = out.finished
            out.json("results.json", results)
        elif not results["partial"]:
            out.json("results.json", results)
    if results.get("interrupted"):
        print(f"pyco: interrupted; partial results in {out.path / 'results.json'}", file=sys.stderr)
        return 130
    print(f"{args.name}: wrote {', '.join(sorted(set(out.files)))} to {out.path} ({results['seconds']:.0f} s)")
    report = out.path / "report.md"
    if report.exists():
        print()
        print(report.read_text())
    return 0


def _log_progress() -> None:
    """Off a terminal, a study's progress comes as plain lines on stderr (its ``pyco.studies`` log records)."""
    import logging

    class Stderr(logging.Handler):  # whatever sys.stderr is when a line is written
        pyco_cli = True

        def emit(self, record):
            sys.stderr.write(self.format(record) + "\n")

    log = logging.getLogger("pyco.studies")
    if not any(getattr(h, "pyco_cli", False) for h in log.handlers):
        log.addHandler(Stderr())
    log.setLevel(logging.INFO)
    log.propagate = False


def _bench_script(subject: str) -> Path | None:
    """The benchmark script: installed with the package (pyco/benchmarks/), or in the source checkout."""
    here = Path(__file__).resolve().parent
    for folder in (here / "benchmarks", here.parent / "benchmarks"):
        script = folder / f"bench_{subject}.py"
        if script.is_file():
            return script
    return None


def _bench(args) -> int:
    script = _bench_script(args.subject)
    if script is None:
        print(f"pyco: error: bench_{args.subject}.py is neither installed with pyco nor in a source checkout; "
              f"reinstall pyco (`pip install .`)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))  # as `python benchmarks/bench_x.py` would: bench_common imports
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _plot(args, parser) -> int:
    from pyco.probe.log_plots import plot_log

    try:
        path = plot_log(args.log, args.out)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        parser.error(f"plot: {exc}")
    print(f"plot: wrote {path}")
    return 0


def _info() -> int:
    import pyco

    print(json.dumps(pyco.info(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "study":
            return _study(args, parser)
        if args.command == "bench":
            return _bench(args)
        if args.command == "plot":
            return _plot(args, parser)
        if args.command == "info":
            return _info()
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT, not a traceback
        print("pyco: interrupted", file=sys.stderr)
        return 130
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
