"""Layer rules of minivmm's source, checked on syntax trees (no module is imported).

Each rule returns findings (file:line and what was found). Today's violations in
modules whose owners are still changing them are allow-listed per rule, keyed by
(file, what) so that unrelated edits moving lines do not break the test; every
entry says what should replace it. A rule fails on a new finding and on a stale
allow-list entry, so the lists only shrink.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minivmm"

Rule = Callable[[str, ast.Module], list["Finding"]]


@dataclass(frozen=True)
class Finding:
    """One place a rule objects to: `path` relative to the repository, `what` its allow-list key."""
    path: str
    line: int
    what: str
    source: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source}"


@cache
def modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed: "minivmm/x.py" -> tree."""
    return {path.relative_to(ROOT).as_posix(): ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE.rglob("*.py"))}


def module_name(path: str) -> str:
    """"minivmm/ept/shadow.py" -> "minivmm.ept.shadow" ("__init__" is the package)."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names of the modules an import statement may load (for `from x import y`
    both x and x.y, since y may be a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module_name(path).split(".")
        if not path.endswith("__init__.py"):
            package = package[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def source(node: ast.AST) -> str:
    return ast.unparse(node)


def found(path: str, node: ast.AST, what: str) -> Finding:
    return Finding(path, getattr(node, "lineno", 0), what, source(node))


def check(rule: Rule, paths: Iterable[str], allowed: dict[tuple[str, str], str], summary: str) -> None:
    """Run `rule` over `paths`; fail on findings not in `allowed` and on stale entries of it."""
    findings = [f for path in paths for f in rule(path, modules()[path])]
    keys = {(f.path, f.what) for f in findings}
    new = [f for f in findings if (f.path, f.what) not in allowed]
    stale = [key for key in allowed if key not in keys]
    if new or stale:
        lines = [f"{summary}:"] + [f"  {f}   [{f.what}]" for f in new]
        lines += [f"  stale allow-list entry {path}: {what} (fixed? remove it from the list)"
                  for path, what in stale]
        pytest.fail("\n".join(lines), pytrace=False)


def under(*prefixes: str) -> list[str]:
    return [path for path in modules() if path.startswith(prefixes)]


def walk(tree: ast.AST) -> Iterator[ast.AST]:
    return ast.walk(tree)


# --- rule: handlers and config rules stay above the KVM layer ----------------------------
def kvm_reach(path: str, tree: ast.Module) -> list[Finding]:
    """Imports of minivmm.kvm and any `.fd` attribute (a vCPU's or VM's ioctl object)."""
    out = []
    for node in walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(name == "minivmm.kvm" or name.startswith("minivmm.kvm.")
                   for name in imported_modules(path, node)):
                out.append(found(path, node, "import minivmm.kvm"))
        elif isinstance(node, ast.Attribute) and node.attr == "fd":
            out.append(found(path, node, ".fd"))
    return out


KVM_REACH_ALLOWED = {
}


def test_handlers_and_config_rules_do_not_reach_kvm() -> None:
    check(kvm_reach, under("minivmm/handlers/") + ["minivmm/config/rules.py"], KVM_REACH_ALLOWED,
          "exit handlers and config rules must use the Vcpu API, not minivmm.kvm or vcpu.fd")


def test_hardware_breakpoint_table_does_not_reach_kvm() -> None:
    """The table keeps owners and slots; the VMCS model realises the debug registers on KVM
    (KVM_SET_GUEST_DEBUG) and the step service steps over a hit."""
    check(kvm_reach, ["minivmm/hwbreakpoints.py"], {},
          "the hardware breakpoint table must go through the VMCS model, not minivmm.kvm or .fd")


def test_linux_personality_and_syscall_hooks_do_not_reach_kvm() -> None:
    check(kvm_reach, under("minivmm/linux/") + ["minivmm/syscalls.py"], KVM_REACH_ALLOWED,
          "the Linux personality and the SYSCALL hooks use the Machine and Vcpu APIs, not minivmm.kvm "
          "or vcpu.fd")


def test_devices_do_not_reach_kvm() -> None:
    """Devices are register logic: interrupts and host-memory effects come in as callbacks
    (`irq`, `set_irq`, `flush_page`) that minivmm.platform wires to KVM."""
    check(kvm_reach, under("minivmm/devices/"), {},
          "devices must take callbacks from the platform, not import minivmm.kvm or use .fd")


def test_batch_mode_drives_the_guest_through_the_harness() -> None:
    """The batch runner works on guest memory, the snapshot and `Harness.run_prepared`; the
    C cycle and the run loop are the harness's."""
    check(kvm_reach, ["minivmm/fuzz/batch.py"], {},
          "minivmm.fuzz.batch must reach the guest through the Harness, not minivmm.kvm or .fd")


