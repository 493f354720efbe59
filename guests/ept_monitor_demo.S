/* EPT monitor: three 4-byte writes to `watched` (a monitored range) and a write
 * next to it on the same page that the monitor must not report. The guest then
 * prints and exits with the last value written (monitors do not change it). */
.include "minivmm.inc"
.globl _start
_start:
    movl $1, watched
    movl $2, watched + 4
    movl $3, watched + 8
    movl $99, unwatched
    PUTS done
    mov watched + 8, %eax
    outb %al, $DEBUG_EXIT_PORT
    hlt
done: .asciz "wrote three watched words\n"
.balign 4096
watched:   .space 16
unwatched: .space 16
