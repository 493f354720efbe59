/* RTC kernel: reads the date from the MC146818 (BCD, 24-hour), waits for the
 * update-in-progress bit to rise and fall with the seconds register moving on, then
 * switches to binary mode, sets the alarm two seconds ahead and sleeps (sti; hlt) until
 * the alarm interrupt arrives on IRQ 8 through the 8259s (its handler leaves with
 * IRQ_RETURN, see pc.inc); then it waits for one update-ended interrupt, and counts
 * PERIODIC periodic interrupts at 16 Hz against the ACPI PM timer.
 * Prints "date: CCYY-MM-DD HH:MM:SS", "uip: ok", "alarm: SS at SS flags FF", "update: ok",
 * "periodic: NNNNNNNN in PPPPPPPP pm" (hex), exits 0; failures: 1 register B is not
 * 24-hour BCD, 2 UIP never rose, 3 UIP never fell, 4 the seconds did not move across the
 * update, 5 the alarm came at the wrong second, 6 register C lacked IRQF|AF. */
.include "pc.inc"
.set POLLS, 400000
.set PERIODIC, 8                             /* at 16 Hz: half a second */
.set PM_TIMER, 0x608
KERNEL_START
    CMOS_READ 0x0B
    and $0x06, %al
    cmp $0x02, %al
    je 1f
    EXIT 1
1:  CMOS_READ 0x0A                          /* read the date outside an update */
    test $0x80, %al
    jnz 1b
    PUTS s_date
    CMOS_READ 0x32
    call print_byte
    CMOS_READ 0x09
    PRINT_HEX '-', print_byte
    CMOS_READ 0x08
    PRINT_HEX '-', print_byte
    CMOS_READ 0x07
    PRINT_HEX ' ', print_byte
    CMOS_READ 0x04
    PRINT_HEX ':', print_byte
    CMOS_READ 0x02
    PRINT_HEX ':', print_byte
    CMOS_READ 0x00
    PRINT_HEX '\n', print_byte

    CMOS_READ 0x00                           /* the seconds before an update ... */
    mov %al, %bl
    mov $POLLS, %ecx                         /* ... UIP rises ... */
2:  CMOS_READ 0x0A
    test $0x80, %al
    jnz 3f
    loop 2b
    EXIT 2
3:  mov $POLLS, %ecx                         /* ... and falls, with the seconds moved on */
4:  CMOS_READ 0x0A
    test $0x80, %al
    jz 5f
    loop 4b
    EXIT 3
5:  CMOS_READ 0x00
    cmp %al, %bl
    jne 6f
    EXIT 4
6:  PUTS s_uip

    SET_GATE 0x28, rtc_irq
    PIC_REMAP
    mov $0xFE, %al                           /* unmask IRQ 8 */
    outb %al, $PIC2 + 1
    CMOS_WRITE 0x0B, $0x06                   /* binary, 24-hour */
    CMOS_READ 0x00
    add $2, %al
    cmp $60, %al
    jb 7f
    sub $60, %al
7:  mov %al, alarm_second
    CMOS_WRITE 0x01, alarm_second
    CMOS_WRITE 0x03, $0xFF                   /* any minute */
    CMOS_WRITE 0x05, $0xFF                   /* any hour */
    CMOS_READ 0x0C                           /* clear old flags */
    CMOS_WRITE 0x0B, $0x26                   /* AIE */
8:  sti
    hlt
    cli
    cmpl $0, af_count
    je 8b
    CMOS_READ 0x00
    mov %al, %bl
    PUTS s_alarm
    mov alarm_second, %al
    PRINT_HEX ' ', print_byte
    PUTS s_at
    mov %bl, %al
    PRINT_HEX ' ', print_byte
    PUTS s_flags
    mov irq_flags, %al
    PRINT_HEX '\n', print_byte
    cmp alarm_second, %bl
    je 9f
    EXIT 5
9:  mov irq_flags, %al
    and $0xA0, %al
    cmp $0xA0, %al
    je 10f
    EXIT 6
10: CMOS_WRITE 0x0B, $0x16                   /* UIE: the update-ended interrupt */
    CMOS_READ 0x0C
11: sti
    hlt
    cli
    cmpl $0, uf_count
    je 11b
    CMOS_WRITE 0x0B, $0x06
    PUTS s_update

    CMOS_WRITE 0x0A, $0x2C                   /* PIE at 16 Hz, timed by the PM timer */
    CMOS_WRITE 0x0B, $0x46
    CMOS_READ 0x0C
    movl $0, pf_count
12: sti
    hlt
    cli
    cmpl $0, pf_count
    je 12b
    mov $PM_TIMER, %dx
    in %dx, %eax
    mov %eax, pm_start
13: sti
    hlt
    cli
    cmpl $(1 + PERIODIC), pf_count
    jb 13b
    mov $PM_TIMER, %dx
    in %dx, %eax
    sub pm_start, %eax
    and $0xFFFFFF, %eax                      /* a 24-bit PM timer (QEMU's) wraps */
    mov %eax, %ebx
    CMOS_WRITE 0x0B, $0x06
    PUTS s_periodic
    mov $PERIODIC, %eax
    PRINT_HEX ' '
    PUTS s_in
    mov %ebx, %eax
    PRINT_HEX ' '
    PUTS s_pm
    EXIT 0
    hlt

rtc_irq:
    push %eax
    CMOS_READ 0x0C
    or %al, irq_flags
    test $0x20, %al
    jz 1f
    incl af_count
1:  test $0x10, %al
    jz 2f
    incl uf_count
2:  test $0x40, %al
    jz 3f
    incl pf_count
3:  mov $PIC_EOI, %al
    outb %al, $PIC2
    outb %al, $PIC1
    IRQ_RETURN

s_date:  .asciz "date: "
s_uip:   .asciz "uip: ok\n"
s_alarm: .asciz "alarm: "
s_at:    .asciz "at "
s_flags: .asciz "flags "
s_update:   .asciz "update: ok\n"
s_periodic: .asciz "periodic: "
s_in:       .asciz "in "
s_pm:       .asciz "pm\n"
alarm_second: .byte 0
irq_flags:    .byte 0
.balign 4
af_count:     .long 0
uf_count:     .long 0
pf_count:     .long 0
pm_start:     .long 0
KERNEL_DATA
