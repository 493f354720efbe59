"""Disassembly of guest code with capstone."""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import capstone


@lru_cache(maxsize=None)
def _engine(bits: int) -> "capstone.Cs":
    import capstone             # loaded at the first disassembly, not at import
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    return capstone.Cs(capstone.CS_ARCH_X86, mode)


def disassemble(code: bytes, address: int = 0, bits: int = 64, count: int = 0) -> list[tuple[int, bytes, str]]:
    """(address, bytes, "mnemonic operands") for each instruction decoded from `code`."""
    return [(i.address, bytes(i.bytes), f"{i.mnemonic} {i.op_str}".strip())
            for i in _engine(bits).disasm(code, address, count)]


def disassemble_one(code: bytes, bits: int = 64, address: int = 0) -> str | None:
    insns = disassemble(code, address, bits, 1)
    return insns[0][2] if insns else None


def instruction_length(code: bytes, bits: int = 64) -> int:
    insns = disassemble(code, 0, bits, 1)
    return len(insns[0][1]) if insns else 0
