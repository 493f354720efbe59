/* a multiboot header whose checksum is wrong (for bad_multiboot_checksum.yaml) */
.globl _start
_start:
    .long 0x1BADB002
    .long 0x00010002
    .long 0x12345678
    hlt
