"""YAML-described guests: the schema, validation with `file:line: key:` errors, and `build_machine`.

    from minivmm.config import load_config, build_machine
    config = load_config("configs/hello_long.yaml", overrides=["machine.memory=4M"])
    with build_machine(config, capture_console=True) as machine:
        result = machine.run_config()

A config is read with yaml's node API (`yaml.compose`), so every value keeps
the line it came from; every error names the file, the line and the dotted
key (`images[0].source`) and says what was expected. Unknown keys are errors
(with a "did you mean" for near misses). Integers accept decimal, `0x` hex and
K/M/G size suffixes; addresses also accept symbol names defined by the loaded
images (assembly or ELF symbols), resolved after loading. `SCHEMA` below sums
up the keys; the meaning of the less obvious ones:

- `machine.entry` defaults to the first image's entry (asm: `_start` or the load
  address; ELF/multiboot: the header's); `machine.registers` are set after the
  mode setup (RAX..R15, RIP, RFLAGS); `timeout` (seconds, default 10) is the
  run deadline and `max_exits` the exit limit.
- images: `asm` sources are assembled with binutils (minivmm.inc on the include
  path) at `address` (default: the mode's load address); `binary` is copied to
  `address`; `elf` loads the PT_LOAD segments at their physical addresses, or
  `build: {c: [...], cflags, link_address}` first compiles the C sources with
  gcc -ffreestanding -nostdlib -static (cached beside the assembler cache);
  `multiboot` checks the v1 header (magic, checksum, flags), loads the kernel
  (header address fields, else ELF), writes the multiboot_info at 0x20000
  (mem_lower/upper, memory map, command line, loader name) and starts it in
  32-bit protected mode with EAX=0x2BADB002, EBX=0x20000 (mode defaults to
  protected).
  A multiboot kernel may also be `build: {c: [entry.S, kernel.c], cflags}`: a 32-bit
  ELF built with gcc -m32 -ffreestanding -nostdlib. Its command line is the kernel's
  file name then `cmdline` (argv0 first, as QEMU's -kernel does). `modules` are
  loaded page-aligned after the kernel and listed in the info structure; a module's
  string is its file name then its `cmdline`, as QEMU's `-initrd "file args"` gives.
  The info structure goes at 0x20000, or after the modules when something lands there.
- `machine.vcpus: N` (default 1): one host thread per vCPU; N > 1 needs (and turns on)
  the in-kernel irqchip; vCPU 0 starts at the entry, the others wait for INIT/SIPI
  from the guest's LAPIC (see `minivmm.smp`).
- `platform` (all off by default; `minivmm.platform`): `irqchip` KVM's in-kernel
  LAPIC/IOAPIC/PIC (HLT then no longer exits: it waits in the kernel for an
  interrupt), `pit` the in-kernel 8254, `fw_cfg` QEMU's fw_cfg at 0x510/0x511,
  `acpi` RSDP/RSDT/FADT/MADT in 0xE0000-0xFFFFF plus the PM block at 0x600 (PM timer
  at 0x608), `pci` ports 0xCF8-0xCFF with no device, `scratch` read-back registers,
  `ram_windows` extra RAM regions, `strict_ports` stops the run (reason "error") on
  an access to a port no device claims instead of reading all ones.
- Paths are relative to the YAML file; so is a handler module.
- Every rule has an optional `name` (its counter, `machine.counters[name]`,
  also printed by `run --json`) and `log: true` (an event line, printed on
  stderr by `minivmm run`). Actions: `count`/`log` observe and pass the exit
  on (to the device, the real MSR, or minivmm's default); `stop` ends the run
  with result "stopped"; `skip` moves RIP past the instruction; `ignore` drops
  an OUT/MMIO write and reads all-ones (or `value`); `fixed` answers reads with
  `value`; `deny` injects #GP; `allow` leaves an MSR unintercepted; `inject`
  re-delivers an exception to the guest; `return` answers a hypercall with
  RAX=`value`.
- `expect` is what the test suite checks a run against: `result` is the
  RunResult reason (exit, hlt, timeout, triple_fault, exception, error,
  exit_limit, stopped), `console`/`message` are substrings, `counters` exact.
- `fuzz` is validated here and handed to minivmm's fuzzer as `FuzzConfig`.
"""
from __future__ import annotations

import difflib
import importlib
import io
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml

from .exits import Vector
from .memory import parse_size

if TYPE_CHECKING:
    from .platform import PlatformConfig

SCHEMA_VERSION = 1
DEFAULT_TIMEOUT = 10.0
DEFAULT_MEMORY = 2 << 20

SCHEMA = """\
version: 1                        # required
description: text
machine:   {name, memory: 2M, mode: real|protected|long|user, entry: addr|symbol,
            stack: addr|symbol, registers: {rax: ..}, timeout: seconds, max_exits: N, vcpus: 1}
images:    - {type: asm, source: file.S, address, entry, defines: {NAME: int}}
           - {type: binary, path: file.bin, address, entry}
           - {type: elf, path: file.elf | build: {c: [file.c], cflags: [..], link_address}, entry}
           - {type: multiboot, path: kernel | source: kernel.S | build: {c: [..], cflags},
              cmdline: text, defines, modules: [{path: file, cmdline: text}]}
devices:   {serial: {port, output: stdout|stderr|capture|file|none, path},
            debug_exit: {port, width}, hypercall: {port, calls: [{number, action, value}]},
            mmio: [{start, end|size, action: ignore|count|log|stop, value}]}
vmcs:      {controls: [CPU_BASED_HLT_EXITING, ..] | {NAME: bool},
            exception_bitmap: ["#UD", GP, 14],
            exceptions: [{vector, action: count|log|skip|stop|inject|pass}],
            msrs: [{msr, action: allow|deny|fixed|log|count, value, read, write}],
            io: [{port: N | [start, end), action: ignore|fixed|log|count|stop, value}],
            cpuid: [{leaf, subleaf, eax, ebx, ecx, edx}]}
ept:       {protect: [{start, end|size, perms: r-x}],
            monitors: [{start, end|size, access: rw, action: log|count|stop}],
            hooks: [{address, action: log|count|stop|skip, hidden: true}]}
platform:  {irqchip: bool, pit: bool, fw_cfg: bool, acpi: bool | {pm_timer_32bit: bool},
            pci: bool, scratch: port | {port, width} | [..], strict_ports: bool,
            ram_windows: [{start, size, name}]}
handlers:  ["module:function", "file.py:function"]
expect:    {result, exit_code, console, message, counters: {name: N}}
fuzz:      {input_symbol | input_address, max_input_size, length_register | length_address,
            crash_vectors, crash_addresses, coverage_ranges: [[start, end]], timeout}
"""

REGISTER_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                  "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
MODES = ("real", "protected", "long", "user")
_SYMBOL_RE = re.compile(r"^[A-Za-z_.$][A-Za-z0-9_.$]*$")


# ---------------------------------------------------------------------------
# Errors and located YAML nodes


class ConfigError(ValueError):
    """An invalid config: `str()` is `file:line: key: what was expected, got what`."""

    def __init__(self, message: str, where: str = "", key: str = "") -> None:
        self.where = where
        self.key = key
        self.detail = message
        super().__init__(": ".join([part for part in (where, key) if part] + [message]))


@dataclass(eq=False)
class Node:
    """A YAML value with its origin: `value` is a scalar, `dict[str, Node]` or `list[Node]`."""

    value: Any
    file: str
    line: int
    key: str
    origin: str | None = None

    @property
    def where(self) -> str:
        return self.origin or f"{self.file}:{self.line}"

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.where, self.key)

    def expected(self, what: str) -> ConfigError:
        return self.error(f"expected {what}, got {self.shown()}")

    def shown(self) -> str:
        if isinstance(self.value, dict):
            return "a mapping"
        if isinstance(self.value, list):
            return "a list"
        if self.value is None:
            return "nothing (null)"
        return repr(self.value)


@dataclass(frozen=True)
class Loc:
    """Where a value came from, for errors raised after validation (e.g. an unknown symbol)."""
    where: str = ""
    key: str = ""

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.where, self.key)


def _loc(node: Node | None) -> Loc:
    return Loc(node.where, node.key) if node is not None else Loc()


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _from_yaml(ynode: yaml.Node, file: str, key: str, constructor: yaml.constructor.SafeConstructor,
               line: int | None = None, origin: str | None = None) -> Node:
    line = ynode.start_mark.line + 1 if line is None else line
    if isinstance(ynode, yaml.MappingNode):
        out: dict[str, Node] = {}
        for knode, vnode in ynode.value:
            kline = knode.start_mark.line + 1
            if not isinstance(knode, yaml.ScalarNode):
                raise ConfigError("mapping keys must be plain names or numbers", origin or f"{file}:{kline}", key)
            name = str(constructor.construct_object(knode))
            if name in out:
                raise ConfigError(f"duplicate key {name!r}", origin or f"{file}:{kline}", _join(key, name))
            out[name] = _from_yaml(vnode, file, _join(key, name), constructor, kline, origin)
        return Node(out, file, line, key, origin)
    if isinstance(ynode, yaml.SequenceNode):
        return Node([_from_yaml(item, file, f"{key}[{i}]", constructor, None, origin)
                     for i, item in enumerate(ynode.value)], file, line, key, origin)
    try:
        value = constructor.construct_object(ynode)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid value: {exc}", origin or f"{file}:{line}", key) from None
    return Node(value, file, line, key, origin)


def parse_yaml(text: str, file: str) -> Node:
    """Compose `text` into a located `Node` tree (an empty document is an empty mapping)."""
    try:
        ynode = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError(f"invalid YAML: {exc.problem or exc.context}", f"{file}:{line}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file) from None
    if ynode is None:
        return Node({}, file, 1, "")
    return _from_yaml(ynode, file, "", yaml.SafeLoader(""))


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_override(root: Node, assignment: str) -> None:
    """Apply `--set dotted.key=value` (`images[0].address=0x200000` for lists); value is YAML."""
    origin = f"--set {assignment}"
    if "=" not in assignment:
        raise ConfigError("expected key=value (e.g. machine.memory=4M)", origin)
    path, _, text = assignment.partition("=")
    parts: list[str | int] = []
    for name, index in _PATH_PART.findall(path.strip()):
        parts.append(int(index) if index else name)
    if not parts:
        raise ConfigError("expected a dotted key before '='", origin)
    try:
        ynode = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the value is not valid YAML: {exc}", origin) from None
    node, key = root, ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, int):
            if not isinstance(node.value, list) or part >= len(node.value):
                raise ConfigError(f"no list item [{part}] at {key or 'the top level'}", origin)
            key = f"{key}[{part}]"
        else:
            if node.value is None:
                node.value = {}
            if not isinstance(node.value, dict):
                raise ConfigError(f"{key} is not a mapping", origin)
            key = _join(key, part)
        if last:
            new = (_from_yaml(ynode, "--set", key, yaml.SafeLoader(""), 0, origin) if ynode is not None
                   else Node(None, "--set", 0, key, origin))
            if isinstance(part, int):
                node.value[part] = new
            else:
                node.value[part] = new
            return
        child = node.value[part] if isinstance(part, int) else node.value.get(part)
        if child is None:
            child = node.value[part] = Node({}, "--set", 0, key, origin)
        node = child


# ---------------------------------------------------------------------------
# Scalar converters: Node -> value, raising ConfigError with the node's location


def _int(node: Node) -> int:
    value = node.value
    if isinstance(value, bool):
        raise node.expected("an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return _parse_number(value)
        except ValueError:
            pass
    raise node.expected("an integer (decimal, 0x hex, or with a K/M/G suffix)")


def _parse_number(text: str) -> int:
    text = text.strip()
    if text.startswith("-"):
        return -parse_size(text[1:])
    return parse_size(text)


def _uint(node: Node) -> int:
    value = _int(node)
    if value < 0:
        raise node.expected("a non-negative integer")
    return value


def _size(node: Node) -> int:
    try:
        value = _int(node)
    except ConfigError:
        raise node.expected("a size like 2M or 0x200000") from None
    if value <= 0:
        raise node.expected("a size like 2M or 0x200000")
    return value


def _port(node: Node) -> int:
    value = _int(node)
    if not 0 <= value <= 0xFFFF:
        raise node.expected("an I/O port number 0-0xffff")
    return value


def _seconds(node: Node) -> float:
    value = node.value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise node.expected("a positive number of seconds")


def _str(node: Node) -> str:
    if isinstance(node.value, str):
        return node.value
    raise node.expected("a string")


def _bool(node: Node) -> bool:
    if isinstance(node.value, bool):
        return node.value
    raise node.expected("true or false")


def _symbol_name(node: Node) -> str:
    if isinstance(node.value, str) and _SYMBOL_RE.match(node.value):
        return node.value
    raise node.expected("a symbol name")


@dataclass(frozen=True)
class SymbolRef:
    """An address given as a symbol name, resolved once the images are loaded."""
    name: str
    loc: Loc = Loc()

    def __str__(self) -> str:
        return self.name


Address = int | SymbolRef


def _address(node: Node) -> Address:
    value = node.value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise node.expected("a non-negative address or a symbol name")
        return value
    if isinstance(value, str):
        try:
            return _uint(node)
        except ConfigError:
            pass
        if _SYMBOL_RE.match(value):
            return SymbolRef(value, _loc(node))
    raise node.expected("an address (integer) or a symbol name")


def _choice(*choices: str) -> Callable[[Node], str]:
    def convert(node: Node) -> str:
        if isinstance(node.value, str) and node.value in choices:
            return node.value
        hint = ""
        if isinstance(node.value, str):
            close = difflib.get_close_matches(node.value, choices, 1, 0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise node.expected(f"one of {', '.join(choices)}") if not hint else \
            node.error(f"expected one of {', '.join(choices)}, got {node.value!r}{hint}")
    return convert


def _list(convert: Callable[[Node], Any], what: str = "a list") -> Callable[[Node], list]:
    def convert_list(node: Node) -> list:
        if not isinstance(node.value, list):
            raise node.expected(what)
        return [convert(item) for item in node.value]
    return convert_list


def _str_list(node: Node) -> list[str]:
    if isinstance(node.value, str):
        return [node.value]
    return _list(_str, "a string or a list of strings")(node)


_VECTOR_NAMES = {v.name: int(v) for v in Vector}


def _vector(node: Node) -> int:
    value = node.value
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 255:
            return value
    elif isinstance(value, str):
        name = value.strip().lstrip("#").upper()
        if name in _VECTOR_NAMES:
            return _VECTOR_NAMES[name]
        try:
            number = _parse_number(value)
            if 0 <= number <= 255:
                return number
        except ValueError:
            pass
    raise node.expected(f"an exception vector: a name like \"#UD\" or UD ({', '.join(_VECTOR_NAMES)}) "
                        "or a number 0-255")


def _perms(node: Node) -> str:
    value = node.value
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"[r-][w-][x-]", text):
            return text
        if re.fullmatch(r"r?w?x?", text) and text:
            return "".join(c if c in text else "-" for c in "rwx")
    raise node.expected("page permissions like rwx, r-x, r-- or ---")


def _access(node: Node) -> str:
    value = node.value
    if isinstance(value, str) and value and re.fullmatch(r"[rwx-]+", value.lower()):
        text = value.lower()
        if len(set(text.replace("-", ""))) == len(text.replace("-", "")):
            return "".join(c for c in "rwx" if c in text)
    raise node.expected("an access kind made of r, w, x (e.g. w, rw, rwx)")


def _monitor_access(node: Node) -> str:
    value = _access(node)
    if value not in ("r", "w", "rw"):
        raise node.expected("r, w or rw (execution is watched with ept.hooks)")
    return value


def _register(node: Node) -> str:
    if isinstance(node.value, str) and node.value.lower() in REGISTER_NAMES:
        return node.value.lower()
    raise node.expected(f"a register name ({', '.join(REGISTER_NAMES)})")


def _reg32_value(node: Node) -> int:
    """A CPUID output register: an integer or a 4-character string (little endian, like vendor ids)."""
    value = node.value
    if isinstance(value, str) and len(value.encode()) == 4 and not value.strip().lower().startswith("0x"):
        try:
            _parse_number(value)
        except ValueError:
            return int.from_bytes(value.encode(), "little")
    result = _int(node)
    if not 0 <= result <= 0xFFFFFFFF:
        raise node.expected("a 32-bit value or a 4-character string")
    return result


class _Map:
    """Reads a mapping node: unknown keys are errors, with a "did you mean"."""

    def __init__(self, node: Node, allowed: Sequence[str], what: str | None = None) -> None:
        if not isinstance(node.value, dict):
            raise node.expected(what or f"a mapping with keys {', '.join(allowed)}")
        self.node = node
        self.items: dict[str, Node] = node.value
        for name, child in self.items.items():
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, 1, 0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(allowed)}"
                raise child.error(f"unknown key{hint}")

    def has(self, name: str) -> bool:
        child = self.items.get(name)
        return child is not None and child.value is not None

    def child(self, name: str) -> Node | None:
        child = self.items.get(name)
        return child if child is not None and child.value is not None else None

    def get(self, name: str, convert: Callable[[Node], Any], default: Any = None) -> Any:
        child = self.child(name)
        return default if child is None else convert(child)

    def need(self, name: str, convert: Callable[[Node], Any], what: str = "") -> Any:
        child = self.child(name)
        if child is None:
            detail = f" ({what})" if what else ""
            raise ConfigError(f"required key {name!r} is missing{detail}", self.node.where,
                              _join(self.node.key, name))
        return convert(child)

    def exclusive(self, *names: str) -> None:
        given = [n for n in names if self.has(n)]
        if len(given) > 1:
            raise self.items[given[1]].error(f"give only one of {', '.join(repr(n) for n in names)}")


