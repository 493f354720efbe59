"""Default exception-or-NMI handler: an exception nobody handled ends the run as "exception"."""
from __future__ import annotations

from ..actions import Stop
from ..exits import Vector
from ..translate import ExceptionReport


def exception_report(vcpu, info) -> ExceptionReport:
    """The exception of an EXCEPTION_OR_NMI exit, as RunResult and `last_exception` show it."""
    interruption = info.interruption
    error_code = info.interruption_error_code if interruption.error_code_valid else None
    return ExceptionReport(interruption.vector, error_code,
                           vcpu.cr2 if interruption.vector == Vector.PF else None, vcpu.rip)


def stop_on_exception(vcpu, info):
    return Stop("exception", message=str(exception_report(vcpu, info)))
