/* Hostile: a CPL-0 loop that never ends. The run's deadline stops it (result: timeout). */
.globl _start
_start:
1:  jmp 1b
