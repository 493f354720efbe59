/* EPT permissions: `table` lies on a page the config makes read-only (r--).
 * Reads succeed; the write is an EPT violation that no handler completes, so
 * the run stops with an error naming the guest-physical address. */
.include "minivmm.inc"
.globl _start
_start:
    mov table, %eax             /* allowed: the page is readable */
    PUTS reading
    movl $1, table              /* EPT violation: the page is not writable */
    EXIT 0
    hlt
reading: .asciz "read the table; now writing it\n"
.balign 4096
table: .long 0x1234
