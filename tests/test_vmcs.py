"""The VMCS model (issue 3): VMREAD/VMWRITE on live vCPU state, controls against the
capability MSRs, MSR and I/O bitmaps, the CPUID table, and entry with invalid guest state."""
from __future__ import annotations

import random

import pytest

from minivmm.controls import (PinBasedControls, ProcBasedControls, SecondaryControls, UnsupportedControlError,
                              VmxMsr, adjust_controls, allowed0, allowed1, check_controls)
from minivmm import RESUME, ExitReason, Reply
from minivmm.kvm import KvmError
from minivmm.vmcs import IoBitmaps, MsrBitmap, VmcsError, control_class_for
from minivmm.vmcs_fields import VmcsField as F, access_rights_from_segment, access_rights_to_fields

CTRL_FIELDS = (F.VMCS_CTRL_PIN_BASED_VM_EXECUTION_CONTROLS, F.VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
               F.VMCS_CTRL_SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS, F.VMCS_CTRL_VMEXIT_CONTROLS,
               F.VMCS_CTRL_VMENTRY_CONTROLS)


# -- adjust_controls (pure) ----------------------------------------------------------------
def _cap(allowed_0: int, allowed_1: int) -> int:
    return allowed_0 | allowed_1 << 32


@pytest.mark.parametrize("value, cap, expected", [
    (0x0, _cap(0x16, 0xFF), 0x16),                    # must-be-1 bits forced on
    (0x101, _cap(0x16, 0xFF), 0x17),                  # unsupported bit 8 dropped, bit 0 kept
    (0xFFFFFFFF, _cap(0x0, 0x0), 0x0),                # nothing allowed
    (0xFFFFFFFF, _cap(0x0, 0xFFFFFFFF), 0xFFFFFFFF),  # everything flexible
    (0x0, _cap(0xFFFFFFFF, 0xFFFFFFFF), 0xFFFFFFFF),  # everything fixed to 1
    (0x8000_0001, _cap(0x1, 0x8000_0001), 0x8000_0001),
    (0x8000_0000, _cap(0x1, 0x0000_0001), 0x1),       # bit 31 not allowed
])
def test_adjust_controls_examples(value: int, cap: int, expected: int) -> None:
    assert adjust_controls(value, cap) == expected
    check_controls(expected, cap, ProcBasedControls)   # the adjusted value always passes


def test_adjust_controls_follows_the_sdm_rule_on_random_capabilities() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        may_be_one = rng.getrandbits(32)
        must_be_one = rng.getrandbits(32) & may_be_one          # consistent capability MSR
        cap = _cap(must_be_one, may_be_one)
        value = rng.getrandbits(32)
        adjusted = adjust_controls(value, cap)
        assert allowed0(cap) == must_be_one and allowed1(cap) == may_be_one
        assert adjusted & must_be_one == must_be_one             # bit X of allowed-0 = 1 -> control 1
        assert adjusted & ~may_be_one == 0                        # bit X of allowed-1 = 0 -> control 0
        flexible = may_be_one & ~must_be_one
        assert adjusted & flexible == value & flexible            # flexible bits keep the request
        check_controls(adjusted, cap, ProcBasedControls)


def test_check_controls_reports_both_directions() -> None:
    cap = _cap(int(ProcBasedControls.CPU_BASED_HLT_EXITING), int(ProcBasedControls.CPU_BASED_HLT_EXITING))
    with pytest.raises(UnsupportedControlError) as excinfo:
        check_controls(int(ProcBasedControls.CPU_BASED_RDTSC_EXITING), cap, ProcBasedControls)
    text = str(excinfo.value)
    assert "CPU_BASED_RDTSC_EXITING cannot be 1" in text
    assert "CPU_BASED_HLT_EXITING must be 1" in text
    assert excinfo.value.must_be_zero == ProcBasedControls.CPU_BASED_RDTSC_EXITING
    assert excinfo.value.must_be_one == ProcBasedControls.CPU_BASED_HLT_EXITING


# -- bitmaps (pure) --------------------------------------------------------------------------
@pytest.mark.parametrize("msr, write, byte, bit", [
    (0x0, False, 0, 0), (0x174, False, 0x2E, 4), (0x1FFF, False, 1023, 7),
    (0xC0000080, False, 1024 + 16, 0), (0xC0001FFF, False, 2047, 7),
    (0x174, True, 2048 + 0x2E, 4), (0xC0000080, True, 3072 + 16, 0),
])
def test_msr_bitmap_layout(msr: int, write: bool, byte: int, bit: int) -> None:
    bitmap = MsrBitmap()
    bitmap.intercept(msr, read=not write, write=write)
    assert [i for i, b in enumerate(bitmap.data) if b] == [byte]
    assert bitmap.data[byte] == 1 << bit
    assert bitmap.is_intercepted(msr, write) and not bitmap.is_intercepted(msr, not write)
    bitmap.allow(msr)
    assert not any(bitmap.data)


