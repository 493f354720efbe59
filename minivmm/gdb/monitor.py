"""gdb's `monitor` commands (qRcmd): what a hypervisor debugger shows beside the registers.

    monitor vmcs [FILTER]  the VMCS fields (SDM vol. 3C appendix B names) this vCPU's
                           model can read, optionally only those containing FILTER
    monitor exits          exit counts and handler time by VMX exit reason
    monitor ept ADDR       the EPT walk of guest-physical ADDR: entries per level, rights
    monitor caps           KVM capabilities and the IA32_VMX_* capability MSRs
    monitor help           this list
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..vmcs_fields import VmcsField

if TYPE_CHECKING:
    from ..machine import Machine
    from ..runloop import VcpuContext

__all__ = ["run_monitor"]

_LEVELS = ("PML4E", "PDPTE", "PDE", "PTE")


def run_monitor(machine: "Machine", ctx: "VcpuContext", command: str) -> str:
    """The text a monitor command prints (errors are text too: gdb shows them)."""
    words = command.split()
    if not words or words[0] == "help":
        return __doc__.split("\n\n", 1)[1].rstrip()
    name, args = words[0], words[1:]
    try:
        if name == "vmcs":
            return vmcs_text(ctx, args[0] if args else "")
        if name == "exits":
            return exits_text(ctx)
        if name == "ept" and len(args) == 1:
            return ept_text(machine, int(args[0], 0))
        if name == "caps":
            return caps_text(machine)
    except Exception as exc:
        return f"monitor {name}: {type(exc).__name__}: {exc}"
    return f"unknown monitor command {command!r}; try `monitor help`"


def vmcs_text(ctx: "VcpuContext", needle: str = "") -> str:
    lines = [f"VMCS of vCPU {ctx.index}"]
    for field in VmcsField:
        if needle.upper() not in field.name:
            continue
        try:
            value = ctx.vmcs.read(field)
        except Exception:
            continue                     # host-state and unmodelled fields
        lines.append(f"{field.name:<56} {value:#x}")
    return "\n".join(lines)


def exits_text(ctx: "VcpuContext") -> str:
    if not ctx.stats:
        return f"vCPU {ctx.index}: no exits yet"
    lines = [f"vCPU {ctx.index}: {'exit reason':<36} {'count':>10} {'handler s':>10}"]
    for name, stat in sorted(ctx.stats.items(), key=lambda item: -item[1].count):
        lines.append(f"        {name:<36} {stat.count:>10} {stat.handler_seconds:>10.6f}")
    return "\n".join(lines)


def ept_text(machine: "Machine", gpa: int) -> str:
    ept = machine.ept
    walk = ept.walk(gpa)
    lines = [f"EPT walk of guest-physical {gpa:#x} (EPTP {ept.eptp:#x}, backend {ept.backend})"]
    for level, entry in zip(_LEVELS, walk.entries):
        lines.append(f"  {level:<6} {entry:#018x}  {_rights(entry)}")
    if not walk.present:
        lines.append("  not present: any access is an EPT violation")
    else:
        lines.append(f"  leaf: {walk.page_size >> 10} KiB page, rights {_rights(int(walk.perms))}, "
                     f"memory type {walk.memory_type.name}, effective with hooks {_rights(int(ept.perms(gpa)))}")
    return "\n".join(lines)


def _rights(bits: int) -> str:
    return "".join(flag if bits >> i & 1 else "-" for i, flag in enumerate("rwx"))


def caps_text(machine: "Machine") -> str:
    from ..vmcs import capability_table
    return capability_table(machine.kvm)
