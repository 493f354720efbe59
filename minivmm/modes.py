"""CPU mode setup: real, protected (32-bit flat), long (64-bit identity) and user (CPL 3).

Protected, long and user mode use a 64 KiB system area that minivmm writes into
guest RAM, at base 0 unless a loaded image is there (bare images are loaded at
1 MiB by default). Offsets from the base:

| offset         | contents                                                    |
|----------------|-------------------------------------------------------------|
| 0x1000         | GDT (selectors below)                                       |
| 0x2000         | IDT, 256 gates (user mode)                                  |
| 0x3000-0x8fff  | PML4, PDPT, 4 page directories (2 MiB pages, 4 GiB)         |
| 0x9000         | page table of the first 2 MiB (user mode)                   |
| 0xa000         | built-in kernel: one 16-byte stub per vector (user mode)    |
| 0xb000         | 64-bit TSS, then its I/O permission bitmap (all ports open)  |
| 0xe000-0xffff  | kernel stack (TSS.RSP0 = 0x10000)                           |

Each mode writes only the structures it needs (`structures_for`): protected mode
the GDT and TSS, long mode also the page tables, user mode all of them. At setup
`choose_system_base` keeps base 0 when no image overlaps those structures, else
picks the lowest free 64 KiB-aligned base in RAM below 4 GiB (outside the PC's
0xA0000-0xFFFFF hole and the page below the initial stack pointer). User mode's
area cannot move (the exception path recognises the stubs at their fixed
address), so there an overlap is a `SystemAreaError` naming the image and the
structure. A multiboot kernel gets no system area at all (`setup_mode(...,
tables=False)`): the segment registers' hidden parts come from KVM_SET_SREGS,
and the kernel must load its own GDT before it loads a segment register
(Multiboot 0.6.96 section 3.2, "Machine state": "the GDTR may be invalid").

GDT selectors: 0x08 64-bit code, 0x10 data, 0x18 32-bit code (ring 0);
0x23 data, 0x2b 64-bit code (ring 3); 0x30 TSS.

User mode is the built-in kernel: user code runs at CPL 3 and may use every I/O port
directly (IOPL 3 and an all-zero TSS I/O bitmap; hosts differ in which they honour), every exception vector
goes through an IDT stub that pushes the vector (and a zero error code where
the CPU pushes none) and reports it with `out %al, $EXCEPTION_PORT`. The VMM
reads the frame from the kernel stack. The stubs avoid every instruction the
PVM host cannot emulate at CPL 0. Page 0 is not present in user mode, so a
NULL dereference is a page fault.

`syscall` in user mode (EFER.SCE set, LSTAR = SYSCALL_EXIT_ADDR, STAR and FMASK as
Linux sets them) jumps to a page that guest paging maps but no memslot backs.
Hosts differ in what the CPU does first (see kvm-host-notes.md): on the PVM hosts
the CPL stays 3, on plain VT-x it becomes 0 with CS = STAR[47:32]; either way
the fetch from the memslot hole is an emulation failure KVM reports as
KVM_EXIT_INTERNAL_ERROR at RIP = SYSCALL_EXIT_ADDR with RAX and the arguments
intact (at CPL 3 KVM may inject #UD instead on other hosts: that arrives as a #UD
exit and is reported as such). The translator recognises the address; the run loop
reads the CPL it finds and returns to CPL 3 as `sysretq` would
(`minivmm.syscalls`).
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, Sequence

from .exits import EXCEPTIONS_WITH_ERROR_CODE
from .kvm import KvmError
from .memory import GuestMemory, GuestMemoryError
from .vcpu import Segment, Vcpu


class Mode(str, Enum):
    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"
    USER = "user"


GDT_ADDR = 0x1000
TSS_ADDR = 0xB000
TSS_SIZE = 0x68
IO_BITMAP_SIZE = 0x10000 // 8
TSS_LIMIT = TSS_SIZE + IO_BITMAP_SIZE      # one extra all-ones byte ends the bitmap
IDT_ADDR = 0x2000
PML4_ADDR = 0x3000
PDPT_ADDR = 0x4000
PD_ADDR = 0x5000
PT_LOW_ADDR = 0x9000
STUBS_ADDR = 0xA000
STUB_SIZE = 16
KERNEL_STACK_TOP = 0x10000
SYSTEM_AREA_END = 0x10000
SYSTEM_AREA_SIZE = 0x10000
GDT_SIZE = 8 * 6 + 16

EXCEPTION_PORT = 0xF6
HYPERCALL_PORT = 0xF5

SEL_CODE64, SEL_DATA, SEL_CODE32 = 0x08, 0x10, 0x18
SEL_USER_DATA, SEL_USER_CODE64, SEL_TSS = 0x23, 0x2B, 0x30

DEFAULT_LOAD_ADDRESS = {Mode.REAL: 0x7C00, Mode.PROTECTED: 0x100000, Mode.LONG: 0x100000,
                        Mode.USER: 0x100000}
CODE_BITS = {Mode.REAL: 16, Mode.PROTECTED: 32, Mode.LONG: 64, Mode.USER: 64}

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
RFLAGS_FIXED, RFLAGS_IF, RFLAGS_IOPL3 = 0x2, 0x200, 0x3000
PTE_P, PTE_RW, PTE_US, PTE_PS = 1, 2, 4, 0x80

IDENTITY_MAP_LIMIT = 4 << 30

SYSCALL_EXIT_ADDR = 0xFFE00000
"""Where `syscall` goes in user mode: a 2 MiB page mapped user-accessible onto a GPA no
memslot backs (the top of the 4 GiB identity map), so the fetch there exits."""
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
STAR_VALUE = (0x1B << 48) | (SEL_CODE64 << 32)
"""SYSCALL loads CS = 0x08 (SS 0x10); SYSRET loads CS = 0x1b + 16 = 0x2b, SS = 0x23."""
FMASK_VALUE = 0x47700
"""RFLAGS bits SYSCALL clears, as Linux: TF, IF, DF, IOPL, NT, AC."""


class SystemStructure(NamedTuple):
    """One structure of the system area: [base + offset, base + offset + size)."""
    name: str
    offset: int
    size: int
    modes: frozenset[Mode]


_PAGED = frozenset({Mode.LONG, Mode.USER})
_ALL = frozenset({Mode.PROTECTED, Mode.LONG, Mode.USER})
_USER = frozenset({Mode.USER})
SYSTEM_STRUCTURES = (
    SystemStructure("GDT", GDT_ADDR, GDT_SIZE, _ALL),
    SystemStructure("IDT", IDT_ADDR, 256 * 16, _USER),
    SystemStructure("page tables", PML4_ADDR, PT_LOW_ADDR - PML4_ADDR, _PAGED),
    SystemStructure("low page table", PT_LOW_ADDR, 0x1000, _USER),
    SystemStructure("kernel stubs", STUBS_ADDR, 256 * STUB_SIZE, _USER),
    SystemStructure("TSS and I/O bitmap", TSS_ADDR, TSS_LIMIT + 1, _ALL),
    SystemStructure("kernel stack", KERNEL_STACK_TOP - 0x2000, 0x2000, _USER),
)
LEGACY_HOLE = (0xA0000, 0x100000)
"""VGA memory, option ROMs, ACPI tables and BIOS on a PC: never a relocated system area."""


class ImageRange(NamedTuple):
    """Guest-physical bytes [start, end) that a loaded image owns; `name` says which image.
    The last `bss` bytes are zero-fill (an ELF's p_memsz beyond p_filesz): a later image
    may be loaded inside them, as into a buffer the image leaves for it."""
    start: int
    end: int
    name: str
    bss: int = 0

    def __str__(self) -> str:
        return f"{self.name} [{self.start:#x}, {self.end:#x})"


class SystemAreaError(GuestMemoryError):
    """No place for the system area: an image covers a structure the mode needs
    (`image` is that image's range when one is to blame)."""

    def __init__(self, message: str, image: ImageRange | None = None) -> None:
        super().__init__(message)
        self.image = image


def structures_for(mode: Mode | str) -> list[SystemStructure]:
    """The system-area structures `mode` writes into guest RAM (none in real mode)."""
    mode = Mode(mode)
    return [s for s in SYSTEM_STRUCTURES if mode in s.modes]


def _collisions(mode: Mode, base: int, images: Sequence[ImageRange]) -> list[tuple[ImageRange, str, int, int]]:
    """(image, structure name, start, end) for each image byte range over a structure at `base`."""
    found = []
    for structure in structures_for(mode):
        start = base + structure.offset
        end = start + structure.size
        found += [(image, structure.name, start, end) for image in images
                  if image.start < end and start < image.end]
    return found


def _window_usable(base: int, ram: Sequence[tuple[int, int]], stack: int | None) -> bool:
    """Whether [base, base + 64 KiB) is inside one RAM range, outside the legacy hole, and
    does not hold the page below the initial stack pointer."""
    end = base + SYSTEM_AREA_SIZE
    if not any(start <= base and end <= stop for start, stop in ram):
        return False
    if base < LEGACY_HOLE[1] and LEGACY_HOLE[0] < end:
        return False
    return stack is None or not (base < stack and stack - 0x1000 < end)


def choose_system_base(mode: Mode | str, images: Sequence[ImageRange], ram: Sequence[tuple[int, int]],
                       stack: int | None = None) -> int:
    """The base of `mode`'s system area: 0 when RAM holds [0, 64 KiB) and no image overlaps
    the mode's structures there, else (not in user mode) the lowest 64 KiB-aligned base
    below 4 GiB where RAM holds the area and no image overlaps a structure.

    `ram` lists guest RAM as (start, end) ranges; `stack` is the initial stack pointer.
    Raises SystemAreaError naming the image and the structure it covers."""
    mode = Mode(mode)
    if not any(start <= 0 and SYSTEM_AREA_SIZE <= end for start, end in ram):
        if mode is Mode.USER or not ram:
            raise SystemAreaError(f"{mode.value} mode needs RAM at [0, {SYSTEM_AREA_END:#x}) for its "
                                  "GDT, TSS, IDT and page tables")
    else:
        clashes = _collisions(mode, 0, images)
        if not clashes:
            return 0
        if mode is Mode.USER:
            image, name, start, end = clashes[0]
            raise SystemAreaError(f"{image} overlaps minivmm's {name} at [{start:#x}, {end:#x}) "
                                  "(user mode's system area is fixed at [0, 0x10000): load the image "
                                  "elsewhere)", image)
    for base in _candidate_bases(ram):
        if _window_usable(base, ram, stack) and not _collisions(mode, base, images):
            return base
    first = _collisions(mode, 0, images)
    detail = f": {first[0][0]} overlaps minivmm's {first[0][1]} at [{first[0][2]:#x}, {first[0][3]:#x})" \
        if first else ""
    raise SystemAreaError(f"no room for minivmm's {mode.value} mode system area (64 KiB of RAM below "
                          f"4 GiB that no image uses){detail}", first[0][0] if first else None)


def _candidate_bases(ram: Sequence[tuple[int, int]]) -> list[int]:
    """Every 64 KiB-aligned base inside a RAM range, below 4 GiB, lowest first."""
    bases: set[int] = set()
    for start, end in ram:
        first = -(-start // SYSTEM_AREA_SIZE) * SYSTEM_AREA_SIZE
        stop = min(end, IDENTITY_MAP_LIMIT) - SYSTEM_AREA_SIZE
        bases.update(range(first, stop + 1, SYSTEM_AREA_SIZE))
    return sorted(bases)


def default_stack(mode: Mode | str, low_ram_end: int) -> int:
    """The initial stack pointer when none is given: 0x7c00 in real mode, else the top of the
    RAM at 0 (below 4 GiB; 16 bytes lower in user mode)."""
    mode = Mode(mode)
    if mode is Mode.REAL:
        return DEFAULT_LOAD_ADDRESS[Mode.REAL]
    top = min(low_ram_end, 1 << 32)
    return top - 16 if mode is Mode.USER else top


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((limit >> 16) & 0xF) | (flags << 4), (base >> 24) & 0xFF)


def _gdt(base: int = 0) -> bytes:
    """The GDT of a system area at `base` (its TSS descriptor points into the area)."""
    tss_addr = base + TSS_ADDR
    tss = _descriptor(tss_addr, TSS_LIMIT, 0x89, 0) + struct.pack("<II", tss_addr >> 32, 0)
    return b"".join([
        bytes(8),
        _descriptor(0, 0xFFFFF, 0x9B, 0xA),   # 0x08 code64, DPL 0
        _descriptor(0, 0xFFFFF, 0x93, 0xC),   # 0x10 data, DPL 0
        _descriptor(0, 0xFFFFF, 0x9B, 0xC),   # 0x18 code32, DPL 0
        _descriptor(0, 0xFFFFF, 0xF3, 0xC),   # 0x20 data, DPL 3
        _descriptor(0, 0xFFFFF, 0xFB, 0xA),   # 0x28 code64, DPL 3
        tss,                                  # 0x30 TSS (16 bytes)
    ])


def _stub(vector: int) -> bytes:
    code = b"" if vector in EXCEPTIONS_WITH_ERROR_CODE else b"\x6a\x00"   # push $0
    code += b"\x68" + struct.pack("<I", vector)                           # push $vector
    code += bytes([0xE6, EXCEPTION_PORT])                                 # out %al, $port
    code += b"\x48\x83\xc4\x10\x48\xcf"                                   # add $16,%rsp; iretq
    return code.ljust(STUB_SIZE, b"\xf4")


@functools.lru_cache(maxsize=1)
def _stubs() -> bytes:
    return b"".join(_stub(v) for v in range(256))


@functools.lru_cache(maxsize=1)
def _idt() -> bytes:
    gates = []
    for vector in range(256):
        handler = STUBS_ADDR + vector * STUB_SIZE
        dpl = 3 if vector in (3, 4) else 0                     # int3 / into allowed from CPL 3
        gates.append(struct.pack("<HHBBHII", handler & 0xFFFF, SEL_CODE64, 0, 0x8E | (dpl << 5),
                                 (handler >> 16) & 0xFFFF, handler >> 32, 0))
    return b"".join(gates)


def _page_tables(memory: GuestMemory, user: bool, base: int = 0) -> None:
    """Identity map with 2 MiB pages, tables in the system area at `base`; in user mode only
    RAM, user-accessible above the system area (user mode's base is always 0)."""
    ram = tuple((region.gpa, region.end) for region in memory.regions)
    for address, table in _page_table_images(user, base, ram if user else ()):
        memory.write(address, table)


@functools.lru_cache(maxsize=16)
def _page_table_images(user: bool, base: int, ram: tuple[tuple[int, int], ...]) -> tuple[tuple[int, bytes], ...]:
    """(address, bytes) of each table `_page_tables` writes; `ram` the (start, end) of each
    region in user mode (the tables map nothing else), empty otherwise."""
    def mapped(gpa: int) -> bool:
        return any(start <= gpa < end for start, end in ram)
    mapped_limit = IDENTITY_MAP_LIMIT
    if user:
        mapped_limit = min(IDENTITY_MAP_LIMIT, max(end for _, end in ram))
    pml4, pdpt_addr, pd_addr = base + PML4_ADDR, base + PDPT_ADDR, base + PD_ADDR
    tables = [(pml4, struct.pack("<Q", pdpt_addr | PTE_P | PTE_RW | PTE_US).ljust(4096, b"\0"))]
    pdpt = b"".join(struct.pack("<Q", (pd_addr + i * 4096) | PTE_P | PTE_RW | PTE_US) for i in range(4))
    tables.append((pdpt_addr, pdpt.ljust(4096, b"\0")))
    user_bit = PTE_US if user else 0
    entries = []
    for i in range(4 * 512):
        gpa = i << 21
        if user and gpa == SYSCALL_EXIT_ADDR and not mapped(gpa):
            entries.append(gpa | PTE_P | PTE_US | PTE_PS)       # the syscall exit page: a hole
        elif gpa >= mapped_limit or (user and not mapped(gpa)):
            entries.append(0)
        elif i == 0 and user:
            entries.append(PT_LOW_ADDR | PTE_P | PTE_RW | PTE_US)
        else:
            entries.append(gpa | PTE_P | PTE_RW | PTE_PS | user_bit)
    tables.append((pd_addr, struct.pack("<2048Q", *entries)))
    if user:
        low = [0] + [
            (i << 12) | PTE_P | PTE_RW | (PTE_US if (i << 12) >= SYSTEM_AREA_END else 0)
            if mapped(i << 12) else 0
            for i in range(1, 512)]
        tables.append((PT_LOW_ADDR, struct.pack("<512Q", *low)))
    return tuple(tables)


def _flat(selector: int, code: bool, dpl: int = 0, long: bool = False) -> Segment:
    return Segment(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB if code else 0x3,
                   present=1, dpl=dpl, db=0 if long else 1, s=1, l=int(long), g=1)


def setup_mode(vcpu: Vcpu, memory: GuestMemory, mode: Mode, entry: int, stack: int, *,
               base: int = 0, tables: bool = True) -> None:
    """Put `vcpu` into `mode` at `entry` with the stack pointer at `stack`.

    Outside real mode the system area goes at `base` (see `choose_system_base`;
    user mode only at 0). `tables=False` (protected mode, for a multiboot kernel)
    writes nothing into guest RAM: GDTR is empty and TR's hidden state points at
    no TSS; the flat segments are loaded from KVM_SET_SREGS alone."""
    mode = Mode(mode)
    sregs = vcpu.sregs
    if mode is Mode.REAL:
        if entry > 0xFFFF or stack > 0x10000:
            raise GuestMemoryError(f"real mode entry {entry:#x} and stack {stack:#x} must be below 64 KiB "
                                   "(CS = SS = 0)")
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            Segment(selector=0, base=0, limit=0xFFFF, type=0xB if name == "cs" else 0x3,
                    g=0, db=0).to_kvm(getattr(sregs, name))
        sregs.cr0 = CR0_ET
        sregs.cr4 = sregs.efer = 0
        vcpu.set_sregs(sregs)
        vcpu.rip, vcpu.rsp, vcpu.rflags = entry, stack, RFLAGS_FIXED
        return
    if not tables and mode is not Mode.PROTECTED:
        raise ValueError(f"{mode.value} mode needs its system area in guest RAM (tables=False is for "
                         "protected mode)")
    if mode is Mode.USER and base:
        raise SystemAreaError(f"user mode's system area is fixed at 0, not {base:#x}")
    if tables:
        _write_gdt_and_tss(memory, mode, sregs, base)
    else:
        sregs.gdt.base, sregs.gdt.limit = 0, 0
        Segment(selector=0, base=0, limit=TSS_SIZE - 1, type=0xB, s=0, g=0, db=0).to_kvm(sregs.tr)
    Segment(selector=0, present=0, unusable=1, type=0x2, s=0, g=0).to_kvm(sregs.ldt)

    if mode is Mode.PROTECTED:
        _flat(SEL_CODE32, True).to_kvm(sregs.cs)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _flat(SEL_DATA, False).to_kvm(getattr(sregs, name))
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE
        sregs.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.efer = 0
        vcpu.set_sregs(sregs)
        vcpu.rip, vcpu.rsp, vcpu.rflags = entry, stack, RFLAGS_FIXED
        return

    user = mode is Mode.USER
    _page_tables(memory, user, base)
    sregs.cr3 = base + PML4_ADDR
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE
    if user:
        memory.write(IDT_ADDR, _idt())
        memory.write(STUBS_ADDR, _stubs())
        sregs.idt.base, sregs.idt.limit = IDT_ADDR, 256 * 16 - 1
        _flat(SEL_USER_CODE64, True, dpl=3, long=True).to_kvm(sregs.cs)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _flat(SEL_USER_DATA, False, dpl=3).to_kvm(getattr(sregs, name))
        rflags = RFLAGS_FIXED | RFLAGS_IOPL3
        setup_syscall_msrs(vcpu, SYSCALL_EXIT_ADDR)
    else:
        _flat(SEL_CODE64, True, long=True).to_kvm(sregs.cs)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _flat(SEL_DATA, False).to_kvm(getattr(sregs, name))
        rflags = RFLAGS_FIXED
    vcpu.set_sregs(sregs)
    vcpu.rip, vcpu.rsp, vcpu.rflags = entry, stack, rflags


def setup_syscall_msrs(vcpu: Vcpu, entry: int) -> None:
    """STAR, LSTAR = `entry`, CSTAR and FMASK for user mode's `syscall` (SDM vol. 2, SYSCALL)."""
    try:
        vcpu.fd.set_msrs({MSR_STAR: STAR_VALUE, MSR_LSTAR: entry, MSR_CSTAR: entry, MSR_FMASK: FMASK_VALUE})
    except KvmError as exc:
        raise GuestMemoryError(f"KVM refused user mode's syscall entry MSRs: {exc}") from None


def _write_gdt_and_tss(memory: GuestMemory, mode: Mode, sregs, base: int) -> None:
    """Write the GDT and the TSS (RSP0 = the kernel stack top, I/O bitmap all open) of the
    system area at `base`, and point GDTR and TR at them."""
    region = memory.region_at(base)
    if region is None or region.end < base + SYSTEM_AREA_SIZE:
        raise GuestMemoryError(f"{mode.value} mode needs RAM at [{base:#x}, {base + SYSTEM_AREA_SIZE:#x}) "
                               "for its GDT, TSS, IDT and page tables")
    gdt = _gdt(base)
    memory.write(base + GDT_ADDR, gdt)
    tss = bytearray(TSS_SIZE + IO_BITMAP_SIZE) + b"\xff"
    struct.pack_into("<Q", tss, 4, base + KERNEL_STACK_TOP)     # RSP0
    struct.pack_into("<H", tss, 0x66, TSS_SIZE)                 # I/O permission bitmap offset
    memory.write(base + TSS_ADDR, bytes(tss))
    sregs.gdt.base, sregs.gdt.limit = base + GDT_ADDR, len(gdt) - 1
    Segment(selector=SEL_TSS, base=base + TSS_ADDR, limit=TSS_LIMIT, type=0xB, s=0, g=0,
            db=0).to_kvm(sregs.tr)


@dataclass(frozen=True, slots=True)
class StubFrame:
    """The frame a user-mode IDT stub leaves on the kernel stack when it reports through
    EXCEPTION_PORT: the vector and error code it pushed, then the CPU's interrupt frame."""
    vector: int
    error_code: int
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    SIZE = 56


def decode_stub_frame(raw: bytes) -> StubFrame:
    """The StubFrame in the StubFrame.SIZE bytes at the kernel stack pointer."""
    return StubFrame(*struct.unpack("<7Q", raw[:StubFrame.SIZE]))
