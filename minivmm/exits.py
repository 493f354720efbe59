"""VMX exit information: basic exit reasons, exit qualifications, interruption info.

A pure model of the exit-information fields of the VMCS (SDM vol. 3C 25.9,
27.2; appendix C for basic exit reasons). Nothing here talks to KVM.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

VM_ENTRY_FAILURE = 1 << 31
"""Bit 31 of the exit-reason field: the exit is a VM-entry failure (SDM 25.9.1)."""

_BASIC_REASON_MASK = 0xFFFF


class ExitReason(IntEnum):
    """VMX basic exit reasons, bits 15:0 of the exit-reason field (SDM appendix C, table C-1)."""

    EXCEPTION_OR_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT_SIGNAL = 3
    STARTUP_IPI = 4
    IO_SMI = 5
    OTHER_SMI = 6
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    EXECUTE_CPUID = 10
    EXECUTE_GETSEC = 11
    EXECUTE_HLT = 12
    EXECUTE_INVD = 13
    EXECUTE_INVLPG = 14
    EXECUTE_RDPMC = 15
    EXECUTE_RDTSC = 16
    EXECUTE_RSM = 17
    EXECUTE_VMCALL = 18
    EXECUTE_VMCLEAR = 19
    EXECUTE_VMLAUNCH = 20
    EXECUTE_VMPTRLD = 21
    EXECUTE_VMPTRST = 22
    EXECUTE_VMREAD = 23
    EXECUTE_VMRESUME = 24
    EXECUTE_VMWRITE = 25
    EXECUTE_VMXOFF = 26
    EXECUTE_VMXON = 27
    MOV_CR = 28
    MOV_DR = 29
    IO_INSTRUCTION = 30
    EXECUTE_RDMSR = 31
    EXECUTE_WRMSR = 32
    INVALID_GUEST_STATE = 33
    MSR_LOADING = 34
    EXECUTE_MWAIT = 36
    MONITOR_TRAP_FLAG = 37
    EXECUTE_MONITOR = 39
    EXECUTE_PAUSE = 40
    MACHINE_CHECK = 41
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    VIRTUALIZED_EOI = 45
    GDTR_IDTR_ACCESS = 46
    LDTR_TR_ACCESS = 47
    EPT_VIOLATION = 48
    EPT_MISCONFIGURATION = 49
    EXECUTE_INVEPT = 50
    EXECUTE_RDTSCP = 51
    VMX_PREEMPTION_TIMER_EXPIRED = 52
    EXECUTE_INVVPID = 53
    EXECUTE_WBINVD = 54
    EXECUTE_XSETBV = 55
    APIC_WRITE = 56
    EXECUTE_RDRAND = 57
    EXECUTE_INVPCID = 58
    EXECUTE_VMFUNC = 59
    EXECUTE_ENCLS = 60
    EXECUTE_RDSEED = 61
    PAGE_MODIFICATION_LOG_FULL = 62
    EXECUTE_XSAVES = 63
    EXECUTE_XRSTORS = 64
    EXECUTE_PCONFIG = 65
    SPP_RELATED_EVENT = 66
    EXECUTE_UMWAIT = 67
    EXECUTE_TPAUSE = 68
    EXECUTE_LOADIWKEY = 69
    EXECUTE_ENCLV = 70
    ENQCMD_PASID_TRANSLATION_FAILURE = 72
    ENQCMDS_PASID_TRANSLATION_FAILURE = 73
    BUS_LOCK = 74
    INSTRUCTION_TIMEOUT = 75
    EXECUTE_SEAMCALL = 76
    EXECUTE_TDCALL = 77
    EXECUTE_RDMSRLIST = 78
    EXECUTE_WRMSRLIST = 79
    EXECUTE_URDMSR = 80
    EXECUTE_UWRMSR = 81
    EXECUTE_RDMSR_IMMEDIATE = 84
    EXECUTE_WRMSRNS_IMMEDIATE = 85


def decode_exit_reason(value: int) -> tuple[ExitReason, bool]:
    """Split a raw exit-reason field into the basic reason and the VM-entry-failure bit (SDM 25.9.1)."""
    return ExitReason(value & _BASIC_REASON_MASK), bool(value & VM_ENTRY_FAILURE)


class Vector(IntEnum):
    """x86 exception vectors (SDM vol. 3A 6.15, table 6-1)."""

    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20
    CP = 21
    HV = 28
    VC = 29
    SX = 30


EXCEPTIONS_WITH_ERROR_CODE: frozenset[Vector] = frozenset(
    {Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF, Vector.AC, Vector.CP, Vector.VC,
     Vector.SX}
)
"""Exceptions that push an error code when delivered (SDM vol. 3A 6.13, table 6-1)."""


def vector_name(vector: int) -> str:
    """``#GP`` for architectural exception vectors, ``vector 0x20`` for the rest."""
    try:
        return f"#{Vector(vector).name}"
    except ValueError:
        return f"vector {vector:#x}"


