"""Default I/O-instruction handler: the machine's port devices.

Ports no device claims read as all ones; writes to them are dropped.
A write to the debug-exit port ends the run with the guest's exit code.
"""
from __future__ import annotations

from ..actions import Stop
from ..devices import DebugExit


def port_devices(bus):
    """The default IO_INSTRUCTION handler: the devices of `bus` (a `PortBus`); a write to a
    debug-exit device that requests an exit stops the run."""
    ports = bus.by_port
    exits: dict[int, Stop] = {}           # Stop is immutable and costs about 0.7 us to build

    def handle(vcpu, info):
        exit = info.detail
        device = ports.get(exit.port)
        if device is None and exit.is_out:
            return None
        size = exit.size
        if exit.is_out:
            if exit.count == 1:
                device.io_write(exit.port, size, info.data)
            else:
                data = vcpu.fd.io_data(exit)
                for i in range(0, len(data), size):
                    device.io_write(exit.port, size, int.from_bytes(data[i:i + size], "little"))
            if device.__class__ is DebugExit and device.exit_requested:
                stop = exits.get(device.value)
                if stop is None:
                    stop = exits[device.value] = Stop("exit", device.value)
                return stop
            return None
        data = vcpu.fd.io_data(exit)
        for i in range(0, len(data), size):
            value = device.io_read(exit.port, size) if device is not None else (1 << (8 * size)) - 1
            data[i:i + size] = value.to_bytes(size, "little")
        return None

    return handle
