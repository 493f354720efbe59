"""Platform pieces (issue 8): fw_cfg, ACPI tables and PM timer, PCI with no device, scratch
register, RAM windows, the in-kernel irqchip, unclaimed ports in default and strict mode."""
from __future__ import annotations

import struct
import time

import pytest

import minivmm.devices
import minivmm.platform
from minivmm.devices import AcpiPm, FwCfg, PciNoDevices, PortDevice, ScratchRegister
from minivmm.platform import (ACPI_BASE, PlatformConfig, RamWindow, ScratchConfig, build_acpi_tables,
                              install_platform)


def fw_cfg_item(device: FwCfg, key: int, length: int) -> bytes:
    device.io_write(0x510, 2, key)
    return bytes(device.io_read(0x511, 1) for _ in range(length))


# -- the devices ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", [FwCfg(), AcpiPm(), PciNoDevices(), ScratchRegister()],
                         ids=lambda device: type(device).__name__)
def test_platform_devices_are_port_devices(device: PortDevice) -> None:
    assert isinstance(device, PortDevice)
    assert type(device).__module__.startswith("minivmm.devices.")


def test_platform_reexports_its_devices() -> None:
    for name in ("FwCfg", "AcpiPm", "PciNoDevices", "ScratchRegister"):
        assert getattr(minivmm.platform, name) is getattr(minivmm.devices, name)
        assert name in minivmm.platform.__all__


# -- fw_cfg (QEMU docs/specs/fw_cfg.rst) ---------------------------------------------------
def test_fw_cfg_keys() -> None:
    device = FwCfg(cpus=3, ram_size=64 << 20)
    assert device.ports == range(0x510, 0x512)
    assert fw_cfg_item(device, 0x0000, 4) == b"QEMU"
    assert struct.unpack("<I", fw_cfg_item(device, 0x0001, 4))[0] & 1       # traditional interface
    assert struct.unpack("<H", fw_cfg_item(device, 0x0005, 2))[0] == 3      # FW_CFG_NB_CPUS
    assert struct.unpack("<Q", fw_cfg_item(device, 0x0003, 8))[0] == 64 << 20   # FW_CFG_RAM_SIZE
    assert fw_cfg_item(device, 0x1234, 4) == bytes(4)                      # unknown key: zeros
    assert fw_cfg_item(device, 0x0000, 6) == b"QEMU\0\0"                   # past the end: zeros


def test_fw_cfg_selector_restarts_the_item_and_files_are_listed() -> None:
    device = FwCfg()
    device.io_write(0x510, 2, 0)
    assert device.io_read(0x511, 1) == ord("Q")
    device.io_write(0x510, 2, 0)
    assert device.io_read(0x511, 1) == ord("Q")
    key = device.add_file("etc/minivmm/hello", b"hi there")
    directory = fw_cfg_item(device, 0x0019, 4 + 64)
    count, = struct.unpack(">I", directory[:4])
    size, select = struct.unpack(">IH", directory[4:10])
    assert (count, size, select) == (1, 8, key)
    assert directory[12:12 + 17] == b"etc/minivmm/hello"
    assert fw_cfg_item(device, key, 8) == b"hi there"


