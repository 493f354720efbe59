"""ctypes bindings of the KVM API (Documentation/virt/kvm/api.rst).

Shaped like rust-vmm's kvm-ioctls: `Kvm` (the system fd), `VmFd` and `VcpuFd`,
one method per ioctl, named after it, without policy. This is the only Python
module that issues KVM ioctls (the C hot paths of `minivmm.fastpath` aside). Struct layouts follow the
x86-64 ABI of the running kernel, not the installed headers; constants newer
than Linux 6.1 headers are defined here. Every exit read from `kvm_run`
decodes to one of the closed set of exit types listed in `KvmExit`.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Iterable, Union

from .errors import MinivmmError

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

KVM_API_VERSION = 12
DEFAULT_KVM_PATH = "/dev/kvm"
KVM_PATH_ENV = "MINIVMM_KVM_PATH"      # points minivmm (and its pytest plugin) at another device


def kvm_path() -> str:
    """The KVM device to open: `$MINIVMM_KVM_PATH`, else /dev/kvm."""
    return os.environ.get(KVM_PATH_ENV) or DEFAULT_KVM_PATH


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) -----------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


# --- structs --------------------------------------------------------------------
class KvmRegs(_Struct):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(_Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class KvmDtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class KvmSregs(_Struct):
    _fields_ = [*((n, KvmSegment) for n in SEGMENT_NAMES),
                ("gdt", KvmDtable), ("idt", KvmDtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class KvmFpu(_Struct):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class KvmXsave(_Struct):
    _fields_ = [("region", u32 * 1024)]


class KvmXcr(_Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class KvmXcrs(_Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * 16), ("padding", u64 * 16)]


class KvmMsrEntry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrsHeader(_Struct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class KvmMsrListHeader(_Struct):
    _fields_ = [("nmsrs", u32)]


class KvmCpuidEntry2(_Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class KvmCpuid2Header(_Struct):
    _fields_ = [("nent", u32), ("padding", u32)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class KvmDebugregs(_Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class _EventException(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _EventInterrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _EventNmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _EventSmi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class KvmVcpuEvents(_Struct):
    _fields_ = [("exception", _EventException), ("interrupt", _EventInterrupt),
                ("nmi", _EventNmi), ("sipi_vector", u32), ("flags", u32), ("smi", _EventSmi),
                ("triple_fault_pending", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class KvmVcpuEventsFlag(IntFlag):
    NMI_PENDING = 1 << 0
    SIPI_VECTOR = 1 << 1
    SHADOW = 1 << 2
    SMM = 1 << 3
    PAYLOAD = 1 << 4
    TRIPLE_FAULT = 1 << 5


class KvmMpState(_Struct):
    _fields_ = [("mp_state", u32)]


class MpState(IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


class KvmGuestDebug(_Struct):
    _fields_ = [("control", u32), ("pad", u32), ("debugreg", u64 * 8)]


class GuestDebugFlag(IntFlag):
    """KVM_GUESTDBG_* (api.rst 4.59 KVM_SET_GUEST_DEBUG)."""
    ENABLE = 0x1
    SINGLESTEP = 0x2
    USE_SW_BP = 0x10000
    USE_HW_BP = 0x20000
    INJECT_DB = 0x40000
    INJECT_BP = 0x80000
    BLOCKIRQ = 0x100000


class KvmEnableCap(_Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class KvmUserspaceMemoryRegion(_Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class MemoryFlag(IntFlag):
    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1


class KvmDirtyLog(_Struct):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmClearDirtyLog(_Struct):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class KvmMsrFilterRange(_Struct):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", u64)]


KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600


class KvmMsrFilter(_Struct):
    _fields_ = [("flags", u32), ("ranges", KvmMsrFilterRange * KVM_MSR_FILTER_MAX_RANGES)]


class MsrFilterFlag(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1


class MsrExitReasonFlag(IntFlag):
    """Arguments of KVM_CAP_X86_USER_SPACE_MSR and `run->msr.reason`."""
    INVAL = 1 << 0
    UNKNOWN = 1 << 1
    FILTER = 1 << 2


class KvmTranslation(_Struct):
    _fields_ = [("linear_address", u64), ("physical_address", u64), ("valid", u8),
                ("writeable", u8), ("usermode", u8), ("pad", u8 * 5)]


class KvmIrqLevel(_Struct):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmInterrupt(_Struct):
    _fields_ = [("irq", u32)]


class KvmPitConfig(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1
"""KVM_CREATE_PIT2 flag (api.rst 4.66): the kernel also serves port 0x61 (channel 2's gate and
output, the speaker bits)."""


class KvmDeviceAttr(_Struct):
    """struct kvm_device_attr (api.rst 4.80): `addr` is the user address of the value."""
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


# vCPU device attributes (Documentation/virt/kvm/devices/vcpu.rst, section 4)
KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0


# kvm_run and its exit union (include/uapi/linux/kvm.h)
class _ExitHw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class _ExitFailEntry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _ExitException(_Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _ExitIo(_Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _ExitDebug(_Struct):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class _ExitMmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _ExitHypercall(_Struct):
    _fields_ = [("nr", u64), ("args", u64 * 6), ("ret", u64), ("flags", u64)]


class _ExitInternal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _ExitSystemEvent(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _ExitMsr(_Struct):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class _ExitMemoryFault(_Struct):
    _fields_ = [("flags", u64), ("gpa", u64), ("size", u64)]


class _ExitUnion(ctypes.Union):
    _fields_ = [("hw", _ExitHw), ("fail_entry", _ExitFailEntry), ("ex", _ExitException),
                ("io", _ExitIo), ("debug", _ExitDebug), ("mmio", _ExitMmio),
                ("hypercall", _ExitHypercall), ("internal", _ExitInternal),
                ("system_event", _ExitSystemEvent), ("msr", _ExitMsr),
                ("memory_fault", _ExitMemoryFault), ("padding", ctypes.c_char * 256)]


class KvmSyncRegs(_Struct):
    _fields_ = [("regs", KvmRegs), ("sregs", KvmSregs), ("events", KvmVcpuEvents)]


class _SyncUnion(ctypes.Union):
    _fields_ = [("regs", KvmSyncRegs), ("padding", ctypes.c_char * 2048)]


class KvmRun(_Struct):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", _ExitUnion),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", _SyncUnion)]


class SyncRegsFlag(IntFlag):
    REGS = 1 << 0
    SREGS = 1 << 1
    EVENTS = 1 << 2


# --- ioctl numbers --------------------------------------------------------------
class Ioctl(IntEnum):
    KVM_GET_API_VERSION = _io(0x00)
    KVM_CREATE_VM = _io(0x01)
    KVM_GET_MSR_INDEX_LIST = _iowr(0x02, KvmMsrListHeader)
    KVM_CHECK_EXTENSION = _io(0x03)
    KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
    KVM_GET_SUPPORTED_CPUID = _iowr(0x05, KvmCpuid2Header)
    KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, KvmMsrListHeader)
    KVM_CREATE_VCPU = _io(0x41)
    KVM_GET_DIRTY_LOG = _iow(0x42, KvmDirtyLog)
    KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
    KVM_SET_TSS_ADDR = _io(0x47)
    KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, u64)
    KVM_CREATE_IRQCHIP = _io(0x60)
    KVM_IRQ_LINE = _iow(0x61, KvmIrqLevel)
    KVM_CREATE_PIT2 = _iow(0x77, KvmPitConfig)
    KVM_RUN = _io(0x80)
    KVM_GET_REGS = _ior(0x81, KvmRegs)
    KVM_SET_REGS = _iow(0x82, KvmRegs)
    KVM_GET_SREGS = _ior(0x83, KvmSregs)
    KVM_SET_SREGS = _iow(0x84, KvmSregs)
    KVM_TRANSLATE = _iowr(0x85, KvmTranslation)
    KVM_INTERRUPT = _iow(0x86, KvmInterrupt)
    KVM_NMI = _io(0x9A)
    KVM_GET_MSRS = _iowr(0x88, KvmMsrsHeader)
    KVM_SET_MSRS = _iow(0x89, KvmMsrsHeader)
    KVM_GET_FPU = _ior(0x8C, KvmFpu)
    KVM_SET_FPU = _iow(0x8D, KvmFpu)
    KVM_SET_CPUID2 = _iow(0x90, KvmCpuid2Header)
    KVM_GET_CPUID2 = _iowr(0x91, KvmCpuid2Header)
    KVM_GET_MP_STATE = _ior(0x98, KvmMpState)
    KVM_SET_MP_STATE = _iow(0x99, KvmMpState)
    KVM_SET_GUEST_DEBUG = _iow(0x9B, KvmGuestDebug)
    KVM_GET_VCPU_EVENTS = _ior(0x9F, KvmVcpuEvents)
    KVM_SET_VCPU_EVENTS = _iow(0xA0, KvmVcpuEvents)
    KVM_GET_DEBUGREGS = _ior(0xA1, KvmDebugregs)
    KVM_SET_DEBUGREGS = _iow(0xA2, KvmDebugregs)
    KVM_SET_TSC_KHZ = _io(0xA2)
    KVM_GET_TSC_KHZ = _io(0xA3)
    KVM_ENABLE_CAP = _iow(0xA3, KvmEnableCap)
    KVM_GET_XSAVE = _ior(0xA4, KvmXsave)
    KVM_SET_XSAVE = _iow(0xA5, KvmXsave)
    KVM_GET_XCRS = _ior(0xA6, KvmXcrs)
    KVM_SET_XCRS = _iow(0xA7, KvmXcrs)
    KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, KvmClearDirtyLog)
    KVM_X86_SET_MSR_FILTER = _iow(0xC6, KvmMsrFilter)
    KVM_SET_DEVICE_ATTR = _iow(0xE1, KvmDeviceAttr)
    KVM_GET_DEVICE_ATTR = _iow(0xE2, KvmDeviceAttr)
    KVM_HAS_DEVICE_ATTR = _iow(0xE3, KvmDeviceAttr)


class Cap(IntEnum):
    """KVM_CAP_* numbers (include/uapi/linux/kvm.h of Linux 6.18)."""
    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    SYNC_MMU = 16
    PIT2 = 33
    SET_GUEST_DEBUG = 23
    MP_STATE = 14
    VCPU_EVENTS = 41
    ADJUST_CLOCK = 39
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    READONLY_MEM = 81
    GUEST_DEBUG_HW_BPS = 119
    SPLIT_IRQCHIP = 121
    IMMEDIATE_EXIT = 136
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    EXCEPTION_PAYLOAD = 164
    SYNC_REGS = 74
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    DIRTY_LOG_RING = 192
    EXIT_HYPERCALL = 201
    XSAVE2 = 208
    X86_TRIPLE_FAULT_EVENT = 218
    MEMORY_FAULT_INFO = 232
    MEMORY_ATTRIBUTES = 233
    X86_SMM = 117
    NESTED_STATE = 157


KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


# --- errors ---------------------------------------------------------------------
_HINTS: dict[tuple[str, int], str] = {
    ("KVM_SET_USER_MEMORY_REGION", errno.EINVAL):
        "the slot overlaps another slot, or the address/size is not page aligned, "
        "or an existing slot was resized in place (delete it first)",
    ("KVM_SET_USER_MEMORY_REGION", errno.EEXIST): "the range overlaps an existing memory slot",
    ("KVM_SET_USER_MEMORY_REGION", errno.EFAULT): "the host mapping is not valid for the whole size",
    ("KVM_CREATE_VCPU", errno.EEXIST): "a vCPU with this id exists already",
    ("KVM_CREATE_VCPU", errno.EINVAL): "the vCPU id is above KVM_CAP_MAX_VCPU_ID",
    ("KVM_CREATE_VM", errno.ENOMEM): "the host could not allocate a VM (too many VMs or no memory)",
    ("KVM_SET_SREGS", errno.EINVAL): "the segment/control register state is invalid for this CPU",
    ("KVM_SET_MSRS", errno.EINVAL): "an MSR index is not supported by this host",
    ("KVM_ENABLE_CAP", errno.EINVAL): "the capability or its arguments are not supported by this host",
    ("KVM_X86_SET_MSR_FILTER", errno.EINVAL): "bad filter ranges (bitmap too large or overlapping)",
    ("KVM_SET_GUEST_DEBUG", errno.EINVAL): "a requested debug feature is not supported by this host",
    ("KVM_CLEAR_DIRTY_LOG", errno.EINVAL): "first_page/num_pages must be multiples of 64 within the slot, "
                                           "and manual dirty-log protect must be enabled",
    ("KVM_GET_DIRTY_LOG", errno.ENOENT): "the slot does not exist or does not log dirty pages",
}


class KvmError(MinivmmError, OSError):
    """A KVM ioctl failed: names the ioctl, the errno and a hint."""

    def __init__(self, ioctl: str, err: int, hint: str = "") -> None:
        self.ioctl = ioctl
        self.hint = hint or _HINTS.get((ioctl, err), "")
        msg = f"{ioctl} failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"
        if self.hint:
            msg += f": {self.hint}"
        super().__init__(err, msg)

    def __str__(self) -> str:
        return self.args[1]


class KvmUnavailableError(KvmError):
    """The KVM device node cannot be opened."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)


