/* 32-bit protected mode, flat segments: print a line on COM1, report exit code 0. */
.include "minivmm.inc"
.globl _start
_start:
    PUTS msg
    EXIT 0
    hlt
msg: .asciz "Hello from protected mode!\n"
