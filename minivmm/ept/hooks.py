"""Hooks on guest accesses and the record of the access behind an EPT violation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..actions import Stop
from ..exits import ExitInfo, ExitReason
from ..memory import PAGE_SHIFT
from .tables import Perm

if TYPE_CHECKING:
    from ..vcpu import Vcpu

__all__ = ["Hook", "HookEvent", "EptAccess", "EptAccessInfo", "access_callback", "report_execute"]

_QUALIFICATION = {"read": 1, "write": 2, "execute": 4}     # SDM 27.2.1, table 27-7 bits 0-2


@dataclass(eq=False)
class Hook:
    """A monitor (`kind` "monitor") or execute hook (`kind` "execute") on [start, end); `hits`
    counts reports. A visible execute hook (`hidden` False) is an int3 of the machine's
    `minivmm.breakpoints.BreakpointTable`."""
    kind: str
    start: int
    end: int
    access: Perm
    callback: Callable[["HookEvent"], object]
    hidden: bool = True
    hits: int = 0
    active: bool = True
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
class EptAccessInfo(ExitInfo):
    """What an "ept_access" hook of the registry gets as `info`: the access as the EPT
    violation a hypervisor would take (reason EPT_VIOLATION; qualification bit 0 read,
    1 write, 2 fetch; `guest_physical_address` the first byte; `guest_linear_address`
    the instruction's for a fetch, else 0; `data` the value read or written, little
    endian), and `event` the `HookEvent` with the size, bytes and RIP."""
    event: HookEvent | None = None


def access_callback(callback: Callable[["Vcpu", ExitInfo], object]) -> Callable[[HookEvent], object]:
    """A hook callback that hands `callback(vcpu, info)` each access as an `EptAccessInfo`;
    what it returns is the hook's answer (a `Stop` ends the run)."""
    def report(event: HookEvent) -> object:
        info = EptAccessInfo(event=event)
        info.reset(ExitReason.EPT_VIOLATION, _QUALIFICATION[event.kind], guest_physical_address=event.address,
                   guest_linear_address=event.rip if event.kind == "execute" else 0,
                   data=0 if event.kind == "execute" else event.value)
        info.vcpu_index = event.vcpu.index
        return callback(event.vcpu, info)
    return report


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



_R, _W = int(Perm.R), int(Perm.W)


def _call(hook: Hook, event: HookEvent) -> Stop | None:
    """Run a hook callback: the `Stop` it returns, if any (anything else is ignored: the access
    is completed either way). An exception it raises goes on with a note naming the hook and
    the access (the run loop makes it a HandlerError)."""
    try:
        answer = hook.callback(event)
    except Exception as exc:
        exc.add_note(f"in the {hook.kind} hook on [{hook.start:#x}, {hook.end:#x}) for a {event.kind} "
                     f"at gpa {event.address:#x}, guest rip={event.rip:#x}")
        raise
    return answer if answer.__class__ is Stop else None



@dataclass
class HookTable:
    """The active monitors and hidden execute hooks, by page."""
    monitors: dict[int, list[Hook]] = field(default_factory=dict)
    hidden: dict[int, list[Hook]] = field(default_factory=dict)

    def add_monitor(self, hook: Hook) -> None:
        for page in hook.pages:
            self.monitors.setdefault(page, []).append(hook)

    def add_hidden(self, hook: Hook) -> None:
        for page in hook.pages:
            self.hidden.setdefault(page, []).append(hook)

    def discard_monitor(self, hook: Hook) -> None:
        for page in hook.pages:
            _discard(self.monitors, page, hook)

    def discard_hidden(self, hook: Hook) -> None:
        for page in hook.pages:
            _discard(self.hidden, page, hook)

    def mask(self, page: int) -> int:
        """The rights the hooks on `page` take away in the EPT: W for write monitors, R and W for
        read monitors, X for hidden execute hooks."""
        mask = Perm.NONE
        for hook in self.monitors.get(page, ()):
            mask |= Perm.W if hook.access == Perm.W else Perm.R | Perm.W
        if self.hidden.get(page):
            mask |= Perm.X
        return int(mask)

    def all(self) -> list[Hook]:
        found: dict[int, Hook] = {}
        for table in (self.monitors, self.hidden):
            for hooks in table.values():
                for hook in hooks:
                    found[id(hook)] = hook
        return list(found.values())

    def report(self, gpa: int, data: bytes, is_write: bool, rip: int, vcpu: "Vcpu") -> Stop | None:
        """Call every monitor whose range and access type match the access [gpa, gpa+len(data));
        the first Stop one of them returned."""
        end = gpa + len(data)
        want = _W if is_write else _R                  # plain ints: IntFlag operators are slow
        seen: set[int] = set()
        stop = None
        for page in range(gpa >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1):
            for hook in self.monitors.get(page, ()):
                if not hook.bits & want or not (hook.start < end and gpa < hook.end) or id(hook) in seen:
                    continue
                seen.add(id(hook))
                hook.hits += 1
                answer = _call(hook, HookEvent(hook, "write" if is_write else "read", gpa, len(data),
                                               int.from_bytes(data, "little"), rip, vcpu, data))
                stop = stop or answer
        return stop

    def execute_hidden(self, gpa: int, vcpu: "Vcpu") -> Stop | None:
        """Report the execution of `gpa` to the hidden execute hooks on it; the first Stop."""
        hooks = self.hidden.get(gpa >> PAGE_SHIFT)
        if hooks:
            return report_execute([h for h in hooks if h.start <= gpa < h.end], gpa, vcpu)
        return None


def _discard(table: dict[int, list[Hook]], key: int, hook: Hook) -> bool:
    """Remove `hook` from `table[key]`; True when no hook is left there."""
    hooks = table.get(key, [])
    if hook in hooks:
        hooks.remove(hook)
    if not hooks:
        table.pop(key, None)
        return True
    return False


def report_execute(hooks: list[Hook], gpa: int, vcpu: "Vcpu") -> Stop | None:
    """Report the execution of the instruction at `gpa` to `hooks`; the first Stop."""
    stop = None
    for hook in hooks:
        hook.hits += 1
        stop = stop or _call(hook, HookEvent(hook, "execute", gpa, 1, gpa, vcpu.rip, vcpu))
    return stop
