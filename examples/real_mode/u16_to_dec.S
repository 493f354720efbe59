/*
 * u16_to_dec: the real-mode routine under test (16-bit code, no interrupts,
 * no BIOS calls).
 *
 * In:  AX = value, DS:DI = buffer of at least 6 bytes
 * Out: the decimal digits and a NUL at DS:DI; DI = the address of the NUL
 * Clobbers AX, BX, CX, DX and the flags.
 */
u16_to_dec:
    mov $10, %bx
    xor %cx, %cx
1:  xor %dx, %dx
    div %bx                 /* DX:AX / 10: AX = quotient, DX = digit */
    push %dx
    inc %cx
    test %ax, %ax
    jnz 1b
2:  pop %ax
    add $'0', %al
    mov %al, (%di)
    inc %di
    loop 2b
    movb $0, (%di)
    ret
