"""Binary-only fuzzing of a static Linux program: a libFuzzer-style harness around zlib's
uncompress (Debian's libz.a) with a planted bug, found by coverage-guided fuzzing and
replayed with `minivmm linux`."""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from minivmm.fuzz.engine import Fuzzer
from minivmm.fuzz.harness import FuzzError, Status
from minivmm.linux import LinuxProcess
from minivmm.linux.fuzz import LinuxHarness

pytestmark = pytest.mark.kvm

LIBZ = "/usr/lib/x86_64-linux-gnu/libz.a"
GUESTS = Path(__file__).resolve().parent.parent / "guests" / "linux"
SEED = zlib.compress(b"BANANA BREAD", 0)
CRASH = zlib.compress(b"BU\x07 and more", 0)


@pytest.fixture(scope="module")
def zlib_fuzz(tmp_path_factory):
    if not os.path.exists(LIBZ):
        pytest.skip("Debian's zlib1g-dev (libz.a) is not installed")
    out = tmp_path_factory.mktemp("zlib") / "zlib_fuzz"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(GUESTS / "zlib_fuzz.c"), LIBZ], check=True)
    return str(out)


def harness(program, **kwargs):
    return LinuxHarness(LinuxProcess(program, ["zlib_fuzz"], capture=True, memory="32M"), **kwargs)


@pytest.mark.parametrize("at", ["LLVMFuzzerTestOneInput", "read"])
def test_runs_are_classified_and_repeatable(zlib_fuzz, at):
    with harness(zlib_fuzz, at=at) as h:
        for _ in range(3):
            ok = h.run(SEED)
            assert ok.status is Status.OK and ok.reason == "exit"
            crash = h.run(CRASH)
            assert crash.status is Status.CRASH and crash.vector == 14
            assert crash.cr2 is not None and crash.cr2 > 0x1000000
        text = h.describe(crash)
        assert "LLVMFuzzerTestOneInput+0x" in text and "mov dword ptr" in text
        used = h.process.space.used_pages
        for data in (SEED, b"", b"x" * 4000, CRASH) * 25:        # inflate's malloc every run
            h.run(data)
        assert h.process.space.used_pages == used                # the break is put back each run


def test_fuzzer_finds_the_planted_bug_within_60_seconds(zlib_fuzz, tmp_path):
    with harness(zlib_fuzz, at="LLVMFuzzerTestOneInput") as h:
        assert len(h.coverage.blocks) > 10000                   # the whole text: libc and zlib too
        fuzzer = Fuzzer(h, seed=3, crashes_dir=tmp_path / "crashes")
        fuzzer.add_seeds([SEED])
        stats = fuzzer.run(seconds=60, until_crash=True)
        assert stats.crashes == 1, stats.line()
        (outcome,) = fuzzer.crashes.values()
        rip = outcome.rip
        assert outcome.vector == 14 and h.process.symbolize(rip).startswith("LLVMFuzzerTestOneInput+")
    crash_file = next((tmp_path / "crashes").glob("crash-*[!t]"))
    replay = subprocess.run([sys.executable, "-m", "minivmm", "linux", zlib_fuzz], stdin=crash_file.open("rb"),
                            capture_output=True, timeout=60)
    assert replay.returncode == 139
    assert f"rip={rip:#x}".encode() in replay.stderr and b"LLVMFuzzerTestOneInput+" in replay.stderr
    assert b"SIGSEGV" in replay.stderr


def test_missing_symbol_is_an_error(zlib_fuzz):
    with pytest.raises(FuzzError, match="no symbol 'NoSuchFunction'"):
        harness(zlib_fuzz, at="NoSuchFunction")


def _config(tmp_path, program, fuzz, argv="[zlib_fuzz]"):
    path = tmp_path / "zlib.yaml"
    path.write_text(f"version: 1\nmachine: {{memory: 32M, timeout: 20}}\n"
                    f"image: {{type: linux, path: {program}, argv: {argv}}}\n"
                    + (f"fuzz: {{{fuzz}}}\n" if fuzz else ""))
    return path


def minivmm(*args):
    return subprocess.run([sys.executable, "-m", "minivmm", *map(str, args)], capture_output=True, timeout=120)