def _ioctl(fd: int, req: Ioctl, arg: int | ctypes.Array | ctypes.Structure = 0) -> int:
    if isinstance(arg, int) and arg > 0x7FFFFFFF:
        ret = _libc.ioctl(fd, req, arg)      # fcntl.ioctl takes only a C int argument
        if ret < 0:
            raise KvmError(req.name, ctypes.get_errno())
        return ret
    try:
        return fcntl.ioctl(fd, req, arg, True) if not isinstance(arg, int) else fcntl.ioctl(fd, req, arg)
    except OSError as exc:
        raise KvmError(req.name, exc.errno or 0) from None


def msrs_buffer(count: int) -> ctypes.Structure:
    """A struct kvm_msrs for `count` MSRs (`header.nmsrs` = count, `entries`), to fill
    in once and pass to `VcpuFd.get_msrs_into`/`set_msrs_from` again and again."""
    buf = _variable_type(KvmMsrsHeader, KvmMsrEntry, max(count, 1))()
    buf.header.nmsrs = count
    return buf


@functools.lru_cache(maxsize=64)
def _variable_type(header_type: type, entry_type: type, entries: int) -> type:
    class Variable(_Struct):
        _fields_ = [("header", header_type), ("entries", entry_type * entries)]
    return Variable


def _variable_struct(header_type: type, count_field: str, entry_type: type, entries: int):
    """A header followed by `entries` array elements, as KVM's flexible arrays."""
    buf = _variable_type(header_type, entry_type, entries)()
    setattr(buf.header, count_field, entries)
    return buf


