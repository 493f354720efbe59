"""The assembly of a PC platform for kernels written for QEMU's `-kernel`: which of the
platform devices to add (fw_cfg, the ACPI PM timer, an empty PCI bus, scratch
registers, the RTC, QEMU's pc-testdev), the ACPI tables that describe them, ACPI S3,
extra RAM windows and strict ports. The devices themselves live in `minivmm.devices`
(one module each); the older ones' names are re-exported here.

Each piece is optional and off unless asked for (YAML `platform:` section, or
`install_platform(machine, PlatformConfig(...))` from Python):

| piece        | what the guest sees                                                     |
|--------------|-------------------------------------------------------------------------|
| `irqchip`    | KVM's in-kernel LAPIC (0xFEE00000), IOAPIC (0xFEC00000) and 8259 PICs;  |
|              | created before the vCPUs (`Machine(irqchip=True)`), forced on by SMP.   |
|              | HLT is then handled in the kernel: it no longer exits, a halted vCPU     |
|              | waits in KVM_RUN for an interrupt (or the run deadline).                |
| `pit`        | KVM's in-kernel 8254 PIT on IRQ 0 and port 0x61 (needs the irqchip)     |
| `rtc`        | the MC146818 RTC/CMOS at 0x70/0x71, IRQ 8 (interrupts need the irqchip);|
|              | `rtc_start` fixes its start time (epoch seconds), else the host's clock |
| `fw_cfg`     | QEMU's fw_cfg, port interface: selector 0x510 (16-bit write), data 0x511 |
| `acpi`       | RSDP/RSDT/FADT/FACS/DSDT/MADT in 0xE0000-0xFFFFF and the PM1 block at    |
|              | 0x600 with the PM timer at 0x608 (3.579545 MHz, 24 or 32 bits); S3:     |
|              | SLP_TYP=1|SLP_EN stops the vCPU until the RTC alarm or `acpi_pm.wake()`,|
|              | then real mode at the FACS waking vector (`install_sleep_states`; with  |
|              | several vCPUs only the one that wrote PM1a_CNT stops)                   |
| `pci`        | ports 0xCF8-0xCFF: configuration mechanism #1 with no device (all ones) |
| `scratch`    | a register at a chosen port that reads back what was written            |
| `ram_windows`| extra guest RAM regions (e.g. above the low RAM, as an MMIO-style window)|
| `strict_ports`| an access to a port no device claims stops the run (reason "error")    |
| `testdev`    | QEMU's pc-testdev (see `minivmm.devices.testdev`; needs the irqchip)    |

`pc_platform()` (YAML `platform: pc`) is the set a PC kernel expects: irqchip, PIT, RTC,
fw_cfg, ACPI and PCI; the test device stays off unless asked for.

Without `strict_ports`, reads of unclaimed ports return all ones and writes are
dropped, as on a PC's ISA bus (minivmm's default).

References: ACPI 6.5 sections 5.2.5 (RSDP), 5.2.7 (RSDT), 5.2.9 (FADT), 5.2.10
(FACS) and 5.2.12 (MADT); the devices' modules cite theirs.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .actions import RESUME, RETRY, Reply, Stop
from .exits import ExitReason
from .lazy import lazy_names
from .memory import GuestMemoryError

if TYPE_CHECKING:
    from .devices.acpi_pm import AcpiPm
    from .devices.fw_cfg import FwCfg
    from .devices.pci import PciNoDevices
    from .devices.scratch import ScratchRegister
    from .devices.rtc import CmosRtc
    from .devices.testdev import PcTestdev
    from .machine import Machine

__all__ = ["FwCfg", "AcpiPm", "PciNoDevices", "ScratchRegister", "AcpiTables", "build_acpi_tables",
           "PlatformConfig", "RamWindow", "RamWindowError", "check_ram_windows", "ScratchConfig", "install_platform", "acpi_checksum",
           "pc_platform", "install_testdev", "FW_CFG_PORT", "PM_BASE", "PM_TIMER_HZ", "ACPI_BASE", "LAPIC_ADDRESS", "IOAPIC_ADDRESS"]

# ---------------------------------------------------------------------------
# ACPI tables

ACPI_BASE = 0xE0000
ACPI_END = 0x100000
LAPIC_ADDRESS = 0xFEE00000
IOAPIC_ADDRESS = 0xFEC00000
SCI_IRQ = 9
OEM_ID = b"MINVMM"
OEM_TABLE_ID = b"MINIVMM "
CREATOR_ID = b"MVMM"
FADT_WBINVD = 1 << 0
FADT_TMR_VAL_EXT = 1 << 8
MADT_PCAT_COMPAT = 1 << 0


# Name(_S3_, Package() {1, 1, 0, 0}) and Name(_S5_, Package() {0, 0, 0, 0}) in AML (ACPI 6.5
# 7.4.2 and 20.2.5): the SLP_TYP values for PM1a/PM1b, which AcpiPm decodes.
DSDT_SLEEP_STATES = (bytes.fromhex("08 5F53335F 12 08 04 0A01 0A01 00 00") +
                     bytes.fromhex("08 5F53355F 12 06 04 00 00 00 00"))


# The devices' names are re-exported here; their modules load with the first platform that has them.
__getattr__ = lazy_names(__name__, {
    "AcpiPm": ".devices.acpi_pm", "PM_BASE": ".devices.acpi_pm", "PM_TIMER_HZ": ".devices.acpi_pm",
    "FwCfg": ".devices.fw_cfg", "FW_CFG_PORT": ".devices.fw_cfg", "PciNoDevices": ".devices.pci",
    "ScratchRegister": ".devices.scratch"})


def acpi_checksum(data: bytes) -> int:
    """The byte that makes `data` (with its checksum byte 0) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """An ACPI system description table: the 36-byte header (ACPI 5.2.6) and `body`."""
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                         CREATOR_ID, 1)
    table = bytearray(header + body)
    table[9] = acpi_checksum(table)
    return bytes(table)


