"""The fuzz harness: put an input into a guest, run it from a snapshot, classify the run.

    harness = Harness(machine, FuzzTarget(input_address=machine.symbol("input"),
                                          length_register="rsi"))
    outcome = harness.run(b"FUZZ\\x02\\xff\\xff\\x41")
    if outcome.status is Status.CRASH:
        print(outcome.summary())

The snapshot is taken once, at the guest's entry point (or wherever the
machine stands when the harness is created). Every run restores it (only the
pages the previous run dirtied), writes the input into the guest buffer and
its length into a register or memory, and runs with a deadline.

Outcomes:

* ``ok``: the guest reported through debug-exit (an exit code listed in
  `crash_exit_codes` counts as a crash), halted, or stopped cleanly;
* ``crash``: an exception whose vector is in `crash_vectors` (all vectors
  when that is empty), a triple fault, a configured crash address reached
  (a permanent breakpoint), a VM error (e.g. an access to unmapped guest
  physical memory) or an instruction the host could not emulate;
* ``timeout``: the deadline (or the exit limit) was reached.

User-mode (CPL 3) targets are the fast path: their code runs natively.
With `fast=True` (the default) a run goes through `Machine.run_raw`, which
skips building a RunResult, and deadlines come from `run_timer`'s watchdog
thread instead of a timer armed per run; `fast=False` runs `Machine.run`.
Where the C fast path is built, a run is one C call up to the guest's first
exit (`fastpath.FuzzCycle`: the snapshot's dirty pages, registers and events,
the input and its length, KVM_RUN); the run loop takes that exit, and the
debug-exit write that ends most runs is completed here as the port devices
would complete it.

`Harness(..., batch=N)` with N > 1 adds batch mode (`run_batch`, see
`minivmm.fuzz.batch`): up to N inputs per guest entry, the same outcomes.
"""
from __future__ import annotations

import ctypes
import struct
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Iterable, Sequence

from time import perf_counter

from .. import fastpath
from ..disasm import disassemble
from ..exits import ExitReason
from ..fastpath import IO_TAG, FuzzCycle
from ..kvm import KvmError, KvmRegs
from ..errors import MinivmmError
from ..vcpu import DIRTY_REGS
from ..exits import vector_name
from ..modes import CODE_BITS
from ..snapshot import Snapshot
from ..vcpu import GPR_NAMES, run_timer
from .batch import BatchError, BatchRunner
from .coverage import Coverage

if TYPE_CHECKING:
    from ..config import Config
    from ..machine import Machine


class FuzzError(MinivmmError, ValueError):
    """A fuzz target that cannot be set up (bad input buffer, register, ranges)."""


class Status(str, Enum):
    OK = "ok"
    CRASH = "crash"
    TIMEOUT = "timeout"


@dataclass
class FuzzTarget:
    """Where the input goes and what counts as a crash."""
    input_address: int
    max_input_size: int = 4096
    length_register: str | None = None
    length_address: int | None = None
    length_size: int = 8
    crash_vectors: frozenset[int] = frozenset()          # empty: every exception vector
    crash_addresses: tuple[int, ...] = ()
    crash_exit_codes: frozenset[int] = frozenset()
    coverage_ranges: list[tuple[int, int]] = field(default_factory=list)
    timeout: float = 1.0
    max_exits: int | None = 100_000
    batch_regions: tuple[tuple[int, int], ...] = ()     # writable [start, end) reset between batch inputs
    batch_area: tuple[int, int] | None = None          # (gpa, size) of free RAM for batch mode's runtime

    @classmethod
    def from_config(cls, config: "Config", machine: "Machine") -> "FuzzTarget":
        """The target described by a config's `fuzz:` section, symbols resolved on `machine`.

        Without `coverage_ranges`, the code between the symbols
        `fuzz_coverage_start` and `fuzz_coverage_end` is covered when the
        image defines them.
        """
        fuzz = config.fuzz
        if fuzz is None:
            raise FuzzError(f"{config.path}: no 'fuzz:' section")
        if fuzz.input_address is not None:
            address = fuzz.input_address
        else:
            try:
                address = machine.symbol(fuzz.input_symbol)
            except KeyError as exc:
                raise FuzzError(f"{config.path}: fuzz.input_symbol: {exc.args[0]}") from None
        ranges = [tuple(r) for r in fuzz.coverage_ranges]
        if not ranges and "fuzz_coverage_start" in machine.symbols and "fuzz_coverage_end" in machine.symbols:
            ranges = [(machine.symbols["fuzz_coverage_start"], machine.symbols["fuzz_coverage_end"])]
        return cls(input_address=address, max_input_size=fuzz.max_input_size,
                   length_register=fuzz.length_register, length_address=fuzz.length_address,
                   crash_vectors=frozenset(fuzz.crash_vectors),
                   crash_addresses=tuple(fuzz.crash_addresses), coverage_ranges=ranges,
                   timeout=fuzz.timeout, batch_regions=tuple(tuple(r) for r in fuzz.batch_regions))


