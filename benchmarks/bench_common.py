"""What the benchmark scripts share: naming the machine they ran on, printing and writing results."""

from __future__ import annotations

import json
import platform


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(result: dict, table: str, out: str | None) -> int:
    """Prints the table and, given a path, writes the results as JSON there. Returns the exit status."""
    print(table)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {out}")
    return 0
