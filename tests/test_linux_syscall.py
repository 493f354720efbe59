"""The SYSCALL hook kind in user mode: a tiny guest's system calls reach before/after hooks."""
from __future__ import annotations

import pytest

from minivmm import Reply, Stop
from minivmm.exits import ExitReason
from minivmm.kvm import InternalErrorExit
from minivmm.modes import SYSCALL_EXIT_ADDR, Mode
from minivmm.exits import ExitInfo, Vector
from minivmm.translate import Translator

pytestmark = pytest.mark.kvm

GUEST = """
    mov $39, %eax          # getpid, answered by a before hook
    mov $11, %edi
    syscall
    mov %rax, %r12
    mov $1000, %eax        # no kernel: -ENOSYS
    mov $22, %edi
    mov $33, %esi
    mov $44, %edx
    mov $55, %r10d
    syscall
    mov %rax, %r13
    mov $60, %eax          # exit(7), ended by a hook
    mov $7, %edi
    syscall
    hlt
"""


def test_syscall_hooks_before_and_after(make_machine):
    m = make_machine(mode="user", memory="4M")
    m.load_asm(GUEST)
    before, after = [], []
    m.on("syscall", lambda vcpu, event: before.append((event.number, event.args[:4], event.rip)))
    m.on("syscall", lambda vcpu, event: Reply(4242), number=39)
    m.on("syscall", lambda vcpu, event: after.append((event.number, event.result)), when="after")
    m.on("syscall", lambda vcpu, event: Stop("exit", exit_code=event.args[0]), number=range(60, 61))
    result = m.run(timeout=5)
    assert (result.reason, result.exit_code) == ("exit", 7)
    assert m.vcpu.r12 == 4242
    assert m.vcpu.r13 == (1 << 64) - 38                      # -ENOSYS
    # the short-circuited getpid never reached the older before hook, the after hooks saw it
    assert [b[0] for b in before] == [1000]       # newest first: the Stop for 60 ran first
    assert before[0][1] == (22, 33, 44, 55)
    assert m.read_code(before[0][2], 2) == b"\x0f\x05"     # rip is the SYSCALL instruction
    assert after == [(39, 4242), (1000, -38)]
    assert result.exits == {"EXCEPTION_OR_NMI": 3}
    assert m.vcpu.segment("cs").selector == 0x2B           # back at CPL 3 whatever the host did


def test_hook_removed_with_off(make_machine):
    m = make_machine(mode="user", memory="4M")
    m.load_asm(GUEST)
    handle = m.on("syscall", lambda vcpu, event: Reply(1), number=39)
    m.on("syscall", lambda vcpu, event: Stop("exit", exit_code=event.args[0]), number=60)
    m.off(handle)
    assert m.run(timeout=5).exit_code == 7
    assert m.vcpu.r12 == (1 << 64) - 38


def test_without_hooks_syscall_is_an_invalid_opcode_exception(make_machine):
    m = make_machine(mode="user", memory="4M")
    m.load_asm(GUEST)
    result = m.run(timeout=5)
    assert result.reason == "exception"
    assert result.exception.vector == Vector.UD
    assert m.read_code(result.exception.rip, 2) == b"\x0f\x05"


def test_hook_arguments_are_checked(make_machine):
    m = make_machine(mode="user", memory="4M")
    with pytest.raises(ValueError, match="before' or 'after"):
        m.on("syscall", lambda vcpu, event: None, when="during")
    with pytest.raises(TypeError, match="number= and when="):
        m.on("syscall", lambda vcpu, event: None, port=3)


class _Cpu:
    rip, rsp, rax, cr2 = SYSCALL_EXIT_ADDR, 0x8000, 60, 0

    def code_bits(self):
        return 64

    def read_code(self, rip, length):
        return b""

    def read_physical(self, gpa, length):
        return bytes(length)


@pytest.mark.parametrize("cpl", [0, 3])
def test_translation_of_the_exit_does_not_depend_on_the_cpl(cpl):
    """Both hosts' SYSCALL (CPL kept at 3 here, CPL 0 on plain VT-x) end as an emulation
    failure at SYSCALL_EXIT_ADDR; the translation reports #UD at the instruction."""
    info = ExitInfo()
    exit = InternalErrorExit(1, ())
    translation = Translator(Mode.USER).translate(17, exit, _Cpu(), info)
    assert translation.syscall and translation.key == Vector.UD
    assert info.reason == ExitReason.EXCEPTION_OR_NMI and info.instruction_length == 2


def test_syscall_hooks_with_an_ept_and_a_raising_hook(make_machine):
    from minivmm.runloop import HandlerError
    m = make_machine(mode="user", memory="4M")
    m.load_asm(GUEST)
    m.ept                                                   # the EPT sees fetch faults first
    m.on("syscall", lambda vcpu, event: Reply(5), number=39)
    m.on("syscall", lambda vcpu, event: Stop("exit", exit_code=event.args[0]), number=60)
    assert m.run(timeout=5).exit_code == 7 and m.vcpu.r12 == 5

    other = make_machine(mode="user", memory="4M")
    other.load_asm(GUEST)
    other.on("syscall", lambda vcpu, event: 1 / 0)
    with pytest.raises(HandlerError, match="SYSCALL 39 hook raised ZeroDivisionError"):
        other.run(timeout=5)


def test_syscall_at_cpl0_returns_to_cpl3_as_on_plain_vtx(make_machine):
    """On a plain VT-x host SYSCALL enters CPL 0 (CS = STAR[47:32]) before it reaches the exit
    page; here the same happens when the code runs at CPL 0: the run loop reads the CPL and
    returns to user CS/SS like sysretq."""
    from minivmm.modes import SEL_CODE64, SEL_DATA
    from minivmm.vcpu import Segment
    code = """
        mov %cs, %r13d
        mov $39, %eax
        syscall
        mov %rax, %r12
        mov %cs, %ebx
        mov $60, %eax
        syscall
    """
    reference = make_machine(mode="user", memory="4M")
    reference.load_asm(code)
    reference.on("syscall", lambda vcpu, event: Stop("exit", exit_code=0), number=60)
    reference.on("syscall", lambda vcpu, event: Reply(77), number=39)
    assert reference.run(timeout=5).reason == "exit"
    user_cs = reference.vcpu.rbx                          # what CPL-3 code reads on this host

    m = make_machine(mode="user", memory="4M")
    m.load_asm(code)
    m.setup()
    m.vcpu.set_segment("cs", Segment(selector=SEL_CODE64, base=0, limit=0xFFFFFFFF, type=0xB, dpl=0, db=0, l=1))
    m.vcpu.set_segment("ss", Segment(selector=SEL_DATA, base=0, limit=0xFFFFFFFF, type=0x3, dpl=0))
    seen = []
    m.on("syscall", lambda vcpu, event: seen.append(vcpu.segment("cs").selector) or Reply(77), number=39)
    m.on("syscall", lambda vcpu, event: Stop("exit", exit_code=0), number=60)
    assert m.run(timeout=10).reason == "exit"
    assert m.vcpu.r13 == SEL_CODE64 and m.vcpu.r12 == 77
    assert seen == [0x2B] and m.vcpu.rbx == user_cs != SEL_CODE64
