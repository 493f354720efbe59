"""KVM_RUN with its exit packed into one integer: the compiled function and its Python twin agree."""
from __future__ import annotations

import pytest

from minivmm import fastpath

pytestmark = pytest.mark.kvm

GUEST = """
    mov $0x1234, %ax
    out %al, $0x80            # 1-byte OUT, immediate port
    mov $0x3f8, %dx
    out %ax, %dx              # 2-byte OUT
    mov $0xdeadbeef, %eax
    out %eax, $0x84           # 4-byte OUT, data with bit 31 set
    in $0x81, %al             # IN
    hlt
"""


def packed_exits(make_machine, function_for) -> list[int]:
    machine = make_machine(mode="protected")
    machine.load_asm(GUEST)
    machine.setup()
    vcpu = machine.vcpu
    vcpu.flush()
    function, argument = function_for(vcpu.fd.run_mmap)
    results = []
    while True:
        packed = function(vcpu.fd.fd, argument)
        results.append(packed)
        if packed < fastpath.IO_TAG:
            return results


def test_compiled_function_is_built_here() -> None:
    assert fastpath.COMPILED, "cffi could not build minivmm.fastpath (gcc and Python headers are needed)"


def test_compiled_and_python_agree_on_every_exit(make_machine) -> None:
    compiled = packed_exits(make_machine, fastpath.run_packed_for)
    python = packed_exits(make_machine, lambda mm: (fastpath._python_run_packed, mm))
    assert compiled == python
    io = [p for p in compiled if p >= fastpath.IO_TAG]
    decoded = [(p >> 32 & 0xFFFF, p >> 48 & 0xF, p >> 52 & 1, p & 0xFFFFFFFF) for p in io]
    assert decoded == [(0x80, 1, 1, 0x34), (0x3F8, 2, 1, 0x1234), (0x84, 4, 1, 0xDEADBEEF), (0x81, 1, 0, 0)]
    assert compiled[-1] == 5                 # KVM_EXIT_HLT


def test_errors_come_back_as_negative_errno(make_machine) -> None:
    machine = make_machine(mode="protected")
    machine.load_asm(GUEST)
    machine.setup()
    vcpu = machine.vcpu
    vcpu.flush()
    vcpu.fd.run.immediate_exit = 1
    function, argument = fastpath.run_packed_for(vcpu.fd.run_mmap)
    assert function(vcpu.fd.fd, argument) == -4          # EINTR
    vcpu.fd.run.immediate_exit = 1
    assert fastpath._python_run_packed(vcpu.fd.fd, vcpu.fd.run_mmap) == -4
