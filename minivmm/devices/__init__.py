"""Port-I/O devices a guest reaches with ``in``/``out``, one module each, and the
small interface they share.

``serial`` (16550 UART), ``debug_exit`` (QEMU's isa-debug-exit) and the PC platform
devices that `minivmm.platform` assembles: ``fw_cfg`` (QEMU's fw_cfg), ``acpi_pm``
(ACPI PM1 block and PM timer), ``rtc`` (MC146818 RTC/CMOS), ``pci`` (configuration mechanism #1, no device),
``scratch`` (a read-back register) and ``testdev`` (QEMU's pc-testdev).

A device claims a range of ports; the I/O exit handler routes each access whose
port falls in ``ports`` to ``io_read``/``io_write`` with the access size in
bytes (1, 2 or 4). ``reset()`` is optional: check with
``isinstance(device, ResettableDevice)``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from minivmm.devices.debug_exit import DebugExit
from minivmm.devices.serial import Serial16550
from minivmm.lazy import lazy_names

__all__ = ["AcpiPm", "CmosRtc", "DebugExit", "FwCfg", "PciNoDevices", "PcTestdev", "PortDevice", "ResettableDevice",
           "ScratchRegister", "Serial16550"]


__getattr__ = lazy_names(__name__, {      # loaded when a platform asks for them
    "AcpiPm": ".acpi_pm", "CmosRtc": ".rtc", "FwCfg": ".fw_cfg", "PciNoDevices": ".pci", "PcTestdev": ".testdev",
    "ScratchRegister": ".scratch"})


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
