"""Snapshots of a whole machine: vCPU state, guest RAM and device state.

    snap = Snapshot.take(machine)          # after setup, or at any exit
    ...run...
    snap.restore(machine)                  # cost grows with dirty pages only
    snap.save("state.snap"); Snapshot.load("state.snap").restore(other_machine)

What a snapshot holds
---------------------
* vCPU: general registers, special registers, FPU and XSAVE area, XCRs,
  every MSR of KVM_GET_MSR_INDEX_LIST that this host lets us read, debug
  registers, pending events (KVM_GET_VCPU_EVENTS) and the MP state.
* Memory: a copy of every RAM region (in anonymous host mappings).
* Devices: the serial console's output position and receive queue, the
  debug-exit latch.

Restore cost
------------
`restore()` copies back only the pages KVM's dirty log reports
(`machine.ept.dirty_pages(clear=True)`), so its cost grows with the number of
pages the guest wrote, not with the guest's size. The first restore into a
machine that the snapshot was not taken from (or after `invalidate()`)
copies all memory once, then turns dirty logging on.

The dirty log sees only *guest* writes. Host-side writes between restores
(`machine.memory.write`) are invisible to it: report them with
`mark_dirty(gpa, length)` (restored at the next restore) or undo them with
`restore_range()`; the fuzz harness does this for the input buffer.

vCPU state is restored in two levels:

* default (`full=False`): what a run can change without privileged
  instructions: general registers, special registers (only when they
  differ), vCPU events. With KVM_CAP_SYNC_REGS these ride on the next
  KVM_RUN through `kvm_run.s.regs` and cost no ioctl at all.
  `fpu=True` also writes the x87/SSE state back (KVM_SET_FPU, one ioctl),
  needed when the target's SSE/x87 state must not leak between runs; AVX
  upper halves and other XSAVE components need `full=True`.
* `full=True`: everything above plus XCRs, XSAVE/FPU, all MSRs, debug
  registers, MP state and the TSC (about 10 ioctls).

A default restore with few dirty pages spends most of its time reading and
clearing the dirty log; `fpu=True` adds one ioctl, `full=True` the ones listed above.

TSC
---
Writing IA32_TSC with KVM_SET_MSRS from user space goes through KVM's TSC
synchronisation: a host-initiated write of a value within about one second
of what KVM expects is taken as "synchronise with the other vCPUs" and the
value is silently replaced, so restoring a TSC a few microseconds back does
nothing. When the vCPU has the KVM_VCPU_TSC_CTRL/KVM_VCPU_TSC_OFFSET device
attribute (Linux 5.16+), a full restore instead moves the TSC offset by
(snapshot TSC - current TSC), which sets the guest TSC to the snapshot
value as of the restore (it then keeps counting). Without the attribute
IA32_TSC is written with KVM_SET_MSRS as the very last step, which is
exact for changes larger than KVM's one-second window.

Measured on the project's PVM hosts: the guest TSC follows the host TSC and
cannot be moved at all (the offset attribute reads 0 and ignores writes,
IA32_TSC writes are ignored), so there a restored guest sees the TSC keep
counting; targets that read it are not deterministic on such hosts.

File format (version 1)
-----------------------
    magic "MVMMSNAP" | u32 version | u32 header length | JSON header |
    vCPU blobs (lengths in the header) | RAM of each region | sha256 (32 bytes)

The sha256 covers every byte before it. `Snapshot.load` rejects a file
with a wrong magic, an unknown version, a bad checksum or inconsistent
lengths with `SnapshotError`; `restore` rejects a machine whose memory
layout (region addresses and sizes) differs from the snapshot's.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .kvm import (KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, Cap, KvmDebugregs, KvmDeviceAttr, KvmFpu,
                  KvmRegs, KvmSregs, KvmVcpuEvents, KvmXcrs, KvmXsave, MpState, VcpuFd,
                  msrs_buffer, u64)
from .errors import MinivmmError
from .memory import PAGE_SIZE
from .vcpu import DIRTY_EVENTS, DIRTY_REGS, DIRTY_SREGS

if TYPE_CHECKING:
    from .machine import Machine
    from .vcpu import Vcpu

MAGIC = b"MVMMSNAP"
VERSION = 1
MSR_IA32_TSC = 0x10
_PREFIX = struct.Struct("<8sII")
_DIGEST_SIZE = 32
_CHUNK = 1 << 20
_REGS_SIZE = ctypes.sizeof(KvmRegs)
_SREGS_SIZE = ctypes.sizeof(KvmSregs)
_EVENTS_SIZE = ctypes.sizeof(KvmVcpuEvents)
_DIRTY_ALL = DIRTY_REGS | DIRTY_SREGS | DIRTY_EVENTS
_DIRTY_REGS_EVENTS = DIRTY_REGS | DIRTY_EVENTS
memmove = ctypes.memmove
string_at = ctypes.string_at


class SnapshotError(MinivmmError, RuntimeError):
    """A snapshot file is corrupt, foreign or of another version, or does not fit a machine."""


# --- the vCPU's TSC offset (devices/vcpu.rst, KVM_VCPU_TSC_CTRL) -------------------
class _TscOffset:
    """Reads and writes the vCPU's TSC offset through KVM_VCPU_TSC_OFFSET."""

    def __init__(self, fd: VcpuFd) -> None:
        self.fd = fd
        self.value = u64()
        self.attr = KvmDeviceAttr(0, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET,
                                  ctypes.addressof(self.value))

    @staticmethod
    def supported(fd: VcpuFd) -> bool:
        try:
            fd.has_device_attr(KvmDeviceAttr(0, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, 0))
            return True
        except OSError:
            return False

    def get(self) -> int:
        self.fd.get_device_attr(self.attr)
        return self.value.value

    def set(self, offset: int) -> None:
        self.value.value = offset & ((1 << 64) - 1)
        self.fd.set_device_attr(self.attr)


