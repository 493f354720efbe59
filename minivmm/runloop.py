"""`VcpuContext`: one vCPU's VMX state and its exit loop.

A context owns its vCPU, its VMCS model, its `ExitInfo`, its exit statistics,
its step service, its pre-entry hooks and observers, and the last exception it
saw; it shares a `minivmm.vm.Vm` with the other vCPUs of the machine. The exit
loop goes through these stages for every exit:

1. prepare: pre-entry hooks, VMCS realisation, register write-back;
2. enter: KVM_RUN (`Vcpu.enter`, or `fastpath.IoLoop` for floods of port I/O);
3. translate: KVM exit -> VMX exit (`minivmm.translate`, pure);
4. observe: observers see the exit;
5. dispatch: the handler chain of the exit reason picks an action;
6. complete: the action is carried out (`_complete`), the only place that
   writes replies, moves RIP and finishes an exit without entering the guest.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from . import fastpath
from .actions import RESUME, Action, RunEnd, AllowOnce, Emulate, Inject, Passthrough, Reply, Resume, Stop
from .errors import MinivmmError
from .exits import ExitInfo, ExitReason, Vector
from .fastpath import IO_TAG, LOOP_ERROR, LOOP_STATE, LOOP_YIELD, unpack_io
from .kvm import ExitKind, IoExit, KvmError, KvmRun, decode_exit
from .modes import EXCEPTION_PORT, SEL_USER_CODE64, SEL_USER_DATA, Mode
from .translate import (ExceptionReport, GuestFault, RestoreUserFrame, Translator, exception_report,
                        io_qualification)
from .vcpu import Vcpu, run_timer
from .vmcs import RFLAGS_TF, Vmcs

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["ExitStat", "HandlerError", "RunResult", "VcpuContext"]


@dataclass
class ExitStat:
    """Exits of one basic reason: how many, and the time spent in their handlers."""
    count: int = 0
    handler_seconds: float = 0.0


@dataclass
class RunResult:
    """How a run ended.

    `reason` is a `RunEnd` (a str). `exit_code` is the value the guest wrote to
    the debug-exit port; `exit_status` is QEMU's isa-debug-exit status for it,
    (code << 1) | 1.
    """
    reason: RunEnd
    exit_code: int | None = None
    console: str = ""
    exits: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    rip: int = 0
    message: str = ""
    exception: ExceptionReport | None = None
    stats: dict[str, ExitStat] = field(default_factory=dict)
    last_exit: str = ""

    @property
    def exit_status(self) -> int | None:
        return None if self.exit_code is None else (self.exit_code << 1) | 1

    def __str__(self) -> str:
        text = f"{self.reason}"
        if self.exit_code is not None:
            text += f" code={self.exit_code}"
        if self.message:
            text += f": {self.message}"
        return text


class HandlerError(MinivmmError, RuntimeError):
    """An exception raised inside an exit handler; the run stopped."""


class Kicked(MinivmmError):
    """Another vCPU stopped the machine: this vCPU's loop ends."""


_EXIT_IO = int(ExitKind.IO)
_IO_INSTRUCTION = int(ExitReason.IO_INSTRUCTION)
_unpack_io = struct.Struct("<BBHIQ").unpack_from       # kvm_run.io: direction, size, port, count, data_offset
_IO_EXIT_OFFSET = KvmRun.exit.offset
_UNPACK = {1: struct.Struct("<B").unpack_from, 2: struct.Struct("<H").unpack_from,
           4: struct.Struct("<I").unpack_from}
_ADVANCE_BY_LENGTH = frozenset({ExitReason.EXCEPTION_OR_NMI})
_COMPLETED_BY_KVM = frozenset({ExitReason.IO_INSTRUCTION, ExitReason.EXECUTE_RDMSR,
                               ExitReason.EXECUTE_WRMSR, ExitReason.EPT_VIOLATION,
                               ExitReason.EPT_MISCONFIGURATION})


def handler_error(vcpu: Vcpu, info: ExitInfo, exc: BaseException, what: str = "") -> BaseException:
    """What a raising callback stops the run with: a HandlerError chained to an Exception;
    KeyboardInterrupt and other BaseExceptions pass through. `what` names the callback kind
    (default: the exit reason's handler)."""
    if not isinstance(exc, Exception):
        return exc
    what = what or f"{info.reason.name} handler"
    error = HandlerError(f"{what} raised {type(exc).__name__}: {exc} (guest rip={vcpu.rip:#x})")
    error.__cause__ = exc
    return error


