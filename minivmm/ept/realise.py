"""How the EPT model's rights are realised on KVM, and which host protection this host honours.

KVM owns the real second-level page tables, so each page's effective
permissions are realised with what KVM offers to user space
(Documentation/virt/kvm/api.rst 4.35 KVM_SET_USER_MEMORY_REGION):

| EPT permissions | realised as                                                  |
|-----------------|--------------------------------------------------------------|
| rwx             | an ordinary memslot                                          |
| r-x             | a KVM_MEM_READONLY memslot (writes exit as KVM_EXIT_MMIO), or|
|                 | host page protection (mprotect PROT_READ) where a probe shows |
|                 | that this host turns such writes into KVM_EXIT_MMIO          |
| anything else   | a hole in the memslots: data accesses exit as KVM_EXIT_MMIO  |
|                 | and are emulated here from the backing memory when the       |
|                 | permissions allow them; an instruction fetch is an emulation |
|                 | failure at RIP = the target (an execute violation)           |

A CPL-3 store to a PROT_READ host page fails KVM_RUN with EFAULT on the
project's pagetable-based nested host (kvm-host-notes.md), while a CPL-0
store (emulated there) exits as MMIO: `host_backend()` probes both and uses
host protection only when both exit as MMIO.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from ..kvm import MemoryFlag
from ..memory import PAGE_SHIFT, PAGE_SIZE, Region, SlotTable
from .dirty import DirtyLog
from .tables import EptTables, _extend

if TYPE_CHECKING:
    from ..kvm import VmFd

__all__ = ["Memslots", "host_backend", "host_protection_works"]


class _Kind(IntEnum):
    NORMAL = 0          # ordinary memslot
    READONLY = 1        # KVM_MEM_READONLY slot or mprotect(PROT_READ)
    HOLE = 2            # no memslot


_KIND_OF = tuple(_Kind.NORMAL if p == 7 else _Kind.READONLY if p == 5 else _Kind.HOLE for p in range(8))
_KIND_OF_MPROTECT = tuple(_Kind.NORMAL if k == _Kind.READONLY else k for k in _KIND_OF)
_NORMAL_KIND, _READONLY_KIND, _HOLE_KIND = _Kind.NORMAL, _Kind.READONLY, _Kind.HOLE
_MEM_LOG, _MEM_READONLY = int(MemoryFlag.LOG_DIRTY_PAGES), int(MemoryFlag.READONLY)
_R, _X, _RWX = 1, 4, 7
_COMPACT_LIMIT = 64          # memslots per region before neighbours of one kind are merged


def _kind(perms: int) -> _Kind:
    """How KVM must see a page with these EPT rights (see the module table)."""
    return _KIND_OF[perms]


@dataclass(eq=False)
class _Slot:
    slot: int
    gpa: int
    size: int
    flags: int
    bitmap: ctypes.Array | None = None


# --- host page protection: probed once per process -------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_MAP_FIXED = 0x10
_backend_cache: dict[str, str] = {}


def _mprotect(addr: int, size: int, prot: int) -> None:
    if _libc.mprotect(addr, size, prot) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mprotect({addr:#x}, {size:#x}, {prot}) failed: {os.strerror(err)}")


def host_backend(kvm_path: str = "/dev/kvm") -> str:
    """How this host realises write protection: "mprotect" or "memslot" (probed once per process).

    The probe makes a tiny machine in user mode (native CPL 3 on the project's
    hosts) and one in long mode (CPL 0, emulated there), write-protects a data
    page through the host mapping exactly as the mprotect backend does, and
    runs one store to it. Only when KVM reports both stores as KVM_EXIT_MMIO
    writes is host page protection used (one mprotect per toggle instead of
    memslot ioctls); stock KVM answers -EFAULT or KVM_EXIT_MEMORY_FAULT,
    and the project's nested host does so for CPL-3 stores, so they get
    read-only memslots. MINIVMM_EPT_BACKEND=memslot skips the probe.
    """
    cached = _backend_cache.get(kvm_path)
    if cached is None:
        forced = os.environ.get("MINIVMM_EPT_BACKEND", "")
        cached = "memslot" if forced == "memslot" else _probe_mprotect(kvm_path)
        _backend_cache[kvm_path] = cached
    return cached


_PROBE_PAGE = 0x180000
_PROBE_CODE = bytes.fromhex("b85a000000" "890425" "00001800" "f4")   # mov $0x5a,%eax; mov %eax,(0x180000); hlt


def _probe_mprotect(kvm_path: str) -> str:
    if all(host_protection_works(mode, kvm_path) for mode in ("user", "long")):
        return "mprotect"
    return "memslot"


def host_protection_works(mode: str = "user", kvm_path: str = "/dev/kvm") -> bool:
    """Whether a guest store (in `mode`) to a PROT_READ host page exits as KVM_EXIT_MMIO here:
    the store must become an EPT violation for the write, with RAM left unchanged."""
    from ..errors import MinivmmError
    from ..exits import ExitReason
    from ..machine import Machine
    try:
        with Machine("2M", mode, kvm_path=kvm_path) as machine:
            machine.load(_PROBE_CODE, 0x100000)
            ept = machine.create_ept(backend="mprotect")
            ept.protect(_PROBE_PAGE, PAGE_SIZE, "r-x")
            machine.run(timeout=2, max_exits=4)
            access = ept.access
            return (machine.info.reason == ExitReason.EPT_VIOLATION and access is not None
                    and access.is_write and access.gpa == _PROBE_PAGE and access.data[:1] == b"\x5a"
                    and machine.memory.read(_PROBE_PAGE, 1) == b"\0")
    except (MinivmmError, OSError, RuntimeError, ValueError):
        return False


class Memslots:
    """The KVM memslots (and, with the mprotect backend, host protection) that realise an EPT model.

    `regions` maps each guest RAM region to the slots now covering it; pages
    outside every slot are holes. `machine_slots` is the machine's own
    region -> slot map, where new RAM appears.
    """

    def __init__(self, vm: "VmFd", slot_table: "SlotTable", tables: EptTables, dirty: DirtyLog,
                 backend: str) -> None:
        self.vm = vm
        self.slot_table = slot_table
        self.machine_slots = slot_table.base
        self.tables = tables
        self.dirty = dirty
        self.backend = backend
        self.regions: dict[Region, list[_Slot]] = {}
        self._original: dict[Region, int] = {}
        self._free_slots: list[int] = []
        self._readonly_pages: dict[Region, set[int]] = {}   # mprotect backend: protected pages
        self._views: dict[Region, tuple[mmap.mmap, int]] = {}
        self.toggles = 0
        self._closed = False

    def close(self) -> None:
        """Release the host views made for the mprotect backend (the machine's memory stays)."""
        if self._closed:
            return
        self._closed = True
        for view, _ in self._views.values():
            try:
                view.close()
            except BufferError:
                pass
        self._views.clear()

    def sync(self) -> None:
        """Take over the machine's new RAM regions: one slot each, mapped rwx (r-x if read-only)."""
        slots = self.machine_slots
        if len(slots) == len(self.regions):
            return
        for region, slot in slots.items():
            if region in self.regions:
                continue
            flags = MemoryFlag.READONLY if region.readonly else 0
            self.regions[region] = [_Slot(slot, region.gpa, region.size, int(flags))]
            self._original[region] = slot
            self.tables.map(region.gpa, region.size, _R | _X if region.readonly else _RWX)
            if self.dirty.enabled and not region.readonly:
                self.set_logging(region, True)

    def _alloc_slot(self, region: Region) -> int:
        original = self._original[region]
        for slot in self.regions[region]:
            if slot.slot == original:
                break
        else:
            return original
        if self._free_slots:
            return self._free_slots.pop()
        return self.slot_table.allocate()

    def _host_addr(self, region: Region, gpa: int) -> int:
        view = self._views.get(region)
        base = view[1] if view is not None else region.host_addr
        return base + (gpa - region.gpa)

    def _create(self, region: Region, slot: _Slot) -> None:
        self.vm.set_user_memory_region(slot.slot, slot.gpa, slot.size,
                                  self._host_addr(region, slot.gpa), slot.flags)
        self.toggles += 1

    def _delete(self, region: Region, slot: _Slot) -> None:
        if slot.flags & _MEM_LOG:
            self.dirty.keep(slot)
        self.vm.set_user_memory_region(slot.slot, slot.gpa, 0, 0, 0)
        self.toggles += 1
        if slot.slot != self._original[region]:
            self._free_slots.append(slot.slot)

    def _slot_flags(self, kind: int) -> int:
        if kind == _READONLY_KIND:
            return _MEM_READONLY
        return _MEM_LOG if self.dirty.enabled else 0

    def _kind_runs(self, gpa: int, size: int) -> list[tuple[int, int, int]]:
        """[(gpa, size, kind)] covering [gpa, gpa+size), holes included, as KVM must see it."""
        runs: list[tuple[int, int, int]] = []
        mprotect = self.backend == "mprotect"
        for start, length, perms in self.tables.page_runs(gpa, size):
            kind = _kind(perms)
            if mprotect and kind == _Kind.READONLY:
                kind = _Kind.NORMAL             # the host mapping is PROT_READ instead
            _extend(runs, start, length, int(kind))
        return runs

    def realise(self, region: Region, pages: set[int] | None) -> None:
        """Bring `region`'s memslots (and host protection) in line with the model.

        Only slots that hold a changed page of another kind are replaced;
        neighbouring slots of one kind are merged only when the region has
        more than `_COMPACT_LIMIT` of them, so toggling one page costs one or
        two memslot ioctls (delete, create) instead of re-cutting its 2 MiB.
        """
        if self.backend == "mprotect" and self._apply_mprotect(region):
            pages = None                        # the slots moved to a new host view
        slots = self.regions[region]
        if pages is None or len(slots) > _COMPACT_LIMIT:
            for slot in slots:
                self._delete(region, slot)
            self.regions[region] = []
            self._create_runs(region, [(region.gpa, region.size)])
            return
        kind_of, perms = _KIND_OF, self.tables.perms
        if self.backend == "mprotect":
            kind_of = _KIND_OF_MPROTECT
        conflicts: list[_Slot] = []
        uncovered: list[int] = []
        for page in sorted(pages):
            gpa = page << PAGE_SHIFT
            kind = kind_of[perms(gpa)]
            for slot in slots:
                if slot.gpa <= gpa < slot.gpa + slot.size:
                    if (_READONLY_KIND if slot.flags & _MEM_READONLY else _NORMAL_KIND) != kind \
                            and slot not in conflicts:
                        conflicts.append(slot)
                    break
            else:
                if kind != _HOLE_KIND:
                    uncovered.append(page)
        redo: list[tuple[int, int]] = []
        for slot in conflicts:
            self._delete(region, slot)
            slots.remove(slot)
            redo.append((slot.gpa, slot.size))
        for page in uncovered:
            if redo and redo[-1][0] + redo[-1][1] == page << PAGE_SHIFT:
                redo[-1] = (redo[-1][0], redo[-1][1] + PAGE_SIZE)
            else:
                redo.append((page << PAGE_SHIFT, PAGE_SIZE))
        if redo:
            self._create_runs(region, redo)

    def _create_runs(self, region: Region, ranges: list[tuple[int, int]]) -> None:
        slots = self.regions[region]
        for gpa, size in ranges:
            for start, length, kind in self._kind_runs(gpa, size):
                if kind != _Kind.HOLE:
                    slot = _Slot(self._alloc_slot(region), start, length, self._slot_flags(kind))
                    self._create(region, slot)
                    slots.append(slot)

    def _apply_mprotect(self, region: Region) -> bool:
        """Make the host protection of `region` match its r-x pages; True if a host view was made."""
        protected = {p for gpa, size, perms in self.tables.page_runs(region.gpa, region.size)
                     if _kind(perms) == _Kind.READONLY
                     for p in range(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT)}
        before = self._readonly_pages.setdefault(region, set())
        if protected == before:
            return False
        made = False
        if protected and region not in self._views:
            self._make_view(region)
            made = True
        base = self._views[region][1] if region in self._views else region.host_addr
        for page, prot in [(p, mmap.PROT_READ | mmap.PROT_WRITE) for p in before - protected] + \
                          [(p, mmap.PROT_READ) for p in protected - before]:
            _mprotect(base + (page << PAGE_SHIFT) - region.gpa, PAGE_SIZE, prot)
            self.toggles += 1
        self._readonly_pages[region] = protected
        return made

    def _make_view(self, region: Region) -> None:
        """Give KVM its own mapping of `region` so host protection never hits minivmm's view.

        The region's pages move into a memfd mapped twice: at the region's
        address (so `region.mem` keeps working, unprotected) and at a second
        address that the memslots use and mprotect changes.
        """
        fd = os.memfd_create(f"minivmm-{region.name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, region.size)
            view = mmap.mmap(fd, region.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            anchor = ctypes.c_char.from_buffer(view)
            view_addr = ctypes.addressof(anchor)
            del anchor
            view[:] = region.mem[:]
            for slot in self.regions[region]:
                self._delete(region, slot)
            self.regions[region] = []
            got = _libc.mmap(region.host_addr, region.size, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
            if got != region.host_addr:
                raise OSError(ctypes.get_errno(), "mmap(MAP_FIXED) of the memfd over guest RAM failed")
        finally:
            os.close(fd)
        self._views[region] = (view, view_addr)
        # the slots come back on the view at the end of realise

    def set_logging(self, region: Region, on: bool) -> None:
        """Flip LOG_DIRTY_PAGES on the region's writable slots in place (a flags-only change)."""
        for slot in self.regions[region]:
            if slot.flags & MemoryFlag.READONLY:
                continue
            flags = slot.flags | MemoryFlag.LOG_DIRTY_PAGES if on else slot.flags & ~MemoryFlag.LOG_DIRTY_PAGES
            if flags != slot.flags:
                slot.flags = int(flags)
                self._create(region, slot)
