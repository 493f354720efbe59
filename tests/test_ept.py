"""EPT shadow: permissions realised on KVM, violations, hooks and dirty tracking, with real guests."""
from __future__ import annotations

import pytest

from minivmm.actions import RESUME, RETRY
from minivmm.ept import EptError, EptFlag, EptTables, Perm, host_backend, parse_perms
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
    m.create_ept(backend=backend)
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


def test_read_of_unreadable_page_is_served_by_the_handler(make_machine, backend) -> None:
    m = user_machine(make_machine, f"""
    mov {DATA + 8:#x}, %rbx
    movb $7, {DATA2:#x}
    mov $0, %al
    out %al, $0xf4
""")
    ept = with_backend(m, backend)
    ept.protect(DATA, 0x1000, "---")
    m.memory.write(DATA + 8, b"\x11" * 8)
    seen = []

    def handler(vcpu, info):
        seen.append((info.ept.access, info.ept.permissions, info.guest_physical_address, ept.access.size,
                     info.guest_linear_address, vcpu.rip))
        ept.complete_read(0xDEADBEEFCAFEF00D)
        return RESUME

    m.on(ExitReason.EPT_VIOLATION, handler, address=DATA + 8)
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert seen == [("read", "---", DATA + 8, 8, DATA + 8, m.symbol("_start"))]
    assert m.vcpu.rbx == 0xDEADBEEFCAFEF00D
    assert m.memory.read(DATA2, 1) == b"\x07"


def test_unhandled_violation_stops_with_a_clear_message(make_machine, backend) -> None:
    m = user_machine(make_machine, f"""
    movl $0x55, {DATA + 0x20:#x}
    mov $0, %al
    out %al, $0xf4
""")
    ept = with_backend(m, backend)
    ept.protect(DATA, 0x1000, "r--")
    result = m.run(timeout=10)
    assert result.reason == "error"
    assert "EPT violation: write on r-- page at gpa 0x180020" in result.message
    assert "4-byte write of 0x55" in result.message
    assert m.memory.read_u32(DATA + 0x20) == 0                 # the write never landed


EXEC_GUEST = """
    xor %ebx, %ebx
    mov $3, %ecx
1:  call hooked
    loop 1b
    mov hooked, %rax            # the guest reads the hooked instruction's bytes
    mov $0, %al
    out %al, $0xf4
.balign 4096
hooked:
    inc %rbx
    ret
"""


def test_hidden_execute_hook_fires_once_per_execution(make_machine, backend) -> None:
    m = user_machine(make_machine, EXEC_GUEST)
    ept = with_backend(m, backend)
    hooked = m.symbol("hooked")
    original = m.memory.read(hooked, 8)
    calls = []
    hook = ept.hook_execute(hooked, lambda event: calls.append((event.address, event.rip, event.vcpu.rbx)))
    result = m.run(timeout=20)
    assert result.reason == "exit", result
    assert calls == [(hooked, hooked, 0), (hooked, hooked, 1), (hooked, hooked, 2)]   # before the instruction
    assert m.vcpu.rbx == 3
    rax = m.vcpu.rax & ~0xFF | original[0]     # `mov $0, %al` overwrote the low byte
    assert rax.to_bytes(8, "little") == original                  # reads see the original bytes
    assert hook.hits == 3
    assert ept.perms(hooked) == Perm.R | Perm.W                   # no X while the hook is there
    ept.remove(hook)
    assert ept.perms(hooked) == Perm.RWX


def test_visible_execute_hook_uses_int3(make_machine) -> None:
    m = user_machine(make_machine, EXEC_GUEST)
    hooked = m.symbol("hooked")
    original = m.memory.read(hooked, 1)
    calls = []
    hook = m.ept.hook_execute(hooked, lambda event: calls.append(event.vcpu.rbx), hidden=False)
    assert m.memory.read(hooked, 1) == b"\xcc"
    result = m.run(timeout=20)
    assert result.reason == "exit", result
    assert calls == [0, 1, 2] and m.vcpu.rbx == 3
    assert m.memory.read(hooked, 1) == b"\xcc"                    # re-inserted after each step
    m.ept.remove(hook)
    assert m.memory.read(hooked, 1) == original


MONITOR_GUEST = f"""
    movl $0xAABBCCDD, {DATA + 0xFFE:#x}      # crosses into the next page: one access
    mov {DATA + 0xFF8:#x}, %r8
    movw $0x1234, {DATA + 0x1004:#x}
    mov {DATA + 0x1100:#x}, %r9              # monitored page, outside the range
    movb $9, {DATA + 0x10:#x}                # monitored page, outside the range
    mov $0, %al
    out %al, $0xf4
    movl $0x01020304, {DATA + 0xFFC:#x}
    movw $0x5678, {DATA + 0x1004:#x}
    mov $0, %al
    out %al, $0xf4
"""


