"""Where gdb connects: a TCP port or a Unix socket, one client at a time.

`Listener` accepts gdb; a second client that connects while one is served is
accepted and closed at once (gdb reports "Remote connection closed"), so it
never blocks or confuses the first. `Connection` sends framed packets and turns
what arrives into `minivmm.gdb.packets` events; in no-ack mode it sends no `+`.
"""
from __future__ import annotations

import os
import select
import socket
import stat
from pathlib import Path

from ..errors import MinivmmError
from .packets import Ack, Event, Nack, PacketParser, frame

__all__ = ["Connection", "ListenError", "Listener", "parse_address"]

RECV_SIZE = 65536


class ListenError(MinivmmError, OSError):
    """The stub cannot listen where it was asked to (the port is taken, the path is not
    writable)."""


def parse_address(text: str) -> tuple[str, int]:
    """`:1234`, `1234` or `host:1234` as (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    number = int(port if sep else text)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    return host or "127.0.0.1", number


class Listener:
    """A listening socket: `Listener(port=1234)` (TCP on 127.0.0.1, `host=` for another
    address; port 0 picks a free one, see `address`) or `Listener(socket_path=PATH)`."""

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1",
                 socket_path: str | os.PathLike | None = None) -> None:
        if (port is None) == (socket_path is None):
            raise ValueError("give exactly one of port= and socket_path=")
        self.path: Path | None = None
        if socket_path is not None:
            path = Path(socket_path)
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise ListenError(f"cannot listen for gdb on {path}: it exists and is not a socket")
                path.unlink()                    # a stale socket of an earlier session
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.bind(str(path))
            except OSError as exc:
                self.sock.close()
                raise ListenError(f"cannot listen for gdb on {path}: {exc.strerror}") from None
            self.path = path
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.sock.bind((host, port))
            except OSError as exc:
                self.sock.close()
                raise ListenError(f"cannot listen for gdb on {host}:{port}: {exc.strerror}") from None
        self.sock.listen(2)

    @property
    def address(self) -> str:
        """What to give gdb's `target remote`: `host:port` or the socket path."""
        if self.path is not None:
            return str(self.path)
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    @property
    def port(self) -> int | None:
        return None if self.path is not None else self.sock.getsockname()[1]

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None = None) -> "Connection | None":
        """The next client (None when `timeout` passes first)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        client, _ = self.sock.accept()
        if client.family == socket.AF_INET:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Connection(client)

    def refuse(self) -> None:
        """Accept a client that connected while another is served and close it at once."""
        try:
            client, _ = self.sock.accept()
        except OSError:
            return
        client.close()

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.path = None

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Connection:
    """One gdb client."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = PacketParser()
        self.noack = False
        self.closed = False
        self._last = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, payload: bytes) -> None:
        self._last = frame(payload)
        self._write(self._last)

    def ack(self, good: bool = True) -> None:
        if not self.noack:
            self._write(b"+" if good else b"-")

    def receive(self) -> list[Event] | None:
        """The events of the bytes that are there (after select said so); None when the client
        has gone. A `-` makes the last packet go out again."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.closed = True
            return None
        events = []
        for event in self.parser.feed(data):
            if isinstance(event, Nack):
                if self._last and not self.noack:
                    self._write(self._last)
            elif not isinstance(event, Ack):
                events.append(event)
        return events

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(data)
        except (ConnectionError, OSError):
            self.closed = True

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
