/* Self-modifying code under an EPT write monitor (user mode, CPL 3).
 * The guest patches the immediate of `mov $1, %ebx` to 2 twice in a loop
 * (once through each of two aliases of the byte), then runs the patched
 * instruction and reports %ebx as its exit code. A write monitor on the code
 * page sees every patch; the emulated write must reach the code KVM runs. */
.include "minivmm.inc"
.globl _start
_start:
    mov $2, %ecx
1:  movb $2, patched + 1          # the imm8 of `mov $imm32, %ebx` (bb 01 00 00 00)
    dec %ecx
    jnz 1b
patched:
    mov $1, %ebx
    mov %bl, %al
    outb %al, $DEBUG_EXIT_PORT
2:  jmp 2b
