"""The breakpoint table and the "breakpoint" / "ept_access" registry kinds, with real guests."""
from __future__ import annotations

import pytest

from minivmm.actions import RESUME, Stop
from minivmm.breakpoints import INT3, BreakpointError
from minivmm.ept import Perm
from minivmm.exits import ExitReason, Vector
from minivmm.fuzz.coverage import Coverage
from minivmm.snapshot import Snapshot

pytestmark = pytest.mark.kvm

DATA = 0x180000

# `hooked` is the start of a basic block (the loop's jump target) executed three times.
LOOP = """
.globl _start, hooked, done
_start:
    xor %ebx, %ebx
hooked:
    inc %ebx
    cmp $3, %ebx
    jne hooked
done:
    EXIT 0
"""


def loop_machine(make_machine, mode: str = "user"):
    m = make_machine(mode=mode, memory="4M")
    m.load_asm(LOOP)
    return m


def bp_handlers(m) -> int:
    return len([h for h in m.hooks.handles("exit") if h.registration.reason == ExitReason.EXCEPTION_OR_NMI])


# --- coverage and a visible execute hook on one address ---------------------------------
@pytest.mark.parametrize("coverage_first", [True, False])
def test_coverage_and_visible_hook_share_an_address(make_machine, coverage_first: bool) -> None:
    m = loop_machine(make_machine)
    hooked = m.symbol("hooked")
    original = m.memory.read_u8(hooked)
    fired: list[tuple[str, int]] = []
    snapshot = Snapshot.take(m)
    coverage = Coverage([(m.symbol("_start"), m.symbol("done"))],
                        on_new_block=lambda address: fired.append(("coverage", address)))

    def hook_execute():
        return m.ept.hook_execute(hooked, lambda event: fired.append(("hook", event.vcpu.rbx)), hidden=False)

    if coverage_first:
        coverage.install(m, snapshot)
        hook = hook_execute()
    else:
        hook = hook_execute()
        coverage.install(m, snapshot)
    assert hooked in coverage.blocks and m.memory.read_u8(hooked) == INT3
    assert bp_handlers(m) == 1                                  # one #BP handler for both
    result = m.run(timeout=10)
    assert result.reason == "exit" and m.vcpu.rbx == 3, result
    at_hooked = [f for f in fired if f != ("coverage", m.symbol("_start"))]
    first_pass = [("coverage", hooked), ("hook", 0)] if coverage_first else [("hook", 0), ("coverage", hooked)]
    assert at_hooked == first_pass + [("hook", 1), ("hook", 2)]   # the one-shot fired once
    assert coverage.new_blocks == [m.symbol("_start"), hooked]               # in hit order
    assert m.memory.read_u8(hooked) == INT3                       # the persistent owner keeps it
    assert snapshot.read(hooked, 1) == bytes([INT3])
    assert snapshot.read(m.symbol("_start"), 1) != bytes([INT3])  # a block only coverage had
    assert m.breakpoints.breakpoints(hooked)[0].one_shot is False
    m.ept.remove(hook)
    assert m.memory.read_u8(hooked) == original and snapshot.read(hooked, 1) == bytes([original])
    assert len(m.breakpoints) == 0 and bp_handlers(m) == 0
    coverage.uninstall()
    snapshot.close()


# --- "breakpoint" hooks of the registry -------------------------------------------------
@pytest.mark.parametrize("mode, cpl", [("long", 0), ("user", 3)])
def test_breakpoint_hook_fires_at_each_execution(make_machine, mode: str, cpl: int) -> None:
    m = loop_machine(make_machine, mode)
    hooked = m.symbol("hooked")
    original = m.memory.read_u8(hooked)
    seen = []
    handle = m.hooks.add("breakpoint", lambda vcpu, info: seen.append(
        (info.guest_physical_address, info.guest_linear_address, vcpu.rip, vcpu.rbx, vcpu.cpl)), address=hooked)
    once = []
    m.hooks.add("breakpoint", lambda vcpu, info: once.append(vcpu.rbx), address=m.symbol("done"), one_shot=True)
    assert m.memory.read_u8(hooked) == INT3
    result = m.run(timeout=10)
    assert result.reason == "exit" and result.exit_code == 0 and m.vcpu.rbx == 3, result
    assert seen == [(hooked, hooked, hooked, n, cpl) for n in range(3)]
    assert once == [3] and m.memory.read_u8(m.symbol("done")) != INT3   # one-shot: gone after it fired
    m.hooks.remove(handle)
    assert m.memory.read_u8(hooked) == original and hooked not in m.breakpoints
    assert bp_handlers(m) == 0


