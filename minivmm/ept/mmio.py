"""MMIO devices: guest-physical ranges outside RAM served by callbacks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["MmioDevice"]


@dataclass(eq=False)
class MmioDevice:
    """A guest-physical range claimed by callbacks: read(offset, size) -> int, write(offset, size, value)."""
    start: int
    size: int
    read: Callable[[int, int], int] | None
    write: Callable[[int, int, int], object] | None
    name: str = "mmio"

    @property
    def end(self) -> int:
        return self.start + self.size