class VcpuContext:
    """One vCPU of a machine and everything that is its own (see the module docstring)."""

    def __init__(self, vm: "Vm", vcpu: Vcpu, mode: Mode) -> None:
        self.vm = vm
        self.vcpu = vcpu
        self.index = vcpu.index
        self.mode = Mode(mode)
        self.info = ExitInfo()
        self.info.vcpu_index = vcpu.index
        self._io_routes = vm.route_cache()
        self.vmcs = Vmcs(vcpu, self.info, vm.vmx, self.mode is Mode.USER,
                         on_routing_change=self._io_routes.clear, mode=self.mode)
        self.translator = Translator(self.mode)
        self.stats: dict[str, ExitStat] = {}
        self.pre_entry: list[Callable[[], None]] = []
        self.observers: list[Callable[[Vcpu, ExitInfo], None]] = []
        self.last_exception: ExceptionReport | None = None
        self.last_result: RunResult | None = None
        self.ept = None                  # the machine's EptShadow, once it has one
        self.deadline_expired: Callable[[], bool] = lambda: run_timer.expired
        self.stop_requested: Callable[[], bool] = lambda: False
        self._io_loop: fastpath.IoLoop | None = None
        self._steps: list[Callable[[Vcpu], None]] = []
        self._fault: tuple = (None, 0, 0)        # (exception, rip), entry, repeats: _resumed_fault
        self._step_rip: int | None = None
        self._run_mmap = vcpu.fd.run_mmap
        self.syscalls = None             # the machine's minivmm.syscalls.SyscallTable, once it has one

    def close(self) -> None:
        self._io_loop = None
        self.vcpu.close()

    # -- what the translation may read (minivmm.translate.CpuView) -------------------
    @property
    def rip(self) -> int:
        return self.vcpu.rip

    @property
    def rsp(self) -> int:
        return self.vcpu.rsp

    @property
    def rax(self) -> int:
        return self.vcpu.rax

    @property
    def cr2(self) -> int:
        return self.vcpu.cr2

    def code_bits(self) -> int:
        """16, 32 or 64: the operand size the CPU decodes guest code with now."""
        cs = self.vcpu.segment("cs")
        if not self.vcpu.cr0 & 1:
            return 16
        return 64 if cs.l else 32 if cs.db else 16

    def read_code(self, rip: int, length: int) -> bytes:
        """Guest code bytes at CS:rip (empty when unmapped); identity paging assumed when no
        walker applies."""
        from .pagewalk import read_virtual
        linear = self.vcpu.segment("cs").base + rip if self.mode is Mode.REAL else rip
        try:
            return read_virtual(self.vm.memory, self.vcpu, linear, length)
        except Exception:
            return b""

    def read_physical(self, gpa: int, length: int) -> bytes:
        return self.vm.memory.read(gpa, length)

    def linear_of_physical(self, gpa: int) -> int | None:
        from .pagewalk import linear_of_physical
        return linear_of_physical(self.vm.memory, self.vcpu, gpa)

    def fetch_address(self) -> tuple[int, int] | None:
        from .pagewalk import CR0_PG, EFER_LMA, PageFault, translate
        vcpu = self.vcpu
        cs = vcpu.segment("cs")
        linear = vcpu.rip
        if not vcpu.efer & EFER_LMA or not cs.l:        # not 64-bit mode: CS.base applies
            linear = (cs.base + linear) & 0xFFFFFFFF
        if not vcpu.cr0 & CR0_PG:
            return linear, linear
        try:
            walk = translate(self.vm.memory, vcpu.cr0, vcpu.cr3, vcpu.cr4, vcpu.efer, linear, "x",
                             user=vcpu.cpl == 3)
        except (PageFault, ValueError):
            return None
        return linear, walk.gpa

    # -- the step service -----------------------------------------------------------
    def step_once(self, callback: Callable[[Vcpu], None]) -> None:
        """Run `callback(vcpu)` right after this vCPU's next instruction (one single step)."""
        self._steps.append(callback)
        self.vmcs.step_requested = True
        self.vmcs.mark_dirty()

    @property
    def stepping(self) -> bool:
        return bool(self._steps) or self.vmcs.mtf

    def _stepped(self, info: ExitInfo) -> bool:
        """One instruction retired under single-step: run the step callbacks; True when the
        step is an exit (MTF, or the HLT the step went over), False when it was the step
        service's alone."""
        vcpu = self.vcpu
        callbacks, self._steps = self._steps, []
        try:
            for callback in callbacks:
                callback(vcpu)
        except Exception as exc:
            raise handler_error(vcpu, info, exc, "step callback")
        if callbacks and not self._steps:
            self.vmcs.step_requested = False
            self.vmcs.mark_dirty()
        if not self.vmcs.mtf:
            return False
        previous, self._step_rip = self._step_rip, vcpu.rip
        if previous is not None and self.read_code(previous, 1) == b"\xf4":
            info.reset(ExitReason.EXECUTE_HLT, instruction_length=1, raw_kvm_exit=info.raw_kvm_exit)
        return True

    # -- I/O routes -------------------------------------------------------------------
    def _io_route(self, port: int, is_out: bool) -> tuple:
        """The handlers an access to `port` goes through: the user's when the I/O bitmap (or
        unconditional I/O exiting) selects the port, then the default, which is left out for
        writes to a port no device claims when it would drop them anyway. Cached under
        `port << 1 | is_out`."""
        key = port << 1 | is_out
        route = self._io_routes.get(key)
        if route is None:
            chain = self.vm.dispatcher.chain(ExitReason.IO_INSTRUCTION, port)
            if not self.vmcs.io_reaches_handlers(port):
                chain = chain[-1:]
            if (is_out and chain and port not in self.vm.ports.by_port
                    and self.vm.dispatcher.drops_unclaimed_writes(ExitReason.IO_INSTRUCTION)):
                chain = chain[:-1]
            route = self._io_routes[key] = chain
        return route

    def _io_fast_route(self, high: int) -> tuple[IoExit, tuple, dict] | None:
        """(detail, handlers, sites) of the single-item I/O exits whose packed form
        (`minivmm.fastpath`) has upper half `high`, cached under `high` (above 2**24, clear
        of the `_io_route` keys). None for the exits the general path takes: multi-item
        (REP) accesses and the built-in kernel's ports."""
        port, size, is_out, multi, _ = unpack_io(high << 32)
        if multi or port == EXCEPTION_PORT or port == self.translator.hypercall_port:
            return None
        data_offset = _unpack_io(self._run_mmap, _IO_EXIT_OFFSET)[4]
        route = self._io_routes[high] = (IoExit(port, size, is_out, 1, data_offset),
                                         self._io_route(port, is_out), {})
        return route

    def _io_site(self, sites: dict, detail: IoExit, rip: int) -> tuple[int, int]:
        """(qualification, instruction length) of the single-item I/O exit at `rip`, from the
        decoded instruction (string, REP and operand-encoding bits); cached in the route's
        `sites` by RIP until the routes change."""
        insn = self.translator.io_instruction(self, detail)
        site = sites[rip] = (io_qualification(detail.port, detail.size, detail.is_out, 1, insn),
                             insn.length if insn is not None else 0)
        return site

    def _c_io_loop(self) -> fastpath.IoLoop:
        """The C exit loop over this context's objects (kept while they stay the same)."""
        objects = (self._io_routes, self.info, self.vcpu, self.vmcs, self.pre_entry, self.observers)
        loop = self._io_loop
        if loop is None or not loop.serves(*objects):
            loop = self._io_loop = fastpath.IoLoop(*objects)
        return loop

    # -- running ----------------------------------------------------------------------
    def run(self, timeout: float | None = None, max_exits: int | None = None,
            console: Callable[[], str] = lambda: "") -> RunResult:
        """`run_raw`, then the RunResult (also kept as `last_result`)."""
        counts, seconds = [0] * 80, [0.0] * 80
        start = time.perf_counter()
        action: Stop | None = None
        try:
            action = self.run_raw(timeout, max_exits, counts, seconds)
        except KeyboardInterrupt:
            action = Stop("interrupted", message="interrupted by the user (SIGINT)")
            raise
        finally:
            self.last_result = self._result(action, counts, seconds, time.perf_counter() - start,
                                            console())
        return self.last_result

    def run_raw(self, timeout: float | None = None, max_exits: int | None = None,
                counts: list[int] | None = None, seconds: list[float] | None = None,
                pending: int | None = None) -> Stop:
        """The exit loop without building a RunResult; returns the Stop that ended it.

        `pending`: the caller entered the guest itself (the fuzz harness's C cycle,
        `fastpath.FuzzCycle`, with no pre-entry hook and nothing left to realise) and this
        is what that KVM_RUN returned, packed as by `fastpath.run_packed_for` (a negative
        errno when it failed): the loop takes that exit first.

        `counts` and `seconds`, lists of 80 indexed by basic exit reason, collect the
        number of exits and the time spent in their handlers. Past the first 64 I/O
        exits counted in `counts`, one in 16 is timed and the time scaled up (two
        clock reads per exit would cost more than many handlers).

        Single-item port I/O takes a fast path: after the first exit to a port its
        qualification, detail and handler chain come from one dict lookup, and further
        such exits are handled by `fastpath.IoLoop` in C until an exit, action or state
        change needs this loop.
        """
        if counts is None:
            counts = [0] * 80
        if seconds is None:
            seconds = [0.0] * 80
        io_samples, io_timed, io_first = 0, 0.0, counts[_IO_INSTRUCTION]
        clock = time.perf_counter
        vcpu = self.vcpu
        fd = vcpu.fd
        run = fd.run
        info = self.info
        vmcs = self.vmcs
        io_routes = self._io_routes
        pre_entry = self.pre_entry
        observers = self.observers
        enter = vcpu.enter
        regs = vcpu.register_cache
        (run_packed, run_arg), vcpu_fd, synced = vcpu.packed_entry, fd.fd, vcpu.synced
        io_loop = None            # the C loop, fetched at the first exit it can take
        c_loop = synced and fastpath.COMPILED
        n = io_first              # counts[IO] plus the fast-path I/O exits of this run
        io_ready = False          # info holds a fast-path I/O exit: only four fields change
        io_tag = IO_TAG
        action: Action | None = None
        self.last_exception = None
        self._step_rip = vcpu.rip
        limit = max_exits if max_exits is not None else -1
        if timeout is not None:
            run_timer.arm(vcpu, timeout)
        try:
            while True:
                if limit == 0:
                    action = Stop("exit_limit", message=f"exit limit {max_exits} reached")
                    break
                limit -= 1
                if pre_entry and pending is None:
                    try:
                        for hook in tuple(pre_entry):      # a hook may remove itself
                            hook()
                    except Exception as exc:
                        raise handler_error(vcpu, info, exc, "pre-entry hook")
                if vmcs.dirty and pending is None:
                    vmcs.realise()
                if pending is not None:
                    kind = pending if pending >= 0 else vcpu.entry_failed(-pending)
                    pending = None
                elif vcpu.dirty or not synced:
                    kind = enter()
                elif io_ready and c_loop and not pre_entry and not observers:
                    if io_loop is None:
                        io_loop = self._c_io_loop()
                    kind, n, limit = io_loop.enter(vcpu_fd, run_arg, n, limit)
                    if kind == LOOP_YIELD:
                        status = io_loop.status
                        if status == LOOP_STATE:
                            continue
                        outcome = io_loop.out.pop()
                        if status == LOOP_ERROR:
                            raise handler_error(vcpu, info, outcome)
                        io_ready = outcome.__class__ is Reply or outcome.__class__ is Resume and outcome.advance
                        if self._finish_io(info, outcome):
                            action = outcome
                            break
                        continue
                    if kind < 0:
                        kind = vcpu.entry_failed(-kind)
                else:                                       # vcpu.enter(), inlined
                    kind = run_packed(vcpu_fd, run_arg)
                    if kind < 0:
                        kind = vcpu.entry_failed(-kind)
                if kind >= io_tag:
                    route = io_routes.get(kind >> 32) or self._io_fast_route(kind >> 32)
                    if route is not None:
                        n += 1
                        detail, chain, sites = route
                        rip = regs.rip
                        site = sites.get(rip) or self._io_site(sites, detail, rip)
                        if io_ready:
                            info.qualification, info.raw_kvm_exit, info.data, info.instruction_length = \
                                site[0], detail, kind & 0xFFFFFFFF, site[1]
                        else:
                            info.reset_io(site[0], detail, kind & 0xFFFFFFFF, site[1])
                            io_ready = True
                        if observers:
                            self._observe(observers, info)
                        action = None
                        timed = n < 64 or not n & 15             # see the docstring
                        if timed:
                            began = clock()
                        try:
                            for handler in chain:
                                action = handler(vcpu, info)
                                if action is not None:
                                    break
                        except Exception as exc:
                            raise handler_error(vcpu, info, exc)
                        if timed:
                            io_timed += clock() - began
                            io_samples += 1
                        if action is None:
                            continue
                        io_ready = action.__class__ is Reply or action.__class__ is Resume and action.advance
                        if self._finish_io(info, action):
                            break
                        continue
                    out_data = kind & 0xFFFFFFFF
                    kind = _EXIT_IO
                else:
                    out_data = 0
                io_ready = False
                key = self._translate(kind, run, out_data)
                if key is _NO_EXIT:
                    continue
                if key is _SYSCALL:
                    if self._syscall(info, counts):
                        action = self._syscall_action
                        break
                    continue
                if key.__class__ is Stop:
                    action = key
                    break
                if info.reason == ExitReason.EXCEPTION_OR_NMI:
                    self.last_exception = exception_report(info, vcpu.rip, vcpu.cr2)
                if observers:
                    self._observe(observers, info)
                reason = info.reason
                counts[reason] += 1
                began = clock()
                if reason == ExitReason.IO_INSTRUCTION:
                    action = self._dispatch_io(info, key)
                elif reason == ExitReason.EXCEPTION_OR_NMI:
                    fault_rip = vcpu.rip
                    chain = self.vm.dispatcher.chain(reason, key)
                    action = self._dispatch_chain(chain if vmcs.exception_reaches_handlers(key)
                                                  else chain[-1:], info)
                else:
                    action = self._dispatch_chain(self.vm.dispatcher.chain(reason, key), info)
                seconds[reason] += clock() - began
                if action is None:
                    action = RESUME
                if reason == ExitReason.EXCEPTION_OR_NMI and action.__class__ is Resume \
                        and vcpu.rip == fault_rip:
                    action = self._resumed_fault(info, action, limit)
                if self._complete(info, action):
                    break
        finally:
            run = run_arg = None    # no kvm_run views kept alive by a traceback
            if timeout is not None:
                run_timer.disarm()
            if io_loop is not None:
                c_seconds, c_samples = io_loop.take_stats()
                io_timed += c_seconds
                io_samples += c_samples
            counts[_IO_INSTRUCTION] += n - io_first
            if io_samples:
                seconds[_IO_INSTRUCTION] += io_timed * (n - io_first) / io_samples
        return action

    # -- translate ----------------------------------------------------------------------
    def _translate(self, kind: int, run, out_data: int) -> int | None | object:
        """Fill `self.info` for the exit; its dispatch key, _NO_EXIT when there is no VMX exit
        to report (a signal, or a step the step service took), or the Stop an EPT hook
        callback returned."""
        info = self.info
        if kind == ExitKind.INTR:
            if self.deadline_expired():
                info.reset(ExitReason.VMX_PREEMPTION_TIMER_EXPIRED)
                return None
            if self.stop_requested():
                raise Kicked()
            return _NO_EXIT
        exit = decode_exit(run)
        ept = self.ept
        try:
            translation = self.translator.translate(kind, exit, self, info, stepping=self.stepping,
                                                    out_data=out_data,
                                                    ept=None if ept is None else ept.view(self.index))
        except GuestFault as fault:
            return Stop(RunEnd.ERROR, message=str(fault))     # the guest's doing: a result, not a raise
        if translation is None:
            return _NO_EXIT
        if translation.ept is not None:
            carried = ept.carry_out(self, translation, exit)
            if carried is not None:
                if carried.__class__ is Stop:
                    return carried                  # a hook callback ended the run
                return _NO_EXIT if carried[0] is None else carried[1]
        if translation.restore is not None:
            self._restore_user_frame(translation.restore, translation.step)
        if translation.syscall:
            self._syscall_return_state()
            if self.syscalls is not None and self.syscalls.active:
                return _SYSCALL
        if translation.step and not self._stepped(info):
            return _NO_EXIT
        return translation.key

    def translate_exit(self, kind: int, run) -> tuple[ExitInfo | None, int | None]:
        """(info, key) for an exit the EPT took from KVM_RUN itself; info None for no exit."""
        key = self._translate(kind, run, 0)
        if key.__class__ is Stop:
            return key
        return (None, None) if key is _NO_EXIT else (self.info, key)

    def _restore_user_frame(self, frame: RestoreUserFrame, step: bool = False) -> None:
        vcpu = self.vcpu
        rflags = frame.rflags
        if self.vmcs.tf_stepping:
            rflags = self._hide_tf(frame, step)
        vcpu.rip, vcpu.rsp, vcpu.rflags = frame.rip, frame.rsp, rflags
        sregs = vcpu.sregs
        sregs.cs.selector, sregs.cs.dpl, sregs.cs.l, sregs.cs.db = SEL_USER_CODE64, 3, 1, 0
        sregs.ss.selector, sregs.ss.dpl = SEL_USER_DATA, 3
        vcpu.set_sregs(sregs)

    def _syscall_return_state(self) -> None:
        """After a user-mode SYSCALL exit: the state of the SYSCALL instruction at CPL 3
        (RIP = RCX - 2, RFLAGS = R11). The CPL the host left is read here, not assumed: the
        PVM hosts keep CPL 3, plain VT-x enters CPL 0 with STAR's kernel CS."""
        vcpu = self.vcpu
        regs = vcpu.register_cache
        rip, rflags = (regs.rcx - 2) & (1 << 64) - 1, regs.r11
        if vcpu.sregs.cs.selector & 3 != 3:
            self._restore_user_frame(RestoreUserFrame(rip, regs.rsp, rflags))
        else:
            vcpu.rip, vcpu.rflags = rip, rflags

    def _syscall(self, info: ExitInfo, counts: list[int]) -> bool:
        """A SYSCALL exit goes to the SYSCALL hooks and the kernel (`minivmm.syscalls`); True
        when the run ends (`_syscall_action` is the Stop)."""
        vcpu = self.vcpu
        if self.observers:
            self._observe(self.observers, info)
        counts[ExitReason.EXCEPTION_OR_NMI] += 1
        try:
            action = self.syscalls.dispatch(vcpu, vcpu.rip, self.index)
        except Exception as exc:
            raise handler_error(vcpu, info, exc, f"SYSCALL {vcpu.rax} hook")
        self._syscall_action = action
        return self._complete(info, action)

    def _hide_tf(self, frame: RestoreUserFrame, step: bool) -> int:
        """The RFLAGS of a user-mode stub frame taken under minivmm's single-step, as the guest's
        own (SDM vol. 2 PUSHF/POPF): the value a `pushf` just stepped over pushed gets the
        guest's TF, a `popf` sets the guest's TF, and the frame's flags carry the guest's TF.
        The instruction is the one ending at the trap's RIP; a PUSHF pushed the flags the
        trap reports, a POPF popped the slot just above RSP."""
        vmcs = self.vmcs
        if step:
            before = self.read_code(frame.rip - 2, 2) if frame.rip >= 2 else b""
            if before[-1:] == b"\x9c":
                size = 2 if before[:1] == b"\x66" else 8
                pushed = int.from_bytes(self._read_virtual(frame.rsp, size), "little")
                if not (pushed ^ frame.rflags) & _PUSHF_SAME and pushed & RFLAGS_TF and not vmcs.guest_tf:
                    self._write_virtual(frame.rsp, (pushed & ~RFLAGS_TF).to_bytes(size, "little"))
            elif before[-1:] == b"\x9d":
                size = 2 if before[:1] == b"\x66" else 8
                popped = int.from_bytes(self._read_virtual(frame.rsp - size, size), "little")
                if not (popped ^ frame.rflags) & _PUSHF_SAME & ~RFLAGS_TF:
                    vmcs.guest_tf = bool(popped & RFLAGS_TF)
        return vmcs.guest_rflags(frame.rflags)

    def _read_virtual(self, gva: int, size: int) -> bytes:
        from .pagewalk import read_virtual
        return read_virtual(self.vm.memory, self.vcpu, gva, size)

    def _write_virtual(self, gva: int, data: bytes) -> None:
        from .pagewalk import write_virtual
        write_virtual(self.vm.memory, self.vcpu, gva, data)

    def _resumed_fault(self, info: ExitInfo, action: Action, entry: int) -> Action:
        """A handler resumed an exception exit without moving RIP. As on VT-x a fault executes
        again; when the same exception (vector, error code, qualification) repeats at the same
        RIP REPEATED_FAULT_LIMIT times in a row (`entry` counts down once per entry), the run
        stops and says so."""
        fault = (info.interruption_info, info.interruption_error_code, info.qualification,
                 self.vcpu.rip)
        last, last_entry, repeats = self._fault
        repeats = repeats + 1 if fault == last and entry == last_entry - 1 else 1
        self._fault = (fault, entry, repeats)
        if repeats < REPEATED_FAULT_LIMIT:
            return action
        return Stop(RunEnd.ERROR, message=f"{info.interruption} at rip={fault[3]:#x} repeated "
                    f"{repeats} times in a row: the handler resumed a faulting instruction, which "
                    "executes again (move RIP, fix the cause, or return Inject(...) to deliver it)")

    # -- observe and dispatch -----------------------------------------------------------
    def _observe(self, observers: list, info: ExitInfo) -> None:
        vcpu = self.vcpu
        try:
            for observer in observers:
                observer(vcpu, info)
        except Exception as exc:
            raise handler_error(vcpu, info, exc, "observer")
    def _dispatch_io(self, info: ExitInfo, port: int) -> Action | None:
        exit = info.raw_kvm_exit
        if exit.count > 1:
            info.string_data = self.vcpu.fd.io_data(exit)
        return self._dispatch_chain(self._io_route(port, exit.is_out), info)

    def _dispatch_chain(self, chain: tuple, info: ExitInfo) -> Action | None:
        vcpu = self.vcpu
        try:
            for handler in chain:
                action = handler(vcpu, info)
                if action is not None:
                    return action
        except Exception as exc:
            raise handler_error(vcpu, info, exc)
        return None

    # -- complete ---------------------------------------------------------------------
    def _finish_io(self, info: ExitInfo, action: Action) -> bool:
        """Carry out a handler's action on a fast-path I/O exit; True when the run ends."""
        cls = action.__class__
        if cls is Stop and info.raw_kvm_exit.is_out:
            return True                     # the debug-exit port's: nothing to complete
        if cls is Resume and action.advance:
            if not info.raw_kvm_exit.is_out:
                self._complete_in(info)
            return False
        return self._complete(info, action)

    def _complete_in(self, info: ExitInfo) -> None:
        """An IN reads `info.data`, in every item KVM asks for."""
        exit = info.raw_kvm_exit
        value = (info.data & ((1 << (8 * exit.size)) - 1)).to_bytes(exit.size, "little")
        self.vcpu.fd.io_data(exit)[:] = value * exit.count

    def _complete(self, info: ExitInfo, action: Action) -> bool:
        """Carry out a handler's action: the one place that writes replies into KVM's exit
        data, moves RIP and finishes an exit without entering the guest. True when the run
        ends."""
        vcpu = self.vcpu
        reason = info.reason
        cls = action.__class__
        if cls is Reply:
            self._reply(info, action.value)
            return False
        if cls is Passthrough:
            return self._passthrough(info)
        if cls is AllowOnce or cls is Emulate:
            if reason != ExitReason.EPT_VIOLATION or self.ept is None:
                raise TypeError(f"{cls.__name__}() answers EPT violations, not a {reason.name} exit")
            if cls is AllowOnce:
                self.ept.allow_once()
            else:
                self.ept.emulate()
            return False
        if reason == ExitReason.IO_INSTRUCTION and not info.raw_kvm_exit.is_out:
            self._complete_in(info)
        elif reason == ExitReason.EPT_MISCONFIGURATION and cls is Resume and action.advance \
                and not info.raw_kvm_exit.is_write:
            self._reply(info, info.data)        # a read answered through info.data, as an IN is
            return False
        elif reason == ExitReason.EXECUTE_RDMSR or reason == ExitReason.EXECUTE_WRMSR:
            if cls is Inject and action.vector == Vector.GP:
                vcpu.fd.set_msr_reply(0, error=True)        # KVM injects the #GP itself
                return False
            vcpu.fd.set_msr_reply(info.data & (1 << 64) - 1)
        if cls is Stop:
            return True
        if cls is Inject:
            if action.vector == Vector.NMI:
                vcpu.fd.nmi()            # SDM 26.6.1.1: vector 2 is injected as an NMI, not an exception
            else:
                vcpu.inject_exception(action.vector, action.error_code, action.cr2)
            return False
        if cls is Resume:
            if action.advance:
                if reason in _ADVANCE_BY_LENGTH and info.instruction_length:
                    vcpu.rip += info.instruction_length
            elif reason in _COMPLETED_BY_KVM:
                rip = self._io_instruction_start(info) if reason == ExitReason.IO_INSTRUCTION \
                    else vcpu.rip
                self.complete_without_entry()
                vcpu.rip = rip
            return False
        raise TypeError(f"a handler returned {action!r}; expected an action of minivmm.actions or None")

    def _reply(self, info: ExitInfo, value) -> None:
        """`Reply(value)`: the answer to the exit's read (or the hypercall's result)."""
        reason = info.reason
        exit = info.raw_kvm_exit
        if reason == ExitReason.IO_INSTRUCTION and not exit.is_out:
            if isinstance(value, (bytes, bytearray, memoryview)):
                data = self.vcpu.fd.io_data(exit)
                if len(value) != len(data):
                    raise ValueError(f"Reply: the IN reads {exit.count} x {exit.size} bytes, got {len(value)}")
                data[:] = value
            else:
                info.data = value
                self._complete_in(info)
        elif reason == ExitReason.EXECUTE_RDMSR:
            info.data = value
            self.vcpu.fd.set_msr_reply(value & (1 << 64) - 1)
        elif reason == ExitReason.EPT_VIOLATION and self.ept is not None:
            self.ept.complete_read(value)
        elif reason == ExitReason.EPT_MISCONFIGURATION and not exit.is_write:
            if isinstance(value, int):
                value = (value & ((1 << (8 * exit.length)) - 1)).to_bytes(exit.length, "little")
            if len(value) != exit.length:
                raise ValueError(f"Reply: the guest reads {exit.length} bytes, got {len(value)}")
            info.data = int.from_bytes(value, "little")
            self.vcpu.fd.set_mmio_data(bytes(value))
        elif reason == ExitReason.EXECUTE_VMCALL:
            self.vcpu.rax = value
        else:
            raise TypeError(f"Reply() does not answer a {reason.name} exit"
                            + (" (it is a write)" if getattr(exit, "is_write", False)
                               or getattr(exit, "is_out", False) else ""))

    def _passthrough(self, info: ExitInfo) -> bool:
        """`Passthrough()`: what the hardware would do without the handler."""
        reason = info.reason
        fd = self.vcpu.fd
        if reason == ExitReason.EXECUTE_RDMSR:
            values = fd.get_msrs([info.msr])
            if info.msr not in values:
                fd.set_msr_reply(0, error=True)           # an MSR KVM does not know: #GP
            else:
                self._reply(info, values[info.msr])
            return False
        if reason == ExitReason.EXECUTE_WRMSR:
            try:
                fd.set_msrs({info.msr: info.data})
            except KvmError:
                fd.set_msr_reply(0, error=True)           # a value KVM refuses: #GP
            else:
                fd.set_msr_reply(0)
            return False
        if reason == ExitReason.IO_INSTRUCTION:
            default = self.vm.dispatcher.default(ExitReason.IO_INSTRUCTION)
            action = self._dispatch_chain((default,), info) if default is not None else None
            return self._complete(info, RESUME if action is None or action.__class__ is Passthrough
                                  else action)
        if reason == ExitReason.EPT_VIOLATION and self.ept is not None:
            self.ept.allow_once()
            return False
        return self._complete(info, RESUME)

    def complete_without_entry(self) -> int:
        """Let KVM finish the current exit (the I/O or MMIO it emulates, the MSR reply) without
        running guest code: KVM_RUN with `immediate_exit` set (api.rst 5, "immediate_exit").
        Returns the exit kind KVM reports then (ExitKind.INTR when there is none)."""
        vcpu = self.vcpu
        run = vcpu.fd.run
        run.immediate_exit = 1
        try:
            kind = vcpu.run_once()
        finally:
            run.immediate_exit = 0
        if self.vmcs.tf_stepping and not vcpu.rflags & RFLAGS_TF:
            vcpu.rflags |= RFLAGS_TF          # a completed exit drops TF on some hosts
        return kind

    def _io_instruction_start(self, info: ExitInfo) -> int:
        """RIP of the I/O instruction of the current exit (some hosts report an OUT with RIP
        past it)."""
        insn = self.translator.io_instruction(self, info.raw_kvm_exit)
        return self.vcpu.rip if insn is None else insn.start

    def _result(self, action: Stop | None, counts: list[int], seconds: list[float],
                elapsed: float, console: str) -> RunResult:
        if not isinstance(action, Stop):
            action = Stop("error", message="run ended without a result")
        stats = {ExitReason(i).name: ExitStat(n, seconds[i]) for i, n in enumerate(counts) if n}
        for name, stat in stats.items():
            total = self.stats.setdefault(name, ExitStat())
            total.count += stat.count
            total.handler_seconds += stat.handler_seconds
        return RunResult(reason=action.reason, exit_code=action.exit_code, console=console,
                         exits={name: s.count for name, s in stats.items()}, elapsed_s=elapsed,
                         rip=0 if self.vcpu.closed else self.vcpu.rip,
                         message=action.message,
                         exception=self.last_exception if action.reason == "exception" else None,
                         stats=stats, last_exit=str(self.info))


_NO_EXIT = object()
_SYSCALL = object()
_PUSHF_SAME = 0xDD5     # CF PF AF ZF SF TF DF OF: what a trap right after PUSHF/POPF reports as pushed
                        # (IF may differ: a PVM host's CPL-3 PUSHF shows the virtual IF)
REPEATED_FAULT_LIMIT = 1000
