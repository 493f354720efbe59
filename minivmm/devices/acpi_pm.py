"""The ACPI PM1a event and control blocks and the ACPI PM timer, as the FADT that
`minivmm.platform` builds describes them.

Reference: ACPI 6.5 sections 4.8.3.1-4.8.3.3 (PM1 event, PM1 control, PM timer).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

__all__ = ["AcpiPm", "PM_BASE", "PM_TIMER_HZ", "PM1_EVT_LEN", "PM1_CNT_LEN", "PM_TMR_LEN"]

PM_BASE = 0x600
PM_TIMER_HZ = 3_579_545
PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN = 4, 2, 4
PM1_CNT_SCI_EN = 1 << 0


@dataclass
class AcpiPm:
    """The PM1a event block (status/enable, `base`..+3), PM1a control (`base`+4..+5) and the
    PM timer (`base`+8..+11): a free-running 3.579545 MHz counter, 24 bits wide unless
    `timer_32bit` (the FADT's TMR_VAL_EXT flag says which). SCI_EN reads as set: the
    machine is in ACPI mode from the start (the FADT has no SMI command port)."""
    base: int = PM_BASE
    timer_32bit: bool = True
    ports: range = field(init=False)

    def __post_init__(self) -> None:
        self.ports = range(self.base, self.base + 12)
        self._start_ns = time.monotonic_ns()
        self._status = 0
        self._enable = 0
        self._control = PM1_CNT_SCI_EN

    @property
    def timer_port(self) -> int:
        return self.base + 8

    def ticks(self) -> int:
        """The counter's current value."""
        ticks = (time.monotonic_ns() - self._start_ns) * PM_TIMER_HZ // 1_000_000_000
        return ticks & (0xFFFFFFFF if self.timer_32bit else 0xFFFFFF)

    def io_read(self, port: int, size: int) -> int:
        offset = port - self.base
        if offset >= 8:
            return (self.ticks() >> (8 * (offset - 8))) & ((1 << (8 * size)) - 1)
        registers = struct.pack("<HHHH", self._status, self._enable, self._control, 0)
        return int.from_bytes(registers[offset:offset + size].ljust(size, b"\xff"), "little")

    def io_write(self, port: int, size: int, value: int) -> None:
        offset = port - self.base
        raw = bytearray(struct.pack("<HHHH", self._status, self._enable, self._control, 0))
        if offset >= 6:
            return                                           # the timer is read-only
        new = value.to_bytes(size, "little")
        if offset < 2:                                       # PM1_STS: write 1 to clear
            status = bytearray(raw[0:2])
            for i, byte in enumerate(new[:2 - offset]):
                status[offset + i] &= ~byte & 0xFF
            raw[0:2] = status
            new = new[2 - offset:]
            offset = 2
        raw[offset:offset + len(new)] = new[:6 - offset]
        self._status, self._enable, self._control, _ = struct.unpack("<HHHH", raw)
        self._control |= PM1_CNT_SCI_EN
