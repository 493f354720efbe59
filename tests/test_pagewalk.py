"""The software page walker against page tables built in guest memory (no guest runs)."""
from __future__ import annotations

import struct

import pytest

from minivmm.memory import GuestMemory
from minivmm.pagewalk import (CR0_PG, CR0_WP, CR4_PAE, CR4_PSE, EFER_LMA, EFER_NXE, PageFault,
                              PfErrorCode, read_virtual, translate, write_virtual)

P, RW, US, PS = 1, 2, 4, 0x80
XD = 1 << 63
CR0 = 1 | CR0_PG | CR0_WP
MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
def memory():
    mem = GuestMemory()
    mem.add_region(0, 8 * MiB)
    yield mem
    mem.close()


def q(memory: GuestMemory, table: int, index: int, value: int) -> None:
    memory.write(table + index * 8, struct.pack("<Q", value))


def d(memory: GuestMemory, table: int, index: int, value: int) -> None:
    memory.write(table + index * 4, struct.pack("<I", value))


class Regs:
    def __init__(self, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        self.cr0, self.cr3, self.cr4, self.efer = cr0, cr3, cr4, efer


# --- 4-level paging -----------------------------------------------------------------------
PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
LONG = dict(cr0=CR0, cr3=PML4, cr4=CR4_PAE, efer=EFER_LMA | EFER_NXE | (1 << 8))


@pytest.fixture
def long_tables(memory):
    """0x0-0x1fffff: 4 KiB pages via PT (page 0x5000 read-only, 0x6000 supervisor, 0x7000 absent,
    0x8000 no-execute); 0x200000: a 2 MiB page onto 0x400000; 1 GiB at 0x40000000 onto 0."""
    q(memory, PML4, 0, PDPT | P | RW | US)
    q(memory, PDPT, 0, PD | P | RW | US)
    q(memory, PDPT, 1, 0 | P | RW | US | PS)                  # 1 GiB page -> gpa 0
    q(memory, PD, 0, PT | P | RW | US)
    q(memory, PD, 1, 0x400000 | P | RW | US | PS)             # 2 MiB page -> 0x400000
    for i in range(16):
        q(memory, PT, i, (0x100000 + (i << 12)) | P | RW | US)
    q(memory, PT, 5, 0x105000 | P | US)                       # read-only
    q(memory, PT, 6, 0x106000 | P | RW)                       # supervisor only
    q(memory, PT, 7, 0)                                       # not present
    q(memory, PT, 8, 0x108000 | P | RW | US | XD)             # no-execute
    return memory


def t(memory, gva, access="r", user=False, **regs):
    regs = {**LONG, **regs}
    return translate(memory, regs["cr0"], regs["cr3"], regs["cr4"], regs["efer"], gva, access, user)


def test_4level_4k_page(long_tables) -> None:
    tr = t(long_tables, 0x3abc)
    assert tr.gpa == 0x103abc and tr.page_size == 4096
    assert tr.writable and tr.user and tr.executable


def test_4level_2m_page(long_tables) -> None:
    tr = t(long_tables, 0x212345)
    assert tr.gpa == 0x412345
    assert tr.page_size == 2 * MiB


def test_4level_1g_page(long_tables) -> None:
    tr = t(long_tables, GiB + 0x123456)
    assert tr.gpa == 0x123456 and tr.page_size == GiB


def test_4level_not_present_names_the_entry(long_tables) -> None:
    with pytest.raises(PageFault, match=r"PTE\[0x7\] not present") as info:
        t(long_tables, 0x7000, "w", user=True)
    assert info.value.error_code == PfErrorCode.W | PfErrorCode.U
    with pytest.raises(PageFault, match=r"PML4E\[0x1\] not present"):
        t(long_tables, 1 << 39)
    with pytest.raises(PageFault, match=r"PDPTE\[0x2\] not present"):
        t(long_tables, 2 * GiB)


def test_4level_rights(long_tables) -> None:
    assert not t(long_tables, 0x5000).writable
    with pytest.raises(PageFault, match="write to read-only page") as info:
        t(long_tables, 0x5000, "w")
    assert info.value.error_code == PfErrorCode.P | PfErrorCode.W
    # CR0.WP = 0: supervisor writes to read-only pages succeed
    assert t(long_tables, 0x5000, "w", cr0=CR0 & ~CR0_WP).gpa == 0x105000
    with pytest.raises(PageFault, match="user access to supervisor page") as info:
        t(long_tables, 0x6010, user=True)
    assert info.value.error_code == PfErrorCode.P | PfErrorCode.U
    assert t(long_tables, 0x6010).gpa == 0x106010            # supervisor may
    with pytest.raises(PageFault, match="execute-disable") as info:
        t(long_tables, 0x8000, "x")
    assert info.value.error_code & PfErrorCode.I
    assert t(long_tables, 0x8000, "r").gpa == 0x108000


def test_4level_reserved_and_canonical(long_tables) -> None:
    with pytest.raises(PageFault, match="non-canonical"):
        t(long_tables, 1 << 47)
    with pytest.raises(PageFault, match="XD set while IA32_EFER.NXE = 0") as info:
        t(long_tables, 0x8000, efer=EFER_LMA)
    assert info.value.error_code & PfErrorCode.RSVD


def test_no_paging_is_identity(memory) -> None:
    tr = translate(memory, 1, 0, 0, 0, 0x123456)
    assert tr.gpa == 0x123456 and tr.writable and tr.user


# --- PAE paging ---------------------------------------------------------------------------
PAE_PDPT, PAE_PD, PAE_PT = 0x20000, 0x21000, 0x22000


def test_pae_4k_2m_not_present_and_nx(memory) -> None:
    regs = dict(cr0=CR0, cr3=PAE_PDPT, cr4=CR4_PAE, efer=EFER_NXE)
    q(memory, PAE_PDPT, 0, PAE_PD | P)
    q(memory, PAE_PD, 0, PAE_PT | P | RW | US)
    q(memory, PAE_PD, 1, 0x600000 | P | RW | PS)              # 2 MiB, supervisor
    q(memory, PAE_PT, 3, 0x123000 | P | US | XD)               # read-only, no-execute, user

    def tr(gva, access="r", user=False):
        return translate(memory, regs["cr0"], regs["cr3"], regs["cr4"], regs["efer"], gva, access, user)

    assert tr(0x3456).gpa == 0x123456 and tr(0x3456).page_size == 4096
    assert tr(0x200000 + 0x1234).gpa == 0x601234 and tr(0x201234).page_size == 2 * MiB
    with pytest.raises(PageFault, match=r"PTE\[0x4\] not present"):
        tr(0x4000)
    with pytest.raises(PageFault, match=r"PDPTE\[0x1\] not present"):
        tr(GiB)
    with pytest.raises(PageFault, match="write to read-only page"):
        tr(0x3000, "w", user=True)
    with pytest.raises(PageFault, match="execute-disable"):
        tr(0x3000, "x")
    with pytest.raises(PageFault, match="user access to supervisor page"):
        tr(0x200000, user=True)


# --- 32-bit paging --------------------------------------------------------------------------
PD32, PT32 = 0x30000, 0x31000


def test_32bit_4k_4m_and_rights(memory) -> None:
    d(memory, PD32, 0, PT32 | P | RW | US)
    d(memory, PD32, 1, 0x400000 | P | RW | US | PS)           # 4 MiB page (with CR4.PSE)
    d(memory, PD32, 2, 0x800000 | P | RW | US | PS | (1 << 13))   # PSE-36: bit 32 of the address
    d(memory, PT32, 1, 0x7000 | P | US)                       # read-only user page
    d(memory, PT32, 2, 0x9000 | P | RW)                       # supervisor page

    def tr(gva, access="r", user=False, cr4=CR4_PSE):
        return translate(memory, CR0, PD32, cr4, 0, gva, access, user)

    assert tr(0x1abc).gpa == 0x7abc and tr(0x1abc).page_size == 4096
    assert tr(0x400000 + 0x12345).gpa == 0x412345 and tr(0x412345).page_size == 4 * MiB
    assert tr(0x800000 + 0x10).gpa == (1 << 32) | 0x800010
    with pytest.raises(PageFault, match=r"PTE\[0x3\] not present"):
        tr(0x3000)
    with pytest.raises(PageFault, match=r"PDE\[0x3\] not present"):
        tr(0xC00000)
    with pytest.raises(PageFault, match="write to read-only page"):
        tr(0x1000, "w", user=True)
    with pytest.raises(PageFault, match="user access to supervisor page"):
        tr(0x2000, user=True)
    assert tr(0x1000).executable           # no NX in 32-bit paging


def test_32bit_ps_without_pse_points_to_a_table(memory) -> None:
    d(memory, PD32, 1, PT32 | P | RW | US | PS)
    d(memory, PT32, 0, 0x5000 | P | RW | US)
    assert translate(memory, CR0, PD32, 0, 0, 0x400123).gpa == 0x5123


def test_bad_access_and_tables_outside_ram(memory) -> None:
    with pytest.raises(ValueError, match="bad access"):
        translate(memory, CR0, PML4, CR4_PAE, EFER_LMA, 0, "q")
    with pytest.raises(PageFault, match="outside guest RAM"):
        translate(memory, CR0, 0x10000000, CR4_PAE, EFER_LMA, 0)


def test_read_and_write_virtual_cross_pages(long_tables) -> None:
    regs = Regs(**LONG)
    # linear 0x1ffe-0x2001 spans two 4 KiB pages mapped to 0x101ffe and 0x102000
    write_virtual(long_tables, regs, 0x1FFE, b"ABCD")
    assert long_tables.read(0x101FFE, 2) == b"AB" and long_tables.read(0x102000, 2) == b"CD"
    assert read_virtual(long_tables, regs, 0x1FFE, 4) == b"ABCD"
    with pytest.raises(PageFault, match=r"PTE\[0x7\] not present"):
        write_virtual(long_tables, regs, 0x6FFE, b"XYZW")
    assert long_tables.read(0x106FFE, 2) == b"\0\0"          # nothing written on a fault


def test_linear_addresses_reverse_walk(long_tables, memory) -> None:
    from minivmm.pagewalk import linear_addresses
    # 0x103abc is mapped at 0x3abc (4 KiB page) and at 1 GiB + 0x103abc (the 1 GiB page onto 0)
    assert linear_addresses(long_tables, **LONG, gpa=0x103ABC) == [0x3ABC, GiB + 0x103ABC]
    assert linear_addresses(long_tables, **LONG, gpa=0x412345) == [0x212345, GiB + 0x412345]
    assert linear_addresses(long_tables, **LONG, gpa=0x103ABC, limit=1) == [0x3ABC]
    assert linear_addresses(memory, 1, 0, 0, 0, 0x5000) == [0x5000]          # no paging
    d(memory, PD32, 1, 0x400000 | P | RW | PS)
    assert linear_addresses(memory, CR0, PD32, CR4_PSE, 0, 0x400010) == [0x400010]
