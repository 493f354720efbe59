"""EPT shadow: permissions realised on KVM, violations, hooks and dirty tracking, with real guests."""
from __future__ import annotations

import pytest

from minivmm.actions import RESUME, RETRY, Stop
from minivmm.ept_shadow import EptError, EptFlag, EptTables, Perm, host_backend, parse_perms
from minivmm.exits import EptViolationQualification
from minivmm.exits import ExitReason

pytestmark = pytest.mark.kvm

CODE = 0x100000
DATA = 0x180000          # inside the first 2 MiB page, a page of its own
DATA2 = 0x250000         # in the second 2 MiB page


def user_machine(make_machine, source: str, memory: str = "4M"):
    m = make_machine(mode="user", memory=memory)
    m.load_asm(".globl _start\n_start:\n" + source)
    return m


# --- dirty tracking ---------------------------------------------------------------------
DIRTY_GUEST = f"""
    movb $1, {DATA:#x}
    movq $2, {DATA + 0x1008:#x}
    movl $3, {DATA2:#x}
    mov $0, %al
    out %al, $0xf4
    movb $4, {DATA + 0x3000:#x}
    mov $0, %al
    out %al, $0xf4
"""


def guest_pages(pages: list[int]) -> list[int]:
    """Dirty pages outside the system area (the CPU sets A/D bits in the page tables there)."""
    return [p for p in pages if p >= 0x10000]


def test_dirty_pages_are_exactly_the_pages_the_guest_wrote(make_machine) -> None:
    m = user_machine(make_machine, DIRTY_GUEST)
    ept = m.ept
    ept.enable_dirty_logging()
    assert ept.dirty_pages() == []
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert guest_pages(ept.dirty_pages(clear=False)) == [DATA, DATA + 0x1000, DATA2]
    assert guest_pages(ept.dirty_pages()) == [DATA, DATA + 0x1000, DATA2]
    assert guest_pages(ept.dirty_pages()) == []
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert guest_pages(ept.dirty_pages()) == [DATA + 0x3000]
    assert m.memory.read(DATA + 0x3000, 1) == b"\x04"


def test_dirty_log_survives_slot_splits(make_machine) -> None:
    m = user_machine(make_machine, DIRTY_GUEST)
    ept = m.ept
    ept.enable_dirty_logging()
    assert m.run(timeout=10).reason == "exit"
    # split the memslot around an unrelated page: the log of the old slot must not be lost
    ept.protect(DATA + 0x5000, 0x1000, "r-x")
    ept.protect(DATA2 + 0x8000, 0x2000, "---")
    ept.invept()
    assert guest_pages(ept.dirty_pages()) == [DATA, DATA + 0x1000, DATA2]
    assert m.run(timeout=10).reason == "exit"
    assert guest_pages(ept.dirty_pages()) == [DATA + 0x3000]
    ept.unprotect(DATA + 0x5000, 0x1000)
    ept.unprotect(DATA2 + 0x8000, 0x2000)
    ept.invept()
    assert guest_pages(ept.dirty_pages()) == []


def test_dirty_pages_needs_logging(make_machine) -> None:
    m = user_machine(make_machine, DIRTY_GUEST)
    with pytest.raises(RuntimeError, match="enable_dirty_logging"):
        m.ept.dirty_pages()


# --- the EPT model (no guest) ---------------------------------------------------------------
def test_eptp_and_2m_default_split_and_merge() -> None:
    tables = EptTables()
    tables.map(0, 4 << 20)
    walk = tables.walk(0x1234)
    assert walk.present and walk.page_size == 2 << 20 and walk.perms == Perm.RWX
    assert walk.leaf & EptFlag.LARGE_PAGE and (walk.leaf >> 3) & 7 == 6        # WB
    count = tables.table_count
    tables.set_perms(0x201000, 0x1000, Perm.R | Perm.X)
    assert tables.table_count == count + 1                                  # split: one PT
    assert tables.walk(0x201000).page_size == 4096 and tables.walk(0x201000).perms == Perm.R | Perm.X
    assert tables.walk(0x202000).perms == Perm.RWX
    assert tables.walk(0x1000).page_size == 2 << 20                          # the other 2 MiB stays
    tables.set_perms(0x201000, 0x1000, Perm.NONE)
    assert not tables.walk(0x201000).present
    tables.set_perms(0x201000, 0x1000, Perm.RWX)
    assert tables.table_count == count and tables.walk(0x201000).page_size == 2 << 20   # merged


def test_parse_perms() -> None:
    assert parse_perms("r-x") == Perm.R | Perm.X
    assert parse_perms("rwx") == Perm.RWX and parse_perms("---") == Perm.NONE
    assert parse_perms("r--") == Perm.R and parse_perms("--x") == Perm.X and parse_perms("rx") == Perm.R | Perm.X
    for bad in ("-w-", "rwz", "xr-", "rr", 9):
        with pytest.raises(EptError):
            parse_perms(bad)


def test_eptp_layout(make_machine) -> None:
    m = make_machine(mode="long")
    eptp = m.ept.eptp
    assert eptp & 7 == 6 and (eptp >> 3) & 7 == 3 and eptp & 0x40
    assert m.ept.tables.table((eptp & ~0xFFF)) is not None


# --- violations -------------------------------------------------------------------------------
BACKENDS = sorted({"memslot", host_backend()})


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def with_backend(m, backend: str):
    from minivmm.ept_shadow import EptShadow
    m._ept = EptShadow(m, backend=backend)
    return m.ept


def test_write_to_read_only_page_reaches_the_handler(make_machine, backend) -> None:
    m = user_machine(make_machine, f"""
    mov $0x11223344, %eax
    mov %eax, {DATA + 0x10:#x}
    mov {DATA + 0x10:#x}, %ebx
    mov $0, %al
    out %al, $0xf4
""")
    ept = with_backend(m, backend)
    ept.protect(DATA, 0x1000, "r-x")
    seen = []

    def handler(vcpu, info):
        access = ept.access
        seen.append((info.qualification, info.guest_physical_address, info.guest_linear_address,
                     access.size, access.value, access.is_write, vcpu.rip))
        ept.complete_write()
        return RESUME

    m.on(ExitReason.EPT_VIOLATION, handler, address=range(DATA, DATA + 0x1000))
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert len(seen) == 1
    qualification, gpa, gla, size, value, is_write, rip = seen[0]
    q = EptViolationQualification.decode(qualification)
    assert q.write and not q.read and not q.execute
    assert (q.readable, q.writable, q.executable) == (True, False, True)
    assert q.gla_valid and q.gla_is_translation
    assert gpa == gla == DATA + 0x10
    assert (size, value, is_write) == (4, 0x11223344, True)
    # KVM reports a write after emulating the instruction: RIP is past the 7-byte store
    assert rip == m.symbol("_start") + 5 + 7
    assert m.memory.read_u32(DATA + 0x10) == 0x11223344          # the emulated write landed
    assert m.vcpu.rbx == 0x11223344                              # reads were never stopped
    assert result.exits.get("EPT_VIOLATION") == 1
