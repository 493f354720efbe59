"""More than one vCPU: one host thread per vCPU, stopped together.

`Machine(vcpus=N)` creates KVM's in-kernel irqchip, then vCPUs 0..N-1. vCPU 0
(the bootstrap processor) starts at the machine's entry in its mode; the
others (application processors) are left in the state KVM gives them with an
in-kernel LAPIC, MP state UNINITIALIZED: their KVM_RUN blocks in the kernel
until the guest's LAPIC sends INIT and STARTUP IPIs, which KVM handles itself
(real mode at CS = vector << 8, IP = 0, as on hardware; SDM vol. 3A 10.4 / 8.4).

While `machine.run()` runs, every vCPU has its own thread and its own exit
loop: the same `Machine.run` loop, run on a per-vCPU view of the machine that
shares memory, devices and handlers but has its own vCPU, `ExitInfo`
(`info.vcpu_index`), VMCS model and exit statistics (`machine.smp.states[i]`,
like the per-core state of a hypervisor such as HyperDbg). The main thread
waits for the first vCPU whose handlers stop the run (debug-exit, a fatal exit,
a handler's Stop), or for the deadline, then kicks the others out of KVM_RUN:
it sets `kvm_run.immediate_exit` and sends the thread a real-time signal
(`KICK_SIGNAL`, SIGRTMIN+1) whose Python handler does nothing, so the signal
only interrupts the ioctl (EINTR). The first vCPU to stop decides the
machine's `RunResult`; its `exits` are summed over all vCPUs, and each vCPU's
own result is in `machine.smp.results`.

The single-vCPU path does not come here: `Machine.run` checks once per run.

`max_exits` bounds each vCPU's exits separately. A vCPU kicked out because
another one stopped the machine reports reason "stopped" ("stopped by vCPU 0").

Limits: EPT hooks, `step_once` and `pre_entry` hooks apply to vCPU 0 only; an
AP's VMCS model starts as a copy of vCPU 0's controls when the AP first runs.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from .exits import ExitInfo, ExitReason
from .kvm import ExitKind, KvmCpuidEntry2

if TYPE_CHECKING:
    from .machine import ExitStat, Machine, RunResult
    from .vcpu import Vcpu
    from .vmcs import Vmcs

__all__ = ["SmpRunner", "VcpuState", "KICK_SIGNAL", "cpuid_for_vcpu", "install_kick_handler"]

KICK_SIGNAL = signal.SIGRTMIN + 1
KICK_INTERVAL_S = 0.01
_EXIT_INTR = int(ExitKind.INTR)


def cpuid_for_vcpu(entries: Iterable[KvmCpuidEntry2], index: int) -> list[KvmCpuidEntry2]:
    """A copy of the CPUID table with vCPU `index`'s APIC ID (leaf 1 EBX[31:24], leaves 0xB/0x1F
    EDX), as QEMU fills it for each vCPU; KVM does not change the table per vCPU."""
    copies = [KvmCpuidEntry2.from_buffer_copy(entry) for entry in entries]
    for entry in copies:
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x00FFFFFF) | (index & 0xFF) << 24
        elif entry.function in (0xB, 0x1F):
            entry.edx = index
    return copies


def _ignore_kick(signum, frame) -> None:
    """The kick signal only has to interrupt KVM_RUN."""


def install_kick_handler() -> None:
    """Install the no-op KICK_SIGNAL handler (Python allows this from the main thread only)."""
    if signal.getsignal(KICK_SIGNAL) is _ignore_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("a machine with more than one vCPU must first run from the main thread "
                           "(it installs the signal handler that kicks vCPU threads out of KVM_RUN)")
    signal.signal(KICK_SIGNAL, _ignore_kick)


class _Kicked(Exception):
    """Another vCPU stopped the machine: this vCPU's loop ends."""


class _VcpuView:
    """Mixed into a per-vCPU copy of the machine: an interrupted KVM_RUN is the machine's
    deadline (once) or a kick from the main thread."""
    _smp_runner: "SmpRunner"
    _deadline_seen: bool

    def _translate(self, kind, run):
        if kind == _EXIT_INTR:
            runner = self._smp_runner
            if runner.deadline_expired and not self._deadline_seen:
                self._deadline_seen = True
                return self.info.reset(ExitReason.VMX_PREEMPTION_TIMER_EXPIRED), None
            if runner.stopping:
                raise _Kicked()
            return None, None
        return super()._translate(kind, run)


@dataclass
class VcpuState:
    """What belongs to one vCPU: its VMCS model, exit info and exit statistics."""
    index: int
    vcpu: "Vcpu"
    vmcs: "Vmcs"
    info: ExitInfo
    stats: dict[str, "ExitStat"] = field(default_factory=dict)
    result: "RunResult | None" = None
    kicked: bool = False


