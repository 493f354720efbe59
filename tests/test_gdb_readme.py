"""The README's gdb transcript is what gdb prints against the stub today."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from gdb_harness import GDB, gdb_session
from minivmm.config import build_machine, load_config

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")]

ROOT = Path(__file__).resolve().parent.parent
TRANSCRIPT = re.search(r"<!-- gdb-transcript:.*?-->\n```text\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_gdb_transcript():
    assert TRANSCRIPT, "README.md has no gdb transcript block"
    lines = TRANSCRIPT.group(1).splitlines()
    session = lines[lines.index(next(l for l in lines if l.startswith("$ gdb "))) + 1:]
    commands = [line[len("(gdb) "):] for line in session if line.startswith("(gdb) ")]
    expected = [line for line in session if not line.startswith("(gdb) ")]
    config = re.search(r"minivmm gdb (\S+)", TRANSCRIPT.group(1)).group(1)
    with build_machine(load_config(ROOT / config), capture_console=True) as m:
        run = gdb_session(m, commands)
    printed = [line for line in run.output.splitlines() if line.strip()]
    position = 0
    for line in expected:                        # every line, in this order
        while position < len(printed) and printed[position].rstrip() != line.rstrip():
            position += 1
        assert position < len(printed), f"gdb did not print {line!r} (in order); it printed:\n{run.output}"
        position += 1
    assert run.result.exit_code == 7
