"""The host side of the guest-to-host test channel (like the KVM selftests' ucall).

Guests use `guest_include/guest_test.inc` (GNU as, 16/32/64-bit code) or
`guest_include/minivmm_test.h` (freestanding C). Each macro is one hypercall
on the lead's hypercall port (`out %al, $0xf5`, number in RAX, arguments in
RBX/RCX/RDX/RSI, result in RAX), which minivmm reports as a VMCALL exit. The
channel owns the numbers 0x4d560000-0x4d5600ff ("MV"):

| number                   | guest macro                      | host action                         |
|--------------------------|----------------------------------|-------------------------------------|
| 0x4d560000 `MV_HC_DONE`  | GUEST_DONE                       | stop the run, reason "done"         |
| 0x4d560001 `MV_HC_SYNC`  | GUEST_SYNC(stage=RBX, value=RCX) | stop the run, reason "sync"; the next run resumes the guest with RAX = 0 unless the host set it |
| 0x4d560002 `MV_HC_ASSERT`| GUEST_ASSERT, _EQ, _NE           | stop the run, reason "assert_failed"; `channel.failure` says where and why |
| 0x4d560003 `MV_HC_PRINTF`| GUEST_PRINTF(fmt, ...)           | format on the host, print, resume   |

This module also holds what the pytest plugin reports about a guest: register
dumps, a disassembly around RIP, the exit sequence (`ExitRecorder`), and the
source preparation that gives the assembly macros their file and line. The
instruction trace it adds with `--minivmm-trace` is `minivmm.trace.Tracer`.
"""
from __future__ import annotations

import collections
import hashlib
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .actions import RESUME, Action, Stop
from .exits import ExitInfo, ExitReason
from .hooks import HookKind

if TYPE_CHECKING:
    from .machine import Machine
    from .trace import Tracer
    from .vcpu import Vcpu

__all__ = [
    "MV_HC_BASE", "MV_HC_DONE", "MV_HC_SYNC", "MV_HC_ASSERT", "MV_HC_PRINTF", "MV_HC_LAST",
    "SyncPoint", "GuestAssertion", "GuestChannel", "ExitRecorder",
    "format_guest_printf", "register_state", "format_registers", "disassemble_around",
    "prepare_asm_source", "code_bits", "read_linear", "read_cstring", "GUEST_INCLUDE_DIR",
]

MV_HC_BASE = 0x4D56_0000
MV_HC_DONE = MV_HC_BASE + 0
MV_HC_SYNC = MV_HC_BASE + 1
MV_HC_ASSERT = MV_HC_BASE + 2
MV_HC_PRINTF = MV_HC_BASE + 3
MV_HC_LAST = MV_HC_BASE + 0xFF

ASSERT_MAGIC = 0x5241564D                  # "MVAR"
KIND_NAMES = {1: "GUEST_ASSERT", 2: "GUEST_ASSERT_EQ", 3: "GUEST_ASSERT_NE"}
FLAG_VALUES_IN_MEMORY = 0x100
FLAG_SAVED_FRAME = 0x200
PRINTF_MAX_ARGS = 64

GUEST_INCLUDE_DIR = Path(__file__).resolve().parent / "guest_include"

GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_CR0_PE, _CR0_PG, _EFER_LMA = 1, 1 << 31, 1 << 10


# -- guest addresses -----------------------------------------------------------------
def code_bits(vcpu: "Vcpu") -> int:
    """16, 32 or 64: the size of the code the vCPU executes now (from CS and EFER.LMA)."""
    cs = vcpu.segment("cs")
    if vcpu.efer & _EFER_LMA and cs.l:
        return 64
    if vcpu.cr0 & _CR0_PE and cs.db:
        return 32
    return 16


