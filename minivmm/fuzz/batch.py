"""Batch mode: many inputs per guest entry, outcomes as in per-run mode.

    harness = Harness(machine, target, batch=256)
    outcomes = harness.run_batch(inputs)          # one RunOutcome per input, in order

The host writes a batch of inputs into an input ring in guest memory and
enters the guest once. A small CPL-3 runtime (`batch_runtime.S`, assembled
into a free range of guest RAM, the *batch area*) calls the target function
once per input. Between inputs it resets the registers (the snapshot's) and
the declared writable regions (copies of the snapshot's bytes kept in the
batch area), places the input and its length, and records the function's
return value. The guest exits only at the end of the batch or when the host
is needed: a crash, a coverage breakpoint hit for the first time, a port the
host emulates, the deadline.

The target: the snapshot's entry must be the per-run wrapper
`FUZZ_ENTRY function` of minivmm.inc (`call function` then `out %al` to the
debug-exit port); a per-run run reports AL through debug-exit, batch mode
calls `function` and reports its AL as that exit would be reported (reason
"exit", the wrapper's RIP). Until both wrapper blocks are covered, inputs
run per-run (so their coverage is found where per-run mode finds it).

What keeps the outcomes those of per-run mode:

* declared regions: a stack window below the snapshot's RSP, the images'
  zero-fill (ELF bss) when small, and the regions given as
  `FuzzTarget.batch_regions`; after each batch the host reads the
  dirty log, and a page written outside the declared regions (and outside
  what the host restores anyway: the system area, the batch area, the input
  buffer) is added to the regions (`BatchStats.widened`) and the whole batch
  runs again. The first batch of a target usually finds its data pages so.
  (A block first hit in a batch that runs again keeps the input it was hit
  by: the breakpoints fire once.)
* a crash (or any other stop) while input k runs: inputs before k have their
  results, input k is classified as in per-run mode, the host restores the
  snapshot and the next batch starts with input k+1.
* the deadline (`FuzzTarget.timeout`) is per batch; when it passes, the
  input that was running is run again per-run, with its own deadline (a
  hang times out there; a batch that was merely long gets the input's real
  outcome), and the next batch starts after it.
* coverage: the same one-shot breakpoints, taken inside the guest while a
  batch runs: the #BP gate points at the runtime's CPL-0 `bp_handler`, which
  writes the original byte back, logs the block with the input's index and
  resumes, without an exit; after the batch the host records the hits
  (`Coverage.taken_in_guest`: the hit, the attribution, the byte in the
  snapshot's copy). An int3 it does not own (another breakpoint there, a
  full log, per-run runs) goes on to the built-in kernel's stub and the exit
  as before. benchmarks/fuzz_coverage_path.py measures both; on the project's
  host, where CPL-0 code is emulated, the in-guest handler is still several
  times cheaper than the exit (README, "Batch mode"). Where KVM takes #BP
  itself (guest debug on a plain VT-x host) the exit path serves, with the
  same attribution.

The batch size adapts: it starts at `START_SIZE` and doubles after every
batch that ran all its inputs, up to the harness's `batch`; a deadline that
passes halves it (a crash costs one batch end at any size: it leaves it).
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .. import asm
from ..errors import MinivmmError
from ..memory import PAGE_SIZE
from ..modes import IDT_ADDR, STUB_SIZE, STUBS_ADDR, SYSTEM_AREA_END, Mode

if TYPE_CHECKING:
    from .harness import Harness, RunOutcome

RUNTIME_SOURCE = Path(__file__).with_name("batch_runtime.S")
START_SIZE = 8
MAX_BATCH = 1024
STACK_WINDOW = 2 * PAGE_SIZE          # declared below (and including) the snapshot's RSP page
MAX_REGIONS = 64                      # the control block's region table
MAX_INFERRED = 16 * PAGE_SIZE         # an image's zero-fill declared up front when at most this
COPIES_SIZE = 64 * PAGE_SIZE          # room for the declared regions' copies
MIN_DATA = 64 * 1024                  # the smallest input ring worth a batch area
MAX_COVERAGE_SPAN = 256 * 1024        # in-guest coverage tables: one byte each per covered byte
LARGE_INPUTS = 4096                   # bytes per input from which the ring is written input by input
HIT_CAPACITY = 256                    # in-guest coverage hits logged per batch before the host drains

# The batch area, offsets from its base.
_CODE, _CTL, _HITLOG, _STACK_TOP, _RESULTS = 0x0000, 0x1000, 0x2000, 0x3000, 0x3000
_RING = _RESULTS + 8 * MAX_BATCH
_TAIL = _RING + 16 * MAX_BATCH
# The control block (batch_runtime.S).
_COUNT, _CURRENT, _PREVIOUS, _FUNCTION, _NREGIONS, _STATE, _ACTIVE, _HITS, _REGS, _REGIONS = (
    0x00, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38, 0x40, 0x100)
_ADDRESS_MASK = (1 << 48) - 1
_BP_VECTOR = 3
_CALL, _OUT_IMM8 = 0xE8, 0xE6


class BatchError(MinivmmError, ValueError):
    """A target batch mode cannot run (no wrapper, no room for the batch area, ...)."""


@dataclass
class BatchStats:
    """What batch mode did: batches, inputs, stops inside a batch, batches run again."""
    batches: int = 0
    inputs: int = 0
    per_run: int = 0                  # inputs run per-run (wrapper coverage, after a deadline)
    stops: int = 0                    # batches ended early by a crash or another stop
    timeouts: int = 0                 # batches whose deadline passed
    reruns: int = 0                   # batches run again after a widening
    guest_hits: int = 0               # coverage breakpoints taken inside the guest (no exit)
    disabled: str = ""
    """Why batch mode gave up (the target wrote into the batch area); inputs run per-run then."""
    widened: list[tuple[int, int]] = field(default_factory=list)
    """Pages found written outside the declared regions, added to them: (gpa, length)."""
    size: int = START_SIZE            # the current adaptive batch size


def _pages(start: int, end: int) -> range:
    return range(start & ~(PAGE_SIZE - 1), (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1), PAGE_SIZE)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges sorted and merged."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


@dataclass
class _Attempt:
    finished: bool
    undeclared: list[int]
    scribbled: list[int] = field(default_factory=list)
    outcomes: list = field(default_factory=list)
    stop: "RunOutcome | None" = None


class BatchRunner:
    """Batch mode of one harness (`Harness(..., batch=N)` makes it); see the module docstring."""

    def __init__(self, harness: "Harness", limit: int, regions: Sequence[tuple[int, int]] = (),
                 area: tuple[int, int] | None = None) -> None:
        machine = harness.machine
        target = harness.target
        if machine.mode is not Mode.USER:
            raise BatchError("batch mode runs user-mode (CPL 3) targets; the machine is in "
                             f"{machine.mode.value} mode")
        if target.length_register is None and target.length_address is None:
            raise BatchError("batch mode needs the input length in a register or in memory")
        if harness.restore_fpu:
            raise BatchError("batch mode does not reset the FPU state between inputs: use restore_fpu=False")
        self.harness = harness
        self.limit = max(1, min(limit, MAX_BATCH))
        self.stats = BatchStats(size=min(START_SIZE, self.limit))
        snapshot = harness.snapshot
        regs = snapshot.vcpu.regs
        self.entry = regs.rip
        self.function, self.exit_rip = self._wrapper(self.entry)
        self.wrapper_blocks = {self.entry, self.entry + 5} & set(harness.coverage.blocks)
        tail_size = -(-target.max_input_size // PAGE_SIZE) * PAGE_SIZE
        fixed = _TAIL + tail_size + COPIES_SIZE
        self.base, size = area if area is not None else self._find_area(fixed + MIN_DATA)
        home = machine.memory.region_at(self.base)
        if home is None or self.base % PAGE_SIZE or self.base + size > home.end or self.base < SYSTEM_AREA_END:
            raise BatchError(f"the batch area [{self.base:#x}, {self.base + size:#x}) is not page-aligned "
                             "guest RAM above the system area")
        if size < fixed + MIN_DATA:
            raise BatchError(f"the batch area [{self.base:#x}, {self.base + size:#x}) is smaller than "
                             f"{(fixed + MIN_DATA) // 1024} KiB")
        self.ctl = self.base + _CTL
        self.tail = self.base + _TAIL
        self.copies = self.tail + tail_size
        self.data = self.copies + COPIES_SIZE
        # In-guest coverage: one byte per covered byte says "a coverage int3", one holds the
        # byte it replaced (bp_handler in batch_runtime.S).
        takeable = harness.coverage.guest_takeable()
        self.coverage_low, self.coverage_span = 0, 0
        if takeable and max(takeable) - min(takeable) < MAX_COVERAGE_SPAN \
                and self.base + size - self.data >= 2 * MAX_COVERAGE_SPAN + MIN_DATA:
            self.coverage_low = min(takeable)
            self.coverage_span = max(takeable) + 1 - self.coverage_low
        table = -(-self.coverage_span // PAGE_SIZE) * PAGE_SIZE
        self.kinds, self.origs = self.data, self.data + table
        self.data += 2 * table
        self.data_size = self.base + size - self.data
        self._data_host = home.host_addr + (self.data - home.gpa)
        self.area = (self.base, self.base + size)
        self._copies_used = 0
        self.regions: list[tuple[int, int, int]] = []          # (gpa, copy gpa, length)
        for start, end in regions:
            if machine.memory.region_at(start) is None or machine.memory.region_at(end - 1) is None:
                raise BatchError(f"batch region [{start:#x}, {end:#x}) is not in guest RAM")
        rsp = regs.rsp
        stack_top = min((rsp & ~(PAGE_SIZE - 1)) + PAGE_SIZE, machine.memory.region_at(rsp - 1).end)
        # The images' zero-fill (ELF bss) is writable: small ones are declared up front, the
        # pages of large ones when the dirty log shows them written. The input buffer is not.
        buffer = _pages(target.input_address, target.input_address + target.max_input_size)
        inferred = [(page, page + PAGE_SIZE) for image in machine.images if 0 < image.bss <= MAX_INFERRED
                    for page in _pages(image.end - image.bss, image.end) if page not in buffer]
        self._declare(_merge([(max(stack_top - STACK_WINDOW, SYSTEM_AREA_END), stack_top),
                              *[(s, e) for s, e in regions], *inferred]))
        self._install()

    # -- setup -------------------------------------------------------------------------------
    def _wrapper(self, entry: int) -> tuple[int, int]:
        """(function, RIP after the wrapper's OUT) of the FUZZ_ENTRY wrapper at `entry`."""
        harness = self.harness
        code = harness.coverage.unpatched(entry, harness.machine.memory.read(entry, 7))
        ports = harness.machine.debug_exit.ports
        if code[0] != _CALL or code[5] != _OUT_IMM8 or code[6] not in ports:
            raise BatchError(f"batch mode needs the snapshot's entry ({entry:#x}) to be the wrapper "
                             "FUZZ_ENTRY function (call function; out %al, $DEBUG_EXIT_PORT), found "
                             f"{code.hex(' ')}")
        return (entry + 5 + struct.unpack_from("<i", code, 1)[0]) & (1 << 64) - 1, entry + 7

    def _find_area(self, need: int) -> tuple[int, int]:
        """The largest free page-aligned range of guest RAM: no image, not the system area, not
        the stack window, not the input buffer."""
        machine = self.harness.machine
        target = self.harness.target
        rsp = self.harness.snapshot.vcpu.regs.rsp
        taken = [(0, SYSTEM_AREA_END), (rsp - 16 * PAGE_SIZE, rsp + PAGE_SIZE),
                 (target.input_address, target.input_address + target.max_input_size)]
        taken += [(image.start, image.end) for image in machine.images]
        if target.length_address is not None:
            taken.append((target.length_address, target.length_address + target.length_size))
        best = (0, 0)
        for region in machine.memory.regions:
            cursor = region.gpa
            for start, end in _merge([(max(s, region.gpa), min(e, region.end)) for s, e in taken
                                      if s < region.end and e > region.gpa]) + [(region.end, region.end)]:
                low = (cursor + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
                high = start & ~(PAGE_SIZE - 1)
                if high - low > best[1]:
                    best = (low, high - low)
                cursor = max(cursor, end)
        if best[1] < need:
            raise BatchError(f"no free guest RAM for the batch area ({need // 1024} KiB needed, "
                             f"the largest free range has {best[1] // 1024} KiB)")
        return best

    def _install(self) -> None:
        """Assemble the runtime at the batch area; write it and the input buffer's snapshot
        bytes into guest memory and into the snapshot's copy (restores keep them)."""
        harness = self.harness
        target = harness.target
        base = self.base
        if target.length_register is not None:
            vcpu = harness.machine.vcpu
            mode, offset, address = 0, vcpu.gpr_address(target.length_register) - vcpu.regs_address, 0
        else:
            mode, offset, address = target.length_size, 0, target.length_address
        defines = {"CTL": self.ctl, "RESULTS": base + _RESULTS, "RING": base + _RING, "DATA": self.data,
                   "TAIL": self.tail, "INPUT": target.input_address, "STACK_TOP": base + _STACK_TOP,
                   "LENGTH_MODE": mode, "LENGTH_OFFSET": offset, "LENGTH_ADDRESS": address,
                   "EXIT_PORT": harness.machine.debug_exit.port, "COV_LO": self.coverage_low,
                   "COV_SPAN": self.coverage_span, "KINDS": self.kinds, "ORIGS": self.origs,
                   "HITLOG": base + _HITLOG, "HIT_CAPACITY": HIT_CAPACITY,
                   "BP_STUB": STUBS_ADDR + _BP_VECTOR * STUB_SIZE}
        image = asm.assemble(RUNTIME_SOURCE, code_bits=64, load_address=base + _CODE, entry_symbol="batch_entry",
                             defines=defines)
        if len(image.data) > _CTL - _CODE:
            raise BatchError("the batch runtime does not fit its page")
        self.runtime_entry = image.symbols["batch_entry"]
        self.done_rip = image.symbols["batch_done_end"]
        self._write_both(base + _CODE, image.data)
        snapshot = harness.snapshot
        self._write_both(self.tail, snapshot.read(target.input_address, target.max_input_size))
        if self.coverage_span:
            kinds, origs = bytearray(self.coverage_span), bytearray(self.coverage_span)
            for address, original in harness.coverage.guest_takeable().items():
                kinds[address - self.coverage_low] = 1
                origs[address - self.coverage_low] = original
            self._write_both(self.kinds, bytes(kinds))
            self._write_both(self.origs, bytes(origs))
            # The #BP gate goes to bp_handler (same selector, type and DPL 3).
            handler = image.symbols["bp_handler"]
            gate = bytearray(harness.machine.memory.read(IDT_ADDR + _BP_VECTOR * 16, 16))
            struct.pack_into("<H", gate, 0, handler & 0xFFFF)
            struct.pack_into("<HI", gate, 6, handler >> 16 & 0xFFFF, handler >> 32)
            self._write_both(IDT_ADDR + _BP_VECTOR * 16, bytes(gate))

    def _write_both(self, gpa: int, data: bytes) -> None:
        self.harness.machine.memory.write(gpa, data)
        self.harness.snapshot.patch(gpa, data)

    def _declare(self, ranges: list[tuple[int, int]]) -> None:
        """Add [start, end) ranges (page-rounded) to the declared regions, copies included."""
        declared = _merge([(gpa, gpa + length) for gpa, _, length in self.regions])
        fresh = []
        for start, end in _merge([(p.start, p.stop) for p in (_pages(s, e) for s, e in ranges)]):
            for page in range(start, end, PAGE_SIZE):
                if not any(s <= page < e for s, e in declared):
                    fresh.append((page, page + PAGE_SIZE))
        for start, end in _merge(fresh):
            length = end - start
            if self._copies_used + length > COPIES_SIZE:
                raise BatchError(f"the declared regions outgrow the batch area's {COPIES_SIZE // 1024} KiB "
                                 "of copies")
            copy = self.copies + self._copies_used
            self._copies_used += length
            self._write_both(copy, self.harness.snapshot.read(start, length))
            self.regions.append((start, copy, length))
        if len(self.regions) > MAX_REGIONS:
            raise BatchError(f"more than {MAX_REGIONS} declared regions")

    def runtime_writes(self, gpa: int) -> bool:
        """Whether the runtime itself writes the batch-area page `gpa` (control block, hit log and
        stack, results, the coverage marks); the rest of the area only the host writes."""
        offset = gpa - self.base
        return (_CTL <= offset < _RING or self.kinds <= gpa < self.origs)

    def allowed(self, gpa: int) -> bool:
        """Whether a dirty page is one the batch may write: a declared region, or memory the host
        restores after the batch anyway (system area, the runtime's pages, input buffer, length)."""
        target = self.harness.target
        if gpa < SYSTEM_AREA_END or (self.area[0] <= gpa < self.area[1] and self.runtime_writes(gpa)):
            return True
        if target.input_address & ~(PAGE_SIZE - 1) <= gpa < target.input_address + target.max_input_size:
            return True
        if target.length_address is not None and \
                target.length_address & ~(PAGE_SIZE - 1) <= gpa < target.length_address + target.length_size:
            return True
        return any(start <= gpa < start + length for start, _, length in self.regions)

    # -- running -----------------------------------------------------------------------------
    def run(self, inputs: Sequence[bytes]) -> list["RunOutcome"]:
        """Outcomes of `inputs` (cut to the maximum size), one per input, in order."""
        harness = self.harness
        limit = harness.target.max_input_size
        pending = [d[:limit] if d.__class__ is bytes else bytes(d[:limit]) for d in inputs]
        out: list[RunOutcome] = []
        stats = self.stats
        coverage = harness.coverage
        while len(out) < len(pending):
            if stats.disabled or (self.wrapper_blocks and not self.wrapper_blocks <= coverage.hits):
                out.append(harness.run(pending[len(out)]))
                stats.per_run += 1
                continue
            chunk = self._chunk(pending, len(out))
            done = self._batch(chunk)
            out.extend(done)
            stats.inputs += len(done)
        return out

    def _chunk(self, pending: list[bytes], start: int) -> list[bytes]:
        chunk, used = [], 0
        for data in pending[start: start + self.stats.size]:
            if chunk and used + len(data) > self.data_size:
                break
            if len(data) > self.data_size:
                raise BatchError(f"an input of {len(data)} bytes does not fit the batch area's "
                                 f"{self.data_size} bytes of input ring")
            chunk.append(data)
            used += len(data)
        return chunk

    def _batch(self, chunk: list[bytes]) -> list["RunOutcome"]:
        """Run `chunk` as one batch (again after a widening); the outcomes of the inputs it
        decided: all of them, or those up to the one a stop ended the batch in."""
        harness = self.harness
        stats = self.stats
        found: dict[int, list[int]] = {}     # input index -> blocks first hit, over all attempts
        while True:
            attempt = self._attempt(chunk, found)
            stats.batches += 1
            scribbled = attempt.scribbled
            if scribbled:
                # The target wrote into the batch area (the runtime, the ring, the copies): what
                # this batch did cannot be trusted, and the next one would not be either.
                stats.disabled = (f"the target wrote into the batch area at {scribbled[0]:#x} "
                                  f"[{self.area[0]:#x}, {self.area[1]:#x}); give FuzzTarget.batch_area "
                                  "a range it leaves alone")
                outcomes = []
                for index, data in enumerate(chunk):
                    outcome = harness.run(data)
                    if found.get(index):
                        outcome.new_blocks = tuple(found[index]) + outcome.new_blocks
                    outcomes.append(outcome)
                    stats.per_run += 1
                return outcomes
            if not attempt.undeclared:
                break
            self._declare([(gpa, gpa + PAGE_SIZE) for gpa in attempt.undeclared])
            stats.widened.extend((gpa, PAGE_SIZE) for gpa in attempt.undeclared)
            stats.reruns += 1
        outcomes = attempt.outcomes
        if attempt.finished:
            stats.size = min(self.limit, stats.size * 2)
            return outcomes
        if attempt.stop is None:
            stats.size = max(1, stats.size // 2)
            # The deadline (or the exit budget) ran out in input k: run k alone, per-run, with
            # its own deadline; the inputs after it go to the next batch.
            stats.timeouts += 1
            index = len(outcomes)
            outcome = harness.run(chunk[index])
            if found.get(index):
                outcome.new_blocks = tuple(found[index]) + outcome.new_blocks
            outcomes.append(outcome)
            stats.per_run += 1
            return outcomes
        stats.stops += 1
        outcomes.append(attempt.stop)
        return outcomes

    def _attempt(self, chunk: list[bytes], found: dict[int, list[int]]) -> "_Attempt":
        """One entry of the guest for `chunk`, from the snapshot's state."""
        from .harness import RunOutcome, Status
        harness = self.harness
        machine = harness.machine
        memory = machine.memory
        target = harness.target
        coverage = harness.coverage
        harness.restore_for_batch()
        self._load(chunk)
        previous_hook = coverage.on_new_block
        ctl_current = self.ctl + _CURRENT
        taken_pages: set[int] = set()
        logged: list[int | None] = [None]        # the input of the in-guest hit being recorded

        def attribute(address: int) -> None:
            if logged[0] is None:                 # an exit: the host took the int3
                drain()                           # earlier in-guest hits first, in their order
                index = struct.unpack("<Q", memory.read(ctl_current, 8))[0]
            else:
                index = logged[0]
            found.setdefault(index, []).append(address)
            if previous_hook is not None:
                previous_hook(address)

        def drain() -> None:
            """Record the hits bp_handler logged, and empty its log."""
            hits = struct.unpack("<Q", memory.read(self.ctl + _HITS, 8))[0]
            if not hits:
                return
            for entry in struct.unpack(f"<{hits}Q", memory.read(self.base + _HITLOG, 8 * hits)):
                address = entry & _ADDRESS_MASK
                logged[0] = entry >> 48
                if coverage.taken_in_guest(address):
                    self.stats.guest_hits += 1
                    self._write_both(self.kinds + address - self.coverage_low, b"\0")
                    taken_pages.add(address & ~(PAGE_SIZE - 1))
            logged[0] = None
            memory.write(self.ctl + _HITS, bytes(8))
        coverage.on_new_block = attribute
        coverage.start_run()
        try:
            reason, exit_code, message, elapsed = harness.run_prepared(
                target.timeout, None if target.max_exits is None else target.max_exits * len(chunk))
            drain()
        finally:
            coverage.on_new_block = previous_hook
            memory.write(self.ctl + _ACTIVE, bytes(8))
        header = memory.read(self.ctl, _REGS)
        count, current = struct.unpack_from("<QQ", header, _COUNT)
        state = struct.unpack_from("<Q", header, _STATE)[0]
        done = min(current, count, len(chunk))
        results = struct.unpack(f"<{done}Q", memory.read(self.base + _RESULTS, 8 * done))
        undeclared = [gpa for gpa in machine.ept.dirty_pages(clear=False)
                      if gpa not in taken_pages and not self.allowed(gpa)]
        in_area = [gpa for gpa in undeclared if self.area[0] <= gpa < self.area[1]]
        undeclared = [gpa for gpa in undeclared if not self.area[0] <= gpa < self.area[1]]
        scribbled = self._changed(in_area, chunk)
        harness.after_batch()
        attempt = _Attempt(finished=reason == "exit" and state == 1 and done == len(chunk),
                           undeclared=undeclared, scribbled=scribbled)
        for index in range(done):
            code = results[index] & 0xFF
            attempt.outcomes.append(RunOutcome(Status.CRASH if code in target.crash_exit_codes else Status.OK,
                                               "exit", chunk[index], self.exit_rip, exit_code=code,
                                               new_blocks=tuple(found.get(index, ()))))
        if not attempt.finished and done < len(chunk) and reason not in ("timeout", "exit_limit"):
            stop = harness.classify(reason, exit_code, message, elapsed, chunk[done])
            stop.new_blocks = tuple(found.get(done, ()))
            attempt.stop = stop
        return attempt

    def _changed(self, pages: list[int], chunk: list[bytes]) -> list[int]:
        """Those of the batch-area `pages` (reported dirty, outside the runtime's own pages) whose
        bytes are not what the host put there: the snapshot's copy (runtime, copies, tables), or
        this batch's inputs in the ring. Some hosts report pages the host itself wrote (first
        writes to never-touched memory) in the dirty log: only a changed byte counts."""
        memory = self.harness.machine.memory
        snapshot = self.harness.snapshot
        ring_end = self.data + sum(map(len, chunk))
        joined = None
        changed = []
        for gpa in pages:
            if gpa + PAGE_SIZE > self.data:
                low, high = max(gpa, self.data), min(gpa + PAGE_SIZE, ring_end)
                if high <= low:
                    continue                                  # ring space this batch did not use
                if joined is None:
                    joined = b"".join(chunk)
                if memory.read(low, high - low) != joined[low - self.data: high - self.data]:
                    changed.append(gpa)
            elif memory.read(gpa, PAGE_SIZE) != snapshot.read(gpa, PAGE_SIZE):
                changed.append(gpa)
        return changed

    def _load(self, chunk: list[bytes]) -> None:
        """Write the ring, the control block and the runtime's registers for `chunk`."""
        harness = self.harness
        memory = harness.machine.memory
        ring, offset = [], 0
        for item in chunk:
            ring += (offset, len(item))
            offset += len(item)
        memory.write(self.base + _RING, struct.pack(f"<{len(ring)}Q", *ring))
        if offset >= LARGE_INPUTS * len(chunk):           # one copy each, no joined buffer
            host = self._data_host
            for item, at in zip(chunk, ring[::2]):
                ctypes.memmove(host + at, item, len(item))
        else:
            ctypes.memmove(self._data_host, b"".join(chunk), offset)
        regs = bytes(harness.snapshot.vcpu.regs)
        table = b"".join(struct.pack("<QQQ", gpa, copy, length) for gpa, copy, length in self.regions)
        ctl = bytearray(_REGIONS)
        struct.pack_into("<QQQQQQQQ", ctl, 0, len(chunk), 0, harness.input_length, self.function,
                         len(self.regions), 0, 1, 0)
        ctl[_REGS:_REGS + len(regs)] = regs
        memory.write(self.ctl, bytes(ctl) + table)
        vcpu = harness.machine.vcpu
        vcpu.rip = self.runtime_entry
        vcpu.rsp = self.base + _STACK_TOP


__all__ = ["BatchRunner", "BatchStats", "BatchError", "START_SIZE", "MAX_BATCH"]
