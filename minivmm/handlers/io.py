"""Default I/O-instruction handler: the machine's port devices.

Ports no device claims read as all ones; writes to them are dropped.
A write to the debug-exit port ends the run with the guest's exit code.
"""
from __future__ import annotations

from ..actions import RESUME, Reply, Stop
from ..devices import DebugExit


def port_devices(bus, *, strict: bool = False):
    """The default IO_INSTRUCTION handler: the devices of `bus` (a `PortBus`); a write to a
    debug-exit device that requests an exit stops the run. `strict`: an access to a port no
    device claims stops the run with reason "error" (register this handler without
    `drops_unclaimed_writes` then)."""
    ports = bus.by_port
    exits: dict[int, Stop] = {}           # Stop is immutable and costs about 0.7 us to build

    def handle(vcpu, info):
        port = info.port
        device = ports.get(port)
        size = info.size
        if device is None and strict:
            what = "read from" if info.is_in else "write to"
            return Stop("error", message=f"strict ports: {size}-byte {what} unclaimed port "
                                         f"{port:#x} at rip={vcpu.rip:#x} (vCPU {vcpu.index})")
        if info.is_in:
            if info.string_data is None:
                info.data = device.io_read(port, size) if device is not None else (1 << (8 * size)) - 1
                return RESUME                                   # the IN reads info.data
            values = b"".join((device.io_read(port, size) if device is not None else (1 << (8 * size)) - 1)
                              .to_bytes(size, "little") for _ in range(info.count))
            return Reply(values)
        if device is None:
            return None
        if info.string_data is None:
            device.io_write(port, size, info.data)
        else:
            data = info.string_data
            for i in range(0, len(data), size):
                device.io_write(port, size, int.from_bytes(data[i:i + size], "little"))
        if device.__class__ is DebugExit and device.exit_requested:
            stop = exits.get(device.value)
            if stop is None:
                stop = exits[device.value] = Stop("exit", device.value)
            return stop
        return None

    return handle
