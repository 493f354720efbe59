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


def test_multiboot_kernel_ap_hits_a_breakpoint_and_the_kernel_finishes():
    """configs/mb_smp.yaml: the C multiboot kernel starts vCPU 1, which stops at ap_main as
    thread 2 (gdb reads thread 2's registers without an Hg: the stub switched to it)."""
    from minivmm.config import build_machine, load_config
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "mb_smp.yaml")
    with build_machine(config, capture_console=True) as m:
        ap_main = m.symbols["ap_main"]
        run = gdb_session(m, ["info threads", f"break *{ap_main:#x}", "continue",
                              'printf "eip=%x\\n", $eip', "thread 1", 'printf "bsp=%x\\n", $eip',
                              "delete", "continue"])
        out = run.output
        assert "Thread 2 hit Breakpoint 1" in out, out
        assert run.value("eip") == ap_main and run.value("bsp") != ap_main
        assert run.result.exit_code == 2 and "mbkernel: ok, 2 cpus online" in m.serial.text


def test_a_mode_change_is_reported():
    """configs/mb_realmode.yaml drops from protected to real mode: the stop after the CR0 write
    says so (gdb keeps the description it read; the i386 and i8086 registers are the same)."""
    from minivmm.config import build_machine, load_config
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "mb_realmode.yaml")
    with build_machine(config, capture_console=True) as m:
        start = m.images[0].start                      # the kernel is linked at 32 KiB
        pm16 = start + m.memory.read(start, 0x1000).index(bytes.fromhex("b810008ed8"))   # mov $0x10,%ax; mov %ax,%ds
        run = gdb_session(m, ["show architecture", f"break *{pm16:#x}", "continue", "delete",
                              "stepi 8", 'printf "cs=%x\\n", $cs', 'printf "cr0=%x\\n", $cr0', "continue"])
        out = run.output
        assert "i386" in out and "vCPU 0 switched to i8086 mode" in out, out
        assert "`set architecture i8086` disassembles for it" in out
        assert run.value("cs") == 0x800 and run.value("cr0") & 1 == 0
        assert run.result.exit_code == 0 and "real mode, code past 0xb000 intact" in m.serial.text
