"""pytest plugin for tests that run guest code (registered through `pytest11`).

Markers
    `@pytest.mark.kvm`: the test needs /dev/kvm (or `$MINIVMM_KVM_PATH`). Without
    it the test is skipped with the reason; in CI (`CI=true`) with KVM present,
    a skipped KVM test fails the run, so a broken fixture never passes unnoticed.
    Tests that use the `guest` or `guest_mode` fixtures get the marker implicitly.

    `@pytest.mark.guest_mode("real", "long", ...)`: run the test once per CPU
    mode; the `guest_mode` fixture holds the mode and `guest.asm(...)` uses it
    by default. A test that asks for `guest_mode` without the marker runs in
    all four modes.

Fixtures
    `guest`: a `GuestFactory` that builds machines (closed after the test) from
    inline assembly or a .S file (`guest.asm`), a file in `guests/`
    (`guest.file`), freestanding C (`guest.c`), an ELF (`guest.elf`), a YAML
    config (`guest.config`) or nothing (`guest.machine`). Each is a `GuestVM`
    with the test channel attached: `vm.run()`, `vm.sync(stage)`, `vm.done()`.

Guest-side macros (GUEST_SYNC, GUEST_ASSERT, GUEST_ASSERT_EQ, GUEST_PRINTF,
GUEST_DONE) are in `guest_include/guest_test.inc` and `minivmm_test.h`; the
host side is `minivmm.guestchannel`.

On a failing test the report gets a "minivmm guest" section per machine: how
its last run ended, the exit sequence, registers, a disassembly around RIP,
GUEST_PRINTF output and the last console lines. `--minivmm-trace` single-steps
every guest and adds the last instructions of a failing test's guests to the
report and to a file in `--minivmm-trace-dir`.

Options: `--minivmm-timeout SECONDS` (default run deadline, 10),
`--minivmm-trace`, `--minivmm-trace-limit N` (instructions kept, 2000),
`--minivmm-trace-dir DIR`, `--minivmm-gdb PORT` (a failing test's guest waits
for gdb where it failed; use it without xdist's `-n`).
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pytest

from .errors import MinivmmError
from .kvm import kvm_path

if TYPE_CHECKING:
    from .guestchannel import GuestAssertion, SyncPoint
    from .machine import Machine, RunResult

ALL_MODES = ("real", "protected", "long", "user")
DEFAULT_TIMEOUT = 10.0
_GUEST_FIXTURES = frozenset({"guest", "guest_mode"})
_VMS_KEY = pytest.StashKey[list]()


# -- KVM availability ------------------------------------------------------------------------
def kvm_unavailable_reason(path: str | None = None) -> str | None:
    """Why KVM cannot be used here, or None when it can."""
    path = kvm_path() if path is None else path
    if not os.path.exists(path):
        return f"{path} does not exist (no KVM on this machine)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not accessible to this user (add it to the 'kvm' group)"
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# -- errors ----------------------------------------------------------------------------------
class GuestAssertionError(MinivmmError, AssertionError):
    """A GUEST_ASSERT* in the guest failed; `assertion` says where, what and the values."""

    def __init__(self, assertion: "GuestAssertion") -> None:
        super().__init__(assertion.describe())
        self.assertion = assertion


class GuestRunError(MinivmmError, AssertionError):
    """A run ended some other way than the test expected."""

    def __init__(self, message: str, run: "GuestRun | None" = None) -> None:
        super().__init__(message)
        self.run = run


# -- one run and one machine --------------------------------------------------------------------
@dataclass
class GuestRun:
    """How one `GuestVM.run()` ended.

    `reason` is the RunResult reason plus the channel's "sync", "done" and
    "assert_failed"; `exit_sequence` holds the VMX exit reasons of this run in
    order; `registers` the guest registers when it ended; `printed` its
    GUEST_PRINTF text; `console` the whole serial output so far.
    """
    reason: str
    exit_code: int | None
    message: str
    console: str
    exit_sequence: list[str]
    registers: dict[str, int]
    printed: str
    sync: "SyncPoint | None" = None
    assertion: "GuestAssertion | None" = None
    result: "RunResult | None" = field(default=None, repr=False)

    @property
    def rip(self) -> int:
        return self.registers.get("rip", 0)

    def __str__(self) -> str:
        text = self.reason
        if self.exit_code is not None:
            text += f" code={self.exit_code}"
        return f"{text}: {self.message}" if self.message else text


class GuestVM:
    """A machine with the test channel, an exit recorder and (optionally) an instruction
    tracer (`minivmm.trace.Tracer` on vCPU 0, keeping the last `trace_limit` steps).

    Attribute access falls through to the `Machine` (`vm.memory`, `vm.vcpu`,
    `vm.symbols`, `vm.on(...)`, ...).
    """

    def __init__(self, machine: "Machine", *, name: str = "guest", timeout: float = DEFAULT_TIMEOUT,
                 trace_limit: int = 0, printer: Callable[[str], object] | None = None) -> None:
        from .guestchannel import ExitRecorder, GuestChannel
        from .trace import Tracer
        self.machine = machine
        self.name = name
        self.timeout = timeout
        self.channel = GuestChannel(machine, printer)
        self.recorder = ExitRecorder(machine)
        self.tracer = Tracer(machine, max_steps=None, keep=trace_limit) if trace_limit else None
        self.recorder.tracer = self.tracer
        self.runs: list[GuestRun] = []
        self.source: str = ""

    def __getattr__(self, name: str) -> Any:
        if name == "machine":
            raise AttributeError(name)
        return getattr(self.machine, name)

    def __repr__(self) -> str:
        return f"<GuestVM {self.name} mode={self.machine.mode.value}>"

    # -- state ------------------------------------------------------------------------------
    @property
    def console(self) -> str:
        return self.machine.serial.text

    @property
    def printed(self) -> str:
        """Everything the guest printed with GUEST_PRINTF."""
        return self.channel.text

    @property
    def exit_sequence(self) -> list[str]:
        """Every exit reason recorded so far (up to the last 100000)."""
        return list(self.recorder.reasons)

    @property
    def last_run(self) -> GuestRun | None:
        return self.runs[-1] if self.runs else None

    def registers(self) -> dict[str, int]:
        from .guestchannel import register_state
        return register_state(self.machine.vcpu)

    def close(self) -> None:
        self.machine.close()

    # -- running ----------------------------------------------------------------------------
    def run(self, timeout: float | None = None, max_exits: int | None = None, *,
            raise_on_assert: bool = True) -> GuestRun:
        """Run until the guest syncs, finishes, fails an assertion or stops otherwise.

        A failed GUEST_ASSERT raises `GuestAssertionError` (unless
        `raise_on_assert=False`); every other ending is returned.
        """
        __tracebackhide__ = True
        from .guestchannel import register_state
        machine = self.machine
        channel = self.channel
        channel.last_sync = None
        channel.failure = None
        printed_mark = len(channel.output)
        exit_mark = self.recorder.total
        if self.tracer is not None:
            self.tracer.start()
        try:
            result = machine.run(timeout=self.timeout if timeout is None else timeout, max_exits=max_exits)
        except Exception as exc:         # keep the state for the failure report, then re-raise
            self.runs.append(GuestRun(reason="error", exit_code=None,
                                      message=f"{type(exc).__name__}: {exc}", console=machine.serial.text,
                                      exit_sequence=self.recorder.since(exit_mark),
                                      registers=register_state(machine.vcpu),
                                      printed="".join(channel.output[printed_mark:])))
            _drop_frame_locals(exc)
            raise
        finally:
            if self.tracer is not None:
                self.tracer.stop()
        run = GuestRun(reason=result.reason, exit_code=result.exit_code, message=result.message,
                       console=result.console, exit_sequence=self.recorder.since(exit_mark),
                       registers=register_state(machine.vcpu),
                       printed="".join(channel.output[printed_mark:]),
                       sync=channel.last_sync if result.reason == "sync" else None,
                       assertion=channel.failure if result.reason == "assert_failed" else None,
                       result=result)
        self.runs.append(run)
        if run.assertion is not None and raise_on_assert:
            raise GuestAssertionError(run.assertion)
        return run

    def sync(self, stage: int | None = None, timeout: float | None = None,
             max_exits: int | None = None) -> "SyncPoint":
        """Run to the next GUEST_SYNC (of `stage`, when given) and return it."""
        __tracebackhide__ = True
        run = self.run(timeout, max_exits)
        if run.reason != "sync":
            raise GuestRunError(f"expected GUEST_SYNC{'' if stage is None else f' stage {stage}'}, "
                                f"but the run ended: {run}", run)
        if stage is not None and run.sync.stage != stage:
            raise GuestRunError(f"expected GUEST_SYNC stage {stage}, got {run.sync}", run)
        return run.sync

    def done(self, timeout: float | None = None, max_exits: int | None = None) -> GuestRun:
        """Run to GUEST_DONE; anything else (a sync included) fails the test."""
        __tracebackhide__ = True
        run = self.run(timeout, max_exits)
        if run.reason != "done":
            raise GuestRunError(f"expected GUEST_DONE, but the run ended: {run}", run)
        return run

    # -- the failure report -------------------------------------------------------------------
    def report(self, console_lines: int = 20, trace_lines: int = 60) -> str:
        """What the pytest report shows for this machine."""
        from .guestchannel import disassemble_around, format_registers, iter_tail
        machine = self.machine
        lines = [f"machine {self.name}: mode {machine.mode.value}"]
        if self.source:
            lines[0] += f", {self.source}"
        last = self.last_run
        if last is None:
            lines.append("never ran")
            return "\n".join(lines)
        else:
            lines.append(f"last run ended: {last}")
            sequence = self.exit_sequence
            shown = sequence[-40:]
            more = f" (last 40 of {self.recorder.total})" if len(sequence) > 40 else ""
            lines.append(f"exit sequence{more}: {' '.join(shown) if shown else '(none)'}")
        if machine.vcpu is None:
            lines.append("(the machine is closed)")
            return "\n".join(lines)
        regs = self.registers()
        rip = regs["rip"]
        if last is not None and last.assertion is not None:
            regs = last.assertion.registers
            rip = last.assertion.rip
        lines.append("registers:")
        lines.append(format_registers(regs))
        lines.append("code:")
        try:
            lines.append(disassemble_around(machine, rip))
        except Exception as exc:  # a report must never fail
            lines.append(f"(no disassembly: {exc})")
        if self.printed:
            lines.append("GUEST_PRINTF output (last lines):")
            lines.extend("  " + line for line in iter_tail(self.printed, console_lines))
        console = self.console
        lines.append(f"console (last {console_lines} lines):" if console else "console: (empty)")
        lines.extend("  " + line for line in iter_tail(console, console_lines))
        if self.tracer is not None and self.tracer.steps:
            lines.append(self.tracer.format(trace_lines))
        return "\n".join(lines)


# -- building machines ------------------------------------------------------------------------------
class GuestFactory:
    """The `guest` fixture: builds `GuestVM`s that are closed at the end of the test."""

    def __init__(self, *, default_mode: str = "long", timeout: float = DEFAULT_TIMEOUT,
                 trace_limit: int = 0, base_dir: Path | None = None, rootdir: Path | None = None,
                 mode_from_param: bool = False) -> None:
        self.default_mode = default_mode
        self.mode_from_param = mode_from_param
        self.timeout = timeout
        self.trace_limit = trace_limit
        self.base_dir = base_dir or Path.cwd()
        self.rootdir = rootdir or Path.cwd()
        self.vms: list[GuestVM] = []

    # -- helpers -----------------------------------------------------------------------------
    def _wrap(self, machine: "Machine", source: str) -> GuestVM:
        vm = GuestVM(machine, name=f"#{len(self.vms)}", timeout=self.timeout, trace_limit=self.trace_limit)
        vm.source = source
        self.vms.append(vm)
        return vm

    def _machine(self, mode: str | None, memory: int | str) -> "Machine":
        from .machine import Machine
        return Machine(memory, mode or self.default_mode, kvm_path=kvm_path())

    def _find(self, name: str | os.PathLike, subdirs: Sequence[str] = ("", "guests")) -> Path:
        """A relative name is looked up next to the test file, then under pytest's rootdir
        (`guests/`, `configs/`); never under the current directory, so a suite runs the same
        from wherever pytest is started."""
        path = Path(name)
        if path.is_absolute():
            if path.is_file():
                return path
            raise FileNotFoundError(f"guest file not found: {path}")
        tried = []
        for base in (self.base_dir, self.rootdir):
            for sub in subdirs:
                candidate = base / sub / path
                tried.append(str(candidate))
                if candidate.is_file():
                    return candidate.resolve()
        raise FileNotFoundError(f"guest file {name} not found; looked in: {', '.join(dict.fromkeys(tried))}")

    def _inline_origin(self, text: str) -> tuple[str, int]:
        """(file label, first line) for inline guest text: its place in the calling test file."""
        from .guestchannel import locate_inline_source
        frame = inspect.currentframe()
        this_file = Path(__file__).resolve()
        caller = None
        while frame is not None:
            if Path(frame.f_code.co_filename).resolve() != this_file:
                caller = frame
                break
            frame = frame.f_back
        if caller is not None:
            filename = caller.f_code.co_filename
            line = locate_inline_source(text, filename, caller.f_lineno)
            if line is not None:
                return _display_path(filename), line
            return f"<inline guest in {_display_path(filename)}>", 1
        return "<inline guest>", 1

    # -- builders ------------------------------------------------------------------------------
    def machine(self, mode: str | None = None, memory: int | str = "2M") -> GuestVM:
        """An empty machine with the channel attached (load it yourself: `vm.load(...)`)."""
        return self._wrap(self._machine(mode, memory), "empty")

    def asm(self, source: str | os.PathLike, mode: str | None = None, memory: int | str = "2M", *,
            load_address: int | None = None, include_dirs: Sequence[str | os.PathLike] = (),
            defines: dict[str, int] | None = None) -> GuestVM:
        """Assemble inline text or a .S file for `mode` and load it; guest_test.inc is included."""
        from .guestchannel import prepare_asm_source
        is_path = isinstance(source, os.PathLike) or ("\n" not in source and
                                                      str(source).endswith((".S", ".s")))
        dirs = [str(d) for d in include_dirs]
        if is_path:
            path = self._find(source)
            text = path.read_text()
            label, first = _display_path(str(path)), 1
            dirs.insert(0, str(path.parent))
            description = label
        else:
            text = str(source)
            label, first = self._inline_origin(text)
            description = f"inline assembly from {label}:{first}"
        prepared = prepare_asm_source(text, label, first)
        machine = self._machine(mode, memory)
        vm = self._wrap(machine, description)
        kwargs: dict[str, Any] = {"include_dirs": dirs}
        if defines:
            kwargs["defines"] = dict(defines)
        _load_asm_with_test_include(machine, prepared, load_address, kwargs)
        return vm

    def file(self, name: str | os.PathLike, mode: str | None = None, memory: int | str = "2M",
             **kwargs: Any) -> GuestVM:
        """A guest from a file: .S/.s assembled, .c compiled, .elf/no suffix loaded as ELF, .yaml as config."""
        path = self._find(name)
        suffix = path.suffix.lower()
        if suffix in (".s",):
            return self.asm(path, mode, memory, **kwargs)
        if suffix == ".c":
            return self.c(path, mode, memory, **kwargs)
        if suffix in (".yaml", ".yml"):
            return self.config(path, **kwargs)
        return self.elf(path, mode, memory, **kwargs)

    def c(self, source: str | os.PathLike | Sequence[str | os.PathLike], mode: str | None = None,
          memory: int | str = "2M", *, cflags: Sequence[str] = ()) -> GuestVM:
        """Compile freestanding C and load it: one source (inline text or a .c path) or a list
        of .c paths, built with gcc -ffreestanding -nostdlib (`minivmm.loaders.build_c_elf`)
        with minivmm_test.h on the include path; mode user (default), long (-m64) or
        protected (-m32)."""
        from .guestchannel import GUEST_INCLUDE_DIR, header_digest
        try:
            from .loaders import build_c_elf
        except ImportError:
            pytest.skip("minivmm.loaders (the C/ELF loader) is not available")
        mode = mode or (self.default_mode if self.mode_from_param else "user")
        if mode == "real":
            raise ValueError("C guests need protected, long or user mode (no 16-bit C here)")
        bits = 32 if mode == "protected" else 64
        if isinstance(source, (list, tuple)):
            paths = [self._find(item) for item in source]
            description = ", ".join(_display_path(str(p)) for p in paths)
        elif isinstance(source, os.PathLike) or ("\n" not in str(source) and str(source).endswith(".c")):
            paths = [self._find(source)]
            description = _display_path(str(paths[0]))
        else:
            label, first = self._inline_origin(str(source))
            paths = [_inline_c_file(str(source), label, first)]
            description = f"inline C from {label}:{first}"
            if not label.startswith("<"):
                cflags = ["-iquote", str(Path(label).resolve().parent), *cflags]
        flags = ["-I", str(GUEST_INCLUDE_DIR), f"-DMINIVMM_TEST_HEADERS={header_digest()}", "-g", *cflags]
        for directory in dict.fromkeys(str(p.parent) for p in paths):
            flags += ["-iquote", directory]
        elf = build_c_elf(paths, cflags=flags, bits=bits)
        return self.elf(elf, mode, memory, _description=description)

    def elf(self, path: str | os.PathLike, mode: str | None = None, memory: int | str = "2M", *,
            _description: str | None = None) -> GuestVM:
        """Load an ELF's PT_LOAD segments (minivmm.loaders.load_elf) and start at its entry."""
        try:
            from .loaders import load_elf
        except ImportError:
            pytest.skip("minivmm.loaders (the ELF loader) is not available")
        path = self._find(path) if not Path(path).is_absolute() else Path(path)
        image = load_elf(path)
        machine = self._machine(mode, memory)
        vm = self._wrap(machine, _description or _display_path(str(path)))
        for address, data in image.segments:
            machine.memory.write(address, data)
        machine.entry = image.entry
        machine.symbols.update(image.symbols)
        return vm

    def config(self, source: str | os.PathLike, overrides: Sequence[str] = ()) -> GuestVM:
        """A machine built from a YAML config file or inline YAML text (minivmm.config)."""
        try:
            from .config import build_machine, load_config, parse_config
        except ImportError:
            pytest.skip("minivmm.config (YAML configs) is not available")
        if isinstance(source, os.PathLike) or "\n" not in str(source):
            path = self._find(source, ("", "configs", "guests"))
            config = load_config(path, overrides)
            description = _display_path(str(path))
        else:
            label, first = self._inline_origin(str(source))
            config = parse_config(str(source), path=self.base_dir / "inline.yaml", overrides=overrides)
            description = f"inline YAML from {label}:{first}"
        machine = build_machine(config, capture_console=True)
        vm = self._wrap(machine, description)
        timeout = getattr(getattr(config, "machine", None), "timeout", None)
        if timeout:
            vm.timeout = timeout
        return vm

    def close(self) -> None:
        for vm in self.vms:
            try:
                vm.close()
            except Exception:
                pass


