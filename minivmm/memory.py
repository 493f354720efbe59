"""Guest-physical memory: mmap-backed regions with bounds-checked access."""
from __future__ import annotations

import bisect
import heapq
import re
import ctypes
import mmap
import struct
from dataclasses import dataclass, field

from .errors import MinivmmError

PAGE_SIZE = 4096
PAGE_SHIFT = 12


_SIZE = re.compile(r"(?P<number>.+?)(?P<unit>[KMG])(?:I?B)?", re.IGNORECASE)
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(value: int | str) -> int:
    """`2M`, `1GiB`, `64k`, `0x200000`, `4096` -> bytes (ValueError otherwise)."""
    if isinstance(value, int):
        return value
    text = value.strip().replace("_", "")
    match = _SIZE.fullmatch(text)
    try:
        if match:
            return int(match["number"], 0) * _UNITS[match["unit"].upper()]
        return int(text, 0)
    except ValueError:
        raise ValueError(f"bad size {value!r}: expected a number with an optional K/M/G suffix") from None


class GuestMemoryError(MinivmmError, ValueError):
    """A guest-physical access or region layout that is not valid."""


RAM_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
"""How guest RAM is mapped (Python's mmap module has MAP_NORESERVE from 3.13 on)."""


def check_reservable(size: int) -> None:
    """Raise GuestMemoryError unless the host lets this process map `size` bytes of guest RAM
    the way `Region` maps it (a trial mapping, released at once; no page is touched)."""
    if size <= 0:
        return
    try:
        trial = mmap.mmap(-1, size, RAM_MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, OverflowError) as exc:
        available = _host_available()
        hint = f"; the host has about {available >> 20} MiB of RAM and swap available" if available else ""
        raise GuestMemoryError(f"the host cannot reserve {size:#x} bytes ({size >> 20} MiB) of guest RAM: "
                               f"{getattr(exc, 'strerror', None) or exc}{hint}") from None
    trial.close()


def _host_available() -> int | None:
    """MemAvailable plus SwapFree from /proc/meminfo, in bytes (None when unreadable)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        return sum(int(fields[key].split()[0]) * 1024 for key in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


@dataclass(eq=False)
class Region:
    """One contiguous block of guest RAM backed by an anonymous host mapping."""
    gpa: int
    size: int
    readonly: bool = False
    name: str = "ram"
    mem: mmap.mmap = field(init=False, repr=False)
    host_addr: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mem = mmap.mmap(-1, self.size, RAM_MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
        view = ctypes.c_char.from_buffer(self.mem)
        self.host_addr = ctypes.addressof(view)
        del view

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def close(self) -> None:
        if not self.mem.closed:
            self.mem.close()


class GuestMemory:
    """The guest-physical address space: non-overlapping, page-aligned RAM regions."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self._starts: list[int] = []

    def add_region(self, gpa: int, size: int, *, readonly: bool = False, name: str = "ram") -> Region:
        if gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise GuestMemoryError(
                f"region {name} at {gpa:#x} size {size:#x} is not page aligned (4 KiB)")
        if size <= 0:
            raise GuestMemoryError(f"region {name} has size {size:#x}; it must be positive")
        for other in self.regions:
            if gpa < other.end and other.gpa < gpa + size:
                raise GuestMemoryError(
                    f"region {name} [{gpa:#x}, {gpa + size:#x}) overlaps region {other.name} "
                    f"[{other.gpa:#x}, {other.end:#x})")
        region = Region(gpa, size, readonly, name)
        index = bisect.bisect(self._starts, gpa)
        self.regions.insert(index, region)
        self._starts.insert(index, gpa)
        return region

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions.clear()
        self._starts.clear()

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def region_at(self, gpa: int) -> Region | None:
        index = bisect.bisect(self._starts, gpa) - 1
        if index >= 0:
            region = self.regions[index]
            if gpa < region.end:
                return region
        return None

    def is_mapped(self, gpa: int) -> bool:
        return self.region_at(gpa) is not None

    def _chunks(self, gpa: int, length: int):
        """Yield (region, offset, n) covering [gpa, gpa+length), across adjacent regions."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"bad guest-physical access at {gpa:#x} length {length}")
        while length:
            region = self.region_at(gpa)
            if region is None:
                raise GuestMemoryError(f"guest-physical address {gpa:#x} is not backed by RAM")
            n = min(length, region.end - gpa)
            yield region, gpa - region.gpa, n
            gpa += n
            length -= n

    def read(self, gpa: int, length: int) -> bytes:
        region = self.region_at(gpa)
        if region is not None and gpa + length <= region.end and length >= 0:
            offset = gpa - region.gpa
            return region.mem[offset: offset + length]
        return b"".join(r.mem[o: o + n] for r, o, n in self._chunks(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        pos = 0
        for region, offset, n in self._chunks(gpa, len(data)):
            region.mem[offset: offset + n] = data[pos: pos + n]
            pos += n

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        for region, offset, n in self._chunks(gpa, length):
            region.mem[offset: offset + n] = bytes([byte]) * n

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of guest memory inside one region."""
        region = self.region_at(gpa)
        if region is None or gpa + length > region.end:
            raise GuestMemoryError(
                f"[{gpa:#x}, {gpa + length:#x}) is not inside one RAM region")
        offset = gpa - region.gpa
        return memoryview(region.mem)[offset: offset + length]

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<B", value))

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))


class SlotTable:
    """KVM memslot numbers: the one allocator of a VM.

    `base[region]` is the slot that maps a RAM region whole; the EPT takes
    further slots (`allocate`) when it splits a region by permission. The
    lowest free number is given out first."""

    def __init__(self) -> None:
        self.base: dict[Region, int] = {}
        self._free: list[int] = []
        self._next = 0

    def allocate(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self._next += 1
        return self._next - 1

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
