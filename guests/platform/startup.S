/* The smallest multiboot v1 kernel: its first instruction after the header writes 1 to
 * QEMU's isa-debug-exit port (0xf4), so the run ends at once (exit status 3 under QEMU,
 * exit code 1 under minivmm). The header gives its load addresses (flags bit 16), so the
 * file is a flat binary that any multiboot loader, QEMU's -kernel included, can place.
 * Assembled for load address 0x100000; benchmarks/startup.py times process start to that
 * write. */
.code32
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, (1 << 16)
.globl _start
_start:
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header                          /* header_addr */
    .long _start                             /* load_addr */
    .long 0                                  /* load_end_addr: the whole file */
    .long 0                                  /* bss_end_addr: no bss */
    .long entry                              /* entry_addr */
entry:
    mov $1, %al
    outb %al, $0xf4
1:  hlt
    jmp 1b
