"""EPT costs: a permission toggle, a monitored write, a hidden execute-hook hit.

Each is measured under minivmm and against a C program (benchmarks/c/ept.c,
built now with gcc) doing the KVM operations it reduces to, in the same run:
  toggle    ept.protect(page, "r-x"/"rwx") + invept  vs  memslot delete + create
  monitor   a guest store to a monitored page, reported to a Python callback and
            emulated                                  vs  KVM_EXIT_MMIO + memcpy
  exec_hook one hit of a hidden execute hook          vs  emulation failure, map the
            page, single-step, unmap
Both run the same 32-bit protected-mode guests. Last line:
`ept ratio=R toggle=... monitor=... exec_hook=...`, R being the geometric mean of
the three time_c / time_minivmm ratios, each value `minivmm_us/c_us`.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cbuild import build_c, run_c  # noqa: E402
from minivmm.ept import EptShadow  # noqa: E402
from minivmm.machine import Machine  # noqa: E402

PAGE = 0x101000
CODE = 0x100000
MONITOR_CODE = bytes.fromhex("a300101000" "40" "ebf8")        # 1: mov %eax,(PAGE); inc %eax; jmp 1b
EXEC_CODE = bytes.fromhex("e8fb0f0000" "ebf9")                # 1: call PAGE; jmp 1b


def machine(code: bytes) -> tuple[Machine, EptShadow]:
    m = Machine("2M", "protected")
    m.load(code, CODE)
    m.memory.write(PAGE, b"\xc3")
    ept = m.create_ept(backend="memslot")      # the C baseline drives memslots
    return m, ept


def minivmm_toggle(n: int) -> float:
    m, ept = machine(EXEC_CODE)
    with m:
        ept.protect(PAGE, 0x1000, "r-x")        # first split of the 2 MiB slot, not timed
        ept.invept()
        ept.protect(PAGE, 0x1000, "rwx")
        ept.invept()
        start = time.perf_counter()
        for i in range(n // 2):
            ept.protect(PAGE, 0x1000, "r-x")
            ept.invept()
            ept.protect(PAGE, 0x1000, "rwx")
            ept.invept()
        elapsed = time.perf_counter() - start
        return elapsed / (2 * (n // 2))


def minivmm_monitor(n: int) -> float:
    m, ept = machine(MONITOR_CODE)
    with m:
        seen = []
        ept.monitor(PAGE, PAGE + 4, "w", lambda event: seen.append(event.value))
        m.run(timeout=60, max_exits=10)           # warm up: slots split, code paths hot
        seen.clear()
        result = m.run(timeout=120, max_exits=n)
        if result.reason != "exit_limit" or len(seen) != n:
            raise SystemExit(f"minivmm monitor run ended badly: {result} after {len(seen)} writes")
        return result.elapsed_s / n


def minivmm_exec(n: int) -> float:
    m, ept = machine(EXEC_CODE)
    with m:
        hook = ept.hook_execute(PAGE, lambda event: None)
        m.run(timeout=60, max_exits=20)
        hits = hook.hits
        result = m.run(timeout=120, max_exits=2 * n)   # a fetch fault and a single step per hit
        done = hook.hits - hits
        if result.reason != "exit_limit" or abs(done - n) > 1:
            raise SystemExit(f"minivmm exec-hook run ended badly: {result}, {done} hits")
        return result.elapsed_s / done


def c_op(mode: str, n: int) -> float:
    binary = build_c(Path(__file__).resolve().parent / "c" / "ept.c")
    fields = dict(item.split("=") for item in run_c(binary, mode, n).split())
    return float(fields["us_per_op"]) / 1e6


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=4000, help="operations per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="best of this many runs each")
    args = parser.parse_args(argv)
    measures = {"toggle": minivmm_toggle, "monitor": minivmm_monitor, "exec_hook": minivmm_exec}
    c_modes = {"toggle": "toggle", "monitor": "monitor", "exec_hook": "exec"}
    parts = []
    ratios = []
    for name, measure in measures.items():
        py = min(measure(args.n) for _ in range(args.rounds))
        c = min(c_op(c_modes[name], args.n) for _ in range(args.rounds))
        ratios.append(c / py)
        parts.append(f"{name}={py * 1e6:.1f}us/{c * 1e6:.1f}us")
        print(f"{name:10s} minivmm {py * 1e6:8.1f} us   C {c * 1e6:8.1f} us   C/minivmm {c / py:.2f}")
    ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"ept ratio={ratio:.2f} " + " ".join(parts))
    return ratio


if __name__ == "__main__":
    main()
