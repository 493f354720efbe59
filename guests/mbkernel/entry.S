/* mbkernel entry: the Multiboot v1 header (Multiboot 0.6.96 section 3.1), a GDT of
 * its own (the spec leaves GDTR undefined at entry), the stack, and the AP
 * trampoline that the BSP copies to TRAMPOLINE (a 4 KiB page below 1 MiB) before
 * sending STARTUP IPIs with vector TRAMPOLINE >> 12.
 *
 * At entry (section 3.2): 32-bit protected mode, paging off, EAX = 0x2BADB002,
 * EBX = the multiboot_info physical address. kmain(magic, info) never returns. */
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, (1 << 0) | (1 << 1)       /* page-aligned modules, memory info; ELF layout */
.set LAPIC_ID, 0xFEE00020
.set AP_STACK_SIZE, 4096

.text
.code32
.align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

.globl _start
_start:
    cli
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  mov $0x10, %ecx
    mov %ecx, %ds
    mov %ecx, %es
    mov %ecx, %fs
    mov %ecx, %gs
    mov %ecx, %ss
    mov $stack_top, %esp
    push %ebx                             /* kmain(magic, info) */
    push %eax
    call kmain
2:  cli
    hlt
    jmp 2b

/* Real-mode code run by each AP at CS = TRAMPOLINE >> 4, IP = 0 after the SIPI.
 * Only offsets from ap_trampoline are used until the far jump to 32-bit code. */
.globl ap_trampoline, ap_trampoline_end
.code16
ap_trampoline:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl tramp_gdt_desc - ap_trampoline
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_pm32
.align 4
tramp_gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

.code32
ap_pm32:
    mov $0x10, %ecx
    mov %ecx, %ds
    mov %ecx, %es
    mov %ecx, %ss
    mov LAPIC_ID, %eax
    shr $24, %eax                         /* this AP's APIC ID: its stack slot */
    mov %eax, %ebx
    and $7, %eax
    inc %eax
    shl $12, %eax
    add $ap_stacks, %eax
    mov %eax, %esp
    push %ebx
    call ap_main
3:  cli
    hlt
    jmp 3b

.section .rodata
.align 8
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF              /* 0x08: flat 32-bit code, ring 0 */
    .quad 0x00CF92000000FFFF              /* 0x10: flat data */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

.bss
.align 16
ap_stacks:
    .space 8 * AP_STACK_SIZE
    .space 16384
stack_top:
