"""`LinuxProcess`: one static Linux program in a user-mode machine, from ELF to exit status.

    from minivmm.linux import LinuxProcess
    result = LinuxProcess("/bin/busybox", ["busybox", "echo", "hi"], capture=True).run()
    assert (result.status, result.stdout) == (0, b"hi\\n")

The program runs at CPL 3 in minivmm's built-in user-mode kernel; its system calls
are SYSCALL hooks' (`minivmm.syscalls`) with `LinuxKernel` as the kernel. The exit
status is the program's; a fatal fault or signal gives 128 + the signal number, as
a shell reports it.
"""
from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..actions import RunEnd
from ..exits import Vector
from ..machine import Machine
from ..memory import parse_size
from ..modes import IDT_ADDR, setup_syscall_msrs
from ..runloop import RunResult
from ..syscalls import SyscallEvent
from .elf import PF_R, PF_W, PF_X, LinuxImageError, Program, read_program
from .kernel import FATAL_SIGNAL_EXIT, SIGNAL_NAMES, Clock, LinuxKernel
from .space import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, AddressSpace, page_up
from .entry import ENTRY_SIZE, FLUSH_CODE, FLUSH_VECTOR, entry_code, flush_code, flush_gate
from .strace import format_call
from .vfs import BufferStream, HostStream, OpenFile, Root, Stream, Vfs

__all__ = ["LinuxProcess", "LinuxResult", "FAULT_SIGNALS", "DEFAULT_MEMORY"]

DEFAULT_MEMORY = "256M"                   # also stated in minivmm.linux.cli
FAULT_SIGNALS = {Vector.DE: 8, Vector.DB: 5, Vector.BP: 5, Vector.OF: 11, Vector.BR: 11, Vector.UD: 4,
                 Vector.NM: 8, Vector.TS: 11, Vector.NP: 11, Vector.SS: 11, Vector.GP: 11, Vector.PF: 11,
                 Vector.MF: 8, Vector.AC: 7, Vector.XM: 8}
"""The signal Linux sends for each exception vector (arch/x86/kernel/traps.c)."""

AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN = 23, 25, 26, 31
HWCAP = 0x178BFBFF          # the CPUID.1:EDX bits a Linux kernel reports on x86-64


@dataclass
class LinuxResult:
    """How the program ended: `status` as a shell shows it (exit code, or 128 + signal)."""
    status: int
    exit_code: int | None
    signal: int | None
    message: str
    run: RunResult
    stdout: bytes = b""
    stderr: bytes = b""
    notes: list[str] = field(default_factory=list)
    fault_rip: int | None = None


def _prot(flags: int) -> int:
    return (PROT_READ if flags & PF_R else 0) | (PROT_WRITE if flags & PF_W else 0) | \
        (PROT_EXEC if flags & PF_X else 0)


