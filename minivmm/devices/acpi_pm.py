"""The ACPI PM1a event and control blocks and the ACPI PM timer, as the FADT that
`minivmm.platform` builds describes them.

Sleep: a write of SLP_EN with a SLP_TYP to PM1a_CNT is latched as a sleep request
(`take_sleep_request`); SLP_TYP 1 is S3 and 0 is S5, as the DSDT's \\_S3 and \\_S5 say (QEMU's
values). While the machine is suspended (`suspend_until_wake`), `wake()` (a host call) or an
RTC alarm with PM1_EN.RTC_EN set (`rtc_alarm`) ends the sleep and sets WAK_STS in PM1_STS.

Reference: ACPI 6.5 sections 4.8.3.1-4.8.3.3 (PM1 event, PM1 control, PM timer), 7.4.2
(\\_Sx objects), 16.1-16.3 (sleeping and waking).
"""
from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["AcpiPm", "PM_BASE", "PM_TIMER_HZ", "PM1_EVT_LEN", "PM1_CNT_LEN", "PM_TMR_LEN", "SLP_TYP_S3",
           "SLP_TYP_S5", "WAK_STS", "RTC_STS"]

PM_BASE = 0x600
PM_TIMER_HZ = 3_579_545
PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN = 4, 2, 4
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_EN = 1 << 13
PM1_CNT_SLP_TYP_SHIFT = 10
SLP_TYP_S3, SLP_TYP_S5 = 1, 0
WAK_STS = 1 << 15                    # PM1_STS
RTC_STS = 1 << 10                    # PM1_STS; its enable, RTC_EN, is the same bit of PM1_EN


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
        self._sleep_request: int | None = None
        self._woken = threading.Event()
        self.suspended = False
        self.wake_reason = ""
        self.suspends = 0

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
        if self._control & PM1_CNT_SLP_EN:
            self._sleep_request = self._control >> PM1_CNT_SLP_TYP_SHIFT & 7
        self._control = (self._control | PM1_CNT_SCI_EN) & ~PM1_CNT_SLP_EN     # SLP_EN is write-only

    # -- sleeping and waking -------------------------------------------------------------
    def take_sleep_request(self) -> int | None:
        """The SLP_TYP of the last SLP_EN write, once (None: no request)."""
        request, self._sleep_request = self._sleep_request, None
        return request

    def suspend_until_wake(self, timeout: float | None = None,
                           give_up: Callable[[], bool] = lambda: False) -> bool:
        """Block (the vCPU stays stopped) until `wake` or an enabled RTC alarm; False when
        `timeout` seconds passed or `give_up()` (polled every 50 ms) said so first."""
        self.suspended = True
        self.suspends += 1
        self.wake_reason = ""
        self._woken.clear()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._woken.wait(0.05):
                if give_up() or deadline is not None and time.monotonic() >= deadline:
                    return False
            return True
        finally:
            self.suspended = False

    def wake(self, reason: str = "host") -> None:
        """End a sleep (a wake event); WAK_STS reads as set afterwards."""
        self._status |= WAK_STS
        self.wake_reason = self.wake_reason or reason
        self._woken.set()

    def rtc_alarm(self) -> None:
        """The RTC's alarm fired: RTC_STS is set, and with RTC_EN a sleeping machine wakes."""
        self._status |= RTC_STS
        if self._enable & RTC_STS and self.suspended:
            self.wake("rtc")
