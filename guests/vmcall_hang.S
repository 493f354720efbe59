/* Hostile: `vmcall`. On the PVM host KVM_RUN spins on it in the kernel and never
 * returns to user space; only the run's deadline ends the run (result: timeout). */
.globl _start
_start:
    mov $1, %eax
    vmcall
    hlt
