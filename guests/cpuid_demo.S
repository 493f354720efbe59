/* CPUID overrides: print the hypervisor vendor the config puts in leaf
 * 0x40000000, then report as exit code EAX of leaf 0x40000005 subleaf 2
 * (the config gives subleaf 0 and subleaf 2 different values). */
.include "minivmm.inc"
.globl _start
_start:
    mov $0x40000000, %eax
    xor %ecx, %ecx
    cpuid
    mov %ebx, vendor
    mov %ecx, vendor + 4
    mov %edx, vendor + 8
    PUTS prefix
    PUTS vendor
    PUTS newline
    mov $0x40000005, %eax
    mov $2, %ecx
    cpuid
    outb %al, $DEBUG_EXIT_PORT
    hlt
prefix:  .asciz "hypervisor vendor: "
newline: .asciz "\n"
vendor:  .space 13
