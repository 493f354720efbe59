"""Every row of the capability model (`minivmm caps --markdown`) against a real guest.

A refused control fails its VMWRITE and `adjust_controls` clears it; a must-be-1 control
cannot be cleared; a working control does what the SDM says, checked with a guest in each
mode. A refused exception vector fails `m.on(..., vector=)` and the exception-bitmap VMWRITE
with a message that names the vector, the mode and what works; a working one reaches its
handler. The rows come from the model of the host the suite runs on, so a host that allows
more is checked for more.
"""
from __future__ import annotations

import platform
import struct
from typing import Callable

import pytest

from minivmm import ExitReason, RESUME, Reply
from minivmm.actions import EMULATE, Inject
from minivmm.capabilities import MODES, CapabilityRow, ExceptionInterceptError, host_model
from minivmm.controls import (PinBasedControls, ProcBasedControls, SecondaryControls, UnsupportedControlError,
                              VmEntryControls, VmExitControls, VmxMsr, adjust_controls, allowed0)
from minivmm.exits import EXCEPTIONS_WITH_ERROR_CODE, Vector, vector_name
from minivmm.kvm import Kvm
from minivmm.modes import Mode
from minivmm.vmcs import VmcsError
from minivmm.vmcs_fields import VmcsField as F

pytestmark = pytest.mark.kvm

PROC, SEC, PIN = ProcBasedControls, SecondaryControls, PinBasedControls
EXIT, ENTRY = VmExitControls, VmEntryControls
DATA = {"real": 0x8000, "protected": 0x180000, "long": 0x180000, "user": 0x180000}
TF = 1 << 8


def model_rows(mode: str) -> list[CapabilityRow]:
    with Kvm() as kvm:
        return host_model(kvm).rows([mode])


def machine(make_machine, mode: str, source: str):
    m = make_machine(mode=mode)
    m.load_asm(source)
    return m


def observed(m) -> list:
    exits: list = []
    m.hooks.add("observe", lambda vcpu, info: exits.append(
        (info.reason.name, info.msr if info.reason in (ExitReason.EXECUTE_RDMSR, ExitReason.EXECUTE_WRMSR)
         else None)))
    return exits


# -- behaviour of each control that can work (SDM 25.6-25.8) ------------------------------------
def check_preemption_timer(make_machine, mode: str) -> None:
    """The timer (the run deadline) expires: a VMX_PREEMPTION_TIMER_EXPIRED exit ends the run."""
    m = machine(make_machine, mode, "1: jmp 1b")
    r = m.run(timeout=0.05)
    assert r.reason == "timeout" and r.exits == {"VMX_PREEMPTION_TIMER_EXPIRED": 1}, r


def check_hlt_exiting(make_machine, mode: str) -> None:
    """HLT exits at CPL 0; at CPL 3 it raises #GP first (SDM vol. 2 HLT, 26.1.1)."""
    m = machine(make_machine, mode, "nop\n hlt\n EXIT 1")
    r = m.run(timeout=5)
    if mode == "user":
        assert r.reason == "exception" and r.exception.vector == Vector.GP, r
    else:
        assert r.reason == "hlt" and r.exits == {"EXECUTE_HLT": 1}, r


def check_io_exiting(make_machine, mode: str) -> None:
    """USE_IO_BITMAPS: only ports whose bit is 1 exit to the handlers; UNCONDITIONAL_IO_EXITING
    without bitmaps: every port does; neither: none does (SDM 25.6.4)."""
    def run(bitmaps: bool, unconditional: bool) -> list[int]:
        m = machine(make_machine, mode, "out %al, $0x99\n out %al, $0x9a\n EXIT 0")
        seen: list[int] = []
        for port in (0x99, 0x9A):
            m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: seen.append(info.port) or RESUME, port=port)
        m.vm.vmx.io_bitmap.intercept(0x9A, False)
        m.vmcs.set_control(PROC.CPU_BASED_USE_IO_BITMAPS, bitmaps)
        m.vmcs.set_control(PROC.CPU_BASED_UNCONDITIONAL_IO_EXITING, unconditional)
        r = m.run(timeout=5)
        assert (r.reason, r.exit_code) == ("exit", 0), r
        return seen
    assert run(True, False) == [0x99]
    assert run(False, True) == [0x99, 0x9A]
    assert run(False, False) == []


def check_mtf(make_machine, mode: str) -> None:
    """One MONITOR_TRAP_FLAG exit after each instruction (SDM 26.5.2)."""
    m = machine(make_machine, mode, "nop\n nop\n nop\n EXIT 0")
    steps: list[int] = []
    m.on(ExitReason.MONITOR_TRAP_FLAG, lambda vcpu, info: steps.append(vcpu.rip))
    m.vmcs.set_control(PROC.CPU_BASED_MONITOR_TRAP_FLAG)
    m.setup()
    start = m.vcpu.rip
    r = m.run(timeout=10)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    assert steps[:3] == [start + 1, start + 2, start + 3]


def check_msr_bitmaps(make_machine, mode: str) -> None:
    """With bitmaps only MSRs whose bit is 1 exit; without them every RDMSR exits (SDM 25.6.9); at
    CPL 3 RDMSR raises #GP before any exit."""
    source = "mov $0x174, %ecx\n rdmsr\n mov %eax, %ebx\n mov $0x175, %ecx\n rdmsr\n EXIT 0"
    m = machine(make_machine, mode, source)
    exits = observed(m)
    m.on(ExitReason.EXECUTE_RDMSR, lambda vcpu, info: Reply(0x77), msr=0x174)
    r = m.run(timeout=5)
    if mode == "user":
        assert r.reason == "exception" and r.exception.vector == Vector.GP, r
        assert "EXECUTE_RDMSR" not in r.exits
        return
    assert (r.reason, r.exit_code, m.vcpu.rbx) == ("exit", 0, 0x77), r
    assert [e for e in exits if e[0] == "EXECUTE_RDMSR"] == [("EXECUTE_RDMSR", 0x174)]
    if allowed0(m.vmcs.capabilities[VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS]) & PROC.CPU_BASED_USE_MSR_BITMAPS:
        return                      # must be 1 here: the 0 setting is the refusal checked elsewhere
    m = machine(make_machine, mode, source)
    exits = observed(m)
    m.vmcs.set_control(PROC.CPU_BASED_USE_MSR_BITMAPS, False)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    assert [e for e in exits if e[0] == "EXECUTE_RDMSR"] == [("EXECUTE_RDMSR", 0x174), ("EXECUTE_RDMSR", 0x175)]



def check_tsc_offsetting(make_machine, mode: str) -> None:
    """RDTSC returns the TSC plus TSC_OFFSET once the control is 1 (SDM 26.6.5)."""
    offset = 1 << 50
    m = machine(make_machine, mode, "rdtsc\n mov %eax, %ebx\n mov %edx, %esi\n out %al, $0x99\n"
                                    " rdtsc\n EXIT 0")

    def enable(vcpu, info):
        m.vmcs.write(F.VMCS_CTRL_TSC_OFFSET, offset)
        m.vmcs.set_control(PROC.CPU_BASED_USE_TSC_OFFSETTING)
        return RESUME

    m.on(ExitReason.IO_INSTRUCTION, enable, port=0x99)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    before = (m.vcpu.rsi & 0xFFFFFFFF) << 32 | m.vcpu.rbx & 0xFFFFFFFF
    after = (m.vcpu.rdx & 0xFFFFFFFF) << 32 | m.vcpu.rax & 0xFFFFFFFF
    assert offset <= after - before < offset + (1 << 40)


