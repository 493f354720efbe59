"""The AFL++ bridge: forkserver protocol, coverage map, and a real afl-fuzz session."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from minivmm.fuzz import Harness
from minivmm.fuzz.afl import AflBridge, wait_status, write_dictionary
from minivmm.fuzz.harness import RunOutcome, Status

from conftest import CONFIGS, ROOT

PARSER = CONFIGS / "fuzz_parser.yaml"
CRASH = b"FUZZ\x02\x00\x80A"
BENIGN = b"FUZZ\x01abc"

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0


def test_wait_status_is_exit_zero_sigsegv_or_sigkill() -> None:
    def outcome(status: Status) -> RunOutcome:
        return RunOutcome(status, "x", b"")
    assert wait_status(outcome(Status.OK)) == 0
    assert os.WIFSIGNALED(wait_status(outcome(Status.CRASH)))
    assert os.WTERMSIG(wait_status(outcome(Status.CRASH))) == signal.SIGSEGV
    assert os.WTERMSIG(wait_status(outcome(Status.TIMEOUT))) == signal.SIGKILL


@pytest.mark.kvm
def test_map_holds_the_blocks_an_input_found_and_stays_stable(tmp_path, monkeypatch) -> None:
    from minivmm.config import load_config
    monkeypatch.delenv("__AFL_SHM_ID", raising=False)
    monkeypatch.setenv("AFL_MAP_SIZE", "4096")
    path = tmp_path / "input"
    with Harness.from_config(load_config(PARSER)) as harness:
        bridge = AflBridge(harness, input_path=str(path))
        assert bridge.map.size == 4096

        def run(data: bytes) -> tuple[Status, set[int]]:
            path.write_bytes(data)
            ctypes.memset(bridge.map.address, 0, bridge.map.size)     # afl-fuzz clears it
            outcome = bridge.run_once()
            return outcome.status, {i for i, b in enumerate(bridge.map.read()) if b}

        status, first = run(BENIGN)
        assert status is Status.OK and bridge.ran_slot in first and len(first) > 5
        assert run(BENIGN)[1] == first                 # calibration sees the same map
        assert run(BENIGN[:6])[1] == {bridge.ran_slot}   # a trimmed variant finds nothing new
        status, crash = run(CRASH)
        assert status is Status.CRASH and len(crash) > 1
        bridge.close()


def _shm(size: int) -> tuple[int, int]:
    shm_id = _libc.shmget(IPC_PRIVATE, size, IPC_CREAT | 0o600)
    assert shm_id >= 0, os.strerror(ctypes.get_errno())
    addr = _libc.shmat(shm_id, None, 0)
    return shm_id, addr


@pytest.mark.kvm
def test_forkserver_protocol(tmp_path) -> None:
    """Speak afl-fuzz's side of the protocol to `minivmm afl CONFIG @@`."""
    shm_id, addr = _shm(65536)
    ctl_r, ctl_w = os.pipe()
    st_r, st_w = os.pipe()
    path = tmp_path / "cur_input"
    path.write_bytes(b"")
    env = dict(os.environ, __AFL_SHM_ID=str(shm_id), PYTHONPATH=str(ROOT))

    for fd in (198, 199):
        try:
            os.fstat(fd)
            pytest.skip(f"fd {fd} is in use in the test process")
        except OSError:
            pass
    os.dup2(ctl_r, 198)
    os.dup2(st_w, 199)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "minivmm", "afl", str(PARSER), str(path)], env=env,
                                pass_fds=(198, 199), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        for fd in (198, 199, ctl_r, st_w):
            os.close(fd)
    try:
        def read_u32() -> int:
            data = b""
            while len(data) < 4:
                chunk = os.read(st_r, 4 - len(data))
                assert chunk, f"bridge closed the pipe: {proc.stderr.read().decode() if proc.poll() is not None else ''}"
                data += chunk
            return struct.unpack("<I", data)[0]

        assert read_u32() == 0                                   # hello
        statuses, pids = [], set()
        for data in (BENIGN, CRASH, BENIGN):
            path.write_bytes(data)
            ctypes.memset(addr, 0, 65536)
            os.write(ctl_w, b"\0\0\0\0")
            pids.add(read_u32())
            statuses.append(read_u32())
            assert any(ctypes.string_at(addr, 65536))             # coverage written
        assert statuses[0] == 0 and statuses[2] == 0
        assert os.WIFSIGNALED(statuses[1]) and os.WTERMSIG(statuses[1]) == signal.SIGSEGV
        helper = pids.pop()
        assert not pids and helper != proc.pid
        os.kill(helper, signal.SIGKILL)                          # afl-fuzz's timeout kill
        time.sleep(0.3)                                          # (afl-fuzz then reads a status first)
        path.write_bytes(BENIGN)
        os.write(ctl_w, b"\0\0\0\0")
        assert read_u32() not in (0, helper)                     # a new helper
        assert read_u32() == 0
    finally:
        os.close(ctl_w)
        assert proc.wait(timeout=20) == 0
        os.close(st_r)
        _libc.shmctl(shm_id, IPC_RMID, None)


