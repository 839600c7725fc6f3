"""Loads the compiled kernels. The CPU module is always built; its absence means a broken install. The CUDA
module (pyco._C_cuda) exists when pyco was built with a CUDA compiler; it links the CUDA runtime statically,
so importing it needs no GPU and no driver. A missing CUDA build fails when it is used, with the fix."""

from __future__ import annotations

from pathlib import Path


def missing_kernels_message(package_dir: Path) -> str:
    """What to say when pyco._C does not import from ``package_dir``: the source tree shadowing the installed
    package (the usual case: Python is run from the repository root), or a broken install."""
    root = package_dir.parent
    if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir():
        return (f"`import pyco` found pyco's source tree at {root} instead of the installed package: Python puts "
                f"the current directory first on sys.path, and a source tree holds no compiled kernels "
                f"(pyco._C). Run from another directory (e.g. `cd ..`), or, to work on pyco itself, install it "
                f"in place with `pip install -e .`, which makes the source tree importable with its kernels.")
    return ("pyco's compiled kernels (pyco._C) could not be imported. Install pyco from its source tree with "
            "`pip install .` (it needs a C++17 compiler and CMake >= 3.18), or for a plain CMake build run "
            "`cmake -S . -B build -DPYCO_PYTHON=ON && cmake --build build` and put the source tree on PYTHONPATH.")


try:
    from pyco import _C
except ImportError as exc:
    raise ImportError(missing_kernels_message(Path(__file__).resolve().parent)) from exc

try:
    from pyco import _C_cuda
    _CUDA_MISSING = None
except Exception as exc:  # noqa: BLE001 - whatever goes wrong, `import pyco` must work without CUDA
    _C_cuda = None
    _CUDA_MISSING = f"{type(exc).__name__}: {exc}"

__all__ = ["_C", "cuda_kernels", "has_cuda_kernels", "info"]


def has_cuda_kernels() -> bool:
    """True when this build of pyco has its CUDA kernels (pyco._C_cuda)."""
    return _C_cuda is not None


def cuda_kernels():
    """The CUDA kernels' module; raises a RuntimeError that says how to get it when this build has none."""
    if _C_cuda is None:
        raise RuntimeError(
            "this build of pyco has no CUDA kernels (pyco._C_cuda: "
            f"{_CUDA_MISSING}); rebuild it where nvcc is found: `PYCO_CUDA=ON pip install .` "
            "(set CUDACXX=/path/to/nvcc if it is not on PATH), or use torch.optim for CUDA tensors"
        )
    return _C_cuda


def info() -> dict:
    """What was built: kernels, compiler, versions. Used by `pyco info`."""
    import torch

    from pyco import __version__

    return {
        "pyco": __version__,
        "torch": torch.__version__,
        "cpu_kernels": True,
        "cpu_isa": _C.KERNEL_ISA,
        "cuda_kernels": _C_cuda is not None,
        "cuda_architectures": getattr(_C_cuda, "ARCHITECTURES", None),
        "cuda_version_at_build": getattr(_C_cuda, "CUDA_VERSION", None),
        "cuda_devices": torch.cuda.device_count(),  # torch's count: does not initialize CUDA in this process
        "cuda_compiler_at_build": getattr(_C, "CUDA_COMPILER", "") or None,
        "compiler": getattr(_C, "COMPILER", "unknown"),
        "chunk_elems": _C.CHUNK_ELEMS,
        "threads": torch.get_num_threads(),
        "hardware_threads": _C.HARDWARE_THREADS,
    }