@dataclass
class AcpiTables:
    """The tables as laid out from `base`: `blob` goes to guest-physical `base`."""
    base: int
    blob: bytes
    addresses: dict[str, int]

    @property
    def rsdp(self) -> int:
        return self.addresses["RSDP"]


def build_acpi_tables(cpus: int, *, base: int = ACPI_BASE, pm_base: int | None = None,
                      timer_32bit: bool = True, sci_irq: int = SCI_IRQ) -> AcpiTables:
    """RSDP (revision 0, ACPI 1.0 style, pointing at the RSDT), FACS, a DSDT with only \\_S3 and
    \\_S5 (DSDT_SLEEP_STATES), a
    revision-1 FADT (PM1a event/control blocks, PM_TMR_BLK = pm_base + 8, SCI on
    `sci_irq`) and the MADT: one processor-local-APIC entry per vCPU (APIC ID = vCPU
    index, enabled), an IOAPIC at 0xFEC00000 (GSI base 0) and the interrupt source
    overrides QEMU's pc machine has (IRQ0 -> GSI2, the SCI level-triggered). `pm_base` defaults
    to PM_BASE, where `install_platform` puts the PM block."""
    from .devices.acpi_pm import PM1_CNT_LEN, PM1_EVT_LEN, PM_BASE, PM_TMR_LEN
    pm_base = PM_BASE if pm_base is None else pm_base
    if not 1 <= cpus <= 255:
        raise ValueError(f"cpus must be 1..255, not {cpus}")
    blob = bytearray()
    addresses: dict[str, int] = {}

    def place(name: str, data: bytes, align: int = 16) -> int:
        blob.extend(bytes(-len(blob) % align))
        addresses[name] = base + len(blob)
        blob.extend(data)
        return addresses[name]

    place("RSDP", bytes(20))                                # filled in at the end
    facs = place("FACS", struct.pack("<4sIIIII", b"FACS", 64, 0, 0, 0, 0).ljust(64, b"\0"), 64)
    dsdt = place("DSDT", _table(b"DSDT", 1, DSDT_SLEEP_STATES))
    fadt_body = bytearray(116 - 36)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, fadt_body, offset - 36, *values)

    put(36, "<II", facs, dsdt)
    put(46, "<H", sci_irq)
    put(48, "<I", 0)                                        # SMI_CMD 0: always in ACPI mode
    put(56, "<I", pm_base)                                  # PM1a_EVT_BLK
    put(64, "<I", pm_base + 4)                              # PM1a_CNT_BLK
    put(76, "<I", pm_base + 8)                              # PM_TMR_BLK
    put(88, "<BBBB", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN)
    put(96, "<HH", 101, 1001)                               # no C2/C3
    put(112, "<I", FADT_WBINVD | (FADT_TMR_VAL_EXT if timer_32bit else 0))
    fadt = place("FACP", _table(b"FACP", 1, bytes(fadt_body)))
    entries = b"".join(struct.pack("<BBBBI", 0, 8, i, i, 1) for i in range(cpus))
    entries += struct.pack("<BBBBII", 1, 12, 0, 0, IOAPIC_ADDRESS, 0)
    entries += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)               # IRQ0 -> GSI2
    entries += struct.pack("<BBBBIH", 2, 10, 0, sci_irq, sci_irq, 0xD)  # SCI: level, active high
    madt = place("APIC", _table(b"APIC", 1, struct.pack("<II", LAPIC_ADDRESS, MADT_PCAT_COMPAT) + entries))
    rsdt = place("RSDT", _table(b"RSDT", 1, struct.pack("<II", fadt, madt)))
    rsdp = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt))
    rsdp[8] = acpi_checksum(rsdp)
    blob[0:20] = rsdp
    if base + len(blob) > ACPI_END and base < ACPI_END:
        raise ValueError("the ACPI tables do not fit below 1 MiB")
    return AcpiTables(base, bytes(blob), addresses)


