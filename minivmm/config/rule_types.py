"""The typed rules of a config: the entries of `devices.hypercall.calls`, `devices.mmio`,
`vmcs.controls`, `vmcs.exceptions`, `vmcs.msrs`, `vmcs.io`, `vmcs.cpuid`, `ept.protect`,
`ept.monitors` and `ept.hooks` (their meaning: `minivmm.config.schema`). The validator loads
this module with the first config that has such a rule; `minivmm.config.schema` re-exports
the classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .schema import Loc

if TYPE_CHECKING:
    from .schema import Address

__all__ = ["ControlSetting", "CpuidRule", "ExceptionRule", "HookRule", "HypercallRule", "IoRule", "MmioRule",
           "MonitorRule", "MsrRule", "ProtectRule"]


@dataclass
class HypercallRule:
    """One entry of `devices.hypercall.calls`: what hypercall `number` does."""
    number: int
    action: str = "return"                     # return | log | count | stop
    value: int = 0
    name: str = ""
    log: bool = False


@dataclass
class MmioRule:
    """One entry of `devices.mmio`: a guest-physical range and what an access to it does."""
    start: Address
    end: Address | None
    size: int | None
    action: str = "ignore"                     # ignore | count | log | stop
    value: int = 0
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class ControlSetting:
    """One VMX control of `vmcs.controls`, turned on or off."""
    name: str
    flag: Any                                  # a member of one of minivmm.controls' IntFlags
    enabled: bool = True
    loc: Loc = Loc()


@dataclass
class ExceptionRule:
    """One entry of `vmcs.exceptions`: what an intercepted exception vector does."""
    vector: int
    action: str = "count"                      # count | log | skip | stop | inject | pass
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class MsrRule:
    """One entry of `vmcs.msrs`: what RDMSR/WRMSR of `msr` does."""
    msr: int
    action: str = "log"                        # allow | deny | fixed | log | count
    value: int = 0
    read: bool = True
    write: bool = True
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class IoRule:
    """One entry of `vmcs.io`: what IN/OUT on ports [start, end) does."""
    start: int
    end: int                                   # exclusive
    action: str = "log"                        # ignore | fixed | log | count | stop
    value: int | None = None
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class CpuidRule:
    """One entry of `vmcs.cpuid`: registers CPUID returns for a leaf (and subleaf)."""
    leaf: int
    subleaf: int | None = None
    eax: int | None = None
    ebx: int | None = None
    ecx: int | None = None
    edx: int | None = None
    loc: Loc = Loc()


@dataclass
class ProtectRule:
    """One entry of `ept.protect`: the EPT permissions of a guest-physical range."""
    start: Address
    end: Address | None
    size: int | None
    perms: str
    loc: Loc = Loc()


@dataclass
class MonitorRule:
    """One entry of `ept.monitors`: accesses to a guest-physical range that are reported."""
    start: Address
    end: Address | None
    size: int | None
    access: str = "rw"
    action: str = "log"                        # log | count | stop | skip
    name: str = ""
    log: bool = False
    loc: Loc = Loc()


@dataclass
class HookRule:
    """One entry of `ept.hooks`: an execution hook at a guest address."""
    address: Address
    action: str = "log"                        # log | count | stop | skip
    hidden: bool = True
    name: str = ""
    log: bool = False
    loc: Loc = Loc()
