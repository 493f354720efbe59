"""The KVM exit -> VMX exit translation (`minivmm.translate`) without a VM.

Every test hands `Translator.translate` a fabricated KVM exit (the typed exits of
`minivmm.kvm`) and a frozen fake `CpuView` (registers and a sparse image of guest
memory), then checks every field of the filled `ExitInfo` and of the returned
`Translation` against what a VT-x processor reports (SDM vol. 3C 27.2, appendix C),
and that neither the fake vCPU nor the exit was changed. No /dev/kvm is needed.

Guest code is written as bytes: e6 80 = out %al,$0x80, ee = out %al,%dx,
f3 6e = rep outsb, ec = in %al,%dx, e4 60 = in $0x60,%al, 66 ed = in %dx,%ax
(32/64-bit code), cc = int3, 0f 0b = ud2, 90 = nop, f4 = hlt.
"""
from __future__ import annotations

import copy
import dataclasses
import struct
from dataclasses import dataclass

import pytest

from minivmm.exits import (VM_ENTRY_FAILURE, ExitInfo, ExitReason, InterruptionInfo,
                           InterruptionType, IoQualification, Vector)
from minivmm.kvm import (DebugExit, ExitKind, FailEntryExit, HltExit, HypercallExit,
                         InternalErrorExit, InternalErrorKind, IoExit, KvmError, MemoryFaultExit,
                         MmioExit, MsrExit, ShutdownExit, SystemEventExit)
from minivmm.modes import (EXCEPTION_PORT, HYPERCALL_PORT, KERNEL_STACK_TOP, SEL_USER_CODE64,
                           SEL_USER_DATA, STUB_SIZE, STUBS_ADDR, Mode, StubFrame)
from minivmm.translate import (EptStep, ExceptionReport, GuestFault, IoInstruction, RestoreUserFrame, exception_report,
                               Translation, Translator, find_io_instruction, io_qualification)

CODE = 0x100000          # where the fake's guest code lives (bare images load at 1 MiB)
NOPS = b"\x90" * 16      # padding before the code: nothing here decodes as I/O
HLTS = b"\xf4" * 16      # padding after it
VCPU_INDEX = 3
STUBS_END = STUBS_ADDR + 256 * STUB_SIZE
ALL_MODES = list(Mode)
NON_USER_MODES = [m for m in Mode if m is not Mode.USER]


# --- the fake vCPU ----------------------------------------------------------------------
@dataclass(frozen=True)
class FakeCpu:
    """A CpuView: registers and guest memory as (base, bytes) segments. Frozen, so any
    attempt of the translator to write a register raises; memory is immutable bytes."""
    rip: int = CODE
    rsp: int = KERNEL_STACK_TOP - StubFrame.SIZE
    rax: int = 0
    cr2: int = 0
    bits: int = 64
    memory: tuple[tuple[int, bytes], ...] = ()
    linear: tuple[tuple[int, int], ...] = ()        # (gpa, the one linear address mapping it)
    fetch: tuple[int, int] | None = None            # (linear, physical) of the code at RIP

    def code_bits(self) -> int:
        return self.bits

    def _read(self, address: int, length: int) -> bytes:
        for base, data in self.memory:
            if base <= address < base + len(data):
                return data[address - base: address - base + length]
        return b""

    def read_code(self, rip: int, length: int) -> bytes:
        """Code from `rip` up to the end of its segment; empty where nothing is mapped."""
        return self._read(rip, length)

    def read_physical(self, gpa: int, length: int) -> bytes:
        data = self._read(gpa, length)
        if len(data) != length:
            raise ValueError(f"fake guest memory: {length} bytes at {gpa:#x} not mapped")
        return data

    def linear_of_physical(self, gpa: int) -> int | None:
        return dict(self.linear).get(gpa)

    def fetch_address(self) -> tuple[int, int] | None:
        return self.fetch


def code_cpu(code: bytes | str, rip_offset: int = 0, *, bits: int = 64, base: int = CODE,
             before: bytes = NOPS, after: bytes = HLTS, **regs) -> FakeCpu:
    """A fake vCPU with `code` at `base` (padded before and after) and RIP at base+rip_offset."""
    if isinstance(code, str):
        code = bytes.fromhex(code)
    segment = (base - len(before), before + code + after)
    return FakeCpu(rip=base + rip_offset, bits=bits, memory=(segment,), **regs)


def dirty_info() -> ExitInfo:
    """An ExitInfo still holding a previous exit: every field must be overwritten."""
    return ExitInfo(reason=ExitReason.EXECUTE_CPUID, entry_failure=True, qualification=0xdead,
                    guest_physical_address=0xbeef, guest_linear_address=0xfeed,
                    instruction_length=9, instruction_info=0x77, interruption_info=0x80000b0e,
                    interruption_error_code=0x55, vcpu_index=VCPU_INDEX, raw_kvm_exit="stale",
                    data=0x1234, msr=0x10)


def fields(info: ExitInfo) -> dict:
    return {f.name: getattr(info, f.name) for f in dataclasses.fields(ExitInfo)}


def expect(info: ExitInfo, ignore: tuple[str, ...] = (), **want) -> None:
    """Every ExitInfo field is `want`'s value or the reset default; vcpu_index survives."""
    expected = fields(ExitInfo(vcpu_index=VCPU_INDEX, **want))
    got = fields(info)
    for name in ignore:
        expected.pop(name)
        got.pop(name)
    assert got == expected


def translate(mode, kind, exit, cpu, **kwargs) -> tuple[Translation | None, ExitInfo]:
    """Translate with a dirty ExitInfo; the fake vCPU and the exit must come out unchanged."""
    cpu_before, exit_before = copy.deepcopy(cpu), copy.deepcopy(exit)
    info = dirty_info()
    translation = Translator(mode).translate(kind, exit, cpu, info, **kwargs)
    assert cpu == cpu_before
    assert exit == exit_before
    return translation, info


def raises_untouched(mode, kind, exit, cpu, error, match, **kwargs) -> None:
    """translate() raises `error` and leaves the ExitInfo, vCPU and exit as they were."""
    cpu_before, exit_before = copy.deepcopy(cpu), copy.deepcopy(exit)
    info = dirty_info()
    with pytest.raises(error, match=match):
        Translator(mode).translate(kind, exit, cpu, info, **kwargs)
    assert fields(info) == fields(dirty_info())
    assert cpu == cpu_before
    assert exit == exit_before


