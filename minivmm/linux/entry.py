"""The built-in kernel's system-call entry for Linux programs: `read` of an exposed regular
file without an exit.

LSTAR points at two pages in the program's address space: position-independent
code (read + execute) and its data (read + write): a table of `SLOTS` file slots
(a window of the file's bytes in guest pages, size, position) plus scratch space.
On a host where `syscall` keeps CPL 3 (the PVM hosts, see kvm-host-notes.md) the
code runs natively: a `read` on a slotted fd whose bytes are in the window copies
them, moves the position and returns to RCX with RFLAGS = R11, as `sysretq` would;
one outside the window exits and the host serves it and refills the window.
Anything else (another call, an fd without a slot, CPL 0 on a plain VT-x host)
jumps to SYSCALL_EXIT_ADDR with every register as `syscall` left it, so the VMM
sees the exit it would see without this entry.

Such reads bypass SYSCALL hooks, so the kernel gives slots only while no hook
watches `read` (and not under strace).
"""
from __future__ import annotations

import functools
import struct

from ..asm import assemble
from ..modes import SYSCALL_EXIT_ADDR

__all__ = ["ENTRY_SIZE", "SLOTS", "SLOT_SIZE", "TABLE_OFFSET", "entry_code", "FLUSH_VECTOR", "FLUSH_CODE",
           "FLUSH_LIST", "FLUSH_RANGES", "flush_code", "flush_gate"]

SLOTS = 32
SLOT_SIZE = 64
WINDOW = 1 << 20
"""Bytes of a file a slot's window holds at first: a short read of a big file copies little.
The window area's refills double it (`minivmm.linux.space.WINDOW_AREA`)."""
DATA_OFFSET = 0x1000             # the data page follows the code page
TABLE_OFFSET = DATA_OFFSET       # slot i: base, size, position at DATA_OFFSET + 32 * i
ENTRY_SIZE = 0x2000

_SOURCE = f"""
    .code64
entry:
    mov %rax, scratch_rax(%rip)
    mov %cs, %eax
    test $3, %al
    mov scratch_rax(%rip), %rax
    jz slow                          # CPL 0: report every call
    test %rax, %rax                  # read(fd, buf, count)
    jnz slow
    cmp ${SLOTS}, %rdi
    jae slow
    mov %rdi, scratch_rdi(%rip)
    mov %rsi, scratch_rsi(%rip)
    mov %rcx, scratch_rcx(%rip)
    mov %r11, scratch_r11(%rip)
    shl $6, %rdi                     # slot: window, size, position, window start, window length
    lea table(%rip), %rax
    add %rax, %rdi
    cmpq $0, (%rdi)
    je restore
    mov 8(%rdi), %rax                # n = min(count, size - position)
    sub 16(%rdi), %rax
    jb restore
    cmp %rdx, %rax
    cmova %rdx, %rax
    mov 16(%rdi), %rcx               # the bytes must be in the window: the host refills it
    sub 24(%rdi), %rcx
    jb restore
    mov %rcx, %r11
    add %rax, %r11
    cmp 32(%rdi), %r11
    ja restore
    mov (%rdi), %rsi
    add %rcx, %rsi
    add %rax, 16(%rdi)
    mov scratch_rsi(%rip), %rdi
    mov %rax, %rcx
    cld
    rep movsb
    mov scratch_rdi(%rip), %rdi
    mov scratch_rsi(%rip), %rsi
    mov scratch_rcx(%rip), %rcx
    mov scratch_r11(%rip), %r11
    mov %rsp, scratch_rsp(%rip)
    lea stack_top(%rip), %rsp
    push %r11
    popfq
    mov scratch_rsp(%rip), %rsp
    jmp *%rcx
restore:
    mov scratch_rdi(%rip), %rdi
    mov scratch_rsi(%rip), %rsi
    mov scratch_rcx(%rip), %rcx
    mov scratch_r11(%rip), %r11
    mov scratch_rax(%rip), %rax
slow:
    jmp *exit_address(%rip)
exit_address:
    .quad {SYSCALL_EXIT_ADDR:#x}

    .org {DATA_OFFSET:#x}
table:
    .fill {SLOTS * SLOT_SIZE}, 1, 0
scratch_rax: .quad 0
scratch_rdi: .quad 0
scratch_rsi: .quad 0
scratch_rcx: .quad 0
scratch_r11: .quad 0
scratch_rsp: .quad 0
    .org {ENTRY_SIZE - 16:#x}
stack_top:
    .fill 16, 1, 0
"""


@functools.lru_cache(maxsize=1)
def entry_code() -> bytes:
    """The two pages (code, data) of the entry, position independent."""
    image = assemble(_SOURCE, code_bits=64, load_address=0, entry_symbol="entry")
    if len(image.data) > ENTRY_SIZE:
        raise AssertionError(f"the syscall entry is {len(image.data)} bytes, more than {ENTRY_SIZE}")
    return image.data.ljust(ENTRY_SIZE, b"\0")


def pack_slot(window: int, size: int, position: int, start: int = 0, length: int = 0) -> bytes:
    """A slot: the window's guest address, the file's size, its position, the file offset of
    the window's first byte and how many bytes the window holds."""
    return struct.pack("<QQQQQ", window, size, position, start, length).ljust(SLOT_SIZE, b"\0")


# -- taking rights away: the guest rewrites its own PTEs ----------------------------------------
FLUSH_VECTOR = 31
"""A reserved exception vector whose IDT gate is the flush routine (injected by the VMM)."""
FLUSH_CODE = 0xD100              # in the system area, between the TSS's I/O bitmap and the
FLUSH_LIST = 0xD200              # kernel stack: the routine, then its list
FLUSH_RANGES = (0xE000 - FLUSH_LIST - 16) // 16
"""How many (first PTE address, count) ranges fit after the list's header (the PT base)."""

_FLUSH_SOURCE = f"""
    .code64
flush:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    mov ${FLUSH_LIST:#x}, %rsi
    mov (%rsi), %rdi                 # the page-table array's base
    add $16, %rsi
1:  mov (%rsi), %rdx                 # a range: the address of its first PTE, 0 ends the list
    test %rdx, %rdx
    jz 3f
    mov 8(%rsi), %rcx
2:  mov (%rdx), %rax                 # rewrite the PTE: KVM sees the guest's own write
    mov %rax, (%rdx)
    mov %rdx, %rax
    sub %rdi, %rax
    shl $9, %rax                     # (PTE - base) / 8 * 4096: the page's address
    invlpg (%rax)
    add $8, %rdx
    dec %rcx
    jnz 2b
    add $16, %rsi
    jmp 1b
3:  pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq
"""


@functools.lru_cache(maxsize=1)
def flush_code() -> bytes:
    """The routine at FLUSH_CODE (CPL 0, entered through the IDT gate of FLUSH_VECTOR): for each
    listed range it writes every PTE back and invalidates the page, the guest's own page-table
    update that every KVM MMU (shadow paging included) follows; host writes alone are not seen
    by a shadow MMU. Only instructions KVM emulates at CPL 0 on every host."""
    return assemble(_FLUSH_SOURCE, code_bits=64, load_address=FLUSH_CODE, entry_symbol="flush").data


def flush_gate() -> bytes:
    """The 64-bit interrupt gate (DPL 0, CS 0x08) for FLUSH_VECTOR."""
    return struct.pack("<HHBBHII", FLUSH_CODE & 0xFFFF, 0x08, 0, 0x8E, (FLUSH_CODE >> 16) & 0xFFFF, 0, 0)
