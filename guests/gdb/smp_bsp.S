/* gdb stub test guest, 2 vCPUs in protected mode: the BSP wakes vCPU 1 with INIT and a
   STARTUP IPI (vector 0x70: the AP starts in real mode at 0x7000:0000, guests/gdb/smp_ap.S),
   waits until the AP counts in ap_count, then spins at bsp_ready. */
.include "minivmm.inc"
.globl _start, bsp_ready, ap_count
.set AP_COUNT, 0x70100
_start:
    movl $0x1ff, 0xfee000f0         /* SVR: software-enable the LAPIC */
    movl $0x01000000, 0xfee00310    /* ICR high: destination APIC ID 1 */
    movl $0x00004500, 0xfee00300    /* INIT */
    movl $0x00004670, 0xfee00300    /* STARTUP, vector 0x70 */
1:  cmpw $0, AP_COUNT
    je 1b
bsp_ready:
    jmp bsp_ready
