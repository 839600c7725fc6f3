"""A newcomer's first hour: the errors that greet a wrong set-up say what happened and what to do."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import pyco
from pyco import _ext, cli

ROOT = Path(__file__).resolve().parent.parent


def test_shadowing_source_tree_message(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    message = _ext.missing_kernels_message(tmp_path / "pyco")
    assert "source tree" in message and "cd .." in message and "pip install -e ." in message
    assert "pip install ." in _ext.missing_kernels_message(tmp_path / "elsewhere" / "pyco")


def test_importing_a_source_tree_without_kernels_says_why(tmp_path):
    # A copy of the sources without the compiled module, imported from its root as `python -c` from a checkout
    # does (the current directory first on sys.path; an editable install's finder taken out of the way).
    tree = tmp_path / "checkout"
    shutil.copytree(Path(pyco.__file__).parent, tree / "pyco", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (tree / "csrc").mkdir()
    (tree / "pyproject.toml").write_text("")
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Redirect' not in type(f).__name__]; "
            "sys.path.insert(0, ''); import pyco")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: `import pyco` found pyco's source tree at") and "pip install -e ." in last


def test_bench_finds_its_scripts_installed_or_in_a_checkout():
    script = cli._bench_script("update")
    assert script is not None and script.name == "bench_update.py"
    installed = Path(pyco.__file__).parent / "benchmarks" / "bench_update.py"
    assert script == installed or script == ROOT / "benchmarks" / "bench_update.py"


def test_bench_runs_from_another_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyco.cli", "bench", "update", "--quick", "--shapes", "small",
                           "--rules", "sgd", "--tensors", "50", "--tensor-numel", "256", "--repeats", "3",
                           "--out", str(tmp_path / "u.json")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "u.json").is_file()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_plain_cmake_asking_for_the_module_without_pybind11_fails_clearly(tmp_path):
    env_dir = tmp_path / "bare"
    venv.create(env_dir, with_pip=False)  # a Python without pybind11
    python = env_dir / "bin" / "python"
    proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), "-DPYCO_PYTHON=ON",
                           "-DPYCO_CUDA=OFF", f"-DPython_EXECUTABLE={python}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = " ".join(proc.stderr.split())
    assert "-DPYCO_PYTHON=ON asks for the Python module, but pybind11 was not found" in err
    assert "pip install pybind11" in err


def test_there_is_a_license():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
