"""KVM exit -> VMX exit: the translation, and nothing else.

`Translator.translate` takes a decoded KVM exit (`minivmm.kvm`), a read-only view
of the vCPU (`CpuView`) and fills the vCPU's `ExitInfo` with the VMX basic exit
reason, qualification, instruction length and interruption information that a
VT-x processor would report (SDM vol. 3C 27.2, appendix C). What the exit loop
must do because of the translation is returned as a continuation, never done
here: this module issues no ioctl and changes no guest state, so every exit kind
and host quirk is tested with fabricated exits and no VM (tests/test_translate.py).

KVM exits that concern EPT pages (MMIO on managed RAM, fetches from pages
without X, MMIO devices) are `minivmm.ept.EptShadow`'s: the run loop asks it
first. Unlike this module it acts while it translates (it emulates allowed
accesses, joins split accesses and runs hook callbacks); moving that into
continuations carried out by the loop's complete stage is still to do.

Host facts the translation depends on (see the README's host section):
- VMCALL cannot reach user space on KVM; minivmm's hypercall ABI is an OUT to
  HYPERCALL_PORT, reported as EXECUTE_VMCALL.
- In user mode every exception goes through an IDT stub of the built-in kernel
  that reports with an OUT to EXCEPTION_PORT; the frame it leaves on the kernel
  stack is unwound into the exception the user code raised (`RestoreUserFrame`).
- KVM reports some hosts' OUT exits with RIP already past the instruction; the
  instruction is found by decoding around RIP (`find_io_instruction`).
- An `int3` that KVM cannot emulate at CPL 0 arrives as an emulation failure
  whose instruction bytes start with 0xcc: a #BP exception exit.
- In user mode `syscall` jumps to SYSCALL_EXIT_ADDR, a memslot hole: an emulation
  failure at that RIP is the system call, reported as #UD at the SYSCALL instruction
  (`Translation.syscall`; `minivmm.syscalls`).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from .disasm import disassemble_one
from .errors import MinivmmError
from .exits import (EXCEPTIONS_WITH_ERROR_CODE, VM_ENTRY_FAILURE, ExitInfo, ExitReason,
                    InterruptionInfo, InterruptionType, IoQualification, Vector, vector_name)
from .kvm import (DebugExit, ExitKind, FailEntryExit, InternalErrorExit, InternalErrorKind, IoExit,
                  MemoryFaultExit, MmioExit, MsrExit)
from .modes import (EXCEPTION_PORT, HYPERCALL_PORT, STUB_SIZE, STUBS_ADDR, SYSCALL_EXIT_ADDR, Mode, StubFrame,
                    decode_stub_frame)

__all__ = ["CpuView", "EptStep", "EptView", "ExceptionReport", "GuestFault", "exception_report", "IoInstruction",
           "RestoreUserFrame", "Translation", "Translator", "find_io_instruction", "io_qualification"]


class GuestFault(MinivmmError, RuntimeError):
    """The host could not go on with the guest (e.g. an emulation failure). The run loop ends the
    run with a RunResult of reason `error` and this message; it does not escape `run()`."""


class CpuView(Protocol):
    """What the translation may read of a vCPU: registers, guest code and memory."""

    @property
    def rip(self) -> int: ...

    @property
    def rsp(self) -> int: ...

    @property
    def rax(self) -> int: ...

    @property
    def cr2(self) -> int: ...

    def code_bits(self) -> int:
        """16, 32 or 64: the operand size guest code is decoded with now."""

    def read_code(self, rip: int, length: int) -> bytes:
        """Guest code at CS:rip, empty where nothing is mapped."""

    def read_physical(self, gpa: int, length: int) -> bytes:
        """Guest-physical memory."""

    def linear_of_physical(self, gpa: int) -> int | None:
        """The one guest-linear address that maps `gpa` now, None when unknown or ambiguous."""

    def fetch_address(self) -> tuple[int, int] | None:
        """(linear, guest-physical) address of the instruction at CS:RIP; None when it does
        not translate."""


class EptView(Protocol):
    """What the translation may ask of the EPT model, for one vCPU (`minivmm.ept`)."""

    def managed(self, gpa: int) -> bool:
        """`gpa` is RAM whose rights the EPT model realises."""

    def has_device(self, gpa: int) -> bool:
        """An MMIO device (`add_mmio_device`) serves `gpa`."""

    def rights(self, gpa: int) -> int:
        """The page's effective EPT rights (R=1, W=2, X=4), hooks included."""

    def base_rights(self, gpa: int) -> int:
        """The page's rights from `protect` alone (hooks excluded)."""

    def monitored(self, gpa: int) -> bool:
        """A read or write monitor covers the page."""

    def mapped_for_fetch(self, gpa: int) -> bool:
        """The page has a memslot (it is no hole) and is not opened for one stepped
        instruction: a failed fetch there is not about its EPT rights."""

    def planted(self, gpa: int) -> bool:
        """The breakpoint table planted an int3 at `gpa`."""

    def refetch_due(self, rip: int) -> bool:
        """A fetch at `rip` failed while memslots were being replaced and was not retried
        since the last change (a memslot replacement is not atomic)."""