def check_ept(make_machine, mode: str) -> None:
    """A write to a page without W is an EPT violation with the write bit (SDM 28.3.3); the
    secondary controls are active (EPT needs them)."""
    gpa = DATA[mode]
    m = machine(make_machine, mode, f"movl $0x55, {gpa:#x}\n EXIT 0")
    seen = []

    def violation(vcpu, info):
        seen.append((info.guest_physical_address, info.ept.write))
        return EMULATE

    m.on(ExitReason.EPT_VIOLATION, violation)
    m.ept.protect(gpa, 0x1000, "r-x")
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    assert seen == [(gpa, True)] and m.memory.read_u32(gpa) == 0x55


def check_unrestricted_guest(make_machine, mode: str) -> None:
    """Real mode and unpaged protected mode run (SDM 26.3.1.1 with unrestricted guest)."""
    m = machine(make_machine, mode, "nop\n EXIT 0")
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    paged = bool(m.vcpu.cr0 & 1 << 31)
    assert paged == (mode in ("long", "user")) and bool(m.vcpu.cr0 & 1) == (mode != "real")


STATE_SOURCE = ("mov %dr7, %eax\n mov %eax, %ebx\n mov $0x400, %eax\n mov %eax, %dr7\n"
                " mov $0x277, %ecx\n rdmsr\n mov %eax, %esi\n mov $0x00070406, %eax\n mov $0x00070406, %edx\n"
                " wrmsr\n mov $0xC0000080, %ecx\n rdmsr\n mov %eax, %edi\n and $0xfffffffe, %eax\n wrmsr\n EXIT 0")


def check_guest_state(make_machine, mode: str) -> None:
    """Load debug controls / IA32_PAT / IA32_EFER: the guest reads the values written to the
    guest-state fields; save: the fields hold what the guest wrote (SDM 26.3.2.1, 28.3.1)."""
    if mode == "user":
        m = machine(make_machine, mode, "nop\n EXIT 0")
        m.setup()
        for field, value in ((F.VMCS_GUEST_DR7, 0x700), (F.VMCS_GUEST_IA32_PAT, 0x0007040600070405)):
            m.vmcs.write(field, value)
        r = m.run(timeout=5)
        assert (r.reason, r.exit_code) == ("exit", 0), r
        assert m.vmcs.read(F.VMCS_GUEST_DR7) == 0x700
        assert m.vmcs.read(F.VMCS_GUEST_IA32_PAT) == 0x0007040600070405
        assert m.vmcs.read(F.VMCS_GUEST_IA32_EFER) & 0x500 == 0x500          # LME, LMA
        return
    source = STATE_SOURCE.replace("%dr7, %eax", "%dr7, %rax").replace("%eax, %dr7", "%rax, %dr7") \
        if mode == "long" else STATE_SOURCE
    m = machine(make_machine, mode, source)
    m.setup()
    m.vmcs.write(F.VMCS_GUEST_DR7, 0x700)
    m.vmcs.write(F.VMCS_GUEST_IA32_PAT, 0x0007040600070405)
    m.vmcs.write(F.VMCS_GUEST_IA32_EFER, m.vmcs.read(F.VMCS_GUEST_IA32_EFER) | 1)       # SCE
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    assert (m.vcpu.rbx & 0xFFFF, m.vcpu.rsi & 0xFFFFFFFF, m.vcpu.rdi & 1) == (0x700, 0x70405, 1)
    assert m.vmcs.read(F.VMCS_GUEST_DR7) == 0x400
    assert m.vmcs.read(F.VMCS_GUEST_IA32_PAT) == 0x0007040600070406
    assert m.vmcs.read(F.VMCS_GUEST_IA32_EFER) & 1 == 0


def check_host_address_space(make_machine, mode: str) -> None:
    """The host (KVM's) is 64-bit, as the control says, and guests run under it."""
    assert platform.machine() == "x86_64" and struct.calcsize("P") == 8
    m = machine(make_machine, mode, "EXIT 0")
    assert m.run(timeout=5).exit_code == 0


