"""Exit dispatch (issue 3): handlers for CPUID, RDMSR/WRMSR, I/O, MTF, HLT, triple fault,
hypercalls and exceptions on real guests; actions, handler errors and exit statistics."""
from __future__ import annotations

import pytest

from minivmm.actions import PASSTHROUGH, RESUME, RETRY, Inject, Reply, Stop
from minivmm.controls import ProcBasedControls
from minivmm.exits import ExitReason, Vector
from minivmm.machine import HandlerError
from minivmm.vmcs_fields import VmcsField as F

pytestmark = pytest.mark.kvm

MASK64 = (1 << 64) - 1


def run_catching(m, exc_type=HandlerError, **kwargs):
    """m.run(), returning (result, None) or (None, (message, cause type)) for `exc_type`.

    Only plain data leaves the except block: an exception's traceback holds ctypes
    views of kvm_run, which would make Machine.close() fail (see the xfail below).
    """
    try:
        return m.run(**kwargs), None
    except exc_type as exc:
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else None
        return None, (str(exc), cause)


# -- CPUID ---------------------------------------------------------------------------------
CPUID_GUEST = """
    mov %r8d, %eax
    mov %r9d, %ecx
    cpuid
    hlt
"""


def _cpuid(m, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    m.vcpu.r8, m.vcpu.r9 = leaf, subleaf
    m.vcpu.rip = m.entry
    r = m.run(timeout=5)
    assert r.reason == "hlt", r
    v = m.vcpu
    return v.rax, v.rbx, v.rcx, v.rdx


def test_cpuid_overrides_reach_the_guest(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm(CPUID_GUEST)
    m.cpuid.set(0x4000_0000, eax=0x4000_0001, ebx=0x696E696D, ecx=0x6D6D7676, edx=0x00000000)
    m.cpuid.set(0x4000_0100, 0, eax=0x11)
    m.cpuid.set(0x4000_0100, 1, eax=0x22)
    m.cpuid.set(0, ebx=0x41414141)
    assert _cpuid(m, 0x4000_0000) == (0x4000_0001, 0x696E696D, 0x6D6D7676, 0)
    assert _cpuid(m, 0x4000_0100, 1)[0] == 0x22
    assert _cpuid(m, 0x4000_0100, 0)[0] == 0x11
    eax, ebx, ecx, edx = _cpuid(m, 0)
    assert ebx == 0x41414141 and eax >= 1 and (ecx, edx) != (0, 0)        # the rest stays the host's


def test_subleaf_override_of_a_non_indexed_supported_leaf(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm(CPUID_GUEST)
    m.cpuid.set(0x4000_0001, 1, eax=0x22)
    assert m.cpuid.lookup(0x4000_0001, 1).eax == 0x22
    assert _cpuid(m, 0x4000_0001, 1)[0] == 0x22


def test_cpuid_handler_modifies_leaves(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm(CPUID_GUEST)
    consulted = []

    def hide_hypervisor_bit(vcpu, info):
        assert info.reason == ExitReason.EXECUTE_CPUID
        leaf = info.raw_kvm_exit
        consulted.append((leaf.leaf, leaf.subleaf))
        return Reply((leaf.eax, 0xB0B0, leaf.ecx & ~(1 << 31), leaf.edx))

    m.on(ExitReason.EXECUTE_CPUID, hide_hypervisor_bit, leaf=1)
    m.on(ExitReason.EXECUTE_CPUID, lambda vcpu, info: Reply((*(getattr(info.raw_kvm_exit, r) for r in ("eax", "ebx", "ecx")), 0x1234)),
         leaf=0x8000_0000)
    eax, ebx, ecx, edx = _cpuid(m, 1)
    assert ebx == 0xB0B0 and not ecx & (1 << 31)
    assert eax != 0                                   # family/model untouched
    assert {leaf for leaf, _ in consulted} == {1}     # the filter kept other leaves away
    assert _cpuid(m, 0x8000_0000)[3] == 0x1234


# -- RDMSR / WRMSR -------------------------------------------------------------------------
# Long mode at CPL 0 with a guest-built IDT: a #GP handler counts faults in R15, keeps
# the error code in R11 and skips the 2-byte RDMSR/WRMSR. R12 = MSR, R13 = value, R14 = write?
MSR_GUEST = r"""
    lea idt(%rip), %rdi
    lea gp_handler(%rip), %rax
    mov %ax, 13*16(%rdi)
    movw $0x08, 13*16+2(%rdi)
    movw $0x8E00, 13*16+4(%rdi)
    shr $16, %rax
    mov %ax, 13*16+6(%rdi)
    shr $16, %rax
    mov %eax, 13*16+8(%rdi)
    lidt idtr(%rip)
    xor %r15d, %r15d
    mov $-1, %r11
    mov %r12d, %ecx
    mov %r13, %rax
    mov %r13, %rdx
    shr $32, %rdx
    test %r14, %r14
    jnz 1f
    xor %eax, %eax
    xor %edx, %edx
    rdmsr
    jmp 2f
1:  wrmsr
2:  mov %rax, %rbx
    mov %rdx, %rsi
    EXIT 0
gp_handler:
    pop %r11
    addq $2, (%rsp)
    inc %r15
    iretq
.balign 16
idtr: .word 256*16-1
      .quad idt
.balign 16
idt: .fill 256*16, 1, 0
"""


def _msr_machine(make_machine, msr: int, write: bool, value: int = 0):
    m = make_machine(mode="long")
    m.load_asm(MSR_GUEST)
    m.vcpu.r12, m.vcpu.r13, m.vcpu.r14 = msr, value, int(write)
    return m


def _msr_outcome(m) -> tuple[int, int, int]:
    """(#GP count, error code, EDX:EAX after the instruction)."""
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    v = m.vcpu
    return v.r15, v.r11 & 0xFFFFFFFF, (v.rsi & 0xFFFFFFFF) << 32 | v.rbx & 0xFFFFFFFF


def test_rdmsr_reaches_the_handler_and_its_value_the_guest(make_machine) -> None:
    m = _msr_machine(make_machine, 0x174, write=False)
    seen = []

    def rdmsr(vcpu, info):
        seen.append((info.reason, info.msr, vcpu.rcx & 0xFFFFFFFF))
        info.data = 0x1122_3344_5566_7788
        return RESUME

    m.on(ExitReason.EXECUTE_RDMSR, rdmsr, msr=0x174)
    assert m.vmcs.msr_bitmap.is_intercepted(0x174, write=False)
    assert not m.vmcs.msr_bitmap.is_intercepted(0x174, write=True)
    gp, _, value = _msr_outcome(m)
    assert (gp, value) == (0, 0x1122_3344_5566_7788)
    assert seen == [(ExitReason.EXECUTE_RDMSR, 0x174, 0x174)]
    assert m.last_result.exits["EXECUTE_RDMSR"] == 1


def test_wrmsr_reaches_the_handler_with_the_value(make_machine) -> None:
    m = _msr_machine(make_machine, 0x174, write=True, value=0xAB_0000_0010)
    seen = []
    m.on(ExitReason.EXECUTE_WRMSR, lambda vcpu, info: seen.append((info.msr, info.data)), msr=0x174)
    gp, _, _ = _msr_outcome(m)
    assert gp == 0
    assert seen == [(0x174, 0xAB_0000_0010)]
    # The observing handler returned None: the default handler gave the write to KVM.
    assert m.vmcs.read(F.VMCS_GUEST_IA32_SYSENTER_CS) == 0xAB_0000_0010


@pytest.mark.parametrize("write", [False, True], ids=["rdmsr", "wrmsr"])
def test_denied_msr_access_raises_gp_in_the_guest(make_machine, write: bool) -> None:
    m = _msr_machine(make_machine, 0x174, write=write, value=0x99)
    reason = ExitReason.EXECUTE_WRMSR if write else ExitReason.EXECUTE_RDMSR
    calls = []
    m.on(reason, lambda vcpu, info: calls.append(info.msr) or Inject(Vector.GP, 0), msr=0x174)
    gp, error_code, _ = _msr_outcome(m)
    assert (gp, error_code) == (1, 0)
    assert calls == [0x174]
    if write:
        assert m.vmcs.read(F.VMCS_GUEST_IA32_SYSENTER_CS) != 0x99      # the write did not happen


def test_msr_without_intercept_does_not_exit(make_machine) -> None:
    m = _msr_machine(make_machine, 0x174, write=True, value=0x42)
    m.on(ExitReason.EXECUTE_WRMSR, lambda vcpu, info: Inject(Vector.GP, 0), msr=0x175)   # another MSR
    gp, _, _ = _msr_outcome(m)
    assert gp == 0
    assert "EXECUTE_WRMSR" not in m.last_result.exits
    assert m.vmcs.read(F.VMCS_GUEST_IA32_SYSENTER_CS) == 0x42


def test_intercepted_msr_without_handler_goes_to_kvm(make_machine) -> None:
    m = _msr_machine(make_machine, 0x174, write=True, value=0x77)
    m.vmcs.msr_bitmap.intercept(0x174)
    gp, _, _ = _msr_outcome(m)
    assert gp == 0 and m.last_result.exits["EXECUTE_WRMSR"] == 1
    assert m.vmcs.read(F.VMCS_GUEST_IA32_SYSENTER_CS) == 0x77


@pytest.mark.parametrize("intercept", [False, True])
def test_unknown_msr_is_a_gp_unless_a_handler_serves_it(make_machine, intercept: bool) -> None:
    m = _msr_machine(make_machine, 0x1FF0, write=False)
    if intercept:
        m.vmcs.msr_bitmap.intercept(0x1FF0)
    gp, error_code, _ = _msr_outcome(m)
    assert (gp, error_code) == (1, 0)


def test_made_up_msr_served_by_handlers(make_machine) -> None:
    store = {}

    def write(vcpu, info):
        store[info.msr] = info.data
        return RESUME

    def read(vcpu, info):
        info.data = store.get(info.msr, 0) + 1
        return RESUME

    m = _msr_machine(make_machine, 0x1FF0, write=True, value=0xFEED_0000_BEEF)
    m.on(ExitReason.EXECUTE_WRMSR, write, msr=0x1FF0)
    m.on(ExitReason.EXECUTE_RDMSR, read, msr=range(0x1FF0, 0x1FF8))
    assert _msr_outcome(m)[0] == 0
    assert store == {0x1FF0: 0xFEED_0000_BEEF}
    m.vcpu.r14, m.vcpu.rip = 0, m.entry
    gp, _, value = _msr_outcome(m)
    assert (gp, value) == (0, 0xFEED_0000_BEF0)


# -- I/O -----------------------------------------------------------------------------------
def _io_log(m, port: int = 0x80, reply: int = 0):
    log = []

    def handler(vcpu, info):
        q = info.io
        log.append((q.size, q.direction_in, q.string, q.rep, q.port, info.data, info.qualification,
                    info.raw_kvm_exit.count))
        if q.direction_in:
            info.data = reply
        return RESUME

    m.on(ExitReason.IO_INSTRUCTION, handler, port=port)
    return log


@pytest.mark.parametrize("mode", ["real", "protected", "long", "user"])
def test_port_io_sizes_and_directions(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm("""
        mov $0x1234, %dx
        mov $0x87654321, %eax
        outb %al, %dx
        outw %ax, %dx
        outl %eax, %dx
        inb %dx, %al
        inw %dx, %ax
        inl %dx, %eax
        EXIT 0
    """ + ("1: jmp 1b\n" if mode != "real" else ""))
    log = _io_log(m, 0x1234, reply=0xAABBCCDD)
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    quals = [entry[6] for entry in log]
    assert quals == [0x1234_0000, 0x1234_0001, 0x1234_0003, 0x1234_0008, 0x1234_0009, 0x1234_000B]
    assert [entry[:5] for entry in log] == [
        (1, False, False, False, 0x1234), (2, False, False, False, 0x1234), (4, False, False, False, 0x1234),
        (1, True, False, False, 0x1234), (2, True, False, False, 0x1234), (4, True, False, False, 0x1234)]
    assert [entry[5] for entry in log[:3]] == [0x21, 0x4321, 0x87654321]
    assert r.exits == {"IO_INSTRUCTION": 7}


@pytest.mark.parametrize("instruction, expected", [
    ("inb %dx, %al", 0x5555_55DD),        # AL only; the rest of EAX kept
    ("inw %dx, %ax", 0x5555_CCDD),        # AX only
    ("inl %dx, %eax", 0xAABB_CCDD),       # all of EAX, RAX upper half cleared
])
def test_in_handler_data_reaches_the_guest(make_machine, instruction: str, expected: int) -> None:
    m = make_machine(mode="long")
    m.load_asm(f"""
        mov $0x80, %dx
        movabs $0x7777777755555555, %rax
        {instruction}
        mov %rax, %rbx
        EXIT 0
    """)
    _io_log(m, 0x80, reply=0xAABBCCDD)
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    upper = 0 if instruction.startswith("inl") else 0x7777_7777 << 32
    assert m.vcpu.rbx == upper | expected


def test_rep_insb_is_a_string_rep_access(make_machine) -> None:
    m = make_machine(mode="long")
    image = m.load_asm("""
        mov $0x80, %dx
        lea buf(%rip), %rdi
        mov $4, %ecx
        rep insb
        EXIT 0
    buf: .quad 0
    """)
    log = _io_log(m, 0x80, reply=0x5A)
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    assert m.memory.read(image.symbols["buf"], 8) == b"\x5a" * 4 + b"\0" * 4
    assert sum(entry[7] for entry in log) == 4
    for size, din, string, rep, port, _, qual, count in log:
        assert (size, din, port) == (1, True, 0x80)
        if count > 1:
            assert string and rep and qual == 0x0080_0038
    assert any(entry[7] > 1 for entry in log), "KVM delivered rep insb one item at a time"


def test_rep_outsb_delivers_the_bytes_in_order(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("""
        mov $0x80, %dx
        lea msg(%rip), %rsi
        mov $5, %ecx
        rep outsb
        EXIT 0
    msg: .ascii "hello"
    """)
    got = bytearray()

    def handler(vcpu, info):
        q = info.io
        assert (q.size, q.direction_in, q.port) == (1, False, 0x80)
        got.extend(bytes(vcpu.fd.io_data(info.raw_kvm_exit)))
        if info.raw_kvm_exit.count > 1:
            assert q.string and q.rep
        return RESUME

    m.on(ExitReason.IO_INSTRUCTION, handler, port=0x80)
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    assert bytes(got) == b"hello"
    assert m.vcpu.rcx == 0 and r.exits["IO_INSTRUCTION"] >= 2


def test_rep_outsb_to_the_serial_console(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("""
        mov $0x3f8, %dx
        lea msg(%rip), %rsi
        mov $6, %ecx
        rep outsb
        EXIT 0
    msg: .ascii "hello\\n"
    """)
    r = m.run(timeout=5)
    assert (r.reason, r.console) == ("exit", "hello\n"), r


def test_io_qualification_and_length_come_from_the_instruction(make_machine) -> None:
    """SDM 27.2.1: bit 4 string, bit 5 REP, bit 6 operand encoding (1 = immediate), and the VM-exit
    instruction length, for each form of the instruction, on the fast path and the C loop."""
    m = make_machine(mode="long")
    m.load_asm("""
        out %al, $0x80
        mov $0x80, %dx
        out %al, %dx
        inb $0x80, %al
        inb %dx, %al
        lea msg(%rip), %rsi
        mov $1, %ecx
        rep outsb
        outsb
        mov $0x80, %dx
        .byte 0x66, 0xef            # out %ax, %dx with an operand-size prefix
        EXIT 0
    msg: .ascii "ab"
    """)
    log = []

    def handler(vcpu, info):
        q = info.io
        log.append((q.direction_in, q.string, q.rep, q.operand_is_dx, q.size, info.instruction_length))

    m.on(ExitReason.IO_INSTRUCTION, handler, port=0x80)
    assert m.run(timeout=5).reason == "exit"
    assert log == [
        (False, False, False, False, 1, 2),      # out %al, $0x80
        (False, False, False, True, 1, 1),       # out %al, %dx
        (True, False, False, False, 1, 2),       # in $0x80, %al
        (True, False, False, True, 1, 1),        # in %dx, %al
        (False, True, True, True, 1, 2),         # rep outsb
        (False, True, False, True, 1, 1),        # outsb
        (False, False, False, True, 2, 2),       # out %ax, %dx
    ]


def test_observer_sees_console_bytes_and_the_device_still_gets_them(make_machine) -> None:
    from conftest import GUESTS
    m = make_machine(mode="long")
    m.load_asm(GUESTS / "hello_long.S")
    seen = bytearray()
    m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: seen.append(info.data), port=0x3F8)
    r = m.run(timeout=5)
    assert r.console == "Hello from long mode!\n" == seen.decode()


def test_observers_see_every_exit_with_all_its_fields(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("""
        mov $0x11, %al
        out %al, $0x80
        mov $0x1234, %dx
        inw %dx, %ax
        mov $0x10, %ecx
        rdmsr
        mov $0x22, %al
        out %al, $0x80
        hlt
    """)
    m.on(ExitReason.EXECUTE_RDMSR, lambda vcpu, info: None, msr=0x10)
    fields = ("reason", "qualification", "data", "msr", "instruction_length")
    seen = []
    m.hooks.add("observe", lambda vcpu, info: seen.append(tuple(getattr(info, f) for f in fields)))
    r = m.run(timeout=5)
    assert r.reason == "hlt", r
    io = ExitReason.IO_INSTRUCTION
    assert seen == [
        (io, 0x80 << 16 | 0x40, 0x11, 0, 2),                  # 1-byte OUT, immediate port
        (io, 0x1234 << 16 | 8 | 1, 0, 0, 2),                  # 2-byte IN, port in DX
        (ExitReason.EXECUTE_RDMSR, 0, 0, 0x10, 2),
        (io, 0x80 << 16 | 0x40, 0x22, 0, 2),                         # nothing left over from the RDMSR exit
        (ExitReason.EXECUTE_HLT, 0, 0, 0, 1),
    ]


def test_io_handler_on_unclaimed_port_and_default_reads_all_ones(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x1234, %dx\n xor %eax, %eax\n inw %dx, %ax\n mov %eax, %ebx\n EXIT 0")
    r = m.run(timeout=5)
    assert r.reason == "exit" and m.vcpu.rbx == 0xFFFF


def test_retry_executes_an_in_again(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x80, %dx\n xor %ebx, %ebx\n inb %dx, %al\n add %al, %bl\n EXIT 0")
    calls = []

    def handler(vcpu, info):
        calls.append(vcpu.rip)
        info.data = len(calls)
        return RETRY if len(calls) < 3 else RESUME

    m.on(ExitReason.IO_INSTRUCTION, handler, port=0x80)
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    assert len(calls) == 3 and len(set(calls)) == 1
    assert m.vcpu.rbx == 3                 # only the value of the completed IN arrived


def _pvm_host() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " hypervisor" in flags and " vmx" not in flags and " svm" not in flags


def test_retry_executes_an_out_again(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x80, %dx\n mov $7, %al\n outb %al, %dx\n EXIT 0")
    calls = []

    def handler(vcpu, info):
        calls.append(info.data)
        return RETRY if len(calls) < 2 else RESUME

    m.on(ExitReason.IO_INSTRUCTION, handler, port=0x80)
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    assert calls == [7, 7]


@pytest.mark.parametrize("mode", ["long", "user", "real"])
def test_retry_executes_an_in_or_immediate_out_again(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm("mov $0x80, %dx\n inb %dx, %al\n mov %al, %bl\n outb %al, $0x81\n EXIT 0")
    calls = []

    def handler(vcpu, info):
        calls.append(info.io.port)
        info.data = len(calls)
        return RETRY if len(calls) in (1, 3) else RESUME

    m.on(ExitReason.IO_INSTRUCTION, handler, port=range(0x80, 0x82))
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    assert calls == [0x80, 0x80, 0x81, 0x81]
    assert m.vcpu.rbx & 0xFF == 2          # the retried IN delivered the second answer


def test_port_range_filters_and_newest_handler_first(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("out %al, $0x80\n out %al, $0x83\n out %al, $0x84\n EXIT 0")
    order = []
    m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: order.append(("range", info.io.port)), port=range(0x80, 0x84))
    m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: order.append(("tuple", info.io.port)), port=(0x83, 0x85))
    r = m.run(timeout=5)
    assert r.reason == "exit"
    assert order == [("range", 0x80), ("tuple", 0x83), ("range", 0x83), ("tuple", 0x84)]
    with pytest.raises(TypeError, match="one filter"):
        m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: None, port=1, msr=2)


# -- actions -------------------------------------------------------------------------------
def test_stop_action_ends_the_run(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("out %al, $0x80\n EXIT 1")

    @m.on(ExitReason.IO_INSTRUCTION, port=0x80)
    def stop(vcpu, info):
        return Stop("stopped", 7, "seen port 0x80")

    r = m.run(timeout=5)
    assert (r.reason, r.exit_code, r.message) == ("stopped", 7, "seen port 0x80")
    assert r.exit_status == 15


def test_injected_exception_goes_through_the_guest_idt(make_machine) -> None:
    """User mode: #UD injected from a handler arrives at the built-in kernel's IDT stub."""
    m = make_machine(mode="user")
    m.load_asm("nop\n out %al, $0x80\n EXIT 0\n1: jmp 1b")
    m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: Inject(Vector.UD), port=0x80)
    r = m.run(timeout=5)
    assert r.reason == "exception", r
    assert r.exception.vector == Vector.UD
    assert r.exits == {"IO_INSTRUCTION": 1, "EXCEPTION_OR_NMI": 1}


def test_user_mode_exception_handler_can_resume(make_machine) -> None:
    m = make_machine(mode="user")
    m.load_asm("ud2\n mov $5, %ebx\n EXIT 0\n1: jmp 1b")
    seen = []

    def skip_ud2(vcpu, info):
        seen.append((info.vector, vcpu.rip, info.interruption.type.name if hasattr(info.interruption.type, "name")
                     else info.interruption.type))
        vcpu.rip += 2
        return RESUME

    m.on(ExitReason.EXCEPTION_OR_NMI, skip_ud2, vector=Vector.UD)
    m.on(ExitReason.EXCEPTION_OR_NMI, lambda vcpu, info: pytest.fail("wrong vector"), vector=Vector.PF)
    assert m.vmcs.read(F.VMCS_CTRL_EXCEPTION_BITMAP) & (1 << 6)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    assert seen == [(6, 0x100000, "HARDWARE_EXCEPTION")]
    assert m.vcpu.rbx == 5


# -- MTF, HLT, triple fault ----------------------------------------------------------------
@pytest.mark.parametrize("mode, source, steps", [
    ("long", "nop\n nop\n mov $1, %eax\n add %eax, %eax\n xchg %eax, %ebx\n hlt", 5),
    ("long", "mov $3, %ecx\n 1: dec %ecx\n jnz 1b\n hlt", 1 + 3 * 2),
    ("protected", "mov $1, %eax\n inc %eax\n hlt", 2),
    ("real", "mov $1, %ax\n inc %ax\n inc %ax\n hlt", 3),
])
def test_mtf_counts_instructions_exactly(make_machine, mode: str, source: str, steps: int) -> None:
    m = make_machine(mode=mode)
    m.load_asm(source)
    m.vmcs.set_control(ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG)
    rips = []
    m.on(ExitReason.MONITOR_TRAP_FLAG, lambda vcpu, info: rips.append(vcpu.rip))
    r = m.run(timeout=5)
    assert r.reason == "hlt", r
    assert r.exits == {"MONITOR_TRAP_FLAG": steps, "EXECUTE_HLT": 1}
    assert len(rips) == steps
    assert rips[-1] == m.vcpu.rip - 1             # the last step landed on the hlt


def test_mtf_step_rips_and_switching_it_off(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("nop\n mov $1, %eax\n add %eax, %eax\n hlt\n nop\n nop\n hlt")
    m.vmcs.set_control(ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG)
    rips = []
    m.on(ExitReason.MONITOR_TRAP_FLAG, lambda vcpu, info: rips.append(vcpu.rip))
    assert m.run(timeout=5).reason == "hlt"
    assert rips == [0x100001, 0x100006, 0x100008]
    m.vmcs.set_control(ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG, False)
    r = m.run(timeout=5)
    assert r.reason == "hlt" and "MONITOR_TRAP_FLAG" not in r.exits
    assert rips == [0x100001, 0x100006, 0x100008]


def test_step_once_runs_a_callback_after_one_instruction(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $1, %eax\n mov $2, %eax\n hlt")
    values = []
    m.step_once(lambda vcpu: values.append((vcpu.rip, vcpu.rax)))
    r = m.run(timeout=5)
    assert r.reason == "hlt"
    assert values == [(0x100005, 1)]
    assert "MONITOR_TRAP_FLAG" not in r.exits


def test_hlt_exit_handler_can_resume(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("hlt\n hlt\n EXIT 3")
    rips = []
    m.on(ExitReason.EXECUTE_HLT, lambda vcpu, info: rips.append(vcpu.rip) or RESUME)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 3)
    assert rips == [0x100001, 0x100002]
    assert r.exits == {"EXECUTE_HLT": 2, "IO_INSTRUCTION": 1}


def test_triple_fault_reaches_a_handler(make_machine) -> None:
    m = make_machine(mode="protected")
    m.load_asm("ud2")
    seen = []
    m.on(ExitReason.TRIPLE_FAULT, lambda vcpu, info: seen.append(info.reason))
    r = m.run(timeout=5)
    assert r.reason == "triple_fault"
    assert seen == [ExitReason.TRIPLE_FAULT]
    assert m.vmcs.read(F.VMCS_EXIT_REASON) == 2


# -- hypercalls ----------------------------------------------------------------------------
HYPERCALL_GUEST = """
    mov $0x10, %eax
    mov $6, %ebx
    mov $7, %ecx
    mov $100, %edx
    mov $1000, %esi
    out %al, $0xf5
    mov %rax, %r8
    mov $0x99, %eax
    out %al, $0xf5
    mov %rax, %r9
    hlt
"""


def test_hypercall_round_trip(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm(HYPERCALL_GUEST)
    calls = []

    def multiply(vcpu, info):
        calls.append((vcpu.rax, vcpu.rbx, vcpu.rcx, vcpu.rdx, vcpu.rsi))
        vcpu.rax = vcpu.rbx * vcpu.rcx + vcpu.rdx + vcpu.rsi
        return RESUME

    m.on(ExitReason.EXECUTE_VMCALL, multiply, number=0x10)
    r = m.run(timeout=5)
    assert r.reason == "hlt", r
    assert calls == [(0x10, 6, 7, 100, 1000)]
    assert m.vcpu.r8 == 1142
    assert m.vcpu.r9 == -1000 & MASK64            # unknown number: -KVM_ENOSYS
    assert r.exits == {"EXECUTE_VMCALL": 2, "EXECUTE_HLT": 1}


@pytest.mark.parametrize("mode", ["long", "user", "protected"])
def test_unknown_hypercall_returns_minus_1000(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm("mov $12345, %eax\n out %al, $0xf5\n mov %eax, %ebx\n EXIT 0\n1: jmp 1b")
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    assert m.vcpu.rbx & 0xFFFFFFFF == -1000 & 0xFFFFFFFF


def test_removed_handler_is_not_called(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x10, %eax\n out %al, $0xf5\n mov %rax, %rbx\n hlt")
    calls = []
    reg = m.on(ExitReason.EXECUTE_VMCALL, lambda vcpu, info: calls.append(1) or setattr(vcpu, "rax", 1) or RESUME,
               number=0x10)
    m.off(reg)
    r = m.run(timeout=5)
    assert r.reason == "hlt"
    assert calls == [] and m.vcpu.rbx == -1000 & MASK64
    with pytest.raises(ValueError, match="not registered"):
        m.off(reg)


def test_removed_io_handler_gives_the_port_back(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("mov $0x80, %dx\n inb %dx, %al\n mov %eax, %ebx\n EXIT 0")
    reg = m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: setattr(info, "data", 0x12) or RESUME, port=0x80)
    m.off(reg)
    r = m.run(timeout=5)
    assert r.reason == "exit"
    assert m.vcpu.rbx & 0xFF == 0xFF


# -- handler errors --------------------------------------------------------------------------
@pytest.mark.parametrize("reason, filters, source", [
    (ExitReason.IO_INSTRUCTION, {"port": 0x80}, "nop\n out %al, $0x80\n hlt"),
    (ExitReason.EXECUTE_VMCALL, {}, "nop\n mov $5, %eax\n out %al, $0xf5\n hlt"),
    (ExitReason.EXECUTE_HLT, {}, "nop\n hlt\n hlt"),
    (ExitReason.EXECUTE_RDMSR, {"msr": 0x174}, "mov $0x174, %ecx\n rdmsr\n hlt"),
])
def test_exception_in_a_handler_is_a_handler_error(make_machine, reason, filters, source) -> None:
    m = make_machine(mode="long")
    m.load_asm(source)

    def broken(vcpu, info):
        raise LookupError("handler bug")

    m.on(reason, broken, **filters)
    result, error = run_catching(m, timeout=5)
    assert result is None
    message, cause = error
    assert cause == "LookupError"
    assert reason.name in message and "handler bug" in message
    assert f"guest rip={m.vcpu.rip:#x}" in message
    assert m.last_result.reason == "error"
    # The machine is still usable once the broken handler is gone.
    m.off(broken)
    assert m.run(timeout=5).reason == "hlt"


def test_exception_in_a_cpuid_handler_is_a_handler_error(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("cpuid\n hlt")
    m.on(ExitReason.EXECUTE_CPUID, lambda vcpu, info: 1 / 0, leaf=0)
    try:
        m.run(timeout=5)
        outcome = "no exception"
    except HandlerError as exc:
        outcome = f"HandlerError: {exc}"
    except ZeroDivisionError as exc:
        outcome = f"raw {type(exc).__name__}"
    assert outcome.startswith("HandlerError") and "EXECUTE_CPUID" in outcome, outcome


def test_close_while_handling_a_handler_error() -> None:
    from minivmm.machine import Machine
    m = Machine("2M", "long")
    m.load_asm("out %al, $0x80\n hlt")
    m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: 1 / 0, port=0x80)
    failure = None
    try:
        try:
            m.run(timeout=5)
        except HandlerError:
            try:
                m.close()
            except BufferError as exc:
                failure = repr(exc)
    finally:
        m.close()
    assert failure is None, failure


# -- statistics ------------------------------------------------------------------------------
def test_exit_statistics(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("""
        out %al, $0x80
        out %al, $0x80
        out %al, $0x81
        mov $1, %eax
        out %al, $0xf5
        hlt
        EXIT 4
    """)
    m.on(ExitReason.EXECUTE_HLT, lambda vcpu, info: RESUME)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 4)
    assert r.exits == {"IO_INSTRUCTION": 4, "EXECUTE_VMCALL": 1, "EXECUTE_HLT": 1}
    assert r.stats["IO_INSTRUCTION"].count == 4
    assert all(stat.handler_seconds > 0 for stat in r.stats.values())
    m.vcpu.rip = m.entry
    r2 = m.run(timeout=5)
    assert r2.exits == r.exits                                # per run
    assert r2.stats["IO_INSTRUCTION"].count == 4
    assert m.stats["IO_INSTRUCTION"].count == 8               # accumulated over the machine's life
    assert m.stats["EXECUTE_VMCALL"].count == 2
    assert m.stats["EXECUTE_HLT"].handler_seconds == (r.stats["EXECUTE_HLT"].handler_seconds
                                                      + r2.stats["EXECUTE_HLT"].handler_seconds)
    assert "IO_INSTRUCTION" in r2.last_exit
