"""A multiboot kernel linked at 32 KiB that drops to real mode by itself (guests/mb_realmode.S):
minivmm writes no system area for it and links its assembly where its header loads it."""
from __future__ import annotations

import pytest

from conftest import CONFIGS
from minivmm.config import build_machine, load_config
from minivmm.modes import GDT_ADDR


@pytest.mark.kvm
def test_multiboot_kernel_gets_no_system_area() -> None:
    config = load_config(CONFIGS / "mb_realmode.yaml")
    with build_machine(config, capture_console=True) as machine:
        assert machine.system_base is None
        assert machine.vcpu.sregs.gdt.limit == 0
        assert machine.memory.read(GDT_ADDR, 64) == bytes(64)
        result = machine.run_config()
        assert (result.reason, result.exit_code) == ("exit", 0)
        assert "code past 0xb000 intact" in result.console


def test_assembled_multiboot_kernel_is_linked_at_its_load_addr() -> None:
    from minivmm import loaders
    from minivmm.config.build import _Builder
    image = load_config(CONFIGS / "mb_realmode.yaml").images[0]
    data = _Builder.assemble_multiboot(image, loaders, 0x100000)
    assert loaders.parse_multiboot_header(data).load_addr == 0x8000
    at = {address: loaders.load_asm(image.path, code_bits=32, load_address=address).segments[0][1]
          for address in (0x8000, 0x100000)}
    assert data == at[0x8000] != at[0x100000]
