/* Python handlers through the hypercall ABI (`out %al, $0xf5`, number in RAX,
 * arguments in RBX/RCX/RDX/RSI, result in RAX), at CPL 3 under the built-in
 * kernel: hypercall 1 doubles RBX, hypercall 2 prints RCX bytes at RBX. */
.include "minivmm.inc"
.globl _start
_start:
    mov $1, %eax
    mov $21, %ebx
    out %al, $HYPERCALL_PORT        /* rax = 42 */
    mov %rax, %r12
    mov $2, %eax
    lea message, %rbx
    mov $message_end - message, %ecx
    out %al, $HYPERCALL_PORT
    mov %r12, %rax
    outb %al, $DEBUG_EXIT_PORT
1:  jmp 1b
message: .ascii "printed by a Python handler\n"
message_end:
