"""Run every benchmark (`python -m benchmarks` / `make bench`) and print their last lines.

Each benchmark compares minivmm against a C loop over /dev/kvm built with gcc in
the same run and ends with one line `name ratio=R ...` (fuzz with two: per-run and batch
mode); the summary shows those closing lines. `--only NAME` runs one.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("exit_rate", "ept", "fuzz", "restore", "boot", "startup", "linux")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", choices=BENCHMARKS, action="append", help="run only these")
    args = parser.parse_args(argv)
    summary: list[str] = []
    failed = False
    for name in args.only or BENCHMARKS:
        script = HERE / f"{name}.py"
        if not script.exists():
            summary.append(f"{name}: not present")
            continue
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        sys.stdout.write(done.stdout)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            failed = True
            summary.append(f"{name}: FAILED (exit status {done.returncode})")
        else:
            # The closing `name ratio=...` lines (fuzz prints two), else the last line.
            closing = []
            for line in reversed(lines):
                if " ratio=" not in line:
                    break
                closing.insert(0, line)
            summary.extend(closing or lines[-1:])
    print("\n== summary")
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
