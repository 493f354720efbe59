"""KVM bindings (issue 2): struct layouts against the kernel ABI, /dev/kvm errors,
resource cleanup over many VMs, and the `kvm` marker plugin."""
from __future__ import annotations

import ctypes
import gc
import os
import shutil
import subprocess
import time

import pytest

from minivmm import kvm
from minivmm.kvm import (Ioctl, KvmCpuidEntry2, KvmDebugregs, KvmDeviceAttr, KvmDtable, KvmEnableCap, KvmError, KvmFpu,
                         KvmGuestDebug, KvmMsrEntry, KvmMsrFilter, KvmMsrFilterRange, KvmRegs, KvmRun,
                         KvmSegment, KvmSregs, KvmSyncRegs, KvmUnavailableError, KvmUserspaceMemoryRegion,
                         KvmVcpuEvents, KvmXcrs, KvmXsave)

pytest_plugins = ["pytester"]


# -- struct layouts (pure, no /dev/kvm needed) -------------------------------------------
@pytest.mark.parametrize("struct, size", [
    (KvmRegs, 144), (KvmSregs, 312), (KvmSegment, 24), (KvmDtable, 16), (KvmVcpuEvents, 64),
    (KvmFpu, 416), (KvmXcrs, 392), (KvmMsrFilter, 392), (KvmMsrFilterRange, 24), (KvmXsave, 4096),
    (KvmCpuidEntry2, 40), (KvmMsrEntry, 16), (KvmGuestDebug, 72), (KvmDebugregs, 128),
    (KvmUserspaceMemoryRegion, 32), (KvmEnableCap, 104), (KvmSyncRegs, 520), (KvmDeviceAttr, 24),
])
def test_struct_sizes_match_the_kernel_abi(struct, size) -> None:
    assert ctypes.sizeof(struct) == size


def test_kvm_run_layout() -> None:
    assert KvmRun.exit_reason.offset == 8
    assert KvmRun.cr8.offset == 16
    assert KvmRun.apic_base.offset == 24
    assert KvmRun.exit.offset == 32
    assert KvmRun.kvm_valid_regs.offset == 288
    assert KvmRun.kvm_dirty_regs.offset == 296
    assert KvmRun.s.offset == 304
    assert ctypes.sizeof(KvmRun) == 304 + 2048


def test_exit_union_member_layouts() -> None:
    io = kvm._ExitIo
    assert (io.direction.offset, io.size.offset, io.port.offset, io.count.offset, io.data_offset.offset) == \
        (0, 1, 2, 4, 8)
    msr = kvm._ExitMsr
    assert (msr.error.offset, msr.reason.offset, msr.index.offset, msr.data.offset) == (0, 8, 12, 16)
    mmio = kvm._ExitMmio
    assert (mmio.phys_addr.offset, mmio.data.offset, mmio.len.offset, mmio.is_write.offset) == (0, 8, 16, 20)
    dbg = kvm._ExitDebug
    assert (dbg.exception.offset, dbg.pc.offset, dbg.dr6.offset, dbg.dr7.offset) == (0, 8, 16, 24)
    internal = kvm._ExitInternal
    assert (internal.suberror.offset, internal.ndata.offset, internal.data.offset) == (0, 4, 8)
    assert ctypes.sizeof(kvm._ExitUnion) == 256


def test_vcpu_events_and_sregs_field_offsets() -> None:
    assert KvmVcpuEvents.interrupt.offset == 8
    assert KvmVcpuEvents.nmi.offset == 12
    assert KvmVcpuEvents.sipi_vector.offset == 16
    assert KvmVcpuEvents.flags.offset == 20
    assert KvmVcpuEvents.smi.offset == 24
    assert KvmVcpuEvents.triple_fault_pending.offset == 28
    assert KvmVcpuEvents.exception_has_payload.offset == 55
    assert KvmVcpuEvents.exception_payload.offset == 56
    assert KvmSregs.gdt.offset == 192
    assert KvmSregs.cr0.offset == 224
    assert KvmSregs.efer.offset == 264
    assert KvmSregs.interrupt_bitmap.offset == 280
    assert KvmFpu.xmm.offset == 152
    assert KvmFpu.mxcsr.offset == 416 - 8
    assert KvmSyncRegs.sregs.offset == 144
    assert KvmSyncRegs.events.offset == 456


