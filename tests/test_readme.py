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


YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_yaml_examples() -> None:
    assert len(YAML_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(YAML_BLOCKS)))
def test_readme_yaml_runs(index: int, tmp_path: Path) -> None:
    """Each YAML example as written, from a configs/ directory beside guests/ (its paths are
    relative to it): `check` passes and `run` matches the example's `expect:` or exits."""
    import json
    configs = tmp_path / "configs"
    configs.mkdir()
    (tmp_path / "guests").symlink_to(ROOT / "guests")
    (configs / "demo_handlers.py").symlink_to(ROOT / "configs" / "demo_handlers.py")
    path = configs / f"readme_{index}.yaml"
    path.write_text(YAML_BLOCKS[index])
    command = [sys.executable, "-m", "minivmm"]
    done = subprocess.run([*command, "check", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*command, "run", str(path), "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    result = json.loads(done.stdout)
    assert result["result"] == "exit", result
    if "expect:" in YAML_BLOCKS[index]:
        assert done.returncode == 0, done.stderr


TABLE = re.search(r"<!-- caps-table:begin -->\n(.*?)\n<!-- caps-table:end -->",
                  (ROOT / "README.md").read_text(), re.S)


def test_readme_capability_table_matches_the_model() -> None:
    """The README's table is `minivmm caps --markdown` of the reference host: the same items, and
    for every row that no probe decides, the same works/refused in each mode as this host's model
    (probed rows may differ on another host)."""
    from minivmm.capabilities import MODES, host_model
    from minivmm.kvm import Kvm
    assert TABLE is not None
    lines = TABLE.group(1).splitlines()
    assert lines[0].startswith("| item | real | protected | long | user |")
    readme = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        readme[cells[0].strip("`")] = cells[1:1 + len(MODES)]
    with Kvm() as kvm:
        model = host_model(kvm)
        rows = model.rows()
        generated = model.markdown().splitlines()
    assert len(generated) == len(lines)
    assert set(readme) == {row.name for row in rows}
    for row in rows:
        if not row.probed:
            assert readme[row.name][MODES.index(row.mode)] == row.status, (row.name, row.mode.value)