def test_monitor_across_a_page_boundary_reports_each_access_once(make_machine, backend) -> None:
    m = user_machine(make_machine, MONITOR_GUEST)
    ept = with_backend(m, backend)
    m.memory.write(DATA + 0x1100, b"\x42" * 8)
    events = []
    hook = ept.monitor(DATA + 0xFF0, DATA + 0x1010, "rw",
                       lambda e: events.append((e.kind, e.address, e.size, e.value)))
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert events == [("write", DATA + 0xFFE, 4, 0xAABBCCDD),
                      ("read", DATA + 0xFF8, 8, 0xCCDD << 48),
                      ("write", DATA + 0x1004, 2, 0x1234)]
    assert m.memory.read(DATA + 0xFFE, 4) == (0xAABBCCDD).to_bytes(4, "little")
    assert m.vcpu.r8 == 0xCCDD << 48 and m.vcpu.r9 == 0x4242424242424242
    assert m.memory.read(DATA + 0x10, 1) == b"\x09"
    assert hook.hits == 3
    assert result.exits.get("EPT_VIOLATION") is None           # hooks complete the accesses themselves

    # removed: the pages are writable again and the guest's writes cause no exit at all
    ept.remove(hook)
    emulated = ept.emulations
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert len(events) == 3 and ept.emulations == emulated
    assert m.memory.read_u32(DATA + 0xFFC) == 0x01020304 and m.memory.read_u16(DATA + 0x1004) == 0x5678
    assert ept.perms(DATA) == Perm.RWX


def test_write_monitor_and_overlapping_hooks_all_fire(make_machine, backend) -> None:
    m = user_machine(make_machine, MONITOR_GUEST)
    ept = with_backend(m, backend)
    first, second = [], []
    ept.monitor(DATA + 0x1000, DATA + 0x1008, "w", lambda e: first.append((e.address, e.value)))
    ept.monitor(DATA + 0x1004, DATA + 0x1006, "w", lambda e: second.append((e.address, e.value)))
    assert ept.perms(DATA + 0x1000) == Perm.R | Perm.X
    assert m.run(timeout=10).reason == "exit"
    # the crossing store's first half went to an unmonitored page, which KVM wrote itself:
    # only the part in the monitored page is seen (KVM reports just that fragment)
    assert first == [(DATA + 0x1000, 0xAABB), (DATA + 0x1004, 0x1234)]
    assert m.memory.read_u32(DATA + 0xFFE) == 0xAABBCCDD
    assert second == [(DATA + 0x1004, 0x1234)]
    assert m.vcpu.r8 == 0xCCDD << 48                             # reads are not monitored: native


def test_fetch_violation_and_allow_once(make_machine, backend) -> None:
    m = user_machine(make_machine, EXEC_GUEST)
    ept = with_backend(m, backend)
    hooked = m.symbol("hooked")
    ept.protect(hooked, 0x1000, "rw-")
    seen = []

    def handler(vcpu, info):
        seen.append((str(info.ept), info.guest_physical_address, info.guest_linear_address, vcpu.rip))
        ept.allow_once()
        return RESUME

    m.on(ExitReason.EPT_VIOLATION, handler)
    result = m.run(timeout=20)
    assert result.reason == "exit", result
    assert m.vcpu.rbx == 3
    # inc and ret, three times: each fetch from the page is one violation
    assert seen == [("execute on rw- page", hooked, hooked, hooked),
                    ("execute on rw- page", hooked + 3, hooked + 3, hooked + 3)] * 3


def test_mmio_device_claims_unmapped_space(make_machine) -> None:
    m = make_machine(mode="long")
    m.load_asm(""".globl _start
_start:
    movl $0x1234, 0x40000010
    mov 0x40000008, %rbx
    mov $0, %al
    out %al, $0xf4
""")
    writes = []
    m.ept.add_mmio_device(0x40000000, 0x1000, lambda offset, size: 0x1100 + offset + size,
                          lambda offset, size, value: writes.append((offset, size, value)))
    with pytest.raises(EptError, match="overlaps guest RAM"):
        m.ept.add_mmio_device(0x1000, 0x1000, None, None)
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert writes == [(0x10, 4, 0x1234)] and m.vcpu.rbx == 0x1100 + 8 + 8


def test_bad_requests_are_refused(make_machine) -> None:
    m = make_machine(mode="user")
    with pytest.raises(EptError, match="not guest RAM"):
        m.ept.protect(0x10000000, 0x1000, "r--")
    with pytest.raises(EptError, match="bad permissions"):
        m.ept.protect(0x100000, 0x1000, "rwq")
    with pytest.raises(EptError, match="bad monitor access"):
        m.ept.monitor(0x100000, 0x100010, "x", print)
    with pytest.raises(EptError, match="empty"):
        m.ept.monitor(0x100010, 0x100010, "r", print)


