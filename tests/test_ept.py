"""EPT shadow: permissions realised on KVM, violations, hooks and dirty tracking, with real guests."""
from __future__ import annotations

import pytest

from minivmm.ept_shadow import EptError, EptFlag, EptTables, Perm, parse_perms
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