# --- rule: only the entry modules enter KVM ----------------------------------------------
ENTRY_MODULES = {"minivmm/kvm.py", "minivmm/fastpath.py", "minivmm/vcpu.py", "minivmm/runloop.py"}
ENTRY_METHODS = {"run", "run_once", "enter"}          # Vcpu methods that issue KVM_RUN
RAW_ENTRY_NAMES = {"KVM_RUN", "run_packed", "run_packed_for"}


def vcpu_names(tree: ast.Module) -> set[str]:
    """Names the module binds to a vCPU: parameters annotated `Vcpu`, names assigned from a
    vCPU expression and loop variables over vCPU lists (module-wide, an over-approximation)."""
    names: set[str] = set()
    for _ in range(2):                          # a name bound from a name found in the first pass
        for node in walk(tree):
            if isinstance(node, ast.arg) and node.annotation is not None \
                    and "Vcpu" in source(node.annotation):
                names.add(node.arg)
            elif isinstance(node, ast.Assign) and is_vcpu(node.value, names):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name) \
                    and is_vcpu(node.iter, names):
                names.add(node.target.id)
    return names


def is_vcpu(node: ast.AST, names: set[str]) -> bool:
    """Whether an expression denotes a vCPU (or a list of them): `vcpu`, `x.vcpu`,
    `m.vcpus[i]`, `Vcpu(...)`, or a name in `names`."""
    if isinstance(node, ast.Name):
        return "vcpu" in node.id.lower() or node.id in names
    if isinstance(node, ast.Attribute):
        return "vcpu" in node.attr.lower()
    if isinstance(node, ast.Subscript):
        return is_vcpu(node.value, names)
    if isinstance(node, ast.Call):
        return isinstance(node.func, (ast.Name, ast.Attribute)) and source(node.func).endswith("Vcpu")
    return False


def kvm_entries(path: str, tree: ast.Module) -> list[Finding]:
    """The name or string "KVM_RUN", the fast path's raw entry (`run_packed`, `run_packed_for`,
    however reached) and `run`/`run_once`/`enter` taken from a vCPU (called or bound).
    Prose that mentions KVM_RUN in a docstring or message is not a finding."""
    out = []
    vcpus = vcpu_names(tree)
    for node in walk(tree):
        if isinstance(node, ast.Name) and node.id in RAW_ENTRY_NAMES:
            out.append(found(path, node, node.id))
        elif isinstance(node, ast.alias) and node.name in RAW_ENTRY_NAMES:
            out.append(Finding(path, node.lineno, node.name, f"import {node.name}"))
        elif isinstance(node, ast.Attribute) and node.attr in RAW_ENTRY_NAMES:
            out.append(found(path, node, node.attr))
        elif isinstance(node, ast.Attribute) and node.attr in ENTRY_METHODS and is_vcpu(node.value, vcpus):
            out.append(found(path, node, f"vcpu.{node.attr}"))
        elif isinstance(node, ast.Constant) and node.value == "KVM_RUN":
            out.append(found(path, node, '"KVM_RUN"'))
    return out


KVM_ENTRIES_ALLOWED = {
}


def test_only_the_entry_modules_enter_kvm() -> None:
    check(kvm_entries, [p for p in modules() if p not in ENTRY_MODULES], KVM_ENTRIES_ALLOWED,
          "KVM_RUN and vCPU entries belong to kvm.py, fastpath.py, vcpu.py and runloop.py")


# --- rule: core components do not take the Machine ----------------------------------------
CORE_COMPONENTS = ("minivmm/vm.py", "minivmm/runloop.py", "minivmm/vmcs.py", "minivmm/translate.py",
                   "minivmm/hooks.py", "minivmm/memory.py", "minivmm/kvm.py",
                   "minivmm/ept/", "minivmm/devices/", "minivmm/handlers/", "minivmm/hwbreakpoints.py")


def names_machine(name: str, annotation: ast.AST | None) -> bool:
    """A parameter named `machine`, or annotated with a type called Machine / ...Machine."""
    if name == "machine":
        return True
    if annotation is None:
        return False
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval")
        except SyntaxError:
            return False
    return any((isinstance(n, ast.Name) and n.id.endswith("Machine"))
               or (isinstance(n, ast.Attribute) and n.attr.endswith("Machine")) for n in walk(annotation))


