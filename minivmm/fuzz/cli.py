"""`minivmm fuzz` and `minivmm afl`: the fuzzing commands of the command line.

`add_commands(subparsers)` is called by `minivmm.cli`; each command's
handler takes the parsed arguments and returns the exit status.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import HelpFormatter, positive_seconds

EXIT_OK = 0
EXIT_USAGE = 2


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    raw = HelpFormatter
    fuzz = subparsers.add_parser(
        "fuzz", help="coverage-guided snapshot fuzzing of a config's `fuzz:` target", formatter_class=raw,
        description="Fuzz the target described by the config's `fuzz:` section: restore a snapshot, place "
                    "a mutated input, run, keep inputs that reach new basic blocks, save crashes once per "
                    "crash site. A status line (runs/s, coverage, crashes, timeouts, elapsed) goes to stderr.",
        epilog="examples:\n"
               "  minivmm fuzz configs/fuzz_parser.yaml --corpus corpus --crashes crashes --seconds 30\n"
               "  minivmm fuzz configs/fuzz_parser.yaml --corpus corpus --crashes crashes --jobs 2 --runs 100000\n\n"
               "Without --runs or --seconds it runs until interrupted (Ctrl-C).")
    fuzz.add_argument("config", metavar="CONFIG", help="a YAML config with a `fuzz:` section")
    fuzz.add_argument("--corpus", required=True, metavar="DIR", type=Path,
                      help="seed inputs; inputs reaching new coverage are added here")
    fuzz.add_argument("--crashes", required=True, metavar="DIR", type=Path,
                      help="one input (and a .txt description) per crash site")
    fuzz.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                      help="fuzzing processes, each with its own VM (default 1)")
    fuzz.add_argument("--runs", type=_positive_int, metavar="N", help="stop after N runs (over all jobs)")
    fuzz.add_argument("--seconds", type=positive_seconds, metavar="S", help="stop after S seconds")
    fuzz.add_argument("--seed", type=int, metavar="N", help="random seed (reproducible campaigns with --jobs 1)")
    fuzz.add_argument("--no-coverage", action="store_true", help="blind fuzzing (no breakpoints)")
    fuzz.add_argument("--batch", type=_batch_size, metavar="N",
                      help="run up to N inputs per guest entry (batch mode, for FUZZ_ENTRY targets; "
                           "default: the config's fuzz.batch, else 1)")
    fuzz.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. fuzz.timeout=0.5; repeatable")
    fuzz.add_argument("--json", action="store_true",
                      help="print the final summary as one JSON object on stdout instead of text")
    fuzz.set_defaults(handler=cmd_fuzz)

    afl = subparsers.add_parser(
        "afl", help="run a config's `fuzz:` target under afl-fuzz (forkserver with snapshot restores)",
        formatter_class=raw,
        description="An AFL++ target: speaks the forkserver protocol on fds 198/199, restores a snapshot "
                    "instead of forking, reads the input from FILE (afl's @@) or stdin and writes "
                    "coverage into __AFL_SHM_ID. Crashes are reported as SIGSEGV, minivmm's own "
                    "deadline as SIGKILL.",
        epilog="examples:\n"
               "  minivmm afl configs/fuzz_parser.yaml --write-dict parser.dict\n"
               "  minivmm afl-fuzz -i seeds -o out -x parser.dict -- configs/fuzz_parser.yaml\n"
               "  AFL_SKIP_BIN_CHECK=1 afl-fuzz -i seeds -o out -- minivmm afl configs/fuzz_parser.yaml @@\n"
               "  minivmm afl configs/fuzz_parser.yaml crash.bin      # one run; SIGSEGV if it crashes")
    afl.add_argument("config", metavar="CONFIG", help="a YAML config with a `fuzz:` section")
    afl.add_argument("input", nargs="?", metavar="FILE", help="the input file (afl's @@); default stdin")
    afl.add_argument("--timeout", type=positive_seconds, metavar="S",
                     help="minivmm's deadline per run (default: the config's fuzz.timeout); keep it above "
                          "afl-fuzz -t")
    afl.add_argument("--write-dict", metavar="FILE", type=Path,
                     help="write the target's comparison constants as an AFL dictionary and exit")
    afl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value; repeatable")
    afl.set_defaults(handler=cmd_afl)

    # "+" as the option prefix: every "-x" argument goes through to afl-fuzz untouched.
    afl_fuzz = subparsers.add_parser(
        "afl-fuzz", help="run afl-fuzz on `minivmm afl CONFIG` with the environment it needs",
        prefix_chars="+", add_help=False, usage=AFL_FUZZ_USAGE)
    afl_fuzz.add_argument("argv", nargs=argparse.REMAINDER)
    afl_fuzz.set_defaults(handler=cmd_afl_fuzz)


AFL_FUZZ_USAGE = """minivmm afl-fuzz AFL-OPTIONS -- CONFIG [minivmm afl OPTIONS] [@@]

Runs afl-fuzz with AFL-OPTIONS on `minivmm afl CONFIG ...` (this Python), adding
AFL_SKIP_BIN_CHECK=1 (the target is not an instrumented ELF) and a longer
forkserver start-up timeout (AFL_FORKSRV_INIT_TMOUT=30000) unless set.