class SmpRunner:
    """Runs every vCPU of `machine` in its own thread (`machine.smp`)."""

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        machine.info.vcpu_index = 0
        self.states: list[VcpuState] = [VcpuState(0, machine.vcpu, machine.vmcs, machine.info, machine.stats)]
        self.stopping = False
        self.deadline_expired = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._winner: tuple[VcpuState, BaseException | None] | None = None
        self._view_classes: dict[type, type] = {}
        machine.smp = self
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()          # so that later runs may come from any thread

    @property
    def results(self) -> list["RunResult | None"]:
        """Each vCPU's own result of the last run."""
        return [state.result for state in self.states]

    # -- per-vCPU views -------------------------------------------------------------
    def _ap_state(self, index: int) -> VcpuState:
        from .vmcs import Vmcs
        machine = self.machine
        while len(self.states) <= index:
            i = len(self.states)
            vcpu = machine.vcpus[i]
            bsp = machine.vmcs
            vmcs = Vmcs(machine)
            vmcs.controls = dict(bsp.controls)
            vmcs.exception_bitmap = bsp.exception_bitmap
            vmcs.tsc_offset = bsp.tsc_offset
            vmcs.io_bitmap = bsp.io_bitmap              # port routing and the MSR filter are VM-wide
            vmcs.msr_bitmap = bsp.msr_bitmap
            vmcs._realised.msr_filter = bsp._realised.msr_filter
            vmcs._user_msr_enabled = bsp._user_msr_enabled
            info = ExitInfo()
            info.vcpu_index = i
            self.states.append(VcpuState(i, vcpu, vmcs, info))
        return self.states[index]

    def _view(self, state: VcpuState) -> "Machine":
        machine = self.machine
        base = type(machine)
        cls = self._view_classes.get(base)
        if cls is None:
            cls = self._view_classes[base] = type(f"{base.__name__}Vcpu", (_VcpuView, base), {})
        view = object.__new__(cls)
        view.__dict__.update(machine.__dict__)
        view._smp = None
        view._smp_runner = self
        view._deadline_seen = False
        view.vcpu = state.vcpu
        view.info = state.info
        view.vmcs = state.vmcs
        view.stats = state.stats
        view._run_mmap = state.vcpu.fd.run_mmap
        if state.index:
            view._io_routes = {}
            view._step_callbacks = []
            view.pre_entry = []
            view._last_exception = None
            state.vmcs.machine = view
        return view

    # -- running ----------------------------------------------------------------------
    def run(self, timeout: float | None, max_exits: int | None) -> "RunResult":
        from .machine import Machine
        machine = self.machine
        install_kick_handler()
        if not machine._started:
            machine.setup()
        if machine.cpuid.dirty:
            machine.apply_cpuid()
        states = [self.states[0]] + [self._ap_state(i) for i in range(1, len(machine.vcpus))]
        views = [self._view(state) for state in states]
        self.stopping = self.deadline_expired = False
        self._winner = None
        self._done.clear()
        for state in states:
            state.result, state.kicked = None, False
            state.vcpu.fd.run.immediate_exit = 0
        machine.debug_exit.reset()
        threads = [threading.Thread(target=self._thread, args=(Machine.run, state, view, max_exits),
                                    name=f"minivmm-vcpu{state.index}", daemon=True)
                   for state, view in zip(states, views)]
        start = time.perf_counter()
        interrupted = False
        for thread in reversed(threads):       # APs first: they wait in KVM_RUN for INIT/SIPI
            thread.start()
        try:
            if not self._done.wait(timeout):
                self.deadline_expired = True
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.stopping = True
            self._kick_until_stopped(states, threads)
        elapsed = time.perf_counter() - start
        bsp_view = views[0]
        for name in ("_last_exception", "_step_callbacks", "_step_rip", "_ept"):
            if name in bsp_view.__dict__:
                setattr(machine, name, bsp_view.__dict__[name])
        result = self._combine(states, elapsed, interrupted)
        machine.last_result = result
        if interrupted:
            raise KeyboardInterrupt
        if self._winner is not None and self._winner[1] is not None:
            raise self._winner[1]
        return result

    def _thread(self, loop, state: VcpuState, view: "Machine", max_exits: int | None) -> None:
        error: BaseException | None = None
        try:
            loop(view, None, max_exits)
        except _Kicked:
            state.kicked = True
        except BaseException as exc:          # reported by the main thread
            error = exc
        state.result = getattr(view, "last_result", None) if view.__dict__.get("last_result") is not None \
            else None
        if state.kicked:
            return
        with self._lock:
            if self._winner is None:
                self._winner = (state, error)
                self.stopping = True
                self._done.set()

    def _kick_until_stopped(self, states: list[VcpuState], threads: list[threading.Thread]) -> None:
        while True:
            alive = [(state, thread) for state, thread in zip(states, threads) if thread.is_alive()]
            if not alive:
                break
            for state, thread in alive:
                run = state.vcpu.fd.run
                if run is not None:
                    run.immediate_exit = 1
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except (ProcessLookupError, TypeError):
                    pass
            alive[0][1].join(KICK_INTERVAL_S)
        for state in states:
            if state.vcpu.fd.run is not None:
                state.vcpu.fd.run.immediate_exit = 0

    def _combine(self, states: list[VcpuState], elapsed: float, interrupted: bool) -> "RunResult":
        from dataclasses import replace
        from .machine import RunResult
        machine = self.machine
        if interrupted:
            chosen = None
            result = RunResult(reason="interrupted", message="interrupted by the user (SIGINT)")
        else:
            chosen = self._winner[0] if self._winner is not None else states[0]
            result = chosen.result or RunResult(reason="error", message="the vCPU thread ended without a result")
            result = replace(result)
            if result.reason == "exception" and result.exception is not None:
                result.message = str(result.exception)       # the default handler sees vCPU 0's
            if chosen.index and result.message:
                result.message = f"vCPU {chosen.index}: {result.message}"
            elif chosen.index and result.reason not in ("exit",):
                result.message = f"vCPU {chosen.index} stopped the machine"
        for state in states:
            if state.kicked and state.result is not None:
                why = "the deadline" if self.deadline_expired and chosen is None else \
                    f"vCPU {chosen.index}" if chosen is not None else "the user"
                state.result = replace(state.result, reason="stopped", exit_code=None,
                                       message=f"stopped by {why}")
        exits: dict[str, int] = {}
        for state in states:
            if state.result is not None:
                for name, count in state.result.exits.items():
                    exits[name] = exits.get(name, 0) + count
        result.exits = exits
        result.elapsed_s = elapsed
        result.console = machine.serial.text
        return result
