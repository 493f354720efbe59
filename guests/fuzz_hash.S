/*
 * Benchmark target (user mode, CPL 3): FNV-1a over the input.
 *
 * The input is at `input`, its length in RSI; `fnv_hash` puts the hash in
 * `result` and returns 0; _start is the per-run wrapper (FUZZ_ENTRY: call it,
 * then `out` to the debug-exit port), batch mode calls it directly. Six
 * instructions per input byte, so an input of N bytes costs about 6*N + 12
 * instructions.
 */
.include "minivmm.inc"
.globl _start, fnv_hash, input, result, fuzz_coverage_start, fuzz_coverage_end, hash_exit
.text
_start:
    FUZZ_ENTRY fnv_hash
3:  jmp 3b

fnv_hash:
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
    xor %eax, %eax
hash_exit:
    ret
fuzz_coverage_end:

.data
.balign 4096
result: .long 0
.balign 4096
input:  .fill 262144, 1, 0
