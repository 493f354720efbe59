/*
 * Benchmark target (user mode, CPL 3): FNV-1a over the input.
 *
 * The input is at `input`, its length in RSI; the hash goes to `result` and
 * the run ends with `out` to the debug-exit port. Six instructions per input
 * byte, so an input of N bytes costs about 6*N + 10 instructions.
 */
.include "minivmm.inc"
.globl _start, input, result, fuzz_coverage_start, fuzz_coverage_end, hash_exit
.text
_start:
fuzz_coverage_start:
    lea input(%rip), %rdi
    mov %rsi, %rcx
    mov $0x811c9dc5, %eax
    test %rcx, %rcx
    jz 2f
1:  movzbl (%rdi), %edx
    xor %edx, %eax
    imul $0x01000193, %eax, %eax
    inc %rdi
    dec %rcx
    jnz 1b
2:  mov %eax, result(%rip)
fuzz_coverage_end:
hash_exit:
    EXIT 0
3:  jmp 3b

.data
.balign 4096
result: .long 0
.balign 4096
input:  .fill 262144, 1, 0
