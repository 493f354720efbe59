/* 64-bit user mode (CPL 3, IOPL 3) under minivmm's built-in kernel. */
.include "minivmm.inc"
.globl _start
_start:
    PUTS msg
    EXIT 0
1:  jmp 1b
msg: .asciz "Hello from user mode!\n"