class InterruptionType(IntEnum):
    """Bits 10:8 of the VM-exit interruption-information field (SDM 25.9.2)."""

    EXTERNAL_INTERRUPT = 0
    NMI = 2
    HARDWARE_EXCEPTION = 3
    SOFTWARE_INTERRUPT = 4
    PRIVILEGED_SOFTWARE_EXCEPTION = 5
    SOFTWARE_EXCEPTION = 6
    OTHER_EVENT = 7


def _interruption_type(t: int) -> InterruptionType | int:
    return InterruptionType(t) if t != 1 else t


_EXCEPTION_TYPES = frozenset(
    {
        InterruptionType.HARDWARE_EXCEPTION,
        InterruptionType.SOFTWARE_EXCEPTION,
        InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION,
    }
)
_INTR_ERROR_CODE_VALID = 1 << 11
_INTR_NMI_UNBLOCKING = 1 << 12
_INTR_VALID = 1 << 31


@dataclass(frozen=True, slots=True)
class InterruptionInfo:
    """VM-exit interruption information (SDM 25.9.2 "Information for VM Exits Due to Vectored Events").

    Vector in bits 7:0, type in 10:8, error code valid bit 11, NMI unblocking
    due to IRET bit 12, valid bit 31. The same layout is used by the
    IDT-vectoring information field and, minus bit 12, by the VM-entry
    interruption-information field (SDM 25.8.3). Type 1 is not used by the
    SDM and decodes as the plain int 1.
    """

    vector: int
    type: InterruptionType | int
    error_code_valid: bool = False
    nmi_unblocking: bool = False
    valid: bool = True

    def encode(self) -> int:
        return (
            (self.vector & 0xFF)
            | (int(self.type) & 7) << 8
            | (_INTR_ERROR_CODE_VALID if self.error_code_valid else 0)
            | (_INTR_NMI_UNBLOCKING if self.nmi_unblocking else 0)
            | (_INTR_VALID if self.valid else 0)
        )

    @classmethod
    def decode(cls, q: int) -> InterruptionInfo:
        return cls(
            vector=q & 0xFF,
            type=_interruption_type((q >> 8) & 7),
            error_code_valid=bool(q & _INTR_ERROR_CODE_VALID),
            nmi_unblocking=bool(q & _INTR_NMI_UNBLOCKING),
            valid=bool(q & _INTR_VALID),
        )

    def __str__(self) -> str:
        if not self.valid:
            return "no event"
        if isinstance(self.type, InterruptionType):
            kind = self.type.name.lower().replace("_", " ")
        else:
            kind = f"type {self.type}"
        if self.type in _EXCEPTION_TYPES:
            text = f"{vector_name(self.vector)} {kind}"
        elif self.type is InterruptionType.NMI:
            text = "NMI"
        else:
            text = f"vector {self.vector:#x} {kind}"
        if self.error_code_valid:
            text += " with error code"
        return text


