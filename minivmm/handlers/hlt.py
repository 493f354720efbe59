"""Default HLT handler: the guest is done; the run ends with reason "hlt"."""
from __future__ import annotations

from ..actions import Stop


def stop_on_hlt(vcpu, info):
    return Stop("hlt")
