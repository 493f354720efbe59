"""A test that intercepts an MSR write.

Registering a WRMSR handler with an `msr=` filter sets that MSR's bit in the
VMCS MSR bitmap (`machine.vmcs.msr_bitmap`), so the guest's `wrmsr` becomes
an EXECUTE_WRMSR exit with the value in `info.data`. Returning None lets
minivmm's default handler perform the write; returning RESUME skips the
instruction, so the write never happens; Inject(#GP) refuses it.
"""

from minivmm.actions import RESUME, Inject
from minivmm.exits import ExitReason, Vector

IA32_SYSENTER_ESP = 0x175

GUEST = r"""
_start:
    mov $0x175, %ecx                /* IA32_SYSENTER_ESP */
    mov $0x12345678, %eax
    mov $0x9, %edx
    wrmsr                           /* allowed by the host */
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    GUEST_ASSERT_EQ %rax, $0x912345678
    GUEST_SYNC $1, %rax

    mov $0x175, %ecx
    mov $0xdead, %eax
    xor %edx, %edx
    wrmsr                           /* silently dropped by the host */
    rdmsr
    GUEST_SYNC $2, %rax
    GUEST_DONE
"""


def test_wrmsr_exits_with_the_value_and_the_host_decides(guest):
    vm = guest.asm(GUEST, "long")
    writes = []

    def on_wrmsr(vcpu, info):
        writes.append((info.msr, info.data))
        return RESUME if info.data == 0xDEAD else None      # None: the default handler writes it

    vm.on(ExitReason.EXECUTE_WRMSR, on_wrmsr, msr=IA32_SYSENTER_ESP)
    assert vm.machine.vmcs.msr_bitmap.is_intercepted(IA32_SYSENTER_ESP, write=True)

    assert vm.sync(1).value == 0x9_1234_5678
    assert vm.sync(2).value == 0x1234_5678          # the second write was dropped
    vm.done()
    assert writes == [(IA32_SYSENTER_ESP, 0x9_1234_5678), (IA32_SYSENTER_ESP, 0xDEAD)]
    assert vm.exit_sequence == ["EXECUTE_WRMSR", "EXECUTE_VMCALL", "EXECUTE_WRMSR",
                                "EXECUTE_VMCALL", "EXECUTE_VMCALL"]


def test_a_refused_write_is_a_gp_in_the_guest(guest):
    vm = guest.asm(GUEST, "long")
    vm.on(ExitReason.EXECUTE_WRMSR, lambda vcpu, info: Inject(Vector.GP, 0), msr=IA32_SYSENTER_ESP)
    run = vm.run()
    # this bare long-mode guest has no IDT: the #GP escalates to a triple fault
    assert run.reason == "triple_fault"
    assert run.exit_sequence == ["EXECUTE_WRMSR", "TRIPLE_FAULT"]
    assert run.rip == vm.symbols["_start"] + 15        # the wrmsr (5+5+5 bytes of movs before it)