# ---------------------------------------------------------------------------
# Configuration and installation


@dataclass
class RamWindow:
    """`platform.ram_windows`: extra guest RAM at `start`."""
    start: int
    size: int
    name: str = "window"
    where: str = ""                 # "file:line" of its config entry, for error messages


class RamWindowError(GuestMemoryError):
    """A RAM window that cannot be added; `index` is its place in the window list."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def check_ram_windows(ram_size: int, windows: "list[RamWindow]") -> None:
    """Raise RamWindowError for the first window that is not page aligned, is empty, or
    overlaps the RAM at [0, ram_size) or an earlier window (what `GuestMemory.add_region`
    would refuse)."""
    taken = [(0, ram_size, "the RAM at 0 (machine.memory)")]
    for index, window in enumerate(windows):
        start, end = window.start, window.start + window.size
        if start % 4096 or window.size % 4096 or window.size <= 0:
            raise RamWindowError(f"RAM window {window.name} needs a page-aligned start and a non-zero "
                                 f"page-multiple size; got start {start:#x} size {window.size:#x}", index)
        for other_start, other_end, what in taken:
            if start < other_end and other_start < end:
                raise RamWindowError(f"RAM window {window.name} [{start:#x}, {end:#x}) overlaps {what} "
                                     f"[{other_start:#x}, {other_end:#x})", index)
        taken.append((start, end, f"RAM window {window.name}"))


@dataclass
class ScratchConfig:
    """`platform.scratch`: a read-back register at `port`."""
    port: int = 0x520
    width: int = 4


@dataclass
class PlatformConfig:
    """What `install_platform` adds; everything is off by default. `irqchip` and `pit`
    must be known when the Machine is created (`Machine(irqchip=True)`)."""
    irqchip: bool = False
    pit: bool = False
    fw_cfg: bool = False
    acpi: bool = False
    pm_timer_32bit: bool = True
    pci: bool = False
    scratch: list[ScratchConfig] = field(default_factory=list)
    ram_windows: list[RamWindow] = field(default_factory=list)
    strict_ports: bool = False
    rtc: bool = False
    rtc_start: float | None = None
    testdev: bool = False

    @property
    def empty(self) -> bool:
        return self == PlatformConfig()


@dataclass
class InstalledPlatform:
    """The devices `install_platform` added (None where not asked for)."""
    fw_cfg: FwCfg | None = None
    acpi_pm: AcpiPm | None = None
    acpi_tables: AcpiTables | None = None
    pci: PciNoDevices | None = None
    scratch: list[ScratchRegister] = field(default_factory=list)
    rtc: "CmosRtc | None" = None
    testdev: "PcTestdev | None" = None


def pc_platform(**overrides) -> PlatformConfig:
    """What a kernel written for QEMU's pc machine expects: irqchip, PIT, RTC, fw_cfg, ACPI
    and PCI (`overrides` change single pieces, e.g. `testdev=True`)."""
    return PlatformConfig(**{**dict(irqchip=True, pit=True, rtc=True, fw_cfg=True, acpi=True, pci=True),
                             **overrides})


def _irq_line(machine: "Machine", irq: int):
    """A `level -> None` driver of ISA line `irq` through KVM_IRQ_LINE, or None without the irqchip."""
    if not machine.vm.irqchip:
        return None
    fd = machine.vm.fd
    return lambda level: fd.irq_line(irq, level)


def _host_page_flusher(machine: "Machine") -> Callable[[int], None]:
    """`flush(gpa)`: protect and unprotect the host mapping of the guest page at `gpa`, which
    makes KVM drop its mapping of it (the pc-testdev flush port; QEMU does the same)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    memory = machine.memory

    def flush(gpa: int) -> None:
        region = memory.region_at(gpa)
        if region is None:
            return                                          # not RAM: nothing mapped to flush
        host = region.host_addr + (gpa - region.gpa)
        for prot in (0, mmap.PROT_READ | mmap.PROT_WRITE):          # PROT_NONE, then read/write
            if libc.mprotect(host, 4096, prot) != 0:
                raise OSError(ctypes.get_errno(), f"mprotect of the guest page at {gpa:#x} failed")
    return flush


