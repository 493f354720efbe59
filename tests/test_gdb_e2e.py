"""The gdb stub end to end: Debian's gdb against guests in each CPU mode (issue 14)."""
from __future__ import annotations

from pathlib import Path

import pytest

from gdb_harness import GDB, gdb_session
from minivmm import Machine

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")]

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "gdb"
SOURCE = {"user": "target.S", "long": "target.S", "protected": "target.S", "real": "target16.S"}
PC = {"user": "rip", "long": "rip", "protected": "eip", "real": "eip"}
ARCH = {"user": "i386:x86-64", "long": "i386:x86-64", "protected": "i386", "real": "i8086"}


def machine_for(mode: str, memory: str = "2M") -> Machine:
    m = Machine(memory=memory, mode=mode)
    m.load_asm(GUESTS / SOURCE[mode])
    return m


@pytest.mark.parametrize("mode", ["user", "long", "protected", "real"])
def test_registers_memory_breakpoint_stepi_continue(mode):
    """Registers and memory read and written, a breakpoint hit, stepi, continue to the exit."""
    with machine_for(mode) as m:
        s = m.symbols
        pc = PC[mode]
        run = gdb_session(m, [
            "show architecture",
            f'printf "entry=%x\\n", ${pc}',
            f"break *{s['bp_add']:#x}",
            "continue",
            f'printf "at_bp=%x\\n", ${pc}',
            'printf "eax=%x\\n", $eax',
            "set $ebx = 0x100",
            "stepi",
            f'printf "stepped=%x\\n", ${pc}',
            'printf "sum=%x\\n", $eax',
            f'printf "value=%x\\n", *(unsigned char *){s["value"]:#x}',
            f"set *(unsigned char *){s['value']:#x} = 9",
            'printf "cr0=%x\\n", $cr0',
            "delete",
            "continue",
        ])
        out = run.output
        assert ARCH[mode] in out, out
        assert run.value("entry") == s["_start"], out
        assert run.value("at_bp") == s["bp_add"], out
        assert run.value("eax") == 0x1111
        assert run.value("stepped") == s["after_add"]
        assert run.value("sum") == 0x1211
        assert run.value("value") == 7
        assert (run.value("cr0") & 1) == (mode != "real")
        assert "exited with code 011" in out, out          # gdb prints the code in octal
        assert run.result is not None and run.result.exit_code == 9
        assert int.from_bytes(m.memory.read(s["result"], 2), "little") == 0x1211


@pytest.mark.parametrize("mode", ["user", "long", "protected"])
def test_watchpoint_over_64k_buffer_reports_the_writing_instruction(mode):
    with machine_for(mode) as m:
        s = m.symbols
        pc = PC[mode]
        run = gdb_session(m, [
            f"watch *(char (*)[65536]){s['buf']:#x}",
            "continue",
            f'printf "stopped=%x\\n", ${pc}',
            "x/i $pc - 7" if mode != "real" else "",
            "delete",
            "continue",
        ])
        out = run.output
        assert "Old value = " in out and "New value = " in out, out
        assert run.value("stopped") == s["after_store"], out      # the store's trap: past it
        assert f"write of 1 bytes at {s['buf'] + 0x8000:#x} by the instruction at {s['store']:#x}" in out
        assert run.result.exit_code == 7


ROOT_GUESTS = GUESTS.parent


@pytest.mark.parametrize("mode, source", [("user", GUESTS / "spin64.S"), ("long", ROOT_GUESTS / "runaway_loop.S")])
def test_ctrl_c_interrupts_a_runaway_loop(mode, source):
    with Machine(mode=mode) as m:
        m.load_asm(source)
        start = m.symbols["_start"]
        run = gdb_session(m, ["continue", 'printf "pc=%x\\n", $pc', "kill"], interrupt_after=1.0,
                          machine_timeout=30)
        assert "received signal SIGINT" in run.output, run.output
        assert start <= run.value("pc") < start + 16
        assert run.result is None                       # killed: the guest stays stopped
        if mode == "user":
            assert m.vcpu.rcx > 1000                    # it did run natively meanwhile


def test_detach_lets_the_guest_finish():
    with machine_for("user") as m:
        run = gdb_session(m, [f"break *{m.symbols['bp_add']:#x}", "continue", "detach"])
        assert "Breakpoint 1," in run.output and "detached" in run.output, run.output
        assert run.result.reason == "exit" and run.result.exit_code == 7
        assert int.from_bytes(m.memory.read(m.symbols["result"], 4), "little") == 0x3333
        assert m.symbols["bp_add"] not in m.breakpoints        # gdb's breakpoints are gone


def test_watchpoint_over_one_mebibyte(tmp_path):
    """A 1 MiB range is one EPT monitor set, not four debug registers; reads through gdb
    still work while it is armed (gdb compares the old and the new value)."""
    source = tmp_path / "far_store.S"
    source.write_text(""".globl _start, store, after
_start:
    mov $0x2ff000, %rdi
store:
    movl $0xfeedface, (%rdi)
after:
    EXIT 5
""")
    with Machine(memory="4M", mode="user") as m:
        m.load_asm(source)
        run = gdb_session(m, ["set max-value-size unlimited", "watch *(char (*)[0x100000])0x200000", "continue",
                              'printf "pc=%x\\n", $pc', 'printf "word=%x\\n", *(unsigned *)0x2ff000',
                              "delete", "continue"], timeout=60)
        assert run.value("pc") == m.symbols["after"], run.output
        assert run.value("word") == 0xfeedface
        assert f"write of 4 bytes at 0x2ff000 by the instruction at {m.symbols['store']:#x}" in run.output
        assert run.result.exit_code == 5


@pytest.mark.parametrize("source, mode, signal, timeout", [
    (ROOT_GUESTS / "triple_fault.S", "protected", "SIGSEGV", 20),
    (ROOT_GUESTS / "runaway_loop.S", "long", "SIGALRM", 0.5),
    ("pxor %xmm0, %xmm0\nEXIT 0\n", "long", "SIGILL", 20),            # the host cannot emulate it at CPL 0
])
def test_host_stopped_guest_is_a_signal_not_a_dropped_connection(source, mode, signal, timeout):
    with Machine(mode=mode) as m:
        m.load_asm(source)
        run = gdb_session(m, ["handle SIGALRM stop print", "continue", 'printf "pc=%x\\n", $pc', "kill"],
                          machine_timeout=timeout)
        assert f"received signal {signal}" in run.output, run.output
        assert run.values("pc"), run.output               # the stub still answers after the stop
