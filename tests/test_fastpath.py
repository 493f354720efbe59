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
    assert fastpath.COMPILED, f"cffi could not build minivmm.fastpath: {fastpath.BUILD_ERROR}"


def test_compiled_and_python_agree_on_every_exit(make_machine) -> None:
    compiled = packed_exits(make_machine, fastpath.run_packed_for)
    python = packed_exits(make_machine, lambda mm: (fastpath._python_run_packed, mm))
    assert compiled == python
    io = [p for p in compiled if p >= fastpath.IO_TAG]
    decoded = [(port, size, int(is_out), data) for port, size, is_out, _, data in map(fastpath.unpack_io, io)]
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


@pytest.mark.parametrize("compiled", [True, False])
def test_snapshot_restore_in_c_and_in_python_agree(make_machine, monkeypatch, compiled: bool) -> None:
    from minivmm.snapshot import Snapshot
    if not compiled:
        monkeypatch.setattr(fastpath, "COMPILED", False)
    machine = make_machine(mode="user", memory="8M")
    machine.load_asm("""
        mov $0x300000, %rdi
        mov $5, %ecx
    1:  movq %rcx, (%rdi)
        add $0x1000, %rdi
        dec %ecx
        jnz 1b
        movq $7, 0x700ff8           # the last page of RAM
        EXIT 0
    """)
    machine.setup()
    snapshot = Snapshot.take(machine)
    before = machine.memory.read(0, 8 << 20)
    assert machine.run(timeout=5).exit_code == 0
    assert machine.memory.read(0x300000, 8) == (5).to_bytes(8, "little")
    pages = snapshot.restore(machine)
    assert machine.memory.read(0, 8 << 20) == before
    assert 6 <= pages <= 16                      # the guest's pages, page tables and stack
    assert machine.run(timeout=5).exit_code == 0   # and it runs again from the snapshot
