/* S3 kernel: finds PM1a_CNT and the FACS through the ACPI tables (RSDP in 0xE0000-0xFFFFF,
 * RSDT, FADT), copies a real-mode waking routine to 0x8000 and puts that address in the
 * FACS firmware waking vector, leaves a pattern in low memory and above 1 MiB, sets the RTC alarm two seconds ahead with PM1_EN.RTC_EN, and enters S3
 * (SLP_TYP=1 | SLP_EN). The waking routine runs in real mode: it checks both patterns and
 * WAK_STS in PM1_STS and its own multiboot header at 1 MiB, prints "resumed: memory intact, WAK_STS set", exits 0.
 * Failures: 1 no RSDP, 2 the RSDT's first table is not the FADT, 3 S3 returned to the
 * instruction after the sleep, 4 low pattern lost, 5 high pattern lost, 6 no WAK_STS. */
.include "pc.inc"
.set WAKE_AT, 0x8000
.set LOW_PATTERN_AT, 0x7000
.set HIGH_PATTERN_AT, 0x108000
.set PATTERN, 0xCAFEF00D
KERNEL_START
    mov $0xE0000, %esi                       /* the RSDP, on a 16-byte boundary */
1:  cmpl $0x20445352, (%esi)                 /* "RSD " */
    jne 2f
    cmpl $0x20525450, 4(%esi)                /* "PTR " */
    je 3f
2:  add $16, %esi
    cmp $0x100000, %esi
    jb 1b
    EXIT 1
3:  mov 16(%esi), %esi                       /* RSDT */
    mov 36(%esi), %esi                       /* its first entry */
    cmpl $0x50434146, (%esi)                 /* "FACP" */
    je 4f
    EXIT 2
4:  mov 64(%esi), %eax                       /* PM1a_CNT_BLK */
    mov %eax, pm1a_cnt
    mov 56(%esi), %eax                       /* PM1a_EVT_BLK */
    mov %eax, pm1a_evt
    mov 36(%esi), %edi                       /* FACS */
    movl $WAKE_AT, 12(%edi)                  /* firmware waking vector */

    mov $wake_start, %esi                    /* the waking routine goes below 1 MiB */
    mov $WAKE_AT, %edi
    mov $(wake_end - wake_start), %ecx
    rep movsb
    movl $PATTERN, LOW_PATTERN_AT
    movl $PATTERN, HIGH_PATTERN_AT

    CMOS_WRITE 0x0B, $0x06                   /* RTC: binary, 24-hour; alarm in 2 s */
    CMOS_READ 0x00
    add $2, %al
    cmp $60, %al
    jb 5f
    sub $60, %al
5:  mov %al, %bl
    CMOS_WRITE 0x01, %bl
    CMOS_WRITE 0x03, $0xFF
    CMOS_WRITE 0x05, $0xFF
    CMOS_WRITE 0x0B, $0x26                   /* AIE */
    mov pm1a_evt, %edx                       /* PM1_STS: clear; PM1_EN: RTC_EN */
    mov $0xFFFF, %ax
    out %ax, %dx
    add $2, %edx
    mov $0x0400, %ax
    out %ax, %dx
    PUTS s_sleep
    mov pm1a_cnt, %edx
    mov $((1 << 10) | (1 << 13)), %ax        /* SLP_TYP = 1 (S3), SLP_EN */
    out %ax, %dx
    EXIT 3
    hlt

/* Real mode from here: CS = 0x800, IP = 0. Offsets from wake_start are CS-relative. */
.code16
wake_start:
    xor %ax, %ax
    mov %ax, %ds
    cmpl $PATTERN, LOW_PATTERN_AT
    je 1f
    EXIT 4
1:  mov $0xFFFF, %ax                         /* 1 MiB and up through ES = 0xFFFF */
    mov %ax, %es
    cmpl $PATTERN, %es:(HIGH_PATTERN_AT - 0xFFFF0)
    jne 6f
    cmpl $MB_MAGIC, %es:0x10                 /* the kernel's own image at 1 MiB */
    je 2f
6:  EXIT 5
2:  mov $0x600, %dx                          /* PM1_STS (the FADT's PM1a_EVT_BLK) */
    in %dx, %ax
    test $0x8000, %ax
    jnz 3f
    EXIT 6
3:  mov $(s_resumed - wake_start), %si
    mov $SERIAL_PORT, %dx
4:  cs lodsb
    test %al, %al
    jz 5f
    outb %al, %dx
    jmp 4b
5:  EXIT 0
    hlt
s_resumed: .asciz "resumed: memory intact, WAK_STS set\n"
wake_end:
.code32

s_sleep: .asciz "entering S3\n"
.balign 4
pm1a_cnt:     .long 0
pm1a_evt:     .long 0
KERNEL_DATA