def check_ia32e_mode_guest(make_machine, mode: str) -> None:
    """The control reads EFER.LMA, before and after an exit (SDM 28.2, IA32_VMX_MISC bit 5); a
    write that would switch modes at entry is refused."""
    m = machine(make_machine, mode, "EXIT 0")
    long_mode = mode in ("long", "user")
    for run in (True, False):                   # before the mode is set up, and after an exit
        assert bool(m.vmcs.read(F.VMCS_CTRL_VMENTRY_CONTROLS) & ENTRY.VM_ENTRY_IA32E_MODE_GUEST) == long_mode
        with pytest.raises(VmcsError, match="IA32E_MODE_GUEST"):
            m.vmcs.set_control(ENTRY.VM_ENTRY_IA32E_MODE_GUEST, not long_mode)
        m.vmcs.set_control(ENTRY.VM_ENTRY_IA32E_MODE_GUEST, long_mode)
        if run:
            assert m.run(timeout=5).exit_code == 0


BEHAVIOUR: dict[str, Callable] = {
    "PIN_BASED_VMX_PREEMPTION_TIMER": check_preemption_timer,
    "CPU_BASED_HLT_EXITING": check_hlt_exiting,
    "CPU_BASED_UNCONDITIONAL_IO_EXITING": check_io_exiting,
    "CPU_BASED_USE_IO_BITMAPS": check_io_exiting,
    "CPU_BASED_MONITOR_TRAP_FLAG": check_mtf,
    "CPU_BASED_USE_MSR_BITMAPS": check_msr_bitmaps,
    "CPU_BASED_USE_TSC_OFFSETTING": check_tsc_offsetting,
    "CPU_BASED_ACTIVATE_SECONDARY_CONTROLS": check_ept,
    "SECONDARY_ENABLE_EPT": check_ept,
    "SECONDARY_UNRESTRICTED_GUEST": check_unrestricted_guest,
    "VM_EXIT_SAVE_DEBUG_CONTROLS": check_guest_state,
    "VM_EXIT_SAVE_IA32_PAT": check_guest_state,
    "VM_EXIT_SAVE_IA32_EFER": check_guest_state,
    "VM_ENTRY_LOAD_DEBUG_CONTROLS": check_guest_state,
    "VM_ENTRY_LOAD_IA32_PAT": check_guest_state,
    "VM_ENTRY_LOAD_IA32_EFER": check_guest_state,
    "VM_EXIT_HOST_ADDRESS_SPACE_SIZE": check_host_address_space,
    "VM_ENTRY_IA32E_MODE_GUEST": check_ia32e_mode_guest,
}


@pytest.mark.parametrize("mode", [m.value for m in MODES])
def test_every_control_row_against_a_guest(make_machine, mode: str) -> None:
    """Refused: the VMWRITE fails and adjust_controls clears it. Must be 1: clearing fails.
    Works: a guest shows the SDM behaviour (each checker runs once per mode)."""
    rows = [r for r in model_rows(mode) if r.kind == "control"]
    assert len(rows) == sum(len(cls) for cls in (PIN, PROC, SEC, EXIT, ENTRY))
    m = make_machine(mode=mode)
    checks: dict[Callable, list[str]] = {}
    for row in rows:
        flag = row.flag
        field, msr = _field_and_msr(flag)
        if not row.works:
            with pytest.raises(UnsupportedControlError, match=f"{row.name} cannot be 1"):
                m.vmcs.set_control(flag)
            assert not adjust_controls(flag, m.vmcs.capabilities[msr]) & flag
            assert not m.vmcs.read(field) & flag
            continue
        if row.must_be_one:
            with pytest.raises(UnsupportedControlError, match=f"{row.name} must be 1"):
                m.vmcs.set_control(flag, False)
            assert m.vmcs.read(field) & flag            # a new VMCS starts adjusted
        assert row.name in BEHAVIOUR, f"{row.name} works here but nothing checks what it does"
        checks.setdefault(BEHAVIOUR[row.name], []).append(row.name)
    for check, names in checks.items():
        try:
            check(make_machine, mode)
        except AssertionError as exc:
            raise AssertionError(f"{', '.join(names)} in {mode} mode: {exc}") from exc


