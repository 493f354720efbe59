/* Power-off kernel: QEMU's well-known shutdown, a 16-bit write of 0x2000 (SLP_EN with
 * SLP_TYP 0, the DSDT's \_S5) to PM1a_CNT at 0x604. The run ends there with exit code 0;
 * the debug-exit write after it (exit code 5) is never reached. */
.include "pc.inc"
KERNEL_START
    PUTS s_bye
    mov $0x604, %dx
    mov $0x2000, %ax
    out %ax, %dx
    EXIT 5
    hlt
s_bye: .asciz "powering off\n"
KERNEL_DATA
