"""Instruction tracing: single-step one vCPU and describe every instruction.

`Tracer` steps vCPU `vcpu` (0 by default) with the VMCS monitor-trap-flag
control (each step is a MONITOR_TRAP_FLAG exit; `minivmm.vmcs` realises it for
the machine's mode), or with the vCPU's step service (`VcpuContext.step_once`)
when asked to or when the control is unavailable. It sees exits through an
OBSERVE hook and takes its snapshots in a PRE_ENTRY hook (`machine.hooks`), so
it changes no exit routing, and it removes both hooks when it stops.

An instruction that exits by itself (an `out`, `hlt`, an exception that
reaches the VMM) is reported with that exit; one the VMM completes without an
exit the tracer sees (an emulated EPT access) is reported as "completed by the
VMM". A vCPU that waits in KVM's in-kernel LAPIC (an AP before its
INIT-SIPI, a halted vCPU) starts again where KVM puts it: the first
instruction it executes then is described only when KVM reported the new
registers before it ran (else it is stepped, not described). Each instruction is a `TraceStep`, passed to `emit` and kept in `steps`
(the last `keep` of them):

    0x00100000  8d 34 25 18 00 10 00  lea esi, [0x100018]   rsi=0x100018
    0x00100010  ee                    out dx, al            [IO_INSTRUCTION out port=0x3f8]

`Tracer.format` gives the failure-report form the pytest plugin prints
(`--minivmm-trace`): symbols, exits on lines of their own, and the instruction
the vCPU was about to execute when the trace stopped. `trace_config` is the
`minivmm trace` command.
"""
from __future__ import annotations

import collections
import json
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, TextIO

from .controls import ProcBasedControls
from .disasm import disassemble
from .errors import MinivmmError
from .exits import ExitInfo, ExitReason, Vector, vector_name
from .guestchannel import _symbolizer
from .hooks import Handle, HookKind
from .kvm import MpState
from .pagewalk import read_virtual

if TYPE_CHECKING:
    from .machine import Machine
    from .runloop import VcpuContext
    from .vcpu import Vcpu

__all__ = ["TraceResult", "TraceStep", "Tracer", "describe_exit", "trace_config"]

RFLAGS_TF = 0x100
RFLAGS_RF = 0x10000
TRACED_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                    "r12", "r13", "r14", "r15", "rflags")
MAX_INSTRUCTION = 15
METHODS = ("auto", "mtf", "step")
MTF = ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG
# exits that no instruction of the guest caused: they describe no step
NOT_INSTRUCTION_EXITS = frozenset({
    ExitReason.EXTERNAL_INTERRUPT, ExitReason.INTERRUPT_WINDOW, ExitReason.NMI_WINDOW,
    ExitReason.VMX_PREEMPTION_TIMER_EXPIRED, ExitReason.INVALID_GUEST_STATE})


@dataclass
class TraceStep:
    """One executed instruction: where it was, its bytes, the registers it changed and the
    exit it caused (None for a plain step). Decoded on first use of `code` or `text`."""
    index: int
    address: int                 # linear address (CS base + RIP outside 64-bit code)
    window: bytes = b""          # the guest bytes at `address` (up to 15; empty when unreadable)
    bits: int = 64
    changes: dict[str, int] = field(default_factory=dict)
    exit: str | None = None

    @cached_property
    def _decoded(self) -> tuple[bytes, str]:
        if not self.window:
            return b"", "(not in guest RAM)"
        insns = disassemble(self.window, self.address, self.bits, 1)
        if not insns:
            return self.window[:1], "(bad)"
        return insns[0][1], insns[0][2]

    @property
    def code(self) -> bytes:
        """The instruction's bytes."""
        return self._decoded[0]

    @property
    def text(self) -> str:
        """The instruction's disassembly."""
        return self._decoded[1]

    def to_json(self) -> dict[str, Any]:
        return {"step": self.index, "address": self.address, "bytes": self.code.hex(),
                "disasm": self.text, "changes": self.changes, "exit": self.exit}

    def format(self) -> str:
        """One line: address, bytes, disassembly, changed registers, [exit]."""
        changes = " ".join(f"{name}={value:#x}" for name, value in self.changes.items())
        text = f"{self.address:#010x}  {self.code.hex(' '):<24}  {self.text:<32}"
        if changes:
            text += f"  {changes}"
        if self.exit:
            text += f"  [{self.exit}]"
        return text.rstrip()


