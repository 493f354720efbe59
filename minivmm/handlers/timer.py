"""Default VMX-preemption-timer handler: the run deadline passed; the run ends as "timeout"."""
from __future__ import annotations

from ..actions import Stop


def stop_on_deadline(vcpu, info):
    return Stop("timeout", message="deadline reached")
