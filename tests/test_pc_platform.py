"""PC platform fidelity (issue 17): the MC146818 RTC/CMOS, the in-kernel PIT, QEMU's pc-testdev,
`platform: pc`, each as register logic and through a multiboot kernel written for it
(guests/platform/)."""
from __future__ import annotations

import calendar
import re
import time
from pathlib import Path

import pytest

from minivmm.config import ConfigError, build_machine, check_expectation, load_config, parse_config
from minivmm.devices.rtc import UIP_WINDOW, CmosRtc, RegisterB, RegisterC, periodic_hz

PLATFORM_GUESTS = Path(__file__).resolve().parent.parent / "guests" / "platform"
START = calendar.timegm((2026, 12, 1, 12, 34, 56))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rtc_at(start: float = START, **kwargs) -> tuple[CmosRtc, FakeClock]:
    clock = FakeClock()
    return CmosRtc(start=start, clock=clock, **kwargs), clock


def read(rtc: CmosRtc, index: int) -> int:
    rtc.io_write(0x70, 1, index)
    return rtc.io_read(0x71, 1)


def write(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.io_write(0x70, 1, index)
    rtc.io_write(0x71, 1, value)


# The IRQ kernel's masked-window check (its exit code 6): on this host a level interrupt whose
# pin is masked before its EOI is, in about 5% of runs, delivered once more while still masked,
# under minivmm and under QEMU alike (measured: about 25 of 500 minivmm runs, 1 of 8 QEMU runs;
# minivmm writes no vCPU state during the run, and the IOAPIC and LAPIC accesses never leave
# the kernel). Only that outcome is retried.
HOST_REDELIVERS_MASKED = 6


def run_kernel(name: str, *, retry_exit_code: int | None = None, attempts: int = 3) -> tuple:
    config = load_config(PLATFORM_GUESTS / f"{name}.yaml")
    for _ in range(attempts if retry_exit_code is not None else 1):
        with build_machine(config, capture_console=True) as machine:
            result = machine.run_config()
            counters = dict(machine.counters)
            platform = machine.platform
        if result.exit_code != retry_exit_code:
            break
    problems = check_expectation(config.expect, result, counters)
    assert not problems, f"{name}: " + "; ".join(problems) + f"\nconsole:\n{result.console}"
    return result, platform


# -- RTC register logic (MC146818A data sheet) ------------------------------------------------
def test_rtc_reads_the_start_time_in_bcd_24_hour_form() -> None:
    rtc, _ = rtc_at()
    assert [read(rtc, i) for i in (0, 2, 4, 7, 8, 9, 0x32)] == [0x56, 0x34, 0x12, 0x01, 0x12, 0x26, 0x20]
    assert read(rtc, 6) == 3                                 # 2026-12-01 is a Tuesday: day 3 (Sunday = 1)
    assert read(rtc, 0x0B) == RegisterB.HOURS_24 and read(rtc, 0x0D) == 0x80
    assert read(rtc, 0x0A) == 0x26


def test_rtc_binary_and_12_hour_modes() -> None:
    rtc, _ = rtc_at(calendar.timegm((2026, 12, 1, 15, 4, 9)))
    write(rtc, 0x0B, RegisterB.DM_BINARY)                    # binary, 12-hour
    assert (read(rtc, 0), read(rtc, 2), read(rtc, 4)) == (9, 4, 0x80 | 3)
    write(rtc, 0x0B, 0)                                      # BCD, 12-hour
    assert read(rtc, 4) == 0x83
    write(rtc, 0x04, 0x12)                                   # 12 AM is midnight
    assert time.gmtime(int(rtc.guest_time())).tm_hour == 0


def test_rtc_time_runs_with_the_clock_and_writes_move_it() -> None:
    rtc, clock = rtc_at()
    clock.now += 5
    assert read(rtc, 0) == 0x01 and read(rtc, 2) == 0x35     # 12:35:01
    write(rtc, 0x09, 0x30)                                   # year 2030
    assert read(rtc, 9) == 0x30 and time.gmtime(int(rtc.guest_time())).tm_year == 2030


def test_rtc_set_bit_stops_the_clock_until_cleared() -> None:
    rtc, clock = rtc_at()
    write(rtc, 0x0B, RegisterB.SET | RegisterB.HOURS_24)
    write(rtc, 0x00, 0x10)
    clock.now += 30
    assert read(rtc, 0) == 0x10                              # stands still
    assert not read(rtc, 0x0A) & 0x80                        # no update in progress while SET
    write(rtc, 0x0B, RegisterB.HOURS_24)
    clock.now += 2
    assert read(rtc, 0) == 0x12 and read(rtc, 2) == 0x34


def test_rtc_update_in_progress_before_each_second_boundary() -> None:
    rtc, clock = rtc_at()
    clock.now += 1 - UIP_WINDOW / 2                           # inside the window before 12:34:57
    assert read(rtc, 0x0A) & 0x80 and read(rtc, 0) == 0x56
    clock.now += UIP_WINDOW                                   # past the boundary
    assert not read(rtc, 0x0A) & 0x80 and read(rtc, 0) == 0x57
    clock.now += 0.5
    assert not read(rtc, 0x0A) & 0x80


def test_rtc_flags_latch_raise_irq_8_only_when_enabled_and_clear_on_read() -> None:
    levels: list[int] = []
    rtc, clock = rtc_at(irq=levels.append)
    clock.now += 1.0
    assert read(rtc, 0x0C) == RegisterC.UF                   # UF latches even when disabled; PF needs PIE
    assert levels == []
    write(rtc, 0x0B, RegisterB.HOURS_24 | RegisterB.UIE)
    clock.now += 1.0
    rtc.tick()
    assert levels == [1] and rtc.interrupts == 1
    assert read(rtc, 0x0C) & (RegisterC.IRQF | RegisterC.UF) == RegisterC.IRQF | RegisterC.UF
    assert levels == [1, 0] and read(rtc, 0x0C) == 0


def test_rtc_alarm_with_dont_care_fields_and_next_event() -> None:
    levels: list[int] = []
    rtc, clock = rtc_at(irq=levels.append)
    write(rtc, 0x01, 0x05)                                    # hh:mm:05 for any hour and minute
    write(rtc, 0x03, 0xFF)
    write(rtc, 0x05, 0xC0)
    write(rtc, 0x0B, RegisterB.HOURS_24 | RegisterB.AIE)
    assert rtc.next_alarm(rtc.guest_time()) == START + 9      # 12:35:05
    assert rtc.next_event() == pytest.approx(clock.now + 9)
    clock.now += 8.5
    rtc.tick()
    assert levels == []
    clock.now += 1
    rtc.tick()
    assert levels == [1] and read(rtc, 0x0C) & RegisterC.AF
    write(rtc, 0x05, 0x11)                                    # 11:mm:05: tomorrow
    assert rtc.next_alarm(rtc.guest_time()) == calendar.timegm((2026, 12, 2, 11, 0, 5))


def test_rtc_periodic_rate_and_nmi_mask() -> None:
    assert periodic_hz(0x26) == 1024 and periodic_hz(0x2F) == 2 and periodic_hz(0x21) == 256
    assert periodic_hz(0x20) == 0
    rtc, clock = rtc_at()
    write(rtc, 0x0A, 0x2F)                                    # 2 Hz
    write(rtc, 0x0B, RegisterB.HOURS_24 | RegisterB.PIE)
    read(rtc, 0x0C)
    assert rtc.next_event() == pytest.approx(clock.now + 0.5, abs=0.5)
    clock.now += 0.6
    assert read(rtc, 0x0C) & RegisterC.PF
    rtc.io_write(0x70, 1, 0x80 | 0x0E)
    assert rtc.nmi_masked and rtc.io_read(0x70, 1) == 0xFF
    rtc.io_write(0x71, 1, 0x5A)
    rtc.io_write(0x70, 1, 0x0E)
    assert not rtc.nmi_masked and rtc.io_read(0x71, 1) == 0x5A   # CMOS RAM


def test_rtc_cmos_memory_size_fields() -> None:
    rtc, _ = rtc_at(memory_size=32 << 20)
    word = lambda i: read(rtc, i) | read(rtc, i + 1) << 8   # noqa: E731
    assert word(0x15) == 640 and word(0x17) == 31 << 10 and word(0x30) == 31 << 10
    assert word(0x34) == (16 << 20) >> 16
    big, _ = rtc_at(memory_size=5 << 30)
    assert read(big, 0x5B) | read(big, 0x5C) << 8 | read(big, 0x5D) << 16 == (1 << 30) >> 16
    assert read(big, 0x17) | read(big, 0x18) << 8 == 0xFFFF


def test_rtc_timer_thread_raises_the_alarm_on_its_own() -> None:
    levels: list[int] = []
    rtc = CmosRtc(start=START + 0.9, irq=levels.append)
    try:
        write(rtc, 0x0B, RegisterB.HOURS_24 | RegisterB.UIE)
        rtc.start_timer()
        deadline = time.monotonic() + 3
        while not levels and time.monotonic() < deadline:
            time.sleep(0.01)
        assert levels == [1]
    finally:
        rtc.close()


# -- config -------------------------------------------------------------------------------------
def config_text(platform: str) -> str:
    return ("version: 1\nimages:\n  - {type: multiboot, path: k.bin}\n"
            f"platform: {platform}\n")


def test_platform_pc_is_the_pc_set_and_testdev_stays_off(tmp_path: Path) -> None:
    (tmp_path / "k.bin").write_bytes(b"")
    pc = parse_config(config_text("pc"), path=tmp_path / "c.yaml").platform
    assert (pc.irqchip, pc.pit, pc.rtc, pc.fw_cfg, pc.acpi, pc.pci, pc.testdev) == (True,) * 6 + (False,)
    with_testdev = parse_config(config_text("{pc: true, testdev: true, pci: false}"), path=tmp_path / "c.yaml").platform
    assert with_testdev.testdev and not with_testdev.pci and with_testdev.pit


def test_platform_rtc_start_forms_and_errors(tmp_path: Path) -> None:
    (tmp_path / "k.bin").write_bytes(b"")
    parsed = parse_config(config_text('{rtc: {start: "2026-12-01 12:34:56"}}'), path=tmp_path / "c.yaml").platform
    assert parsed.rtc and parsed.rtc_start == START
    assert parse_config(config_text("{rtc: {start: 1000}}"), path=tmp_path / "c.yaml").platform.rtc_start == 1000
    with pytest.raises(ConfigError, match=r"c.yaml:4: platform.rtc.start: expected epoch seconds"):
        parse_config(config_text('{rtc: {start: "yesterday"}}'), path=tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="expected 'pc' or a mapping"):
        parse_config(config_text("q35"), path=tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="testdev.*irqchip"):
        parse_config(config_text("{testdev: true}"), path=tmp_path / "c.yaml")


# -- guests --------------------------------------------------------------------------------------
@pytest.mark.kvm
def test_rtc_kernel_reads_the_date_sees_uip_toggle_and_gets_the_alarm() -> None:
    for _ in range(TIMING_ATTEMPTS):
        result, platform = run_kernel("rtc", retry_exit_code=None)
        periodic = re.search(r"periodic: (\w+) in (\w+) pm", result.console)
        if periodic and within(int(periodic[1], 16) / (int(periodic[2], 16) / PM_TIMER_HZ), 16):
            break
    date = re.search(r"date: (\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)", result.console)
    assert date, result.console
    read_at = calendar.timegm(tuple(int(x) for x in date.groups()))
    assert START <= read_at <= START + 2
    assert "uip: ok" in result.console
    alarm = re.search(r"alarm: (\w\w) at (\w\w) flags (\w\w)", result.console)
    assert alarm and alarm[1] == alarm[2] and int(alarm[3], 16) & 0xA0 == 0xA0
    assert "update: ok" in result.console
    count, pm = (int(x, 16) for x in re.search(r"periodic: (\w+) in (\w+) pm", result.console).groups())
    assert count / (pm / PM_TIMER_HZ) == pytest.approx(16, rel=0.10), result.console
    assert platform.rtc.interrupts >= 1 + 1 + 9                      # alarm, update, periodic


PM_TIMER_HZ = 3_579_545
PIT_HZ = 1_193_182


def within(measured: float, expected: float, rel: float = 0.10) -> bool:
    return abs(measured - expected) <= rel * expected


# Guest-side timings (PIT ticks, RTC periodic interrupts, a polled one-shot) against the PM
# timer are exact on an idle host; on a loaded 2-core host a descheduled vCPU thread gets its
# late PIT ticks in a burst (KVM re-injects them) or polls late. A timing check therefore gets
# up to TIMING_ATTEMPTS runs; a wrong rate fails all of them.
TIMING_ATTEMPTS = 3


@pytest.mark.kvm
def test_timer_kernel_counts_pit_ticks_at_the_programmed_rate() -> None:
    for _ in range(TIMING_ATTEMPTS):
        result, platform = run_kernel("timer")
        ticks, pm = (int(x, 16) for x in re.search(r"pit: (\w+) ticks in (\w+) pm", result.console).groups())
        rate = ticks / (pm / PM_TIMER_HZ)
        oneshot = int(re.search(r"oneshot: (\w+) pm", result.console)[1], 16) / PM_TIMER_HZ
        if within(rate, PIT_HZ / 5966):
            break
    assert rate == pytest.approx(PIT_HZ / 5966, rel=0.10), result.console
    # OUT2 is polled, so it can only be seen late: never before the count ran out (5% for the
    # PM timer reads around it), and under twice the time even on a loaded host.
    assert 0.95 * 59659 / PIT_HZ <= oneshot < 2 * 59659 / PIT_HZ, result.console
    assert platform.rtc is not None and platform.acpi_pm is not None and platform.pci is not None


def test_pit_needs_the_irqchip(make_machine) -> None:
    from minivmm.platform import PlatformConfig, install_platform
    machine = make_machine("protected")
    with pytest.raises(ValueError, match="PIT needs the in-kernel irqchip"):
        install_platform(machine, PlatformConfig(pit=True))


# -- pc-testdev (QEMU hw/misc/pc-testdev.c) -------------------------------------------------------
def test_testdev_scratch_flush_irq_lines_and_iomem_logic() -> None:
    from minivmm.devices.testdev import IOMEM_BASE, PcTestdev
    lines: list[tuple[int, int]] = []
    flushed: list[int] = []
    dev = PcTestdev(set_irq=lambda line, level: lines.append((line, level)), flush_page=flushed.append)
    assert dev.ports == range(0xE0, 0xEC) and dev.irq_lines.ports == range(0x2000, 0x2018)
    dev.io_write(0xE0, 4, 0x11223344)
    assert dev.io_read(0xE0, 4) == 0x11223344 and dev.io_read(0xEA, 1) == 0x22
    dev.io_write(0xEB, 1, 0x99)
    assert dev.io_read(0xE0, 4) == 0x99223344
    dev.io_write(0xE4, 4, 0x12345)
    assert flushed == [0x12000] and dev.flushes == [0x12000]
    dev.irq_lines.io_write(0x2000 + 5, 1, 7)
    dev.irq_lines.io_write(0x2000 + 5, 1, 0)
    assert lines == [(5, 1), (5, 0)] and dev.irq_lines.changes == 2
    dev.iomem_write(IOMEM_BASE + 0xFFFE, b"\x01\x02\x03\x04")      # clipped at the end
    assert dev.iomem_read(IOMEM_BASE + 0xFFFE, 2) == 0x0201


@pytest.mark.kvm
def test_irq_kernel_routes_edge_and_level_lines_through_the_ioapic_and_uses_iomem_by_mmio() -> None:
    result, platform = run_kernel("irq", retry_exit_code=HOST_REDELIVERS_MASKED)
    assert "edge: 00000002" in result.console and "level: 00000002" in result.console
    assert "masked: 00000001 then 00000002" in result.console
    dev = platform.testdev
    assert dev.irq_lines.changes == 8 and dev.irq_lines.levels == [0] * 24
    assert len(dev.flushes) == 1 and dev.flushes[0] % 4096 == 0
    assert dev.mmio_writes == 2 and dev.mmio_reads == 2             # every IORAM access was an exit
    assert dev.iomem[0x10:0x14] == (0x12345678).to_bytes(4, "little") and dev.iomem[0x20] == 0xA5
    assert dev.scratch.value == 0xDEADBEEF


def test_testdev_needs_the_irqchip(make_machine) -> None:
    from minivmm.platform import install_testdev
    with pytest.raises(ValueError, match="irqchip"):
        install_testdev(make_machine("protected"))


# -- ACPI S3 (ACPI 6.5 16.1-16.3) -----------------------------------------------------------------
def test_pm1_control_latches_sleep_requests_and_wakes() -> None:
    from minivmm.devices.acpi_pm import RTC_STS, SLP_TYP_S3, WAK_STS, AcpiPm
    pm = AcpiPm()
    pm.io_write(0x604, 2, (SLP_TYP_S3 << 10) | (1 << 13))
    assert pm.take_sleep_request() == SLP_TYP_S3 and pm.take_sleep_request() is None
    assert not pm.io_read(0x604, 2) & (1 << 13)              # SLP_EN is write-only
    pm.rtc_alarm()                                           # RTC_EN clear, not sleeping
    assert pm.io_read(0x600, 2) == RTC_STS and not pm.suspended
    pm.io_write(0x602, 2, RTC_STS)                           # RTC_EN
    pm.io_write(0x600, 2, 0xFFFF)
    assert pm.suspend_until_wake(timeout=0.05) is False
    import threading
    threading.Timer(0.05, pm.rtc_alarm).start()
    assert pm.suspend_until_wake(timeout=5) and pm.wake_reason == "rtc"
    assert pm.io_read(0x600, 2) & WAK_STS


def test_dsdt_names_the_sleep_states() -> None:
    from minivmm.platform import build_acpi_tables
    tables = build_acpi_tables(1)
    assert b"_S3_\x12\x08\x04\x0a\x01\x0a\x01" in tables.blob and b"_S5_" in tables.blob


@pytest.mark.kvm
def test_s3_kernel_is_woken_by_the_rtc_alarm_and_resumes_at_its_waking_vector() -> None:
    start = time.monotonic()
    result, platform = run_kernel("s3")
    assert time.monotonic() - start >= 0.9                    # the alarm was 1-2 s ahead
    assert "entering S3" in result.console
    assert platform.acpi_pm.suspends == 1 and platform.acpi_pm.wake_reason == "rtc"


@pytest.mark.kvm
def test_s3_kernel_woken_by_a_host_call() -> None:
    import threading
    config = load_config(PLATFORM_GUESTS / "s3.yaml")
    with build_machine(config, capture_console=True) as machine:
        pm = machine.platform.acpi_pm

        def wake_when_suspended() -> None:
            deadline = time.monotonic() + 10
            while not pm.suspended and time.monotonic() < deadline:
                time.sleep(0.005)
            pm.wake()

        waker = threading.Thread(target=wake_when_suspended)
        waker.start()
        result = machine.run_config()
        waker.join()
    assert result.reason == "exit" and result.exit_code == 0, result.console
    assert "resumed: memory intact" in result.console and pm.wake_reason == "host"


# -- the same kernels under QEMU -------------------------------------------------------------------
QEMU_ARGS = {"rtc": ["-rtc", "base=2026-12-01T12:34:56"], "irq": ["-device", "pc-testdev"]}


def shape(console: str) -> str:
    """The console with its timing-dependent numbers (hex fields) masked."""
    return re.sub(r"\b[0-9a-f]{2,8}\b", "N", console)


@pytest.mark.kvm
@pytest.mark.slow
def test_platform_kernels_behave_the_same_under_qemu(tmp_path: Path) -> None:
    """The RTC and IRQ-routing kernels pass under `qemu-system-x86_64 -kernel` too (exit status
    1 = debug-exit value 0) with the same console: the RTC and pc-testdev models agree with
    QEMU's. (timer.S and s3.S pass there as well; they are left out because each QEMU run costs
    seconds of SeaBIOS and set-up on this host.) The QEMUs boot while minivmm runs its own."""
    import shutil
    import subprocess
    from minivmm.asm import assemble
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    runs = {}
    for name, extra in QEMU_ARGS.items():
        kernel = tmp_path / f"{name}.bin"
        kernel.write_bytes(assemble(PLATFORM_GUESTS / f"{name}.S", code_bits=32, load_address=0x100000,
                                    include_dirs=(Path(__file__).resolve().parent.parent / "minivmm" / "guest_include",)).data)
        runs[name] = subprocess.Popen(
            [qemu, "-accel", "kvm", "-cpu", "max,-arch-capabilities", "-m", "8M", "-kernel", str(kernel), *extra,
             "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01", "-display", "none", "-serial", "stdio",
             "-monitor", "none", "-no-reboot"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours = {name: run_kernel(name, retry_exit_code=HOST_REDELIVERS_MASKED)[0].console
            for name in runs}                                          # while the QEMUs boot
    for name, process in runs.items():
        out, err = process.communicate(timeout=120)
        if process.returncode == HOST_REDELIVERS_MASKED << 1 | 1:     # the host quirk, once more
            process = subprocess.Popen(process.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = process.communicate(timeout=120)
        assert process.returncode == 1, f"{name} under QEMU: status {process.returncode}\n{out}\n{err}"
        assert shape(ours[name]) == shape(out), f"{name}: minivmm vs QEMU\n{ours[name]}\n---\n{out}"


@pytest.mark.kvm
def test_the_run_deadline_ends_an_s3_sleep() -> None:
    config = load_config(PLATFORM_GUESTS / "s3.yaml", overrides=["machine.timeout=0.5"])
    start = time.monotonic()
    with build_machine(config, capture_console=True) as machine:
        result = machine.run_config()
        pm = machine.platform.acpi_pm
    assert result.reason == "timeout" and "slept in S3" in result.message
    assert pm.suspends == 1 and not pm.suspended and time.monotonic() - start < 1.5


@pytest.mark.kvm
def test_acpi_s5_powers_the_machine_off() -> None:
    result, _ = run_kernel("poweroff")
    assert result.console == "powering off\n" and result.exit_code == 0
