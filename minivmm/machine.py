"""`Machine`: guest memory, vCPUs, devices and exit dispatch; the public API.

    from minivmm import Machine
    with Machine(mode="long") as m:
        m.load_asm("guests/hello_long.S")
        result = m.run(timeout=5)
        print(result.reason, result.exit_code, result.console)

A Machine is a facade over a `minivmm.vm.Vm` (what the vCPUs share) and one
`minivmm.runloop.VcpuContext` per vCPU (`m.contexts`; `m.vcpu` is vCPU 0's
`Vcpu`, `m.vcpus` all of them). Attributes that belong to one vCPU (`info`,
`vmcs`, `stats`, `last_exception`) are vCPU 0's here.
"""
from __future__ import annotations

import os
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .actions import Reply, Stop
from .cpuid import CpuidLeaf, CpuidTable
from .devices import DebugExit, PortDevice, Serial16550
from .exits import ExitInfo, ExitReason
from .handlers import install_defaults
from .hooks import Handle, HookKind, HookRegistry
from .kvm import Kvm, KvmError
from .memory import GuestMemory, Region
from .modes import (CODE_BITS, DEFAULT_LOAD_ADDRESS, ImageRange, Mode, choose_system_base, default_stack,
                    setup_mode)
from .runloop import ExitStat, HandlerError, RunResult, VcpuContext
from .translate import ExceptionReport, GuestFault
from .vcpu import Vcpu
from .vm import Vm
from .vmcs import Vmcs
from .vmcs_fields import VmcsField

if TYPE_CHECKING:
    from . import asm
    from .breakpoints import BreakpointTable
    from .hwbreakpoints import HardwareBreakpointTable

__all__ = ["ExceptionReport", "ExitStat", "GuestFault", "HandlerError", "Machine", "RunResult"]