def _walk_long_mode(machine: "Machine", cr3: int, linear: int) -> int:
    """Guest-physical address of `linear` through 4-level paging (raises on a hole)."""
    table = cr3 & 0x000F_FFFF_FFFF_F000
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = struct.unpack("<Q", machine.memory.read(table + ((linear >> shift) & 0x1FF) * 8, 8))[0]
        if not entry & 1:
            raise ValueError(f"linear address {linear:#x} is not mapped (level {4 - level} entry {entry:#x})")
        frame = entry & 0x000F_FFFF_FFFF_F000
        if shift in (30, 21) and entry & 0x80:                   # 1 GiB / 2 MiB page
            return (frame & ~((1 << shift) - 1)) | (linear & ((1 << shift) - 1))
        table = frame
    return table | (linear & 0xFFF)


def read_linear(machine: "Machine", linear: int, size: int) -> bytes:
    """Read guest memory by linear address: 4-level paging is walked in software,
    other paging modes are taken as identity maps."""
    vcpu = machine.vcpu
    if not vcpu.cr0 & _CR0_PG:
        return machine.memory.read(linear, size)
    if hasattr(machine, "read_virtual"):                 # the machine's own page walker
        return machine.read_virtual(linear, size)
    if not vcpu.efer & _EFER_LMA:
        return machine.memory.read(linear, size)
    out = bytearray()
    cr3 = vcpu.cr3
    while size > 0:
        chunk = min(size, 0x1000 - (linear & 0xFFF))
        out += machine.memory.read(_walk_long_mode(machine, cr3, linear), chunk)
        linear += chunk
        size -= chunk
    return bytes(out)


def data_address(vcpu: "Vcpu", pointer: int, segment: str = "ds") -> int:
    """The linear address of a guest data pointer (segment base added outside 64-bit code)."""
    if code_bits(vcpu) == 64:
        return pointer
    mask = 0xFFFF if code_bits(vcpu) == 16 else 0xFFFF_FFFF
    return (vcpu.segment(segment).base + (pointer & mask)) & 0xFFFF_FFFF


def read_cstring(machine: "Machine", linear: int, limit: int = 4096) -> str:
    """A NUL-terminated string at a linear address (read a page at a time)."""
    out = bytearray()
    while len(out) < limit:
        chunk = min(limit - len(out), 0x1000 - (linear & 0xFFF))
        try:
            data = read_linear(machine, linear, chunk)
        except Exception:
            if not out:
                raise
            break
        end = data.find(b"\0")
        if end >= 0:
            out += data[:end]
            break
        out += data
        linear += chunk
    return out.decode("utf-8", "replace")


# -- register state ----------------------------------------------------------------------
def register_state(vcpu: "Vcpu") -> dict[str, int]:
    """A snapshot of the guest registers: GPRs, rip, rflags, control registers, EFER, selectors."""
    state = {name: getattr(vcpu, name) & (1 << 64) - 1 for name in GPR_ORDER}
    state["rip"] = vcpu.rip
    state["rflags"] = vcpu.rflags
    for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
        state[name] = getattr(vcpu, name)
    for name in ("cs", "ss", "ds", "es"):
        state[name] = vcpu.segment(name).selector
    state["cpl"] = vcpu.cpl
    return state


def format_registers(regs: dict[str, int]) -> str:
    """Registers four to a line, like a kernel oops."""
    names = [n for n in GPR_ORDER if n in regs]
    lines = []
    for i in range(0, len(names), 4):
        lines.append("  ".join(f"{n.upper():>3}={regs[n]:016x}" for n in names[i:i + 4]))
    extra = [f"{n.upper()}={regs[n]:#x}" for n in ("rip", "rflags") if n in regs]
    if extra:
        lines.append("  ".join(extra))
    control = [f"{n.upper()}={regs[n]:#x}" for n in ("cr0", "cr2", "cr3", "cr4", "efer") if n in regs]
    if control:
        lines.append("  ".join(control))
    selectors = [f"{n.upper()}={regs[n]:#06x}" for n in ("cs", "ss", "ds", "es") if n in regs]
    if "cpl" in regs:
        selectors.append(f"CPL={regs['cpl']}")
    if selectors:
        lines.append("  ".join(selectors))
    return "\n".join(lines)