def is_dataclass(cls: ast.ClassDef) -> bool:
    return any("dataclass" in source(d) for d in cls.decorator_list)


def init_parameters(cls: ast.ClassDef) -> Iterator[tuple[ast.AST, str, ast.AST | None]]:
    """(node, name, annotation) of each `__init__` parameter, written or generated by @dataclass."""
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            a = item.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    yield arg, arg.arg, arg.annotation
        elif is_dataclass(cls) and isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            if "ClassVar" in source(item.annotation) or "init=False" in source(item.value or ast.Constant(0)):
                continue
            yield item, item.target.id, item.annotation


def machine_parameters(path: str, tree: ast.Module) -> list[Finding]:
    out = []
    for cls in walk(tree):
        if isinstance(cls, ast.ClassDef):
            for node, name, annotation in init_parameters(cls):
                if names_machine(name, annotation):
                    out.append(Finding(path, node.lineno, f"{cls.name}.__init__({name})",
                                       f"class {cls.name}: __init__ takes {name}"
                                       + (f": {source(annotation)}" if annotation is not None else "")))
    return out


MACHINE_PARAMETERS_ALLOWED = {
}


def test_core_components_do_not_take_the_machine() -> None:
    check(machine_parameters, under(*CORE_COMPONENTS), MACHINE_PARAMETERS_ALLOWED,
          "core components are built from the Vm / VcpuContext, not from the Machine facade")


# --- rule: no module reads another module's private attributes ---------------------------
ACCESSORS = {"getattr", "setattr", "hasattr", "delattr"}


def is_private(name: str) -> bool:
    """`_x` and `__x`; not dunders (`__x__`) nor sunders (`_x_`, ctypes' and enum's protocol)."""
    return name.startswith("_") and not name.endswith("_")


def private_definitions(tree: ast.Module) -> set[str]:
    """Private names the module defines: `self._x`/`cls._x` assigned, functions, classes and
    names bound (module globals, class attributes and dataclass fields, locals)."""
    defined = set()
    for node in walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            defined.add(node.attr)
    return {name for name in defined if is_private(name)}


def external_modules(tree: ast.Module) -> set[str]:
    """Names bound by absolute imports from outside minivmm (`os`, `argparse`, ...): their
    private names (`os._exit`) are the standard library's business, not a layer question."""
    names = set()
    for node in walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in node.names
                         if not a.name.startswith("minivmm"))
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("minivmm"):
            names.update(a.asname or a.name for a in node.names)
    return names


def private_reads(path: str, tree: ast.Module) -> list[Finding]:
    """`x._name` (read, written or deleted; also getattr/setattr/hasattr/delattr with a
    constant name) where x is not self/cls, and the module does not define `_name`."""
    defined = private_definitions(tree)
    external = external_modules(tree)
    out = []
    for node in walk(tree):
        receiver = name = None
        if isinstance(node, ast.Attribute):
            receiver, name = node.value, node.attr
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ACCESSORS \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str):
            receiver, name = node.args[0], node.args[1].value
        if name is None or not is_private(name) or name in defined:
            continue
        if isinstance(receiver, ast.Name) and (receiver.id in ("self", "cls") or receiver.id in external):
            continue
        out.append(found(path, node, name))
    return out


PRIVATE_READS_ALLOWED = {
}


def test_no_module_reads_another_modules_private_attributes() -> None:
    check(private_reads, modules(), PRIVATE_READS_ALLOWED,
          "a module uses another module's private attribute; add or use a public API")


# --- rule: the translation is pure --------------------------------------------------------
TRANSLATION_MUST_NOT_IMPORT = {"minivmm.machine", "minivmm.runloop", "minivmm.vm", "fcntl"}
IOCTL_CLASSES = {"Kvm", "VmFd", "VcpuFd"}             # minivmm.kvm's ioctl-issuing objects


def impurities(path: str, tree: ast.Module) -> list[Finding]:
    """Imports of the machine, the run loop, the VM or fcntl; the ioctl objects of
    minivmm.kvm imported or reached (`.fd`); any `ioctl` named."""
    out = []
    for node in walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in imported_modules(path, node):
                if name in TRANSLATION_MUST_NOT_IMPORT:
                    out.append(found(path, node, f"import {name}"))
                elif name.startswith("minivmm.kvm.") and name.rsplit(".", 1)[1] in IOCTL_CLASSES:
                    out.append(found(path, node, f"import {name}"))
        elif isinstance(node, ast.Attribute) and node.attr in ("fd", "ioctl"):
            out.append(found(path, node, f".{node.attr}"))
        elif isinstance(node, ast.Name) and node.id == "ioctl":
            out.append(found(path, node, "ioctl"))
    return out


