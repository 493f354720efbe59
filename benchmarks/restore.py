"""Snapshot restore time against guest size: 16 MiB and 1 GiB guests, the same 8 dirty pages.

    python3 benchmarks/restore.py [--runs N]

Both guests run the same user-mode routine, which writes one byte to each of
8 pages and reports through debug-exit; then `Snapshot.restore` puts them
back. Only the restore is timed (median of `--runs`, the two guests
alternating). Restores copy what the dirty log reports, so the time should
not grow with the guest's size. The last line is
`restore ratio=R small=<us> large=<us>` with R = large / small.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minivmm.machine import Machine  # noqa: E402
from minivmm.snapshot import Snapshot  # noqa: E402

GUEST = r"""
.include "minivmm.inc"
.globl _start
_start:
    lea pages(%rip), %rdi
    mov $8, %ecx
1:  movb $1, (%rdi)
    add $4096, %rdi
    dec %ecx
    jnz 1b
    EXIT 0
.data
.balign 4096
pages: .fill 8 * 4096, 1, 0
"""


def setup(memory: str) -> tuple[Machine, Snapshot]:
    machine = Machine(memory, "user")
    machine.load_asm(GUEST)
    return machine, Snapshot.take(machine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args(argv)
    guests = {"small": setup("16M"), "large": setup("1G")}
    times: dict[str, list[float]] = {name: [] for name in guests}
    pages: dict[str, set[int]] = {name: set() for name in guests}
    try:
        for machine, snap in guests.values():          # warm up: first restores, page faults
            for _ in range(20):
                machine.run(timeout=5)
                snap.restore(machine)
        for _ in range(args.runs):
            for name, (machine, snap) in guests.items():
                result = machine.run(timeout=5)
                if result.reason != "exit":
                    raise RuntimeError(f"{name} guest: {result}")
                start = time.perf_counter()
                copied = snap.restore(machine)
                times[name].append(time.perf_counter() - start)
                pages[name].add(copied)
    finally:
        for machine, snap in guests.values():
            snap.close()
            machine.close()
    medians = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    for name, (memory) in (("small", "16 MiB"), ("large", "1 GiB")):
        print(f"{name:6} {memory:>7}: median {medians[name]:7.1f} us, pages copied per restore "
              f"{sorted(pages[name])}")
    ratio = medians["large"] / medians["small"]
    print(f"restore ratio={ratio:.2f} small={medians['small']:.1f}us large={medians['large']:.1f}us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
