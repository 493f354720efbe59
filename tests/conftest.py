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
