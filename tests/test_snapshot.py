"""Snapshots: restore gives back exactly the snapshot state; files round-trip; corruption is rejected."""
from __future__ import annotations

import ctypes
import hashlib

import pytest

from minivmm.exits import ExitReason
from minivmm.snapshot import MAGIC, MSR_IA32_TSC, Snapshot, SnapshotError

pytestmark = pytest.mark.kvm

MSR_KERNEL_GS_BASE = 0xC0000102
MSR_SYSENTER_EIP = 0x176

# A user-mode (CPL 3) guest that changes memory (two pages), general registers and
# SSE state (movq to xmm0), makes a hypercall whose handler changes two MSRs (CPL-3
# code cannot), prints, then reports through debug-exit.
CHANGER = r"""
.include "minivmm.inc"
.globl _start
_start:
    movabs $0x1122334455667788, %rax
    movq %rax, %xmm0
    mov %rax, data
    mov %rax, data2
    mov $0x77, %eax
    outb %al, $HYPERCALL_PORT
    mov $42, %rbx
    mov $43, %r15
    PUTS msg
    EXIT 7
1:  jmp 1b
msg: .asciz "changed\n"
.balign 4096
data: .quad 0
.balign 4096
data2: .quad 0
"""


def _machine(make_machine, memory: str = "4M"):
    m = make_machine("user", memory)
    m.load_asm(CHANGER)

    def change_msrs(vcpu, info):
        vcpu.fd.set_msrs({MSR_KERNEL_GS_BASE: 0x1234_deadbeef, MSR_SYSENTER_EIP: 0x5678})

    m.on(ExitReason.EXECUTE_VMCALL, change_msrs, number=0x77)
    return m


def _state(snap: Snapshot) -> dict[str, bytes]:
    st = snap.vcpu
    out = {name: bytes(getattr(st, name)) for name in ("regs", "sregs", "fpu", "debugregs", "events")}
    if st.xsave is not None:
        out["xsave"] = bytes(st.xsave)
    if st.xcrs is not None:
        out["xcrs"] = bytes(st.xcrs)
    out["msrs"] = repr(sorted((k, v) for k, v in st.msrs.items() if k != MSR_IA32_TSC)).encode()
    out["mp_state"] = bytes([st.mp_state])
    for r in snap.regions:
        out[f"mem@{r.layout.gpa:#x}"] = hashlib.sha256(ctypes.string_at(r.host_addr, r.layout.size)).digest()
    return out


def test_restore_after_a_run_gives_identical_state(make_machine) -> None:
    m = _machine(make_machine, "4M")
    snap = Snapshot.take(m)
    before = _state(snap)
    result = m.run(timeout=10)
    assert (result.reason, result.exit_code, result.console) == ("exit", 7, "changed\n")
    fd = m.vcpu.fd
    assert fd.get_msrs([MSR_KERNEL_GS_BASE])[MSR_KERNEL_GS_BASE] == 0x1234_deadbeef
    assert bytes(fd.get_fpu().xmm[0])[:8] == (0x1122334455667788).to_bytes(8, "little")
    data = m.symbol("data")
    assert m.memory.read_u64(data) == 0x1122334455667788

    pages = snap.restore(m, full=True)
    assert pages >= 2
    assert m.memory.read_u64(data) == 0 and m.memory.read_u64(m.symbol("data2")) == 0
    assert m.serial.text == "" and not m.debug_exit.exit_requested
    after = Snapshot.take(m)
    try:
        assert _state(after).keys() == before.keys()
        for key, value in _state(after).items():
            assert value == before[key], f"{key} differs after restore"
        # The TSC was put back to the snapshot value (it keeps counting afterwards).
        if snap.vcpu.tsc is not None:
            assert after.vcpu.tsc - snap.vcpu.tsc < 1_000_000_000 * 60
    finally:
        after.close()

    # And the machine runs again from the snapshot point with the same result.
    result = m.run(timeout=10)
    assert (result.reason, result.exit_code, result.console) == ("exit", 7, "changed\n")
    snap.close()


