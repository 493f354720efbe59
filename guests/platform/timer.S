/* Timer-tick kernel: programs PIT channel 0 as a rate generator (mode 2) at
 * 1193182 / DIVISOR Hz, takes IRQ 0 through the 8259s and counts TICKS ticks against the
 * ACPI PM timer (3.579545 MHz, a host-clock reference independent of how fast this
 * emulated CPL-0 code runs). Then it times PIT channel 2 the way Linux calibrates the
 * TSC: gate on through port 0x61 bit 0, a one-shot (mode 0) count of ONESHOT, and a poll
 * of port 0x61 bit 5 (OUT2) until it goes high.
 * Prints "pit: TTTTTTTT ticks in PPPPPPPP pm" and "oneshot: PPPPPPPP pm" (hex), exits 0;
 * failures: 1 no tick arrived, 2 OUT2 never went high, 3 OUT2 was high right after the
 * count was loaded. */
.include "pc.inc"
.set DIVISOR, 5966                           /* 200 Hz */
.set TICKS, 200                              /* a 1 s window */
.set SETTLE, 5
.set ONESHOT, 59659                          /* 50 ms */
.set PM_TIMER, 0x608
.set POLLS, 400000
KERNEL_START
    SET_GATE 0x20, tick_irq
    PIC_REMAP
    mov $0xFA, %al                           /* unmask IRQ 0 (and the cascade) */
    outb %al, $PIC1 + 1
    mov $0x34, %al                           /* channel 0, lobyte/hibyte, mode 2 */
    outb %al, $0x43
    mov $(DIVISOR & 0xFF), %al
    outb %al, $0x40
    mov $(DIVISOR >> 8), %al
    outb %al, $0x40
1:  sti                                      /* the window starts at tick SETTLE */
    hlt
    cli
    cmpl $SETTLE, ticks
    jb 1b
    mov $PM_TIMER, %dx
    in %dx, %eax
    mov %eax, pm_start
    mov ticks, %ebx
    add $TICKS, %ebx
2:  sti
    hlt
    cli
    cmp ticks, %ebx
    ja 2b
    mov $PM_TIMER, %dx
    in %dx, %eax
    sub pm_start, %eax
    and $0xFFFFFF, %eax                      /* a 24-bit PM timer (QEMU's) wraps */
    mov %eax, %ebx
    PUTS s_pit
    mov $TICKS, %eax
    PRINT_HEX ' '
    PUTS s_in
    mov %ebx, %eax
    PRINT_HEX ' '
    PUTS s_pm

    inb $0x61, %al                           /* channel 2: gate on, speaker off */
    and $0xFC, %al
    or $0x01, %al
    outb %al, $0x61
    mov $0xB0, %al                           /* channel 2, lobyte/hibyte, mode 0 */
    outb %al, $0x43
    mov $(ONESHOT & 0xFF), %al
    outb %al, $0x42
    mov $(ONESHOT >> 8), %al
    outb %al, $0x42
    mov $PM_TIMER, %dx
    in %dx, %eax
    mov %eax, pm_start
    inb $0x61, %al
    test $0x20, %al
    jz 3f
    EXIT 3
3:  mov $POLLS, %ecx
4:  inb $0x61, %al
    test $0x20, %al
    jnz 5f
    loop 4b
    EXIT 2
5:  mov $PM_TIMER, %dx
    in %dx, %eax
    sub pm_start, %eax
    and $0xFFFFFF, %eax                      /* a 24-bit PM timer (QEMU's) wraps */
    mov %eax, %ebx
    PUTS s_oneshot
    mov %ebx, %eax
    PRINT_HEX ' '
    PUTS s_pm
    EXIT 0
    hlt

tick_irq:
    push %eax
    incl ticks
    mov $PIC_EOI, %al
    outb %al, $PIC1
    IRQ_RETURN

s_pit:     .asciz "pit: "
s_in:      .asciz "ticks in "
s_pm:      .asciz "pm\n"
s_oneshot: .asciz "oneshot: "
.balign 4
ticks:    .long 0
pm_start: .long 0
KERNEL_DATA