def place_input(machine: "Machine", target: FuzzTarget, data: bytes) -> bytes:
    """Put `data` into a machine that stands where a harness would take its snapshot, as
    `Harness.prepare` does: cut to `max_input_size`, written at `input_address`, its length
    in `length_register` or at `length_address`. Returns the bytes placed."""
    data = bytes(data[: target.max_input_size])
    region = machine.memory.region_at(target.input_address)
    if region is None or target.input_address + target.max_input_size > region.end:
        raise FuzzError(f"input buffer [{target.input_address:#x}, "
                        f"{target.input_address + target.max_input_size:#x}) is not inside guest RAM")
    machine.memory.write(target.input_address, data)
    if target.length_register is not None:
        if target.length_register not in GPR_NAMES:
            raise FuzzError(f"length register {target.length_register!r} is not one of {', '.join(GPR_NAMES)}")
        setattr(machine.vcpu, target.length_register, len(data))
    elif target.length_address is not None:
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[target.length_size]
        machine.memory.write(target.length_address, struct.pack(fmt, len(data)))
    return data


@dataclass(slots=True)
class RunOutcome:
    """One classified run."""
    status: Status
    reason: str                     # the machine's result reason (exit, exception, ...)
    input: bytes
    rip: int = 0
    vector: int | None = None
    error_code: int | None = None
    cr2: int | None = None
    exit_code: int | None = None
    message: str = ""
    disassembly: str = ""
    new_blocks: tuple[int, ...] = ()
    elapsed_s: float = 0.0

    @property
    def crash_site(self) -> str:
        """The deduplication key of a crash: what happened and where."""
        what = f"v{self.vector}" if self.vector is not None else self.reason
        return f"{what}-{self.rip:x}"

    def summary(self) -> str:
        text = f"{self.status.value}: {self.reason}"
        if self.vector is not None:
            text += f" {vector_name(self.vector)} (vector {self.vector})"
        text += f" at rip={self.rip:#x}"
        if self.error_code is not None:
            text += f" error_code={self.error_code:#x}"
        if self.cr2 is not None:
            text += f" cr2={self.cr2:#x}"
        if self.exit_code is not None:
            text += f" exit_code={self.exit_code}"
        if self.message and self.vector is None:
            text += f" ({self.message})"
        if self.disassembly:
            text += "\n" + self.disassembly
        return text


_OK, _CRASH = Status.OK, Status.CRASH


