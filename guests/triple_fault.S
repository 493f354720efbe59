/* Hostile: load an empty IDT and raise #UD. The #UD cannot be delivered, nor can
 * the #DF that follows: the CPU shuts down (result: triple_fault). */
.globl _start
_start:
    lidt empty_idt
    ud2
    hlt
empty_idt:
    .word 0         /* limit */
    .quad 0         /* base */