def _symbolizer(symbols: dict[str, int]) -> Callable[[int], str]:
    named = sorted((address, name) for name, address in symbols.items()
                   if not name.startswith((".L", "__mv_")) and not name.isupper())   # no .set constants

    def symbolize(address: int) -> str:
        import bisect
        index = bisect.bisect_right(named, (address, "\uffff")) - 1
        if index < 0:
            return ""
        base, name = named[index]
        offset = address - base
        return f"<{name}+{offset:#x}>" if offset < 0x4000 else ""
    return symbolize


def disassemble_around(machine: "Machine", rip: int | None = None, *, before: int = 6,
                       after: int = 6, bits: int | None = None) -> str:
    """Capstone disassembly of the guest code around RIP (`=>` marks RIP); addresses are linear."""
    from .disasm import disassemble
    vcpu = machine.vcpu
    bits = code_bits(vcpu) if bits is None else bits
    rip = vcpu.rip if rip is None else rip
    linear = data_address(vcpu, rip, "cs") if bits != 64 else rip

    def fetch(address: int, size: int) -> bytes:
        data = b""
        while size > 0:                        # shrink until the range is readable
            try:
                return read_linear(machine, address, size)
            except Exception:
                size //= 2
        return data

    window = 48
    start = max(0, linear - window)
    symbol_starts = [a for a in machine.symbols.values() if start <= a <= linear]
    if symbol_starts:                      # decoding from a symbol is decoding from a real instruction
        start = min(symbol_starts)
        window = linear - start
    code = b""
    for offset in range(0, window + 1, 4):
        code = fetch(start + offset, linear - start - offset + 16 * (after + 1))
        if code:
            start += offset
            break
    if not code:
        return f"(no readable code at {linear:#x})"
    prefix: list[tuple[int, bytes, str]] = []
    for skip in range(0, linear - start + 1):          # find a decode that lands on RIP
        insns = disassemble(code[skip:linear - start], start + skip, bits)
        if insns and insns[-1][0] + len(insns[-1][1]) == linear:
            prefix = insns[-before:]
            break
    tail = disassemble(code[linear - start:], linear, bits, after + 1)
    symbolize = _symbolizer(machine.symbols)
    lines = []
    for address, raw, text in prefix + tail:
        mark = "=>" if address == linear else "  "
        lines.append(f"{mark} {address:#010x} {symbolize(address):<22} {raw.hex(' '):<30} {text}")
    if not tail:
        lines.append(f"=> {linear:#010x}  (cannot decode: {code[linear - start:][:16].hex(' ')})")
    return "\n".join(lines)


# -- printf ---------------------------------------------------------------------------------
_SPEC = re.compile(r"%(?P<flags>[-+ #0]*)(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d*))?"
                   r"(?P<length>hh|h|ll|l|z|j|t|L)?(?P<conv>[diouxXcsp%])")


def format_guest_printf(fmt: str, args: list[int], width: int, read_string: Callable[[int], str]) -> str:
    """Format like C printf with `args` (unsigned integers of `width` bytes each).

    Signed conversions interpret an argument as a two's-complement number of its
    width (or of the h/hh length); %s reads the guest string through `read_string`.
    """
    arguments = iter(args)
    bits = width * 8

    def take() -> int:
        try:
            return next(arguments)
        except StopIteration:
            raise ValueError(f"GUEST_PRINTF format {fmt!r} needs more arguments than the {len(args)} given") \
                from None

    def signed(value: int, nbits: int) -> int:
        value &= (1 << nbits) - 1
        return value - (1 << nbits) if value >> (nbits - 1) else value

    def convert(match: re.Match) -> str:
        conv = match["conv"]
        if conv == "%":
            return "%"
        flags = match["flags"]
        width_text = match["width"] or ""
        if width_text == "*":
            value = signed(take(), 32)
            if value < 0:
                flags += "-"
            width_text = str(abs(value))
        precision = match["precision"]
        if precision == "*":
            value = signed(take(), 32)
            precision = str(value) if value >= 0 else None
        spec = "%" + flags + width_text + (f".{precision}" if precision is not None else "")
        value = take()
        nbits = {"hh": 8, "h": 16}.get(match["length"] or "", bits)
        if conv in "di":
            return (spec + "d") % signed(value, nbits)
        if conv in "uxXo":
            value &= (1 << nbits) - 1
            return (spec + ("d" if conv == "u" else conv)) % value
        if conv == "c":
            return (spec + "s") % chr(value & 0xFF)
        if conv == "p":
            return (spec + "s") % (f"{value:#x}" if value else "(nil)")
        if value == 0:
            return (spec + "s") % "(null)"
        try:
            text = read_string(value)
        except Exception:
            text = f"(bad pointer {value:#x})"
        return (spec + "s") % text

    return _SPEC.sub(convert, fmt)