@pytest.mark.parametrize("mode,hidden", [("long", True), ("protected", True), ("long", False)])
def test_execute_hook_at_cpl0(make_machine, mode, hidden) -> None:
    """CPL-0 code (emulated by the host): the same hooks, stepped with KVM single-step."""
    m = make_machine(mode=mode)
    m.load_asm(".globl _start\n_start:\n" + EXEC_GUEST.replace("%rbx", "%ebx").replace("%rax", "%eax"))
    hooked = m.symbol("hooked")
    calls = []
    m.ept.hook_execute(hooked, lambda event: calls.append(event.vcpu.rbx & 0xFFFFFFFF), hidden=hidden)
    result = m.run(timeout=20)
    assert result.reason == "exit", result
    assert calls == [0, 1, 2] and m.vcpu.rbx & 0xFFFFFFFF == 3


def test_host_page_protection_backend_where_the_host_honours_it(make_machine) -> None:
    """The mprotect backend (KVM's own view of RAM write-protected) with CPL-0 code.

    On the project's nested host CPL-0 stores to PROT_READ pages exit as MMIO
    but CPL-3 ones fail with EFAULT, so the probe picks memslots there.
    """
    from minivmm.ept import host_protection_works
    if not host_protection_works("long"):
        assert host_backend() == "memslot"
        return
    m = make_machine(mode="long")
    m.load_asm(f""".globl _start
_start:
    movl $0x77, {DATA:#x}
    mov $0, %al
    out %al, $0xf4
""")
    ept = with_backend(m, "mprotect")
    writes = []
    ept.monitor(DATA, DATA + 4, "w", lambda e: writes.append(e.value))
    ept.invept()
    assert len(ept._memslots.regions[m.memory.regions[0]]) == 1        # no memslot was split
    m.memory.write(DATA + 8, b"\x01")                 # minivmm's own view stays writable
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert writes == [0x77] and m.memory.read_u32(DATA) == 0x77


def test_handlers_can_use_info_data(make_machine) -> None:
    """`info.data` carries the written value and takes the value a read should return."""
    m = user_machine(make_machine, f"""
    movl $0x41, {DATA + 0x40:#x}
    movl {DATA2 + 0x40:#x}, %ebx
    mov $0, %al
    out %al, $0xf4
""")
    ept = m.ept
    ept.protect(DATA, 0x1000, "r--")
    ept.protect(DATA2, 0x1000, "---")
    seen = []

    def on_write(vcpu, info):
        seen.append(info.data)
        info.data += 1
        ept.complete_write()
        return RESUME

    def on_read(vcpu, info):
        info.data = 0xFEEDF00D
        return RESUME

    m.on(ExitReason.EPT_VIOLATION, on_write, address=range(DATA, DATA + 0x1000))
    m.on(ExitReason.EPT_VIOLATION, on_read, address=range(DATA2, DATA2 + 0x1000))
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert seen == [0x41] and m.memory.read_u32(DATA + 0x40) == 0x42
    assert m.vcpu.rbx == 0xFEEDF00D


def test_let_through_once_by_restoring_and_stepping(make_machine, backend) -> None:
    """HyperDbg's pattern: give the page its rights back, step one instruction, re-protect."""
    m = user_machine(make_machine, f"""
    mov {DATA:#x}, %rbx
    mov {DATA + 8:#x}, %rcx
    mov $0, %al
    out %al, $0xf4
""")
    ept = with_backend(m, backend)
    m.memory.write(DATA, (0x1111).to_bytes(8, "little") + (0x2222).to_bytes(8, "little"))
    ept.protect(DATA, 0x1000, "---")
    rips = []

    def handler(vcpu, info):
        rips.append(vcpu.rip)
        ept.protect(DATA, 0x1000, "rwx")
        m.step_once(lambda vcpu: ept.protect(DATA, 0x1000, "---"), vcpu=vcpu.index)
        return RETRY                    # a read is reported before it executes: run it again

    m.on(ExitReason.EPT_VIOLATION, handler)
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert (m.vcpu.rbx, m.vcpu.rcx) == (0x1111, 0x2222)
    assert rips == [m.symbol("_start"), m.symbol("_start") + 8]     # each read faulted once
    assert ept.perms(DATA) == Perm.NONE


