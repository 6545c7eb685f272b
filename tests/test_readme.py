"""The README's Python snippet runs as written (from the repository root) and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_snippet_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert snippets, "the README has no Python snippet"
    code = snippets[0].replace('"cnn6.qfx.onnx"', repr(str(tmp_path / "cnn6.qfx.onnx")))  # keep the checkout clean
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[ 0.3125  -1.6875   3.96875]" in result.stdout
    accuracy = float(re.search(r"accuracy ([0-9.]+)", result.stdout).group(1))
    assert accuracy > 0.9
    assert (tmp_path / "cnn6.qfx.onnx").stat().st_size > 1000