def io_qual(port: int, size: int, is_in: bool, string: bool = False, rep: bool = False,
            immediate: bool = False) -> int:
    """SDM 27.2.1, "Exit Qualification for I/O Instructions", written out bit by bit:
    2:0 size-1, 3 direction (1 = IN), 4 string, 5 REP, 6 operand encoding (0 = DX,
    1 = immediate), 31:16 port."""
    return ((size - 1) | is_in << 3 | string << 4 | rep << 5 | immediate << 6
            | (port & 0xFFFF) << 16)


def intr_info(vector: int, itype: int, error_code: bool = False) -> int:
    """SDM "Format of the VM-Exit Interruption-Information Field": vector 7:0, type 10:8
    (3 hardware exception, 6 software exception), error code valid 11, valid 31."""
    return vector | itype << 8 | error_code << 11 | 1 << 31


HW, SW, NMI = 3, 6, 2


def io_exit(port: int, size: int, is_out: bool, count: int = 1) -> IoExit:
    return IoExit(port=port, size=size, is_out=is_out, count=count, data_offset=0x1000)


# --- the helpers' own encodings agree with the SDM ------------------------------------
def test_sdm_encodings_match_the_models():
    assert io_qual(0x80, 1, False, immediate=True) == 0x00800040
    assert io_qual(0x3F8, 1, True) == 0x03F80008
    assert io_qual(0x1F0, 2, True, string=True, rep=True) == 0x01F00039
    assert IoQualification(4, True, True, True, False, 0xCFC).encode() == \
        io_qual(0xCFC, 4, True, True, True, True)
    assert intr_info(14, HW, True) == 0x80000B0E
    assert intr_info(3, SW) == 0x80000603
    assert InterruptionInfo(Vector.BP, InterruptionType.SOFTWARE_EXCEPTION).encode() == 0x80000603


# --- I/O instructions -------------------------------------------------------------------
# id, code bits, code, port, size, is_out, count, string, rep, immediate
IO_CASES = [
    ("out-imm-al", 64, "e680", 0x80, 1, True, 1, False, False, True),
    ("out-imm-eax", 64, "e780", 0x80, 4, True, 1, False, False, True),
    ("out-imm-ax", 64, "66e780", 0x80, 2, True, 1, False, False, True),
    ("out-dx-al", 64, "ee", 0x3F8, 1, True, 1, False, False, False),
    ("out-dx-ax", 64, "66ef", 0x1CE, 2, True, 1, False, False, False),
    ("out-dx-eax", 64, "ef", 0xCF8, 4, True, 1, False, False, False),
    ("out-dx-port-ffff", 64, "ee", 0xFFFF, 1, True, 1, False, False, False),
    ("out-imm-al-32bit", 32, "e680", 0x80, 1, True, 1, False, False, True),
    ("out-dx-ax-16bit", 16, "ef", 0x1CE, 2, True, 1, False, False, False),
    ("in-imm-al", 64, "e460", 0x60, 1, False, 1, False, False, True),
    ("in-imm-eax-32bit", 32, "e571", 0x71, 4, False, 1, False, False, True),
    ("in-imm-ax-16bit", 16, "e560", 0x60, 2, False, 1, False, False, True),
    ("in-dx-al", 64, "ec", 0x3FD, 1, False, 1, False, False, False),
    ("in-dx-ax", 64, "66ed", 0x1F0, 2, False, 1, False, False, False),
    ("in-dx-ax-32bit", 32, "66ed", 0x1F0, 2, False, 1, False, False, False),
    ("in-dx-eax-16bit", 16, "66ed", 0xCFC, 4, False, 1, False, False, False),
    ("in-dx-eax", 64, "ed", 0xCFC, 4, False, 1, False, False, False),
    ("outsb", 64, "6e", 0x3F8, 1, True, 1, True, False, False),
    ("insw", 64, "666d", 0x1F0, 2, False, 1, True, False, False),
    ("rep-outsb", 64, "f36e", 0x3F8, 1, True, 7, True, True, False),
    ("rep-outsw", 64, "f3666f", 0x1CE, 2, True, 3, True, True, False),
    ("rep-insw", 64, "66f36d", 0x1F0, 2, False, 256, True, True, False),
    ("rep-insd-32bit", 32, "f36d", 0x1F0, 4, False, 128, True, True, False),
    ("rep-insb-16bit", 16, "f36c", 0x60, 1, False, 2, True, True, False),
    # the REP bit comes from the prefix: a REP string instruction with one item left
    ("rep-outsd-count-1", 64, "f36f", 0x80, 4, True, 1, True, True, False),
]


@pytest.mark.parametrize("bits, code, port, size, is_out, count, string, rep, immediate",
                         [c[1:] for c in IO_CASES], ids=[c[0] for c in IO_CASES])
def test_io_at_rip(bits, code, port, size, is_out, count, string, rep, immediate):
    """RIP at the instruction (VT-x hosts): qualification and length from the decoded instruction."""
    exit = io_exit(port, size, is_out, count)
    translation, info = translate(Mode.LONG, ExitKind.IO, exit, code_cpu(code, bits=bits),
                                  out_data=0xA5)
    assert translation == Translation(key=port)
    expect(info, reason=ExitReason.IO_INSTRUCTION,
           qualification=io_qual(port, size, not is_out, string, rep, immediate),
           instruction_length=len(bytes.fromhex(code)), raw_kvm_exit=exit,
           data=0xA5 if is_out else 0)
    assert info.io == IoQualification(size, not is_out, string, rep, not immediate, port)


# RIP already past the instruction (the PVM host's OUT exits).
IO_PAST_CASES = [
    pytest.param(64, "e680", 0x80, 1, True, 1, False, False, True, id="out-imm-al"),
    pytest.param(64, "e780", 0x80, 4, True, 1, False, False, True, id="out-imm-eax"),
    pytest.param(64, "ee", 0x3F8, 1, True, 1, False, False, False, id="out-dx-al"),
    pytest.param(64, "ef", 0xCF8, 4, True, 1, False, False, False, id="out-dx-eax"),
    pytest.param(32, "e680", 0x80, 1, True, 1, False, False, True, id="out-imm-al-32bit"),
    pytest.param(16, "e680", 0x80, 1, True, 1, False, False, True, id="out-imm-al-16bit"),
    pytest.param(64, "6e", 0x3F8, 1, True, 1, True, False, False, id="outsb"),
    pytest.param(64, "e460", 0x60, 1, False, 1, False, False, True, id="in-imm-al"),
    pytest.param(64, "ec", 0x3FD, 1, False, 1, False, False, False, id="in-dx-al"),
    pytest.param(64, "66ef", 0x1CE, 2, True, 1, False, False, False, id="out-dx-ax"),
    pytest.param(64, "66e780", 0x80, 2, True, 1, False, False, True, id="out-imm-ax"),
    pytest.param(64, "e6ef", 0xEF, 1, True, 1, False, False, True, id="out-imm-al-port-ef"),
    pytest.param(64, "f36e", 0x3F8, 1, True, 7, True, True, False, id="rep-outsb-count-7"),
    pytest.param(64, "66ed", 0x1F0, 2, False, 1, False, False, False, id="in-dx-ax"),
]