@pytest.mark.parametrize("ioctl, number", [
    (Ioctl.KVM_GET_API_VERSION, 0xAE00), (Ioctl.KVM_CREATE_VM, 0xAE01), (Ioctl.KVM_RUN, 0xAE80),
    (Ioctl.KVM_GET_REGS, 0x8090AE81), (Ioctl.KVM_SET_REGS, 0x4090AE82),
    (Ioctl.KVM_GET_SREGS, 0x8138AE83), (Ioctl.KVM_SET_SREGS, 0x4138AE84),
    (Ioctl.KVM_SET_USER_MEMORY_REGION, 0x4020AE46), (Ioctl.KVM_GET_SUPPORTED_CPUID, 0xC008AE05),
    (Ioctl.KVM_SET_CPUID2, 0x4008AE90), (Ioctl.KVM_GET_MSRS, 0xC008AE88), (Ioctl.KVM_SET_MSRS, 0x4008AE89),
    (Ioctl.KVM_GET_VCPU_EVENTS, 0x8040AE9F), (Ioctl.KVM_SET_VCPU_EVENTS, 0x4040AEA0),
    (Ioctl.KVM_SET_GUEST_DEBUG, 0x4048AE9B), (Ioctl.KVM_ENABLE_CAP, 0x4068AEA3),
    (Ioctl.KVM_X86_SET_MSR_FILTER, 0x4188AEC6), (Ioctl.KVM_GET_FPU, 0x81A0AE8C),
    (Ioctl.KVM_GET_XCRS, 0x8188AEA6), (Ioctl.KVM_GET_DEBUGREGS, 0x8080AEA1),
    (Ioctl.KVM_SET_DEVICE_ATTR, 0x4018AEE1), (Ioctl.KVM_GET_DEVICE_ATTR, 0x4018AEE2),
    (Ioctl.KVM_HAS_DEVICE_ATTR, 0x4018AEE3),
])
def test_ioctl_numbers(ioctl: Ioctl, number: int) -> None:
    assert ioctl == number


_C_LAYOUT = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\n",
        sizeof(struct kvm_regs), sizeof(struct kvm_sregs), offsetof(struct kvm_run, kvm_valid_regs) - 256,
        sizeof(struct kvm_vcpu_events), sizeof(struct kvm_fpu), sizeof(struct kvm_xcrs),
        sizeof(struct kvm_msr_filter), offsetof(struct kvm_run, s), sizeof(struct kvm_guest_debug),
        sizeof(struct kvm_debugregs));
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None or not os.path.exists("/usr/include/linux/kvm.h"),
                    reason="needs a C compiler and linux/kvm.h")
def test_layouts_agree_with_the_installed_c_headers(tmp_path) -> None:
    source = tmp_path / "layout.c"
    source.write_text(_C_LAYOUT)
    subprocess.run(["cc", "-o", str(tmp_path / "layout"), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    assert [int(x) for x in out.split()] == [
        ctypes.sizeof(KvmRegs), ctypes.sizeof(KvmSregs), KvmRun.exit.offset, ctypes.sizeof(KvmVcpuEvents),
        ctypes.sizeof(KvmFpu), ctypes.sizeof(KvmXcrs), ctypes.sizeof(KvmMsrFilter), KvmRun.s.offset,
        ctypes.sizeof(KvmGuestDebug), ctypes.sizeof(KvmDebugregs)]


# -- wrappers added for snapshot.py and the MSR filter -------------------------------------
MSR_IA32_SYSENTER_CS = 0x174


@pytest.fixture
def vm_and_vcpu():
    with kvm.Kvm() as system, system.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        yield vm, vcpu


@pytest.mark.kvm
def test_msrs_buffer_round_trip(vm_and_vcpu) -> None:
    _, vcpu = vm_and_vcpu
    buf = kvm.msrs_buffer(1)
    buf.entries[0].index, buf.entries[0].data = MSR_IA32_SYSENTER_CS, 0x10
    assert vcpu.set_msrs_from(buf) == 1
    buf.entries[0].data = 0
    assert vcpu.get_msrs_into(buf) == 1
    assert buf.entries[0].data == 0x10
    assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS]) == {MSR_IA32_SYSENTER_CS: 0x10}
    assert kvm.msrs_buffer(0).header.nmsrs == 0


