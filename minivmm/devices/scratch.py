"""A scratch register: a port that reads back what was last written, for guests and
tests that need a port with state and no side effects.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ScratchRegister"]


@dataclass
class ScratchRegister:
    """A `width`-byte register at `port` that reads back what was last written (narrower
    accesses at an offset act on those bytes)."""
    port: int = 0x520
    width: int = 4
    value: int = 0
    ports: range = field(init=False)

    def __post_init__(self) -> None:
        if self.width not in (1, 2, 4):
            raise ValueError(f"scratch register width must be 1, 2 or 4, not {self.width}")
        self.ports = range(self.port, self.port + self.width)

    def io_read(self, port: int, size: int) -> int:
        shift = 8 * (port - self.port)
        value = self.value >> shift & ((1 << (8 * size)) - 1)
        missing = size - (self.width - (port - self.port))
        if missing > 0:                 # bytes past the register read as an open bus
            value |= ((1 << (8 * missing)) - 1) << (8 * (size - missing))
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        shift = 8 * (port - self.port)
        mask = ((1 << (8 * size)) - 1) << shift & ((1 << (8 * self.width)) - 1)
        self.value = (self.value & ~mask) | (value << shift & mask)
