"""More than one vCPU (issue 8): one thread per vCPU, APs started by the guest's INIT-SIPI-SIPI
through KVM's in-kernel LAPIC, per-vCPU exit info/VMCS/statistics, and one vCPU's stop (or the
deadline) ending the whole machine."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from conftest import CONFIGS
from minivmm.asm import assemble
from minivmm.config import ConfigError, build_machine, load_config, parse_config
from minivmm.exits import ExitReason
from minivmm.kvm import KvmCpuidEntry2, MpState
from minivmm.machine import HandlerError
from minivmm.smp import cpuid_for_vcpu

pytestmark = pytest.mark.kvm

TRAMPOLINE = 0x70000
FLAG = TRAMPOLINE + 0x100

# The BSP wakes vCPU 1 (APIC ID 1) with INIT and a STARTUP IPI for vector 0x70 (CS=0x7000, IP=0).
START_AP = """
    movl $0x1ff, 0xfee000f0         /* SVR: software-enable the LAPIC */
    movl $0x01000000, 0xfee00310    /* ICR high: destination APIC ID 1 */
    movl $0x00004500, 0xfee00300    /* INIT */
    movl $0x00004670, 0xfee00300    /* STARTUP, vector 0x70 */
"""
WAIT_FOR_FLAG = f"""
    mov $3000000, %ecx
