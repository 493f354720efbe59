/*
 * The batch runtime (user mode, CPL 3): runs the inputs of a batch through the target
 * function without leaving the guest. minivmm.fuzz.batch assembles it at the batch area
 * with these absolute symbols (--defsym):
 *
 *   CTL        control block (layout in batch.py: count, current, previous length,
 *              function, region count, state, the register image, the region table)
 *   RESULTS    one quadword per input: 0x100 | AL when the function returned
 *   RING       one (offset into DATA, length) pair per input
 *   DATA       the inputs
 *   TAIL       the snapshot's bytes of the input buffer
 *   INPUT      the target's input buffer
 *   STACK_TOP  the runtime's own stack
 *   LENGTH_MODE 0: the length goes into the register image at LENGTH_OFFSET;
 *              1, 2, 4, 8: into memory at LENGTH_ADDRESS, that many bytes
 *   EXIT_PORT  the debug-exit port
 *   COV_LO, COV_SPAN, KINDS, ORIGS, HITLOG, HIT_CAPACITY, BP_STUB  in-guest coverage (below)
 *
 * Per input k: reset every declared region from its copy, copy input k into the buffer
 * (and the snapshot's bytes over what the previous, longer input left), put its length
 * in place, load the snapshot's registers (RFLAGS first, RSP last) and call the function;
 * its return value (AL) goes to RESULTS[k]. After the last input it sets the state to 1
 * and writes to the debug-exit port: the only exit of a batch that ends cleanly.
 *
 * bp_handler is the #BP gate's handler while a batch runs (CPL 0, keep it short: the host
 * may emulate CPL-0 code). For an int3 that coverage planted (KINDS[rip - COV_LO] set) it
 * writes the original byte (ORIGS) back, clears KINDS, logs (address | input << 48) in
 * HITLOG and resumes at the block. Anything else (no batch active, not a coverage block,
 * the log full) goes on to the built-in kernel's stub, which reports to the host.
 */
.set CTL_COUNT, CTL + 0x00
.set CTL_CURRENT, CTL + 0x08
.set CTL_PREVIOUS, CTL + 0x10
.set CTL_FUNCTION, CTL + 0x18
.set CTL_NREGIONS, CTL + 0x20
.set CTL_STATE, CTL + 0x28
.set CTL_ACTIVE, CTL + 0x30        /* 1 while the host runs a batch */
.set CTL_HITS, CTL + 0x38          /* HITLOG entries */
.set CTL_REGS, CTL + 0x40          /* struct kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags */
.set CTL_REGIONS, CTL + 0x100      /* (destination, source, length) triples */

.globl batch_entry, batch_returned, batch_done, batch_done_end, bp_handler
.text
batch_entry:
next_input:
    cld
    mov CTL_CURRENT, %rcx
    cmp CTL_COUNT, %rcx
    jae batch_done
    mov CTL_NREGIONS, %rdx
    mov $CTL_REGIONS, %rbx
1:  test %rdx, %rdx
    jz 2f
    mov (%rbx), %rdi
    mov 8(%rbx), %rsi
    mov 16(%rbx), %rcx
    rep movsb
    add $24, %rbx
    dec %rdx
    jmp 1b
2:  mov CTL_CURRENT, %rax
    shl $4, %rax
    mov RING(%rax), %r9
    add $DATA, %r9                  /* the input's bytes */
    mov RING+8(%rax), %r8           /* its length */
    mov CTL_PREVIOUS, %rcx
    cmp %r8, %rcx
    jbe 3f
    sub %r8, %rcx
    mov $INPUT, %rdi
    add %r8, %rdi
    mov $TAIL, %rsi
    add %r8, %rsi
    rep movsb
3:  mov $INPUT, %rdi
    mov %r9, %rsi
    mov %r8, %rcx
    rep movsb
    mov %r8, CTL_PREVIOUS
.if LENGTH_MODE == 0
    mov %r8, CTL_REGS + LENGTH_OFFSET
.elseif LENGTH_MODE == 1
    mov %r8b, LENGTH_ADDRESS
.elseif LENGTH_MODE == 2
    mov %r8w, LENGTH_ADDRESS
.elseif LENGTH_MODE == 4
    mov %r8d, LENGTH_ADDRESS
.else
    mov %r8, LENGTH_ADDRESS
.endif
    pushq CTL_REGS + 0x88
    popfq
    mov CTL_REGS + 0x00, %rax
    mov CTL_REGS + 0x08, %rbx
    mov CTL_REGS + 0x10, %rcx
    mov CTL_REGS + 0x18, %rdx
    mov CTL_REGS + 0x20, %rsi
    mov CTL_REGS + 0x28, %rdi
    mov CTL_REGS + 0x38, %rbp
    mov CTL_REGS + 0x40, %r8
    mov CTL_REGS + 0x48, %r9
    mov CTL_REGS + 0x50, %r10
    mov CTL_REGS + 0x58, %r11
    mov CTL_REGS + 0x60, %r12
    mov CTL_REGS + 0x68, %r13
    mov CTL_REGS + 0x70, %r14
    mov CTL_REGS + 0x78, %r15
    mov CTL_REGS + 0x30, %rsp
    call *CTL_FUNCTION
batch_returned:
    mov $STACK_TOP, %rsp
    mov CTL_CURRENT, %rcx
    movzbl %al, %eax
    or $0x100, %eax
    mov %rax, RESULTS(,%rcx,8)
    inc %rcx
    mov %rcx, CTL_CURRENT
    jmp next_input
batch_done:
    movq $1, CTL_STATE
    xor %eax, %eax
    outb %al, $EXIT_PORT
batch_done_end:
    jmp batch_done

bp_handler:
    push %rax
    push %rbx
    cmpq $0, CTL_ACTIVE
    je 8f
    cmpq $HIT_CAPACITY, CTL_HITS
    jae 8f
    mov 16(%rsp), %rax              /* the RIP after the int3 */
    dec %rax
    mov %rax, %rbx
    sub $COV_LO, %rbx
    cmp $COV_SPAN, %rbx
    jae 8f
    cmpb $0, KINDS(%rbx)
    je 8f
    movb $0, KINDS(%rbx)
    movzbl ORIGS(%rbx), %ebx
    mov %bl, (%rax)
    mov %rax, 16(%rsp)
    mov CTL_CURRENT, %rbx
    shl $48, %rbx
    or %rax, %rbx
    mov CTL_HITS, %rax
    mov %rbx, HITLOG(,%rax,8)
    inc %rax
    mov %rax, CTL_HITS
    pop %rbx
    pop %rax
    iretq
8:  pop %rbx
    pop %rax
    jmp BP_STUB
