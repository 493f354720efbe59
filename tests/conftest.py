"""Shared fixtures: machines that are always closed, and the repository paths."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"
CONFIGS = ROOT / "configs"


@pytest.fixture
def make_machine():
    """`make_machine(mode=..., memory=...)` -> Machine, closed at the end of the test."""
    from minivmm.machine import Machine

    machines = []

    def make(mode: str = "long", memory: str | int = "2M", **kwargs) -> Machine:
        machine = Machine(memory, mode, **kwargs)
        machines.append(machine)
        return machine

    yield make
    for machine in machines:
        machine.close()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """A test that builds machines needs KVM even if its module forgot the marker."""
    for item in items:
        if "make_machine" in getattr(item, "fixturenames", ()) and item.get_closest_marker("kvm") is None:
            item.add_marker(pytest.mark.kvm)