@dataclass(frozen=True, slots=True)
class IoQualification:
    """Exit qualification for I/O instructions (SDM 27.2.1, table "Exit Qualification for I/O Instructions").

    Size of access minus 1 in bits 2:0, direction bit 3 (1 = IN), string
    instruction bit 4, REP prefix bit 5, operand encoding bit 6 (0 = DX,
    1 = immediate), port number in bits 31:16.
    """

    size: int = 1
    direction_in: bool = False
    string: bool = False
    rep: bool = False
    operand_is_dx: bool = True
    port: int = 0

    def encode(self) -> int:
        if self.size not in (1, 2, 4):
            raise ValueError(f"I/O access size must be 1, 2 or 4 bytes, not {self.size}")
        return (
            (self.size - 1)
            | (1 << 3 if self.direction_in else 0)
            | (1 << 4 if self.string else 0)
            | (1 << 5 if self.rep else 0)
            | (0 if self.operand_is_dx else 1 << 6)
            | (self.port & 0xFFFF) << 16
        )

    @classmethod
    def decode(cls, q: int) -> IoQualification:
        return cls(
            size=(q & 7) + 1,
            direction_in=bool(q & 1 << 3),
            string=bool(q & 1 << 4),
            rep=bool(q & 1 << 5),
            operand_is_dx=not q & 1 << 6,
            port=(q >> 16) & 0xFFFF,
        )

    def __str__(self) -> str:
        prefix = ("rep " if self.rep else "") + ("string " if self.string else "")
        unit = "byte" if self.size == 1 else "bytes"
        return f"{prefix}{'in' if self.direction_in else 'out'} {self.size} {unit} port {self.port:#x}"


_EPT_BITS: tuple[tuple[str, int], ...] = (
    ("read", 0),
    ("write", 1),
    ("execute", 2),
    ("readable", 3),
    ("writable", 4),
    ("executable", 5),
    ("user_executable", 6),
    ("gla_valid", 7),
    ("gla_is_translation", 8),
    ("user_mode_linear", 9),
    ("writable_linear", 10),
    ("execute_disable_linear", 11),
    ("nmi_unblocking", 12),
    ("shadow_stack", 13),
    ("supervisor_shadow_stack", 14),
    ("guest_paging_verification", 15),
    ("asynchronous", 16),
)


@dataclass(frozen=True, slots=True)
class EptViolationQualification:
    """Exit qualification for EPT violations (SDM 27.2.1, table "Exit Qualification for EPT Violations").

    Bits 0-2: the access was a data read, data write, instruction fetch.
    Bits 3-5: the guest-physical address was readable, writable, executable
    (AND of the EPT entries; bit 5 is supervisor-mode execute under
    mode-based execute control); bit 6 user-mode executable. Bit 7: the
    guest-linear-address field is valid; bit 8 (if bit 7): the access was to
    the translation of that linear address (1) or to a paging-structure entry
    (0). Bits 9-11 (advanced information): linear address is user-mode,
    writable, execute-disable. Bit 12: NMI unblocking due to IRET. Bit 13:
    shadow-stack access; bit 14: supervisor shadow-stack page; bit 15: related
    to guest-paging verification; bit 16: asynchronous to instruction
    execution.
    """

    read: bool = False
    write: bool = False
    execute: bool = False
    readable: bool = False
    writable: bool = False
    executable: bool = False
    user_executable: bool = False
    gla_valid: bool = False
    gla_is_translation: bool = False
    user_mode_linear: bool = False
    writable_linear: bool = False
    execute_disable_linear: bool = False
    nmi_unblocking: bool = False
    shadow_stack: bool = False
    supervisor_shadow_stack: bool = False
    guest_paging_verification: bool = False
    asynchronous: bool = False

    def encode(self) -> int:
        q = 0
        for name, bit in _EPT_BITS:
            if getattr(self, name):
                q |= 1 << bit
        return q

    @classmethod
    def decode(cls, q: int) -> EptViolationQualification:
        return cls(*(bool(q >> bit & 1) for _, bit in _EPT_BITS))

    @property
    def access(self) -> str:
        """The attempted access as ``read``, ``write``, ``execute`` or a ``+``-joined mix."""
        parts = [n for n, on in (("read", self.read), ("write", self.write), ("execute", self.execute)) if on]
        return "+".join(parts) or "none"

    @property
    def permissions(self) -> str:
        """The page's effective EPT permissions as ``rwx`` with ``-`` for missing rights."""
        return (
            ("r" if self.readable else "-")
            + ("w" if self.writable else "-")
            + ("x" if self.executable else "-")
        )

    def __str__(self) -> str:
        return f"{self.access} on {self.permissions} page"