@pytest.mark.parametrize("bits, code, port, size, is_out, count, string, rep, immediate",
                         IO_PAST_CASES)
def test_io_rip_past_instruction(bits, code, port, size, is_out, count, string, rep, immediate):
    """Host quirk: RIP is already past the OUT; the instruction that ends at RIP is found."""
    raw = bytes.fromhex(code)
    exit = io_exit(port, size, is_out, count)
    cpu = code_cpu(raw, len(raw), bits=bits)
    translation, info = translate(Mode.LONG, ExitKind.IO, exit, cpu, out_data=0x5A)
    assert translation == Translation(key=port)
    expect(info, reason=ExitReason.IO_INSTRUCTION,
           qualification=io_qual(port, size, not is_out, string, rep, immediate),
           instruction_length=len(raw), raw_kvm_exit=exit, data=0x5A if is_out else 0)
    insn = Translator(Mode.LONG).io_instruction(cpu, exit)
    assert insn == IoInstruction(CODE, len(raw), string, rep, immediate)


def test_io_rip_past_out_followed_by_another_out():
    exit = io_exit(0x80, 1, True)
    cpu = code_cpu("e68066e770", 2)
    translation, info = translate(Mode.LONG, ExitKind.IO, exit, cpu, out_data=1)
    assert translation == Translation(key=0x80)
    expect(info, reason=ExitReason.IO_INSTRUCTION, qualification=io_qual(0x80, 1, False, immediate=True),
           instruction_length=2, raw_kvm_exit=exit, data=1)
    assert Translator(Mode.LONG).io_instruction(cpu, exit).start == CODE


def test_io_back_to_back_outs_at_rip():
    """Two OUTs in a row with RIP at the second: the one at RIP (a VT-x host) wins."""
    cpu = code_cpu("e680e680", 2)
    exit = io_exit(0x80, 1, True)
    assert Translator(Mode.LONG).io_instruction(cpu, exit) == IoInstruction(CODE + 2, 2, False, False, True)


# code the translator cannot decode: qualification from the exit alone, length 0
UNDECODABLE = {
    "unmapped": FakeCpu(rip=0x7000_0000),
    "no-io-instruction": code_cpu("90909090"),
    "other-direction": code_cpu("ec"),            # an IN where KVM reports an OUT (and vice versa)
}


@pytest.mark.parametrize("where", UNDECODABLE)
@pytest.mark.parametrize("is_out", [True, False], ids=["out", "in"])
@pytest.mark.parametrize("count", [1, 4])
def test_io_code_not_decodable(where, is_out, count):
    cpu = UNDECODABLE[where]
    if where == "other-direction" and not is_out:
        cpu = code_cpu("ee")
    exit = io_exit(0x3F8, 2, is_out, count)
    translation, info = translate(Mode.LONG, ExitKind.IO, exit, cpu, out_data=0x77)
    assert translation == Translation(key=0x3F8)
    # only a multi-item access is known to be a REP string instruction; operand "DX"
    expect(info, reason=ExitReason.IO_INSTRUCTION,
           qualification=io_qual(0x3F8, 2, not is_out, count > 1, count > 1),
           instruction_length=0, raw_kvm_exit=exit, data=0x77 if is_out else 0)


@pytest.mark.parametrize("code, rip_offset, before, after, port, is_out", [
    pytest.param("e680", 2, NOPS, b"", 0x80, True, id="out-ends-at-last-mapped-byte"),
    pytest.param("e460", 0, b"", HLTS, 0x60, False, id="in-at-first-mapped-byte"),
])
def test_io_at_mapping_edge(code, rip_offset, before, after, port, is_out):
    exit = io_exit(port, 1, is_out)
    cpu = code_cpu(code, rip_offset, before=before, after=after)
    translation, info = translate(Mode.LONG, ExitKind.IO, exit, cpu)
    assert translation == Translation(key=port)
    expect(info, reason=ExitReason.IO_INSTRUCTION,
           qualification=io_qual(port, 1, not is_out, immediate=True),
           instruction_length=2, raw_kvm_exit=exit)


def test_io_near_address_zero():
    """RIP below 4: the window starts at 0."""
    exit = io_exit(0x80, 1, True)
    cpu = code_cpu("e680", 2, base=0, before=b"", bits=16)
    translation, info = translate(Mode.REAL, ExitKind.IO, exit, cpu)
    assert translation == Translation(key=0x80)
    assert (info.instruction_length, info.qualification) == (2, io_qual(0x80, 1, False, immediate=True))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_io_same_in_every_mode(mode):
    exit = io_exit(0x3F8, 1, True)
    translation, info = translate(mode, ExitKind.IO, exit, code_cpu("ee"), out_data=ord("A"))
    assert translation == Translation(key=0x3F8)
    expect(info, reason=ExitReason.IO_INSTRUCTION, qualification=io_qual(0x3F8, 1, False),
           instruction_length=1, raw_kvm_exit=exit, data=ord("A"))


def test_find_io_instruction_and_io_qualification_directly():
    window = NOPS[:4] + bytes.fromhex("e680") + HLTS
    start = CODE - 4
    out = IoInstruction(CODE, 2, False, False, True)
    assert find_io_instruction(window, start, CODE, 64, True) == out
    assert find_io_instruction(window, start, CODE + 2, 64, True) == out     # RIP past it
    assert find_io_instruction(window, start, CODE, 64, False) is None
    rep = NOPS[:4] + bytes.fromhex("f36c") + HLTS
    assert find_io_instruction(rep, start, CODE, 64, False) == IoInstruction(CODE, 2, True, True, False)
    assert find_io_instruction(NOPS, CODE - 8, CODE, 64, True) is None
    insn = IoInstruction(CODE, 2, False, False, True)
    assert io_qualification(0x60, 1, False, 1, insn) == io_qual(0x60, 1, True, immediate=True)
    assert io_qualification(0x60, 4, True, 1) == io_qual(0x60, 4, False)
    assert io_qualification(0x60, 2, False, 9) == io_qual(0x60, 2, True, True, True)
    with pytest.raises(ValueError):
        io_qualification(0x60, 3, True, 1)


