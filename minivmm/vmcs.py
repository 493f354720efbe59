"""The VMCS of a minivmm vCPU: SDM field encodings mapped onto live KVM state.

`Vmcs.read` / `Vmcs.write` take `VmcsField` encodings (SDM vol. 3C appendix
B). Guest-state fields read and write the vCPU (registers, segments with
access rights in VMX format, control registers, MSRs); exit-information
fields describe the last exit and are read-only; host-state fields belong to
KVM and raise `VmcsError`. Control fields are kept here and realised on KVM
before the next VM entry:

| control                                | realised as                                   |
|----------------------------------------|-----------------------------------------------|
| CPU_BASED_USE_MSR_BITMAPS + MSR bitmap  | KVM_X86_SET_MSR_FILTER with user-space MSR exits for the MSRs whose bitmap bit is 1; with the control 0 every RDMSR/WRMSR exits (SDM 25.6.9) |
| CPU_BASED_USE_IO_BITMAPS + I/O bitmaps  | ports whose bit is 1 reach user I/O handlers; others go to the machine's devices |
| CPU_BASED_UNCONDITIONAL_IO_EXITING      | every port reaches user I/O handlers         |
| exception bitmap                        | vectors whose bit is 1 reach user exception handlers (#BP/#DB through KVM_SET_GUEST_DEBUG where the host exits on them; every vector in user mode through the built-in kernel's IDT); a bit the mode cannot honour makes the VMWRITE fail |
| CPU_BASED_MONITOR_TRAP_FLAG             | KVM_GUESTDBG_SINGLESTEP; each step exits as MONITOR_TRAP_FLAG (user mode: RFLAGS.TF, hidden from the guest's `pushf` and from the flags handlers see) |
| CPU_BASED_USE_TSC_OFFSETTING + offset   | KVM's per-vCPU TSC offset moved by TSC_OFFSET (KVM_VCPU_TSC_OFFSET, else IA32_TSC writes; only where the host honours one: `minivmm.capabilities`) |
| PIN_BASED_VMX_PREEMPTION_TIMER          | the run deadline (`Machine.run(timeout=)`)     |
| SECONDARY_ENABLE_EPT + EPT pointer      | `machine.ept` (memslots and host page protection) |

Registering a handler with a `port=`, `msr=` or `vector=` filter sets the
matching bitmap bits, as a hypervisor would when it installs the handler.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from enum import IntFlag
from typing import TYPE_CHECKING, Callable

from .controls import (CONTROLS_FOR_MSR, HostCapabilities, adjust_controls, PinBasedControls, ProcBasedControls,
                       SecondaryControls, UnsupportedControlError, VmEntryControls, VmExitControls,
                       VmxMsr, check_controls, format_capability_table)
from .errors import MinivmmError
from .exits import ExitInfo
from .capabilities import (TSC_MSR, HostModel, deny_all_filter_ranges, host_model, tsc_offset_attribute,
                           with_in_kernel_irqchip)
from .kvm import Cap, GuestDebugFlag, Kvm, MsrExitReasonFlag, MsrFilterFlag, VmFd
from .modes import Mode
from .vmcs_fields import (FieldGroup, VmcsField, access_rights_from_segment, access_rights_to_fields,
                          field_group)

if TYPE_CHECKING:
    from .vcpu import Vcpu

F = VmcsField


class VmcsError(MinivmmError, ValueError):
    """A VMREAD/VMWRITE that the minivmm VMCS cannot perform."""


def host_capabilities(kvm: Kvm) -> HostCapabilities:
    """What this KVM host can honour (KVM_CHECK_EXTENSION and the probes of
    `minivmm.capabilities`)."""
    return host_model(kvm).capabilities


def vmx_capability_msrs(kvm: Kvm) -> dict[VmxMsr, int]:
    """IA32_VMX_* capability MSRs for this host (SDM appendix A)."""
    return host_model(kvm).msrs


def capability_report(kvm: Kvm) -> dict:
    """KVM capabilities, VMX capability MSRs and the per-mode model, JSON-ready."""
    model = host_model(kvm)
    return {"kvm_api_version": kvm.get_api_version(),
            "kvm_capabilities": {cap.name: kvm.check_extension(cap) for cap in Cap},
            "vmx_msrs": {msr.name: f"{value:#018x}" for msr, value in model.msrs.items()},
            "model": model.report()}


def capability_table(kvm: Kvm) -> str:
    """`minivmm caps`: KVM capabilities, the VMX capability MSRs and the per-mode table as text."""
    report = capability_report(kvm)
    width = max(len(name) for name in report["kvm_capabilities"])
    lines = [f"KVM API version {report['kvm_api_version']}", "", "KVM capability".ljust(width) + "  value"]
    lines += [f"{name.ljust(width)}  {value}" for name, value in report["kvm_capabilities"].items()]
    lines += ["", format_capability_table(vmx_capability_msrs(kvm)), "", host_model(kvm).markdown()]
    return "\n".join(lines)


class MsrBitmap:
    """The 4 KiB MSR bitmap (SDM 25.6.9): read-low, read-high, write-low, write-high, 1 KiB each.

    Low MSRs are 0x0-0x1fff, high MSRs 0xc0000000-0xc0001fff; a 1 bit makes
    the access exit. Accesses to MSRs outside both ranges always exit on
    hardware; here they stay with KVM unless intercepted: `intercept` of such an
    MSR makes it exit through one extra KVM filter range each (at most
    `MAX_OUTSIDE` of them: KVM_MSR_FILTER_MAX_RANGES less the bitmap's four).
    """
    RANGES = ((0x0, 0), (0xC0000000, 1024))
    MAX_OUTSIDE = 12

    def __init__(self) -> None:
        self.data = bytearray(4096)
        self.outside: dict[int, tuple[bool, bool]] = {}      # MSR -> (read, write) intercepted
        self.version = 0
        self.on_change = None
        self._any, self._any_version = False, 0

    def any(self) -> bool:
        """Whether any bit is set (cached per version: the bitmap is 4 KiB)."""
        if self._any_version != self.version:
            self._any, self._any_version = bool(self.outside) or any(self.data), self.version
        return self._any

    def _position(self, msr: int, write: bool) -> tuple[int, int] | None:
        for base, offset in self.RANGES:
            if base <= msr < base + 0x2000:
                bit = msr - base
                return offset + (2048 if write else 0) + bit // 8, bit % 8
        if not 0 <= msr <= 0xFFFFFFFF:
            raise VmcsError(f"MSR {msr:#x} is not a 32-bit MSR index")
        return None

    def intercept(self, msr: int, read: bool = True, write: bool = True) -> None:
        """Make the chosen accesses to `msr` exit (the others keep their bits)."""
        self._set(msr, read, write, True)

    def allow(self, msr: int, read: bool = True, write: bool = True) -> None:
        """Stop intercepting the chosen accesses to `msr`."""
        self._set(msr, read, write, False)

    def _set(self, msr: int, read: bool, write: bool, value: bool) -> None:
        if self._position(msr, False) is None:
            self._set_outside(msr, read, write, value)
        else:
            for is_write, chosen in ((False, read), (True, write)):
                if chosen:
                    byte, bit = self._position(msr, is_write)
                    self.data[byte] = self.data[byte] | 1 << bit if value else self.data[byte] & ~(1 << bit)
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    def _set_outside(self, msr: int, read: bool, write: bool, value: bool) -> None:
        new = self.outside.get(msr, (False, False))
        new = (value if read else new[0], value if write else new[1])
        if any(new) and msr not in self.outside and len(self.outside) >= self.MAX_OUTSIDE:
            raise VmcsError(f"MSR {msr:#x} is outside the MSR bitmap ranges (0x0-0x1fff, "
                            f"0xc0000000-0xc0001fff) and {self.MAX_OUTSIDE} such MSRs are already "
                            "intercepted (each takes a KVM MSR filter range)")
        if any(new):
            self.outside[msr] = new
        else:
            self.outside.pop(msr, None)

    def is_intercepted(self, msr: int, write: bool) -> bool:
        position = self._position(msr, write)
        if position is None:
            return self.outside.get(msr, (False, False))[write]
        byte, bit = position
        return bool(self.data[byte] >> bit & 1)

    def kvm_filter_ranges(self) -> list[tuple[MsrFilterFlag, int, bytes, int]]:
        """The KVM filter: KVM allows an MSR whose bit is 1, the opposite of the SDM bitmap; an
        intercepted MSR outside the bitmap's ranges gets a one-MSR range that denies it."""
        ranges = []
        for base, offset in self.RANGES:
            for flag, extra in ((MsrFilterFlag.READ, 0), (MsrFilterFlag.WRITE, 2048)):
                chunk = self.data[offset + extra: offset + extra + 1024]
                ranges.append((flag, base, bytes(~b & 0xFF for b in chunk), 0x2000))
        for msr, (read, write) in sorted(self.outside.items()):
            flags = (MsrFilterFlag.READ if read else 0) | (MsrFilterFlag.WRITE if write else 0)
            ranges.append((MsrFilterFlag(flags), msr, b"\x00", 1))
        return ranges


class IoBitmaps:
    """I/O bitmaps A (ports 0-0x7fff) and B (0x8000-0xffff), 4 KiB each (SDM 25.6.4)."""

    def __init__(self) -> None:
        self.a = bytearray(4096)
        self.b = bytearray(4096)
        self.version = 0
        self.on_change = None

    def _bitmap(self, port: int) -> tuple[bytearray, int]:
        if not 0 <= port <= 0xFFFF:
            raise VmcsError(f"port {port:#x} is not a 16-bit I/O port")
        return (self.a, port) if port < 0x8000 else (self.b, port - 0x8000)

    def intercept(self, port: int, enabled: bool = True) -> None:
        self.intercept_range(port, port, enabled)

    def intercept_range(self, first: int, last: int, enabled: bool = True) -> None:
        """Set (or clear) the bits of ports `first`..`last` inclusive."""
        for port in range(first, last + 1):
            bitmap, bit = self._bitmap(port)
            if enabled:
                bitmap[bit // 8] |= 1 << (bit % 8)
            else:
                bitmap[bit // 8] &= ~(1 << (bit % 8))
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    def is_intercepted(self, port: int) -> bool:
        bitmap, bit = self._bitmap(port)
        return bool(bitmap[bit // 8] >> (bit % 8) & 1)


_CONTROL_FIELDS: dict[type[IntFlag], tuple[VmcsField, VmxMsr]] = {
    PinBasedControls: (F.VMCS_CTRL_PIN_BASED_VM_EXECUTION_CONTROLS, VmxMsr.IA32_VMX_TRUE_PINBASED_CTLS),
    ProcBasedControls: (F.VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                        VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS),
    SecondaryControls: (F.VMCS_CTRL_SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                        VmxMsr.IA32_VMX_PROCBASED_CTLS2),
    VmExitControls: (F.VMCS_CTRL_VMEXIT_CONTROLS, VmxMsr.IA32_VMX_TRUE_EXIT_CTLS),
    VmEntryControls: (F.VMCS_CTRL_VMENTRY_CONTROLS, VmxMsr.IA32_VMX_TRUE_ENTRY_CTLS),
}
_FIELD_CONTROLS = {field: (cls, msr) for cls, (field, msr) in _CONTROL_FIELDS.items()}

_SEGMENTS = {"ES": "es", "CS": "cs", "SS": "ss", "DS": "ds", "FS": "fs", "GS": "gs",
             "LDTR": "ldt", "TR": "tr"}
_SEGMENT_FIELDS: dict[VmcsField, tuple[str, str]] = {}
for _vmx, _kvm in _SEGMENTS.items():
    for _part, _attr in (("SELECTOR", "selector"), ("BASE", "base"), ("LIMIT", "limit"),
                         ("ACCESS_RIGHTS", "access_rights")):
        _SEGMENT_FIELDS[F[f"VMCS_GUEST_{_vmx}_{_part}"]] = (_kvm, _attr)
_REGISTER_FIELDS = {F.VMCS_GUEST_RIP: "rip", F.VMCS_GUEST_RSP: "rsp", F.VMCS_GUEST_RFLAGS: "rflags",
                    F.VMCS_GUEST_CR0: "cr0", F.VMCS_GUEST_CR3: "cr3", F.VMCS_GUEST_CR4: "cr4",
                    F.VMCS_GUEST_IA32_EFER: "efer"}
_MSR_FIELDS = {F.VMCS_GUEST_IA32_SYSENTER_CS: 0x174, F.VMCS_GUEST_IA32_SYSENTER_ESP: 0x175,
               F.VMCS_GUEST_IA32_SYSENTER_EIP: 0x176, F.VMCS_GUEST_IA32_DEBUGCTL: 0x1D9,
               F.VMCS_GUEST_IA32_PAT: 0x277}
_TABLE_FIELDS = {F.VMCS_GUEST_GDTR_BASE: ("gdt", "base"), F.VMCS_GUEST_GDTR_LIMIT: ("gdt", "limit"),
                 F.VMCS_GUEST_IDTR_BASE: ("idt", "base"), F.VMCS_GUEST_IDTR_LIMIT: ("idt", "limit")}
RFLAGS_TF = 1 << 8
HW_BREAKPOINT_SLOTS = 4
"""DR0-DR3 (SDM vol. 3 18.2.1)."""
EFER_LMA = 1 << 10
IA32_TSC = 0x10
_IA32E = VmEntryControls.VM_ENTRY_IA32E_MODE_GUEST
_PROC_BASED_FIELD = F.VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS
_MTF = int(ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG)

DEFAULT_PROC_BASED = (ProcBasedControls.CPU_BASED_HLT_EXITING | ProcBasedControls.CPU_BASED_USE_IO_BITMAPS
                      | ProcBasedControls.CPU_BASED_USE_MSR_BITMAPS
                      | ProcBasedControls.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS)
DEFAULT_SECONDARY = SecondaryControls.SECONDARY_ENABLE_EPT | SecondaryControls.SECONDARY_UNRESTRICTED_GUEST


class VmxVmState:
    """The VM-wide half of the VMX model: the capability MSRs, the I/O bitmaps and the MSR
    bitmap (one for every vCPU, as a hypervisor shares them), and the KVM MSR filter that
    realises the MSR bitmap (KVM_X86_SET_MSR_FILTER is a VM ioctl)."""

    def __init__(self, kvm: Kvm, vm: VmFd) -> None:
        self.vm = vm
        self.model: HostModel = host_model(kvm)
        self.capabilities = self.model.msrs
        self.msr_bitmap = MsrBitmap()
        self.msr_bitmap.on_change = self._mark_all_dirty
        self.io_bitmap = IoBitmaps()
        self.vmcses: list["Vmcs"] = []
        self.eptp: Callable[[], int] = lambda: 0
        self._msr_filter: tuple | None = None
        self._user_msr_enabled = False
        self._filter_buffers: list = []

    def use_in_kernel_irqchip(self) -> None:
        """The VM got KVM's in-kernel irqchip (before its vCPUs): HLT no longer exits."""
        self.capabilities = with_in_kernel_irqchip(self.capabilities)

    def _mark_all_dirty(self) -> None:
        for vmcs in self.vmcses:
            vmcs.mark_dirty()

    def realise_msr_filter(self, use_bitmaps: bool) -> None:
        """The MSR filter for CPU_BASED_USE_MSR_BITMAPS = `use_bitmaps` (SDM 25.6.9: without
        bitmaps every RDMSR/WRMSR exits)."""
        if use_bitmaps:
            wanted = ("bitmap", self.msr_bitmap.version) if self.msr_bitmap.any() else None
        else:
            wanted = ("all",)
        if wanted == self._msr_filter:
            return
        vm = self.vm
        if wanted is not None and not self._user_msr_enabled:
            if not vm.check_extension(Cap.X86_MSR_FILTER) or not vm.check_extension(Cap.X86_USER_SPACE_MSR):
                raise UnsupportedControlError(
                    "MSR exits need KVM_CAP_X86_MSR_FILTER and KVM_CAP_X86_USER_SPACE_MSR, "
                    "which this host lacks", 0, 0)
            vm.enable_cap(Cap.X86_USER_SPACE_MSR, MsrExitReasonFlag.FILTER)
            self._user_msr_enabled = True
        if wanted is None:
            vm.set_msr_filter(False, [])
        elif wanted[0] == "all":
            self._filter_buffers = deny_all_filter_ranges()
            vm.set_msr_filter(True, self._filter_buffers)
        else:
            ranges = []
            self._filter_buffers = []
            for flag, base, bits, count in self.msr_bitmap.kvm_filter_ranges():
                buf = (ctypes.c_uint8 * len(bits)).from_buffer_copy(bits)
                self._filter_buffers.append(buf)
                ranges.append((flag, base, buf, count))
            vm.set_msr_filter(False, ranges)
        self._msr_filter = wanted


@dataclass
class _Realised:
    """What the VMCS model last wrote to KVM, so unchanged state is not written again."""
    guest_debug: int = 0                 # a new vCPU debugs nothing
    debugregs: tuple[int, ...] = ()
    tsc_offset: int | None = None
    tf: bool = False


class Vmcs:
    """The VMCS of one vCPU: its controls and exception bitmap, its guest state (the vCPU's
    registers), its exit information (`info`), over the VM-wide bitmaps of `vmx`.

    `step_requested` is set by the vCPU's step service while a step callback waits; the
    realisation then single-steps the guest as it does for MTF: RFLAGS.TF in user mode
    (the built-in kernel reports the #DB), KVM_GUESTDBG_SINGLESTEP otherwise. In user mode the
    TF is minivmm's, not the guest's: `guest_tf` is the guest's own, which `guest_rflags` puts
    in the flags handlers and the guest see.

    `mode` is the guest mode the exception bitmap is checked for (`minivmm.capabilities`):
    a VMWRITE of a bit the mode cannot honour raises ExceptionInterceptError."""

    def __init__(self, vcpu: "Vcpu", info: ExitInfo, vmx: VmxVmState, user_mode: bool,
                 on_routing_change: Callable[[], None] = lambda: None, *,
                 mode: Mode | None = None) -> None:
        self.vcpu = vcpu
        self.info = info
        self.vmx = vmx
        self.user_mode = user_mode
        self.mode = Mode.USER if user_mode else Mode(mode or Mode.LONG)
        self.guest_tf = False
        self.on_routing_change = on_routing_change
        self.capabilities = vmx.capabilities
        self.controls = default_controls(self.capabilities)
        self.exception_bitmap = 0
        self.tsc_offset = 0
        self.step_requested = False
        self.hw_breakpoints: list[int | None] = [None] * HW_BREAKPOINT_SLOTS
        self._realised = _Realised()
        self.dirty = True
        vmx.vmcses.append(self)

    @property
    def msr_bitmap(self) -> MsrBitmap:
        return self.vmx.msr_bitmap

    @property
    def io_bitmap(self) -> IoBitmaps:
        return self.vmx.io_bitmap

    def mark_dirty(self) -> None:
        """Realise the controls again before the next entry."""
        self.dirty = True

    # -- controls -----------------------------------------------------------------
    def control_enabled(self, flag: IntFlag) -> bool:
        field, _ = _CONTROL_FIELDS[type(flag)]
        return bool(self.controls[field] & flag)

    def set_control(self, flag: IntFlag, enabled: bool = True) -> None:
        """Set or clear one control bit (checked against the capability MSR)."""
        field, _ = _CONTROL_FIELDS[type(flag)]
        value = self.read(field)
        self.write(field, value | flag if enabled else value & ~flag)

    def _ia32e_mode_guest(self) -> bool:
        """EFER.LMA, which VM exits store in VM_ENTRY_IA32E_MODE_GUEST (SDM 28.2 / A.6 bit 5);
        before the mode is set up, the machine's mode."""
        vcpu = self.vcpu
        if vcpu.efer & EFER_LMA or vcpu.cr0 & 1:
            return bool(vcpu.efer & EFER_LMA)
        return self.mode in (Mode.LONG, Mode.USER)

    def intercept_exception(self, vector: int, enabled: bool = True) -> None:
        """Set or clear one exception-bitmap bit (ExceptionInterceptError when the mode cannot
        intercept `vector`)."""
        mask = 1 << vector
        self.write(F.VMCS_CTRL_EXCEPTION_BITMAP,
                   self.exception_bitmap | mask if enabled else self.exception_bitmap & ~mask)

    @property
    def mtf(self) -> bool:
        # read at every exit: int's & skips IntFlag's, which builds a flag member each time
        return int.__and__(self.controls[_PROC_BASED_FIELD], _MTF) != 0

    def exception_reaches_handlers(self, vector: int) -> bool:
        """Whether the exception bitmap takes `vector`; a #DB whose qualification names one of
        minivmm's own debug-register breakpoints (`hw_breakpoints`) always reaches handlers."""
        if self.exception_bitmap >> vector & 1:
            return True
        return vector == 1 and any(self.hw_breakpoints[slot] is not None
                                   for slot in range(HW_BREAKPOINT_SLOTS) if self.info.qualification >> slot & 1)

    def io_reaches_handlers(self, port: int) -> bool:
        proc = self.controls[F.VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS]
        if proc & ProcBasedControls.CPU_BASED_USE_IO_BITMAPS:
            return self.io_bitmap.is_intercepted(port)
        return bool(proc & ProcBasedControls.CPU_BASED_UNCONDITIONAL_IO_EXITING)

    # -- VMREAD / VMWRITE -----------------------------------------------------------
    def read(self, field: VmcsField | int) -> int:
        """VMREAD."""
        field = VmcsField(field)
        vcpu = self.vcpu
        info = self.info
        if field in self.controls:
            value = self.controls[field]
            if field == F.VMCS_CTRL_VMENTRY_CONTROLS:
                value = value | _IA32E if self._ia32e_mode_guest() else value & ~_IA32E
            return value
        if field == F.VMCS_CTRL_EXCEPTION_BITMAP:
            return self.exception_bitmap
        if field == F.VMCS_CTRL_TSC_OFFSET:
            return self.tsc_offset
        if field == F.VMCS_CTRL_EPT_POINTER:
            return self.vmx.eptp()
        if field in _REGISTER_FIELDS:
            return getattr(vcpu, _REGISTER_FIELDS[field])
        if field in _SEGMENT_FIELDS:
            name, part = _SEGMENT_FIELDS[field]
            seg = vcpu.segment(name)
            if part == "access_rights":
                return access_rights_from_segment(seg.type, seg.s, seg.dpl, seg.present, seg.avl,
                                                  seg.l, seg.db, seg.g, seg.unusable)
            return getattr(seg, part)
        if field in _TABLE_FIELDS:
            table, part = _TABLE_FIELDS[field]
            base, limit = vcpu.descriptor_table(table)
            return base if part == "base" else limit
        if field == F.VMCS_GUEST_DR7:
            return vcpu.fd.get_debugregs().dr7
        if field in _MSR_FIELDS:
            return vcpu.fd.get_msrs([_MSR_FIELDS[field]]).get(_MSR_FIELDS[field], 0)
        exit_fields = {
            F.VMCS_EXIT_REASON: info.full_reason, F.VMCS_EXIT_QUALIFICATION: info.qualification,
            F.VMCS_GUEST_LINEAR_ADDRESS: info.guest_linear_address,
            F.VMCS_GUEST_PHYSICAL_ADDRESS: info.guest_physical_address,
            F.VMCS_VMEXIT_INSTRUCTION_LENGTH: info.instruction_length,
            F.VMCS_VMEXIT_INSTRUCTION_INFO: info.instruction_info,
            F.VMCS_VMEXIT_INTERRUPTION_INFORMATION: info.interruption_info,
            F.VMCS_VMEXIT_INTERRUPTION_ERROR_CODE: info.interruption_error_code,
            F.VMCS_IDT_VECTORING_INFORMATION: 0, F.VMCS_IDT_VECTORING_ERROR_CODE: 0,
            F.VMCS_VM_INSTRUCTION_ERROR: 0}
        if field in exit_fields:
            return exit_fields[field]
        if field_group(field) == FieldGroup.HOST:
            raise VmcsError(f"{field.name}: the host-state area belongs to KVM; minivmm has no host state")
        raise VmcsError(f"{field.name} is not modelled by minivmm")

    def write(self, field: VmcsField | int, value: int) -> None:
        """VMWRITE; control fields are checked against the capability MSRs."""
        field = VmcsField(field)
        vcpu = self.vcpu
        group = field_group(field)
        if group == FieldGroup.EXIT_INFO:
            raise VmcsError(f"{field.name} is a read-only exit-information field (VMWRITE fails, SDM 31.3)")
        if group == FieldGroup.HOST:
            raise VmcsError(f"{field.name}: the host-state area belongs to KVM; minivmm has no host state")
        if field in _FIELD_CONTROLS:
            cls, msr = _FIELD_CONTROLS[field]
            check_controls(value, self.capabilities[msr], cls, msr)
            if field == F.VMCS_CTRL_VMENTRY_CONTROLS and bool(value & _IA32E) != self._ia32e_mode_guest():
                raise VmcsError(
                    f"VM_ENTRY_IA32E_MODE_GUEST={int(bool(value & _IA32E))} would switch the guest "
                    f"{'into' if value & _IA32E else 'out of'} IA-32e mode at entry, which minivmm "
                    "cannot do: the mode is the machine's (Machine(mode=...)) or the guest's own; "
                    "the control reads EFER.LMA")
            self.controls[field] = value
            self.on_routing_change()
        elif field == F.VMCS_CTRL_EXCEPTION_BITMAP:
            self.vmx.model.check_exception_bitmap(self.mode, value)
            self.exception_bitmap = value & 0xFFFFFFFF
        elif field == F.VMCS_CTRL_TSC_OFFSET:
            self.tsc_offset = value
        elif field in _REGISTER_FIELDS:
            setattr(vcpu, _REGISTER_FIELDS[field], value)
            return
        elif field in _SEGMENT_FIELDS:
            name, part = _SEGMENT_FIELDS[field]
            seg = vcpu.segment(name)
            if part == "access_rights":
                seg = replace(seg, **access_rights_to_fields(value))
            else:
                seg = replace(seg, **{part: value})
            vcpu.set_segment(name, seg)
            return
        elif field in _TABLE_FIELDS:
            table, part = _TABLE_FIELDS[field]
            base, limit = vcpu.descriptor_table(table)
            vcpu.set_descriptor_table(table, value if part == "base" else base,
                                      value if part == "limit" else limit)
            return
        elif field == F.VMCS_GUEST_DR7:
            dr = vcpu.fd.get_debugregs()
            dr.dr7 = value
            vcpu.fd.set_debugregs(dr)
            return
        elif field in _MSR_FIELDS:
            vcpu.fd.set_msrs({_MSR_FIELDS[field]: value})
            return
        else:
            raise VmcsError(f"{field.name} is not modelled by minivmm")
        self.dirty = True

    # -- realisation on KVM ---------------------------------------------------------
    def realise(self) -> None:
        """Apply changed controls to KVM; runs before the next VM entry."""
        self.dirty = False
        vcpu = self.vcpu
        proc = self.controls[F.VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS]
        self.vmx.realise_msr_filter(bool(proc & ProcBasedControls.CPU_BASED_USE_MSR_BITMAPS))
        debug = 0
        stepping = bool(proc & ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG) or self.step_requested
        if self.user_mode:
            self._realise_tf(stepping)
        elif stepping:
            debug |= GuestDebugFlag.ENABLE | GuestDebugFlag.SINGLESTEP
        if self.exception_bitmap & (1 << 3):
            debug |= GuestDebugFlag.ENABLE | GuestDebugFlag.USE_SW_BP
        if self.exception_bitmap & (1 << 1) and not self.user_mode:
            debug |= GuestDebugFlag.ENABLE | GuestDebugFlag.USE_HW_BP   # KVM then exits on every #DB
        debugregs = self._hw_debugregs()
        if debugregs:
            debug |= GuestDebugFlag.ENABLE | GuestDebugFlag.USE_HW_BP
        if debug != self._realised.guest_debug or debugregs != self._realised.debugregs:
            vcpu.fd.set_guest_debug(debug, debugregs)
            self._realised.guest_debug, self._realised.debugregs = debug, debugregs
        offset = self.tsc_offset if proc & ProcBasedControls.CPU_BASED_USE_TSC_OFFSETTING else 0
        if offset != (self._realised.tsc_offset or 0):
            self._realise_tsc_offset(offset)

    def _hw_debugregs(self) -> tuple[int, ...]:
        """KVM_SET_GUEST_DEBUG's debugreg[0..7] for `hw_breakpoints` (api.rst 4.59): DR0-DR3
        the linear addresses, DR7 a local enable bit (L0-L3) per armed slot with R/W and LEN
        0, an instruction breakpoint (SDM vol. 3 18.2.4); () when none is armed."""
        if not any(address is not None for address in self.hw_breakpoints):
            return ()
        dr7 = sum(1 << 2 * slot for slot, address in enumerate(self.hw_breakpoints) if address is not None)
        return (*(address or 0 for address in self.hw_breakpoints), 0, 0, 0, dr7)

    def _realise_tf(self, stepping: bool) -> None:
        """User-mode single-step: KVM's single-step does not stop CPL-3 code on every host, so
        steps trap with RFLAGS.TF and the built-in kernel reports each #DB. The guest's own TF
        is kept in `guest_tf` and comes back when stepping ends."""
        vcpu = self.vcpu
        if stepping:
            if not self._realised.tf:
                self.guest_tf = bool(vcpu.rflags & RFLAGS_TF)
                self._realised.tf = True
            if not vcpu.rflags & RFLAGS_TF:
                vcpu.rflags |= RFLAGS_TF
        elif self._realised.tf:
            vcpu.rflags = vcpu.rflags | RFLAGS_TF if self.guest_tf else vcpu.rflags & ~RFLAGS_TF
            self._realised.tf = False

    @property
    def tf_stepping(self) -> bool:
        """Whether RFLAGS.TF is minivmm's now (user-mode single-step)."""
        return self._realised.tf

    def guest_rflags(self, rflags: int) -> int:
        """`rflags` as the guest's own: minivmm's TF replaced by the guest's (`guest_tf`). The
        next realisation puts minivmm's TF back."""
        if not self._realised.tf:
            return rflags
        self.dirty = True
        return rflags | RFLAGS_TF if self.guest_tf else rflags & ~RFLAGS_TF

    def _realise_tsc_offset(self, offset: int) -> None:
        """CPU_BASED_USE_TSC_OFFSETTING: the guest's TSC is its own plus TSC_OFFSET (SDM 26.6.5),
        through KVM's per-vCPU TSC offset: the KVM_VCPU_TSC_OFFSET attribute (devices/vcpu.rst),
        or where only that works a host write of IA32_TSC moved by the change of offset."""
        fd = self.vcpu.fd
        change = offset - (self._realised.tsc_offset or 0)
        if self.vmx.model.tsc_method == TSC_MSR:
            current = fd.get_msrs([IA32_TSC])[IA32_TSC]
            fd.set_msrs({IA32_TSC: (current + change) & (1 << 64) - 1})
        else:
            value = ctypes.c_uint64()
            attr = tsc_offset_attribute(value)
            fd.get_device_attr(attr)
            value.value = (value.value + change) & (1 << 64) - 1
            fd.set_device_attr(attr)
        self._realised.tsc_offset = offset


def default_controls(capabilities: dict[VmxMsr, int]) -> dict[VmcsField, int]:
    """The control fields a new VMCS starts with: minivmm's defaults, adjusted to what the
    capability MSRs allow (SDM appendix A.3)."""
    controls = {}
    for cls, (field, msr) in _CONTROL_FIELDS.items():
        default = {ProcBasedControls: DEFAULT_PROC_BASED, SecondaryControls: DEFAULT_SECONDARY}.get(cls, 0)
        controls[field] = adjust_controls(default, capabilities[msr])
    return controls


def check_control_change(controls: dict[VmcsField, int], flag: IntFlag, enabled: bool,
                         capabilities: dict[VmxMsr, int]) -> None:
    """Set or clear `flag` in `controls` as `Vmcs.set_control` does, raising what its VMWRITE
    would raise (UnsupportedControlError) for a value the capability MSR refuses."""
    field, msr = _CONTROL_FIELDS[type(flag)]
    value = controls[field] | flag if enabled else controls[field] & ~flag
    check_controls(value, capabilities[msr], type(flag), msr)
    controls[field] = value


def control_class_for(name: str) -> IntFlag:
    """The control flag with this SDM name (e.g. "CPU_BASED_HLT_EXITING")."""
    for cls in _CONTROL_FIELDS:
        if name in cls.__members__:
            return cls[name]
    raise KeyError(f"no VMX control named {name!r}")


__all__ = ["Vmcs", "VmxVmState", "VmcsError", "check_control_change", "default_controls", "MsrBitmap", "IoBitmaps", "capability_report", "capability_table",
           "vmx_capability_msrs", "host_capabilities", "control_class_for", "CONTROLS_FOR_MSR"]
