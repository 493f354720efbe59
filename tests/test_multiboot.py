"""Multiboot v1, complete (issue 8): ELF32/ELF64 and address-field kernels, modules with their
strings, the command line with argv0 first, info placement, and the C kernel in guests/mbkernel
booting with fw_cfg and ACPI (Multiboot Specification 0.6.96 sections 3.1-3.3)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from conftest import CONFIGS, GUESTS
from minivmm.config import ConfigError, build_machine, load_config, parse_config
from minivmm.loaders import (MULTIBOOT_INFO_ADDRESS, LoaderError, MultibootModule, build_c_elf,
                             load_multiboot)

MB_MAGIC = 0x1BADB002
INFO_MODS = 1 << 3


def header(flags: int, fields: tuple[int, ...] = ()) -> bytes:
    return struct.pack("<III", MB_MAGIC, flags, (-(MB_MAGIC + flags)) & 0xFFFFFFFF) + \
        struct.pack(f"<{len(fields)}I", *fields)


def info_fields(image) -> dict[str, int]:
    address, info = image.segments[-1]
    assert address == image.registers["rbx"]
    flags, mem_lower, mem_upper, _, cmdline, mods_count, mods_addr = struct.unpack_from("<7I", info)
    return {"address": address, "flags": flags, "mem_lower": mem_lower, "mem_upper": mem_upper,
            "cmdline": cmdline, "mods_count": mods_count, "mods_addr": mods_addr}


def read_string(image, address: int) -> bytes:
    for base, data in image.segments:
        if base <= address < base + len(data):
            return data[address - base:].split(b"\0", 1)[0]
    raise AssertionError(f"{address:#x} is in no segment")


def fields_kernel(load: int = 0x100000, size: int = 0x3000) -> bytes:
    return header((1 << 16) | 3, (load, load, 0, load + size, load + 0x20)).ljust(0x200, b"\x90")


# -- loader ---------------------------------------------------------------------------------
def test_modules_are_page_aligned_after_the_kernel_and_listed() -> None:
    modules = [MultibootModule(b"first module", "first.bin a=1"), MultibootModule(b"x" * 5000, "second")]
    image = load_multiboot(fields_kernel(), memory_size=8 << 20, modules=modules,
                           kernel_name="kernel.elf", cmdline="quiet")
    info = info_fields(image)
    assert info["flags"] & INFO_MODS and info["mods_count"] == 2
    assert info["address"] == MULTIBOOT_INFO_ADDRESS
    listed = [struct.unpack_from("<4I", image.segments[-1][1], info["mods_addr"] - info["address"] + 16 * i)
              for i in range(2)]
    assert listed[0][0] == 0x103000 and listed[0][1] == 0x103000 + 12      # after the 0x3000-byte image
    assert listed[1][0] == 0x104000 and listed[1][1] == 0x104000 + 5000
    for (start, end, string, _), module in zip(listed, modules):
        assert start % 4096 == 0
        assert read_string(image, string) == module.cmdline.encode()
        segment = dict(image.segments)[start]
        assert segment == module.data and end - start == len(module.data)
    assert read_string(image, info["cmdline"]) == b"kernel.elf quiet"


def test_command_line_is_always_valid() -> None:
    image = load_multiboot(fields_kernel(), memory_size=4 << 20, kernel_name="k")
    assert read_string(image, info_fields(image)["cmdline"]) == b"k"
    image = load_multiboot(fields_kernel(), memory_size=4 << 20)
    info = info_fields(image)
    assert info["flags"] & 4 and read_string(image, info["cmdline"]) == b""


def test_info_moves_when_the_kernel_sits_on_the_default_address() -> None:
    kernel = header(1 << 16, (0x20000, 0x20000, 0, 0x22000, 0x20020)).ljust(64, b"\0")
    image = load_multiboot(kernel, memory_size=2 << 20, modules=[MultibootModule(b"m", "m")])
    info = info_fields(image)
    segments = image.segments[:-1]
    assert info["address"] >= 0x23000 and info["address"] % 4096 == 0
    for address, data in segments:
        assert address + len(data) <= info["address"] or address >= info["address"] + len(image.segments[-1][1])
    with pytest.raises(LoaderError, match="overlaps"):
        load_multiboot(kernel, memory_size=2 << 20, info_address=0x21000)


def test_no_room_for_the_info_is_an_error() -> None:
    kernel = header(1 << 16, (0x20000, 0x20000, 0, 0x30000, 0x20020)).ljust(64, b"\0")
    with pytest.raises(LoaderError, match="no room"):
        load_multiboot(kernel, memory_size=0x30000)


ELF64_KERNEL = """
/* A multiboot kernel in a 64-bit ELF: its entry code is 32-bit, as the spec's entry state
 * requires (GRUB loads such kernels; QEMU's -kernel refuses them). */
.text
.code32
.align 4
    .long 0x1BADB002, 0x2, -(0x1BADB002 + 0x2)
.globl _start
_start:
    cmp $0x2BADB002, %eax
    jne 1f
    mov $0x3f8, %dx
    mov $'6', %al
    out %al, %dx
    mov $'4', %al
    out %al, %dx
    mov 16(%ebx), %esi          /* cmdline */
