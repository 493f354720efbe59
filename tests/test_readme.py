"""The README's Python examples run as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm
pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
SCRIPTS = [b for b in BLOCKS if "def test_" not in b]
TESTS = [b for b in BLOCKS if "def test_" in b]


def test_readme_has_examples() -> None:
    assert len(SCRIPTS) >= 3 and TESTS


@pytest.mark.parametrize("index", range(len(SCRIPTS)))
def test_readme_script_runs(index: int) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPTS[index]], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_pytest_example_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_example="\n\n".join(TESTS))
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=len(re.findall(r"^def test_", "\n".join(TESTS), re.M)))
