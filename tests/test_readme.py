"""Every Python snippet in the README runs as it is written, in a fresh process and an empty directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def needs(code: str) -> list[str]:
    """What a snippet needs beyond pyco's test install: a GPU, an optional extra."""
    missing = []
    if "cuda" in code and not torch.cuda.is_available():
        missing.append("a CUDA device")
    for module in ("transformers", "lightning"):
        if re.search(rf"^import .*\b{module}\b|^from {module}\b|pyco\.integrations\.{'huggingface' if module == 'transformers' else module}",
                     code, flags=re.M):
            try:
                __import__(module)
            except ImportError:
                missing.append(module)
    return missing


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 6


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, tmp_path):
    code = SNIPPETS[index]
    missing = needs(code)
    if missing:
        pytest.skip(f"README snippet {index} needs {', '.join(missing)}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, f"README snippet {index} failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
