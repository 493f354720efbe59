"""AFL++ bridge: `minivmm afl CONFIG` is an AFL++ target that restores a snapshot instead of forking.

    minivmm afl-fuzz -i seeds -o out -t 2000 -x parser.dict -- configs/fuzz_parser.yaml
    minivmm afl-fuzz -i seeds -o out -- configs/fuzz_parser.yaml @@

`minivmm afl-fuzz AFL-OPTIONS -- CONFIG [AFL-OPTIONS-OF-minivmm-afl]` runs
afl-fuzz on `minivmm afl CONFIG ...` with the environment such a target
needs (`afl_fuzz_environment`); the bridge itself can also be given to
afl-fuzz directly, as below.

Protocol (AFL's forkserver, as AFL++ 4 speaks it without extended options):
the target writes a 4-byte hello to fd 199; then per run AFL writes 4 bytes
to fd 198, the target answers with a 4-byte pid on fd 199, runs the input and
answers with a 4-byte wait status on fd 199. Here a run is a snapshot
restore plus a guest run, not a fork. The "pid" is that of a sleeping helper
process, so that when AFL's own timer kills "the child" it kills the helper
(which is restarted before the next run), never the bridge.

Statuses: a clean run is exit status 0; a crash (see `Harness`) is reported
as killed by SIGSEGV; a run that reaches minivmm's own deadline
(`--timeout`, default the config's `fuzz.timeout`) as killed by SIGKILL.
Give afl-fuzz a `-t` below minivmm's deadline so AFL itself classifies
hangs as timeouts (AFL counts a SIGKILL it did not send as a crash).

The input is read from the file named on the command line (AFL's `@@`) or
from stdin (AFL rewrites the file behind fd 0 for every run).

Coverage goes into the shared memory named by `__AFL_SHM_ID` (shmat), of
`AFL_MAP_SIZE` bytes (default 65536): one byte per basic block, at a hash of
the block address (AFL's per-block id). Breakpoint coverage sees a block only
the first time any input runs it, so a run's map is: one fixed "ran" byte,
plus the blocks this input discovered. The bridge remembers that map per
input (by content), so AFL's calibration re-runs of an input see the same map
(stability 100%), each queue entry owns the bits of the blocks it found (AFL's
favoured-entry selection keeps all of them), and trimming keeps the bytes
that the discovery needed (a trimmed variant shows a different map). The
fixed byte keeps every map non-empty (afl-fuzz stops with "No
instrumentation detected" on an empty map in its dry run).

`minivmm afl CONFIG --write-dict FILE` writes the comparison constants of
the covered code as an AFL dictionary (`-x FILE`), the equivalent of AFL++'s
auto-dictionary.

Without fds 198/199 (afl-showmap, afl-tmin, a shell) the bridge runs the
input once, writes the map if `__AFL_SHM_ID` is set, and exits 0 or kills
itself with SIGSEGV on a crash.

Installing AFL++: `apt-get install -y afl++` (Debian/Ubuntu). afl-fuzz
refuses script targets and some host settings unless told otherwise: set
AFL_SKIP_BIN_CHECK=1 (minivmm is a Python entry point, not an instrumented
ELF; `minivmm afl-fuzz` sets it, and a longer forkserver start-up timeout,
AFL_FORKSRV_INIT_TMOUT, as the bridge builds its VM before the hello), and where
/proc/sys/kernel/core_pattern pipes to a program,
AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 (or fix core_pattern);
AFL_SKIP_CPUFREQ=1 avoids the CPU governor check.

Scaling with -M/-S
------------------
Every afl-fuzz instance starts its own `minivmm afl` process, and so its own
VM with its own snapshot: instances share nothing but AFL's sync directory.
Run one main and several secondary instances on one output directory, one
per core:

    minivmm afl-fuzz -i seeds -o sync -M main -- configs/fuzz_parser.yaml
    minivmm afl-fuzz -i seeds -o sync -S s1   -- configs/fuzz_parser.yaml
    minivmm afl-fuzz -i seeds -o sync -S s2   -- configs/fuzz_parser.yaml

Each secondary imports the queue entries of the others every few minutes (or
as soon as it idles), so a block one instance reaches becomes a seed for all.
Coverage maps stay per instance: an input synced from another instance
is kept only if it reaches a block this instance has not seen, which is
exactly AFL's rule. Use
`afl-whatsup sync` for the combined status. Each instance needs a CPU core
(KVM_RUN runs on the caller's thread) and the guest's memory once more.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import struct
import sys
from pathlib import Path

from ..errors import MinivmmError
from .harness import Harness, RunOutcome, Status

FORKSRV_FD = 198
DEFAULT_MAP_SIZE = 1 << 16
_U32 = struct.Struct("<I")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_libc.shmdt.argtypes = (ctypes.c_void_p,)


class AflError(MinivmmError, RuntimeError):
    """The AFL environment is unusable (bad shm id, closed pipes)."""


def map_size_from_env() -> int:
    text = os.environ.get("AFL_MAP_SIZE", "")
    if not text:
        return DEFAULT_MAP_SIZE
    try:
        size = int(text, 0)
    except ValueError:
        raise AflError(f"AFL_MAP_SIZE={text!r} is not a number") from None
    if size <= 0:
        raise AflError(f"AFL_MAP_SIZE={text!r} must be positive")
    return size


class SharedMap:
    """AFL's coverage map: the System V shared memory segment `__AFL_SHM_ID`, or a private buffer."""

    def __init__(self, size: int, shm_id: str | None = None) -> None:
        self.size = size
        self._attached: int | None = None
        self._private = None
        if shm_id:
            try:
                ident = int(shm_id)
            except ValueError:
                raise AflError(f"__AFL_SHM_ID={shm_id!r} is not a shared memory id") from None
            addr = _libc.shmat(ident, None, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                err = ctypes.get_errno()
                raise AflError(f"shmat(__AFL_SHM_ID={ident}) failed: {os.strerror(err)}")
            self._attached = addr
            self.address = addr
        else:
            self._private = (ctypes.c_ubyte * size)()
            self.address = ctypes.addressof(self._private)

    def read(self) -> bytes:
        return ctypes.string_at(self.address, self.size)

    def close(self) -> None:
        if self._attached is not None:
            _libc.shmdt(self._attached)
            self._attached = None


class _Helper:
    """A sleeping child process whose pid AFL gets (and may kill on its timeout)."""

    def __init__(self) -> None:
        self.pid = 0
        self.ensure()

    def ensure(self) -> int:
        if self.pid:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done = self.pid
            if not done:
                return self.pid
        pid = os.fork()
        if pid == 0:                        # the helper: sleep until killed
            try:
                os.closerange(3, 1024)
                while True:
                    signal.pause()
            finally:
                os._exit(0)
        self.pid = pid
        return pid

    def close(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = 0


def wait_status(outcome: RunOutcome) -> int:
    """The wait(2) status AFL gets for a run: exit 0, or death by SIGSEGV / SIGKILL."""
    if outcome.status is Status.CRASH:
        return signal.SIGSEGV
    if outcome.status is Status.TIMEOUT:
        return signal.SIGKILL
    return 0


class AflBridge:
    """Serves AFL's forkserver protocol with snapshot restores."""

    def __init__(self, harness: Harness, *, input_path: str | None = None,
                 map_size: int | None = None) -> None:
        self.harness = harness
        self.input_path = input_path
        self.map = SharedMap(map_size or map_size_from_env(), os.environ.get("__AFL_SHM_ID"))
        self.bytes = (ctypes.c_ubyte * self.map.size).from_address(self.map.address)
        self.ran_slot = harness.coverage.block_id(0) % self.map.size
        self.maps: dict[bytes, tuple[int, ...]] = {}
        self.runs = 0
        self.crashes = 0

    def close(self) -> None:
        self.map.close()

    def read_input(self) -> bytes:
        if self.input_path is not None:
            with open(self.input_path, "rb") as f:
                return f.read(self.harness.target.max_input_size + 1)
        chunks = []
        try:
            os.lseek(0, 0, os.SEEK_SET)
        except OSError:
            pass
        while True:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def run_once(self) -> RunOutcome:
        outcome = self.harness.run(self.read_input())
        self.runs += 1
        if outcome.new_blocks:
            coverage = self.harness.coverage
            size = self.map.size
            slots = (self.ran_slot, *(coverage.block_id(addr) % size for addr in outcome.new_blocks))
            self.maps[outcome.input] = slots
        else:
            slots = self.maps.get(outcome.input, (self.ran_slot,))
        out = self.bytes
        for slot in slots:
            out[slot] = 1
        if outcome.status is Status.CRASH:
            self.crashes += 1
        return outcome

    def serve(self) -> int:
        """The forkserver loop; returns when AFL closes the pipe."""
        ctl, st = FORKSRV_FD, FORKSRV_FD + 1
        try:
            os.write(st, _U32.pack(0))
        except OSError as exc:
            raise AflError(f"cannot write the hello to fd {st}: {exc.strerror}") from None
        helper = _Helper()
        try:
            while True:
                request = _read_exact(ctl, 4)
                if request is None:
                    return 0
                os.write(st, _U32.pack(helper.ensure()))
                outcome = self.run_once()
                os.write(st, _U32.pack(wait_status(outcome)))
        except BrokenPipeError:
            return 0
        finally:
            helper.close()


def _read_exact(fd: int, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = os.read(fd, n - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    return data


def forkserver_present() -> bool:
    try:
        os.fstat(FORKSRV_FD)
        os.fstat(FORKSRV_FD + 1)
        return True
    except OSError:
        return False


def write_dictionary(harness: Harness, path: str | os.PathLike) -> int:
    """Write the comparison constants as an AFL dictionary; returns the number of tokens."""
    lines = []
    for i, token in enumerate(harness.coverage.constants):
        escaped = "".join(f"\\x{b:02x}" for b in token)
        lines.append(f'cmp_{i}="{escaped}"')
    Path(path).write_text("\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


# What `minivmm afl-fuzz` puts into afl-fuzz's environment unless already set there.
AFL_FUZZ_DEFAULTS = {
    "AFL_SKIP_BIN_CHECK": "1",              # the target is a Python entry point, not an instrumented ELF
    "AFL_FORKSRV_INIT_TMOUT": "30000",      # ms until the hello: the bridge builds its VM first
}


def afl_fuzz_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`environ` (default os.environ) with AFL_FUZZ_DEFAULTS added where not set."""
    env = dict(os.environ if environ is None else environ)
    for key, value in AFL_FUZZ_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def split_afl_fuzz_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """`AFL-OPTIONS -- CONFIG [MINIVMM-AFL-OPTIONS]` -> (afl-fuzz options, `minivmm afl` arguments)."""
    if "--" not in argv:
        raise AflError("expected AFL-OPTIONS -- CONFIG [OPTIONS], e.g. -i seeds -o out -- configs/fuzz_parser.yaml")
    cut = argv.index("--")
    target = argv[cut + 1:]
    if not target:
        raise AflError("no CONFIG after --")
    return argv[:cut], target


def afl_fuzz_command(afl_fuzz: str, afl_args: list[str], target_args: list[str]) -> list[str]:
    """The afl-fuzz command line that fuzzes `minivmm afl TARGET-ARGS` with this interpreter."""
    return [afl_fuzz, *afl_args, "--", sys.executable, "-m", "minivmm", "afl", *target_args]


def exec_afl_fuzz(argv: list[str]) -> None:
    """Replace this process with afl-fuzz running the bridge (see `split_afl_fuzz_arguments`)."""
    import shutil
    afl_fuzz = os.environ.get("AFL_FUZZ_PATH") or shutil.which("afl-fuzz")
    if afl_fuzz is None:
        raise AflError("afl-fuzz not found on PATH (apt-get install -y afl++, or set AFL_FUZZ_PATH)")
    afl_args, target_args = split_afl_fuzz_arguments(argv)
    command = afl_fuzz_command(afl_fuzz, afl_args, target_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(afl_fuzz, command, afl_fuzz_environment())


def main(harness: Harness, input_path: str | None) -> int:
    """Serve AFL if started by afl-fuzz, else run the input once."""
    bridge = AflBridge(harness, input_path=input_path)
    try:
        if forkserver_present():
            return bridge.serve()
        outcome = bridge.run_once()
        if outcome.status is Status.CRASH:
            print(outcome.summary(), file=sys.stderr)
            sys.stderr.flush()
            harness.close()
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGSEGV)
        if outcome.status is Status.TIMEOUT:
            print(outcome.summary(), file=sys.stderr)
            return 124
        return 0
    finally:
        bridge.close()


__all__ = ["AflBridge", "AflError", "SharedMap", "map_size_from_env", "wait_status", "write_dictionary",
           "forkserver_present", "FORKSRV_FD", "DEFAULT_MAP_SIZE", "AFL_FUZZ_DEFAULTS", "afl_fuzz_environment",
           "split_afl_fuzz_arguments", "afl_fuzz_command", "exec_afl_fuzz"]
