"""`MachineTarget`: a `Machine` as the gdb protocol's target (`minivmm.gdb.protocol.Target`).

Threads are vCPUs (gdb thread N = vCPU N-1). While gdb looks, every vCPU is stopped
outside KVM_RUN. A resume runs the vCPUs gdb names, each in its own thread through
its `VcpuContext.run` (the machine's one exit loop, its handlers and hooks); the
first vCPU whose run ends stops the others, which are kicked out of KVM_RUN the way
`minivmm.smp` does it (`immediate_exit` and KICK_SIGNAL; their loops end with
`Kicked`). A step is the monitor-trap-flag control of that vCPU's VMCS with a
MONITOR_TRAP_FLAG handler that stops the run; software breakpoints are owners in
the machine's breakpoint table; watchpoints are EPT monitors of the hook registry
("ept_access"), so their number and length are not limited by debug registers.

In real mode an int3 goes through the guest's interrupt vector table on the hosts this
project runs on (the host emulates it instead of reporting #BP), so a breakpoint that gdb
inserts while the vCPU is in real mode is not an int3: the vCPUs that continue are
single-stepped and stop when CS.base + IP reaches one. Every instruction is then an exit:
such a continue is much slower than the guest's own pace, which suits the short real-mode
stretches of boot code rather than long loops.

Addresses from gdb are linear addresses of the vCPU gdb selected (Hg), translated
by the guest's page tables (`minivmm.pagewalk`); reads show the original bytes
under the breakpoint table's int3s.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..actions import RunEnd, Stop
from ..breakpoints import BreakpointError
from ..hwbreakpoints import HardwareBreakpointError, current_mode
from ..controls import ProcBasedControls
from ..exits import ExitReason, Vector
from ..pagewalk import PageFault, translate
from ..runloop import Kicked
from ..translate import GuestFault
from ..smp import KICK_INTERVAL_S, KICK_SIGNAL, install_kick_handler
from .protocol import Signal, StopEvent, TargetError, Unsupported
from .registers import Layout, layout_for_state

if TYPE_CHECKING:
    from ..machine import Machine
    from ..runloop import RunResult, VcpuContext

__all__ = ["MachineTarget", "stop_event_for"]

MTF = ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG
_PAGE = 4096
_EFAULT = 0x0E
_GPRS64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
           "r13", "r14", "r15", "rip")
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_WATCH_ACCESS = {2: ("w", "watch"), 3: ("r", "rwatch"), 4: ("rw", "awatch")}
_END_SIGNALS = {RunEnd.TIMEOUT: Signal.SIGALRM, RunEnd.EXIT_LIMIT: Signal.SIGALRM,
                RunEnd.TRIPLE_FAULT: Signal.SIGSEGV, RunEnd.ERROR: Signal.SIGILL,
                RunEnd.INTERRUPTED: Signal.SIGINT, RunEnd.ASSERT_FAILED: Signal.SIGABRT}
_VECTOR_SIGNALS = {Vector.DE: Signal.SIGFPE, Vector.UD: Signal.SIGILL, Vector.BP: Signal.SIGTRAP,
                   Vector.DB: Signal.SIGTRAP, Vector.MF: Signal.SIGFPE, Vector.XM: Signal.SIGFPE,
                   Vector.AC: Signal.SIGBUS}


def stop_event_for(result: "RunResult", thread: int) -> StopEvent:
    """How a run that ended by itself (not by a gdb breakpoint, watchpoint or step) is told
    to gdb: the guest's exit code or halt as the end of the process, anything the host
    stopped as a signal (deadline SIGALRM, triple fault SIGSEGV, emulation failure SIGILL,
    an unhandled exception by vector)."""
    reason = result.reason
    if reason == RunEnd.EXIT:
        return StopEvent(exit_code=result.exit_code or 0)
    if reason in (RunEnd.HLT, RunEnd.DONE):
        return StopEvent(exit_code=0)
    if reason == RunEnd.EXCEPTION and result.exception is not None:
        vector = result.exception.vector
        return StopEvent(_VECTOR_SIGNALS.get(vector, Signal.SIGSEGV), thread, message=result.message)
    return StopEvent(_END_SIGNALS.get(reason, Signal.SIGTRAP), thread, message=result.message)


@dataclass
class _Point:
    kind: int
    handles: list


class _RunState:
    """One resume: the vCPU threads, the first one to stop, the kick loop."""

    def __init__(self) -> None:
        self.stopping = False
        self.deadline = False
        self.interrupted = False
        self.first: tuple["VcpuContext", "RunResult | None", BaseException | None] | None = None
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[tuple["VcpuContext", threading.Thread]] = []
        self.started = time.perf_counter()


class MachineTarget:
    """The protocol target over `machine`; `timeout`, in seconds, bounds the time the guest
    runs (summed over resumes; None: no bound). The deadline stops the guest once, as
    SIGALRM; later resumes run without one (gdb's default for SIGALRM is to resume the
    program silently; `handle SIGALRM stop print` shows the stop). `wake_fd` becomes
    readable when a resume ends (for the server's select)."""

    def __init__(self, machine: "Machine", timeout: float | None = None) -> None:
        self.machine = machine
        self.timeout = timeout
        self.ran_s = 0.0
        install_kick_handler()
        machine.prepare_run()
        self._layout: Layout | None = None
        self._noted: dict[int, str] = {}              # thread -> the mode it was last reported in
        self._points: dict[tuple[int, int, int], _Point] = {}
        self._causes: dict[int, StopEvent] = {}
        self._stepping: set[int] = set()
        self._stepped_points: set[int] = set()        # real-mode breakpoints: linear addresses
        self._seeking: set[int] = set()               # vCPUs stepping to a real-mode breakpoint
        self._run: _RunState | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.finished: "RunResult | None" = None      # the run that ended the guest
        self.error: BaseException | None = None       # what the last resume raised, if anything
        self._mtf = machine.on(ExitReason.MONITOR_TRAP_FLAG, self._on_step)

    @property
    def wake_fd(self) -> int:
        return self._wake_r

    def close(self) -> None:
        """Remove every breakpoint, watchpoint and hook the target added."""
        self.remove_all_points()
        if self._mtf is not None:
            self.machine.off(self._mtf)
            self._mtf = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # -- threads and registers ------------------------------------------------------------
    def threads(self) -> list[int]:
        return [ctx.index + 1 for ctx in self.machine.contexts]

    def _ctx(self, thread: int) -> "VcpuContext":
        index = thread - 1
        if not 0 <= index < len(self.machine.contexts):
            raise TargetError(f"no thread {thread}", 2)
        return self.machine.contexts[index]

    def thread_name(self, thread: int) -> str:
        vcpu = self._ctx(thread).vcpu
        return f"vCPU {thread - 1} CPL{vcpu.cpl}"

    def layout(self) -> Layout:
        """The layout of vCPU 0's mode when gdb first asked (gdb reads the description once)."""
        if self._layout is None:
            vcpu = self.machine.vcpu
            self._layout = layout_for_state(vcpu.cr0, vcpu.efer)
        return self._layout

    def mode_note(self, thread: int) -> str:
        """A line for gdb when `thread`'s vCPU left the mode of the description gdb read (gdb
        reads it once per connection); empty when nothing changed since the last note."""
        vcpu = self._ctx(thread).vcpu
        now, described = layout_for_state(vcpu.cr0, vcpu.efer), self.layout()
        if self._noted.get(thread, described.architecture) == now.architecture:
            return ""
        self._noted[thread] = now.architecture
        if now.architecture == described.architecture:
            return f"vCPU {thread - 1} is back in {now.architecture} mode"
        same = len(now.registers) == len(described.registers)
        hint = f"`set architecture {now.architecture}` disassembles for it" if same else \
            f"this connection keeps the {described.architecture} registers"
        return (f"vCPU {thread - 1} switched to {now.architecture} mode (gdb read the "
                f"{described.architecture} description when it connected; {hint})")

    def read_registers(self, thread: int) -> dict[str, int | bytes]:
        vcpu = self._ctx(thread).vcpu
        values: dict[str, int | bytes] = {name: getattr(vcpu, name) for name in _GPRS64}
        values["eflags"] = vcpu.rflags
        for name in _SEGMENTS:
            values[name] = vcpu.segment(name).selector
        values["fs_base"], values["gs_base"] = vcpu.segment("fs").base, vcpu.segment("gs").base
        for name in _CONTROL:
            values[name] = getattr(vcpu, name)
        for wide, narrow in zip(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "rip"),
                                ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip")):
            values[narrow] = values[wide]
        fpu = vcpu.fd.get_fpu()
        for i in range(8):
            values[f"st{i}"] = bytes(fpu.fpr[i])[:10]
        for i in range(16):
            values[f"xmm{i}"] = bytes(fpu.xmm[i])
        values.update(fctrl=fpu.fcw, fstat=fpu.fsw, ftag=_full_tag(fpu.ftwx), fop=fpu.last_opcode,
                      fioff=fpu.last_ip & 0xFFFFFFFF, fiseg=(fpu.last_ip >> 32) & 0xFFFF,
                      fooff=fpu.last_dp & 0xFFFFFFFF, foseg=(fpu.last_dp >> 32) & 0xFFFF,
                      mxcsr=fpu.mxcsr)
        return values

    def write_register(self, thread: int, name: str, value: int | bytes) -> None:
        vcpu = self._ctx(thread).vcpu
        narrow = {"eax": "rax", "ecx": "rcx", "edx": "rdx", "ebx": "rbx", "esp": "rsp", "ebp": "rbp",
                  "esi": "rsi", "edi": "rdi", "eip": "rip"}
        if name in narrow:
            name = narrow[name]
            value = value & 0xFFFFFFFF
        if name in _GPRS64 or name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
            setattr(vcpu, name, value)
        elif name == "eflags":
            vcpu.rflags = value | 2
        elif name in _SEGMENTS:
            vcpu.set_segment(name, dataclasses.replace(vcpu.segment(name), selector=value & 0xFFFF))
        elif name in ("fs_base", "gs_base"):
            segment = name[:2]
            vcpu.set_segment(segment, dataclasses.replace(vcpu.segment(segment), base=value))
        else:
            self._write_fpu(vcpu, name, value)

    def _write_fpu(self, vcpu, name: str, value: int | bytes) -> None:
        fpu = vcpu.fd.get_fpu()
        if name.startswith("st"):
            fpu.fpr[int(name[2:])][:10] = bytes(value)[:10]
        elif name.startswith("xmm"):
            fpu.xmm[int(name[3:])][:] = bytes(value)[:16]
        elif name in ("fctrl", "fstat", "fop", "mxcsr"):
            setattr(fpu, {"fctrl": "fcw", "fstat": "fsw", "fop": "last_opcode"}.get(name, name), value)
        elif name == "ftag":
            fpu.ftwx = sum(1 << i for i in range(8) if (value >> (2 * i)) & 3 != 3)
        else:
            raise TargetError(f"register {name} is read-only here", 1)
        vcpu.fd.set_fpu(fpu)

    # -- memory -------------------------------------------------------------------------
    def _physical(self, thread: int, address: int, access: str = "r") -> tuple[int, int]:
        """(gpa, bytes up to the end of the page) of linear `address` for `thread`'s vCPU."""
        vcpu = self._ctx(thread).vcpu
        try:
            tr = translate(self.machine.memory, vcpu.cr0, vcpu.cr3, vcpu.cr4, vcpu.efer, address, access)
        except (PageFault, ValueError) as exc:
            raise TargetError(str(exc), _EFAULT) from None
        return tr.gpa, _PAGE - (address & (_PAGE - 1))

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        out = bytearray()
        memory, table = self.machine.memory, self.machine.breakpoints
        while len(out) < length:
            try:
                gpa, room = self._physical(thread, address + len(out))
                n = min(room, length - len(out))
                out += table.unpatched(gpa, memory.read(gpa, n))
            except Exception:
                if not out:
                    raise TargetError(f"cannot read {address:#x}", _EFAULT) from None
                break               # a partial read: gdb asks again for the rest
        return bytes(out)

    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        chunks = []
        pos = 0
        while pos < len(data):
            gpa, room = self._physical(thread, address + pos)
            n = min(room, len(data) - pos)
            if self.machine.memory.region_at(gpa) is None:
                raise TargetError(f"{address + pos:#x} is not guest RAM", _EFAULT)
            chunks.append((gpa, data[pos:pos + n]))
            pos += n
        for gpa, chunk in chunks:
            self.machine.memory.write(gpa, chunk)

    # -- breakpoints and watchpoints ----------------------------------------------------------
    def insert_point(self, kind: int, address: int, length: int, thread: int = 1) -> None:
        key = (kind, address, length)
        if key in self._points:
            return
        if kind == 0 and not self._ctx(thread).vcpu.cr0 & 1:
            self._stepped_points.add(address)       # real mode: see _real_mode_breakpoints
            self._points[key] = _Point(kind, [])
        elif kind == 0:
            gpa, _ = self._physical(thread, address, "r")
            try:
                handle = self.machine.breakpoints.add(gpa, self._on_breakpoint)
            except BreakpointError as exc:
                raise TargetError(str(exc), _EFAULT) from None
            self._points[key] = _Point(kind, [handle])
        elif kind == 1:
            self._points[key] = _Point(kind, [self._hw_breakpoint(thread, address)])
        elif kind in _WATCH_ACCESS:
            if length <= 0:
                raise TargetError("empty watch range", 0x16)
            self._points[key] = _Point(kind, self._watch(thread, kind, address, length))
        else:
            raise Unsupported

    def _hw_breakpoint(self, thread: int, address: int):
        """A debug-register breakpoint on every vCPU, where the host honours them in the mode
        `thread`'s vCPU is in now (an error reply otherwise, and when DR0-DR3 are taken)."""
        mode = current_mode(self._ctx(thread).vcpu)
        try:
            return self.machine.hw_breakpoints.add(address, self._on_hw_breakpoint, mode=mode)
        except HardwareBreakpointError as exc:
            raise TargetError(str(exc), 0x1C) from None      # ENOSPC

    def _on_hw_breakpoint(self, vcpu, info):
        self._causes[vcpu.index] = StopEvent(Signal.SIGTRAP, vcpu.index + 1, "hwbreak")
        return Stop(RunEnd.STOPPED, message=f"gdb hardware breakpoint at {info.guest_linear_address:#x}")

    def _watch(self, thread: int, kind: int, address: int, length: int) -> list:
        """EPT monitors over the guest-physical runs of [address, address + length)."""
        access, reason = _WATCH_ACCESS[kind]
        runs: list[tuple[int, int, int]] = []           # (gpa, size, linear)
        pos = 0
        while pos < length:
            gpa, room = self._physical(thread, address + pos)
            n = min(room, length - pos)
            if runs and runs[-1][0] + runs[-1][1] == gpa:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, runs[-1][2])
            else:
                runs.append((gpa, n, address + pos))
            pos += n
        handles = []
        try:
            for gpa, size, linear in runs:
                def hit(vcpu, info, gpa=gpa, linear=linear):
                    accessed = linear + info.guest_physical_address - gpa
                    note = self._access_note(vcpu.index, info, accessed)
                    self._causes[vcpu.index] = StopEvent(Signal.SIGTRAP, vcpu.index + 1, reason, accessed,
                                                         message=note)
                    return Stop(RunEnd.STOPPED, message=f"gdb {reason} at {accessed:#x}")
                handles.append(self.machine.hooks.add("ept_access", hit, gpa=range(gpa, gpa + size),
                                                      access=access))
        except Exception:
            for handle in handles:
                self.machine.hooks.remove(handle)
            raise
        return handles

    def _access_note(self, index: int, info, accessed: int) -> str:
        """What the stop message says of a watched access: its kind and size, and the
        accessing instruction. A write is reported once it retired (RIP is past it, as
        after a hardware watchpoint's trap): its instruction is the one that ends at RIP."""
        event = getattr(info, "event", None)
        if event is None:
            return ""
        rip = event.rip
        if event.kind == "write":
            start = _instruction_ending_at(self.machine.contexts[index], rip)
            where = f"by the instruction at {start:#x}" if start is not None else f"retired before rip {rip:#x}"
        else:
            where = f"by the instruction at {rip:#x}"
        return f"{event.kind} of {event.size} bytes at {accessed:#x} {where}"

    def remove_point(self, kind: int, address: int, length: int) -> None:
        point = self._points.pop((kind, address, length), None)
        if point is None:
            return
        if kind == 0:
            self._stepped_points.discard(address)
        for handle in point.handles:
            if kind == 0:
                self.machine.breakpoints.remove(handle)
            elif kind == 1:
                self.machine.hw_breakpoints.remove(handle)
            else:
                self.machine.hooks.remove(handle)

    def remove_all_points(self) -> None:
        for key in list(self._points):
            self.remove_point(*key)

    def _on_breakpoint(self, vcpu, info):
        self._causes[vcpu.index] = StopEvent(Signal.SIGTRAP, vcpu.index + 1, "swbreak")
        return Stop(RunEnd.STOPPED, message=f"gdb breakpoint at {info.guest_linear_address:#x}")

    def _on_step(self, vcpu, info):
        if vcpu.index not in self._stepping:
            return None
        if vcpu.index in self._seeking:
            if (vcpu.segment("cs").base + vcpu.rip) & 0xFFFFFFFF not in self._stepped_points:
                return None
            self._causes[vcpu.index] = StopEvent(Signal.SIGTRAP, vcpu.index + 1, "swbreak")
            return Stop(RunEnd.STOPPED, message="gdb breakpoint")
        self._causes[vcpu.index] = StopEvent(Signal.SIGTRAP, vcpu.index + 1)
        return Stop(RunEnd.STOPPED, message="gdb single step")

    # -- running --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._run is not None

    def start(self, actions: dict[int, str]) -> None:
        """Run the vCPUs of `actions` ("c" or "s" each) until one stops; `wait` collects it."""
        if self._run is not None:
            raise RuntimeError("the target is running already")
        if self.finished is not None:
            raise TargetError("the guest has ended", 1)
        run = self._run = _RunState()
        self._causes.clear()
        for thread, action in actions.items():
            ctx = self._ctx(thread)
            if action == "c" and self._stepped_points:
                self._seeking.add(ctx.index)
            if action == "s" or ctx.index in self._seeking:
                self._stepping.add(ctx.index)
                ctx.vmcs.set_control(MTF)
        self.error = None
        for thread in actions:
            ctx = self._ctx(thread)
            ctx.stop_requested = lambda run=run: run.stopping
            ctx.deadline_expired = lambda run=run, seen=[False]: _once(run, seen)
            ctx.vcpu.fd.run.immediate_exit = 0
            worker = threading.Thread(target=self._run_one, args=(run, ctx.index), daemon=True,
                                      name=f"minivmm-gdb-vcpu{ctx.index}")
            run.threads.append((ctx, worker))
        for _, worker in reversed(run.threads):
            worker.start()
        if self.timeout is not None:
            threading.Thread(target=self._deadline_watch, args=(run,), daemon=True,
                             name="minivmm-gdb-deadline").start()

    def _run_one(self, run: _RunState, index: int) -> None:
        """vCPU `index`'s exit loop for this resume, in its own thread."""
        context = self.machine.contexts[index]
        result, error = None, None
        try:
            result = context.run(None, None, console=lambda: self.machine.serial.text)
        except Kicked:
            return
        except BaseException as exc:          # reported to gdb as SIGABRT, kept for the caller
            error = exc
            result = context.last_result
        with run.lock:
            if run.first is None:
                run.first = (context, result, error)
            self._wake(run)

    def _deadline_watch(self, run: _RunState) -> None:
        remaining = self.timeout - self.ran_s
        if not run.done.wait(max(remaining, 0)):
            run.deadline = True
            self.timeout = None             # once: gdb passes SIGALRM on by default, and resumes
            self._kick(run)

    def interrupt(self) -> None:
        """Ctrl-C: stop every running vCPU (the stop is SIGINT)."""
        run = self._run
        if run is not None:
            with run.lock:
                if not run.done.is_set():
                    run.interrupted = True
                    self._wake(run)

    def _wake(self, run: _RunState) -> None:
        """The resume is over (with `run.lock` held): once per resume, one byte on the wake fd
        and `done`; the other vCPUs are kicked by `wait`."""
        run.stopping = True
        if not run.done.is_set():
            os.write(self._wake_w, b"!")
            run.done.set()

    def _kick(self, run: _RunState) -> None:
        run.stopping = True
        for ctx, worker in run.threads:
            if worker.is_alive() and ctx.vcpu.fd.run is not None:
                ctx.vcpu.fd.run.immediate_exit = 1
                try:
                    signal.pthread_kill(worker.ident, KICK_SIGNAL)
                except (ProcessLookupError, TypeError):
                    pass

    def wait(self, timeout: float | None = None) -> StopEvent | None:
        """The stop of the current resume once a vCPU stopped (None while all still run)."""
        run = self._run
        if run is None:
            raise RuntimeError("the target is not running")
        if not run.done.wait(timeout):
            return None
        while any(worker.is_alive() for _, worker in run.threads):
            self._kick(run)
            for _, worker in run.threads:
                worker.join(KICK_INTERVAL_S)
        try:
            os.read(self._wake_r, 64)
        except BlockingIOError:
            pass
        self.ran_s += time.perf_counter() - run.started
        for ctx, _ in run.threads:
            ctx.vcpu.fd.run.immediate_exit = 0
            ctx.stop_requested = lambda: False
            ctx.deadline_expired = _default_deadline
        for index in self._stepping:
            self.machine.contexts[index].vmcs.set_control(MTF, False)
        self._stepping.clear()
        self._seeking.clear()
        self._run = None
        return self._event(run)

    def _event(self, run: _RunState) -> StopEvent:
        if run.first is None or run.interrupted and run.first[1] is None:
            return StopEvent(Signal.SIGINT, self.threads()[0])
        ctx, result, error = run.first
        thread = ctx.index + 1
        if error is not None:           # an instruction the host cannot run: SIGILL; a handler's bug: SIGABRT
            self.error = error
            number = Signal.SIGILL if isinstance(error, GuestFault) else Signal.SIGABRT
            return StopEvent(number, thread, message=f"{type(error).__name__}: {error}")
        cause = self._causes.get(ctx.index)
        if result.reason == RunEnd.STOPPED and cause is not None:
            return cause
        event = stop_event_for(result, thread)
        if event.exit_code is not None:
            self.finished = result
        self.machine.last_result = result
        return event

    def resume(self, actions: dict[int, str]) -> StopEvent:
        """Run until the first vCPU stops (`start` + `wait`)."""
        self.start(actions)
        return self.wait()

    # -- monitor --------------------------------------------------------------------------
    def monitor(self, thread: int, command: str) -> str:
        from .monitor import run_monitor
        return run_monitor(self.machine, self._ctx(thread), command)


def _instruction_ending_at(ctx: "VcpuContext", rip: int) -> int | None:
    """The start of the instruction that ends right before `rip`: the longest of the up to
    15 byte sequences before `rip` that decodes as exactly one instruction (x86 code cannot
    be decoded backwards for certain; this is the usual debugger heuristic)."""
    from ..disasm import instruction_length
    bits = ctx.code_bits()
    for length in range(15, 0, -1):
        if rip < length:
            continue
        code = ctx.read_code(rip - length, length)
        if len(code) == length and instruction_length(code, bits) == length:
            return rip - length
    return None


def _default_deadline() -> bool:
    from ..vcpu import run_timer
    return run_timer.expired


def _once(run: _RunState, seen: list) -> bool:
    """The resume's deadline, seen once by each vCPU (the run loop then reports it)."""
    if run.deadline and not seen[0]:
        seen[0] = True
        return True
    return False


def _full_tag(abridged: int) -> int:
    """The x87 tag word from FXSAVE's abridged form (1 bit per register: empty or not); a
    register in use shows as valid (00), an empty one as 11."""
    return sum((0 if abridged >> i & 1 else 3) << (2 * i) for i in range(8))