# --- the hypercall port -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("code, rip_offset, length", [
    ("e6f5", 0, 2), ("e6f5", 2, 2), ("ee", 0, 1), ("ee", 1, 1),
    pytest.param(None, 0, 0, id="unreadable"),
])
def test_hypercall(mode, code, rip_offset, length):
    cpu = code_cpu(code, rip_offset, rax=0x1_0000_0042) if code else FakeCpu(rip=0x7000_0000,
                                                                          rax=0x1_0000_0042)
    if mode is Mode.REAL and code:
        cpu = code_cpu(code, rip_offset, rax=0x1_0000_0042, bits=16, base=0x7C00)
    exit = io_exit(HYPERCALL_PORT, 1, True)
    translation, info = translate(mode, ExitKind.IO, exit, cpu, out_data=0x42)
    assert translation == Translation(key=0x1_0000_0042)       # the hypercall number: RAX
    expect(info, reason=ExitReason.EXECUTE_VMCALL, instruction_length=length, raw_kvm_exit=exit)


def test_in_from_hypercall_port_is_plain_io():
    exit = io_exit(HYPERCALL_PORT, 1, False)
    translation, info = translate(Mode.LONG, ExitKind.IO, exit, code_cpu("e4f5", rax=7))
    assert translation == Translation(key=HYPERCALL_PORT)
    expect(info, reason=ExitReason.IO_INSTRUCTION,
           qualification=io_qual(HYPERCALL_PORT, 1, True, immediate=True),
           instruction_length=2, raw_kvm_exit=exit)


# --- user-mode exception stubs ----------------------------------------------------------
USER_RIP, USER_RSP, USER_RFLAGS = 0x100040, 0x7FF0, 0x3206


def stub_cpu(vector: int, error_code: int = 0, *, rip: int = USER_RIP, cr2: int = 0,
             at: int | None = None, rsp: int = KERNEL_STACK_TOP - StubFrame.SIZE) -> FakeCpu:
    """The vCPU as the built-in kernel's stub for `vector` leaves it at its OUT (RIP past
    it, as the host reports): kernel stack holding vector, error code, iret frame."""
    frame = struct.pack("<7Q", vector, error_code, rip, SEL_USER_CODE64, USER_RFLAGS, USER_RSP,
                        SEL_USER_DATA)
    stub_rip = STUBS_ADDR + vector * STUB_SIZE + 9 if at is None else at
    return FakeCpu(rip=stub_rip, rsp=rsp, rax=0x1234, cr2=cr2,
                   memory=((rsp, frame), (CODE, HLTS)))


# vector, error code pushed, interruption type, error code valid, report rip offset, length
USER_EXCEPTIONS = [
    ("DE", Vector.DE, 0, HW, False, 0, 0),
    ("DB", Vector.DB, 0, HW, False, 0, 0),
    ("BP", Vector.BP, 0, SW, False, -1, 1),     # trap: reported at the int3, length 1
    ("OF", Vector.OF, 0, SW, False, -1, 1),     # trap: reported at the into, length 1
    ("UD", Vector.UD, 0, HW, False, 0, 0),
    ("DF", Vector.DF, 0, HW, True, 0, 0),       # error code 0, but valid
    ("GP", Vector.GP, 0x18, HW, True, 0, 0),
    ("SS", Vector.SS, 0, HW, True, 0, 0),
    ("AC", Vector.AC, 0, HW, True, 0, 0),
    ("XM", Vector.XM, 0, HW, False, 0, 0),
    ("PF", Vector.PF, 0x7, HW, True, 0, 0),
]


# while stepping only #DB changes (to MTF: test_user_db_while_stepping)
@pytest.mark.parametrize("vector, error_code, itype, has_error, back, length, stepping", [
    pytest.param(*c[1:], stepping, id=c[0] + ("-stepping" if stepping else ""))
    for stepping in (False, True) for c in USER_EXCEPTIONS if not (stepping and c[1] == Vector.DB)])
def test_user_exception(vector, error_code, itype, has_error, back, length, stepping):
    cr2 = 0xDEAD_B000
    exit = io_exit(EXCEPTION_PORT, 1, True)
    translation, info = translate(Mode.USER, ExitKind.IO, exit,
                                  stub_cpu(vector, error_code, cr2=cr2), stepping=stepping)
    rip = USER_RIP + back
    report = ExceptionReport(vector, error_code if has_error else None,
                             cr2 if vector == Vector.PF else None, rip)
    assert translation == Translation(key=int(vector),
                                      restore=RestoreUserFrame(rip, USER_RSP, USER_RFLAGS), step=False)
    assert exception_report(info, translation.restore.rip, cr2) == report
    expect(info, ignore=("qualification",) if vector == Vector.PF else (),
           reason=ExitReason.EXCEPTION_OR_NMI, interruption_info=intr_info(vector, itype, has_error),
           interruption_error_code=error_code if has_error else 0, instruction_length=length,
           raw_kvm_exit=exit)
    assert info.interruption == InterruptionInfo(vector, InterruptionType(itype), has_error)


def test_user_exception_without_error_code_ignores_the_pushed_zero_slot():
    """Stubs of vectors without an error code push their own 0; whatever is in the slot is
    not an error code."""
    translation, info = translate(Mode.USER, ExitKind.IO, io_exit(EXCEPTION_PORT, 1, True),
                                  stub_cpu(Vector.UD, 0x99))
    assert exception_report(info, translation.restore.rip, 0) == ExceptionReport(Vector.UD, None, None, USER_RIP)
    assert (info.interruption_info, info.interruption_error_code) == (intr_info(6, HW), 0)


def test_user_page_fault_qualification_is_the_linear_address():
    translation, info = translate(Mode.USER, ExitKind.IO, io_exit(EXCEPTION_PORT, 1, True),
                                  stub_cpu(Vector.PF, 0x6, cr2=0xDEAD_B008))
    assert info.qualification == 0xDEAD_B008


def test_user_nmi_is_interruption_type_nmi():
    translation, info = translate(Mode.USER, ExitKind.IO, io_exit(EXCEPTION_PORT, 1, True),
                                  stub_cpu(Vector.NMI))
    assert info.interruption_info == intr_info(2, NMI)