def test_msr_bitmap_takes_msrs_outside_its_ranges_as_extra_filter_ranges() -> None:
    """Such MSRs always exit on VT-x; here each intercepted one gets a one-MSR deny range, up to
    what KVM_MSR_FILTER_MAX_RANGES leaves."""
    bitmap = MsrBitmap()
    outside = [0x2000, 0xBFFFFFFF, 0xC0002000, 0x40000000]
    for msr in outside:
        bitmap.intercept(msr, write=msr != 0x2000)
    assert not any(bitmap.data) and bitmap.any()
    assert bitmap.is_intercepted(0x2000, False) and not bitmap.is_intercepted(0x2000, True)
    extra = bitmap.kvm_filter_ranges()[4:]
    assert [(int(flag), base, bits, count) for flag, base, bits, count in extra] == [
        (1, 0x2000, b"\x00", 1), (3, 0x40000000, b"\x00", 1), (3, 0xBFFFFFFF, b"\x00", 1),
        (3, 0xC0002000, b"\x00", 1)]
    bitmap.allow(0x40000000)
    assert 0x40000000 not in bitmap.outside
    for msr in range(0x50000000, 0x50000000 + MsrBitmap.MAX_OUTSIDE - 3):
        bitmap.intercept(msr)
    with pytest.raises(VmcsError, match="outside the MSR bitmap ranges .* already"):
        bitmap.intercept(0x60000000)
    with pytest.raises(VmcsError, match="not a 32-bit MSR"):
        bitmap.intercept(1 << 32)


@pytest.mark.kvm
def test_an_msr_outside_the_bitmap_ranges_exits_to_its_handler(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x40000010, %ecx\n rdmsr\n mov %eax, %ebx\n mov $0x40000011, %ecx\n"
               " wrmsr\n EXIT 0")
    seen = []
    m.on(ExitReason.EXECUTE_RDMSR, lambda vcpu, info: seen.append(info.msr) or Reply(0x1234),
         msr=0x40000010)
    m.on(ExitReason.EXECUTE_WRMSR, lambda vcpu, info: seen.append(info.msr) or RESUME, msr=0x40000011)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code, m.vcpu.rbx) == ("exit", 0, 0x1234), r
    assert seen == [0x40000010, 0x40000011]


def test_msr_bitmap_becomes_an_inverted_kvm_filter() -> None:
    bitmap = MsrBitmap()
    bitmap.intercept(0x174, write=False)
    ranges = bitmap.kvm_filter_ranges()
    assert [(int(flag), base, count) for flag, base, _, count in ranges] == [
        (1, 0, 0x2000), (2, 0, 0x2000), (1, 0xC0000000, 0x2000), (2, 0xC0000000, 0x2000)]
    read_low = ranges[0][2]
    assert read_low[0x2E] == 0xFF & ~(1 << 4) and read_low[0] == 0xFF
    assert all(b == 0xFF for b in ranges[1][2])


def test_io_bitmaps() -> None:
    io = IoBitmaps()
    io.intercept(0x80)
    io.intercept(0x8001)
    assert io.a[0x10] == 1 and io.b[0] == 2
    assert io.is_intercepted(0x80) and io.is_intercepted(0x8001) and not io.is_intercepted(0x81)
    io.intercept(0x80, False)
    assert not io.is_intercepted(0x80)
    with pytest.raises(VmcsError):
        io.intercept(0x10000)


def test_access_rights_round_trip() -> None:
    for ar in (0xA09B, 0xC093, 0xA0FB, 0xC0F3, 0x9B, 0x93, 0x8B, 0x10000):
        fields = access_rights_to_fields(ar)
        assert access_rights_from_segment(**fields) == ar


# -- VMREAD of live state --------------------------------------------------------------------
EXPECTED_AR = {
    #            CS      SS/DS   TR
    "real": (0x9B, 0x93, None),
    "protected": (0xC09B, 0xC093, 0x8B),
    "long": (0xA09B, 0xC093, 0x8B),
    "user": (0xA0FB, 0xC0F3, 0x8B),
}


