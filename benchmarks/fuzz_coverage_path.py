"""The design measurement behind batch mode's coverage: where a first-hit breakpoint is
handled.

    python3 benchmarks/fuzz_coverage_path.py [--blocks K] [--rounds N]

A user-mode (CPL 3) guest runs K basic blocks once. Per block hit for the first time:

* exit: minivmm's one-shot coverage breakpoint as per-run and batch mode use it (int3 at
  CPL 3 -> the built-in kernel's IDT stub -> an exit -> the host records the block,
  writes the byte back, resumes);
* in-guest: the same int3 handled inside the guest by a CPL-0 #BP handler (record the
  block in a bitmap, write the original byte back from a copy of the code, iretq),
  no exit;
* the C loop's view: nothing (no coverage).

The last line is `fuzz_coverage_path exit_us=... guest_us=... ratio=R`, R = in-guest
cost / exit cost per first hit (below 1: the in-guest handler is cheaper). This is a
one-off design measurement (README, "Batch mode"), not one of `python -m benchmarks`.
"""
from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minivmm import asm  # noqa: E402
from minivmm.fuzz import FuzzTarget, Harness  # noqa: E402
from minivmm.machine import Machine  # noqa: E402
from minivmm.modes import IDT_ADDR  # noqa: E402

HANDLER = 0x200000
COPY = 0x210000
BITMAP = 0x208000


def guest(blocks: int) -> str:
    return f"""
.globl _start, input, cov_start, cov_end
_start:
cov_start:
    .rept {blocks}
    jmp 1f
1:
    .endr
cov_end:
    EXIT 0
.data
.balign 4096
input: .fill 64, 1, 0
"""


# CPL-0 #BP handler: frame at RSP is rip (after the int3), cs, rflags, rsp, ss.
HANDLER_SOURCE = f"""
.globl handler
handler:
    push %rax
    push %rbx
    mov 16(%rsp), %rax
    dec %rax
    mov %rax, 16(%rsp)
    movzbl {COPY:#x} - START(%rax), %ebx
    mov %bl, (%rax)
    mov %rax, %rbx
    sub $START, %rbx
    movb $1, {BITMAP:#x}(%rbx)
    pop %rbx
    pop %rax
    iretq
"""


def machine(blocks: int) -> tuple[Machine, int, int]:
    m = Machine("4M", "user")
    m.load_asm(guest(blocks))
    return m, m.symbol("cov_start"), m.symbol("cov_end")


def exit_path(blocks: int) -> float:
    """Seconds per first hit handled by the host."""
    m, start, end = machine(blocks)
    h = Harness(m, FuzzTarget(input_address=m.symbol("input"), length_register="rsi",
                              coverage_ranges=[(start, end)], timeout=30))
    try:
        t = time.perf_counter()
        first = h.run(b"")
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        h.run(b"")
        t2 = time.perf_counter() - t
        assert first.status.value == "ok" and len(first.new_blocks) >= blocks, first.summary()
        return (t1 - t2) / len(first.new_blocks)
    finally:
        h.close()


def guest_path(blocks: int) -> float:
    """Seconds per first hit handled by a CPL-0 #BP handler in the guest."""
    m, start, end = machine(blocks)
    try:
        m.setup()
        code = m.memory.read(start, end - start)
        image = asm.assemble(HANDLER_SOURCE, load_address=HANDLER, defines={"START": start})
        m.memory.write(HANDLER, image.data)
        m.memory.write(COPY, code)
        gate = bytearray(m.memory.read(IDT_ADDR + 3 * 16, 16))
        struct.pack_into("<H", gate, 0, HANDLER & 0xFFFF)
        struct.pack_into("<HI", gate, 6, (HANDLER >> 16) & 0xFFFF, HANDLER >> 32)
        m.memory.write(IDT_ADDR + 3 * 16, bytes(gate))
        stack, entry = m.vcpu.rsp, m.vcpu.rip
        t = time.perf_counter()
        plain = m.run(timeout=30)
        t0 = time.perf_counter() - t
        patched = 0
        for offset in range(0, len(code), 2):               # every block start: jmp 1f is 2 bytes
            m.memory.write(start + offset, b"\xcc")
            patched += 1
        m.vcpu.rip, m.vcpu.rsp = entry, stack
        t = time.perf_counter()
        hit = m.run(timeout=30)
        t1 = time.perf_counter() - t
        assert plain.reason == hit.reason == "exit", (plain, hit)
        assert m.memory.read(start, len(code)) == code and m.memory.read(BITMAP, 1) == b"\x01"
        return (t1 - t0) / patched
    finally:
        m.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    exit_s = min(exit_path(args.blocks) for _ in range(args.rounds))
    guest_s = min(guest_path(args.blocks) for _ in range(args.rounds))
    print(f"first hit handled by an exit:   {exit_s * 1e6:8.1f} us")
    print(f"first hit handled in the guest: {guest_s * 1e6:8.1f} us")
    print(f"fuzz_coverage_path exit_us={exit_s * 1e6:.1f} guest_us={guest_s * 1e6:.1f} "
          f"ratio={guest_s / exit_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
