"""Default EPT handlers: an access to a guest-physical address nothing maps (EPT
misconfiguration), and an EPT violation while the machine has no EPT model (memory KVM could
not map). `minivmm.ept.EptShadow` installs its own EPT-violation default when it is made.
"""
from __future__ import annotations

from ..actions import Stop


def stop_on_unmapped(vcpu, info):
    exit = info.raw_kvm_exit
    what = "write to" if exit.is_write else "read from"
    return Stop("error", message=f"EPT misconfiguration: {exit.length}-byte {what} unmapped "
                                 f"guest-physical address {exit.phys_addr:#x} at rip={vcpu.rip:#x}")


def stop_on_violation(vcpu, info):
    """Without an EPT model (`machine.ept`) an EPT violation can only be KVM's: memory it
    could not map for the guest (KVM_EXIT_MEMORY_FAULT)."""
    return Stop("error", message=f"EPT violation: the host could not map guest-physical address "
                                 f"{info.guest_physical_address:#x} at rip={vcpu.rip:#x}")
