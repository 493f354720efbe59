"""The MMIO device bus: guest-physical ranges outside RAM served by callbacks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from .tables import EptError

if TYPE_CHECKING:
    from ..kvm import MmioExit
    from ..memory import Region

__all__ = ["MmioDevice", "MmioBus"]


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



class MmioBus:
    """The MMIO devices of one machine, kept apart from each other and from guest RAM."""

    def __init__(self) -> None:
        self.devices: list[MmioDevice] = []

    def add(self, start: int, size: int, read: Callable[[int, int], int] | None,
            write: Callable[[int, int, int], object] | None, name: str, ram: Iterable[Region]) -> MmioDevice:
        """Claim [start, start+size) for a new device; `ram` is the guest RAM it must not overlap."""
        if size <= 0 or start < 0:
            raise EptError(f"bad MMIO range start={start:#x} size={size:#x}")
        for region in ram:
            if start < region.end and region.gpa < start + size:
                raise EptError(f"MMIO device {name} [{start:#x}, {start + size:#x}) overlaps guest RAM "
                               f"{region.name} [{region.gpa:#x}, {region.end:#x})")
        for other in self.devices:
            if start < other.end and other.start < start + size:
                raise EptError(f"MMIO device {name} [{start:#x}, {start + size:#x}) overlaps device "
                               f"{other.name} [{other.start:#x}, {other.end:#x})")
        device = MmioDevice(start, size, read, write, name)
        self.devices.append(device)
        return device

    def remove(self, device: MmioDevice) -> None:
        self.devices.remove(device)

    def lookup(self, gpa: int) -> MmioDevice | None:
        for device in self.devices:
            if device.start <= gpa < device.end:
                return device
        return None

    def access(self, device: MmioDevice, exit: MmioExit) -> bytes | None:
        """Carry out `exit` on `device`: the bytes a read gives the guest, None for a write."""
        offset = exit.phys_addr - device.start
        if exit.is_write:
            if device.write is not None:
                device.write(offset, exit.length, int.from_bytes(exit.data, "little"))
            return None
        value = device.read(offset, exit.length) if device.read is not None else -1
        return (value & ((1 << (8 * exit.length)) - 1)).to_bytes(exit.length, "little")
