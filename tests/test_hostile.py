"""Hostile and broken configs and command lines: each ends with its documented exit status and
one clear line on stderr (naming the file and line where a file is involved), never a traceback.

Three groups:

- `tests/hostile/*.yaml`: static files whose first line is `# expect: STATUS LINE TEXT`
  (LINE `-` for a valid file), checked in-process with `check` and `run`;
- generated files (bytes YAML cannot hold in a text fixture, special files, huge
  files) and command-line invocations, in-process too;
- the cases about resources, run as a `python -m minivmm` child each: its exit
  status, its peak RSS (from `os.wait4`, this child only) and its wall time.

Every case runs with the working folder in `tmp_path` and checks nothing is left there.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from minivmm import cli

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "tests" / "hostile").glob("*.yaml"))
HELLO = ROOT / "guests" / "hello_long.S"
HELLO_CONFIG = ROOT / "configs" / "hello_long.yaml"
VALID = f"version: 1\nimages: [{{type: asm, source: {HELLO}}}]\n"
_HEADER = re.compile(r"^# expect: (\d+) (\d+|-) (.*)$")

MAX_RSS_KIB = 256 * 1024
MAX_WALL_S = 5.0


# -- helpers ------------------------------------------------------------------------------------

def assert_one_line(err: str, file: str | None = None, line: int | None = None) -> str:
    """`err` is exactly one `minivmm...` line, with no traceback, naming `file` (and `line`)."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), repr(err)
    text = lines[0]
    assert text.startswith("minivmm"), text
    if file is not None:
        assert f"{file}:{line}:" in text if line is not None else file in text, text
    return text


def run_in_process(capsys, args: list[str]) -> tuple[int, str, str]:
    status = cli.main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The working folder for a case: `tmp_path`, checked to hold only what the test put there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINIVMM_DEBUG", raising=False)
    monkeypatch.delenv("MINIVMM_MAX_CONFIG_SIZE", raising=False)
    yield tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(_created.pop(tmp_path, [])), \
        "the command left files behind"


_created: dict[Path, list[str]] = {}


def make(folder: Path, name: str, content: bytes | str) -> Path:
    """Write a case file in `folder` and remember it as expected there."""
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    _created.setdefault(folder, []).append(name)
    return path


# -- the static corpus ------------------------------------------------------------------------

def _header(path: Path) -> tuple[int, int | None, str]:
    match = _HEADER.match(path.read_bytes().split(b"\n", 1)[0].decode().rstrip("\r"))
    assert match, f"{path.name}: the first line must be '# expect: STATUS LINE TEXT'"
    status, line, text = match.groups()
    return int(status), None if line == "-" else int(line), text


def test_the_corpus_is_large() -> None:
    assert len(CORPUS) + len(GENERATED) + len(COMMAND_LINES) + len(CHILDREN) >= 60


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_static_corpus_check_and_run(capsys, workdir: Path, path: Path) -> None:
    status, line, text = _header(path)
    got, out, err = run_in_process(capsys, ["check", str(path)])
    assert got == status, err
    if status == 0:
        assert err == "" and f"{path}: ok" in out
        return
    assert text in assert_one_line(err, str(path), line)
    got_run, out_run, err_run = run_in_process(capsys, ["run", str(path)])
    assert (got_run, err_run, out_run) == (status, err, "")          # run rejects it the same way


# -- generated files ----------------------------------------------------------------------------

@dataclass
class Case:
    """A generated config: its bytes (or a function making the file), the status, line and text."""
    name: str
    content: bytes | Callable[[Path], Path]
    status: int = 2
    line: int | None = None
    text: str = ""
    args: list[str] = field(default_factory=lambda: ["check"])
    env: dict[str, str] = field(default_factory=dict)


def _symlink_loop(folder: Path) -> Path:
    for a, b in (("loop_a.yaml", "loop_b.yaml"), ("loop_b.yaml", "loop_a.yaml")):
        (folder / a).symlink_to(folder / b)
        _created.setdefault(folder, []).append(a)
    return folder / "loop_a.yaml"