2:  lodsb
    test %al, %al
    jz 3f
    out %al, %dx
    jmp 2b
3:  mov $0x2a, %al
    out %al, $0xf4
1:  mov $1, %al
    out %al, $0xf4
"""


@pytest.fixture(scope="module")
def elf64_kernel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("mb64") / "kernel64.S"
    source.write_text(ELF64_KERNEL)
    return build_c_elf([source], bits=64, link_address=0x200000)


def test_elf64_kernel_loads_from_program_headers(elf64_kernel: Path) -> None:
    data = elf64_kernel.read_bytes()
    assert data[4] == 2                                   # ELFCLASS64
    image = load_multiboot(data, memory_size=4 << 20)
    assert image.entry == image.symbols["_start"] and 0x200000 <= image.entry < 0x210000
    assert image.segments[0][0] >= 0x200000
    assert image.registers == {"rax": 0x2BADB002, "rbx": MULTIBOOT_INFO_ADDRESS}


@pytest.mark.kvm
def test_elf64_kernel_boots(elf64_kernel: Path, tmp_path: Path) -> None:
    config = tmp_path / "mb64.yaml"
    config.write_text(f"version: 1\nmachine: {{memory: 4M, timeout: 10}}\n"
                      f"images:\n  - {{type: multiboot, path: {elf64_kernel}, cmdline: 'x=1'}}\n")
    with build_machine(load_config(config), capture_console=True) as machine:
        result = machine.run_config()
    assert (result.reason, result.exit_code) == ("exit", 0x2A), result
    assert result.console == f"64{elf64_kernel.name} x=1"


@pytest.mark.kvm
def test_address_fields_kernel_boots() -> None:
    """guests/multiboot_kernel.S gives its addresses in the header (flags bit 16)."""
    config = load_config(CONFIGS / "multiboot.yaml")
    with build_machine(config, capture_console=True) as machine:
        result = machine.run_config()
    assert (result.reason, result.exit_code) == ("exit", 0), result
    assert "multiboot cmdline: multiboot_kernel.S console=ttyS0 minivmm=yes" in result.console


# -- the C kernel -------------------------------------------------------------------------
@pytest.mark.kvm
def test_c_kernel_boots_with_a_module_fw_cfg_and_acpi() -> None:
    config = load_config(CONFIGS / "mb_kernel.yaml")
    with build_machine(config, capture_console=True) as machine:
        vcpu = machine.vcpu
        assert vcpu.rax == 0x2BADB002 and not vcpu.cr0 & (1 << 31) and vcpu.cr0 & 1
        result = machine.run_config()
    assert (result.reason, result.exit_code) == ("exit", 1), result
    lines = result.console.splitlines()
    module = (GUESTS / "mbkernel" / "module.txt").read_bytes()
    assert lines[0] == "mbkernel: booted"
    assert "cmdline: mbkernel console=ttyS0 mode=test" in lines
    assert "memory: lower 640 KiB, upper 7168 KiB" in lines
    assert any(line.startswith(f"module 0: {len(module)} bytes at 0x") and
               line.endswith(f"'module.txt role=greeting' data '{module.decode().rstrip()}.'")
               for line in lines), lines
    assert "fw_cfg: signature QEMU, cpus 1, ram 8 MiB" in lines
    assert "acpi: FADT, PM timer at 0x00000608" in lines
    assert "acpi: MADT, 1 cpus, 1 ioapic" in lines
    assert "pm timer: advancing" in lines
    assert lines[-1] == "mbkernel: ok, 1 cpus online"


@pytest.mark.kvm
def test_c_kernel_without_platform_pieces(tmp_path: Path) -> None:
    """No fw_cfg and no ACPI: the kernel says so (all-ones reads of the unclaimed ports)."""
    text = (CONFIGS / "mb_kernel.yaml").read_text().replace("../guests", str(GUESTS))
    config = parse_config(text, path=tmp_path / "x.yaml", overrides=["platform.fw_cfg=false",
                                                                     "platform.acpi=false"])
    with build_machine(config, capture_console=True) as machine:
        result = machine.run_config()
    assert "fw_cfg: none" in result.console and "acpi: no RSDP" in result.console
    assert result.exit_code == 0x41          # 1 CPU online, fw_cfg and MADT do not agree


# -- YAML ---------------------------------------------------------------------------------
def test_module_config_errors_name_file_line_and_key(tmp_path: Path) -> None:
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(fields_kernel())
    text = (f"version: 1\nmachine: {{memory: 4M}}\nimages:\n  - type: multiboot\n    path: {kernel}\n"
            f"    modules:\n      - {{path: missing.bin}}\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, path=tmp_path / "c.yaml")
    assert ":7:" in str(info.value) and "images[0].modules[0].path" in str(info.value)
    text = text.replace("{path: missing.bin}", "{path: k.bin, bogus: 1}")
    with pytest.raises(ConfigError, match="bogus"):
        parse_config(text, path=tmp_path / "c.yaml")
