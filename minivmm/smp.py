"""More than one vCPU: one host thread per vCPU, stopped together.

`Machine(vcpus=N)` creates KVM's in-kernel irqchip, then vCPUs 0..N-1. vCPU 0
(the bootstrap processor) starts at the machine's entry in its mode; the
others (application processors) are left in the state KVM gives them with an
in-kernel LAPIC, MP state UNINITIALIZED: their KVM_RUN blocks in the kernel
until the guest's LAPIC sends INIT and STARTUP IPIs, which KVM handles itself
(real mode at CS = vector << 8, IP = 0, as on hardware; SDM vol. 3A 10.4 / 8.4).

While `machine.run()` runs, every vCPU has its own thread running the exit loop
of its own `minivmm.runloop.VcpuContext` (`machine.contexts[i]`: its vCPU,
`ExitInfo` with `info.vcpu_index`, VMCS model, step service, pre-entry hooks,
observers and exit statistics, like the per-core state of a hypervisor such as
HyperDbg), over the `minivmm.vm.Vm` they share (memory, devices, handlers). The
main thread waits for the first vCPU whose handlers stop the run (debug-exit, a
fatal exit, a handler's Stop), or for the deadline, then kicks the others out of
KVM_RUN: it sets `kvm_run.immediate_exit` and sends the thread a real-time
signal (`KICK_SIGNAL`, SIGRTMIN+1) whose Python handler does nothing, so the
signal only interrupts the ioctl (EINTR). The first vCPU to stop decides the
machine's `RunResult`; its `exits` are summed over all vCPUs, and each vCPU's
own result is in `machine.smp.results`.

The single-vCPU path does not come here: `Machine.run` checks once per run.

`max_exits` bounds each vCPU's exits separately. A vCPU kicked out because
another one stopped the machine reports reason "stopped" ("stopped by vCPU 0").
Each vCPU has its own VMCS model from the start (`machine.contexts[i].vmcs`);
handlers registered with a filter set the bitmap bits on every vCPU.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .kvm import KvmCpuidEntry2
from .runloop import Kicked

if TYPE_CHECKING:
    from .machine import Machine
    from .runloop import RunResult, VcpuContext

__all__ = ["SmpRunner", "KICK_SIGNAL", "cpuid_for_vcpu", "install_kick_handler"]

KICK_SIGNAL = signal.SIGRTMIN + 1
KICK_INTERVAL_S = 0.01


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


@dataclass
class _Thread:
    ctx: "VcpuContext"
    result: "RunResult | None" = None
    kicked: bool = False
    deadline_seen: bool = False


class SmpRunner:
    """Runs every vCPU context of `machine` in its own thread (`machine.smp`)."""

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        self.stopping = False
        self.deadline_expired = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._winner: tuple[_Thread, BaseException | None] | None = None
        self._threads: list[_Thread] = []
        machine.smp = self
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()          # so that later runs may come from any thread

    @property
    def results(self) -> list["RunResult | None"]:
        """Each vCPU's own result of the last run."""
        return [t.result for t in self._threads]

    # -- running ----------------------------------------------------------------------
    def run(self, timeout: float | None, max_exits: int | None) -> "RunResult":
        machine = self.machine
        install_kick_handler()
        machine.prepare_run()
        threads = self._threads = [_Thread(ctx) for ctx in machine.contexts]
        for t in threads:
            t.ctx.deadline_expired = lambda t=t: self._deadline(t)
            t.ctx.stop_requested = lambda: self.stopping
        self.stopping = self.deadline_expired = False
        self._winner = None
        self._done.clear()
        for t in threads:
            t.ctx.vcpu.fd.run.immediate_exit = 0
        workers = [threading.Thread(target=self._thread, args=(t, max_exits),
                                    name=f"minivmm-vcpu{t.ctx.index}", daemon=True)
                   for t in threads]
        start = time.perf_counter()
        interrupted = False
        for worker in reversed(workers):       # APs first: they wait in KVM_RUN for INIT/SIPI
            worker.start()
        try:
            if not self._done.wait(timeout):
                self.deadline_expired = True
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.stopping = True
            self._kick_until_stopped(threads, workers)
        elapsed = time.perf_counter() - start
        result = self._combine(threads, elapsed, interrupted)
        machine.last_result = result
        if interrupted:
            raise KeyboardInterrupt
        if self._winner is not None and self._winner[1] is not None:
            raise self._winner[1]
        return result

    def _deadline(self, t: _Thread) -> bool:
        """An interrupted KVM_RUN is the machine's deadline once per vCPU and run."""
        if self.deadline_expired and not t.deadline_seen:
            t.deadline_seen = True
            return True
        return False

    def _thread(self, t: _Thread, max_exits: int | None) -> None:
        error: BaseException | None = None
        try:
            t.ctx.run(None, max_exits, console=lambda: self.machine.serial.text)
        except Kicked:
            t.kicked = True
        except BaseException as exc:          # reported by the main thread
            error = exc
        t.result = t.ctx.last_result
        if t.kicked:
            return
        with self._lock:
            if self._winner is None:
                self._winner = (t, error)
                self.stopping = True
                self._done.set()

    def _kick_until_stopped(self, threads: list[_Thread], workers: list[threading.Thread]) -> None:
        while True:
            alive = [(t, worker) for t, worker in zip(threads, workers) if worker.is_alive()]
            if not alive:
                break
            for t, worker in alive:
                run = t.ctx.vcpu.fd.run
                if run is not None:
                    run.immediate_exit = 1
                try:
                    signal.pthread_kill(worker.ident, KICK_SIGNAL)
                except (ProcessLookupError, TypeError):
                    pass
            alive[0][1].join(KICK_INTERVAL_S)
        for t in threads:
            if t.ctx.vcpu.fd.run is not None:
                t.ctx.vcpu.fd.run.immediate_exit = 0

    def _combine(self, threads: list[_Thread], elapsed: float, interrupted: bool) -> "RunResult":
        from dataclasses import replace
        from .runloop import RunResult
        machine = self.machine
        if interrupted:
            chosen = None
            result = RunResult(reason="interrupted", message="interrupted by the user (SIGINT)")
        else:
            chosen = self._winner[0] if self._winner is not None else threads[0]
            result = chosen.result or RunResult(reason="error", message="the vCPU thread ended without a result")
            result = replace(result)
            index = chosen.ctx.index
            if index and result.message:
                result.message = f"vCPU {index}: {result.message}"
            elif index and result.reason not in ("exit",):
                result.message = f"vCPU {index} stopped the machine"
        for t in threads:
            if t.kicked and t.result is not None:
                why = "the deadline" if self.deadline_expired and chosen is None else \
                    f"vCPU {chosen.ctx.index}" if chosen is not None else "the user"
                t.result = replace(t.result, reason="stopped", exit_code=None,
                                   message=f"stopped by {why}")
        exits: dict[str, int] = {}
        for t in threads:
            if t.result is not None:
                for name, count in t.result.exits.items():
                    exits[name] = exits.get(name, 0) + count
        result.exits = exits
        result.elapsed_s = elapsed
        result.console = machine.serial.text
        return result
