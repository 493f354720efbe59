"""The guest's CPUID table.

KVM answers CPUID inside the kernel from the table given to KVM_SET_CPUID2
(api.rst 4.20); CPUID never exits to user space. minivmm therefore realises
CPUID exiting as a table: it starts from KVM_GET_SUPPORTED_CPUID, applies the
overrides set with `CpuidTable.set`, then consults every handler registered
for `ExitReason.EXECUTE_CPUID` once per leaf/subleaf while it builds the
table (`info.raw_kvm_exit` is the `CpuidLeaf`, which the handler may change). The
table is given to KVM before the first VM entry; KVM refuses changes once the
vCPU has run.
"""
from __future__ import annotations

from dataclasses import dataclass

from .kvm import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, Kvm, KvmCpuidEntry2

REGISTERS = ("eax", "ebx", "ecx", "edx")

_supported: tuple[KvmCpuidEntry2, ...] | None = None


def supported_cpuid(kvm: Kvm) -> list[KvmCpuidEntry2]:
    """KVM_GET_SUPPORTED_CPUID, asked once per process (the host's answer does not change
    while it runs); copies, so callers may change them."""
    global _supported
    if _supported is None:
        _supported = tuple(kvm.get_supported_cpuid())
    return [KvmCpuidEntry2.from_buffer_copy(entry) for entry in _supported]


@dataclass(slots=True)
class CpuidLeaf:
    """One CPUID answer: what the guest reads for EAX=leaf, ECX=subleaf."""
    leaf: int
    subleaf: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class CpuidTable:
    """Host-supported CPUID plus overrides, for KVM_SET_CPUID2."""

    def __init__(self, supported: list[KvmCpuidEntry2]) -> None:
        self.supported = supported
        self.overrides: dict[tuple[int, int | None], dict[str, int]] = {}
        self.dirty = True

    def set(self, leaf: int, subleaf: int | None = None, **registers: int) -> None:
        """Override registers of a leaf (all subleaves when `subleaf` is None)."""
        unknown = set(registers) - set(REGISTERS)
        if unknown:
            raise ValueError(f"CPUID registers are eax, ebx, ecx, edx; got {sorted(unknown)}")
        self.overrides.setdefault((leaf, subleaf), {}).update(
            {name: value & 0xFFFFFFFF for name, value in registers.items()})
        self.dirty = True

    def lookup(self, leaf: int, subleaf: int = 0) -> CpuidLeaf:
        """What the guest will read, from the table as it would be built now (without handlers)."""
        for entry in self.build():
            if entry.function == leaf and (entry.index == subleaf or
                                           not entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
                return CpuidLeaf(leaf, subleaf, entry.eax, entry.ebx, entry.ecx, entry.edx)
        return CpuidLeaf(leaf, subleaf, 0, 0, 0, 0)

    def build(self, consult=None) -> list[KvmCpuidEntry2]:
        """The table: supported entries, overrides, then `consult(CpuidLeaf)` for each entry."""
        entries = [KvmCpuidEntry2.from_buffer_copy(e) for e in self.supported]
        present = {(e.function, e.index) for e in entries if e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX}
        present |= {(e.function, None) for e in entries if not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX}
        added = []
        for leaf, subleaf in self.overrides:
            if (leaf, subleaf) not in present and (subleaf is not None or (leaf, 0) not in present):
                flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX if subleaf is not None else 0
                added.append(KvmCpuidEntry2(function=leaf, index=subleaf or 0, flags=flags))
                present.add((leaf, subleaf))
        # KVM answers from the first matching entry: subleaf-specific ones go before
        # an entry of the same leaf that matches every subleaf.
        entries = added + entries
        for entry in entries:
            for key in ((entry.function, None), (entry.function, entry.index)):
                for name, value in self.overrides.get(key, {}).items():
                    setattr(entry, name, value)
            if consult is not None:
                leaf = CpuidLeaf(entry.function, entry.index, entry.eax, entry.ebx, entry.ecx, entry.edx)
                consult(leaf)
                for name in REGISTERS:
                    setattr(entry, name, getattr(leaf, name) & 0xFFFFFFFF)
        return entries
