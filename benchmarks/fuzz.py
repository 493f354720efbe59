"""Fuzz throughput: minivmm's harness, per run and in batches, against a C snapshot-fuzz
loop, Unicorn and the routine run natively.

    python3 benchmarks/fuzz.py [--seconds S] [--rounds N]

The target is guests/fuzz_hash.S (FNV-1a over the input, 6 instructions per
byte) run in user mode (CPL 3) at three input sizes: ~400, ~100K and ~1.5M
instructions per run. For each size:

* minivmm: `Harness.run(input)` with breakpoint coverage on (restore from
  the dirty log, input copy, length register, run until debug-exit);
* C: benchmarks/c/fuzz.c, the same loop over /dev/kvm from the same memory
  image and registers (sync_regs, KVM_RUN, dirty log + memcpy + clear);
* batch: `Harness(batch=1024).run_batch(inputs)` with coverage on: the
  guest's CPL-3 runtime calls the routine once per input (minivmm.fuzz.batch);
* Unicorn (if installed, the `bench` extra): the routine emulated, registers
  and input reset per run, without and with a Python basic-block hook
  (coverage);
* native: benchmarks/c/fuzz_native.c, the routine called in a loop by a host
  C program (input copied in per call), the ceiling.

minivmm and C alternate for `--rounds` rounds and the best rate of each
counts (the machines are shared, so the best round is the least disturbed);
batch and native take the best of a third as many rounds.
The last two lines are `fuzz ratio=R ...`, R being the worst minivmm/C ratio,
and `fuzz_batch ratio=R ...`, R being the worst batch/Unicorn ratio (with
the batch/Unicorn-with-coverage ratios and batch rates beside it).
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


def measure_batch(harness: Harness, data: bytes, seconds: float) -> float:
    count = max(1, min(1024, harness.batch_runner.data_size // max(1, len(data))))
    inputs = [data] * count
    harness.run_batch(inputs)
    runs = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        outcomes = harness.run_batch(inputs)
        runs += count
        now = time.perf_counter()
        if now >= deadline:
            break
    if any(o.status.value != "ok" for o in outcomes):
        raise RuntimeError(f"benchmark target did not finish cleanly in a batch: {outcomes[-1].summary()}")
    return runs / (now - start)


def measure_native(binary: Path, image: tuple[Path, int], function: int, input_addr: int, data: bytes,
                   seconds: float, tmp: Path) -> float:
    input_file = tmp / f"native-input-{len(data)}.bin"
    input_file.write_bytes(data)
    out = run_c(binary, image[0], hex(image[1]), hex(function), hex(input_addr), input_file, seconds)
    match = re.search(r"rate=([\d.]+)", out)
    if not match:
        raise RuntimeError(f"unexpected output from the native loop: {out!r}")
    return float(match.group(1))


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
    native = build_c(ROOT / "benchmarks" / "c" / "fuzz_native.c")
    harness = Harness.from_config(load_config(CONFIG), coverage=True)
    batch = Harness.from_config(load_config(CONFIG), coverage=True, batch=1024)
    machine = harness.machine
    function = machine.symbol("fnv_hash")
    stop = machine.symbol("hash_exit")
    input_addr = machine.symbol("input")
    # The snapshot holds the breakpoints; Unicorn and the native loop get the original code.
    fresh = build_machine(load_config(CONFIG), capture_console=True)
    code = fresh.memory.read(function, stop - function)
    image = fresh.images[0]
    image_bytes = fresh.memory.read(image.start, image.end - image.start)
    fresh.close()
    ratios: dict[str, float] = {}
    batch_rates: dict[str, float] = {}
    over_uc: dict[str, float] = {}
    over_hook: dict[str, float] = {}
    print(f"{'size':8} {'insns/run':>10} {'minivmm/s':>11} {'C/s':>11} {'ratio':>6} {'batch/s':>11} "
          f"{'unicorn/s':>11} {'uc+hook/s':>11} {'native/s':>13}")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        image_file = tmp / "image.bin"
        image_file.write_bytes(image_bytes)
        state = dump_c_state(tmp, SIZES)
        for name, size in SIZES.items():
            data = bytes((i * 131 + 7) & 0xFF for i in range(size))
            best_py = best_c = best_batch = best_native = 0.0
            for round_ in range(args.rounds):
                best_c = max(best_c, measure_c(binary, state, data, args.seconds, tmp))
                best_py = max(best_py, measure_minivmm(harness, data, args.seconds))
                if round_ % 3 == 0:
                    best_batch = max(best_batch, measure_batch(batch, data, args.seconds))
                    best_native = max(best_native, measure_native(native, (image_file, image.start), function,
                                                                  input_addr, data, args.seconds, tmp))
            uc = uc_hook = None
            if not args.no_unicorn:
                uc = measure_unicorn(code, function, function, stop, input_addr, data, args.seconds, False)
                uc_hook = measure_unicorn(code, function, function, stop, input_addr, data, args.seconds, True)
            ratios[name] = best_py / best_c
            batch_rates[name] = best_batch
            if uc:
                over_uc[name] = best_batch / uc
                over_hook[name] = best_batch / uc_hook
            fmt = lambda v: f"{v:11,.0f}" if v is not None else f"{'n/a':>11}"  # noqa: E731
            print(f"{name:8} {size * INSNS_PER_BYTE + 12:>10,} {best_py:11,.0f} {best_c:11,.0f} "
                  f"{ratios[name]:6.2f} {best_batch:11,.0f} {fmt(uc)} {fmt(uc_hook)} {best_native:13,.0f}",
                  flush=True)
    print(f"coverage: {len(harness.coverage.hits)}/{len(harness.coverage.blocks)} blocks (per run), "
          f"{len(batch.coverage.hits)}/{len(batch.coverage.blocks)} (batch); batch regions widened: "
          f"{len(batch.batch_runner.stats.widened)} pages")
    harness.close()
    batch.close()
    worst = min(ratios.values())
    print(f"fuzz ratio={worst:.2f} " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    rates = " ".join(f"{k}_rate={v:.0f}" for k, v in batch_rates.items())
    if over_uc:
        print(f"fuzz_batch ratio={min(over_uc.values()):.2f} "
              + " ".join(f"{k}={v:.2f}" for k, v in over_uc.items()) + " "
              + " ".join(f"{k}_vs_hook={v:.1f}" for k, v in over_hook.items()) + " " + rates)
    else:
        print(f"fuzz_batch ratio=n/a (unicorn is not installed: pip install -e '.[bench]') {rates}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