examples:
  minivmm afl-fuzz -i seeds -o out -- configs/fuzz_parser.yaml
  minivmm afl-fuzz -i seeds -o sync -M main -- configs/fuzz_parser.yaml
  minivmm afl-fuzz -i seeds -o sync -S s1 -- configs/fuzz_parser.yaml --timeout 2 @@"""


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _batch_size(text: str) -> int:
    value = _positive_int(text)
    if value > 1024:
        raise argparse.ArgumentTypeError(f"expected a batch size from 1 to 1024, got {text!r}")
    return value


def _load(args: argparse.Namespace):
    from ..config import load_config
    config = load_config(args.config, overrides=args.overrides)
    if config.fuzz is None:
        print(f"minivmm: {args.config}: the config has no `fuzz:` section (input_symbol, length_register, ...)",
              file=sys.stderr)
        return None
    return config


def _seeds(corpus: Path) -> list[bytes]:
    if not corpus.exists():
        return []
    return [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file() and not p.name.startswith(".")]


def cmd_fuzz(args: argparse.Namespace) -> int:
    from .engine import Fuzzer, StatusLine, config_harness, fuzz_jobs
    from .harness import FuzzError
    config = _load(args)
    if config is None:
        return EXIT_USAGE
    status = StatusLine(sys.stderr)
    args.corpus.mkdir(parents=True, exist_ok=True)
    args.crashes.mkdir(parents=True, exist_ok=True)
    try:
        if args.jobs > 1:
            stats = fuzz_jobs(args.config, jobs=args.jobs, corpus_dir=args.corpus, crashes_dir=args.crashes,
                              runs=args.runs, seconds=args.seconds, seed=args.seed,
                              coverage=not args.no_coverage, overrides=args.overrides, status=status,
                              batch=args.batch)
        else:
            try:
                harness = config_harness(config, coverage=not args.no_coverage, batch=args.batch)
            except FuzzError as exc:
                print(f"minivmm: {exc}", file=sys.stderr)
                return EXIT_USAGE
            with harness:
                fuzzer = Fuzzer(harness, corpus_dir=args.corpus, crashes_dir=args.crashes, seed=args.seed,
                                status=status)
                try:
                    stats = fuzzer.run(runs=args.runs, seconds=args.seconds)
                except KeyboardInterrupt:
                    stats = fuzzer.stats
                if harness.batch_runner is not None:
                    status.done()
                    print(batch_report(harness.batch_runner.stats), file=sys.stderr)
    except KeyboardInterrupt:
        status.done()
        print("minivmm: interrupted", file=sys.stderr)
        return 130
    status.done()
    if args.json:
        print(json.dumps(fuzz_summary(stats, args.config, args.crashes)))
        return EXIT_OK
    print(f"{stats.runs} runs in {stats.elapsed_s:.1f}s ({stats.runs_per_s:,.0f}/s), "
          f"coverage {len(stats.hits)}/{stats.blocks} blocks, {stats.crashes} unique crashes, "
          f"{stats.timeouts} timeouts")
    for site in sorted(stats.crash_sites):
        print(f"  crash {site}: {args.crashes / ('crash-' + site)}")
    return EXIT_OK


def batch_report(stats) -> str:
    """What batch mode did in a campaign (`minivmm.fuzz.batch.BatchStats`), one line or two."""
    text = (f"batch mode: {stats.inputs} inputs in {stats.batches} batches ({stats.per_run} per-run), "
            f"{stats.stops} ended by a stop, {stats.timeouts} by the deadline, "
            f"{stats.guest_hits} coverage hits taken in the guest")
    if stats.widened:
        pages = ", ".join(f"{gpa:#x}" for gpa, _ in stats.widened[:8]) + (" ..." if len(stats.widened) > 8 else "")
        text += f"; written outside the declared regions, now reset between inputs: {pages}"
    if stats.disabled:
        text += f"\nbatch mode off: {stats.disabled}"
    return text


def fuzz_summary(stats, config: str, crashes: Path) -> dict:
    """`minivmm fuzz --json`: the campaign's totals and one input file per crash site."""
    return {"config": str(config), "runs": stats.runs, "elapsed_s": round(stats.elapsed_s, 3),
            "runs_per_s": round(stats.runs_per_s, 1), "blocks_hit": len(stats.hits), "blocks": stats.blocks,
            "crashes": stats.crashes, "timeouts": stats.timeouts,
            "crash_sites": {site: str(crashes / f"crash-{site}") for site in sorted(stats.crash_sites)}}


def cmd_afl(args: argparse.Namespace) -> int:
    from .afl import AflError, main, write_dictionary
    from .engine import config_harness
    from .harness import FuzzError
    config = _load(args)
    if config is None:
        return EXIT_USAGE
    try:
        harness = config_harness(config, coverage=True, batch=1)     # one input per forkserver cycle
    except FuzzError as exc:
        print(f"minivmm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.timeout is not None:
            harness.target.timeout = args.timeout
        if args.write_dict is not None:
            count = write_dictionary(harness, args.write_dict)
            print(f"wrote {count} tokens to {args.write_dict}")
            return EXIT_OK
        return main(harness, args.input)
    except AflError as exc:
        print(f"minivmm afl: {exc}", file=sys.stderr)
        return 1
    finally:
        harness.close()


def cmd_afl_fuzz(args: argparse.Namespace) -> int:
    """Exec afl-fuzz on the bridge; returns only on a usage error."""
    from .afl import AflError, exec_afl_fuzz
    if not args.argv or args.argv[0] in ("-h", "--help"):
        print(AFL_FUZZ_USAGE, file=sys.stdout if args.argv else sys.stderr)
        return EXIT_OK if args.argv else EXIT_USAGE
    try:
        exec_afl_fuzz(args.argv)
    except (AflError, OSError) as exc:
        print(f"minivmm afl-fuzz: {exc}", file=sys.stderr)
    return EXIT_USAGE


__all__ = ["add_commands", "cmd_fuzz", "cmd_afl", "cmd_afl_fuzz"]
