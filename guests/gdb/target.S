/* gdb stub test guest for protected, long and user mode (one source: 32-bit addressing
   assembles in both): registers, a breakpoint, a store into a 64 KiB watched buffer, an
   exit code that gdb may change in memory. */
.include "minivmm.inc"
.globl _start, bp_add, after_add, store, after_store, finish, result, value, buf, buf_end
_start:
    mov $0x1111, %eax
    mov $0x2222, %ebx
bp_add:
    add %ebx, %eax
after_add:
    mov %eax, result
    mov $buf, %edi
store:
    movb $0x5a, 0x8000(%edi)
after_store:
    movb value, %al
finish:
    outb %al, $DEBUG_EXIT_PORT
1:  jmp 1b
.balign 4096
result: .long 0
value:  .byte 7
.balign 4096
buf:    .skip 0x10000
buf_end:
