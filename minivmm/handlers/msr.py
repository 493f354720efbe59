"""Default RDMSR/WRMSR handlers: the real MSR, through KVM_GET_MSRS / KVM_SET_MSRS.

An MSR KVM does not know, or a value it refuses, raises #GP in the guest as
the CPU would.
"""
from __future__ import annotations

from ..actions import Inject
from ..exits import Vector
from ..kvm import KvmError


def passthrough_rdmsr(vcpu, info):
    values = vcpu.fd.get_msrs([info.msr])
    if info.msr not in values:
        return Inject(Vector.GP, 0)
    info.data = values[info.msr]
    return None


def passthrough_wrmsr(vcpu, info):
    try:
        vcpu.fd.set_msrs({info.msr: info.data})
    except KvmError:
        return Inject(Vector.GP, 0)
    return None