def test_user_db_while_stepping_is_mtf():
    exit = io_exit(EXCEPTION_PORT, 1, True)
    translation, info = translate(Mode.USER, ExitKind.IO, exit, stub_cpu(Vector.DB), stepping=True)
    assert translation == Translation(key=None, restore=RestoreUserFrame(USER_RIP, USER_RSP, USER_RFLAGS),
                                      step=True)
    expect(info, reason=ExitReason.MONITOR_TRAP_FLAG, raw_kvm_exit=exit)


def test_user_exception_frame_is_read_at_rsp():
    """The frame comes from guest memory at RSP (wherever the kernel stack pointer is)."""
    cpu = stub_cpu(Vector.GP, 0x10, rip=0x200123, rsp=0xE800)
    translation, info = translate(Mode.USER, ExitKind.IO, io_exit(EXCEPTION_PORT, 1, True), cpu)
    assert translation.restore == RestoreUserFrame(0x200123, USER_RSP, USER_RFLAGS)
    assert exception_report(info, translation.restore.rip, 0) == ExceptionReport(Vector.GP, 0x10, None, 0x200123)


@pytest.mark.parametrize("at", [STUBS_ADDR, STUBS_ADDR + 9, STUBS_END - 1],
                         ids=["first-byte", "vector-0-out", "last-byte"])
def test_user_stub_area_bounds_inside(at):
    translation, info = translate(Mode.USER, ExitKind.IO, io_exit(EXCEPTION_PORT, 1, True),
                                  stub_cpu(Vector.UD, at=at))
    assert info.reason == ExitReason.EXCEPTION_OR_NMI
    assert translation.key == Vector.UD


PLAIN_EXCEPTION_PORT = [(Mode.USER, STUBS_ADDR - 1), (Mode.USER, STUBS_END), (Mode.USER, CODE)] + \
    [(mode, STUBS_ADDR + 9) for mode in NON_USER_MODES]


@pytest.mark.parametrize("mode, at", PLAIN_EXCEPTION_PORT,
                         ids=[f"{m.value}-{a:#x}" for m, a in PLAIN_EXCEPTION_PORT])
def test_exception_port_outside_stubs_is_plain_io(mode, at):
    """EXCEPTION_PORT is an ordinary port outside the stub area and in the other modes."""
    cpu = stub_cpu(Vector.PF, 0x6, at=at)
    cpu = dataclasses.replace(cpu, memory=((at - 16, NOPS[:14] + b"\xe6\xf6" + HLTS),) + cpu.memory)
    exit = io_exit(EXCEPTION_PORT, 1, True)
    translation, info = translate(mode, ExitKind.IO, exit, cpu, out_data=0xE)
    assert translation == Translation(key=EXCEPTION_PORT)
    expect(info, reason=ExitReason.IO_INSTRUCTION,
           qualification=io_qual(EXCEPTION_PORT, 1, False, immediate=True),
           instruction_length=2, raw_kvm_exit=exit, data=0xE)


# --- HLT, shutdown, system event, MMIO, entry failure, MSRs, INTR -----------------------
@pytest.mark.parametrize("mode", ALL_MODES)
def test_hlt(mode):
    exit = HltExit()
    translation, info = translate(mode, ExitKind.HLT, exit, code_cpu("f4"))
    assert translation == Translation()
    expect(info, reason=ExitReason.EXECUTE_HLT, instruction_length=1, raw_kvm_exit=exit)


@pytest.mark.parametrize("kind, exit", [
    (ExitKind.SHUTDOWN, ShutdownExit()),
    (ExitKind.SYSTEM_EVENT, SystemEventExit(1, (0,))),       # KVM_SYSTEM_EVENT_SHUTDOWN
    (ExitKind.SYSTEM_EVENT, SystemEventExit(2, ())),         # KVM_SYSTEM_EVENT_RESET
    (ExitKind.SYSTEM_EVENT, SystemEventExit(3, (7, 8))),     # KVM_SYSTEM_EVENT_CRASH
], ids=["shutdown", "event-shutdown", "event-reset", "event-crash"])
def test_triple_fault(kind, exit):
    translation, info = translate(Mode.LONG, kind, exit, code_cpu("f4"))
    assert translation == Translation()
    expect(info, reason=ExitReason.TRIPLE_FAULT, raw_kvm_exit=exit)


@pytest.mark.parametrize("exit", [
    MmioExit(0xFEE0_0030, 4, False, b"\0\0\0\0"),
    MmioExit(0xC000_0000, 8, True, bytes(range(8))),
    MmioExit(0x1_0000_0000, 1, True, b"\x5a"),
], ids=["read", "write", "above-4g"])
def test_mmio_is_ept_misconfiguration(exit):
    translation, info = translate(Mode.LONG, ExitKind.MMIO, exit, code_cpu("8b00"))
    assert translation == Translation(key=exit.phys_addr)
    expect(info, reason=ExitReason.EPT_MISCONFIGURATION, guest_physical_address=exit.phys_addr,
           raw_kvm_exit=exit)


@pytest.mark.parametrize("hardware_reason", [0x8000_0021, 0x21])
def test_fail_entry_is_invalid_guest_state(hardware_reason):
    exit = FailEntryExit(hardware_reason, 1)
    translation, info = translate(Mode.LONG, ExitKind.FAIL_ENTRY, exit, code_cpu("90"))
    assert translation == Translation()
    # the qualification carries KVM's hardware reason (what stop_on_invalid_guest_state shows)
    expect(info, reason=ExitReason.INVALID_GUEST_STATE, qualification=hardware_reason,
           entry_failure=True, raw_kvm_exit=exit)
    assert info.full_reason == VM_ENTRY_FAILURE | 33 == 0x8000_0021


def test_fail_entry_msr_loading():
    translation, info = translate(Mode.LONG, ExitKind.FAIL_ENTRY, FailEntryExit(0x8000_0022, 0),
                                  code_cpu("90"))
    assert info.full_reason == 0x8000_0022