# --- MSRs ---------------------------------------------------------------------------
_readable_msrs_cache: dict[tuple[int, ...], tuple[int, ...]] = {}


def readable_msrs(machine: "Machine") -> tuple[int, ...]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS reads on this vCPU.

    KVM_GET_MSRS stops at the first MSR it cannot read; such MSRs are left
    out. The answer is cached per index list (one probe per process).
    """
    listed = tuple(machine.kvm.get_msr_index_list())
    cached = _readable_msrs_cache.get(listed)
    if cached is not None:
        return cached
    fd = machine.vcpu.fd
    candidates = list(listed)
    while True:
        buf = msrs_buffer(len(candidates))
        for entry, index in zip(buf.entries, candidates):
            entry.index = index
        done = fd.get_msrs_into(buf)
        if done >= len(candidates):
            break
        del candidates[done]
    _readable_msrs_cache[listed] = tuple(candidates)
    return _readable_msrs_cache[listed]


# --- state ----------------------------------------------------------------------------
@dataclass
class VcpuState:
    """Everything KVM lets user space save of one vCPU."""
    regs: KvmRegs
    sregs: KvmSregs
    fpu: KvmFpu
    xsave: KvmXsave | None
    xcrs: KvmXcrs | None
    msrs: dict[int, int]
    debugregs: KvmDebugregs
    events: KvmVcpuEvents
    mp_state: int
    tsc: int | None

    _BLOBS = ("regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "events")
    _TYPES = {"regs": KvmRegs, "sregs": KvmSregs, "fpu": KvmFpu, "xsave": KvmXsave,
              "xcrs": KvmXcrs, "debugregs": KvmDebugregs, "events": KvmVcpuEvents}


@dataclass
class DeviceState:
    """The state of minivmm's own devices that a run changes."""
    serial_output_length: int = 0
    serial_received: bytes = b""
    debug_exit_requested: bool = False
    debug_exit_value: int | None = None
    debug_exit_status: int | None = None


@dataclass(frozen=True)
class RegionLayout:
    gpa: int
    size: int
    name: str


@dataclass(eq=False)
class _RegionCopy:
    layout: RegionLayout
    mem: mmap.mmap
    host_addr: int


