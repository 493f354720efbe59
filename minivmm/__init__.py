"""minivmm: a mini-hypervisor framework in Python.

/dev/kvm does the VM entries and exits; minivmm presents them as Intel VT-x
does (a VMCS, basic exit reasons with their qualifications, EPT permissions)
and hands every exit to Python handlers.
"""
from .actions import RESUME, RETRY, Inject, Resume, Stop
from .controls import PinBasedControls, ProcBasedControls, SecondaryControls, VmEntryControls, VmExitControls
from .errors import MinivmmError
from .exits import ExitInfo, ExitReason, Vector
from .machine import Machine, RunResult
from .modes import Mode
from .vmcs_fields import VmcsField

__all__ = ["Machine", "RunResult", "Mode", "ExitReason", "ExitInfo", "Vector", "VmcsField",
           "PinBasedControls", "ProcBasedControls", "SecondaryControls", "VmExitControls",
           "VmEntryControls", "RESUME", "RETRY", "Resume", "Inject", "Stop", "MinivmmError"]
