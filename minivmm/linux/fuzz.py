"""Binary-only fuzzing of static Linux programs: snapshot, input, coverage, crashes.

    process = LinuxProcess("zlib_fuzz", ["zlib_fuzz"], capture=True)
    with LinuxHarness(process, at="LLVMFuzzerTestOneInput") as harness:
        outcome = harness.run(zlib.compress(b"BUG\\x01"))       # a minivmm.fuzz RunOutcome

The program runs to the snapshot point, where `minivmm.fuzz.Harness` takes its
snapshot; every run restores it, places the input and runs with a deadline.

* `at="SYMBOL"` (e.g. LLVMFuzzerTestOneInput, a function `f(data, size)`): the
  program runs until it calls the function; the input goes into a buffer minivmm
  maps in the program's address space, RDI points at it and RSI holds the length; a
  breakpoint on the return address ends the run (an exit of the program ends it too).
* `at="read"`: the program runs until its first `read` of the input, fd `input_fd`
  (stdin by default) or the file `input_path` (AFL's `@@`); from there on reads of it
  return the input, which lives with its length and read position in guest memory.
  The harness owns `input_path`: it holds `max_input_size` zero bytes while the program
  starts, then each run's input (so fstat, lseek and pread agree with the reads).

Faults are crashes with their vector and faulting instruction (`Harness.classify`),
a fatal signal the program sends itself (abort) too. Coverage is first-hit
breakpoints over the program's executable segments, or over the functions named in
`coverage_symbols`; no instrumentation. The mutator's dictionary is the comparison
constants of `dictionary_symbols` (default: the function of `at="SYMBOL"`; with
`at="read"` those of the covered code). Host-side state a run changes (guest memory the
kernel writes, the fd table, the program break) is put back before each run.
"""
from __future__ import annotations

import os
import struct
from typing import Sequence

from ..actions import Reply, RunEnd, Stop
from ..fuzz.coverage import symbol_ranges
from ..fuzz.harness import FuzzError, FuzzTarget, Harness, RunOutcome
from .process import LinuxProcess
from .space import PAGE, PROT_READ, PROT_WRITE, page_up

__all__ = ["LinuxHarness", "FIRST_READ"]

FIRST_READ = "read"