class Harness:
    """Runs inputs against one machine from one snapshot; see the module docstring."""

    def __init__(self, machine: "Machine", target: FuzzTarget, *, coverage: bool = True,
                 restore_fpu: bool = False, fast: bool = True, batch: int = 1) -> None:
        self.machine = machine
        self.fast = fast
        self._route_version = -1
        self._plain = False
        self.target = target
        self.restore_fpu = restore_fpu
        region = machine.memory.region_at(target.input_address)
        if region is None or target.input_address + target.max_input_size > region.end:
            raise FuzzError(f"input buffer [{target.input_address:#x}, "
                            f"{target.input_address + target.max_input_size:#x}) is not inside guest RAM")
        if target.length_register is not None and target.length_register not in GPR_NAMES:
            raise FuzzError(f"length register {target.length_register!r} is not one of {', '.join(GPR_NAMES)}")
        if target.length_address is not None:
            if machine.memory.region_at(target.length_address) is None:
                raise FuzzError(f"length address {target.length_address:#x} is not in guest RAM")
            self._length_format = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[target.length_size]
        self._input_host = region.host_addr + (target.input_address - region.gpa)
        self.snapshot = Snapshot.take(machine)
        self.coverage = Coverage(list(target.coverage_ranges) if coverage else [])
        self.coverage.install(machine, self.snapshot, target.crash_addresses)
        self._previous_length = 0
        self.runs = 0
        # The length register is written straight into the vCPU's register
        # cache (kvm_run's sync_regs area when the host has it).
        vcpu = machine.vcpu
        self._length_cell = (ctypes.c_uint64.from_address(vcpu.gpr_address(target.length_register))
                             if target.length_register is not None else None)
        self._vcpu = vcpu
        self._mark_dirty = vcpu.mark_dirty
        self._counts = [0] * 80
        self._watchdog = False
        if fast and target.timeout is not None and threading.current_thread() is threading.main_thread():
            run_timer.start_watchdog(max(0.005, min(0.05, target.timeout / 4)))
            self._watchdog = True
        self._cycle: FuzzCycle | None = None
        self._cycle_plan: tuple | None = None
        self._exit_highs = frozenset()
        self._use_cycle = self._watchdog and vcpu.synced and not restore_fpu and fastpath.COMPILED
        if self._use_cycle:
            self._pre_entry, self._observers = machine.pre_entry, machine.context.observers
            self._dispatcher, self._regs = machine.vm.dispatcher, vcpu.register_cache
            self._vmcs, self._cpuid = machine.vmcs, machine.cpuid
            de = machine.debug_exit
            # The packed form's upper half (fastpath) of each single-item OUT to the device.
            self._exit_highs = frozenset(
                (IO_TAG | size << 49 | port << 33 | 1 << 32) >> 32 for port in de.ports for size in (1, 2, 4))
        self.cycle_runs = 0                   # runs that went through the C cycle
        self.batch = batch
        self.batch_runner: BatchRunner | None = None
        if batch > 1:
            try:
                self.batch_runner = BatchRunner(self, batch, target.batch_regions, target.batch_area)
            except BatchError as exc:
                if self._watchdog:
                    run_timer.stop_watchdog()
                    self._watchdog = False
                self.snapshot.close()
                raise FuzzError(str(exc)) from None

    @classmethod
    def from_config(cls, config: "Config", *, coverage: bool = True, **kwargs) -> "Harness":
        """Build the config's machine and a harness for its `fuzz:` section."""
        from ..config import build_machine
        machine = build_machine(config, capture_console=True)
        kwargs.setdefault("batch", config.fuzz.batch if config.fuzz is not None else 1)
        try:
            return cls(machine, FuzzTarget.from_config(config, machine), coverage=coverage, **kwargs)
        except BaseException:
            machine.close()
            raise

    def close(self) -> None:
        """Stop the deadline thread, release the snapshot copy and the machine."""
        if self._watchdog:
            run_timer.stop_watchdog()
            self._watchdog = False
        self.snapshot.close()
        self.machine.close()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running ----------------------------------------------------------------------------
    def _fit(self, data: bytes) -> bytes:
        """`data` as bytes, cut to the target's maximum input size."""
        if len(data) > self.target.max_input_size:
            data = data[: self.target.max_input_size]
        return data if data.__class__ is bytes else bytes(data)

    def prepare(self, data: bytes) -> bytes:
        """Restore the snapshot and place `data` (cut to the maximum size) in the guest."""
        target = self.target
        machine = self.machine
        data = self._fit(data)
        n = len(data)
        self.snapshot.restore(machine, fpu=self.restore_fpu)
        if self._previous_length > n:
            self.snapshot.restore_range(machine, target.input_address + n, self._previous_length - n)
        ctypes.memmove(self._input_host, data, n)
        self._previous_length = n
        if self._cycle is not None:
            self._cycle.previous = n
        if self._length_cell is not None:
            self._length_cell.value = n
            self._mark_dirty(DIRTY_REGS)
        elif target.length_address is not None:
            machine.memory.write(target.length_address, struct.pack(self._length_format, n))
        self.coverage.start_run()
        return data

    def run(self, data: bytes) -> RunOutcome:
        """Run one input from the snapshot and classify the run."""
        if self._use_cycle:
            cycle = self._ready_cycle()
            if cycle is not None:
                outcome = self._run_cycle(cycle, self._fit(data))
                if outcome is not None:
                    return outcome
        data = self.prepare(data)
        self.runs += 1
        target = self.target
        reason, exit_code, message, elapsed = self.run_prepared(target.timeout, target.max_exits)
        if self.fast and reason == "timeout" and elapsed < target.timeout / 2:
            # The deadline thread signalled a run that had just ended: run again.
            data = self.prepare(data)
            reason, exit_code, message, elapsed = self.run_prepared(target.timeout, target.max_exits)
        return self.classify(reason, exit_code, message, elapsed, data)

    # -- the C cycle (fastpath.FuzzCycle) -------------------------------------------------
    def _ready_cycle(self) -> FuzzCycle | None:
        """The C cycle when this run may use it: nothing pending that the Python entry path
        would do first (registers written by hand, pre-entry hooks, VMCS or CPUID changes),
        and a snapshot restore that is memory from one memslot's dirty log plus sync_regs."""
        machine = self.machine
        if (self._vcpu.dirty or self._pre_entry or self._vmcs.dirty or self._cpuid.dirty
                or machine.smp is not None or not machine.started):
            return None
        plan = self.snapshot.cycle_plan(machine)
        if plan is None:
            return None
        if plan != self._cycle_plan:
            self._cycle = self._make_cycle(plan)
            self._cycle_plan = plan
            self._cycle.previous = self._previous_length
        return self._cycle

    def _make_cycle(self, plan: tuple) -> FuzzCycle:
        vm_fd, slot, bitmap, npages, guest, copy = plan
        machine, target, vcpu = self.machine, self.target, self._vcpu
        regs, sregs, events = self.snapshot.register_addresses
        length_offset, length_address = -1, 0
        if target.length_register is not None:
            length_offset = getattr(KvmRegs, target.length_register).offset
        elif target.length_address is not None:
            region = machine.memory.region_at(target.length_address)
            length_address = region.host_addr + (target.length_address - region.gpa)
        return FuzzCycle(vm_fd=vm_fd, vcpu_fd=vcpu.fd.fd, slot=slot, bitmap=bitmap, npages=npages,
                         guest=guest, copy=copy, run=ctypes.addressof(vcpu.fd.run), regs=regs,
                         sregs=sregs, events=events, input=self._input_host,
                         input_copy=self.snapshot.copy_address(target.input_address),
                         length_offset=length_offset, length_address=length_address,
                         length_size=target.length_size)

    def _exit_is_plain(self) -> bool:
        """Whether an OUT to the debug-exit device goes to the port devices alone (no user
        handler in its chain), so that the cycle may complete it as that handler would."""
        dispatcher = self.machine.vm.dispatcher
        if dispatcher.version != self._route_version:
            self._route_version = dispatcher.version
            default = dispatcher.default(ExitReason.IO_INSTRUCTION)
            self._plain = all(dispatcher.chain(ExitReason.IO_INSTRUCTION, port) == (default,)
                              for port in self.machine.debug_exit.ports) and \
                getattr(default, "__qualname__", "") == "port_devices.<locals>.handle"
        return self._plain

    def _run_cycle(self, cycle: FuzzCycle, data: bytes) -> RunOutcome | None:
        """One run through the C cycle; None when the deadline signal came early (the Python
        path runs the input again)."""
        machine = self.machine
        target = self.target
        timeout = target.timeout
        start = perf_counter()
        run_timer.arm(self._vcpu, timeout)
        try:
            packed = cycle.run(data)
            self._previous_length = len(data)
            self.snapshot.restore_devices(machine)
            self.coverage.start_run()
            self.runs += 1
            self.cycle_runs += 1
            if packed < 0 and cycle.stage == 1:
                raise KvmError("KVM_GET_DIRTY_LOG/KVM_CLEAR_DIRTY_LOG", -packed)
            if packed >> 32 in self._exit_highs and not self._observers and \
                    (self._dispatcher.version == self._route_version and self._plain or self._exit_is_plain()):
                # What the port devices' handler does with it (minivmm.handlers.io).
                de = machine.debug_exit
                de.reset()
                de.io_write(packed >> 33 & 0xFFFF, packed >> 49 & 7, packed & 0xFFFFFFFF)
                code = de.value
                return RunOutcome(_CRASH if code in target.crash_exit_codes else _OK, "exit", data,
                                  self._regs.rip, None, None, None, code, "", "", (), perf_counter() - start)
            stop = machine.run_raw(None, target.max_exits, self._counts, pending=packed)
        finally:
            run_timer.disarm()
        elapsed = perf_counter() - start
        if stop.reason == "timeout" and elapsed < timeout / 2:
            # The deadline thread signalled a run that had just ended: run again.
            return None
        return self.classify(stop.reason, stop.exit_code, stop.message, elapsed, data)

    def classify(self, reason: str, exit_code: int | None, message: str, elapsed: float,
                 data: bytes) -> RunOutcome:
        target = self.target
        rip = self._vcpu.rip
        new = tuple(self.coverage.new_blocks) if self.coverage.new_blocks else ()
        if reason == "exit":
            status = Status.CRASH if exit_code in target.crash_exit_codes else Status.OK
            return RunOutcome(status, reason, data, rip, exit_code=exit_code, new_blocks=new,
                              elapsed_s=elapsed)
        if reason in ("timeout", "exit_limit"):
            return RunOutcome(Status.TIMEOUT, reason, data, rip, message=message, new_blocks=new,
                              elapsed_s=elapsed)
        exc = self.machine.last_exception
        if reason == "exception" and exc is not None:
            crash = not target.crash_vectors or exc.vector in target.crash_vectors
            return RunOutcome(Status.CRASH if crash else Status.OK, reason, data, exc.rip, exc.vector,
                              exc.error_code, exc.cr2, message=message,
                              disassembly=self.disassemble(exc.rip) if crash else "",
                              new_blocks=new, elapsed_s=elapsed)
        if reason in ("triple_fault", "crash_address", "error"):
            return RunOutcome(Status.CRASH, reason, data, rip, message=message,
                              disassembly=self.disassemble(rip), new_blocks=new, elapsed_s=elapsed)
        return RunOutcome(Status.OK, reason, data, rip, exit_code=exit_code, message=message,
                          new_blocks=new, elapsed_s=elapsed)

    def disassemble(self, rip: int, count: int = 3) -> str:
        """A few instructions at `rip` (guest-physical = guest-virtual in minivmm's modes)."""
        region = self.machine.memory.region_at(rip)
        if region is None:
            return f"  {rip:#x}: <not in guest RAM>"
        code = self.coverage.unpatched(rip, self.machine.memory.read(rip, min(15 * count, region.end - rip)))
        lines = [f"  {a:#x}: {raw.hex(' '):<24} {text}"
                 for a, raw, text in disassemble(code, rip, CODE_BITS[self.machine.mode], count)]
        return "\n".join(lines) or f"  {rip:#x}: <undecodable: {code[:8].hex(' ')}>"

    def run_many(self, inputs: Iterable[bytes]) -> list[RunOutcome]:
        return self.run_batch(list(inputs))

    # -- batch mode (minivmm.fuzz.batch) ----------------------------------------------------
    def run_batch(self, inputs: Sequence[bytes]) -> list[RunOutcome]:
        """One outcome per input, in order, as `run` gives them; in batches of up to `batch`
        inputs per guest entry when the harness was made with `batch` > 1."""
        if self.batch_runner is None:
            return [self.run(data) for data in inputs]
        return self.batch_runner.run(inputs)

    @property
    def input_length(self) -> int:
        """Length of the input the guest's buffer holds past the snapshot's bytes."""
        return self._previous_length

    def restore_for_batch(self) -> None:
        """The snapshot's state, for a batch to start from."""
        self.snapshot.restore(self.machine, fpu=self.restore_fpu)

    def after_batch(self) -> None:
        """A batch ran: its writes to the input buffer are in the dirty log, so the next
        restore puts back the snapshot's bytes there."""
        self._previous_length = 0
        if self._cycle is not None:
            self._cycle.previous = 0

    def run_prepared(self, timeout: float | None, max_exits: int | None) -> tuple[str, int | None, str, float]:
        """Run the machine from where it stands: (reason, exit code, message, seconds)."""
        start = perf_counter()
        if self.fast:
            stop = self.machine.run_raw(timeout, max_exits, self._counts)
            return stop.reason, stop.exit_code, stop.message, perf_counter() - start
        result = self.machine.run(timeout=timeout, max_exits=max_exits)
        return result.reason, result.exit_code, result.message, result.elapsed_s


__all__ = ["Harness", "FuzzTarget", "RunOutcome", "Status", "FuzzError", "place_input"]
