"""System calls of user-mode guests: the SYSCALL hook kind (HyperDbg's `!syscall` / `!sysret`).

In user mode `syscall` exits to the VMM (see `minivmm.modes`, "syscall in user
mode"). The translator reports it the way a VT-x hypervisor that intercepts
system calls by clearing EFER.SCE sees it: an EXCEPTION_OR_NMI exit, #UD at the
SYSCALL instruction, instruction length 2. Once a SYSCALL hook is registered (or
a kernel is installed), the run loop hands such exits to the machine's
`SyscallTable` instead of the exception handlers:

1. `before` hooks whose number filter matches, newest first; one may return
   `Reply(value)` (the call returns `value` without reaching the kernel) or `Stop`;
2. the kernel (`table.kernel`, e.g. the Linux personality of `minivmm.linux`);
   without one the call returns -ENOSYS;
3. `after` hooks, which see `event.result` and may replace it with `Reply(value)`
   or end the run with `Stop` (a call that ends the run, like exit, reaches them with
   `result` None).

The result goes to RAX and the guest continues after the instruction, as after
`sysretq` (RCX and R11 hold the return RIP and RFLAGS, as Linux leaves them).
Callbacks are `callback(vcpu, event)` with a `SyscallEvent`.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Callable

from .actions import RESUME, Action, Reply, Stop

__all__ = ["SyscallEvent", "SyscallTable", "MASK64"]

MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class SyscallEvent:
    """One system call: `number` (RAX at the SYSCALL), the six arguments (RDI, RSI, RDX, R10,
    R8, R9: the x86-64 Linux convention), `rip` of the SYSCALL instruction, and for the
    after hooks `result` (signed, -errno on failure)."""
    number: int
    args: tuple[int, int, int, int, int, int]
    rip: int
    result: int | None = None
    vcpu_index: int = 0


KernelCallback = Callable[[object, SyscallEvent], "int | Action"]


@dataclass(slots=True)
class _Hook:
    """A SYSCALL hook for the numbers [low, high]."""
    callback: Callable
    low: int
    high: int


@dataclass
class SyscallTable:
    """The SYSCALL hooks and the kernel of one machine (shared by its vCPUs)."""
    kernel: KernelCallback | None = None
    before: list[_Hook] = field(default_factory=list)
    after: list[_Hook] = field(default_factory=list)

    def add(self, callback: Callable, number: int | range | tuple[int, int] | None = None,
            when: str = "before") -> _Hook:
        """Install `callback` for calls whose number matches (an int, range, (low, high)
        inclusive, or None for every call), `when` "before" or "after"."""
        if when not in ("before", "after"):
            raise ValueError(f"a SYSCALL hook runs 'before' or 'after' the call, not {when!r}")
        if number is None:
            low, high = 0, MASK64
        elif isinstance(number, int):
            low = high = number
        elif isinstance(number, range) and number.step == 1 and number:
            low, high = number.start, number.stop - 1
        elif isinstance(number, tuple) and len(number) == 2:
            low, high = number
        else:
            raise ValueError(f"number= is a syscall number, a range or (low, high), not {number!r}")
        hook = _Hook(callback, low, high)
        (self.before if when == "before" else self.after).insert(0, hook)
        return hook

    def remove(self, hook: _Hook) -> None:
        for hooks in (self.before, self.after):
            if hook in hooks:
                hooks.remove(hook)

    def watches(self, number: int) -> bool:
        """Whether a hook (before or after) is installed for calls numbered `number`."""
        return any(h.low <= number <= h.high for h in self.before + self.after)

    @property
    def active(self) -> bool:
        return bool(self.kernel is not None or self.before or self.after)

    def dispatch(self, vcpu, rip: int, vcpu_index: int = 0) -> Action:
        """Carry out the system call the vCPU stopped at (`rip` is the SYSCALL instruction):
        hooks and kernel as in the module docstring; RAX gets the result. Returns RESUME or
        the Stop that ends the run."""
        regs = vcpu.register_cache
        number = regs.rax
        event = SyscallEvent(number, (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9), rip,
                             vcpu_index=vcpu_index)
        stop, result = self._run(self.before, vcpu, event, first_reply=True)
        if stop is not None:
            return stop
        if result is None:
            if self.kernel is None:
                result = -errno.ENOSYS
            else:
                answer = self.kernel(vcpu, event)
                if answer.__class__ is not int:
                    self._ended(vcpu, event)
                    return _checked(answer)
                result = answer
        event.result = result
        stop, _ = self._run(self.after, vcpu, event, first_reply=False)
        if stop is not None:
            return stop
        vcpu.rax = event.result & MASK64
        return RESUME

    @staticmethod
    def _run(hooks: list[_Hook], vcpu, event: SyscallEvent, first_reply: bool) -> tuple[Stop | None, int | None]:
        """The matching hooks in order: (the Stop one returned, else None; the value of the last
        Reply). A before hook's Reply ends the walk (`first_reply`); an after hook's replaces
        `event.result` and the walk goes on."""
        value = None
        for hook in hooks:
            if hook.low <= event.number <= hook.high:
                action = hook.callback(vcpu, event)
                if action is None:
                    continue
                if action.__class__ is not Reply:
                    return _checked(action), value
                value = action.value
                if first_reply:
                    break
                event.result = value
        return None, value

    def _ended(self, vcpu, event: SyscallEvent) -> None:
        """The kernel ended the run in this call (exit, a fatal signal): the after hooks see it
        with `result` None; their answers cannot undo the end."""
        for hook in self.after:
            if hook.low <= event.number <= hook.high:
                hook.callback(vcpu, event)


def _checked(action) -> Action:
    if isinstance(action, Stop):
        return action
    raise TypeError(f"a SYSCALL hook returns None, Reply(value) or Stop(...), not {action!r}")