@pytest.mark.parametrize("kind, exit, reason, data", [
    (ExitKind.X86_RDMSR, MsrExit(False, 0xC000_0080, 0x5555, 2), ExitReason.EXECUTE_RDMSR, 0),
    (ExitKind.X86_RDMSR, MsrExit(False, 0x10, 0, 1), ExitReason.EXECUTE_RDMSR, 0),
    (ExitKind.X86_WRMSR, MsrExit(True, 0x1B, 0xFEE0_0900, 2), ExitReason.EXECUTE_WRMSR, 0xFEE0_0900),
    (ExitKind.X86_WRMSR, MsrExit(True, 0xC000_0100, 1 << 63 | 0x1234, 4), ExitReason.EXECUTE_WRMSR,
     1 << 63 | 0x1234),
], ids=["rdmsr-efer", "rdmsr-tsc", "wrmsr-apic-base", "wrmsr-fs-base-64bit"])
def test_msr(kind, exit, reason, data):
    translation, info = translate(Mode.LONG, kind, exit, code_cpu("0f32" if data == 0 else "0f30"))
    assert translation == Translation(key=exit.index)
    expect(info, reason=reason, instruction_length=2, msr=exit.index, data=data, raw_kvm_exit=exit)


def test_intr_with_deadline_is_preemption_timer():
    translation, info = translate(Mode.LONG, ExitKind.INTR, None, code_cpu("90"), deadline_expired=True)
    assert translation == Translation()
    expect(info, reason=ExitReason.VMX_PREEMPTION_TIMER_EXPIRED)


@pytest.mark.parametrize("stepping", [False, True])
def test_intr_without_deadline_is_no_exit(stepping):
    cpu = code_cpu("90")
    cpu_before = copy.deepcopy(cpu)
    info = dirty_info()
    assert Translator(Mode.LONG).translate(ExitKind.INTR, None, cpu, info, stepping=stepping) is None
    assert fields(info) == fields(dirty_info())
    assert cpu == cpu_before


# --- KVM guest debug --------------------------------------------------------------------
DR6_B0 = 0xFFFF_0FF1        # DR6 with B0 set (bit 16, RTM, reads 1 outside RTM regions)
DR6_BS = 0xFFFF_4FF0        # DR6 with BS (single step) set


@pytest.mark.parametrize("mode", ALL_MODES)
def test_debug_db_while_stepping_is_mtf(mode):
    exit = DebugExit(Vector.DB, CODE + 1, DR6_BS, 0x400)
    translation, info = translate(mode, ExitKind.DEBUG, exit, code_cpu("90", 1), stepping=True)
    assert translation == Translation(key=None, restore=None, step=True)
    expect(info, reason=ExitReason.MONITOR_TRAP_FLAG, raw_kvm_exit=exit)


@pytest.mark.parametrize("vector, itype, stepping", [
    (Vector.DB, HW, False),
    (Vector.BP, SW, False),
    (Vector.BP, SW, True),        # a breakpoint while stepping is still a breakpoint
], ids=["db", "bp", "bp-stepping"])
def test_debug_exception(vector, itype, stepping):
    exit = DebugExit(vector, CODE, DR6_B0 if vector == Vector.DB else 0xFFFF_0FF0, 0x401)
    translation, info = translate(Mode.LONG, ExitKind.DEBUG, exit, code_cpu("cc"), stepping=stepping)
    assert translation == Translation(key=int(vector), restore=None, step=False)
    assert exception_report(info, exit.pc, 0) == ExceptionReport(vector, None, None, CODE)
    expect(info, ignore=("qualification", "instruction_length"),
           reason=ExitReason.EXCEPTION_OR_NMI, interruption_info=intr_info(vector, itype), raw_kvm_exit=exit)
    assert info.interruption == InterruptionInfo(vector, InterruptionType(itype))


def test_debug_db_qualification_from_dr6():
    exit = DebugExit(Vector.DB, CODE, DR6_B0, 0x401)
    translation, info = translate(Mode.LONG, ExitKind.DEBUG, exit, code_cpu("90"))
    assert info.qualification == 0x1


@pytest.mark.parametrize("slot", range(4))
@pytest.mark.parametrize("stepping", [False, True], ids=["running", "stepping"])
def test_debug_register_breakpoint_is_db_with_its_b_bit(slot, stepping):
    """A DR0-DR3 instruction breakpoint (DR6.Bn, SDM 18.2.3) is a #DB exception exit whose
    qualification names the slot (SDM 27.2.1), also while a step is under way: the
    instruction at RIP has not executed, so it is no step completion."""
    exit = DebugExit(Vector.DB, CODE, 0xFFFF_0FF0 | 1 << slot, 0x400 | 1 << 2 * slot)
    translation, info = translate(Mode.LONG, ExitKind.DEBUG, exit, code_cpu("90"), stepping=stepping)
    assert translation == Translation(key=int(Vector.DB), restore=None, step=False)
    expect(info, reason=ExitReason.EXCEPTION_OR_NMI, qualification=1 << slot, instruction_length=0,
           interruption_info=intr_info(Vector.DB, HW), raw_kvm_exit=exit)


def test_debug_db_exception_has_no_instruction_length():
    exit = DebugExit(Vector.DB, CODE, DR6_B0, 0x401)
    translation, info = translate(Mode.LONG, ExitKind.DEBUG, exit, code_cpu("90"))
    assert info.instruction_length == 0


def test_debug_bp_instruction_length():
    exit = DebugExit(Vector.BP, CODE, 0xFFFF_0FF0, 0x400)
    translation, info = translate(Mode.LONG, ExitKind.DEBUG, exit, code_cpu("cc"))
    assert info.instruction_length == 1


# --- internal errors --------------------------------------------------------------------
def emulation_failure(code: bytes | str, flags: int = 1,
                      suberror: int = InternalErrorKind.EMULATION) -> InternalErrorExit:
    """KVM_INTERNAL_ERROR_EMULATION with the instruction bytes (flag bit 0 of data[0]):
    data[1..2] hold the length byte, then up to 15 bytes."""
    if isinstance(code, str):
        code = bytes.fromhex(code)
    raw = (bytes([len(code)]) + code).ljust(16, b"\0")
    return InternalErrorExit(suberror, (flags, int.from_bytes(raw[:8], "little"),
                                        int.from_bytes(raw[8:], "little")))


@pytest.mark.parametrize("code", ["cc", "cc90", "cc0f0b909090909090909090909090"],
                         ids=["int3", "int3-nop", "int3-15-bytes"])