@pytest.mark.kvm
def test_single_run_without_afl_kills_itself_on_a_crash(tmp_path) -> None:
    crash = tmp_path / "crash"
    crash.write_bytes(CRASH)
    benign = tmp_path / "ok"
    benign.write_bytes(BENIGN)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("__AFL_SHM_ID", None)
    cmd = [sys.executable, "-m", "minivmm", "afl", str(PARSER)]
    assert subprocess.run(cmd + [str(benign)], env=env, capture_output=True).returncode == 0
    done = subprocess.run(cmd + [str(crash)], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGSEGV and "#PF" in done.stderr
    with open(crash, "rb") as stdin:
        assert subprocess.run(cmd, env=env, stdin=stdin, capture_output=True).returncode == -signal.SIGSEGV


@pytest.mark.kvm
@pytest.mark.slow
def test_afl_fuzz_session_finds_the_bug(tmp_path) -> None:
    afl = shutil.which("afl-fuzz")
    if afl is None:
        pytest.skip("afl-fuzz is not installed (apt-get install -y afl++)")
    from minivmm.config import load_config
    seeds = tmp_path / "in"
    seeds.mkdir()
    (seeds / "sum").write_bytes(b"FUZZ\x01hello")
    (seeds / "echo").write_bytes(b"FUZZ\x03hi")
    with Harness.from_config(load_config(PARSER)) as harness:
        assert write_dictionary(harness, tmp_path / "parser.dict") >= 4
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), AFL_SKIP_BIN_CHECK="1", AFL_NO_UI="1",
               AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES="1", AFL_SKIP_CPUFREQ="1",
               AFL_NO_AFFINITY="1", AFL_FORKSRV_INIT_TMOUT="30000")
    done = subprocess.run([afl, "-i", str(seeds), "-o", str(out), "-V", "20", "-t", "1000",
                           "-x", str(tmp_path / "parser.dict"), "--",
                           sys.executable, "-m", "minivmm", "afl", str(PARSER)],
                          env=env, capture_output=True, text=True, timeout=120)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    stats = dict(line.split(":", 1) for line in (out / "default" / "fuzzer_stats").read_text().splitlines())
    stats = {k.strip(): v.strip() for k, v in stats.items()}
    assert int(stats["execs_done"]) > 1000, stats
    assert int(stats["corpus_count"]) > 2, stats               # coverage found new paths
    assert float(stats["stability"].rstrip("%")) == 100.0
    crashes = [p for p in (out / "default" / "crashes").iterdir() if p.name.startswith("id:")]
    assert crashes, log
    assert all(",sig:11," in p.name for p in crashes)
    assert any(p.read_bytes().startswith(b"FUZZ\x02") for p in crashes)
