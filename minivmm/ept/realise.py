"""How the EPT model's rights are realised on KVM, and which host protection this host honours.

KVM owns the real second-level page tables, so each page's effective
permissions are realised with what KVM offers to user space
(Documentation/virt/kvm/api.rst 4.35 KVM_SET_USER_MEMORY_REGION):

| EPT permissions | realised as                                                  |
|-----------------|--------------------------------------------------------------|
| rwx             | an ordinary memslot                                          |
| r-x             | a KVM_MEM_READONLY memslot (writes exit as KVM_EXIT_MMIO), or|
|                 | host page protection (mprotect PROT_READ) where a probe shows |
|                 | that this host turns such writes into KVM_EXIT_MMIO          |
| anything else   | a hole in the memslots: data accesses exit as KVM_EXIT_MMIO  |
|                 | and are emulated here from the backing memory when the       |
|                 | permissions allow them; an instruction fetch is an emulation |
|                 | failure at RIP = the target (an execute violation)           |

A CPL-3 store to a PROT_READ host page fails KVM_RUN with EFAULT on the
project's pagetable-based nested host (kvm-host-notes.md), while a CPL-0
store (emulated there) exits as MMIO: `host_backend()` probes both and uses
host protection only when both exit as MMIO.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from enum import IntEnum

from ..kvm import ExitKind, MemoryFlag, decode_exit
from ..memory import PAGE_SIZE

__all__ = ["host_backend", "host_protection_works"]


class _Kind(IntEnum):
    NORMAL = 0          # ordinary memslot
    READONLY = 1        # KVM_MEM_READONLY slot or mprotect(PROT_READ)
    HOLE = 2            # no memslot


_KIND_OF = tuple(_Kind.NORMAL if p == 7 else _Kind.READONLY if p == 5 else _Kind.HOLE for p in range(8))
_KIND_OF_MPROTECT = tuple(_Kind.NORMAL if k == _Kind.READONLY else k for k in _KIND_OF)
_NORMAL_KIND, _READONLY_KIND, _HOLE_KIND = _Kind.NORMAL, _Kind.READONLY, _Kind.HOLE
_MEM_LOG, _MEM_READONLY = int(MemoryFlag.LOG_DIRTY_PAGES), int(MemoryFlag.READONLY)


def _kind(perms: int) -> _Kind:
    """How KVM must see a page with these EPT rights (see the module table)."""
    return _KIND_OF[perms]


@dataclass(eq=False)
class _Slot:
    slot: int
    gpa: int
    size: int
    flags: int
    bitmap: ctypes.Array | None = None


# --- host page protection: probed once per process -------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_MAP_FIXED = 0x10
_backend_cache: dict[str, str] = {}


def _mprotect(addr: int, size: int, prot: int) -> None:
    if _libc.mprotect(addr, size, prot) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mprotect({addr:#x}, {size:#x}, {prot}) failed: {os.strerror(err)}")


def host_backend(kvm_path: str = "/dev/kvm") -> str:
    """How this host realises write protection: "mprotect" or "memslot" (probed once per process).

    The probe makes a tiny machine in user mode (native CPL 3 on the project's
    hosts) and one in long mode (CPL 0, emulated there), write-protects a data
    page through the host mapping exactly as the mprotect backend does, and
    runs one store to it. Only when KVM reports both stores as KVM_EXIT_MMIO
    writes is host page protection used (about 7 us per toggle instead of
    several memslot ioctls); stock KVM answers -EFAULT or KVM_EXIT_MEMORY_FAULT,
    and the project's nested host does so for CPL-3 stores, so they get
    read-only memslots. MINIVMM_EPT_BACKEND=memslot skips the probe.
    """
    cached = _backend_cache.get(kvm_path)
    if cached is None:
        forced = os.environ.get("MINIVMM_EPT_BACKEND", "")
        cached = "memslot" if forced == "memslot" else _probe_mprotect(kvm_path)
        _backend_cache[kvm_path] = cached
    return cached


_PROBE_PAGE = 0x180000
_PROBE_CODE = bytes.fromhex("b85a000000" "890425" "00001800" "f4")   # mov $0x5a,%eax; mov %eax,(0x180000); hlt


def _probe_mprotect(kvm_path: str) -> str:
    if all(host_protection_works(mode, kvm_path) for mode in ("user", "long")):
        return "mprotect"
    return "memslot"


def host_protection_works(mode: str = "user", kvm_path: str = "/dev/kvm") -> bool:
    """Whether a guest store (in `mode`) to a PROT_READ host page exits as KVM_EXIT_MMIO here."""
    from ..machine import Machine
    from .shadow import EptShadow
    try:
        with Machine("2M", mode, kvm_path=kvm_path) as machine:
            machine.load(_PROBE_CODE, 0x100000)
            shadow = EptShadow(machine, backend="mprotect")
            machine._ept = shadow
            shadow.protect(_PROBE_PAGE, PAGE_SIZE, "r-x")
            shadow.invept()
            machine.setup()
            kind = machine.vcpu.run_once()     # no run timer: the store or the hlt exits at once
            if kind != ExitKind.MMIO:
                return False
            exit = decode_exit(machine.vcpu.fd.run)
            return (exit.is_write and exit.phys_addr == _PROBE_PAGE and exit.data[:1] == b"\x5a"
                    and machine.memory.read(_PROBE_PAGE, 1) == b"\0")
    except (OSError, RuntimeError, ValueError):
        return False