def _dangling(folder: Path) -> Path:
    (folder / "dangling.yaml").symlink_to(folder / "nowhere.yaml")
    _created.setdefault(folder, []).append("dangling.yaml")
    return folder / "dangling.yaml"


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.yaml")
    _created.setdefault(folder, []).append("pipe.yaml")
    return folder / "pipe.yaml"


def _directory(folder: Path) -> Path:
    (folder / "dir.yaml").mkdir()
    _created.setdefault(folder, []).append("dir.yaml")
    return folder / "dir.yaml"


def _missing(folder: Path) -> Path:
    return folder / "missing.yaml"


def _device(device: str) -> Callable[[Path], Path]:
    return lambda folder: Path(device)


GENERATED = [
    Case("nul_byte", b"version: 1\ndescription: a\0b\n", line=2, text="got a NUL byte"),
    Case("bell_character", b"version: 1\n\x07: 1\n", line=2, text="the control character U+0007"),
    Case("escape_character", VALID.encode() + b"description: \x1b[31mred\n", line=3, text="U+001B"),
    Case("non_utf8", b"version: 1\nimages: [\xff\xfe]\n", line=2, text="expected UTF-8 text, got the byte 0xff"),
    Case("latin1", VALID.encode() + b"description: caf\xe9\n", line=3, text="got the byte 0xe9"),
    Case("truncated_utf8", VALID.encode() + b"description: \xe2\x82\n", line=3, text="expected UTF-8 text"),
    Case("utf16_bom", "version: 1\n".encode("utf-16"), line=1, text="got a UTF-16 byte-order mark"),
    Case("utf32_bom", "version: 1\n".encode("utf-32"), line=1, text="got a UTF-32 byte-order mark"),
    Case("utf8_bom_valid", b"\xef\xbb\xbf" + VALID.encode(), status=0),
    Case("utf8_bom_only", b"\xef\xbb\xbf", line=1, text="required key 'version' is missing"),
    Case("empty_file", b"", line=1, text="required key 'version' is missing"),
    Case("lone_cr_endings", VALID.replace("\n", "\r").encode() + b"machine: {memory: lots}\r", line=3,
         text="expected a size"),
    Case("too_large", b"# padding\n" * 110_000, text="expected a config of at most 1048576 bytes"),
    Case("too_large_for_the_env_limit", VALID.encode() + b"#" * 4096, text="at most 1024 bytes",
         env={"MINIVMM_MAX_CONFIG_SIZE": "1K"}),
    Case("env_limit_raised", VALID.encode() + b"# " + b"x" * (1 << 20) + b"\n", status=0,
         env={"MINIVMM_MAX_CONFIG_SIZE": "2M"}),
    Case("env_limit_invalid", VALID.encode(), text="MINIVMM_MAX_CONFIG_SIZE: expected a positive size",
         env={"MINIVMM_MAX_CONFIG_SIZE": "lots"}),
    Case("long_string", VALID.encode() + b"description: " + b"x" * 70_000 + b"\n", line=3,
         text="at most 65536 characters"),
    Case("many_values", VALID.encode() + b"vmcs:\n  exception_bitmap:\n" + b"    - 6\n" * 100_001,
         line=99_997, text="at most 100000 values"),
    Case("directory", _directory, text="expected a regular file, got a directory"),
    Case("missing", _missing, text="no such config file"),
    Case("symlink_loop", _symlink_loop, text="Too many levels of symbolic links"),
    Case("dangling_symlink", _dangling, text="no such config file"),
    Case("fifo", _fifo, text="expected a regular file, got a FIFO"),
    Case("dev_null", _device("/dev/null"), text="expected a regular file, got a character device"),
    Case("dev_zero", _device("/dev/zero"), text="expected a regular file, got a character device"),
]


def _materialize(case: Case, folder: Path) -> Path:
    if callable(case.content):
        return case.content(folder)
    return make(folder, f"{case.name}.yaml", case.content)


@pytest.mark.parametrize("case", GENERATED, ids=[c.name for c in GENERATED])
def test_generated_file(capsys, monkeypatch: pytest.MonkeyPatch, workdir: Path, case: Case) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    path = _materialize(case, workdir)
    status, out, err = run_in_process(capsys, [*case.args, str(path)])
    assert status == case.status, err
    if status == 0:
        assert err == ""
        return
    text = assert_one_line(err, None if case.env and "invalid" in case.name else str(path), case.line)
    assert case.text in text


