/* Hostile: 1000 `int3`s in a loop at CPL 3. Each one is a #BP exception exit;
 * the config's exception rule counts it and skips the instruction, and the
 * guest then reports exit code 0. */
.include "minivmm.inc"
.globl _start
_start:
    mov $INT3_COUNT, %ecx
1:  int3
    dec %ecx
    jnz 1b
    PUTS done
    EXIT 0
2:  jmp 2b
done: .asciz "int3 storm survived\n"
