"""The core (issue 2): real guests in the four modes, register and segment state,
guest memory, deadlines, faults and Ctrl-C."""
from __future__ import annotations

import signal
import time

import pytest

from conftest import GUESTS, interrupted_run, sigint_after
from minivmm.machine import Machine, RunResult
from minivmm.memory import GuestMemory, GuestMemoryError
from minivmm.vcpu import Segment

pytestmark = pytest.mark.kvm

MODES = ("real", "protected", "long", "user")
HELLO = {"real": "Hello from real mode!\n", "protected": "Hello from protected mode!\n",
         "long": "Hello from long mode!\n", "user": "Hello from user mode!\n"}


# -- hello and exit codes ----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_hello_in_every_mode(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm(GUESTS / f"hello_{mode}.S")
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code, r.exit_status) == ("exit", 0, 1), r
    assert r.console == HELLO[mode]
    assert r.exits == {"IO_INSTRUCTION": len(HELLO[mode]) + 1}
    assert r.elapsed_s < 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("code, status", [(5, 11), (0, 1), (255, 511)])
def test_exit_code_propagates(make_machine, mode: str, code: int, status: int) -> None:
    m = make_machine(mode=mode)
    m.load_asm(f"EXIT {code}\n1: jmp 1b")
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code, r.exit_status) == ("exit", code, status), r
    assert r.console == ""


def test_run_result_defaults() -> None:
    assert RunResult("hlt").exit_status is None
    assert str(RunResult("exit", 3, message="m")) == "exit code=3: m"


# -- registers -----------------------------------------------------------------------------
REGISTER_GUESTS = {
    "real": """
        mov %bx, %dx
        add %cx, %dx
        mov %si, %di
        shl $1, %di
        EXIT 0
    """,
    "protected": """
        mov %ebx, %edx
        add %ecx, %edx
        mov %esi, %edi
        shl $1, %edi
        EXIT 0
    """,
    "long": """
        mov %rbx, %rdx
        add %rcx, %rdx
        mov %rsi, %rdi
        shl $1, %rdi
        lea (%r8, %r9), %r10
        mov %r15, %r14
        not %r14
        EXIT 0
    """,
}
REGISTER_GUESTS["user"] = REGISTER_GUESTS["long"] + "\n1: jmp 1b"


