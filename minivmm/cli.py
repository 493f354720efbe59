"""The `minivmm` command line: run, check, trace, caps, fuzz and afl.

Exit status of `minivmm run`: the guest's debug-exit code when it reports one
(a rule's `stop` without one: 0); 0 when it halts; 124 on timeout; 125 on a
triple fault, invalid guest state, unhandled exception, exit limit or another
VM failure; 130 when interrupted; 2 on a config or usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence, TextIO

from .config import ConfigError, build_machine, check_config, load_config

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_VM_FAILURE = 125
EXIT_INTERRUPTED = 130

# RunResult.reason -> the `result` reported by `run --json`
JSON_RESULTS = {"exit": "exit", "hlt": "hlt", "timeout": "timeout", "triple_fault": "triple_fault",
                "exception": "error", "error": "error", "exit_limit": "error", "stopped": "stopped",
                "interrupted": "interrupted"}


def exit_status(reason: str, exit_code: int | None) -> int:
    """The process exit status for a run that ended with `reason`."""
    if reason in ("exit", "stopped", "hlt"):
        return (exit_code & 0xFF) if exit_code is not None else EXIT_OK
    if reason == "timeout":
        return EXIT_TIMEOUT
    if reason == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_VM_FAILURE


class _Parser(argparse.ArgumentParser):
    """argparse with exit status 2 and `minivmm: error:` messages (argparse's own convention)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minivmm",
        description="A mini-hypervisor on /dev/kvm with a model of Intel VT-x: run guests described in YAML.",
        epilog="examples:\n  minivmm run configs/hello_long.yaml\n  minivmm check configs/cpuid_demo.yaml\n"
               "  minivmm trace configs/hello_real.yaml --max 20\n  minivmm caps --json\n\n"
               "Run `minivmm COMMAND --help` for each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    raw = argparse.RawDescriptionHelpFormatter

    run = commands.add_parser(
        "run", help="run a guest described by a YAML config", formatter_class=raw,
        description="Run the guest, streaming its serial console to stdout.",
        epilog="examples:\n  minivmm run configs/hello_long.yaml\n"
               "  minivmm run configs/runaway_loop.yaml --timeout 0.5 --json\n"
               "  minivmm run configs/hello_long.yaml --set machine.memory=4M --set machine.timeout=2\n\n"
               "exit status: the guest's debug-exit code; 0 when it halts; 124 on timeout;\n"
               "125 on a triple fault, invalid guest state, unhandled exception, exit limit\n"
               "or other VM failure; 2 on a config or usage error.")
    _config_arguments(run)
    run.add_argument("--timeout", type=positive_seconds, metavar="S", help="deadline in seconds (overrides "
                     "machine.timeout)")
    run.add_argument("--max-exits", type=int, metavar="N", help="exit limit (overrides machine.max_exits)")
    run.add_argument("--json", action="store_true", help="print one JSON object with the result instead of "
                     "streaming the console")
    run.add_argument("--trace", action="store_true", help="report every VM exit (reason, qualification, "
                     "rip) on stderr (in the JSON object with --json)")
    run.add_argument("--input", metavar="FILE", help="place FILE in the guest as the config's `fuzz:` target "
                     "receives an input (replays a crash of `minivmm fuzz` or AFL++)")
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser(
        "check", help="validate a config without running it", formatter_class=raw,
        description="Validate the config, assemble/load its images and resolve every symbol; no VM is created.",
        epilog="example:\n  minivmm check configs/elf_hello.yaml && echo valid")
    _config_arguments(check)
    check.set_defaults(handler=cmd_check)

    trace = commands.add_parser(
        "trace", help="single-step a guest and print each instruction", formatter_class=raw,
        description="Single-step the guest (monitor trap flag) and print one line per instruction: "
                    "address, bytes, disassembly and the registers it changed.",
        epilog="examples:\n  minivmm trace configs/hello_real.yaml --max 10\n"
               "  minivmm trace configs/hello_long.yaml --json | head\n"
               "  minivmm trace configs/mb_smp.yaml --vcpu 1 --max 50")
    _config_arguments(trace)
    trace.add_argument("--max", type=int, default=1000, metavar="N", help="stop after N instructions "
                       "(default 1000)")
    trace.add_argument("--json", action="store_true", help="JSON lines instead of text")
    trace.add_argument("--vcpu", type=int, default=0, metavar="N", help="the vCPU to trace (default 0, "
                       "the bootstrap processor)")
    trace.set_defaults(handler=cmd_trace)

    caps = commands.add_parser(
        "caps", help="show this host's KVM capabilities and VMX capability MSRs", formatter_class=raw,
        description="KVM capabilities of /dev/kvm and the VMX capability MSRs minivmm reports for this host.",
        epilog="examples:\n  minivmm caps\n  minivmm caps --json | python3 -m json.tool")
    caps.add_argument("--json", action="store_true", help="JSON instead of a table")
    caps.set_defaults(handler=cmd_caps)

    from .fuzz import cli as fuzz_cli
    fuzz_cli.add_commands(commands)
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="the guest's YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted key, YAML value), e.g. machine.memory=4M; "
                             "repeatable")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `minivmm` and `python -m minivmm`; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"minivmm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("minivmm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


