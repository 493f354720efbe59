"""Dirty logging: the pages the guest wrote, from KVM's dirty log and minivmm's emulation.

Dirty tracking uses KVM's dirty log (api.rst 4.8 KVM_GET_DIRTY_LOG, 4.118
KVM_CLEAR_DIRTY_LOG with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) on every memslot
minivmm makes, harvested before a slot is deleted, plus the pages written by
the emulation in `EptShadow`.
"""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Iterable

from .. import fastpath
from ..kvm import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, Cap, KvmError, MemoryFlag
from ..memory import PAGE_SHIFT

if TYPE_CHECKING:
    from ..kvm import VmFd
    from ..memory import Region
    from .realise import _Slot

_LOG_DIRTY_PAGES = int(MemoryFlag.LOG_DIRTY_PAGES)


class DirtyLog:
    """The dirty log of one VM: whether it is on, and the dirty pages not yet reported.

    `harvested` holds pages read from the bitmaps of slots since deleted (or,
    without manual protect, already cleared by KVM); `soft_dirty` the pages
    minivmm wrote itself while emulating.
    """

    def __init__(self, vm: "VmFd") -> None:
        self.vm = vm
        self.enabled = False
        self.manual_protect = False
        self.harvested: set[int] = set()
        self.soft_dirty: set[int] = set()

    def enable(self) -> None:
        """Turn the log on (the caller then sets KVM_MEM_LOG_DIRTY_PAGES on the memslots).

        Enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 first where the host has it, so
        that reading the log and re-protecting pages are separate steps
        (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG, api.rst 4.118).
        """
        vm = self.vm
        if not self.manual_protect and vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & \
                KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            try:
                vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
                self.manual_protect = True
            except KvmError:
                self.manual_protect = False
        self.enabled = True
        self._forget()

    def disable(self) -> None:
        """Turn the log off; pending dirty pages are dropped."""
        self.enabled = False
        self._forget()

    def _forget(self) -> None:
        self.harvested.clear()
        self.soft_dirty.clear()

    def require_enabled(self) -> None:
        if not self.enabled:
            raise RuntimeError("dirty logging is off: call ept.enable_dirty_logging() first")

    def note_write(self, gpa: int, size: int) -> None:
        """Record a write minivmm emulated into [gpa, gpa+size)."""
        if self.enabled:
            self.soft_dirty.add(gpa & ~0xFFF)
            self.soft_dirty.add((gpa + size - 1) & ~0xFFF)

    def keep(self, slot: "_Slot") -> None:
        """Read the log of a slot about to be deleted, so its dirty pages are not lost."""
        self.harvest(slot, clear=False, out=self.harvested)

    def harvest(self, slot: "_Slot", clear: bool, out: set[int]) -> None:
        npages = slot.size >> PAGE_SHIFT
        if slot.bitmap is None:
            slot.bitmap = (ctypes.c_uint64 * ((npages + 63) // 64))()
        bitmap = slot.bitmap
        vm = self.vm
        vm.get_dirty_log(slot.slot, bitmap)
        raw = ctypes.string_at(ctypes.addressof(bitmap), ctypes.sizeof(bitmap))
        chunks = _dirty_chunks(raw)
        if not chunks:
            return
        for at in chunks:
            _bitmap_pages(raw[at: at + 512], slot.gpa + (at << 15), out)
        if clear and self.manual_protect:
            # Re-protect only the span holding dirty pages (first_page and
            # num_pages stay multiples of 64, or num_pages reaches the slot end).
            first = chunks[0] * 8
            last = min(npages, (chunks[-1] + 512) * 8)
            span = (ctypes.c_uint64 * ((last - first + 63) // 64)).from_address(
                ctypes.addressof(bitmap) + chunks[0])
            vm.clear_dirty_log(slot.slot, first, last - first, span)

    def pages(self, slots: Iterable["_Slot"], clear: bool) -> list[int]:
        """The sorted dirty pages: harvested, emulated, and logged in the logging `slots`."""
        found: set[int] = set(self.harvested)
        found |= self.soft_dirty
        fresh: set[int] = set()
        for slot in slots:
            if slot.flags & MemoryFlag.LOG_DIRTY_PAGES:
                self.harvest(slot, clear, fresh)
        found |= fresh
        if clear:
            self._forget()
        elif not self.manual_protect:
            self.harvested |= fresh       # KVM_GET_DIRTY_LOG cleared them: keep them here
        return sorted(found)

    @property
    def restorable(self) -> bool:
        """Whether `restore` may apply: the log is on with manual protect, the C code is built,
        and no dirty page is known only here."""
        return bool(self.enabled and self.manual_protect and fastpath.COMPILED) and \
            not self.harvested and not self.soft_dirty

    def restore_plan(self, regions: dict["Region", list["_Slot"]],
                     copy_address: int) -> tuple[int, int, int, int, int, int] | None:
        """The arguments of `fastpath.restore_dirty` for a single-slot guest whose full copy is
        at `copy_address`: (vm fd, slot, bitmap address, pages, guest address, copy address);
        None when there is more than one region or memslot."""
        if len(regions) != 1:
            return None
        (region, slots), = regions.items()
        if len(slots) != 1 or not slots[0].flags & _LOG_DIRTY_PAGES:
            return None
        slot = slots[0]
        npages = slot.size >> PAGE_SHIFT
        if slot.bitmap is None:
            slot.bitmap = (ctypes.c_uint64 * ((npages + 63) // 64))()
        return (self.vm.fd, slot.slot, ctypes.addressof(slot.bitmap), npages, region.host_addr,
                copy_address + slot.gpa)

    def restore(self, regions: dict["Region", list["_Slot"]], copy_address: int) -> int | None:
        """Copy the dirty pages of a single-slot guest back from `copy_address` and restart the log
        (in C); None when there is more than one region or memslot."""
        plan = self.restore_plan(regions, copy_address)
        if plan is None:
            return None
        pages = fastpath.restore_dirty(*plan, True)
        if pages < 0:
            raise KvmError("KVM_GET_DIRTY_LOG/KVM_CLEAR_DIRTY_LOG", -pages)
        return pages


_ZERO_CHUNK = bytes(512)
_ZERO_BLOCK = bytes(4096)


def _dirty_chunks(raw: bytes) -> list[int]:
    """Byte offsets of the 512-byte chunks of a dirty bitmap with a bit set.

    Whole 4 KiB blocks (128 MiB of guest memory) are skipped with one bytes
    comparison (memcmp), so scanning a mostly clean bitmap costs next to
    nothing even for large slots.
    """
    found = []
    for block_at in range(0, len(raw), 4096):
        block = raw[block_at: block_at + 4096]
        if block == _ZERO_BLOCK[: len(block)]:
            continue
        for at in range(0, len(block), 512):
            chunk = block[at: at + 512]
            if chunk != _ZERO_CHUNK[: len(chunk)]:
                found.append(block_at + at)
    return found


def _bitmap_pages(raw: bytes, base_gpa: int, out: set[int]) -> None:
    """Add the GPA of every page whose bit is set in a KVM dirty bitmap to `out`."""
    for offset in range(0, len(raw), 512):
        chunk = raw[offset: offset + 512]
        if chunk == _ZERO_CHUNK[: len(chunk)]:
            continue
        bits = int.from_bytes(chunk, "little")
        first = base_gpa + (offset << 15)      # 8 bits per byte, 4 KiB per bit
        while bits:
            low = bits & -bits
            out.add(first + ((low.bit_length() - 1) << PAGE_SHIFT))
            bits ^= low

