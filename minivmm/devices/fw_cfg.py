"""QEMU's fw_cfg device, port interface: the keys and files a kernel written for QEMU's
``-kernel`` reads to learn the CPU count, the RAM size and host-provided files.

Reference: QEMU docs/specs/fw_cfg.rst (selector/data ports, keys FW_CFG_SIGNATURE
0x00, FW_CFG_ID 0x01, FW_CFG_RAM_SIZE 0x03, FW_CFG_NB_CPUS 0x05, FW_CFG_MAX_CPUS
0x0f, FW_CFG_FILE_DIR 0x19).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["FwCfg", "FW_CFG_PORT"]

FW_CFG_PORT = 0x510
FW_CFG_SIGNATURE = 0x0000
FW_CFG_ID = 0x0001
FW_CFG_UUID = 0x0002
FW_CFG_RAM_SIZE = 0x0003
FW_CFG_NOGRAPHIC = 0x0004
FW_CFG_NB_CPUS = 0x0005
FW_CFG_MAX_CPUS = 0x000F
FW_CFG_FILE_DIR = 0x0019
FW_CFG_FILE_FIRST = 0x0020
FW_CFG_ID_TRADITIONAL = 1 << 0          # the port interface (no DMA)


@dataclass
class FwCfg:
    """QEMU's fw_cfg device, port interface: write a 16-bit key to `port`, then read the
    item's bytes one at a time from `port + 1`. Reads past an item's end, and of unknown
    keys, return 0 (as QEMU does). Files added with `add_file` appear in FW_CFG_FILE_DIR."""
    cpus: int = 1
    ram_size: int = 0
    port: int = FW_CFG_PORT
    ports: range = field(init=False)
    items: dict[int, bytes] = field(init=False)
    selector: int = field(default=0, init=False)
    offset: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.ports = range(self.port, self.port + 2)
        self.items = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_ID_TRADITIONAL),
            FW_CFG_UUID: bytes(16),
            FW_CFG_RAM_SIZE: struct.pack("<Q", self.ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", self.cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", self.cpus),
        }
        self._files: list[tuple[str, int, int]] = []
        self._update_directory()

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named item (e.g. "etc/minivmm/test"); returns its selector key."""
        encoded = name.encode()
        if len(encoded) > 55:
            raise ValueError(f"fw_cfg file name {name!r} is longer than 55 bytes")
        key = FW_CFG_FILE_FIRST + len(self._files)
        self.items[key] = bytes(data)
        self._files.append((name, key, len(data)))
        self._update_directory()
        return key

    def _update_directory(self) -> None:
        # struct FWCfgFiles: be32 count, then FWCfgFile {be32 size, be16 select, be16 reserved,
        # char name[56]} per file, all big-endian.
        entries = b"".join(struct.pack(">IHH56s", size, key, 0, name.encode())
                           for name, key, size in self._files)
        self.items[FW_CFG_FILE_DIR] = struct.pack(">I", len(self._files)) + entries

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == self.port:
            self.selector = value & 0xFFFF
            self.offset = 0

    def io_read(self, port: int, size: int) -> int:
        if port != self.port + 1:
            return (1 << (8 * size)) - 1
        data = self.items.get(self.selector, b"")
        chunk = data[self.offset:self.offset + size].ljust(size, b"\0")
        self.offset += size
        return int.from_bytes(chunk, "little")
