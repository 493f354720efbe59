"""EPT: a model of Intel's extended page tables over guest RAM, realised on KVM.

`tables` is the paging model, `realise` puts its rights into KVM memslots and
host page protection, `dirty` reads KVM's dirty log, `hooks` and `mmio` keep
hooks and MMIO devices, and `shadow.EptShadow` coordinates them for a machine.
"""
from .hooks import EptAccess, Hook, HookEvent
from .mmio import MmioDevice
from .realise import host_backend, host_protection_works
from .shadow import EptShadow
from .tables import EptError, EptFlag, EptMemoryType, EptPointerFlag, EptTables, EptWalk, Perm, parse_perms

__all__ = ["EptShadow", "EptTables", "EptWalk", "EptFlag", "EptMemoryType", "EptPointerFlag",
           "Perm", "parse_perms", "Hook", "HookEvent", "EptAccess", "MmioDevice", "EptError",
           "host_backend"]