# -- the channel ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyncPoint:
    """A GUEST_SYNC the guest reached: the run returned to the test here."""
    stage: int
    value: int
    rip: int

    def __str__(self) -> str:
        return f"GUEST_SYNC stage {self.stage} value {self.value:#x} at rip={self.rip:#x}"


@dataclass
class GuestAssertion:
    """A failed GUEST_ASSERT*: where it is in the guest source, what it said, the values."""
    macro: str
    file: str
    line: int
    expression: str
    left: int | None
    right: int | None
    width: int                        # bytes per value (for two's-complement display)
    rip: int
    registers: dict[str, int] = field(default_factory=dict)

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"

    def _value(self, value: int) -> str:
        nbits = self.width * 8
        value &= (1 << nbits) - 1
        text = f"{value:#x} ({value})"
        if value >> (nbits - 1):
            text = f"{value:#x} ({value - (1 << nbits)})"
        return text

    def describe(self, registers: bool = True) -> str:
        text = f"{self.macro} failed at {self.location}: {self.expression}"
        if self.left is not None:
            text += f"\n  left:  {self._value(self.left)}\n  right: {self._value(self.right or 0)}"
        if registers and self.registers:
            text += "\nguest registers at the assertion:\n" + format_registers(self.registers)
        return text

    def __str__(self) -> str:
        return self.describe()


