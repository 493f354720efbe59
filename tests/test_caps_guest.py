"""What the capability model promises about guest-visible behaviour: user-mode MTF hides its
RFLAGS.TF, an unmapped read answered through info.data reaches the guest, and a guest-caused
failure ends the run with a result (CLI status 125) instead of raising."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minivmm import ExitReason, RESUME, Reply
from minivmm.controls import ProcBasedControls
from minivmm.exits import Vector

pytestmark = pytest.mark.kvm

TF = 1 << 8
ROOT = Path(__file__).resolve().parent.parent


def test_user_mode_mtf_hides_tf_from_pushf_and_from_the_exception_frame(make_machine) -> None:
    m = make_machine(mode="user")
    m.load_asm("""
        pushf
        pop %rbx            # the guest's own flags: no TF
        ud2                 # the handler sees the guest's flags
        pushfw              # 16-bit form too
        pop %cx
        EXIT 0
    """)
    steps, at_ud = [], []

    def on_ud(vcpu, info):
        at_ud.append(vcpu.rflags)
        vcpu.rip += 2
        return RESUME

    m.on(ExitReason.EXCEPTION_OR_NMI, on_ud, vector=Vector.UD)
    m.on(ExitReason.MONITOR_TRAP_FLAG, lambda vcpu, info: steps.append(vcpu.rflags))
    m.vmcs.set_control(ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG)
    r = m.run(timeout=10)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    assert len(steps) >= 4, steps
    assert not m.vcpu.rbx & TF and not m.vcpu.rcx & TF, (hex(m.vcpu.rbx), hex(m.vcpu.rcx))
    assert m.vcpu.rbx & 0x2 and m.vcpu.rcx & 0x2          # the flags were really pushed
    assert len(at_ud) == 1 and not at_ud[0] & TF
    assert not any(flags & TF for flags in steps)          # handlers see the guest's flags too


def test_user_mode_mtf_turned_off_leaves_the_guest_without_tf(make_machine) -> None:
    m = make_machine(mode="user")
    m.load_asm("nop\n nop\n out %al, $0x99\n pushf\n pop %rbx\n EXIT 0")
    steps = []
    m.on(ExitReason.MONITOR_TRAP_FLAG, lambda vcpu, info: steps.append(vcpu.rip))

    def stop_stepping(vcpu, info):
        m.vmcs.set_control(ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG, False)
        return RESUME

    m.on(ExitReason.IO_INSTRUCTION, stop_stepping, port=0x99)
    m.vmcs.set_control(ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG)
    r = m.run(timeout=10)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    assert len(steps) == 2 and not m.vcpu.rbx & TF and not m.vcpu.rflags & TF


@pytest.mark.parametrize("answer", ["reply", "info.data"])
def test_an_unmapped_read_answered_by_a_handler_reaches_the_guest(make_machine, answer: str) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x40000000, %rdi\n mov (%rdi), %rbx\n EXIT 0")
    seen = []

    def handler(vcpu, info):
        seen.append(info.guest_physical_address)
        if answer == "reply":
            return Reply(0x1122334455667788)
        info.data = 0x1122334455667788
        return RESUME

    m.on(ExitReason.EPT_MISCONFIGURATION, handler)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    assert seen == [0x40000000] and m.vcpu.rbx == 0x1122334455667788


EMULATION_FAILURE = """version: 1
machine: {mode: long, timeout: 5}
images:
  - {type: asm, source: fault.S}
"""


def test_a_guest_fault_ends_the_run_with_status_125_and_a_json_result(tmp_path) -> None:
    config = tmp_path / "fault.yaml"
    config.write_text(EMULATION_FAILURE)
    (tmp_path / "fault.S").write_text(".include \"minivmm.inc\"\n.globl _start\n_start:\n"
                                      "    out %al, $0x80\n    xor %ecx, %ecx\n    xgetbv\n    EXIT 0\n")
    done = subprocess.run([sys.executable, "-m", "minivmm", "run", str(config), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    result = json.loads(done.stdout)
    if result["reason"] == "exit":               # a host that runs xgetbv at CPL 0 (not emulated)
        assert done.returncode == 0
        return
    assert done.returncode == 125, done.stderr
    assert result["reason"] == "error" and "xgetbv" in result["message"], result
    assert result["exits"] == {"IO_INSTRUCTION": 1} and "Traceback" not in done.stderr
    assert int(str(result["rip"]), 0) == 0x100004
