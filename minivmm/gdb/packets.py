"""The GDB remote serial protocol's framing: `$payload#checksum`, acks, escapes, Ctrl-C.

GDB manual, appendix E "GDB Remote Serial Protocol", sections "Overview" (packet
format, the modulo-256 checksum, `+`/`-` acknowledgments, the `}` escape of binary
data) and "Interrupts" (a bare 0x03 byte while the target runs). Pure byte
functions and an incremental parser; no sockets here.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Ack", "BadChecksum", "Interrupt", "Nack", "Oversized", "Packet", "PacketParser",
           "PACKET_SIZE", "checksum", "escape", "frame", "from_hex", "to_hex", "unescape"]

PACKET_SIZE = 0x4000            # the largest payload we accept, announced in qSupported
INTERRUPT = 0x03
_ESCAPE = 0x7D                  # '}': the next byte is XORed with 0x20
_SPECIAL = frozenset(b"$#}*")


def checksum(payload: bytes) -> int:
    """The modulo-256 sum of the payload's bytes."""
    return sum(payload) & 0xFF


def escape(data: bytes) -> bytes:
    """Binary data as a packet may carry it: `$`, `#`, `}` and `*` become `}` + (byte ^ 0x20)."""
    out = bytearray()
    for b in data:
        if b in _SPECIAL:
            out += bytes((_ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The binary data of an `X` packet or a qXfer reply, escapes undone; ValueError when the
    data ends inside an escape."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == _ESCAPE:
            try:
                b = next(it) ^ 0x20
            except StopIteration:
                raise ValueError("binary data ends with an escape byte") from None
        out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """`$payload#cs` ready to send (the payload is escaped for `$`, `#` and `}`)."""
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


def to_hex(data: bytes) -> bytes:
    return data.hex().encode()


def from_hex(text: bytes | str) -> bytes:
    """ValueError for odd lengths or non-hex characters."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    return bytes.fromhex(text) if len(text) % 2 == 0 else bytes.fromhex(text + "x")


@dataclass(frozen=True)
class Packet:
    payload: bytes              # as received: escapes still in place (only X and binary uploads undo them)


@dataclass(frozen=True)
class Interrupt:
    """A 0x03 byte outside a packet: gdb's Ctrl-C."""


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class Nack:
    pass


@dataclass(frozen=True)
class BadChecksum:
    """A packet whose checksum does not match (answered with `-`: send it again)."""
    payload: bytes
    received: bytes


@dataclass(frozen=True)
class Oversized:
    """A packet longer than PACKET_SIZE; its bytes were dropped."""
    length: int


Event = Packet | Interrupt | Ack | Nack | BadChecksum | Oversized


class PacketParser:
    """Turns the bytes from gdb into events, whatever the chunks they arrive in.

    Bytes outside a packet other than `+`, `-`, `$` and 0x03 are ignored (line noise);
    a `$` inside a packet starts a new one (gdb resends after a timeout)."""

    def __init__(self, limit: int = PACKET_SIZE) -> None:
        self.limit = limit
        self._body: bytearray | None = None     # inside a packet: its payload so far
        self._length = 0
        self._sum: bytearray | None = None      # after '#': the checksum digits so far

    @property
    def inside_packet(self) -> bool:
        return self._body is not None

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for b in data:
            if self._sum is not None:
                self._sum.append(b)
                if len(self._sum) == 2:
                    events.append(self._finish())
            elif self._body is not None:
                if b == 0x23:                   # '#'
                    self._sum = bytearray()
                elif b == 0x24:                 # '$': gdb started over
                    self._body, self._length = bytearray(), 0
                else:
                    self._length += 1
                    if self._length <= self.limit:
                        self._body.append(b)
            elif b == 0x24:
                self._body, self._length = bytearray(), 0
            elif b == 0x2B:
                events.append(Ack())
            elif b == 0x2D:
                events.append(Nack())
            elif b == INTERRUPT:
                events.append(Interrupt())
        return events

    def _finish(self) -> Event:
        body, digits, length = bytes(self._body), bytes(self._sum), self._length
        self._body = self._sum = None
        self._length = 0
        if length > self.limit:
            return Oversized(length)
        try:
            good = int(digits, 16) == checksum(body)
        except ValueError:
            good = False
        return Packet(body) if good else BadChecksum(body, digits)