@pytest.mark.kvm
def test_device_attr_wrappers(vm_and_vcpu) -> None:
    _, vcpu = vm_and_vcpu
    with pytest.raises(KvmError) as excinfo:
        vcpu.has_device_attr(KvmDeviceAttr(0, 0xFFFF, 0, 0))          # no such group
    assert excinfo.value.ioctl == "KVM_HAS_DEVICE_ATTR"
    assert isinstance(excinfo.value, OSError)
    value = ctypes.c_uint64()
    attr = KvmDeviceAttr(0, kvm.KVM_VCPU_TSC_CTRL, kvm.KVM_VCPU_TSC_OFFSET, ctypes.addressof(value))
    try:
        vcpu.has_device_attr(attr)
    except KvmError:
        pytest.skip("this host has no KVM_VCPU_TSC_OFFSET")
    value.value = (1 << 64) - 1
    vcpu.get_device_attr(attr)                 # KVM writes the offset to attr.addr
    assert value.value != (1 << 64) - 1
    vcpu.set_device_attr(attr)                 # (some hosts accept but ignore a new offset)


@pytest.mark.kvm
def test_msr_filter_takes_at_most_16_ranges(vm_and_vcpu) -> None:
    vm, _ = vm_and_vcpu
    bitmap = (ctypes.c_uint8 * 1)(0xFF)
    ranges = [(kvm.MsrFilterFlag.READ, 0x1000 + 8 * i, bitmap, 8) for i in range(17)]
    with pytest.raises(ValueError, match="at most 16 ranges"):
        vm.set_msr_filter(False, ranges)
    with pytest.raises(ValueError, match="at most 16 ranges"):
        vm.set_msr_filter(False, iter(ranges))
    vm.set_msr_filter(False, ranges[:16])
    vm.set_msr_filter(False, [])


@pytest.mark.kvm
def test_msr_filter_bitmap_must_hold_its_msrs(vm_and_vcpu) -> None:
    vm, _ = vm_and_vcpu
    with pytest.raises(ValueError, match="bitmap"):
        vm.set_msr_filter(False, [(kvm.MsrFilterFlag.READ, 0, (ctypes.c_uint8 * 1)(), 9)])


# -- /dev/kvm missing or wrong ------------------------------------------------------------
def test_missing_device_names_the_path() -> None:
    from minivmm.machine import Machine
    with pytest.raises(KvmUnavailableError) as excinfo:
        Machine(kvm_path="/nonexistent/kvm")
    assert "/nonexistent/kvm" in str(excinfo.value)
    assert "does not exist" in str(excinfo.value)
    assert isinstance(excinfo.value, KvmError)


def test_directory_instead_of_device_names_the_path(tmp_path) -> None:
    from minivmm.machine import Machine
    with pytest.raises(KvmUnavailableError, match=str(tmp_path)):
        Machine(kvm_path=str(tmp_path))


def test_inaccessible_device_names_the_path(monkeypatch) -> None:
    """EACCES on the device node (root can open anything, so the open is made to fail)."""
    import errno
    import minivmm.kvm as kvm_module

    def refuse(path, flags, *args):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(kvm_module.os, "open", refuse)
    with pytest.raises(KvmUnavailableError, match="no permission to open /dev/kvm") as excinfo:
        kvm_module.Kvm("/dev/kvm")
    assert "kvm' group" in str(excinfo.value)


@pytest.mark.parametrize("kind", ["regular file", "/dev/null"])
def test_file_that_is_not_a_kvm_device_names_the_path(tmp_path, kind: str) -> None:
    if kind == "regular file":
        path = tmp_path / "not-kvm"
        path.write_bytes(b"hello")
        path = str(path)
    else:
        path = "/dev/null"
    from minivmm.machine import Machine
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KvmUnavailableError) as excinfo:
        Machine(kvm_path=path)
    assert path in str(excinfo.value)
    assert "not a KVM device" in str(excinfo.value) or "ENOTTY" in str(excinfo.value)
    assert len(os.listdir("/proc/self/fd")) == before