class CrAccessType(IntEnum):
    """Bits 5:4 of the exit qualification for control-register accesses (SDM 27.2.1)."""

    MOV_TO_CR = 0
    MOV_FROM_CR = 1
    CLTS = 2
    LMSW = 3


_CR_VERBS = {
    CrAccessType.MOV_TO_CR: "mov to",
    CrAccessType.MOV_FROM_CR: "mov from",
    CrAccessType.CLTS: "clts",
    CrAccessType.LMSW: "lmsw",
}


@dataclass(frozen=True, slots=True)
class MovCrQualification:
    """Exit qualification for control-register accesses.

    SDM 27.2.1, table "Exit Qualification for Control-Register Accesses":
    CR number in bits 3:0, access type in 5:4, LMSW operand type bit 6
    (1 = memory), general-purpose register in 11:8 (0 = RAX ... 15 = R15),
    LMSW source data in 31:16.
    """

    cr: int
    access_type: CrAccessType
    lmsw_memory_operand: bool = False
    gpr: int = 0
    lmsw_source: int = 0

    def encode(self) -> int:
        return (
            (self.cr & 0xF)
            | (int(self.access_type) & 3) << 4
            | (1 << 6 if self.lmsw_memory_operand else 0)
            | (self.gpr & 0xF) << 8
            | (self.lmsw_source & 0xFFFF) << 16
        )

    @classmethod
    def decode(cls, q: int) -> MovCrQualification:
        return cls(
            cr=q & 0xF,
            access_type=CrAccessType((q >> 4) & 3),
            lmsw_memory_operand=bool(q & 1 << 6),
            gpr=(q >> 8) & 0xF,
            lmsw_source=(q >> 16) & 0xFFFF,
        )


