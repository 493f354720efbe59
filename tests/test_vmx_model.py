"""Decoding logic of the VMX model (no guest can reach these paths; no KVM needed)."""

from __future__ import annotations

import pytest

from minivmm.controls import (
    EptVpidCap,
    HostCapabilities,
    PinBasedControls,
    ProcBasedControls,
    SecondaryControls,
    UnsupportedControlError,
    VmEntryControls,
    VmExitControls,
    VmxMsr,
    adjust_controls,
    allowed0,
    allowed1,
    check_controls,
    compute_capability_msrs,
    format_capability_table,
)
from minivmm.exits import (
    EXCEPTIONS_WITH_ERROR_CODE,
    VM_ENTRY_FAILURE,
    CrAccessType,
    EptViolationQualification,
    ExitInfo,
    ExitReason,
    InterruptionInfo,
    InterruptionType,
    IoQualification,
    MovCrQualification,
    Vector,
    decode_exit_reason,
)
from minivmm.vmcs_fields import (
    FieldGroup,
    FieldWidth,
    VmcsField,
    access_rights_from_segment,
    access_rights_to_fields,
    field_group,
    field_width,
    field_width_type,
    high_encoding,
    is_read_only,
)

PROC = ProcBasedControls


def host(**kw: bool) -> HostCapabilities:
    base = dict(
        msr_filter=True, user_space_msr=True, guest_debug=True, hw_breakpoints=False,
        readonly_mem=True, dirty_log=True, sync_regs=True, tsc_control=False,
    )
    base.update(kw)
    return HostCapabilities(**base)


def test_exit_reason_numbers() -> None:
    assert ExitReason.EXCEPTION_OR_NMI == 0
    assert ExitReason.TRIPLE_FAULT == 2
    assert ExitReason.EXECUTE_CPUID == 10
    assert ExitReason.EXECUTE_HLT == 12
    assert ExitReason.EXECUTE_VMCALL == 18
    assert ExitReason.MOV_CR == 28
    assert ExitReason.IO_INSTRUCTION == 30
    assert ExitReason.EXECUTE_RDMSR == 31 and ExitReason.EXECUTE_WRMSR == 32
    assert ExitReason.INVALID_GUEST_STATE == 33
    assert ExitReason.MONITOR_TRAP_FLAG == 37
    assert ExitReason.EPT_VIOLATION == 48 and ExitReason.EPT_MISCONFIGURATION == 49
    assert ExitReason.VMX_PREEMPTION_TIMER_EXPIRED == 52
    assert ExitReason.EXECUTE_XSETBV == 55
    assert ExitReason.EXECUTE_TDCALL == 77
    assert 35 not in ExitReason._value2member_map_
    assert VM_ENTRY_FAILURE == 0x8000_0000
    assert decode_exit_reason(0x8000_0021) == (ExitReason.INVALID_GUEST_STATE, True)
    assert decode_exit_reason(30) == (ExitReason.IO_INSTRUCTION, False)


@pytest.mark.parametrize(
    ("qual", "raw"),
    [
        (IoQualification(size=1, direction_in=False, operand_is_dx=True, port=0x3F8), 0x03F8_0000),
        (IoQualification(size=1, direction_in=True, operand_is_dx=False, port=0x60), 0x0060_0048),
        (IoQualification(size=4, direction_in=True, port=0xCFC), 0x0CFC_000B),
        (IoQualification(size=2, string=True, rep=True, port=0x1F0), 0x01F0_0031),
    ],
    ids=["out dx,al 0x3f8", "in al,0x60", "in eax,dx 0xcfc", "rep outsw 0x1f0"],
)
def test_io_qualification_round_trip(qual: IoQualification, raw: int) -> None:
    assert qual.encode() == raw
    assert IoQualification.decode(raw) == qual


def test_io_qualification_rejects_bad_size() -> None:
    with pytest.raises(ValueError):
        IoQualification(size=3).encode()


def test_ept_violation_qualification() -> None:
    q = EptViolationQualification(
        write=True, readable=True, executable=True, gla_valid=True, gla_is_translation=True
    )
    assert q.encode() == 0x1AA
    assert EptViolationQualification.decode(0x1AA) == q
    assert q.access == "write" and q.permissions == "r-x"
    fetch = EptViolationQualification.decode(0x4 | 1 << 12)
    assert fetch.execute and fetch.nmi_unblocking and not fetch.read
    assert EptViolationQualification.decode((1 << 17) - 1).encode() == (1 << 17) - 1


