"""PCI configuration mechanism #1 (ports 0xCF8-0xCFF) with no device behind it, so a
kernel that probes the PCI bus finds it empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PciNoDevices"]


@dataclass
class PciNoDevices:
    """Ports 0xCF8-0xCFF: CONFIG_ADDRESS (0xCF8, 32-bit) latches and reads back what was
    written; CONFIG_DATA (0xCFC-0xCFF) reads all ones ("no device") and drops writes."""
    ports: range = field(default=range(0xCF8, 0xD00), init=False)
    address: int = field(default=0, init=False)

    def io_read(self, port: int, size: int) -> int:
        if port == 0xCF8 and size == 4:
            return self.address
        return (1 << (8 * size)) - 1

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == 0xCF8 and size == 4:
            self.address = value & 0xFFFFFFFC
