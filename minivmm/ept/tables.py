"""The EPT paging structures: a host-side model of Intel's extended page tables.

The model (`EptTables`) is a 4-level EPT paging structure kept host-side
(SDM vol. 3C 29.3.2, "EPT Translation Mechanism"): PML4, PDPT, PD and PT
entries with R/W/X (bits 2:0), the leaf memory type (5:3), ignore-PAT (6),
large page (7), accessed (8), dirty (9) and user-execute (10). RAM is mapped
with 2 MiB pages; a 2 MiB page is split into 4 KiB pages where a permission
differs and merged back when all 512 agree. Nothing here touches KVM.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

from ..errors import MinivmmError
from ..memory import PAGE_SIZE

__all__ = ["EptTables", "EptWalk", "EptFlag", "EptMemoryType", "EptPointerFlag", "Perm", "parse_perms",
           "EptError"]

LARGE_PAGE_SIZE = 2 << 20
_PAGES_PER_LARGE = LARGE_PAGE_SIZE // PAGE_SIZE
ADDRESS_MASK = ((1 << 52) - 1) & ~0xFFF
_LARGE = 0x80
_TABLE_SPACE = 1 << 51          # "host-physical" addresses of the model's tables (never guest RAM)


class EptError(MinivmmError, ValueError):
    """A bad EPT request: unknown permissions, a range outside RAM, overlapping devices."""


class EptFlag(IntFlag):
    """Bits of an EPT paging-structure entry (SDM vol. 3C 29.3.2, tables 29-1 to 29-6)."""
    READ = 1 << 0
    WRITE = 1 << 1
    EXECUTE = 1 << 2              # supervisor-mode execute under mode-based execute control
    MEMORY_TYPE = 0x7 << 3        # leaf entries only
    IGNORE_PAT = 1 << 6           # leaf entries only
    LARGE_PAGE = 1 << 7           # PDPTE: 1 GiB page, PDE: 2 MiB page
    ACCESSED = 1 << 8             # with EPTP bit 6 (A/D enable)
    DIRTY = 1 << 9                # leaf entries, with EPTP bit 6
    USER_EXECUTE = 1 << 10        # mode-based execute control
    SUPPRESS_VE = 1 << 63


class EptMemoryType(IntEnum):
    """EPT memory types (SDM vol. 3C 29.3.7, and 11.3 for the types)."""
    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6


class EptPointerFlag(IntFlag):
    """Low bits of the EPT pointer (SDM vol. 3C 25.6.11, table 25-9)."""
    MEMORY_TYPE_UC = 0
    MEMORY_TYPE_WB = 6
    WALK_LENGTH_4 = 3 << 3        # page-walk length minus one
    ACCESSED_DIRTY = 1 << 6
    SUPERVISOR_SHADOW_STACK = 1 << 7


class Perm(IntFlag):
    """EPT access rights, the same bits as an entry's R/W/X (SDM 29.3.2)."""
    NONE = 0
    R = 1
    W = 2
    X = 4
    RWX = 7

    def __str__(self) -> str:
        return "".join(c if self & bit else "-" for c, bit in (("r", 1), ("w", 2), ("x", 4)))


def parse_perms(perms: str | int) -> Perm:
    """"rwx", "r-x", "r--", "---", "rx", "" or a `Perm` -> Perm.

    Write without read is an EPT misconfiguration (SDM 29.3.3.1) and is refused.
    """
    if isinstance(perms, str):
        cached = _PARSED.get(perms)
        if cached is not None:
            return cached
        value = _parse_perms(perms)
        if len(_PARSED) < 256:
            _PARSED[perms] = value
        return value
    return _parse_perms(perms)


_PARSED: dict[str, Perm] = {}


