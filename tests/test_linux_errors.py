"""The Linux personality's answers to bad programs, faults, limits and calls it does not
emulate, and the `minivmm linux` command line (stdin passthrough, exit status, --strace)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minivmm.linux import LinuxImageError, LinuxProcess

pytestmark = pytest.mark.kvm

BUSYBOX = "/bin/busybox"
GUESTS = Path(__file__).resolve().parent.parent / "guests" / "linux"
needs_busybox = pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="Debian's busybox-static is not installed")


@pytest.fixture(scope="module")
def misc(tmp_path_factory):
    out = tmp_path_factory.mktemp("misc") / "misc"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(GUESTS / "misc.c")], check=True)
    return str(out)


def run(path, *args, **kwargs):
    kwargs.setdefault("capture", True)
    return LinuxProcess(path, [os.path.basename(path), *args], **kwargs).run(timeout=30)


# -- programs minivmm cannot run ----------------------------------------------------------
def test_not_an_elf(tmp_path):
    script = tmp_path / "script"
    script.write_bytes(b"#!/bin/sh\necho hi\n")
    with pytest.raises(LinuxImageError, match="not an ELF executable.*script") as caught:
        LinuxProcess(str(script))
    assert caught.value.status == 126
    (tmp_path / "text").write_bytes(b"hello")
    with pytest.raises(LinuxImageError, match="not an ELF executable"):
        LinuxProcess(str(tmp_path / "text"))


def test_dynamically_linked_suggests_static(tmp_path):
    source = tmp_path / "dyn.c"
    source.write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "dyn"), str(source)], check=True)
    with pytest.raises(LinuxImageError, match=r"dynamically linked \(interpreter /lib.*-static"):
        LinuxProcess(str(tmp_path / "dyn"))


@needs_busybox
def test_wrong_architecture_and_truncated(tmp_path):
    data = bytearray(Path(BUSYBOX).read_bytes())
    arm = tmp_path / "arm"
    arm.write_bytes(bytes(data[:18]) + (183).to_bytes(2, "little") + bytes(data[20:]))
    with pytest.raises(LinuxImageError, match="built for AArch64, not x86-64"):
        LinuxProcess(str(arm))
    elf32 = tmp_path / "elf32"
    elf32.write_bytes(bytes(data[:4]) + b"\x01" + bytes(data[5:]))
    with pytest.raises(LinuxImageError, match="32-bit"):
        LinuxProcess(str(elf32))
    for size in (40, 2000, len(data) // 2):
        cut = tmp_path / f"cut{size}"
        cut.write_bytes(bytes(data[:size]))
        with pytest.raises(LinuxImageError, match="truncated"):
            LinuxProcess(str(cut))


def test_missing_program():
    with pytest.raises(LinuxImageError, match="no such file") as caught:
        LinuxProcess("/no/such/program")
    assert caught.value.status == 127


# -- what the program may see -----------------------------------------------------------------
@needs_busybox
def test_unexposed_files_are_refused(tmp_path):
    (tmp_path / "inside").write_bytes(b"inside\n")
    os.symlink("/etc/hostname", tmp_path / "escape")
    for path in ("/etc/hostname", "escape", "../" * 8 + "etc/hostname"):
        result = run(BUSYBOX, "cat", path, cwd=str(tmp_path))
        assert result.status == 1 and b"Permission denied" in result.stderr, path
        assert any("is not exposed" in note for note in result.notes)
    assert run(BUSYBOX, "cat", "inside", cwd=str(tmp_path)).stdout == b"inside\n"
    sandboxed = run(BUSYBOX, "cat", "inside", cwd=str(tmp_path), sandbox=True)
    assert sandboxed.status == 1 and sandboxed.stdout == b""
    exposed = run(BUSYBOX, "cat", "/etc/hostname", cwd=str(tmp_path), expose=["/etc/hostname"])
    assert exposed.stdout == Path("/etc/hostname").read_bytes()


@needs_busybox
def test_writes_need_a_writable_root(tmp_path):
    result = run(BUSYBOX, "tee", "out", cwd=str(tmp_path), stdin=b"data\n")
    assert result.status == 1 and not (tmp_path / "out").exists()
    assert any("read-only" in note for note in result.notes)
    result = run(BUSYBOX, "tee", "out", cwd=str(tmp_path), stdin=b"data\n", expose=[f"{tmp_path}:rw"])
    assert result.status == 0 and (tmp_path / "out").read_bytes() == b"data\n"


# -- faults, signals, limits, calls minivmm does not have ---------------------------------------------
def test_faults_are_fatal_signals(misc):
    result = run(misc, "write-rodata")
    assert result.status == 128 + 11 and result.signal == 11
    assert "SIGSEGV" in result.message and "#PF" in result.message and "in main+" in result.message
    null = run(misc, "null")
    assert null.status == 139 and "cr2=0x0" in null.message
    protected = run(misc, "prot-none")                     # rights taken away after the start
    assert protected.status == 139 and protected.stdout == b"before\n" and "error_code=0x4" in protected.message
    aborted = run(misc, "abort")
    assert (aborted.status, aborted.signal) == (134, 6)


def test_memory_limit(misc):
    result = run(misc, "hog", memory="32M")
    assert result.status == 1
    allocated = int(result.stdout.split()[1])
    assert 10 < allocated < 32
    assert any("memory limit (32 MiB) is reached" in note for note in result.notes)


def test_unknown_syscalls_and_fork(misc):
    result = run(misc, "unknown")
    assert result.stdout == b"-1 -1 38\nfork=-1 errno=38\n"
    assert sum("system call 999" in note for note in result.notes) == 1          # once per number
    assert any("runs one process" in note for note in result.notes)


def test_seeded_randomness_and_deterministic_clock(misc):
    first = run(misc, "random", seed=5, deterministic_clock=True).stdout
    assert first == run(misc, "random", seed=5, deterministic_clock=True).stdout
    assert first.split()[1] == b"1700000000"
    assert first.split()[0] != run(misc, "random", seed=6, deterministic_clock=True).stdout.split()[0]


# -- the command line ------------------------------------------------------------------------------
def cli(*args, stdin=b"", cwd=None):
    return subprocess.run([sys.executable, "-m", "minivmm", "linux", *args], input=stdin, capture_output=True,
                          cwd=cwd, timeout=60)


@needs_busybox
def test_cli_stdin_status_and_strace(tmp_path, misc):
    done = cli("--strace", BUSYBOX, "tr", "a-z", "A-Z", stdin=b"shout\n")
    assert done.returncode == 0 and done.stdout == b"SHOUT\n"
    lines = done.stderr.decode().splitlines()
    assert 'read(0, "shout\\n", 4096) = 6' in lines or any(l.startswith('read(0, "shout\\n"') for l in lines)
    assert 'write(1, "SHOUT\\n", 6) = 6' in lines and lines[-1] == "exit_group(0) = ?"
    assert cli(BUSYBOX, "sh", "-c", "exit 9").returncode == 9
    crashed = cli(misc, "null")
    assert crashed.returncode == 139 and b"SIGSEGV" in crashed.stderr
    assert cli("/no/such/prog").returncode == 127
    (tmp_path / "f").write_bytes(b"x\n")
    assert cli(BUSYBOX, "wc", "-l", "f", cwd=tmp_path).stdout == b"1 f\n"
    assert cli("--sandbox", BUSYBOX, "wc", "-l", "f", cwd=tmp_path).returncode == 1


# -- YAML configs ------------------------------------------------------------------------------------
def test_linux_config_errors_name_the_key(tmp_path):
    from minivmm.config import ConfigError, build_machine, load_config
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nimages:\n  - {type: linux, path: /bin/sh}\n  - {type: binary, path: /bin/sh, "
                   "address: 0x100000}\n")
    with pytest.raises(ConfigError, match="only image"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("version: 1\nimage: {type: linux, path: /bin/sh, argx: [sh]}\n")
    with pytest.raises(ConfigError, match="argx"):
        load_config(typo)
    text = tmp_path / "text"
    text.write_text("not a program\n")
    notelf = tmp_path / "notelf.yaml"
    notelf.write_text(f"version: 1\nimage: {{type: linux, path: {text}}}\n")
    with pytest.raises(ConfigError, match="not an ELF"):
        build_machine(load_config(notelf))


@needs_busybox
def test_linux_config_runs_the_program(tmp_path):
    (tmp_path / "in").write_bytes(b"b\na\nb\n")
    config = tmp_path / "sort.yaml"
    config.write_text("version: 1\nmachine: {memory: 32M}\n"
                      f"image: {{type: linux, path: {BUSYBOX}, argv: [busybox, sort, -u], stdin: in, "
                      "env: {LANG: C}}\nexpect: {result: exit, exit_code: 0}\n")
    done = subprocess.run([sys.executable, "-m", "minivmm", "run", str(config)], capture_output=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, b"a\nb\n")