class GuestChannel:
    """Serves the test-channel hypercalls of one machine.

    Attach with `GuestChannel(machine)`. A run then ends with reason "sync"
    (`last_sync`), "done" or "assert_failed" (`failure`); GUEST_PRINTF text is
    collected in `output` and passed to `printer` (stdout by default, so pytest
    captures it per test).
    """

    def __init__(self, machine: "Machine", printer: Callable[[str], object] | None = None) -> None:
        self.machine = machine
        self.printer = printer if printer is not None else _print_to_stdout
        self.output: list[str] = []
        self.syncs: list[SyncPoint] = []
        self.last_sync: SyncPoint | None = None
        self.failure: GuestAssertion | None = None
        self.done = False
        self.registration = machine.on(ExitReason.EXECUTE_VMCALL, self._hypercall)

    def detach(self) -> None:
        self.machine.off(self.registration)

    @property
    def text(self) -> str:
        """Everything the guest printed with GUEST_PRINTF."""
        return "".join(self.output)

    def _hypercall(self, vcpu: "Vcpu", info: ExitInfo) -> Action | None:
        bits = code_bits(vcpu)
        mask = (1 << 64) - 1 if bits == 64 else 0xFFFF_FFFF
        number = vcpu.rax & mask
        if not MV_HC_BASE <= number <= MV_HC_LAST:
            return None
        if number == MV_HC_PRINTF:
            text = self._printf(vcpu, bits)
            vcpu.rax = len(text)
            return RESUME
        if number == MV_HC_SYNC:
            point = SyncPoint(vcpu.rbx & mask, vcpu.rcx & mask, vcpu.rip)
            self.syncs.append(point)
            self.last_sync = point
            vcpu.rax = 0
            return Stop("sync", message=str(point))
        if number == MV_HC_DONE:
            self.done = True
            return Stop("done", message="GUEST_DONE")
        if number == MV_HC_ASSERT:
            self.failure = self._assertion(vcpu, bits)
            return Stop("assert_failed", message=self.failure.describe(registers=False))
        return Stop("error", message=f"unknown minivmm test-channel hypercall {number:#x} at rip={vcpu.rip:#x} "
                                     f"(known: {MV_HC_DONE:#x}-{MV_HC_PRINTF:#x})")

    def _printf(self, vcpu: "Vcpu", bits: int) -> str:
        machine = self.machine
        mask = (1 << 64) - 1 if bits == 64 else 0xFFFF_FFFF
        descriptor = vcpu.rdx & mask
        count = min(descriptor & 0xFF, PRINTF_MAX_ARGS)
        width = (descriptor >> 8) & 0xFF or 8
        reversed_order = bool(descriptor >> 16 & 1)
        reader = lambda pointer: read_cstring(machine, data_address(vcpu, pointer))
        try:
            fmt = reader(vcpu.rbx & mask)
            segment = "ss" if reversed_order else "ds"         # asm args live on the stack
            raw = read_linear(machine, data_address(vcpu, vcpu.rcx & mask, segment), count * width) \
                if count else b""
            args = [int.from_bytes(raw[i:i + width], "little") for i in range(0, len(raw), width)]
            if reversed_order:
                args.reverse()
            text = format_guest_printf(fmt, args, width, reader)
        except Exception as exc:      # a bad format must not kill the run: say what happened
            text = f"[GUEST_PRINTF at rip={vcpu.rip:#x} failed: {exc}]\n"
        self.output.append(text)
        self.printer(text)
        return text

    def _assertion(self, vcpu: "Vcpu", bits: int) -> GuestAssertion:
        machine = self.machine
        mask = (1 << 64) - 1 if bits == 64 else 0xFFFF_FFFF
        registers = register_state(vcpu)
        record_address = data_address(vcpu, vcpu.rbx & mask)
        try:
            magic, flags, file_ptr, line, text_ptr, site = struct.unpack(
                "<IIQQQQ", read_linear(machine, record_address, 40))
        except Exception as exc:
            return GuestAssertion("GUEST_ASSERT", "<unreadable record>", 0,
                                  f"record at {record_address:#x}: {exc}", None, None, 8, vcpu.rip, registers)
        if magic != ASSERT_MAGIC:
            return GuestAssertion("GUEST_ASSERT", "<bad record>", 0,
                                  f"no assertion record at {record_address:#x} (magic {magic:#x})",
                                  None, None, 8, vcpu.rip, registers)
        kind = flags & 0xFF
        width = bits // 8 if bits != 16 else 2
        left: int | None = None
        right: int | None = None
        if flags & FLAG_VALUES_IN_MEMORY:
            width = 8
            if kind != 1:
                left, right = struct.unpack("<QQ", read_linear(machine, data_address(vcpu, vcpu.rsi & mask), 16))
        elif kind != 1:
            left, right = vcpu.rcx & mask, vcpu.rdx & mask
        if flags & FLAG_SAVED_FRAME:                     # asm: undo the macro's pushes
            slot = (flags >> 16) & 0xFF or 8
            sp = data_address(vcpu, vcpu.rsp & mask, "ss")
            saved = read_linear(machine, sp, 5 * slot)
            values = [int.from_bytes(saved[i * slot:(i + 1) * slot], "little") for i in range(5)]
            for name, value in zip(("rcx", "rbx", "rdx", "rax", "rflags"), values):
                registers[name] = (registers[name] & ~((1 << (slot * 8)) - 1)) | value \
                    if name != "rflags" else value
            registers["rsp"] = vcpu.rsp + 5 * slot
        rip = site if site else vcpu.rip
        registers["rip"] = rip
        try:
            file = read_cstring(machine, data_address(vcpu, file_ptr))
        except Exception:
            file = f"<file name at {file_ptr:#x} unreadable>"
        try:
            expression = read_cstring(machine, data_address(vcpu, text_ptr))
        except Exception:
            expression = "?"
        return GuestAssertion(KIND_NAMES.get(kind, f"GUEST_ASSERT kind {kind}"), _pretty_path(file), line,
                              expression, left, right, width, rip, registers)


