"""Default exception-or-NMI handler: an exception nobody handled ends the run as "exception"."""
from __future__ import annotations

from ..actions import Stop
from ..translate import exception_report


def stop_on_exception(vcpu, info):
    return Stop("exception", message=str(exception_report(info, vcpu.rip, vcpu.cr2)))
