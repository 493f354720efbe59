"""Instruction tracing: single-step a guest and describe every instruction.

Each step is one monitor-trap-flag exit (`Machine.step_once`, which is
KVM_GUESTDBG_SINGLESTEP on KVM). An instruction that exits by itself (an
`out`, `hlt`, an MMIO access) reports that exit instead of a step; the
tracer then prints the instruction with the exit it caused, and the next
step covers the instruction after it.

    0x00100000  8d 34 25 18 00 10 00  lea esi, [0x100018]   rsi=0x100018
    0x00100010  ee                    out dx, al            [IO_INSTRUCTION out port=0x3f8]
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from .disasm import disassemble
from .errors import MinivmmError
from .actions import RETRY
from .exits import ExitReason, Vector, vector_name
from .modes import Mode

RFLAGS_TF = 0x100
RFLAGS_RF = 0x10000
TRACED_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                    "r12", "r13", "r14", "r15", "rflags")


@dataclass
class TraceStep:
    """One executed instruction."""
    index: int
    address: int                 # linear address (CS base + RIP)
    code: bytes
    text: str
    changes: dict[str, int] = field(default_factory=dict)
    exit: str | None = None      # the VM exit the instruction caused, if any

    def to_json(self) -> dict[str, Any]:
        return {"step": self.index, "address": self.address, "bytes": self.code.hex(),
                "disasm": self.text, "changes": self.changes, "exit": self.exit}

    def format(self) -> str:
        changes = " ".join(f"{name}={value:#x}" for name, value in self.changes.items())
        text = f"{self.address:#010x}  {self.code.hex(' '):<24}  {self.text:<32}"
        if changes:
            text += f"  {changes}"
        if self.exit:
            text += f"  [{self.exit}]"
        return text.rstrip()


@dataclass
class TraceResult:
    reason: str                  # a RunResult reason, or "step_limit"
    exit_code: int | None
    steps: int
    message: str = ""
    console: str = ""


class _StepLimit(MinivmmError):
    """Raised from a pre-entry hook to end the run once enough steps were traced."""


class Tracer:
    """Single-steps `machine` and calls `emit(step)` for each instruction."""

    def __init__(self, machine, emit, max_steps: int = 1000) -> None:
        self.machine = machine
        self.emit = emit
        self.max_steps = max_steps
        self.count = 0
        self._previous: tuple[int, int, dict[str, int]] | None = None

    def _state(self) -> tuple[int, int, dict[str, int]]:
        vcpu = self.machine.vcpu
        cs = vcpu.segment("cs")
        bits = 64 if cs.l else 32 if cs.db else 16
        regs = {name: getattr(vcpu, name) for name in TRACED_REGISTERS}
        regs["rflags"] &= ~(RFLAGS_TF | RFLAGS_RF)
        return cs.base + vcpu.rip, bits, regs

    def _fetch(self, address: int, bits: int) -> tuple[bytes, str]:
        memory = self.machine.memory
        region = memory.region_at(address)
        if region is None:
            return b"", "(not in guest RAM)"
        code = memory.read(address, min(15, region.end - address))
        insns = disassemble(code, address, bits, 1)
        if not insns:
            return code[:1], "(bad)"
        return insns[0][1], insns[0][2]

    def _record(self, exit: str | None) -> None:
        """The instruction at the last entry's RIP has run (or exited): describe it."""
        previous = self._previous
        if previous is None:
            return
        now = self._state()
        address, bits, before = previous
        code, text = self._fetch(address, bits)
        changes = {name: value for name, value in now[2].items() if before.get(name) != value}
        self.count += 1
        self.emit(TraceStep(self.count, address, code, text, changes, exit))
        self._previous = None

    def _before_entry(self) -> None:
        """Snapshot the state the next instruction starts from (after every handler ran)."""
        if self._previous is not None:
            now = self._state()
            if now[0] != self._previous[0] or now[2] != self._previous[2]:
                # an exit the tracer does not observe (an emulated EPT access, a hook that
                # moved RIP) completed or skipped the instruction without a step
                self._record("completed by the VMM")
        if self.count >= self.max_steps:
            raise _StepLimit()
        self._previous = self._state()

    def _on_step(self, vcpu) -> None:
        self._record(None)
        self.machine.step_once(self._on_step)

    def _on_user_step(self, vcpu, info):
        """User mode: CPL-3 code runs natively, so steps come from RFLAGS.TF: a #DB trap
        through the built-in kernel after every instruction."""
        previous = self._previous
        if previous is not None and (self._state()[0] != previous[0] or self._state()[2] != previous[2]):
            self._record(None)
        vcpu.rflags |= RFLAGS_TF
        return RETRY

    def _on_exit(self, vcpu, info) -> None:
        exit = info.reason.name
        detail = info.raw_kvm_exit
        if info.reason == ExitReason.IO_INSTRUCTION and detail is not None:
            exit += f" {'out' if detail.is_out else 'in'} port={detail.port:#x}"
        elif info.reason in (ExitReason.EPT_VIOLATION, ExitReason.EPT_MISCONFIGURATION):
            exit += f" gpa={info.guest_physical_address:#x}"
        if info.reason == ExitReason.EXCEPTION_OR_NMI:
            vector = info.interruption_info & 0xFF
            if vector == Vector.DB:
                return None
            exit += f" {vector_name(vector)}"
        self._record(exit)
        return None

    def run(self, timeout: float | None = None, max_exits: int | None = None) -> TraceResult:
        machine = self.machine
        if not machine._started:
            machine.setup()
        for reason in (ExitReason.IO_INSTRUCTION, ExitReason.EXECUTE_HLT, ExitReason.EPT_VIOLATION,
                       ExitReason.EPT_MISCONFIGURATION, ExitReason.EXECUTE_VMCALL,
                       ExitReason.EXECUTE_RDMSR, ExitReason.EXECUTE_WRMSR, ExitReason.TRIPLE_FAULT):
            machine.on(reason, self._on_exit)
        machine.pre_entry.append(self._before_entry)
        if machine.mode is Mode.USER:
            # every exception reaches the VMM in user mode anyway: observing them changes nothing
            machine.on(ExitReason.EXCEPTION_OR_NMI, self._on_exit)
            machine.on(ExitReason.EXCEPTION_OR_NMI, self._on_user_step, vector=int(Vector.DB))
            machine.vcpu.rflags |= RFLAGS_TF
        else:
            machine.step_once(self._on_step)
        try:
            result = machine.run(timeout=timeout, max_exits=max_exits)
        except _StepLimit:
            return TraceResult("step_limit", None, self.count, f"stopped after {self.count} instructions",
                               machine.serial.text)
        finally:
            machine.pre_entry.remove(self._before_entry)
        return TraceResult(result.reason, result.exit_code, self.count, result.message, result.console)


def trace_config(config, *, max_steps: int = 1000, out: TextIO | None = None,
                 as_json: bool = False) -> TraceResult:
    """Build the config's machine and trace up to `max_steps` instructions to `out`."""
    from .config import build_machine
    out = out or sys.stdout

    def emit(step: TraceStep) -> None:
        print(json.dumps(step.to_json()) if as_json else step.format(), file=out)

    with build_machine(config, capture_console=True) as machine:
        tracer = Tracer(machine, emit, max_steps)
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
