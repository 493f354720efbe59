"""Testing a freestanding C function (fletcher16) as a user-mode guest.

The function is compiled with gcc -ffreestanding -nostdlib together with a
small C harness that uses minivmm_test.h; the harness checks known answers
itself and then lets the host feed it random inputs.
"""
import random

import pytest


def fletcher16(data: bytes) -> int:
    """The host's reference implementation."""
    sum1 = sum2 = 0
    for byte in data:
        sum1 = (sum1 + byte) % 255
        sum2 = (sum2 + sum1) % 255
    return sum2 << 8 | sum1


@pytest.fixture
def vm(guest):
    return guest.c(["fletcher_guest.c", "fletcher.c"], "user")


def test_known_answers(vm):
    vm.sync(1)                      # the guest's own GUEST_ASSERT_EQs passed
    vm.vcpu.rax = 0                 # reply "no inputs": the guest finishes
    vm.done()


def test_random_inputs_match_the_reference(vm):
    rng = random.Random(1146)
    inputs = [b"", b"\xff" * 6000, bytes(range(256))] + \
        [rng.randbytes(rng.randrange(1, 8192)) for _ in range(20)]
    inputs = [data for data in inputs if data]       # length 0 ends the guest's loop
    for round, data in enumerate(inputs):
        assert vm.sync(1).value == round
        vm.memory.write(vm.symbols["input"], data)
        vm.vcpu.rax = len(data)
        assert vm.sync(2).value == fletcher16(data), f"input {round} ({len(data)} bytes)"
    vm.sync(1)
    vm.vcpu.rax = 0
    vm.done()
    assert vm.printed.count("\n") == len(inputs)