def install_testdev(machine: "Machine") -> "PcTestdev":
    """QEMU's pc-testdev (`minivmm.devices.testdev`): its ports, its IRQ lines driven through
    KVM_IRQ_LINE, and its IORAM served by an EPT-misconfiguration (MMIO exit) hook."""
    if not machine.vm.irqchip:
        raise ValueError("the test device drives IRQ lines through the in-kernel irqchip (platform.irqchip: true)")
    from .devices.testdev import IOMEM_BASE, IOMEM_SIZE, PcTestdev      # loaded when asked for
    fd = machine.vm.fd
    device = PcTestdev(set_irq=lambda line, level: fd.irq_line(line, level), flush_page=_host_page_flusher(machine))
    machine.add_device(device)
    machine.add_device(device.irq_lines)

    def iomem(vcpu, info):
        exit = info.raw_kvm_exit
        if exit.is_write:
            device.iomem_write(exit.phys_addr, exit.data[:exit.length])
            return RESUME
        return Reply(device.iomem_read(exit.phys_addr, exit.length))

    machine.on(ExitReason.EPT_MISCONFIGURATION, iomem, address=(IOMEM_BASE, IOMEM_BASE + IOMEM_SIZE))
    return device


S3_MAX_SLEEP = 600.0
"""Seconds a suspended machine waits for a wake event before the run stops with an error."""


def install_sleep_states(machine: "Machine", pm: AcpiPm, tables: AcpiTables) -> None:
    """ACPI S5 and S3 on PM1a_CNT. SLP_TYP=S5|SLP_EN (QEMU's `outw 0x2000, 0x604` shutdown) ends
    the run: result "exit", exit code 0. SLP_TYP=S3|SLP_EN: the vCPU stops in that exit with
    its state and memory kept, until `pm.wake()` or an RTC alarm (RTC_EN) wakes it; then it
    resumes as firmware would, without a BIOS: in real mode at the FACS firmware waking vector
    (CS = vector >> 4, IP = vector & 0xF), WAK_STS set in PM1_STS. (ACPI 6.5 16.3.)"""
    from .devices.acpi_pm import SLP_TYP_S3, SLP_TYP_S5
    from .modes import RFLAGS_FIXED
    from .vcpu import Segment, run_timer
    memory = machine.memory
    waking_vector_at = tables.addresses["FACS"] + 12

    def pm1_control(vcpu, info):
        if info.is_in or info.string_data is not None:
            return None
        pm.io_write(info.port, info.size, info.data)
        request = pm.take_sleep_request()
        if request == SLP_TYP_S5:
            return Stop("exit", 0, message="ACPI S5 (soft off): the guest powered the machine off")
        if request != SLP_TYP_S3:
            return RESUME
        if not pm.suspend_until_wake(S3_MAX_SLEEP, give_up=lambda: run_timer.expired):
            if run_timer.expired:
                return Stop("timeout", message="the run's deadline passed while the machine slept in S3")
            return Stop("error", message=f"S3: no wake event in {S3_MAX_SLEEP:.0f} s")
        vector = int.from_bytes(memory.read(waking_vector_at, 4), "little")
        if vector == 0 or vector > 0xFFFFF:
            return Stop("error", message=f"S3 resume: the FACS firmware waking vector is {vector:#x}")
        sregs = vcpu.sregs
        Segment(selector=vector >> 4, base=vector & ~0xF, limit=0xFFFF, type=0xB, g=0, db=0).to_kvm(sregs.cs)
        for name in ("ds", "es", "fs", "gs", "ss"):
            Segment(selector=0, base=0, limit=0xFFFF, type=0x3, g=0, db=0).to_kvm(getattr(sregs, name))
        sregs.cr0, sregs.cr4, sregs.efer = 0x10, 0, 0                    # CR0.ET only: real mode
        vcpu.set_sregs(sregs)
        vcpu.rip, vcpu.rflags = vector & 0xF, RFLAGS_FIXED
        return RETRY

    machine.on(ExitReason.IO_INSTRUCTION, pm1_control, port=pm.base + 4)