def test_gla_of_a_page_mapped_away_from_its_identity_address(make_machine) -> None:
    """The guest maps GPA 0x200000 only at linear 0x40000000: the violation's GLA is found by a reverse walk."""
    import struct
    m = make_machine(mode="long", memory="4M")
    m.load_asm(""".globl _start
_start:
    movl $0x99, 0x40000010
    mov $0, %al
    out %al, $0xf4
""")
    m.setup()
    pd0, pd1 = 0x5000, 0x6000                  # page directories of the first and second GiB
    m.memory.write(pd0 + 8, struct.pack("<Q", 0))                          # no identity 0x200000
    m.memory.write(pd1, struct.pack("<Q", 0x200000 | 0x83))               # 0x40000000 -> 0x200000
    ept = m.ept
    ept.protect(0x200000, 0x1000, "r-x")
    seen = []

    def handler(vcpu, info):
        seen.append((info.guest_physical_address, info.guest_linear_address, info.ept.gla_valid))
        ept.complete_write()
        return RESUME

    m.on(ExitReason.EPT_VIOLATION, handler)
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert seen == [(0x200010, 0x40000010, True)]
    assert m.memory.read_u32(0x200010) == 0x99
    assert m.read_virtual(0x40000010, 4) == b"\x99\0\0\0"


def test_dirty_log_counts_emulated_writes_and_survives_compaction(make_machine) -> None:
    m = user_machine(make_machine, f"""
    movb $1, {DATA:#x}                  # a page without X: a memslot hole, the write is emulated
    movb $2, {DATA2 + 0x1000:#x}
    movb $3, {DATA2 + 0x81000:#x}
    mov $0, %al
    out %al, $0xf4
""")
    ept = m.ept
    ept.enable_dirty_logging()
    ept.protect(DATA, 0x1000, "rw-")
    for i in range(80):                 # 80 read-only islands: more slots than _COMPACT_LIMIT
        ept.protect(DATA2 + 0x2000 * i + 0x2000, 0x1000, "r-x")
    ept.invept()
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert ept.emulations == 1 and m.memory.read(DATA, 1) == b"\x01"
    assert guest_pages(ept.dirty_pages()) == [DATA, DATA2 + 0x1000, DATA2 + 0x81000]
    for i in range(80):
        ept.unprotect(DATA2 + 0x2000 * i + 0x2000, 0x1000)
    ept.invept()
    assert guest_pages(ept.dirty_pages()) == []
    assert ept.walk(DATA2).page_size == 2 << 20          # merged back into a 2 MiB page


def test_ram_added_after_the_ept_is_managed_too(make_machine) -> None:
    m = make_machine(mode="long", memory="2M")
    ept = m.ept
    m.add_ram(0x1000000, "2M", name="high")
    m.load_asm(""".globl _start
_start:
    movl $0x5a5a, 0x1000100
    mov $0, %al
    out %al, $0xf4
""")
    writes = []
    ept.monitor(0x1000100, 0x1000104, "w", lambda e: writes.append((e.address, e.value)))
    result = m.run(timeout=10)
    assert result.reason == "exit", result
    assert writes == [(0x1000100, 0x5A5A)] and m.memory.read_u32(0x1000100) == 0x5A5A


def test_a_failing_hook_callback_propagates_with_a_note(make_machine) -> None:
    m = user_machine(make_machine, MONITOR_GUEST)

    def broken(event):
        raise KeyError("oops")

    m.ept.monitor(DATA + 0x1004, DATA + 0x1006, "w", broken)
    with pytest.raises(KeyError) as info:
        m.run(timeout=10)
    assert "in the monitor hook on [0x181004, 0x181006) for a write at gpa 0x181004" in info.value.__notes__[0]
    del info


def test_self_modifying_code_under_a_write_monitor(make_machine) -> None:
    """guests/ept_smc.S patches its own code page: each patch is reported and the new code runs."""
    from conftest import GUESTS
    m = make_machine(mode="user")
    m.load_asm(GUESTS / "ept_smc.S")
    patched = m.symbol("patched")
    events = []
    m.ept.monitor(patched & ~0xFFF, (patched & ~0xFFF) + 0x1000, "w",
                  lambda e: events.append((e.address, e.size, e.value)))
    result = m.run(timeout=10)
    assert (result.reason, result.exit_code) == ("exit", 2), result
    assert events == [(patched + 1, 1, 2)] * 2
    assert m.ept.perms(patched) == Perm.R | Perm.X            # the code page keeps running natively


def test_hidden_hook_in_the_page_that_runs_the_loop(make_machine) -> None:
    """Every instruction of the hooked page is stepped through; only the hooked one reports."""
    m = user_machine(make_machine, f"""
    xor %ebx, %ebx
    mov $3, %ecx
1:  add $2, %ebx
target:
    add $5, %ebx
    movl %ebx, {DATA:#x}
    loop 1b
    mov $0, %al
    out %al, $0xf4
""")
    seen = []
    hook = m.ept.hook_execute(m.symbol("target"), lambda e: seen.append(e.vcpu.rbx))
    result = m.run(timeout=20)
    assert result.reason == "exit", result
    assert seen == [2, 9, 16] and m.vcpu.rbx == 21 and m.memory.read_u32(DATA) == 21
    assert hook.hits == 3
