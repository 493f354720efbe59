"""Default RDMSR/WRMSR handlers: the real MSR (`Passthrough`, carried out by the run loop
through KVM_GET_MSRS / KVM_SET_MSRS).

An MSR KVM does not know, or a value it refuses, raises #GP in the guest as
the CPU would.
"""
from __future__ import annotations

from ..actions import PASSTHROUGH


def passthrough_rdmsr(vcpu, info):
    return PASSTHROUGH


def passthrough_wrmsr(vcpu, info):
    return PASSTHROUGH
