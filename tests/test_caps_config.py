"""`minivmm check` and `minivmm run` share one validation of the VMCS rules against the host's
capability model: every config in configs/ passes both, and each bad one fails both with the
same `file:line: key: why`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minivmm.capabilities import host_model
from minivmm.config import ConfigError, build_machine, check_config
from minivmm.config.validate import load_config
from minivmm.kvm import Kvm

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"
SOURCE = {"real": "hello_real.S", "protected": "hello_protected.S", "long": "hello_long.S",
          "user": "hello_user.S"}


def build_error(path: Path) -> str | None:
    try:
        machine = build_machine(load_config(path), capture_console=True)
    except ConfigError as exc:
        return str(exc)
    machine.close()
    return None


def check_error(path: Path) -> str | None:
    try:
        check_config(load_config(path))
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_check_and_run_agree_on_every_shipped_config(path: Path) -> None:
    assert check_error(path) is None
    assert build_error(path) is None


def bad_configs() -> list[tuple[str, str, str, str]]:
    """(name, mode, vmcs block, expected key and message part)."""
    cases = [
        ("ud_bitmap_long", "long", 'exception_bitmap: ["#UD"]',
         "vmcs.exception_bitmap[0]: exception bitmap: #UD (vector 6) cannot be intercepted in long mode"),
        ("ud_rule_long", "long", 'exceptions: [{vector: "#UD", action: count}]',
         "vmcs.exceptions[0]: exception bitmap: #UD (vector 6) cannot be intercepted in long mode"),
        ("gp_rule_protected", "protected", "exceptions: [{vector: 13, action: stop}]",
         "vmcs.exceptions[0]: exception bitmap: #GP (vector 13) cannot be intercepted in protected mode"),
        ("not_an_exception", "user", "exception_bitmap: [0x40]",
         "vmcs.exception_bitmap[0]: vector 0x40 is not an exception"),
        ("inject_in_user_mode", "user", 'exceptions: [{vector: "#UD", action: inject}]',
         "vmcs.exceptions[0]: 'inject' cannot work in user mode"),
        ("msr_rule_in_user_mode", "user", "msrs: [{msr: 0x10, action: fixed, value: 1}]",
         "vmcs.msrs[0]: an MSR rule cannot take effect in user mode"),
        ("rdtsc_exiting", "long", "controls: [CPU_BASED_RDTSC_EXITING]",
         "vmcs.controls[0]: this host cannot honour CPU_BASED_RDTSC_EXITING"),
        ("hlt_exiting_off", "long", "controls: {CPU_BASED_HLT_EXITING: false}",
         "vmcs.controls.CPU_BASED_HLT_EXITING: this host cannot honour CPU_BASED_HLT_EXITING"),
        ("ia32e_in_real_mode", "real", "controls: [VM_ENTRY_IA32E_MODE_GUEST]",
         "vmcs.controls[0]: VM_ENTRY_IA32E_MODE_GUEST is EFER.LMA of the guest"),
    ]
    with Kvm() as kvm:
        model = host_model(kvm)
    if not model.capabilities.tsc_offset:
        cases.append(("tsc_offsetting", "long", "controls: [CPU_BASED_USE_TSC_OFFSETTING]",
                      "vmcs.controls[0]: this host cannot honour CPU_BASED_USE_TSC_OFFSETTING"))
    if 3 not in model.vectors("real"):
        cases.append(("bp_in_real_mode", "real", 'exception_bitmap: ["#BP"]',
                      "vmcs.exception_bitmap[0]: exception bitmap: #BP (vector 3) cannot be intercepted"))
    return cases


def write_config(tmp_path: Path, name: str, mode: str, vmcs: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"version: 1\nmachine: {{mode: {mode}}}\n"
                    f"images:\n  - {{type: asm, source: {GUESTS / SOURCE[mode]}}}\n"
                    f"vmcs:\n  {vmcs}\n")
    return path


def test_check_and_run_refuse_the_same_bad_configs(tmp_path: Path) -> None:
    for name, mode, vmcs, expected in bad_configs():
        path = write_config(tmp_path, name, mode, vmcs)
        checked, built = check_error(path), build_error(path)
        assert checked is not None and checked == built, (name, checked, built)
        assert checked.startswith(f"{path}:6: ") and expected in checked, (name, checked)


def test_the_cli_check_and_run_print_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, "ud", "long", 'exceptions: [{vector: "#UD", action: count}]')
    lines = []
    for command in ("check", "run"):
        done = subprocess.run([sys.executable, "-m", "minivmm", command, str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
        lines.append(done.stderr)
    assert lines[0] == lines[1]
    assert f"{path}:6: vmcs.exceptions[0]: " in lines[0] and "user mode" in lines[0] and "#BP" in lines[0]


def test_check_and_run_agree_on_hlt_exiting_with_the_irqchip(tmp_path: Path) -> None:
    path = tmp_path / "irqchip.yaml"
    path.write_text(f"version: 1\nmachine: {{mode: long}}\nplatform: {{irqchip: true}}\n"
                    f"images:\n  - {{type: asm, source: {GUESTS / SOURCE['long']}}}\n"
                    "vmcs:\n  controls: [CPU_BASED_HLT_EXITING]\n")
    checked, built = check_error(path), build_error(path)
    assert checked is not None and checked == built
    assert f"{path}:7: vmcs.controls[0]: this host cannot honour CPU_BASED_HLT_EXITING" in checked
