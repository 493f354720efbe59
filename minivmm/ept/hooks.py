"""Hooks on guest accesses and the record of the access behind an EPT violation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..memory import PAGE_SHIFT
from .tables import Perm

if TYPE_CHECKING:
    from ..vcpu import Vcpu

__all__ = ["Hook", "HookEvent", "EptAccess"]


@dataclass(eq=False)
class Hook:
    """A monitor (`kind` "monitor") or execute hook (`kind` "execute"); `hits` counts reports."""
    kind: str
    start: int
    end: int
    access: Perm
    callback: Callable[["HookEvent"], object]
    hidden: bool = True
    hits: int = 0
    active: bool = True
    original: bytes = b""
    bits: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.bits = int(self.access)

    @property
    def pages(self) -> range:
        return range(self.start >> PAGE_SHIFT, ((self.end - 1) >> PAGE_SHIFT) + 1)


@dataclass(slots=True)
class HookEvent:
    """One guest access reported to a hook callback.

    `address` is the guest-physical address of the first byte, `size` the
    number of bytes, `value` the little-endian value read or written (the
    instruction's address for execute hooks), `rip` the guest RIP of the
    accessing instruction; `kind` is "read", "write" or "execute".
    """
    hook: Hook
    kind: str
    address: int
    size: int
    value: int
    rip: int
    vcpu: "Vcpu"
    data: bytes = b""

    @property
    def is_write(self) -> bool:
        return self.kind == "write"


@dataclass(slots=True)
class EptAccess:
    """The access behind the last EPT violation (`EptShadow.access`).

    `gla` is None when the guest-linear address could not be worked out.
    `rip` is the guest RIP at the exit: KVM reports a data write after it
    emulated the instruction, so for writes it is the *next* instruction
    (`retired`); for reads and fetches it is the accessing instruction.
    """
    gpa: int
    gla: int | None
    size: int
    is_write: bool
    is_fetch: bool
    data: bytes
    rip: int
    completed: bool = False

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")

    @property
    def retired(self) -> bool:
        return self.is_write



def _call(hook: Hook, event: HookEvent) -> None:
    """Run a hook callback; an exception it raises goes on unchanged (callers may stop runs with
    their own exception types), with a note naming the hook and the access."""
    try:
        hook.callback(event)
    except Exception as exc:
        exc.add_note(f"in the {hook.kind} hook on [{hook.start:#x}, {hook.end:#x}) for a {event.kind} "
                     f"at gpa {event.address:#x}, guest rip={event.rip:#x}")
        raise

