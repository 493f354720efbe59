"""The GDB remote protocol's commands: one packet in, one answer out (GDB manual, appendix E,
"Packets", "Stop Reply Packets", "General Query Packets", "Host I/O" left out).

`Session.handle(payload)` is pure: it asks a `Target` (the machine, through
`minivmm.gdb.bridge.MachineTarget`, or a test double) for registers, memory and
breakpoints, and returns an `Outcome`: the reply to send, or a `ResumeRequest` that
the server carries out (the stop reply comes when the target stops). Threads are
vCPUs: gdb thread id N is vCPU N-1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..errors import MinivmmError
from .packets import PACKET_SIZE, from_hex, to_hex, unescape
from .registers import Layout

__all__ = ["Outcome", "ResumeRequest", "Session", "StopEvent", "Target", "TargetError", "Signal",
           "stop_reply"]


class Signal:
    """GDB's own signal numbers (gdb/signals.def), which the remote protocol uses."""
    SIGINT, SIGILL, SIGTRAP, SIGABRT, SIGFPE, SIGKILL, SIGBUS, SIGSEGV, SIGALRM = 2, 4, 5, 6, 8, 9, 10, 11, 14


class TargetError(MinivmmError, RuntimeError):
    """What the target cannot do; `code` is the errno-like number of the E reply."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Unsupported(MinivmmError, NotImplementedError):
    """A request the target does not implement: the empty reply."""


@dataclass(frozen=True)
class StopEvent:
    """Why the target stopped: a signal on a thread (with the breakpoint or watchpoint that
    caused it), or the guest's end (`exit_code`)."""
    signal: int = Signal.SIGTRAP
    thread: int = 1
    reason: str = ""                   # "", "swbreak", "hwbreak", "watch", "rwatch", "awatch"
    address: int = 0                   # the watched address that was accessed
    exit_code: int | None = None
    message: str = ""


def stop_reply(event: StopEvent) -> bytes:
    if event.exit_code is not None:
        return b"W%02x" % (event.exit_code & 0xFF)
    text = b"T%02xthread:%x;" % (event.signal, event.thread)
    if event.reason in ("watch", "rwatch", "awatch"):
        text += b"%s:%x;" % (event.reason.encode(), event.address)
    elif event.reason:
        text += event.reason.encode() + b":;"
    return text


class Target(Protocol):
    def threads(self) -> list[int]: ...
    def layout(self) -> Layout: ...
    def read_registers(self, thread: int) -> dict[str, int | bytes]: ...
    def write_register(self, thread: int, name: str, value: int | bytes) -> None: ...
    def read_memory(self, thread: int, address: int, length: int) -> bytes: ...
    def write_memory(self, thread: int, address: int, data: bytes) -> None: ...
    def insert_point(self, kind: int, address: int, length: int) -> None: ...
    def remove_point(self, kind: int, address: int, length: int) -> None: ...
    def monitor(self, thread: int, command: str) -> str: ...
    def thread_name(self, thread: int) -> str: ...


@dataclass(frozen=True)
class ResumeRequest:
    """Run the target: `actions` maps a thread to "c" (continue) or "s" (step); threads not in
    it stay stopped."""
    actions: dict[int, str]


@dataclass
class Outcome:
    reply: bytes | None = None
    resume: ResumeRequest | None = None
    start_noack: bool = False          # no acks from the next packet on
    detach: bool = False               # the client goes; the guest runs on
    kill: bool = False                 # the client goes; the guest is stopped for good
    output: list[bytes] = field(default_factory=list)      # `O` console packets before the reply