def test_interruption_info_gp_with_error_code() -> None:
    gp = InterruptionInfo(Vector.GP, InterruptionType.HARDWARE_EXCEPTION, error_code_valid=True)
    assert gp.encode() == 0x8000_0B0D
    assert InterruptionInfo.decode(0x8000_0B0D) == gp
    assert InterruptionInfo.decode(0x8000_0202) == InterruptionInfo(2, InterruptionType.NMI)
    bp = InterruptionInfo.decode(0x8000_0603)
    assert bp.type is InterruptionType.SOFTWARE_EXCEPTION and bp.vector == Vector.BP
    assert not InterruptionInfo.decode(0x0D).valid
    assert str(gp) == "#GP hardware exception with error code"


def test_vectors() -> None:
    vectors = (Vector.DE, Vector.UD, Vector.DF, Vector.GP, Vector.PF, Vector.VE, Vector.CP)
    assert vectors == (0, 6, 8, 13, 14, 20, 21)
    assert EXCEPTIONS_WITH_ERROR_CODE == {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}   # SDM table 6-1: #VC, #SX too


def test_mov_cr_qualification() -> None:
    q = MovCrQualification(cr=3, access_type=CrAccessType.MOV_TO_CR, gpr=0)
    assert q.encode() == 0x3
    assert MovCrQualification.decode(0x113) == MovCrQualification(3, CrAccessType.MOV_FROM_CR, gpr=1)
    lmsw = MovCrQualification(0, CrAccessType.LMSW, lmsw_memory_operand=True, lmsw_source=0x1)
    assert lmsw.encode() == 0x0001_0070
    assert "(mov from cr3 gpr 1)" in str(ExitInfo().reset(ExitReason.MOV_CR, 0x113))


def test_exit_info_reset_and_views() -> None:
    info = ExitInfo(vcpu_index=1)
    out = info.reset(ExitReason.IO_INSTRUCTION, 0x03F8_0000, instruction_length=1, raw_kvm_exit="raw")
    assert out is info and info.vcpu_index == 1 and info.raw_kvm_exit == "raw"
    assert info.io.port == 0x3F8 and not info.io.direction_in
    assert info.vector is None
    assert info.full_reason == 30
    assert str(info) == "IO_INSTRUCTION qual=0x3f80000 (out 1 byte port 0x3f8) rip-len=1"

    info.reset(
        ExitReason.EXCEPTION_OR_NMI, interruption_info=0x8000_0B0E, interruption_error_code=2,
        instruction_length=2,
    )
    assert info.raw_kvm_exit is None and info.qualification == 0
    assert info.vector == Vector.PF
    assert info.interruption.error_code_valid
    assert "#PF hardware exception" in str(info)

    info.reset(ExitReason.EPT_VIOLATION, 0x182, guest_physical_address=0x5000, guest_linear_address=0x7000)
    assert info.ept.write
    assert str(info) == "EPT_VIOLATION qual=0x182 (write on --- page gpa 0x5000 gla 0x7000) rip-len=0"

    info.reset(ExitReason.INVALID_GUEST_STATE, entry_failure=True)
    assert info.full_reason == 0x8000_0021
    assert str(info).startswith("VM-entry failure INVALID_GUEST_STATE")


@pytest.mark.parametrize(
    ("field", "encoding"),
    [
        (VmcsField.VMCS_GUEST_RIP, 0x681E),
        (VmcsField.VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS, 0x4002),
        (VmcsField.VMCS_EXIT_REASON, 0x4402),
        (VmcsField.VMCS_EXIT_QUALIFICATION, 0x6400),
        (VmcsField.VMCS_GUEST_CS_SELECTOR, 0x0802),
        (VmcsField.VMCS_CTRL_EPT_POINTER, 0x201A),
        (VmcsField.VMCS_GUEST_CS_ACCESS_RIGHTS, 0x4816),
        (VmcsField.VMCS_CTRL_SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS, 0x401E),
        (VmcsField.VMCS_GUEST_PHYSICAL_ADDRESS, 0x2400),
        (VmcsField.VMCS_GUEST_LINEAR_ADDRESS, 0x640A),
        (VmcsField.VMCS_HOST_RIP, 0x6C16),
        (VmcsField.VMCS_GUEST_VMX_PREEMPTION_TIMER_VALUE, 0x482E),
    ],
)
def test_vmcs_field_encodings(field: VmcsField, encoding: int) -> None:
    assert field == encoding


