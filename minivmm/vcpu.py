"""One vCPU: register state through kvm_run's sync_regs, and KVM_RUN with a deadline.

Registers are read from the `kvm_run.s.regs` area that KVM fills on every
exit (KVM_CAP_SYNC_REGS, api.rst 5 "kvm_valid_regs") and written back by
setting `kvm_dirty_regs` bits only for the groups that changed, so an exit
whose handler touches no register costs no register ioctl. Hosts without
sync_regs get the same interface through KVM_GET/SET_(S)REGS.
"""
from __future__ import annotations

import ctypes
import errno
import signal
import threading
import time
from dataclasses import dataclass

from .cpuid import supported_cpuid
from .fastpath import IO_TAG, run_packed_for
from .kvm import (Cap, ExitKind, KvmError, KvmRegs, KvmSegment, KvmSregs, KvmVcpuEvents, Kvm,
                  SyncRegsFlag, VcpuFd, VmFd)

MASK64 = (1 << 64) - 1
_EXIT_INTR = int(ExitKind.INTR)
_EXIT_IO = int(ExitKind.IO)
_EXIT_MEMORY_FAULT = int(ExitKind.MEMORY_FAULT)
GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
CONTROL_REGISTER_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
_REGS, _SREGS = int(SyncRegsFlag.REGS), int(SyncRegsFlag.SREGS)     # plain ints: IntFlag ops are slow
_EVENTS = int(SyncRegsFlag.EVENTS)
DIRTY_REGS, DIRTY_SREGS, DIRTY_EVENTS = _REGS, _SREGS, _EVENTS      # for Vcpu.mark_dirty
_SYNC = _REGS | _SREGS


class RunTimer:
    """Interrupts KVM_RUN when a deadline passes.

    ITIMER_REAL raises SIGALRM; the signal makes a blocked KVM_RUN return
    EINTR, and the handler sets `immediate_exit` so that a signal landing just
    before the ioctl is not lost. The timer repeats every `RETRY_S` after the
    deadline, covering the window between the C signal handler and the Python
    one. Python runs signal handlers in the main thread only, so the timer
    serves vCPUs run from the main thread.

    `start_watchdog(period)` replaces ITIMER_REAL with a polling thread that
    sends SIGALRM while a run is past its deadline: no timer syscalls per run
    (arming and disarming ITIMER_REAL are two setitimer calls), deadlines
    honoured to within `period`. Harnesses that make thousands of short runs
    a second use it.
    """
    RETRY_S = 0.02

    def __init__(self) -> None:
        self.expired = False
        self.run = None
        self.deadline: float | None = None
        self._installed = False
        self._watchdog: threading.Thread | None = None
        self._watchdog_users = 0
        self._watchdog_stop = threading.Event()
        self._period = self.RETRY_S

    def start_watchdog(self, period: float) -> None:
        self._watchdog_users += 1
        self._period = min(self._period, period) if self._watchdog else period
        if self._watchdog is None:
            self._watchdog_stop.clear()
            self._watchdog = threading.Thread(target=self._watch, name="minivmm-deadline", daemon=True)
            self._watchdog.start()

    def stop_watchdog(self) -> None:
        self._watchdog_users -= 1
        if self._watchdog_users <= 0 and self._watchdog is not None:
            self._watchdog_stop.set()
            self._watchdog.join()
            self._watchdog, self._watchdog_users, self._period = None, 0, self.RETRY_S

    def _watch(self) -> None:
        main = threading.main_thread().ident
        while not self._watchdog_stop.wait(self._period):
            deadline = self.deadline
            if deadline is not None and time.perf_counter() > deadline:
                signal.pthread_kill(main, signal.SIGALRM)

    def _on_alarm(self, signum, frame) -> None:
        self.expired = True
        if self.run is not None:
            self.run.immediate_exit = 1

    def arm(self, vcpu: "Vcpu", seconds: float) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("run deadlines need the vCPU to run in the main thread")
        if not self._installed:
            signal.signal(signal.SIGALRM, self._on_alarm)
            self._installed = True
        self.expired = False
        self.run = vcpu.fd.run
        if self._watchdog is not None:
            self.deadline = time.perf_counter() + seconds
        else:
            signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-6), self.RETRY_S)

    def disarm(self) -> None:
        if self._watchdog is not None:
            self.deadline = None
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if self.run is not None:
            self.run.immediate_exit = 0
            self.run = None


