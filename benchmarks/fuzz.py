"""Fuzz throughput: minivmm's harness against a C snapshot-fuzz loop and Unicorn.

    python3 benchmarks/fuzz.py [--seconds S] [--rounds N]

The target is guests/fuzz_hash.S (FNV-1a over the input, 6 instructions per
byte) run in user mode (CPL 3) at three input sizes: ~400, ~100K and ~1.5M
instructions per run. For each size:

* minivmm: `Harness.run(input)` with breakpoint coverage on (restore from
  the dirty log, input copy, length register, run until debug-exit);
* C: benchmarks/c/fuzz.c, the same loop over /dev/kvm from the same memory
  image and registers (sync_regs, KVM_RUN, dirty log + memcpy + clear);
* Unicorn (if installed): the same code emulated, registers and input reset
  per run, without and with a Python basic-block hook (coverage).

minivmm and C alternate for `--rounds` rounds and the best rate of each
counts (the machines are shared, so the best round is the least disturbed).
The last line is `fuzz ratio=R ...`, R being the worst minivmm/C ratio.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cbuild import build_c, run_c  # noqa: E402

from minivmm.config import build_machine, load_config  # noqa: E402
from minivmm.fuzz import Harness  # noqa: E402

CONFIG = ROOT / "configs" / "fuzz_hash.yaml"
INSNS_PER_BYTE = 6
SIZES = {"small": 64, "medium": 16_666, "large": 250_000}      # ~400, ~100K, ~1.5M instructions


def measure_minivmm(harness: Harness, data: bytes, seconds: float) -> float:
    harness.run(data)
    runs = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(8):
            outcome = harness.run(data)
        runs += 8
        now = time.perf_counter()
        if now >= deadline:
            break
    if outcome.status.value != "ok":
        raise RuntimeError(f"benchmark target did not finish cleanly: {outcome.summary()}")
    return runs / (now - start)


def dump_c_state(tmp: Path, data_sizes: dict[str, int]) -> tuple[Path, Path, Path, int, int]:
    """The initial state of the target for the C loop: RAM image, kvm_regs, kvm_sregs."""
    config = load_config(CONFIG)
    with build_machine(config, capture_console=True) as machine:
        machine.setup()
        memory = tmp / "memory.bin"
        region = machine.memory.regions[0]
        if len(machine.memory.regions) != 1 or region.gpa != 0:
            raise RuntimeError("the C loop expects one RAM region at GPA 0")
        memory.write_bytes(bytes(region.mem))
        sregs = tmp / "sregs.bin"
        sregs.write_bytes(bytes(machine.vcpu.sregs))
        return memory, tmp / "regs", sregs, machine.symbol("input"), machine.debug_exit.port


def measure_c(binary: Path, state, data: bytes, seconds: float, tmp: Path) -> float:
    memory, regs_prefix, sregs, input_gpa, port = state
    config = load_config(CONFIG)
    with build_machine(config, capture_console=True) as machine:
        machine.setup()
        machine.vcpu.rsi = len(data)
        regs = regs_prefix.with_name(f"regs-{len(data)}.bin")
        regs.write_bytes(bytes(machine.vcpu.regs))
    input_file = tmp / f"input-{len(data)}.bin"
    input_file.write_bytes(data)
    out = run_c(binary, memory, regs, sregs, input_file, hex(input_gpa), hex(port), seconds)
    match = re.search(r"rate=([\d.]+)", out)
    if not match:
        raise RuntimeError(f"unexpected output from the C loop: {out!r}")
    return float(match.group(1))


def measure_unicorn(code: bytes, code_addr: int, entry: int, stop: int, input_addr: int, data: bytes,
                    seconds: float, hook: bool) -> float | None:
    try:
        import unicorn
        from unicorn import x86_const as x
    except ImportError:
        return None
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    base = code_addr & ~0xFFF
    size = (input_addr + len(data) + 0x1000 - base + 0xFFF) & ~0xFFF
    uc.mem_map(base, size)
    uc.mem_write(code_addr, code)
    blocks = set()
    if hook:
        uc.hook_add(unicorn.UC_HOOK_BLOCK, lambda uc_, address, size_, user: blocks.add(address))
    runs = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        uc.mem_write(input_addr, data)
        uc.reg_write(x.UC_X86_REG_RSI, len(data))
        uc.reg_write(x.UC_X86_REG_RSP, base + size - 16)
        uc.emu_start(entry, stop)
        runs += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    return runs / (now - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="per measurement (default 0.3)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating minivmm/C rounds (default 10)")
    parser.add_argument("--no-unicorn", action="store_true")
    args = parser.parse_args(argv)

    binary = build_c(ROOT / "benchmarks" / "c" / "fuzz.c")
    harness = Harness.from_config(load_config(CONFIG), coverage=True)
    machine = harness.machine
    entry = machine.symbol("_start")
    stop = machine.symbol("hash_exit")
    input_addr = machine.symbol("input")
    code = bytes(harness.snapshot.read(entry, stop - entry))
    # The snapshot holds the breakpoints; Unicorn gets the original code.
    fresh = build_machine(load_config(CONFIG), capture_console=True)
    code = fresh.memory.read(entry, stop - entry)
    fresh.close()
    ratios: dict[str, float] = {}
    print(f"{'size':8} {'insns/run':>10} {'minivmm/s':>11} {'C/s':>11} {'ratio':>6} "
          f"{'unicorn/s':>11} {'uc+hook/s':>11}")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        state = dump_c_state(tmp, SIZES)
        for name, size in SIZES.items():
            data = bytes((i * 131 + 7) & 0xFF for i in range(size))
            best_py = best_c = 0.0
            for _ in range(args.rounds):
                best_c = max(best_c, measure_c(binary, state, data, args.seconds, tmp))
                best_py = max(best_py, measure_minivmm(harness, data, args.seconds))
            uc = uc_hook = None
            if not args.no_unicorn:
                uc = measure_unicorn(code, entry, entry, stop, input_addr, data, args.seconds, False)
                uc_hook = measure_unicorn(code, entry, entry, stop, input_addr, data, args.seconds, True)
            ratios[name] = best_py / best_c
            fmt = lambda v: f"{v:11,.0f}" if v is not None else f"{'n/a':>11}"  # noqa: E731
            print(f"{name:8} {size * INSNS_PER_BYTE + 10:>10,} {best_py:11,.0f} {best_c:11,.0f} "
                  f"{ratios[name]:6.2f} {fmt(uc)} {fmt(uc_hook)}", flush=True)
    print(f"coverage: {len(harness.coverage.hits)}/{len(harness.coverage.blocks)} blocks")
    harness.close()
    worst = min(ratios.values())
    print(f"fuzz ratio={worst:.2f} " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