def test_vmcs_field_classification() -> None:
    assert field_width(VmcsField.VMCS_GUEST_CS_SELECTOR) == 16
    assert field_width(VmcsField.VMCS_EXIT_REASON) == 32
    assert field_width(VmcsField.VMCS_CTRL_EPT_POINTER) == 64
    assert field_width(high_encoding(VmcsField.VMCS_CTRL_EPT_POINTER)) == 32
    assert field_width(VmcsField.VMCS_GUEST_RIP) == 64
    assert field_width_type(VmcsField.VMCS_GUEST_RIP) is FieldWidth.NATURAL
    assert field_width_type(VmcsField.VMCS_CTRL_TSC_OFFSET) is FieldWidth.BITS64
    assert field_group(VmcsField.VMCS_CTRL_EXCEPTION_BITMAP) is FieldGroup.CONTROL
    assert field_group(VmcsField.VMCS_EXIT_QUALIFICATION) is FieldGroup.EXIT_INFO
    assert field_group(VmcsField.VMCS_GUEST_RIP) is FieldGroup.GUEST
    assert field_group(VmcsField.VMCS_HOST_RIP) is FieldGroup.HOST
    assert is_read_only(VmcsField.VMCS_VMEXIT_INSTRUCTION_LENGTH)
    assert not is_read_only(VmcsField.VMCS_GUEST_RIP)
    with pytest.raises(ValueError):
        high_encoding(VmcsField.VMCS_GUEST_RIP)
    with pytest.raises(ValueError):
        field_width(0x1_0000)
    for field in VmcsField:
        assert field & 1 == 0
        assert field.name.startswith("VMCS_")
        assert is_read_only(field) == (field.name.startswith(("VMCS_EXIT", "VMCS_VMEXIT", "VMCS_IO_"))
                                       or field in (VmcsField.VMCS_VM_INSTRUCTION_ERROR,
                                                    VmcsField.VMCS_IDT_VECTORING_INFORMATION,
                                                    VmcsField.VMCS_IDT_VECTORING_ERROR_CODE,
                                                    VmcsField.VMCS_GUEST_PHYSICAL_ADDRESS,
                                                    VmcsField.VMCS_GUEST_LINEAR_ADDRESS))


@pytest.mark.parametrize(
    ("segment", "ar"),
    [
        (dict(type=0xB, s=1, dpl=0, present=1, avl=0, l=1, db=0, g=1, unusable=0), 0xA09B),
        (dict(type=0xB, s=1, dpl=0, present=1, avl=0, l=0, db=1, g=1, unusable=0), 0xC09B),
        (dict(type=0xB, s=1, dpl=3, present=1, avl=0, l=1, db=0, g=1, unusable=0), 0xA0FB),
        (dict(type=0, s=0, dpl=0, present=0, avl=0, l=0, db=0, g=0, unusable=1), 0x10000),
        (dict(type=0xB, s=0, dpl=0, present=1, avl=0, l=0, db=0, g=0, unusable=0), 0x8B),
    ],
    ids=["code64-dpl0", "code32-flat", "code64-dpl3", "unusable", "tss64-busy"],
)
def test_access_rights(segment: dict[str, int], ar: int) -> None:
    assert access_rights_from_segment(**segment) == ar
    assert access_rights_to_fields(ar) == segment


def test_adjust_controls() -> None:
    cap = 0x16 | (0x16 | 0x41) << 32
    assert adjust_controls(0, cap) == 0x16
    assert adjust_controls(0x1 | 0x8 | 0x40, cap) == 0x57
    assert adjust_controls(0xFFFF_FFFF, cap) == 0x57
    assert adjust_controls(1 << 40, cap) == 0x16


