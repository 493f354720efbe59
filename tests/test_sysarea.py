"""minivmm's system area (GDT, TSS, page tables, user-mode IDT and stubs) never lands on a
loaded image: it moves where the mode allows, and images may not overlap each other."""
from __future__ import annotations

import pytest

from minivmm.loaders import ImageOverlapError
from minivmm.modes import (GDT_ADDR, PML4_ADDR, TSS_ADDR, ImageRange, Mode, SystemAreaError,
                           choose_system_base, structures_for)

RAM_2M = [(0, 2 << 20)]
LONG_LOW = """
    PUTS msg
    EXIT 7
    hlt
msg: .asciz "low long\\n"
.fill 0x10000, 1, 0x90
"""


def test_base_stays_0_when_free() -> None:
    images = [ImageRange(0x100000, 0x101000, "kernel")]
    for mode in (Mode.PROTECTED, Mode.LONG, Mode.USER):
        assert choose_system_base(mode, images, RAM_2M, 2 << 20) == 0


def test_protected_mode_uses_only_gdt_and_tss() -> None:
    # [0x3000, 0xb000) holds page tables in long mode only
    image = [ImageRange(0x3000, 0xB000, "low")]
    assert choose_system_base(Mode.PROTECTED, image, RAM_2M, 2 << 20) == 0
    assert choose_system_base(Mode.LONG, image, RAM_2M, 2 << 20) == 0x10000
    assert [s.name for s in structures_for(Mode.PROTECTED)] == ["GDT", "TSS and I/O bitmap"]


def test_moved_area_skips_images_and_the_legacy_hole() -> None:
    images = [ImageRange(0x1000, 0xA0000, "big")]
    assert choose_system_base(Mode.LONG, images, RAM_2M, 2 << 20) == 0x100000


def test_moved_area_keeps_off_the_initial_stack() -> None:
    images = [ImageRange(0, 0xA0000, "big"), ImageRange(0x100000, 0x1F0000, "bigger")]
    with pytest.raises(SystemAreaError, match=r"no room .* big \[0x0, 0xa0000\) overlaps minivmm's GDT"):
        choose_system_base(Mode.LONG, images, RAM_2M, 2 << 20)
    assert choose_system_base(Mode.LONG, images, RAM_2M, 0x1F0000) == 0x1F0000


def test_user_mode_area_is_fixed() -> None:
    with pytest.raises(SystemAreaError, match=r"low \[0x2000, 0x2100\) overlaps minivmm's IDT") as info:
        choose_system_base(Mode.USER, [ImageRange(0x2000, 0x2100, "low")], RAM_2M, 2 << 20)
    assert info.value.image.name == "low"


def test_image_in_zero_fill_may_share() -> None:
    from minivmm.loaders import check_no_overlap
    elf = ImageRange(0x100000, 0x102000, "elf", bss=0x1000)
    check_no_overlap([elf], ImageRange(0x101100, 0x101200, "buffer"))
    with pytest.raises(ImageOverlapError):
        check_no_overlap([elf], ImageRange(0x100F00, 0x101200, "buffer"))


@pytest.mark.kvm
def test_load_of_an_overlapping_image_raises(make_machine) -> None:
    m = make_machine("long")
    m.load(b"\x90" * 0x100, 0x100000, name="first")
    with pytest.raises(ImageOverlapError, match=r"second \[0x1000f0, 0x100110\) overlaps first "
                                                r"\[0x100000, 0x100100\)"):
        m.load(b"\x90" * 0x20, 0x1000F0, name="second")
    assert m.memory.read(0x1000F0, 1) == b"\x90"
    m.load(b"\xf4", 0x100100)                     # adjacent is fine


@pytest.mark.kvm
def test_load_image_of_an_overlapping_image_raises(make_machine) -> None:
    from minivmm import asm
    m = make_machine("long")
    m.load_asm("EXIT 0\nhlt\n")
    again = asm.assemble("hlt\n", code_bits=64, load_address=0x100000)
    with pytest.raises(ImageOverlapError, match=r"\[0x100000, 0x100001\) overlaps <inline> \[0x100000"):
        m.load_image(again)


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["long", "protected"])
def test_low_image_runs_with_the_area_moved(make_machine, mode: str) -> None:
    m = make_machine(mode)
    m.load_asm(LONG_LOW, load_address=0x1000)
    result = m.run(timeout=5)
    assert (result.reason, result.exit_code, result.console) == ("exit", 7, "low long\n")
    assert m.system_base == 0x20000
    sregs = m.vcpu.sregs
    assert sregs.gdt.base == 0x20000 + GDT_ADDR
    assert sregs.tr.base == 0x20000 + TSS_ADDR
    if mode == "long":
        assert sregs.cr3 == 0x20000 + PML4_ADDR


@pytest.mark.kvm
def test_default_addresses_unchanged(make_machine) -> None:
    m = make_machine("user")
    m.load_asm("EXIT 0\nhlt\n")
    m.setup()
    assert m.system_base == 0
    sregs = m.vcpu.sregs
    assert (sregs.gdt.base, sregs.tr.base, sregs.cr3) == (GDT_ADDR, TSS_ADDR, PML4_ADDR)


@pytest.mark.kvm
def test_user_mode_image_over_the_area_is_an_error(make_machine) -> None:
    m = make_machine("user")
    m.load(b"\xf4", 0x3000, name="low")
    with pytest.raises(SystemAreaError, match=r"low \[0x3000, 0x3001\) overlaps minivmm's page tables"):
        m.setup()
