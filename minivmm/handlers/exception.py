"""Default exception-or-NMI handler: an exception nobody handled ends the run as "exception"."""
from __future__ import annotations

from ..actions import Stop


def stop_on_exception(machine):
    def handle(vcpu, info):
        return Stop("exception", message=str(machine.last_exception))
    return handle
