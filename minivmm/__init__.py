"""minivmm: a mini-hypervisor framework in Python.

/dev/kvm does the VM entries and exits; minivmm presents them as Intel VT-x
does (a VMCS, basic exit reasons with their qualifications, EPT permissions)
and hands every exit to Python handlers.
"""
from .actions import (ALLOW_ONCE, EMULATE, PASSTHROUGH, RESUME, RETRY, AllowOnce, Emulate, Inject, Passthrough,
                      Reply, Resume, RunEnd, Stop)
from .controls import PinBasedControls, ProcBasedControls, SecondaryControls, VmEntryControls, VmExitControls
from .errors import MinivmmError
from .exits import ExitInfo, ExitReason, Vector
from .machine import Machine, RunResult
from .modes import Mode
from .vmcs_fields import VmcsField

__all__ = ["Machine", "RunResult", "Mode", "ExitReason", "ExitInfo", "Vector", "VmcsField",
           "PinBasedControls", "ProcBasedControls", "SecondaryControls", "VmExitControls",
           "VmEntryControls", "RESUME", "RETRY", "Resume", "Reply", "Passthrough", "PASSTHROUGH",
           "AllowOnce", "ALLOW_ONCE", "Emulate", "EMULATE", "Inject", "Stop", "RunEnd", "MinivmmError"]
