"""QEMU's ``isa-debug-exit`` device: a guest ends the run by writing a status.

QEMU semantics (hw/misc/debugexit.c): writing value ``v`` to the device makes
QEMU exit with status ``(v << 1) | 1``, so a guest can never produce status 0.
Here the write records that status and raises ``exit_requested``; the machine
checks the flag after the I/O exit and stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PORT = 0xF4
_VALID_WIDTHS = (1, 2, 4)


@dataclass
class DebugExit:
    """``isa-debug-exit`` at ``port`` (QEMU's ``iobase``), ``width`` ports wide
    (QEMU's ``iosize``). The first write wins, as QEMU exits on it."""

    port: int = DEFAULT_PORT
    width: int = 1
    ports: range = field(init=False)
    exit_requested: bool = field(default=False, init=False)
    value: int | None = field(default=None, init=False)
    """The value the guest wrote."""
    status: int | None = field(default=None, init=False)
    """``(value << 1) | 1``, QEMU's process exit status."""

    def __post_init__(self) -> None:
        if self.width not in _VALID_WIDTHS:
            raise ValueError(f"debug-exit width must be 1, 2 or 4, not {self.width}")
        self.ports = range(self.port, self.port + self.width)

    def io_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def io_write(self, port: int, size: int, value: int) -> None:
        if self.exit_requested:
            return
        self.value = value & ((1 << (8 * size)) - 1)
        self.status = (self.value << 1) | 1
        self.exit_requested = True

    def reset(self) -> None:
        self.exit_requested = False
        self.value = None
        self.status = None
