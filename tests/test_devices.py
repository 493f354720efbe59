"""The port-I/O devices, driven directly (no KVM)."""

from __future__ import annotations

import pytest

from minivmm.devices import DebugExit, PortDevice, ResettableDevice, Serial16550
from minivmm.devices import serial as uart

COM1 = 0x3F8


def write(device: PortDevice, offset: int, value: int) -> None:
    device.io_write(device.ports.start + offset, 1, value)


def read(device: PortDevice, offset: int) -> int:
    return device.io_read(device.ports.start + offset, 1)


def test_devices_satisfy_the_port_device_protocols() -> None:
    for device in (Serial16550(), DebugExit()):
        assert isinstance(device, PortDevice)
        assert isinstance(device, ResettableDevice)


def test_serial_claims_eight_ports_at_its_base() -> None:
    assert Serial16550().ports == range(COM1, COM1 + 8)
    assert Serial16550(base=0x2F8).ports == range(0x2F8, 0x300)


def test_serial_transmit_collects_output_and_feeds_the_sink() -> None:
    received: list[bytes] = []
    serial = Serial16550(sink=received.append)
    for byte in "hé\n".encode():
        write(serial, uart.THR, byte)
    assert serial.output == bytearray("hé\n".encode())
    assert b"".join(received) == "hé\n".encode()
    assert serial.text == "hé\n"


def test_serial_text_replaces_invalid_utf8() -> None:
    serial = Serial16550()
    write(serial, uart.THR, 0xFF)
    assert serial.text == "\ufffd"


def test_serial_lsr_transmitter_always_empty_and_data_ready_follows_input() -> None:
    serial = Serial16550()
    empty = uart.LSR_THR_EMPTY | uart.LSR_TRANSMITTER_EMPTY
    assert read(serial, uart.LSR) == empty
    serial.feed(b"ab")
    assert read(serial, uart.LSR) == empty | uart.LSR_DATA_READY
    assert read(serial, uart.RBR) == ord("a")
    assert read(serial, uart.RBR) == ord("b")
    assert read(serial, uart.LSR) == empty
    assert read(serial, uart.RBR) == 0


def test_serial_dlab_switches_offsets_0_and_1_to_the_divisor_latch() -> None:
    serial = Serial16550()
    write(serial, uart.IER, 0x05)
    write(serial, uart.LCR, uart.LCR_DLAB | 0x03)
    write(serial, uart.DLL, 0x0C)
    write(serial, uart.DLM, 0x01)
    assert read(serial, uart.DLL) == 0x0C
    assert read(serial, uart.DLM) == 0x01
    assert serial.divisor == 0x010C
    assert serial.output == b""

    write(serial, uart.LCR, 0x03)
    assert read(serial, uart.LCR) == 0x03
    assert read(serial, uart.IER) == 0x05
    write(serial, uart.THR, ord("x"))
    assert serial.output == b"x"


def test_serial_scratch_register_reads_back() -> None:
    serial = Serial16550()
    for value in (0x00, 0x55, 0xAA, 0xFF):
        write(serial, uart.SCR, value)
        assert read(serial, uart.SCR) == value


def test_serial_iir_reports_received_data_then_thr_empty_once() -> None:
    serial = Serial16550()
    assert read(serial, uart.IIR) == uart.IIR_NO_INTERRUPT
    write(serial, uart.FCR, uart.FCR_FIFO_ENABLE)
    write(serial, uart.IER, uart.IER_RECEIVED_DATA | uart.IER_THR_EMPTY)
    serial.feed(b"k")
    assert serial.interrupt_pending
    assert read(serial, uart.IIR) == uart.IIR_FIFOS_ENABLED | uart.IIR_RECEIVED_DATA
    read(serial, uart.RBR)
    assert read(serial, uart.IIR) == uart.IIR_FIFOS_ENABLED | uart.IIR_THR_EMPTY
    assert read(serial, uart.IIR) == uart.IIR_FIFOS_ENABLED | uart.IIR_NO_INTERRUPT
    assert not serial.interrupt_pending


def test_serial_loopback_returns_transmitted_bytes_and_mirrors_modem_lines() -> None:
    serial = Serial16550()
    assert read(serial, uart.MSR) == uart.MSR_CONNECTED
    write(serial, uart.MCR, uart.MCR_LOOPBACK | uart.MCR_RTS | uart.MCR_OUT2)
    assert read(serial, uart.MSR) == uart.MSR_CTS | uart.MSR_DCD
    write(serial, uart.THR, 0x5A)
    assert serial.output == b""
    assert read(serial, uart.LSR) & uart.LSR_DATA_READY
    assert read(serial, uart.RBR) == 0x5A


def test_serial_fcr_can_clear_pending_input() -> None:
    serial = Serial16550()
    serial.feed(b"abc")
    write(serial, uart.FCR, uart.FCR_FIFO_ENABLE | uart.FCR_CLEAR_RECEIVE_FIFO)
    assert serial.pending_input == 0


def test_serial_reset_restores_registers_but_keeps_output() -> None:
    serial = Serial16550()
    write(serial, uart.THR, ord("z"))
    write(serial, uart.SCR, 7)
    write(serial, uart.LCR, uart.LCR_DLAB)
    serial.feed(b"q")
    serial.reset()
    assert read(serial, uart.LCR) == 0
    assert read(serial, uart.SCR) == 0
    assert serial.pending_input == 0
    assert serial.output == b"z"


@pytest.mark.parametrize(("value", "status"), [(0, 1), (1, 3), (0x7F, 0xFF)])
def test_debug_exit_status_is_value_shifted_left_or_one(value: int, status: int) -> None:
    device = DebugExit()
    assert not device.exit_requested
    device.io_write(0xF4, 1, value)
    assert device.exit_requested
    assert device.value == value
    assert device.status == status


def test_debug_exit_first_write_wins_until_reset() -> None:
    device = DebugExit()
    device.io_write(0xF4, 1, 2)
    device.io_write(0xF4, 1, 3)
    assert device.status == 5
    device.reset()
    assert not device.exit_requested
    assert device.status is None


def test_debug_exit_port_and_width_are_configurable() -> None:
    device = DebugExit(port=0x501, width=2)
    assert device.ports == range(0x501, 0x503)
    device.io_write(0x501, 2, 0x1234)
    assert device.status == (0x1234 << 1) | 1
    with pytest.raises(ValueError):
        DebugExit(width=3)


@pytest.mark.parametrize(("size", "expected"), [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF)])
def test_debug_exit_reads_all_ones(size: int, expected: int) -> None:
    assert DebugExit(width=4).io_read(0xF4, size) == expected
