"""Python handlers for configs/hypercall_demo.yaml (`handlers: ["demo_handlers:install"]`).

A config's handler module is imported from the YAML file's directory; each
listed function is called with the machine before the run.
"""
from minivmm.actions import RESUME
from minivmm.exits import ExitReason


def install(machine) -> None:
    """Hypercall 1: RAX = 2 * RBX. Hypercall 2: print RCX bytes at guest address RBX."""

    def double(vcpu, info):
        vcpu.rax = vcpu.rbx * 2
        return RESUME

    def print_buffer(vcpu, info):
        text = machine.memory.read(vcpu.rbx, vcpu.rcx)
        for byte in text:
            machine.serial.io_write(machine.serial.base, 1, byte)
        vcpu.rax = len(text)
        return RESUME

    machine.on(ExitReason.EXECUTE_VMCALL, double, number=1)
    machine.on(ExitReason.EXECUTE_VMCALL, print_buffer, number=2)