@dataclass(slots=True)
class ExitInfo:
    """The exit-information fields of the VMCS for a vCPU's last exit (SDM 25.9, 27.2).

    One object per vCPU, overwritten by :meth:`reset` on every exit so the
    exit path allocates nothing. ``vcpu_index`` belongs to the vCPU and
    survives :meth:`reset`.

    Besides the VMCS fields, minivmm's access fields describe what the exiting
    instruction moves: ``data`` is the value of an OUT, WRMSR or emulated write
    (and the value an IN, RDMSR or read is answered with, see `Reply`), ``msr``
    the MSR index (ECX); for I/O exits ``port``, ``size``, ``is_in`` and
    ``count`` (items of a REP string instruction), and ``string_data`` the
    items of a multi-item access (the bytes a REP OUTS wrote, the buffer a REP
    INS fills). ``raw_kvm_exit`` is the KVM exit the VMX exit was made from
    (`minivmm.kvm`), for expert use.
    """

    reason: ExitReason = ExitReason.EXCEPTION_OR_NMI
    entry_failure: bool = False
    qualification: int = 0
    guest_physical_address: int = 0
    guest_linear_address: int = 0
    instruction_length: int = 0
    instruction_info: int = 0
    interruption_info: int = 0
    interruption_error_code: int = 0
    vcpu_index: int = 0
    raw_kvm_exit: object | None = None
    data: int = 0
    msr: int = 0
    string_data: memoryview | None = None

    def reset(
        self,
        reason: ExitReason,
        qualification: int = 0,
        *,
        entry_failure: bool = False,
        guest_physical_address: int = 0,
        guest_linear_address: int = 0,
        instruction_length: int = 0,
        instruction_info: int = 0,
        interruption_info: int = 0,
        interruption_error_code: int = 0,
        raw_kvm_exit: object | None = None,
        data: int = 0,
        msr: int = 0,
    ) -> ExitInfo:
        """Overwrite every exit field (all but ``vcpu_index``) and return ``self``."""
        self.reason = reason
        self.entry_failure = entry_failure
        self.qualification = qualification
        self.guest_physical_address = guest_physical_address
        self.guest_linear_address = guest_linear_address
        self.instruction_length = instruction_length
        self.instruction_info = instruction_info
        self.interruption_info = interruption_info
        self.interruption_error_code = interruption_error_code
        self.raw_kvm_exit = raw_kvm_exit
        self.data = data
        self.msr = msr
        self.string_data = None
        return self

    def reset_io(self, qualification: int, raw_kvm_exit: object, data: int,
                 instruction_length: int = 0) -> ExitInfo:
        """`reset` for an I/O-instruction exit, positional for the exit loop's hot path."""
        self.reason = ExitReason.IO_INSTRUCTION
        self.entry_failure = False
        self.qualification = qualification
        self.guest_physical_address = self.guest_linear_address = 0
        self.instruction_length = instruction_length
        self.instruction_info = 0
        self.interruption_info = self.interruption_error_code = 0
        self.raw_kvm_exit = raw_kvm_exit
        self.data = data
        self.msr = 0
        self.string_data = None
        return self

    @property
    def port(self) -> int:
        """I/O exits: the port (qualification bits 31:16)."""
        return self.qualification >> 16 & 0xFFFF

    @property
    def size(self) -> int:
        """I/O exits: the size of one access in bytes (qualification bits 2:0, plus 1)."""
        return (self.qualification & 7) + 1

    @property
    def is_in(self) -> bool:
        """I/O exits: an IN or INS (qualification bit 3)."""
        return bool(self.qualification & 8)

    @property
    def count(self) -> int:
        """I/O exits: the number of items the instruction moves now (more than one only for a
        REP string instruction)."""
        return getattr(self.raw_kvm_exit, "count", 1)

    @property
    def full_reason(self) -> int:
        """The 32-bit exit-reason field: basic reason plus bit 31 for VM-entry failures (SDM 25.9.1)."""
        return int(self.reason) | (VM_ENTRY_FAILURE if self.entry_failure else 0)

    @property
    def io(self) -> IoQualification:
        return IoQualification.decode(self.qualification)

    @property
    def ept(self) -> EptViolationQualification:
        return EptViolationQualification.decode(self.qualification)

    @property
    def mov_cr(self) -> MovCrQualification:
        return MovCrQualification.decode(self.qualification)

    @property
    def interruption(self) -> InterruptionInfo:
        return InterruptionInfo.decode(self.interruption_info)

    @property
    def vector(self) -> int | None:
        """The event vector if the interruption-information field is valid, else None."""
        if self.interruption_info & _INTR_VALID:
            return self.interruption_info & 0xFF
        return None

    def _describe(self) -> str:
        r = self.reason
        if r is ExitReason.IO_INSTRUCTION:
            return str(self.io)
        if r is ExitReason.EPT_VIOLATION:
            ept = self.ept
            text = f"{ept} gpa {self.guest_physical_address:#x}"
            if ept.gla_valid:
                text += f" gla {self.guest_linear_address:#x}"
            return text
        if r is ExitReason.EPT_MISCONFIGURATION:
            return f"gpa {self.guest_physical_address:#x}"
        if r is ExitReason.MOV_CR:
            cr = self.mov_cr
            return f"{_CR_VERBS[cr.access_type]} cr{cr.cr} gpr {cr.gpr}"
        if self.interruption_info & _INTR_VALID:
            text = str(self.interruption)
            if self.interruption_info & _INTR_ERROR_CODE_VALID:
                text += f" {self.interruption_error_code:#x}"
            return text
        return ""

    def __str__(self) -> str:
        head = f"VM-entry failure {self.reason.name}" if self.entry_failure else self.reason.name
        text = f"{head} qual={self.qualification:#x}"
        what = self._describe()
        if what:
            text += f" ({what})"
        return f"{text} rip-len={self.instruction_length}"
