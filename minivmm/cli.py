"""The `minivmm` command line: run, check, trace, caps, fuzz, afl and linux.

Exit status of `minivmm run`: the guest's debug-exit code when it reports one
(a rule's `stop` without one: 0); 0 when it halts; 124 on timeout; 125 on a
triple fault, invalid guest state, unhandled exception, exit limit or another
VM failure; 1 when the run does not match the config's `expect:` (unless
`--no-expect`); 130 when interrupted; 2 on a config or usage error (one line
on stderr); 70 on an internal error (a minivmm bug); 0 when stdout is a pipe
closed by its reader (`| head`).

Errors are one line on stderr; `--debug` or MINIVMM_DEBUG=1 adds the traceback.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
from typing import Any, Callable, Sequence, TextIO

from .config import ConfigError, build_machine, check_config, check_expectation, load_config
from .config.build import shown
from .config.validate import count_value, seconds_value
from .errors import MinivmmError

EXIT_OK = 0
EXIT_EXPECTATION = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's raw-description help at the width argparse takes from `shutil.get_terminal_size`
    ($COLUMNS, else stdout's terminal, else 80), found without importing shutil: every parser and
    argument makes a formatter, and shutil loads the compression modules."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


def _terminal_columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    """argparse with exit status 2 and a one-line `minivmm: error:` message (no usage dump)."""

    def error(self, message: str) -> None:     # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with a `command` (the first argument), only that command's
    subparser when it names one: the others cost start-up time and cannot be chosen."""
    parser = _Parser(
        prog="minivmm",
        description="A mini-hypervisor on /dev/kvm with a model of Intel VT-x: run guests described in YAML.",
        epilog="examples:\n  minivmm run configs/hello_long.yaml\n  minivmm check configs/cpuid_demo.yaml\n"
               "  minivmm trace configs/hello_real.yaml --max 20\n  minivmm caps --json\n\n"
               "Run `minivmm COMMAND --help` for each command's options.",
        formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback behind an error (also "
                        "MINIVMM_DEBUG=1; accepted anywhere on the command line)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    adders = [adder for names, adder in _COMMANDS if command in names] or [adder for _, adder in _COMMANDS]
    for adder in adders:
        adder(commands)
    return parser


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="run a guest described by a YAML config", formatter_class=HelpFormatter,
        description="Run the guest, streaming its serial console to stdout.",
        epilog="examples:\n  minivmm run configs/hello_long.yaml\n"
               "  minivmm run configs/runaway_loop.yaml --timeout 0.5 --json\n"
               "  minivmm run configs/hello_long.yaml --set machine.memory=4M --set machine.timeout=2\n\n"
               "exit status: the guest's debug-exit code; 0 when it halts; 124 on timeout;\n"
               "125 on a triple fault, invalid guest state, unhandled exception, exit limit\n"
               "or other VM failure; 1 when the run does not match the config's expect:;\n"
               "2 on a config or usage error; 70 on an internal error.")
    _config_arguments(run)
    run.add_argument("--timeout", type=positive_seconds, metavar="S", help="deadline in seconds (overrides "
                     "machine.timeout)")
    run.add_argument("--max-exits", type=positive_count, metavar="N", help="exit limit (overrides "
                     "machine.max_exits)")
    run.add_argument("--no-expect", action="store_true", help="do not check the run against the config's "
                     "expect: block")
    run.add_argument("--json", action="store_true", help="print one JSON object with the result instead of "
                     "streaming the console")
    run.add_argument("--trace", action="store_true", help="report every VM exit (reason, qualification, "
                     "rip) on stderr (in the JSON object with --json)")
    run.add_argument("--input", metavar="FILE", help="place FILE in the guest as the config's `fuzz:` target "
                     "receives an input (replays a crash of `minivmm fuzz` or AFL++)")
    run.add_argument("--gdb", type=gdb_address, metavar="[HOST]:PORT|PATH", help="wait for gdb on this TCP port (or Unix socket "
                     "path) before the first instruction; the config's expect: is not checked")
    run.set_defaults(handler=cmd_run)


def _add_gdb(commands: argparse._SubParsersAction) -> None:
    gdb = commands.add_parser(
        "gdb", help="run a guest under gdb: wait for `target remote` before the first instruction",
        formatter_class=HelpFormatter,
        description="Serve the GDB remote protocol for the guest; it starts when gdb says so. Threads are "
                    "vCPUs; watchpoints are EPT monitors (any number, any length).",
        epilog="examples:\n  minivmm gdb configs/hello_user.yaml --port 1234 &\n"
               "  gdb -ex 'target remote :1234' -ex 'stepi' -ex 'info registers rip'\n"
               "  minivmm gdb configs/hello_long.yaml --socket /tmp/minivmm.sock\n\n"
               "exit status: as for `minivmm run` once the guest ends; 0 when gdb kills it.")
    _config_arguments(gdb)
    where = gdb.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=1234, metavar="N", help="TCP port on 127.0.0.1 (default 1234)")
    where.add_argument("--socket", metavar="PATH", help="a Unix socket instead of TCP")
    gdb.add_argument("--timeout", type=positive_seconds, metavar="S", help="guest run time allowed, summed over "
                     "the resumes (overrides machine.timeout)")
    gdb.set_defaults(handler=cmd_gdb, json=False, trace=False, no_expect=True, input=None, max_exits=None)


