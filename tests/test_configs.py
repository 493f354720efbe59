"""Every config in configs/ runs with the result its `expect:` block declares (fuzz* excluded:
the fuzzer's own tests run those)."""
from __future__ import annotations

from pathlib import Path

import pytest

from minivmm.config import build_machine, check_config, check_expectation, load_config

pytestmark = pytest.mark.kvm

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("fuzz"))


def test_there_is_a_config_for_every_feature() -> None:
    names = {p.stem for p in ALL}
    assert {"hello_real", "hello_protected", "hello_long", "hello_user", "cpuid_demo", "msr_demo",
            "io_demo", "ept_monitor_demo", "exec_hook_demo", "elf_hello", "multiboot", "hypercall_demo",
            "runaway_loop", "vmcall_hang", "triple_fault", "mmio_flood", "int3_storm", "elf_buffer",
            "ept_protect_demo"} <= names


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_config_runs_as_expected(path: Path) -> None:
    config = load_config(path)
    assert config.expect is not None, f"{path.name} has no expect: block"
    check_config(config)
    with build_machine(config, capture_console=True) as machine:
        result = machine.run_config()
        counters = dict(machine.counters)
    problems = check_expectation(config.expect, result, counters)
    assert not problems, f"{path.name}: " + "; ".join(problems)
