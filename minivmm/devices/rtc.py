"""The PC's MC146818 real-time clock and CMOS RAM at ports 0x70 (index) and 0x71 (data).

The time registers (0x00-0x09, century 0x32) are computed from a guest clock that runs with
the host's monotonic clock from a start time: the host's UTC time by default, or a fixed
`start` (epoch seconds) for reproducible runs. They read in BCD or binary (register B DM) and
in 24- or 12-hour form (register B 24/12, bit 7 of the hour = PM). Writing them moves the
clock; with register B SET the clock stands still until SET is cleared.

Register A's update-in-progress bit (UIP) is 1 during the last 2228 us before each second
boundary (244 us of warning plus the 1984 us update cycle of a 32.768 kHz time base), so a
guest polling it sees it toggle once a second. Register C latches the periodic (PF), alarm
(AF) and update-ended (UF) flags and IRQF; reading it clears them. IRQ 8 goes high when a
flag rises whose enable bit (register B PIE/AIE/UIE) is set (PF only counts while PIE is set,
as in QEMU, whose periodic timer runs only then; the data sheet latches it regardless), and low when C is read. The
interrupts are timed by a host thread (`start_timer`/`close`) that asks `next_event` when the next
one is due; without `irq` the flags still work by polling.

Port 0x70 is write-only (reads 0xFF, as in QEMU); its bit 7 masks NMIs (kept in
`nmi_masked`: KVM has no NMI line to gate here).
CMOS bytes 0x0E-0x7F are plain RAM, with the memory-size fields filled as a BIOS would
(0x15/0x16 base KiB, 0x17/0x18 and 0x30/0x31 KiB above 1 MiB (at most 0xFFFF), 0x34/0x35
64 KiB blocks between 16 MiB and 4 GiB, 0x5B-0x5D 64 KiB blocks above 4 GiB), as QEMU's pc
machine fills them.

References: Motorola MC146818A data sheet (register map, UIP timing, periodic rates, alarm
"don't care" codes 0xC0-0xFF); the IBM PC/AT technical reference's CMOS map.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Callable

__all__ = ["CmosRtc", "RTC_PORT", "RTC_IRQ", "RegisterB", "RegisterC", "UIP_WINDOW"]

RTC_PORT = 0x70
RTC_IRQ = 8
UIP_WINDOW = 244e-6 + 1984e-6
REG_SECONDS, REG_SECONDS_ALARM, REG_MINUTES, REG_MINUTES_ALARM, REG_HOURS, REG_HOURS_ALARM = range(6)
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_A, REG_B, REG_C, REG_D = range(6, 14)
REG_CENTURY = 0x32
REG_A_UIP = 0x80
REG_A_RATE = 0x0F
REG_A_DEFAULT = 0x26                 # 32.768 kHz time base (DV=010), 1024 Hz periodic rate
REG_D_VRT = 0x80                     # the battery is good
ALARM_DONT_CARE = 0xC0
NMI_DISABLE = 0x80


class RegisterB(IntFlag):
    """MC146818 register B."""
    DSE = 0x01                       # daylight saving (stored, not applied)
    HOURS_24 = 0x02
    DM_BINARY = 0x04
    SQWE = 0x08
    UIE = 0x10
    AIE = 0x20
    PIE = 0x40
    SET = 0x80


class RegisterC(IntFlag):
    """MC146818 register C: the interrupt flags (read-only, cleared by a read)."""
    UF = 0x10
    AF = 0x20
    PF = 0x40
    IRQF = 0x80


_ENABLES = ((RegisterC.PF, RegisterB.PIE), (RegisterC.AF, RegisterB.AIE), (RegisterC.UF, RegisterB.UIE))


def periodic_hz(register_a: int) -> float:
    """The periodic interrupt rate of register A's RS bits (0: off); 32.768 kHz time base."""
    rate = register_a & REG_A_RATE
    if rate == 0:
        return 0.0
    return 32768 / (1 << (rate - 1)) if rate >= 3 else (256.0, 128.0)[rate - 1]


