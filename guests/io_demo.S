/* I/O port rules and the hypercall port: a fixed IN value, ignored (counted)
 * OUTs to the POST port, and hypercall 7 answered by the config with 42,
 * which becomes the exit code. */
.include "minivmm.inc"
.globl _start
_start:
    in $0x60, %al               /* fixed: 0x5a */
    cmp $0x5a, %al
    jne fail
    mov $3, %ecx
1:  out %al, $0x80              /* ignored, counted */
    dec %ecx
    jnz 1b
    PUTS in_ok
    mov $7, %eax                /* hypercall 7 (number in RAX) */
    mov $0x1111, %ebx
    out %al, $HYPERCALL_PORT
    outb %al, $DEBUG_EXIT_PORT  /* the result (42) is the exit code */
    hlt
fail:
    EXIT 1
    hlt
in_ok: .asciz "in 0x60 = 0x5a (fixed); 3 POST codes ignored\n"
