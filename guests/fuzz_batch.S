/*
 * Batch-mode fuzz target (user mode, CPL 3): `fuzz_one` dispatches on the first input
 * byte; _start is the per-run wrapper FUZZ_ENTRY (call fuzz_one, report AL through
 * debug-exit). The input is at `input`, its length in RSI.
 *
 *   'A' return 1            'B' count in `counter` (.data), return the count (1 per run)
 *   'C' #PF (write to 8)    'D' #UD (ud2)          'E' #DE (divide by the second byte)
 *   'F' spin forever        'G' print the rest on the serial port, return 0
 *   'H' debug-exit 7 from inside the function       'I' write `far`, a page of its own, return 2
 *   'J' use 12 KiB of stack, return 3
 *   'K' 'W' write a byte at the 32-bit address in bytes 2-5, return 4
 *   else return 0 (an empty input too)
 */
.include "minivmm.inc"
.globl _start, fuzz_one, input, counter, far, fuzz_coverage_start, fuzz_coverage_end
.text
_start:
    FUZZ_ENTRY fuzz_one
    jmp _start

fuzz_one:
fuzz_coverage_start:
    xor %eax, %eax
    test %rsi, %rsi
    jz 9f
    movzbl input(%rip), %ecx
    cmp $'A', %cl
    je a
    cmp $'B', %cl
    je b
    cmp $'C', %cl
    je c
    cmp $'D', %cl
    je d
    cmp $'E', %cl
    je e
    cmp $'F', %cl
    je f
    cmp $'G', %cl
    je g
    cmp $'H', %cl
    je h
    cmp $'I', %cl
    je i
    cmp $'J', %cl
    je j
    cmp $'K', %cl
    je k
9:  ret
a:  mov $1, %eax
    ret
b:  incl counter(%rip)
    mov counter(%rip), %eax
    ret
c:  movl $1, 8
    ret
d:  ud2
e:  movzbl input+1(%rip), %ecx
    mov $100, %eax
    xor %edx, %edx
    div %ecx
    ret
f:  jmp f
g:  lea input+1(%rip), %rdi
    lea input(%rip), %r8
    add %rsi, %r8
    mov $SERIAL_PORT, %dx
1:  cmp %r8, %rdi
    jae 2f
    movb (%rdi), %al
    outb %al, %dx
    inc %rdi
    jmp 1b
2:  xor %eax, %eax
    ret
h:  EXIT 7
    ret
i:  incl far(%rip)
    mov $2, %eax
    ret
j:  sub $12288, %rsp
    movq $1, (%rsp)
    movq $2, 4096(%rsp)
    movq $3, 8192(%rsp)
    add $12288, %rsp
    mov $3, %eax
    ret
k:  cmpb $'W', input+1(%rip)
    jne 9b
    mov input+2(%rip), %eax
    movb $0xcc, (%rax)
    mov $4, %eax
    ret
fuzz_coverage_end:

.data
.balign 4096
counter: .long 0
.balign 4096
far: .long 0
.balign 4096
input: .fill 4096, 1, 0