def test_translation_imports_no_machine_and_issues_no_ioctl() -> None:
    check(impurities, ["minivmm/translate.py"], {},
          "translate.py must stay pure (a CpuView in, ExitInfo and continuations out)")


# --- rule: names loaded on first use go through minivmm.lazy --------------------------------
def hand_made_lazy_names(path: str, tree: ast.Module) -> list[Finding]:
    """A module-level `__getattr__` function that imports (the job of `minivmm.lazy.lazy_names`)."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            if any(isinstance(inner, (ast.Import, ast.ImportFrom)) or
                   (isinstance(inner, ast.Attribute) and inner.attr == "import_module") or
                   (isinstance(inner, ast.Name) and inner.id == "import_module") for inner in walk(node)):
                out.append(found(path, node, "def __getattr__ importing"))
    return out


def test_module_attributes_loaded_on_first_use_go_through_lazy_names() -> None:
    check(hand_made_lazy_names, [p for p in modules() if p != "minivmm/lazy.py"], {},
          "a module imports in its own __getattr__; use minivmm.lazy.lazy_names")


# --- the rules themselves find the shapes they forbid --------------------------------------
def findings_in(rule: Rule, path: str, code: str) -> set[str]:
    return {f.what for f in rule(path, ast.parse(code))}


@pytest.mark.parametrize("rule, path, code, expected", [
    (kvm_reach, "minivmm/handlers/x.py", "from ..kvm import KvmError", {"import minivmm.kvm"}),
    (kvm_reach, "minivmm/handlers/x.py", "from .. import kvm", {"import minivmm.kvm"}),
    (kvm_reach, "minivmm/config/rules.py", "import minivmm.kvm as k", {"import minivmm.kvm"}),
    (kvm_reach, "minivmm/handlers/x.py", "def h(vcpu, info):\n    vcpu.fd.io_data(info.detail)", {".fd"}),
    (kvm_reach, "minivmm/handlers/x.py", "from ..kvmtools import x\nfrom ..exits import Vector", set()),
    (kvm_entries, "minivmm/x.py", "def f(vcpu):\n    vcpu.run_once()", {"vcpu.run_once"}),
    (kvm_entries, "minivmm/x.py", "def f(m):\n    go = m.vcpu.enter\n    go()", {"vcpu.enter"}),
    (kvm_entries, "minivmm/x.py", "def f(m):\n    m.vcpus[1].run(1.0)", {"vcpu.run"}),
    (kvm_entries, "minivmm/x.py", "def f(m):\n    ap = m.vcpus[1]\n    ap.run_once()", {"vcpu.run_once"}),
    (kvm_entries, "minivmm/x.py", "def f(m):\n    for cpu in m.vcpus:\n        cpu.enter()", {"vcpu.enter"}),
    (kvm_entries, "minivmm/x.py", "def f(cpu: 'Vcpu'):\n    cpu.run_once()", {"vcpu.run_once"}),
    (kvm_entries, "minivmm/x.py", "from .fastpath import run_packed_for", {"run_packed_for"}),
    (kvm_entries, "minivmm/x.py", "fcntl.ioctl(fd, Ioctl.KVM_RUN, 0)", {"KVM_RUN"}),
    (kvm_entries, "minivmm/x.py", 'raise KvmError("KVM_RUN", 4)', {'"KVM_RUN"'}),
    (kvm_entries, "minivmm/x.py", '"""Waits in KVM_RUN."""\nm.run()\nbridge.run_once()\nio_loop.enter()',
     set()),
    (machine_parameters, "minivmm/devices/x.py", "class D:\n    def __init__(self, machine): ...",
     {"D.__init__(machine)"}),
    (machine_parameters, "minivmm/devices/x.py", "class D:\n    def __init__(self, m: 'Machine'): ...",
     {"D.__init__(m)"}),
    (machine_parameters, "minivmm/devices/x.py",
     "@dataclass\nclass D:\n    owner: ConfiguredMachine\n    n: int = 0", {"D.__init__(owner)"}),
    (machine_parameters, "minivmm/devices/x.py", "class D:\n    def attach(self, machine): ...", set()),
    (private_reads, "minivmm/x.py", "def f(vcpu):\n    vcpu._dirty |= 1", {"_dirty"}),
    (private_reads, "minivmm/x.py", "def f(m):\n    return m.vcpu._regs", {"_regs"}),
    (private_reads, "minivmm/x.py", "def f(s):\n    return getattr(s, '_received', None)", {"_received"}),
    (private_reads, "minivmm/x.py", "def f(m):\n    m._flag = True", {"_flag"}),
    (private_reads, "minivmm/x.py",
     "class A:\n    def __init__(self):\n        self._x = 1\n    def same(self, other):\n        return other._x",
     set()),
    (private_reads, "minivmm/x.py", "import os\nos._exit(0)\nclass E:\n    _value_ = 1\n    __slots__ = ()",
     set()),
    (impurities, "minivmm/translate.py", "from .machine import Machine", {"import minivmm.machine"}),
    (impurities, "minivmm/translate.py", "from . import runloop", {"import minivmm.runloop"}),
    (impurities, "minivmm/translate.py", "from .kvm import VcpuFd", {"import minivmm.kvm.VcpuFd"}),
    (impurities, "minivmm/translate.py", "import fcntl", {"import fcntl"}),
    (impurities, "minivmm/translate.py", "def t(cpu):\n    cpu.fd.get_regs()", {".fd"}),
    (hand_made_lazy_names, "minivmm/x.py", "def __getattr__(name):\n    from . import y\n    return y",
     {"def __getattr__ importing"}),
    (hand_made_lazy_names, "minivmm/x.py",
     "import importlib\ndef __getattr__(name):\n    return importlib.import_module(name)",
     {"def __getattr__ importing"}),
    (hand_made_lazy_names, "minivmm/x.py", "def __getattr__(name):\n    return _values[name]()", set()),
])
def test_rules_find_what_they_forbid(rule: Rule, path: str, code: str, expected: set[str]) -> None:
    assert findings_in(rule, path, code) == expected


# --- the public API the rules point to ------------------------------------------------------
MSR_KERNEL_GS_BASE = 0xC0000102


@pytest.mark.kvm
def test_vcpu_register_cache_written_in_place(make_machine) -> None:
    import ctypes
    vcpu = make_machine("long").vcpu
    ctypes.c_uint64.from_address(vcpu.gpr_address("rbx")).value = 0x1234
    from minivmm.vcpu import DIRTY_REGS
    vcpu.mark_dirty(DIRTY_REGS)
    assert vcpu.rbx == 0x1234
    vcpu.flush()
    assert vcpu.fd.get_regs().rbx == 0x1234
    assert vcpu.gpr_address("rip") - vcpu.regs_address == type(vcpu.regs).rip.offset
    with pytest.raises(ValueError, match="not one of"):
        vcpu.gpr_address("cr0")


@pytest.mark.kvm
def test_vcpu_load_state_writes_kvm_now(make_machine) -> None:
    vcpu = make_machine("long").vcpu
    regs, sregs = vcpu.regs, vcpu.sregs
    regs.rip, regs.rcx, sregs.cr8 = 0x5000, 77, 3
    vcpu.rdx = 9                                    # a pending change load_state drops
    vcpu.load_state(regs, sregs)
    vcpu.flush()
    assert (vcpu.fd.get_regs().rip, vcpu.fd.get_regs().rcx, vcpu.fd.get_regs().rdx) == (0x5000, 77, regs.rdx)
    assert vcpu.fd.get_sregs().cr8 == 3 and vcpu.rip == 0x5000


@pytest.mark.kvm
def test_vcpu_msrs_without_the_fd(make_machine) -> None:
    vcpu = make_machine("long").vcpu
    assert vcpu.write_msr(MSR_KERNEL_GS_BASE, 0xABCD_0000)
    assert vcpu.read_msr(MSR_KERNEL_GS_BASE) == 0xABCD_0000
    assert vcpu.read_msr(0xDEAD_BEEF) is None
    assert not vcpu.write_msr(0xDEAD_BEEF, 1)


def test_serial_receive_queue_can_be_saved_and_replaced() -> None:
    from minivmm.devices import Serial16550
    serial = Serial16550()
    serial.feed(b"ab")
    saved = serial.queued_input
    serial.feed(b"c")
    serial.replace_input(saved)
    assert (serial.queued_input, serial.pending_input) == (b"ab", 2)
    serial.replace_input(b"")
    assert serial.queued_input == b"" and not serial.interrupt_pending
