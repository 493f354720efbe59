/* MSR bitmap rules: a fixed-value RDMSR, a denied WRMSR (#GP, handled by the
 * guest's own IDT, which skips the instruction), a logged RDMSR that reaches
 * the real MSR. Exit code 0 when every rule behaved. */
.include "minivmm.inc"
.globl _start
_start:
    lidt idt_descriptor
    /* the #GP gate: vector 13 -> gp_handler */
    lea gp_handler, %rax
    mov %ax, idt + 13 * 16
    movw $0x08, idt + 13 * 16 + 2
    movw $0x8e00, idt + 13 * 16 + 4
    shr $16, %rax
    mov %ax, idt + 13 * 16 + 6

    mov $0x1234, %ecx           /* fixed: reads as 42 */
    rdmsr
    cmp $42, %eax
    jne fail
    PUTS fixed_ok

    mov $0x1235, %ecx           /* deny: #GP, the handler sets gp_seen and skips */
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    cmpb $1, gp_seen
    jne fail
    PUTS denied_ok

    mov $0x10, %ecx             /* log: the real IA32_TIME_STAMP_COUNTER */
    rdmsr
    PUTS logged_ok
    EXIT 0
    hlt
fail:
    PUTS failed
    EXIT 1
    hlt

gp_handler:                     /* error code, rip, cs, rflags, rsp, ss */
    movb $1, gp_seen
    add $8, %rsp
    addq $2, (%rsp)             /* skip the 2-byte wrmsr */
    iretq

fixed_ok:  .asciz "rdmsr 0x1234 = 42 (fixed)\n"
denied_ok: .asciz "wrmsr 0x1235 denied with #GP\n"
logged_ok: .asciz "rdmsr 0x10 passed through\n"
failed:    .asciz "an MSR rule misbehaved\n"
gp_seen:   .byte 0
.balign 8
idt_descriptor:
    .word 16 * 32 - 1
    .quad idt
.balign 16
idt: .space 16 * 32