def test_decoding_errors_give_the_column(capsys, workdir: Path) -> None:
    path = make(workdir, "col.yaml", b"version: 1\ndescription: \xc3\xa9t\xc3\xa9 \xff\n")
    status, _, err = run_in_process(capsys, ["check", str(path)])
    assert status == 2 and f"{path}:2:18: expected UTF-8 text" in assert_one_line(err)


# -- command lines ------------------------------------------------------------------------------

COMMAND_LINES = [
    (["run", str(HELLO_CONFIG), "--timeout", "nan"], "argument --timeout: expected a finite number"),
    (["run", str(HELLO_CONFIG), "--timeout", "inf"], "argument --timeout: expected a finite number"),
    (["run", str(HELLO_CONFIG), "--timeout=-inf"], "argument --timeout: expected a positive number"),
    (["run", str(HELLO_CONFIG), "--timeout", "-1"], "argument --timeout: expected a positive number"),
    (["run", str(HELLO_CONFIG), "--timeout", "0"], "argument --timeout: expected a positive number"),
    (["run", str(HELLO_CONFIG), "--timeout", "1e999"], "argument --timeout: expected a finite number"),
    (["run", str(HELLO_CONFIG), "--timeout", "9" * 5000], "argument --timeout: expected a positive number"),
    (["run", str(HELLO_CONFIG), "--timeout", "soon"], "argument --timeout: expected a positive number"),
    (["run", str(HELLO_CONFIG), "--max-exits", "0"], "argument --max-exits: expected a positive integer"),
    (["run", str(HELLO_CONFIG), "--max-exits", "-1"], "argument --max-exits: expected a positive integer"),
    (["run", str(HELLO_CONFIG), "--max-exits", "1.5"], "argument --max-exits: expected a positive integer"),
    (["run", str(HELLO_CONFIG), "--max-exits", str(1 << 64)], "argument --max-exits: expected a positive"),
    (["run", str(HELLO_CONFIG), "--max-exits", "9" * 5000], "argument --max-exits: expected a positive"),
    (["trace", str(HELLO_CONFIG), "--max", "0"], "argument --max: expected a positive integer"),
    (["trace", str(HELLO_CONFIG), "--max", "-5"], "argument --max: expected a positive integer"),
    (["run", str(HELLO_CONFIG), "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["frobnicate"], "invalid choice"),
    ([], "the following arguments are required"),
    (["check", str(HELLO_CONFIG), "--set", "machine.memory"], "expected key=value"),
    (["check", str(HELLO_CONFIG), "--set", "=4M"], "expected a dotted key before '='"),
    (["check", str(HELLO_CONFIG), "--set", "machine.timeout=.inf"], "machine.timeout: expected a finite"),
    (["check", str(HELLO_CONFIG), "--set", "machine.timeout=.nan"], "machine.timeout: expected a finite"),
    (["check", str(HELLO_CONFIG), "--set", "machine.max_exits=-1"], "machine.max_exits: expected a positive"),
    (["check", str(HELLO_CONFIG), "--set", "machine.memory=" + "[" * 100], "levels of nesting"),
    (["check", str(HELLO_CONFIG), "--set", "description=!!python/object/apply:os.system [x]"],
     "got the YAML tag !!python/object/apply:os.system"),
    (["check", str(HELLO_CONFIG), "--set", "description=a\x00b"], "got a NUL byte"),
    (["check", str(HELLO_CONFIG), "--set", "description=[1, 2"], "invalid YAML"),
    (["check", str(HELLO_CONFIG), "--set", "description=*x"], "alias *x refers to no anchor"),
    (["check", str(HELLO_CONFIG), "--set", ".".join(["a"] * 40) + "=1"], "at most 32 parts"),
    (["check", str(HELLO_CONFIG), "--set", "images[99999999999999999999].type=asm"], "no list item"),
    (["check", str(HELLO_CONFIG), "--set", "machine.memory=x\ny"], "machine.memory: expected a size"),
]


@pytest.mark.parametrize("args, text", COMMAND_LINES, ids=[f"cli{i}" for i in range(len(COMMAND_LINES))])
def test_command_line_rejections(capsys, workdir: Path, args: list[str], text: str) -> None:
    status, out, err = run_in_process(capsys, args)
    assert status == 2 and out == ""
    assert text in assert_one_line(err)


def test_debug_adds_the_traceback(capsys, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make(workdir, "bad.yaml", "version: 2\n")
    status, _, err = run_in_process(capsys, ["check", str(path), "--debug"])
    assert status == 2 and "Traceback" in err and err.splitlines()[-1].startswith(f"minivmm: {path}:1:")
    monkeypatch.setenv("MINIVMM_DEBUG", "1")
    status, _, err = run_in_process(capsys, ["check", str(path)])
    assert status == 2 and "Traceback" in err


def test_an_unexpected_exception_is_a_bug_report(capsys, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("surprise\nwith a second line")
    monkeypatch.setattr(cli, "load_config", broken)
    status, _, err = run_in_process(capsys, ["check", str(HELLO_CONFIG)])
    assert status == 70
    text = assert_one_line(err)
    assert "RuntimeError: surprise\\nwith a second line" in text and "this is a minivmm bug" in text
    status, _, err = run_in_process(capsys, ["--debug", "check", str(HELLO_CONFIG)])
    assert status == 70 and "Traceback" in err and "this is a minivmm bug" in err.splitlines()[-1]


def test_check_json(capsys, workdir: Path) -> None:
    status, out, _ = run_in_process(capsys, ["check", "--json", str(HELLO_CONFIG)])
    report = json.loads(out)
    assert status == 0 and report["ok"] is True and report["errors"] == [] and report["mode"] == "long"
    path = make(workdir, "bad.yaml", VALID + "machine: {timeout: .inf}\n")
    status, out, err = run_in_process(capsys, ["check", "--json", str(path)])
    report = json.loads(out)
    assert status == 2 and report["ok"] is False
    [error] = report["errors"]
    assert error["where"] == f"{path}:3" and error["key"] == "machine.timeout"
    assert error["message"].startswith("expected a finite number of seconds")
    assert error["text"] in assert_one_line(err, str(path), 3)


# -- expect: checked by run ---------------------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("override, failure", [
    ("expect.exit_code=3", "expected exit code 3, got 0"),
    ("expect.result=timeout", "expected result 'timeout', got 'exit'"),
    ("expect.console=Goodbye", "expected the console to contain 'Goodbye', got 'Hello from long mode!\\n'"),
])
def test_run_checks_expect(capfd, workdir: Path, override: str, failure: str) -> None:
    assert cli.main(["run", str(HELLO_CONFIG), "--set", override]) == 1
    out, err = capfd.readouterr()
    assert out == "Hello from long mode!\n"
    assert f"{HELLO_CONFIG}: expectation failed: {failure}" in assert_one_line(err)
    assert cli.main(["run", str(HELLO_CONFIG), "--set", override, "--no-expect"]) == 0
    assert capfd.readouterr().err == ""


@pytest.mark.kvm
def test_run_json_reports_the_expectation(capsys, workdir: Path) -> None:
    assert cli.main(["run", "--json", str(HELLO_CONFIG), "--set", "expect.exit_code=9"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["status"] == 1 and report["expectation"] == {
        "ok": False, "failures": ["expected exit code 9, got 0"]}
    assert cli.main(["run", "--json", str(HELLO_CONFIG)]) == 0
    assert json.loads(capsys.readouterr().out)["expectation"] == {"ok": True, "failures": []}


# -- children: resources, tracebacks, pipes -----------------------------------------------------

@dataclass
class Child:
    """A `python -m minivmm` run: its status, stdout, stderr, peak RSS (KiB) and wall time."""
    status: int
    out: str
    err: str
    rss_kib: int
    wall_s: float


def run_child(args: list[str], cwd: Path, *, shell_pipe: str | None = None, timeout: float = 20) -> Child:
    """Run minivmm in a child and measure that child alone (os.wait4). With `shell_pipe`, stdout
    goes through that command (e.g. `head -c 100`) and the status is minivmm's own."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MINIVMM_DEBUG", None)
    out_path, err_path = cwd.parent / f"{cwd.name}.out", cwd.parent / f"{cwd.name}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        reader = None
        if shell_pipe is not None:
            reader = subprocess.Popen(shell_pipe, shell=True, stdin=subprocess.PIPE, stdout=out, cwd=cwd)
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "minivmm", *args], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=reader.stdin if reader else out, stderr=err)
        if reader is not None:
            reader.stdin.close()
        status, usage = _wait(proc, timeout)
        wall = time.monotonic() - start
        if reader is not None:
            reader.wait(timeout)
    child = Child(status, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                  usage.ru_maxrss, wall)
    out_path.unlink()
    err_path.unlink()
    return child


def _wait(proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGKILL)
        time.sleep(0.01)


def _billion_laughs() -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


CHILDREN: list[tuple[str, str | bytes | None, list[str], int, str, int | None]] = [
    # name, file content (None: no file), extra args, status, text, line
    ("billion_laughs", _billion_laughs(), ["check"], 2, "expected aliases to expand to at most", 3),
    ("dev_zero", None, ["check", "/dev/zero"], 2, "expected a regular file, got a character device", None),
    ("fifty_megabytes", b"description: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n" * 700_000,
     ["check"], 2, "expected a config of at most", None),
    ("brackets_100k", "x: " + "[" * 100_000, ["check"], 2, "", 1),
    ("braces_100k", "x: " + "{a: " * 100_000, ["check"], 2, "", 1),
    ("int_5000_digits", f"version: 1\nmachine: {{memory: {'9' * 5000}}}\n", ["check"], 2,
     "at most 100 characters", 2),
    ("date_like", "description: 2024-13-45\nversion: 2\n", ["check"], 2, "version: expected version 1", 2),
    ("python_tag_key", "!!python/name:os.system : 1\n", ["check"], 2, "got the YAML tag !!python/name:os.system", 1),
    ("timeout_inf_run", VALID + "machine: {timeout: .inf}\n", ["run"], 2, "expected a finite number", 3),
    ("one_megabyte_list", "version: 1\nx: [" + ",".join(["1"] * 400_000) + "]\n", ["check"], 2,
     "at most 100000 values", 2),
    ("one_megabyte_keys", "".join(f"k{i}: {i}\n" for i in range(70_000)), ["check"], 2, "unknown key", 1),
    ("timeout_nan_option", None, ["run", str(HELLO_CONFIG), "--timeout", "nan"], 2, "--timeout", None),
]


@pytest.mark.parametrize("name, content, args, status, text, line", CHILDREN, ids=[c[0] for c in CHILDREN])
def test_child_stays_small_and_quick(tmp_path: Path, name: str, content, args: list[str], status: int,
                                     text: str, line: int | None) -> None:
    work = tmp_path / "work"
    work.mkdir()
    argv = list(args)
    path = None
    if content is not None:
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        argv.append(str(path))
    child = run_child(argv, work)
    assert child.status == status, child.err
    assert text in assert_one_line(child.err, str(path) if path else None, line)
    assert child.rss_kib < MAX_RSS_KIB, f"peak RSS {child.rss_kib} KiB"
    assert child.wall_s < MAX_WALL_S, f"took {child.wall_s:.1f} s"
    assert list(work.iterdir()) == []


@pytest.mark.kvm
def test_a_closed_stdout_ends_the_run_quietly(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    guest = tmp_path / "spam.S"
    guest.write_text('.include "minivmm.inc"\n.globl _start\n_start:\n    mov $0x3f8, %dx\n'
                     "1:  mov $'A', %al\n    out %al, %dx\n    mov $10, %al\n    out %al, %dx\n    jmp 1b\n")
    config = tmp_path / "spam.yaml"
    config.write_text(f"version: 1\nmachine: {{timeout: 30}}\nimages: [{{type: asm, source: {guest}}}]\n")
    child = run_child(["run", str(config)], work, shell_pipe="head -c 100")
    assert (child.status, child.err) == (0, ""), child.err
    assert child.out == "A\n" * 50
    assert child.wall_s < MAX_WALL_S
    json_child = run_child(["run", "--json", str(HELLO_CONFIG)], work, shell_pipe="head -c 10")
    assert (json_child.status, json_child.err, json_child.out) == (0, "", '{"config":')
    assert list(work.iterdir()) == []
