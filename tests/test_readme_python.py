"""The README's Python API example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_a_python_example():
    assert python_blocks()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_example_runs_verbatim(tmp_path, index):
    script = tmp_path / "example.py"
    script.write_text(python_blocks()[index])
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    forget, retain = map(float, re.findall(r"([\d.]+)%", result.stdout))
    assert forget <= 10 and retain >= 90, result.stdout
    assert (tmp_path / "runs" / "api-example" / "report.json").is_file()