class Machine:
    """A VM with guest RAM at GPA 0, vCPUs, a serial console and a debug-exit port.

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
        self.vm: Vm | None = None
        self.contexts: list[VcpuContext] = []
        self._smp = None
        self.smp = None           # the `minivmm.smp.SmpRunner` when vcpus > 1
        try:
            self.vm = Vm(self.kvm)
            self.vm.add_ram(0, memory)
            if irqchip or vcpus > 1:
                self.vm.create_irqchip()
            for index in range(vcpus):
                self.contexts.append(VcpuContext(self.vm, Vcpu(self.kvm, self.vm.fd, index), self.mode))
        except BaseException:
            self.close()
            raise
        self.serial = Serial16550(sink=console)
        self.debug_exit = DebugExit()
        for device in (self.serial, self.debug_exit):
            self.add_device(device)
        self.hooks = HookRegistry(self.vm.dispatcher, self.contexts, self._intercept,
                                  breakpoints=lambda: self.breakpoints, ept=lambda: self.ept)
        self.entry: int | None = None
        self.stack: int | None = None
        self.symbols: dict[str, int] = {}
        self.images: list[ImageRange] = []      # what load/load_image/place put in guest RAM
        self.system_tables = True               # False: setup writes no GDT/TSS (multiboot kernels)
        self.system_base: int | None = None     # where setup put the system area
        self.last_result: RunResult | None = None
        self._started = False
        self._ept = None
        install_defaults(self.vm.dispatcher, self.vm.ports)
        if vcpus > 1:
            from .smp import SmpRunner
            self._smp = SmpRunner(self)

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Release the vCPU, VM and KVM fds and every guest memory mapping."""
        if getattr(self, "_ept", None) is not None:
            self._ept.close()
        for ctx in getattr(self, "contexts", []):
            ctx.close()
        self.contexts = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what belongs to the VM, and to vCPU 0 -----------------------------------------
    @cached_property
    def breakpoints(self) -> BreakpointTable:
        """The int3 breakpoints (`minivmm.breakpoints`), made on first use."""
        from .breakpoints import BreakpointTable
        return BreakpointTable(self.vm.memory, self.contexts, self.hooks)

    @cached_property
    def hw_breakpoints(self) -> HardwareBreakpointTable:
        """The debug-register breakpoints (`minivmm.hwbreakpoints`), made on first use."""
        from .hwbreakpoints import HardwareBreakpointTable
        return HardwareBreakpointTable(self.contexts, self.vm.dispatcher, lambda: self.vm.vmx.model)

    @property
    def vcpu(self) -> Vcpu | None:
        """vCPU 0 (the bootstrap processor)."""
        return self.contexts[0].vcpu if self.contexts else None

    @property
    def vcpus(self) -> list[Vcpu]:
        return [ctx.vcpu for ctx in self.contexts]

    @property
    def context(self) -> VcpuContext:
        """vCPU 0's context."""
        return self.contexts[0]

    @property
    def memory(self) -> GuestMemory:
        return self.vm.memory

    @property
    def irqchip(self) -> bool:
        return self.vm is not None and self.vm.irqchip

    @property
    def cpuid(self) -> CpuidTable:
        return self.vm.cpuid

    @property
    def info(self) -> ExitInfo:
        """vCPU 0's exit information."""
        return self.contexts[0].info

    @property
    def vmcs(self) -> Vmcs:
        """vCPU 0's VMCS (`m.contexts[i].vmcs` for the others)."""
        return self.contexts[0].vmcs

    @property
    def stats(self) -> dict[str, ExitStat]:
        """vCPU 0's exit statistics, summed over its runs."""
        return self.contexts[0].stats

    @property
    def last_exception(self) -> ExceptionReport | None:
        """The exception of vCPU 0's last EXCEPTION_OR_NMI exit."""
        return self.contexts[0].last_exception

    @property
    def pre_entry(self) -> list[Callable[[], None]]:
        """vCPU 0's pre-entry list, as the exit loop runs it (add hooks with `hooks.add`)."""
        return self.contexts[0].pre_entry

    @property
    def port_devices(self) -> dict[int, PortDevice]:
        return self.vm.ports.by_port

    @property
    def devices(self) -> list[PortDevice]:
        return self.vm.ports.devices

    @property
    def started(self) -> bool:
        """Whether the vCPU was put into the machine's mode (`setup`, done by the first run);
        setting it False has the next run set the mode up again."""
        return self._started

    @started.setter
    def started(self, value: bool) -> None:
        self._started = bool(value)

    # -- memory and devices ---------------------------------------------------------
    def add_ram(self, gpa: int, size: int | str, *, name: str = "ram") -> Region:
        region = self.vm.add_ram(gpa, size, name=name)
        if self._ept is not None:
            self._ept.before_next_entry()           # the EPT takes the new region over
        return region

    def add_device(self, device: PortDevice) -> None:
        self.vm.ports.add(device)

    def remove_device(self, device: PortDevice) -> None:
        self.vm.ports.remove(device)

    def invalidate_io_routes(self) -> None:
        self.vm.invalidate_io_routes()

    def set_hypercall_port(self, port: int) -> None:
        """Move the hypercall ABI's port (default 0xf5): an OUT to `port` is EXECUTE_VMCALL."""
        for ctx in self.contexts:
            ctx.translator.hypercall_port = port
        self.vm.invalidate_io_routes()

    def irq_line(self, irq: int, level: int | bool) -> None:
        """Drive ISA IRQ / IOAPIC GSI line `irq` (KVM_IRQ_LINE; needs `irqchip`)."""
        if not self.irqchip:
            raise RuntimeError("irq_line needs the in-kernel irqchip: Machine(irqchip=True) "
                               "or platform.irqchip: true")
        self.vm.fd.irq_line(irq, int(bool(level)))

    # -- images ---------------------------------------------------------------------
    def load(self, data: bytes, address: int | None = None, *, entry: int | None = None,
             name: str | None = None) -> None:
        """Copy a flat image into guest RAM; the entry defaults to its first byte.
        Raises ImageOverlapError when it overlaps an image loaded before."""
        address = DEFAULT_LOAD_ADDRESS[self.mode] if address is None else address
        self.place(address, data, name or "image")
        if entry is not None or self.entry is None:
            self.entry = address if entry is None else entry

    def load_image(self, image: asm.GuestImage) -> None:
        """Copy an assembled image to its load address and take its entry and symbols.
        Raises ImageOverlapError when it overlaps an image loaded before."""
        self.place(image.load_address, image.data, image.source or "image")
        self.entry = image.entry
        self.symbols.update(image.symbols)

    def place(self, address: int, data: bytes, name: str = "image", *, bss: int = 0) -> ImageRange:
        """Write image bytes at `address` and record them in `images` (setup keeps the system
        area off them); ImageOverlapError if they overlap bytes an earlier image owns (its
        last `bss` bytes, zero-fill, may take a later image)."""
        from .loaders import check_no_overlap
        placed = ImageRange(address, address + len(data), name, bss)
        if data:
            check_no_overlap(self.images, placed)
        self.memory.write(address, data)
        if data:
            self.images.append(placed)
        return placed

    def load_asm(self, source: str | os.PathLike, *, load_address: int | None = None,
                 **kwargs) -> asm.GuestImage:
        """Assemble a guest (a .S path or inline text) for this machine's mode and load it."""
        from . import asm
        include = tuple(kwargs.pop("include_dirs", ())) + (str(Path(__file__).parent / "guest_include"),)
        image = asm.assemble(source, code_bits=CODE_BITS[self.mode],
                             load_address=DEFAULT_LOAD_ADDRESS[self.mode] if load_address is None
                             else load_address, include_dirs=include,
                             prelude='.include "minivmm.inc"', **kwargs)
        self.load_image(image)
        return image

    def read_code(self, rip: int, length: int) -> bytes:
        """vCPU 0's guest code bytes at CS:rip (empty when unmapped)."""
        return self.contexts[0].read_code(rip, length)

    def code_bits(self) -> int:
        """16, 32 or 64: the operand size vCPU 0 decodes guest code with now."""
        return self.contexts[0].code_bits()

    def symbol(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"no symbol {name!r} in the loaded images") from None

    def default_stack(self) -> int:
        """The initial stack pointer when `stack` is None (`minivmm.modes.default_stack`)."""
        low = self.memory.region_at(0)
        return default_stack(self.mode, low.end if low is not None else 0)

    def setup(self) -> None:
        """Put vCPU 0 into the machine's mode at the entry point (done by the first run).
        Registers written before (through `m.vcpu` or VMCS guest-state fields) are kept.
        The system area goes where no loaded image is (`minivmm.modes.choose_system_base`),
        or nowhere when `system_tables` is False."""
        if self.entry is None:
            raise ValueError("nothing loaded: call load(), load_image() or load_asm() first")
        stack = self.default_stack() if self.stack is None else self.stack
        base = self._system_base(stack)
        written = self.vcpu.written_since_power_on()
        setup_mode(self.vcpu, self.memory, self.mode, self.entry, stack, base=base or 0,
                   tables=base is not None)
        self.system_base = base
        self.vcpu.rewrite(*written)
        self.apply_cpuid()
        self._started = True

    def _system_base(self, stack: int) -> int | None:
        """Where setup writes the system area: None in real mode or without system tables."""
        if self.mode is Mode.REAL or not self.system_tables:
            return None
        ram = [(region.gpa, region.end) for region in self.memory.regions]
        return choose_system_base(self.mode, self.images, ram, stack)

    def apply_cpuid(self) -> None:
        """Give KVM the CPUID table (overrides and EXECUTE_CPUID handlers); before the first run only.

        Each EXECUTE_CPUID handler sees the table's answer for its leaf as `info.raw_kvm_exit`
        (a `CpuidLeaf`: leaf, subleaf, eax..edx) and may return `Reply((eax, ebx, ecx, edx))`."""
        def consult(leaf: CpuidLeaf) -> None:
            info = ExitInfo().reset(ExitReason.EXECUTE_CPUID, instruction_length=2, raw_kvm_exit=leaf)
            try:
                action = self.vm.dispatcher.dispatch(self.vcpu, info, leaf.leaf)
                if isinstance(action, Reply):
                    leaf.eax, leaf.ebx, leaf.ecx, leaf.edx = action.value
                elif action is not None:
                    raise TypeError(f"a CPUID handler answers with Reply((eax, ebx, ecx, edx)) or None, "
                                    f"not {action!r}")
            except Exception as exc:
                raise HandlerError(f"EXECUTE_CPUID handler raised {type(exc).__name__}: {exc} "
                                   f"(leaf {leaf.leaf:#x} subleaf {leaf.subleaf:#x})") from exc
        try:
            dispatcher = self.vm.dispatcher
            asks = dispatcher.registrations(ExitReason.EXECUTE_CPUID) or dispatcher.default(ExitReason.EXECUTE_CPUID)
            entries = self.cpuid.build(consult if asks else None)
            if asks or self.cpuid.overrides:       # else vCPU 0 has had this table since its creation
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
        """The EPT model of this machine (`minivmm.ept.EptShadow`), created on first use."""
        if self._ept is None:
            self.create_ept()
        return self._ept

    def create_ept(self, *, backend: str | None = None, ad: bool = True):
        """Give the machine its EPT with these options (`minivmm.ept.EptShadow`): `backend`
        "memslot" or "mprotect" (default: what the host probe chose), `ad` the A/D bits."""
        from .ept import EptShadow
        if self._ept is not None:
            raise RuntimeError("this machine has its EPT already")
        ept = self._ept = EptShadow(self.vm, self.contexts, self.hooks, breakpoints=self.breakpoints,
                                     ad=ad, backend=backend)
        self.vm.vmx.eptp = lambda: ept.eptp
        for ctx in self.contexts:
            ctx.ept = ept
        return ept

    def read_virtual(self, gva: int, size: int) -> bytes:
        """Read guest-virtual memory through vCPU 0's page tables (`minivmm.pagewalk`)."""
        from .pagewalk import read_virtual
        return read_virtual(self.memory, self.vcpu, gva, size)

    def write_virtual(self, gva: int, data: bytes) -> None:
        """Write guest-virtual memory through vCPU 0's page tables (`minivmm.pagewalk`)."""
        from .pagewalk import write_virtual
        write_virtual(self.memory, self.vcpu, gva, data)

    def step_once(self, callback: Callable[[Vcpu], None], *, vcpu: int = 0) -> None:
        """Run `callback(vcpu)` right after vCPU `vcpu`'s next instruction (one single step)."""
        self.contexts[vcpu].step_once(callback)

    # -- handlers -------------------------------------------------------------------
    def on(self, reason: ExitReason, handler: Callable | None = None, **filters):
        """Register `handler(vcpu, info) -> Action | None` for `reason` (an EXIT hook).

        Usable as a decorator: `@machine.on(ExitReason.IO_INSTRUCTION, port=0x3f8)`.
        Filters: port, msr, vector, address, number, leaf (an int, a range or
        a (start, end) tuple). Returns the Handle, for `off()`; `off(function)`
        removes a decorated function. `reason` may also name another hook kind,
        e.g. `m.on("syscall", fn, number=1, when="after")` (`minivmm.hooks`).
        """
        if handler is None:
            def decorate(fn: Callable) -> Callable:
                self.on(reason, fn, **filters)
                return fn
            return decorate
        if isinstance(reason, str):
            return self.hooks.add(reason, handler, **filters)
        return self.hooks.add(HookKind.EXIT, handler, reason=reason, **filters)

    def off(self, handle: Handle | Callable) -> None:
        """Remove what `on` (or `hooks.add`) installed: its Handle, or the function."""
        self.hooks.remove(handle)

    def _intercept(self, reg) -> None:
        """Set the bitmap bits a filtered handler needs, as a hypervisor does when it installs
        one (on every vCPU's VMCS)."""
        full = reg.low == 0 and reg.high == (1 << 64) - 1
        vmx = self.vm.vmx
        if reg.reason == ExitReason.IO_INSTRUCTION:
            vmx.io_bitmap.intercept_range(reg.low, min(reg.high, 0xFFFF))
        elif reg.reason in (ExitReason.EXECUTE_RDMSR, ExitReason.EXECUTE_WRMSR) and not full:
            for msr in range(reg.low, reg.high + 1):
                vmx.msr_bitmap.intercept(msr, read=reg.reason == ExitReason.EXECUTE_RDMSR,
                                         write=reg.reason == ExitReason.EXECUTE_WRMSR)
        elif reg.reason == ExitReason.EXCEPTION_OR_NMI:
            # an unfiltered handler takes every vector the mode can intercept; a filter naming
            # one it cannot is refused by the VMWRITE (minivmm.capabilities)
            mask = vmx.model.allowed_bitmap(self.mode) if full else \
                sum(1 << v for v in range(reg.low, min(reg.high, 31) + 1))
            for ctx in self.contexts:
                ctx.vmcs.write(VmcsField.VMCS_CTRL_EXCEPTION_BITMAP, ctx.vmcs.exception_bitmap | mask)
        elif reg.reason == ExitReason.EXECUTE_CPUID:
            self.cpuid.dirty = True
        self.vm.invalidate_io_routes()

    # -- running --------------------------------------------------------------------
    def run(self, timeout: float | None = None, max_exits: int | None = None) -> RunResult:
        """Run until the guest reports an exit code, halts, faults, or hits a limit.

        `timeout` is a wall-clock deadline in seconds (VMX-preemption-timer
        exit when reached); `max_exits` bounds the number of exits.
        With more than one vCPU each runs in its own thread (`minivmm.smp`).
        """
        if self._smp is not None:
            return self._smp.run(timeout, max_exits)
        self.prepare_run()
        try:
            return self.contexts[0].run(timeout, max_exits, console=lambda: self.serial.text)
        finally:
            self.last_result = self.contexts[0].last_result

    def serve_gdb(self, port: int | None = None, socket: str | None = None, **options) -> RunResult | None:
        """Wait for gdb (`target remote :PORT` or a Unix `socket` path) before the next
        instruction and serve it until it detaches, kills or the guest ends; see
        `minivmm.gdb.serve_machine` for the options (`timeout`, `ready`, `host`)."""
        from .gdb import serve_machine
        return serve_machine(self, port, socket, **options)

    def run_raw(self, timeout: float | None = None, max_exits: int | None = None,
                counts: list[int] | None = None, seconds: list[float] | None = None,
                pending: int | None = None) -> Stop:
        """vCPU 0's exit loop without building a RunResult (`VcpuContext.run_raw`, `pending`
        there); returns the Stop that ended it. For harnesses that run a guest thousands of
        times a second."""
        self.prepare_run()
        return self.contexts[0].run_raw(timeout, max_exits, counts, seconds, pending)

    def prepare_run(self) -> None:
        """What every run does before the first entry: mode setup on the first run, the CPUID
        table while it changed, the debug-exit device's reset; with several vCPUs also the
        batched EPT changes, before any vCPU thread runs (replacing a memslot under a running
        vCPU is not atomic)."""
        if not self._started:
            self.setup()
        if self.cpuid.dirty:
            self.apply_cpuid()
        if self._smp is not None and self._ept is not None:
            self._ept.invept()
        self.debug_exit.reset()
