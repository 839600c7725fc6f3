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

BENCHMARKS = ("update", "orders", "probe")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one readable line (and exit status 2), never a traceback."""

    def error(self, message):
        self.exit(2, f"pyco: error: {message}\n")


def _add_common_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="training steps (default: the study's quick size)")
    p.add_argument("--lr", type=float, nargs="+", help="learning rate(s) (default: the study's grid)")
    p.add_argument("--depth", type=int, help="hidden layers (default: the study's)")
    p.add_argument("--width", type=int, help="units per hidden layer (default: the study's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same numbers (default 0)")
    p.add_argument("--out", help="run directory (default runs/<study>-<time>)")
    p.add_argument("--quick", action="store_true", help="the default sizes (each study < 3 min on 2 CPU cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyco", description="Exact, measurable update orders for neural networks.")
    sub = parser.add_subparsers(dest="command", metavar="{study,bench,info}", parser_class=_Parser)

    study = sub.add_parser("study", help="run a study: pyco study NAME, or pyco study --list")
    study.add_argument("name", nargs="?", help="the study to run (see --list)")
    study.add_argument("--list", action="store_true", help="list the studies and the questions they answer")
    _add_common_study_arguments(study)

    bench = sub.add_parser("bench", help="run a benchmark (update, orders, probe) and write its JSON")
    bench.add_argument("subject", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to benchmarks/bench_<subject>.py")

    sub.add_parser("info", help="what was built: kernels, versions, threads, devices")
    return parser


def _study(args, parser) -> int:
    from pyco import studies

    if args.list or not args.name:
        if not args.list:
            parser.error("study: name a study, or use --list")
        for name in studies.names():
            module = studies.load(name)
            print(f"{name:14s} {module.QUESTION}")
        return 0
    try:
        module = studies.load(args.name)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    for name in ("steps", "depth", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.lr is not None and any(not (lr > 0) for lr in args.lr):
        parser.error(f"--lr values must be > 0, got {args.lr}")
    from pyco.studies._common import RunDir

    out = RunDir(args.out or os.path.join("runs", f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    start = time.perf_counter()
    results = {"study": args.name, "partial": True}
    try:
        results = module.run(args, out)
        results["partial"] = False
    except KeyboardInterrupt:
        results["interrupted"] = True
    finally:  # also on an error: what was measured so far, marked partial
        results["seconds"] = time.perf_counter() - start
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


def _bench(args) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.subject}.py"
    if not script.exists():
        print(f"pyco: error: {script} not found; the benchmarks run from a source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))  # as `python benchmarks/bench_x.py` would: bench_common imports
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _info() -> int:
    import pyco

    print(json.dumps(pyco.info(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "study":
            return _study(args, parser)
        if args.command == "bench":
            return _bench(args)
        if args.command == "info":
            return _info()
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT, not a traceback
        print("pyco: interrupted", file=sys.stderr)
        return 130
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
