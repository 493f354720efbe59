"""Soak test: many snapshot restores and runs of one fuzz target in one process.

    python3 benchmarks/soak.py [--runs N] [--sample N] [--check N]

Runs configs/fuzz_hash.yaml through `minivmm.fuzz.Harness` (a snapshot restore,
an input, a run) `--runs` times with inputs of varying length. Every
`--sample` runs it records the open file descriptors (/proc/self/fd), the
threads and the resident set (VmRSS in /proc/self/status); every `--check`
runs it restores the snapshot and compares the guest state with it bit for
bit: the general and special registers as KVM reports them, and all of guest
RAM. The input buffer is written by the host outside the dirty log, so it is
put back the way the harness does before its next input (`restore_range`).
Every input's outcome is also compared with its first outcome.

Not part of `python -m benchmarks` nor of the test suite. The last line is
`soak runs=N ... resources=flat|growing state=identical|DIFFERENT` and the exit
status is 0 only when resources stay flat, the state is identical and the
outcomes are consistent.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minivmm.config import load_config  # noqa: E402
from minivmm.fuzz import Harness  # noqa: E402

CONFIG = ROOT / "configs" / "fuzz_hash.yaml"
POOL = 256
RSS_SLACK_KIB = 4096


@dataclass
class Sample:
    """Process resources after `runs` runs."""
    runs: int
    fds: int
    threads: int
    rss_kib: int


@dataclass
class Soak:
    """What the soak saw."""
    samples: list[Sample] = field(default_factory=list)
    checks: int = 0
    differences: list[str] = field(default_factory=list)
    inconsistent: int = 0
    runs: int = 0
    elapsed_s: float = 0.0


def sample(runs: int) -> Sample:
    """Open fds, threads (kernel view) and VmRSS of this process."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                  if ":" in line)
    return Sample(runs, len(os.listdir("/proc/self/fd")), int(status["Threads"]),
                  int(status["VmRSS"].split()[0]))


def inputs(seed: int = 1) -> list[bytes]:
    """A fixed pool of inputs from empty to a few KiB."""
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice((0, 1, 7, 64, 300, 4096)) if i else 0) for i in range(POOL)]


def state_differences(harness: Harness) -> list[str]:
    """Restore the snapshot, then list where the guest differs from it (empty: identical)."""
    machine, snapshot = harness.machine, harness.snapshot
    snapshot.restore(machine)
    snapshot.restore_range(machine, harness.target.input_address, harness.target.max_input_size)
    vcpu = machine.vcpu
    vcpu.flush()
    problems = []
    if bytes(vcpu.fd.get_regs()) != bytes(snapshot.vcpu.regs):
        problems.append("general registers")
    if bytes(vcpu.fd.get_sregs()) != bytes(snapshot.vcpu.sregs):
        problems.append("special registers")
    for copy in snapshot.regions:
        gpa, size = copy.layout.gpa, copy.layout.size
        live, saved = machine.memory.read(gpa, size), snapshot.read(gpa, size)
        if live != saved:
            first = next(i for i in range(size) if live[i] != saved[i])
            problems.append(f"memory of {copy.layout.name} from {gpa + first:#x}")
    return problems


def soak(runs: int, every_sample: int, every_check: int) -> Soak:
    """Run the target `runs` times, sampling and checking as configured."""
    pool = inputs()
    first: list[tuple | None] = [None] * POOL
    result = Soak()
    with Harness.from_config(load_config(CONFIG)) as harness:
        result.samples.append(sample(0))
        start = time.perf_counter()
        for i in range(1, runs + 1):
            index = i % POOL
            outcome = harness.run(pool[index])
            seen = (outcome.status, outcome.exit_code, outcome.reason)
            if first[index] is None:
                first[index] = seen
            elif first[index] != seen:
                result.inconsistent += 1
            if i % every_sample == 0:
                result.samples.append(sample(i))
            if i % every_check == 0:
                result.checks += 1
                result.differences += [f"after {i} runs: {d}" for d in state_differences(harness)]
        result.elapsed_s = time.perf_counter() - start
        result.runs = runs
    return result


def is_flat(samples: list[Sample]) -> bool:
    """Fds and threads unchanged after the first sample, VmRSS within a small slack of it."""
    warm = samples[1] if len(samples) > 1 else samples[0]
    return all(s.fds == warm.fds and s.threads == warm.threads and s.rss_kib <= warm.rss_kib + RSS_SLACK_KIB
               for s in samples[1:])


def summary(result: Soak) -> str:
    """The one-line result."""
    warm, last = (result.samples[1] if len(result.samples) > 1 else result.samples[0]), result.samples[-1]
    rss_max = max(s.rss_kib for s in result.samples[1:] or result.samples)
    return (f"soak runs={result.runs} elapsed={result.elapsed_s:.1f}s rate={result.runs / result.elapsed_s:,.0f}/s "
            f"fds={warm.fds}->{last.fds} threads={warm.threads}->{last.threads} "
            f"rss_kib={warm.rss_kib}->{last.rss_kib} (max {rss_max}, {len(result.samples)} samples) "
            f"resources={'flat' if is_flat(result.samples) else 'growing'} "
            f"state={'identical' if not result.differences else 'DIFFERENT'} ({result.checks} checks) "
            f"outcomes={'consistent' if not result.inconsistent else f'{result.inconsistent} inconsistent'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/soak.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=10_000, help="runs between resource samples")
    parser.add_argument("--check", type=int, default=100_000, help="runs between state comparisons")
    args = parser.parse_args(argv)
    result = soak(args.runs, args.sample, args.check)
    for problem in result.differences:
        print(problem)
    for s in result.samples:
        print(f"  runs={s.runs} fds={s.fds} threads={s.threads} rss_kib={s.rss_kib}")
    print(summary(result))
    ok = is_flat(result.samples) and not result.differences and not result.inconsistent
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
