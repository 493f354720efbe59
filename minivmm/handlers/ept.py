"""Default EPT-misconfiguration handler: an access to a guest-physical address nothing maps.

(EPT violations, on pages whose permissions forbid the access, are handled by
`minivmm.ept.EptShadow`, which installs its own default.)
"""
from __future__ import annotations

from ..actions import Stop


def stop_on_unmapped(vcpu, info):
    exit = info.raw_kvm_exit
    what = "write to" if exit.is_write else "read from"
    return Stop("error", message=f"EPT misconfiguration: {exit.length}-byte {what} unmapped "
                                 f"guest-physical address {exit.phys_addr:#x} at rip={vcpu.rip:#x}")