1:  cmpb $1, {FLAG:#x}
    je 2f
    dec %ecx
    jnz 1b
    EXIT 1
2:  EXIT 0
"""
SPIN = "3: jmp 3b\n"

AP_REPORTS = """
    mov $0xaa, %al
    out %al, $0x80
    movb $1, %cs:0x100
    cli
4:  hlt
    jmp 4b
"""
AP_EXITS = """
    mov $7, %al
    out %al, $0xf4
5:  jmp 5b
"""
AP_UNCLAIMED_PORT = """
    out %al, $0x99              /* no device: stops the run in strict mode */
6:  jmp 6b
"""
AP_CANNOT_BE_EMULATED = """
    ud2                         /* KVM on this host cannot emulate it at CPL 0 */
"""


def smp_machine(make_machine, bsp: str, ap: str, **kwargs):
    machine = make_machine(mode="protected", memory="2M", vcpus=2, **kwargs)
    machine.load_asm(bsp)
    machine.memory.write(TRAMPOLINE, assemble(ap, code_bits=16, load_address=0).data)
    return machine


def vcpu_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("minivmm-vcpu")]


def test_cpuid_apic_id_per_vcpu() -> None:
    entries = [KvmCpuidEntry2(function=1, ebx=0x00010800), KvmCpuidEntry2(function=0xB, index=0, edx=0)]
    copy = cpuid_for_vcpu(entries, 3)
    assert copy[0].ebx == 0x03010800 and copy[1].edx == 3
    assert entries[0].ebx == 0x00010800           # the original is untouched


def test_single_vcpu_machine_keeps_the_plain_path(make_machine) -> None:
    machine = make_machine(mode="protected")
    assert machine.vcpus == [machine.vcpu] and machine._smp is None and not machine.irqchip


def test_aps_wait_for_init_sipi(make_machine) -> None:
    machine = make_machine(mode="protected", vcpus=3)
    assert machine.irqchip and [v.index for v in machine.vcpus] == [0, 1, 2]
    assert machine.vcpus[0].fd.get_mp_state() == MpState.RUNNABLE
    assert machine.vcpus[1].fd.get_mp_state() == MpState.UNINITIALIZED


def test_c_kernel_starts_its_ap() -> None:
    config = load_config(CONFIGS / "mb_smp.yaml")
    with build_machine(config, capture_console=True) as machine:
        result = machine.run_config()
        ap_state = machine.vcpus[1].fd.get_mp_state()
    assert (result.reason, result.exit_code) == ("exit", 2), result
    lines = result.console.splitlines()
    assert "fw_cfg: signature QEMU, cpus 2, ram 8 MiB" in lines
    assert "acpi: MADT, 2 cpus, 1 ioapic" in lines
    assert "smp: 1 of 1 APs started" in lines
    assert lines[-1] == "mbkernel: ok, 2 cpus online"
    # INIT/SIPI took the AP out of its wait state; whether it reached its final `hlt`
    # before the BSP's debug-exit stopped the machine is a race the guest cannot close.
    assert ap_state in (MpState.RUNNABLE, MpState.HALTED)
    assert result.elapsed_s < 10
    assert not vcpu_threads()


def test_each_vcpu_has_its_own_exit_info_vmcs_and_stats(make_machine) -> None:
    machine = smp_machine(make_machine, START_AP + WAIT_FOR_FLAG, AP_REPORTS)
    seen = []

    def on_port_80(vcpu, info):
        seen.append((vcpu.index, info.vcpu_index, info.data, threading.current_thread().name))

    machine.on(ExitReason.IO_INSTRUCTION, on_port_80, port=0x80)
    result = machine.run(timeout=20)
    assert (result.reason, result.exit_code) == ("exit", 0), result
    assert seen == [(1, 1, 0xAA, "minivmm-vcpu1")]
    bsp, ap = machine.contexts
    assert ap.vmcs is not bsp.vmcs and ap.info is not bsp.info and ap.vcpu is machine.vcpus[1]
    assert ap.stats["IO_INSTRUCTION"].count == 1
    assert bsp.stats is machine.stats and machine.stats["IO_INSTRUCTION"].count == 1   # EXIT 0
    assert result.exits == {"IO_INSTRUCTION": 2}          # summed over the vCPUs
    assert [(r.reason, r.message) for r in machine.smp.results] == \
        [("exit", ""), ("stopped", "stopped by vCPU 0")]           # the AP was kicked
    assert not vcpu_threads()


BSP_FLOOD = """
    xor %ecx, %ecx
9:  mov %ecx, %eax
    out %ax, $0x80
    inc %ecx
    cmp $500, %ecx
    jne 9b
"""
AP_FLOOD = """
    xor %cx, %cx
7:  mov %cx, %ax
    out %ax, $0x81
    inc %cx
    cmp $500, %cx
    jne 7b
    movb $1, %cs:0x100
    cli
8:  hlt
    jmp 8b
"""


def test_port_floods_on_two_vcpus_at_once(make_machine) -> None:
    machine = smp_machine(make_machine, START_AP + BSP_FLOOD + WAIT_FOR_FLAG, AP_FLOOD)
    seen: dict[int, list[int]] = {0: [], 1: []}
    machine.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: seen[vcpu.index].append(info.data),
               port=range(0x80, 0x82))
    result = machine.run(timeout=20)
    assert (result.reason, result.exit_code) == ("exit", 0), result
    assert seen == {0: list(range(500)), 1: list(range(500))}
    assert [state.stats["IO_INSTRUCTION"].count for state in machine.contexts] == [501, 500]
    assert not vcpu_threads()


def test_an_ap_ends_the_run_and_the_bsp_is_kicked(make_machine) -> None:
    machine = smp_machine(make_machine, START_AP + SPIN, AP_EXITS)
    start = time.perf_counter()
    result = machine.run(timeout=20)
    assert (result.reason, result.exit_code) == ("exit", 7), result
    assert time.perf_counter() - start < 10
    assert not vcpu_threads()


def test_a_fatal_exit_on_an_ap_stops_the_machine(make_machine) -> None:
    from minivmm.platform import PlatformConfig, install_platform
    machine = smp_machine(make_machine, START_AP + SPIN, AP_UNCLAIMED_PORT)
    install_platform(machine, PlatformConfig(strict_ports=True))
    result = machine.run(timeout=20)
    assert result.reason == "error", result
    assert result.message.startswith("vCPU 1: strict ports:") and "port 0x99" in result.message
    assert not vcpu_threads()


def test_a_guest_fault_on_an_ap_reaches_the_caller(make_machine) -> None:
    machine = smp_machine(make_machine, START_AP + SPIN, AP_CANNOT_BE_EMULATED)
    result = machine.run(timeout=20)
    if result.reason == "error":                # hosts that cannot emulate ud2 (PVM)
        assert "vCPU 1" in result.message and "ud2" in result.message, result
    else:                                       # hosts that deliver #UD: no IVT entry, a fault loop
        assert result.reason in ("triple_fault", "timeout"), result
    assert not vcpu_threads()


def test_deadline_stops_every_vcpu(make_machine) -> None:
    machine = smp_machine(make_machine, SPIN, AP_REPORTS)        # the AP is never started
    start = time.perf_counter()
    result = machine.run(timeout=0.5)
    assert result.reason == "timeout", result
    assert 0.4 < time.perf_counter() - start < 5
    assert not vcpu_threads()


def test_a_handler_error_on_an_ap_reaches_the_caller(make_machine) -> None:
    machine = smp_machine(make_machine, START_AP + SPIN, AP_REPORTS)

    def broken(vcpu, info):
        raise ValueError("boom")

    machine.on(ExitReason.IO_INSTRUCTION, broken, port=0x80)
    with pytest.raises(HandlerError, match="boom"):
        machine.run(timeout=20)
    assert not vcpu_threads()


def test_vcpus_in_yaml(tmp_path: Path) -> None:
    base = "version: 1\nmachine: {mode: protected, vcpus: %s}\nimages:\n  - {type: asm, source: g.S}\n"
    (tmp_path / "g.S").write_text('.include "minivmm.inc"\nEXIT 0\n')
    with pytest.raises(ConfigError, match=r":2: machine.vcpus: expected a vCPU count from 1 to 64"):
        parse_config(base % 0, path=tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r":6: platform.irqchip: .*needs the in-kernel irqchip"):
        parse_config(base % 2 + "platform:\n  irqchip: false\n", path=tmp_path / "c.yaml")
    config = parse_config(base % 2, path=tmp_path / "c.yaml")
    assert config.machine.vcpus == 2 and config.platform.irqchip
    with build_machine(config, capture_console=True) as machine:
        assert len(machine.vcpus) == 2
        result = machine.run_config()
    assert (result.reason, result.exit_code) == ("exit", 0), result


AP_WRITES_DATA = """
    mov $0x7100, %ax
    mov %ax, %ds
    movb $0x5a, 0               /* GPA 0x71000: monitored */
    movb $1, %cs:0x100
    cli
4:  hlt
    jmp 4b
"""


def test_ept_monitor_and_mtf_trace_on_an_application_processor(make_machine) -> None:
    """EPT hooks, steps and VMCS controls are per vCPU: a write monitor reports the AP's store
    as the AP's, and MTF set on vCPU 1's VMCS alone traces the AP instruction by instruction
    while the BSP runs without MTF exits."""
    from minivmm.controls import ProcBasedControls
    from minivmm.disasm import disassemble
    machine = smp_machine(make_machine, START_AP + WAIT_FOR_FLAG, AP_WRITES_DATA)
    events = []
    machine.ept.monitor(0x71000, 0x71001, "w",
                        lambda event: events.append((event.vcpu.index, event.value, event.rip)))
    ap = machine.contexts[1]
    ap.vmcs.set_control(ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG)
    steps = []
    machine.on(ExitReason.MONITOR_TRAP_FLAG,
               lambda vcpu, info: steps.append((vcpu.index, info.vcpu_index, vcpu.rip)) or None)
    result = machine.run(timeout=20)
    assert (result.reason, result.exit_code) == ("exit", 0), result
    code = assemble(AP_WRITES_DATA, code_bits=16, load_address=0).data
    starts = [address for address, _, _ in disassemble(code, 0, 16)]
    assert {(index, seen) for index, seen, _ in steps} == {(1, 1)}        # the AP's only
    # each step lands after one more instruction; the monitored store is emulated by the EPT
    # (an MMIO exit), so no step reports the ip after it (starts[3])
    assert [rip for _, _, rip in steps[:4]] == starts[1:3] + starts[4:6], (steps[:6], starts)
    assert events == [(1, 0x5a, starts[3])]     # KVM reports a write with RIP past the store
    assert not machine.contexts[0].vmcs.mtf and "MONITOR_TRAP_FLAG" not in machine.contexts[0].stats
    assert not vcpu_threads()


def test_pre_entry_hooks_and_steps_on_an_application_processor(make_machine) -> None:
    """PRE_ENTRY hooks and the step service work per vCPU: a hook on vCPU 1 sees only vCPU 1's
    entries, and a step requested on vCPU 1 (from its first exit) runs after its next
    instruction there."""
    machine = smp_machine(make_machine, START_AP + WAIT_FOR_FLAG, AP_REPORTS)
    entries, steps = set(), []

    def on_port_80(vcpu, info):
        machine.step_once(lambda v: steps.append((v.index, v.rip)), vcpu=vcpu.index)

    machine.hooks.add("pre_entry", lambda vcpu, info: entries.add(vcpu.index), vcpu=1)
    machine.on(ExitReason.IO_INSTRUCTION, on_port_80, port=0x80)
    result = machine.run(timeout=20)
    assert (result.reason, result.exit_code) == ("exit", 0), result
    assert entries == {1}
    code = assemble(AP_REPORTS, code_bits=16, load_address=0).data
    from minivmm.disasm import disassemble
    starts = [address for address, _, _ in disassemble(code, 0, 16)]
    # the OUT at starts[1] exited; the step lands after the next instruction (the flag store)
    assert steps == [(1, starts[3])], (steps, starts)
    assert not vcpu_threads()
