"""gdb's `monitor` commands against a real guest: VMCS fields, exit counts, the EPT walk, caps."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from gdb_harness import GDB, gdb_session
from minivmm import Machine

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")]

GUEST = Path(__file__).resolve().parent.parent / "guests" / "gdb" / "target.S"


def test_monitor_commands():
    with Machine(mode="long") as m:
        m.load_asm(GUEST)
        s = m.symbols
        run = gdb_session(m, [f"break *{s['finish']:#x}", "continue", "monitor help", "monitor vmcs",
                              "monitor exits", f"monitor ept {s['buf']:#x}", "monitor ept 0x40000000",
                              "monitor caps", "monitor bogus", "delete", "continue"])
        out = run.output
        assert re.search(rf"^VMCS_GUEST_RIP +{s['finish']:#x}$", out, re.M), out
        assert "VMCS_GUEST_CR3" in out and "VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS" in out
        assert "EXCEPTION_OR_NMI" in out                    # the breakpoint's #BP exit
        assert f"EPT walk of guest-physical {s['buf']:#x}" in out and "rights rwx" in out
        assert "not present" in out                          # 1 GiB: no RAM there
        assert "IA32_VMX_PROCBASED_CTLS" in out and "KVM API version 12" in out
        assert "unknown monitor command 'bogus'" in out
        assert run.result.exit_code == 7