@pytest.mark.parametrize("mode", [Mode.REAL, Mode.PROTECTED, Mode.LONG])
def test_emulation_failure_int3_is_breakpoint(code, mode):
    exit = emulation_failure(code)
    bits = {Mode.REAL: 16, Mode.PROTECTED: 32, Mode.LONG: 64}[mode]
    cpu = code_cpu(code[:2], bits=bits, base=0x7C00 if mode is Mode.REAL else CODE)
    translation, info = translate(mode, ExitKind.INTERNAL_ERROR, exit, cpu)
    assert translation == Translation(key=int(Vector.BP), restore=None, step=False)
    assert exception_report(info, cpu.rip, 0) == ExceptionReport(Vector.BP, None, None, cpu.rip)
    expect(info, reason=ExitReason.EXCEPTION_OR_NMI, instruction_length=1,
           interruption_info=intr_info(3, SW), raw_kvm_exit=exit)


@pytest.mark.parametrize("exit, bits, words", [
    (emulation_failure("0f0b"), 64, ["0f 0b", "ud2"]),
    (emulation_failure("0f01c1"), 64, ["0f 01 c1", "vmcall"]),
    (emulation_failure("66ed"), 32, ["66 ed", "in ax, dx"]),
    (emulation_failure("66ed"), 16, ["66 ed", "in eax, dx"]),
    (emulation_failure("90cc"), 64, ["90 cc", "nop", "EMULATION"]),     # int3 not first
    (emulation_failure("cc", flags=0), 64, ["no instruction bytes reported", "EMULATION"]),
    (emulation_failure(""), 64, ["no instruction bytes reported"]),
    (InternalErrorExit(InternalErrorKind.DELIVERY_EV, (0x80000b0e, 0, 0)), 64,
     ["no instruction bytes reported", "DELIVERY_EV"]),
    (emulation_failure("cc", suberror=InternalErrorKind.SIMUL_EX), 64, ["SIMUL_EX"]),
    (InternalErrorExit(99, ()), 64, ["suberror 99"]),
], ids=["ud2", "vmcall", "in-ax-32bit", "in-eax-16bit", "int3-second", "no-bytes-flag",
        "empty", "delivery-ev", "simul-ex", "unknown-suberror"])
def test_internal_error_is_guest_fault(exit, bits, words):
    cpu = code_cpu("90", bits=bits, base=0x10_2030)
    cpu_before, exit_before = copy.deepcopy(cpu), copy.deepcopy(exit)
    info = dirty_info()
    with pytest.raises(GuestFault) as caught:
        Translator(Mode.LONG).translate(ExitKind.INTERNAL_ERROR, exit, cpu, info)
    message = str(caught.value)
    assert "rip=0x102030" in message
    for word in words:
        assert word in message
    assert fields(info) == fields(dirty_info())
    assert (cpu, exit) == (cpu_before, exit_before)


def test_guest_fault_is_a_minivmm_error():
    from minivmm.errors import MinivmmError
    assert issubclass(GuestFault, MinivmmError) and issubclass(GuestFault, RuntimeError)


def test_memory_fault_is_an_ept_violation_of_unknown_access():
    """KVM_EXIT_MEMORY_FAULT (KVM could not map guest memory for an access): an EPT violation
    at the GPA, qualification 0 (KVM does not say which access)."""
    exit = MemoryFaultExit(0, 0x18_0000, 0x1000)
    translation, info = translate(Mode.LONG, ExitKind.MEMORY_FAULT, exit, code_cpu("90"))
    assert translation == Translation(key=0x18_0000)
    expect(info, reason=ExitReason.EPT_VIOLATION, guest_physical_address=0x18_0000, raw_kvm_exit=exit)


# --- exits minivmm does not translate ---------------------------------------------------
@pytest.mark.parametrize("kind, exit, name", [
    (ExitKind.HYPERCALL, HypercallExit(0, (1, 2)), "HYPERCALL"),
    (ExitKind.UNKNOWN, None, "UNKNOWN"),
    (ExitKind.IRQ_WINDOW_OPEN, None, "IRQ_WINDOW_OPEN"),
    (1234, None, "1234"),
], ids=["hypercall", "unknown", "irq-window", "not-a-kind"])
def test_unexpected_exit_kind_is_a_guest_fault(kind, exit, name):
    raises_untouched(Mode.LONG, kind, exit, code_cpu("90"), GuestFault, f"unexpected KVM exit {name}\\b")


# --- MMIO exits and failed fetches against the EPT model ---------------------------------
RAM_PAGE, DEVICE_PAGE = 0x18_0000, 0xFEC0_0000


@dataclass(frozen=True)
class FakeEpt:
    """An EptView over page -> rights tables; frozen, so the translator cannot change it."""
    rights_of: tuple[tuple[int, int], ...] = ((RAM_PAGE, 0b001),)     # page -> effective rights
    base_of: tuple[tuple[int, int], ...] = ()                          # page -> protect() rights
    monitors: frozenset[int] = frozenset()
    devices: frozenset[int] = frozenset({DEVICE_PAGE})
    holes: frozenset[int] = frozenset({RAM_PAGE})                      # pages without a memslot
    stepping: frozenset[int] = frozenset()
    breakpoints: frozenset[int] = frozenset()
    retried_rip: int | None = None

    def managed(self, gpa: int) -> bool:
        return gpa & ~0xFFF in dict(self.rights_of)

    def has_device(self, gpa: int) -> bool:
        return gpa & ~0xFFF in self.devices

    def rights(self, gpa: int) -> int:
        return dict(self.rights_of)[gpa & ~0xFFF]

    def base_rights(self, gpa: int) -> int:
        return dict(self.base_of).get(gpa & ~0xFFF, 7)

    def monitored(self, gpa: int) -> bool:
        return gpa & ~0xFFF in self.monitors

    def mapped_for_fetch(self, gpa: int) -> bool:
        return gpa & ~0xFFF not in self.holes and gpa & ~0xFFF not in self.stepping

    def planted(self, gpa: int) -> bool:
        return gpa in self.breakpoints

    def refetch_due(self, rip: int) -> bool:
        return rip != self.retried_rip


GLA_BITS = 1 << 7 | 1 << 8


