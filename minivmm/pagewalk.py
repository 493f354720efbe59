"""A software walker of the guest's own page tables (SDM vol. 3A chapter 4, "Paging").

KVM_TRANSLATE answers valid=0 on some hosts (kvm-host-notes), so minivmm
translates guest-linear addresses itself from guest memory and the control
registers: no paging (CR0.PG = 0), 32-bit paging (with 4 MiB pages under
CR4.PSE, PSE-36 address bits), PAE paging (2 MiB pages) and 4-level paging
(2 MiB and 1 GiB pages). The walk only reads: it sets no accessed/dirty bits.

Access rights follow SDM 4.6: a write needs R/W = 1 at every level (for
supervisor accesses only when CR0.WP = 1), a user access needs U/S = 1 at
every level, an instruction fetch fails on XD = 1 at any level when
IA32_EFER.NXE = 1. SMEP, SMAP and protection keys are not modelled. A failed
walk raises `PageFault` with the #PF error code the processor would push
(SDM 4.7) and a readable description.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag
from typing import Protocol

from .errors import MinivmmError
from .memory import GuestMemory, GuestMemoryError

__all__ = ["Translation", "PageFault", "PfErrorCode", "PteFlag", "translate", "read_virtual",
           "write_virtual"]

CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
PAGE_SIZE = 4096


class PteFlag(IntFlag):
    """Bits of a paging-structure entry (SDM vol. 3A 4.3-4.5, tables 4-4 to 4-20)."""
    P = 1 << 0          # present
    RW = 1 << 1         # read/write
    US = 1 << 2         # user/supervisor
    PWT = 1 << 3
    PCD = 1 << 4
    A = 1 << 5          # accessed
    D = 1 << 6          # dirty (leaf)
    PS = 1 << 7         # page size (PDE / PDPTE: maps a large page)
    G = 1 << 8          # global (leaf)
    XD = 1 << 63        # execute-disable (PAE and 4-level, with EFER.NXE)


class PfErrorCode(IntFlag):
    """The #PF error code (SDM vol. 3A 4.7, figure 4-12)."""
    P = 1 << 0          # 0: not-present page, 1: protection violation
    W = 1 << 1          # the access was a write
    U = 1 << 2          # the access was a user-mode access
    RSVD = 1 << 3       # a reserved bit was set in some paging-structure entry
    I = 1 << 4          # the access was an instruction fetch
    PK = 1 << 5         # protection-key violation


class PageFault(MinivmmError):
    """A translation failed the way a #PF would: the address, the error code, why."""

    def __init__(self, gva: int, error_code: int, description: str) -> None:
        self.gva = gva
        self.error_code = PfErrorCode(error_code)
        self.description = description
        super().__init__(f"page fault at {gva:#x} (error code {int(error_code):#x}): {description}")


@dataclass(frozen=True, slots=True)
class Translation:
    """Where a guest-linear address lands and the rights of the whole walk.

    `writable`, `user` and `executable` combine every level (SDM 4.6);
    `page_size` is 4 KiB, 2 MiB, 4 MiB or 1 GiB (0x100000000 without paging).
    """
    gpa: int
    writable: bool
    user: bool
    executable: bool
    page_size: int

    @property
    def page_offset(self) -> int:
        return self.gpa & (self.page_size - 1)


class ControlRegisters(Protocol):
    cr0: int
    cr3: int
    cr4: int
    efer: int


_ACCESSES = ("r", "w", "x")


def _entry(memory: GuestMemory, address: int, size: int, gva: int, name: str) -> int:
    try:
        raw = memory.read(address, size)
    except GuestMemoryError:
        raise PageFault(gva, 0, f"{name} at guest-physical {address:#x} is outside guest RAM") from None
    return struct.unpack("<Q" if size == 8 else "<I", raw)[0]