@pytest.mark.parametrize("symbol", ["LLVMFuzzerTestOneInput", "stdin", "'@@'"])
def test_minivmm_fuzz_and_run_input_on_a_linux_config(zlib_fuzz, tmp_path, symbol):
    argv = "[zlib_fuzz, '@@']" if symbol == "'@@'" else "[zlib_fuzz]"
    config = _config(tmp_path, zlib_fuzz, f"input_symbol: {symbol}, timeout: 0.5", argv)
    assert minivmm("check", config).returncode == 0
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    corpus.mkdir()
    (corpus / "seed").write_bytes(SEED)
    if symbol == "LLVMFuzzerTestOneInput":
        done = minivmm("fuzz", config, "--corpus", corpus, "--crashes", crashes, "--seed", 3, "--runs", 5000)
        assert done.returncode == 0, done.stderr
        assert b"1 unique crashes" in done.stdout, done.stdout
    else:
        (crashes).mkdir()
        (crashes / "crash-given").write_bytes(CRASH)          # the slower read modes: replay only
    crash = next(p for p in crashes.iterdir() if p.suffix != ".txt")
    replay = minivmm("run", config, "--input", crash)
    assert replay.returncode == 139, replay.stderr
    assert b"#PF" in replay.stderr and b"LLVMFuzzerTestOneInput+0x" in replay.stderr
    assert b"mov dword ptr" in replay.stderr
    benign = tmp_path / "benign"
    benign.write_bytes(SEED)
    assert minivmm("run", config, "--input", benign).returncode == 0


def test_input_file_of_argv_is_fuzzed_through_the_file(zlib_fuzz, tmp_path):
    """'@@' in argv: the program opens a file the harness owns; each run's input is its content
    (fstat sees the input's size), and what the program read decides its path."""
    config = _config(tmp_path, zlib_fuzz, "input_symbol: '@@', timeout: 0.5", "[zlib_fuzz, '@@']")
    from minivmm.config import load_config
    from minivmm.linux.config import harness_from_config
    with harness_from_config(load_config(config)) as h:
        path = h.process.argv[1]
        assert os.path.basename(path) == "input" and h.input_folder is not None
        for data, status in ((SEED, Status.OK), (CRASH, Status.CRASH), (b"", Status.OK)):
            outcome = h.run(data)
            assert outcome.status is status, outcome
            assert Path(path).read_bytes() == data
        assert h.run(SEED).status is Status.OK
        out = bytes(h.process.streams[1].output)
        assert out == f"ok: {len(SEED)} bytes\n".encode(), out
        corpus = tmp_path / "corpus"
    assert not os.path.exists(path)                               # the harness removed its file
    corpus.mkdir()
    (corpus / "seed").write_bytes(SEED)
    done = minivmm("fuzz", config, "--corpus", corpus, "--crashes", tmp_path / "crashes", "--runs", 300)
    assert done.returncode == 0 and b"runs" in done.stdout, done.stderr
    jobs = minivmm("fuzz", config, "--corpus", corpus, "--crashes", tmp_path / "crashes", "--runs", 200,
                   "--jobs", 2)
    assert jobs.returncode == 0 and b"200 runs" in jobs.stdout, jobs.stderr
    plain = minivmm("run", config)
    assert plain.returncode != 0 and b"--input FILE" in plain.stderr, plain.stderr
    mismatched = _config(tmp_path, zlib_fuzz, "input_symbol: stdin", "[zlib_fuzz, '@@']")
    checked = minivmm("check", mismatched)
    assert checked.returncode != 0 and b"fuzz.input_symbol" in checked.stderr and b"'@@'" in checked.stderr


def test_afl_bridge_single_run_on_a_linux_config(zlib_fuzz, tmp_path):
    import signal
    config = _config(tmp_path, zlib_fuzz, "input_symbol: LLVMFuzzerTestOneInput, timeout: 0.5")
    (tmp_path / "crash").write_bytes(CRASH)
    (tmp_path / "ok").write_bytes(SEED)
    env = {k: v for k, v in os.environ.items() if k != "__AFL_SHM_ID"}
    cmd = [sys.executable, "-m", "minivmm", "afl", str(config)]
    assert subprocess.run(cmd + [str(tmp_path / "ok")], env=env, capture_output=True, timeout=60).returncode == 0
    done = subprocess.run(cmd + [str(tmp_path / "crash")], env=env, capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGSEGV and b"mov dword ptr" in done.stderr


@pytest.mark.slow
def test_afl_fuzz_session_on_a_linux_config(zlib_fuzz, tmp_path):
    import shutil
    afl = shutil.which("afl-fuzz")
    if afl is None:
        pytest.skip("afl-fuzz is not installed (apt-get install -y afl++)")
    config = _config(tmp_path, zlib_fuzz, "input_symbol: LLVMFuzzerTestOneInput, timeout: 0.5")
    seeds = tmp_path / "in"
    seeds.mkdir()
    (seeds / "seed").write_bytes(SEED)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), AFL_SKIP_BIN_CHECK="1",
               AFL_NO_UI="1", AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES="1", AFL_SKIP_CPUFREQ="1",
               AFL_NO_AFFINITY="1", AFL_FORKSRV_INIT_TMOUT="60000")
    done = subprocess.run([afl, "-i", str(seeds), "-o", str(out), "-V", "45", "-t", "2000", "--",
                           sys.executable, "-m", "minivmm", "afl", str(config)],
                          env=env, capture_output=True, text=True, timeout=180)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    crashes = [p for p in (out / "default" / "crashes").iterdir() if p.name.startswith("id:")]
    assert crashes and all(",sig:11," in p.name for p in crashes), log
