"""The address space of a Linux program: identity-mapped 4 KiB pages with the rights it asks
for, the program break, mmap regions, all inside a memory limit.

Guest RAM is [0, ram_size): virtual address = guest-physical address, so a guest
buffer is a slice of guest memory. The page tables (4-level, SDM vol. 3A 4.5) sit
at the top of RAM, out of the program's reach (no page maps them); below them the
stack, the syscall entry, the read window area (`WINDOW_AREA`), then the mmap area
growing down. Each user page has one byte in `rights`
(PROT_READ 1, PROT_WRITE 2, PROT_EXEC 4 as mmap's, and USED 0x80 for an
allocated page) and a PTE: present when the page has any right, writable for
PROT_WRITE, execute-disable (EFER.NXE) without PROT_EXEC. The first 64 KiB are
minivmm's system area (supervisor pages, page 0 not present); the syscall exit
page (`minivmm.modes.SYSCALL_EXIT_ADDR`) is mapped onto a memslot hole.

A changed PTE takes effect at the next entry: `reload` loads CR3 again (it alternates
between two identical PML4 pages, so KVM sees a new root and drops cached translations).
"""
from __future__ import annotations

import errno
import mmap
import struct
from array import array
from typing import Callable

from ..memory import GuestMemory
from ..modes import SYSCALL_EXIT_ADDR, SYSTEM_AREA_END, EFER_NXE
from .entry import ENTRY_SIZE

__all__ = ["AddressSpace", "PAGE", "USED", "page_up"]

PAGE = 4096
HUGE_PAGE = 2 << 20
WINDOW_AREA = 8 << 20
"""The read window area: 2 MiB pages, read-only for the program, below the syscall entry, where
the entry serves reads of one file at a time (`minivmm.linux.kernel`); a 2 MiB page costs one
fault of the guest where 4 KiB pages cost one each."""
USED = 0x80
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
_P, _RW, _US, _PS = 1, 2, 4, 0x80
_NX = 1 << 63
STACK_SIZE = 8 << 20


def page_up(value: int) -> int:
    return (value + PAGE - 1) & ~(PAGE - 1)


def _pte_flags(prot: int) -> int:
    if not prot & 7:
        return 0
    return _P | _US | (_RW if prot & PROT_WRITE else 0) | (0 if prot & PROT_EXEC else _NX)


class AddressSpace:
    """The pages of one program in guest memory of `ram_size` bytes, of which at most
    `limit` bytes may be allocated to the program (ELF, stack, brk, mmap)."""

    def __init__(self, memory: GuestMemory, ram_size: int, limit: int) -> None:
        self.mem = memory.region_at(0).mem
        self.ram_size = ram_size
        self.limit_pages = limit // PAGE
        self.used_pages = 0
        npages = ram_size // PAGE
        self.rights = bytearray(npages)
        pt_size = page_up(npages * 8)
        npd = 4
        self.tables = ram_size - pt_size - (3 + npd) * PAGE
        self.pml4 = (self.tables, self.tables + PAGE)
        self.pdpt = self.tables + 2 * PAGE
        self.pd = self.tables + 3 * PAGE
        self.pt = self.tables + (3 + npd) * PAGE
        self._flip = 0
        self.top = self.tables                       # the stack ends here
        self.stack_low = self.top - STACK_SIZE
        self.entry = self.stack_low - PAGE - ENTRY_SIZE  # the syscall entry (minivmm.linux.entry)
        self.windows = (self.entry - PAGE - WINDOW_AREA) & ~(HUGE_PAGE - 1)   # the read window area
        self.mmap_top = self.windows - PAGE          # guard pages around them
        self.brk_start = self.brk = 0
        self.on_write: Callable[[int, int], None] | None = None   # host writes to guest memory
        self.live = False            # the program ran: taking rights away needs `flush_ranges`
        self.taken: list[tuple[int, int]] = []      # (first page, count) whose rights went down
        self.prefer_huge_pages(self.tables, ram_size - self.tables)
        self.prefer_huge_pages(self.windows, WINDOW_AREA)
        self._write_tables(npages, npd)
        self.rights[:SYSTEM_AREA_END // PAGE] = bytes([USED]) * (SYSTEM_AREA_END // PAGE)
        self.rights[self.tables // PAGE:] = bytes([USED]) * (npages - self.tables // PAGE)
        self.rights[self.windows // PAGE:(self.windows + WINDOW_AREA) // PAGE] = \
            bytes([USED | PROT_READ]) * (WINDOW_AREA // PAGE)
        self._set_ptes(1, SYSTEM_AREA_END // PAGE - 1, _P | _RW)      # supervisor, page 0 absent
        self._set_ptes(self.tables // PAGE, npages - self.tables // PAGE, _P | _RW | _NX)  # for the flush

    def _write_tables(self, npages: int, npd: int) -> None:
        pml4 = struct.pack("<Q", self.pdpt | _P | _RW | _US).ljust(PAGE, b"\0")
        for address in self.pml4:
            self.mem[address:address + PAGE] = pml4
        self.mem[self.pdpt:self.pdpt + PAGE] = b"".join(
            struct.pack("<Q", (self.pd + i * PAGE) | _P | _RW | _US) for i in range(npd)).ljust(PAGE, b"\0")
        entries = [0] * (npd * 512)
        for i in range(-(-npages // 512)):
            entries[i] = (self.pt + i * PAGE) | _P | _RW | _US
        if SYSCALL_EXIT_ADDR >= self.ram_size:
            entries[SYSCALL_EXIT_ADDR >> 21] = SYSCALL_EXIT_ADDR | _P | _US | _PS
        for block in range(self.windows, self.windows + WINDOW_AREA, HUGE_PAGE):
            entries[block >> 21] = block | _P | _US | _PS | _NX
        self.mem[self.pd:self.pd + npd * PAGE] = struct.pack(f"<{npd * 512}Q", *entries)

    @property
    def cr3(self) -> int:
        return self.pml4[self._flip]

    def reload(self, vcpu) -> None:
        """Make PTE changes visible to the vCPU: CR3 := the other PML4 copy."""
        self._flip ^= 1
        sregs = vcpu.sregs
        sregs.cr3 = self.cr3
        sregs.efer |= EFER_NXE
        vcpu.set_sregs(sregs)

    def _set_ptes(self, first: int, count: int, flags: int) -> None:
        offset = self.pt + first * 8
        if flags:
            start = (first * PAGE) | flags
            self.mem[offset:offset + count * 8] = array("Q", range(start, start + count * PAGE, PAGE)).tobytes()
        else:
            self.mem[offset:offset + count * 8] = bytes(count * 8)
        self.touched(offset, count * 8)

    def touched(self, address: int, length: int) -> None:
        """The host wrote guest memory [address, address + length) (snapshots must know)."""
        if self.on_write is not None:
            self.on_write(address, length)

    # -- queries --------------------------------------------------------------------
    def accessible(self, address: int, length: int, write: bool = False) -> bool:
        """Whether the program may read (or write) [address, address + length)."""
        if length <= 0:
            return length == 0
        first, last = address // PAGE, (address + length - 1) // PAGE
        if address < 0 or last >= len(self.rights):
            return False
        need = PROT_WRITE if write else PROT_READ
        if first == last:
            return bool(self.rights[first] & need)
        chunk = self.rights[first:last + 1]
        return all(r & need for r in chunk)

    def is_free(self, address: int, length: int) -> bool:
        first, count = address // PAGE, page_up(length) // PAGE
        if address < SYSTEM_AREA_END or first + count > self.top // PAGE:
            return False
        return not any(self.rights[first:first + count])

    # -- changes --------------------------------------------------------------------
    def map(self, address: int, length: int, prot: int) -> int:
        """Allocate the pages of [address, address + length) (page aligned) with `prot`;
        0, or -ENOMEM past the memory limit."""
        first, count = address // PAGE, page_up(length) // PAGE
        new = self.rights.count(0, first, first + count)
        if self.used_pages + new > self.limit_pages:
            return -errno.ENOMEM
        self.used_pages += new
        self.rights[first:first + count] = bytes([USED | prot]) * count
        self._set_ptes(first, count, _pte_flags(prot))
        return 0

    def unmap(self, address: int, length: int) -> None:
        """Free the pages (they read as zeros when mapped again)."""
        first, count = address // PAGE, page_up(length) // PAGE
        self._taking(first, count)
        freed = count - self.rights.count(0, first, first + count)
        self.used_pages -= freed
        self.rights[first:first + count] = bytes(count)
        self._set_ptes(first, count, 0)
        self.mem.madvise(mmap.MADV_DONTNEED, first * PAGE, count * PAGE)
        self.touched(first * PAGE, count * PAGE)

    def protect(self, address: int, length: int, prot: int) -> int:
        first, count = address // PAGE, page_up(length) // PAGE
        if first + count > len(self.rights) or not all(r & USED for r in self.rights[first:first + count]):
            return -errno.ENOMEM
        if any(r & 7 & ~prot for r in self.rights[first:first + count]):
            self._taking(first, count)
        self.rights[first:first + count] = bytes([USED | prot]) * count
        self._set_ptes(first, count, _pte_flags(prot))
        return 0

    def _taking(self, first: int, count: int) -> None:
        if self.live and count and any(self.rights[first:first + count]):
            self.taken.append((first, count))

    def flush_list(self) -> bytes | None:
        """The flush routine's list for the rights taken away since the last call (None when
        none were): the PT base, then (first PTE address, count) ranges, 0-terminated."""
        if not self.taken:
            return None
        from .entry import FLUSH_RANGES
        taken, self.taken = self.taken, []
        if len(taken) > FLUSH_RANGES:
            low = min(f for f, _ in taken)
            taken = [(low, max(f + c for f, c in taken) - low)]
        body = b"".join(struct.pack("<QQ", self.pt + first * 8, count) for first, count in taken)
        return struct.pack("<QQ", self.pt, 0) + body + bytes(16)

    def find_free(self, length: int, align: int = PAGE) -> int | None:
        """The highest free range of `length` bytes under the mmap top that starts at a
        multiple of `align` (a power of two, at least a page)."""
        count, step = page_up(length) // PAGE, align // PAGE
        low, high = SYSTEM_AREA_END // PAGE, self.mmap_top // PAGE
        free = bytes(count)
        while True:
            at = self.rights.rfind(free, low, high)
            if at < 0:
                return None
            start = at - at % step
            if start >= low and self.rights.count(0, start, start + count) == count:
                return start * PAGE
            high = start - step + count        # the next lower candidate

    def prefer_huge_pages(self, address: int, length: int) -> None:
        """Ask the host to back the 2 MiB blocks that [address, address + length) touches with
        transparent huge pages (MADV_HUGEPAGE): one host fault per block instead of one per
        page when the host fills it (page tables, ELF segments, read windows). The guest's
        page sizes and rights stay as they are."""
        low, high = address & ~(HUGE_PAGE - 1), min(-(-(address + length) // HUGE_PAGE) * HUGE_PAGE, self.ram_size)
        if high > low and hasattr(mmap, "MADV_HUGEPAGE"):
            self.mem.madvise(mmap.MADV_HUGEPAGE, low, high - low)

    def write(self, address: int, data: bytes) -> None:
        self.mem[address:address + len(data)] = data
        self.touched(address, len(data))

    # -- checkpoints (fuzzing: every run starts from the same state) ------------------------
    def checkpoint(self) -> tuple:
        return (bytes(self.rights), self.used_pages, self.brk_start, self.brk, self._flip)

    def rewind(self, state: tuple) -> None:
        """Back to `checkpoint`'s bookkeeping (the PTEs are guest memory: the snapshot's)."""
        rights, self.used_pages, self.brk_start, self.brk, self._flip = state
        self.rights[:] = rights

    def read(self, address: int, length: int) -> bytes:
        return self.mem[address:address + length]