def _parse_perms(perms: str | int) -> Perm:
    if isinstance(perms, int):
        if not 0 <= perms <= 7:
            raise EptError(f"bad permissions {perms!r}: expected bits of R=1, W=2, X=4")
        value = Perm(perms)
    elif isinstance(perms, str):
        text = perms.strip().lower()
        value = Perm.NONE
        if len(text) == 3 and all(c in "rwx-" for c in text) and all(
                c in (want, "-") for c, want in zip(text, "rwx")):
            for c, bit in zip(text, (Perm.R, Perm.W, Perm.X)):
                if c != "-":
                    value |= bit
        elif all(c in "rwx" for c in text) and len(set(text)) == len(text):
            for c in text:
                value |= {"r": Perm.R, "w": Perm.W, "x": Perm.X}[c]
        else:
            raise EptError(f"bad permissions {perms!r}: expected 'rwx', 'r-x', 'r--', '--x', '---' "
                           "(positional r, w, x or '-') or letters out of 'rwx'")
    else:
        raise EptError(f"bad permissions {perms!r}: expected a string like 'r-x' or a Perm")
    if value & Perm.W and not value & Perm.R:
        raise EptError(f"permissions {perms!r} allow writes without reads: an EPT misconfiguration "
                       "(SDM 29.3.3.1)")
    return value


# --- the EPT paging structures ------------------------------------------------------
LEVEL_NAMES = ("PML4E", "PDPTE", "PDE", "PTE")
_SHIFTS = (39, 30, 21, 12)


@dataclass(frozen=True, slots=True)
class EptWalk:
    """The result of walking the EPT for one guest-physical address.

    `entries` holds the entry read at each level (PML4E first); `perms` is the
    AND of the R/W/X bits of all of them (SDM 29.3.3.2), `page_size` the size
    of the leaf's page, `hpa` the address the leaf maps `gpa` to (minivmm's
    EPT is an identity map of RAM). `present` is False when a level has no
    R/W/X bit (an EPT violation on any access, SDM 29.3.3.2).
    """
    gpa: int
    entries: tuple[int, ...]
    present: bool
    perms: Perm = Perm.NONE
    page_size: int = 0
    memory_type: EptMemoryType = EptMemoryType.WB
    hpa: int = 0

    @property
    def leaf(self) -> int:
        return self.entries[-1]


