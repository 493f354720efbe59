"""Real static Linux programs under minivmm's Linux personality, compared byte for byte with
the same binary run natively: Debian's busybox-static applets, gcc -static, gcc -static-pie
and musl-gcc -static builds of a C program."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from minivmm.linux import LinuxProcess

pytestmark = pytest.mark.kvm

BUSYBOX = "/bin/busybox"
GUESTS = Path(__file__).resolve().parent.parent / "guests" / "linux"
TEXT = b"".join(b"line %d of the exposed file: %s\n" % (i, b"abcxyz"[i % 6:] * (i % 5)) for i in range(300))
TEXT += b"pear\napple\npear\nbanana\napple\napple\n"
needs_busybox = pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="Debian's busybox-static is not installed")


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "data.txt").write_bytes(TEXT)
    (tmp_path / "data.gz").write_bytes(gzip.compress(TEXT, mtime=0))
    (tmp_path / "fruit").write_bytes(b"pear\napple\npear\npear\nbanana\n")
    (tmp_path / "big").write_bytes(bytes(range(256)) * 4096 + b"tail end\n")
    huge = bytes(range(251)) * 13000                                             # 3.1 MiB: two refills
    (tmp_path / "huge").write_bytes(huge)
    (tmp_path / "huge2").write_bytes(huge[:3_000_000] + b"!" + huge[3_000_001:])
    (tmp_path / "vast").write_bytes(bytes(range(253)) * 40000)                 # 9.7 MiB: past the window area
    return tmp_path


def native(argv, cwd, stdin=b"", path=BUSYBOX):
    done = subprocess.run([path] + list(argv[1:]), executable=path, cwd=cwd, input=stdin,
                          capture_output=True, env={"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C"},
                          timeout=30)
    status = done.returncode if done.returncode >= 0 else 128 - done.returncode
    return status, done.stdout, done.stderr


def emulated(argv, cwd, stdin=b"", path=BUSYBOX, **kwargs):
    result = LinuxProcess(path, argv, cwd=str(cwd), stdin=stdin, capture=True, **kwargs).run(timeout=60)
    return result.status, result.stdout, result.stderr


APPLETS = [
    (["busybox", "echo", "hello", "world"], b""),
    (["busybox", "printf", "%s=%05d %x\\n", "a", "42", "255", "b", "7", "16"], b""),
    (["busybox", "seq", "1", "3", "40"], b""),
    (["busybox", "wc", "data.txt"], b""),
    (["busybox", "wc", "-l"], TEXT),
    (["busybox", "sort", "-r", "data.txt"], b""),
    (["busybox", "sort", "-u", "fruit"], b""),
    (["busybox", "uniq", "-c"], b"a\na\nb\nc\nc\nc\n"),
    (["busybox", "base64", "data.txt"], b""),
    (["busybox", "base64", "-d"], b"aGVsbG8gd29ybGQK\n"),
    (["busybox", "md5sum", "data.txt"], b""),
    (["busybox", "sha256sum", "data.txt", "fruit"], b""),
    (["busybox", "gzip", "-c", "data.txt"], b""),
    (["busybox", "gunzip", "-c", "data.gz"], b""),
    (["busybox", "sed", "-e", "s/line/LINE/g", "-e", "/3/d", "data.txt"], b""),
    (["busybox", "awk", "-F", " ", "{n += $2} END {print n, NR}", "data.txt"], b""),
    (["busybox", "tr", "a-z", "A-Z"], b"shout this\n"),
    (["busybox", "head", "-n", "5", "data.txt"], b""),
    (["busybox", "tail", "-n", "4", "data.txt"], b""),
    (["busybox", "cat", "fruit", "data.txt"], b""),
    (["busybox", "cat"], TEXT),
    (["busybox", "od", "-A", "x", "-t", "x1z", "fruit"], b""),
    (["busybox", "sha256sum", "big"], b""),                     # reads served by the entry
    (["busybox", "md5sum", "huge", "big", "huge"], b""),         # across window refills
    (["busybox", "cmp", "huge", "huge2"], b""),                  # two files read at once: two windows
    (["busybox", "md5sum", "vast", "huge"], b""),                # the window area filled, refilled, reused
    (["busybox", "dd", "if=huge", "bs=7777", "skip=100", "count=300"], b""),
    (["busybox", "tail", "-c", "5000", "big"], b""),            # lseek leaves the entry's slot
    (["busybox", "dd", "if=big", "bs=1000", "skip=3", "count=2"], b""),
    (["busybox", "cat", "missing-file"], b""),                 # an error: stderr and status 1
    (["busybox", "sha256sum", "-c"], b"0000  fruit\n"),        # a failing check: status 1
]


@needs_busybox
@pytest.mark.parametrize("argv,stdin", APPLETS, ids=[" ".join(a[1:3]) for a, _ in APPLETS])
def test_busybox_applet_matches_native(workdir, argv, stdin):
    expected = native(argv, workdir, stdin)
    assert emulated(argv, workdir, stdin) == expected


def _build(tmp_path, compiler, *flags):
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    out = tmp_path / f"probe-{compiler}{'-'.join(flags)}"
    subprocess.run([compiler, *flags, "-O2", "-o", str(out), str(GUESTS / "probe.c")], check=True)
    return str(out)


@pytest.mark.parametrize("compiler,flags", [("gcc", ("-static",)), ("gcc", ("-static-pie",)),
                                            ("musl-gcc", ("-static",))])
def test_c_program_matches_native(workdir, compiler, flags):
    program = _build(workdir, compiler, *flags)
    for argv in (["probe"], ["probe", "data.txt", "7"], ["probe", "no-such-file"]):
        expected = native(argv, workdir, b"", program)
        assert emulated(argv, workdir, b"", program, env={"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C"}) \
            == expected


@needs_busybox
def test_file_reads_without_exits_unless_a_hook_watches_read(workdir):
    """The built-in kernel's entry serves read() of an exposed file at CPL 3; with a SYSCALL
    hook on read every read exits and reaches the hook, with the same output."""
    expected = native(["busybox", "sha256sum", "big"], workdir)
    fast = LinuxProcess(BUSYBOX, ["busybox", "sha256sum", "big"], cwd=str(workdir), capture=True)
    machine = fast.build()
    try:
        result = fast.result(machine.run(timeout=30))
    finally:
        fast.close()
    assert (result.status, result.stdout, result.stderr) == expected
    assert result.run.exits["EXCEPTION_OR_NMI"] < 40          # 257 reads of 4 KiB natively

    watched = LinuxProcess(BUSYBOX, ["busybox", "sha256sum", "big"], cwd=str(workdir), capture=True)
    machine = watched.build()
    reads = []
    machine.on("syscall", lambda vcpu, event: reads.append(event.result), number=0, when="after")
    try:
        result = watched.result(machine.run(timeout=30))
    finally:
        watched.close()
    assert (result.status, result.stdout, result.stderr) == expected
    assert sum(r for r in reads if r > 0) == (workdir / "big").stat().st_size
