"""CPU mode setup: real, protected (32-bit flat), long (64-bit identity) and user (CPL 3).

Protected, long and user mode use a system area that minivmm writes into the
first 64 KiB of guest RAM (bare images are loaded at 1 MiB by default):

| GPA            | contents                                                    |
|----------------|-------------------------------------------------------------|
| 0x1000         | GDT (selectors below)                                       |
| 0x2000         | IDT, 256 gates (user mode)                                  |
| 0x3000-0x8fff  | PML4, PDPT, 4 page directories (2 MiB pages, 4 GiB)         |
| 0x9000         | page table of the first 2 MiB (user mode)                   |
| 0xa000         | built-in kernel: one 16-byte stub per vector (user mode)    |
| 0xb000         | 64-bit TSS, then its I/O permission bitmap (all ports open)  |
| 0xe000-0xffff  | kernel stack (TSS.RSP0 = 0x10000)                           |

GDT selectors: 0x08 64-bit code, 0x10 data, 0x18 32-bit code (ring 0);
0x23 data, 0x2b 64-bit code (ring 3); 0x30 TSS.

User mode is the built-in kernel: user code runs at CPL 3 and may use every I/O port
directly (IOPL 3 and an all-zero TSS I/O bitmap; hosts differ in which they honour), every exception vector
goes through an IDT stub that pushes the vector (and a zero error code where
the CPU pushes none) and reports it with `out %al, $EXCEPTION_PORT`. The VMM
reads the frame from the kernel stack. The stubs avoid every instruction the
PVM host cannot emulate at CPL 0. Page 0 is not present in user mode, so a
NULL dereference is a page fault.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from .exits import EXCEPTIONS_WITH_ERROR_CODE
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


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((limit >> 16) & 0xF) | (flags << 4), (base >> 24) & 0xFF)


def _gdt() -> bytes:
    tss = _descriptor(TSS_ADDR, TSS_LIMIT, 0x89, 0) + struct.pack("<II", TSS_ADDR >> 32, 0)
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


def _idt() -> bytes:
    gates = []
    for vector in range(256):
        handler = STUBS_ADDR + vector * STUB_SIZE
        dpl = 3 if vector in (3, 4) else 0                     # int3 / into allowed from CPL 3
        gates.append(struct.pack("<HHBBHII", handler & 0xFFFF, SEL_CODE64, 0, 0x8E | (dpl << 5),
                                 (handler >> 16) & 0xFFFF, handler >> 32, 0))
    return b"".join(gates)


def _page_tables(memory: GuestMemory, user: bool) -> None:
    """Identity map with 2 MiB pages; in user mode only RAM, user-accessible above the system area."""
    mapped_limit = IDENTITY_MAP_LIMIT
    if user:
        mapped_limit = min(IDENTITY_MAP_LIMIT, max(r.end for r in memory.regions))
    memory.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | PTE_P | PTE_RW | PTE_US).ljust(4096, b"\0"))
    pdpt = b"".join(struct.pack("<Q", (PD_ADDR + i * 4096) | PTE_P | PTE_RW | PTE_US) for i in range(4))
    memory.write(PDPT_ADDR, pdpt.ljust(4096, b"\0"))
    user_bit = PTE_US if user else 0
    entries = []
    for i in range(4 * 512):
        gpa = i << 21
        if gpa >= mapped_limit or (user and not memory.is_mapped(gpa)):
            entries.append(0)
        elif i == 0 and user:
            entries.append(PT_LOW_ADDR | PTE_P | PTE_RW | PTE_US)
        else:
            entries.append(gpa | PTE_P | PTE_RW | PTE_PS | user_bit)
    memory.write(PD_ADDR, struct.pack("<2048Q", *entries))
    if user:
        low = [0] + [
            (i << 12) | PTE_P | PTE_RW | (PTE_US if (i << 12) >= SYSTEM_AREA_END else 0)
            if memory.is_mapped(i << 12) else 0
            for i in range(1, 512)]
        memory.write(PT_LOW_ADDR, struct.pack("<512Q", *low))


def _flat(selector: int, code: bool, dpl: int = 0, long: bool = False) -> Segment:
    return Segment(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB if code else 0x3,
                   present=1, dpl=dpl, db=0 if long else 1, s=1, l=int(long), g=1)


def setup_mode(vcpu: Vcpu, memory: GuestMemory, mode: Mode, entry: int, stack: int) -> None:
    """Put `vcpu` into `mode` at `entry` with the stack pointer at `stack`."""
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

    if memory.region_at(0) is None or memory.region_at(0).end < SYSTEM_AREA_END:
        raise GuestMemoryError(f"{mode.value} mode needs RAM at [0, {SYSTEM_AREA_END:#x}) for its "
                               "GDT, TSS, IDT and page tables")
    memory.write(GDT_ADDR, _gdt())
    tss = bytearray(TSS_SIZE + IO_BITMAP_SIZE) + b"\xff"
    struct.pack_into("<Q", tss, 4, KERNEL_STACK_TOP)     # RSP0
    struct.pack_into("<H", tss, 0x66, TSS_SIZE)          # I/O permission bitmap offset
    memory.write(TSS_ADDR, bytes(tss))
    gdt_limit = len(_gdt()) - 1
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, gdt_limit
    Segment(selector=SEL_TSS, base=TSS_ADDR, limit=TSS_LIMIT, type=0xB, s=0, g=0, db=0).to_kvm(sregs.tr)
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
    _page_tables(memory, user)
    sregs.cr3 = PML4_ADDR
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE
    if user:
        memory.write(IDT_ADDR, _idt())
        memory.write(STUBS_ADDR, b"".join(_stub(v) for v in range(256)))
        sregs.idt.base, sregs.idt.limit = IDT_ADDR, 256 * 16 - 1
        _flat(SEL_USER_CODE64, True, dpl=3, long=True).to_kvm(sregs.cs)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _flat(SEL_USER_DATA, False, dpl=3).to_kvm(getattr(sregs, name))
        rflags = RFLAGS_FIXED | RFLAGS_IOPL3
    else:
        _flat(SEL_CODE64, True, long=True).to_kvm(sregs.cs)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _flat(SEL_DATA, False).to_kvm(getattr(sregs, name))
        rflags = RFLAGS_FIXED
    vcpu.set_sregs(sregs)
    vcpu.rip, vcpu.rsp, vcpu.rflags = entry, stack, rflags


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
