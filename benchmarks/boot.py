"""Boot time: the C multiboot kernel (guests/mbkernel) from process start to its debug-exit.

The same kernel, command line and module run under `minivmm run` (a subprocess
through the CLI, Python start-up included) and under QEMU's `-kernel`
(`qemu-system-x86_64 -accel kvm -kernel ... -initrd ... -device isa-debug-exit
-serial ... -nographic`, which boots SeaBIOS first). Both get the same RAM and
vCPU count; each run must print "mbkernel: ok" and exit with the CPU count.
Best of `--rounds` runs each. Needs Debian's qemu-system-x86:
`apt-get install -y qemu-system-x86`.

Last line: `boot ratio=R minivmm=Xs qemu=Ys` with R = qemu / minivmm (1 vCPU);
the line before it gives the same for 2 vCPUs.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minivmm.loaders import build_c_elf  # noqa: E402

KERNEL_DIR = ROOT / "guests" / "mbkernel"
CONFIGS = {1: ROOT / "configs" / "mb_kernel.yaml", 2: ROOT / "configs" / "mb_smp.yaml"}
CMDLINE = "console=ttyS0 mode=test"
MODULE = "module.txt role=greeting"
QEMU = "qemu-system-x86_64"


def timed(command: list[str], *, cwd: Path, expect_status: int, timeout: float) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if result.returncode != expect_status or "mbkernel: ok" not in result.stdout:
        raise SystemExit(f"{' '.join(command)}: exit status {result.returncode} (expected "
                         f"{expect_status})\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return elapsed


def run_minivmm(cpus: int, memory: str) -> float:
    command = [sys.executable, "-m", "minivmm", "run", str(CONFIGS[cpus]), "--set", f"machine.memory={memory}"]
    return timed(command, cwd=ROOT, expect_status=cpus, timeout=120)


def run_qemu(kernel: Path, cpus: int, memory: str) -> float:
    command = [QEMU, "-accel", "kvm", "-cpu", "max,-arch-capabilities", "-m", memory, "-smp", str(cpus),
               "-kernel", str(kernel), "-append", CMDLINE, "-initrd", MODULE,
               "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01", "-serial", "stdio",
               "-nographic", "-monitor", "none", "-no-reboot"]
    return timed(command, cwd=KERNEL_DIR, expect_status=(cpus << 1) | 1, timeout=120)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--memory", default="32M", help="guest RAM for both (QEMU's BIOS wants some)")
    args = parser.parse_args(argv)
    if shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found: apt-get install -y qemu-system-x86")
    kernel = build_c_elf([KERNEL_DIR / "entry.S", KERNEL_DIR / "kernel.c"], bits=32)
    ratios = {}
    for cpus in (2, 1):
        mini = min(run_minivmm(cpus, args.memory) for _ in range(args.rounds))
        qemu = min(run_qemu(kernel, cpus, args.memory) for _ in range(args.rounds))
        ratios[cpus] = (qemu / mini, mini, qemu)
    ratio, mini, qemu = ratios[2]
    print(f"boot_smp2 ratio={ratio:.2f} minivmm={mini:.3f}s qemu={qemu:.3f}s")
    ratio, mini, qemu = ratios[1]
    print(f"boot ratio={ratio:.2f} minivmm={mini:.3f}s qemu={qemu:.3f}s")
    return ratio


if __name__ == "__main__":
    main()