@pytest.mark.kvm
@pytest.mark.parametrize("mode", list(EXPECTED_AR))
def test_vmread_segment_access_rights(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm("EXIT 0\n1: jmp 1b")
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    cs, data, tr = EXPECTED_AR[mode]
    assert m.vmcs.read(F.VMCS_GUEST_CS_ACCESS_RIGHTS) == cs
    for field in (F.VMCS_GUEST_SS_ACCESS_RIGHTS, F.VMCS_GUEST_DS_ACCESS_RIGHTS, F.VMCS_GUEST_ES_ACCESS_RIGHTS):
        assert m.vmcs.read(field) == data, field.name
    if tr is not None:
        assert m.vmcs.read(F.VMCS_GUEST_TR_ACCESS_RIGHTS) == tr
        assert m.vmcs.read(F.VMCS_GUEST_TR_SELECTOR) == 0x30
        assert m.vmcs.read(F.VMCS_GUEST_TR_BASE) == 0xB000
        assert m.vmcs.read(F.VMCS_GUEST_LDTR_ACCESS_RIGHTS) & 0x10000      # LDTR unusable
    cs_seg = m.vcpu.segment("cs")
    assert m.vmcs.read(F.VMCS_GUEST_CS_SELECTOR) == cs_seg.selector
    assert m.vmcs.read(F.VMCS_GUEST_CS_LIMIT) == cs_seg.limit
    assert m.vmcs.read(F.VMCS_GUEST_CS_BASE) == cs_seg.base


@pytest.mark.kvm
def test_vmread_registers_and_tables(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x1234, %rsp\n hlt")
    r = m.run(timeout=5)
    assert r.reason == "hlt"
    v = m.vmcs
    assert v.read(F.VMCS_GUEST_RIP) == m.vcpu.rip == 0x100008
    assert v.read(F.VMCS_GUEST_RSP) == 0x1234
    assert v.read(F.VMCS_GUEST_RFLAGS) & 2
    assert v.read(F.VMCS_GUEST_CR0) == m.vcpu.cr0 and v.read(F.VMCS_GUEST_CR0) & 0x80000001 == 0x80000001
    assert v.read(F.VMCS_GUEST_CR3) == 0x3000
    assert v.read(F.VMCS_GUEST_CR4) & 0x20
    assert v.read(F.VMCS_GUEST_IA32_EFER) & 0x500 == 0x500
    assert (v.read(F.VMCS_GUEST_GDTR_BASE), v.read(F.VMCS_GUEST_GDTR_LIMIT)) == m.vcpu.descriptor_table("gdt")
    assert v.read(F.VMCS_GUEST_DR7) & 0x400
    # Exit information of the last exit: HLT, one byte.
    assert v.read(F.VMCS_EXIT_REASON) == 12
    assert v.read(F.VMCS_VMEXIT_INSTRUCTION_LENGTH) == 1


@pytest.mark.kvm
def test_vmread_exit_information_of_an_io_exit(make_machine) -> None:
    from minivmm.actions import Stop
    from minivmm.exits import ExitReason
    m = make_machine(mode="long")
    m.load_asm("mov $0x1234, %dx\n inw %dx, %ax\n hlt")
    m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: Stop("stopped"), port=0x1234)
    r = m.run(timeout=5)
    assert r.reason == "stopped"
    assert m.vmcs.read(F.VMCS_EXIT_REASON) == 30
    assert m.vmcs.read(F.VMCS_EXIT_QUALIFICATION) == 0x1234_0009          # 2 bytes, IN, DX
    assert m.vmcs.read(F.VMCS_IDT_VECTORING_INFORMATION) == 0


# -- VMWRITE ---------------------------------------------------------------------------------
@pytest.mark.kvm
def test_vmwrite_guest_state_is_seen_by_the_guest(make_machine) -> None:
    m = make_machine(mode="long")
    image = m.load_asm("""
        mov $1, %ebx
        EXIT 1
    second:
        mov $0x174, %ecx
        rdmsr
        mov %eax, %ebx
        EXIT 2
    """)
    m.setup()
    m.vmcs.write(F.VMCS_GUEST_RIP, image.symbols["second"])
    m.vmcs.write(F.VMCS_GUEST_IA32_SYSENTER_CS, 0x5678)
    m.vmcs.write(F.VMCS_GUEST_RSP, 0x8000)
    assert m.vmcs.read(F.VMCS_GUEST_IA32_SYSENTER_CS) == 0x5678
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 2), r
    assert m.vcpu.rbx == 0x5678 and m.vcpu.rsp == 0x8000


