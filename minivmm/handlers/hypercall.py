"""Default VMCALL handler (the hypercall port): unknown numbers answer -KVM_ENOSYS.

ABI: `out %al, $0xf5` with the number in RAX, arguments in RBX, RCX, RDX,
RSI and the result in RAX. KVM never lets VMCALL itself reach user space.
"""
from __future__ import annotations

from ..actions import Reply

KVM_ENOSYS = 1000        # what KVM's own hypercall ABI answers for an unknown number


_UNKNOWN = Reply(-KVM_ENOSYS)


def unknown_hypercall(vcpu, info):
    return _UNKNOWN
