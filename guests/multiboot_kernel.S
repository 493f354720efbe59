/* A multiboot v1 kernel (32-bit). The header asks for memory information and
 * gives its load addresses (flags bit 16), so the loader needs no ELF. At entry
 * (protected mode, paging off): EAX = 0x2BADB002, EBX = the multiboot_info.
 * The kernel checks both, prints the command line and the upper memory size
 * check, and exits with 0 (1: bad magic, 2: no memory info, 3: no cmdline). */
.include "minivmm.inc"
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, (1 << 1) | (1 << 16)          /* memory info; address fields valid */
.globl _start
_start:
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header                          /* header_addr */
    .long _start                             /* load_addr */
    .long 0                                  /* load_end_addr: the whole file */
    .long bss_end                            /* bss_end_addr */
    .long entry                              /* entry_addr */
entry:
    cmp $0x2BADB002, %eax
    jne bad_magic
    mov %ebx, %edi
    testl $1, (%edi)                         /* flags: mem_lower/mem_upper valid */
    jz no_memory
    cmpl $1024, 8(%edi)                      /* mem_upper: at least 1 MiB above 1 MiB */
    jb no_memory
    testl $4, (%edi)                         /* flags: cmdline valid */
    jz no_cmdline
    PUTS banner
    mov 16(%edi), %esi                       /* cmdline */
    mov $SERIAL_PORT, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  PUTS newline
    EXIT 0
    hlt
bad_magic:
    EXIT 1
    hlt
no_memory:
    EXIT 2
    hlt
no_cmdline:
    EXIT 3
    hlt
banner:  .asciz "multiboot cmdline: "
newline: .asciz "\n"
.bss
    .space 64
bss_end:
