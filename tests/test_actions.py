"""Actions that carry their effects (Reply, Passthrough, AllowOnce, Emulate) and the one hook
registry (`m.hooks.add/remove`, `m.on/off`), on real guests."""
from __future__ import annotations

import pytest

from minivmm.actions import ALLOW_ONCE, EMULATE, PASSTHROUGH, RESUME, Reply, Stop
from minivmm.exits import ExitReason
from minivmm.machine import HandlerError

pytestmark = pytest.mark.kvm

IO, RDMSR, VMCALL = ExitReason.IO_INSTRUCTION, ExitReason.EXECUTE_RDMSR, ExitReason.EXECUTE_VMCALL
DATA = 0x180000


def test_reply_answers_an_in_and_each_item_of_a_rep_ins(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm(f"""
        xor %eax, %eax
        in $0x60, %al
        mov %rax, %rbx
        mov $0x61, %dx
        mov ${DATA:#x}, %rdi
        mov $4, %ecx
        rep insb
        EXIT 0
    """)
    answers = {1: Reply(0x42), 4: Reply(b"abcd")}
    m.on(IO, lambda vcpu, info: answers[info.count] if info.is_in else None, port=range(0x60, 0x62))
    result = m.run(timeout=5)
    assert (result.reason, m.vcpu.rbx) == ("exit", 0x42), result
    assert m.memory.read(DATA, 4) == b"abcd"


def test_reply_and_passthrough_answer_rdmsr(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("""
        mov $0x174, %ecx          # IA32_SYSENTER_CS
        mov $0x23, %eax
        xor %edx, %edx
        wrmsr
        rdmsr                     # answered by the handler
        mov %rax, %rbx
        rdmsr                     # passed through: the real MSR
        mov %rax, %r12
        EXIT 0
    """)
    replies = iter([Reply(0x5555), PASSTHROUGH])
    m.on(RDMSR, lambda vcpu, info: next(replies), msr=0x174)
    result = m.run(timeout=5)
    assert result.reason == "exit", result
    assert (m.vcpu.rbx, m.vcpu.r12) == (0x5555, 0x23)


def test_reply_is_the_result_of_a_hypercall(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x77, %eax\n out %al, $0xf5\n mov %rax, %rbx\n"
               "mov $0x78, %eax\n out %al, $0xf5\n mov %rax, %rcx\n EXIT 0")
    m.on(VMCALL, lambda vcpu, info: Reply(vcpu.rax + 1), number=0x77)
    result = m.run(timeout=5)
    assert result.reason == "exit", result
    assert m.vcpu.rbx == 0x78 and m.vcpu.rcx == (1 << 64) - 1000      # 0x78: the default's -ENOSYS
    assert result.exits == {"EXECUTE_VMCALL": 2, "IO_INSTRUCTION": 1}


def test_reply_answers_a_read_of_unmapped_memory(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x40000000, %rsi\n mov (%rsi), %rbx\n EXIT 0")
    m.on(ExitReason.EPT_MISCONFIGURATION, lambda vcpu, info: Reply(0x1122334455667788))
    result = m.run(timeout=5)
    assert (result.reason, m.vcpu.rbx) == ("exit", 0x1122334455667788), result


def test_ept_violations_answered_by_reply_emulate_and_allow_once(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm(f"""
        mov ${DATA:#x}, %rsi
        mov (%rsi), %rbx          # Reply
        movq $0x11, 8(%rsi)       # Emulate, with the value the handler put in info.data
        mov 16(%rsi), %r12        # AllowOnce: the page's own bytes
        EXIT 0
    """)
    m.memory.write(DATA + 16, (0xC0FFEE).to_bytes(8, "little"))
    m.ept.protect(DATA, 0x1000, "---")
    seen = []

    def handler(vcpu, info):
        seen.append((info.guest_physical_address, info.ept.access))
        offset = info.guest_physical_address - DATA
        if offset == 0:
            return Reply(0x99)
        if offset == 8:
            info.data = 0x22
            return EMULATE
        return ALLOW_ONCE

    m.on(ExitReason.EPT_VIOLATION, handler, address=range(DATA, DATA + 0x1000))
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert (m.vcpu.rbx, m.vcpu.r12) == (0x99, 0xC0FFEE)
    assert m.memory.read(DATA + 8, 8) == (0x22).to_bytes(8, "little")
    assert [gpa - DATA for gpa, _ in seen] == [0, 8, 16]


def test_passthrough_of_an_io_exit_reaches_the_device(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x3f8, %dx\n mov $'A', %al\n out %al, %dx\n EXIT 0")
    seen = []
    m.on(IO, lambda vcpu, info: seen.append(info.data) or PASSTHROUGH, port=0x3F8)
    result = m.run(timeout=5)
    assert (result.reason, result.console, seen) == ("exit", "A", [0x41]), result


def test_reply_to_a_write_is_refused_by_name(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("out %al, $0x80\n EXIT 0")
    m.on(IO, lambda vcpu, info: Reply(1), port=0x80)
    with pytest.raises(TypeError, match="Reply.. does not answer a IO_INSTRUCTION exit .it is a write"):
        m.run(timeout=5)


# --- the hook registry ---------------------------------------------------------------------
def test_off_removes_a_decorated_function_and_a_handle(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("out %al, $0x80\n out %al, $0x80\n EXIT 0")
    calls = []

    @m.on(IO, port=0x80)
    def first(vcpu, info):
        calls.append("first")

    handle = m.on(IO, lambda vcpu, info: calls.append("second"), port=0x80)
    m.off(first)
    m.off(handle)
    with pytest.raises(ValueError, match="is not registered"):
        m.off(first)
    assert m.run(timeout=5).reason == "exit" and calls == []


def test_observers_and_pre_entry_hooks_come_and_go_by_handle(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("out %al, $0x80\n out %al, $0x81\n EXIT 0")
    seen, entries = [], []
    observer = m.hooks.add("observe", lambda vcpu, info: seen.append(info.port))
    pre_entry = m.hooks.add("pre_entry", lambda vcpu, info: entries.append(vcpu.index), vcpu=0)
    assert {h.kind.value for h in m.hooks.handles()} == {"observe", "pre_entry"}
    assert m.run(timeout=5).reason == "exit"
    assert seen == [0x80, 0x81, 0xF4] and entries == [0, 0, 0]
    m.hooks.remove(observer)
    m.hooks.remove(pre_entry)
    assert m.hooks.handles() == [] and m.context.observers == [] and m.context.pre_entry == []


@pytest.mark.parametrize("kind", ["observe", "pre_entry"])
def test_a_raising_hook_stops_the_run_as_one_handler_error(make_machine, kind) -> None:
    m = make_machine(mode="long")
    m.load_asm("out %al, $0x80\n EXIT 0")

    def boom(vcpu, info):
        raise ValueError("bad hook")

    m.hooks.add(kind, boom)
    what = "observer" if kind == "observe" else "pre-entry hook"
    with pytest.raises(HandlerError, match=f"{what} raised ValueError: bad hook") as caught:
        m.run(timeout=5)
    assert isinstance(caught.value.__cause__, ValueError)


def test_registry_refuses_what_a_kind_cannot_take(make_machine) -> None:
    m = make_machine(mode="long")
    with pytest.raises(TypeError, match="EXIT hook needs reason="):
        m.hooks.add("exit", lambda vcpu, info: None)
    with pytest.raises(TypeError, match="take no reason or filter"):
        m.hooks.add("observe", lambda vcpu, info: None, port=0x80)
    with pytest.raises(ValueError, match="no vCPU 3"):
        m.hooks.add("pre_entry", lambda vcpu, info: None, vcpu=3)
    with pytest.raises(ValueError):
        m.hooks.add("watchpoint", lambda vcpu, info: None)
    with pytest.raises(TypeError, match="needs address="):
        m.hooks.add("breakpoint", lambda vcpu, info: None)
    with pytest.raises(TypeError, match="needs gpa= and access="):
        m.hooks.add("ept_access", lambda vcpu, info: None, gpa=0x1000, access="q")
    stop = Stop("stopped", message="by a hook")
    m.load_asm("out %al, $0x80\n EXIT 0")
    m.hooks.add("exit", lambda vcpu, info: stop, reason=IO, port=0x80)
    assert m.run(timeout=5).message == "by a hook"
    assert RESUME.advance


def test_resuming_a_fault_executes_it_again_until_the_run_stops_saying_so(make_machine) -> None:
    """VT-x: a fault's RIP is the faulting instruction and its instruction length 0, so Resume
    executes it again; the same fault 1000 times in a row at one RIP stops the run."""
    m = make_machine(mode="user")
    m.load_asm("nop\n ud2_at: ud2\n EXIT 0")
    seen = []
    m.on(ExitReason.EXCEPTION_OR_NMI, lambda vcpu, info: seen.append(vcpu.rip) or RESUME, vector=6)
    result = m.run(timeout=20)
    assert result.reason == "error", result
    assert "the handler resumed a faulting instruction" in result.message
    assert f"at rip={m.symbol('ud2_at'):#x} repeated 1000 times in a row" in result.message
    assert seen == [m.symbol("ud2_at")] * 1000 and result.exits == {"EXCEPTION_OR_NMI": 1000}


def test_a_handler_that_moves_rip_past_a_fault_goes_on(make_machine) -> None:
    m = make_machine(mode="user")
    m.load_asm("ud2\n mov $5, %ebx\n EXIT 0")

    def skip(vcpu, info):
        vcpu.rip += 2
        return RESUME

    m.on(ExitReason.EXCEPTION_OR_NMI, skip, vector=6)
    result = m.run(timeout=5)
    assert (result.reason, m.vcpu.rbx) == ("exit", 5), result
