"""Static Linux programs: native vs minivmm's Linux personality vs qemu-x86_64 (user mode).

    python3 benchmarks/linux.py [--rounds N] [--starts N] [--start-rounds N]

Two workloads, run the same way by all three, interleaved, best of `--rounds` (compute; a
short run on a shared host needs that many for its best to settle) and `--start-rounds`:
- compute: Debian busybox-static's `sha256sum` of a 16 MiB exposed file;
- start-up: `busybox true`, `--starts` times in a row.

Native and qemu-x86_64 (Debian qemu-user, the binary-only baseline of AFL++'s QEMU
mode) are timed as processes (fork, exec, exit). minivmm is timed in this process
from `LinuxProcess(...)` to its exit status: VM creation, ELF loading, the run and
the release of the VM; not the Python interpreter's own start.

The last line is `linux ratio=R ...` where R = native time / minivmm time for the
compute case: minivmm's speed relative to native (1.0 = as fast as native, 0.5 =
twice as slow). `vs_qemu` = qemu time / minivmm time (above 1: minivmm is faster).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minivmm.linux import LinuxProcess  # noqa: E402

BUSYBOX = "/bin/busybox"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def native(argv: list[str], cwd: str) -> bytes:
    return subprocess.run([BUSYBOX] + argv[1:], cwd=cwd, capture_output=True, check=True).stdout


def qemu(argv: list[str], cwd: str) -> bytes:
    return subprocess.run(["qemu-x86_64", BUSYBOX] + argv[1:], cwd=cwd, capture_output=True, check=True).stdout


def minivmm(argv: list[str], cwd: str) -> bytes:
    result = LinuxProcess(BUSYBOX, argv, cwd=cwd, capture=True).run(timeout=60)
    if result.status != 0:
        raise RuntimeError(f"minivmm: {argv}: {result.message}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--starts", type=int, default=100)
    parser.add_argument("--start-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not os.path.exists(BUSYBOX) or shutil.which("qemu-x86_64") is None:
        print("linux: needs Debian's busybox-static and qemu-user (make setup installs them)")
        return 1
    runners = {"native": native, "minivmm": minivmm, "qemu": qemu}
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "data").write_bytes(random.Random(1).randbytes(16 << 20))
        compute = ["busybox", "sha256sum", "data"]
        outputs = {name: run(compute, folder) for name, run in runners.items()}       # warm up, check
        if len(set(outputs.values())) != 1:
            print(f"linux: outputs differ: {outputs}")
            return 1
        best = {name: float("inf") for name in runners}
        start_best = dict(best)
        for _ in range(args.rounds):
            for name, run in runners.items():
                best[name] = min(best[name], timed(lambda: run(compute, folder))[0])
        for _ in range(max(1, args.start_rounds)):
            for name, run in runners.items():
                seconds, _ = timed(lambda: [run(["busybox", "true"], folder) for _ in range(args.starts)])
                start_best[name] = min(start_best[name], seconds)
    for name in runners:
        print(f"{name:8s} sha256sum 16 MiB {best[name] * 1e3:8.1f} ms   busybox true x{args.starts} "
              f"{start_best[name] * 1e3:8.1f} ms ({start_best[name] / args.starts * 1e3:.2f} ms each)")
    ratio = best["native"] / best["minivmm"]
    print(f"linux ratio={ratio:.2f} native_ms={best['native'] * 1e3:.1f} minivmm_ms={best['minivmm'] * 1e3:.1f} "
          f"qemu_ms={best['qemu'] * 1e3:.1f} vs_qemu={best['qemu'] / best['minivmm']:.2f} "
          f"start_native_ms={start_best['native'] / args.starts * 1e3:.2f} "
          f"start_minivmm_ms={start_best['minivmm'] / args.starts * 1e3:.2f} "
          f"start_qemu_ms={start_best['qemu'] / args.starts * 1e3:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