def test_kvm_unavailable_reason_of_the_plugin(tmp_path) -> None:
    from minivmm.testing import kvm_unavailable_reason
    assert "does not exist" in kvm_unavailable_reason(str(tmp_path / "nothing"))


# -- resources ---------------------------------------------------------------------------
def _fds_and_maps() -> tuple[int, int]:
    gc.collect()
    with open("/proc/self/maps") as maps:
        return len(os.listdir("/proc/self/fd")), len(maps.read().splitlines())


@pytest.mark.kvm
def test_1000_vm_cycles_leave_no_fd_or_mapping_behind() -> None:
    from minivmm.machine import Machine

    def cycle() -> None:
        machine = Machine("64K", "real")
        try:
            machine.load(b"\xf4")          # hlt
            result = machine.run(timeout=2)
            assert result.reason == "hlt", result
        finally:
            machine.close()

    for _ in range(5):                     # warm caches (assembler, ctypes, signal handler)
        cycle()
    before = _fds_and_maps()
    start = time.perf_counter()
    for _ in range(1000):
        cycle()
    elapsed = time.perf_counter() - start
    after = _fds_and_maps()
    assert after[0] == before[0], f"fds {before[0]} -> {after[0]}"
    assert after[1] <= before[1] + 2, f"mappings {before[1]} -> {after[1]}"
    assert elapsed < 60, f"1000 VM cycles took {elapsed:.1f} s"


@pytest.mark.kvm
def test_vcpu_fd_and_run_mapping_are_released_on_close() -> None:
    from minivmm.machine import Machine
    before = _fds_and_maps()
    machine = Machine("1M", "long")
    during = _fds_and_maps()
    assert during[0] == before[0] + 4                  # /dev/kvm, VM, vCPU and mmap's dup of it
    machine.close()
    assert _fds_and_maps()[0] == before[0]
    machine.close()                                    # idempotent


# -- the kvm marker plugin -----------------------------------------------------------------
_PLUGIN_TESTS = """
import pytest

@pytest.mark.kvm
def test_skipped_kvm():
    pytest.skip("fixture broke")

def test_skipped_plain():
    pytest.skip("not a kvm test")

@pytest.mark.kvm
def test_passing_kvm():
    pass
"""


@pytest.mark.kvm
def test_plugin_fails_a_skipped_kvm_test_in_ci(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(_PLUGIN_TESTS)
    result = pytester.runpytest_inprocess("-rA")
    result.assert_outcomes(failed=1, skipped=1, passed=1)
    result.stdout.fnmatch_lines(["*KVM test skipped in CI although /dev/kvm is present*fixture broke*"])


@pytest.mark.kvm
def test_plugin_only_skips_outside_ci(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(_PLUGIN_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(skipped=2, passed=1)


def test_plugin_skips_kvm_tests_without_kvm(pytester: pytest.Pytester, monkeypatch) -> None:
    import minivmm.testing as testing
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(testing, "kvm_unavailable_reason", lambda path=None: "no /dev/kvm here")
    pytester.makepyfile(_PLUGIN_TESTS)
    result = pytester.runpytest_inprocess("-rs")
    # Without KVM even CI only skips: the kvm tests cannot run there at all.
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*needs KVM: no /dev/kvm here*"])


_PLUGIN_XFAIL_TESTS = """
import pytest

@pytest.mark.kvm
@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False

@pytest.mark.kvm
def test_imperative_xfail():
    pytest.xfail("a known bug")
"""


def test_plugin_keeps_xfailed_kvm_tests_xfailed_in_ci(pytester: pytest.Pytester, monkeypatch) -> None:
    import minivmm.testing as testing
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(testing, "kvm_unavailable_reason", lambda path=None: None)   # as on a KVM host
    pytester.makepyfile(_PLUGIN_XFAIL_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(xfailed=2)


@pytest.mark.kvm
def test_unclosed_machine_is_collected_quietly() -> None:
    import sys
    from minivmm.machine import Machine
    caught: list[str] = []
    before = _fds_and_maps()[0]
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: caught.append(repr(unraisable.exc_value))
    try:
        machine = Machine("2M", "long")
        machine.load(b"\xf4")
        assert machine.run(timeout=2).reason == "hlt"
        del machine
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert caught == []
    assert _fds_and_maps()[0] == before
