"""Shared fixtures: machines that are always closed, the repository paths, Ctrl-C in a run."""
from __future__ import annotations

import os
import signal
import threading
import time
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


def sigint_after(seconds: float) -> threading.Timer:
    """Send this process SIGINT (Ctrl-C) in `seconds`; cancel the returned timer when done."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


def interrupted_run(machine, after: float = 0.3) -> float:
    """Run `machine` (deadline 5 s), press Ctrl-C after `after` seconds, expect
    KeyboardInterrupt; the seconds the run took."""
    timer = sigint_after(after)
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            machine.run(timeout=5)
    finally:
        timer.cancel()
    return time.perf_counter() - start


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """A test that builds machines needs KVM even if its module forgot the marker."""
    for item in items:
        if "make_machine" in getattr(item, "fixturenames", ()) and item.get_closest_marker("kvm") is None:
            item.add_marker(pytest.mark.kvm)