@pytest.mark.kvm
def test_vmwrite_segment_fields(make_machine) -> None:
    m = make_machine(mode="protected")
    m.load_asm("mov %fs:0, %eax\n mov %eax, %ebx\n EXIT 0")
    m.setup()
    m.memory.write(0x12340, b"\x11\x22\x33\x44")
    m.vmcs.write(F.VMCS_GUEST_FS_BASE, 0x12340)
    m.vmcs.write(F.VMCS_GUEST_FS_LIMIT, 0xFFFF)
    m.vmcs.write(F.VMCS_GUEST_FS_ACCESS_RIGHTS, 0x4093)             # byte granular, 32-bit data
    assert m.vcpu.segment("fs").limit == 0xFFFF and m.vcpu.segment("fs").g == 0
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    assert m.vcpu.rbx == 0x44332211
    assert m.vmcs.read(F.VMCS_GUEST_FS_ACCESS_RIGHTS) == 0x4093


@pytest.mark.kvm
@pytest.mark.parametrize("field", [F.VMCS_EXIT_REASON, F.VMCS_EXIT_QUALIFICATION, F.VMCS_VMEXIT_INSTRUCTION_LENGTH,
                                   F.VMCS_VMEXIT_INTERRUPTION_INFORMATION, F.VMCS_GUEST_PHYSICAL_ADDRESS,
                                   F.VMCS_VM_INSTRUCTION_ERROR])
def test_vmwrite_to_exit_information_raises(make_machine, field: F) -> None:
    m = make_machine(mode="long")
    before = m.vmcs.read(field)
    with pytest.raises(VmcsError, match=f"{field.name} is a read-only exit-information field"):
        m.vmcs.write(field, 1)
    assert m.vmcs.read(field) == before


@pytest.mark.kvm
@pytest.mark.parametrize("field", [F.VMCS_HOST_RIP, F.VMCS_HOST_CR3, F.VMCS_HOST_CS_SELECTOR, F.VMCS_HOST_IA32_EFER])
def test_host_state_belongs_to_kvm(make_machine, field: F) -> None:
    m = make_machine(mode="long")
    with pytest.raises(VmcsError, match=f"{field.name}.*KVM"):
        m.vmcs.read(field)
    with pytest.raises(VmcsError, match=f"{field.name}.*KVM"):
        m.vmcs.write(field, 0)


# -- controls on the machine ----------------------------------------------------------------
@pytest.mark.kvm
def test_default_controls_satisfy_the_capability_msrs(make_machine) -> None:
    m = make_machine(mode="long")
    from minivmm.vmcs import _FIELD_CONTROLS
    for field in CTRL_FIELDS:
        cls, msr = _FIELD_CONTROLS[field]
        value = m.vmcs.read(field)
        check_controls(value, m.vmcs.capabilities[msr], cls, msr)
        assert adjust_controls(value, m.vmcs.capabilities[msr]) == value
    assert m.vmcs.control_enabled(ProcBasedControls.CPU_BASED_HLT_EXITING)
    assert m.vmcs.control_enabled(ProcBasedControls.CPU_BASED_USE_MSR_BITMAPS)
    assert m.vmcs.control_enabled(SecondaryControls.SECONDARY_ENABLE_EPT)


@pytest.mark.kvm
@pytest.mark.parametrize("name", ["CPU_BASED_RDTSC_EXITING", "CPU_BASED_CR3_LOAD_EXITING",
                                  "CPU_BASED_MOV_DR_EXITING"])
def test_control_the_host_cannot_honour(make_machine, name: str) -> None:
    m = make_machine(mode="long")
    flag = control_class_for(name)
    field = F.VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS
    before = m.vmcs.read(field)
    if allowed1(m.vmcs.capabilities[VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS]) & flag:
        m.vmcs.set_control(flag)               # a host that can honour it (no skip: CI fails skipped kvm tests)
        assert m.vmcs.read(field) == before | flag
        return
    with pytest.raises(UnsupportedControlError, match=f"{name} cannot be 1 on this host"):
        m.vmcs.set_control(flag)
    with pytest.raises(UnsupportedControlError, match=name):
        m.vmcs.write(field, before | flag)
    assert m.vmcs.read(field) == before                       # unchanged after the refusal
    assert not m.vmcs.control_enabled(flag)


@pytest.mark.kvm
def test_set_and_clear_a_supported_control(make_machine) -> None:
    m = make_machine(mode="long")
    flag = ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG
    m.vmcs.set_control(flag)
    assert m.vmcs.control_enabled(flag) and m.vmcs.mtf
    m.vmcs.set_control(flag, False)
    assert not m.vmcs.control_enabled(flag) and not m.vmcs.mtf
    assert control_class_for("PIN_BASED_VMX_PREEMPTION_TIMER") is PinBasedControls.PIN_BASED_VMX_PREEMPTION_TIMER
    with pytest.raises(KeyError):
        control_class_for("CPU_BASED_MAKE_COFFEE")