def _print_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _pretty_path(path: str) -> str:
    """A path relative to the working directory when it is below it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return relative if not relative.startswith("..") and os.path.isabs(path) else path


# -- exit sequence --------------------------------------------------------------------------------
class ExitRecorder:
    """Records the VMX exit reasons of a machine's exits in order, without handlers.

    Handlers would change what the machine does (a handler for every port sets
    every I/O-bitmap bit), so the recorder is an OBSERVE hook (`machine.hooks`).
    The last `limit` reasons are kept; the single steps of `tracer` (a
    `minivmm.trace.Tracer`, when one is set) are left out.
    """

    IGNORED = frozenset({ExitReason.EXECUTE_CPUID})      # CPUID is consulted at setup, not an exit here

    def __init__(self, machine: "Machine", limit: int = 100_000) -> None:
        self.machine = machine
        self.reasons: collections.deque[str] = collections.deque(maxlen=limit)
        self.total = 0
        self.tracer: "Tracer | None" = None
        machine.hooks.add(HookKind.OBSERVE, self._note)

    def _note(self, vcpu: "Vcpu", info: ExitInfo) -> None:
        reason = info.reason
        if reason in self.IGNORED:
            return
        if self.tracer is not None and self.tracer.is_step(info):
            return
        self.reasons.append(ExitReason(reason).name)
        self.total += 1

    def since(self, mark: int) -> list[str]:
        """The reasons recorded after `total` was `mark` (as many as are still kept)."""
        count = min(self.total - mark, len(self.reasons))
        return list(self.reasons)[len(self.reasons) - count:] if count > 0 else []


# -- source preparation -------------------------------------------------------------------------
_MACRO_USE = re.compile(r"\bGUEST_(?:SYNC|ASSERT|ASSERT_EQ|ASSERT_NE|PRINTF|DONE)\b")


def _asm_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def prepare_asm_source(text: str, file_label: str, first_line: int = 1) -> str:
    """Give the guest_test.inc macros their file and line.

    Prefixes every line that uses a GUEST_ macro with `.set __mv_line, N ;`;
    two lines ahead of the source define `__mv_file` and include
    guest_test.inc, then a `# N "file"` line marker makes assembler messages
    name the original file and lines.
    """
    lines = text.split("\n")
    label = _asm_string(file_label)
    out = [f'.pushsection .text, 1 ; __mv_file: .asciz "{label}" ; .popsection ; .set __mv_line, 0',
           '.include "guest_test.inc"',           # alone on its line: as drops what follows it
           f'# {first_line} "{label}"']
    for index, line in enumerate(lines):
        if _MACRO_USE.search(line):
            line = f".set __mv_line, {first_line + index} ; {line}"
        out.append(line)
    return "\n".join(out)


def locate_inline_source(text: str, python_file: str, near_line: int) -> int | None:
    """The line in `python_file` where the inline guest `text` starts (nearest to `near_line`)."""
    try:
        source_lines = Path(python_file).read_text().split("\n")
    except OSError:
        return None
    wanted = [line.strip() for line in text.split("\n")]
    first = next((i for i, line in enumerate(wanted) if line), None)
    if first is None:
        return None
    body = [w for w in wanted[first:]]
    while body and not body[-1]:
        body.pop()
    best: int | None = None
    for start in range(len(source_lines)):
        if source_lines[start].strip() != body[0] and not source_lines[start].rstrip().endswith(body[0]):
            continue
        if all(start + k < len(source_lines) and
               (source_lines[start + k].strip() == body[k] or (k == 0 and source_lines[start].rstrip().endswith(body[0])))
               for k in range(len(body))):
            candidate = start + 1 - first          # 1-based line of text's first line
            if best is None or abs(candidate - near_line) < abs(best - near_line):
                best = candidate
    return best


def header_digest() -> str:
    """A short hash of the guest include files (so cached C builds notice header edits)."""
    digest = hashlib.sha256()
    for path in sorted(GUEST_INCLUDE_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def iter_tail(text: str, lines: int) -> Iterable[str]:
    return text.rstrip("\n").split("\n")[-lines:] if text else []
