"""What an exit handler returns: how the vCPU goes on after the exit."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Resume:
    """Re-enter the guest. `advance=True` moves RIP past the exiting instruction
    (HyperDbg's IncrementRip); `advance=False` executes it again."""
    advance: bool = True


RESUME = Resume()
RETRY = Resume(advance=False)


@dataclass(frozen=True, slots=True)
class Inject:
    """Deliver an exception to the guest through its IDT at the next entry
    (KVM_SET_VCPU_EVENTS); `cr2` is set first for a page fault."""
    vector: int
    error_code: int | None = None
    cr2: int | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """End the run with this result reason, exit code and message."""
    reason: str = "stopped"
    exit_code: int | None = None
    message: str = ""


Action = Resume | Inject | Stop