def test_fast_restore_copies_only_dirty_pages(make_machine) -> None:
    m = _machine(make_machine, "16M")
    snap = Snapshot.take(m)
    m.run(timeout=10)
    pages = snap.restore(m, fpu=True)
    assert 2 <= pages < 16, pages
    assert bytes(m.vcpu.fd.get_fpu().xmm[0]) == bytes(16)        # two data pages, a stack page, page-table A/D bits
    assert m.memory.read_u64(m.symbol("data")) == 0
    assert m.vcpu.rip == snap.vcpu.regs.rip and m.vcpu.rbx == snap.vcpu.regs.rbx
    result = m.run(timeout=10)
    assert (result.reason, result.exit_code) == ("exit", 7)
    assert snap.restore(m) >= 2
    assert snap.restore(m) == 0          # nothing ran: nothing dirty
    snap.close()


def test_host_writes_are_restored_when_marked(make_machine) -> None:
    m = _machine(make_machine, "2M")
    snap = Snapshot.take(m)
    data = m.symbol("data")
    m.memory.write_u64(data, 99)
    snap.mark_dirty(data, 8)
    snap.restore(m)
    assert m.memory.read_u64(data) == 0
    snap.patch(data, (5).to_bytes(8, "little"))
    snap.restore_range(m, data, 8)
    assert m.memory.read_u64(data) == 5
    snap.close()


def test_file_round_trip_into_a_new_machine(make_machine, tmp_path) -> None:
    m = _machine(make_machine, "2M")
    snap = Snapshot.take(m)
    path = tmp_path / "state.snap"
    snap.save(path)
    assert path.read_bytes()[:8] == MAGIC
    loaded = Snapshot.load(path)
    assert _state(loaded) == _state(snap)

    other = make_machine("user", "2M")         # nothing loaded: everything comes from the file
    loaded.restore(other)
    result = other.run(timeout=10)
    assert (result.reason, result.exit_code, result.console) == ("exit", 7, "changed\n")
    assert other.memory.read_u64(m.symbol("data")) == 0x1122334455667788
    loaded.restore(other)
    assert other.memory.read_u64(m.symbol("data")) == 0
    with pytest.raises(SnapshotError, match="memory layout"):
        loaded.restore(make_machine("user", "4M"))
    snap.close()
    loaded.close()


def test_corrupt_or_foreign_files_are_rejected(make_machine, tmp_path) -> None:
    m = _machine(make_machine, "2M")
    snap = Snapshot.take(m)
    path = tmp_path / "state.snap"
    snap.save(path)
    snap.close()
    good = path.read_bytes()

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    path.write_bytes(bytes(flipped))
    with pytest.raises(SnapshotError, match="checksum"):
        Snapshot.load(path)

    path.write_bytes(b"\x7fELF" + good[4:])
    with pytest.raises(SnapshotError, match="magic"):
        Snapshot.load(path)

    path.write_bytes(good[:8] + (99).to_bytes(4, "little") + good[12:])
    with pytest.raises(SnapshotError, match="version 99"):
        Snapshot.load(path)

    path.write_bytes(good[: len(good) - 100])
    with pytest.raises(SnapshotError):
        Snapshot.load(path)

    with pytest.raises(SnapshotError, match="cannot read"):
        Snapshot.load(tmp_path / "missing.snap")


def test_restore_with_two_ram_regions(make_machine) -> None:
    m = make_machine("long", "2M")
    m.add_ram(0x1000000, "64K", name="high")
    m.load_asm(r"""
.include "minivmm.inc"
.globl _start
_start:
    movl $0x12345678, 0x1000000
    movl $0x9abcdef0, 0x100f000
    movl $1, data
    EXIT 1
data: .long 0
""")
    snap = Snapshot.take(m)
    assert m.run(timeout=10).exit_code == 1
    assert m.memory.read_u32(0x1000000) == 0x12345678
    assert snap.restore(m) >= 3
    assert m.memory.read_u32(0x1000000) == 0 and m.memory.read_u32(0x100F000) == 0
    assert m.memory.read_u32(m.symbol("data")) == 0
    assert m.run(timeout=10).exit_code == 1
    snap.close()


def test_restore_after_special_registers_changed(make_machine) -> None:
    """A run that changes sregs (here: a host-side CR change) is undone too, events included."""
    m = _machine(make_machine, "2M")
    snap = Snapshot.take(m)
    m.run(timeout=10)
    m.vcpu.cr8 = 5
    m.vcpu.flush()
    snap.restore(m)
    assert m.vcpu.cr8 == 0
    result = m.run(timeout=10)
    assert (result.reason, result.exit_code) == ("exit", 7)
    assert m.vcpu.fd.get_sregs().cr8 == 0
    snap.close()
