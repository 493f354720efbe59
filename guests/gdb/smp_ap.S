/* vCPU 1 of guests/gdb/smp_bsp.S, 16-bit code at 0x70000 (CS = 0x7000): counts forever in
   AX and in the word at CS:0x100. */
.code16
.globl ap_loop
    xor %ax, %ax
ap_loop:
    inc %ax
    mov %ax, %cs:0x100
    jmp ap_loop
