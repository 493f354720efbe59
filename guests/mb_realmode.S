/* A 32-bit multiboot v1 kernel linked at 32 KiB that drops to real mode by itself.
 * The header's address fields (flags bit 16) say where it loads; minivmm links an
 * assembled multiboot kernel there, so its symbols are physical addresses. At entry
 * (protected mode, paging off, EAX = 0x2BADB002) it loads its own GDT, goes through
 * a 16-bit protected-mode segment to real mode (SDM Vol. 3A 9.9.2, "Switching Back
 * to Real-Address Mode"), and there checks that its code and data past 0xb000 (where
 * minivmm's TSS would go in other guests) are intact, prints and exits with 0
 * (1: bad magic, 2: data overwritten). */
.include "minivmm.inc"
.set LINK, 0x8000
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, (1 << 16)                     /* address fields valid */
.set CODE16, 0x08
.set DATA16, 0x10
.globl _start
_start:
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long LINK + (mb_header - _start)        /* header_addr */
    .long LINK                               /* load_addr: the kernel is linked at 32 KiB */
    .long 0                                  /* load_end_addr: the whole file */
    .long 0                                  /* bss_end_addr: no bss */
    .long LINK + (entry - _start)            /* entry_addr */
entry:
    cli
    cmp $0x2BADB002, %eax
    jne bad_magic
    PUTS banner
    lgdt gdt_desc                            /* minivmm's GDTR is empty: use our own */
    lidt ivt_desc
    ljmp $CODE16, $pm16
bad_magic:
    EXIT 1
    hlt

gdt:
    .quad 0
    .quad 0x00009A000000FFFF                 /* 0x08: 16-bit code, base 0, limit 64 KiB */
    .quad 0x000092000000FFFF                 /* 0x10: 16-bit data, base 0, limit 64 KiB */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
ivt_desc:
    .word 0x3ff                              /* the real-mode interrupt vector table */
    .long 0
banner: .asciz "mb_realmode: protected mode at 32 KiB\n"

/* Real-mode code addresses everything from segment LINK >> 4: offsets from _start. */
.code16
pm16:
    mov $DATA16, %ax                         /* 16-bit segments before clearing PE */
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr0, %eax
    and $~1, %eax
    mov %eax, %cr0
    ljmp $(LINK >> 4), $(real_mode - _start)

/* Past 0xb000: the rest runs from the bytes a TSS at 0xb000 would overwrite. */
    .org 0x3800
real_mode:
    mov %cs, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $(stack_top - _start), %sp
    cmpl $0x600DC0DE, (marker - _start)
    jne overwritten
    mov $(real_msg - _start), %si
    mov $SERIAL_PORT, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  EXIT 0
    hlt
overwritten:
    EXIT 2
    hlt
marker:   .long 0x600DC0DE
real_msg: .asciz "mb_realmode: real mode, code past 0xb000 intact\n"
    .balign 16
    .space 0x400
stack_top:
