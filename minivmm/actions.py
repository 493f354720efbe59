"""What an exit handler returns: how the vCPU goes on after the exit.

| action            | for                                   | effect                                   |
|-------------------|---------------------------------------|------------------------------------------|
| `Resume()`        | any exit                              | go on past the instruction (`RESUME`)    |
| `Resume(False)`   | any exit                              | execute the instruction again (`RETRY`)  |
| `Reply(value)`    | IN, RDMSR, EPT read, unmapped read, VMCALL, CPUID | answer it with `value`, go on |
| `Passthrough()`   | RDMSR/WRMSR, I/O, EPT violation        | what the hardware would do without the handler |
| `AllowOnce()`     | EPT violation                          | let the access through once               |
| `Emulate()`       | EPT violation (data access)            | carry it out on RAM (a write with `info.data`) |
| `Inject(vector)`  | any exit                              | deliver an exception to the guest         |
| `Stop(reason)`    | any exit                              | end the run                               |

A handler that returns None passes the exit on down the chain; the last
handler is minivmm's default for the exit reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RunEnd(StrEnum):
    """Why a run ended: `Stop.reason` and `RunResult.reason`. A str, so `result.reason ==
    "exit"` and JSON output keep working."""
    EXIT = "exit"                      # the guest wrote its exit code to the debug-exit port
    HLT = "hlt"                        # HLT with nothing to wake the vCPU
    TIMEOUT = "timeout"                # the run's deadline (VMX-preemption timer)
    TRIPLE_FAULT = "triple_fault"
    EXCEPTION = "exception"            # an exception no handler took
    ERROR = "error"                    # the guest did what the host cannot go on with
    EXIT_LIMIT = "exit_limit"          # max_exits reached
    STOPPED = "stopped"                # a handler's Stop, or another vCPU stopped the machine
    INTERRUPTED = "interrupted"        # Ctrl-C
    SYNC = "sync"                      # the guest channel's GUEST_SYNC
    DONE = "done"                      # the guest channel's GUEST_DONE
    ASSERT_FAILED = "assert_failed"    # the guest channel's GUEST_ASSERT
    CRASH_ADDRESS = "crash_address"    # a fuzz target reached a configured crash address

    def __repr__(self) -> str:
        return repr(self.value)          # reads as the string it compares equal to


@dataclass(frozen=True, slots=True)
class Resume:
    """Re-enter the guest. `advance=True` moves RIP past the exiting instruction
    (HyperDbg's IncrementRip); `advance=False` executes it again."""
    advance: bool = True


RESUME = Resume()
RETRY = Resume(advance=False)


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the exit with `value` and go on past the instruction.

    IN: the value read (an int for every item, or bytes for all the items of a
    REP INS); RDMSR: the MSR's value; EPT violation or misconfiguration on a
    read: the data read (an int or bytes of the access size); VMCALL: the
    result (RAX); CPUID: the (eax, ebx, ecx, edx) the leaf returns."""
    value: int | bytes | tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Do what the hardware would do without this handler: the real MSR for RDMSR/WRMSR
    (KVM_GET_MSRS/KVM_SET_MSRS; #GP where KVM refuses), the port device for I/O, the
    access with the page's own rights for an EPT violation (`AllowOnce`)."""


PASSTHROUGH = Passthrough()


@dataclass(frozen=True, slots=True)
class AllowOnce:
    """EPT violation: let the access through once, as if the page allowed it (a fetch
    executes one instruction with the page executable)."""


ALLOW_ONCE = AllowOnce()


@dataclass(frozen=True, slots=True)
class Emulate:
    """EPT violation on a data access: carry it out on RAM; a write stores `info.data` (the
    guest's value unless the handler changed it)."""


EMULATE = Emulate()


@dataclass(frozen=True, slots=True)
class Inject:
    """Deliver an exception to the guest through its IDT at the next entry
    (KVM_SET_VCPU_EVENTS); `cr2` is set first for a page fault."""
    vector: int
    error_code: int | None = None
    cr2: int | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """End the run with this result reason (a `RunEnd`, or its value), exit code and message."""
    reason: RunEnd = RunEnd.STOPPED
    exit_code: int | None = None
    message: str = ""

    def __post_init__(self) -> None:
        if self.reason.__class__ is not RunEnd:
            try:
                object.__setattr__(self, "reason", RunEnd(self.reason))
            except ValueError:
                raise ValueError(f"{self.reason!r} is not a run end; one of "
                                 f"{', '.join(r.value for r in RunEnd)} (say more in message=)") from None


Action = Resume | Reply | Passthrough | AllowOnce | Emulate | Inject | Stop
