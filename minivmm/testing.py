"""pytest plugin for tests that run guest code (registered through `pytest11`).

`@pytest.mark.kvm` marks a test that needs /dev/kvm: without it the test is
skipped with the reason; in CI (`CI=true`) with /dev/kvm present, a skipped
KVM test fails the run, so a broken fixture can never pass unnoticed.
"""
from __future__ import annotations

import os

import pytest

from .kvm import DEFAULT_KVM_PATH


def kvm_unavailable_reason(path: str = DEFAULT_KVM_PATH) -> str | None:
    """Why KVM cannot be used here, or None when it can."""
    if not os.path.exists(path):
        return f"{path} does not exist (no KVM on this machine)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not accessible to this user (add it to the 'kvm' group)"
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: the test runs a guest on /dev/kvm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if item.get_closest_marker("kvm") is not None:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and item.get_closest_marker("kvm") is not None and in_ci()
            and kvm_unavailable_reason() is None):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = (f"KVM test skipped in CI although {DEFAULT_KVM_PATH} is present: {reason}")