# -- ACPI (ACPI 6.5 section 5.2) -------------------------------------------------------------
def tables_by_signature(tables) -> dict[bytes, bytes]:
    blob, base = tables.blob, tables.base
    rsdp = blob[tables.rsdp - base: tables.rsdp - base + 20]
    rsdt_address, = struct.unpack_from("<I", rsdp, 16)
    found = {b"RSD PTR ": rsdp}

    def table(address: int) -> bytes:
        length, = struct.unpack_from("<I", blob, address - base + 4)
        return blob[address - base: address - base + length]

    rsdt = table(rsdt_address)
    found[b"RSDT"] = rsdt
    for address in struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36):
        data = table(address)
        found[data[:4]] = data
    fadt = found[b"FACP"]
    found[b"DSDT"] = table(struct.unpack_from("<I", fadt, 40)[0])
    return found


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_acpi_tables_checksums_and_contents(cpus: int) -> None:
    tables = build_acpi_tables(cpus)
    assert tables.base == ACPI_BASE and tables.rsdp % 16 == 0
    assert ACPI_BASE <= tables.rsdp and tables.base + len(tables.blob) <= 0x100000
    found = tables_by_signature(tables)
    rsdp = found[b"RSD PTR "]
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 0 and sum(rsdp) % 256 == 0   # revision 0
    for signature in (b"RSDT", b"FACP", b"APIC", b"DSDT"):
        data = found[signature]
        assert sum(data) % 256 == 0, signature
        assert struct.unpack_from("<I", data, 4)[0] == len(data)
    fadt = found[b"FACP"]
    assert len(fadt) == 116
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608                 # PM_TMR_BLK
    assert fadt[91] == 4                                                  # PM_TMR_LEN
    assert struct.unpack_from("<I", fadt, 112)[0] & (1 << 8)               # TMR_VAL_EXT: 32-bit
    madt = found[b"APIC"]
    assert struct.unpack_from("<I", madt, 36)[0] == 0xFEE00000
    entries, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries.append((kind, madt[offset:offset + length]))
        offset += length
    lapics = [e for k, e in entries if k == 0]
    assert [(e[3], struct.unpack_from("<I", e, 4)[0]) for e in lapics] == [(i, 1) for i in range(cpus)]
    ioapics = [e for k, e in entries if k == 1]
    assert len(ioapics) == 1 and struct.unpack_from("<I", ioapics[0], 4)[0] == 0xFEC00000


def test_acpi_24_bit_timer_flag() -> None:
    fadt = tables_by_signature(build_acpi_tables(1, timer_32bit=False))[b"FACP"]
    assert not struct.unpack_from("<I", fadt, 112)[0] & (1 << 8)


def test_pm_timer_advances_at_3_58_mhz() -> None:
    pm = AcpiPm()
    first = pm.io_read(0x608, 4)
    time.sleep(0.02)
    second = pm.io_read(0x608, 4)
    ticks = (second - first) & 0xFFFFFFFF
    assert 0.015 * 3_579_545 < ticks < 1.0 * 3_579_545
    narrow = AcpiPm(timer_32bit=False)
    assert all(narrow.io_read(0x608, 4) <= 0xFFFFFF for _ in range(10))
    assert pm.io_read(0x604, 2) & 1                                     # SCI_EN: ACPI mode


def test_pci_no_device_and_scratch_register() -> None:
    pci = PciNoDevices()
    pci.io_write(0xCF8, 4, 0x80000000)
    assert pci.io_read(0xCF8, 4) == 0x80000000
    assert pci.io_read(0xCFC, 4) == 0xFFFFFFFF and pci.io_read(0xCFE, 2) == 0xFFFF
    scratch = ScratchRegister(port=0x520, width=4)
    scratch.io_write(0x520, 4, 0xDEADBEEF)
    assert scratch.io_read(0x520, 4) == 0xDEADBEEF
    scratch.io_write(0x521, 1, 0x11)
    assert scratch.io_read(0x520, 4) == 0xDEAD11EF and scratch.io_read(0x522, 2) == 0xDEAD
    with pytest.raises(ValueError, match="width"):
        ScratchRegister(width=3)


# -- on a machine ------------------------------------------------------------------------------
UNCLAIMED = """
    inb $0x99, %al          /* nothing claims port 0x99 */
    outb %al, $0x98         /* nor 0x98: the write is dropped */
    outb %al, $0xf4
1:  jmp 1b
"""


@pytest.mark.kvm
def test_unclaimed_port_reads_all_ones_by_default(make_machine) -> None:
    m = make_machine(mode="protected")
    m.load_asm(UNCLAIMED)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0xFF), r


@pytest.mark.kvm
def test_unclaimed_port_stops_the_run_in_strict_mode(make_machine) -> None:
    m = make_machine(mode="protected")
    image = m.load_asm(UNCLAIMED)
    install_platform(m, PlatformConfig(strict_ports=True))
    r = m.run(timeout=5)
    assert r.reason == "error", r
    assert "port 0x99" in r.message and "read" in r.message
    assert f"rip={image.load_address:#x}" in r.message