def _add_check(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "check", help="validate a config without running it", formatter_class=HelpFormatter,
        description="Validate the config, assemble/load its images and resolve every symbol; no VM is created.",
        epilog="examples:\n  minivmm check configs/elf_hello.yaml && echo valid\n"
               "  minivmm check --json fuzz/crash-1.yaml")
    _config_arguments(check)
    check.add_argument("--json", action="store_true", help="print one JSON object {ok, config, errors}")
    check.set_defaults(handler=cmd_check)


def _add_trace(commands: argparse._SubParsersAction) -> None:
    trace = commands.add_parser(
        "trace", help="single-step a guest and print each instruction", formatter_class=HelpFormatter,
        description="Single-step the guest (monitor trap flag) and print one line per instruction: "
                    "address, bytes, disassembly and the registers it changed.",
        epilog="examples:\n  minivmm trace configs/hello_real.yaml --max 10\n"
               "  minivmm trace configs/hello_long.yaml --json | head\n"
               "  minivmm trace configs/mb_smp.yaml --vcpu 1 --max 50")
    _config_arguments(trace)
    trace.add_argument("--max", type=positive_count, default=1000, metavar="N", help="stop after N instructions "
                       "(default 1000)")
    trace.add_argument("--json", action="store_true", help="JSON lines instead of text")
    trace.add_argument("--vcpu", type=int, default=0, metavar="N", help="the vCPU to trace (default 0, "
                       "the bootstrap processor)")
    trace.set_defaults(handler=cmd_trace)


def _add_caps(commands: argparse._SubParsersAction) -> None:
    caps = commands.add_parser(
        "caps", help="show this host's KVM capabilities and VMX capability MSRs", formatter_class=HelpFormatter,
        description="KVM capabilities of /dev/kvm and the VMX capability MSRs minivmm reports for this host.",
        epilog="examples:\n  minivmm caps\n  minivmm caps --markdown\n"
               "  minivmm caps --json | python3 -m json.tool")
    caps.add_argument("--json", action="store_true", help="JSON instead of a table")
    caps.add_argument("--markdown", action="store_true",
                      help="only the per-mode works/refused table of every control and exception vector "
                           "(Markdown, as in the README)")
    caps.set_defaults(handler=cmd_caps)


def _add_fuzz(commands: argparse._SubParsersAction) -> None:
    from .fuzz import cli as fuzz_cli
    fuzz_cli.add_commands(commands)


def _add_linux(commands: argparse._SubParsersAction) -> None:
    from .linux import cli as linux_cli
    linux_cli.add_command(commands)


# The subcommands, in `minivmm --help` order, each with what adds it to the parser.
_COMMANDS: list[tuple[tuple[str, ...], Callable[[argparse._SubParsersAction], None]]] = [
    (("run",), _add_run), (("gdb",), _add_gdb), (("check",), _add_check), (("trace",), _add_trace),
    (("caps",), _add_caps), (("fuzz", "afl", "afl-fuzz"), _add_fuzz), (("linux",), _add_linux)]


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="the guest's YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted key, YAML value), e.g. machine.memory=4M; "
                             "repeatable")