# --- exits ----------------------------------------------------------------------
class ExitKind(IntEnum):
    """KVM_EXIT_* values of `kvm_run.exit_reason`."""
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    X86_BUS_LOCK = 33
    NOTIFY = 37
    MEMORY_FAULT = 39


class InternalErrorKind(IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


IO_DIRECTION_IN, IO_DIRECTION_OUT = 0, 1


@dataclass(slots=True)
class IoExit:
    """KVM_EXIT_IO: `count` items of `size` bytes at `data_offset` in the kvm_run page."""
    port: int
    size: int
    is_out: bool
    count: int
    data_offset: int


@dataclass(slots=True)
class MmioExit:
    """KVM_EXIT_MMIO: for a read, the reply goes back through `VcpuFd.set_mmio_data`."""
    phys_addr: int
    length: int
    is_write: bool
    data: bytes


@dataclass(slots=True)
class DebugExit:
    """KVM_EXIT_DEBUG: a debug exception (`exception` 1 or 3) at `pc`, with DR6 and DR7."""
    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(slots=True)
class HltExit:
    """KVM_EXIT_HLT."""
    pass


@dataclass(slots=True)
class ShutdownExit:
    """KVM_EXIT_SHUTDOWN: a triple fault."""
    pass


@dataclass(slots=True)
class FailEntryExit:
    """KVM_EXIT_FAIL_ENTRY: VM entry failed (the hardware reason) on `cpu`."""
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(slots=True)
class InternalErrorExit:
    """KVM_EXIT_INTERNAL_ERROR: `suberror` (see InternalErrorKind) and its data words."""
    suberror: int
    data: tuple[int, ...]

    def instruction_bytes(self) -> bytes:
        """The instruction bytes KVM reports for an emulation failure, if any.

        With KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES set in
        data[0] (the `emulation_failure` view of the union), the low byte of
        data[1] is the length and the bytes follow it.
        """
        if self.suberror != InternalErrorKind.EMULATION or len(self.data) < 2 or not self.data[0] & 1:
            return b""
        raw = b"".join(d.to_bytes(8, "little") for d in self.data[1:3])
        return raw[1: 1 + min(raw[0], 15)]


@dataclass(slots=True)
class MsrExit:
    """KVM_EXIT_X86_RDMSR / WRMSR; the reply goes back through `VcpuFd.set_msr_reply`."""
    is_write: bool
    index: int
    data: int
    reason: int


@dataclass(slots=True)
class IntrExit:
    """KVM_RUN returned EINTR (a signal) or honoured immediate_exit."""


@dataclass(slots=True)
class SystemEventExit:
    """KVM_EXIT_SYSTEM_EVENT: a shutdown, reset or crash request of `type`."""
    type: int
    data: tuple[int, ...]


@dataclass(slots=True)
class MemoryFaultExit:
    """KVM_EXIT_MEMORY_FAULT: an access KVM cannot resolve at `gpa`."""
    flags: int
    gpa: int
    size: int


@dataclass(slots=True)
class HypercallExit:
    """KVM_EXIT_HYPERCALL: hypercall `nr` with its arguments."""
    nr: int
    args: tuple[int, ...]


@dataclass(slots=True)
class ExceptionExit:
    """KVM_EXIT_EXCEPTION: an exception KVM hands to user space."""
    exception: int
    error_code: int


@dataclass(slots=True)
class OtherExit:
    """An exit kind minivmm does not act on (IRQ window, TPR, EOI, bus lock, ...)."""
    kind: int
    hardware_exit_reason: int


KvmExit = Union[IoExit, MmioExit, DebugExit, HltExit, ShutdownExit, FailEntryExit,
                InternalErrorExit, MsrExit, IntrExit, SystemEventExit, MemoryFaultExit,
                HypercallExit, ExceptionExit, OtherExit]

_HLT = HltExit()
_SHUTDOWN = ShutdownExit()
_INTR = IntrExit()


def decode_exit(run: KvmRun) -> KvmExit:
    """Decode `kvm_run`'s exit union into a typed exit."""
    kind = run.exit_reason
    ex = run.exit
    if kind == ExitKind.IO:
        io = ex.io
        return IoExit(io.port, io.size, io.direction == IO_DIRECTION_OUT, io.count, io.data_offset)
    if kind == ExitKind.MMIO:
        m = ex.mmio
        return MmioExit(m.phys_addr, m.len, bool(m.is_write), bytes(m.data)[: m.len])
    if kind == ExitKind.HLT:
        return _HLT
    if kind == ExitKind.DEBUG:
        d = ex.debug
        return DebugExit(d.exception, d.pc, d.dr6, d.dr7)
    if kind in (ExitKind.X86_RDMSR, ExitKind.X86_WRMSR):
        m = ex.msr
        return MsrExit(kind == ExitKind.X86_WRMSR, m.index, m.data, m.reason)
    if kind == ExitKind.SHUTDOWN:
        return _SHUTDOWN
    if kind == ExitKind.INTR:
        return _INTR
    if kind == ExitKind.FAIL_ENTRY:
        f = ex.fail_entry
        return FailEntryExit(f.hardware_entry_failure_reason, f.cpu)
    if kind == ExitKind.INTERNAL_ERROR:
        i = ex.internal
        return InternalErrorExit(i.suberror, tuple(i.data[: min(i.ndata, 16)]))
    if kind == ExitKind.SYSTEM_EVENT:
        s = ex.system_event
        return SystemEventExit(s.type, tuple(s.data[: min(s.ndata, 16)]))
    if kind == ExitKind.MEMORY_FAULT:
        f = ex.memory_fault
        return MemoryFaultExit(f.flags, f.gpa, f.size)
    if kind == ExitKind.HYPERCALL:
        h = ex.hypercall
        return HypercallExit(h.nr, tuple(h.args))
    if kind == ExitKind.EXCEPTION:
        return ExceptionExit(ex.ex.exception, ex.ex.error_code)
    return OtherExit(kind, ex.hw.hardware_exit_reason)


# --- file descriptors -----------------------------------------------------------
class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Kvm(_Fd):
    """The KVM system fd (`/dev/kvm`)."""

    def __init__(self, path: str | None = None) -> None:
        path = path or kvm_path()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            super().__init__(-1)
            hint = {
                errno.ENOENT: f"{path} does not exist: load the kvm module (modprobe kvm_intel / kvm_amd) "
                              "or enable virtualisation for this machine",
                errno.EACCES: f"no permission to open {path}: add your user to the 'kvm' group "
                              f"or run as root",
                errno.EPERM: f"no permission to open {path}",
            }.get(exc.errno or 0, f"cannot open {path}")
            raise KvmUnavailableError("open", exc.errno or 0, hint) from None
        super().__init__(fd)
        try:
            version = self.get_api_version()
        except KvmError as exc:
            self.close()
            raise KvmUnavailableError("KVM_GET_API_VERSION", exc.errno,
                                      f"{path} is not a KVM device") from None
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError("KVM_GET_API_VERSION", errno.EINVAL,
                                      f"API version {version}, expected {KVM_API_VERSION}")

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION (api.rst 4.1)."""
        return _ioctl(self.fd, Ioctl.KVM_GET_API_VERSION)

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the system fd (api.rst 4.4); 0 = unsupported."""
        return _ioctl(self.fd, Ioctl.KVM_CHECK_EXTENSION, int(cap))

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE (api.rst 4.5): size of the kvm_run mapping."""
        return _ioctl(self.fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, vm_type: int = 0) -> "VmFd":
        """KVM_CREATE_VM (api.rst 4.2)."""
        return VmFd(_ioctl(self.fd, Ioctl.KVM_CREATE_VM, vm_type), self.get_vcpu_mmap_size())

    def get_supported_cpuid(self, max_entries: int = 256) -> list[KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID (api.rst 4.46)."""
        buf = _variable_struct(KvmCpuid2Header, "nent", KvmCpuidEntry2, max_entries)
        _ioctl(self.fd, Ioctl.KVM_GET_SUPPORTED_CPUID, buf)
        return [KvmCpuidEntry2.from_buffer_copy(e) for e in buf.entries[: buf.header.nent]]

    def get_msr_index_list(self, max_entries: int = 1024) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST (api.rst 4.3): the MSRs saved/restored for migration."""
        return self._msr_list(Ioctl.KVM_GET_MSR_INDEX_LIST, max_entries)

    def get_msr_feature_index_list(self, max_entries: int = 256) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST (api.rst 4.3)."""
        return self._msr_list(Ioctl.KVM_GET_MSR_FEATURE_INDEX_LIST, max_entries)

    def _msr_list(self, req: Ioctl, max_entries: int) -> list[int]:
        buf = _variable_struct(KvmMsrListHeader, "nmsrs", u32, max_entries)
        _ioctl(self.fd, req, buf)
        return list(buf.entries[: buf.header.nmsrs])


class VmFd(_Fd):
    """A VM fd, from `Kvm.create_vm`."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self.vcpu_mmap_size = vcpu_mmap_size

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (api.rst 4.4)."""
        return _ioctl(self.fd, Ioctl.KVM_CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd (api.rst 4.37)."""
        req = KvmEnableCap(cap=int(cap), flags=flags)
        for i, value in enumerate(args):
            req.args[i] = value
        _ioctl(self.fd, Ioctl.KVM_ENABLE_CAP, req)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: MemoryFlag | int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION (api.rst 4.35); memory_size 0 deletes the slot."""
        region = KvmUserspaceMemoryRegion(slot, int(flags), guest_phys_addr, memory_size, userspace_addr)
        _ioctl(self.fd, Ioctl.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:
        """KVM_GET_DIRTY_LOG (api.rst 4.8): one bit per page of the slot into `bitmap`."""
        _ioctl(self.fd, Ioctl.KVM_GET_DIRTY_LOG, KvmDirtyLog(slot, 0, ctypes.addressof(bitmap)))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: ctypes.Array) -> None:
        """KVM_CLEAR_DIRTY_LOG (api.rst 4.118): re-protect the pages set in `bitmap`."""
        _ioctl(self.fd, Ioctl.KVM_CLEAR_DIRTY_LOG,
               KvmClearDirtyLog(slot, num_pages, first_page, ctypes.addressof(bitmap)))

    def set_msr_filter(self, default_deny: bool,
                       ranges: Iterable[tuple[MsrFilterFlag, int, ctypes.Array, int]]) -> None:
        """KVM_X86_SET_MSR_FILTER (api.rst 4.126).

        `ranges`: (flags, base MSR, bitmap, number of MSRs); a 1 bit allows
        the access, a 0 bit denies it (with KVM_CAP_X86_USER_SPACE_MSR's FILTER
        reason enabled the denied access exits to user space). At most
        KVM_MSR_FILTER_MAX_RANGES ranges, each bitmap holding at least `nmsrs`
        bits; ValueError otherwise.
        """
        ranges = list(ranges)
        if len(ranges) > KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError(f"KVM_X86_SET_MSR_FILTER takes at most {KVM_MSR_FILTER_MAX_RANGES} "
                             f"ranges (KVM_MSR_FILTER_MAX_RANGES), not {len(ranges)}")
        for flags, base, bitmap, nmsrs in ranges:
            if nmsrs > 8 * ctypes.sizeof(bitmap):
                raise ValueError(f"MSR filter range at {base:#x}: {nmsrs} MSRs need {(nmsrs + 7) // 8} "
                                 f"bitmap bytes, the bitmap has {ctypes.sizeof(bitmap)}")
        flt = KvmMsrFilter(flags=KVM_MSR_FILTER_DEFAULT_DENY if default_deny else 0)
        for i, (flags, base, bitmap, nmsrs) in enumerate(ranges):
            flt.ranges[i] = KvmMsrFilterRange(int(flags), nmsrs, base, ctypes.addressof(bitmap))
        _ioctl(self.fd, Ioctl.KVM_X86_SET_MSR_FILTER, flt)

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR (api.rst 4.40): 3 pages KVM needs on Intel for real mode."""
        _ioctl(self.fd, Ioctl.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR (api.rst 4.57)."""
        _ioctl(self.fd, Ioctl.KVM_SET_IDENTITY_MAP_ADDR, u64(addr))

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP (api.rst 4.24)."""
        _ioctl(self.fd, Ioctl.KVM_CREATE_IRQCHIP)

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE (api.rst 4.25)."""
        _ioctl(self.fd, Ioctl.KVM_IRQ_LINE, KvmIrqLevel(irq, level))

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2 (api.rst 4.66)."""
        _ioctl(self.fd, Ioctl.KVM_CREATE_PIT2, KvmPitConfig(flags=flags))

    def create_vcpu(self, vcpu_id: int) -> "VcpuFd":
        """KVM_CREATE_VCPU (api.rst 4.7), with its kvm_run page mapped."""
        return VcpuFd(_ioctl(self.fd, Ioctl.KVM_CREATE_VCPU, vcpu_id), self.vcpu_mmap_size)


class VcpuFd(_Fd):
    """A vCPU fd with its mapped `kvm_run` structure (`run`)."""

    def __init__(self, fd: int, mmap_size: int) -> None:
        super().__init__(fd)
        try:
            self.run_mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            self.close()
            raise
        self.run = KvmRun.from_buffer(self.run_mmap)

    def close(self) -> None:
        run_mmap = getattr(self, "run_mmap", None)
        if run_mmap is not None:
            self.run = None
            self.run_mmap = None
            try:
                run_mmap.close()
            except BufferError:
                pass    # a ctypes view (e.g. in a traceback) still exists: unmapped when it goes

        super().close()

    def run_once(self) -> int:
        """KVM_RUN (api.rst 4.10); returns the raw `kvm_run.exit_reason`.

        EINTR (a signal, or immediate_exit set) is reported as ExitKind.INTR.
        """
        try:
            fcntl.ioctl(self.fd, Ioctl.KVM_RUN, 0)
        except InterruptedError:
            self.run.immediate_exit = 0
            return ExitKind.INTR
        except OSError as exc:
            raise KvmError("KVM_RUN", exc.errno or 0) from None
        return self.run.exit_reason

    def run_exit(self) -> KvmExit:
        """KVM_RUN, decoded into a typed exit."""
        if self.run_once() == ExitKind.INTR:
            return _INTR
        return decode_exit(self.run)

    def set_immediate_exit(self, value: bool) -> None:
        """kvm_run.immediate_exit (api.rst 5, KVM_CAP_IMMEDIATE_EXIT)."""
        self.run.immediate_exit = int(value)

    def io_data(self, exit: IoExit) -> memoryview:
        """The data bytes of an I/O exit inside the kvm_run page (writable for IN)."""
        start = exit.data_offset
        return memoryview(self.run_mmap)[start: start + exit.size * exit.count]

    def set_mmio_data(self, data: bytes) -> None:
        """Reply to an MMIO read: the bytes the guest reads."""
        ctypes.memmove(self.run.exit.mmio.data, data, min(len(data), 8))

    def set_msr_reply(self, data: int = 0, error: bool = False) -> None:
        """Reply to a user-space MSR exit (api.rst 5, KVM_EXIT_X86_RDMSR)."""
        self.run.exit.msr.data = data
        self.run.exit.msr.error = int(error)

    def get_regs(self) -> KvmRegs:
        """KVM_GET_REGS (api.rst 4.11)."""
        regs = KvmRegs()
        _ioctl(self.fd, Ioctl.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        """KVM_SET_REGS (api.rst 4.12)."""
        _ioctl(self.fd, Ioctl.KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        """KVM_GET_SREGS (api.rst 4.13)."""
        sregs = KvmSregs()
        _ioctl(self.fd, Ioctl.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        """KVM_SET_SREGS (api.rst 4.14)."""
        _ioctl(self.fd, Ioctl.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> KvmFpu:
        """KVM_GET_FPU (api.rst 4.22)."""
        fpu = KvmFpu()
        _ioctl(self.fd, Ioctl.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: KvmFpu) -> None:
        """KVM_SET_FPU (api.rst 4.23)."""
        _ioctl(self.fd, Ioctl.KVM_SET_FPU, fpu)

    def get_xsave(self) -> KvmXsave:
        """KVM_GET_XSAVE (api.rst 4.42)."""
        xsave = KvmXsave()
        _ioctl(self.fd, Ioctl.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: KvmXsave) -> None:
        """KVM_SET_XSAVE (api.rst 4.43)."""
        _ioctl(self.fd, Ioctl.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> KvmXcrs:
        """KVM_GET_XCRS (api.rst 4.44)."""
        xcrs = KvmXcrs()
        _ioctl(self.fd, Ioctl.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: KvmXcrs) -> None:
        """KVM_SET_XCRS (api.rst 4.45)."""
        _ioctl(self.fd, Ioctl.KVM_SET_XCRS, xcrs)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS (api.rst 4.18); MSRs KVM does not know are left out."""
        indices = list(indices)
        buf = _variable_struct(KvmMsrsHeader, "nmsrs", KvmMsrEntry, len(indices))
        for entry, index in zip(buf.entries, indices):
            entry.index = index
        done = _ioctl(self.fd, Ioctl.KVM_GET_MSRS, buf)
        return {e.index: e.data for e in buf.entries[:done]}

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS (api.rst 4.19); raises naming the first MSR KVM refused."""
        buf = _variable_struct(KvmMsrsHeader, "nmsrs", KvmMsrEntry, len(values))
        for entry, (index, data) in zip(buf.entries, values.items()):
            entry.index, entry.data = index, data
        done = _ioctl(self.fd, Ioctl.KVM_SET_MSRS, buf)
        if done != len(values):
            bad = buf.entries[done]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL,
                           f"MSR {bad.index:#x} <- {bad.data:#x} was refused by this host")

    def get_msrs_into(self, buf: ctypes.Structure) -> int:
        """KVM_GET_MSRS (api.rst 4.18) into a buffer from `msrs_buffer`, its indices filled
        in; returns how many entries KVM read (it stops at the first it cannot read)."""
        return _ioctl(self.fd, Ioctl.KVM_GET_MSRS, buf)

    def set_msrs_from(self, buf: ctypes.Structure) -> int:
        """KVM_SET_MSRS (api.rst 4.19) from a filled-in buffer from `msrs_buffer`; returns
        how many entries KVM wrote (it stops at the first it refuses)."""
        return _ioctl(self.fd, Ioctl.KVM_SET_MSRS, buf)

    def set_device_attr(self, attr: KvmDeviceAttr) -> None:
        """KVM_SET_DEVICE_ATTR on the vCPU fd (api.rst 4.80): write the value at `attr.addr`."""
        _ioctl(self.fd, Ioctl.KVM_SET_DEVICE_ATTR, attr)

    def get_device_attr(self, attr: KvmDeviceAttr) -> None:
        """KVM_GET_DEVICE_ATTR on the vCPU fd (api.rst 4.80): read the value to `attr.addr`."""
        _ioctl(self.fd, Ioctl.KVM_GET_DEVICE_ATTR, attr)

    def has_device_attr(self, attr: KvmDeviceAttr) -> None:
        """KVM_HAS_DEVICE_ATTR on the vCPU fd (api.rst 4.81): returns if the attribute
        exists, raises KvmError (ENXIO) if it does not."""
        _ioctl(self.fd, Ioctl.KVM_HAS_DEVICE_ATTR, attr)

    def set_cpuid2(self, entries: Iterable[KvmCpuidEntry2]) -> None:
        """KVM_SET_CPUID2 (api.rst 4.20)."""
        entries = list(entries)
        buf = _variable_struct(KvmCpuid2Header, "nent", KvmCpuidEntry2, len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl(self.fd, Ioctl.KVM_SET_CPUID2, buf)

    def get_debugregs(self) -> KvmDebugregs:
        """KVM_GET_DEBUGREGS (api.rst 4.32)."""
        dr = KvmDebugregs()
        _ioctl(self.fd, Ioctl.KVM_GET_DEBUGREGS, dr)
        return dr

    def set_debugregs(self, dr: KvmDebugregs) -> None:
        """KVM_SET_DEBUGREGS (api.rst 4.33)."""
        _ioctl(self.fd, Ioctl.KVM_SET_DEBUGREGS, dr)

    def get_vcpu_events(self) -> KvmVcpuEvents:
        """KVM_GET_VCPU_EVENTS (api.rst 4.31)."""
        ev = KvmVcpuEvents()
        _ioctl(self.fd, Ioctl.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, ev: KvmVcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS (api.rst 4.32)."""
        _ioctl(self.fd, Ioctl.KVM_SET_VCPU_EVENTS, ev)

    def get_mp_state(self) -> MpState:
        """KVM_GET_MP_STATE (api.rst 4.38)."""
        st = KvmMpState()
        _ioctl(self.fd, Ioctl.KVM_GET_MP_STATE, st)
        return MpState(st.mp_state)

    def set_mp_state(self, state: MpState) -> None:
        """KVM_SET_MP_STATE (api.rst 4.39)."""
        _ioctl(self.fd, Ioctl.KVM_SET_MP_STATE, KvmMpState(int(state)))

    def set_guest_debug(self, control: GuestDebugFlag | int, debugreg: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG (api.rst 4.59)."""
        dbg = KvmGuestDebug(control=int(control))
        for i, value in enumerate(debugreg):
            dbg.debugreg[i] = value
        _ioctl(self.fd, Ioctl.KVM_SET_GUEST_DEBUG, dbg)

    def translate(self, linear_address: int) -> KvmTranslation:
        """KVM_TRANSLATE (api.rst 4.15); answers valid=0 on some hosts (see kvm-host-notes)."""
        tr = KvmTranslation(linear_address=linear_address)
        _ioctl(self.fd, Ioctl.KVM_TRANSLATE, tr)
        return tr

    def interrupt(self, irq: int) -> None:
        """KVM_INTERRUPT (api.rst 4.16), without an in-kernel irqchip."""
        _ioctl(self.fd, Ioctl.KVM_INTERRUPT, KvmInterrupt(irq))

    def nmi(self) -> None:
        """KVM_NMI (api.rst 4.97): queue an NMI; well defined without an in-kernel irqchip."""
        _ioctl(self.fd, Ioctl.KVM_NMI)

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the vCPU fd (api.rst 4.37)."""
        req = KvmEnableCap(cap=int(cap), flags=flags)
        for i, value in enumerate(args):
            req.args[i] = value
        _ioctl(self.fd, Ioctl.KVM_ENABLE_CAP, req)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ (api.rst 4.56)."""
        return _ioctl(self.fd, Ioctl.KVM_GET_TSC_KHZ)
