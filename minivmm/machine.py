"""`Machine`: guest memory, one vCPU, devices and exit dispatch; the public API.

    from minivmm import Machine
    with Machine(mode="long") as m:
        m.load_asm("guests/hello_long.S")
        result = m.run(timeout=5)
        print(result.reason, result.exit_code, result.console)
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import asm
from .actions import Action, Inject, Resume, Stop
from .devices import DebugExit, PortDevice, Serial16550
from .exits import (EXCEPTIONS_WITH_ERROR_CODE, ExitInfo, ExitReason, InterruptionInfo,
                    InterruptionType, IoQualification, Vector, vector_name)
from .handlers import Dispatcher, Registration, install_defaults
from .cpuid import CpuidLeaf, CpuidTable
from .vmcs import Vmcs
from .vmcs_fields import VmcsField
from .kvm import (ExitKind, InternalErrorKind, IoExit, Kvm, KvmError, KvmRun,
                  decode_exit)
from .disasm import disassemble
from . import fastpath
from .fastpath import IO_TAG, LOOP_ERROR, LOOP_STATE, LOOP_YIELD, unpack_io
from .memory import GuestMemory, Region, parse_size
from .modes import (CODE_BITS, DEFAULT_LOAD_ADDRESS, EXCEPTION_PORT,
                    HYPERCALL_PORT, SEL_USER_CODE64, SEL_USER_DATA, STUBS_ADDR, STUB_SIZE, Mode,
                    read_exception_frame, setup_mode)
from .vcpu import Vcpu, run_timer

REAL_MODE_TSS_ADDR = 0xFFFBD000


@dataclass
class ExitStat:
    """Exits of one basic reason: how many, and the time spent in their handlers."""
    count: int = 0
    handler_seconds: float = 0.0


@dataclass
class ExceptionReport:
    vector: int
    error_code: int | None
    cr2: int | None
    rip: int

    def __str__(self) -> str:
        text = f"{vector_name(self.vector)} (vector {self.vector}) at rip={self.rip:#x}"
        if self.error_code is not None:
            text += f" error_code={self.error_code:#x}"
        if self.cr2 is not None:
            text += f" cr2={self.cr2:#x}"
        return text


@dataclass
class RunResult:
    """How a run ended.

    `reason`: exit (debug-exit port), hlt, timeout, triple_fault, exception,
    error, exit_limit, stopped (a handler's Stop), interrupted (Ctrl-C).
    `exit_code` is the value the guest wrote to the debug-exit port;
    `exit_status` is QEMU's isa-debug-exit status for it, (code << 1) | 1.
    """
    reason: str
    exit_code: int | None = None
    console: str = ""
    exits: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    rip: int = 0
    message: str = ""
    exception: ExceptionReport | None = None
    stats: dict[str, ExitStat] = field(default_factory=dict)
    last_exit: str = ""

    @property
    def exit_status(self) -> int | None:
        return None if self.exit_code is None else (self.exit_code << 1) | 1

    def __str__(self) -> str:
        text = f"{self.reason}"
        if self.exit_code is not None:
            text += f" code={self.exit_code}"
        if self.message:
            text += f": {self.message}"
        return text


class HandlerError(RuntimeError):
    """An exception raised inside an exit handler; the run stopped."""


class Machine:
    """A VM with guest RAM at GPA 0, one vCPU, a serial console and a debug-exit port.

    `vcpus=N` adds application processors (vCPU 1..N-1, one host thread each
    while running; see `minivmm.smp`); it needs, and turns on, `irqchip`: KVM's
    in-kernel LAPIC/IOAPIC/PIC, created before the vCPUs. With the irqchip, HLT
    is handled in the kernel and no longer exits.
    """

    def __init__(self, memory: int | str = "2M", mode: Mode | str = Mode.LONG, *,
                 kvm_path: str | None = None,
                 console: Callable[[bytes], object] | None = None,
                 vcpus: int = 1, irqchip: bool = False) -> None:
        self.mode = Mode(mode)
        self.kvm = Kvm(kvm_path)
        self.vm = None
        self.memory = GuestMemory()
        self.vcpu: Vcpu | None = None
        self.vcpus: list[Vcpu] = []
        self.irqchip = irqchip or vcpus > 1
        self._smp = None
        self.smp = None           # the `minivmm.smp.SmpRunner` (per-vCPU state) when vcpus > 1
        try:
            self.vm = self.kvm.create_vm()
            try:
                self.vm.set_tss_addr(REAL_MODE_TSS_ADDR)
            except KvmError:
                pass
            self._slots: dict[Region, int] = {}
            self.add_ram(0, parse_size(memory))
            if self.irqchip:
                self.vm.create_irqchip()          # before any vCPU (api.rst 4.24)
            self.vcpu = Vcpu(self.kvm, self.vm, 0)
            self.vcpus.append(self.vcpu)
            for index in range(1, vcpus):
                self.vcpus.append(Vcpu(self.kvm, self.vm, index))
        except BaseException:
            self.close()
            raise
        self.serial = Serial16550(sink=console)
        self.debug_exit = DebugExit()
        self.devices: list[PortDevice] = []
        self.port_devices: dict[int, PortDevice] = {}
        self._io_routes: dict[int, tuple] = {}
        for device in (self.serial, self.debug_exit):
            self.add_device(device)
        self.dispatcher = Dispatcher()
        self.info = ExitInfo()
        self.stats: dict[int, ExitStat] = {}
        self.entry: int | None = None
        self.stack: int | None = None
        self.symbols: dict[str, int] = {}
        self._started = False
        self._last_exception: ExceptionReport | None = None
        self._ept = None
        self.pre_entry: list[Callable[[], None]] = []
        self.observers: list[Callable[[Vcpu, ExitInfo], None]] = []
        self._io_loop: fastpath.IoLoop | None = None
        self._step_callbacks: list[Callable[[Vcpu], None]] = []
        self._run_mmap = self.vcpu.fd.run_mmap
        self.vmcs = Vmcs(self)
        self.cpuid = CpuidTable(self.kvm.get_supported_cpuid())
        install_defaults(self)
        if vcpus > 1:
            from .smp import SmpRunner
            self._smp = SmpRunner(self)

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Release the vCPU, VM and KVM fds and every guest memory mapping."""
        self._io_loop = None
        if getattr(self, "_ept", None) is not None:
            self._ept.close()
        for ap in getattr(self, "vcpus", [])[1:]:
            ap.close()
        self.vcpus = []
        if self.vcpu is not None:
            self.vcpu.close()
            self.vcpu = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        self.memory.close()
        self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- memory and devices ---------------------------------------------------------
    def add_ram(self, gpa: int, size: int | str, *, name: str = "ram") -> Region:
        region = self.memory.add_region(gpa, parse_size(size), name=name)
        slot = len(self._slots)
        self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr, 0)
        self._slots[region] = slot
        if getattr(self, "_ept", None) is not None:
            self._ept.before_next_entry()           # the EPT takes the new region over
        return region

    def add_device(self, device: PortDevice) -> None:
        for port in device.ports:
            if port in self.port_devices:
                raise ValueError(f"port {port:#x} of {type(device).__name__} is taken by "
                                 f"{type(self.port_devices[port]).__name__}")
        for port in device.ports:
            self.port_devices[port] = device
        self.devices.append(device)
        self.invalidate_io_routes()

    def remove_device(self, device: PortDevice) -> None:
        for port in device.ports:
            if self.port_devices.get(port) is device:
                del self.port_devices[port]
        if device in self.devices:
            self.devices.remove(device)
        self.invalidate_io_routes()

    def irq_line(self, irq: int, level: int | bool) -> None:
        """Drive ISA IRQ / IOAPIC GSI line `irq` (KVM_IRQ_LINE; needs `irqchip`)."""
        if not self.irqchip:
            raise RuntimeError("irq_line needs the in-kernel irqchip: Machine(irqchip=True) "
                               "or platform.irqchip: true")
        self.vm.irq_line(irq, int(bool(level)))

    # -- images ---------------------------------------------------------------------
    def load(self, data: bytes, address: int | None = None, *, entry: int | None = None) -> None:
        """Copy a flat image into guest RAM; the entry defaults to its first byte."""
        address = DEFAULT_LOAD_ADDRESS[self.mode] if address is None else address
        self.memory.write(address, data)
        if entry is not None or self.entry is None:
            self.entry = address if entry is None else entry

    def load_image(self, image: asm.GuestImage) -> None:
        self.memory.write(image.load_address, image.data)
        self.entry = image.entry
        self.symbols.update(image.symbols)

    def load_asm(self, source: str | os.PathLike, *, load_address: int | None = None,
                 **kwargs) -> asm.GuestImage:
        """Assemble a guest (a .S path or inline text) for this machine's mode and load it."""
        include = tuple(kwargs.pop("include_dirs", ())) + (str(Path(__file__).parent / "guest_include"),)
        image = asm.assemble(source, code_bits=CODE_BITS[self.mode],
                             load_address=DEFAULT_LOAD_ADDRESS[self.mode] if load_address is None
                             else load_address, include_dirs=include,
                             prelude='.include "minivmm.inc"', **kwargs)
        self.load_image(image)
        return image

    def read_code(self, rip: int, length: int) -> bytes:
        """Guest code bytes at CS:rip (empty when unmapped); identity paging assumed when no walker applies."""
        linear = self.vcpu.segment("cs").base + rip if self.mode is Mode.REAL else rip
        try:
            return self.read_virtual(linear, length) if hasattr(self, "read_virtual") else \
                self.memory.read(linear, length)
        except Exception:
            return b""

    def symbol(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"no symbol {name!r} in the loaded images") from None

    def default_stack(self) -> int:
        if self.mode is Mode.REAL:
            return DEFAULT_LOAD_ADDRESS[Mode.REAL]
        low = self.memory.region_at(0)
        return min(low.end, 1 << 32) - 16 if self.mode is Mode.USER else min(low.end, 1 << 32)

    def setup(self) -> None:
        """Put the vCPU into the machine's mode at the entry point (done by the first run)."""
        if self.entry is None:
            raise ValueError("nothing loaded: call load(), load_image() or load_asm() first")
        stack = self.default_stack() if self.stack is None else self.stack
        setup_mode(self.vcpu, self.memory, self.mode, self.entry, stack)
        self.apply_cpuid()
        self._started = True

    def apply_cpuid(self) -> None:
        """Give KVM the CPUID table (overrides and EXECUTE_CPUID handlers); before the first run only."""
        def consult(leaf: CpuidLeaf) -> None:
            info = ExitInfo().reset(ExitReason.EXECUTE_CPUID, instruction_length=2, detail=leaf)
            try:
                self.dispatcher.dispatch(self.vcpu, info, leaf.leaf)
            except Exception as exc:
                raise HandlerError(f"EXECUTE_CPUID handler raised {type(exc).__name__}: {exc} "
                                   f"(leaf {leaf.leaf:#x} subleaf {leaf.subleaf:#x})") from exc
        try:
            entries = self.cpuid.build(consult)
            self.vcpu.fd.set_cpuid2(entries)
            if len(self.vcpus) > 1:
                from .smp import cpuid_for_vcpu
                for ap in self.vcpus[1:]:
                    ap.fd.set_cpuid2(cpuid_for_vcpu(entries, ap.index))
        except KvmError as exc:
            raise KvmError("KVM_SET_CPUID2", exc.errno, "KVM accepts CPUID changes only before the "
                                                       "vCPU first runs") from None
        self.cpuid.dirty = False

    @property
    def ept(self):
        """The EPT model of this machine (`minivmm.ept_shadow.EptShadow`), created on first use."""
        if self._ept is None:
            from .ept import EptShadow
            self._ept = EptShadow(self)
        return self._ept

    def read_virtual(self, gva: int, size: int) -> bytes:
        """Read guest-virtual memory through the guest's page tables (`minivmm.pagewalk`)."""
        from .pagewalk import read_virtual
        return read_virtual(self.memory, self.vcpu, gva, size)

    def write_virtual(self, gva: int, data: bytes) -> None:
        """Write guest-virtual memory through the guest's page tables (`minivmm.pagewalk`)."""
        from .pagewalk import write_virtual
        write_virtual(self.memory, self.vcpu, gva, data)

    def step_once(self, callback: Callable[[Vcpu], None]) -> None:
        """Run `callback(vcpu)` right after the guest's next instruction (one MTF step)."""
        self._step_callbacks.append(callback)
        self.vmcs.mark_dirty()

    # -- handlers -------------------------------------------------------------------
    def on(self, reason: ExitReason, handler: Callable | None = None, **filters):
        """Register `handler(vcpu, info) -> Action | None` for `reason`.

        Usable as a decorator: `@machine.on(ExitReason.IO_INSTRUCTION, port=0x3f8)`.
        Filters: port, msr, vector, address, number, leaf (an int, a range or
        a (start, end) tuple). Returns the registration, for `off()`.
        """
        if handler is None:
            def decorate(fn: Callable) -> Callable:
                self.on(reason, fn, **filters)
                return fn
            return decorate
        registration = self.dispatcher.on(reason, handler, **filters)
        self._intercept(registration)
        self.invalidate_io_routes()
        return registration

    def off(self, registration: Registration) -> None:
        self.dispatcher.off(registration)
        self.invalidate_io_routes()

    def _intercept(self, reg: Registration) -> None:
        """Set the bitmap bits a filtered handler needs, as a hypervisor does when it installs one."""
        vmcs = self.vmcs
        full = reg.low == 0 and reg.high == (1 << 64) - 1
        if reg.reason == ExitReason.IO_INSTRUCTION:
            for port in range(reg.low, min(reg.high, 0xFFFF) + 1):
                bitmap, bit = vmcs.io_bitmap._bitmap(port)
                bitmap[bit // 8] |= 1 << (bit % 8)
            vmcs.io_bitmap.version += 1
        elif reg.reason in (ExitReason.EXECUTE_RDMSR, ExitReason.EXECUTE_WRMSR) and not full:
            for msr in range(reg.low, reg.high + 1):
                vmcs.msr_bitmap.intercept(msr, read=reg.reason == ExitReason.EXECUTE_RDMSR,
                                          write=reg.reason == ExitReason.EXECUTE_WRMSR)
        elif reg.reason == ExitReason.EXCEPTION_OR_NMI:
            mask = 0xFFFFFFFF if full else sum(1 << v for v in range(reg.low, min(reg.high, 31) + 1))
            vmcs.write(VmcsField.VMCS_CTRL_EXCEPTION_BITMAP, vmcs.exception_bitmap | mask)
        elif reg.reason == ExitReason.EXECUTE_CPUID:
            self.cpuid.dirty = True

    def invalidate_io_routes(self) -> None:
        self._io_routes.clear()

    def _io_route(self, port: int, is_out: bool) -> tuple:
        """The handlers an access to `port` goes through: the user's when the I/O bitmap (or
        unconditional I/O exiting) selects the port, then the default, which is left out for
        writes to a port no device claims when it would drop them anyway. Cached in
        `_io_routes` under `port << 1 | is_out`."""
        key = port << 1 | is_out
        route = self._io_routes.get(key)
        if route is None:
            chain = self.dispatcher.chain(ExitReason.IO_INSTRUCTION, port)
            if not self.vmcs.io_reaches_handlers(port):
                chain = chain[-1:]
            if (is_out and chain and port not in self.port_devices
                    and getattr(chain[-1], "drops_unclaimed_writes", False)):
                chain = chain[:-1]
            route = self._io_routes[key] = chain
        return route

    def _io_fast_route(self, high: int) -> tuple[int, IoExit, tuple] | None:
        """(qualification, detail, handlers) of the single-item I/O exits whose packed form
        (`minivmm.fastpath`) has upper half `high`, cached in `_io_routes` under `high`
        (above 2**24, clear of the `_io_route` keys). None for the exits the general path
        takes: multi-item (REP) accesses and the built-in kernel's ports."""
        port, size, is_out, multi, _ = unpack_io(high << 32)
        if multi or _RESERVED_PORTS_LOW <= port <= _RESERVED_PORTS_HIGH:
            return None
        data_offset = _unpack_io(self._run_mmap, _IO_EXIT_OFFSET)[4]
        route = self._io_routes[high] = (_io_qualification(port, size, is_out, 1),
                                         IoExit(port, size, is_out, 1, data_offset),
                                         self._io_route(port, is_out))
        return route

    @property
    def last_exception(self) -> ExceptionReport | None:
        """The exception of the last EXCEPTION_OR_NMI exit."""
        return self._last_exception

    # -- running --------------------------------------------------------------------
    def run(self, timeout: float | None = None, max_exits: int | None = None) -> RunResult:
        """Run until the guest reports an exit code, halts, faults, or hits a limit.

        `timeout` is a wall-clock deadline in seconds (VMX-preemption-timer
        exit when reached); `max_exits` bounds the number of exits.
        With more than one vCPU each runs in its own thread (`minivmm.smp`).
        """
        if self._smp is not None:
            return self._smp.run(timeout, max_exits)
        counts, seconds = [0] * 80, [0.0] * 80
        start = time.perf_counter()
        action: Stop | None = None
        try:
            action = self.run_raw(timeout, max_exits, counts, seconds)
        except KeyboardInterrupt:
            action = Stop("interrupted", message="interrupted by the user (SIGINT)")
            raise
        finally:
            self.last_result = self._result(action, counts, seconds, time.perf_counter() - start)
        return self.last_result

    def run_raw(self, timeout: float | None = None, max_exits: int | None = None,
                counts: list[int] | None = None, seconds: list[float] | None = None) -> Stop:
        """The exit loop of `run` without building a RunResult; returns the Stop that ended it.

        For harnesses that run a guest thousands of times a second. `counts`
        and `seconds`, lists of 80 indexed by basic exit reason, collect the
        number of exits and the time spent in their handlers. Past the first
        64 I/O exits counted in `counts`, one in 16 is timed and the time scaled
        up: two clock reads per exit cost about 2 us here, more than many handlers.

        Single-item port I/O takes a fast path: after the first exit to a port
        its qualification, detail and handler chain come from one dict lookup,
        and further such exits are handled by `fastpath.IoLoop` in C until an
        exit, action or state change needs this loop.
        """
        if not self._started:
            self.setup()
        if self.cpuid.dirty:
            self.apply_cpuid()
        if counts is None:
            counts = [0] * 80
        if seconds is None:
            seconds = [0.0] * 80
        io_samples, io_timed, io_first = 0, 0.0, counts[_IO_INSTRUCTION]
        clock = time.perf_counter
        vcpu = self.vcpu
        fd = vcpu.fd
        run = fd.run
        info = self.info
        vmcs = self.vmcs
        io_routes = self._io_routes
        pre_entry = self.pre_entry
        observers = self.observers
        enter = vcpu.enter
        run_packed, run_arg, vcpu_fd, synced = vcpu._run_packed, vcpu._run_arg, fd.fd, vcpu.synced
        io_loop = None            # the C loop, fetched at the first exit it can take
        c_loop = synced and fastpath.COMPILED
        n = io_first              # counts[IO] plus the fast-path I/O exits of this run
        io_ready = False          # info holds a fast-path I/O exit: only three fields change
        io_tag = IO_TAG
        action: Action | None = None
        self.debug_exit.reset()
        self._last_exception = None
        self._step_rip = vcpu.rip
        limit = max_exits if max_exits is not None else -1
        if timeout is not None:
            run_timer.arm(vcpu, timeout)
        try:
            while True:
                if limit == 0:
                    action = Stop("exit_limit", message=f"exit limit {max_exits} reached")
                    break
                limit -= 1
                if pre_entry:
                    for hook in tuple(pre_entry):          # a hook may remove itself
                        hook()
                if vmcs.dirty:
                    vmcs.realise()
                if vcpu._dirty or not synced:
                    kind = enter()
                elif io_ready and c_loop and not pre_entry and not observers:
                    if io_loop is None:
                        io_loop = self._c_io_loop(info, vcpu, vmcs)
                    kind, n, limit = io_loop.enter(vcpu_fd, run_arg, n, limit)
                    if kind == LOOP_YIELD:
                        status = io_loop.status
                        if status == LOOP_STATE:
                            continue
                        outcome = io_loop.out.pop()
                        if status == LOOP_ERROR:
                            raise _handler_error(vcpu, outcome)
                        io_ready = outcome.__class__ is Resume and outcome.advance   # info stays as is
                        if self._finish_io(vcpu, info, outcome):
                            action = outcome
                            break
                        continue
                    if kind < 0:
                        kind = vcpu._entry_failed(-kind)
                else:                                       # vcpu.enter(), inlined
                    kind = run_packed(vcpu_fd, run_arg)
                    if kind < 0:
                        kind = vcpu._entry_failed(-kind)
                if kind >= io_tag:
                    route = io_routes.get(kind >> 32) or self._io_fast_route(kind >> 32)
                    if route is not None:
                        n += 1
                        qualification, detail, chain = route
                        if io_ready:
                            info.qualification, info.detail, info.data = qualification, detail, \
                                kind & 0xFFFFFFFF
                        else:
                            info.reset_io(qualification, detail, kind & 0xFFFFFFFF)
                            io_ready = True
                        if observers:
                            for observer in observers:
                                observer(vcpu, info)
                        action = None
                        timed = n < 64 or not n & 15             # see the docstring
                        if timed:
                            began = clock()
                        try:
                            for handler in chain:
                                action = handler(vcpu, info)
                                if action is not None:
                                    break
                        except Exception as exc:
                            raise _handler_error(vcpu, exc)
                        if timed:
                            io_timed += clock() - began
                            io_samples += 1
                        if action is None:
                            continue
                        io_ready = action.__class__ is Resume and action.advance   # info stays as is
                        if self._finish_io(vcpu, info, action):
                            break
                        continue
                    kind = _EXIT_IO
                io_ready = False
                exit_info, key = self._translate(kind, run)
                if exit_info is None:
                    continue
                if observers:
                    for observer in observers:
                        observer(vcpu, exit_info)
                reason = exit_info.reason
                counts[reason] += 1
                began = clock()
                if reason == ExitReason.IO_INSTRUCTION:
                    action = self._dispatch_io(vcpu, exit_info, key)
                elif reason == ExitReason.EXCEPTION_OR_NMI and not vmcs.exception_reaches_handlers(key):
                    action = self.dispatcher.chain(reason, key)[-1](vcpu, exit_info)
                else:
                    action = self._dispatch(vcpu, exit_info, key)
                seconds[reason] += clock() - began
                if kind == ExitKind.X86_RDMSR or kind == ExitKind.X86_WRMSR:
                    action = self._complete_msr(vcpu, exit_info, action)
                if action is None:
                    action = Resume()
                if self._apply(vcpu, exit_info, action):
                    break
        finally:
            run = run_arg = None    # no kvm_run views kept alive by a traceback
            if timeout is not None:
                run_timer.disarm()
            if io_loop is not None:
                c_seconds, c_samples = io_loop.take_stats()
                io_timed += c_seconds
                io_samples += c_samples
            counts[_IO_INSTRUCTION] += n - io_first
            if io_samples:
                seconds[_IO_INSTRUCTION] += io_timed * (n - io_first) / io_samples
        return action

    def _c_io_loop(self, info: ExitInfo, vcpu: Vcpu, vmcs: Vmcs) -> fastpath.IoLoop:
        """The C exit loop over these objects (one per vCPU, kept while they stay the same)."""
        objects = (self._io_routes, info, vcpu, vmcs, self.pre_entry, self.observers)
        loop = self._io_loop
        if loop is None or not loop.serves(*objects):
            loop = self._io_loop = fastpath.IoLoop(*objects)
        return loop

    def _finish_io(self, vcpu: Vcpu, info: ExitInfo, action: Action) -> bool:
        """Carry out a handler's action on an I/O exit; True when the run ends."""
        if not info.detail.is_out:
            self._complete_in(info)
        if action.__class__ is Resume and action.advance:
            return False
        return self._apply(vcpu, info, action)

    def _dispatch_io(self, vcpu: Vcpu, info: ExitInfo, port: int) -> Action | None:
        try:
            for handler in self._io_route(port, info.detail.is_out):
                action = handler(vcpu, info)
                if action is not None:
                    if not info.detail.is_out:
                        self._complete_in(info)
                    return action
        except Exception as exc:
            raise _handler_error(vcpu, exc)
        return None

    def _io_instruction_start(self, info: ExitInfo) -> int:
        """RIP of the I/O instruction of the current exit.

        KVM reports RIP at the instruction on most hosts, but after it for an
        OUT on some (PVM): find the IN/OUT/INS/OUTS of the exit's direction at
        RIP or ending at RIP.
        """
        rip = self.vcpu.rip
        wanted = _OUT_MNEMONICS if info.detail.is_out else _IN_MNEMONICS
        window = self.read_code(rip - 4, 8) if rip >= 4 else b""
        if len(window) < 8:
            return rip
        bits = self.code_bits()
        for start in (rip, rip - 1, rip - 2, rip - 3, rip - 4):
            insn = disassemble(window[start - (rip - 4):], start, bits, 1)
            if not insn:
                continue
            words = insn[0][2].split()
            mnemonic = words[1] if words[0].startswith("rep") and len(words) > 1 else words[0]
            if mnemonic in wanted and (start == rip or start + len(insn[0][1]) == rip):
                return start
        return rip

    def code_bits(self) -> int:
        """16, 32 or 64: the operand size the CPU decodes guest code with now."""
        cs = self.vcpu.segment("cs")
        if not self.vcpu.cr0 & 1:
            return 16
        return 64 if cs.l else 32 if cs.db else 16

    def _complete_in(self, info: ExitInfo) -> None:
        """A handler answered an IN: its `info.data` goes to every item KVM asks for."""
        exit = info.detail
        value = (info.data & ((1 << (8 * exit.size)) - 1)).to_bytes(exit.size, "little")
        self.vcpu.fd.io_data(exit)[:] = value * exit.count

    @staticmethod
    def _complete_msr(vcpu: Vcpu, info: ExitInfo, action: Action | None) -> Action | None:
        """Give KVM the RDMSR/WRMSR outcome; a #GP becomes KVM's own error reply."""
        if isinstance(action, Inject) and action.vector == Vector.GP:
            vcpu.fd.set_msr_reply(0, error=True)
            return Resume()
        vcpu.fd.set_msr_reply(info.data & (1 << 64) - 1)
        return action

    def _dispatch(self, vcpu: Vcpu, info: ExitInfo, key: int | None) -> Action | None:
        try:
            return self.dispatcher.dispatch(vcpu, info, key)
        except Exception as exc:
            raise HandlerError(f"{info.reason.name} handler raised {type(exc).__name__}: {exc} "
                               f"(guest rip={vcpu.rip:#x})") from exc

    def _result(self, action: Stop | None, counts: list[int], seconds: list[float],
                elapsed: float) -> RunResult:
        if not isinstance(action, Stop):
            action = Stop("error", message="run ended without a result")
        stats = {ExitReason(i).name: ExitStat(n, seconds[i]) for i, n in enumerate(counts) if n}
        for name, stat in stats.items():
            total = self.stats.setdefault(name, ExitStat())
            total.count += stat.count
            total.handler_seconds += stat.handler_seconds
        return RunResult(reason=action.reason, exit_code=action.exit_code,
                         console=self.serial.text, exits={name: s.count for name, s in stats.items()},
                         elapsed_s=elapsed, rip=self.vcpu.rip if self.vcpu else 0, message=action.message,
                         exception=self._last_exception if action.reason == "exception" else None,
                         stats=stats, last_exit=str(self.info))

    def _apply(self, vcpu: Vcpu, info: ExitInfo, action: Action) -> bool:
        """Carry out a handler's action; True when the run ends."""
        if isinstance(action, Stop):
            return True
        if isinstance(action, Inject):
            vcpu.inject_exception(action.vector, action.error_code, action.cr2)
            return False
        if isinstance(action, Resume):
            if action.advance:
                if info.reason in _ADVANCE_BY_LENGTH and info.instruction_length:
                    vcpu.rip += info.instruction_length
            elif info.reason in _COMPLETED_BY_KVM:
                rip = self._io_instruction_start(info) if info.reason == ExitReason.IO_INSTRUCTION \
                    else vcpu.rip
                vcpu.fd.run.immediate_exit = 1
                vcpu.run_once()
                vcpu.rip = rip
            return False
        raise TypeError(f"a handler returned {action!r}; expected Resume, Inject, Stop or None")

    # -- KVM exit -> VMX exit -----------------------------------------------------
    def _translate_io(self, exit) -> ExitInfo:
        data = _UNPACK[exit.size](self._run_mmap, exit.data_offset)[0] if exit.is_out else 0
        return self.info.reset(ExitReason.IO_INSTRUCTION,
                               _io_qualification(exit.port, exit.size, exit.is_out, exit.count),
                               detail=exit, data=data)

    def _translate(self, kind: int, run) -> tuple[ExitInfo | None, int | None]:
        info = self.info
        vcpu = self.vcpu
        if kind == ExitKind.INTR:
            if run_timer.expired:
                return info.reset(ExitReason.VMX_PREEMPTION_TIMER_EXPIRED), None
            return None, None
        exit = decode_exit(run)
        if kind == ExitKind.IO:
            if exit.port == EXCEPTION_PORT and self.mode is Mode.USER and \
                    STUBS_ADDR <= vcpu.rip < STUBS_ADDR + 256 * STUB_SIZE:
                info = self._user_exception(exit)
                vector = info.interruption_info & 0xFF
                if vector == Vector.DB and self.vmcs.mtf:
                    return self._single_step(exit)
                return info, vector
            if exit.port == HYPERCALL_PORT and exit.is_out:
                return info.reset(ExitReason.EXECUTE_VMCALL, detail=exit), vcpu.rax
            return self._translate_io(exit), exit.port
        if kind == ExitKind.HLT:
            return info.reset(ExitReason.EXECUTE_HLT, instruction_length=1, detail=exit), None
        if kind == ExitKind.SHUTDOWN:
            return info.reset(ExitReason.TRIPLE_FAULT, detail=exit), None
        if kind == ExitKind.MMIO:
            if self._ept is not None:
                translated = self._ept.translate_mmio(exit)
                if translated is not None:
                    return translated
            return info.reset(ExitReason.EPT_MISCONFIGURATION, guest_physical_address=exit.phys_addr,
                              detail=exit), exit.phys_addr
        if kind == ExitKind.FAIL_ENTRY:
            return info.reset(ExitReason.INVALID_GUEST_STATE, exit.hardware_entry_failure_reason,
                              entry_failure=True, detail=exit), None
        if kind == ExitKind.INTERNAL_ERROR:
            return self._internal_error(exit)
        if kind == ExitKind.X86_RDMSR or kind == ExitKind.X86_WRMSR:
            reason = ExitReason.EXECUTE_WRMSR if exit.is_write else ExitReason.EXECUTE_RDMSR
            return info.reset(reason, instruction_length=2, detail=exit, msr=exit.index,
                              data=exit.data if exit.is_write else 0), exit.index
        if kind == ExitKind.DEBUG:
            if exit.exception == Vector.DB and (self._step_callbacks or self.vmcs.mtf):
                return self._single_step(exit)
            vector = exit.exception
            self._last_exception = ExceptionReport(vector, None, None, exit.pc)
            itype = InterruptionType.SOFTWARE_EXCEPTION if vector == Vector.BP else \
                InterruptionType.HARDWARE_EXCEPTION
            return info.reset(ExitReason.EXCEPTION_OR_NMI, detail=exit,
                              interruption_info=InterruptionInfo(vector, itype).encode()), vector
        if kind == ExitKind.SYSTEM_EVENT:
            return info.reset(ExitReason.TRIPLE_FAULT, detail=exit), None
        raise KvmError("KVM_RUN", 0, f"unexpected KVM exit {ExitKind(kind).name if kind in ExitKind._value2member_map_ else kind}: {exit}")

    def _single_step(self, exit) -> tuple[ExitInfo | None, None]:
        """One instruction retired under single-step: step_once callbacks, then the MTF exit."""
        vcpu, info = self.vcpu, self.info
        callbacks, self._step_callbacks = self._step_callbacks, []
        if callbacks:
            self.vmcs.mark_dirty()
        for callback in callbacks:
            callback(vcpu)
        if not self.vmcs.mtf:
            return None, None
        previous, self._step_rip = self._step_rip, vcpu.rip
        if previous is not None and self.read_code(previous, 1) == b"\xf4":
            return info.reset(ExitReason.EXECUTE_HLT, instruction_length=1, detail=exit), None
        return info.reset(ExitReason.MONITOR_TRAP_FLAG, detail=exit), None

    def _user_exception(self, exit) -> ExitInfo:
        """An IDT stub of the built-in kernel reported an exception: unwind its frame."""
        vcpu = self.vcpu
        frame = read_exception_frame(self.memory, vcpu.rsp)
        vector = frame["vector"]
        has_error = vector in EXCEPTIONS_WITH_ERROR_CODE
        error_code = frame["error_code"] if has_error else None
        cr2 = vcpu.cr2 if vector == Vector.PF else None
        vcpu.rip, vcpu.rsp, vcpu.rflags = frame["rip"], frame["rsp"], frame["rflags"]
        sregs = vcpu.sregs
        sregs.cs.selector, sregs.cs.dpl, sregs.cs.l, sregs.cs.db = SEL_USER_CODE64, 3, 1, 0
        sregs.ss.selector, sregs.ss.dpl = SEL_USER_DATA, 3
        vcpu.set_sregs(sregs)
        rip = frame["rip"]
        itype = InterruptionType.HARDWARE_EXCEPTION
        length = 0
        if vector in (Vector.BP, Vector.OF):
            itype = InterruptionType.SOFTWARE_EXCEPTION
            rip -= 1           # int3 / into are traps: report the instruction itself
            vcpu.rip = rip
            length = 1
        self._last_exception = ExceptionReport(vector, error_code, cr2, rip)
        return self.info.reset(ExitReason.EXCEPTION_OR_NMI,
                               interruption_info=InterruptionInfo(vector, itype, has_error).encode(),
                               interruption_error_code=error_code or 0,
                               instruction_length=length, detail=exit)

    def _internal_error(self, exit) -> tuple[ExitInfo, int | None]:
        info = self.info
        if self._ept is not None:
            translated = self._ept.translate_fetch_fault(exit)
            if translated is not None:
                return translated
        code = exit.instruction_bytes()
        rip = self.vcpu.rip
        if exit.suberror == InternalErrorKind.EMULATION and code[:1] == b"\xcc":
            self._last_exception = ExceptionReport(Vector.BP, None, None, rip)
            breakpoint = InterruptionInfo(Vector.BP, InterruptionType.SOFTWARE_EXCEPTION)
            return info.reset(ExitReason.EXCEPTION_OR_NMI, instruction_length=1, detail=exit,
                              interruption_info=breakpoint.encode()), int(Vector.BP)
        raise GuestFault(f"KVM could not emulate the instruction at rip={rip:#x} "
                         f"({_describe_code(code, self.mode)}); suberror "
                         f"{InternalErrorKind(exit.suberror).name if exit.suberror in (1, 2, 3, 4) else exit.suberror}")


_EXIT_IO = int(ExitKind.IO)
_IN_MNEMONICS = frozenset({"in", "insb", "insw", "insd"})
_OUT_MNEMONICS = frozenset({"out", "outsb", "outsw", "outsd"})
_unpack_io = struct.Struct("<BBHIQ").unpack_from       # kvm_run.io: direction, size, port, count, data_offset
_IO_EXIT_OFFSET = KvmRun.exit.offset
_UNPACK = {1: struct.Struct("<B").unpack_from, 2: struct.Struct("<H").unpack_from,
           4: struct.Struct("<I").unpack_from}
_IO_INSTRUCTION = int(ExitReason.IO_INSTRUCTION)
_RESERVED_PORTS_LOW, _RESERVED_PORTS_HIGH = sorted((EXCEPTION_PORT, HYPERCALL_PORT))


def _io_qualification(port: int, size: int, is_out: bool, count: int) -> int:
    """SDM 27.2.1 I/O qualification; KVM does not say whether a single-item access was a
    string instruction, so only multi-item (REP) accesses set bits 4-5."""
    return IoQualification(size, not is_out, count > 1, count > 1, True, port).encode()


def _handler_error(vcpu: Vcpu, exc: BaseException | None) -> BaseException:
    """What a raising I/O handler stops the run with: HandlerError for an Exception (chained
    to it); KeyboardInterrupt and other BaseExceptions pass through."""
    if exc is not None and not isinstance(exc, Exception):
        return exc
    error = HandlerError(f"IO_INSTRUCTION handler raised {type(exc).__name__}: {exc} (guest rip={vcpu.rip:#x})")
    error.__cause__ = exc
    return error


class GuestFault(RuntimeError):
    """The host could not go on with the guest (e.g. an emulation failure)."""


_ADVANCE_BY_LENGTH = frozenset({ExitReason.EXCEPTION_OR_NMI, ExitReason.EXECUTE_VMCALL})
_COMPLETED_BY_KVM = frozenset({ExitReason.IO_INSTRUCTION, ExitReason.EXECUTE_RDMSR,
                               ExitReason.EXECUTE_WRMSR, ExitReason.EPT_VIOLATION,
                               ExitReason.EPT_MISCONFIGURATION})


def _describe_code(code: bytes, mode: Mode) -> str:
    if not code:
        return "no instruction bytes reported"
    text = code.hex(" ")
    try:
        from .disasm import disassemble_one
        insn = disassemble_one(code, CODE_BITS[mode])
        if insn:
            text += f": {insn}"
    except ImportError:
        pass
    return text
