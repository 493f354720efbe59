"""`GdbServer`: one gdb client at a time, packets to the protocol session, resumes to the target.

While the guest runs the server waits on three things at once: gdb's socket (a 0x03
byte interrupts the guest; a closed socket detaches), the target's wake fd (a vCPU
stopped: the stop reply goes out) and the listening socket (a second client is
refused). `serve_machine` is what `Machine.serve_gdb`, `minivmm gdb` and
`minivmm run --gdb` call.
"""
from __future__ import annotations

import select
from enum import StrEnum
from typing import TYPE_CHECKING, Callable

from .bridge import MachineTarget
from .packets import BadChecksum, Interrupt, Oversized, Packet, to_hex
from .protocol import Session, StopEvent
from .transport import Connection, Listener

if TYPE_CHECKING:
    from ..machine import Machine
    from ..runloop import RunResult

__all__ = ["GdbServer", "SessionEnd", "serve_config_machine", "serve_machine"]


class SessionEnd(StrEnum):
    """How a gdb session ended."""
    DETACHED = "detached"          # D: the guest runs on
    KILLED = "killed"              # k / vKill: the guest stays stopped
    EXITED = "exited"              # the guest ended (its exit code went to gdb)
    DISCONNECTED = "disconnected"  # the client went away: like a detach
    NO_CLIENT = "no_client"        # nobody connected within the accept timeout


class GdbServer:
    """Serves `target` to the clients of `listener`, one session (`serve`) at a time."""

    def __init__(self, target: MachineTarget, listener: Listener,
                 log: Callable[[str], object] | None = None) -> None:
        self.target = target
        self.listener = listener
        self.log = log or (lambda text: None)
        self.last_stop = StopEvent()

    def serve(self, accept_timeout: float | None = None) -> SessionEnd:
        conn = self.listener.accept(accept_timeout)
        if conn is None:
            return SessionEnd.NO_CLIENT
        self.log("gdb connected")
        session = Session(self.target, last_stop=self.last_stop)
        try:
            while True:
                readable, _, _ = select.select([conn, self.listener], [], [])
                if self.listener.fileno() in map(_fd, readable):
                    self.listener.refuse()
                if conn not in readable:
                    continue
                events = conn.receive()
                if events is None:
                    return SessionEnd.DISCONNECTED
                for event in events:
                    end = self._event(conn, session, event)
                    if end is not None:
                        return end
        finally:
            self.last_stop = session.last_stop
            conn.close()

    def _event(self, conn: Connection, session: Session, event) -> SessionEnd | None:
        if isinstance(event, BadChecksum):
            conn.ack(False)
            return None
        if isinstance(event, Oversized):
            conn.ack()
            conn.send(b"E02")
            return None
        if not isinstance(event, Packet):       # a Ctrl-C while stopped: nothing runs
            return None
        conn.ack()
        outcome = session.handle(event.payload)
        if outcome.resume is not None:
            stop = self._run(conn, outcome.resume.actions)
            if stop is None:
                return SessionEnd.DISCONNECTED
            notes = [stop.message] if stop.message else []
            if stop.exit_code is None:
                notes.append(self.target.mode_note(stop.thread))
            for note in filter(None, notes):
                conn.send(b"O" + to_hex(note.encode() + b"\n"))
            conn.send(session.stopped(stop))
            return SessionEnd.EXITED if stop.exit_code is not None else None
        for packet in outcome.output:
            conn.send(packet)
        if outcome.reply is not None:
            conn.send(outcome.reply)
        if outcome.start_noack:
            conn.noack = True
        if outcome.detach:
            return SessionEnd.DETACHED
        if outcome.kill:
            return SessionEnd.KILLED
        return None

    def _run(self, conn: Connection, actions: dict[int, str]) -> StopEvent | None:
        """Run the target until it stops (its stop event) or the client goes (None, with
        the guest stopped)."""
        target = self.target
        target.start(actions)
        while True:
            readable, _, _ = select.select([conn, target.wake_fd, self.listener], [], [])
            fds = set(map(_fd, readable))
            if target.wake_fd in fds:
                return target.wait()
            if self.listener.fileno() in fds:
                self.listener.refuse()
            if conn.fileno() in fds:
                events = conn.receive()
                if events is None:
                    target.interrupt()
                    target.wait()
                    return None
                for event in events:
                    if isinstance(event, Interrupt):
                        target.interrupt()
                    elif isinstance(event, Packet):
                        conn.ack()              # only Ctrl-C is meaningful while running


def _fd(obj) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def serve_machine(machine: "Machine", port: int | None = None, socket: str | None = None, *,
                  host: str = "127.0.0.1", timeout: float | None = None,
                  ready: Callable[[str], object] | None = None,
                  accept_timeout: float | None = None, run_on: bool = True) -> "RunResult | None":
    """Wait for gdb on `port` (TCP) or `socket` (a Unix socket path) before the guest's first
    instruction and serve it until gdb detaches, kills, disconnects or the guest ends.
    After a detach or disconnect the guest runs on (to its end or the rest of `timeout`)
    unless `run_on` is False.
    `ready(address)` is called once the socket listens (port 0 picks a free port).
    Returns the run's result: the guest's end, or None when gdb killed it or never came."""
    listener = Listener(port, host=host, socket_path=socket) if socket is not None or port is not None \
        else Listener(1234, host=host)
    target = None
    try:
        target = MachineTarget(machine, timeout)
        if ready is not None:
            ready(listener.address)
        end = GdbServer(target, listener).serve(accept_timeout)
    finally:
        if target is not None:
            target.close()
        listener.close()
    if end in (SessionEnd.DETACHED, SessionEnd.DISCONNECTED) and target.finished is None and run_on:
        remaining = None if timeout is None else max(timeout - target.ran_s, 0.001)
        return machine.run(timeout=remaining)
    if end is SessionEnd.EXITED:
        return target.finished
    return None


def serve_config_machine(machine, where: str, timeout: float | None = None, *,
                         announce: Callable[[str], object] = print) -> "RunResult":
    """`minivmm run --gdb WHERE` / `minivmm gdb`: serve a config's machine on WHERE (`:PORT`,
    `HOST:PORT`, or a Unix socket path, which contains a `/`), with the config's deadline
    unless `timeout` is given. A guest gdb killed ends as reason "stopped"."""
    from ..actions import RunEnd
    from ..runloop import RunResult
    from .transport import parse_address
    if timeout is None:
        timeout = machine.config.machine.timeout
    if "/" in where:
        options = {"socket": where}
    else:
        host, port = parse_address(where)
        options = {"port": port, "host": host}
    result = serve_machine(machine, timeout=timeout, ready=lambda address: announce(
        f"waiting for gdb: target remote {address}"), **options)
    if result is None:
        result = RunResult(reason=RunEnd.STOPPED, message="gdb killed the guest", console=machine.serial.text)
        machine.last_result = result
    return result
