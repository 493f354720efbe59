"""VM-execution, VM-exit and VM-entry controls and the VMX capability MSRs.

Control bits follow SDM vol. 3C 25.6.1-25.6.2 (execution), 25.7.1 (exit)
and 25.8.1 (entry); capability MSRs follow appendix A. minivmm reports
capability MSRs computed from what the KVM host can honour
(:func:`compute_capability_msrs`), and software adjusts its wishes to them
with :func:`adjust_controls` exactly as on hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from enum import IntEnum, IntFlag

from minivmm.errors import MinivmmError
from minivmm.vmcs_fields import VmcsField, field_index


class PinBasedControls(IntFlag):
    """Pin-based VM-execution controls (SDM 25.6.1)."""

    PIN_BASED_EXTERNAL_INTERRUPT_EXITING = 1 << 0
    PIN_BASED_NMI_EXITING = 1 << 3
    PIN_BASED_VIRTUAL_NMIS = 1 << 5
    PIN_BASED_VMX_PREEMPTION_TIMER = 1 << 6
    PIN_BASED_PROCESS_POSTED_INTERRUPTS = 1 << 7


class ProcBasedControls(IntFlag):
    """Primary processor-based VM-execution controls (SDM 25.6.2)."""

    CPU_BASED_INTERRUPT_WINDOW_EXITING = 1 << 2
    CPU_BASED_USE_TSC_OFFSETTING = 1 << 3
    CPU_BASED_HLT_EXITING = 1 << 7
    CPU_BASED_INVLPG_EXITING = 1 << 9
    CPU_BASED_MWAIT_EXITING = 1 << 10
    CPU_BASED_RDPMC_EXITING = 1 << 11
    CPU_BASED_RDTSC_EXITING = 1 << 12
    CPU_BASED_CR3_LOAD_EXITING = 1 << 15
    CPU_BASED_CR3_STORE_EXITING = 1 << 16
    CPU_BASED_ACTIVATE_TERTIARY_CONTROLS = 1 << 17
    CPU_BASED_CR8_LOAD_EXITING = 1 << 19
    CPU_BASED_CR8_STORE_EXITING = 1 << 20
    CPU_BASED_USE_TPR_SHADOW = 1 << 21
    CPU_BASED_NMI_WINDOW_EXITING = 1 << 22
    CPU_BASED_MOV_DR_EXITING = 1 << 23
    CPU_BASED_UNCONDITIONAL_IO_EXITING = 1 << 24
    CPU_BASED_USE_IO_BITMAPS = 1 << 25
    CPU_BASED_MONITOR_TRAP_FLAG = 1 << 27
    CPU_BASED_USE_MSR_BITMAPS = 1 << 28
    CPU_BASED_MONITOR_EXITING = 1 << 29
    CPU_BASED_PAUSE_EXITING = 1 << 30
    CPU_BASED_ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class SecondaryControls(IntFlag):
    """Secondary processor-based VM-execution controls (SDM 25.6.2)."""

    SECONDARY_VIRTUALIZE_APIC_ACCESSES = 1 << 0
    SECONDARY_ENABLE_EPT = 1 << 1
    SECONDARY_DESCRIPTOR_TABLE_EXITING = 1 << 2
    SECONDARY_ENABLE_RDTSCP = 1 << 3
    SECONDARY_VIRTUALIZE_X2APIC = 1 << 4
    SECONDARY_ENABLE_VPID = 1 << 5
    SECONDARY_WBINVD_EXITING = 1 << 6
    SECONDARY_UNRESTRICTED_GUEST = 1 << 7
    SECONDARY_APIC_REGISTER_VIRTUALIZATION = 1 << 8
    SECONDARY_VIRTUAL_INTERRUPT_DELIVERY = 1 << 9
    SECONDARY_PAUSE_LOOP_EXITING = 1 << 10
    SECONDARY_RDRAND_EXITING = 1 << 11
    SECONDARY_ENABLE_INVPCID = 1 << 12
    SECONDARY_ENABLE_VM_FUNCTIONS = 1 << 13
    SECONDARY_VMCS_SHADOWING = 1 << 14
    SECONDARY_ENABLE_ENCLS_EXITING = 1 << 15
    SECONDARY_RDSEED_EXITING = 1 << 16
    SECONDARY_ENABLE_PML = 1 << 17
    SECONDARY_EPT_VIOLATION_VE = 1 << 18
    SECONDARY_CONCEAL_VMX_FROM_PT = 1 << 19
    SECONDARY_ENABLE_XSAVES = 1 << 20
    SECONDARY_PASID_TRANSLATION = 1 << 21
    SECONDARY_MODE_BASED_EXECUTE_CONTROL = 1 << 22
    SECONDARY_SUB_PAGE_WRITE_PERMISSIONS = 1 << 23
    SECONDARY_PT_USES_GUEST_PHYSICAL_ADDRESSES = 1 << 24
    SECONDARY_USE_TSC_SCALING = 1 << 25
    SECONDARY_ENABLE_USER_WAIT_AND_PAUSE = 1 << 26
    SECONDARY_ENABLE_PCONFIG = 1 << 27
    SECONDARY_ENABLE_ENCLV_EXITING = 1 << 28
    SECONDARY_VMM_BUS_LOCK_DETECTION = 1 << 30
    SECONDARY_INSTRUCTION_TIMEOUT = 1 << 31


class VmExitControls(IntFlag):
    """Primary VM-exit controls (SDM 25.7.1)."""

    VM_EXIT_SAVE_DEBUG_CONTROLS = 1 << 2
    VM_EXIT_HOST_ADDRESS_SPACE_SIZE = 1 << 9
    VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 12
    VM_EXIT_ACK_INTR_ON_EXIT = 1 << 15
    VM_EXIT_SAVE_IA32_PAT = 1 << 18
    VM_EXIT_LOAD_IA32_PAT = 1 << 19
    VM_EXIT_SAVE_IA32_EFER = 1 << 20
    VM_EXIT_LOAD_IA32_EFER = 1 << 21
    VM_EXIT_SAVE_VMX_PREEMPTION_TIMER = 1 << 22
    VM_EXIT_CLEAR_IA32_BNDCFGS = 1 << 23
    VM_EXIT_CONCEAL_VMX_FROM_PT = 1 << 24
    VM_EXIT_CLEAR_IA32_RTIT_CTL = 1 << 25
    VM_EXIT_CLEAR_IA32_LBR_CTL = 1 << 26
    VM_EXIT_CLEAR_UINV = 1 << 27
    VM_EXIT_LOAD_CET_STATE = 1 << 28
    VM_EXIT_LOAD_PKRS = 1 << 29
    VM_EXIT_SAVE_IA32_PERF_GLOBAL_CTL = 1 << 30
    VM_EXIT_ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class VmEntryControls(IntFlag):
    """VM-entry controls (SDM 25.8.1)."""

    VM_ENTRY_LOAD_DEBUG_CONTROLS = 1 << 2
    VM_ENTRY_IA32E_MODE_GUEST = 1 << 9
    VM_ENTRY_SMM = 1 << 10
    VM_ENTRY_DEACTIVATE_DUAL_MONITOR = 1 << 11
    VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 13
    VM_ENTRY_LOAD_IA32_PAT = 1 << 14
    VM_ENTRY_LOAD_IA32_EFER = 1 << 15
    VM_ENTRY_LOAD_IA32_BNDCFGS = 1 << 16
    VM_ENTRY_CONCEAL_VMX_FROM_PT = 1 << 17
    VM_ENTRY_LOAD_IA32_RTIT_CTL = 1 << 18
    VM_ENTRY_LOAD_UINV = 1 << 19
    VM_ENTRY_LOAD_CET_STATE = 1 << 20
    VM_ENTRY_LOAD_IA32_LBR_CTL = 1 << 21
    VM_ENTRY_LOAD_PKRS = 1 << 22


class EptVpidCap(IntFlag):
    """IA32_VMX_EPT_VPID_CAP bits (SDM A.10)."""

    EPT_EXECUTE_ONLY = 1 << 0
    EPT_PAGE_WALK_LENGTH_4 = 1 << 6
    EPT_PAGE_WALK_LENGTH_5 = 1 << 7
    EPT_MEMORY_TYPE_UC = 1 << 8
    EPT_MEMORY_TYPE_WB = 1 << 14
    EPT_2MB_PAGES = 1 << 16
    EPT_1GB_PAGES = 1 << 17
    INVEPT = 1 << 20
    EPT_ACCESSED_DIRTY_FLAGS = 1 << 21
    EPT_ADVANCED_VMEXIT_INFO = 1 << 22
    EPT_SUPERVISOR_SHADOW_STACK = 1 << 23
    INVEPT_SINGLE_CONTEXT = 1 << 25
    INVEPT_ALL_CONTEXT = 1 << 26
    INVVPID = 1 << 32
    INVVPID_INDIVIDUAL_ADDRESS = 1 << 40
    INVVPID_SINGLE_CONTEXT = 1 << 41
    INVVPID_ALL_CONTEXT = 1 << 42
    INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS = 1 << 43


class VmxMsr(IntEnum):
    """VMX capability MSR indices (SDM A.1-A.11; vol. 4 table 2-2)."""

    IA32_VMX_BASIC = 0x480
    IA32_VMX_PINBASED_CTLS = 0x481
    IA32_VMX_PROCBASED_CTLS = 0x482
    IA32_VMX_EXIT_CTLS = 0x483
    IA32_VMX_ENTRY_CTLS = 0x484
    IA32_VMX_MISC = 0x485
    IA32_VMX_CR0_FIXED0 = 0x486
    IA32_VMX_CR0_FIXED1 = 0x487
    IA32_VMX_CR4_FIXED0 = 0x488
    IA32_VMX_CR4_FIXED1 = 0x489
    IA32_VMX_VMCS_ENUM = 0x48A
    IA32_VMX_PROCBASED_CTLS2 = 0x48B
    IA32_VMX_EPT_VPID_CAP = 0x48C
    IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
    IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
    IA32_VMX_TRUE_EXIT_CTLS = 0x48F
    IA32_VMX_TRUE_ENTRY_CTLS = 0x490
    IA32_VMX_VMFUNC = 0x491
    IA32_VMX_PROCBASED_CTLS3 = 0x492
    IA32_VMX_EXIT_CTLS2 = 0x493


CONTROLS_FOR_MSR: dict[VmxMsr, type[IntFlag]] = {
    VmxMsr.IA32_VMX_PINBASED_CTLS: PinBasedControls,
    VmxMsr.IA32_VMX_TRUE_PINBASED_CTLS: PinBasedControls,
    VmxMsr.IA32_VMX_PROCBASED_CTLS: ProcBasedControls,
    VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS: ProcBasedControls,
    VmxMsr.IA32_VMX_PROCBASED_CTLS2: SecondaryControls,
    VmxMsr.IA32_VMX_EXIT_CTLS: VmExitControls,
    VmxMsr.IA32_VMX_TRUE_EXIT_CTLS: VmExitControls,
    VmxMsr.IA32_VMX_ENTRY_CTLS: VmEntryControls,
    VmxMsr.IA32_VMX_TRUE_ENTRY_CTLS: VmEntryControls,
}
"""Which control class each 32-bit allowed-0/allowed-1 capability MSR describes (SDM A.3-A.5)."""

_DEFAULT_MSR: dict[type[IntFlag], VmxMsr] = {
    PinBasedControls: VmxMsr.IA32_VMX_PINBASED_CTLS,
    ProcBasedControls: VmxMsr.IA32_VMX_PROCBASED_CTLS,
    SecondaryControls: VmxMsr.IA32_VMX_PROCBASED_CTLS2,
    VmExitControls: VmxMsr.IA32_VMX_EXIT_CTLS,
    VmEntryControls: VmxMsr.IA32_VMX_ENTRY_CTLS,
}

PIN_BASED_DEFAULT1 = 0x0000_0016
"""Default1 pin-based controls, bits 1, 2, 4 (SDM A.2, A.3.1)."""
PROC_BASED_DEFAULT1 = 0x0401_E172
"""Default1 primary processor-based controls, bits 1, 4-6, 8, 13-16, 26 (SDM A.2, A.3.2)."""
VM_EXIT_DEFAULT1 = 0x0003_6DFF
"""Default1 VM-exit controls, bits 0-8, 10, 11, 13, 14, 16, 17 (SDM A.2, A.4.1)."""
VM_ENTRY_DEFAULT1 = 0x0000_11FF
"""Default1 VM-entry controls, bits 0-8, 12 (SDM A.2, A.5)."""


@cache
def _member_names(cls: type[IntFlag]) -> dict[int, str]:
    return {m.value: m.name for m in cls}


def control_name(cls: type[IntFlag], bit: int) -> str:
    """The SDM name of control ``bit`` of ``cls``, or ``<cls> bit N (reserved)``."""
    name = _member_names(cls).get(1 << bit)
    return name if name is not None else f"{cls.__name__} bit {bit} (reserved)"



def _bits(value: int) -> list[int]:
    return [b for b in range(value.bit_length()) if value >> b & 1]


def allowed0(capability_msr_value: int) -> int:
    """Bits 31:0, the allowed-0 settings: a 1 here means the control must be 1 (SDM A.3.1)."""
    return capability_msr_value & 0xFFFF_FFFF


def allowed1(capability_msr_value: int) -> int:
    """Bits 63:32, the allowed-1 settings: a 0 here means the control must be 0 (SDM A.3.1)."""
    return (capability_msr_value >> 32) & 0xFFFF_FFFF


def adjust_controls(value: int, capability_msr_value: int) -> int:
    """Force the must-be-1 controls on and the unsupported ones off (SDM A.3.1, 31.5.1).

    ``(value | allowed-0) & allowed-1``, the usual adjustment software makes
    before writing a control field.
    """
    return (value | allowed0(capability_msr_value)) & allowed1(capability_msr_value)


class UnsupportedControlError(MinivmmError, ValueError):
    """A control value that a capability MSR does not allow; the message names every offending bit."""

    def __init__(self, message: str, must_be_zero: int, must_be_one: int) -> None:
        super().__init__(message)
        self.must_be_zero = must_be_zero
        self.must_be_one = must_be_one


def check_controls(
    value: int, capability_msr_value: int, cls: type[IntFlag], msr: VmxMsr | None = None
) -> None:
    """Raise :class:`UnsupportedControlError` unless VM entry would accept ``value`` (SDM A.3-A.5, 26.2.1.1).

    ``msr`` only names the capability MSR in the message; it defaults to the
    non-TRUE MSR for ``cls``.
    """
    msr_name = (msr if msr is not None else _DEFAULT_MSR[cls]).name
    must_be_zero = value & ~allowed1(capability_msr_value)
    must_be_one = allowed0(capability_msr_value) & ~value
    if not (must_be_zero or must_be_one):
        return
    problems = [
        f"{control_name(cls, b)} cannot be 1 on this host ({msr_name} allowed-1 bit {b} is 0)"
        for b in _bits(must_be_zero)
    ] + [
        f"{control_name(cls, b)} must be 1 on this host ({msr_name} allowed-0 bit {b} is 1)"
        for b in _bits(must_be_one)
    ]
    raise UnsupportedControlError(
        "; ".join(problems) + "; call adjust_controls() first", must_be_zero, must_be_one
    )


@dataclass(frozen=True, slots=True)
class HostCapabilities:
    """What the KVM host can honour, from KVM_CHECK_EXTENSION probes.

    ``msr_filter``: KVM_CAP_X86_MSR_FILTER; ``user_space_msr``:
    KVM_CAP_X86_USER_SPACE_MSR; ``guest_debug``: KVM_CAP_SET_GUEST_DEBUG;
    ``hw_breakpoints``: KVM_CAP_GUEST_DEBUG_HW_BPS > 0; ``readonly_mem``:
    KVM_CAP_READONLY_MEM; ``dirty_log``: dirty-page logging on memslots;
    ``sync_regs``: KVM_CAP_SYNC_REGS; ``tsc_control``: KVM_CAP_TSC_CONTROL;
    ``user_mode_kernel``: minivmm's built-in CPL-0 kernel can run;
    ``tsc_offset``: the per-vCPU TSC offset (KVM_VCPU_TSC_OFFSET) is honoured
    (probed); ``msr_exit_all``: a default-deny MSR filter is accepted, so every
    RDMSR/WRMSR can exit (probed). See `minivmm.capabilities`.
    """

    msr_filter: bool
    user_space_msr: bool
    guest_debug: bool
    hw_breakpoints: bool
    readonly_mem: bool
    dirty_log: bool
    sync_regs: bool
    tsc_control: bool
    user_mode_kernel: bool = True
    tsc_offset: bool = False
    msr_exit_all: bool = False


VMCS_REVISION_ID = 1
VMCS_REGION_SIZE = 4096
MEMORY_TYPE_WB = 6
VMX_BASIC_INS_OUTS_INFO = 1 << 54
VMX_BASIC_TRUE_CONTROLS = 1 << 55
VMX_MISC_STORE_EFER_LMA = 1 << 5
VMX_MISC_ACTIVITY_HLT = 1 << 6


def _ctls(must_be_one: int, may_be_one: int) -> int:
    return (must_be_one & 0xFFFF_FFFF) | (may_be_one & 0xFFFF_FFFF) << 32


def compute_capability_msrs(caps: HostCapabilities) -> dict[VmxMsr, int]:
    """The VMX capability MSRs minivmm reports on a host with ``caps`` (SDM appendix A).

    Each ``*_CTLS`` value is allowed-0 in bits 31:0 and allowed-1 in bits
    63:32 (SDM A.3.1). A control is allowed-1 only if minivmm can realise it
    on KVM; everything KVM cannot deliver to user space is allowed-1 = 0, so
    :func:`adjust_controls` clears it as hardware would.

    ===================================== ========= ==========================================
    control / capability                  allowed-1 how minivmm realises it
    ===================================== ========= ==========================================
    PIN_BASED_VMX_PREEMPTION_TIMER        must be 1 the KVM_RUN deadline; expiry exits as 52
    PIN_BASED_EXTERNAL_INTERRUPT_EXITING  never     interrupts are delivered in the kernel
    PIN_BASED_NMI_EXITING, VIRTUAL_NMIS   never     NMIs never reach user space
    CPU_BASED_HLT_EXITING                 must be 1 KVM_EXIT_HLT (VM without in-kernel LAPIC)
    CPU_BASED_UNCONDITIONAL_IO_EXITING    always    every port access is a KVM_EXIT_IO
    CPU_BASED_USE_IO_BITMAPS              always    bitmaps filter KVM_EXIT_IO in minivmm
    CPU_BASED_USE_TSC_OFFSETTING          if tsc    KVM_VCPU_TSC_OFFSET (probed: honoured)
    CPU_BASED_ACTIVATE_SECONDARY_CONTROLS must be 1 EPT and unrestricted guest are always on
    CPU_BASED_MONITOR_TRAP_FLAG           if debug  KVM_GUESTDBG_SINGLESTEP
    CPU_BASED_USE_MSR_BITMAPS             always    KVM MSR filter + user-space MSR exits; 0
                                                    (every RDMSR/WRMSR exits) only where a
                                                    default-deny filter works, else must be 1
    RDTSC, RDPMC, INVLPG, MWAIT, MONITOR, never     KVM handles these in the kernel and
    PAUSE, CR3/CR8, MOV-DR, TPR shadow,             never exits to user space for them
    interrupt/NMI window exiting
    SECONDARY_ENABLE_EPT                  must be 1 memslots, read-only slots, host protection
    SECONDARY_UNRESTRICTED_GUEST          must be 1 real mode runs on KVM
    SECONDARY_ENABLE_RDTSCP, the rest     never     (TSC scaling too: the TSC multiplier
                                                    field is not realised)
    VM_EXIT_SAVE_DEBUG_CONTROLS           must be 1 DR7 / IA32_DEBUGCTL read back from KVM
    VM_EXIT_HOST_ADDRESS_SPACE_SIZE       must be 1 the host is always 64-bit
    VM_EXIT_SAVE_IA32_PAT, _IA32_EFER     must be 1 KVM_GET_MSRS / KVM_GET_SREGS
    VM_EXIT_SAVE_VMX_PREEMPTION_TIMER     never     the timer-value field is not modelled
    VM_EXIT_LOAD_* (host state), ACK_INTR never     the host-state area has no CPU behind it
    VM_ENTRY_LOAD_DEBUG_CONTROLS          must be 1 KVM_SET_DEBUGREGS / KVM_SET_MSRS
    VM_ENTRY_IA32E_MODE_GUEST             always    reads EFER.LMA; a write that would switch
                                                    the mode at entry is refused (VmcsError)
    VM_ENTRY_LOAD_IA32_PAT, _IA32_EFER    must be 1 KVM_SET_MSRS / KVM_SET_SREGS
    VM_ENTRY_SMM, the rest                never     KVM_CAP_X86_SMM is not relied on
    EPT_VPID_CAP: page walk 4, WB,        always    the EPT model is a software structure;
    2 MB and 1 GB pages, INVEPT single              INVEPT resynchronises the memslots
    and all context
    EPT_ACCESSED_DIRTY_FLAGS              if dirty  dirty bits come from KVM dirty logging
    EPT_EXECUTE_ONLY                      never     KVM memslots and host page protection
                                                    grant reads and fetches together
    EPT_MEMORY_TYPE_UC, INVVPID           never     guest memory is host WB memory; no VPID
    ===================================== ========= ==========================================

    Default1 controls (SDM A.2): the non-TRUE MSRs report them as must-be-1
    and the TRUE MSRs as may-be-0 (IA32_VMX_BASIC bit 55 is set). The reserved
    default1 bits have no function, so allowed-1 includes them. "must be 1"
    above is allowed-0 = 1 in the TRUE MSRs too: the 0 setting cannot be
    honoured (guest state is KVM's live vCPU state, so it is always saved and
    loaded). CPU_BASED_CR3_LOAD_EXITING and
    CPU_BASED_CR3_STORE_EXITING are default1 too but cannot be realised on
    KVM; minivmm keeps their allowed-1 at 0 and so, unlike hardware, does not
    report them as must-be-1 even in IA32_VMX_PROCBASED_CTLS (a must-be-1
    control that cannot be 1 would leave no valid setting).

    IA32_VMX_BASIC: VMCS revision 1, region size 4096, WB VMCS memory, INS/OUTS
    instruction information reported (bit 54), TRUE controls (bit 55).
    IA32_VMX_MISC: preemption timer rate 0 (one tick per TSC cycle), EFER.LMA
    stored into "IA-32e mode guest" on exit (bit 5), HLT activity state
    (bit 6), no CR3-target values. IA32_VMX_VMCS_ENUM: highest index of
    :class:`~minivmm.vmcs_fields.VmcsField`. Not reported: CR0/CR4 FIXED0/1
    (guest CR0/CR4 are checked by KVM_SET_SREGS, not by fixed bits), VMFUNC,
    PROCBASED_CTLS3 and EXIT_CTLS2 (their controls are never allowed-1).
    """
    pin1 = PIN_BASED_DEFAULT1 | PinBasedControls.PIN_BASED_VMX_PREEMPTION_TIMER

    proc1 = PROC_BASED_DEFAULT1 | (
        ProcBasedControls.CPU_BASED_HLT_EXITING
        | ProcBasedControls.CPU_BASED_UNCONDITIONAL_IO_EXITING
        | ProcBasedControls.CPU_BASED_USE_IO_BITMAPS
        | ProcBasedControls.CPU_BASED_USE_MSR_BITMAPS
        | ProcBasedControls.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
    )
    proc1 &= ~(ProcBasedControls.CPU_BASED_CR3_LOAD_EXITING | ProcBasedControls.CPU_BASED_CR3_STORE_EXITING)
    if caps.guest_debug:
        proc1 |= ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG
    if caps.tsc_offset:
        proc1 |= ProcBasedControls.CPU_BASED_USE_TSC_OFFSETTING
    # Must-be-1 (allowed-0 = 1) where the 0 setting cannot be honoured: HLT always exits to user
    # space without an in-kernel irqchip; without a default-deny MSR filter MSR accesses cannot
    # all exit; KVM always translates guest-physical addresses through its own tables (EPT) and
    # runs real mode (unrestricted guest); the secondary controls are then always active
    proc0 = ProcBasedControls.CPU_BASED_HLT_EXITING | ProcBasedControls.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
    if not caps.msr_exit_all:
        proc0 |= ProcBasedControls.CPU_BASED_USE_MSR_BITMAPS

    sec1 = SecondaryControls.SECONDARY_ENABLE_EPT | SecondaryControls.SECONDARY_UNRESTRICTED_GUEST
    sec0 = sec1

    # guest state is KVM's live vCPU state: it is always "saved" and "loaded", so those controls
    # cannot be 0; the host is 64-bit; the run deadline is always armed
    exit0 = (VmExitControls.VM_EXIT_SAVE_DEBUG_CONTROLS | VmExitControls.VM_EXIT_HOST_ADDRESS_SPACE_SIZE
             | VmExitControls.VM_EXIT_SAVE_IA32_PAT | VmExitControls.VM_EXIT_SAVE_IA32_EFER)
    exit1 = VM_EXIT_DEFAULT1 | exit0

    entry0 = (VmEntryControls.VM_ENTRY_LOAD_DEBUG_CONTROLS | VmEntryControls.VM_ENTRY_LOAD_IA32_PAT
              | VmEntryControls.VM_ENTRY_LOAD_IA32_EFER)
    entry1 = VM_ENTRY_DEFAULT1 | entry0 | VmEntryControls.VM_ENTRY_IA32E_MODE_GUEST
    pin0 = PinBasedControls.PIN_BASED_VMX_PREEMPTION_TIMER

    ept = (
        EptVpidCap.EPT_PAGE_WALK_LENGTH_4
        | EptVpidCap.EPT_MEMORY_TYPE_WB
        | EptVpidCap.EPT_2MB_PAGES
        | EptVpidCap.EPT_1GB_PAGES
        | EptVpidCap.INVEPT
        | EptVpidCap.INVEPT_SINGLE_CONTEXT
        | EptVpidCap.INVEPT_ALL_CONTEXT
    )
    if caps.dirty_log:
        ept |= EptVpidCap.EPT_ACCESSED_DIRTY_FLAGS

    basic = (
        VMCS_REVISION_ID
        | VMCS_REGION_SIZE << 32
        | MEMORY_TYPE_WB << 50
        | VMX_BASIC_INS_OUTS_INFO
        | VMX_BASIC_TRUE_CONTROLS
    )
    max_index = max(field_index(f) for f in VmcsField)

    return {
        VmxMsr.IA32_VMX_BASIC: basic,
        VmxMsr.IA32_VMX_PINBASED_CTLS: _ctls(PIN_BASED_DEFAULT1 & pin1 | pin0, pin1),
        VmxMsr.IA32_VMX_PROCBASED_CTLS: _ctls(PROC_BASED_DEFAULT1 & proc1 | proc0, proc1),
        VmxMsr.IA32_VMX_EXIT_CTLS: _ctls(VM_EXIT_DEFAULT1 & exit1 | exit0, exit1),
        VmxMsr.IA32_VMX_ENTRY_CTLS: _ctls(VM_ENTRY_DEFAULT1 & entry1 | entry0, entry1),
        VmxMsr.IA32_VMX_MISC: VMX_MISC_STORE_EFER_LMA | VMX_MISC_ACTIVITY_HLT,
        VmxMsr.IA32_VMX_VMCS_ENUM: max_index << 1,
        VmxMsr.IA32_VMX_PROCBASED_CTLS2: _ctls(sec0, sec1),
        VmxMsr.IA32_VMX_EPT_VPID_CAP: int(ept),
        VmxMsr.IA32_VMX_TRUE_PINBASED_CTLS: _ctls(pin0, pin1),
        VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS: _ctls(proc0, proc1),
        VmxMsr.IA32_VMX_TRUE_EXIT_CTLS: _ctls(exit0, exit1),
        VmxMsr.IA32_VMX_TRUE_ENTRY_CTLS: _ctls(entry0, entry1),
    }


def _names(cls: type[IntFlag], value: int) -> list[str]:
    return [m.name for m in cls if value & m.value]


def format_capability_table(msrs: dict[VmxMsr, int]) -> str:
    """A human-readable table: one row per MSR with its value.

    Each ``*_CTLS`` row is followed by its allowed-1 and must-be-1 control
    names, IA32_VMX_EPT_VPID_CAP by its supported features.
    """
    import textwrap             # only `minivmm caps` formats the table
    rows: list[str] = []
    for msr in sorted(msrs):
        value = msrs[msr]
        rows.append(f"{msr.name:<29} {msr.value:#05x}  {value:#018x}")
        cls = CONTROLS_FOR_MSR.get(msr)
        if cls is not None:
            details = [
                ("allowed-1", _names(cls, allowed1(value))),
                ("must-be-1", _names(cls, allowed0(value))),
            ]
        elif msr is VmxMsr.IA32_VMX_EPT_VPID_CAP:
            details = [("supported", _names(EptVpidCap, value))]
        else:
            continue
        for label, names in details:
            if names:
                text = f"{label}: " + ", ".join(names)
                rows.extend(textwrap.wrap(text, 100, initial_indent=" " * 4, subsequent_indent=" " * 8))
    return "\n".join(rows)
