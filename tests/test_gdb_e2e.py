"""The gdb stub end to end: Debian's gdb against guests in each CPU mode (issue 14)."""
from __future__ import annotations

from pathlib import Path

import pytest

from gdb_harness import GDB, gdb_session
from minivmm import Machine

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")]

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "gdb"
SOURCE = {"user": "target64.S", "long": "target64.S", "protected": "target32.S", "real": "target16.S"}
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
