"""The VT-x capability model of this host: what minivmm can honour, per guest mode.

One `HostModel` per KVM host (`host_model(kvm)`, cached per process and on disk
keyed by the host's identity) answers every "can this work here?" question:

- the IA32_VMX_* capability MSRs (SDM appendix A), from KVM_CHECK_EXTENSION and
  two ioctl probes: whether KVM's per-vCPU TSC offset (KVM_VCPU_TSC_CTRL /
  KVM_VCPU_TSC_OFFSET, devices/vcpu.rst) is honoured, which realises
  CPU_BASED_USE_TSC_OFFSETTING, and whether a default-deny MSR filter
  (KVM_X86_SET_MSR_FILTER, api.rst 4.126) is accepted, which realises
  CPU_BASED_USE_MSR_BITMAPS = 0 (SDM 25.6.2: every RDMSR/WRMSR exits);
- which exception vectors the exception bitmap (SDM 25.6.3) can intercept in
  each mode. In user mode the built-in kernel's IDT reports every vector. At
  CPL 0 (real, protected and long mode) KVM delivers exceptions to the guest's
  own IDT without an exit, except #BP and #DB where KVM_SET_GUEST_DEBUG makes
  them exit; whether they do is measured with a tiny guest per mode, because
  it depends on the host (PVM hosts emulate CPL-0 code and report a guest's
  own #DB to its IDT);
- whether a debug-register instruction breakpoint (KVM_GUESTDBG_USE_HW_BP with DR0, the
  `minivmm.hwbreakpoints` table) exits in each mode, measured with a tiny guest per mode:
  KVM_CAP_GUEST_DEBUG_HW_BPS does not say (it reads 0 on hosts where they work at CPL 0,
  and PVM hosts never fire them at CPL 3).

`minivmm caps`, `adjust_controls` (through the capability MSRs), VMWRITEs of
control fields and of the exception bitmap, `m.on(..., vector=)` and
`minivmm check` all read this model; `rows()` and `markdown()` give the
per-mode works/refused table of the README.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
from dataclasses import dataclass, replace
from enum import IntFlag
from typing import Iterable

from .cache import cache_dir
from .controls import (CONTROLS_FOR_MSR, HostCapabilities, PinBasedControls, ProcBasedControls,
                       SecondaryControls, UnsupportedControlError, VmEntryControls, VmExitControls, VmxMsr,
                       allowed0, allowed1, compute_capability_msrs)
from .exits import Vector, vector_name
from .kvm import (KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, Cap, Kvm, KvmDeviceAttr, KvmError,
                  MsrExitReasonFlag, MsrFilterFlag)
from .modes import Mode

__all__ = ["ALL_VECTORS", "CapabilityRow", "ExceptionInterceptError", "HostModel", "MODES", "host_model",
           "TSC_ATTRIBUTE", "TSC_MSR", "kvm_facts", "probe_host_capabilities",
           "tsc_offset_attribute", "with_in_kernel_irqchip"]

ALL_VECTORS = frozenset(range(32))
"""The exception bitmap has one bit per vector 0-31 (SDM 25.6.3)."""
MODES = (Mode.REAL, Mode.PROTECTED, Mode.LONG, Mode.USER)
CPL0_MODES = (Mode.REAL, Mode.PROTECTED, Mode.LONG)
PROBE_VERSION = 3
_IA32_TSC = 0x10
_TSC_PROBE_OFFSET = 1 << 60
_RFLAGS_TF = 1 << 8
_CONTROL_MSRS: tuple[tuple[type[IntFlag], VmxMsr], ...] = (
    (PinBasedControls, VmxMsr.IA32_VMX_TRUE_PINBASED_CTLS),
    (ProcBasedControls, VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS),
    (SecondaryControls, VmxMsr.IA32_VMX_PROCBASED_CTLS2),
    (VmExitControls, VmxMsr.IA32_VMX_TRUE_EXIT_CTLS),
    (VmEntryControls, VmxMsr.IA32_VMX_TRUE_ENTRY_CTLS),
)


class ExceptionInterceptError(UnsupportedControlError):
    """An exception-bitmap bit the guest mode cannot honour on this host; the message names the
    vector, the mode and what would work."""

    def __init__(self, message: str, vectors: int) -> None:
        super().__init__(message, vectors, 0)
        self.vectors = vectors


@dataclass(frozen=True, slots=True)
class CapabilityRow:
    """One line of the capability table: a control or an exception vector in one mode.

    `probed`: the answer was measured on this host (it may differ on another);
    the other rows follow from the KVM API alone."""
    kind: str                      # "control" | "exception"
    name: str                      # SDM name: CPU_BASED_HLT_EXITING, "#UD (6)"
    mode: Mode
    works: bool
    how: str
    probed: bool = False
    flag: IntFlag | None = None
    vector: int | None = None
    must_be_one: bool = False       # a control that cannot be 0 here (allowed-0 bit 1)

    @property
    def status(self) -> str:
        if not self.works:
            return "refused"
        return "works (must be 1)" if self.must_be_one else "works"


_CONTROL_NOTES: dict[str, str] = {
    "PIN_BASED_VMX_PREEMPTION_TIMER": "the run deadline; expiry exits as VMX_PREEMPTION_TIMER_EXPIRED",
    "CPU_BASED_HLT_EXITING": "KVM_EXIT_HLT; must be 1 (HLT always exits); with the in-kernel irqchip "
                             "refused instead (HLT waits in the kernel)",
    "CPU_BASED_UNCONDITIONAL_IO_EXITING": "every port reaches the I/O handlers",
    "CPU_BASED_USE_IO_BITMAPS": "bitmap bits pick the ports that reach handlers",
    "CPU_BASED_USE_TSC_OFFSETTING": "KVM's per-vCPU TSC offset (KVM_VCPU_TSC_OFFSET or IA32_TSC writes, probed)",
    "CPU_BASED_MONITOR_TRAP_FLAG": "KVM_GUESTDBG_SINGLESTEP; RFLAGS.TF in user mode, hidden from the guest",
    "CPU_BASED_USE_MSR_BITMAPS": "KVM MSR filter; 0 = a default-deny filter, every RDMSR/WRMSR exits (probed)",
    "CPU_BASED_ACTIVATE_SECONDARY_CONTROLS": "enables the secondary controls",
    "SECONDARY_ENABLE_EPT": "memslots, read-only slots, host page protection",
    "SECONDARY_UNRESTRICTED_GUEST": "real mode runs on KVM",
    "SECONDARY_USE_TSC_SCALING": "the TSC multiplier field is not realised",
    "VM_ENTRY_IA32E_MODE_GUEST": "reads EFER.LMA (stored on every exit); a write that would switch "
                                 "the mode at entry is refused",
}


def _control_note(name: str, works: bool, default1: bool) -> str:
    if name in _CONTROL_NOTES:
        return _CONTROL_NOTES[name]
    if works and default1:
        return "default1 bit: reserved, no function"
    if works and name.startswith(("VM_EXIT_SAVE", "VM_ENTRY_LOAD", "VM_EXIT_HOST")):
        return "guest state is KVM's live vCPU state: always saved and loaded, must be 1"
    if name.startswith("VM_EXIT_SAVE_VMX_PREEMPTION"):
        return "the preemption-timer value field is not modelled"
    if name.startswith("VM_EXIT_"):
        return "host state belongs to KVM; nothing to realise it on"
    if name.startswith("VM_ENTRY_"):
        return "KVM gives user space no way to realise it"
    return "KVM handles it in the kernel; no exit reaches user space"


class HostModel:
    """What this KVM host can honour (see the module docstring). `capabilities` holds the KVM
    facts and the ioctl probes; the CPL-0 exception vectors are probed on first use per mode."""

    def __init__(self, capabilities: HostCapabilities, identity: str = "",
                 vectors: dict[Mode, frozenset[int]] | None = None,
                 kvm_path: str | None = None, disk_cache: bool = False, tsc_method: str = "",
                 hw_breakpoints: dict[Mode, bool] | None = None) -> None:
        self.capabilities = capabilities
        self.tsc_method = tsc_method if capabilities.tsc_offset else ""
        self.identity = identity
        self.kvm_path = kvm_path
        self.disk_cache = disk_cache
        self.msrs: dict[VmxMsr, int] = compute_capability_msrs(capabilities)
        self._vectors: dict[Mode, frozenset[int]] = dict(vectors or {})
        self._vectors[Mode.USER] = ALL_VECTORS
        self._hw_breakpoints: dict[Mode, bool] = dict(hw_breakpoints or {})
        self._lock = threading.RLock()

    # -- exception vectors ------------------------------------------------------------
    def vectors(self, mode: Mode | str) -> frozenset[int]:
        """The vectors whose exception-bitmap bit reaches handlers in `mode` (probed on first use)."""
        mode = Mode(mode)
        known = self._vectors.get(mode)
        if known is not None:
            return known
        with self._lock:
            if mode not in self._vectors:
                self._vectors[mode] = ALL_VECTORS       # the probe machine itself may set any bit
                try:
                    self._vectors[mode] = _probe_cpl0_vectors(self.kvm_path, mode)
                except BaseException:
                    del self._vectors[mode]
                    raise
                if self.disk_cache:
                    _save(self)
        return self._vectors[mode]

    # -- hardware breakpoints -----------------------------------------------------------
    def hw_breakpoints(self, mode: Mode | str) -> bool:
        """Whether a DR0 instruction breakpoint exits in `mode` (probed on first use)."""
        mode = Mode(mode)
        known = self._hw_breakpoints.get(mode)
        if known is not None:
            return known
        with self._lock:
            if mode not in self._hw_breakpoints:
                self._hw_breakpoints[mode] = True       # the probe machine itself arms one
                try:
                    self._hw_breakpoints[mode] = _probe_hw_breakpoint(self.kvm_path, mode)
                except BaseException:
                    del self._hw_breakpoints[mode]
                    raise
                if self.disk_cache:
                    _save(self)
        return self._hw_breakpoints[mode]

    def probed_hw_breakpoints(self) -> dict[Mode, bool]:
        return dict(self._hw_breakpoints)

    def probed_vectors(self) -> dict[Mode, frozenset[int]]:
        return dict(self._vectors)

    def check_exception_bitmap(self, mode: Mode | str, bitmap: int) -> None:
        """Raise ExceptionInterceptError unless every bit of `bitmap` can be honoured in `mode`."""
        mode = Mode(mode)
        refused = bitmap & 0xFFFFFFFF & ~_mask(self.vectors(mode))
        if refused:
            raise ExceptionInterceptError(self.refusal(mode, refused), refused)

    def refusal(self, mode: Mode | str, refused: int) -> str:
        """Why the vectors of bitmap `refused` cannot be intercepted in `mode`, and what works."""
        mode = Mode(mode)
        names = ", ".join(f"{vector_name(v)} (vector {v})" for v in range(32) if refused >> v & 1)
        working = sorted(self.vectors(mode))
        alternatives = ", ".join(vector_name(v) for v in working) if working else "no vector"
        return (f"exception bitmap: {names} cannot be intercepted in {mode.value} mode on this host: "
                f"guest code runs at CPL 0 there and KVM delivers the exception to the guest's own IDT "
                f"without an exit; in {mode.value} mode {alternatives} can be intercepted; in user mode "
                f"(Machine(mode='user'), CPL 3 under minivmm's built-in kernel) every vector can")

    def allowed_bitmap(self, mode: Mode | str) -> int:
        return _mask(self.vectors(mode))

    # -- the table --------------------------------------------------------------------
    def rows(self, modes: Iterable[Mode | str] = MODES) -> list[CapabilityRow]:
        """Every control of the five control fields and every exception vector, per mode."""
        out: list[CapabilityRow] = []
        caps = self.capabilities
        for mode in map(Mode, modes):
            for cls, msr in _CONTROL_MSRS:
                value = self.msrs[msr]
                default1 = allowed0(self.msrs[_DEFAULT_MSR[cls]])
                for flag in cls:
                    works = bool(allowed1(value) & flag)
                    name = flag.name
                    probed = (name == "CPU_BASED_USE_TSC_OFFSETTING"
                              or name == "CPU_BASED_USE_MSR_BITMAPS" and not caps.msr_exit_all)
                    how = _control_note(name, works, bool(default1 & flag))
                    if name == "CPU_BASED_USE_MSR_BITMAPS" and not caps.msr_exit_all:
                        how = "KVM MSR filter; must be 1: this host refuses a default-deny filter (probed)"
                    elif name == "CPU_BASED_USE_TSC_OFFSETTING" and not works:
                        how = "this host ignores KVM_VCPU_TSC_OFFSET and IA32_TSC writes (probed)"
                    out.append(CapabilityRow("control", name, mode, works, how, probed, flag=flag,
                                             must_be_one=bool(allowed0(value) & flag)))
            allowed = self.vectors(mode)
            for vector in range(32):
                works = vector in allowed
                if mode is Mode.USER:
                    how = "the built-in kernel's IDT stub reports it"
                elif works:
                    how = "KVM_SET_GUEST_DEBUG " + ("USE_SW_BP" if vector == Vector.BP else "USE_HW_BP") \
                        + " (probed)"
                elif vector in (Vector.BP, Vector.DB):
                    how = "reaches the guest's IDT without an exit on this host (probed)"
                else:
                    how = "KVM delivers it to the guest's IDT at CPL 0"
                out.append(CapabilityRow("exception", f"{vector_name(vector)} ({vector})", mode, works, how,
                                         probed=mode is not Mode.USER and vector in (Vector.BP, Vector.DB),
                                         vector=vector))
            out.append(_hw_breakpoint_row(mode, self.hw_breakpoints(mode)))
        return out

    def markdown(self) -> str:
        """The works/refused table, one column per mode (`minivmm caps --markdown`)."""
        rows = self.rows()
        by_item: dict[tuple[str, str], dict[Mode, CapabilityRow]] = {}
        for row in rows:
            by_item.setdefault((row.kind, row.name), {})[row.mode] = row
        lines = ["| " + " | ".join(["item", *(m.value for m in MODES), "how minivmm realises it"]) + " |",
                 "|" + "---|" * (len(MODES) + 2)]
        for (kind, name), per_mode in by_item.items():
            cells = [per_mode[m].status for m in MODES]
            hows: dict[str, list[str]] = {}
            for m in MODES:
                hows.setdefault(per_mode[m].how, []).append(m.value)
            how = next(iter(hows)) if len(hows) == 1 else \
                "; ".join(f"{', '.join(modes)}: {text}" for text, modes in hows.items())
            lines.append(f"| `{name}` | " + " | ".join(cells) + " | " + how + " |")
        return "\n".join(lines)

    def report(self) -> dict:
        """JSON-ready: the probed facts and the rows."""
        return {"identity": self.identity,
                "tsc_offsetting": self.tsc_method or None,
                "msr_exiting_without_bitmaps": self.capabilities.msr_exit_all,
                "exception_vectors": {m.value: sorted(self.vectors(m)) for m in MODES},
                "hw_breakpoints": {m.value: self.hw_breakpoints(m) for m in MODES},
                "rows": [{"kind": r.kind, "name": r.name, "mode": r.mode.value, "status": r.status,
                          "how": r.how, "probed": r.probed} for r in self.rows()]}


_DEFAULT_MSR = {cls: msr for msr, cls in CONTROLS_FOR_MSR.items() if "TRUE" not in msr.name}


def with_in_kernel_irqchip(msrs: dict[VmxMsr, int]) -> dict[VmxMsr, int]:
    """The capability MSRs of a VM with KVM's in-kernel irqchip: HLT waits in the kernel and never
    exits, so CPU_BASED_HLT_EXITING cannot be 1 (and need not be: allowed-0 and allowed-1 both 0)."""
    hlt = int(ProcBasedControls.CPU_BASED_HLT_EXITING)
    out = dict(msrs)
    for msr in (VmxMsr.IA32_VMX_PROCBASED_CTLS, VmxMsr.IA32_VMX_TRUE_PROCBASED_CTLS):
        out[msr] = msrs[msr] & ~(hlt | hlt << 32)
    return out


def _mask(vectors: Iterable[int]) -> int:
    return sum(1 << v for v in vectors)


# -- probes ---------------------------------------------------------------------------------
def kvm_facts(kvm: Kvm) -> HostCapabilities:
    """What KVM_CHECK_EXTENSION says (the probed fields left False)."""
    c = kvm.check_extension
    return HostCapabilities(
        msr_filter=c(Cap.X86_MSR_FILTER) > 0, user_space_msr=c(Cap.X86_USER_SPACE_MSR) > 0,
        guest_debug=c(Cap.SET_GUEST_DEBUG) > 0, hw_breakpoints=c(Cap.GUEST_DEBUG_HW_BPS) > 0,
        readonly_mem=c(Cap.READONLY_MEM) > 0, dirty_log=True, sync_regs=c(Cap.SYNC_REGS) > 0,
        tsc_control=c(Cap.TSC_CONTROL) > 0)


def probe_host_capabilities(kvm: Kvm) -> tuple[HostCapabilities, str]:
    """KVM_CHECK_EXTENSION facts and the two ioctl probes (no guest code runs); the second item is
    how TSC offsetting is realised here (`TSC_ATTRIBUTE`, `TSC_MSR` or "" where it cannot be)."""
    caps = kvm_facts(kvm)
    tsc = _probe_tsc_offset(kvm)
    return replace(caps, tsc_offset=bool(tsc),
                   msr_exit_all=caps.msr_filter and caps.user_space_msr and _probe_deny_filter(kvm)), tsc


TSC_ATTRIBUTE = "KVM_VCPU_TSC_OFFSET"
TSC_MSR = "IA32_TSC"


def tsc_offset_attribute(value: ctypes.c_uint64) -> KvmDeviceAttr:
    """The vCPU device attribute of KVM's TSC offset (devices/vcpu.rst 4.1), reading and writing
    `value`."""
    return KvmDeviceAttr(0, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, ctypes.addressof(value))


def _probe_tsc_offset(kvm: Kvm) -> str:
    """How this host moves a vCPU's TSC, if it does: the KVM_VCPU_TSC_OFFSET attribute (set to
    2**60 it reads back and IA32_TSC moved by it), else a host write of IA32_TSC (KVM_SET_MSRS;
    it reads back near the value written). A host may accept either and ignore it."""
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        try:
            value = ctypes.c_uint64()
            attr = tsc_offset_attribute(value)
            try:
                vcpu.has_device_attr(attr)
                before = vcpu.get_msrs([_IA32_TSC]).get(_IA32_TSC, 0)
                value.value = _TSC_PROBE_OFFSET
                vcpu.set_device_attr(attr)
                value.value = 0
                vcpu.get_device_attr(attr)
                moved = (vcpu.get_msrs([_IA32_TSC]).get(_IA32_TSC, 0) - before) % (1 << 64)
                if value.value == _TSC_PROBE_OFFSET and 0 <= moved - _TSC_PROBE_OFFSET < 1 << 40:
                    return TSC_ATTRIBUTE
            except (KvmError, OSError):
                pass
            try:
                vcpu.set_msrs({_IA32_TSC: _TSC_PROBE_OFFSET})
                moved = (vcpu.get_msrs([_IA32_TSC]).get(_IA32_TSC, 0) - _TSC_PROBE_OFFSET) % (1 << 64)
            except (KvmError, OSError):
                return ""
            return TSC_MSR if moved < 1 << 40 else ""
        finally:
            vcpu.close()
    finally:
        vm.close()


def deny_all_filter_ranges() -> list[tuple[MsrFilterFlag, int, ctypes.Array, int]]:
    """A KVM MSR filter that denies every MSR: default deny and one range that allows nothing
    (KVM refuses a default-deny filter with no ranges)."""
    return [(MsrFilterFlag.READ | MsrFilterFlag.WRITE, 0, (ctypes.c_uint8 * 1)(0), 1)]


def _probe_deny_filter(kvm: Kvm) -> bool:
    vm = kvm.create_vm()
    try:
        vm.enable_cap(Cap.X86_USER_SPACE_MSR, MsrExitReasonFlag.FILTER)
        vm.set_msr_filter(True, deny_all_filter_ranges())
        return True
    except (KvmError, OSError):
        return False
    finally:
        vm.close()


_VECTOR_PROBE = {
    Mode.REAL: "int3\n pushf\n pop %ax\n or $0x100, %ax\n push %ax\n popf\n nop\n nop\n EXIT 0",
    Mode.PROTECTED: "int3\n pushf\n pop %eax\n or $0x100, %eax\n push %eax\n popf\n nop\n nop\n EXIT 0",
    Mode.LONG: "int3\n pushf\n pop %rax\n or $0x100, %rax\n push %rax\n popf\n nop\n nop\n EXIT 0",
}


def _probe_cpl0_vectors(kvm_path: str | None, mode: Mode) -> frozenset[int]:
    """Run `int3`, then a guest-set RFLAGS.TF, at CPL 0 in `mode` with #BP and #DB in the exception
    bitmap: the vectors that came back as exits."""
    from .actions import RESUME
    from .exits import ExitReason
    from .machine import Machine
    seen: set[int] = set()

    def record(vcpu, info):
        seen.add(info.interruption.vector)
        if info.interruption.vector == Vector.DB:
            vcpu.rflags &= ~_RFLAGS_TF
        return RESUME

    with Machine("2M", mode, kvm_path=kvm_path) as machine:
        machine.load_asm(_VECTOR_PROBE[mode])
        machine.on(ExitReason.EXCEPTION_OR_NMI, record, vector=int(Vector.BP))
        machine.on(ExitReason.EXCEPTION_OR_NMI, record, vector=int(Vector.DB))
        try:
            machine.run(timeout=2, max_exits=16)
        except Exception:
            pass                # a host that cannot run the probe intercepts what it saw
    return frozenset(seen & {int(Vector.BP), int(Vector.DB)})


HW_BREAKPOINT_ROW = "hardware breakpoints (DR0-DR3)"


def _hw_breakpoint_row(mode: Mode, works: bool) -> CapabilityRow:
    how = ("KVM_SET_GUEST_DEBUG USE_HW_BP, DR0-DR3 execute breakpoints; a step over the instruction resumes (probed)" if works else
           "a DR0 breakpoint never exits on this host; software breakpoints work (probed)")
    return CapabilityRow("debug", HW_BREAKPOINT_ROW, mode, works, how, probed=True)


_HW_BREAKPOINT_PROBE = "nop\n hwbp_target: nop\n nop\n EXIT 0"


def _probe_hw_breakpoint(kvm_path: str | None, mode: Mode) -> bool:
    """Arm DR0 on an instruction of a tiny guest in `mode`: whether it exits there once and the
    guest then runs on to its exit code."""
    from .machine import Machine
    hits: list[int] = []
    with Machine("2M", mode, kvm_path=kvm_path) as machine:
        machine.load_asm(_HW_BREAKPOINT_PROBE)
        target = machine.symbols["hwbp_target"]

        def hit(vcpu, info) -> None:
            hits.append(vcpu.rip)

        machine.hw_breakpoints.add(target, hit)
        try:
            result = machine.run(timeout=2, max_exits=16)
        except Exception:
            return False
    return hits == [target] and result.exit_code == 0


# -- caching ------------------------------------------------------------------------------------
_models: dict[tuple, HostModel] = {}
_models_lock = threading.Lock()


def _host_identity(kvm: Kvm) -> str:
    """Kernel, CPU and KVM device: what the probed answers depend on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "microcode", "vendor_id", "cpu family", "model\t")):
                    cpu += line.strip() + ";"
                if not line.strip():
                    break
    except OSError:
        pass
    rdev = os.fstat(kvm.fd).st_rdev
    uname = os.uname()
    text = f"v{PROBE_VERSION}|{uname.release}|{uname.version}|{uname.machine}|{cpu}|{rdev}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cache_file(identity: str):
    return cache_dir().parent / "capabilities" / f"{identity}.json"


