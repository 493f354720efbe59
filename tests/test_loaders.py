"""Image loaders: flat binaries, ELF (pyelftools), C built with gcc, multiboot v1 headers and info."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from minivmm import loaders
from minivmm.loaders import (MULTIBOOT_INFO_ADDRESS, LoaderError, build_c_elf, build_multiboot_info,
                             load_elf, load_flat, load_multiboot, parse_multiboot_header)

ROOT = Path(__file__).resolve().parent.parent
MB_MAGIC = 0x1BADB002


def header(flags: int, checksum: int | None = None, fields: tuple[int, ...] = ()) -> bytes:
    checksum = (-(MB_MAGIC + flags)) & 0xFFFFFFFF if checksum is None else checksum
    return struct.pack("<III", MB_MAGIC, flags, checksum) + struct.pack(f"<{len(fields)}I", *fields)


def test_flat_binary(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x90\xf4")
    image = load_flat(path, 0x200000)
    assert image.segments == [(0x200000, b"\x90\xf4")] and image.entry == 0x200000
    assert load_flat(path, 0x200000, entry=0x200001).entry == 0x200001
    path.write_bytes(b"")
    with pytest.raises(LoaderError, match="empty"):
        load_flat(path, 0)


@pytest.fixture(scope="module")
def c_elf() -> Path:
    return build_c_elf([ROOT / "guests" / "elf_hello.c"], link_address=0x100000)


def test_build_c_elf_is_cached(c_elf: Path) -> None:
    assert c_elf.is_file()
    assert build_c_elf([ROOT / "guests" / "elf_hello.c"], link_address=0x100000) == c_elf


def test_load_elf_segments_entry_symbols(c_elf: Path) -> None:
    image = load_elf(c_elf)
    assert image.entry == image.symbols["_start"]
    assert {"_start", "greeting", "counter"} <= set(image.symbols)
    assert all(address >= 0x100000 for address, _ in image.segments)
    greeting = image.symbols["greeting"]
    for address, data in image.segments:
        if address <= greeting < address + len(data):
            assert data[greeting - address:].startswith(b"Hello from C!\n")
            break
    else:
        pytest.fail("greeting is in no PT_LOAD segment")
    # .bss (counter) is inside a segment's memory size, zero-filled
    counter = image.symbols["counter"]
    assert any(a <= counter < a + len(d) for a, d in image.segments)


def test_build_c_elf_reports_gcc_errors(tmp_path: Path) -> None:
    source = tmp_path / "bad.c"
    source.write_text("void _start(void) { this is not C; }\n")
    with pytest.raises(LoaderError, match=r"gcc failed .*bad\.c"):
        build_c_elf([source])


def test_load_elf_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.elf"
    path.write_bytes(b"not an elf at all" * 10)
    with pytest.raises(LoaderError, match="not a valid ELF"):
        load_elf(path)


def test_multiboot_header_search_and_checks() -> None:
    data = bytes(64) + header(0x3)
    found = parse_multiboot_header(data)
    assert (found.offset, found.flags) == (64, 3)
    with pytest.raises(LoaderError, match="no multiboot header"):
        parse_multiboot_header(bytes(8192) + header(0))           # past the first 8 KiB
    with pytest.raises(LoaderError, match="bad checksum 0x1"):
        parse_multiboot_header(header(0, checksum=1))
    with pytest.raises(LoaderError, match="video mode"):
        parse_multiboot_header(header(1 << 2))
    with pytest.raises(LoaderError, match="unknown required features"):
        parse_multiboot_header(header(1 << 5))


def test_multiboot_address_fields_load_the_kernel() -> None:
    load, entry = 0x100000, 0x100040
    kernel = header((1 << 16) | 2, fields=(load, load, 0, load + 0x2000, entry))
    kernel = kernel.ljust(0x100, b"\x90")
    image = load_multiboot(kernel, cmdline="a=b", memory_size=4 << 20)
    (address, data), info = image.segments
    assert address == load and len(data) == 0x2000 and data[:0x100] == kernel
    assert image.entry == entry
    assert image.registers == {"rax": 0x2BADB002, "rbx": MULTIBOOT_INFO_ADDRESS}
    assert info[0] == MULTIBOOT_INFO_ADDRESS


def test_multiboot_info_structure() -> None:
    info = build_multiboot_info(4 << 20, "root=/dev/x quiet", 0x20000)
    flags, mem_lower, mem_upper = struct.unpack_from("<III", info, 0)
    assert flags & 1 and flags & 4 and flags & (1 << 6) and flags & (1 << 9)
    assert (mem_lower, mem_upper) == (640, 3072)
    cmdline_addr, = struct.unpack_from("<I", info, 16)
    start = cmdline_addr - 0x20000
    assert info[start:start + 18] == b"root=/dev/x quiet\0"
    mmap_length, mmap_addr = struct.unpack_from("<II", info, 44)
    entries = []
    offset = mmap_addr - 0x20000
    while offset < mmap_addr - 0x20000 + mmap_length:
        size, base, length, kind = struct.unpack_from("<IQQI", info, offset)
        entries.append((base, length, kind))
        offset += size + 4
    assert entries == [(0, 0x10000, 2), (0x10000, 0xA0000 - 0x10000, 1), (0x100000, 3 << 20, 1)]
    name_addr, = struct.unpack_from("<I", info, 64)
    assert info[name_addr - 0x20000:].startswith(b"minivmm\0")


def test_multiboot_elf_kernel(c_elf: Path) -> None:
    # An ELF kernel without the address fields (flags bit 16 clear): loaded by its PT_LOADs.
    data = bytearray(c_elf.read_bytes())
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    slot = (phoff + phentsize * phnum + 3) & ~3      # after the ELF header and program headers
    assert slot + 12 <= 8192
    data[slot:slot + 12] = header(0x2)
    image = load_multiboot(bytes(data), memory_size=2 << 20)
    assert image.entry == load_elf(c_elf).entry
    assert image.registers["rbx"] == MULTIBOOT_INFO_ADDRESS


def test_multiboot_without_fields_must_be_elf() -> None:
    with pytest.raises(LoaderError, match="not an ELF"):
        load_multiboot(header(0).ljust(64, b"\0"), memory_size=2 << 20)


def test_multiboot_overlapping_info_is_refused() -> None:
    kernel = header(1 << 16, fields=(0x20000, 0x20000, 0, 0, 0x20020)).ljust(64, b"\0")
    with pytest.raises(LoaderError, match="overlaps the multiboot info"):
        load_multiboot(kernel, memory_size=2 << 20, info_address=MULTIBOOT_INFO_ADDRESS)


@pytest.mark.kvm
def test_multiboot_entry_state() -> None:
    """The kernel starts in 32-bit protected mode, paging off, EAX/EBX per the spec."""
    from minivmm.config import build_machine, load_config
    config = load_config(ROOT / "configs" / "multiboot.yaml", overrides=["devices.serial.output=capture"])
    with build_machine(config) as machine:
        vcpu = machine.vcpu
        assert vcpu.rax == 0x2BADB002 and vcpu.rbx == MULTIBOOT_INFO_ADDRESS
        assert vcpu.cr0 & 1 and not vcpu.cr0 & (1 << 31)
        cs = vcpu.segment("cs")
        assert (cs.base, cs.db, cs.l) == (0, 1, 0)
        info = machine.memory.read(MULTIBOOT_INFO_ADDRESS, 20)
        assert struct.unpack_from("<I", info, 8)[0] == 3 * 1024     # mem_upper of 4M
        result = machine.run_config()
    assert result.reason == "exit" and result.exit_code == 0


def test_module_exports() -> None:
    for name in loaders.__all__:
        assert hasattr(loaders, name)