run_timer = RunTimer()


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment register in KVM's terms (struct kvm_segment)."""
    selector: int
    base: int = 0
    limit: int = 0xFFFFFFFF
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0
    g: int = 1
    avl: int = 0
    unusable: int = 0

    @classmethod
    def from_kvm(cls, seg: KvmSegment) -> "Segment":
        return cls(seg.selector, seg.base, seg.limit, seg.type, seg.present, seg.dpl, seg.db,
                   seg.s, seg.l, seg.g, seg.avl, seg.unusable)

    def to_kvm(self, seg: KvmSegment) -> None:
        for name in self.__slots__:
            setattr(seg, name, getattr(self, name))


def _gpr(name: str) -> property:
    def get(self: "Vcpu") -> int:
        return getattr(self._regs, name)

    def set(self: "Vcpu", value: int) -> None:
        setattr(self._regs, name, value & MASK64)
        self.dirty |= _REGS

    return property(get, set, doc=f"Guest {name.upper()}.")


def _sreg(name: str) -> property:
    def get(self: "Vcpu") -> int:
        return getattr(self._sregs, name)

    def set(self: "Vcpu", value: int) -> None:
        setattr(self._sregs, name, value & MASK64)
        self.dirty |= _SREGS

    return property(get, set, doc=f"Guest {name.upper()}.")