@dataclass
class TraceResult:
    """How a traced run ended."""
    reason: str                  # a RunResult reason, or "step_limit"
    exit_code: int | None
    steps: int
    message: str = ""
    console: str = ""


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The state an instruction starts from."""
    address: int
    bits: int
    window: bytes
    registers: dict[str, int]


class _StepLimit(MinivmmError):
    """Raised from the pre-entry hook to end the run once enough steps were traced."""


def describe_exit(info: ExitInfo) -> str:
    """The exit as a trace shows it: the reason, with the port, GPA or vector."""
    text = info.reason.name
    detail = info.raw_kvm_exit
    if info.reason == ExitReason.IO_INSTRUCTION and detail is not None:
        text += f" {'out' if detail.is_out else 'in'} port={detail.port:#x}"
    elif info.reason in (ExitReason.EPT_VIOLATION, ExitReason.EPT_MISCONFIGURATION):
        text += f" gpa={info.guest_physical_address:#x}"
    elif info.reason == ExitReason.EXCEPTION_OR_NMI:
        text += f" {vector_name(info.interruption_info & 0xFF)}"
    return text


def _is_step_limit(exc: BaseException) -> bool:
    """The tracer's step limit, raised directly or wrapped by the run loop."""
    return isinstance(exc, _StepLimit) or isinstance(exc.__cause__, _StepLimit)


