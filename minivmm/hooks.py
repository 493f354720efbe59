"""One registry for every callback a machine runs: `add(kind, callback, ...) -> Handle`,
`remove(handle)`.

| kind        | called                                   | returns            |
|-------------|------------------------------------------|--------------------|
| `EXIT`      | for exits of `reason` whose key matches   | an Action or None  |
| `OBSERVE`   | for every exit, before the handlers       | None               |
| `PRE_ENTRY` | before every entry into the guest         | None               |

Every callback is `callback(vcpu, info)`: the `Vcpu` and its `ExitInfo` (for
PRE_ENTRY the last exit's). `vcpu=` installs OBSERVE and PRE_ENTRY callbacks on
one vCPU; by default they go on every vCPU. An exception raised by any callback
stops the run as one `HandlerError` chained to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Sequence

from .exits import ExitReason
from .handlers import Dispatcher, Registration

if TYPE_CHECKING:
    from .runloop import VcpuContext

__all__ = ["Handle", "HookKind", "HookRegistry"]


class HookKind(str, Enum):
    EXIT = "exit"
    OBSERVE = "observe"
    PRE_ENTRY = "pre_entry"


@dataclass(eq=False, slots=True)
class Handle:
    """What `HookRegistry.add` returns, for `remove`."""
    kind: HookKind
    callback: Callable
    registration: Registration | None = None
    installed: tuple[tuple[list, Callable], ...] = ()


class HookRegistry:
    """The callbacks of one machine, over its dispatcher and its vCPU contexts."""

    def __init__(self, dispatcher: Dispatcher, contexts: Sequence["VcpuContext"],
                 on_exit_handler: Callable[[Registration], None]) -> None:
        self._dispatcher = dispatcher
        self._contexts = contexts
        self._on_exit_handler = on_exit_handler
        self._handles: list[Handle] = []

    def add(self, kind: HookKind | str, callback: Callable, *, reason: ExitReason | None = None,
            vcpu: int | None = None, **filters) -> Handle:
        """Install `callback`; `reason` and one filter (port, msr, vector, address, number,
        leaf) for EXIT, `vcpu` for OBSERVE and PRE_ENTRY."""
        kind = HookKind(kind)
        if kind is HookKind.EXIT:
            if reason is None:
                raise TypeError("an EXIT hook needs reason=")
            if vcpu is not None:
                raise TypeError("EXIT hooks apply to every vCPU; filter on info.vcpu_index")
            registration = self._dispatcher.on(reason, callback, **filters)
            self._on_exit_handler(registration)
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
            self._handles.remove(h)

    def handles(self, kind: HookKind | str | None = None) -> list[Handle]:
        return [h for h in self._handles if kind is None or h.kind is HookKind(kind)]

    def _context(self, index: int) -> "VcpuContext":
        for ctx in self._contexts:
            if ctx.index == index:
                return ctx
        raise ValueError(f"no vCPU {index}")