def translate(memory: GuestMemory, cr0: int, cr3: int, cr4: int, efer: int, gva: int,
              access: str = "r", user: bool = False) -> Translation:
    """Translate the guest-linear address `gva` as the processor would for `access`.

    `access` is "r" (data read), "w" (data write) or "x" (instruction fetch);
    `user` makes it a CPL-3 access. Raises `PageFault` when the walk hits a
    non-present entry, a reserved bit or a rights violation, and ValueError for
    a paging mode that is not modelled (5-level paging).
    """
    if access not in _ACCESSES:
        raise ValueError(f"bad access {access!r}: expected 'r', 'w' or 'x'")
    if not cr0 & CR0_PG:
        return Translation(gva & 0xFFFFFFFF if not efer & EFER_LMA else gva, True, True, True, 1 << 32)
    write, fetch = access == "w", access == "x"
    code = (PfErrorCode.W if write else 0) | (PfErrorCode.U if user else 0) | (PfErrorCode.I if fetch else 0)
    if efer & EFER_LMA:
        if cr4 & CR4_LA57:
            raise ValueError("5-level paging (CR4.LA57) is not modelled by the page walker")
        top = gva >> 47
        if top not in (0, (1 << 17) - 1):
            raise PageFault(gva, 0, "non-canonical address (a #GP, not a #PF, on hardware)")
        levels = (("PML4E", 39), ("PDPTE", 30), ("PDE", 21), ("PTE", 12))
        table, entry_size, index_bits = cr3 & 0x000FFFFFFFFFF000, 8, 9
    elif cr4 & CR4_PAE:
        gva &= 0xFFFFFFFF
        pdpte_addr = (cr3 & 0xFFFFFFE0) + ((gva >> 30) & 3) * 8
        pdpte = _entry(memory, pdpte_addr, 8, gva, "PDPTE")
        if not pdpte & PteFlag.P:
            raise PageFault(gva, code, f"PDPTE[{(gva >> 30) & 3:#x}] not present")
        if pdpte & 0x1E6:
            raise PageFault(gva, code | PfErrorCode.P | PfErrorCode.RSVD,
                            f"PDPTE[{(gva >> 30) & 3:#x}] has reserved bits set ({pdpte & 0x1E6:#x})")
        levels = (("PDE", 21), ("PTE", 12))
        table, entry_size, index_bits = pdpte & 0x000FFFFFFFFFF000, 8, 9
    else:
        gva &= 0xFFFFFFFF
        levels = (("PDE", 22), ("PTE", 12))
        table, entry_size, index_bits = cr3 & 0xFFFFF000, 4, 10

    nx_enabled = entry_size == 8 and bool(efer & EFER_NXE)
    writable = user_ok = executable = True
    for depth, (name, shift) in enumerate(levels):
        index = (gva >> shift) & ((1 << index_bits) - 1)
        entry = _entry(memory, table + index * entry_size, entry_size, gva, name)
        label = f"{name}[{index:#x}]"
        if not entry & PteFlag.P:
            raise PageFault(gva, code, f"{label} not present")
        if entry_size == 8 and entry & PteFlag.XD and not nx_enabled:
            raise PageFault(gva, code | PfErrorCode.P | PfErrorCode.RSVD,
                            f"{label} has XD set while IA32_EFER.NXE = 0 (reserved bit)")
        writable &= bool(entry & PteFlag.RW)
        user_ok &= bool(entry & PteFlag.US)
        if nx_enabled and entry & PteFlag.XD:
            executable = False
        last = depth == len(levels) - 1
        large = not last and entry & PteFlag.PS
        if large and name == "PML4E":
            raise PageFault(gva, code | PfErrorCode.P | PfErrorCode.RSVD, f"{label} has the reserved PS bit set")
        if large and entry_size == 4 and not cr4 & CR4_PSE:
            large = False       # PS is ignored without CR4.PSE: the PDE points to a page table
        if last or large:
            size = 1 << shift
            if entry_size == 4 and large:       # 4 MiB page, PSE-36 high address bits 20:13
                base = (entry & 0xFFC00000) | (((entry >> 13) & 0xFF) << 32)
            else:
                base = entry & 0x000FFFFFFFFFF000 & ~(size - 1)
                if large and entry & (size - 1) & ~0x1FFF:
                    raise PageFault(gva, code | PfErrorCode.P | PfErrorCode.RSVD,
                                    f"{label} maps a {size >> 20} MiB page at a misaligned address")
            _check_rights(gva, code, write, fetch, user, writable, user_ok, executable, cr0)
            return Translation(base | (gva & (size - 1)), writable, user_ok, executable, size)
        table = entry & (0x000FFFFFFFFFF000 if entry_size == 8 else 0xFFFFF000)
    raise AssertionError("unreachable")


def _check_rights(gva: int, code: int, write: bool, fetch: bool, user: bool,
                  writable: bool, user_ok: bool, executable: bool, cr0: int) -> None:
    code |= PfErrorCode.P
    if user and not user_ok:
        raise PageFault(gva, code, "user access to supervisor page")
    if write and not writable and (user or cr0 & CR0_WP):
        raise PageFault(gva, code, "write to read-only page")
    if fetch and not executable:
        raise PageFault(gva, code, "instruction fetch from execute-disable page")


def read_virtual(memory: GuestMemory, regs: ControlRegisters, gva: int, size: int) -> bytes:
    """Read `size` bytes at guest-linear `gva`, page by page through the guest's page tables."""
    if size < 0:
        raise ValueError(f"negative size {size}")
    out = bytearray()
    while size:
        tr = translate(memory, regs.cr0, regs.cr3, regs.cr4, regs.efer, gva)
        n = min(size, PAGE_SIZE - (gva & (PAGE_SIZE - 1)))
        out += memory.read(tr.gpa, n)
        gva += n
        size -= n
    return bytes(out)


