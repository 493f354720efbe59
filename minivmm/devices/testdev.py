"""QEMU's pc-testdev (hw/misc/pc-testdev.c), the device kvm-unit-tests style kernels probe:

| where                  | what                                                            |
|------------------------|-----------------------------------------------------------------|
| ports 0xE0-0xE3        | a 4-byte scratch register (reads back what was written)          |
| port 0xE4 (write)      | flush: the guest-physical page holding the written address is   |
|                        | protected and unprotected in the host mapping, so KVM drops its |
|                        | mapping of it (QEMU: mprotect PROT_NONE, then read/write)       |
| ports 0xE8-0xEB        | the same scratch register, byte by byte                          |
| ports 0x2000-0x2017    | ISA IRQ lines 0-23: a byte written sets line N to (value != 0)   |
| GPA 0xFF000000, 64 KiB | IORAM: memory served through MMIO exits, not a memslot           |

`PcTestdev` holds the state; its `ports` cover 0xE0-0xEB, `irq_lines` is the second port
device (0x2000-0x2017), and `iomem_read`/`iomem_write` serve the IORAM's MMIO exits.
`set_irq(line, level)` and `flush_page(gpa)` are supplied by the platform (KVM_IRQ_LINE,
host page protection).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .scratch import ScratchRegister

__all__ = ["PcTestdev", "TestdevIrqLines", "TESTDEV_PORT", "FLUSH_PORT", "IRQ_PORT", "IOMEM_BASE",
           "IOMEM_SIZE"]

TESTDEV_PORT = 0xE0
FLUSH_PORT = 0xE4
BYTE_PORT = 0xE8
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 64 << 10


@dataclass
class TestdevIrqLines:
    """Ports 0x2000-0x2017: a write drives ISA IRQ line (port - 0x2000); a read gives its level."""
    set_irq: Callable[[int, int], None] | None = None
    ports: range = field(default=range(IRQ_PORT, IRQ_PORT + IRQ_LINES), init=False)
    levels: list[int] = field(default_factory=lambda: [0] * IRQ_LINES, init=False)
    changes: int = field(default=0, init=False)
    """How many writes changed a line."""

    def io_read(self, port: int, size: int) -> int:
        return self.levels[port - IRQ_PORT]

    def io_write(self, port: int, size: int, value: int) -> None:
        line, level = port - IRQ_PORT, int(value & 0xFF != 0)
        if level != self.levels[line]:
            self.changes += 1
        self.levels[line] = level
        if self.set_irq is not None:
            self.set_irq(line, level)


@dataclass
class PcTestdev:
    """The pc-testdev's scratch, flush and IORAM parts (ports 0xE0-0xEB); see the module doc."""
    set_irq: Callable[[int, int], None] | None = None
    flush_page: Callable[[int], None] | None = None
    ports: range = field(default=range(TESTDEV_PORT, BYTE_PORT + 4), init=False)
    flushes: list[int] = field(default_factory=list, init=False)
    """Page addresses flushed, in order."""
    mmio_reads: int = field(default=0, init=False)
    mmio_writes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.scratch = ScratchRegister(port=TESTDEV_PORT, width=4)
        self.irq_lines = TestdevIrqLines(self.set_irq)
        self.iomem = bytearray(IOMEM_SIZE)

    def io_read(self, port: int, size: int) -> int:
        if port >= BYTE_PORT:
            port -= BYTE_PORT - TESTDEV_PORT
        if port < FLUSH_PORT:
            return self.scratch.io_read(port, size)
        return (1 << 8 * size) - 1                            # the flush port and the gap read as an open bus

    def io_write(self, port: int, size: int, value: int) -> None:
        if port >= BYTE_PORT:
            port -= BYTE_PORT - TESTDEV_PORT
        if port < FLUSH_PORT:
            self.scratch.io_write(port, size, value)
        elif port == FLUSH_PORT and size == 4:
            page = value & ~0xFFF
            self.flushes.append(page)
            if self.flush_page is not None:
                self.flush_page(page)

    def iomem_read(self, gpa: int, length: int) -> int:
        offset = gpa - IOMEM_BASE
        self.mmio_reads += 1
        return int.from_bytes(self.iomem[offset:offset + length].ljust(length, b"\xff"), "little")

    def iomem_write(self, gpa: int, data: bytes) -> None:
        offset = gpa - IOMEM_BASE
        self.mmio_writes += 1
        self.iomem[offset:offset + len(data)] = data[:max(IOMEM_SIZE - offset, 0)]
