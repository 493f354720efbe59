"""Reading KVM's dirty bitmaps.

Dirty tracking uses KVM's dirty log (api.rst 4.8 KVM_GET_DIRTY_LOG, 4.118
KVM_CLEAR_DIRTY_LOG with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) on every memslot
minivmm makes, harvested before a slot is deleted, plus the pages written by
the emulation in `EptShadow`.
"""
from __future__ import annotations

from ..kvm import MemoryFlag
from ..memory import PAGE_SHIFT

_LOG_DIRTY_PAGES = int(MemoryFlag.LOG_DIRTY_PAGES)
_ZERO_CHUNK = bytes(512)
_ZERO_BLOCK = bytes(4096)


def _dirty_chunks(raw: bytes) -> list[int]:
    """Byte offsets of the 512-byte chunks of a dirty bitmap with a bit set.

    Whole 4 KiB blocks (128 MiB of guest memory) are skipped with one bytes
    comparison (memcmp), so scanning a mostly clean bitmap costs next to
    nothing even for large slots.
    """
    found = []
    for block_at in range(0, len(raw), 4096):
        block = raw[block_at: block_at + 4096]
        if block == _ZERO_BLOCK[: len(block)]:
            continue
        for at in range(0, len(block), 512):
            chunk = block[at: at + 512]
            if chunk != _ZERO_CHUNK[: len(chunk)]:
                found.append(block_at + at)
    return found


def _bitmap_pages(raw: bytes, base_gpa: int, out: set[int]) -> None:
    """Add the GPA of every page whose bit is set in a KVM dirty bitmap to `out`."""
    for offset in range(0, len(raw), 512):
        chunk = raw[offset: offset + 512]
        if chunk == _ZERO_CHUNK[: len(chunk)]:
            continue
        bits = int.from_bytes(chunk, "little")
        first = base_gpa + (offset << 15)      # 8 bits per byte, 4 KiB per bit
        while bits:
            low = bits & -bits
            out.add(first + ((low.bit_length() - 1) << PAGE_SHIFT))
            bits ^= low

