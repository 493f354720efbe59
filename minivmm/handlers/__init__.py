"""Exit dispatch: Python handlers chosen by VMX exit reason and a filter.

The default handler of each family lives in its own module here (io, msr,
hypercall, hlt, exception, ept, mtf, timer, triple_fault); CPUID has no exit
on KVM (see `minivmm.cpuid`).

A handler is `handler(vcpu, info) -> Action | None`. Handlers for a reason
form a chain, newest first, that ends with minivmm's default handler for the
family; each exit runs down the chain until a handler returns an action. A
handler that returns None observed the exit and passes it on. Filters match
a key that depends on the reason: the port (I/O), the MSR index (RDMSR,
WRMSR), the vector (exception or NMI), the guest-physical address (EPT
violation and misconfiguration), the hypercall number (VMCALL), the CPUID
leaf (CPUID).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from ..actions import Action
from ..exits import ExitInfo, ExitReason

if TYPE_CHECKING:
    from ..devices.bus import PortBus

Handler = Callable[..., Optional[Action]]
_ANY = (0, (1 << 64) - 1)


@dataclass(eq=False, slots=True)
class Registration:
    """A handler for `reason` exits whose key (port, MSR, vector, ...) is in [low, high]."""
    reason: ExitReason
    handler: Handler
    low: int
    high: int   # inclusive

    def matches(self, key: int | None) -> bool:
        return key is None or self.low <= key <= self.high


def _bounds(value: int | range | tuple[int, int] | None) -> tuple[int, int]:
    if value is None:
        return _ANY
    if isinstance(value, range):
        if not value:
            raise ValueError("empty filter range")
        return value.start, value.stop - 1
    if isinstance(value, tuple):
        return value[0], value[1] - 1
    return int(value), int(value)


FILTER_NAMES = ("port", "msr", "vector", "address", "number", "leaf")


class Dispatcher:
    """Handler chains per exit reason, with cached per-key chains for the hot path."""

    def __init__(self) -> None:
        self._registrations: dict[ExitReason, list[Registration]] = {}
        self._defaults: dict[ExitReason, Handler] = {}
        self._drops_unclaimed_writes: set[ExitReason] = set()
        self._cache: dict[tuple[int, int | None], tuple[Handler, ...]] = {}
        self.version = 0

    def set_default(self, reason: ExitReason, handler: Handler, *,
                    drops_unclaimed_writes: bool = False) -> None:
        """The handler at the end of every chain of `reason`. `drops_unclaimed_writes`: it
        ignores writes to ports no device claims, so the exit loop may leave it out of them."""
        self._defaults[reason] = handler
        if drops_unclaimed_writes:
            self._drops_unclaimed_writes.add(reason)
        else:
            self._drops_unclaimed_writes.discard(reason)
        self._changed()

    def default(self, reason: ExitReason) -> Handler | None:
        return self._defaults.get(reason)

    def drops_unclaimed_writes(self, reason: ExitReason) -> bool:
        return reason in self._drops_unclaimed_writes

    def on(self, reason: ExitReason, handler: Handler, **filters) -> Registration:
        unknown = set(filters) - set(FILTER_NAMES)
        if unknown or len(filters) > 1:
            raise TypeError(f"one filter out of {', '.join(FILTER_NAMES)} may be given, got {sorted(filters)}")
        low, high = _bounds(next(iter(filters.values()), None))
        reg = Registration(ExitReason(reason), handler, low, high)
        self._registrations.setdefault(reg.reason, []).insert(0, reg)
        self._changed()
        return reg

    def off(self, registration: Registration) -> None:
        chain = self._registrations.get(registration.reason, [])
        if registration not in chain:
            raise ValueError("handler is not registered")
        chain.remove(registration)
        self._changed()

    def has_handlers(self, reason: ExitReason, key: int | None = None) -> bool:
        return any(r.matches(key) for r in self._registrations.get(reason, ()))

    def registrations(self, reason: ExitReason) -> list[Registration]:
        return list(self._registrations.get(reason, ()))

    def _changed(self) -> None:
        self._cache.clear()
        self.version += 1

    def chain(self, reason: int, key: int | None) -> tuple[Handler, ...]:
        cached = self._cache.get((reason, key))
        if cached is None:
            handlers = [r.handler for r in self._registrations.get(reason, ()) if r.matches(key)]
            default = self._defaults.get(reason)
            if default is not None:
                handlers.append(default)
            cached = self._cache[(reason, key)] = tuple(handlers)
        return cached

    def dispatch(self, vcpu, info: ExitInfo, key: int | None) -> Action | None:
        for handler in self.chain(info.reason, key):
            action = handler(vcpu, info)
            if action is not None:
                return action
        return None


def install_defaults(dispatcher: Dispatcher, ports: "PortBus") -> None:
    """Register minivmm's default handler for every exit family."""
    from . import ept, exception, hlt, hypercall, io, msr, mtf, timer, triple_fault
    d = dispatcher
    d.set_default(ExitReason.IO_INSTRUCTION, io.port_devices(ports), drops_unclaimed_writes=True)
    d.set_default(ExitReason.EXECUTE_RDMSR, msr.passthrough_rdmsr)
    d.set_default(ExitReason.EXECUTE_WRMSR, msr.passthrough_wrmsr)
    d.set_default(ExitReason.EXECUTE_VMCALL, hypercall.unknown_hypercall)
    d.set_default(ExitReason.EXECUTE_HLT, hlt.stop_on_hlt)
    d.set_default(ExitReason.EXCEPTION_OR_NMI, exception.stop_on_exception)
    d.set_default(ExitReason.EPT_MISCONFIGURATION, ept.stop_on_unmapped)
    d.set_default(ExitReason.EPT_VIOLATION, ept.stop_on_violation)
    d.set_default(ExitReason.MONITOR_TRAP_FLAG, mtf.continue_after_step)
    d.set_default(ExitReason.VMX_PREEMPTION_TIMER_EXPIRED, timer.stop_on_deadline)
    d.set_default(ExitReason.TRIPLE_FAULT, triple_fault.stop_on_triple_fault)
    d.set_default(ExitReason.INVALID_GUEST_STATE, triple_fault.stop_on_invalid_guest_state)