def positive_seconds(text: str) -> float:
    """An argparse type: seconds as the config takes them (finite, above 0, at most the config's cap)."""
    try:
        return seconds_value(float(text) if len(text) <= 100 else text)
    except ValueError as exc:
        what = str(exc) if "finite" in str(exc) else "a positive number of seconds"
        raise argparse.ArgumentTypeError(f"expected {what}, got {shown(text)}") from None


def gdb_address(text: str) -> str:
    """`--gdb`: `:PORT`, `HOST:PORT` or a Unix socket path (it contains a `/`)."""
    if "/" in text:
        return text
    from .gdb.transport import parse_address
    try:
        parse_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [HOST]:PORT or a socket path, got {text!r}") from None
    return text


def positive_count(text: str) -> int:
    """An argparse type: a count like the config's max_exits (an integer from 1, 0x hex or K/M/G)."""
    try:
        return count_value(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {shown(text)}") from None


def command() -> int:
    """The `minivmm` program and `python -m minivmm`: `main()` as a process of its own.

    The modules, classes and tables the imports made live as long as the process, so they are
    moved out of the cycle collector's sight first (`gc.freeze`): the collections during the run
    and the interpreter's last one at exit then walk only what the command itself made."""
    gc.freeze()
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line `argv` (default: the process's), run in this process; returns the exit
    status (`command` is the program's entry around it).

    Every error ends as one line on stderr; an exception minivmm does not expect
    is reported as a minivmm bug (status 70); `--debug` adds tracebacks.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_wanted(argv)
    argv = _without_debug(argv)
    try:
        return _dispatch(argv, debug)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:        # the top-level guard: anything else is a bug, reported in one line
        if debug:
            _print_traceback()
        _error(f"internal error: {type(exc).__name__}: {_shorten(str(exc))} (this is a minivmm bug; "
               "rerun with --debug for the traceback)")
        return EXIT_INTERNAL


def _dispatch(argv: list[str], debug: bool) -> int:
    parser = build_parser(argv[0] if argv else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except ConfigError as exc:
        if debug:
            _print_traceback()
        _error(str(exc))
        return EXIT_USAGE


def _debug_wanted(argv: Sequence[str]) -> bool:
    return os.environ.get("MINIVMM_DEBUG", "").strip() not in ("", "0") or "--debug" in _options(argv)


def _options(argv: Sequence[str]) -> list[str]:
    """The arguments before a `--` separator."""
    return list(argv[:argv.index("--")]) if "--" in argv else list(argv)


def _without_debug(argv: list[str]) -> list[str]:
    head = _options(argv)
    return [arg for arg in head if arg != "--debug"] + argv[len(head):]


def _print_traceback() -> None:
    import traceback
    try:
        traceback.print_exc(file=sys.stderr)
    except OSError:
        pass


def _one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped, so it prints as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _shorten(text: str, width: int = 300) -> str:
    return text if len(text) <= width else f"{text[:width]}..."


def _error(message: str) -> None:
    """`minivmm: message` as one line on stderr; a closed stderr is ignored."""
    try:
        print(f"minivmm: {_one_line(message)}", file=sys.stderr)
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    """Point stdout's descriptor at /dev/null, so the interpreter's final flush of a pipe its reader
    closed neither fails nor complains."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


class _ConsoleClosed(MinivmmError, BrokenPipeError):
    """The reader of stdout went away: the console sink ends the run with this."""


class _StdoutSink:
    """The guest console to stdout, flushed at each newline. When the reader closes the pipe the
    sink stops the run (by raising from the serial port's handler) and remembers it in `closed`."""

    def __init__(self, stream: TextIO) -> None:
        self.stream: Any = getattr(stream, "buffer", stream)
        self.text = isinstance(self.stream, io.TextIOBase)
        self.closed = False

    def __call__(self, data: bytes) -> None:
        if self.closed:
            raise _ConsoleClosed("stdout was closed by its reader")
        try:
            self.stream.write(data.decode("latin-1") if self.text else data)
            if data == b"\n":
                self.stream.flush()
        except BrokenPipeError:
            self._close()
            raise _ConsoleClosed("stdout was closed by its reader") from None

    def flush(self) -> None:
        if self.closed:
            return
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._close()
        except (OSError, ValueError):
            pass

    def _close(self) -> None:
        self.closed = True
        _silence_stdout()


# ---------------------------------------------------------------------------
# run


def cmd_run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    config = load_config(args.config, args.overrides)
    if getattr(args, "input", None) is not None and any(image.type == "linux" for image in config.images):
        from .linux.config import replay_input
        return replay_input(config, args.input)
    events: list[str] = []
    trace_lines: list[str] = []

    def log(message: str) -> None:
        if not args.json:
            _error(message)

    sink = _StdoutSink(sys.stdout) if not args.json and config.devices.serial.output == "stdout" else None
    try:
        machine = build_machine(config, capture_console=args.json, console=sink, log=log)
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
            result = _run_or_serve_gdb(machine, args)
        except KeyboardInterrupt:
            _error("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:
            if sink is not None and sink.closed:
                return EXIT_OK
            return _vm_failure(args, config, exc, out, console=machine.serial.text)
        events = machine.events
        counters = machine.counters
    if sink is not None and sink.closed:
        return EXIT_OK          # the reader of the console went away: not a guest failure
    status = exit_status(result.reason, result.exit_code)
    failures = [] if args.no_expect else check_expectation(config.expect, result)
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
        if config.expect is not None and not args.no_expect:
            report["expectation"] = {"ok": not failures, "failures": failures}
            report["status"] = EXIT_EXPECTATION if failures else status
        print(json.dumps(report), file=out)
    else:
        if result.reason not in ("exit", "hlt") or result.message and result.reason != "exit":
            _error(f"{config.path}: {result.reason}"
                   + (f": {result.message}" if result.message else "")
                   + (f" (exit status {status})" if status else ""))
    if failures:
        _error(f"{config.path}: expectation failed: {'; '.join(failures)}")
        return EXIT_EXPECTATION
    return status


def cmd_gdb(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`minivmm gdb`: `minivmm run --gdb` with the port or socket of its own options."""
    args.gdb = args.socket if args.socket is not None else f":{args.port}"
    return cmd_run(args, out)


def _run_or_serve_gdb(machine, args: argparse.Namespace):
    """The run of `minivmm run`: the config's, or with --gdb a gdb session first."""
    if not getattr(args, "gdb", None):
        return machine.run_config(timeout=args.timeout, max_exits=args.max_exits)
    from .gdb import serve_config_machine
    args.no_expect = True           # a debugging session changes what the guest does
    return serve_config_machine(machine, args.gdb, args.timeout, announce=_error)


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
    try:
        config = load_config(args.config, args.overrides)
        symbols = check_config(config)
    except ConfigError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "config": args.config, "errors": [_error_object(exc)]}), file=out)
        raise
    images = [image.type for image in config.images]
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, "config": args.config, "errors": [], "mode": config.machine.mode,
                          "memory": config.machine.memory, "images": images, "symbols": len(symbols)}),
              file=out)
    else:
        print(f"{config.path}: ok ({config.machine.mode} mode, {config.machine.memory // 1024} KiB, "
              f"images: {', '.join(images)}, {len(symbols)} symbols)", file=out)
    return EXIT_OK


def _error_object(exc: ConfigError) -> dict[str, Any]:
    """A config error for `check --json`: where (`file:line`), key, message and the whole line."""
    return {"where": exc.where, "key": exc.key, "message": exc.detail, "text": _one_line(str(exc))}


def cmd_trace(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from .trace import trace_config
    out = out or sys.stdout
    config = load_config(args.config, args.overrides)
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
    if getattr(args, "markdown", False):
        print(capabilities_markdown(), file=out)
    elif args.json:
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


def capabilities_markdown() -> str:
    """The README's capability table for this host (`minivmm caps --markdown`)."""
    from .capabilities import host_model
    from .kvm import Kvm
    with Kvm() as kvm:
        return host_model(kvm).markdown()


if __name__ == "__main__":      # pragma: no cover
    sys.exit(command())