def enable_strict_ports(machine: "Machine") -> None:
    """Make an access to a port that no device claims stop the run with reason "error" and a
    message naming the port, the direction and RIP (instead of all-ones reads and dropped
    writes). Changes the default I/O handler only: handlers the user registered still see
    their ports first, and claimed ports cost nothing extra."""
    from .exits import ExitReason
    from .handlers import io
    machine.vm.dispatcher.set_default(ExitReason.IO_INSTRUCTION, io.port_devices(machine.vm.ports, strict=True))
    machine.invalidate_io_routes()


def install_platform(machine: "Machine", config: PlatformConfig) -> InstalledPlatform:
    """Add the asked-for pieces to `machine` (see the module docstring); the result is also
    kept as `machine.platform`."""
    from .devices import AcpiPm, FwCfg, PciNoDevices, ScratchRegister
    installed = InstalledPlatform()
    ram_size = sum(region.size for region in machine.memory.regions)
    low = machine.memory.region_at(0)
    check_ram_windows(low.end if low is not None else 0, config.ram_windows)
    if config.pit:
        machine.vm.create_pit()
    for window in config.ram_windows:
        machine.add_ram(window.start, window.size, name=window.name)
    if config.fw_cfg:
        installed.fw_cfg = FwCfg(cpus=len(getattr(machine, "vcpus", [machine.vcpu])), ram_size=ram_size)
        machine.add_device(installed.fw_cfg)
    if config.acpi:
        tables = build_acpi_tables(len(getattr(machine, "vcpus", [machine.vcpu])),
                                   timer_32bit=config.pm_timer_32bit)
        region = machine.memory.region_at(tables.base)
        if region is None or region.end < tables.base + len(tables.blob):
            raise ValueError(f"the ACPI tables go at {tables.base:#x}: guest RAM must cover "
                             f"[{tables.base:#x}, {tables.base + len(tables.blob):#x}) (machine.memory >= 1M)")
        machine.memory.write(tables.base, tables.blob)
        installed.acpi_tables = tables
        installed.acpi_pm = AcpiPm(timer_32bit=config.pm_timer_32bit)
        machine.add_device(installed.acpi_pm)
        install_sleep_states(machine, installed.acpi_pm, tables)
    if config.pci:
        installed.pci = PciNoDevices()
        machine.add_device(installed.pci)
    for scratch in config.scratch:
        device = ScratchRegister(port=scratch.port, width=scratch.width)
        machine.add_device(device)
        installed.scratch.append(device)
    if config.rtc:
        from .devices.rtc import RTC_IRQ, CmosRtc, RegisterC
        installed.rtc = CmosRtc(start=config.rtc_start, irq=_irq_line(machine, RTC_IRQ), memory_size=ram_size)
        machine.add_device(installed.rtc)
        installed.rtc.start_timer()
        machine.vm.on_close.append(installed.rtc.close)
        if installed.acpi_pm is not None:
            pm = installed.acpi_pm
            installed.rtc.add_listener(lambda flags: pm.rtc_alarm() if flags & RegisterC.AF else None)
    if config.testdev:
        installed.testdev = install_testdev(machine)
    if config.strict_ports:
        enable_strict_ports(machine)
    machine.platform = installed
    return installed
