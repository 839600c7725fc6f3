"""Loads the compiled kernels. The CPU module is always built; its absence means a broken install."""

from __future__ import annotations

try:
    from pyco import _C
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "pyco's compiled kernels (pyco._C) could not be imported. Install pyco from its source tree with "
        "`pip install .` (it needs a C++17 compiler and CMake >= 3.18), or for a plain CMake build run "
        "`cmake -S . -B build && cmake --build build` and put the source tree on PYTHONPATH."
    ) from exc

__all__ = ["_C", "info"]


def info() -> dict:
    """What was built: kernels, compiler, versions. Used by `pyco info`."""
    import torch

    from pyco import __version__

    return {
        "pyco": __version__,
        "torch": torch.__version__,
        "cpu_kernels": True,
        "cpu_isa": _C.KERNEL_ISA,
        "cuda_kernels": False,
        "cuda_compiler_at_build": getattr(_C, "CUDA_COMPILER", "") or None,
        "compiler": getattr(_C, "COMPILER", "unknown"),
        "chunk_elems": _C.CHUNK_ELEMS,
        "threads": torch.get_num_threads(),
        "hardware_threads": _C.HARDWARE_THREADS,
    }
