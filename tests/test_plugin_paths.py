"""The plugin finds guest files under pytest's rootdir, wherever pytest is started from."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from minivmm.testing import GuestFactory

pytest_plugins = ["pytester"]
INNER = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark")

GOOD = """\
    _start:
        GUEST_DONE
    """
BAD = """\
    _start:
        GUEST_ASSERT_EQ $1, $2
        GUEST_DONE
    """


def _write_guest(directory: Path, text: str) -> None:
    (directory / "guests").mkdir(parents=True, exist_ok=True)
    (directory / "guests" / "g.S").write_text(textwrap.dedent(text))


def test_find_uses_rootdir_not_the_current_directory(tmp_path, monkeypatch) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    _write_guest(root, GOOD)
    _write_guest(elsewhere, BAD)
    monkeypatch.chdir(elsewhere)
    factory = GuestFactory(base_dir=root / "tests", rootdir=root)
    assert factory._find("g.S") == (root / "guests" / "g.S").resolve()
    (root / "guests" / "g.S").unlink()
    with pytest.raises(FileNotFoundError, match="looked in"):
        factory._find("g.S")


@pytest.mark.kvm
def test_suite_started_from_another_directory_uses_rootdir_guests(pytester, monkeypatch) -> None:
    _write_guest(pytester.path, GOOD)
    elsewhere = pytester.mkdir("elsewhere")
    _write_guest(elsewhere, BAD)
    pytester.makeini("[pytest]\n")
    tests = pytester.mkdir("tests")
    (tests / "test_g.py").write_text(textwrap.dedent("""\
        def test_g(guest):
            assert guest.file("g.S").done().reason == "done"
        """))
    monkeypatch.chdir(elsewhere)
    result = pytester.runpytest_inprocess(*INNER, str(tests))
    result.assert_outcomes(passed=1)