def _range(m: _Map, start_key: str = "start") -> tuple[Address, Address | None, int | None]:
    """`start` with `end` (exclusive) or `size`; returns (start, end, size)."""
    m.exclusive("end", "size")
    start = m.need(start_key, _address)
    end = m.get("end", _address)
    size = m.get("size", _size)
    if end is None and size is None:
        raise ConfigError("give 'end' (exclusive) or 'size'", m.node.where, m.node.key)
    if isinstance(start, int) and isinstance(end, int) and end <= start:
        raise m.items["end"].expected(f"an end above start {start:#x}")
    return start, end, size


# ---------------------------------------------------------------------------
# The typed result


@dataclass
class MachineConfig:
    name: str = ""
    memory: int = DEFAULT_MEMORY
    mode: str = "long"
    mode_given: bool = False
    entry: Address | None = None
    stack: Address | None = None
    registers: dict[str, Address] = field(default_factory=dict)
    timeout: float | None = DEFAULT_TIMEOUT
    max_exits: int | None = None
    vcpus: int = 1


@dataclass
class BuildConfig:
    """Compile C sources with gcc (-ffreestanding -nostdlib -static) into an ELF."""
    c: list[Path]
    cflags: list[str] = field(default_factory=list)
    link_address: int = 0x100000
    loc: Loc = Loc()


@dataclass
class ImageConfig:
    type: str                                  # asm | binary | elf | multiboot
    path: Path | None = None                   # source (asm), file (binary/elf/multiboot)
    assemble: bool = False                     # multiboot kernel given as assembly source
    build: BuildConfig | None = None
    address: Address | None = None
    entry: Address | None = None
    defines: dict[str, int] = field(default_factory=dict)
    cmdline: str = ""
    modules: list["ModuleConfig"] = field(default_factory=list)
    loc: Loc = Loc()


@dataclass
class ModuleConfig:
    """A multiboot module: a file and the text after its name in the module's string."""
    path: Path
    cmdline: str = ""
    loc: Loc = Loc()


@dataclass
class SerialConfig:
    enabled: bool = True
    port: int = 0x3F8
    output: str = "stdout"                     # stdout | stderr | capture | file | none
    path: Path | None = None


@dataclass
class DebugExitConfig:
    enabled: bool = True
    port: int = 0xF4
    width: int = 1


@dataclass
class HypercallRule:
    number: int
    action: str = "return"                     # return | log | count | stop
    value: int = 0
    name: str = ""
    log: bool = False


@dataclass
class HypercallConfig:
    port: int = 0xF5
    calls: list[HypercallRule] = field(default_factory=list)


@dataclass
class MmioRule:
    start: Address
    end: Address | None
    size: int | None
    action: str = "ignore"                     # ignore | count | log | stop
    value: int = 0
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class DevicesConfig:
    serial: SerialConfig = field(default_factory=SerialConfig)
    debug_exit: DebugExitConfig = field(default_factory=DebugExitConfig)
    hypercall: HypercallConfig = field(default_factory=HypercallConfig)
    mmio: list[MmioRule] = field(default_factory=list)


@dataclass
class ControlSetting:
    name: str
    flag: Any                                  # a member of one of minivmm.controls' IntFlags
    enabled: bool = True
    loc: Loc = Loc()


@dataclass
class ExceptionRule:
    vector: int
    action: str = "count"                      # count | log | skip | stop | inject | pass
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class MsrRule:
    msr: int
    action: str = "log"                        # allow | deny | fixed | log | count
    value: int = 0
    read: bool = True
    write: bool = True
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class IoRule:
    start: int
    end: int                                   # exclusive
    action: str = "log"                        # ignore | fixed | log | count | stop
    value: int | None = None
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class CpuidRule:
    leaf: int
    subleaf: int | None = None
    eax: int | None = None
    ebx: int | None = None
    ecx: int | None = None
    edx: int | None = None
    loc: Loc = Loc()


@dataclass
class VmcsConfig:
    controls: list[ControlSetting] = field(default_factory=list)
    exception_bitmap: list[int] = field(default_factory=list)
    exceptions: list[ExceptionRule] = field(default_factory=list)
    msrs: list[MsrRule] = field(default_factory=list)
    io: list[IoRule] = field(default_factory=list)
    cpuid: list[CpuidRule] = field(default_factory=list)
    loc: Loc = Loc()

    @property
    def empty(self) -> bool:
        return not (self.controls or self.exception_bitmap or self.exceptions or self.msrs or self.io
                    or self.cpuid)


@dataclass
class ProtectRule:
    start: Address
    end: Address | None
    size: int | None
    perms: str
    loc: Loc = Loc()


@dataclass
class MonitorRule:
    start: Address
    end: Address | None
    size: int | None
    access: str = "rw"
    action: str = "log"                        # log | count | stop | skip
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class HookRule:
    address: Address
    action: str = "log"                        # log | count | stop | skip
    hidden: bool = True
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class EptConfig:
    protect: list[ProtectRule] = field(default_factory=list)
    monitors: list[MonitorRule] = field(default_factory=list)
    hooks: list[HookRule] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.protect or self.monitors or self.hooks)


@dataclass
class ExpectConfig:
    """What a run of this config should produce (used by the test suite)."""
    result: str | None = None
    exit_code: int | None = None
    console: str | None = None
    message: str | None = None
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class FuzzConfig:
    """The `fuzz:` section, validated here and consumed by minivmm's fuzzer."""
    input_symbol: str | None = None
    input_address: int | None = None
    max_input_size: int = 4096
    length_register: str | None = None
    length_address: int | None = None
    crash_vectors: list[int] = field(default_factory=list)
    crash_addresses: list[int] = field(default_factory=list)
    coverage_ranges: list[tuple[int, int]] = field(default_factory=list)
    timeout: float = 1.0


@dataclass
class Config:
    """A validated config file."""
    path: Path
    version: int = SCHEMA_VERSION
    description: str = ""
    machine: MachineConfig = field(default_factory=MachineConfig)
    images: list[ImageConfig] = field(default_factory=list)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    vmcs: VmcsConfig = field(default_factory=VmcsConfig)
    ept: EptConfig = field(default_factory=EptConfig)
    handlers: list[tuple[str, Loc]] = field(default_factory=list)
    expect: ExpectConfig | None = None
    fuzz: FuzzConfig | None = None
    platform: "PlatformConfig" = field(default_factory=lambda: _platform_config())

    @property
    def name(self) -> str:
        return self.machine.name or self.path.stem

    @property
    def base_dir(self) -> Path:
        return self.path.parent