@dataclass
class Session:
    """One gdb connection's protocol state."""
    target: Target
    last_stop: StopEvent = field(default_factory=StopEvent)
    general_thread: int = 1            # Hg: registers and memory
    continue_thread: int = -1          # Hc: the thread c and s apply to (-1: all)
    noack: bool = False

    def handle(self, payload: bytes) -> Outcome:
        try:
            return self._handle(payload)
        except Unsupported:
            return Outcome(b"")
        except TargetError as exc:
            return Outcome(b"E%02x" % (exc.code & 0xFF))
        except (ValueError, IndexError, KeyError, UnicodeDecodeError):
            return Outcome(b"E01")          # a malformed request

    # -- dispatch ----------------------------------------------------------------------
    def _handle(self, p: bytes) -> Outcome:
        if not p:
            return Outcome(b"")
        head = p[:1]
        if p.startswith(b"q") or p.startswith(b"Q"):
            return self._query(p)
        if p.startswith(b"v"):
            return self._v(p)
        simple = {b"?": self._why, b"g": self._read_all, b"G": self._write_all, b"p": self._read_one,
                  b"P": self._write_one, b"m": self._read_memory, b"M": self._write_memory,
                  b"X": self._write_binary, b"H": self._select, b"T": self._thread_alive,
                  b"Z": self._insert, b"z": self._remove}
        if head in simple:
            return simple[head](p)
        if head in (b"c", b"s", b"C", b"S"):
            if len(p) > 1 and head in (b"c", b"s"):
                self._set_pc(self._resume_thread(), int(p[1:], 16))
            action = head.lower().decode()
            return Outcome(resume=self._resume_all(action))
        if head == b"D":
            return Outcome(b"OK", detach=True)
        if head == b"k":
            return Outcome(None, kill=True)
        raise Unsupported

    def stopped(self, event: StopEvent) -> bytes:
        """The stop reply for `event`, which also makes its thread the general one (gdb assumes
        a stub switches to the thread a stop reply names, and sends no Hg for it)."""
        self.last_stop = event
        if event.exit_code is None:
            self.general_thread = event.thread
        return stop_reply(event)

    def _why(self, p: bytes) -> Outcome:
        return Outcome(stop_reply(self.last_stop))

    # -- queries ------------------------------------------------------------------------
    def _query(self, p: bytes) -> Outcome:
        name, _, rest = p.partition(b":")
        target = self.target
        if name == b"qSupported":
            return Outcome(b"PacketSize=%x;QStartNoAckMode+;qXfer:features:read+;swbreak+;hwbreak+;"
                           b"vContSupported+" % PACKET_SIZE)
        if p == b"QStartNoAckMode":
            return Outcome(b"OK", start_noack=True)
        if p.startswith(b"qAttached"):
            return Outcome(b"1")
        if p == b"qOffsets":
            return Outcome(b"Text=0;Data=0;Bss=0")
        if p == b"qC":
            return Outcome(b"QC%x" % self._thread(self.general_thread))
        if p == b"qfThreadInfo":
            return Outcome(b"m" + b",".join(b"%x" % t for t in target.threads()))
        if p == b"qsThreadInfo":
            return Outcome(b"l")
        if p.startswith(b"qThreadExtraInfo,"):
            thread = self._known(int(p.split(b",", 1)[1], 16))
            return Outcome(to_hex(target.thread_name(thread).encode()))
        if p == b"qSymbol::":
            return Outcome(b"OK")
        if p.startswith(b"qXfer:features:read:"):
            return self._features(p[len(b"qXfer:features:read:"):])
        if p.startswith(b"qRcmd,"):
            command = from_hex(p[len(b"qRcmd,"):]).decode("utf-8", "replace")
            text = target.monitor(self._thread(self.general_thread), command)
            if text and not text.endswith("\n"):
                text += "\n"
            data = text.encode()
            step = (PACKET_SIZE - 16) // 2
            return Outcome(b"OK", output=[b"O" + to_hex(data[i:i + step]) for i in range(0, len(data), step)])
        raise Unsupported

    def _features(self, spec: bytes) -> Outcome:
        annex, _, window = spec.partition(b":")
        offset, length = (int(x, 16) for x in window.split(b","))
        if annex != b"target.xml":
            raise TargetError(f"no annex {annex!r}", 0)
        document = self.target.layout().xml().encode()
        chunk = document[offset:offset + min(length, PACKET_SIZE - 16)]
        more = offset + len(chunk) < len(document)
        return Outcome((b"m" if more else b"l") + chunk)

    def _v(self, p: bytes) -> Outcome:
        if p == b"vCont?":
            return Outcome(b"vCont;c;C;s;S")
        if p.startswith(b"vCont;"):
            actions: dict[int, str] = {}
            default = None
            for part in p[len(b"vCont;"):].split(b";"):
                action, _, thread = part.partition(b":")
                letter = action[:1].lower().decode()
                if letter not in ("c", "s"):
                    raise Unsupported
                if not thread or thread in (b"-1", b"0"):
                    default = default or letter
                else:
                    number = self._known(_thread_id(thread))
                    actions.setdefault(number, letter)       # the leftmost action wins
            if default is not None:
                for t in self.target.threads():
                    actions.setdefault(t, default)
            return Outcome(resume=ResumeRequest(actions))
        if p.startswith(b"vKill"):
            return Outcome(b"OK", kill=True)
        if p == b"vMustReplyEmpty":
            return Outcome(b"")
        raise Unsupported

    # -- threads ------------------------------------------------------------------------
    def _known(self, thread: int) -> int:
        if thread not in self.target.threads():
            raise TargetError(f"no thread {thread}", 2)
        return thread

    def _thread(self, thread: int) -> int:
        """A concrete thread for -1 / 0 (any): the first one."""
        return self.target.threads()[0] if thread <= 0 else thread

    def _select(self, p: bytes) -> Outcome:
        which, thread = p[1:2], _thread_id(p[2:])
        if thread > 0:
            self._known(thread)
        if which == b"g":
            self.general_thread = thread
        elif which == b"c":
            self.continue_thread = thread
        else:
            raise ValueError(f"H{which!r}")
        return Outcome(b"OK")

    def _thread_alive(self, p: bytes) -> Outcome:
        self._known(_thread_id(p[1:]))
        return Outcome(b"OK")

    def _resume_thread(self) -> int:
        return self._thread(self.continue_thread if self.continue_thread > 0 else self.general_thread)

    def _resume_all(self, action: str) -> ResumeRequest:
        """`c`/`s`: the Hc thread (or, with Hc -1, the thread that stopped) does `action`;
        a step leaves the others stopped, as gdb's scheduler-locking does not assume more."""
        threads = self.target.threads()
        if action == "s":
            return ResumeRequest({self._resume_thread(): "s"})
        if self.continue_thread > 0:
            return ResumeRequest({self.continue_thread: "c"})
        return ResumeRequest({t: "c" for t in threads})

    # -- registers ----------------------------------------------------------------------
    def _encode(self, values: dict[str, int | bytes]) -> bytes:
        out = bytearray()
        for reg in self.target.layout().registers:
            out += _register_bytes(values.get(reg.name), reg.size)
        return to_hex(bytes(out))

    def _read_all(self, p: bytes) -> Outcome:
        return Outcome(self._encode(self.target.read_registers(self._thread(self.general_thread))))

    def _write_all(self, p: bytes) -> Outcome:
        data = from_hex(p[1:])
        layout = self.target.layout()
        thread = self._thread(self.general_thread)
        if len(data) > sum(r.size for r in layout.registers):
            raise ValueError("G packet longer than the register file")
        current = self.target.read_registers(thread)
        offset = 0
        for reg in layout.registers:
            chunk = data[offset:offset + reg.size]
            offset += reg.size
            if len(chunk) < reg.size:
                break
            if chunk != _register_bytes(current.get(reg.name), reg.size):
                self.target.write_register(thread, reg.name, _register_value(chunk, reg.bits))
        return Outcome(b"OK")

    def _read_one(self, p: bytes) -> Outcome:
        number = int(p[1:], 16)
        registers = self.target.layout().registers
        if number >= len(registers):
            raise TargetError(f"no register {number}", 0)
        reg = registers[number]
        value = self.target.read_registers(self._thread(self.general_thread)).get(reg.name)
        return Outcome(to_hex(_register_bytes(value, reg.size)))

    def _write_one(self, p: bytes) -> Outcome:
        number, _, value = p[1:].partition(b"=")
        registers = self.target.layout().registers
        index = int(number, 16)
        if index >= len(registers):
            raise TargetError(f"no register {index}", 0)
        reg = registers[index]
        data = from_hex(value)
        if len(data) != reg.size:
            raise ValueError(f"{reg.name} takes {reg.size} bytes")
        self.target.write_register(self._thread(self.general_thread), reg.name, _register_value(data, reg.bits))
        return Outcome(b"OK")

    def _set_pc(self, thread: int, address: int) -> None:
        self.target.write_register(thread, self.target.layout().pc, address)

    # -- memory -------------------------------------------------------------------------
    def _read_memory(self, p: bytes) -> Outcome:
        address, length = (int(x, 16) for x in p[1:].split(b","))
        length = min(length, (PACKET_SIZE - 4) // 2)
        data = self.target.read_memory(self._thread(self.general_thread), address, length)
        return Outcome(to_hex(data))

    def _write_memory(self, p: bytes) -> Outcome:
        spec, _, payload = p[1:].partition(b":")
        address, length = (int(x, 16) for x in spec.split(b","))
        data = from_hex(payload)
        if len(data) != length:
            raise ValueError(f"M: {length} bytes announced, {len(data)} given")
        self.target.write_memory(self._thread(self.general_thread), address, data)
        return Outcome(b"OK")

    def _write_binary(self, p: bytes) -> Outcome:
        spec, sep, payload = p[1:].partition(b":")
        if not sep:
            raise ValueError("X without ':'")
        address, length = (int(x, 16) for x in spec.split(b","))
        data = unescape(payload)
        if len(data) != length:
            raise ValueError(f"X: {length} bytes announced, {len(data)} given")
        if data:
            self.target.write_memory(self._thread(self.general_thread), address, data)
        return Outcome(b"OK")

    # -- breakpoints and watchpoints --------------------------------------------------------
    def _point(self, p: bytes) -> tuple[int, int, int]:
        kind, address, length = p[1:].split(b";")[0].split(b",")
        return int(kind, 16), int(address, 16), int(length, 16)

    def _insert(self, p: bytes) -> Outcome:
        self.target.insert_point(*self._point(p))
        return Outcome(b"OK")

    def _remove(self, p: bytes) -> Outcome:
        self.target.remove_point(*self._point(p))
        return Outcome(b"OK")


def _thread_id(text: bytes) -> int:
    """A thread-id: hex, -1 (all) or 0 (any); the multiprocess form `p1.2` gives its thread."""
    if text.startswith(b"p"):
        text = text.split(b".", 1)[1] if b"." in text else b"-1"
    return -1 if text == b"-1" else int(text, 16)


def _register_bytes(value: int | bytes | None, size: int) -> bytes:
    if value is None:
        return bytes(size)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:size]).ljust(size, b"\0")
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _register_value(data: bytes, bits: int) -> int | bytes:
    return int.from_bytes(data, "little") if bits <= 64 else data