def _field_and_msr(flag):
    return {PIN: (F.VMCS_CTRL_PIN_BASED_VM_EXECUTION_CONTROLS, VmxMsr.IA32_VMX_TRUE_PINBASED_CTLS),
            PROC: (F.VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS, VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS),
            SEC: (F.VMCS_CTRL_SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS, VmxMsr.IA32_VMX_PROCBASED_CTLS2),
            EXIT: (F.VMCS_CTRL_VMEXIT_CONTROLS, VmxMsr.IA32_VMX_TRUE_EXIT_CTLS),
            ENTRY: (F.VMCS_CTRL_VMENTRY_CONTROLS, VmxMsr.IA32_VMX_TRUE_ENTRY_CTLS)}[type(flag)]


# -- exception vectors (SDM 25.6.3) ---------------------------------------------------------------
CPL0_SOURCE = {
    "real": "int3\n pushf\n pop %ax\n or $0x100, %ax\n push %ax\n popf\n nop\n nop\n EXIT 0",
    "protected": "int3\n pushf\n pop %eax\n or $0x100, %eax\n push %eax\n popf\n nop\n nop\n EXIT 0",
    "long": "int3\n pushf\n pop %rax\n or $0x100, %rax\n push %rax\n popf\n nop\n nop\n EXIT 0",
}


@pytest.mark.parametrize("mode", [m.value for m in MODES])
def test_every_exception_row_against_a_guest(make_machine, mode: str) -> None:
    """Refused vectors fail with the vector, the mode and what works; working ones reach their
    handler: at CPL 0 the guest's own int3 (#BP) and RFLAGS.TF (#DB), in user mode every vector,
    delivered through the guest's IDT (injected once each, vector 2 as an NMI)."""
    rows = [r for r in model_rows(mode) if r.kind == "exception"]
    assert [r.vector for r in rows] == list(range(32))
    works = [r.vector for r in rows if r.works]
    probe = make_machine(mode=mode)
    for row in rows:
        if row.works:
            continue
        name = vector_name(row.vector)
        with pytest.raises(ExceptionInterceptError) as caught:
            probe.on(ExitReason.EXCEPTION_OR_NMI, lambda vcpu, info: None, vector=row.vector)
        text = str(caught.value)
        assert f"{name} (vector {row.vector})" in text and f"in {mode} mode" in text and "user mode" in text
        assert all(vector_name(v) in text for v in works)
        with pytest.raises(ExceptionInterceptError):
            probe.vmcs.write(F.VMCS_CTRL_EXCEPTION_BITMAP, 1 << row.vector)
        assert probe.vmcs.read(F.VMCS_CTRL_EXCEPTION_BITMAP) == 0
    assert not probe.hooks.handles("exit")
    assert all(not probe.vm.dispatcher.chain(ExitReason.EXCEPTION_OR_NMI, r.vector)[:-1]
               for r in rows if not r.works)                 # nothing left behind by a refusal

    seen: list[int] = []

    def record(vcpu, info):
        seen.append(info.interruption.vector)
        if info.interruption.vector == Vector.DB:
            vcpu.rflags &= ~TF
        return RESUME

    if mode == "user":
        m = machine(make_machine, mode, "mov $32, %ecx\n 1: out %al, $0x99\n dec %ecx\n jnz 1b\n EXIT 0")
        order = iter(range(32))

        def inject(vcpu, info):
            vector = next(order)
            return Inject(vector, 0 if vector in EXCEPTIONS_WITH_ERROR_CODE else None)

        m.on(ExitReason.IO_INSTRUCTION, inject, port=0x99)
        wanted = list(range(32))
    else:
        m = machine(make_machine, mode, CPL0_SOURCE[mode])
        wanted = [v for v in (Vector.BP, Vector.DB) if v in works]
        assert set(works) <= {Vector.BP, Vector.DB}          # KVM exits on no other vector at CPL 0
    for vector in works:
        m.on(ExitReason.EXCEPTION_OR_NMI, record, vector=vector)
    r = m.run(timeout=10)
    if mode == "user" or Vector.DB in works:
        assert (r.reason, r.exit_code) == ("exit", 0), r
    assert seen == wanted, r


