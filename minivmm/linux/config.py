"""YAML configs whose image is `type: linux`: the machine, the fuzz harness, a replay.

    version: 1
    machine: {memory: 64M, timeout: 10}          # memory: the program's memory limit
    image: {type: linux, path: zlib_fuzz, argv: [zlib_fuzz], expose: [data], stdin: seed.bin}
    fuzz: {input_symbol: LLVMFuzzerTestOneInput, timeout: 0.5}   # or input_symbol: stdin, or '@@'

`minivmm run` runs the program (its stdout and stderr are the command's);
`minivmm fuzz` fuzzes it (`input_symbol` names the function to snapshot at, `stdin`
for the first read of standard input, or '@@' for the first read of the file that
takes the place of '@@' in argv, as for afl-fuzz); `minivmm run --input FILE` replays
one input through the same harness and reports the crash with its instruction.
Relative `expose` paths are relative to the config file, like every path in it.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..config.build import ConfiguredMachine
from ..config.schema import INPUT_FILE, Config, ConfigError, ImageConfig, Loc
from .elf import LinuxImageError
from .process import DEFAULT_MEMORY, FAULT_SIGNALS, LinuxProcess

__all__ = ["build_linux_machine", "check_linux_config", "harness_from_config", "linux_image", "replay_input"]


def linux_image(config: Config) -> ImageConfig | None:
    return next((image for image in config.images if image.type == "linux"), None)


class LinuxConfiguredMachine(ConfiguredMachine):
    """A ConfiguredMachine in user mode whose RAM the Linux process sizes."""

    def __init__(self, config: Config, ram: int, *, console: Callable[[bytes], object] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        sized = dataclasses.replace(config, machine=dataclasses.replace(config.machine, memory=ram, mode="user"))
        super().__init__(sized, console=console, log=log)
        self.config = config
        self.linux: LinuxProcess | None = None

    def close(self) -> None:
        if self.linux is not None and self.linux.vfs is not None:
            self.linux.vfs.close()
        super().close()


def process_from_config(config: Config, *, capture: bool = False, factory: Callable[[int], object] | None = None,
                        input_file: str | None = None) -> LinuxProcess:
    """The config's program; `input_file` takes the place of '@@' in its argv (its folder is exposed)."""
    image = linux_image(config)
    base = Path(config.path).parent
    expose = [spec if Path(spec.split(":")[0]).is_absolute() else str(base / spec) for spec in image.expose]
    argv = image.argv or [image.path.name]
    if INPUT_FILE in argv:
        if input_file is None:
            raise image.loc.error("its argv has '@@', the input file: give one with `minivmm run --input FILE`, "
                                  "or fuzz it with `minivmm fuzz`")
        argv = [input_file if arg == INPUT_FILE else arg for arg in argv]
        expose.append(os.path.dirname(input_file))     # the harness creates the file itself
    given = config.machine.memory_loc != Loc(key="machine.memory")
    stdin = image.stdin.read_bytes() if image.stdin is not None else (b"" if capture else None)
    try:
        return LinuxProcess(str(image.path), argv, image.env, expose=expose, stdin=stdin, capture=capture,
                            memory=config.machine.memory if given else DEFAULT_MEMORY, machine_factory=factory)
    except (LinuxImageError, FileNotFoundError) as exc:
        raise image.loc.error(str(exc)) from None


def build_linux_machine(config: Config, *, console: Callable[[bytes], object] | None = None,
                        log: Callable[[str], None] | None = None) -> LinuxConfiguredMachine:
    """`build_machine` for a linux image: the program loaded, ready to run."""
    process = process_from_config(
        config, factory=lambda ram: LinuxConfiguredMachine(config, ram, console=console, log=log))
    machine = process.build()
    machine.linux = process
    machine.symbols.update(process.program.symbols)
    return machine


def check_linux_config(config: Config) -> dict[str, int]:
    """`check_config` for a linux image: the program is a static x86-64 ELF; its symbols."""
    from .elf import read_program
    image = linux_image(config)
    try:
        program = read_program(image.path)
    except LinuxImageError as exc:
        raise image.loc.error(str(exc)) from None
    symbol = config.fuzz.input_symbol if config.fuzz is not None else None
    if symbol and symbol not in ("stdin", INPUT_FILE) and symbol not in program.symbols:
        raise ConfigError(f"unknown symbol {symbol!r} in {image.path}", str(config.path), "fuzz.input_symbol")
    return program.symbols


def harness_from_config(config: Config, *, coverage: bool = True):
    """The `LinuxHarness` of a linux config's `fuzz:` section."""
    from .fuzz import FIRST_READ, LinuxHarness
    fuzz = config.fuzz
    if fuzz is None or not fuzz.input_symbol:
        raise ConfigError("a linux image's fuzz section needs input_symbol: the function to snapshot at "
                          "(e.g. LLVMFuzzerTestOneInput), or 'stdin' for the first read of standard input",
                          str(config.path), "fuzz.input_symbol")
    at = FIRST_READ if fuzz.input_symbol in ("stdin", INPUT_FILE) else fuzz.input_symbol
    folder = input_path = None
    if fuzz.input_symbol == INPUT_FILE:
        folder = tempfile.TemporaryDirectory(prefix="minivmm-input-")
        input_path = os.path.join(folder.name, "input")
    try:
        harness = LinuxHarness(process_from_config(config, capture=True, input_file=input_path), at=at,
                               input_path=input_path, max_input_size=fuzz.max_input_size, timeout=fuzz.timeout,
                               coverage=coverage, crash_vectors=frozenset(fuzz.crash_vectors),
                               coverage_ranges=[tuple(r) for r in fuzz.coverage_ranges] or None)
    except BaseException:
        if folder is not None:
            folder.cleanup()
        raise
    harness.input_folder = folder
    return harness


def replay_input(config: Config, path: str) -> int:
    """`minivmm run --input FILE` for a linux config: one run of the fuzz harness; the exit
    status is 128 + the signal of a crash (the report names the faulting instruction)."""
    from ..fuzz.harness import Status
    data = Path(path).read_bytes()
    with harness_from_config(config, coverage=False) as harness:
        outcome = harness.run(data)
        text = harness.describe(outcome)
        fatal = harness.process.kernel.fatal_signal
    print(f"minivmm: {config.path}: {text}", file=sys.stderr)
    if outcome.status is Status.CRASH:
        return 128 + (fatal or FAULT_SIGNALS.get(outcome.vector, 11))
    return 124 if outcome.status is Status.TIMEOUT else 0
