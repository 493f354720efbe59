"""gdb threads are vCPUs: a 2-vCPU guest (the BSP starts vCPU 1 with INIT/SIPI), thread
listing and switching, a breakpoint stopping every vCPU, and one vCPU stepping while the
other stays stopped (scheduler-locking)."""
from __future__ import annotations

from pathlib import Path

import pytest

from gdb_harness import GDB, gdb_session
from minivmm import Machine
from minivmm.asm import assemble

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")]

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "gdb"
TRAMPOLINE = 0x70000


def test_threads_are_vcpus_and_one_steps_while_the_other_stays():
    with Machine(mode="protected", memory="2M", vcpus=2) as m:
        m.load_asm(GUESTS / "smp_bsp.S")
        ap = assemble(GUESTS / "smp_ap.S", code_bits=16, load_address=0)
        m.memory.write(TRAMPOLINE, ap.data)
        ap_loop = ap.symbols["ap_loop"]
        run = gdb_session(m, [
            "info threads",
            f"break *{m.symbols['bsp_ready']:#x}",
            "continue",
            'printf "bsp_eip=%x\\n", $eip',
            "delete",
            "thread 2",
            'printf "ap_cs=%x\\n", $cs',
            'printf "ap_ax=%x\\n", $eax & 0xffff',
            "set scheduler-locking on",
            "stepi", "stepi", "stepi",
            'printf "ap_ax_after=%x\\n", $eax & 0xffff',
            'printf "ap_ip=%x\\n", $eip',
            "thread 1",
            'printf "bsp_eip_after=%x\\n", $eip',
            "kill",
        ], machine_timeout=30)
        out = run.output
        assert "vCPU 0" in out and "vCPU 1" in out, out
        assert run.value("bsp_eip") == m.symbols["bsp_ready"], out
        assert "[Switching to thread 2" in out
        assert run.value("ap_cs") == 0x7000
        assert run.value("ap_ax") >= 1
        assert run.value("ap_ax_after") - run.value("ap_ax") == 1, out     # inc, mov, jmp: one inc
        assert ap_loop <= run.value("ap_ip") < ap_loop + 16
        assert run.value("bsp_eip_after") == m.symbols["bsp_ready"]        # vCPU 0 stayed stopped
