"""Default I/O-instruction handler: the machine's port devices.

Ports no device claims read as all ones; writes to them are dropped.
A write to the debug-exit port ends the run with the guest's exit code.
"""
from __future__ import annotations

from ..actions import Stop


def port_devices(machine):
    """The default IO_INSTRUCTION handler of `machine` (its `add_device` devices)."""
    ports = machine.port_devices
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
            if device is machine.debug_exit and device.exit_requested:
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

    handle.drops_unclaimed_writes = True
    return handle
