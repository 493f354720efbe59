"""`BreakpointTable`: the software breakpoints (int3) of one VM, shared by every owner.

A breakpoint replaces the first byte of an instruction with 0xCC (`int3`, SDM
vol. 2A "INT n/INTO/INT3/INT1"). When the guest executes it the processor
raises #BP, a trap whose saved RIP is past the int3; minivmm reports it as an
EXCEPTION_OR_NMI exit with vector 3 and RIP rewound onto the int3, both in
user mode (the built-in kernel's IDT stub) and at CPL 0 (KVM guest debugging,
or an emulation failure on 0xCC), before any handler runs.

Several owners may share an address (a one-shot coverage breakpoint and a
visible execute hook, say). The table keeps the original byte once, plants
0xCC while the address has an owner and handles the #BP exit with one
EXCEPTION_OR_NMI handler (registered while the table has breakpoints). On a
hit it calls the owners in the order they were added, drops the one-shot
ones and, if persistent ones remain, restores the byte for one instruction
through the step service of the vCPU that hit it and plants 0xCC again after
it; the instruction then executes (RETRY). An int3 of the guest's own (an
address not in the table) passes on down the handler chain.

Extra copies of guest memory that must show the breakpoints (a snapshot's
memory copy) are "mirrors": `add_mirror(write)` has `write(gpa, data)` called
whenever a breakpoint is planted for good or removed for good (not for the
one-instruction restores of a step).

With several vCPUs, a vCPU may run through an address while another vCPU
steps over it with the original byte in place; int3 breakpoints share that
limit with every debugger that uses them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from .actions import RETRY, Action
from .errors import MinivmmError
from .exits import ExitInfo, ExitReason, Vector
from .kvm import KvmSregs
from .memory import GuestMemory

if TYPE_CHECKING:
    from .hooks import Handle, HookRegistry
    from .runloop import VcpuContext
    from .vcpu import Vcpu

__all__ = ["Breakpoint", "BreakpointError", "BreakpointTable", "INT3"]

INT3 = 0xCC
_BYTES = [bytes([b]) for b in range(256)]
_INT3_BYTE = _BYTES[INT3]
_CR0_PE, _CR0_PG = 1, 1 << 31
_EFER_LMA = 1 << 10
_CACHE_LIMIT = 4096
_PAGE_SHIFT, _PAGE_MASK = 12, 0xFFF

Callback = Callable[["Vcpu", ExitInfo], "Action | None"]
Mirror = Callable[[int, bytes], object]


class BreakpointError(MinivmmError, ValueError):
    """A breakpoint that cannot be planted (its address is not guest RAM)."""


@dataclass(eq=False, slots=True)
class Breakpoint:
    """One owner's breakpoint at guest-physical `address`; `hits` counts its reports.

    `callback(vcpu, info)` runs when the guest executes the address; `info` is the
    #BP exit with `guest_physical_address` and `guest_linear_address` set to the
    breakpoint. It returns None (the instruction executes) or an Action that ends
    the exit instead (e.g. `Stop`: the run stops at the breakpoint, which fires
    again when the run goes on unless it was one-shot or removed)."""
    address: int
    callback: Callback | None
    one_shot: bool = False
    hits: int = 0
    active: bool = True


@dataclass(eq=False, slots=True)
class _Site:
    """An address with an int3 of the table: its original byte and owners."""
    address: int
    original: int
    mem: object                         # the region's mapping, written in place
    offset: int
    owners: list[Breakpoint] = field(default_factory=list)
    stepping: int = 0                   # steps over the original byte under way


class BreakpointTable:
    """The int3 breakpoints of one VM, over its guest memory, the vCPU contexts (for
    their step service) and the hook registry (for the #BP handler)."""

    def __init__(self, memory: GuestMemory, contexts: Sequence["VcpuContext"],
                 hooks: "HookRegistry") -> None:
        self._memory = memory
        self._contexts = contexts
        self._hooks = hooks
        self._sites: dict[int, _Site] = {}
        self._mirrors: list[Mirror] = []
        self._handle: "Handle | None" = None
        self._fetches: dict[tuple[int, int], int] = {}     # (cr3, linear page) -> gpa of the page
        self._sregs: dict[int, tuple["Vcpu", KvmSregs]] = {}  # vCPU index -> a view of its sregs

    # -- owners ---------------------------------------------------------------------------
    def add(self, address: int, callback: Callback | None = None, *, one_shot: bool = False) -> Breakpoint:
        """Plant a breakpoint at guest-physical `address` for a new owner (see `Breakpoint`)."""
        site = self._sites.get(address)
        if site is None:
            region = self._memory.region_at(address)
            if region is None:
                raise BreakpointError(f"breakpoint at {address:#x}: not guest RAM")
            offset = address - region.gpa
            site = _Site(address, region.mem[offset], region.mem, offset)
            self._sites[address] = site
            self._plant(site)
        breakpoint = Breakpoint(address, callback, one_shot)
        site.owners.append(breakpoint)
        if self._handle is None:
            self._handle = self._hooks.add("exit", self._on_breakpoint, reason=ExitReason.EXCEPTION_OR_NMI,
                                           vector=int(Vector.BP))
        return breakpoint

    def remove(self, breakpoint: Breakpoint) -> None:
        """Drop an owner's breakpoint; the original byte goes back when it was the last one."""
        if not breakpoint.active:
            return
        breakpoint.active = False
        site = self._sites.get(breakpoint.address)
        if site is None or breakpoint not in site.owners:
            return
        site.owners.remove(breakpoint)
        if not site.owners:
            self._unplant(site)

    def breakpoints(self, address: int | None = None) -> list[Breakpoint]:
        """The active breakpoints (at `address`), in the order they were added there."""
        if address is not None:
            site = self._sites.get(address)
            return list(site.owners) if site is not None else []
        return [b for site in self._sites.values() for b in site.owners]

    def __contains__(self, address: int) -> bool:
        return address in self._sites

    def __len__(self) -> int:
        return len(self._sites)

    # -- memory -----------------------------------------------------------------------------
    def add_mirror(self, write: Mirror) -> None:
        """Have `write(gpa, data)` keep another copy of guest memory in step with the planted
        breakpoints (it gets every breakpoint planted now, then each change for good)."""
        self._mirrors.append(write)
        for site in self._sites.values():
            write(site.address, _INT3_BYTE)

    def remove_mirror(self, write: Mirror) -> None:
        if write in self._mirrors:
            self._mirrors.remove(write)

    def planted(self, address: int) -> bool:
        """Whether guest memory holds one of the table's int3s at `address` now."""
        site = self._sites.get(address)
        return site is not None and site.mem[site.offset] == INT3 and not site.stepping

    def original(self, address: int) -> int | None:
        """The byte a breakpoint replaced at `address` (None: no breakpoint there)."""
        site = self._sites.get(address)
        return None if site is None else site.original

    def unpatched(self, address: int, data: bytes) -> bytes:
        """`data` read from guest memory at `address`, with the table's int3s replaced by the
        original bytes."""
        if not self._sites:
            return data
        out = bytearray(data)
        for i in range(len(out)):
            site = self._sites.get(address + i)
            if site is not None:
                out[i] = site.original
        return bytes(out)

    def _plant(self, site: _Site) -> None:
        if not site.stepping:
            site.mem[site.offset] = INT3
        for write in self._mirrors:
            write(site.address, _INT3_BYTE)

    def _unplant(self, site: _Site) -> None:
        del self._sites[site.address]
        site.mem[site.offset] = site.original
        for write in self._mirrors:
            write(site.address, _BYTES[site.original])
        if not self._sites:
            self._fetches.clear()
            if self._handle is not None:
                self._hooks.remove(self._handle)
                self._handle = None

    # -- the #BP exit -------------------------------------------------------------------------
    def _walk(self, vcpu: "Vcpu", linear: int, cr0: int, cr3: int, cr4: int, efer: int) -> int | None:
        """The guest-physical address of `linear` by a walk of the guest's page tables
        (`minivmm.pagewalk`); the page's translation is kept (like a TLB entry) when it holds
        a breakpoint."""
        from .pagewalk import PageFault, translate
        try:
            gpa = translate(self._memory, cr0, cr3, cr4, efer, linear, "x", user=vcpu.cpl == 3).gpa
        except (PageFault, ValueError):
            return None
        if gpa in self._sites:
            if len(self._fetches) >= _CACHE_LIMIT:
                self._fetches.clear()
            self._fetches[(cr3, linear >> _PAGE_SHIFT)] = gpa & ~_PAGE_MASK
        return gpa

    def _on_breakpoint(self, vcpu: "Vcpu", info: ExitInfo) -> Action | None:
        """The #BP exit: find the int3's guest-physical address (the linear address without
        paging; with paging the page translation of an earlier hit while memory there holds
        one of the table's int3s, else a page walk), run its owners and pick the action."""
        seen = self._sregs.get(vcpu.index)
        if seen is None or seen[0] is not vcpu:
            seen = self._sregs[vcpu.index] = (vcpu, KvmSregs.from_address(vcpu.sregs_address))
        sregs = seen[1]             # the vCPU's register cache, read in place (no copy)
        cs = sregs.cs
        rip = vcpu.rip
        linear = rip if sregs.efer & _EFER_LMA and cs.l else (cs.base + rip) & 0xFFFFFFFF
        sites = self._sites
        if sregs.cr0 & _CR0_PG:
            page = self._fetches.get((sregs.cr3, linear >> _PAGE_SHIFT))
            gpa = None if page is None else page | linear & _PAGE_MASK
            site = sites.get(gpa)
            if site is None or site.mem[site.offset] != INT3:
                gpa = self._walk(vcpu, linear, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)
                site = sites.get(gpa)
        else:
            gpa = linear
            site = sites.get(gpa)
        if site is None or site.stepping:
            return None             # the guest's own int3 (also one that a breakpoint replaced)
        info.guest_physical_address, info.guest_linear_address = gpa, linear
        owners = site.owners
        action = None
        if len(owners) == 1 and owners[0].one_shot:             # a coverage block, typically
            breakpoint = owners.pop()
            breakpoint.hits += 1
            breakpoint.active = False
            self._unplant(site)
            if breakpoint.callback is not None:
                action = breakpoint.callback(vcpu, info)
            return RETRY if action is None else action
        for breakpoint in tuple(owners):
            breakpoint.hits += 1
            if breakpoint.one_shot:
                breakpoint.active = False
                owners.remove(breakpoint)
            if breakpoint.callback is not None:
                result = breakpoint.callback(vcpu, info)
                if result is not None and action is None:
                    action = result
        if not owners:
            if sites.get(gpa) is site:
                self._unplant(site)
        elif action is None:
            self._step_over(vcpu, site)
        return RETRY if action is None else action

    def _step_over(self, vcpu: "Vcpu", site: _Site) -> None:
        """Execute the original instruction once, then plant the int3 again."""
        site.mem[site.offset] = site.original
        site.stepping += 1

        def replant(_vcpu: "Vcpu") -> None:
            site.stepping -= 1
            if not site.stepping and self._sites.get(site.address) is site:
                site.mem[site.offset] = INT3

        for ctx in self._contexts:
            if ctx.index == vcpu.index:
                ctx.step_once(replant)
                return
        raise RuntimeError(f"breakpoint at {site.address:#x}: no context for vCPU {vcpu.index}")
