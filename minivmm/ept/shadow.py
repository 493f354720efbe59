"""EptShadow: the EPT of one `Machine`, its violations, hooks and dirty tracking.

`EptShadow.eptp` is the EPT pointer a VMCS would hold (SDM 25.6.11: memory
type WB, walk length - 1 in bits 5:3, A/D enable in bit 6).

A forbidden access becomes a VMX EPT violation (basic exit reason 48) with
the SDM exit qualification (27.2.1), dispatched to `machine.on(
ExitReason.EPT_VIOLATION, handler, address=...)` handlers; `EptShadow.access`
and `info.data` describe it, `complete_read` / `complete_write` / `allow_once`
finish it, and with no handler the run stops with reason "error". Hooks
(`monitor`, `hook_execute`) are built from the same permissions. Changes are
batched and reach KVM at `invept()` or before the next entry; only the
memslots holding changed pages are replaced (one or two ioctls per toggle).

What KVM shows on the project's pagetable-based nested host (kvm-host-notes.md):
- A data write that hits a read-only slot or a hole exits *after* KVM emulated
  the instruction (RIP is already past it); a read exits before (RIP at it).
  KVM splits an access crossing a page boundary into one MMIO exit per page;
  monitors join them by completing the first with immediate_exit and looking
  at the next exit.
- KVM_GUESTDBG_SINGLESTEP does not stop CPL-3 code under the built-in kernel:
  one-instruction steps there use RFLAGS.TF and the kernel's #DB stub.

The model's accessed/dirty bits are set only for accesses minivmm emulates
(KVM does not report the others).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from ..actions import Action, Stop
from ..breakpoints import Breakpoint, BreakpointTable
from ..exits import ExitInfo, ExitReason
from ..kvm import ExitKind, InternalErrorExit, MmioExit, decode_exit
from ..memory import PAGE_SHIFT, Region
from .dirty import DirtyLog
from .hooks import EptAccess, Hook, HookEvent, HookTable, report_execute
from .mmio import MmioBus, MmioDevice
from .realise import Memslots, _Kind, _kind, host_backend
from ..translate import EptStep, Translation
from .tables import EptError, EptPointerFlag, EptTables, EptWalk, Perm, parse_perms

if TYPE_CHECKING:
    from ..hooks import Handle, HookRegistry
    from ..runloop import VcpuContext
    from ..vcpu import Vcpu
    from ..vm import Vm

__all__ = ["EptShadow"]


_HANDLED: tuple[None, None] = (None, None)
_QUAL_GLA_VALID = 1 << 7
_R, _W, _X, _RWX = 1, 2, 4, 7
_AD = 0x300                  # EPT accessed | dirty
_COMPACT_PAGES = 4096        # larger changes re-cut the whole region


# --- the shadow -----------------------------------------------------------------------
class EptShadow:
    """EPT permissions, violations, hooks and dirty tracking for one VM, on every vCPU.

    Changes through `protect`, hooks and `remove` are batched: they reach KVM at
    `invept()` or automatically before the next VM entry (a PRE_ENTRY hook on
    every vCPU, there only while it has work), like an INVEPT after editing EPT
    entries. A violation belongs to the vCPU that caused it: `access`,
    `complete_read`, `complete_write` and `allow_once` act on the violation of
    the vCPU whose handler calls them.
    """

    def __init__(self, vm: "Vm", contexts: Sequence["VcpuContext"], hooks: "HookRegistry", *,
                 breakpoints: BreakpointTable | None = None, ad: bool = True,
                 backend: str | None = None) -> None:
        self._memory = vm.memory
        self._contexts = contexts
        self._hooks = hooks
        self._breakpoints = breakpoints if breakpoints is not None else \
            BreakpointTable(vm.memory, contexts, hooks)
        self.tables = EptTables()
        self.ad = ad
        backend = backend or host_backend()
        if backend not in ("memslot", "mprotect"):
            raise EptError(f"unknown EPT backend {backend!r}: expected 'memslot' or 'mprotect'")
        self._last_region: tuple[int, int, Region | None] = (0, 0, None)
        self._base: dict[int, int] = {}          # page -> rights from protect() (absent: rwx)
        self._mask: dict[int, int] = {}          # page -> rights taken away by hooks
        self._override: dict[int, int] = {}      # page -> rights for one stepped instruction
        self._pending: dict[Region, set[int] | None] = {}    # region -> changed pages (None: all)
        self._dirty = DirtyLog(vm.fd)
        self._memslots = Memslots(vm.fd, vm.slots, self.tables, self._dirty, backend)
        self._hook_table = HookTable()
        self._visible: dict[Hook, Breakpoint] = {}                      # int3 hooks -> their breakpoint
        self._mmio = MmioBus()
        self._accesses: dict[int, EptAccess] = {}                        # vCPU -> its violation
        self._open_reads: dict[int, tuple[EptAccess, MmioExit]] = {}     # vCPU -> read to finish
        self._handling = threading.local()                              # the vCPU of this thread
        self._refetched: dict[int, tuple[int, int]] = {}                # vCPU -> (rip, toggles)
        self._views: dict[int, _EptQuery] = {}
        self.violations = 0
        self.emulations = 0
        self._pre_entry: "Handle | None" = None
        self._pre_entry_active = False
        self._sync_regions()
        vm.dispatcher.set_default(ExitReason.EPT_VIOLATION, self._default_violation)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the host views made for the mprotect backend (the machine's memory stays)."""
        self._memslots.close()

    @property
    def backend(self) -> str:
        """How r-x pages are realised: "memslot" (read-only memslots) or "mprotect" (host protection)."""
        return self._memslots.backend

    @property
    def toggles(self) -> int:
        """Memslot ioctls and mprotect calls made so far."""
        return self._memslots.toggles

    @toggles.setter
    def toggles(self, value: int) -> None:
        self._memslots.toggles = value

    # -- EPT pointer and model --------------------------------------------------------------
    @property
    def eptp(self) -> int:
        """The EPT pointer (SDM 25.6.11): PML4 address | WB | walk length 4 | A/D enable."""
        return int(self.tables.root | EptPointerFlag.MEMORY_TYPE_WB | EptPointerFlag.WALK_LENGTH_4
                   | (EptPointerFlag.ACCESSED_DIRTY if self.ad else 0))

    def walk(self, gpa: int) -> EptWalk:
        """Walk the EPT model for `gpa`."""
        self._sync_regions()
        return self.tables.walk(gpa)

    def perms(self, gpa: int) -> Perm:
        """The effective EPT rights of the page holding `gpa` (hooks included)."""
        self._sync_regions()
        return Perm(self.tables.perms(gpa))

    # -- regions and memslots -------------------------------------------------------------
    def _sync_regions(self) -> None:
        self._memslots.sync()

    def _region(self, gpa: int) -> Region | None:
        """The managed RAM region holding `gpa` (the last one found is checked first)."""
        low, high, region = self._last_region
        if low <= gpa < high:
            return region
        region = self._memory.region_at(gpa)
        if region is not None and region in self._memslots.regions:
            self._last_region = (region.gpa, region.gpa + region.size, region)
            return region
        return None

    def before_next_entry(self) -> None:
        """Have the pre-entry work (batched changes, an open read, TF for a step, new
        memory regions) done before the next VM entry; the hook leaves when it is idle,
        so that an idle EPT costs the exit loop nothing."""
        if not self._pre_entry_active:
            if self._pre_entry is None:
                self._pre_entry = self._hooks.add("pre_entry", self._before_entry)
            else:
                self._hooks.resume(self._pre_entry)
            self._pre_entry_active = True

    def _before_entry(self, vcpu: "Vcpu", info: ExitInfo) -> None:
        if vcpu.index in self._open_reads:
            self._finish_read(vcpu, info)
        self._sync_regions()
        if self._pending:
            self.invept()
        if not self._open_reads and not self._pending and self._pre_entry_active:
            self._hooks.pause(self._pre_entry)          # an idle EPT costs the exit loop nothing
            self._pre_entry_active = False

    def invept(self) -> None:
        """Make every batched permission change visible to the guest now (INVEPT, SDM 30.3)."""
        self._sync_regions()
        pending, self._pending = self._pending, {}
        for region, pages in pending.items():
            self._memslots.realise(region, pages)

    # -- permissions ----------------------------------------------------------------------
    def _pages(self, gpa: int, size: int) -> range:
        if size <= 0:
            raise EptError(f"size {size:#x} must be positive")
        self._sync_regions()
        first, last = gpa >> PAGE_SHIFT, (gpa + size - 1) >> PAGE_SHIFT
        for page in (first, last):
            if self._region(page << PAGE_SHIFT) is None:
                raise EptError(f"[{gpa:#x}, {gpa + size:#x}) is not guest RAM "
                               f"(page {page << PAGE_SHIFT:#x} is not mapped)")
        pages = range(first, last + 1)
        end = gpa + size
        while True:                             # walk region by region: no gap may be left
            region = self._region(gpa)
            if region is None:
                raise EptError(f"[{gpa:#x}, {end:#x}) has a gap at {gpa & ~0xFFF:#x} that is not guest RAM")
            if region.gpa + region.size >= end:
                return pages
            gpa = region.gpa + region.size

    def protect(self, gpa: int, size: int, perms: str | int) -> None:
        """Set the EPT rights of every page touching [gpa, gpa+size) to `perms` ("r-x", "---", ...).

        Takes effect at `invept()` or before the next VM entry. Pages the
        processor itself reads during the walk or event delivery (the guest's
        page tables, GDT, IDT, TSS: minivmm's system area below 0x10000) are
        accessed by KVM, not emulated here: taking R from them leaves the guest
        unable to run, as on hardware without EPT paging-structure handling.
        """
        rights = int(parse_perms(perms))
        pages = self._pages(gpa, size)
        for page in pages:
            if rights == 7:
                self._base.pop(page, None)
            else:
                self._base[page] = rights
        self._refresh(pages)

    def unprotect(self, gpa: int, size: int) -> None:
        """Give [gpa, gpa+size) back full rights (rwx)."""
        self.protect(gpa, size, _RWX)

    def base_perms(self, gpa: int) -> Perm:
        """The rights `protect` gave the page of `gpa`, before hooks take any away."""
        return Perm(self._base.get(gpa >> PAGE_SHIFT, 7))

    def _effective(self, page: int) -> int:
        override = self._override.get(page)
        if override is not None:
            return override
        rights = self._base.get(page, 7) & ~self._mask.get(page, 0)
        if rights & _W and not rights & _R:
            rights &= ~_W       # -w- / -wx are misconfigurations: writes exit too
        return rights

    def _refresh(self, pages: Iterable[int]) -> None:
        """Write the effective rights of `pages` into the model, batching runs."""
        run_start = run_end = -1
        run_rights = -1
        for page in pages:
            rights = self._effective(page)
            if rights == run_rights and page == run_end:
                run_end += 1
                continue
            if run_start >= 0:
                self.tables.set_perms(run_start << PAGE_SHIFT, (run_end - run_start) << PAGE_SHIFT, run_rights)
            run_start, run_end, run_rights = page, page + 1, rights
        if run_start >= 0:
            self.tables.set_perms(run_start << PAGE_SHIFT, (run_end - run_start) << PAGE_SHIFT, run_rights)
        self._mark(pages)

    def _mark(self, pages: Iterable[int]) -> None:
        """Queue `pages` for realisation at the next invept()."""
        self.before_next_entry()
        pending = self._pending
        if isinstance(pages, range) and len(pages) > _COMPACT_PAGES:
            low, high = pages.start << PAGE_SHIFT, pages.stop << PAGE_SHIFT
            for region in self._memslots.regions:
                if region.gpa < high and low < region.end:
                    pending[region] = None
            return
        for page in pages:
            region = self._region(page << PAGE_SHIFT)
            if region is None:
                continue
            if region in pending:
                queued = pending[region]
                if queued is not None:
                    queued.add(page)
            else:
                pending[region] = {page}

    # -- dirty tracking -------------------------------------------------------------------
    @property
    def dirty_logging(self) -> bool:
        return self._dirty.enabled

    def enable_dirty_logging(self) -> None:
        """Start KVM dirty logging on all guest RAM (KVM_MEM_LOG_DIRTY_PAGES, api.rst 4.35).

        Enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 first where the host has it, so
        that reading the log and re-protecting pages are separate steps
        (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG, api.rst 4.118).
        """
        self._sync_regions()
        if self._dirty.enabled:
            return
        self._dirty.enable()
        for region in self._memslots.regions:
            self._memslots.set_logging(region, True)

    def disable_dirty_logging(self) -> None:
        """Stop dirty logging; pending dirty pages are dropped."""
        if not self._dirty.enabled:
            return
        self._dirty.disable()
        for region in self._memslots.regions:
            self._memslots.set_logging(region, False)

    def dirty_pages(self, clear: bool = True) -> list[int]:
        """Page-aligned GPAs the guest wrote since the last clear, sorted.

        Includes writes KVM logged in any memslot (also slots deleted since by
        `protect`) and writes minivmm emulated into protected pages. With
        `clear` the log restarts (re-protecting the pages in KVM).
        """
        self._dirty.require_enabled()
        self._sync_regions()
        return self._dirty.pages((slot for slots in self._memslots.regions.values() for slot in slots), clear)

    def restore_dirty_pages(self, copy_address: int) -> int | None:
        """Copy every page the guest dirtied back from a full copy of guest RAM at
        `copy_address` (host address of GPA 0) and restart the log, in C: the
        memory part of a snapshot restore. None where it does not apply (the C
        code is not built, more than one region or memslot, pages minivmm
        emulated writes into); then use `dirty_pages` instead.
        """
        if not self._dirty.restorable:
            return None
        self._sync_regions()
        return self._dirty.restore(self._memslots.regions, copy_address)

    def restore_plan(self, copy_address: int) -> tuple[int, int, int, int, int, int] | None:
        """What `restore_dirty_pages(copy_address)` would hand the C code, for callers that
        restore in a C call of their own (`fastpath.FuzzCycle`): (vm fd, slot, dirty bitmap
        address, pages, guest host address, copy host address), or None where that restore
        does not apply."""
        if not self._dirty.restorable:
            return None
        self._sync_regions()
        return self._dirty.restore_plan(self._memslots.regions, copy_address)

    def _note_write(self, gpa: int, size: int) -> None:
        self._dirty.note_write(gpa, size)
        if self.ad:
            self.tables.mark(gpa, _AD)

    @property
    def access(self) -> EptAccess | None:
        """The violation being handled on this thread's vCPU (vCPU 0's elsewhere)."""
        return self._accesses.get(getattr(self._handling, "index", 0))

    # -- carrying out what the translator classified ----------------------------------------
    def view(self, index: int) -> "_EptQuery":
        """The read-only view the translator classifies vCPU `index`'s exits against."""
        view = self._views.get(index)
        if view is None:
            view = self._views[index] = _EptQuery(self, index)
        return view

    def carry_out(self, ctx: "VcpuContext", translation: Translation,
                  exit: MmioExit | InternalErrorExit) -> tuple[ExitInfo | None, int | None] | Stop | None:
        """Do what `translation.ept` says for `ctx`'s exit: None to dispatch the translation's
        exit, (None, None) when the exit was completed here, (info, key) for the exit that
        followed it (a monitored access completed without entering the guest), or the Stop
        a hook callback returned."""
        self._handling.index = ctx.index
        step = translation.ept
        vcpu = ctx.vcpu
        if step is EptStep.DEVICE:
            data = self._mmio.access(self._mmio.lookup(exit.phys_addr), exit)
            if data is not None:
                vcpu.fd.set_mmio_data(data)
            return _HANDLED
        if step is EptStep.EMULATE:
            self._emulate(ctx, exit)
            return _HANDLED
        if step is EptStep.MONITOR:
            return self._monitored(ctx, exit)
        if step is EptStep.REFETCH:
            self._refetched[ctx.index] = (vcpu.rip, self.toggles)
            return _HANDLED
        info = ctx.info
        if step is EptStep.VIOLATION:
            gla = info.guest_linear_address if info.qualification & _QUAL_GLA_VALID else None
            access = self._accesses[ctx.index] = EptAccess(exit.phys_addr, gla, exit.length, exit.is_write,
                                                           False, exit.data if exit.is_write else b"", vcpu.rip)
            self.violations += 1
            if not exit.is_write:
                vcpu.fd.set_mmio_data(bytes(8))     # what the guest reads unless a handler completes it
                self._open_reads[ctx.index] = (access, exit)
                self.before_next_entry()
            return None
        gpa = translation.key
        stop = self._hook_table.execute_hidden(gpa, vcpu)
        if stop is not None:
            return stop                             # the run ends before the instruction
        if step is EptStep.STEP_THROUGH:
            self._step_through(ctx, gpa >> PAGE_SHIFT)
            return _HANDLED
        self._accesses[ctx.index] = EptAccess(gpa, info.guest_linear_address, 1, False, True, b"", vcpu.rip)
        self.violations += 1
        return None

    def _finish_read(self, vcpu: "Vcpu", info: ExitInfo) -> None:
        """Before the next entry: a read violation no handler completed reads `info.data`."""
        access, exit = self._open_reads.pop(vcpu.index)
        if access.completed or info.raw_kvm_exit is not exit:
            return
        size = access.size
        data = (info.data & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        vcpu.fd.set_mmio_data(data)
        access.data = data

    def _step_through(self, ctx: "VcpuContext", page: int) -> None:
        """Execute one instruction with the page executable (and readable), then take the rights back.

        HyperDbg's pattern: restore the EPT entry, single-step (MTF), re-protect.
        """
        base = self._base.get(page, 7)
        self._override[page] = base | _R | _X
        self._refresh((page,))

        def restore(vcpu) -> None:
            self._override.pop(page, None)
            self._refresh((page,))

        ctx.step_once(restore)

    def _emulate(self, ctx: "VcpuContext", exit: MmioExit) -> bytes:
        """Carry out a data access KVM could not, against the backing RAM; returns the bytes moved."""
        self.emulations += 1
        gpa, length = exit.phys_addr, exit.length
        region = self._region(gpa)
        offset = gpa - region.gpa if region is not None else 0
        inside = region is not None and offset + length <= region.size
        if exit.is_write:
            data = exit.data
            if inside:
                region.mem[offset: offset + length] = data
            else:
                self._memory.write(gpa, data)
            self._note_write(gpa, length)
        else:
            data = region.mem[offset: offset + length] if inside else self._memory.read(gpa, length)
            ctx.vcpu.fd.set_mmio_data(data)
            if self.ad:
                self.tables.mark(gpa, 0x100)
        return data

    def _monitored(self, ctx: "VcpuContext", exit: MmioExit) -> tuple[ExitInfo | None, int | None] | None:
        """Emulate a monitored access (joining the fragments KVM splits it into), then report it."""
        vcpu = ctx.vcpu
        rip = vcpu.rip
        start, data, is_write = exit.phys_addr, bytearray(), exit.is_write
        current = exit
        leftover: int | None = None
        while True:
            data += self._emulate(ctx, current)
            end = current.phys_addr + current.length
            if end & 0xFFF and current.length != 8:
                break
            # the access may go on in another fragment (the next page, or the next 8 bytes):
            # complete this one without entering the guest and look at what KVM reports next
            kind = ctx.complete_without_entry()
            if kind != ExitKind.MMIO:
                leftover = None if kind == ExitKind.INTR else kind
                break
            nxt = decode_exit(vcpu.fd.run)
            page = nxt.phys_addr >> PAGE_SHIFT
            contiguous = nxt.phys_addr == end or (not end & 0xFFF and not nxt.phys_addr & 0xFFF)
            if (vcpu.rip != rip or nxt.is_write != is_write or not contiguous
                    or self._region(nxt.phys_addr) is None or self.tables.perms(nxt.phys_addr) & (
                        _W if is_write else _R)
                    or page not in self._hook_table.monitors
                    or not self._base.get(page, 7) & (_W if is_write else _R)):
                stop = self._hook_table.report(start, bytes(data), is_write, rip, vcpu)
                return stop or ctx.translate_exit(ExitKind.MMIO, vcpu.fd.run)
            current = nxt
        stop = self._hook_table.report(start, bytes(data), is_write, rip, vcpu)
        if stop is not None:
            return stop
        if leftover is not None:
            return ctx.translate_exit(leftover, vcpu.fd.run)
        return _HANDLED

    # -- completing a violation from a handler --------------------------------------------------
    def _current(self, what: str) -> tuple[EptAccess, "VcpuContext"]:
        ctx = self._contexts[getattr(self._handling, "index", 0)]
        access = self._accesses.get(ctx.index)
        if access is None or ctx.info.reason != ExitReason.EPT_VIOLATION:
            raise RuntimeError(f"{what}: the last exit is not an EPT violation")
        return access, ctx

    def complete_read(self, data: bytes | int) -> None:
        """Give the guest `data` as the result of the read that caused the current violation."""
        access, ctx = self._current("complete_read")
        if access.is_write or access.is_fetch:
            raise RuntimeError("complete_read: the current EPT violation is not a data read")
        if isinstance(data, int):
            data = (data & ((1 << (8 * access.size)) - 1)).to_bytes(access.size, "little")
        if len(data) != access.size:
            raise ValueError(f"complete_read: the guest reads {access.size} bytes, got {len(data)}")
        ctx.vcpu.fd.set_mmio_data(bytes(data))
        access.data, access.completed = bytes(data), True
        ctx.info.data = int.from_bytes(data, "little")

    def complete_write(self, data: bytes | int | None = None) -> None:
        """Apply the guest's write to RAM for the current violation.

        The value written is `data` if given, else `info.data` (the guest's
        value unless a handler changed it).
        """
        access, ctx = self._current("complete_write")
        if not access.is_write:
            raise RuntimeError("complete_write: the current EPT violation is not a write")
        if data is None:
            data = ctx.info.data
        if isinstance(data, int):
            data = (data & ((1 << (8 * access.size)) - 1)).to_bytes(access.size, "little")
        self._memory.write(access.gpa, data)
        self._note_write(access.gpa, len(data))
        access.completed = True

    def allow_once(self) -> None:
        """Let the access behind the current violation through once (`AllowOnce`).

        A data access is performed on RAM as if the page allowed it (a write stores the
        guest's own value); an instruction fetch executes one instruction with the page
        executable (restore rights, single-step, re-protect)."""
        access, ctx = self._current("allow_once")
        if access.is_fetch:
            self._step_through(ctx, access.gpa >> PAGE_SHIFT)
        elif access.is_write:
            self.complete_write(access.data)
        else:
            self.complete_read(self._memory.read(access.gpa, access.size))

    def emulate(self) -> None:
        """Carry out the data access behind the current violation on RAM (`Emulate`): a write
        stores `info.data` (the guest's value unless a handler changed it)."""
        access, _ = self._current("emulate")
        if access.is_fetch:
            raise RuntimeError("emulate: an instruction fetch cannot be emulated; use AllowOnce")
        if access.is_write:
            self.complete_write()
        else:
            self.complete_read(self._memory.read(access.gpa, access.size))

    def _default_violation(self, vcpu, info: ExitInfo) -> Action:
        access = self._accesses.get(vcpu.index)
        what = str(info.ept)
        text = f"EPT violation: {what} at gpa {info.guest_physical_address:#x}"
        if access is not None and access.gla is not None:
            text += f" (gla {access.gla:#x})"
        if access is not None and access.is_write:
            text += f", {access.size}-byte write of {access.value:#x}"
        elif access is not None and not access.is_fetch:
            text += f", {access.size}-byte read"
        text += (f" at rip={vcpu.rip:#x}; no handler completed it (register one with "
                 "machine.on(ExitReason.EPT_VIOLATION, handler, address=...))")
        return Stop("error", message=text)

    # -- hooks ----------------------------------------------------------------------------------
    def _update_masks(self, pages: Iterable[int]) -> None:
        pages = list(pages)
        for page in pages:
            mask = self._hook_table.mask(page)
            if mask:
                self._mask[page] = mask
            else:
                self._mask.pop(page, None)
        self._refresh(pages)

    def monitor(self, start: int, end: int, access: str, callback: Callable[[HookEvent], object]) -> Hook:
        """Report guest reads and/or writes of the bytes [start, end) (guest-physical).

        `access` is "r", "w" or "rw". `callback(event)` runs once per guest
        access (an access KVM splits at a page boundary is joined first); the
        access is then completed on RAM and the guest goes on. The pages lose
        the monitored rights in the EPT (writes: W; reads: R and W).

        KVM reports only the part of an access that falls into a page without
        the right: an access that starts in an unmonitored page and crosses
        into a monitored one is reported from the page boundary on.
        """
        if not isinstance(access, str) or access not in ("r", "w", "rw", "wr"):
            raise EptError(f"bad monitor access {access!r}: expected 'r', 'w' or 'rw'")
        if end <= start:
            raise EptError(f"empty monitor range [{start:#x}, {end:#x})")
        self._pages(start, end - start)
        rights = 0
        for c in access:
            rights |= _R if c == "r" else _W
        hook = Hook("monitor", start, end, Perm(rights), callback)
        self._hook_table.add_monitor(hook)
        self._update_masks(hook.pages)
        return hook

    def hook_execute(self, address: int, callback: Callable[[HookEvent], object], *,
                     hidden: bool = True, size: int = 1) -> Hook:
        """Run `callback(event)` each time the guest executes the instruction at `address` (GPA).

        hidden=True: the page loses X in the EPT, guest reads still see the
        original bytes; the callback runs before the instruction, which then
        executes once with X restored (single step) before X is taken away
        again. `size` > 1 hooks every instruction that starts in
        [address, address + size). hidden=False: a persistent breakpoint of
        the machine's `BreakpointTable` (an int3 replaces the first byte; on
        the breakpoint the callback runs, the byte is restored for one step and
        the int3 put back).
        """
        self._pages(address, size)
        hook = Hook("execute", address, address + size, Perm.X, callback, hidden)
        if hidden:
            self._hook_table.add_hidden(hook)
            self._update_masks(hook.pages)
            return hook
        if size != 1:
            raise EptError("a visible execute hook is one int3: size must be 1")
        self._visible[hook] = self._breakpoints.add(
            address, lambda vcpu, info: report_execute([hook], info.guest_physical_address, vcpu))
        return hook

    def remove(self, hook: Hook) -> None:
        """Remove a hook and give its pages their rights (or original byte) back."""
        if not hook.active:
            return
        hook.active = False
        if hook.kind == "monitor":
            self._hook_table.discard_monitor(hook)
            self._update_masks(hook.pages)
        elif hook.hidden:
            self._hook_table.discard_hidden(hook)
            self._update_masks(hook.pages)
        else:
            self._breakpoints.remove(self._visible.pop(hook))

    @property
    def hooks(self) -> list[Hook]:
        """Every active hook."""
        return self._hook_table.all() + list(self._visible)

    # -- MMIO devices ---------------------------------------------------------------------------
    def add_mmio_device(self, start: int, size: int, read_cb: Callable[[int, int], int] | None,
                        write_cb: Callable[[int, int, int], object] | None, *, name: str = "mmio") -> MmioDevice:
        """Claim [start, start+size) of guest-physical space that is not RAM.

        `read_cb(offset, size) -> int` answers guest reads (None: reads give
        all ones); `write_cb(offset, size, value)` receives writes (None:
        dropped). Offsets are from `start`.
        """
        return self._mmio.add(start, size, read_cb, write_cb, name, self._memory.regions)

    def remove_mmio_device(self, device: MmioDevice) -> None:
        self._mmio.remove(device)


class _EptQuery:
    """`translate.EptView` over an EptShadow, for one vCPU: queries only."""

    __slots__ = ("_shadow", "_index")

    def __init__(self, shadow: EptShadow, index: int) -> None:
        self._shadow, self._index = shadow, index

    def managed(self, gpa: int) -> bool:
        return self._shadow._region(gpa) is not None

    def has_device(self, gpa: int) -> bool:
        return self._shadow._mmio.lookup(gpa) is not None

    def rights(self, gpa: int) -> int:
        return self._shadow.tables.perms(gpa)

    def base_rights(self, gpa: int) -> int:
        return self._shadow._base.get(gpa >> PAGE_SHIFT, _RWX)

    def monitored(self, gpa: int) -> bool:
        return gpa >> PAGE_SHIFT in self._shadow._hook_table.monitors

    def mapped_for_fetch(self, gpa: int) -> bool:
        shadow = self._shadow
        return _kind(shadow.tables.perms(gpa)) != _Kind.HOLE and gpa >> PAGE_SHIFT not in shadow._override

    def planted(self, gpa: int) -> bool:
        return self._shadow._breakpoints.planted(gpa)

    def refetch_due(self, rip: int) -> bool:
        shadow = self._shadow
        return shadow._refetched.get(self._index) != (rip, shadow.toggles)
