"""`Vm`: what every vCPU of a machine shares.

The VM fd, guest memory with its memslots (one allocator), the port bus, the
exit-handler dispatcher, the CPUID table and the VM-wide half of the VMX model
(capability MSRs, I/O and MSR bitmaps, the MSR filter). Per-vCPU state lives in
`minivmm.runloop.VcpuContext`.
"""
from __future__ import annotations

from typing import Callable

from .cpuid import CpuidTable, supported_cpuid
from .devices.bus import PortBus
from .handlers import Dispatcher
from .kvm import KVM_PIT_SPEAKER_DUMMY, Kvm, KvmError, VmFd
from .memory import GuestMemory, Region, SlotTable, parse_size
from .vmcs import VmxVmState

REAL_MODE_TSS_ADDR = 0xFFFBD000


class Vm:
    """One KVM VM and the state its vCPUs share."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.memory = GuestMemory()
        self.slots = SlotTable()
        self._route_caches: list[dict] = []
        self.ports = PortBus(on_change=self.invalidate_io_routes)
        self.dispatcher = Dispatcher()
        self.irqchip = False                 # KVM's in-kernel irqchip (create_irqchip)
        self.pit = False                     # KVM's in-kernel PIT (create_pit)
        self.on_close: list[Callable[[], None]] = []   # run before the VM fd closes (device threads)
        self.fd: VmFd | None = kvm.create_vm()
        try:
            try:
                self.fd.set_tss_addr(REAL_MODE_TSS_ADDR)
            except KvmError:
                pass
            self.vmx = VmxVmState(kvm, self.fd)
            self.vmx.io_bitmap.on_change = self.invalidate_io_routes
            self.cpuid = CpuidTable(supported_cpuid(kvm))
        except BaseException:
            self.close()
            raise

    def create_irqchip(self) -> None:
        """KVM's in-kernel LAPIC/IOAPIC/PIC; before any vCPU (api.rst 4.24)."""
        self.fd.create_irqchip()
        self.irqchip = True
        self.vmx.use_in_kernel_irqchip()

    def create_pit(self) -> None:
        """KVM's in-kernel 8254 PIT on IRQ 0, with the speaker port 0x61 (KVM_PIT_SPEAKER_DUMMY);
        needs the irqchip (api.rst 4.66)."""
        if not self.irqchip:
            raise ValueError("the in-kernel PIT needs the in-kernel irqchip (platform.irqchip: true)")
        self.fd.create_pit2(KVM_PIT_SPEAKER_DUMMY)
        self.pit = True

    def add_ram(self, gpa: int, size: int | str, *, name: str = "ram") -> Region:
        region = self.memory.add_region(gpa, parse_size(size), name=name)
        slot = self.slots.allocate()
        self.fd.set_user_memory_region(slot, region.gpa, region.size, region.host_addr, 0)
        self.slots.base[region] = slot
        return region

    def route_cache(self) -> dict:
        """A new per-vCPU I/O route cache, cleared whenever routing changes."""
        cache: dict = {}
        self._route_caches.append(cache)
        return cache

    def invalidate_io_routes(self) -> None:
        for cache in self._route_caches:
            cache.clear()

    def close(self) -> None:
        while self.on_close:
            self.on_close.pop()()
        if self.fd is not None:
            self.fd.close()
            self.fd = None
        self.memory.close()
