/*
 * Real-mode test guest for u16_to_dec. It checks a few values itself, then
 * converts whatever the host asks for: at GUEST_SYNC stage 1 the host puts
 * the value in AX and CX = 1 (CX = 0 ends the test); stage 2 reports DI.
 */
.code16
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es

    mov $0, %ax
    mov $buffer, %di
    call u16_to_dec
    GUEST_ASSERT_EQ %di, $buffer+1
    cmpb $'0', buffer
    GUEST_ASSERT e

    mov $65535, %ax
    mov $buffer, %di
    call u16_to_dec
    GUEST_ASSERT_EQ %di, $buffer+5
    GUEST_PRINTF "65535 -> %s\n", $buffer

next:
    GUEST_SYNC $1, $0           /* the host replies: AX = value, CX = 1 to go on */
    test %cx, %cx
    jz finished
    mov $buffer, %di
    call u16_to_dec
    GUEST_SYNC $2, %di
    jmp next
finished:
    GUEST_DONE

.include "u16_to_dec.S"

buffer: .skip 8, 0xaa