@pytest.mark.parametrize("rights, is_write, gla, qualification", [
    (0b001, True, 0x4000_0010, 0b010 | 0b001 << 3 | GLA_BITS),     # write to r--
    (0b000, False, 0x4000_0010, 0b001 | GLA_BITS),                  # read of ---
    (0b100, False, None, 0b001 | 0b100 << 3),                       # read of --x, linear unknown
    (0b100, True, None, 0b010 | 0b100 << 3),
], ids=["write-r", "read-none", "read-x-no-gla", "write-x-no-gla"])
def test_mmio_against_ept_is_a_violation(rights, is_write, gla, qualification):
    """SDM 28.2.1 table 28-7: access in bits 0-2, the page's rights in 3-5, the linear
    address's validity in 7-8; a write's value is info.data."""
    gpa = RAM_PAGE + 0x10
    exit = MmioExit(gpa, 4, is_write, b"\x44\x33\x22\x11" if is_write else b"\0" * 4)
    cpu = dataclasses.replace(code_cpu("90"), linear=((gpa, gla),) if gla is not None else ())
    translation, info = translate(Mode.LONG, ExitKind.MMIO, exit, cpu,
                                  ept=FakeEpt(rights_of=((RAM_PAGE, rights),)))
    assert translation == Translation(key=gpa, ept=EptStep.VIOLATION)
    expect(info, reason=ExitReason.EPT_VIOLATION, qualification=qualification, guest_physical_address=gpa,
           guest_linear_address=gla or 0, raw_kvm_exit=exit, data=0x11223344 if is_write else 0)


@pytest.mark.parametrize("ept, gpa, is_write, step", [
    (FakeEpt(rights_of=((RAM_PAGE, 0b011),)), RAM_PAGE, True, EptStep.EMULATE),       # allowed: a hole for no-X
    (FakeEpt(rights_of=((RAM_PAGE, 0b001),), monitors=frozenset({RAM_PAGE})), RAM_PAGE + 8, True,
     EptStep.MONITOR),
    (FakeEpt(rights_of=((RAM_PAGE, 0b000),), monitors=frozenset({RAM_PAGE})), RAM_PAGE, False,
     EptStep.MONITOR),
    (FakeEpt(), DEVICE_PAGE + 4, False, EptStep.DEVICE),
], ids=["emulate", "monitor-write", "monitor-read", "device"])
def test_mmio_against_ept_continuations(ept, gpa, is_write, step):
    """Exits the EPT model carries out itself leave the ExitInfo as it was."""
    exit = MmioExit(gpa, 8, is_write, bytes(8))
    translation, info = translate(Mode.LONG, ExitKind.MMIO, exit, code_cpu("90"), ept=ept)
    assert translation == Translation(key=gpa, ept=step)
    assert fields(info) == fields(dirty_info())


def test_monitor_without_the_base_right_is_a_violation():
    """A page protect()ed read-only and write-monitored: a write is the guest's violation."""
    ept = FakeEpt(rights_of=((RAM_PAGE, 0b001),), base_of=((RAM_PAGE, 0b001),), monitors=frozenset({RAM_PAGE}))
    translation, info = translate(Mode.LONG, ExitKind.MMIO, MmioExit(RAM_PAGE, 1, True, b"\x01"),
                                  code_cpu("90"), ept=ept)
    assert translation.ept is EptStep.VIOLATION and info.reason == ExitReason.EPT_VIOLATION


def test_mmio_outside_ept_and_devices_is_a_misconfiguration():
    exit = MmioExit(0xE000_0000, 4, False, bytes(4))
    translation, info = translate(Mode.LONG, ExitKind.MMIO, exit, code_cpu("90"), ept=FakeEpt())
    assert translation == Translation(key=0xE000_0000)
    expect(info, reason=ExitReason.EPT_MISCONFIGURATION, guest_physical_address=0xE000_0000, raw_kvm_exit=exit)


def fetch_cpu(linear: int, gpa: int) -> FakeCpu:
    return dataclasses.replace(code_cpu("90"), fetch=(linear, gpa))


@pytest.mark.parametrize("rights, base, step", [
    (0b001, 0b111, EptStep.STEP_THROUGH),       # X taken by a hidden execute hook only
    (0b100, 0b100, EptStep.STEP_THROUGH),       # execute-only: a hole, but allowed
    (0b011, 0b011, EptStep.FETCH_VIOLATION),
], ids=["hidden-hook", "execute-only", "no-x"])
def test_failed_fetch_from_a_hole(rights, base, step):
    gpa = RAM_PAGE + 0x20
    exit = emulation_failure("90")
    ept = FakeEpt(rights_of=((RAM_PAGE, rights),), base_of=((RAM_PAGE, base),))
    translation, info = translate(Mode.LONG, ExitKind.INTERNAL_ERROR, exit, fetch_cpu(0x7000_0020, gpa), ept=ept)
    assert translation == Translation(key=gpa, ept=step)
    if step is EptStep.FETCH_VIOLATION:
        expect(info, reason=ExitReason.EPT_VIOLATION, qualification=0b100 | rights << 3 | GLA_BITS,
               guest_physical_address=gpa, guest_linear_address=0x7000_0020, raw_kvm_exit=exit)
    else:
        assert fields(info) == fields(dirty_info())


def test_failed_fetch_from_a_mapped_page():
    """Not about EPT rights: a planted int3 is #BP, a first failure after a memslot change is
    fetched again, a repeated one is the ordinary emulation failure."""
    gpa = RAM_PAGE + 0x30
    cpu = fetch_cpu(gpa, gpa)
    mapped = FakeEpt(holes=frozenset(), breakpoints=frozenset({gpa}))
    translation, info = translate(Mode.LONG, ExitKind.INTERNAL_ERROR, emulation_failure("90"), cpu, ept=mapped)
    assert translation == Translation(key=int(Vector.BP))
    assert info.reason == ExitReason.EXCEPTION_OR_NMI and info.instruction_length == 1
    mapped = FakeEpt(holes=frozenset())
    translation, _ = translate(Mode.LONG, ExitKind.INTERNAL_ERROR, emulation_failure("90"), cpu, ept=mapped)
    assert translation == Translation(ept=EptStep.REFETCH)
    retried = FakeEpt(holes=frozenset(), retried_rip=cpu.rip)
    raises_untouched(Mode.LONG, ExitKind.INTERNAL_ERROR, emulation_failure("90"), cpu, GuestFault,
                     "could not emulate", ept=retried)


def test_failed_fetch_outside_ept_is_the_ordinary_failure():
    cpu = fetch_cpu(0x9000, 0x9000)
    raises_untouched(Mode.LONG, ExitKind.INTERNAL_ERROR, emulation_failure("0f0b"), cpu, GuestFault,
                     "ud2", ept=FakeEpt())
    raises_untouched(Mode.LONG, ExitKind.INTERNAL_ERROR, emulation_failure("0f0b"),
                     dataclasses.replace(cpu, fetch=None), GuestFault, "ud2", ept=FakeEpt())