def test_check_controls_names_offending_bits() -> None:
    cap = 0x2 | (0x2 | PROC.CPU_BASED_HLT_EXITING) << 32
    check_controls(0x2 | PROC.CPU_BASED_HLT_EXITING, cap, ProcBasedControls)
    with pytest.raises(UnsupportedControlError) as err:
        check_controls(PROC.CPU_BASED_RDTSC_EXITING, cap, ProcBasedControls)
    text = str(err.value)
    assert (
        "CPU_BASED_RDTSC_EXITING cannot be 1 on this host "
        "(IA32_VMX_PROCBASED_CTLS allowed-1 bit 12 is 0)" in text
    )
    assert (
        "ProcBasedControls bit 1 (reserved) must be 1 on this host "
        "(IA32_VMX_PROCBASED_CTLS allowed-0 bit 1 is 1)" in text
    )
    assert text.endswith("; call adjust_controls() first")
    assert err.value.must_be_zero == PROC.CPU_BASED_RDTSC_EXITING and err.value.must_be_one == 0x2
    assert isinstance(err.value, ValueError)

    debug = int(VmEntryControls.VM_ENTRY_LOAD_DEBUG_CONTROLS)
    entry_cap = debug | debug << 32
    message = "VM_ENTRY_LOAD_DEBUG_CONTROLS must be 1 .*IA32_VMX_TRUE_ENTRY_CTLS"
    with pytest.raises(UnsupportedControlError, match=message):
        check_controls(0, entry_cap, VmEntryControls, VmxMsr.IA32_VMX_TRUE_ENTRY_CTLS)


def test_capability_msrs_full_host() -> None:
    msrs = compute_capability_msrs(host(tsc_offset=True, msr_exit_all=True))
    basic = msrs[VmxMsr.IA32_VMX_BASIC]
    assert basic & 0x7FFF_FFFF == 1
    assert (basic >> 32) & 0x1FFF == 4096
    assert (basic >> 50) & 0xF == 6
    assert basic >> 54 & 1 and basic >> 55 & 1

    proc = msrs[VmxMsr.IA32_VMX_PROCBASED_CTLS]
    may = ProcBasedControls(allowed1(proc))
    for wanted in (
        PROC.CPU_BASED_HLT_EXITING, PROC.CPU_BASED_UNCONDITIONAL_IO_EXITING, PROC.CPU_BASED_USE_IO_BITMAPS,
        PROC.CPU_BASED_USE_TSC_OFFSETTING, PROC.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS,
        PROC.CPU_BASED_MONITOR_TRAP_FLAG, PROC.CPU_BASED_USE_MSR_BITMAPS,
    ):
        assert wanted in may, wanted.name
    for unwanted in (
        PROC.CPU_BASED_RDTSC_EXITING, PROC.CPU_BASED_CR3_LOAD_EXITING, PROC.CPU_BASED_CR3_STORE_EXITING,
        PROC.CPU_BASED_MOV_DR_EXITING, PROC.CPU_BASED_INVLPG_EXITING, PROC.CPU_BASED_INTERRUPT_WINDOW_EXITING,
        PROC.CPU_BASED_PAUSE_EXITING, PROC.CPU_BASED_NMI_WINDOW_EXITING,
    ):
        assert not allowed1(proc) & unwanted, unwanted.name
    fixed = PROC.CPU_BASED_HLT_EXITING | PROC.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
    assert allowed0(proc) == 0x0400_6172 | fixed
    # without an in-kernel irqchip HLT always exits: HLT exiting cannot be 0; EPT is always on
    assert allowed0(msrs[VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS]) == fixed
    assert allowed1(msrs[VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS]) == allowed1(proc)

    pin = msrs[VmxMsr.IA32_VMX_PINBASED_CTLS]
    assert allowed0(pin) == 0x16 | PinBasedControls.PIN_BASED_VMX_PREEMPTION_TIMER
    assert allowed1(pin) == 0x16 | PinBasedControls.PIN_BASED_VMX_PREEMPTION_TIMER
    assert allowed0(msrs[VmxMsr.IA32_VMX_EXIT_CTLS]) == 0x36DFF | 1 << 9 | 1 << 18 | 1 << 20
    assert allowed0(msrs[VmxMsr.IA32_VMX_ENTRY_CTLS]) == 0x11FF | 0x3 << 14
    assert not allowed1(msrs[VmxMsr.IA32_VMX_EXIT_CTLS]) & VmExitControls.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER
    assert allowed0(msrs[VmxMsr.IA32_VMX_TRUE_EXIT_CTLS]) & VmExitControls.VM_EXIT_SAVE_IA32_EFER
    assert allowed1(msrs[VmxMsr.IA32_VMX_ENTRY_CTLS]) & VmEntryControls.VM_ENTRY_IA32E_MODE_GUEST
    assert not allowed1(msrs[VmxMsr.IA32_VMX_ENTRY_CTLS]) & VmEntryControls.VM_ENTRY_SMM

    sec = allowed1(msrs[VmxMsr.IA32_VMX_PROCBASED_CTLS2])
    assert sec == SecondaryControls.SECONDARY_ENABLE_EPT | SecondaryControls.SECONDARY_UNRESTRICTED_GUEST
    assert allowed0(msrs[VmxMsr.IA32_VMX_PROCBASED_CTLS2]) == sec

    ept = EptVpidCap(msrs[VmxMsr.IA32_VMX_EPT_VPID_CAP])
    assert EptVpidCap.EPT_PAGE_WALK_LENGTH_4 in ept and EptVpidCap.EPT_MEMORY_TYPE_WB in ept
    assert EptVpidCap.INVEPT_SINGLE_CONTEXT in ept and EptVpidCap.INVEPT_ALL_CONTEXT in ept
    assert EptVpidCap.EPT_ACCESSED_DIRTY_FLAGS in ept
    assert EptVpidCap.EPT_EXECUTE_ONLY not in ept

    assert msrs[VmxMsr.IA32_VMX_VMCS_ENUM] == max((int(f) >> 1) & 0x1FF for f in VmcsField) << 1

    for msr, value in msrs.items():
        if msr.name.endswith("_CTLS") or msr.name.endswith("_CTLS2"):
            assert allowed0(value) & ~allowed1(value) == 0, msr.name