def _anonymous_copy(size: int) -> tuple[mmap.mmap, int]:
    mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
                    mmap.PROT_READ | mmap.PROT_WRITE)
    view = ctypes.c_char.from_buffer(mem)
    addr = ctypes.addressof(view)
    del view
    return mem, addr


@dataclass(eq=False)
class Snapshot:
    """A machine's complete state at one moment; see the module docstring."""
    vcpu: VcpuState
    devices: DeviceState
    regions: list[_RegionCopy]
    started: bool = True
    _bound: "weakref.ReferenceType[Machine] | None" = field(default=None, repr=False)
    _extra_dirty: list[tuple[int, int]] = field(default_factory=list, repr=False)
    _sregs_bytes: bytes = field(default=b"", repr=False)
    _tsc_ctl: "_TscOffset | None" = field(default=None, repr=False)
    _msr_buf: object = field(default=None, repr=False)
    _lookup: list[tuple[int, int, int, int]] = field(default_factory=list, repr=False)
    _fast: tuple | None = field(default=None, repr=False)
    unrestorable_msrs: set[int] = field(default_factory=set)

    # -- taking -----------------------------------------------------------------------
    @classmethod
    def take(cls, machine: "Machine") -> "Snapshot":
        """Snapshot `machine` now (its vCPU is put into its mode first if it never ran).

        Turns on dirty logging for the machine, so later restores copy only
        the pages written since.
        """
        if machine.vcpu is None:
            raise SnapshotError("the machine is closed")
        if not machine.started:
            machine.setup()
        vcpu = machine.vcpu
        vcpu.flush()
        fd = vcpu.fd
        has_xsave = machine.kvm.check_extension(Cap.XSAVE) > 0
        has_xcrs = machine.kvm.check_extension(Cap.XCRS) > 0
        msr_indices = readable_msrs(machine)
        msrs = fd.get_msrs(msr_indices)
        state = VcpuState(
            regs=vcpu.regs, sregs=vcpu.sregs, fpu=fd.get_fpu(),
            xsave=fd.get_xsave() if has_xsave else None,
            xcrs=fd.get_xcrs() if has_xcrs else None,
            msrs=msrs, debugregs=fd.get_debugregs(), events=fd.get_vcpu_events(),
            mp_state=int(fd.get_mp_state()), tsc=msrs.get(MSR_IA32_TSC))
        # Dirty logging on before the copy: a page written after this point is
        # reported by the first restore.
        _enable_dirty_logging(machine)
        machine.ept.dirty_pages(clear=True)
        regions = []
        for region in machine.memory.regions:
            mem, addr = _anonymous_copy(region.size)
            ctypes.memmove(addr, region.host_addr, region.size)
            regions.append(_RegionCopy(RegionLayout(region.gpa, region.size, region.name), mem, addr))
        snap = cls(state, _device_state(machine), regions)
        snap._bound = weakref.ref(machine)
        snap._prepare()
        return snap

    def _prepare(self) -> None:
        self._sregs_bytes = bytes(self.vcpu.sregs)
        self._lookup = [(r.layout.gpa, r.layout.gpa + r.layout.size, r.host_addr, 0)
                        for r in self.regions]
        restorable = [i for i in self.vcpu.msrs if i != MSR_IA32_TSC and i not in self.unrestorable_msrs]
        buf = msrs_buffer(len(restorable))
        for entry, index in zip(buf.entries, restorable):
            entry.index, entry.data = index, self.vcpu.msrs[index]
        self._msr_buf = buf

    @property
    def layout(self) -> list[RegionLayout]:
        return [r.layout for r in self.regions]

    @property
    def memory_size(self) -> int:
        return sum(r.layout.size for r in self.regions)

    def close(self) -> None:
        """Release the memory copy (the snapshot is unusable afterwards)."""
        for r in self.regions:
            if not r.mem.closed:
                r.mem.close()
        self.regions = []
        self._lookup = []
        self._fast = None

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- memory helpers ------------------------------------------------------------------
    def _copy_for(self, gpa: int) -> tuple[int, int]:
        """(host address in the copy, bytes left in that region) for `gpa`."""
        for start, end, addr, _ in self._lookup:
            if start <= gpa < end:
                return addr + (gpa - start), end - gpa
        raise SnapshotError(f"guest-physical address {gpa:#x} is not in the snapshot's RAM")

    def read(self, gpa: int, length: int) -> bytes:
        """Bytes of the snapshot's memory copy."""
        addr, left = self._copy_for(gpa)
        if length > left:
            raise SnapshotError(f"[{gpa:#x}, {gpa + length:#x}) crosses a region end")
        return ctypes.string_at(addr, length)

    def patch(self, gpa: int, data: bytes) -> None:
        """Change the snapshot's memory copy (e.g. remove a coverage breakpoint for good)."""
        addr, left = self._copy_for(gpa)
        if len(data) > left:
            raise SnapshotError(f"[{gpa:#x}, {gpa + len(data):#x}) crosses a region end")
        ctypes.memmove(addr, data, len(data))

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Host-side write to guest memory since the last restore: copy it back next time."""
        self._extra_dirty.append((gpa, length))

    def restore_range(self, machine: "Machine", gpa: int, length: int) -> None:
        """Copy [gpa, gpa+length) from the snapshot into the machine now."""
        src, left = self._copy_for(gpa)
        region = machine.memory.region_at(gpa)
        if region is None or length > left or gpa + length > region.end:
            raise SnapshotError(f"[{gpa:#x}, {gpa + length:#x}) is not inside one RAM region")
        ctypes.memmove(region.host_addr + (gpa - region.gpa), src, length)

    def invalidate(self) -> None:
        """Forget which machine matches the copy: the next restore copies all memory."""
        self._bound = None

    # -- restoring --------------------------------------------------------------------------
    def restore(self, machine: "Machine", *, full: bool = False, fpu: bool = False) -> int:
        """Put `machine` back into the snapshot's state; returns the pages copied.

        `full=False` restores registers, special registers, events, memory
        and devices; `fpu=True` adds the FPU/XSAVE area; `full=True` restores
        everything (see the module docstring).
        """
        vcpu = machine.vcpu
        if vcpu is None:
            raise SnapshotError("the machine is closed")
        bound = self._bound() if self._bound is not None else None
        if bound is not machine:
            self._bind(machine)
            pages = sum(r.layout.size for r in self.regions) // PAGE_SIZE
            full = True
        else:
            pages = self._restore_dirty(machine)
        state = self.vcpu
        if full:
            self._restore_full(machine)
        else:
            if vcpu.synced:
                fast = self._fast
                if fast is None or fast[0] is not vcpu:
                    fast = self._fast = self._fast_addresses(vcpu)
                _, regs_dst, sregs_dst, events_dst, regs_src, sregs_src, events_src = fast
                memmove(regs_dst, regs_src, _REGS_SIZE)
                memmove(events_dst, events_src, _EVENTS_SIZE)
                if string_at(sregs_dst, _SREGS_SIZE) != self._sregs_bytes:
                    # Special registers go in with KVM_SET_SREGS at the next entry,
                    # and the events by ioctl after them (`Vcpu.flush`).
                    memmove(sregs_dst, sregs_src, _SREGS_SIZE)
                    vcpu.mark_dirty(_DIRTY_ALL)
                else:
                    vcpu.mark_dirty(_DIRTY_REGS_EVENTS)
            else:
                vcpu.set_regs(state.regs)
                vcpu.set_sregs(state.sregs)
                vcpu.flush()
                vcpu.fd.set_vcpu_events(state.events)
            if fpu:
                vcpu.fd.set_fpu(state.fpu)
        self.restore_devices(machine)
        return pages

    def restore_devices(self, machine: "Machine") -> None:
        """The device part of `restore` (serial, debug-exit, the last exception, `started`),
        for a restore whose memory and register parts ran in C (`cycle_plan`)."""
        self._restore_devices(machine)
        machine.started = self.started

    def cycle_plan(self, machine: "Machine") -> tuple[int, int, int, int, int, int] | None:
        """The dirty-log restore's arguments (`EptShadow.restore_plan`) when `restore(machine)`
        would restore memory from the dirty log of one memslot alone and the registers
        through sync_regs, for `fastpath.FuzzCycle`, which does both in C; None when the
        Python restore is needed (another machine bound, host-side writes marked, several
        regions, no sync_regs)."""
        bound = self._bound() if self._bound is not None else None
        if bound is not machine or self._extra_dirty or len(self._lookup) != 1 or not machine.vcpu.synced:
            return None
        start, _, src, _ = self._lookup[0]
        return machine.ept.restore_plan(src - start)

    @property
    def register_addresses(self) -> tuple[int, int, int]:
        """Host addresses of the snapshot's KvmRegs, KvmSregs and KvmVcpuEvents."""
        state = self.vcpu
        return (ctypes.addressof(state.regs), ctypes.addressof(state.sregs),
                ctypes.addressof(state.events))

    def copy_address(self, gpa: int) -> int:
        """Host address of `gpa` in the snapshot's memory copy."""
        return self._copy_for(gpa)[0]

    def _fast_addresses(self, vcpu: "Vcpu") -> tuple:
        """Host addresses for the sync-regs restore: the vCPU's kvm_run areas and our structs."""
        state = self.vcpu
        return (vcpu, vcpu.regs_address, vcpu.sregs_address, vcpu.events_address,
                ctypes.addressof(state.regs), ctypes.addressof(state.sregs),
                ctypes.addressof(state.events))

    def _restore_dirty(self, machine: "Machine") -> int:
        lookup = self._lookup
        if len(lookup) == 1:
            start, _, src, _ = lookup[0]
            copied = machine.ept.restore_dirty_pages(src - start)
            if copied is not None:
                self._restore_extra_dirty(machine)
                return copied
        pages = machine.ept.dirty_pages(clear=True)
        memmove = ctypes.memmove
        if len(lookup) == 1:
            start, end, src, _ = lookup[0]
            dst = machine.memory.regions[0].host_addr - start
            src -= start
            for gpa in pages:
                if start <= gpa < end:
                    memmove(dst + gpa, src + gpa, PAGE_SIZE)
        else:
            for gpa in pages:
                self.restore_range(machine, gpa, PAGE_SIZE)
        self._restore_extra_dirty(machine)
        return len(pages)

    def _restore_extra_dirty(self, machine: "Machine") -> None:
        if self._extra_dirty:
            for gpa, length in self._extra_dirty:
                self.restore_range(machine, gpa, length)
            self._extra_dirty.clear()

    def _bind(self, machine: "Machine") -> None:
        """Copy all memory into a machine this snapshot does not track yet."""
        layout = [RegionLayout(r.gpa, r.size, r.name) for r in machine.memory.regions]
        mine = self.layout
        if [(l.gpa, l.size) for l in layout] != [(l.gpa, l.size) for l in mine]:
            raise SnapshotError(
                "the machine's memory layout differs from the snapshot's: machine "
                + ", ".join(f"{l.name}@{l.gpa:#x}+{l.size:#x}" for l in layout) + "; snapshot "
                + ", ".join(f"{l.name}@{l.gpa:#x}+{l.size:#x}" for l in mine))
        _enable_dirty_logging(machine)
        machine.ept.dirty_pages(clear=True)
        for copy, region in zip(self.regions, machine.memory.regions):
            ctypes.memmove(region.host_addr, copy.host_addr, region.size)
        self._extra_dirty.clear()
        self._bound = weakref.ref(machine)
        self._tsc_ctl = None
        self._fast = None

    def _restore_full(self, machine: "Machine") -> None:
        vcpu = machine.vcpu
        fd = vcpu.fd
        state = self.vcpu
        vcpu.load_state(state.regs, state.sregs)
        if state.xcrs is not None:
            fd.set_xcrs(state.xcrs)
        if state.xsave is not None:
            fd.set_xsave(state.xsave)
        # KVM_SET_XSAVE leaves the legacy x87/SSE area alone when the saved
        # XSTATE_BV marks it as in its initial state; KVM_SET_FPU writes it.
        fd.set_fpu(state.fpu)
        self._restore_msrs(fd)
        fd.set_debugregs(state.debugregs)
        fd.set_vcpu_events(state.events)
        fd.set_mp_state(MpState(state.mp_state))
        if state.tsc is not None:
            self._restore_tsc(machine)

    def _restore_msrs(self, fd: VcpuFd) -> None:
        buf = self._msr_buf
        while buf.header.nmsrs:
            done = fd.set_msrs_from(buf)
            if done >= buf.header.nmsrs:
                return
            # KVM refused one MSR (it can read but not write it back): drop it
            # for good and write the rest.
            self.unrestorable_msrs.add(buf.entries[done].index)
            self._prepare()
            buf = self._msr_buf

    def _restore_tsc(self, machine: "Machine") -> None:
        fd = machine.vcpu.fd
        if self._tsc_ctl is None:
            self._tsc_ctl = _TscOffset(fd) if _TscOffset.supported(fd) else False
        if self._tsc_ctl:
            now = fd.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
            self._tsc_ctl.set(self._tsc_ctl.get() + self.vcpu.tsc - now)
        else:
            fd.set_msrs({MSR_IA32_TSC: self.vcpu.tsc})

    def _restore_devices(self, machine: "Machine") -> None:
        d = self.devices
        serial = machine.serial
        if len(serial.output) != d.serial_output_length:
            del serial.output[d.serial_output_length:]
        if serial.pending_input or d.serial_received:
            serial.replace_input(d.serial_received)
        de = machine.debug_exit
        if de.exit_requested is not d.debug_exit_requested or de.value != d.debug_exit_value:
            de.exit_requested, de.value, de.status = (d.debug_exit_requested, d.debug_exit_value,
                                                      d.debug_exit_status)
        machine.context.last_exception = None

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the snapshot to `path` (format in the module docstring)."""
        state = self.vcpu
        blobs = {name: bytes(getattr(state, name)) for name in VcpuState._BLOBS
                 if getattr(state, name) is not None}
        header = {
            "format": "minivmm snapshot",
            "regions": [{"gpa": r.layout.gpa, "size": r.layout.size, "name": r.layout.name}
                        for r in self.regions],
            "blobs": {name: len(data) for name, data in blobs.items()},
            "msrs": {str(k): v for k, v in state.msrs.items()},
            "mp_state": state.mp_state,
            "tsc": state.tsc,
            "started": self.started,
            "devices": {"serial_output_length": self.devices.serial_output_length,
                        "serial_received": self.devices.serial_received.hex(),
                        "debug_exit_requested": self.devices.debug_exit_requested,
                        "debug_exit_value": self.devices.debug_exit_value,
                        "debug_exit_status": self.devices.debug_exit_status},
        }
        header_bytes = json.dumps(header, sort_keys=True).encode()
        path = Path(path)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        digest = hashlib.sha256()
        try:
            with open(partial, "wb") as f:
                def out(data) -> None:
                    digest.update(data)
                    f.write(data)
                out(_PREFIX.pack(MAGIC, VERSION, len(header_bytes)))
                out(header_bytes)
                for name in VcpuState._BLOBS:
                    if name in blobs:
                        out(blobs[name])
                for r in self.regions:
                    view = memoryview(r.mem)
                    for offset in range(0, r.layout.size, _CHUNK):
                        out(view[offset: offset + _CHUNK])
                    view.release()
                f.write(digest.digest())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Snapshot":
        """Read a snapshot file; raises SnapshotError for a corrupt or foreign file."""
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                return cls._load(f, size, path)
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None

    @classmethod
    def _load(cls, f: BinaryIO, size: int, path: Path) -> "Snapshot":
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
            raise SnapshotError(f"{path} is not a minivmm snapshot (bad magic)")
        _, version, header_len = _PREFIX.unpack(prefix)
        if version != VERSION:
            raise SnapshotError(f"{path} is a version {version} snapshot; this minivmm reads version {VERSION}")
        if size < _PREFIX.size + header_len + _DIGEST_SIZE:
            raise SnapshotError(f"{path} is truncated")
        # Verify the checksum over the whole file before trusting any length in it.
        digest = hashlib.sha256(prefix)
        left = size - _PREFIX.size - _DIGEST_SIZE
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise SnapshotError(f"{path} is truncated")
            digest.update(chunk)
            left -= len(chunk)
        if f.read(_DIGEST_SIZE) != digest.digest():
            raise SnapshotError(f"{path}: checksum mismatch (the file is corrupt)")
        f.seek(_PREFIX.size)
        try:
            header = json.loads(f.read(header_len))
            regions_meta = [RegionLayout(int(r["gpa"]), int(r["size"]), str(r["name"]))
                            for r in header["regions"]]
            blob_sizes = {str(k): int(v) for k, v in header["blobs"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"{path}: bad header ({exc})") from None
        expected = (_PREFIX.size + header_len + sum(blob_sizes.values())
                    + sum(r.size for r in regions_meta) + _DIGEST_SIZE)
        if expected != size:
            raise SnapshotError(f"{path}: size {size} does not match its header ({expected})")
        blobs: dict[str, object] = {}
        for name in VcpuState._BLOBS:
            if name not in blob_sizes:
                continue
            struct_type = VcpuState._TYPES[name]
            if blob_sizes[name] != ctypes.sizeof(struct_type):
                raise SnapshotError(f"{path}: {name} is {blob_sizes[name]} bytes, expected "
                                    f"{ctypes.sizeof(struct_type)}")
            blobs[name] = struct_type.from_buffer_copy(f.read(blob_sizes[name]))
        for required in ("regs", "sregs", "fpu", "debugregs", "events"):
            if required not in blobs:
                raise SnapshotError(f"{path}: no {required} state")
        regions = []
        try:
            for layout in regions_meta:
                if layout.size % PAGE_SIZE or layout.gpa % PAGE_SIZE:
                    raise SnapshotError(f"{path}: region {layout.name} is not page aligned")
                mem, addr = _anonymous_copy(layout.size)
                regions.append(_RegionCopy(layout, mem, addr))
                offset = 0
                while offset < layout.size:
                    n = f.readinto(memoryview(mem)[offset: offset + _CHUNK])
                    if not n:
                        raise SnapshotError(f"{path} is truncated")
                    offset += n
            devices = header["devices"]
            state = VcpuState(
                regs=blobs["regs"], sregs=blobs["sregs"], fpu=blobs["fpu"],
                xsave=blobs.get("xsave"), xcrs=blobs.get("xcrs"),
                msrs={int(k): int(v) for k, v in header["msrs"].items()},
                debugregs=blobs["debugregs"], events=blobs["events"],
                mp_state=int(header["mp_state"]),
                tsc=None if header["tsc"] is None else int(header["tsc"]))
            dev = DeviceState(int(devices["serial_output_length"]), bytes.fromhex(devices["serial_received"]),
                              bool(devices["debug_exit_requested"]), devices["debug_exit_value"],
                              devices["debug_exit_status"])
        except (ValueError, KeyError, TypeError) as exc:
            for r in regions:
                r.mem.close()
            raise SnapshotError(f"{path}: bad header ({exc})") from None
        except BaseException:
            for r in regions:
                r.mem.close()
            raise
        snap = cls(state, dev, regions, started=bool(header.get("started", True)))
        snap._prepare()
        return snap


def _device_state(machine: "Machine") -> DeviceState:
    serial = machine.serial
    de = machine.debug_exit
    return DeviceState(len(serial.output), serial.queued_input,
                       de.exit_requested, de.value, de.status)


def _enable_dirty_logging(machine: "Machine") -> None:
    ept = machine.ept
    if not ept.dirty_logging:
        ept.enable_dirty_logging()


__all__ = ["Snapshot", "SnapshotError", "VcpuState", "DeviceState", "RegionLayout", "readable_msrs",
           "MAGIC", "VERSION"]