class Tracer:
    """Single-steps vCPU `vcpu` of `machine` and records every instruction it executes.

    `emit(step)` is called for each `TraceStep`; the last `keep` steps stay in
    `steps`. A run ends with `TraceResult` reason "step_limit" after
    `max_steps` instructions (None: no limit). `method`: "mtf" (the
    monitor-trap-flag control), "step" (the step service) or "auto" (MTF when
    the host offers it). Use `run()`, or `start()`/`stop()` (or `with tracer:`)
    around the machine's own runs.
    """

    def __init__(self, machine: "Machine", emit: Callable[[TraceStep], object] | None = None,
                 max_steps: int | None = 1000, *, keep: int = 0, vcpu: int = 0,
                 method: str = "auto") -> None:
        if method not in METHODS:
            raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
        if not 0 <= vcpu < len(machine.contexts):
            raise ValueError(f"vcpu {vcpu}: the machine has {len(machine.contexts)} vCPUs")
        self.machine = machine
        self.emit = emit
        self.max_steps = max_steps
        self.vcpu = vcpu
        self.method = method
        self.steps: collections.deque[TraceStep] = collections.deque(maxlen=keep)
        self.count = 0
        self.active = False
        self.position: TraceStep | None = None    # the next instruction when the trace stopped
        self._handles: list[Handle] = []
        self._previous: _Snapshot | None = None
        self._owns_mtf = False
        self._armed = False                         # a step-service callback is pending
        self._settled = False                       # the cached registers are KVM's (irqchip)

    @property
    def context(self) -> "VcpuContext":
        return self.machine.contexts[self.vcpu]

    # -- lifetime ---------------------------------------------------------------------
    def start(self) -> None:
        """Step from the next entry of the vCPU on."""
        if self.active:
            return
        if self.method == "auto":
            self.method = "mtf" if self._mtf_available() else "step"
        self.active = True
        self._previous = None
        self._settled = False
        self.position = None
        hooks = self.machine.hooks
        self._handles = [hooks.add(HookKind.OBSERVE, self._on_exit, vcpu=self.vcpu),
                         hooks.add(HookKind.PRE_ENTRY, self._before_entry, vcpu=self.vcpu)]

    def stop(self) -> None:
        """Stop stepping: remove the hooks and the MTF control this tracer added (the
        recorded steps stay)."""
        if not self.active:
            return
        self.active = False
        for handle in self._handles:
            self.machine.hooks.remove(handle)
        self._handles = []
        if self._owns_mtf:
            self.context.vmcs.set_control(MTF, False)
            self._owns_mtf = False
        self._previous = None
        if self.vcpu < len(self.machine.contexts) and self.context.vcpu is not None:
            snapshot = self._snapshot(self._registers())
            self.position = TraceStep(self.count + 1, snapshot.address, snapshot.window, snapshot.bits)

    def __enter__(self) -> "Tracer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, timeout: float | None = None, max_exits: int | None = None) -> TraceResult:
        """Run the machine while tracing; the hooks are gone again when this returns."""
        machine = self.machine
        self.start()
        try:
            result = machine.run(timeout=timeout, max_exits=max_exits)
        except Exception as exc:
            if not _is_step_limit(exc):
                raise
            return TraceResult("step_limit", None, self.count, f"stopped after {self.count} instructions",
                               machine.serial.text)
        finally:
            self.stop()
        return TraceResult(result.reason, result.exit_code, self.count, result.message, result.console)

    def is_step(self, info: ExitInfo) -> bool:
        """Whether an exit is one of this tracer's own single steps."""
        return (self.active and self.method == "mtf" and info.reason == ExitReason.MONITOR_TRAP_FLAG
                and info.vcpu_index == self.vcpu)

    # -- stepping -----------------------------------------------------------------------
    def _mtf_available(self) -> bool:
        """Whether this host's VMX capabilities let the vCPU's VMCS set the MTF control."""
        vmcs = self.context.vmcs
        if vmcs.mtf:
            return True
        try:
            vmcs.set_control(MTF)
        except MinivmmError:
            return False
        vmcs.set_control(MTF, False)
        return True

    def _arm(self) -> None:
        """Make sure the next instruction ends in a step."""
        ctx = self.context
        if self.method == "mtf":
            if not ctx.vmcs.mtf:
                ctx.vmcs.set_control(MTF)
                self._owns_mtf = True
        elif not self._armed:
            self._armed = True
            ctx.step_once(self._on_step)

    def _on_step(self, vcpu: "Vcpu") -> None:
        """The step service's callback: one instruction retired."""
        self._armed = False
        if self.active:
            self._record(None)

    # -- hooks ----------------------------------------------------------------------------
    def _before_entry(self, vcpu: "Vcpu", info: ExitInfo) -> None:
        """Snapshot the state the next instruction starts from (after every handler ran)."""
        if self._waiting():
            self._previous = None          # KVM, not the tracer, decides where it resumes
            self._arm()
            return
        registers = self._registers()
        previous = self._previous
        if previous is not None and (self._address() != previous.address or registers != previous.registers):
            # an exit the tracer does not see (an emulated EPT access, a hook that moved
            # RIP) completed or skipped the instruction without a step
            self._record("completed by the VMM", registers)
        if self.max_steps is not None and self.count >= self.max_steps:
            raise _StepLimit(f"stopped after {self.count} instructions")
        self._arm()
        self._previous = self._snapshot(registers)

    def _on_exit(self, vcpu: "Vcpu", info: ExitInfo) -> None:
        reason = info.reason
        if reason == ExitReason.MONITOR_TRAP_FLAG:
            self._record(None)
        elif reason not in NOT_INSTRUCTION_EXITS:
            self._record(describe_exit(info))

    # -- state ------------------------------------------------------------------------------
    def _waiting(self) -> bool:
        """Whether KVM, not the guest, decides where the vCPU's next instruction is: it waits
        in the in-kernel LAPIC (an AP before its INIT-SIPI, a halted vCPU), or KVM woke it
        and the cached registers are older than KVM's."""
        if not self.machine.irqchip:
            return False
        vcpu = self.context.vcpu
        if vcpu.fd.get_mp_state() != MpState.RUNNABLE:
            self._settled = False
            return True
        if not self._settled:
            if vcpu.fd.get_regs().rip != vcpu.rip:
                return True
            self._settled = True
        return False

    def _registers(self) -> dict[str, int]:
        vcpu = self.context.vcpu
        regs = {name: getattr(vcpu, name) for name in TRACED_REGISTERS}
        regs["rflags"] &= ~(RFLAGS_TF | RFLAGS_RF)      # the stepping's own flags
        return regs

    def _address(self) -> int:
        """The linear address of the vCPU's next instruction."""
        ctx = self.context
        vcpu = ctx.vcpu
        if ctx.code_bits() == 64:
            return vcpu.rip
        return (vcpu.segment("cs").base + vcpu.rip) & 0xFFFF_FFFF

    def _snapshot(self, registers: dict[str, int]) -> _Snapshot:
        address = self._address()
        return _Snapshot(address, self.context.code_bits(), self._fetch(address), registers)

    def _fetch(self, address: int) -> bytes:
        """Up to 15 bytes of guest code at a linear address (fewer at the end of RAM or of
        the mapped pages; empty when none are readable)."""
        memory, vcpu = self.machine.memory, self.context.vcpu
        try:
            return read_virtual(memory, vcpu, address, MAX_INSTRUCTION)
        except Exception:
            pass
        code = bytearray()
        for offset in range(MAX_INSTRUCTION):
            try:
                code += read_virtual(memory, vcpu, address + offset, 1)
            except Exception:
                break
        return bytes(code)

    def _record(self, exit: str | None, registers: dict[str, int] | None = None) -> None:
        """The instruction of the last snapshot has run (or exited): describe it."""
        previous = self._previous
        if previous is None:
            return
        self._previous = None
        now = self._registers() if registers is None else registers
        changes = {name: value for name, value in now.items() if previous.registers.get(name) != value}
        self.count += 1
        step = TraceStep(self.count, previous.address, previous.window, previous.bits, changes, exit)
        self.steps.append(step)
        if self.emit is not None:
            self.emit(step)

    # -- the failure report ---------------------------------------------------------------
    def format(self, last: int | None = None) -> str:
        """The kept steps as text with symbols, one instruction a line and each exit on the
        line after its instruction, ending with the instruction the vCPU would execute next."""
        symbolize = _symbolizer(self.machine.symbols)
        steps = list(self.steps)
        if last is not None:
            steps = steps[-last:]
        how = "MTF" if self.method == "mtf" else "single-step"
        lines = [f"# {how} trace: {len(steps)} entries shown, {self.count} instructions stepped "
                 f"on vCPU {self.vcpu} (the last is the next to execute)"]
        for step in steps + ([self.position] if self.position is not None else []):
            if step.window:
                lines.append(f"{step.address:#010x} {symbolize(step.address):<22} {step.code.hex(' '):<30} "
                             f"{step.text}")
            else:
                lines.append(f"{step.address:#010x} (no code: unreadable)")
            if step.exit:
                lines.append(f"   -- exit {step.exit}")
        return "\n".join(lines)


def trace_config(config, *, max_steps: int = 1000, out: TextIO | None = None,
                 as_json: bool = False, vcpu: int = 0) -> TraceResult:
    """Build the config's machine and trace up to `max_steps` instructions of vCPU `vcpu`
    to `out`, then a summary line."""
    from .config import build_machine
    out = out or sys.stdout

    def emit(step: TraceStep) -> None:
        print(json.dumps(step.to_json()) if as_json else step.format(), file=out)

    with build_machine(config, capture_console=True) as machine:
        tracer = Tracer(machine, emit, max_steps, vcpu=vcpu)
        result = tracer.run(timeout=config.machine.timeout, max_exits=config.machine.max_exits)
    summary = {"result": result.reason, "exit_code": result.exit_code, "steps": result.steps,
               "message": result.message, "console": result.console}
    if as_json:
        print(json.dumps(summary), file=out)
    else:
        text = f"# {result.steps} instructions; {result.reason}"
        if result.exit_code is not None:
            text += f" code={result.exit_code}"
        if result.message:
            text += f": {result.message}"
        print(text, file=out)
    return result