@dataclass
class CmosRtc:
    """MC146818 RTC + CMOS RAM. `start` is the guest time at creation in epoch seconds (None:
    the host's time); `irq(level)` drives IRQ 8; `memory_size` fills the CMOS size fields;
    `clock` is the monotonic clock the guest time runs with (seconds)."""
    start: float | None = None
    irq: Callable[[int], None] | None = None
    memory_size: int = 0
    clock: Callable[[], float] = time.monotonic
    port: int = RTC_PORT
    ports: range = field(init=False)
    nmi_masked: bool = field(default=False, init=False)
    interrupts: int = field(default=0, init=False)
    """How many times IRQ 8 was raised."""

    def __post_init__(self) -> None:
        self.ports = range(self.port, self.port + 2)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[RegisterC], None]] = []
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.reset()

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            now = self.clock()
            self._origin = now                                  # monotonic time of guest time `_base`
            self._base = time.time() if self.start is None else float(self.start)
            self._frozen: float | None = None                   # guest time while SET
            self._index = 0
            self._cmos = bytearray(128)
            self._cmos[REG_A] = REG_A_DEFAULT
            self._cmos[REG_B] = RegisterB.HOURS_24
            self._cmos[REG_D] = REG_D_VRT
            self._alarm = [0, 0, 0]                              # seconds, minutes, hours as written
            self._flags = RegisterC(0)
            self._line = 0
            self._seen_second = int(self.guest_time(now))
            self._seen_period = self._period_count(now)
            self._fill_memory_size()
        self._changed.set()

    def _fill_memory_size(self) -> None:
        below_4g = min(self.memory_size, 4 << 30)
        extended_kib = min(max(below_4g - (1 << 20), 0) >> 10, 0xFFFF)
        above_16m = min(max(below_4g - (16 << 20), 0) >> 16, 0xFFFF)
        above_4g = max(self.memory_size - (4 << 30), 0) >> 16
        for offset, value, width in ((0x15, 640 if self.memory_size else 0, 2), (0x17, extended_kib, 2),
                                     (0x30, extended_kib, 2), (0x34, above_16m, 2), (0x5B, above_4g, 3)):
            self._cmos[offset:offset + width] = value.to_bytes(width, "little")

    @property
    def register_b(self) -> RegisterB:
        return RegisterB(self._cmos[REG_B])

    def guest_time(self, now: float | None = None) -> float:
        """The guest clock in epoch seconds (UTC)."""
        if self._frozen is not None:
            return self._frozen
        return self._base + ((self.clock() if now is None else now) - self._origin)

    def set_guest_time(self, seconds: float) -> None:
        with self._lock:
            if self._frozen is not None:
                self._frozen = float(seconds)
            else:
                self._base, self._origin = float(seconds), self.clock()
            self._seen_second = int(self.guest_time())

    # -- the register file -------------------------------------------------------------
    def _encode(self, value: int) -> int:
        return value if self.register_b & RegisterB.DM_BINARY else (value // 10) << 4 | value % 10

    def _decode(self, value: int) -> int:
        return value if self.register_b & RegisterB.DM_BINARY else (value >> 4) * 10 + (value & 0xF)

    def _encode_hour(self, hour: int) -> int:
        if self.register_b & RegisterB.HOURS_24:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)

    def _decode_hour(self, value: int) -> int:
        if self.register_b & RegisterB.HOURS_24:
            return self._decode(value)
        return self._decode(value & 0x7F) % 12 + (12 if value & 0x80 else 0)

    def read_register(self, index: int) -> int:
        with self._lock:
            now = self.clock()
            self._advance(now)
            if index > REG_D and index != REG_CENTURY:
                return self._cmos[index & 0x7F]
            if index == REG_A:
                uip = not self.register_b & RegisterB.SET and self._in_update(now)
                return self._cmos[REG_A] & 0x7F | (REG_A_UIP if uip else 0)
            if index == REG_C:
                flags = self._flags
                self._flags = RegisterC(0)
                self._drive(0)
                self._changed.set()
                return int(flags)
            if index in (REG_B, REG_D):
                return self._cmos[index]
            if index in (REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM):
                return self._alarm[index // 2]
            tm = time.gmtime(int(self.guest_time(now)))
            if index == REG_HOURS:
                return self._encode_hour(tm.tm_hour)
            value = {REG_SECONDS: tm.tm_sec, REG_MINUTES: tm.tm_min, REG_WEEKDAY: (tm.tm_wday + 1) % 7 + 1,
                     REG_DAY: tm.tm_mday, REG_MONTH: tm.tm_mon, REG_YEAR: tm.tm_year % 100,
                     REG_CENTURY: tm.tm_year // 100}[index]
            return self._encode(value)

    def write_register(self, index: int, value: int) -> None:
        with self._lock:
            now = self.clock()
            self._advance(now)
            if index in (REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM):
                self._alarm[index // 2] = value
            elif index in (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY):
                self._write_time(index, value, now)
            elif index == REG_A:
                self._cmos[REG_A] = value & 0x7F
                self._seen_period = self._period_count(now)
            elif index == REG_B:
                self._write_b(RegisterB(value), now)
            elif index in (REG_C, REG_D, REG_WEEKDAY):
                pass                                           # read-only, or derived from the date
            else:
                self._cmos[index & 0x7F] = value
            self._changed.set()

    def _write_time(self, index: int, value: int, now: float) -> None:
        import calendar                     # only a guest setting the clock needs it
        current = self.guest_time(now)
        tm = list(time.gmtime(int(current))[:6])               # year, month, day, hour, minute, second
        if index == REG_HOURS:
            tm[3] = self._decode_hour(value)
        elif index == REG_YEAR:
            tm[0] = tm[0] // 100 * 100 + self._decode(value)
        elif index == REG_CENTURY:
            tm[0] = self._decode(value) * 100 + tm[0] % 100
        else:
            tm[{REG_SECONDS: 5, REG_MINUTES: 4, REG_DAY: 2, REG_MONTH: 1}[index]] = self._decode(value)
        self.set_guest_time(calendar.timegm(tuple(tm)) + current % 1)

    def _write_b(self, value: RegisterB, now: float) -> None:
        if value & RegisterB.SET and self._frozen is None:
            self._frozen = float(int(self.guest_time(now)))
            value &= ~RegisterB.UIE                            # SET clears UIE (data sheet)
        elif not value & RegisterB.SET and self._frozen is not None:
            self._base, self._origin, self._frozen = self._frozen, now, None
            self._seen_second = int(self._base)
        self._cmos[REG_B] = int(value)
        self._raise_enabled()

    # -- time passing --------------------------------------------------------------------
    def _in_update(self, now: float) -> bool:
        return 1.0 - self.guest_time(now) % 1.0 <= UIP_WINDOW

    def _period_count(self, now: float) -> int:
        hz = periodic_hz(self._cmos[REG_A])
        return int((now - self._origin) * hz) if hz else 0

    def _alarm_matches(self, second: int) -> bool:
        tm = time.gmtime(second)
        for written, actual, hour in ((self._alarm[0], tm.tm_sec, False), (self._alarm[1], tm.tm_min, False),
                                      (self._alarm[2], tm.tm_hour, True)):
            if written & ALARM_DONT_CARE == ALARM_DONT_CARE:
                continue
            if (self._decode_hour(written) if hour else self._decode(written)) != actual:
                return False
        return True

    def _advance(self, now: float) -> None:
        """Latch the flags of what happened since the last look."""
        raised = RegisterC(0)
        period = self._period_count(now)
        if period != self._seen_period and periodic_hz(self._cmos[REG_A]) and self.register_b & RegisterB.PIE:
            raised |= RegisterC.PF
        self._seen_period = period
        if self._frozen is None:
            second = int(self.guest_time(now))
            if second > self._seen_second:
                raised |= RegisterC.UF
                first = max(self._seen_second + 1, second - 86400)   # the alarm repeats daily
                if any(self._alarm_matches(s) for s in range(first, second + 1)):
                    raised |= RegisterC.AF
            self._seen_second = second
        if raised:
            self._flags |= raised
            self._raise_enabled()
            for listener in self._listeners:
                listener(raised)

    def _raise_enabled(self) -> None:
        enabled = any(self._flags & flag and self.register_b & enable for flag, enable in _ENABLES)
        if enabled and not self._flags & RegisterC.IRQF:
            self._flags |= RegisterC.IRQF
            self._drive(1)

    def _drive(self, level: int) -> None:
        if level == self._line:
            return
        self._line = level
        if level:
            self.interrupts += 1
        if self.irq is not None:
            self.irq(level)

    def next_event(self, now: float | None = None) -> float | None:
        """The monotonic time of the next flag change that raises IRQ 8 or reaches a listener
        (None: nothing is due)."""
        with self._lock:
            now = self.clock() if now is None else now
            b = self.register_b
            candidates = []
            if self._flags & RegisterC.IRQF and not self._listeners:
                return None
            hz = periodic_hz(self._cmos[REG_A])
            if hz and b & RegisterB.PIE:
                candidates.append(self._origin + (self._period_count(now) + 1) / hz)
            if self._frozen is None and (b & (RegisterB.UIE | RegisterB.AIE) or self._listeners):
                guest = self.guest_time(now)
                if b & RegisterB.UIE:
                    candidates.append(now + (int(guest) + 1 - guest))
                alarm = self.next_alarm(guest)
                if alarm is not None and (b & RegisterB.AIE or self._listeners):
                    candidates.append(now + (alarm - guest))
            return min(candidates) if candidates else None

    def next_alarm(self, after: float) -> int | None:
        """The first guest second after `after` that the alarm registers match."""
        day = int(after) // 86400 * 86400

        def choices(written: int, count: int, hour: bool = False) -> range | tuple[int, ...]:
            if written & ALARM_DONT_CARE == ALARM_DONT_CARE:
                return range(count)
            value = self._decode_hour(written) if hour else self._decode(written)
            return (value,) if 0 <= value < count else ()

        for start in (day, day + 86400):
            for hour in choices(self._alarm[2], 24, True):
                if start + hour * 3600 + 3599 <= after:
                    continue
                for minute in choices(self._alarm[1], 60):
                    if start + hour * 3600 + minute * 60 + 59 <= after:
                        continue
                    for second in choices(self._alarm[0], 60):
                        candidate = start + hour * 3600 + minute * 60 + second
                        if candidate > after:
                            return candidate
        return None

    def tick(self) -> None:
        """Latch what is due now (the timer thread's call)."""
        with self._lock:
            self._advance(self.clock())

    def add_listener(self, listener: Callable[[RegisterC], None]) -> None:
        """Call `listener(flags)` (under the device lock) when flags rise; ACPI wakes on AF."""
        with self._lock:
            self._listeners.append(listener)
        self._changed.set()

    # -- the timer thread ------------------------------------------------------------------
    def start_timer(self) -> None:
        """Time the interrupts from a host thread (until `close`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._timer, name="minivmm-rtc", daemon=True)
            self._thread.start()

    def _timer(self) -> None:
        while not self._closing:
            self._changed.clear()
            due = self.next_event()
            wait = None if due is None else max(due - self.clock(), 0.0)
            if wait is None or wait > 0:
                self._changed.wait(wait)
            if self._closing:
                return
            self.tick()

    def close(self) -> None:
        self._closing = True
        self._changed.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- ports ---------------------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        if port == self.port:
            return 0xFF                                        # the index port is write-only
        return self.read_register(self._index)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == self.port:
            self.nmi_masked = bool(value & NMI_DISABLE)
            self._index = value & 0x7F
        else:
            self.write_register(self._index, value & 0xFF)
