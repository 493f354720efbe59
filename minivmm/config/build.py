"""Building a machine from a validated `Config`: `build_machine`, `ConfiguredMachine`, `check_config`.

`_Builder` applies the config in order: devices, images (assembled, compiled,
loaded; their symbols resolve the config's `SymbolRef`s), platform, mode
setup and registers, then the VMCS, EPT, MMIO and hypercall rules (their
handlers come from `minivmm.config.rules`) and last the Python handlers.
Problems found only now are `ConfigError`s naming the key. `check_config`
does the part of this that needs no VM.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any, Callable

from ..devices import DebugExit, PortDevice, Serial16550
from ..exits import ExitReason
from ..controls import UnsupportedControlError, VmEntryControls
from ..machine import Machine, RunResult
from ..modes import (CODE_BITS, DEFAULT_LOAD_ADDRESS, HYPERCALL_PORT, ImageRange, Mode, SystemAreaError,
                     choose_system_base, default_stack)
from . import rules
from .schema import Address, Config, ConfigError, ExpectConfig, ImageConfig, Loc
from .validate import close_matches

if TYPE_CHECKING:
    from ..capabilities import HostModel
    from ..loaders import LoadedImage
    from ..vmcs import Vmcs


class _StreamSink:
    """Console bytes to a stream (binary, or text without a `.buffer`), flushed at each newline."""

    def __init__(self, stream: IO[bytes] | IO[str]) -> None:
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
    preflight(config)
    if any(image.type == "linux" for image in config.images):
        from ..linux.config import build_linux_machine
        return build_linux_machine(config, console=console, log=log)
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


def run_config(config: Config, **kwargs: Any) -> tuple[RunResult, ConfiguredMachine]:
    """Build, run and close; returns the result and the (closed) machine for its counters."""
    with build_machine(config, **kwargs) as machine:
        result = machine.run_config()
    return result, machine


def check_expectation(expect: ExpectConfig | None, result: RunResult,
                      counters: dict[str, int] | None = None) -> list[str]:
    """How `result` differs from `expect`, each as `expected X, got Y` (empty when it
    matches). Counters are compared when `counters` is given."""
    if expect is None:
        return []
    problems: list[str] = []
    if expect.result is not None and result.reason != expect.result:
        problems.append(f"expected result {expect.result!r}, got {str(result.reason)!r}"
                        + (f" ({result.message})" if result.message else ""))
    if expect.exit_code is not None and result.exit_code != expect.exit_code:
        problems.append(f"expected exit code {expect.exit_code}, got {result.exit_code}")
    if expect.console is not None and expect.console not in result.console:
        problems.append(f"expected the console to contain {shown(expect.console)}, "
                        f"got {shown(result.console)}")
    if expect.message is not None and expect.message not in result.message:
        problems.append(f"expected the message to contain {shown(expect.message)}, "
                        f"got {shown(result.message)}")
    for name, value in expect.counters.items() if counters is not None else ():
        got = counters.get(name, 0)
        if got != value:
            problems.append(f"expected counter {name!r} {value}, got {got}")
    return problems


def shown(text: str) -> str:
    """`text` quoted for a one-line message, cut when it is long."""
    quoted = repr(text)
    return quoted if len(quoted) <= 60 else f"{quoted[:40]}... ({len(text)} characters)"


def preflight(config: Config) -> None:
    """The checks of what the host must give (RAM windows that fit together, guest RAM the
    host can reserve, a console file that can be created) that `build_machine` does before
    it creates the VM and `check_config` does instead of creating it."""
    _check_ram_windows(config)
    _check_reservation(config)
    _check_console_file(config)


def _check_ram_windows(config: Config) -> None:
    """RAM windows overlap neither machine.memory nor each other."""
    from ..platform import RamWindowError, check_ram_windows
    try:
        check_ram_windows(config.machine.memory, config.platform.ram_windows)
    except RamWindowError as exc:
        window = config.platform.ram_windows[exc.index]
        raise ConfigError(str(exc), window.where or str(config.path),
                          f"platform.ram_windows[{exc.index}]") from None


def _check_reservation(config: Config) -> None:
    """The host can map all of guest RAM: machine.memory, then with each RAM window added."""
    from ..memory import GuestMemoryError, check_reservable
    total = config.machine.memory
    steps = [(total, config.machine.memory_loc.where or str(config.path), "machine.memory")]
    for index, window in enumerate(config.platform.ram_windows):
        total += window.size
        steps.append((total, window.where or str(config.path), f"platform.ram_windows[{index}]"))
    for size, where, key in steps:
        try:
            check_reservable(size)
        except GuestMemoryError as exc:
            raise ConfigError(str(exc), where, key) from None


def _check_console_file(config: Config) -> None:
    """With `devices.serial.output: file`, the file's folder exists and the path is no folder."""
    serial = config.devices.serial
    if serial.output != "file" or serial.path is None:
        return
    path = Path(serial.path)
    problem = f"the console file's folder {path.parent} does not exist" if not path.parent.is_dir() \
        else f"the console file {path} is a folder" if path.is_dir() else None
    if problem:
        raise ConfigError(f"cannot open the console file: {problem}", str(config.path),
                          "devices.serial.path")


