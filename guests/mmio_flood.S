/* Hostile: write to a guest-physical address with no RAM behind it, forever.
 * Every store is an exit (EPT misconfiguration); a devices.mmio rule absorbs
 * them and the machine's exit limit ends the run (result: exit_limit). */
.include "minivmm.inc"
.globl _start
_start:
    mov $MMIO_ADDRESS, %rdi
    xor %eax, %eax
1:  mov %eax, (%rdi)
    inc %eax
    jmp 1b