def test_an_unfiltered_exception_handler_takes_what_the_mode_can_intercept(make_machine) -> None:
    with Kvm() as kvm:
        allowed = host_model(kvm).allowed_bitmap("long")
    m = make_machine(mode="long")
    m.on(ExitReason.EXCEPTION_OR_NMI, lambda vcpu, info: None)
    assert m.vmcs.read(F.VMCS_CTRL_EXCEPTION_BITMAP) == allowed
    u = make_machine(mode="user")
    u.on(ExitReason.EXCEPTION_OR_NMI, lambda vcpu, info: None)
    assert u.vmcs.read(F.VMCS_CTRL_EXCEPTION_BITMAP) == 0xFFFFFFFF


def test_the_model_is_cached_per_process_and_on_disk(tmp_path, monkeypatch) -> None:
    """A second model for the same host comes from the disk cache with the same answers and no
    guest probe; another cache directory probes again."""
    import minivmm.capabilities as caps
    monkeypatch.setenv("MINIVMM_CACHE_DIR", str(tmp_path / "asm"))
    monkeypatch.setenv("MINIVMM_CAPS_CACHE", "1")
    monkeypatch.setattr(caps, "_models", {})
    with Kvm() as kvm:
        first = caps.host_model(kvm)
        assert caps.host_model(kvm) is first
        vectors = {mode: first.vectors(mode) for mode in MODES}
        files = list((tmp_path / "capabilities").glob("*.json"))
        assert len(files) == 1 and first.identity in files[0].name
        monkeypatch.setattr(caps, "_models", {})
        monkeypatch.setattr(caps, "_probe_cpl0_vectors", lambda *a: pytest.fail("probed again"))
        second = caps.host_model(kvm)
        assert second is not first and second.capabilities == first.capabilities
        assert {mode: second.vectors(mode) for mode in MODES} == vectors


def test_one_model_feeds_every_consumer() -> None:
    """The capability MSRs are computed in one place (the model); the VMCS, `check` and `caps`
    read them from it."""
    import ast
    from pathlib import Path
    package = Path(__file__).resolve().parent.parent / "minivmm"
    callers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) \
                    == "compute_capability_msrs":
                callers.add(path.relative_to(package).as_posix())
    assert callers == {"capabilities.py"}
    with Kvm() as kvm:
        model = host_model(kvm)
        from minivmm.vmcs import capability_report, vmx_capability_msrs
        assert vmx_capability_msrs(kvm) is model.msrs
        assert capability_report(kvm)["model"] == model.report()


def test_with_the_in_kernel_irqchip_hlt_exiting_is_refused_and_hlt_waits(make_machine) -> None:
    """KVM's irqchip keeps HLT in the kernel: the control cannot be 1, and a halted guest with no
    interrupt coming waits until the deadline without an HLT exit."""
    m = make_machine(mode="long", irqchip=True)
    assert not m.vmcs.read(F.VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS) & PROC.CPU_BASED_HLT_EXITING
    with pytest.raises(UnsupportedControlError, match="CPU_BASED_HLT_EXITING cannot be 1"):
        m.vmcs.set_control(PROC.CPU_BASED_HLT_EXITING)
    m.load_asm("cli\n hlt\n EXIT 0")
    r = m.run(timeout=0.2)
    assert r.reason == "timeout" and "EXECUTE_HLT" not in r.exits, r
