"""Start-up: process start to a trivial multiboot kernel's first port write.

The kernel (guests/platform/startup.S, a flat multiboot binary at 1 MiB whose first
instruction writes 1 to the isa-debug-exit port 0xf4) runs three ways in the same run,
interleaved, best of `--rounds` each:

- `python -m minivmm run` on a config with only that image (the whole process: Python
  start-up, imports, config, VM set-up, the run, the exit);
- `qemu-system-x86_64 -accel kvm -cpu max,-arch-capabilities -kernel ... -device
  isa-debug-exit` (SeaBIOS, then QEMU's multiboot loader; exit status 3);
- benchmarks/c/startup.c: the same boot done the shortest way over /dev/kvm.

The timings are wall clock from fork to exit status, so they include the exit itself.
minivmm's modules are byte-compiled first (as a pip install does: this shell may set
PYTHONDONTWRITEBYTECODE, which would make every run recompile them), and one untimed run
builds its cffi fast path and stores the config's YAML tree (`minivmm.config.treecache`),
as a second run of the CLI finds them.

Last line: `startup ratio=R minivmm=Xs qemu=Ys c=Zs` with R = qemu / minivmm.
"""
from __future__ import annotations

import argparse
import compileall
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cbuild import BUILD_DIR, build_c  # noqa: E402
from minivmm.asm import assemble  # noqa: E402

KERNEL_SOURCE = ROOT / "guests" / "platform" / "startup.S"
LOAD_ADDRESS = 0x100000
QEMU = "qemu-system-x86_64"


def timed(command: list[str], *, expect_status: int) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    if result.returncode != expect_status:
        raise SystemExit(f"{' '.join(command)}: exit status {result.returncode} (expected {expect_status})\n"
                         f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return elapsed


def prepare(memory: str) -> tuple[Path, Path]:
    """The kernel binary and a minivmm config that runs it, in benchmarks/build."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    kernel = BUILD_DIR / "startup_kernel.bin"
    kernel.write_bytes(assemble(KERNEL_SOURCE, code_bits=32, load_address=LOAD_ADDRESS).data)
    config = BUILD_DIR / "startup.yaml"
    config.write_text("version: 1\ndescription: start-up benchmark kernel\n"
                      f"machine: {{memory: {memory}, timeout: 10}}\n"
                      f"images:\n  - {{type: multiboot, path: {kernel}}}\n"
                      "expect: {result: exit, exit_code: 1}\n")
    compileall.compile_dir(ROOT / "minivmm", quiet=1)
    return kernel, config


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="best of this many runs each")
    parser.add_argument("--memory", default="32M", help="guest RAM for all three")
    parser.add_argument("--qemu-rounds", type=int, default=2, help="QEMU runs (each takes seconds)")
    args = parser.parse_args(argv)
    if shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found: apt-get install -y qemu-system-x86")
    kernel, config = prepare(args.memory)
    baseline = build_c(ROOT / "benchmarks" / "c" / "startup.c")
    memory_bytes = int(args.memory[:-1]) << {"K": 10, "M": 20, "G": 30}[args.memory[-1].upper()]
    minivmm = [sys.executable, "-m", "minivmm", "run", str(config)]
    qemu = [QEMU, "-accel", "kvm", "-cpu", "max,-arch-capabilities", "-m", args.memory, "-kernel", str(kernel),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01", "-display", "none", "-serial", "none",
            "-monitor", "none", "-no-reboot"]
    c = [str(baseline), str(kernel), str(memory_bytes)]
    env_note = "PYTHONDONTWRITEBYTECODE set" if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    timed(minivmm, expect_status=1)                      # builds the fast path, caches the config's tree
    times: dict[str, list[float]] = {"minivmm": [], "qemu": [], "c": []}
    for round_ in range(max(args.rounds, args.qemu_rounds)):
        if round_ < args.rounds:
            times["minivmm"].append(timed(minivmm, expect_status=1))
            times["c"].append(timed(c, expect_status=0))
        if round_ < args.qemu_rounds:
            times["qemu"].append(timed(qemu, expect_status=3))
    best = {name: min(values) for name, values in times.items()}
    print(f"minivmm runs: {' '.join(f'{t:.3f}' for t in times['minivmm'])} {env_note}".rstrip())
    ratio = best["qemu"] / best["minivmm"]
    print(f"startup_c ratio={best['minivmm'] / best['c']:.1f} (minivmm / c)")
    print(f"startup ratio={ratio:.1f} minivmm={best['minivmm']:.3f}s qemu={best['qemu']:.3f}s c={best['c']:.4f}s")
    return ratio


if __name__ == "__main__":
    main()
