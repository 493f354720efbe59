"""Rule compilers: a validated rule of a config in, the exit handler (or EPT callback) that does it out.

Each compiler closes over the `ConfiguredMachine` for its counters and event
log; the builder (`minivmm.config.build`) registers what they return. A
handler follows the dispatcher's contract (`handler(vcpu, info) -> Action |
None`, None passing the exit on); an EPT callback returns a `Stop` to end the
run (the access itself is completed either way).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..actions import RESUME, RETRY, Inject, Reply, Stop
from ..disasm import instruction_length
from ..exits import ExitReason, Vector, vector_name
from ..modes import CODE_BITS, Mode

if TYPE_CHECKING:
    from ..machine import Machine
    from ..vcpu import Vcpu
    from .build import ConfiguredMachine
    from .rule_types import ExceptionRule, HookRule, HypercallRule, IoRule, MmioRule, MonitorRule, MsrRule


def _instruction_length(machine: Machine, vcpu: Vcpu) -> int:
    address = vcpu.rip
    if machine.mode is Mode.REAL:
        address += vcpu.segment("cs").base
    region = machine.memory.region_at(address)
    if region is None:
        return 0
    code = machine.memory.read(address, min(15, region.end - address))
    return instruction_length(code, CODE_BITS[machine.mode])


def _skip(machine: Machine, vcpu: Vcpu, length: int = 0) -> None:
    length = length or _instruction_length(machine, vcpu)
    if not length:
        raise RuntimeError(f"cannot decode the instruction at rip={vcpu.rip:#x} to skip it")
    vcpu.rip += length


# ---------------------------------------------------------------------------
# devices: hypercalls and MMIO


def hypercall_handler(machine: ConfiguredMachine, rule: HypercallRule) -> Callable:
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


def mmio_handler(machine: ConfiguredMachine, rule: MmioRule) -> Callable:
    def handler(vcpu, info):
        machine.count(rule.name)
        exit = info.raw_kvm_exit
        if rule.log or rule.action == "log":
            what = "write" if getattr(exit, "is_write", False) else "read"
            machine.log(f"{rule.name}: {what} at {info.guest_physical_address:#x} rip={vcpu.rip:#x}")
        if rule.action == "stop":
            return Stop("stopped", message=f"{rule.name}: access to {info.guest_physical_address:#x} "
                                           f"at rip={vcpu.rip:#x}")
        if exit is not None and not getattr(exit, "is_write", True):
            return Reply(rule.value)
        return RESUME
    return handler


# ---------------------------------------------------------------------------
# VMCS: exceptions, MSRs, I/O ports


def exception_handler(machine: ConfiguredMachine, rule: ExceptionRule) -> Callable:
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


def msr_handler(machine: ConfiguredMachine, rule: MsrRule) -> Callable:
    def handler(vcpu, info):
        write = info.reason == ExitReason.EXECUTE_WRMSR
        machine.count(rule.name)
        if rule.log or rule.action == "log":
            text = f"wrmsr {info.msr:#x} <- {info.data:#x}" if write else f"rdmsr {info.msr:#x}"
            machine.log(f"{rule.name}: {text} at rip={vcpu.rip:#x}")
        if rule.action == "deny":
            return Inject(Vector.GP, 0)
        if rule.action == "fixed":
            return RESUME if write else Reply(rule.value)
        return None
    return handler


def io_handler(machine: ConfiguredMachine, rule: IoRule) -> Callable:
    def handler(vcpu, info):
        machine.count(rule.name)
        port, size = info.port, info.size
        if rule.log or rule.action == "log":
            if info.is_in:
                machine.log(f"{rule.name}: in {port:#x} at rip={vcpu.rip:#x}")
            else:
                value = int.from_bytes(info.string_data[:size], "little") if info.string_data is not None \
                    else info.data
                machine.log(f"{rule.name}: out {port:#x} <- {value:#x} at rip={vcpu.rip:#x}")
        if rule.action == "stop":
            return Stop("stopped", message=f"{rule.name}: port {port:#x} at rip={vcpu.rip:#x}")
        if rule.action in ("ignore", "fixed"):
            if info.is_in:
                value = rule.value if rule.value is not None else (1 << (8 * size)) - 1
                return Reply(value & (1 << (8 * size)) - 1)          # every item reads it
            return RESUME
        return None
    return handler


# ---------------------------------------------------------------------------
# EPT: monitors and execute hooks


def monitor_callback(machine: ConfiguredMachine, rule: MonitorRule) -> Callable:
    def callback(event):
        machine.count(rule.name)
        if rule.log or rule.action == "log":
            kind = "write" if getattr(event, "is_write", False) else "access"
            value = getattr(event, "value", None)
            shown = f" value={value:#x}" if isinstance(value, int) else ""
            machine.log(f"{rule.name}: {kind} of {getattr(event, 'size', 0)} bytes at "
                        f"{event.address:#x}{shown} rip={getattr(event, 'rip', 0):#x}")
        if rule.action == "stop":
            return Stop("stopped", message=f"{rule.name}: {getattr(event, 'kind', 'access')} of "
                                           f"{event.address:#x} at rip={getattr(event, 'rip', 0):#x}")
        return None
    return callback


def hook_callback(machine: ConfiguredMachine, rule: HookRule, address: int) -> Callable:
    def callback(event):
        vcpu = getattr(event, "vcpu", None) or machine.vcpu
        machine.count(rule.name)
        if rule.log or rule.action == "log":
            machine.log(f"{rule.name}: executed {address:#x} rax={vcpu.rax:#x}")
        if rule.action == "stop":
            return Stop("stopped", message=f"{rule.name}: execution reached {address:#x}")
        if rule.action == "skip":
            _skip(machine, vcpu)      # the hook then runs the instruction at the new rip
        return None
    return callback
