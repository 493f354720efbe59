"""The port-I/O bus: which device answers which port."""
from __future__ import annotations

from typing import Callable

from . import PortDevice


class PortBus:
    """Port -> device, the container of a VM's port-I/O devices.

    `on_change` is called whenever the mapping changes (the exit loops cache
    routes per port)."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.by_port: dict[int, PortDevice] = {}
        self.devices: list[PortDevice] = []
        self.on_change = on_change

    def add(self, device: PortDevice) -> None:
        for port in device.ports:
            if port in self.by_port:
                raise ValueError(f"port {port:#x} of {type(device).__name__} is taken by "
                                 f"{type(self.by_port[port]).__name__}")
        for port in device.ports:
            self.by_port[port] = device
        self.devices.append(device)
        self.on_change()

    def remove(self, device: PortDevice) -> None:
        for port in device.ports:
            if self.by_port.get(port) is device:
                del self.by_port[port]
        if device in self.devices:
            self.devices.remove(device)
        self.on_change()

    def get(self, port: int) -> PortDevice | None:
        return self.by_port.get(port)
