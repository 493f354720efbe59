"""Port-I/O devices a guest reaches with ``in``/``out``.

A device claims a range of ports; the I/O exit handler routes each access whose
port falls in ``ports`` to ``io_read``/``io_write`` with the access size in
bytes (1, 2 or 4). ``reset()`` is optional: check with
``isinstance(device, ResettableDevice)``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from minivmm.devices.debug_exit import DebugExit
from minivmm.devices.serial import Serial16550

__all__ = ["DebugExit", "PortDevice", "ResettableDevice", "Serial16550"]


@runtime_checkable
class PortDevice(Protocol):
    ports: range
    """The I/O ports the device claims."""

    def io_read(self, port: int, size: int) -> int:
        """Value of an ``in`` of ``size`` bytes from ``port``."""
        ...

    def io_write(self, port: int, size: int, value: int) -> None:
        """Handle an ``out`` of ``size`` bytes of ``value`` to ``port``."""
        ...


@runtime_checkable
class ResettableDevice(PortDevice, Protocol):
    def reset(self) -> None:
        """Return to the power-on state."""
        ...