class Vcpu:
    """A vCPU of a VM: cached register state plus KVM_RUN."""

    def __init__(self, kvm: Kvm, vm: VmFd, index: int = 0) -> None:
        self.index = index
        self.fd: VcpuFd = vm.create_vcpu(index)
        self.synced = kvm.check_extension(Cap.SYNC_REGS) & _SYNC == _SYNC
        run = self.fd.run
        if self.synced:
            self._regs: KvmRegs = run.s.regs.regs
            self._sregs: KvmSregs = run.s.regs.sregs
            ctypes.pointer(self._regs)[0] = self.fd.get_regs()
            ctypes.pointer(self._sregs)[0] = self.fd.get_sregs()
            run.kvm_valid_regs = _SYNC
        else:
            self._regs = self.fd.get_regs()
            self._sregs = self.fd.get_sregs()
        self.dirty = 0
        self._fd = self.fd.fd
        self._run = run
        self._run_packed, self._run_arg = run_packed_for(self.fd.run_mmap)
        self.fd.set_cpuid2(supported_cpuid(kvm))
        self._power_on = (KvmRegs.from_buffer_copy(self._regs), KvmSregs.from_buffer_copy(self._sregs))

    def written_since_power_on(self) -> tuple[dict[str, object], dict[str, object]]:
        """The general and special register fields whose values differ from the state KVM
        gave the vCPU when it was created: what the user wrote (copies)."""
        def changed(now, before) -> dict[str, object]:
            out = {}
            for name, kind, *_ in now._fields_:
                value = getattr(now, name)
                if isinstance(value, int):
                    if value != getattr(before, name):
                        out[name] = value
                elif bytes(value) != bytes(getattr(before, name)):
                    out[name] = kind.from_buffer_copy(value)
            return out
        regs_before, sregs_before = self._power_on
        return changed(self._regs, regs_before), changed(self._sregs, sregs_before)

    def rewrite(self, regs: dict[str, object], sregs: dict[str, object]) -> None:
        """Put back fields taken with `written_since_power_on`."""
        for name, value in regs.items():
            setattr(self._regs, name, value)
        for name, value in sregs.items():
            setattr(self._sregs, name, value)
        self.dirty |= (_REGS if regs else 0) | (_SREGS if sregs else 0)

    @property
    def packed_entry(self) -> tuple:
        """(function, argument): `function(self.fd.fd, argument)` is one KVM_RUN in the packed
        form of `minivmm.fastpath` (the exit loop calls it directly)."""
        return self._run_packed, self._run_arg

    @property
    def closed(self) -> bool:
        return self._regs is None

    def close(self) -> None:
        self._regs = self._sregs = self._run = self._run_arg = None
        self.fd.close()

    # -- register state -----------------------------------------------------------
    for _name in GPR_NAMES:
        locals()[_name] = _gpr(_name)
    for _name in CONTROL_REGISTER_NAMES:
        locals()[_name] = _sreg(_name)
    del _name

    @property
    def register_cache(self) -> KvmRegs:
        """The live general-register cache (kvm_run's sync-regs area where KVM has it): read
        it without copying; write registers through the attributes."""
        return self._regs

    @property
    def regs(self) -> KvmRegs:
        """A copy of the general registers (use the attributes to change them)."""
        return KvmRegs.from_buffer_copy(self._regs)

    @property
    def sregs(self) -> KvmSregs:
        """A copy of the special registers (use the setters to change them)."""
        return KvmSregs.from_buffer_copy(self._sregs)

    def set_regs(self, regs: KvmRegs) -> None:
        ctypes.pointer(self._regs)[0] = regs
        self.dirty |= _REGS

    def set_sregs(self, sregs: KvmSregs) -> None:
        ctypes.pointer(self._sregs)[0] = sregs
        self.dirty |= _SREGS

    def segment(self, name: str) -> Segment:
        return Segment.from_kvm(getattr(self._sregs, name))

    def set_segment(self, name: str, segment: Segment) -> None:
        segment.to_kvm(getattr(self._sregs, name))
        self.dirty |= _SREGS

    def descriptor_table(self, name: str) -> tuple[int, int]:
        """(base, limit) of "gdt" or "idt"."""
        table = getattr(self._sregs, name)
        return table.base, table.limit

    def set_descriptor_table(self, name: str, base: int, limit: int) -> None:
        table = getattr(self._sregs, name)
        table.base, table.limit = base, limit
        self.dirty |= _SREGS

    @property
    def cpl(self) -> int:
        return self._sregs.cs.dpl if self._sregs.cr0 & 1 else 0

    def get_events(self) -> KvmVcpuEvents:
        return self.fd.get_vcpu_events()

    def set_events(self, events: KvmVcpuEvents) -> None:
        self.flush()
        self.fd.set_vcpu_events(events)

    def inject_exception(self, vector: int, error_code: int | None = None,
                         cr2: int | None = None) -> None:
        """Queue an exception for delivery through the guest IDT at the next entry."""
        if cr2 is not None:
            self.cr2 = cr2
        events = self.fd.get_vcpu_events()
        events.exception.injected = 1
        events.exception.pending = 0
        events.exception.nr = vector
        events.exception.has_error_code = int(error_code is not None)
        events.exception.error_code = error_code or 0
        events.flags = 0
        self.set_events(events)

    def flush(self) -> None:
        """Write changed registers (and events marked with `mark_dirty(DIRTY_EVENTS)`) to KVM
        now; normally they go in at the next entry."""
        if not self.dirty:
            return
        if self.dirty & _REGS:
            self.fd.set_regs(self._regs)
        if self.dirty & _SREGS:
            self.fd.set_sregs(self._sregs)
        if self.dirty & _EVENTS:
            self.fd.set_vcpu_events(self._run.s.regs.events)
        self.dirty = 0

    # -- the register cache, for code that writes it in place --------------------------
    @property
    def regs_address(self) -> int:
        """Host address of the cached `KvmRegs` (kvm_run's sync_regs area on hosts with
        sync_regs). Stable for the vCPU's lifetime; after writing there, call
        `mark_dirty(DIRTY_REGS)`."""
        return ctypes.addressof(self._regs)

    @property
    def sregs_address(self) -> int:
        """Host address of the cached `KvmSregs`; like `regs_address`, with
        `mark_dirty(DIRTY_SREGS)`."""
        return ctypes.addressof(self._sregs)

    @property
    def events_address(self) -> int:
        """Host address of kvm_run's sync_regs `KvmVcpuEvents` (hosts with sync_regs only;
        `mark_dirty(DIRTY_EVENTS)` after writing there). ValueError without sync_regs."""
        if not self.synced:
            raise ValueError("this host has no sync_regs: set events with set_events()")
        return ctypes.addressof(self._run.s.regs.events)

    def gpr_address(self, name: str) -> int:
        """Host address of the 64-bit general register `name` (one of GPR_NAMES) in the
        register cache, for harnesses that write it from C or through ctypes; call
        `mark_dirty(DIRTY_REGS)` after writing."""
        if name not in GPR_NAMES:
            raise ValueError(f"{name!r} is not one of {', '.join(GPR_NAMES)}")
        return self.regs_address + getattr(KvmRegs, name).offset

    def mark_dirty(self, groups: int) -> None:
        """Record that the register cache was written in place (through `gpr_address`,
        `regs_address`, `sregs_address` or `events_address`): `groups`, SyncRegsFlag bits
        (DIRTY_REGS, DIRTY_SREGS, DIRTY_EVENTS), go to KVM at the next entry or at
        `flush()`. DIRTY_EVENTS needs sync_regs."""
        if groups & _EVENTS and not self.synced:
            raise ValueError("this host has no sync_regs: set events with set_events()")
        self.dirty |= groups

    def load_state(self, regs: KvmRegs, sregs: KvmSregs) -> None:
        """Write `regs` and `sregs` to KVM now (KVM_SET_SREGS, then KVM_SET_REGS) and into
        the register cache; nothing is left to write at the next entry, and changes made
        through the register attributes since the last entry are dropped."""
        ctypes.pointer(self._regs)[0] = regs
        ctypes.pointer(self._sregs)[0] = sregs
        self.dirty = 0
        self.fd.set_sregs(sregs)
        self.fd.set_regs(regs)

    # -- MSRs ----------------------------------------------------------------------
    def read_msr(self, index: int) -> int | None:
        """MSR `index` through KVM_GET_MSRS; None when KVM cannot read it."""
        return self.fd.get_msrs([index]).get(index)

    def write_msr(self, index: int, value: int) -> bool:
        """Write MSR `index` through KVM_SET_MSRS; False when KVM refuses the MSR or value."""
        try:
            self.fd.set_msrs({index: value})
        except KvmError:
            return False
        return True

    # -- running ------------------------------------------------------------------
    def enter(self) -> int:
        """One KVM_RUN, in the packed form of `minivmm.fastpath`: an I/O exit is
        tagged with IO_TAG and carries its port, size, direction and OUT data;
        any other exit is its KVM exit reason (ExitKind.INTR on a signal).
        """
        sent = 0
        if self.dirty:
            if self.synced:
                sent = self._run.kvm_dirty_regs = self.dirty
                if sent & _SREGS:
                    sregs = KvmSregs.from_buffer_copy(self._sregs)
                self.dirty = 0
            else:
                self.flush()
        packed = self._run_packed(self._fd, self._run_arg)
        if packed < 0:
            if sent & _SREGS and packed == -errno.EINVAL:
                # KVM refused the special registers (and stored its own over them): put them back
                # and let KVM_SET_SREGS say so, as it would have before the entry.
                ctypes.pointer(self._sregs)[0] = sregs
                self._run.kvm_dirty_regs = 0
                self.dirty = sent
                self.flush()
            packed = self.entry_failed(-packed)
        if not self.synced:
            ctypes.pointer(self._regs)[0] = self.fd.get_regs()
            ctypes.pointer(self._sregs)[0] = self.fd.get_sregs()
        return packed

    def entry_failed(self, err: int) -> int:
        """What a KVM_RUN that failed with `err` means: ExitKind.INTR for a signal or an AP's
        wake-up, ExitKind.MEMORY_FAULT for an EFAULT that KVM describes in kvm_run
        (KVM_CAP_MEMORY_FAULT_INFO, api.rst 5 "KVM_EXIT_MEMORY_FAULT"), else a KvmError."""
        if err == errno.EINTR:
            self._run.immediate_exit = 0
            return _EXIT_INTR
        if err == errno.EAGAIN:
            # An AP woken in MP state UNINITIALIZED (INIT/SIPI from the in-kernel LAPIC):
            # KVM asks for KVM_RUN again, reported like a signal.
            return _EXIT_INTR
        if err == errno.EFAULT and self._run.exit_reason == _EXIT_MEMORY_FAULT:
            return _EXIT_MEMORY_FAULT
        raise KvmError("KVM_RUN", err)

    def run_once(self) -> int:
        """One KVM_RUN; returns the raw KVM exit kind (ExitKind.INTR on a signal)."""
        packed = self.enter()
        return _EXIT_IO if packed >= IO_TAG else packed

    def run(self, timeout: float | None = None) -> int:
        """One KVM_RUN bounded by `timeout` seconds; ExitKind.INTR when it expired."""
        if timeout is None:
            return self.run_once()
        run_timer.arm(self, timeout)
        try:
            return self.run_once()
        finally:
            run_timer.disarm()
