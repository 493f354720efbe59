/*
 * Fuzz target (user mode, CPL 3): a tiny record parser with a planted bug.
 *
 * The harness puts the input at `input` and its length in RSI, then starts
 * at _start. Every run ends with `out` to the debug-exit port (code 0) unless
 * the parser crashes.
 *
 * Format: "FUZZ" magic, a type byte, then for type 2 a signed 16-bit slot
 * number and a value byte. The slot is bounds-checked with a signed compare
 * only (slot < 16), so a negative slot writes 4 KiB * slot below `slots`:
 * an unmapped address, hence a page fault (#PF). Reaching it needs the four
 * magic bytes, the type byte and bit 15 of the slot: about 2^-41 for random
 * bytes, a few thousand runs for a coverage-guided fuzzer (one basic block
 * per compared byte).
 */
.include "minivmm.inc"
.globl _start, input, fuzz_coverage_start, fuzz_coverage_end, slots
.text
_start:
fuzz_coverage_start:
    lea input(%rip), %rdi
    xor %ebx, %ebx                  /* checksum of type-1 records */
    cmp $1, %rsi
    jb done
    cmpb $'F', 0(%rdi)
    jne done
    cmp $2, %rsi
    jb done
    cmpb $'U', 1(%rdi)
    jne done
    cmp $3, %rsi
    jb done
    cmpb $'Z', 2(%rdi)
    jne done
    cmp $4, %rsi
    jb done
    cmpb $'Z', 3(%rdi)
    jne done
    cmp $5, %rsi
    jb done
    movzbl 4(%rdi), %eax
    cmp $1, %al
    je type_sum
    cmp $2, %al
    je type_store
    cmp $3, %al
    je type_echo
    jmp done

type_sum:                           /* sum of the remaining bytes */
    lea 5(%rdi), %rcx
    lea (%rdi,%rsi), %rdx
1:  cmp %rdx, %rcx
    jae done
    movzbl (%rcx), %eax
    add %eax, %ebx
    inc %rcx
    jmp 1b

type_echo:                          /* print up to 8 bytes */
    mov $SERIAL_PORT, %dx
    lea 5(%rdi), %rcx
    mov %rsi, %r8
    sub $5, %r8
    cmp $8, %r8
    jbe 2f
    mov $8, %r8
2:  test %r8, %r8
    jz done
    movb (%rcx), %al
    outb %al, %dx
    inc %rcx
    dec %r8
    jmp 2b

type_store:
    cmp $8, %rsi
    jb done
    movswq 5(%rdi), %rcx            /* slot: signed 16 bits */
    cmp $16, %rcx
    jge done                        /* BUG: signed check only; negative slots pass */
    movzbl 7(%rdi), %eax
    shl $12, %rcx
    lea slots(%rip), %rdx
    mov %al, (%rdx,%rcx)            /* #PF for slot < -256 */
    jmp done

done:
    mov %ebx, result(%rip)
fuzz_coverage_end:
    EXIT 0
1:  jmp 1b

.data
.balign 4096
result: .long 0
.balign 4096
slots:  .fill 16 * 4096, 1, 0
input:  .fill 4096, 1, 0