def write_virtual(memory: GuestMemory, regs: ControlRegisters, gva: int, data: bytes) -> None:
    """Write `data` at guest-linear `gva` (like a debugger: page R/W bits are not enforced).

    Every page is translated before anything is written, so a fault leaves
    memory unchanged.
    """
    chunks: list[tuple[int, int, int]] = []
    pos = 0
    while pos < len(data):
        tr = translate(memory, regs.cr0, regs.cr3, regs.cr4, regs.efer, gva + pos)
        n = min(len(data) - pos, PAGE_SIZE - ((gva + pos) & (PAGE_SIZE - 1)))
        chunks.append((tr.gpa, pos, n))
        pos += n
    for gpa, start, n in chunks:
        memory.write(gpa, data[start: start + n])


def linear_addresses(memory: GuestMemory, cr0: int, cr3: int, cr4: int, efer: int, gpa: int,
                     limit: int = 4) -> list[int]:
    """Guest-linear addresses whose translation is `gpa` (a reverse walk), at most `limit` of them.

    Walks every present entry of the guest's paging structures (SDM vol. 3A
    4.3-4.5) and returns the linear addresses of leaves that map the page of
    `gpa`, in ascending order; canonical (sign-extended) under 4-level
    paging. Without paging the linear address is the physical one.
    """
    if not cr0 & CR0_PG:
        return [gpa]
    found: list[int] = []
    if efer & EFER_LMA:
        if cr4 & CR4_LA57:
            raise ValueError("5-level paging (CR4.LA57) is not modelled by the page walker")
        _reverse(memory, cr3 & 0x000FFFFFFFFFF000, (39, 30, 21, 12), 8, gpa, 0, found, limit)
        return [va | (~((1 << 48) - 1) & ((1 << 64) - 1)) if va >> 47 else va for va in found]
    if cr4 & CR4_PAE:
        pdptes = struct.unpack("<4Q", memory.read(cr3 & 0xFFFFFFE0, 32))
        for i, pdpte in enumerate(pdptes):
            if pdpte & PteFlag.P and len(found) < limit:
                _reverse(memory, pdpte & 0x000FFFFFFFFFF000, (21, 12), 8, gpa, i << 30, found, limit)
        return found
    _reverse(memory, cr3 & 0xFFFFF000, (22, 12), 4, gpa, 0, found, limit, pse=bool(cr4 & CR4_PSE))
    return found


def _reverse(memory: GuestMemory, table: int, shifts: tuple[int, ...], entry_size: int, gpa: int,
             prefix: int, found: list[int], limit: int, pse: bool = True) -> None:
    count = PAGE_SIZE // entry_size
    try:
        entries = struct.unpack(f"<{count}{'Q' if entry_size == 8 else 'I'}", memory.read(table, PAGE_SIZE))
    except GuestMemoryError:
        return
    shift = shifts[0]
    last = len(shifts) == 1
    for index, entry in enumerate(entries):
        if not entry & PteFlag.P:
            continue
        va = prefix | (index << shift)
        large = not last and entry & PteFlag.PS and shift != 39 and (entry_size == 8 or pse)
        if last or large:
            size = 1 << shift
            if entry_size == 4 and large:
                base = (entry & 0xFFC00000) | (((entry >> 13) & 0xFF) << 32)
            else:
                base = entry & 0x000FFFFFFFFFF000 & ~(size - 1)
            if base <= gpa < base + size:
                found.append(va | (gpa - base))
                if len(found) >= limit:
                    return
            continue
        _reverse(memory, entry & (0x000FFFFFFFFFF000 if entry_size == 8 else 0xFFFFF000), shifts[1:],
                 entry_size, gpa, va, found, limit, pse)
        if len(found) >= limit:
            return


def linear_of_physical(memory: GuestMemory, regs: ControlRegisters, gpa: int) -> int | None:
    """The guest-linear address of `gpa` when it can be known, else None.

    KVM reports only the guest-physical address of an MMIO access. Without
    paging linear = physical (flat segments). With paging: the identity
    address if the guest's page tables map it to `gpa` (minivmm's modes
    identity-map RAM), else the one linear address a reverse walk finds;
    None when no or several linear addresses map the page. (An access
    through an alias of an identity-mapped page is reported with the
    identity address: KVM does not say which linear address was used.)
    """
    cr0 = regs.cr0
    if not cr0 & CR0_PG:
        return gpa
    cr3, cr4, efer = regs.cr3, regs.cr4, regs.efer
    try:
        if translate(memory, cr0, cr3, cr4, efer, gpa).gpa == gpa:
            return gpa
    except (PageFault, ValueError):
        pass
    try:
        found = linear_addresses(memory, cr0, cr3, cr4, efer, gpa, limit=2)
    except ValueError:
        return None
    return found[0] if len(found) == 1 else None
