/* gdb stub test guest: a loop that never ends (Ctrl-C interrupts it) in 64-bit code. */
.globl _start, spin
_start:
    xor %ecx, %ecx
spin:
    inc %rcx
    jmp spin
