"""`minivmm linux PROG [ARGS...]`: run a static Linux program as if it ran natively.

stdin, stdout and stderr are the command's own; the current folder is exposed
read-only unless `--sandbox`; `--expose PATH[:rw]` adds more. The exit status is
the program's, 128 + the signal number when a fault or signal killed it, 124 on
timeout, 126 when the file is no program minivmm can run, 127 when it does not
exist, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MEMORY = "256M"               # minivmm.linux.process.DEFAULT_MEMORY, without importing it

EXIT_USAGE = 2
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


def add_command(subparsers: argparse._SubParsersAction) -> None:
    linux = subparsers.add_parser(
        "linux", help="run a static x86-64 Linux program at CPL 3 (system calls emulated)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an unmodified static Linux x86-64 program (gcc -static, musl-gcc -static, "
                    "busybox-static) in minivmm's user-mode kernel: its code runs natively at CPL 3, "
                    "every system call exits to minivmm's Linux personality.",
        epilog="examples:\n  minivmm linux /bin/busybox wc -l README.md\n"
               "  echo hi | minivmm linux --strace /bin/busybox tr a-z A-Z\n"
               "  minivmm linux --sandbox --expose data:rw ./prog data/out\n\n"
               "exit status: the program's; 128+N when signal N (a fault) killed it; 124 on timeout;\n"
               "126 when the file cannot be run; 127 when it does not exist.")
    linux.add_argument("--expose", action="append", default=[], metavar="PATH[:rw]",
                       help="let the program see PATH (read-only, or writable with :rw); repeatable")
    linux.add_argument("--sandbox", action="store_true", help="do not expose the current folder")
    linux.add_argument("--strace", action="store_true", help="print each system call on stderr, as strace does")
    linux.add_argument("--memory", default=DEFAULT_MEMORY, metavar="SIZE",
                       help=f"memory limit of the program (default {DEFAULT_MEMORY})")
    linux.add_argument("--timeout", type=float, metavar="S", help="stop the program after S seconds (status 124)")
    linux.add_argument("--seed", type=int, default=0, metavar="N", help="seed of getrandom and AT_RANDOM (default 0)")
    linux.add_argument("--deterministic-clock", action="store_true",
                       help="a clock that starts at a fixed time and advances 1 us per read")
    linux.add_argument("program", metavar="PROG", help="the static ELF executable")
    linux.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")
    linux.set_defaults(handler=cmd_linux)


def _report(text: str) -> None:
    try:
        print(f"minivmm: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def cmd_linux(args: argparse.Namespace) -> int:
    from ..memory import GuestMemoryError, parse_size
    from .elf import LinuxImageError
    from .process import LinuxProcess
    try:
        parse_size(args.memory)
    except (GuestMemoryError, ValueError) as exc:
        _report(f"--memory: {exc}")
        return EXIT_USAGE
    strace = None
    if args.strace:
        def strace(line: str) -> None:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
    try:
        process = LinuxProcess(args.program, [args.program] + list(args.args), dict(os.environ),
                               expose=args.expose, sandbox=args.sandbox, memory=args.memory,
                               strace=strace, seed=args.seed, deterministic_clock=args.deterministic_clock)
    except LinuxImageError as exc:
        _report(str(exc))
        return exc.status
    except FileNotFoundError as exc:
        _report(str(exc))
        return EXIT_USAGE
    sys.stdout.flush()
    result = process.run(timeout=args.timeout)
    if result.signal is not None or result.status in (124, 125):
        _report(result.message)
    return result.status