class LinuxHarness(Harness):
    """A `minivmm.fuzz.Harness` for a static Linux program (see the module docstring)."""

    def __init__(self, process: LinuxProcess, *, at: str = FIRST_READ, input_fd: int = 0,
                 input_path: str | None = None, max_input_size: int = 4096, timeout: float = 1.0,
                 coverage: bool = True, coverage_symbols: Sequence[str] = (),
                 crash_vectors: frozenset[int] = frozenset(), setup_timeout: float = 30.0,
                 dictionary_symbols: Sequence[str] | None = None,
                 coverage_ranges: Sequence[tuple[int, int]] | None = None) -> None:
        self.process = process
        self.input_folder = None          # a TemporaryDirectory holding input_path, removed at close
        self._input_file = None
        if input_path is not None:
            self._input_file = os.open(input_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            os.pwrite(self._input_file, bytes(max_input_size), 0)
        process.fast_reads = False
        try:
            machine = process.build()
        except BaseException:
            self._close_input_file()
            raise
        try:
            kernel, space = process.kernel, process.space
            size = page_up(max_input_size + 64)
            buffer = space.find_free(size)
            if buffer is None or space.map(buffer, size, PROT_READ | PROT_WRITE) < 0:
                raise FuzzError(f"no room for a {max_input_size}-byte input in the memory limit")
            space.reload(machine.vcpu)
            self.buffer, self.length_address = buffer, buffer + page_up(max_input_size)
            self.position_address = self.length_address + 8
            if at == FIRST_READ:
                target = self._to_first_read(machine, input_fd, input_path, setup_timeout)
            else:
                target = self._to_function(machine, at, setup_timeout)
            target.max_input_size = max_input_size
            target.timeout = timeout
            target.crash_vectors = frozenset(crash_vectors)
            program = process.program
            if coverage_ranges:
                target.coverage_ranges = list(coverage_ranges)
            elif coverage_symbols:
                target.coverage_ranges = symbol_ranges(program.symbols, coverage_symbols)
            else:
                target.coverage_ranges = [(s.vaddr, s.vaddr + s.memsz) for s in program.segments if s.flags & 1]
            super().__init__(machine, target, coverage=coverage)
            if dictionary_symbols is None and at != FIRST_READ:
                dictionary_symbols = [at]
            if dictionary_symbols and coverage:
                self._dictionary(dictionary_symbols)
        except BaseException:
            process.close()
            self._close_input_file()
            raise
        space.on_write = self.snapshot.mark_dirty
        self.checkpoint = kernel.checkpoint()

    # -- reaching the snapshot point -----------------------------------------------------
    def _setup_run(self, machine, timeout: float, what: str) -> None:
        result = machine.run(timeout=timeout)
        if result.reason != RunEnd.STOPPED or result.message != what:
            ended = self.process.result(result)
            raise FuzzError(f"{self.process.path} ended before {what}: {ended.message}"
                            + (f" (stderr: {ended.stderr[-200:]!r})" if ended.stderr else ""))

    def _to_function(self, machine, symbol: str, timeout: float) -> FuzzTarget:
        address = self.process.program.symbols.get(symbol)
        if address is None:
            raise FuzzError(f"{self.process.path} has no symbol {symbol!r} (stripped? fuzz at='read' instead)")
        what = f"the call of {symbol}"
        machine.hooks.add("breakpoint", lambda vcpu, info: Stop(RunEnd.STOPPED, message=what),
                          address=address, one_shot=True)
        self._setup_run(machine, timeout, what)
        vcpu = machine.vcpu
        return_address = struct.unpack("<Q", self.process.space.read(vcpu.rsp, 8))[0]
        vcpu.rdi = self.buffer
        machine.hooks.add("breakpoint", lambda vcpu, info: Stop(RunEnd.EXIT, exit_code=0,
                                                                message=f"{symbol} returned"),
                          address=return_address)
        return FuzzTarget(input_address=self.buffer, length_register="rsi")

    def _to_first_read(self, machine, input_fd: int, input_path: str | None, timeout: float) -> FuzzTarget:
        vfs = self.process.vfs
        wanted = os.path.realpath(input_path) if input_path is not None else None
        what = "the first read of its input"

        def is_input(fd: int) -> bool:
            if wanted is None:
                return fd == input_fd
            entry = vfs.fds.get(fd)
            return entry is not None and entry.path == wanted

        def stop_at_read(vcpu, event):
            if is_input(event.args[0] & 0xFFFFFFFF):
                self.input_fd = event.args[0] & 0xFFFFFFFF
                return Stop(RunEnd.STOPPED, message=what)
            return None

        handle = machine.on("syscall", stop_at_read, number=0)
        self._setup_run(machine, timeout, what)
        machine.off(handle)
        machine.on("syscall", self._serve_read, number=0)
        return FuzzTarget(input_address=self.buffer, length_address=self.length_address, length_size=8)

    def _serve_read(self, vcpu, event):
        """read() of the input fd: the next bytes of the input in guest memory."""
        if event.args[0] & 0xFFFFFFFF != self.input_fd:
            return None
        space = self.process.space
        length, position = struct.unpack("<QQ", space.read(self.length_address, 16))
        position = min(position, length)
        buffer, count = event.args[1], event.args[2]
        n = min(count, length - position)
        if n and not space.accessible(buffer, n, True):
            return Reply(-14)                                  # EFAULT
        space.write(buffer, space.read(self.buffer + position, n))
        space.write(self.position_address, struct.pack("<Q", position + n))
        return Reply(n)

    def _dictionary(self, symbols: Sequence[str]) -> None:
        """The mutator's dictionary: the comparison constants of these functions only (those
        of the whole text would drown them)."""
        from ..fuzz.coverage import comparison_constants
        tokens: list[bytes] = []
        for start, end in symbol_ranges(self.process.program.symbols, symbols):
            code = self.coverage.unpatched(start, self.process.space.read(start, end - start))
            tokens += [t for t in comparison_constants(code, start) if t not in tokens]
        self.coverage.constants[:] = tokens

    # -- every run ---------------------------------------------------------------------------
    def prepare(self, data: bytes) -> bytes:
        data = super().prepare(data)
        self.process.kernel.rewind(self.checkpoint)
        if self._input_file is not None:
            os.ftruncate(self._input_file, 0)
            os.pwrite(self._input_file, data, 0)
        return data

    def run(self, data: bytes) -> RunOutcome:
        outcome = super().run(data)
        if outcome.reason == RunEnd.ERROR and self.process.kernel.fatal_signal is not None:
            outcome.message = outcome.message or "fatal signal"
        return outcome

    def describe(self, outcome: RunOutcome) -> str:
        """The outcome's summary, with the function the faulting instruction is in."""
        text = outcome.summary()
        symbol = self.process.symbolize(outcome.rip)
        return text.replace(f"at rip={outcome.rip:#x}", f"at rip={outcome.rip:#x} ({symbol})", 1) if symbol else text

    def close(self) -> None:
        super().close()
        self.process.close()
        self._close_input_file()

    def _close_input_file(self) -> None:
        if self._input_file is not None:
            os.close(self._input_file)
            self._input_file = None
        if self.input_folder is not None:
            self.input_folder.cleanup()
            self.input_folder = None