class EptStep(IntEnum):
    """What the EPT model carries out for an exit the translator classified (the
    continuation of `Translation.ept`)."""
    DEVICE = 1            # an MMIO device's access: the device answers, no VMX exit
    EMULATE = 2           # the page allows the access but has no memslot: do it on RAM
    MONITOR = 3           # a monitored access: join KVM's fragments, report, complete on RAM
    VIOLATION = 4         # a data EPT violation (info filled): record it, hold a read open
    REFETCH = 5           # a fetch failed during a memslot change: enter again once
    STEP_THROUGH = 6      # an allowed fetch from an unmapped page: hidden execute hooks, one step
    FETCH_VIOLATION = 7   # an execute EPT violation (info filled), after hidden execute hooks


@dataclass(frozen=True, slots=True)
class ExceptionReport:
    """An exception the guest raised: what `Machine.last_exception` and RunResult show."""
    vector: int
    error_code: int | None
    cr2: int | None
    rip: int

    def __str__(self) -> str:
        text = f"{vector_name(self.vector)} (vector {self.vector}) at rip={self.rip:#x}"
        if self.error_code is not None:
            text += f" error_code={self.error_code:#x}"
        if self.cr2 is not None:
            text += f" cr2={self.cr2:#x}"
        return text


@dataclass(frozen=True, slots=True)
class RestoreUserFrame:
    """Continuation: put the user code's state back as the built-in kernel's stub found it,
    so that handlers see the faulting instruction (RIP, RSP, RFLAGS, user CS and SS)."""
    rip: int
    rsp: int
    rflags: int


@dataclass(frozen=True, slots=True)
class IoInstruction:
    """The IN/OUT/INS/OUTS that caused an I/O exit, decoded from guest code."""
    start: int
    length: int
    string: bool
    rep: bool
    immediate: bool


@dataclass(slots=True)
class Translation:
    """What `Translator.translate` found besides the filled ExitInfo.

    `key` is the dispatch filter value (port, MSR, vector, GPA, hypercall
    number), `restore` the stub-frame continuation, `step` whether the exit is a
    single-step trap that belongs to the step service, `ept` what the EPT model carries out,
    `syscall` whether the exit is a user-mode `syscall` (the loop then returns to the
    instruction, at CPL 3)."""
    key: int | None = None
    restore: RestoreUserFrame | None = None
    step: bool = False
    ept: EptStep | None = None
    syscall: bool = False


def exception_report(info: ExitInfo, rip: int, cr2: int) -> ExceptionReport:
    """The exception of an EXCEPTION_OR_NMI exit whose faulting instruction is at `rip` (after
    the stub-frame restore), as `last_exception` and RunResult show it; CR2 only for #PF."""
    interruption = info.interruption
    error_code = info.interruption_error_code if interruption.error_code_valid else None
    return ExceptionReport(interruption.vector, error_code,
                           cr2 if interruption.vector == Vector.PF else None, rip)


_ENTRY_FAILURES = {int(r): r for r in (ExitReason.INVALID_GUEST_STATE, ExitReason.MSR_LOADING,
                                        ExitReason.MACHINE_CHECK)}