@pytest.mark.parametrize("mode", MODES)
def test_registers_round_trip(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm(REGISTER_GUESTS[mode])
    width = {"real": 16, "protected": 32}.get(mode, 64)
    mask = (1 << width) - 1
    values = {"rbx": 0x1234_5678_9ABC_1111 & mask, "rcx": 0x0101_0101_0101_0202 & mask,
              "rsi": 0x0FED_CBA9_8765_4321 & (mask >> 1), "rbp": 0xBEEF}
    if width == 64:
        values.update(r8=0x1111_0000_0000_0001, r9=0x2222_0000_0000_0002, r15=0x0F0F_0F0F_0F0F_0F0F,
                      r12=0xDEAD_BEEF_CAFE_F00D, r13=0xFFFF_FFFF_FFFF_FFFF)
    for name, value in values.items():
        setattr(m.vcpu, name, value)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    v = m.vcpu
    assert v.rdx & mask == (values["rbx"] + values["rcx"]) & mask
    assert v.rdi & mask == (values["rsi"] << 1) & mask
    for name, value in values.items():
        assert getattr(v, name) == value, name
    if width == 64:
        assert v.r10 == values["r8"] + values["r9"]
        assert v.r14 == ~values["r15"] & (1 << 64) - 1
    assert v.rax & 0xFF == 0                           # EXIT 0 put its code in AL
    assert v.rip == r.rip
    assert m.memory.read(r.rip - 2, 2) == b"\xe6\xf4"   # stopped right after `out %al, $0xf4`


def test_register_copies_are_detached(make_machine) -> None:
    m = make_machine(mode="long")
    regs = m.vcpu.regs
    regs.rax = 77
    assert m.vcpu.rax != 77
    m.vcpu.set_regs(regs)
    assert m.vcpu.rax == 77
    m.vcpu.rax = -1
    assert m.vcpu.rax == (1 << 64) - 1


EXPECTED_SEGMENTS = {
    #          cs selector, l, db, dpl, data selector
    "real": (0x00, 0, 0, 0, 0x00),
    "protected": (0x18, 0, 1, 0, 0x10),
    "long": (0x08, 1, 0, 0, 0x10),
    "user": (0x2B, 1, 0, 3, 0x23),
}


@pytest.mark.parametrize("mode", MODES)
def test_segments_read_back(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm("EXIT 0\n1: jmp 1b")
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    selector, l, db, dpl, data = EXPECTED_SEGMENTS[mode]
    cs = m.vcpu.segment("cs")
    assert (cs.selector, cs.l, cs.db, cs.dpl, cs.present, cs.s, cs.type & 0xA) == (selector, l, db, dpl, 1, 1, 0xA)
    for name in ("ds", "es", "ss"):
        seg = m.vcpu.segment(name)
        assert (seg.selector, seg.dpl, seg.present, seg.type & 0xA) == (data, dpl, 1, 0x2), name
    assert m.vcpu.cpl == dpl
    if mode == "real":
        assert m.vcpu.cr0 & 1 == 0 and cs.limit == 0xFFFF
    else:
        assert m.vcpu.cr0 & 1 and cs.limit == 0xFFFFFFFF and cs.base == 0
    assert bool(m.vcpu.efer & 0x400) == (mode in ("long", "user"))   # EFER.LMA


SEGMENT_GUESTS = {
    "real": ("mov %fs:0x10, %ax\n mov %ax, %bx\n EXIT 0", 0x2000, 2),
    "protected": ("mov %fs:0x10, %eax\n mov %eax, %ebx\n EXIT 0", 0x180000, 4),
    "long": ("mov %fs:0x10, %rax\n mov %rax, %rbx\n EXIT 0", 0x180000, 8),
    "user": ("mov %fs:0x10, %rax\n mov %rax, %rbx\n EXIT 0\n1: jmp 1b", 0x180000, 8),
}


@pytest.mark.parametrize("mode", MODES)
def test_segment_set_before_run_is_used_by_the_guest(make_machine, mode: str) -> None:
    source, base, width = SEGMENT_GUESTS[mode]
    m = make_machine(mode=mode)
    m.load_asm(source)
    m.setup()
    m.memory.write(base + 0x10, bytes(range(0xA1, 0xA9)))
    fs = m.vcpu.segment("fs")
    if mode == "real":
        fs = Segment(selector=base >> 4, base=base, limit=0xFFFF, type=3, g=0, db=0)
    else:
        from dataclasses import replace
        fs = replace(fs, base=base)
    m.vcpu.set_segment("fs", fs)
    r = m.run(timeout=5)
    assert r.reason == "exit", r
    assert m.vcpu.rbx & ((1 << 8 * width) - 1) == int.from_bytes(bytes(range(0xA1, 0xA1 + width)), "little")
    assert m.vcpu.segment("fs").base == base
    if mode == "real":
        assert m.vcpu.segment("fs") == fs


def test_descriptor_tables_read_back(make_machine) -> None:
    m = make_machine(mode="user")
    m.load_asm("EXIT 0\n1: jmp 1b")
    m.run(timeout=5)
    assert m.vcpu.descriptor_table("gdt") == (0x1000, 8 * 8 - 1)
    assert m.vcpu.descriptor_table("idt") == (0x2000, 256 * 16 - 1)


# -- memory ------------------------------------------------------------------------------
@pytest.fixture
def memory():
    mem = GuestMemory()
    yield mem
    mem.close()


def test_memory_bounds(memory: GuestMemory) -> None:
    memory.add_region(0, 0x10000)
    memory.write(0xFFFC, b"abcd")
    assert memory.read(0xFFFC, 4) == b"abcd"
    with pytest.raises(GuestMemoryError, match="0x10000"):
        memory.read(0xFFFE, 4)
    with pytest.raises(GuestMemoryError):
        memory.read(0x10000, 1)
    with pytest.raises(GuestMemoryError):
        memory.write(0xFFFF, b"xy")
    with pytest.raises(GuestMemoryError):
        memory.read_u64(0xFFFC)
    with pytest.raises(GuestMemoryError):
        memory.read(-1, 1)
    with pytest.raises(GuestMemoryError):
        memory.view(0xF000, 0x2000)
    with pytest.raises(GuestMemoryError):
        memory.fill(0xFFF0, 0x20)
    assert not memory.is_mapped(0x10000) and memory.is_mapped(0xFFFF)


def test_memory_accesses_span_adjacent_regions(memory: GuestMemory) -> None:
    memory.add_region(0x2000, 0x1000, name="high")
    memory.add_region(0x1000, 0x1000, name="low")
    memory.write(0x1FFE, b"wxyz")
    assert memory.read(0x1FFE, 4) == b"wxyz"
    assert memory.read_u32(0x1FFE) == int.from_bytes(b"wxyz", "little")
    assert [r.name for r in memory.regions] == ["low", "high"]
    assert memory.size == 0x2000
    with pytest.raises(GuestMemoryError, match="0x0 is not backed"):
        memory.read(0, 1)


@pytest.mark.parametrize("gpa, size, match", [
    (0x1000, 0x1000, "overlaps region ram"),          # same range
    (0x0, 0x2000, "overlaps"),                        # covers the start
    (0x1800 & ~0xFFF, 0x3000, "overlaps"),            # covers the end
    (0x0, 0x10000, "overlaps"),                       # encloses
    (0x1800, 0x1000, "not page aligned"),             # misaligned start
    (0x3000, 0x800, "not page aligned"),              # misaligned size
    (0x3000, 0, "must be positive"),
])
def test_add_region_rejects_overlap_and_misalignment(memory: GuestMemory, gpa: int, size: int,
                                                     match: str) -> None:
    memory.add_region(0x1000, 0x1000)
    with pytest.raises(GuestMemoryError, match=match):
        memory.add_region(gpa, size)
    assert len(memory.regions) == 1


def test_adjacent_regions_are_allowed(memory: GuestMemory) -> None:
    memory.add_region(0x1000, 0x1000)
    memory.add_region(0x0, 0x1000)
    memory.add_region(0x2000, 0x1000)
    assert [r.gpa for r in memory.regions] == [0, 0x1000, 0x2000]


def test_machine_add_ram_rejects_overlap(make_machine) -> None:
    m = make_machine(mode="long", memory="2M")
    with pytest.raises(GuestMemoryError, match="overlaps"):
        m.add_ram(0x100000, "1M")
    m.add_ram(0x200000, "1M", name="extra")
    m.memory.write(0x2FFFF0, b"z" * 16)
    with pytest.raises(GuestMemoryError):
        m.memory.read(0x2FFFF0, 17)


def test_machine_memory_size_parsing(make_machine) -> None:
    from minivmm.memory import parse_size
    assert parse_size("2M") == 2 << 20 and parse_size("64k") == 65536 and parse_size("0x2000") == 0x2000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("0x1B") == 0x1B and parse_size("2MB") == 2 << 20     # a hex B is a digit
    with pytest.raises(ValueError, match="bad size"):
        parse_size("lots")


# -- deadlines ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode, source", [
    ("long", "1: jmp 1b"),                # CPL 0, emulated
    ("user", "1: jmp 1b"),                # CPL 3, native
    ("long", "vmcall\n1: jmp 1b"),       # KVM_RUN spins in the kernel on vmcall
    ("protected", "1: jmp 1b"),
    ("real", "1: jmp 1b"),
], ids=["long-loop", "user-loop", "vmcall", "protected-loop", "real-loop"])
def test_runaway_guest_is_stopped_at_its_deadline(make_machine, mode: str, source: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm(source)
    start = time.perf_counter()
    r = m.run(timeout=1.0)
    wall = time.perf_counter() - start
    assert r.reason == "timeout", r
    assert r.exits.get("VMX_PREEMPTION_TIMER_EXPIRED") == 1, r.exits
    assert 0.95 <= r.elapsed_s < 1.5 and wall < 1.5
    # The vCPU is intact: a second run with a shorter deadline stops again.
    r2 = m.run(timeout=0.2)
    assert r2.reason == "timeout" and r2.elapsed_s < 0.5


def test_vmcall_at_cpl3_returns_instead_of_hanging(make_machine) -> None:
    """Only a CPL-0 vmcall spins inside KVM_RUN. At CPL 3 the host answers it itself, in one of
    two ways seen on this project's hosts: -KVM_EPERM (-1) in RAX (KVM's own CPL check), or a
    #GP delivered to the guest's IDT (PVM on the Intel host of 2026-12-01). Either way the run
    ends at once with what the guest saw."""
    m = make_machine(mode="user")
    image = m.load_asm("mov $7, %eax\n vmcall_at: vmcall\n mov %rax, %rbx\n EXIT 0\n1: jmp 1b")
    r = m.run(timeout=1.0)
    assert r.elapsed_s < 0.5, r
    if r.reason == "exception":
        assert r.exception.vector == 13 and r.exception.rip == image.symbols["vmcall_at"], r
    else:
        assert (r.reason, r.exit_code) == ("exit", 0), r
        assert m.vcpu.rbx == (1 << 64) - 1


def test_max_exits_bounds_a_run(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("1: out %al, $0x80\n jmp 1b")
    r = m.run(timeout=5, max_exits=10)
    assert r.reason == "exit_limit", r
    assert r.exits == {"IO_INSTRUCTION": 10}


def test_no_deadline_timer_left_behind(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm("hlt")
    m.run(timeout=0.05)
    time.sleep(0.1)                                      # a leftover SIGALRM would land here
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# -- faults --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, source", [
    ("long", "ud2"),                                      # no IDT at all
    ("protected", "ud2"),
    ("long", "lidt nullidt\n ud2\nnullidt: .word 0\n .quad 0"),
    ("long", "movabs $0x8000000000000000, %rax\n mov %rax, %rsp\n push %rax"),   # #SS, no IDT
], ids=["long-ud2", "protected-ud2", "null-idt", "noncanonical-stack"])
def test_triple_fault(make_machine, mode: str, source: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm(source)
    r = m.run(timeout=5)
    assert r.reason == "triple_fault", r
    assert r.exits == {"TRIPLE_FAULT": 1}
    assert r.exception is None


@pytest.mark.parametrize("source, vector, error_code, cr2, offset", [
    ("ud2", 6, None, None, 0),
    ("mov $0xdead0000, %eax\n movl $1, (%rax)", 14, 6, 0xDEAD0000, 5),      # write, user, not present
    ("mov $0xdead0000, %eax\n movl (%rax), %ebx", 14, 4, 0xDEAD0000, 5),    # read, user, not present
    ("movl $1, 0x1010", 14, 7, 0x1010, 0),                 # present supervisor page: protection violation
    ("xor %eax, %eax\n mov (%rax), %eax", 14, 4, 0, 2),  # NULL page is not present
    ("nop\n int3", 3, None, None, 1),
    ("xor %ecx, %ecx\n div %ecx", 0, None, None, 2),
    ("hlt", 13, 0, None, 0),                            # privileged at CPL 3
], ids=["ud2", "pf-write", "pf-read", "pf-supervisor", "null", "int3", "de", "hlt-gp"])
def test_user_mode_exceptions_are_reported(make_machine, source: str, vector: int, error_code,
                                           cr2, offset: int) -> None:
    m = make_machine(mode="user")
    m.load_asm(source)
    r = m.run(timeout=5)
    assert r.reason == "exception", r
    e = r.exception
    assert (e.vector, e.error_code, e.cr2, e.rip) == (vector, error_code, cr2, 0x100000 + offset)
    assert r.exits == {"EXCEPTION_OR_NMI": 1}
    assert r.rip == e.rip == m.vcpu.rip
    # The user context is restored: CPL 3 on the user stack, not the kernel's.
    assert m.vcpu.segment("cs").selector == 0x2B and m.vcpu.cpl == 3
    assert m.vcpu.rsp == m.default_stack()
    assert f"vector {vector}" in r.message


def test_user_mode_exception_then_resume_elsewhere(make_machine) -> None:
    m = make_machine(mode="user")
    image = m.load_asm("ud2\nnext: EXIT 9\n1: jmp 1b")
    r = m.run(timeout=5)
    assert r.exception.vector == 6
    m.vcpu.rip = image.symbols["next"]
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code, r.exception) == ("exit", 9, None)


@pytest.mark.parametrize("mode", ["long", "protected"])
def test_int3_at_cpl0_is_reported_as_vector_3(make_machine, mode: str) -> None:
    from minivmm.machine import GuestFault
    m = make_machine(mode=mode)
    m.load_asm("nop\n int3")
    r, fault = None, ""
    try:
        r = m.run(timeout=5)
    except GuestFault as exc:           # caught here: a traceback kept alive would pin kvm_run (see below)
        fault = str(exc)
    assert r is not None, fault
    assert r.reason == "exception", r
    assert (r.exception.vector, r.exception.rip) == (3, 0x100001)


def test_emulation_failure_ends_the_run_with_an_error_result(make_machine) -> None:
    """A guest-caused failure is a RunResult (reason error, the decoded instruction, RIP and the
    exits before it), not an exception out of run()."""
    m = make_machine(mode="long")
    m.load_asm("out %al, $0x80\n nop\n xor %ecx, %ecx\n xgetbv\n EXIT 0")
    r = m.run(timeout=5)
    if r.reason == "exit":          # a host that runs xgetbv at CPL 0 (not an emulating one)
        assert r.exit_code == 0, r
        return
    assert r.reason == "error", r
    assert "rip=0x100005" in r.message and "xgetbv" in r.message and "EMULATION" in r.message
    assert r.rip == 0x100005 and r.exits == {"IO_INSTRUCTION": 1}


def test_instruction_bytes_decoding() -> None:
    """kvm_run.emulation_failure: data[0] = flags, then insn_size (u8) and insn_bytes[15]."""
    from minivmm.kvm import InternalErrorExit
    raw = bytes([2, 0x0F, 0x01]) + b"\x90" * 13              # insn_size 2, bytes 0f 01, padding
    words = (1,) + tuple(int.from_bytes(raw[i:i + 8], "little") for i in (0, 8))
    exit = InternalErrorExit(1, words)
    assert exit.instruction_bytes() == b"\x0f\x01"


# -- Ctrl-C ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["long", "user"])
def test_keyboard_interrupt_during_a_run(make_machine, mode: str) -> None:
    m = make_machine(mode=mode)
    m.load_asm("1: jmp 1b")
    m.setup()
    assert interrupted_run(m) < 1.0
    assert m.last_result.reason == "interrupted"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    # Still usable: the guest goes on from where it was and stops at a new deadline.
    r = m.run(timeout=0.2)
    assert r.reason == "timeout", r
    m.close()
    assert m.vcpu is None and m.vm is None


def test_close_while_handling_keyboard_interrupt() -> None:
    m = Machine("2M", "long")
    m.load_asm("1: jmp 1b")
    m.setup()
    failure = None
    timer = sigint_after(0.2)
    try:
        try:
            m.run(timeout=5)
        except KeyboardInterrupt:
            try:
                m.close()               # e.g. a CLI's cleanup handler
            except BufferError as exc:
                failure = f"close() inside the except block: {exc!r}"
    finally:
        timer.cancel()
        m.close()                       # the traceback is gone here: this one works
    assert m.vcpu is None and m.vm is None
    assert failure is None, failure


@pytest.mark.parametrize("mode", ["real", "protected", "long", "user"])
def test_registers_written_before_the_first_run_are_kept(make_machine, mode) -> None:
    """The mode is set up at the first run; what the user wrote before (through the vCPU or
    a VMCS guest-state field) wins over it."""
    from minivmm.vmcs_fields import VmcsField
    m = make_machine(mode=mode)
    m.load_asm("mov %eax, %ebx\n mov %esp, %ecx\n EXIT 0")
    m.vcpu.rax = 0x1234
    m.vmcs.write(VmcsField.VMCS_GUEST_RSP, 0x7000)
    result = m.run(timeout=5)
    assert result.reason == "exit", result
    assert (m.vcpu.rbx, m.vcpu.rcx & 0xFFFF) == (0x1234, 0x7000)
