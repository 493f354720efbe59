/* gdb stub test guest, real mode (16-bit, CS = 0): registers, a breakpoint, stepi, an exit
   code that gdb may change in memory. */
.include "minivmm.inc"
.globl _start, bp_add, after_add, store, after_store, finish, result, value, buf, buf_end
_start:
    mov $0x1111, %ax
    mov $0x2222, %bx
bp_add:
    add %bx, %ax
after_add:
    mov %ax, result
    mov $buf, %di
store:
    movb $0x5a, 0x800(%di)
after_store:
    movb value, %al
finish:
    outb %al, $DEBUG_EXIT_PORT
1:  jmp 1b
.balign 16
result: .word 0
value:  .byte 7
.balign 256
buf:    .skip 0x1000
buf_end:
