"""The pytest plugin's `--minivmm-gdb PORT`: a failing guest test waits for gdb at the failure."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from gdb_harness import GDB, gdb_argv, no_core_dumps

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")]

FAILING = r'''
def test_fails(guest):
    vm = guest.asm(r"""
    _start:
        mov $0x5a5a, %r12
        GUEST_ASSERT_EQ %r12, $1
        GUEST_DONE
    """, mode="long")
    vm.done()
'''


def test_failing_guest_test_waits_for_gdb_at_the_failure(tmp_path):
    (tmp_path / "test_inner.py").write_text(FAILING)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "--minivmm-gdb", "0", "test_inner.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "waits for gdb: target remote " in line:
                break
        else:
            pytest.fail("the inner pytest never waited for gdb:\n" + "".join(seen))
        assert "test_inner.py::test_fails failed" in line
        address = line.rsplit(" ", 1)[1].strip()
        gdb = subprocess.run(gdb_argv(address, ['printf "r12=%x\\n", $r12', "detach"]),
                             capture_output=True, text=True, timeout=30,
                             preexec_fn=no_core_dumps)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "r12=5a5a" in gdb.stdout, gdb.stdout + gdb.stderr
    assert proc.returncode == 1 and "1 failed" in rest, rest