def _load(identity: str) -> dict | None:
    try:
        data = json.loads(_cache_file(identity).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("identity") == identity else None


def _save(model: HostModel) -> None:
    caps = model.capabilities
    data = {"identity": model.identity, "tsc_offset": model.tsc_method, "msr_exit_all": caps.msr_exit_all,
            "vectors": {m.value: sorted(v) for m, v in model.probed_vectors().items()
                        if m is not Mode.USER and v is not ALL_VECTORS},
            "hw_breakpoints": {m.value: v for m, v in model.probed_hw_breakpoints().items()}}
    path = _cache_file(model.identity)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


def host_model(kvm: Kvm) -> HostModel:
    """The model of the host behind `kvm`: one per process and KVM device, its probes cached on disk
    under the host's identity (MINIVMM_CAPS_CACHE=0 turns the disk cache off)."""
    stat = os.fstat(kvm.fd)
    key = (stat.st_rdev, stat.st_ino, stat.st_dev)         # the device node: one model per process
    model = _models.get(key)
    if model is not None:
        return model
    identity = _host_identity(kvm)
    try:
        kvm_path: str | None = os.readlink(f"/proc/self/fd/{kvm.fd}")
    except OSError:
        kvm_path = None
    with _models_lock:
        model = _models.get(key)
        if model is not None:
            return model
        use_disk = os.environ.get("MINIVMM_CAPS_CACHE", "1") != "0"
        stored = _load(identity) if use_disk else None
        if stored is not None:
            tsc = str(stored.get("tsc_offset") or "")
            caps = replace(kvm_facts(kvm), tsc_offset=bool(tsc), msr_exit_all=bool(stored.get("msr_exit_all")))
            vectors = {Mode(m): frozenset(v) for m, v in stored.get("vectors", {}).items()
                       if m in Mode._value2member_map_}
            hw = {Mode(m): bool(v) for m, v in stored.get("hw_breakpoints", {}).items()
                  if m in Mode._value2member_map_}
        else:
            (caps, tsc), vectors, hw = probe_host_capabilities(kvm), {}, {}
        model = HostModel(caps, identity, vectors, kvm_path=kvm_path, disk_cache=use_disk, tsc_method=tsc,
                          hw_breakpoints=hw)
        if use_disk and stored is None:
            _save(model)
        _models[key] = model
    return model
