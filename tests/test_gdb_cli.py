"""`minivmm gdb CONFIG` and `minivmm run CONFIG --gdb`: the stub from the command line, driven by gdb."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gdb_harness import GDB, gdb_argv, no_core_dumps

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")]

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "hello_user.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def debug_session(minivmm_args: list[str], gdb_commands: list[str]) -> tuple[int, str, str, str]:
    """Start minivmm, wait for its "waiting for gdb" line, run gdb; (status, stdout, stderr, gdb output)."""
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", *minivmm_args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        line = proc.stderr.readline()
        assert "waiting for gdb: target remote " in line, line
        address = line.rsplit(" ", 1)[1].strip()
        gdb = subprocess.run(gdb_argv(address, gdb_commands), capture_output=True, text=True, timeout=30,
                             preexec_fn=no_core_dumps)
        out, err = proc.communicate(timeout=30)
        return proc.returncode, out, line + err, gdb.stdout + gdb.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_minivmm_gdb_on_a_unix_socket_steps_and_runs_to_the_end(tmp_path):
    sock = tmp_path / "s"
    status, out, err, gdb = debug_session(["gdb", str(CONFIG), "--socket", str(sock)],
                                          ["stepi", 'printf "rip=%x\\n", $rip', "continue"])
    assert "rip=100007" in gdb, gdb                   # past `lea msg, %esi` (7 bytes)
    assert "exited normally" in gdb
    assert status == 0 and "Hello from user mode!" in out, (status, out, err)


def test_minivmm_run_with_gdb_port_and_kill():
    port = free_port()
    status, out, err, gdb = debug_session(["run", str(CONFIG), "--gdb", f":{port}"],
                                          ["info registers rip", "kill"])
    assert f"127.0.0.1:{port}" in err and "0x100000" in gdb, (err, gdb)
    assert status == 0 and "Hello" not in out           # killed before it printed anything


def test_bad_gdb_address_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "minivmm", "run", str(CONFIG), "--gdb", ":notaport"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 2 and "expected [HOST]:PORT or a socket path" in proc.stderr
