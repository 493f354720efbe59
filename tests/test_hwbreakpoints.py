"""Debug-register (DR0-DR3) breakpoints against real guests: `m.hw_breakpoints` and gdb's
`hbreak` (Z1), in every mode where the host model says they work, refused where it does not."""
from __future__ import annotations

import pytest

from gdb_harness import GDB, gdb_session
from minivmm import Machine
from minivmm.actions import RunEnd, Stop
from minivmm.capabilities import host_model
from minivmm.hwbreakpoints import HardwareBreakpointError
from minivmm.kvm import Kvm

pytestmark = pytest.mark.kvm

MODES = ["real", "protected", "long", "user"]
LOOP = """
    mov $5, %ecx
    mov $0, %edx
loop_top:
    inc %edx
    dec %ecx
    jnz loop_top
    mov %edx, %eax
    EXIT_REG
"""


def supported(mode: str) -> bool:
    with Kvm() as kvm:
        return host_model(kvm).hw_breakpoints(mode)


def loop_guest(mode: str) -> Machine:
    m = Machine("2M", mode)
    m.load_asm(LOOP.replace("EXIT_REG", "EXIT 5"))
    return m


@pytest.mark.parametrize("mode", MODES)
def test_a_hardware_breakpoint_hits_each_iteration_and_leaves_memory_alone(mode):
    with loop_guest(mode) as m:
        target = m.symbols["loop_top"]
        before = m.memory.read(target, 4)
        if not supported(mode):
            with pytest.raises(HardwareBreakpointError, match=f"{mode} mode"):
                m.hw_breakpoints.add(target)
            return
        seen = []

        def hit(vcpu, info):
            seen.append((vcpu.rip, vcpu.rcx & 0xFFFF, info.qualification & 0xF, m.memory.read(target, 4)))

        bp = m.hw_breakpoints.add(target, hit)
        result = m.run(timeout=10)
        assert result.exit_code == 5, result
        assert [(rip, rcx) for rip, rcx, _, _ in seen] == [(target, n) for n in (5, 4, 3, 2, 1)]
        assert {q for _, _, q, _ in seen} == {1 << bp.slots[0]}        # DR6.Bn of its slot
        assert all(code == before for _, _, _, code in seen)           # no int3 planted
        assert bp.hits == 5
        m.hw_breakpoints.remove(bp)
        assert len(m.hw_breakpoints) == 0 and m.contexts[0].vmcs.hw_breakpoints == [None] * 4


@pytest.mark.parametrize("mode", ["long", "protected"])
def test_four_slots_then_a_clear_refusal_and_stop_fires_again(mode):
    if not supported(mode):
        pytest.skip(f"the host model refuses hardware breakpoints in {mode} mode")
    with loop_guest(mode) as m:
        target = m.symbols["loop_top"]
        others = [m.hw_breakpoints.add(target + 0x1000 * i) for i in range(1, 4)]
        bp = m.hw_breakpoints.add(target, lambda vcpu, info: Stop(RunEnd.STOPPED, message="hw"))
        with pytest.raises(HardwareBreakpointError, match="all 4 debug registers"):
            m.hw_breakpoints.add(target + 1)
        assert sorted([bp.slots[0], *(o.slots[0] for o in others)]) == [0, 1, 2, 3]
        first = m.run(timeout=10)
        assert first.message == "hw" and m.vcpu.rip == target
        second = m.run(timeout=10)                       # fires again, as a software breakpoint does
        assert second.message == "hw" and m.vcpu.rip == target and m.vcpu.rcx & 0xFFFF == 5
        m.hw_breakpoints.remove(bp)
        for other in others:
            m.hw_breakpoints.remove(other)
        assert m.run(timeout=10).exit_code == 5


def test_a_hardware_breakpoint_in_a_read_only_page():
    """Code in a page the EPT makes read-only (ROM-like) is not patched: the page is unchanged."""
    if not supported("long"):
        pytest.skip("the host model refuses hardware breakpoints in long mode")
    with loop_guest("long") as m:
        target = m.symbols["loop_top"]
        page = target & ~0xFFF
        m.ept.protect(page, 0x1000, "rx")
        before = m.memory.read(page, 0x1000)
        hits = []
        m.hw_breakpoints.add(target, lambda vcpu, info: hits.append(vcpu.rip))
        assert m.run(timeout=10).exit_code == 5
        assert hits == [target] * 5
        assert m.memory.read(page, 0x1000) == before


@pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")
@pytest.mark.parametrize("mode", ["long", "protected", "real", "user"])
def test_gdb_hbreak(mode):
    """gdb's hbreak stops at the instruction before it runs; stepi and continue go on; the guest
    memory under it is unchanged. Where the model refuses the mode, gdb reports the error reply."""
    from test_gdb_e2e import PC, machine_for
    with machine_for(mode) as m:
        s = m.symbols
        pc = PC[mode]
        code = m.memory.read(s["bp_add"], 4)
        run = gdb_session(m, [
            f"hbreak *{s['bp_add']:#x}",
            "continue",
            f'printf "at_bp=%x\\n", ${pc}',
            'printf "eax=%x\\n", $eax',
            "set $ebx = 0x100",
            "stepi",
            f'printf "stepped=%x\\n", ${pc}',
            "delete",
            "continue",
        ])
        out = run.output
        assert m.memory.read(s["bp_add"], 4) == code
        if supported(mode):
            assert "Hardware assisted breakpoint 1" in out, out
            assert run.value("at_bp") == s["bp_add"], out
            assert run.value("eax") == 0x1111, out
            assert run.value("stepped") == s["after_add"], out
            assert run.result is not None and run.result.exit_code == 7, out
        else:
            assert "Cannot insert hardware breakpoint 1" in out or \
                "Could not insert hardware breakpoint" in out, out
            assert "at_bp=" not in out or run.value("at_bp") != s["bp_add"], out


@pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")
def test_gdb_a_fifth_hbreak_gets_an_error_reply():
    """Four debug registers: one of five hbreaks is refused when gdb inserts them and the guest
    does not run; with one deleted the other four fit and the guest stops at the one it reaches."""
    if not supported("long"):
        pytest.skip("the host model refuses hardware breakpoints in long mode")
    from test_gdb_e2e import machine_for
    with machine_for("long") as m:
        s = m.symbols
        far = [s["_start"] + 0x10000 + 0x100 * i for i in range(4)]
        run = gdb_session(m, [
            f"hbreak *{s['bp_add']:#x}",
            *(f"hbreak *{address:#x}" for address in far),
            "continue",
            'printf "after_refusal=%x\\n", $rip',
            "delete 2",
            "continue",
            'printf "at_bp=%x\\n", $rip',
            "delete",
            "continue",
        ])
        out = run.output
        assert "Cannot insert hardware breakpoint" in out and "too many hardware breakpoints" in out, out
        assert run.value("after_refusal") == s["_start"], out         # the guest did not run
        assert run.value("at_bp") == s["bp_add"], out
        assert run.result is not None and run.result.exit_code == 7, out


def test_slots_are_per_vcpu():
    """A breakpoint for every vCPU takes a slot on each; one for vCPU 1 only takes the next slot
    there and none on vCPU 0; removing frees exactly its slots (in the VMCS model that
    KVM_SET_GUEST_DEBUG is realised from)."""
    with Machine("2M", "long", vcpus=2) as m:
        both = m.hw_breakpoints.add(0x100000)
        one = m.hw_breakpoints.add(0x100010, vcpu=1)
        assert both.slots == {0: 0, 1: 0} and one.slots == {1: 1}
        assert [ctx.vmcs.hw_breakpoints for ctx in m.contexts] == [
            [0x100000, None, None, None], [0x100000, 0x100010, None, None]]
        m.hw_breakpoints.remove(both)
        assert [ctx.vmcs.hw_breakpoints for ctx in m.contexts] == [[None] * 4, [None, 0x100010, None, None]]
        assert m.hw_breakpoints.breakpoints() == [one]
        with pytest.raises(HardwareBreakpointError, match="no vCPU 2"):
            m.hw_breakpoints.add(0x100020, vcpu=2)
