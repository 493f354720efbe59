/* EPT execute hooks: `tick` is called five times (a counting hook), the
 * `poison` instruction is skipped by a hook (so `result` keeps 7), and the
 * guest exits with `result`. */
.include "minivmm.inc"
.globl _start
_start:
    mov $5, %ecx
1:  call tick
    dec %ecx
    jnz 1b
poison:
    movb $99, result
    PUTS done
    mov result, %al
    outb %al, $DEBUG_EXIT_PORT
    hlt
tick:
    incl ticks
    ret
done:   .asciz "ticked five times\n"
result: .byte 7
ticks:  .long 0