# ---------------------------------------------------------------------------
# Validation


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override (`--set` assignments) and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("no such config file", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config: {exc}", str(path)) from None
    return parse_config(text, path=path, overrides=overrides)


def parse_config(text: str, *, path: str | Path = "<config>", overrides: Sequence[str] = ()) -> Config:
    """Validate config text; relative paths in it resolve against `path`'s directory."""
    path = Path(path)
    root = parse_yaml(text, str(path))
    for assignment in overrides:
        apply_override(root, assignment)
    return _Validator(path).config(root)


TOP_KEYS = ("version", "description", "machine", "image", "images", "devices", "vmcs", "ept",
            "handlers", "expect", "fuzz", "platform")


def _platform_config(**kwargs: Any) -> "PlatformConfig":
    from .platform import PlatformConfig
    return PlatformConfig(**kwargs)


class _Validator:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def file(self, node: Node, *, must_exist: bool = True) -> Path:
        text = _str(node)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.base / path
        if must_exist and not path.is_file():
            raise node.error(f"expected an existing file (relative to {self.base or '.'}), "
                             f"got {text!r}: {path} does not exist")
        return path

    def config(self, root: Node) -> Config:
        m = _Map(root, TOP_KEYS, "a mapping (the config file's top level)")
        version = m.need("version", _int, f"this is schema version {SCHEMA_VERSION}: add 'version: 1'")
        if version != SCHEMA_VERSION:
            raise m.items["version"].expected(f"version {SCHEMA_VERSION}")
        config = Config(path=self.path, version=version)
        config.description = m.get("description", _str, "")
        machine_node = m.child("machine")
        config.machine = self.machine(machine_node) if machine_node else MachineConfig()
        m.exclusive("image", "images")
        if m.has("image"):
            config.images = [self.image(m.items["image"])]
        else:
            config.images = m.get("images", _list(self.image, "a list of images"), [])
        if not config.images:
            raise ConfigError("required key 'images' is missing (a config needs at least one image)",
                              root.where, "images")
        self.check_multiboot(config, m)
        config.devices = m.get("devices", self.devices, DevicesConfig())
        config.vmcs = m.get("vmcs", self.vmcs, VmcsConfig())
        config.ept = m.get("ept", self.ept, EptConfig())
        config.handlers = m.get("handlers", _list(lambda n: (_handler_spec(n), _loc(n)),
                                                  "a list of \"module:function\" strings"), [])
        config.expect = m.get("expect", self.expect)
        config.fuzz = m.get("fuzz", self.fuzz)
        config.platform = m.get("platform", self.platform, _platform_config())
        if config.machine.vcpus > 1:
            platform_node = m.child("platform")
            if platform_node is not None and isinstance(platform_node.value, dict) and \
                    "irqchip" in platform_node.value and not config.platform.irqchip:
                raise platform_node.value["irqchip"].error(
                    f"machine.vcpus is {config.machine.vcpus}: more than one vCPU needs the in-kernel "
                    "irqchip (the APs start on the LAPIC's INIT/SIPI); remove 'irqchip: false'")
            config.platform.irqchip = True
        return config

    def platform(self, node: Node) -> "PlatformConfig":
        from .platform import RamWindow, ScratchConfig
        m = _Map(node, ("irqchip", "pit", "fw_cfg", "acpi", "pci", "scratch", "ram_windows",
                        "strict_ports"))
        platform = _platform_config(irqchip=m.get("irqchip", _bool, False), pit=m.get("pit", _bool, False),
                                    fw_cfg=m.get("fw_cfg", _bool, False), pci=m.get("pci", _bool, False),
                                    strict_ports=m.get("strict_ports", _bool, False))
        if platform.pit and not platform.irqchip:
            raise m.items["pit"].error("the in-kernel PIT needs the in-kernel irqchip: add 'irqchip: true'")
        acpi = m.child("acpi")
        if acpi is not None:
            if isinstance(acpi.value, dict):
                a = _Map(acpi, ("pm_timer_32bit",))
                platform.acpi = True
                platform.pm_timer_32bit = a.get("pm_timer_32bit", _bool, True)
            else:
                platform.acpi = _bool(acpi)

        def scratch(n: Node) -> ScratchConfig:
            if isinstance(n.value, dict):
                s = _Map(n, ("port", "width"))
                width = s.get("width", _int, 4)
                if width not in (1, 2, 4):
                    raise s.items["width"].expected("1, 2 or 4")
                return ScratchConfig(port=s.need("port", _port, "the register's I/O port"), width=width)
            return ScratchConfig(port=_port(n))

        node_scratch = m.child("scratch")
        if node_scratch is not None:
            platform.scratch = _list(scratch, "a list of scratch registers")(node_scratch) \
                if isinstance(node_scratch.value, list) else [scratch(node_scratch)]

        def window(n: Node) -> RamWindow:
            w = _Map(n, ("start", "size", "name"))
            start = w.need("start", _uint, "the window's guest-physical address")
            size = w.need("size", _size, "the window's size")
            if start % 4096 or size % 4096 or size == 0:
                raise n.error(f"a RAM window needs a page-aligned start and a non-zero page-multiple size; "
                              f"got start {start:#x} size {size:#x}")
            return RamWindow(start, size, w.get("name", _str, f"window@{start:#x}"))

        platform.ram_windows = m.get("ram_windows", _list(window, "a list of {start, size} RAM windows"), [])
        return platform

    def machine(self, node: Node) -> MachineConfig:
        m = _Map(node, ("name", "memory", "mode", "entry", "stack", "registers", "timeout", "max_exits",
                        "vcpus"))
        mc = MachineConfig()
        mc.name = m.get("name", _str, "")
        mc.memory = m.get("memory", _size, DEFAULT_MEMORY)
        if mc.memory % 4096:
            raise m.items["memory"].expected("a size that is a multiple of 4K")
        if m.has("mode"):
            mc.mode = _choice(*MODES)(m.items["mode"])
            mc.mode_given = True
        mc.entry = m.get("entry", _address)
        mc.stack = m.get("stack", _address)
        registers = m.child("registers")
        if registers is not None:
            regs = _Map(registers, REGISTER_NAMES + tuple(r.upper() for r in REGISTER_NAMES))
            mc.registers = {name.lower(): _address(child) for name, child in regs.items.items()
                            if child.value is not None}
        if m.has("timeout"):
            mc.timeout = _seconds(m.items["timeout"])
        mc.max_exits = m.get("max_exits", _size)
        mc.vcpus = m.get("vcpus", _int, 1)
        if not 1 <= mc.vcpus <= 64:
            raise m.items["vcpus"].expected("a vCPU count from 1 to 64")
        return mc

    def image(self, node: Node) -> ImageConfig:
        if not isinstance(node.value, dict):
            raise node.expected("an image mapping with a 'type' (asm, binary, elf, multiboot)")
        type_node = node.value.get("type")
        if type_node is None:
            raise ConfigError("required key 'type' is missing (asm, binary, elf or multiboot)",
                              node.where, _join(node.key, "type"))
        kind = _choice("asm", "binary", "elf", "multiboot")(type_node)
        allowed = {"asm": ("type", "source", "address", "entry", "defines"),
                   "binary": ("type", "path", "address", "entry"),
                   "elf": ("type", "path", "build", "entry"),
                   "multiboot": ("type", "path", "source", "build", "cmdline", "defines", "modules")}[kind]
        m = _Map(node, allowed)
        image = ImageConfig(type=kind, loc=_loc(node))
        if kind == "asm":
            image.path = m.need("source", self.file, "the assembly source file")
        elif kind == "binary":
            image.path = m.need("path", self.file, "the flat binary file")
            image.address = m.need("address", _address, "where the binary is loaded")
        elif kind == "elf":
            m.exclusive("path", "build")
            if m.has("build"):
                image.build = self.build(m.items["build"])
            else:
                image.path = m.need("path", self.file, "the ELF file, or 'build' to compile C sources")
        else:
            m.exclusive("path", "source", "build")
            if m.has("source"):
                image.path = self.file(m.items["source"])
                image.assemble = True
            elif m.has("build"):
                image.build = self.build(m.items["build"])
                image.path = image.build.c[0]
            else:
                image.path = m.need("path", self.file, "the kernel file, 'source' for an assembly kernel "
                                    "or 'build' to compile one")
            image.cmdline = m.get("cmdline", _str, "")
            image.modules = m.get("modules", _list(self.module, "a list of modules {path, cmdline}"), [])
        if kind == "asm":
            image.address = m.get("address", _address)
        if kind in ("asm", "multiboot") and m.has("defines"):
            defines = _Map(m.items["defines"], tuple(m.items["defines"].value or ()) if isinstance(
                m.items["defines"].value, dict) else (), "a mapping of NAME: integer")
            image.defines = {name: _int(child) for name, child in defines.items.items()}
        image.entry = m.get("entry", _address)
        return image

    def module(self, node: Node) -> ModuleConfig:
        if isinstance(node.value, str):
            return ModuleConfig(path=self.file(node), loc=_loc(node))
        m = _Map(node, ("path", "cmdline"))
        return ModuleConfig(path=m.need("path", self.file, "the module's file"),
                            cmdline=m.get("cmdline", _str, ""), loc=_loc(node))

    def build(self, node: Node) -> BuildConfig:
        m = _Map(node, ("c", "cflags", "link_address"))
        sources = m.need("c", lambda n: [self.file(n)] if isinstance(n.value, str)
                         else _list(self.file, "a C file or a list of C files")(n), "the C sources")
        return BuildConfig(c=sources, cflags=m.get("cflags", _str_list, []),
                           link_address=m.get("link_address", _uint, 0x100000), loc=_loc(node))

    def check_multiboot(self, config: Config, m: _Map) -> None:
        multiboot = [image for image in config.images if image.type == "multiboot"]
        if not multiboot:
            return
        if config.machine.mode_given and config.machine.mode != "protected":
            raise multiboot[0].loc.error(f"a multiboot kernel starts in protected mode; machine.mode is "
                                         f"{config.machine.mode!r}: expected 'protected' or no mode")
        config.machine.mode = "protected"
        if len(multiboot) > 1:
            raise multiboot[1].loc.error("expected at most one multiboot kernel")

    def devices(self, node: Node) -> DevicesConfig:
        m = _Map(node, ("serial", "debug_exit", "hypercall", "mmio"))
        devices = DevicesConfig()
        serial = m.child("serial")
        if serial is not None:
            s = _Map(serial, ("enabled", "port", "output", "path"))
            devices.serial = SerialConfig(
                enabled=s.get("enabled", _bool, True), port=s.get("port", _port, 0x3F8),
                output=s.get("output", _choice("stdout", "stderr", "capture", "file", "none"), "stdout"))
            if devices.serial.output == "file":
                devices.serial.path = s.need("path", lambda n: self.file(n, must_exist=False),
                                             "the file the console goes to")
            elif s.has("path"):
                raise s.items["path"].error("'path' is only used with output: file")
        debug = m.child("debug_exit")
        if debug is not None:
            d = _Map(debug, ("enabled", "port", "width"))
            width = d.get("width", _int, 1)
            if width not in (1, 2, 4):
                raise d.items["width"].expected("1, 2 or 4")
            devices.debug_exit = DebugExitConfig(enabled=d.get("enabled", _bool, True),
                                                 port=d.get("port", _port, 0xF4), width=width)
        hyper = m.child("hypercall")
        if hyper is not None:
            h = _Map(hyper, ("port", "calls"))
            devices.hypercall = HypercallConfig(port=h.get("port", _port, 0xF5),
                                                calls=h.get("calls", _list(self.hypercall_rule), []))
        devices.mmio = m.get("mmio", _list(self.mmio_rule, "a list of MMIO rules"), [])
        return devices

    def hypercall_rule(self, node: Node) -> HypercallRule:
        m = _Map(node, ("number", "action", "value", "name", "log"))
        number = m.need("number", _uint, "the hypercall number (RAX)")
        return HypercallRule(number=number,
                             action=m.get("action", _choice("return", "log", "count", "stop"), "return"),
                             value=m.get("value", _int, 0), name=m.get("name", _str, f"hypercall {number}"),
                             log=m.get("log", _bool, False))

    def mmio_rule(self, node: Node) -> MmioRule:
        m = _Map(node, ("start", "end", "size", "action", "value", "name", "log"))
        start, end, size = _range(m)
        return MmioRule(start, end, size, action=m.get("action", _choice("ignore", "count", "log", "stop"),
                                                       "ignore"),
                        value=m.get("value", _int, 0), name=m.get("name", _str, f"mmio {start}"),
                        log=m.get("log", _bool, False), loc=_loc(node))

    def vmcs(self, node: Node) -> VmcsConfig:
        m = _Map(node, ("controls", "exception_bitmap", "exceptions", "msrs", "io", "cpuid"))
        vmcs = VmcsConfig(loc=_loc(node))
        controls = m.child("controls")
        if controls is not None:
            vmcs.controls = self.controls(controls)
        vmcs.exception_bitmap = m.get("exception_bitmap", _list(_vector, "a list of exception vectors"), [])
        vmcs.exceptions = m.get("exceptions", _list(self.exception_rule, "a list of exception rules"), [])
        vmcs.msrs = m.get("msrs", _list(self.msr_rule, "a list of MSR rules"), [])
        vmcs.io = m.get("io", _list(self.io_rule, "a list of I/O port rules"), [])
        vmcs.cpuid = m.get("cpuid", _list(self.cpuid_rule, "a list of CPUID overrides"), [])
        return vmcs

    def controls(self, node: Node) -> list[ControlSetting]:
        names = _control_names()
        settings: list[ControlSetting] = []

        def lookup(name_node: Node, name: Any) -> Any:
            if not isinstance(name, str) or name not in names:
                close = difflib.get_close_matches(str(name), list(names), 1, 0.7)
                hint = f" (did you mean {close[0]!r}?)" if close else \
                    " (SDM names such as CPU_BASED_HLT_EXITING; see `minivmm caps`)"
                raise name_node.error(f"expected a VMX control name, got {name!r}{hint}")
            return names[name]

        if isinstance(node.value, list):
            for item in node.value:
                settings.append(ControlSetting(str(item.value), lookup(item, item.value), True, _loc(item)))
        elif isinstance(node.value, dict):
            for name, child in node.value.items():
                settings.append(ControlSetting(name, lookup(child, name), _bool(child), _loc(child)))
        else:
            raise node.expected("a list of control names or a mapping NAME: true/false")
        return settings

    def exception_rule(self, node: Node) -> ExceptionRule:
        m = _Map(node, ("vector", "action", "name", "log"))
        vector = m.need("vector", _vector, "e.g. \"#BP\"")
        from .exits import vector_name
        return ExceptionRule(vector, m.get("action", _choice("count", "log", "skip", "stop", "inject", "pass"),
                                           "count"),
                             m.get("name", _str, vector_name(vector)), m.get("log", _bool, False), _loc(node))

    def msr_rule(self, node: Node) -> MsrRule:
        m = _Map(node, ("msr", "action", "value", "read", "write", "name", "log"))
        msr = m.need("msr", _uint, "the MSR index")
        action = m.get("action", _choice("allow", "deny", "fixed", "log", "count"), "log")
        if action == "fixed" and not m.has("value"):
            raise ConfigError("action 'fixed' needs a 'value'", m.node.where, _join(m.node.key, "value"))
        return MsrRule(msr, action, m.get("value", _uint, 0), m.get("read", _bool, True),
                       m.get("write", _bool, True), m.get("name", _str, f"msr {msr:#x}"),
                       m.get("log", _bool, False), _loc(node))

    def io_rule(self, node: Node) -> IoRule:
        m = _Map(node, ("port", "action", "value", "name", "log"))
        port_node = m.child("port")
        if port_node is None:
            raise ConfigError("required key 'port' is missing (a port or [start, end))", m.node.where,
                              _join(m.node.key, "port"))
        if isinstance(port_node.value, list):
            if len(port_node.value) != 2:
                raise port_node.expected("a port or a [start, end) pair")
            start, end = _port(port_node.value[0]), _int(port_node.value[1])
            if not start < end <= 0x10000:
                raise port_node.expected("a [start, end) pair with start < end <= 0x10000")
        else:
            start = _port(port_node)
            end = start + 1
        action = m.get("action", _choice("ignore", "fixed", "log", "count", "stop"), "log")
        if action == "fixed" and not m.has("value"):
            raise ConfigError("action 'fixed' needs a 'value'", m.node.where, _join(m.node.key, "value"))
        return IoRule(start, end, action, m.get("value", _uint), m.get("name", _str, f"port {start:#x}"),
                      m.get("log", _bool, False), _loc(node))

    def cpuid_rule(self, node: Node) -> CpuidRule:
        m = _Map(node, ("leaf", "subleaf", "eax", "ebx", "ecx", "edx"))
        rule = CpuidRule(m.need("leaf", _uint, "the CPUID leaf (EAX)"), m.get("subleaf", _uint),
                         loc=_loc(node))
        for reg in ("eax", "ebx", "ecx", "edx"):
            setattr(rule, reg, m.get(reg, _reg32_value))
        return rule

    def ept(self, node: Node) -> EptConfig:
        m = _Map(node, ("protect", "monitors", "hooks"))
        return EptConfig(protect=m.get("protect", _list(self.protect_rule, "a list of ranges"), []),
                         monitors=m.get("monitors", _list(self.monitor_rule, "a list of monitors"), []),
                         hooks=m.get("hooks", _list(self.hook_rule, "a list of execute hooks"), []))

    def protect_rule(self, node: Node) -> ProtectRule:
        m = _Map(node, ("start", "end", "size", "perms"))
        start, end, size = _range(m)
        return ProtectRule(start, end, size, m.need("perms", _perms, "e.g. r-x"), _loc(node))

    def monitor_rule(self, node: Node) -> MonitorRule:
        m = _Map(node, ("start", "end", "size", "access", "action", "name", "log"))
        start, end, size = _range(m)
        return MonitorRule(start, end, size, m.get("access", _monitor_access, "rw"),
                           m.get("action", _choice("log", "count", "stop"), "log"),
                           m.get("name", _str, f"monitor {start}"), m.get("log", _bool, False), _loc(node))

    def hook_rule(self, node: Node) -> HookRule:
        m = _Map(node, ("address", "action", "hidden", "name", "log"))
        address = m.need("address", _address, "an address or a symbol")
        return HookRule(address, m.get("action", _choice("log", "count", "stop", "skip"), "log"),
                        m.get("hidden", _bool, True), m.get("name", _str, f"hook {address}"),
                        m.get("log", _bool, False), _loc(node))

    def expect(self, node: Node) -> ExpectConfig:
        m = _Map(node, ("result", "exit_code", "console", "message", "counters"))
        counters: dict[str, int] = {}
        counters_node = m.child("counters")
        if counters_node is not None:
            if not isinstance(counters_node.value, dict):
                raise counters_node.expected("a mapping of counter name: count")
            counters = {name: _int(child) for name, child in counters_node.value.items()}
        return ExpectConfig(
            result=m.get("result", _choice("exit", "hlt", "timeout", "triple_fault", "exception", "error",
                                           "exit_limit", "stopped")),
            exit_code=m.get("exit_code", _int), console=m.get("console", _str),
            message=m.get("message", _str), counters=counters)

    def fuzz(self, node: Node) -> FuzzConfig:
        m = _Map(node, ("input_symbol", "input_address", "max_input_size", "length_register",
                        "length_address", "crash_vectors", "crash_addresses", "coverage_ranges", "timeout"))
        m.exclusive("input_symbol", "input_address")
        m.exclusive("length_register", "length_address")
        fuzz = FuzzConfig(
            input_symbol=m.get("input_symbol", _symbol_name),
            input_address=m.get("input_address", _uint),
            max_input_size=m.get("max_input_size", _size, 4096),
            length_register=m.get("length_register", _register),
            length_address=m.get("length_address", _uint),
            crash_vectors=m.get("crash_vectors", _list(_vector, "a list of exception vectors"), []),
            crash_addresses=m.get("crash_addresses", _list(_uint, "a list of addresses"), []),
            coverage_ranges=m.get("coverage_ranges", _list(_pair, "a list of [start, end) pairs"), []),
            timeout=m.get("timeout", _seconds, 1.0))
        if fuzz.input_symbol is None and fuzz.input_address is None:
            raise ConfigError("required key 'input_symbol' or 'input_address' is missing (where the input goes)",
                              node.where, _join(node.key, "input_symbol"))
        return fuzz


def _pair(node: Node) -> tuple[int, int]:
    if not isinstance(node.value, list) or len(node.value) != 2:
        raise node.expected("a [start, end) pair")
    start, end = _uint(node.value[0]), _uint(node.value[1])
    if end <= start:
        raise node.expected("a [start, end) pair with start < end")
    return start, end


def _handler_spec(node: Node) -> str:
    text = _str(node)
    module, sep, function = text.partition(":")
    if not sep or not module or not function.isidentifier():
        raise node.expected("\"module:function\" or \"file.py:function\"")
    return text


def _control_names() -> dict[str, Any]:
    from . import controls
    names: dict[str, Any] = {}
    for cls in (controls.PinBasedControls, controls.ProcBasedControls, controls.SecondaryControls,
                controls.VmExitControls, controls.VmEntryControls):
        for member in cls:
            names[member.name] = member
    return names


# ---------------------------------------------------------------------------
# Building a machine


from .actions import RESUME, RETRY, Inject, Stop  # noqa: E402
from .exits import ExitReason, vector_name  # noqa: E402
from .machine import Machine, RunResult  # noqa: E402


class _StreamSink:
    """Console bytes to a stream (binary, or text without a `.buffer`), flushed at each newline."""

    def __init__(self, stream) -> None:
        self.stream = getattr(stream, "buffer", stream)
        self.text = isinstance(self.stream, io.TextIOBase)

    def __call__(self, data: bytes) -> None:
        self.stream.write(data.decode("latin-1") if self.text else data)
        if data == b"\n":
            self.stream.flush()

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


class RuleStop(Exception):
    """Raised by a rule's `stop` from a callback that cannot return an action (EPT hooks);
    `ConfiguredMachine.run` turns it into a "stopped" result."""


class ConfiguredMachine(Machine):
    """A `Machine` built from a `Config`: also holds the rule counters and the event log."""

    def __init__(self, config: Config, *, console: Callable[[bytes], object] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self._closables: list[Any] = []
        super().__init__(config.machine.memory, config.machine.mode, console=console,
                         **({"vcpus": config.machine.vcpus, "irqchip": True}
                            if config.platform.irqchip or config.machine.vcpus > 1 else {}))
        self.config = config
        self.counters: dict[str, int] = {}
        self.events: list[str] = []
        self.log_sink = log
        self._console_sink = console

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def log(self, message: str) -> None:
        if len(self.events) < 10000:
            self.events.append(message)
        if self.log_sink is not None:
            self.log_sink(message)

    def run(self, timeout: float | None = None, max_exits: int | None = None) -> RunResult:
        try:
            return super().run(timeout=timeout, max_exits=max_exits)
        except RuleStop as stop:
            result = self.last_result
            result.reason, result.message, result.exit_code = "stopped", str(stop), None
            return result

    def run_config(self, timeout: float | None = None, max_exits: int | None = None) -> RunResult:
        """Run with the config's deadline and exit limit unless given here."""
        mc = self.config.machine
        try:
            return self.run(timeout=timeout if timeout is not None else mc.timeout,
                            max_exits=max_exits if max_exits is not None else mc.max_exits)
        finally:
            flush = getattr(self._console_sink, "flush", None)
            if flush is not None:
                flush()

    def close(self) -> None:
        for resource in self._closables:
            try:
                resource.close()
            except OSError:
                pass
        self._closables.clear()
        super().close()


def build_machine(config: Config, *, capture_console: bool = False,
                  console: Callable[[bytes], object] | None = None,
                  log: Callable[[str], None] | None = None) -> ConfiguredMachine:
    """A machine with the config's images loaded, devices, VMCS/EPT rules and handlers installed.

    The console goes where `devices.serial.output` says unless `capture_console`
    (kept only in `machine.serial.text`) or an explicit `console` sink is given.
    Errors found only now (unknown symbols, controls the host cannot honour,
    loader errors) are `ConfigError`s naming the key too.
    """
    sink = console
    serial = config.devices.serial
    opened = None
    if sink is None and not capture_console:
        if serial.output == "stdout":
            sink = _StreamSink(sys.stdout)
        elif serial.output == "stderr":
            sink = _StreamSink(sys.stderr)
        elif serial.output == "file":
            try:
                opened = open(serial.path, "wb")
            except OSError as exc:
                raise ConfigError(f"cannot open the console file: {exc}", str(config.path),
                                  "devices.serial.path") from None
            sink = _StreamSink(opened)
    machine = ConfiguredMachine(config, console=sink, log=log)
    if opened is not None:
        machine._closables.append(opened)
    try:
        _Builder(config, machine).build()
    except BaseException:
        machine.close()
        raise
    return machine


def run_config(config: Config, **kwargs) -> tuple[RunResult, ConfiguredMachine]:
    """Build, run and close; returns the result and the (closed) machine for its counters."""
    with build_machine(config, **kwargs) as machine:
        result = machine.run_config()
    return result, machine


def check_expectation(expect: ExpectConfig | None, result: RunResult,
                      counters: dict[str, int] | None = None) -> list[str]:
    """The ways `result` differs from `expect` (empty when it matches)."""
    if expect is None:
        return []
    problems: list[str] = []
    if expect.result is not None and result.reason != expect.result:
        problems.append(f"result {result.reason!r}, expected {expect.result!r} ({result.message})")
    if expect.exit_code is not None and result.exit_code != expect.exit_code:
        problems.append(f"exit code {result.exit_code}, expected {expect.exit_code}")
    if expect.console is not None and expect.console not in result.console:
        problems.append(f"console {result.console!r} does not contain {expect.console!r}")
    if expect.message is not None and expect.message not in result.message:
        problems.append(f"message {result.message!r} does not contain {expect.message!r}")
    for name, value in expect.counters.items():
        got = (counters or {}).get(name, 0)
        if got != value:
            problems.append(f"counter {name!r} is {got}, expected {value}")
    return problems


def _instruction_length(machine: Machine, vcpu) -> int:
    from .disasm import instruction_length
    from .modes import CODE_BITS, Mode
    address = vcpu.rip
    if machine.mode is Mode.REAL:
        address += vcpu.segment("cs").base
    region = machine.memory.region_at(address)
    if region is None:
        return 0
    code = machine.memory.read(address, min(15, region.end - address))
    return instruction_length(code, CODE_BITS[machine.mode])


def _skip(machine: Machine, vcpu, length: int = 0) -> None:
    length = length or _instruction_length(machine, vcpu)
    if not length:
        raise RuntimeError(f"cannot decode the instruction at rip={vcpu.rip:#x} to skip it")
    vcpu.rip += length


def check_config(config: Config) -> dict[str, int]:
    """Everything `build_machine` checks that needs no VM: load (assemble, compile) the images,
    check they fit, resolve every symbol the config uses. Returns the symbols."""
    builder = _Builder(config, None)
    entry = builder.images()
    mc = config.machine
    if builder.resolve(mc.entry, entry) is None:
        raise ConfigError("no entry point: give machine.entry", str(config.path), "machine.entry")
    builder.resolve(mc.stack)
    for value in mc.registers.values():
        builder.resolve(value)
    for rule in [*config.devices.mmio, *config.ept.protect, *config.ept.monitors]:
        builder.end(builder.resolve(rule.start), rule.end, rule.size)
    for hook in config.ept.hooks:
        builder.resolve(hook.address)
    for spec, loc in config.handlers:
        resolve_handler(spec, config.base_dir, loc)
    return builder.symbols


class _Builder:
    """Applies a validated Config to a fresh machine (or, with machine None, only checks it)."""

    def __init__(self, config: Config, machine: ConfiguredMachine | None) -> None:
        self.config = config
        self.machine = machine
        self.symbols: dict[str, int] = {}

    def resolve(self, value: Address | None, default: int | None = None) -> int | None:
        if value is None:
            return default
        if isinstance(value, int):
            return value
        if value.name in self.symbols:
            return self.symbols[value.name]
        known = sorted(self.symbols)
        close = difflib.get_close_matches(value.name, known, 1, 0.6)
        hint = f"; did you mean {close[0]!r}?" if close else \
            (f" (the images define {len(known)} symbols)" if known else " (the images define no symbols)")
        raise value.loc.error(f"unknown symbol {value.name!r}{hint}")

    def end(self, start: int, end: Address | None, size: int | None) -> int:
        return start + size if size is not None else self.resolve(end)

    def build(self) -> None:
        config, machine = self.config, self.machine
        self.devices()
        entry = self.images()
        if not config.platform.empty:
            from .platform import install_platform
            try:
                install_platform(machine, config.platform)
            except (ValueError, OSError) as exc:
                raise ConfigError(str(exc), str(config.path), "platform") from None
        mc = config.machine
        machine.entry = self.resolve(mc.entry, entry)
        machine.stack = self.resolve(mc.stack)
        if machine.entry is None:
            raise ConfigError("no entry point: give machine.entry", str(config.path), "machine.entry")
        try:
            machine.setup()
        except Exception as exc:
            raise ConfigError(f"cannot start the {mc.mode} mode machine: {exc}", str(config.path),
                              "machine") from None
        vcpu = machine.vcpu
        for name, value in self.initial_registers.items():
            setattr(vcpu, name, value)
        for name, value in mc.registers.items():
            setattr(vcpu, name, self.resolve(value))
        self.vmcs()
        self.ept()
        self.mmio()
        self.hypercalls()
        self.handlers()
        cpuid = getattr(machine, "cpuid", None)
        if cpuid is not None and getattr(cpuid, "dirty", False):
            machine.apply_cpuid()       # CPUID rules and handlers came after setup()

    # -- images ------------------------------------------------------------------------
    def images(self) -> int | None:
        from . import loaders
        machine = self.machine
        self.initial_registers: dict[str, int] = {}
        entry: int | None = None
        memory = self.config.machine.memory
        for image in self.config.images:
            try:
                loaded = self.load_image(image, loaders)
            except ConfigError:
                raise
            except (loaders.LoaderError, OSError, ValueError) as exc:
                raise image.loc.error(str(exc)) from None
            except Exception as exc:      # AssemblyError and friends
                raise image.loc.error(f"{type(exc).__name__}: {exc}") from None
            for address, data in loaded.segments:
                if address + len(data) > memory:
                    raise image.loc.error(f"the image's bytes at [{address:#x}, {address + len(data):#x}) do "
                                          f"not fit in guest RAM ({memory:#x} bytes; raise machine.memory)")
                if machine is not None:
                    machine.memory.write(address, data)
            self.symbols.update(loaded.symbols)
            if machine is not None:
                machine.symbols.update(loaded.symbols)
            image_entry = self.resolve(image.entry, loaded.entry)
            if entry is None and image_entry is not None:
                entry = image_entry
            self.initial_registers.update(loaded.registers)
        return entry

    def load_image(self, image: ImageConfig, loaders):
        from .modes import CODE_BITS, DEFAULT_LOAD_ADDRESS, Mode
        mode = Mode(self.config.machine.mode)
        if image.type == "asm":
            address = self.resolve(image.address, DEFAULT_LOAD_ADDRESS[mode])
            return loaders.load_asm(image.path, code_bits=CODE_BITS[mode], load_address=address,
                                    defines=image.defines)
        if image.type == "binary":
            return loaders.load_flat(image.path, self.resolve(image.address))
        if image.type == "elf":
            path = image.path
            if image.build is not None:
                path = loaders.build_c_elf(image.build.c, cflags=image.build.cflags,
                                           link_address=image.build.link_address,
                                           bits=CODE_BITS[mode])
            return loaders.load_elf(path)
        if image.build is not None:
            path = loaders.build_c_elf(image.build.c, cflags=image.build.cflags,
                                       link_address=image.build.link_address, bits=32)
            data = path.read_bytes()
        else:
            data = image.path.read_bytes()
        if image.assemble:
            data = loaders.load_asm(image.path, code_bits=32, load_address=DEFAULT_LOAD_ADDRESS[mode],
                                    defines=image.defines).segments[0][1]
        modules = []
        for module in image.modules:
            try:
                content = module.path.read_bytes()
            except OSError as exc:
                raise module.loc.error(f"cannot read the module: {exc}") from None
            text = f"{module.path.name} {module.cmdline}" if module.cmdline else module.path.name
            modules.append(loaders.MultibootModule(content, text))
        return loaders.load_multiboot(data, cmdline=image.cmdline, memory_size=self.config.machine.memory,
                                      modules=modules,
                                      kernel_name=image.path.parent.name if image.build else image.path.name)

    # -- devices ------------------------------------------------------------------------
    def devices(self) -> None:
        from .devices import DebugExit, Serial16550
        machine, devices = self.machine, self.config.devices
        serial, debug = devices.serial, devices.debug_exit
        if not serial.enabled or serial.port != machine.serial.base:
            self.unplug(machine.serial)
            new = Serial16550(base=serial.port, sink=machine.serial.sink)
            machine.serial = new
            if serial.enabled:
                self.plug(new, "devices.serial.port")
        if not debug.enabled or debug.port != machine.debug_exit.port or debug.width != 1:
            self.unplug(machine.debug_exit)
            machine.debug_exit = DebugExit(port=debug.port, width=debug.width)
            if debug.enabled:
                self.plug(machine.debug_exit, "devices.debug_exit.port")

    def unplug(self, device) -> None:
        self.machine.remove_device(device)

    def plug(self, device, key: str) -> None:
        try:
            self.machine.add_device(device)
        except ValueError as exc:
            raise ConfigError(str(exc), str(self.config.path), key) from None

    def hypercalls(self) -> None:
        from .modes import HYPERCALL_PORT
        machine, hyper = self.machine, self.config.devices.hypercall
        for rule in hyper.calls:
            machine.on(ExitReason.EXECUTE_VMCALL, self.hypercall_handler(rule), number=rule.number)
        if hyper.port != HYPERCALL_PORT:
            def forward(vcpu, info):
                exit = info.detail
                if not exit.is_out:
                    return None
                action = machine.dispatcher.dispatch(vcpu, info.reset(ExitReason.EXECUTE_VMCALL, detail=exit),
                                                     vcpu.rax)
                return action if action is not None else RESUME
            machine.on(ExitReason.IO_INSTRUCTION, forward, port=hyper.port)

    def hypercall_handler(self, rule: HypercallRule):
        machine = self.machine

        def handler(vcpu, info):
            machine.count(rule.name)
            if rule.log or rule.action == "log":
                machine.log(f"{rule.name}: rax={vcpu.rax:#x} rbx={vcpu.rbx:#x} rcx={vcpu.rcx:#x} "
                            f"rdx={vcpu.rdx:#x} rsi={vcpu.rsi:#x} at rip={vcpu.rip:#x}")
            if rule.action == "return":
                vcpu.rax = rule.value
                return RESUME
            if rule.action == "stop":
                return Stop("stopped", message=f"{rule.name} at rip={vcpu.rip:#x}")
            return None
        return handler

    def mmio(self) -> None:
        machine = self.machine
        for rule in self.config.devices.mmio:
            start = self.resolve(rule.start)
            end = self.end(start, rule.end, rule.size)

            def handler(vcpu, info, rule=rule):
                machine.count(rule.name)
                exit = info.detail
                if rule.log or rule.action == "log":
                    what = "write" if getattr(exit, "is_write", False) else "read"
                    machine.log(f"{rule.name}: {what} at {info.guest_physical_address:#x} rip={vcpu.rip:#x}")
                if rule.action == "stop":
                    return Stop("stopped", message=f"{rule.name}: access to {info.guest_physical_address:#x} "
                                                   f"at rip={vcpu.rip:#x}")
                if exit is not None and not getattr(exit, "is_write", True):
                    vcpu.fd.set_mmio_data(rule.value.to_bytes(8, "little", signed=rule.value < 0))
                    info.data = rule.value
                return RESUME
            machine.on(ExitReason.EPT_MISCONFIGURATION, handler, address=(start, end))

    # -- VMCS ----------------------------------------------------------------------------
    def vmcs_model(self, key: str, loc: Loc):
        try:
            return self.machine.vmcs
        except AttributeError:
            raise loc.error(f"{key} needs the VMCS model (machine.vmcs), which this minivmm build lacks") \
                from None

    def vmcs(self) -> None:
        config, machine = self.config.vmcs, self.machine
        if config.controls or config.exception_bitmap or config.msrs or config.io:
            vmcs = self.vmcs_model("vmcs", config.loc)
        for setting in config.controls:
            try:
                vmcs.set_control(setting.flag, enabled=setting.enabled)
            except Exception as exc:
                if type(exc).__name__ == "UnsupportedControlError":
                    raise setting.loc.error(f"this host cannot honour {setting.name}: {exc}") from None
                raise
        for vector in config.exception_bitmap:
            vmcs.intercept_exception(vector)
        for rule in config.exceptions:
            if rule.action == "inject" and machine.mode.value == "user":
                raise rule.loc.error("'inject' cannot work in user mode: the guest's IDT is minivmm's "
                                     "built-in kernel, which reports the exception again")
            machine.on(ExitReason.EXCEPTION_OR_NMI, self.exception_handler(rule), vector=rule.vector)
        for rule in config.msrs:
            if rule.action == "allow":
                continue
            vmcs.msr_bitmap.intercept(rule.msr, read=rule.read, write=rule.write)
            handler = self.msr_handler(rule)
            if rule.read:
                machine.on(ExitReason.EXECUTE_RDMSR, handler, msr=rule.msr)
            if rule.write:
                machine.on(ExitReason.EXECUTE_WRMSR, handler, msr=rule.msr)
        for rule in config.io:
            io_bitmap = getattr(vmcs, "io_bitmap", None)
            if io_bitmap is not None:
                for port in range(rule.start, rule.end):
                    io_bitmap.intercept(port)
            machine.on(ExitReason.IO_INSTRUCTION, self.io_handler(rule), port=(rule.start, rule.end))
        if config.cpuid:
            try:
                cpuid = machine.cpuid
            except AttributeError:
                raise config.cpuid[0].loc.error("CPUID overrides need machine.cpuid, which this minivmm "
                                                "build lacks") from None
            for rule in config.cpuid:
                registers = {name: getattr(rule, name) for name in ("eax", "ebx", "ecx", "edx")
                             if getattr(rule, name) is not None}
                cpuid.set(rule.leaf, rule.subleaf, **registers)

    def exception_handler(self, rule: ExceptionRule):
        machine = self.machine

        def handler(vcpu, info):
            machine.count(rule.name)
            if rule.log or rule.action == "log":
                machine.log(f"{rule.name}: {vector_name(rule.vector)} at rip={vcpu.rip:#x}")
            if rule.action == "skip":
                _skip(machine, vcpu, info.instruction_length)
                return RETRY
            if rule.action == "stop":
                return Stop("stopped", message=f"{rule.name}: {vector_name(rule.vector)} at rip={vcpu.rip:#x}")
            if rule.action == "inject":
                has_error = bool(info.interruption_info & (1 << 11))
                return Inject(rule.vector, info.interruption_error_code if has_error else None)
            return None
        return handler

    def msr_handler(self, rule: MsrRule):
        machine = self.machine

        def handler(vcpu, info):
            write = info.reason == ExitReason.EXECUTE_WRMSR
            machine.count(rule.name)
            if rule.log or rule.action == "log":
                text = f"wrmsr {info.msr:#x} <- {info.data:#x}" if write else f"rdmsr {info.msr:#x}"
                machine.log(f"{rule.name}: {text} at rip={vcpu.rip:#x}")
            if rule.action == "deny":
                return Inject(Vector.GP, 0)
            if rule.action == "fixed":
                if not write:
                    info.data = rule.value
                return RESUME
            return None
        return handler

    def io_handler(self, rule: IoRule):
        machine = self.machine

        def handler(vcpu, info):
            exit = info.detail
            machine.count(rule.name)
            data = vcpu.fd.io_data(exit)
            if rule.log or rule.action == "log":
                if exit.is_out:
                    value = int.from_bytes(data[:exit.size], "little")
                    machine.log(f"{rule.name}: out {exit.port:#x} <- {value:#x} at rip={vcpu.rip:#x}")
                else:
                    machine.log(f"{rule.name}: in {exit.port:#x} at rip={vcpu.rip:#x}")
            if rule.action == "stop":
                return Stop("stopped", message=f"{rule.name}: port {exit.port:#x} at rip={vcpu.rip:#x}")
            if rule.action in ("ignore", "fixed"):
                if not exit.is_out:
                    value = rule.value if rule.value is not None else (1 << (8 * exit.size)) - 1
                    value &= (1 << (8 * exit.size)) - 1
                    raw = value.to_bytes(exit.size, "little")
                    for i in range(0, len(data), exit.size):
                        data[i:i + exit.size] = raw
                    info.data = value
                return RESUME
            return None
        return handler

    # -- EPT -----------------------------------------------------------------------------
    def ept(self) -> None:
        config, machine = self.config.ept, self.machine
        if config.empty:
            return
        try:
            ept = machine.ept
        except (ImportError, AttributeError) as exc:
            first = (config.protect or config.monitors or config.hooks)[0]
            raise first.loc.error(f"the EPT model is not available in this build: {exc}") from None
        for rule in config.protect:
            start = self.resolve(rule.start)
            end = self.end(start, rule.end, rule.size)
            try:
                ept.protect(start, end - start, rule.perms)
            except ValueError as exc:
                raise rule.loc.error(str(exc)) from None
        for rule in config.monitors:
            start = self.resolve(rule.start)
            end = self.end(start, rule.end, rule.size)
            try:
                ept.monitor(start, end, rule.access, self.monitor_callback(rule))
            except ValueError as exc:
                raise rule.loc.error(str(exc)) from None
        for rule in config.hooks:
            address = self.resolve(rule.address)
            try:
                ept.hook_execute(address, self.hook_callback(rule, address), hidden=rule.hidden)
            except ValueError as exc:
                raise rule.loc.error(str(exc)) from None

    def monitor_callback(self, rule: MonitorRule):
        machine = self.machine

        def callback(event):
            machine.count(rule.name)
            if rule.log or rule.action == "log":
                kind = "write" if getattr(event, "is_write", False) else "access"
                value = getattr(event, "value", None)
                shown = f" value={value:#x}" if isinstance(value, int) else ""
                machine.log(f"{rule.name}: {kind} of {getattr(event, 'size', 0)} bytes at "
                            f"{event.address:#x}{shown} rip={getattr(event, 'rip', 0):#x}")
            if rule.action == "stop":
                raise RuleStop(f"{rule.name}: {getattr(event, 'kind', 'access')} of {event.address:#x} at "
                               f"rip={getattr(event, 'rip', 0):#x}")
            return None
        return callback

    def hook_callback(self, rule: HookRule, address: int):
        machine = self.machine

        def callback(event):
            vcpu = getattr(event, "vcpu", None) or machine.vcpu
            machine.count(rule.name)
            if rule.log or rule.action == "log":
                machine.log(f"{rule.name}: executed {address:#x} rax={vcpu.rax:#x}")
            if rule.action == "stop":
                raise RuleStop(f"{rule.name}: execution reached {address:#x}")
            if rule.action == "skip":
                _skip(machine, vcpu)      # the hook then runs the instruction at the new rip
            return None
        return callback

    # -- Python handlers ------------------------------------------------------------------
    def handlers(self) -> None:
        for spec, loc in self.config.handlers:
            function = resolve_handler(spec, self.config.base_dir, loc)
            try:
                function(self.machine)
            except ConfigError:
                raise
            except Exception as exc:
                raise loc.error(f"{spec} raised {type(exc).__name__}: {exc}") from exc


def resolve_handler(spec: str, base_dir: Path, loc: Loc = Loc()) -> Callable:
    """`module:function` (importable, or a module next to the YAML file) or `file.py:function`."""
    module_name, _, function_name = spec.partition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                raise loc.error(f"handler file {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"minivmm_config_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            added = str(base_dir.resolve())
            sys.path.insert(0, added)
            try:
                module = importlib.import_module(module_name)
            finally:
                try:
                    sys.path.remove(added)
                except ValueError:
                    pass
    except ConfigError:
        raise
    except ImportError as exc:
        raise loc.error(f"cannot import {module_name!r} (searched {base_dir} and sys.path): {exc}") from None
    except Exception as exc:
        raise loc.error(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise loc.error(f"module {module_name!r} has no function {function_name!r}")
    return function
