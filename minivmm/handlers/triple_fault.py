"""Default handlers for exits after which the guest cannot go on: triple fault and VM-entry failure."""
from __future__ import annotations

from ..actions import Stop


def stop_on_triple_fault(vcpu, info):
    return Stop("triple_fault", message="triple fault")


def stop_on_invalid_guest_state(vcpu, info):
    return Stop("error", message=f"VM entry failed: invalid guest state "
                                 f"(hardware reason {info.qualification:#x})")
