"""The `minivmm` command line: exit status contract, --json, --set, check, trace, caps, help.

A few tests run `python -m minivmm` as a subprocess (the real entry point);
the rest call `cli.main([...])` in-process for speed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minivmm import cli

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
BROKEN = ROOT / "tests" / "data" / "broken_configs"


def minivmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "minivmm", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def run_json(capsys, *args: str) -> tuple[int, dict]:
    status = cli.main(["run", "--json", *args])
    out = capsys.readouterr().out
    return status, json.loads(out)


# -- subprocess: the real entry point ------------------------------------------------------

def test_subprocess_hello_streams_console_and_exits_0() -> None:
    done = minivmm("run", "configs/hello_long.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello from long mode!\n"


def test_subprocess_timeout_is_124() -> None:
    done = minivmm("run", "configs/runaway_loop.yaml", "--timeout", "0.3")
    assert done.returncode == 124
    assert "timeout" in done.stderr


def test_subprocess_triple_fault_is_125() -> None:
    done = minivmm("run", "configs/triple_fault.yaml", "--json")
    assert done.returncode == 125
    assert json.loads(done.stdout)["result"] == "triple_fault"


def test_subprocess_config_error_is_2() -> None:
    done = minivmm("run", str(BROKEN / "bad_memory.yaml"))
    assert done.returncode == 2
    assert f"{BROKEN / 'bad_memory.yaml'}:6: machine.memory: expected a size like 2M" in done.stderr
    assert done.stdout == ""


def test_subprocess_help() -> None:
    done = minivmm("--help")
    assert done.returncode == 0 and "examples:" in done.stdout and "run" in done.stdout


# -- in-process: exit statuses -------------------------------------------------------------

@pytest.mark.parametrize("config, status, result", [
    ("hello_real.yaml", 0, "exit"),
    ("cpuid_demo.yaml", 42, "exit"),
    ("io_demo.yaml", 42, "exit"),
    ("vmcall_hang.yaml", 124, "timeout"),
    ("mmio_flood.yaml", 125, "error"),
])
def test_exit_status_and_json_result(capsys, config: str, status: int, result: str) -> None:
    got, report = run_json(capsys, str(CONFIGS / config))
    assert got == status
    assert report["result"] == result and report["status"] == status
    assert set(report) >= {"result", "exit_code", "exits", "console", "elapsed_s", "message"}
    assert isinstance(report["exits"], dict) and isinstance(report["elapsed_s"], float)


def test_exit_limit_is_an_error_with_a_message(capsys) -> None:
    status, report = run_json(capsys, str(CONFIGS / "mmio_flood.yaml"), "--set", "machine.max_exits=50")
    assert status == 125
    assert report["result"] == "error" and report["reason"] == "exit_limit"
    assert report["message"] == "exit limit 50 reached"
    assert report["exits"] == {"EPT_MISCONFIGURATION": 50}
    assert report["counters"] == {"flood": 50}


def test_halt_without_exit_code_is_0(capsys, tmp_path: Path) -> None:
    guest = tmp_path / "halt.S"
    guest.write_text("hlt\n")
    config = tmp_path / "halt.yaml"
    config.write_text(f"version: 1\nimages: [{{type: asm, source: {guest}}}]\n")
    status, report = run_json(capsys, str(config))
    assert (status, report["result"], report["exit_code"]) == (0, "hlt", None)
    assert report["exits"] == {"EXECUTE_HLT": 1}


def test_unhandled_exception_is_125_with_exception_object(capsys, tmp_path: Path) -> None:
    guest = tmp_path / "ud.S"
    guest.write_text("ud2\n")
    config = tmp_path / "ud.yaml"
    config.write_text(f"version: 1\nmachine: {{mode: user}}\nimages: [{{type: asm, source: {guest}}}]\n")
    status, report = run_json(capsys, str(config))
    assert status == 125 and report["result"] == "error" and report["reason"] == "exception"
    assert report["exception"]["name"] == "#UD" and report["exception"]["vector"] == 6
    assert report["exception"]["rip"] == 0x100000


def test_console_streams_to_stdout_without_json(capfd) -> None:
    assert cli.main(["run", str(CONFIGS / "hello_protected.yaml")]) == 0
    out, err = capfd.readouterr()
    assert out == "Hello from protected mode!\n" and err == ""


def test_timeout_option_overrides_the_config(capsys) -> None:
    status, report = run_json(capsys, str(CONFIGS / "runaway_loop.yaml"), "--timeout", "0.2")
    assert status == 124 and report["elapsed_s"] < 0.45


def test_set_overrides(capsys) -> None:
    status, report = run_json(capsys, str(CONFIGS / "int3_storm.yaml"), "--set", "images[0].defines.INT3_COUNT=5",
                              "--set", "expect.counters.int3=5")
    assert status == 0 and report["counters"] == {"int3": 5}


def test_set_errors_are_usage_errors(capsys) -> None:
    assert cli.main(["run", str(CONFIGS / "hello_long.yaml"), "--set", "machine.memory=lots"]) == 2
    assert "--set machine.memory=lots: machine.memory: expected a size" in capsys.readouterr().err


def test_run_trace_reports_exits(capsys) -> None:
    status, report = run_json(capsys, str(CONFIGS / "hello_long.yaml"), "--trace")
    assert status == 0
    assert report["trace"][-1].startswith("exit IO_INSTRUCTION") and "port=0xf4" in report["trace"][-1]
    assert len(report["trace"]) == report["exits"]["IO_INSTRUCTION"]


def test_log_rules_go_to_stderr(capfd) -> None:
    assert cli.main(["run", str(CONFIGS / "msr_demo.yaml")]) == 0
    out, err = capfd.readouterr()
    assert "minivmm: tsc: rdmsr 0x10 at rip=" in err and "passed through" in out


# -- check, usage errors ---------------------------------------------------------------------

def test_check_ok(capsys) -> None:
    assert cli.main(["check", str(CONFIGS / "elf_hello.yaml")]) == 0
    assert "elf_hello.yaml: ok (long mode" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["unknown_symbol", "bad_control", "bad_multiboot_checksum"])
def test_check_reports_the_same_errors_as_run(capsys, name: str) -> None:
    path = str(BROKEN / f"{name}.yaml")
    assert cli.main(["check", path]) == 2
    check_error = capsys.readouterr().err
    assert cli.main(["run", path]) == 2
    assert capsys.readouterr().err == check_error
    assert check_error.startswith(f"minivmm: {path}:")


def test_usage_errors_are_2(capsys) -> None:
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["run"]) == 2
    assert cli.main(["run", "x.yaml", "--timeout", "soon"]) == 2
    assert cli.main(["run", "/nonexistent.yaml"]) == 2
    assert "no such config file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "check", "trace", "caps"])
def test_every_command_has_help_with_an_example(capsys, command: str) -> None:
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "example" in text and f"minivmm {command}" in text


@pytest.mark.parametrize("reason, code, status", [
    ("exit", 3, 3), ("exit", 0, 0), ("hlt", None, 0), ("stopped", None, 0), ("timeout", None, 124),
    ("triple_fault", None, 125), ("exception", None, 125), ("error", None, 125),
    ("exit_limit", None, 125), ("interrupted", None, 130)])
def test_exit_status_table(reason: str, code, status: int) -> None:
    assert cli.exit_status(reason, code) == status


# -- trace -----------------------------------------------------------------------------------

def test_trace_known_sequence(capsys) -> None:
    assert cli.main(["trace", str(CONFIGS / "hello_real.yaml"), "--max", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    first = lines[0].split()
    assert first[0] == "0x00007c00" and "lea" in lines[0] and "rsi=0x7c" in lines[0]
    assert lines[1].startswith("0x00007c05  ba f8 03") and "mov dx, 0x3f8" in lines[1] and "rdx=0x3f8" in lines[1]
    assert "lodsb" in lines[2] and "rax=0x48" in lines[2]
    assert "test al, al" in lines[3]
    assert "out dx, al" in lines[5] and "[IO_INSTRUCTION out port=0x3f8]" in lines[5]
    assert "jmp" in lines[6]
    assert lines[7] == "# 7 instructions; step_limit: stopped after 7 instructions"


def test_trace_json_lines_to_the_end(capsys) -> None:
    assert cli.main(["trace", str(CONFIGS / "hello_long.yaml"), "--json", "--max", "100000"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    steps, summary = records[:-1], records[-1]
    assert summary["result"] == "exit" and summary["exit_code"] == 0 and summary["steps"] == len(steps)
    assert summary["console"] == "Hello from long mode!\n"
    assert steps[0] == {"step": 1, "address": 0x100000, "bytes": steps[0]["bytes"], "disasm": steps[0]["disasm"],
                        "changes": {"rsi": steps[0]["changes"]["rsi"]}, "exit": None}
    assert steps[-1]["disasm"] == "out 0xf4, al" and steps[-1]["exit"] == "IO_INSTRUCTION out port=0xf4"
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))


def test_trace_user_mode(capsys) -> None:
    assert cli.main(["trace", str(CONFIGS / "hello_user.yaml"), "--max", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("0x00100000") and lines[1].startswith("0x00100007")
    assert "mov dx, 0x3f8" in lines[1]


# -- caps, fuzz hook -------------------------------------------------------------------------

def test_caps_table_and_json(capsys) -> None:
    assert cli.main(["caps"]) == 0
    table = capsys.readouterr().out
    assert "SET_GUEST_DEBUG" in table and "IA32_VMX_PROCBASED_CTLS" in table
    assert cli.main(["caps", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "SET_GUEST_DEBUG" in json.dumps(report)


def test_fuzz_commands_are_part_of_the_cli(capsys) -> None:
    for command in ("fuzz", "afl"):
        assert cli.main([command, "--help"]) == 0
        assert f"minivmm {command} configs/fuzz_parser.yaml" in capsys.readouterr().out


def test_trace_shows_exceptions_and_vmm_completed_instructions(capsys) -> None:
    assert cli.main(["trace", str(CONFIGS / "int3_storm.yaml"), "--max", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "int3" in lines[1] and "[EXCEPTION_OR_NMI #BP]" in lines[1]
    assert lines[2].startswith("0x00100006") and "dec ecx" in lines[2] and "rcx=0x3e7" in lines[2]
    assert cli.main(["trace", str(CONFIGS / "ept_monitor_demo.yaml"), "--max", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "mov dword ptr [0x101000], 1" in lines[0] and "[completed by the VMM]" in lines[0]




def test_trace_an_application_processor(capsys) -> None:
    assert cli.main(["trace", str(CONFIGS / "mb_smp.yaml"), "--vcpu", "1", "--max", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "# 7 instructions; step_limit: stopped after 7 instructions"
    assert all(0x70000 <= int(line.split()[0], 16) < 0x70100 for line in lines[:-1])   # the AP trampoline
    assert "mov cr0, eax" in lines[-2] or "mov cr0, eax" in lines[-3]


def test_trace_rejects_a_vcpu_the_machine_lacks(capsys) -> None:
    assert cli.main(["trace", str(CONFIGS / "hello_real.yaml"), "--vcpu", "1"]) == 2
    assert "--vcpu 1: the machine has 1 vCPU(s)" in capsys.readouterr().err


def test_run_trace_observes_exits_without_handling_them(capsys) -> None:
    status, report = run_json(capsys, str(CONFIGS / "int3_storm.yaml"), "--trace")
    plain_status, plain = run_json(capsys, str(CONFIGS / "int3_storm.yaml"))
    assert (status, report["exits"]) == (plain_status, plain["exits"])       # tracing changes nothing
    assert len(report["trace"]) == sum(report["exits"].values())
    assert sum(line.startswith("exit EXCEPTION_OR_NMI") for line in report["trace"]) == \
        report["exits"]["EXCEPTION_OR_NMI"]