_DR6_QUALIFICATION = 0xF | 1 << 13 | 1 << 14          # B0-B3, BD, BS
_DR6_BREAKPOINTS = 0xF                                # B0-B3: a debug-register breakpoint, not a step
_EPT_R, _EPT_W, _EPT_X = 1, 2, 4
_QUAL_GLA_VALID, _QUAL_GLA_TRANSLATION = 1 << 7, 1 << 8
_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3})
# opcode -> (is_out, string, immediate operand); SDM vol. 2 IN, INS, OUT, OUTS
_IO_OPCODES = {0xE4: (False, False, True), 0xE5: (False, False, True),
               0xEC: (False, False, False), 0xED: (False, False, False),
               0xE6: (True, False, True), 0xE7: (True, False, True),
               0xEE: (True, False, False), 0xEF: (True, False, False),
               0x6C: (False, True, False), 0x6D: (False, True, False),
               0x6E: (True, True, False), 0x6F: (True, True, False)}


def decode_io(code: bytes, bits: int) -> tuple[int, bool, bool, bool, bool, int] | None:
    """(length, is_out, string, rep, immediate, operand size) of the IN/OUT/INS/OUTS at the
    start of `code` decoded with `bits`-bit defaults, None when it is no I/O instruction."""
    rep = operand_prefix = False
    for position, byte in enumerate(code[:15]):
        if byte in _PREFIXES:
            rep = rep or byte == 0xF3 or byte == 0xF2
            operand_prefix = operand_prefix or byte == 0x66
            continue
        if bits == 64 and 0x40 <= byte <= 0x4F:      # REX, the last prefix
            position += 1
            if position >= len(code):
                return None
            byte = code[position]
        shape = _IO_OPCODES.get(byte)
        if shape is None:
            return None
        is_out, string, immediate = shape
        length = position + 1 + immediate
        if length > len(code):
            return None
        size = 1 if not byte & 1 else 2 if (bits == 16) != operand_prefix else 4
        return length, is_out, string, rep and string, immediate, size
    return None


def find_io_instruction(window: bytes, window_start: int, rip: int, bits: int, is_out: bool,
                        size: int | None = None, port: int | None = None,
                        count: int = 1) -> IoInstruction | None:
    """The I/O instruction of an exit at `rip`: the one that starts at `rip`, else the one that
    ends there (hosts that report an I/O exit with RIP past the instruction), counting the
    prefixes before it. Only instructions that agree with the exit count: its direction and,
    when given, its operand `size`, the `port` of an immediate operand, and a REP string
    instruction for `count` > 1. `window` is guest code from `window_start`."""
    at = ending = None
    for start in (rip, rip - 1, rip - 2, rip - 3, rip - 4):
        offset = start - window_start
        if offset < 0 or offset >= len(window):
            continue
        decoded = decode_io(window[offset:offset + 15], bits)
        if decoded is None:
            continue
        length, out, string, rep, immediate, operand_size = decoded
        if out != is_out or (size is not None and size != operand_size) or (count > 1 and not rep):
            continue
        if immediate and port is not None and window[offset + length - 1] != port:
            continue
        insn = IoInstruction(start, length, string, rep, immediate)
        if start == rip:
            at = insn
        elif start + length == rip:
            ending = insn                   # the longest one: its prefixes included
    return at or ending


def io_qualification(port: int, size: int, is_out: bool, count: int,
                     insn: IoInstruction | None = None) -> int:
    """SDM 27.2.1, table "Exit Qualification for I/O Instructions". Without the decoded
    instruction only a multi-item access is known to be a REP string instruction."""
    if insn is None:
        return IoQualification(size, not is_out, count > 1, count > 1, True, port).encode()
    return IoQualification(size, not is_out, insn.string, insn.rep, not insn.immediate, port).encode()


