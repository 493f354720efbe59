"""Basic-block coverage from one-shot breakpoints.

The basic-block starts of the covered code ranges are found with capstone
(a linear sweep: the first instruction, every direct branch target, and the
instruction after every branch, call, return or trap). Each start gets a
one-shot breakpoint of the machine's `minivmm.breakpoints.BreakpointTable`,
with the snapshot's memory copy as a mirror: an `int3` (0xCC) in guest memory
*and* in the copy. When the guest reaches one the table calls `Coverage`,
which records the block, and writes the original byte back in both places
(unless another owner, e.g. a visible execute hook, keeps the address) before
the instruction executes. A breakpoint thus fires at most once per campaign,
and a run that finds nothing new costs no extra exit at all.

Coverage is reported as the set of block addresses hit (`hits`), the blocks
hit by the last run (`new_blocks`, in hit order) and a bitmap (`bitmap()`,
one byte per block slot, AFL style).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from ..actions import Stop
from ..breakpoints import INT3, Breakpoint, BreakpointTable
from ..disasm import disassemble
from ..errors import MinivmmError
from ..modes import CODE_BITS

if TYPE_CHECKING:
    from ..exits import ExitInfo
    from ..machine import Machine
    from ..snapshot import Snapshot
    from ..vcpu import Vcpu

_ENDS_BLOCK = re.compile(r"^(j\w+|call|ret\w*|loop\w*|int\w*|syscall|sysret\w*|iret\w*|ud2|hlt)$")
_IMMEDIATE = re.compile(r"^0x[0-9a-f]+$|^\d+$")


class CoverageError(MinivmmError, ValueError):
    """Coverage ranges that cannot be instrumented."""


def basic_blocks(code: bytes, address: int, bits: int = 64) -> list[int]:
    """Start addresses of the basic blocks in `code` (loaded at `address`), sorted.

    Direct branch targets outside the range are ignored; targets that do not
    fall on a decoded instruction boundary are ignored too (they would
    corrupt an instruction).
    """
    insns = disassemble(code, address, bits)
    if not insns:
        return []
    boundaries = {a for a, _, _ in insns}
    end = address + len(code)
    starts = {insns[0][0]}
    for addr, raw, text in insns:
        mnemonic, _, operands = text.partition(" ")
        if not _ENDS_BLOCK.match(mnemonic):
            continue
        following = addr + len(raw)
        if following < end:
            starts.add(following)
        operands = operands.strip()
        if mnemonic.startswith(("j", "call", "loop")) and _IMMEDIATE.match(operands):
            target = int(operands, 0)
            if address <= target < end:
                starts.add(target)
    return sorted(s for s in starts if s in boundaries)


def symbol_ranges(symbols: dict[str, int], names: Iterable[str]) -> list[tuple[int, int]]:
    """Coverage ranges for named code symbols (e.g. an ELF image's functions).

    Symbol tables from minivmm's loaders give addresses, not sizes, so each
    range runs from the symbol to the next higher symbol address.
    """
    addresses = sorted(set(symbols.values()))
    ranges = []
    for name in names:
        if name not in symbols:
            raise CoverageError(f"no symbol {name!r} in the loaded images")
        start = symbols[name]
        later = [a for a in addresses if a > start]
        if not later:
            raise CoverageError(f"symbol {name!r} is the last symbol: give its end as a range instead")
        ranges.append((start, later[0]))
    return ranges


def comparison_constants(code: bytes, address: int, bits: int = 64) -> list[bytes]:
    """Immediate operands of `cmp` instructions in `code`, as little-endian byte strings.

    A fuzzer uses them as a dictionary (like AFL++'s auto-dictionary): magic
    values the target compares against are then a single mutation away.
    """
    tokens: list[bytes] = []
    for _, _, text in disassemble(code, address, bits):
        mnemonic, _, operands = text.partition(" ")
        if mnemonic != "cmp":
            continue
        last = operands.rsplit(",", 1)[-1].strip()
        if not _IMMEDIATE.match(last):
            continue
        value = int(last, 0)
        width = 1 if value <= 0xFF else 2 if value <= 0xFFFF else 4 if value <= 0xFFFFFFFF else 8
        token = value.to_bytes(width, "little")
        if token not in tokens:
            tokens.append(token)
    return tokens


@dataclass
class Coverage:
    """One-shot breakpoint coverage over `ranges` ([start, end) guest addresses)."""
    ranges: list[tuple[int, int]]
    blocks: list[int] = field(default_factory=list)
    hits: set[int] = field(default_factory=set)
    new_blocks: list[int] = field(default_factory=list)
    crash_addresses: frozenset[int] = frozenset()
    on_new_block: Callable[[int], None] | None = None
    _table: BreakpointTable | None = field(default=None, repr=False)
    _snapshot: "Snapshot | None" = field(default=None, repr=False)
    _index: dict[int, int] = field(default_factory=dict, repr=False)
    _owned: list[Breakpoint] = field(default_factory=list, repr=False)
    _pending: dict[int, Breakpoint] = field(default_factory=dict, repr=False)
    constants: list[bytes] = field(default_factory=list)

    # -- setup ---------------------------------------------------------------------------
    def install(self, machine: "Machine", snapshot: "Snapshot | None" = None,
                crash_addresses: Iterable[int] = ()) -> None:
        """Find the blocks and plant their breakpoints (also in `snapshot`) in the machine's
        breakpoint table.

        `crash_addresses` get permanent breakpoints that end the run with
        Stop("crash_address").
        """
        table = self._table = machine.breakpoints
        self._snapshot = snapshot
        self.crash_addresses = frozenset(crash_addresses)
        bits = CODE_BITS[machine.mode]
        found: set[int] = set()
        for start, end in self.ranges:
            if end <= start:
                raise CoverageError(f"coverage range [{start:#x}, {end:#x}) is empty")
            try:
                code = table.unpatched(start, machine.memory.read(start, end - start))
            except ValueError as exc:
                raise CoverageError(f"coverage range [{start:#x}, {end:#x}): {exc}") from None
            found.update(basic_blocks(code, start, bits))
            for token in comparison_constants(code, start, bits):
                if token not in self.constants:
                    self.constants.append(token)
        self.blocks = sorted(found)
        self._index = {addr: i for i, addr in enumerate(self.blocks)}
        if snapshot is not None:
            table.add_mirror(snapshot.patch)
        add, owned = table.add, self._owned
        for addr in self.blocks:
            if addr not in self.hits:
                owned.append(add(addr, self._on_block, one_shot=True))
                self._pending[addr] = owned[-1]
        for addr in sorted(self.crash_addresses):
            owned.append(add(addr, self._on_crash_address))

    def guest_takeable(self) -> dict[int, int]:
        """The pending blocks whose int3 only coverage owns, mapped to the byte it replaced:
        the ones a handler inside the guest may take itself (`taken_in_guest`)."""
        table = self._table
        if table is None:
            return {}
        out = {}
        for address, breakpoint in self._pending.items():
            if breakpoint.active and address not in self.hits and table.breakpoints(address) == [breakpoint]:
                original = table.original(address)
                if original is not None:
                    out[address] = original
        return out

    def taken_in_guest(self, address: int) -> bool:
        """A handler in the guest took the breakpoint at `address` and wrote the original byte
        back itself: record the hit as the exit would have (`on_new_block` too) and drop the
        breakpoint (its byte goes back in the snapshot's copy). False when it is not a
        pending block."""
        breakpoint = self._pending.pop(address, None)
        if breakpoint is None or not breakpoint.active or address in self.hits:
            return False
        self._table.remove(breakpoint)
        self.hits.add(address)
        self.new_blocks.append(address)
        if self.on_new_block is not None:
            self.on_new_block(address)
        return True

    # -- the breakpoints' callbacks ------------------------------------------------------------
    def _on_block(self, vcpu: "Vcpu", info: "ExitInfo") -> None:
        address = info.guest_physical_address
        self.hits.add(address)
        self.new_blocks.append(address)
        if self.on_new_block is not None:
            self.on_new_block(address)

    def _on_crash_address(self, vcpu: "Vcpu", info: "ExitInfo") -> Stop:
        return Stop("crash_address", message=f"reached crash address {info.guest_physical_address:#x}")

    # -- results ------------------------------------------------------------------------------
    def start_run(self) -> None:
        """Forget the previous run's new blocks (call before each run)."""
        if self.new_blocks:
            self.new_blocks.clear()

    @property
    def pending(self) -> int:
        """Blocks not reached yet."""
        return len(self.blocks) - len(self.hits)

    def block_id(self, addr: int) -> int:
        """A stable 16-bit-ish id of a block (AFL's random per-block id, derived from the address)."""
        x = (addr ^ (addr >> 15)) * 0x2C1B3C6D & 0xFFFFFFFF
        x = (x ^ (x >> 12)) * 0x297A2D39 & 0xFFFFFFFF
        return x ^ (x >> 15)

    def bitmap(self, size: int = 65536, blocks: Iterable[int] | None = None) -> bytearray:
        """One byte per slot, 1 where a block (default: every block hit so far) lands."""
        out = bytearray(size)
        for addr in self.hits if blocks is None else blocks:
            out[self.block_id(addr) % size] = 1
        return out

    def unpatched(self, address: int, code: bytes) -> bytes:
        """`code` read from guest memory at `address`, with the breakpoint table's int3s
        replaced by the original bytes."""
        return code if self._table is None else self._table.unpatched(address, code)

    def uninstall(self) -> None:
        """Remove every remaining breakpoint (guest memory and snapshot)."""
        table = self._table
        if table is None:
            return
        for breakpoint in self._owned:
            table.remove(breakpoint)
        self._owned.clear()
        self._pending.clear()
        if self._snapshot is not None:
            table.remove_mirror(self._snapshot.patch)
        self._table = None


__all__ = ["Coverage", "CoverageError", "basic_blocks", "comparison_constants", "symbol_ranges", "INT3"]