def _error(message: str) -> None:
    print(f"minivmm: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------
# run


def cmd_run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    config = load_config(args.config, args.overrides)
    events: list[str] = []
    trace_lines: list[str] = []

    def log(message: str) -> None:
        if not args.json:
            print(f"minivmm: {message}", file=sys.stderr)

    try:
        machine = build_machine(config, capture_console=args.json, log=log)
    except ConfigError:
        raise
    except Exception as exc:
        return _vm_failure(args, config, exc, out)
    with machine:
        if getattr(args, "input", None) is not None and not _place_fuzz_input(machine, config, args.input):
            return EXIT_USAGE
        if args.trace:
            _install_exit_trace(machine, trace_lines, None if args.json else sys.stderr)
        try:
            result = machine.run_config(timeout=args.timeout, max_exits=args.max_exits)
        except KeyboardInterrupt:
            _error("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:
            return _vm_failure(args, config, exc, out, console=machine.serial.text)
        events = machine.events
        counters = machine.counters
    status = exit_status(result.reason, result.exit_code)
    if args.json:
        report: dict[str, Any] = {
            "config": str(config.path), "result": JSON_RESULTS.get(result.reason, "error"),
            "reason": result.reason, "exit_code": result.exit_code, "status": status,
            "exits": result.exits, "console": result.console, "elapsed_s": round(result.elapsed_s, 6),
            "message": result.message or _default_message(result.reason), "rip": result.rip,
            "counters": counters, "events": events}
        if result.exception is not None:
            exc = result.exception
            report["exception"] = {"vector": exc.vector, "name": _vector_name(exc.vector),
                                   "error_code": exc.error_code, "cr2": exc.cr2, "rip": exc.rip}
        if args.trace:
            report["trace"] = trace_lines
        print(json.dumps(report), file=out)
    else:
        if result.reason not in ("exit", "hlt") or result.message and result.reason != "exit":
            _error(f"{config.path}: {result.reason}"
                   + (f": {result.message}" if result.message else "")
                   + (f" (exit status {status})" if status else ""))
    return status


def _place_fuzz_input(machine, config, path: str) -> bool:
    """`run --input FILE`: the file's bytes where the fuzz harness puts an input; False
    (after saying why) when the config has no usable `fuzz:` target or FILE is unreadable."""
    from .fuzz.harness import FuzzError, FuzzTarget, place_input
    try:
        with open(path, "rb") as f:
            data = f.read()
        place_input(machine, FuzzTarget.from_config(config, machine), data)
    except (OSError, FuzzError) as exc:
        _error(f"--input: {exc}")
        return False
    return True


def _default_message(reason: str) -> str:
    return {"exit": "the guest reported an exit code", "hlt": "the guest halted"}.get(reason, reason)


def _vector_name(vector: int) -> str:
    from .exits import vector_name
    return vector_name(vector)


def _vm_failure(args, config, exc: Exception, out: TextIO, console: str = "") -> int:
    message = f"{type(exc).__name__}: {exc}"
    if args.json:
        print(json.dumps({"config": str(config.path), "result": "error", "reason": "error",
                          "exit_code": None, "status": EXIT_VM_FAILURE, "exits": {}, "console": console,
                          "elapsed_s": 0.0, "message": message}), file=out)
    else:
        _error(f"{config.path}: {message}")
    return EXIT_VM_FAILURE


def _install_exit_trace(machine, lines: list[str], stream: TextIO | None) -> None:
    """Describe every exit from an OBSERVE hook: handlers would change the routing (an
    unfiltered I/O handler intercepts every port, an exception handler every vector)."""
    from .exits import ExitReason

    def observer(vcpu, info) -> None:
        line = f"exit {info.reason.name} qualification={info.qualification:#x} rip={vcpu.rip:#x}"
        if info.reason == ExitReason.IO_INSTRUCTION:
            exit = info.raw_kvm_exit
            line += f" port={exit.port:#x} {'out' if exit.is_out else 'in'} size={exit.size}"
        if len(lines) < 100000:
            lines.append(line)
        if stream is not None:
            print(f"minivmm: {line}", file=stream)

    machine.hooks.add("observe", observer)


# ---------------------------------------------------------------------------
# check, trace, caps


def cmd_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    config = load_config(args.config, args.overrides)
    symbols = check_config(config)
    images = ", ".join(image.type for image in config.images)
    print(f"{config.path}: ok ({config.machine.mode} mode, {config.machine.memory // 1024} KiB, "
          f"images: {images}, {len(symbols)} symbols)", file=out)
    return EXIT_OK


def cmd_trace(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from .trace import trace_config
    out = out or sys.stdout
    config = load_config(args.config, args.overrides)
    if args.max <= 0:
        raise ConfigError("--max: expected a positive number of instructions", "command line")
    if not 0 <= args.vcpu < config.machine.vcpus:
        raise ConfigError(f"--vcpu {args.vcpu}: the machine has {config.machine.vcpus} vCPU(s) "
                          f"(machine.vcpus)", "command line")
    result = trace_config(config, max_steps=args.max, out=out, as_json=args.json, vcpu=args.vcpu)
    return exit_status(result.reason, result.exit_code) if result.reason != "step_limit" else EXIT_OK


def cmd_caps(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        report, table = host_capabilities()
    except Exception as exc:
        _error(f"cannot query KVM: {exc}")
        return EXIT_VM_FAILURE
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default), file=out)
    else:
        print(table, file=out)
    return EXIT_OK


def _json_default(value: Any) -> Any:
    if isinstance(value, int):
        return int(value)
    return str(value)


def host_capabilities() -> tuple[dict[str, Any], str]:
    """(report, table) of this host's KVM capabilities and VMX capability MSRs."""
    from .kvm import Kvm
    from .vmcs import capability_report, capability_table
    with Kvm() as kvm:
        return capability_report(kvm), capability_table(kvm)


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())