def _drop_frame_locals(exc: BaseException) -> None:
    """Clear the locals of the finished frames of `exc` (and its causes).

    pytest keeps a failing test's exception until the end of the session; the
    frames of `Machine.run` hold ctypes views of the vCPU's kvm_run mapping,
    which would keep the machine from closing (BufferError) and leak its fds.
    """
    import traceback
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _load_asm_with_test_include(machine: "Machine", text: str, load_address: int | None,
                                kwargs: dict[str, Any]) -> None:
    """`machine.load_asm` of a source prepared by `prepare_asm_source` (which includes guest_test.inc)."""
    machine.load_asm(text, load_address=load_address, **kwargs)


def _inline_c_file(text: str, label: str, first_line: int) -> Path:
    """Write inline C to a content-addressed file, with a #line naming its place in the test."""
    import hashlib
    from .cache import cache_dir
    body = f'#line {first_line} "{label}"\n{text}'
    digest = hashlib.sha256(body.encode()).hexdigest()[:24]
    directory = cache_dir().parent / "csrc" / digest
    path = directory / "guest.c"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".guest.c.{os.getpid()}"
        tmp.write_text(body)
        os.replace(tmp, path)
    return path


def _display_path(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith("..") else relative


# -- pytest hooks -----------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("minivmm", "minivmm guest tests")
    group.addoption("--minivmm-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help="default deadline of one guest run (default: %(default)s)")
    group.addoption("--minivmm-trace", action="store_true", default=False,
                    help="single-step every guest (MTF) and report the last instructions of failing tests")
    group.addoption("--minivmm-trace-limit", type=int, default=2000, metavar="N",
                    help="instructions kept per machine with --minivmm-trace (default: %(default)s)")
    group.addoption("--minivmm-trace-dir", default=None, metavar="DIR",
                    help="where --minivmm-trace writes the traces of failing tests (default: next to "
                         "--junitxml, else <rootdir>/minivmm-traces)")
    group.addoption("--minivmm-gdb", type=int, default=None, metavar="PORT",
                    help="when a guest test fails, keep its machine stopped at the failure and wait for "
                         "gdb on 127.0.0.1:PORT (0: a free port) before the test's teardown")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: the test runs a guest on /dev/kvm")
    config.addinivalue_line("markers", "guest_mode(*modes): run the test once per CPU mode "
                                       "(real, protected, long, user); see the guest_mode fixture")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("guest_mode")
    if marker is None and "guest_mode" not in metafunc.fixturenames:
        return
    modes = tuple(marker.args) if marker is not None and marker.args else ALL_MODES
    if "guest_mode" not in metafunc.fixturenames:
        metafunc.fixturenames.append("guest_mode")
    metafunc.parametrize("guest_mode", modes, ids=[str(m) for m in modes], indirect=True)


@pytest.fixture
def guest_mode(request: pytest.FixtureRequest) -> str:
    """The CPU mode of this run of a `@pytest.mark.guest_mode(...)` test."""
    mode = getattr(request, "param", "long")
    if mode not in ALL_MODES:
        pytest.fail(f"unknown guest_mode {mode!r} in @pytest.mark.guest_mode; expected one of "
                    f"{', '.join(ALL_MODES)}", pytrace=False)
    return mode


@pytest.fixture
def guest(request: pytest.FixtureRequest):
    """Builds guests for this test: `guest.asm(...)`, `.file`, `.c`, `.elf`, `.config`, `.machine`."""
    config = request.config
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    factory = GuestFactory(default_mode=params.get("guest_mode", "long"),
                           mode_from_param="guest_mode" in params, timeout=config.getoption("minivmm_timeout"),
                           trace_limit=config.getoption("minivmm_trace_limit")
                           if config.getoption("minivmm_trace") else 0,
                           base_dir=Path(str(request.node.fspath)).parent, rootdir=Path(str(config.rootpath)))
    request.node.stash[_VMS_KEY] = factory.vms
    yield factory
    factory.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _GUEST_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("kvm") is None:
            item.add_marker(pytest.mark.kvm)
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if item.get_closest_marker("kvm") is not None:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("kvm") is not None
            and in_ci()
            and kvm_unavailable_reason() is None):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"KVM test skipped in CI although {kvm_path()} is present: {reason}"
        return
    if report.when != "call" or not report.failed:
        return
    vms: list[GuestVM] = item.stash.get(_VMS_KEY, [])
    trace_files = []
    for vm in vms:
        try:
            text = vm.report()
        except Exception as exc:  # never let the report hide the failure
            text = f"(could not describe the guest: {type(exc).__name__}: {exc})"
        report.sections.append((f"minivmm guest {vm.name}", text))
        if vm.tracer is not None and vm.tracer.steps:
            trace_files.append(_write_trace(item, vm))
    if trace_files:
        report.sections.append(("minivmm traces", "\n".join(str(p) for p in trace_files if p)))
    port = item.config.getoption("minivmm_gdb", None)
    if port is not None and vms:
        _wait_for_gdb(item, vms[-1], port)


def _wait_for_gdb(item: pytest.Item, vm: GuestVM, port: int) -> None:
    """`--minivmm-gdb PORT`: serve the failing test's last machine, stopped where it failed,
    until gdb detaches or kills it (the guest does not run on: the test is over)."""
    capture = item.config.pluginmanager.getplugin("capturemanager")

    def announce(address: str) -> None:
        with capture.global_and_fixture_disabled() if capture is not None else _nothing():
            print(f"\nminivmm: {item.nodeid} failed; guest {vm.name} waits for gdb: "
                  f"target remote {address}", flush=True)
    try:
        vm.machine.serve_gdb(port=port, ready=announce, run_on=False)
    except Exception as exc:         # the failure is reported either way
        with capture.global_and_fixture_disabled() if capture is not None else _nothing():
            print(f"minivmm: the gdb session ended with {type(exc).__name__}: {exc}", flush=True)


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def _write_trace(item: pytest.Item, vm: GuestVM) -> Path | None:
    config = item.config
    directory = config.getoption("minivmm_trace_dir")
    if directory is None:
        junit = config.getoption("xmlpath", None)
        directory = Path(junit).resolve().parent if junit else Path(str(config.rootpath)) / "minivmm-traces"
    directory = Path(directory)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid).strip("_")
    path = directory / f"{name}.vm{vm.name.lstrip('#')}.trace"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {item.nodeid}: {vm.source}\n{vm.tracer.format()}\n")
    except OSError:
        return None
    return path