@pytest.mark.kvm
def test_strict_mode_leaves_claimed_ports_and_handlers_alone(make_machine) -> None:
    from minivmm.actions import Resume
    from minivmm.exits import ExitReason
    m = make_machine(mode="protected")
    m.load_asm("""
        movw $0x5, %ax
        movw $0x510, %dx
        outw %ax, %dx           /* fw_cfg: FW_CFG_NB_CPUS */
        incw %dx
        inb %dx, %al
        movb %al, %bl
        inb $0x99, %al          /* answered by a handler */
        addb %bl, %al
        outb %al, $0xf4
    1:  jmp 1b
    """)
    install_platform(m, PlatformConfig(strict_ports=True, fw_cfg=True))

    def answer(vcpu, info):
        info.data = 40
        return Resume()

    m.on(ExitReason.IO_INSTRUCTION, answer, port=0x99)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 41), r


@pytest.mark.kvm
def test_acpi_tables_in_guest_memory(make_machine) -> None:
    m = make_machine(mode="protected", memory="2M", vcpus=2)
    installed = install_platform(m, PlatformConfig(acpi=True, fw_cfg=True, pci=True,
                                                   scratch=[ScratchConfig(port=0x530, width=2)]))
    tables = installed.acpi_tables
    assert m.memory.read(ACPI_BASE, len(tables.blob)) == tables.blob
    # A guest-side scan finds it: 16-byte aligned "RSD PTR " with a valid checksum.
    for address in range(0xE0000, 0x100000, 16):
        data = m.memory.read(address, 20)
        if data[:8] == b"RSD PTR " and sum(data) % 256 == 0:
            break
    else:
        pytest.fail("no RSDP in 0xE0000-0xFFFFF")
    madt = m.memory.read(tables.addresses["APIC"], 200)
    length, = struct.unpack_from("<I", madt, 4)
    assert sum(madt[:length]) % 256 == 0
    assert fw_cfg_item(installed.fw_cfg, 5, 2) == b"\x02\x00"
    assert installed.scratch[0].ports == range(0x530, 0x532)


@pytest.mark.kvm
def test_acpi_needs_low_memory(make_machine) -> None:
    m = make_machine(mode="protected", memory="512K")
    with pytest.raises(ValueError, match="machine.memory >= 1M"):
        install_platform(m, PlatformConfig(acpi=True))


@pytest.mark.kvm
def test_ram_window(make_machine) -> None:
    m = make_machine(mode="protected")
    install_platform(m, PlatformConfig(ram_windows=[RamWindow(0x40000000, 0x10000, "win")]))
    m.load_asm("""
        movl $0x12345678, 0x40000100
        movl 0x40000100, %eax
        cmpl $0x12345678, %eax
        jne 1f
        EXIT 0
    1:  EXIT 1
    """)
    r = m.run(timeout=5)
    assert (r.reason, r.exit_code) == ("exit", 0), r
    assert m.memory.read(0x40000100, 4) == struct.pack("<I", 0x12345678)


@pytest.mark.kvm
def test_irq_line_needs_the_irqchip(make_machine) -> None:
    m = make_machine(mode="protected")
    with pytest.raises(RuntimeError, match="irqchip"):
        m.irq_line(4, 1)
    chip = make_machine(mode="protected", irqchip=True)
    chip.irq_line(4, 1)
    chip.irq_line(4, 0)


@pytest.mark.kvm
def test_irq_line_delivers_through_the_pic(make_machine) -> None:
    """A device raises ISA IRQ 1; the guest's 8259 (in the kernel) delivers vector 0x21."""
    from minivmm.exits import ExitReason
    m = make_machine(mode="protected", irqchip=True)
    m.load_asm("""
        mov $handler, %eax                /* interrupt gate 0x21 -> handler, selector 0x18 */
        movw %ax, idt + 0x21 * 8
        movw $0x18, idt + 0x21 * 8 + 2
        movw $0x8e00, idt + 0x21 * 8 + 4
        shr $16, %eax
        movw %ax, idt + 0x21 * 8 + 6
        lidt idt_desc
        /* 8259 master: ICW1-4, vector base 0x20, then unmask IRQ1 only */
        movb $0x11, %al; outb %al, $0x20
        movb $0x20, %al; outb %al, $0x21
        movb $0x04, %al; outb %al, $0x21
        movb $0x01, %al; outb %al, $0x21
        movb $0xfd, %al; outb %al, $0x21
        outb %al, $0x80         /* the host raises IRQ 1 here */
        sti
        mov $200000, %ecx
    1:  dec %ecx
        jnz 1b
        EXIT 1                  /* no interrupt came */
    handler:
        EXIT 0x21
    .align 8
    idt:
        .fill 0x22, 8, 0
    idt_desc:
        .word 0x22 * 8 - 1
        .long idt
    """)
    m.on(ExitReason.IO_INSTRUCTION, lambda vcpu, info: m.irq_line(1, 1), port=0x80)
    r = m.run(timeout=10)
    assert (r.reason, r.exit_code) == ("exit", 0x21), r


