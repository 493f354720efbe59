"""One registry for every callback a machine runs: `add(kind, callback, ...) -> Handle`,
`remove(handle)`.

| kind        | called                                   | returns            |
|-------------|------------------------------------------|--------------------|
| `EXIT`      | for exits of `reason` whose key matches   | an Action or None  |
| `OBSERVE`   | for every exit, before the handlers       | None               |
| `PRE_ENTRY` | before every entry into the guest         | None               |
| `BREAKPOINT`| when the guest executes `address` (int3)  | None or an Action  |
| `EPT_ACCESS`| for guest accesses to `gpa` (EPT rights)  | None or a Stop     |
| `SYSCALL`   | a user-mode `syscall` whose `number` matches, `when="before"` or `"after"` the kernel | None, Reply(result) or a Stop |

Every callback is `callback(vcpu, info)`: the `Vcpu` and its `ExitInfo` (for
PRE_ENTRY the last exit's). `vcpu=` installs OBSERVE and PRE_ENTRY callbacks on
one vCPU; by default they go on every vCPU. An exception raised by any callback
stops the run as one `HandlerError` chained to it.

BREAKPOINT (`address=A`, `one_shot=False`) is an owner of the machine's
`minivmm.breakpoints.BreakpointTable`: `info` is the #BP exit with
`guest_physical_address` / `guest_linear_address` the breakpoint's; None lets
the instruction execute, an Action (e.g. `Stop`) ends the exit instead. A
one-shot breakpoint fires once and is gone.

EPT_ACCESS (`gpa=range(start, end)` or one address, `access="r" | "w" | "rw" |
"x"`) is an `EptShadow.monitor` (r, w, rw) or a hidden `EptShadow.hook_execute`
(x): `info` is a new `minivmm.ept.hooks.EptAccessInfo` per access, shaped like the EPT
violation a hypervisor would take (reason EPT_VIOLATION, the SDM 27.2.1
qualification bits for read / write / fetch, `guest_physical_address` of the
first byte, `guest_linear_address` where known, `data` the value read or
written as a little-endian int) with `info.event` the `HookEvent` (size, bytes,
rip). The access completes on RAM; a returned `Stop` then ends the run (an
execute hook runs before the instruction, so the run ends at it).

SYSCALL (`number=` an int, range or None for all, `when="before" | "after"`) is
HyperDbg's `!syscall` / `!sysret` for user-mode guests: `info` is a
`minivmm.syscalls.SyscallEvent` (number, args, rip, result). A before hook's
`Reply(value)` returns `value` without the kernel; an after hook sees
`event.result` and may replace it (see `minivmm.syscalls`).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Sequence

from .exits import ExitReason
from .handlers import Dispatcher, Registration

if TYPE_CHECKING:
    from .breakpoints import BreakpointTable
    from .ept import EptShadow
    from .runloop import VcpuContext
    from .syscalls import SyscallTable

__all__ = ["Handle", "HookKind", "HookRegistry"]


class HookKind(str, Enum):
    EXIT = "exit"
    OBSERVE = "observe"
    PRE_ENTRY = "pre_entry"
    BREAKPOINT = "breakpoint"
    EPT_ACCESS = "ept_access"
    SYSCALL = "syscall"


@dataclass(eq=False, slots=True)
class Handle:
    """What `HookRegistry.add` returns, for `remove`."""
    kind: HookKind
    callback: Callable
    registration: Registration | None = None
    installed: tuple[tuple[list, Callable], ...] = ()
    undo: Callable[[], None] | None = None      # removes a BREAKPOINT or EPT_ACCESS hook


class HookRegistry:
    """The callbacks of one machine, over its dispatcher and its vCPU contexts; `breakpoints`
    and `ept` give the machine's breakpoint table and EPT (made on first use) for the
    BREAKPOINT and EPT_ACCESS kinds."""

    def __init__(self, dispatcher: Dispatcher, contexts: Sequence["VcpuContext"],
                 on_exit_handler: Callable[[Registration], None], *,
                 breakpoints: Callable[[], "BreakpointTable"] | None = None,
                 ept: Callable[[], "EptShadow"] | None = None) -> None:
        self._dispatcher = dispatcher
        self._contexts = contexts
        self._on_exit_handler = on_exit_handler
        self._breakpoints = breakpoints
        self._ept = ept
        self._handles: list[Handle] = []

    @cached_property
    def syscalls(self) -> SyscallTable:
        """The SYSCALL hooks and kernel of every vCPU (`minivmm.syscalls`), made on first use."""
        from .syscalls import SyscallTable
        table = SyscallTable()
        for ctx in self._contexts:
            ctx.syscalls = table
        return table

    def add(self, kind: HookKind | str, callback: Callable, *, reason: ExitReason | None = None,
            vcpu: int | None = None, **filters) -> Handle:
        """Install `callback`; `reason` and one filter (port, msr, vector, address, number,
        leaf) for EXIT, `vcpu` for OBSERVE and PRE_ENTRY, `address` and `one_shot` for
        BREAKPOINT, `gpa` and `access` for EPT_ACCESS (see the module docstring)."""
        kind = HookKind(kind)
        if kind is HookKind.SYSCALL:
            if reason is not None or vcpu is not None:
                raise TypeError("SYSCALL hooks apply to every vCPU and take no reason")
            unknown = set(filters) - {"number", "when"}
            if unknown:
                raise TypeError(f"a SYSCALL hook takes number= and when=, not {', '.join(sorted(unknown))}")
            hook = self.syscalls.add(callback, filters.get("number"), filters.get("when", "before"))
            handle = Handle(kind, callback, undo=lambda: self.syscalls.remove(hook))
        elif kind in (HookKind.BREAKPOINT, HookKind.EPT_ACCESS):
            if reason is not None or vcpu is not None:
                raise TypeError(f"{kind.name} hooks apply to every vCPU and take no reason")
            undo = self._breakpoint(callback, **filters) if kind is HookKind.BREAKPOINT \
                else self._ept_access(callback, **filters)
            handle = Handle(kind, callback, undo=undo)
        elif kind is HookKind.EXIT:
            if reason is None:
                raise TypeError("an EXIT hook needs reason=")
            if vcpu is not None:
                raise TypeError("EXIT hooks apply to every vCPU; filter on info.vcpu_index")
            registration = self._dispatcher.on(reason, callback, **filters)
            try:
                self._on_exit_handler(registration)
            except BaseException:
                self._dispatcher.off(registration)      # refused (e.g. a vector the mode cannot intercept)
                raise
            handle = Handle(kind, callback, registration)
        else:
            if reason is not None or filters:
                raise TypeError(f"{kind.name} hooks take no reason or filter")
            contexts = self._contexts if vcpu is None else [self._context(vcpu)]
            installed = []
            for ctx in contexts:
                if kind is HookKind.OBSERVE:
                    ctx.observers.append(callback)
                    installed.append((ctx.observers, callback))
                else:
                    def hook(_cb=callback, _vcpu=ctx.vcpu, _info=ctx.info) -> None:
                        _cb(_vcpu, _info)
                    ctx.pre_entry.append(hook)
                    installed.append((ctx.pre_entry, hook))
            handle = Handle(kind, callback, installed=tuple(installed))
        self._handles.append(handle)
        return handle

    def remove(self, handle: Handle | Callable) -> None:
        """Uninstall a Handle, or every hook whose callback is `handle` (so that a function
        registered with the `Machine.on` decorator can be removed by name)."""
        if isinstance(handle, Handle):
            handles = [handle] if handle in self._handles else []
        else:
            handles = [h for h in self._handles if h.callback is handle]
        if not handles:
            raise ValueError(f"{handle!r} is not registered")
        for h in handles:
            if h.registration is not None:
                self._dispatcher.off(h.registration)
            for hooks, installed in h.installed:
                if installed in hooks:
                    hooks.remove(installed)
            if h.undo is not None:
                h.undo()
            self._handles.remove(h)

    def pause(self, handle: Handle) -> None:
        """Take an OBSERVE or PRE_ENTRY hook out of the exit loop without removing it (the loop
        then pays nothing for it); `resume` puts it back."""
        for hooks, installed in handle.installed:
            if installed in hooks:
                hooks.remove(installed)

    def resume(self, handle: Handle) -> None:
        for hooks, installed in handle.installed:
            if installed not in hooks:
                hooks.append(installed)

    def handles(self, kind: HookKind | str | None = None) -> list[Handle]:
        return [h for h in self._handles if kind is None or h.kind is HookKind(kind)]

    def _breakpoint(self, callback: Callable, *, address: int | None = None,
                    one_shot: bool = False) -> Callable[[], None]:
        if address is None:
            raise TypeError("a BREAKPOINT hook needs address=")
        if self._breakpoints is None:
            raise TypeError("this registry has no breakpoint table")
        table = self._breakpoints()
        breakpoint = table.add(address, callback, one_shot=one_shot)
        return lambda: table.remove(breakpoint)

    def _ept_access(self, callback: Callable, *, gpa: int | range | None = None,
                    access: str | None = None) -> Callable[[], None]:
        if gpa is None or access not in ("r", "w", "rw", "x"):
            raise TypeError("an EPT_ACCESS hook needs gpa= and access='r', 'w', 'rw' or 'x'")
        if self._ept is None:
            raise TypeError("this registry has no EPT")
        from .ept.hooks import access_callback
        span = range(gpa, gpa + 1) if isinstance(gpa, int) else gpa
        if not isinstance(span, range) or span.step != 1 or not span:
            raise ValueError(f"ept_access: gpa must be an address or a non-empty range, got {gpa!r}")
        ept = self._ept()
        wrapped = access_callback(callback)
        if access == "x":
            hook = ept.hook_execute(span.start, wrapped, hidden=True, size=len(span))
        else:
            hook = ept.monitor(span.start, span.stop, access, wrapped)
        return lambda: ept.remove(hook)

    def _context(self, index: int) -> "VcpuContext":
        for ctx in self._contexts:
            if ctx.index == index:
                return ctx
        raise ValueError(f"no vCPU {index}")
