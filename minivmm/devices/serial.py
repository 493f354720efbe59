"""A 16550 UART, enough for polled console output and input.

Register map (TI/National PC16550D datasheet, table 2), offsets from ``base``:

======  =========================  ===========================
offset  read                       write
======  =========================  ===========================
0       RBR receive buffer         THR transmit holding   (DLAB=0)
0       DLL divisor latch, low     DLL                    (DLAB=1)
1       IER interrupt enable       IER                    (DLAB=0)
1       DLM divisor latch, high    DLM                    (DLAB=1)
2       IIR interrupt identity     FCR FIFO control
3       LCR line control           LCR (bit 7 is DLAB)
4       MCR modem control          MCR
5       LSR line status            (factory test; ignored)
6       MSR modem status           (ignored)
7       SCR scratch                SCR
======  =========================  ===========================

Transmission is instantaneous: THR and the transmitter always read as empty.
No interrupt line is wired; ``interrupt_pending`` tells what the IRQ would be.
Accesses wider than a byte act on the register at the accessed port only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

COM1_BASE = 0x3F8
REGISTER_COUNT = 8

THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RECEIVED_DATA = 0x01
IER_THR_EMPTY = 0x02
IER_WRITABLE = 0x0F

IIR_NO_INTERRUPT = 0x01
IIR_THR_EMPTY = 0x02
IIR_RECEIVED_DATA = 0x04
IIR_FIFOS_ENABLED = 0xC0

FCR_FIFO_ENABLE = 0x01
FCR_CLEAR_RECEIVE_FIFO = 0x02

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOPBACK = 0x10
MCR_WRITABLE = 0x1F

LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_TRANSMITTER_EMPTY = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

DIVISOR_115200_BAUD = 1

_SINGLE_BYTES = tuple(bytes((value,)) for value in range(256))


@dataclass
class Serial16550:
    """A 16550 at ``base`` (COM1 by default). Transmitted bytes are appended to
    ``output`` and, when set, passed to ``sink`` one at a time; ``feed`` queues
    bytes for the guest to receive. ``reset`` keeps ``output``: it is the
    host's record of the line, not UART state."""

    base: int = COM1_BASE
    sink: Callable[[bytes], object] | None = None
    output: bytearray = field(default_factory=bytearray, init=False)
    ports: range = field(init=False)

    def __post_init__(self) -> None:
        self.ports = range(self.base, self.base + REGISTER_COUNT)
        self._received: deque[int] = deque()
        self.reset()

    def reset(self) -> None:
        self._received.clear()
        self._divisor_low = DIVISOR_115200_BAUD
        self._divisor_high = 0
        self._interrupt_enable = 0
        self._fifos_enabled = False
        self._line_control = 0
        self._modem_control = 0
        self._scratch = 0
        self._thr_empty_interrupt = False

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")

    @property
    def divisor(self) -> int:
        return self._divisor_high << 8 | self._divisor_low

    @property
    def pending_input(self) -> int:
        """Bytes queued for the guest to read."""
        return len(self._received)

    @property
    def interrupt_pending(self) -> bool:
        return bool(
            (self._interrupt_enable & IER_RECEIVED_DATA and self._received)
            or (self._interrupt_enable & IER_THR_EMPTY and self._thr_empty_interrupt)
        )

    @property
    def queued_input(self) -> bytes:
        """The bytes queued for the guest to read, oldest first (a copy)."""
        return bytes(self._received)

    def feed(self, data: bytes) -> None:
        """Queue `data` for the guest to read after what is already queued."""
        self._received.extend(data)

    def replace_input(self, data: bytes) -> None:
        """Make `data` the whole receive queue (e.g. to restore a saved `queued_input`)."""
        self._received.clear()
        self._received.extend(data)

    def io_write(self, port: int, size: int, value: int) -> None:
        offset = port - self.base
        if offset == THR and not self._line_control & LCR_DLAB:
            self._transmit(value & 0xFF)
        else:
            self._write_register(offset, value & 0xFF)

    def io_read(self, port: int, size: int) -> int:
        offset = port - self.base
        dlab = self._line_control & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self._divisor_low
            return self._received.popleft() if self._received else 0
        if offset == IER:
            return self._divisor_high if dlab else self._interrupt_enable
        if offset == IIR:
            return self._read_interrupt_identification()
        if offset == LCR:
            return self._line_control
        if offset == MCR:
            return self._modem_control
        if offset == LSR:
            ready = LSR_DATA_READY if self._received else 0
            return ready | LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY
        if offset == MSR:
            return self._modem_status()
        if offset == SCR:
            return self._scratch
        raise ValueError(f"port {port:#x} is not a register of the UART at {self.base:#x}")

    def _transmit(self, byte: int) -> None:
        if self._modem_control & MCR_LOOPBACK:
            self._received.append(byte)
        else:
            self.output.append(byte)
            if self.sink is not None:
                self.sink(_SINGLE_BYTES[byte])
        self._thr_empty_interrupt = True

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DLL:
            self._divisor_low = value
        elif offset == IER:
            if self._line_control & LCR_DLAB:
                self._divisor_high = value
            else:
                newly_enabled = value & ~self._interrupt_enable
                self._interrupt_enable = value & IER_WRITABLE
                if newly_enabled & IER_THR_EMPTY:
                    self._thr_empty_interrupt = True
        elif offset == FCR:
            self._fifos_enabled = bool(value & FCR_FIFO_ENABLE)
            if value & FCR_CLEAR_RECEIVE_FIFO:
                self._received.clear()
        elif offset == LCR:
            self._line_control = value
        elif offset == MCR:
            self._modem_control = value & MCR_WRITABLE
        elif offset == SCR:
            self._scratch = value
        elif offset not in (LSR, MSR):
            raise ValueError(f"port {self.base + offset:#x} is not a register of the UART at {self.base:#x}")

    def _read_interrupt_identification(self) -> int:
        fifo_bits = IIR_FIFOS_ENABLED if self._fifos_enabled else 0
        if self._interrupt_enable & IER_RECEIVED_DATA and self._received:
            return fifo_bits | IIR_RECEIVED_DATA
        if self._interrupt_enable & IER_THR_EMPTY and self._thr_empty_interrupt:
            # Reading IIR while it reports THR-empty clears that interrupt.
            self._thr_empty_interrupt = False
            return fifo_bits | IIR_THR_EMPTY
        return fifo_bits | IIR_NO_INTERRUPT

    def _modem_status(self) -> int:
        control = self._modem_control
        if not control & MCR_LOOPBACK:
            return MSR_CONNECTED
        # In loopback the modem outputs drive the modem inputs.
        status = 0
        if control & MCR_RTS:
            status |= MSR_CTS
        if control & MCR_DTR:
            status |= MSR_DSR
        if control & MCR_OUT1:
            status |= MSR_RI
        if control & MCR_OUT2:
            status |= MSR_DCD
        return status
