"""Testing an interrupt-free real-mode routine (u16_to_dec.S) in a real-mode guest.

The guest checks edge cases with GUEST_ASSERT_EQ/GUEST_ASSERT; the host then
asks for conversions by changing AX at a GUEST_SYNC and reads the digits
back from guest memory.
"""
import pytest


@pytest.fixture
def vm(guest):
    return guest.file("u16_to_dec_test.S", "real")


def convert(vm, value: int) -> str:
    vm.sync(1)
    vm.vcpu.rax = value
    vm.vcpu.rcx = 1
    end = vm.sync(2).value
    buffer = vm.symbols["buffer"]
    return vm.memory.read(buffer, end - buffer).decode()


@pytest.mark.parametrize("values", [[1, 9, 10, 99, 100, 4096, 12345, 65534]])
def test_conversions(vm, values):
    for value in values:
        assert convert(vm, value) == str(value)
    vm.sync(1)
    vm.vcpu.rcx = 0
    vm.done()
    assert vm.printed == "65535 -> 65535\n"


def test_the_routine_uses_no_interrupts(vm):
    run = vm.run()
    assert run.reason == "sync"
    # every exit so far was the test channel: no BIOS call, no exception
    assert set(vm.exit_sequence) == {"EXECUTE_VMCALL"}
