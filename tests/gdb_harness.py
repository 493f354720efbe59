"""Drive the real gdb against a machine served by `Machine.serve_gdb` in this process.

`gdb_session(machine, commands)` starts `gdb -batch -nx` once the stub listens (a free
port, or a Unix socket), serves it from the calling (main) thread and returns gdb's
output with the run's result. gdb is killed after `timeout` seconds so a hang fails fast.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field

GDB = shutil.which("gdb")


@dataclass
class GdbRun:
    output: str
    result: object                 # what serve_gdb returned
    returncode: int | None
    killed: bool = False
    argv: list[str] = field(default_factory=list)
    error: BaseException | None = None

    def values(self, name: str) -> list[int]:
        """The values gdb printed for `printf "NAME=%x\\n", ...` lines."""
        return [int(v, 16) for v in re.findall(rf"^{re.escape(name)}=([0-9a-fA-F]+)$", self.output, re.M)]

    def value(self, name: str) -> int:
        found = self.values(name)
        assert found, f"gdb printed no {name}=...:\n{self.output}"
        return found[-1]


def no_core_dumps() -> None:
    """preexec_fn for gdb: an internal error of gdb aborts it; leave no core file behind."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def gdb_argv(address: str, commands: list[str]) -> list[str]:
    argv = [GDB, "-batch", "-nx", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", "set print elements 8", "-ex", f"target remote {address}"]
    for command in commands:
        argv += ["-ex", command]
    return argv


def gdb_session(machine, commands: list[str], *, timeout: float = 30.0, machine_timeout: float = 20.0,
                socket_path: str | None = None, interrupt_after: float | None = None, raise_errors: bool = True) -> GdbRun:
    """Serve `machine` to a gdb that runs `commands` after `target remote`; `interrupt_after`
    sends gdb SIGINT (its Ctrl-C) that many seconds after it started."""
    state: dict = {}
    log = tempfile.TemporaryFile(mode="w+")

    def ready(address: str) -> None:
        argv = gdb_argv(address, commands)
        state["argv"] = argv
        proc = state["proc"] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True,
                                                preexec_fn=no_core_dumps)

        def kill() -> None:
            if proc.poll() is None:
                state["killed"] = True
                os.killpg(proc.pid, signal.SIGKILL)
        watchdog = state["watchdog"] = threading.Timer(timeout, kill)
        watchdog.daemon = True
        watchdog.start()
        if interrupt_after is not None:
            timer = threading.Timer(interrupt_after, lambda: proc.poll() is None and proc.send_signal(signal.SIGINT))
            timer.daemon = True
            timer.start()

    error = None
    result = None
    try:
        if socket_path is not None:
            result = machine.serve_gdb(socket=socket_path, ready=ready, timeout=machine_timeout,
                                       accept_timeout=timeout)
        else:
            result = machine.serve_gdb(port=0, ready=ready, timeout=machine_timeout, accept_timeout=timeout)
    except Exception as exc:            # kept with gdb's output, for the test to show
        error = exc
    try:
        proc = state["proc"]
        returncode = proc.wait(timeout=timeout)
    finally:
        proc = state.get("proc")
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if "watchdog" in state:
            state["watchdog"].cancel()
    log.seek(0)
    output = log.read()
    log.close()
    run = GdbRun(output, result, returncode, state.get("killed", False), state.get("argv", []), error)
    if error is not None and raise_errors:
        raise AssertionError(f"the stub's machine raised {error!r}; gdb said:\n{output}") from error
    return run