def _check_entry(config: Config, entry: int | None) -> None:
    """There is an entry point, and it is in guest RAM (machine.memory or a RAM window)."""
    where = config.machine.entry_loc.where or str(config.path)
    if entry is None:
        raise ConfigError("no entry point: give machine.entry", where, "machine.entry")
    ram = [(0, config.machine.memory)] + [(w.start, w.start + w.size) for w in config.platform.ram_windows]
    if not any(start <= entry < end for start, end in ram):
        raise ConfigError(f"the entry point {entry:#x} is outside guest RAM "
                          f"(machine.memory is {config.machine.memory:#x} bytes at 0)", where, "machine.entry")


def check_config(config: Config) -> dict[str, int]:
    """Everything `build_machine` checks that needs no VM: the host checks (`preflight`),
    load (assemble, compile) the images, check they fit, do not overlap and leave room for
    the system area, resolve every symbol the config uses. Returns the symbols."""
    preflight(config)
    if any(image.type == "linux" for image in config.images):
        from ..linux.config import check_linux_config
        return check_linux_config(config)
    builder = _Builder(config, None)
    entry = builder.images()
    builder.system_area()
    mc = config.machine
    _check_entry(config, builder.resolve(mc.entry, entry))
    builder.resolve(mc.stack)
    for value in mc.registers.values():
        builder.resolve(value)
    for rule in [*config.devices.mmio, *config.ept.protect, *config.ept.monitors]:
        builder.end(builder.resolve(rule.start), rule.end, rule.size)
    for hook in config.ept.hooks:
        builder.resolve(hook.address)
    for spec, loc in config.handlers:
        resolve_handler(spec, config.base_dir, loc)
    with _host_model() as model:
        if model is not None:
            check_vmcs(config, model)
    return builder.symbols


class _host_model:
    """The host's capability model for `check` (None where KVM cannot be opened: the run fails
    there anyway)."""

    def __enter__(self) -> "HostModel | None":
        from ..capabilities import host_model
        from ..kvm import Kvm, KvmError
        try:
            self.kvm = Kvm()
        except KvmError:
            self.kvm = None
            return None
        return host_model(self.kvm)

    def __exit__(self, *exc) -> None:
        if self.kvm is not None:
            self.kvm.close()


def check_vmcs(config: Config, model: "HostModel") -> None:
    """The one validation of the config's VMCS rules against this host's capability model, done by
    `check` and by the build of every run before anything is applied: controls the capability
    MSRs refuse, exception-bitmap bits and exception rules the mode cannot intercept, and rules
    that could never take effect. Raises the ConfigError (`file:line: key: why`)."""
    from ..vmcs import check_control_change, default_controls
    from ..capabilities import with_in_kernel_irqchip
    vmcs = config.vmcs
    mode = Mode(config.machine.mode)
    capabilities = model.msrs
    if config.platform.irqchip or config.machine.vcpus > 1:
        capabilities = with_in_kernel_irqchip(capabilities)
    controls = default_controls(capabilities)
    for setting in vmcs.controls:
        try:
            check_control_change(controls, setting.flag, setting.enabled, capabilities)
        except UnsupportedControlError as exc:
            raise setting.loc.error(f"this host cannot honour {setting.name}: {exc}") from None
        if setting.flag == VmEntryControls.VM_ENTRY_IA32E_MODE_GUEST and \
                setting.enabled != (mode in (Mode.LONG, Mode.USER)):
            raise setting.loc.error(f"{setting.name} is EFER.LMA of the guest: {mode.value} mode "
                                    f"{'is not' if setting.enabled else 'is'} IA-32e mode, and minivmm "
                                    "does not switch modes at VM entry (set machine.mode)")
    locs = vmcs.exception_bitmap_locs or [vmcs.loc] * len(vmcs.exception_bitmap)
    for vector, loc in zip(vmcs.exception_bitmap, locs):
        _check_vector(model, mode, vector, loc)
    for rule in vmcs.msrs:
        if mode is Mode.USER and rule.action != "allow":
            raise rule.loc.error("an MSR rule cannot take effect in user mode: the guest runs at CPL 3, "
                                 "where RDMSR and WRMSR raise #GP before any MSR exit (SDM vol. 2 "
                                 "RDMSR/WRMSR); MSR rules apply to real, protected and long mode")
    for rule in vmcs.exceptions:
        _check_vector(model, mode, rule.vector, rule.loc)
        if rule.action == "inject" and mode is Mode.USER:
            raise rule.loc.error("'inject' cannot work in user mode: the guest's IDT is minivmm's "
                                 "built-in kernel, which reports the exception again")