class EptTables:
    """The 4-level EPT paging structures, kept in host memory (not guest RAM).

    Tables are lists of 512 64-bit entries addressed by fake host-physical
    addresses above 2^51. Non-leaf entries grant R/W/X; leaves carry the
    page's permissions and memory type. Guest RAM is identity-mapped.
    """

    def __init__(self) -> None:
        self._tables: dict[int, list[int]] = {}
        self._stats: dict[int, dict[int, int]] = {}     # PT address -> {entry & 0x7F (-1: unmapped): count}
        self._spare: dict[int, tuple[int, list[int]]] = {}   # 2 MiB base -> (low bits, merged PT)
        self._pds: dict[int, list[int]] = {}                 # gpa >> 30 -> its page directory
        self._next = _TABLE_SPACE
        self.root = self._alloc()

    def _alloc(self, table: list[int] | None = None) -> int:
        addr = self._next
        self._next += PAGE_SIZE
        self._tables[addr] = [0] * 512 if table is None else table
        return addr

    def table(self, address: int) -> list[int]:
        """The 512 entries of the table at model address `address` (read-only use)."""
        return self._tables[address & ADDRESS_MASK]

    @property
    def table_count(self) -> int:
        return len(self._tables)

    @staticmethod
    def _leaf(gpa: int, perms: int, memory_type: int, large: bool) -> int:
        return int(gpa) | int(perms) | (int(memory_type) << 3) | (0x80 if large else 0)

    def _pd(self, gpa: int, create: bool) -> list[int] | None:
        """The page directory covering `gpa` (creating PDPT/PD tables when asked)."""
        pd = self._pds.get(gpa >> 30)
        if pd is not None:
            return pd
        table = self._tables[self.root]
        for level in (0, 1):
            index = (gpa >> _SHIFTS[level]) & 511
            entry = table[index]
            if not entry & 7:
                if not create:
                    return None
                new = self._alloc()
                table[index] = entry = new | 7
            elif level == 1 and entry & _LARGE:
                raise EptError(f"{gpa:#x} lies in a 1 GiB EPT page; this model maps RAM with 2 MiB pages")
            table = self._tables[entry & ADDRESS_MASK]
        self._pds[gpa >> 30] = table        # PDs are never freed: safe to remember
        return table

    def map(self, gpa: int, size: int, perms: int = Perm.RWX,
            memory_type: EptMemoryType = EptMemoryType.WB) -> None:
        """Identity-map [gpa, gpa+size): 2 MiB pages where aligned, 4 KiB pages elsewhere."""
        end = gpa + size
        while gpa < end:
            pd = self._pd(gpa, True)
            index = (gpa >> 21) & 511
            if gpa % LARGE_PAGE_SIZE == 0 and end - gpa >= LARGE_PAGE_SIZE and not pd[index] & 7:
                pd[index] = self._leaf(gpa, perms, memory_type, True)
                gpa += LARGE_PAGE_SIZE
                continue
            address, pt = self._pt(pd, index)
            self._store(address, pt, (gpa >> 12) & 511, self._leaf(gpa, perms, memory_type, False))
            gpa += PAGE_SIZE

    def _store(self, address: int, pt: list[int], index: int, value: int) -> None:
        """Write a PTE and keep the table's count of entries per (rights, memory type)."""
        stats = self._stats[address]
        old = pt[index]
        key = old & 0x7F if old else -1
        if stats[key] == 1:
            del stats[key]
        else:
            stats[key] -= 1
        key = value & 0x7F if value else -1
        stats[key] = stats.get(key, 0) + 1
        pt[index] = value

    def _pt(self, pd: list[int], index: int) -> tuple[int, list[int]]:
        """The page table under `pd[index]`, splitting a 2 MiB leaf into 512 4 KiB leaves."""
        entry = pd[index]
        if entry & 7 and not entry & _LARGE:
            address = entry & ADDRESS_MASK
            return address, self._tables[address]
        if entry & _LARGE:    # split: same rights and memory type per 4 KiB
            base = entry & ADDRESS_MASK
            low = entry & 0x7F      # R/W/X, memory type, ignore-PAT
            spare = self._spare.pop(base, None)
            if spare is not None and spare[0] == low:
                pt = spare[1]       # the table this 2 MiB page was merged from: still exact
            else:
                pt = list(range(base | low, (base | low) + LARGE_PAGE_SIZE, PAGE_SIZE))
            address = self._alloc(pt)
            self._stats[address] = {low: 512}
        else:
            address = self._alloc()
            pt = self._tables[address]
            self._stats[address] = {-1: 512}
        pd[index] = address | 7
        return address, pt

    def _try_merge(self, pd: list[int], index: int) -> bool:
        """Turn a page table whose 512 leaves agree back into one 2 MiB leaf (an O(1) check)."""
        entry = pd[index]
        if not entry & 7 or entry & _LARGE:
            return False
        address = entry & ADDRESS_MASK
        stats = self._stats[address]
        if len(stats) != 1 or -1 in stats:      # rights differ, or part of the 2 MiB is not RAM
            return False
        pt = self._tables.pop(address)
        del self._stats[address]
        base, low = pt[0] & ADDRESS_MASK, pt[0] & 0x7F
        pd[index] = base | low | _LARGE
        self._spare[base] = (low, pt)     # kept to split again without building 512 new entries
        return True

    def set_perms(self, gpa: int, size: int, perms: int) -> None:
        """Give [gpa, gpa+size) (page aligned, mapped) the rights `perms`, splitting and merging."""
        perms = int(perms)
        end = gpa + size
        while gpa < end:
            pd = self._pd(gpa, False)
            index = (gpa >> 21) & 511
            if pd is None or not pd[index]:
                raise EptError(f"guest-physical address {gpa:#x} is not mapped by the EPT")
            chunk_end = min(end, (gpa | (LARGE_PAGE_SIZE - 1)) + 1)
            entry = pd[index]
            if entry & _LARGE and gpa % LARGE_PAGE_SIZE == 0 and chunk_end - gpa == LARGE_PAGE_SIZE:
                pd[index] = (entry & ~7) | perms
            elif entry & _LARGE and entry & 7 == perms:
                pass
            else:
                address, pt = self._pt(pd, index)
                for page in range(gpa, chunk_end, PAGE_SIZE):
                    i = (page >> 12) & 511
                    old = pt[i]
                    if not old:
                        raise EptError(f"guest-physical address {page:#x} is not mapped by the EPT")
                    if old & 7 != perms:
                        self._store(address, pt, i, (old & ~7) | perms)
                self._try_merge(pd, index)
            gpa = chunk_end

    def walk(self, gpa: int) -> EptWalk:
        """Walk the EPT for `gpa` (SDM 29.3.2)."""
        entries: list[int] = []
        perms = 7
        address = self.root
        for level in range(4):
            table = self._tables.get(address)
            entry = table[(gpa >> _SHIFTS[level]) & 511] if table is not None else 0
            entries.append(entry)
            perms &= entry
            if not entry & 7:
                return EptWalk(gpa, tuple(entries), False)
            if level == 3 or (level in (1, 2) and entry & _LARGE):
                size = 1 << _SHIFTS[level]
                hpa = (entry & ADDRESS_MASK & ~(size - 1)) | (gpa & (size - 1))
                return EptWalk(gpa, tuple(entries), True, Perm(perms & 7), size,
                               EptMemoryType((entry >> 3) & 7), hpa)
            address = entry & ADDRESS_MASK
        raise AssertionError("unreachable")

    def perms(self, gpa: int) -> int:
        """The effective R/W/X bits for `gpa` (0 when unmapped): the hot-path walk.

        PML4E and PDPTE of RAM always grant R/W/X, so the walk starts at the PD.
        """
        pd = self._pds.get(gpa >> 30)
        if pd is None:
            return 0
        e = pd[(gpa >> 21) & 511]
        if e & _LARGE or not e & 7:
            return e & 7
        return self._tables[e & ADDRESS_MASK][(gpa >> 12) & 511] & 7

    def mark(self, gpa: int, bits: int) -> None:
        """Set accessed/dirty bits in the leaf for `gpa` (as the processor does with A/D enabled)."""
        pd = self._pd(gpa, False)
        if pd is None:
            return
        index = (gpa >> 21) & 511
        if pd[index] & _LARGE:
            pd[index] |= bits
        elif pd[index] & 7:
            self._tables[pd[index] & ADDRESS_MASK][(gpa >> 12) & 511] |= bits

    def page_runs(self, gpa: int, size: int) -> list[tuple[int, int, int]]:
        """[(gpa, size, perms)] runs of equal rights covering [gpa, gpa+size)."""
        runs: list[tuple[int, int, int]] = []
        end = gpa + size
        while gpa < end:
            pd = self._pd(gpa, False)
            index = (gpa >> 21) & 511
            entry = pd[index] if pd is not None else 0
            chunk_end = min(end, (gpa | (LARGE_PAGE_SIZE - 1)) + 1)
            if not entry & 7 or entry & _LARGE:
                _extend(runs, gpa, chunk_end - gpa, entry & 7)
            else:
                pt = self._tables[entry & ADDRESS_MASK]
                for page in range(gpa, chunk_end, PAGE_SIZE):
                    _extend(runs, page, PAGE_SIZE, pt[(page >> 12) & 511] & 7)
            gpa = chunk_end
        return runs


def _extend(runs: list[tuple[int, int, int]], gpa: int, size: int, value: int) -> None:
    if runs and runs[-1][2] == value and runs[-1][0] + runs[-1][1] == gpa:
        start, length, _ = runs[-1]
        runs[-1] = (start, length + size, value)
    else:
        runs.append((gpa, size, value))


