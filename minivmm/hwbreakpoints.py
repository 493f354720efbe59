"""`HardwareBreakpointTable`: instruction breakpoints in the debug registers DR0-DR3.

A hardware breakpoint leaves guest memory alone (it works on code that an int3 cannot
patch: read-only or ROM-like pages, code the guest checksums). Each vCPU has four slots
(DR0-DR3, SDM vol. 3 18.2); a breakpoint takes a slot on every vCPU it applies to.
The addresses are linear, as the processor compares them (SDM 18.2.4): CS.base + IP in
real mode, the virtual address with paging. minivmm realises a slot through
KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_USE_HW_BP (debugreg[0..3] and DR7's local enable
bit, R/W and LEN 0: an instruction breakpoint). The guest's DR0-DR7 keep the values it
wrote, but while one of these is armed KVM loads minivmm's into the processor, so the
guest's own debug-register breakpoints do not fire (as under any debugger using
KVM_GUESTDBG_USE_HW_BP).

A hit is a fault-like #DB before the instruction executes: KVM_EXIT_DEBUG with DR6.Bn,
which the translator reports as EXCEPTION_OR_NMI #DB with Bn in the exit qualification
(SDM 27.2.1). It reaches the table's handler whatever the exception bitmap says (the
debug registers are minivmm's, not the guest's). The owners run in the order they were
added. When none returns an action, the slot is disarmed for one instruction through the
vCPU's step service and armed again after it, so the instruction executes once (RFLAGS.RF,
SDM 18.3.1.1, would do it in one entry, but hosts that emulate CPL-0 code ignore it:
measured, the breakpoint fires again with RF set). After an action such as `Stop` the
breakpoint fires again when the run goes on, as a software breakpoint does (gdb removes
its breakpoints at PC and steps over them itself).

Whether a mode honours these breakpoints depends on the host and is probed
(`HostModel.hw_breakpoints`, the "hardware breakpoints" row of `minivmm caps`);
`add` in a mode that does not raises HardwareBreakpointError.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from .actions import RETRY, Action
from .errors import MinivmmError
from .exits import ExitInfo, ExitReason, Vector
from .modes import Mode
from .vmcs import HW_BREAKPOINT_SLOTS

if TYPE_CHECKING:
    from .capabilities import HostModel
    from .handlers import Dispatcher, Registration
    from .runloop import VcpuContext
    from .vcpu import Vcpu

__all__ = ["HardwareBreakpoint", "HardwareBreakpointError", "HardwareBreakpointTable", "current_mode"]

_CR0_PE = 1
_EFER_LMA = 1 << 10

Callback = Callable[["Vcpu", ExitInfo], "Action | None"]


class HardwareBreakpointError(MinivmmError, ValueError):
    """A hardware breakpoint that cannot be armed: no free debug register on a vCPU, or a
    mode in which this host does not honour them."""


@dataclass(eq=False, slots=True)
class HardwareBreakpoint:
    """One owner's instruction breakpoint at linear `address`; `slots` maps each vCPU index
    it applies to onto its debug register (0-3). `callback(vcpu, info)` returns None (the
    instruction executes) or an Action that ends the exit (`Stop`: the run stops with RIP
    on the instruction, which executes when the run goes on)."""
    address: int
    callback: Callback | None
    slots: dict[int, int] = field(default_factory=dict)
    hits: int = 0
    active: bool = True


def current_mode(vcpu: "Vcpu") -> Mode:
    """The mode `vcpu` executes in now: real (CR0.PE=0), user (CPL 3), long (EFER.LMA) or
    protected."""
    if not vcpu.cr0 & _CR0_PE:
        return Mode.REAL
    if vcpu.cpl == 3:
        return Mode.USER
    return Mode.LONG if vcpu.efer & _EFER_LMA else Mode.PROTECTED


class HardwareBreakpointTable:
    """The debug-register breakpoints of one VM, over its vCPU contexts (their VMCS carries
    the slots), its dispatcher (for the #DB handler) and the host model (what each mode
    honours)."""

    def __init__(self, contexts: Sequence["VcpuContext"], dispatcher: "Dispatcher",
                 model: Callable[[], "HostModel"]) -> None:
        self._contexts = contexts
        self._dispatcher = dispatcher
        self._model = model
        self._owners: dict[tuple[int, int], HardwareBreakpoint] = {}     # (vCPU, slot) -> owner
        self._registration: "Registration | None" = None

    def supported(self, mode: Mode | str) -> bool:
        """Whether this host honours hardware breakpoints in `mode` (probed once per host)."""
        return self._model().hw_breakpoints(mode)

    def add(self, address: int, callback: Callback | None = None, *, vcpu: int | None = None,
            mode: Mode | str | None = None) -> HardwareBreakpoint:
        """Arm an instruction breakpoint at linear `address` on vCPU `vcpu` (None: every vCPU).
        `mode` is the mode it must work in (default: the machine's); HardwareBreakpointError
        when the host does not honour it there or a vCPU has no free debug register."""
        contexts = [self._context(vcpu)] if vcpu is not None else list(self._contexts)
        for ctx in contexts:
            wanted = Mode(mode) if mode is not None else ctx.vmcs.mode
            if not self.supported(wanted):
                raise HardwareBreakpointError(
                    f"hardware breakpoint at {address:#x}: this host does not honour debug-register "
                    f"breakpoints in {wanted.value} mode (probed; see `minivmm caps`); a software "
                    "breakpoint (the breakpoint table, gdb's break) works there")
        free: dict[int, int] = {}
        for ctx in contexts:
            slots = [s for s in range(HW_BREAKPOINT_SLOTS) if (ctx.index, s) not in self._owners]
            if not slots:
                raise HardwareBreakpointError(
                    f"hardware breakpoint at {address:#x}: vCPU {ctx.index} has all "
                    f"{HW_BREAKPOINT_SLOTS} debug registers (DR0-DR3) in use")
            free[ctx.index] = slots[0]
        breakpoint = HardwareBreakpoint(address & (1 << 64) - 1, callback, free)
        for ctx in contexts:
            slot = free[ctx.index]
            ctx.vmcs.hw_breakpoints[slot] = breakpoint.address
            ctx.vmcs.mark_dirty()
            self._owners[(ctx.index, slot)] = breakpoint
        if self._registration is None:
            self._registration = self._dispatcher.on(ExitReason.EXCEPTION_OR_NMI, self._on_debug,
                                                     vector=int(Vector.DB))
        return breakpoint

    def remove(self, breakpoint: HardwareBreakpoint) -> None:
        """Disarm `breakpoint` on every vCPU it applies to (its debug registers become free)."""
        if not breakpoint.active:
            return
        breakpoint.active = False
        for index, slot in breakpoint.slots.items():
            if self._owners.get((index, slot)) is breakpoint:
                del self._owners[(index, slot)]
                vmcs = self._context(index).vmcs
                vmcs.hw_breakpoints[slot] = None
                vmcs.mark_dirty()
        if not self._owners and self._registration is not None:
            self._dispatcher.off(self._registration)
            self._registration = None

    def breakpoints(self) -> list[HardwareBreakpoint]:
        """The armed breakpoints, each once."""
        return list(dict.fromkeys(self._owners.values()))

    def __len__(self) -> int:
        return len(self.breakpoints())

    def _context(self, index: int) -> "VcpuContext":
        for ctx in self._contexts:
            if ctx.index == index:
                return ctx
        raise HardwareBreakpointError(f"no vCPU {index}")

    def _on_debug(self, vcpu: "Vcpu", info: ExitInfo) -> Action | None:
        """A #DB exit: run the owners of the slots DR6 names (the qualification's B0-B3),
        then step over the instruction unless an owner returned an action. A #DB of the
        guest's own passes on down the chain."""
        owners = [self._owners[(vcpu.index, slot)] for slot in range(HW_BREAKPOINT_SLOTS)
                  if info.qualification >> slot & 1 and (vcpu.index, slot) in self._owners]
        if not owners:
            return None
        info.guest_linear_address = owners[0].address
        action = None
        for breakpoint in owners:
            breakpoint.hits += 1
            if breakpoint.callback is not None:
                result = breakpoint.callback(vcpu, info)
                if result is not None and action is None:
                    action = result
        if action is None:
            self._step_over(vcpu.index, [owner.slots[vcpu.index] for owner in owners])
        return RETRY if action is None else action

    def _step_over(self, index: int, slots: list[int]) -> None:
        """Disarm `slots` of vCPU `index` for one instruction, then arm them again (unless
        removed meanwhile)."""
        ctx = self._context(index)
        vmcs = ctx.vmcs
        for slot in slots:
            vmcs.hw_breakpoints[slot] = None
        vmcs.mark_dirty()

        def rearm(_vcpu: "Vcpu") -> None:
            for slot in slots:
                owner = self._owners.get((index, slot))
                if owner is not None:
                    vmcs.hw_breakpoints[slot] = owner.address
            vmcs.mark_dirty()

        ctx.step_once(rearm)