@pytest.mark.parametrize("mode", ["long", "user"])
def test_breakpoint_hook_can_stop_the_run(make_machine, mode: str) -> None:
    m = loop_machine(make_machine, mode)
    hooked = m.symbol("hooked")
    m.hooks.add("breakpoint", lambda vcpu, info: Stop("stopped", message="at the breakpoint")
                if vcpu.rbx == 1 else None, address=hooked)
    result = m.run(timeout=10)
    assert (result.reason, result.message, result.rip, m.vcpu.rbx) == ("stopped", "at the breakpoint", hooked, 1)


def test_breakpoint_outside_ram_is_refused(make_machine) -> None:
    m = loop_machine(make_machine)
    with pytest.raises(BreakpointError, match="not guest RAM"):
        m.hooks.add("breakpoint", lambda vcpu, info: None, address=0x4000_0000)


# --- the guest's own int3 -----------------------------------------------------------------
OWN_INT3 = """
.globl _start, own, after, hooked
_start:
    xor %ebx, %ebx
hooked:
    inc %ebx
own:
    int3
after:
    EXIT 0
"""


@pytest.mark.parametrize("mode", ["long", "user"])
def test_guest_int3_reaches_the_users_handler(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm(OWN_INT3)
    theirs = []

    def on_bp(vcpu, info):
        theirs.append(vcpu.rip)
        return RESUME                                   # past the int3

    m.on(ExitReason.EXCEPTION_OR_NMI, on_bp, vector=int(Vector.BP))
    ours = []
    m.hooks.add("breakpoint", lambda vcpu, info: ours.append(vcpu.rip), address=m.symbol("hooked"))
    result = m.run(timeout=10)
    assert result.reason == "exit" and result.exit_code == 0, result
    assert ours == [m.symbol("hooked")] and theirs == [m.symbol("own")]


@pytest.mark.parametrize("mode", ["long", "user"])
def test_guest_int3_without_handler_stops_as_exception(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm(OWN_INT3)
    ours = []
    m.hooks.add("breakpoint", lambda vcpu, info: ours.append(vcpu.rip), address=m.symbol("hooked"))
    result = m.run(timeout=10)
    assert result.reason == "exception" and result.exception.vector == Vector.BP, result
    assert result.rip == m.symbol("own") and ours == [m.symbol("hooked")]


# --- "ept_access" hooks of the registry -----------------------------------------------------
ACCESS_GUEST = f"""
.globl _start, target, second
_start:
    mov ${DATA:#x}, %rdi
    movq $0x55, (%rdi)
    movq (%rdi), %rbx
target:
    inc %rcx
second:
    inc %rcx
    EXIT 0
"""


def test_ept_access_hooks_read_write_execute(make_machine) -> None:
    m = make_machine(mode="user", memory="4M")
    m.load_asm(ACCESS_GUEST)
    target = m.symbol("target")
    seen = []

    def record(vcpu, info):
        q = info.ept
        seen.append((info.reason, (q.read, q.write, q.execute), info.guest_physical_address, info.data,
                     info.event.size, info.guest_linear_address))

    handles = [m.hooks.add("ept_access", record, gpa=range(DATA, DATA + 8), access="w"),
               m.hooks.add("ept_access", record, gpa=range(DATA, DATA + 8), access="r"),
               m.hooks.add("ept_access", record, gpa=target, access="x")]
    result = m.run(timeout=10)
    assert result.reason == "exit" and m.vcpu.rbx == 0x55 and m.vcpu.rcx == 2, result
    violation = ExitReason.EPT_VIOLATION
    assert seen == [(violation, (False, True, False), DATA, 0x55, 8, 0),
                    (violation, (True, False, False), DATA, 0x55, 8, 0),
                    (violation, (False, False, True), target, 0, 1, target)]
    for handle in handles:
        m.hooks.remove(handle)
    assert m.ept.hooks == [] and m.ept.perms(DATA) == Perm.RWX and m.ept.perms(target) == Perm.RWX


def test_ept_access_execute_range_reports_each_instruction(make_machine) -> None:
    m = make_machine(mode="user", memory="4M")
    m.load_asm(ACCESS_GUEST)
    target, second = m.symbol("target"), m.symbol("second")
    fetched = []
    m.hooks.add("ept_access", lambda vcpu, info: fetched.append(info.guest_physical_address),
                gpa=range(target, second + 1), access="x")
    result = m.run(timeout=10)
    assert result.reason == "exit" and m.vcpu.rcx == 2, result
    assert fetched == [target, second]