def _check_vector(model: "HostModel", mode: Mode, vector: int, loc: Loc) -> None:
    if vector > 31:
        raise loc.error(f"vector {vector:#x} is not an exception: the exception bitmap has bits for "
                        "vectors 0-31 only (SDM 25.6.3)")
    if vector not in model.vectors(mode):
        raise loc.error(model.refusal(mode, 1 << vector))


class _Builder:
    """Applies a validated Config to a fresh machine (or, with machine None, only checks it)."""

    def __init__(self, config: Config, machine: ConfiguredMachine | None) -> None:
        self.config = config
        self.machine = machine
        self.symbols: dict[str, int] = {}
        self.placed: list[ImageRange] = []
        self.owners: dict[str, ImageConfig] = {}
        # A multiboot kernel loads its own GDT (Multiboot 0.6.96 section 3.2): no system area.
        self.system_tables = not any(image.type == "multiboot" for image in config.images)

    def resolve(self, value: Address | None, default: int | None = None) -> int | None:
        if value is None:
            return default
        if isinstance(value, int):
            return value
        if value.name in self.symbols:
            return self.symbols[value.name]
        known = sorted(self.symbols)
        close = close_matches(value.name, known, 1, 0.6)
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
            from ..platform import install_platform
            try:
                install_platform(machine, config.platform)
            except (ValueError, OSError) as exc:
                raise ConfigError(str(exc), str(config.path), "platform") from None
        mc = config.machine
        machine.entry = self.resolve(mc.entry, entry)
        machine.stack = self.resolve(mc.stack)
        machine.system_tables = self.system_tables
        self.system_area()
        _check_entry(config, machine.entry)
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
        from .. import loaders
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
                self.place(image, address, data, loaded.zero_fill.get(address, 0))
            self.symbols.update(loaded.symbols)
            if machine is not None:
                machine.symbols.update(loaded.symbols)
            image_entry = self.resolve(image.entry, loaded.entry)
            if entry is None and image_entry is not None:
                entry = image_entry
            self.initial_registers.update(loaded.registers)
        return entry

    def place(self, image: ImageConfig, address: int, data: bytes, bss: int = 0) -> None:
        """Record (and with a machine, write) one segment of `image`; a ConfigError when it
        overlaps a segment of an image placed before."""
        from ..loaders import ImageOverlapError, check_no_overlap
        if not data:
            return
        name = f"{image.loc.key or 'image'} ({image.path.name if image.path else image.type})"
        placed = ImageRange(address, address + len(data), name, bss)
        try:
            check_no_overlap(self.placed, placed)
        except ImageOverlapError as exc:
            raise image.loc.error(str(exc)) from None
        self.placed.append(placed)
        self.owners[name] = image
        if self.machine is not None:
            self.machine.place(address, data, name, bss=bss)

    def system_area(self) -> None:
        """Check that the mode's system area has a place where no image is (the place
        `Machine.setup` will choose); a ConfigError naming the image and the structure."""
        mc = self.config.machine
        mode = Mode(mc.mode)
        if mode is Mode.REAL or not self.system_tables:
            return
        ram = [(0, mc.memory)] + [(w.start, w.start + w.size) for w in self.config.platform.ram_windows]
        stack = self.resolve(mc.stack)
        try:
            choose_system_base(mode, self.placed, ram, default_stack(mode, mc.memory) if stack is None else stack)
        except SystemAreaError as exc:
            owner = self.owners.get(exc.image.name) if exc.image is not None else None
            if owner is not None:
                raise owner.loc.error(str(exc)) from None
            raise ConfigError(str(exc), str(self.config.path), "machine.memory") from None

    def load_image(self, image: ImageConfig, loaders: ModuleType) -> LoadedImage:
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
            data = self.assemble_multiboot(image, loaders, DEFAULT_LOAD_ADDRESS[mode])
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

    @staticmethod
    def assemble_multiboot(image: ImageConfig, loaders: ModuleType, default_address: int) -> bytes:
        """Assemble a multiboot kernel source, linked where it loads: at `default_address`, or
        again at its header's load_addr when it has the address fields (flags bit 16,
        Multiboot 0.6.96 section 3.1.3) and they name another address, so that its symbols
        are its physical addresses."""
        data = loaders.load_asm(image.path, code_bits=32, load_address=default_address,
                                defines=image.defines).segments[0][1]
        try:
            header = loaders.parse_multiboot_header(data)
        except loaders.LoaderError:
            return data                     # load_multiboot reports it
        if header.flags & loaders.MULTIBOOT_AOUT_KLUDGE and header.load_addr != default_address:
            data = loaders.load_asm(image.path, code_bits=32, load_address=header.load_addr,
                                    defines=image.defines).segments[0][1]
        return data

    # -- devices ------------------------------------------------------------------------
    def devices(self) -> None:
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

    def unplug(self, device: PortDevice) -> None:
        self.machine.remove_device(device)

    def plug(self, device: PortDevice, key: str) -> None:
        try:
            self.machine.add_device(device)
        except ValueError as exc:
            raise ConfigError(str(exc), str(self.config.path), key) from None

    def hypercalls(self) -> None:
        machine, hyper = self.machine, self.config.devices.hypercall
        for rule in hyper.calls:
            machine.on(ExitReason.EXECUTE_VMCALL, rules.hypercall_handler(machine, rule), number=rule.number)
        if hyper.port != HYPERCALL_PORT:
            machine.set_hypercall_port(hyper.port)

    def mmio(self) -> None:
        machine = self.machine
        for rule in self.config.devices.mmio:
            start = self.resolve(rule.start)
            end = self.end(start, rule.end, rule.size)
            machine.on(ExitReason.EPT_MISCONFIGURATION, rules.mmio_handler(machine, rule),
                       address=(start, end))

    # -- VMCS ----------------------------------------------------------------------------
    def vmcs_model(self, key: str, loc: Loc) -> Vmcs:
        try:
            return self.machine.vmcs
        except AttributeError:
            raise loc.error(f"{key} needs the VMCS model (machine.vmcs), which this minivmm build lacks") \
                from None

    def vmcs(self) -> None:
        config, machine = self.config.vmcs, self.machine
        if config.controls or config.exception_bitmap or config.msrs or config.io:
            vmcs = self.vmcs_model("vmcs", config.loc)
        check_vmcs(self.config, machine.vm.vmx.model)
        for setting in config.controls:
            try:
                vmcs.set_control(setting.flag, enabled=setting.enabled)
            except UnsupportedControlError as exc:
                raise setting.loc.error(f"this host cannot honour {setting.name}: {exc}") from None
        for vector in config.exception_bitmap:
            vmcs.intercept_exception(vector)
        for rule in config.exceptions:
            machine.on(ExitReason.EXCEPTION_OR_NMI, rules.exception_handler(machine, rule),
                       vector=rule.vector)
        for rule in config.msrs:
            if rule.action == "allow":
                continue
            handler = rules.msr_handler(machine, rule)
            if rule.read:
                machine.on(ExitReason.EXECUTE_RDMSR, handler, msr=rule.msr)
            if rule.write:
                machine.on(ExitReason.EXECUTE_WRMSR, handler, msr=rule.msr)
        for rule in config.io:
            machine.on(ExitReason.IO_INSTRUCTION, rules.io_handler(machine, rule),
                       port=(rule.start, rule.end))
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
                ept.monitor(start, end, rule.access, rules.monitor_callback(machine, rule))
            except ValueError as exc:
                raise rule.loc.error(str(exc)) from None
        for rule in config.hooks:
            address = self.resolve(rule.address)
            try:
                ept.hook_execute(address, rules.hook_callback(machine, rule, address), hidden=rule.hidden)
            except ValueError as exc:
                raise rule.loc.error(str(exc)) from None

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