# -- CPUID table -------------------------------------------------------------------------------
@pytest.mark.kvm
def test_cpuid_table_lookup_and_overrides(make_machine) -> None:
    m = make_machine(mode="long")
    vendor = m.cpuid.lookup(0)
    assert vendor.eax >= 1
    m.cpuid.set(0, ebx=0x41424344)
    assert m.cpuid.lookup(0).ebx == 0x41424344 and m.cpuid.lookup(0).ecx == vendor.ecx
    m.cpuid.set(0x4000_0100, 1, eax=5)
    assert m.cpuid.lookup(0x4000_0100, 1).eax == 5
    with pytest.raises(ValueError, match="eax, ebx, ecx, edx"):
        m.cpuid.set(1, esi=3)


@pytest.mark.kvm
def test_cpuid_change_after_the_first_run(make_machine) -> None:
    """KVM refuses a different CPUID table once the vCPU ran: the change must not be silently lost."""
    m = make_machine(mode="long")
    m.load_asm("again: mov $0x40000100, %eax\n cpuid\n hlt\n jmp again")
    m.cpuid.set(0x4000_0100, eax=1)
    assert m.run(timeout=5).reason == "hlt" and m.vcpu.rax == 1
    m.cpuid.set(0x4000_0100, eax=2)
    outcome = ""
    try:
        r = m.run(timeout=5)
        outcome = f"guest read eax={m.vcpu.rax} ({r.reason})"
    except KvmError as exc:
        outcome = str(exc)
    assert "eax=2" in outcome or "before the vCPU first runs" in outcome, outcome


# -- invalid guest state --------------------------------------------------------------------
def _set_invalid(m, what: str) -> None:
    if what == "cr0.pg-without-pe":
        m.vcpu.cr0 = m.vcpu.cr0 & ~1
    elif what == "lma-without-pae":
        m.vcpu.cr4 = m.vcpu.cr4 & ~0x20
    elif what == "efer-lme-without-lma":
        m.vcpu.efer = m.vcpu.efer & ~0x400


INVALID_STATES = ["cr0.pg-without-pe", "lma-without-pae", "efer-lme-without-lma"]


@pytest.mark.kvm
@pytest.mark.parametrize("what", INVALID_STATES)
def test_invalid_sregs_are_refused_by_kvm_set_sregs(make_machine, what: str) -> None:
    m = make_machine(mode="long")
    m.load_asm("hlt")
    m.setup()
    _set_invalid(m, what)
    error = None
    try:
        m.vcpu.flush()
    except KvmError as exc:
        # Keep only plain data: the traceback holds ctypes views of kvm_run (see test_dispatch's BufferError test).
        error = (exc.ioctl, exc.errno, str(exc))
    assert error is not None
    ioctl, err, text = error
    assert (ioctl, err) == ("KVM_SET_SREGS", 22)
    assert "KVM_SET_SREGS failed: EINVAL" in text
    assert "segment/control register state is invalid" in text


@pytest.mark.kvm
@pytest.mark.parametrize("what", INVALID_STATES)
def test_invalid_guest_state_at_entry(make_machine, what: str) -> None:
    m = make_machine(mode="long")
    m.load_asm("hlt")
    m.setup()
    _set_invalid(m, what)
    result, error = None, None
    try:
        result = m.run(timeout=5)
    except KvmError as exc:
        error = (exc.ioctl, str(exc))
    if result is not None:           # a VT-x host that defers the check to VM entry
        assert result.reason == "error" and "INVALID_GUEST_STATE" in result.exits, result
        return
    ioctl, text = error
    assert ioctl == "KVM_SET_SREGS", text
    assert "invalid" in text


@pytest.mark.kvm
def test_bad_segment_access_rights_do_not_enter(make_machine) -> None:
    """An unusable CS cannot run: this host reports it as a triple fault (VT-x: entry failure)."""
    m = make_machine(mode="long")
    m.load_asm("hlt")
    m.setup()
    m.vmcs.write(F.VMCS_GUEST_CS_ACCESS_RIGHTS, 0x10000)
    assert m.vcpu.segment("cs").unusable == 1
    r = m.run(timeout=5)
    assert r.reason in ("triple_fault", "error"), r
    assert set(r.exits) <= {"TRIPLE_FAULT", "INVALID_GUEST_STATE"} and r.exits
    assert r.reason != "hlt"
