/* Real mode (16-bit): print a line on COM1, report exit code 0. */
.include "minivmm.inc"
.globl _start
_start:
    PUTS msg
    EXIT 0
    hlt
msg: .asciz "Hello from real mode!\n"
