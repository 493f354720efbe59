"""The config schema: the typed result of validation, the SCHEMA summary and `ConfigError`.

A config is read from YAML events into located nodes (`minivmm.config.validate`),
so every value keeps the line it came from; every error names the file, the line and the dotted
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
  interrupt), `pit` the in-kernel 8254, `rtc` the MC146818 RTC/CMOS, `testdev` QEMU's
  pc-testdev, `pc: true` (or `platform: pc`) irqchip+pit+rtc+fw_cfg+acpi+pci, `fw_cfg` QEMU's fw_cfg at 0x510/0x511,
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
- `vmcs` rules are checked against the host's capability model
  (`minivmm.capabilities`, `minivmm caps`) by `check` and by every run alike:
  controls the capability MSRs refuse, exception vectors the mode cannot
  intercept (at CPL 0 only what the host exits on, e.g. #BP; every vector in
  user mode), `inject` in user mode and MSR rules in user mode are errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MinivmmError
from ..lazy import lazy_names

if TYPE_CHECKING:
    from ..platform import PlatformConfig
    from .rule_types import (ControlSetting, CpuidRule, ExceptionRule, HookRule, HypercallRule, IoRule, MmioRule,
                             MonitorRule, MsrRule, ProtectRule)

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
           - {type: linux, path: static-program, argv: [..], env: {NAME: text}, expose: [PATH[:rw]],
              stdin: file}   (the only image; machine.memory is the program's memory limit)
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
platform:  pc | {pc: bool, irqchip: bool, pit: bool, rtc: bool | {start: epoch | date},
            fw_cfg: bool, acpi: bool | {pm_timer_32bit: bool}, pci: bool, testdev: bool,
            scratch: port | {port, width} | [..], strict_ports: bool,
            ram_windows: [{start, size, name}]}
handlers:  ["module:function", "file.py:function"]
expect:    {result, exit_code, console, message, counters: {name: N}}
fuzz:      {input_symbol | input_address, max_input_size, length_register | length_address,
            crash_vectors, crash_addresses, coverage_ranges: [[start, end]], timeout,
            batch (inputs per guest entry, 1-1024), batch_regions: [[start, end]]}
           (linux: input_symbol is a function, `stdin`, or '@@' for the file '@@' in argv)
"""


# ---------------------------------------------------------------------------
# Errors and locations


class ConfigError(MinivmmError, ValueError):
    """An invalid config: `str()` is `file:line: key: what was expected, got what`."""

    def __init__(self, message: str, where: str = "", key: str = "") -> None:
        self.where = where
        self.key = key
        self.detail = message
        super().__init__(": ".join([part for part in (where, key) if part] + [message]))


@dataclass(frozen=True)
class Loc:
    """Where a value came from, for errors raised after validation (e.g. an unknown symbol)."""
    where: str = ""
    key: str = ""

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.where, self.key)


@dataclass(frozen=True)
class SymbolRef:
    """An address given as a symbol name, resolved once the images are loaded."""
    name: str
    loc: Loc = Loc()

    def __str__(self) -> str:
        return self.name


Address = int | SymbolRef


# ---------------------------------------------------------------------------
# The typed result (the rules inside it are in `minivmm.config.rule_types`)

__getattr__ = lazy_names(__name__, dict.fromkeys(
    ("ControlSetting", "CpuidRule", "ExceptionRule", "HookRule", "HypercallRule", "IoRule", "MmioRule",
     "MonitorRule", "MsrRule", "ProtectRule"), ".rule_types"))


@dataclass
class MachineConfig:
    """`machine:`: RAM, mode, entry, stack, registers and the run's limits."""
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
    memory_loc: Loc = Loc(key="machine.memory")     # where `memory` was given, for host checks
    entry_loc: Loc = Loc(key="machine.entry")


@dataclass
class BuildConfig:
    """Compile C sources with gcc (-ffreestanding -nostdlib -static) into an ELF."""
    c: list[Path]
    cflags: list[str] = field(default_factory=list)
    link_address: int = 0x100000
    loc: Loc = Loc()


@dataclass
class ImageConfig:
    """One entry of `images:` (asm, binary, elf, multiboot or linux)."""
    type: str                                  # asm | binary | elf | multiboot | linux
    path: Path | None = None                   # source (asm), file (binary/elf/multiboot)
    assemble: bool = False                     # multiboot kernel given as assembly source
    build: BuildConfig | None = None
    address: Address | None = None
    entry: Address | None = None
    defines: dict[str, int] = field(default_factory=dict)
    cmdline: str = ""
    modules: list["ModuleConfig"] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)           # linux: the program's argv
    env: dict[str, str] | None = None                       # linux: None = a minimal environment
    expose: list[str] = field(default_factory=list)         # linux: host paths, PATH or PATH:rw
    stdin: Path | None = None                               # linux: a file as standard input
    loc: Loc = Loc()


@dataclass
class ModuleConfig:
    """A multiboot module: a file and the text after its name in the module's string."""
    path: Path
    cmdline: str = ""
    loc: Loc = Loc()


@dataclass
class SerialConfig:
    """`devices.serial`: the 16550 UART's port and where its output goes."""
    enabled: bool = True
    port: int = 0x3F8
    output: str = "stdout"                     # stdout | stderr | capture | file | none
    path: Path | None = None


@dataclass
class DebugExitConfig:
    """`devices.debug_exit`: the isa-debug-exit port the guest reports its exit code on."""
    enabled: bool = True
    port: int = 0xF4
    width: int = 1



@dataclass
class HypercallConfig:
    """`devices.hypercall`: the hypercall port and its calls."""
    port: int = 0xF5
    calls: list[HypercallRule] = field(default_factory=list)



@dataclass
class DevicesConfig:
    """`devices:`: serial, debug exit, hypercalls and MMIO rules."""
    serial: SerialConfig = field(default_factory=SerialConfig)
    debug_exit: DebugExitConfig = field(default_factory=DebugExitConfig)
    hypercall: HypercallConfig = field(default_factory=HypercallConfig)
    mmio: list[MmioRule] = field(default_factory=list)







@dataclass
class VmcsConfig:
    """`vmcs:`: controls, exception bitmap and the exception, MSR, I/O and CPUID rules."""
    controls: list[ControlSetting] = field(default_factory=list)
    exception_bitmap: list[int] = field(default_factory=list)
    exception_bitmap_locs: list[Loc] = field(default_factory=list)      # where each vector was given
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
class EptConfig:
    """`ept:`: protections, monitors and execution hooks."""
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


INPUT_FILE = "@@"
"""In a linux image's argv, the input file's path (as for afl-fuzz); as fuzz.input_symbol, the
input is that file's content."""


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
    batch: int = 1
    batch_regions: list[tuple[int, int]] = field(default_factory=list)


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
    platform: "PlatformConfig" = field(default_factory=lambda: platform_config())

    @property
    def name(self) -> str:
        return self.machine.name or self.path.stem

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def platform_config(*, pc: bool = False, **kwargs: Any) -> "PlatformConfig":
    """A `minivmm.platform.PlatformConfig` (`pc=True`: `pc_platform`'s set); the import waits for
    the first call, so importing the schema does not load minivmm.platform."""
    if pc:
        from ..platform import pc_platform
        return pc_platform(**kwargs)
    from ..platform import PlatformConfig
    return PlatformConfig(**kwargs)