def test_capability_msrs_minimal_host() -> None:
    msrs = compute_capability_msrs(
        host(msr_filter=False, guest_debug=False, dirty_log=False, tsc_control=True)
    )
    may = allowed1(msrs[VmxMsr.IA32_VMX_PROCBASED_CTLS])
    # without an MSR filter no MSR access exits: the bitmaps (all zeros) are the only setting
    assert may & PROC.CPU_BASED_USE_MSR_BITMAPS
    assert allowed0(msrs[VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS]) & PROC.CPU_BASED_USE_MSR_BITMAPS
    assert not may & PROC.CPU_BASED_MONITOR_TRAP_FLAG
    assert not may & PROC.CPU_BASED_USE_TSC_OFFSETTING
    assert may & PROC.CPU_BASED_HLT_EXITING
    assert not allowed1(msrs[VmxMsr.IA32_VMX_PROCBASED_CTLS2]) & SecondaryControls.SECONDARY_USE_TSC_SCALING
    assert not msrs[VmxMsr.IA32_VMX_EPT_VPID_CAP] & EptVpidCap.EPT_ACCESSED_DIRTY_FLAGS
    deny_filter = compute_capability_msrs(host(msr_exit_all=True))
    assert not allowed0(deny_filter[VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS]) & PROC.CPU_BASED_USE_MSR_BITMAPS

    wanted = PROC.CPU_BASED_HLT_EXITING | PROC.CPU_BASED_RDTSC_EXITING | PROC.CPU_BASED_MONITOR_TRAP_FLAG
    cap = msrs[VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS]
    got = adjust_controls(wanted, cap)
    assert got == PROC.CPU_BASED_HLT_EXITING | PROC.CPU_BASED_USE_MSR_BITMAPS \
        | PROC.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS                                # the must-be-1 set
    check_controls(got, cap, ProcBasedControls, VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS)
    with pytest.raises(UnsupportedControlError, match="CPU_BASED_MONITOR_TRAP_FLAG cannot be 1"):
        check_controls(wanted, cap, ProcBasedControls)


def test_format_capability_table() -> None:
    text = format_capability_table(compute_capability_msrs(host()))
    lines = text.splitlines()
    assert lines[0].split() == ["IA32_VMX_BASIC", "0x480", "0x00d8100000000001"]
    assert any(line.startswith("IA32_VMX_TRUE_PROCBASED_CTLS") for line in lines)
    assert "CPU_BASED_HLT_EXITING" in text and "SECONDARY_ENABLE_EPT" in text
    assert "CPU_BASED_RDTSC_EXITING" not in text
    assert "must-be-1: VM_EXIT_SAVE_DEBUG_CONTROLS" in text
    assert "EPT_2MB_PAGES" in text