class LinuxProcess:
    """A static x86-64 Linux program with its argv, environment and exposed host paths.

    `expose`: host paths the program may open (`Root`s or "PATH" / "PATH:rw" strings);
    `cwd` (default: the current folder) is exposed read-only too unless `sandbox`.
    `stdin` bytes or a host fd (default 0); `capture=True` collects stdout and stderr
    in the result instead of writing them to fds 1 and 2. `memory` bounds what the
    program may allocate. `strace` receives one line per system call. `seed` makes
    getrandom and AT_RANDOM reproducible; `deterministic_clock` makes time too.
    `fast_reads`: reads of exposed regular files are served by the built-in kernel's
    entry without an exit while no SYSCALL hook watches `read` (`minivmm.linux.entry`).
    `machine_factory(ram_bytes)` makes the user-mode Machine (default: a plain one)."""

    def __init__(self, path: str, argv: Sequence[str] | None = None, env: dict[str, str] | Sequence[str] | None = None,
                 *, expose: Sequence[str | Root] = (), cwd: str | None = None, sandbox: bool = False,
                 stdin: bytes | int | None = None, capture: bool = False, memory: int | str = DEFAULT_MEMORY,
                 strace: Callable[[str], object] | None = None, seed: int = 0,
                 deterministic_clock: bool = False, notes: Callable[[str], object] | None = None,
                 fast_reads: bool = True, machine_factory: Callable[[int], Machine] | None = None) -> None:
        self.path = path
        self.program: Program = read_program(path)
        self.argv = list(argv) if argv is not None else [path]
        if env is None:
            env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C"}
        self.env = [f"{k}={v}" for k, v in env.items()] if isinstance(env, dict) else list(env)
        self.cwd = os.path.realpath(cwd or os.getcwd())
        roots = [r if isinstance(r, Root) else Vfs.parse_expose(r) for r in expose]
        if not sandbox:
            roots.append(Root(self.cwd, False))
        self.roots = roots
        self.limit = parse_size(memory)
        self.capture = capture
        self.stdin = stdin
        self.strace = strace
        self.seed = seed
        self.clock = Clock(deterministic_clock)
        self.notes: list[str] = []
        self._note_sink = notes
        self.fast_reads = fast_reads
        self.machine_factory = machine_factory or (lambda ram: Machine(memory=ram, mode="user"))
        self.machine: Machine | None = None
        self.kernel: LinuxKernel | None = None
        self.space: AddressSpace | None = None
        self.vfs: Vfs | None = None
        self.streams: list[Stream] = []

    # -- notes to the user ---------------------------------------------------------------
    def note(self, text: str) -> None:
        if text in self.notes:
            return
        self.notes.append(text)
        if self._note_sink is not None:
            self._note_sink(text)
        elif not self.capture:
            sys.stderr.write(f"minivmm: {text}\n")
            sys.stderr.flush()

    # -- building the machine ------------------------------------------------------------
    def ram_size(self) -> int:
        top = max(self.program.end, 0x1000000)
        return min(-(-(page_up(top) + self.limit + (50 << 20)) // (2 << 20)) * (2 << 20), 3 << 30)

    def build(self) -> Machine:
        """The machine with the program loaded, its stack built and the kernel installed."""
        ram = self.ram_size()
        machine = self.machine = self.machine_factory(ram)
        try:
            space = self.space = AddressSpace(machine.memory, ram, self.limit)
            self._load(space)
            vfs = self.vfs = Vfs(self.roots, self.cwd, self.note)
            self._std_fds(vfs)
            kernel = self.kernel = LinuxKernel(space, vfs, program=self.path, argv0=self.argv[0] if self.argv else self.path,
                                               note=self.note, seed=self.seed, clock=self.clock)
            machine.entry = self.program.entry
            machine.stack = self._initial_stack(space, kernel)
            machine.setup()
            vcpu = machine.vcpu
            for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
                         "r13", "r14", "r15"):
                setattr(vcpu, name, 0)          # rdx: no atexit function for the program (psABI 3.4.1)
            space.reload(vcpu)
            setup_syscall_msrs(vcpu, space.entry)
            space.write(FLUSH_CODE, flush_code())
            space.write(IDT_ADDR + FLUSH_VECTOR * 16, flush_gate())
            space.live = True
            machine.hooks.syscalls.kernel = kernel
            table = machine.hooks.syscalls
            kernel.fast_reads = lambda: self.fast_reads and self.strace is None and not table.watches(0)
            if self.strace is not None:
                machine.on("syscall", self._trace, when="after")
        except BaseException:
            self.close()
            raise
        return machine

    def _load(self, space: AddressSpace) -> None:
        spans = []
        for segment in self.program.segments:
            if segment.vaddr < 0x10000:
                raise LinuxImageError(f"{self.path}: a segment at {segment.vaddr:#x} overlaps minivmm's system "
                                      "area [0, 0x10000)")
            spans.append((segment.vaddr // PAGE, page_up(segment.vaddr + segment.memsz) // PAGE,
                          _prot(segment.flags)))
        covered: list[list[int]] = []
        for first, end, _ in sorted(spans):
            if covered and first <= covered[-1][1]:
                covered[-1][1] = max(covered[-1][1], end)
            else:
                covered.append([first, end])
        needed = sum(end - first for first, end in covered)
        if needed > space.limit_pages:
            raise LinuxImageError(f"{self.path}: its segments need {needed * PAGE >> 20} MiB, more than "
                                  f"the memory limit of {self.limit >> 20} MiB")
        for first, end, prot in spans:
            space.map(first * PAGE, (end - first) * PAGE, prot)
        shared = {page for i, (first, end, _) in enumerate(spans) for other_first, other_end, _ in spans[i + 1:]
                  for page in range(max(first, other_first), min(end, other_end))}
        for page in shared:                   # a page segments share has all their rights
            rights = 0
            for first, end, prot in spans:
                if first <= page < end:
                    rights |= prot
            space.map(page * PAGE, PAGE, rights)
        self._read_segments(space)
        space.brk_start = space.brk = page_up(self.program.end)
        space.map(space.entry, PAGE, PROT_READ | PROT_EXEC)
        space.map(space.entry + PAGE, ENTRY_SIZE - PAGE, PROT_READ | PROT_WRITE)
        space.write(space.entry, entry_code())

    def _read_segments(self, space: AddressSpace) -> None:
        """Each segment's file bytes, read from the file straight into guest memory."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LinuxImageError(f"{self.path}: cannot read it: {exc.strerror}") from None
        try:
            for segment in self.program.segments:
                space.prefer_huge_pages(segment.vaddr, segment.filesz)
            for segment in self.program.segments:
                with memoryview(space.mem)[segment.vaddr:segment.vaddr + segment.filesz] as view:
                    complete = os.preadv(fd, [view], segment.offset) == segment.filesz
                if not complete:
                    raise LinuxImageError(f"{self.path}: the file changed while it was loaded "
                                          "(a segment ends past its end)")
                space.touched(segment.vaddr, segment.filesz)
        finally:
            os.close(fd)

    def _std_fds(self, vfs: Vfs) -> None:
        if isinstance(self.stdin, (bytes, bytearray)):
            stdin: Stream = BufferStream(self.stdin)
        else:
            stdin = HostStream(0 if self.stdin is None else self.stdin)
        if self.capture:
            stdout, stderr = BufferStream(), BufferStream()
        else:
            stdout, stderr = HostStream(1), HostStream(2)
        self.streams = [stdin, stdout, stderr]
        for fd, (stream, flags) in enumerate(zip(self.streams, (os.O_RDONLY, os.O_WRONLY, os.O_WRONLY))):
            vfs.fds[fd] = OpenFile(f"<fd {fd}>", flags, stream.host_fd, stream=stream)

    def _initial_stack(self, space: AddressSpace, kernel: LinuxKernel) -> int:
        """argc, argv, envp and auxv at the stack top (System V x86-64 psABI 3.4.1)."""
        if space.map(space.stack_low, space.top - space.stack_low, PROT_READ | PROT_WRITE) < 0:
            raise LinuxImageError(f"the memory limit ({self.limit >> 20} MiB) leaves no room for the stack")
        pointer = space.top
        def push_bytes(data: bytes) -> int:
            nonlocal pointer
            pointer -= len(data)
            space.write(pointer, data)
            return pointer
        strings = [push_bytes(s.encode("utf-8", "surrogateescape") + b"\0") for s in self.argv]
        environment = [push_bytes(s.encode("utf-8", "surrogateescape") + b"\0") for s in self.env]
        execfn = push_bytes(self.path.encode() + b"\0")
        platform = push_bytes(b"x86_64\0")
        random_bytes = push_bytes(kernel.random_bytes(16))
        auxv = [(AT_PHDR, self.program.phdr), (AT_PHENT, self.program.phentsize), (AT_PHNUM, self.program.phnum),
                (AT_PAGESZ, PAGE), (AT_BASE, 0), (AT_FLAGS, 0), (AT_ENTRY, self.program.entry),
                (AT_UID, os.getuid()), (AT_EUID, os.geteuid()), (AT_GID, os.getgid()), (AT_EGID, os.getegid()),
                (AT_PLATFORM, platform), (AT_HWCAP, HWCAP), (AT_CLKTCK, 100), (AT_SECURE, 0),
                (AT_RANDOM, random_bytes), (AT_HWCAP2, 0), (AT_EXECFN, execfn), (AT_NULL, 0)]
        words = [len(strings)] + strings + [0] + environment + [0] + [v for pair in auxv for v in pair]
        pointer = (pointer - len(words) * 8) & ~0xF
        space.write(pointer, struct.pack(f"<{len(words)}Q", *words))
        return pointer

    # -- running ---------------------------------------------------------------------------
    def _trace(self, vcpu, event: SyscallEvent) -> None:
        kernel = self.kernel
        def read_memory(address, n):
            return kernel.space.read(address, n) if kernel.space.accessible(address, n) else None
        def read_string(address):
            try:
                return kernel.string(address) if address else None
            except Exception:
                return None
        self.strace(format_call(event, read_memory, read_string))

    def run(self, timeout: float | None = None) -> LinuxResult:
        """Build, run to the end, release everything; the LinuxResult."""
        machine = self.build()
        try:
            run = machine.run(timeout=timeout)
            return self.result(run)
        finally:
            self.close()

    def result(self, run: RunResult) -> LinuxResult:
        """What `run` (the machine's RunResult) means for the program."""
        name = os.path.basename(self.argv[0] if self.argv else self.path)
        signal = exit_code = fault_rip = None
        if run.reason == RunEnd.EXIT:
            exit_code = run.exit_code
            status, message = exit_code, f"exited with status {exit_code}"
        elif run.reason == RunEnd.ERROR and run.message.startswith(FATAL_SIGNAL_EXIT):
            signal = run.exit_code - 128
            status, message = run.exit_code, run.message.split(": ", 1)[1]
        elif run.reason == RunEnd.EXCEPTION and run.exception is not None:
            signal = FAULT_SIGNALS.get(run.exception.vector, 11)
            fault_rip = run.exception.rip
            status = 128 + signal
            message = f"{name}: {SIGNAL_NAMES.get(signal, signal)}: {run.exception}{self._describe(fault_rip)}"
        elif run.reason == RunEnd.TIMEOUT:
            status, message = 124, f"{name}: timed out"
        else:
            status, message = 125, f"{name}: {run}"
        stdout = bytes(self.streams[1].output) if self.capture else b""
        stderr = bytes(self.streams[2].output) if self.capture else b""
        return LinuxResult(status, exit_code, signal, message, run, stdout, stderr, list(self.notes), fault_rip)

    def _describe(self, rip: int) -> str:
        """`: <instruction> (in <symbol>+off)` for the faulting instruction."""
        from ..disasm import disassemble_one
        text = ""
        if self.space is not None and self.space.accessible(rip, 1):
            code = self.space.read(rip, 15)
            insn = disassemble_one(code, 64)
            if insn:
                text += f": {insn}"
        symbol = self.symbolize(rip)
        if symbol:
            text += f" (in {symbol})"
        return text

    def symbolize(self, address: int) -> str:
        best = None
        for name, value in self.program.symbols.items():
            if value <= address and (best is None or value > best[1]):
                best = (name, value)
        if best is None or address - best[1] > 1 << 16:
            return ""
        return f"{best[0]}+{address - best[1]:#x}"

    def close(self) -> None:
        if self.vfs is not None:
            self.vfs.close()
        if self.machine is not None:
            self.machine.close()
            self.machine = None