@pytest.mark.kvm
def test_hlt_does_not_exit_with_the_in_kernel_lapic(make_machine) -> None:
    plain = make_machine(mode="protected")
    plain.load_asm("cli\nhlt")
    assert plain.run(timeout=5).reason == "hlt"
    chip = make_machine(mode="protected", irqchip=True)
    chip.load_asm("cli\nhlt")
    r = chip.run(timeout=0.3)
    assert r.reason == "timeout" and "EXECUTE_HLT" not in r.exits, r


# -- YAML ----------------------------------------------------------------------------------
PLATFORM_YAML = """\
version: 1
machine: {mode: protected, memory: 2M}
images:
  - {type: asm, source: g.S}
platform:
  irqchip: true
  pit: true
  fw_cfg: true
  acpi: {pm_timer_32bit: false}
  pci: true
  scratch: [0x520, {port: 0x530, width: 2}]
  ram_windows: [{start: 0x40000000, size: 64K}]
  strict_ports: true
"""


def test_platform_yaml(tmp_path) -> None:
    from minivmm.config import parse_config
    (tmp_path / "g.S").write_text("")
    config = parse_config(PLATFORM_YAML, path=tmp_path / "p.yaml")
    p = config.platform
    assert (p.irqchip, p.pit, p.fw_cfg, p.acpi, p.pm_timer_32bit, p.pci, p.strict_ports) == \
        (True, True, True, True, False, True, True)
    assert [(s.port, s.width) for s in p.scratch] == [(0x520, 4), (0x530, 2)]
    assert [(w.start, w.size) for w in p.ram_windows] == [(0x40000000, 0x10000)]
    assert not parse_config(PLATFORM_YAML.split("platform:")[0], path=tmp_path / "p.yaml").platform.fw_cfg


@pytest.mark.parametrize("change, line, message", [
    (("  irqchip: true\n", ""), 6, "platform.pit: the in-kernel PIT needs the in-kernel irqchip"),
    (("{port: 0x530, width: 2}", "{port: 0x530, width: 3}"), 11, "platform.scratch[1].width: expected 1, 2 or 4"),
    (("size: 64K", "size: 100"), 12, "platform.ram_windows[0]: a RAM window needs a page-aligned start"),
    (("  pci: true\n", "  pcie: true\n"), 10, "platform.pcie: unknown key"),
])
def test_platform_yaml_errors(tmp_path, change, line, message) -> None:
    from minivmm.config import ConfigError, parse_config
    (tmp_path / "g.S").write_text("")
    with pytest.raises(ConfigError) as info:
        parse_config(PLATFORM_YAML.replace(*change), path=tmp_path / "p.yaml")
    assert f"p.yaml:{line}: {message}" in str(info.value)


@pytest.mark.kvm
def test_platform_yaml_builds(tmp_path) -> None:
    from minivmm.config import build_machine, parse_config
    (tmp_path / "g.S").write_text('.include "minivmm.inc"\n'
                                  'movw $0xbeef, %ax\nmovw $0x530, %dx\noutw %ax, %dx\ninw %dx, %ax\n'
                                  'cmpw $0xbeef, %ax\njne 1f\nEXIT 0\n1: EXIT 1\n')
    config = parse_config(PLATFORM_YAML, path=tmp_path / "p.yaml")
    with build_machine(config, capture_console=True) as machine:
        assert machine.irqchip and machine.platform.acpi_tables is not None
        result = machine.run_config()
    assert (result.reason, result.exit_code) == ("exit", 0), result