class Translator:
    """Translates one vCPU's KVM exits for a machine in `mode`."""

    def __init__(self, mode: Mode, hypercall_port: int = HYPERCALL_PORT) -> None:
        self.mode = Mode(mode)
        self.hypercall_port = hypercall_port

    def io_instruction(self, cpu: CpuView, exit: IoExit) -> IoInstruction | None:
        """The instruction of the I/O exit `exit` in the guest's code (None where the code
        cannot be read or decoded)."""
        rip = cpu.rip
        low = max(rip - 4, 0)
        before = cpu.read_code(low, rip - low) if rip > low else b""
        after = cpu.read_code(rip, 15) or cpu.read_code(rip, min(15, 0x1000 - (rip & 0xFFF)))
        if not before and not after:
            return None
        return find_io_instruction(before + after, rip - len(before), rip, cpu.code_bits(),
                                   exit.is_out, exit.size, exit.port, exit.count)

    def translate(self, kind: int, exit: object, cpu: CpuView, info: ExitInfo, *,
                  stepping: bool = False, deadline_expired: bool = False,
                  out_data: int = 0, ept: EptView | None = None) -> Translation | None:
        """Fill `info` for the KVM exit `exit` of kind `kind`; None when the exit is no VMX exit
        (a signal that is not the deadline). `stepping`: a single-step is in progress (MTF or
        the step service). `out_data`: the first item an OUT wrote. `ept`: the EPT model's
        view when the machine has one; MMIO exits and failed fetches are then classified
        against it (EPT violation, monitor, device, emulation; SDM 28.3.3).
        """
        if kind == ExitKind.INTR:
            if deadline_expired:
                info.reset(ExitReason.VMX_PREEMPTION_TIMER_EXPIRED)
                return Translation()
            return None
        if kind == ExitKind.IO:
            return self._io(exit, cpu, info, stepping, out_data)
        if kind == ExitKind.HLT:
            info.reset(ExitReason.EXECUTE_HLT, instruction_length=1, raw_kvm_exit=exit)
            return Translation()
        if kind == ExitKind.SHUTDOWN or kind == ExitKind.SYSTEM_EVENT:
            info.reset(ExitReason.TRIPLE_FAULT, raw_kvm_exit=exit)
            return Translation()
        if kind == ExitKind.MMIO:
            assert isinstance(exit, MmioExit)
            if ept is not None:
                translation = self._ept_access(exit, cpu, info, ept)
                if translation is not None:
                    return translation
            info.reset(ExitReason.EPT_MISCONFIGURATION, guest_physical_address=exit.phys_addr,
                       raw_kvm_exit=exit)
            return Translation(exit.phys_addr)
        if kind == ExitKind.MEMORY_FAULT:
            # KVM could not map guest memory for an access (api.rst 5, KVM_EXIT_MEMORY_FAULT):
            # the second-level translation refused it, an EPT violation whose access KVM
            # does not say (qualification 0)
            assert isinstance(exit, MemoryFaultExit)
            info.reset(ExitReason.EPT_VIOLATION, guest_physical_address=exit.gpa, raw_kvm_exit=exit)
            return Translation(exit.gpa)
        if kind == ExitKind.FAIL_ENTRY:
            assert isinstance(exit, FailEntryExit)
            hardware = exit.hardware_entry_failure_reason
            reason = _ENTRY_FAILURES.get(hardware & 0xFFFF, ExitReason.INVALID_GUEST_STATE) \
                if hardware & VM_ENTRY_FAILURE else ExitReason.INVALID_GUEST_STATE
            info.reset(reason, hardware, entry_failure=True, raw_kvm_exit=exit)
            return Translation()
        if kind == ExitKind.INTERNAL_ERROR:
            if self.mode is Mode.USER and cpu.rip == SYSCALL_EXIT_ADDR:
                return self._syscall(exit, info)
            if ept is not None and exit.suberror == InternalErrorKind.EMULATION:
                translation = self._ept_fetch(exit, cpu, info, ept)
                if translation is not None:
                    return translation
            return self._internal_error(exit, cpu, info)
        if kind == ExitKind.X86_RDMSR or kind == ExitKind.X86_WRMSR:
            assert isinstance(exit, MsrExit)
            reason = ExitReason.EXECUTE_WRMSR if exit.is_write else ExitReason.EXECUTE_RDMSR
            info.reset(reason, instruction_length=2, raw_kvm_exit=exit, msr=exit.index,
                       data=exit.data if exit.is_write else 0)
            return Translation(exit.index)
        if kind == ExitKind.DEBUG:
            assert isinstance(exit, DebugExit)
            if exit.exception == Vector.DB and stepping and not exit.dr6 & _DR6_BREAKPOINTS:
                info.reset(ExitReason.MONITOR_TRAP_FLAG, raw_kvm_exit=exit)
                return Translation(step=True)
            vector = exit.exception
            software = vector == Vector.BP
            itype = InterruptionType.SOFTWARE_EXCEPTION if software else \
                InterruptionType.HARDWARE_EXCEPTION
            # SDM 27.2.1: a #DB exit's qualification holds DR6's B0-B3, BD and BS bits
            qualification = exit.dr6 & _DR6_QUALIFICATION if vector == Vector.DB else 0
            info.reset(ExitReason.EXCEPTION_OR_NMI, qualification, raw_kvm_exit=exit,
                       instruction_length=int(software),
                       interruption_info=InterruptionInfo(vector, itype).encode())
            return Translation(vector)
        name = ExitKind(kind).name if kind in ExitKind._value2member_map_ else kind
        raise GuestFault(f"unexpected KVM exit {name}: {exit} (minivmm has no VMX exit for it)")

    def _ept_access(self, exit: MmioExit, cpu: CpuView, info: ExitInfo,
                    ept: EptView) -> Translation | None:
        """A KVM_EXIT_MMIO against the EPT model; None when the GPA is neither managed RAM nor
        a device (an EPT misconfiguration). A write exits after KVM emulated the
        instruction (RIP past it), a read before it."""
        gpa = exit.phys_addr
        if not ept.managed(gpa):
            return Translation(gpa, ept=EptStep.DEVICE) if ept.has_device(gpa) else None
        need = _EPT_W if exit.is_write else _EPT_R
        rights = ept.rights(gpa)
        if rights & need:
            return Translation(gpa, ept=EptStep.EMULATE)     # a hole made for no-X, or a hidden hook's page
        if ept.monitored(gpa) and ept.base_rights(gpa) & need:
            return Translation(gpa, ept=EptStep.MONITOR)
        gla = cpu.linear_of_physical(gpa)
        # SDM 28.2.1 table 28-7: bits 0-2 the access, 3-5 the page's rights, 7-8 the linear address
        qualification = need | rights << 3
        if gla is not None:
            qualification |= _QUAL_GLA_VALID | _QUAL_GLA_TRANSLATION
        info.reset(ExitReason.EPT_VIOLATION, qualification, guest_physical_address=gpa,
                   guest_linear_address=gla or 0, raw_kvm_exit=exit,
                   data=int.from_bytes(exit.data, "little") if exit.is_write else 0)
        return Translation(gpa, ept=EptStep.VIOLATION)

    def _ept_fetch(self, exit: InternalErrorExit, cpu: CpuView, info: ExitInfo,
                   ept: EptView) -> Translation | None:
        """An emulation failure that is a fetch from a page without X: on KVM a fetch from a GPA
        without a memslot fails emulation with RIP = the target (kvm-host-notes). None when
        the failure is not about an EPT page."""
        where = cpu.fetch_address()
        if where is None:
            return None
        linear, gpa = where
        if not ept.managed(gpa):
            return None
        if ept.mapped_for_fetch(gpa):
            if ept.planted(gpa):
                # a CPL-0 int3 of the breakpoint table: #BP here, whatever the failure data says
                info.reset(ExitReason.EXCEPTION_OR_NMI, instruction_length=1, raw_kvm_exit=exit,
                           interruption_info=InterruptionInfo(Vector.BP,
                                                              InterruptionType.SOFTWARE_EXCEPTION).encode())
                return Translation(int(Vector.BP))
            return Translation(ept=EptStep.REFETCH) if ept.refetch_due(cpu.rip) else None
        rights = ept.rights(gpa)
        if (rights | ept.base_rights(gpa)) & _EPT_X:
            return Translation(gpa, ept=EptStep.STEP_THROUGH)
        info.reset(ExitReason.EPT_VIOLATION, _EPT_X | rights << 3 | _QUAL_GLA_VALID | _QUAL_GLA_TRANSLATION,
                   guest_physical_address=gpa, guest_linear_address=linear, raw_kvm_exit=exit)
        return Translation(gpa, ept=EptStep.FETCH_VIOLATION)

    def _io(self, exit: IoExit, cpu: CpuView, info: ExitInfo, stepping: bool,
            out_data: int) -> Translation:
        if exit.port == EXCEPTION_PORT and self.mode is Mode.USER and \
                STUBS_ADDR <= cpu.rip < STUBS_ADDR + 256 * STUB_SIZE:
            return self._user_exception(exit, cpu, info, stepping)
        if exit.port == self.hypercall_port and exit.is_out:
            insn = self.io_instruction(cpu, exit)
            info.reset(ExitReason.EXECUTE_VMCALL, raw_kvm_exit=exit,
                       instruction_length=insn.length if insn is not None else 0)
            return Translation(cpu.rax)
        insn = self.io_instruction(cpu, exit)
        info.reset(ExitReason.IO_INSTRUCTION,
                   io_qualification(exit.port, exit.size, exit.is_out, exit.count, insn),
                   instruction_length=insn.length if insn is not None else 0,
                   raw_kvm_exit=exit, data=out_data if exit.is_out else 0)
        return Translation(exit.port)

    def _user_exception(self, exit: IoExit, cpu: CpuView, info: ExitInfo,
                        stepping: bool) -> Translation:
        frame = decode_stub_frame(cpu.read_physical(cpu.rsp, StubFrame.SIZE))
        vector = frame.vector
        rip = frame.rip
        if vector == Vector.DB and stepping:
            info.reset(ExitReason.MONITOR_TRAP_FLAG, raw_kvm_exit=exit)
            return Translation(restore=RestoreUserFrame(rip, frame.rsp, frame.rflags), step=True)
        has_error = vector in EXCEPTIONS_WITH_ERROR_CODE
        error_code = frame.error_code if has_error else None
        cr2 = cpu.cr2 if vector == Vector.PF else None
        itype = InterruptionType.NMI if vector == Vector.NMI else InterruptionType.HARDWARE_EXCEPTION
        length = 0
        if vector in (Vector.BP, Vector.OF):
            itype = InterruptionType.SOFTWARE_EXCEPTION
            rip -= 1           # int3 / into are traps: report the instruction itself
            length = 1
        # SDM 27.2.1: a #PF exit's qualification is the faulting linear address
        info.reset(ExitReason.EXCEPTION_OR_NMI, cr2 or 0,
                   interruption_info=InterruptionInfo(vector, itype, has_error).encode(),
                   interruption_error_code=error_code or 0, instruction_length=length, raw_kvm_exit=exit)
        return Translation(vector, restore=RestoreUserFrame(rip, frame.rsp, frame.rflags))

    @staticmethod
    def _syscall(exit: InternalErrorExit, info: ExitInfo) -> Translation:
        """A SYSCALL that went to LSTAR (see minivmm.modes): #UD at the instruction, as a
        hypervisor that clears EFER.SCE intercepts system calls."""
        info.reset(ExitReason.EXCEPTION_OR_NMI, instruction_length=2, raw_kvm_exit=exit,
                   interruption_info=InterruptionInfo(Vector.UD, InterruptionType.HARDWARE_EXCEPTION).encode())
        return Translation(int(Vector.UD), syscall=True)

    def _internal_error(self, exit: InternalErrorExit, cpu: CpuView, info: ExitInfo) -> Translation:
        code = exit.instruction_bytes()
        rip = cpu.rip
        if exit.suberror == InternalErrorKind.EMULATION and code[:1] == b"\xcc":
            breakpoint = InterruptionInfo(Vector.BP, InterruptionType.SOFTWARE_EXCEPTION)
            info.reset(ExitReason.EXCEPTION_OR_NMI, instruction_length=1, raw_kvm_exit=exit,
                       interruption_info=breakpoint.encode())
            return Translation(int(Vector.BP))
        suberror = InternalErrorKind(exit.suberror).name if exit.suberror in (1, 2, 3, 4) \
            else exit.suberror
        raise GuestFault(f"KVM could not emulate the instruction at rip={rip:#x} "
                         f"({describe_code(code, cpu.code_bits())}); suberror {suberror}")


def describe_code(code: bytes, bits: int) -> str:
    if not code:
        return "no instruction bytes reported"
    text = code.hex(" ")
    insn = disassemble_one(code, bits)
    if insn:
        text += f": {insn}"
    return text
