"""Register layouts and target descriptions (GDB manual, appendix G "Target Descriptions",
G.5 "Standard Target Features": org.gnu.gdb.i386.core / .sse / .segments).

One `Layout` per CPU mode family: "i8086" (real mode: the i386 registers, 16-bit
disassembly), "i386" (protected mode) and "i386:x86-64" (long and user mode). The
order of `Layout.registers` is the remote register number (the `g` packet and `p n`);
the XML gdb reads with qXfer:features:read is made from the same list. Control
registers and EFER are in a feature of minivmm's own, which gdb shows as plain
registers (`info registers cr0`, `p $cr3`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

__all__ = ["Layout", "Register", "layout", "layout_for_state"]

EFLAGS_FIELDS = ((0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
                 (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"),
                 (20, "VIP"), (21, "ID"))
MXCSR_FIELDS = ((0, "IE"), (1, "DE"), (2, "ZE"), (3, "OE"), (4, "UE"), (5, "PE"), (6, "DAZ"), (7, "IM"),
                (8, "DM"), (9, "ZM"), (10, "OM"), (11, "UM"), (12, "PM"), (15, "FZ"))
FPU_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
CORE, SSE, SEGMENTS, SYSTEM = ("org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse",
                               "org.gnu.gdb.i386.segments", "org.minivmm.x86.system")


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str
    feature: str
    group: str = ""

    @property
    def size(self) -> int:
        return self.bits // 8


@dataclass(frozen=True)
class Layout:
    architecture: str
    registers: tuple[Register, ...]

    @property
    def pc(self) -> str:
        return "rip" if self.architecture == "i386:x86-64" else "eip"

    def number(self, name: str) -> int:
        return [r.name for r in self.registers].index(name)

    def xml(self) -> str:
        """The target description document (annex "target.xml")."""
        lines = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
                 '<target version="1.0">', f"  <architecture>{self.architecture}</architecture>"]
        feature = None
        for number, reg in enumerate(self.registers):
            if reg.feature != feature:
                if feature is not None:
                    lines.append("  </feature>")
                feature = reg.feature
                lines.append(f'  <feature name="{feature}">')
                lines += _types(feature)
            group = f' group="{reg.group}"' if reg.group else ""
            lines.append(f'    <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" '
                         f'regnum="{number}"{group}/>')
        lines += ["  </feature>", "</target>"]
        return "\n".join(lines) + "\n"


def _flags(name: str, size: int, fields: tuple) -> list[str]:
    return ([f'    <flags id="{name}" size="{size}">']
            + [f'      <field name="{n}" start="{bit}" end="{bit}"/>' for bit, n in fields]
            + ["    </flags>"])


def _types(feature: str) -> list[str]:
    if feature == CORE:
        return _flags("i386_eflags", 4, EFLAGS_FIELDS)
    if feature == SSE:
        vectors = (("v4f", "ieee_single", 4), ("v2d", "ieee_double", 2), ("v16i8", "int8", 16),
                   ("v8i16", "int16", 8), ("v4i32", "int32", 4), ("v2i64", "int64", 2))
        fields = (("v4_float", "v4f"), ("v2_double", "v2d"), ("v16_int8", "v16i8"),
                  ("v8_int16", "v8i16"), ("v4_int32", "v4i32"), ("v2_int64", "v2i64"),
                  ("uint128", "uint128"))
        return ([f'    <vector id="{n}" type="{t}" count="{c}"/>' for n, t, c in vectors]
                + ['    <union id="vec128">']
                + [f'      <field name="{n}" type="{t}"/>' for n, t in fields]
                + ["    </union>"] + _flags("i386_mxcsr", 4, MXCSR_FIELDS))
    return []


def _build(architecture: str) -> Layout:
    wide = architecture == "i386:x86-64"
    bits = 64 if wide else 32
    if wide:
        gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
    else:
        gprs = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"]
    regs: list[Register] = []
    for name in gprs:
        kind = "data_ptr" if name[1:] in ("sp", "bp") else f"int{bits}"
        regs.append(Register(name, bits, kind, CORE))
    regs.append(Register("rip" if wide else "eip", bits, "code_ptr", CORE))
    regs.append(Register("eflags", 32, "i386_eflags", CORE))
    regs += [Register(s, 32, "int32", CORE) for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    regs += [Register(f"st{i}", 80, "i387_ext", CORE) for i in range(8)]
    regs += [Register(n, 32, "int", CORE, "float") for n in FPU_CONTROL]
    regs += [Register(f"xmm{i}", 128, "vec128", SSE) for i in range(16 if wide else 8)]
    regs.append(Register("mxcsr", 32, "i386_mxcsr", SSE, "vector"))
    # gdb's i386 (32-bit) architecture numbers the segments feature past its register file
    # (an internal error in gdb 13): there the bases are system registers of our own.
    regs += [Register(n, bits, f"int{bits}", SEGMENTS if wide else SYSTEM, "" if wide else "system")
             for n in ("fs_base", "gs_base")]
    regs += [Register(n, bits, f"int{bits}", SYSTEM, "system") for n in ("cr0", "cr2", "cr3", "cr4")]
    if wide:
        regs.append(Register("cr8", 64, "int64", SYSTEM, "system"))
    regs.append(Register("efer", bits, f"int{bits}", SYSTEM, "system"))
    return Layout(architecture, tuple(regs))


@cache
def layout(architecture: str) -> Layout:
    """The layout of "i8086", "i386" or "i386:x86-64"."""
    if architecture not in ("i8086", "i386", "i386:x86-64"):
        raise ValueError(f"no register layout for architecture {architecture!r}")
    return _build(architecture)


def layout_for_state(cr0: int, efer: int) -> Layout:
    """The layout of a vCPU's current mode: real mode (CR0.PE=0), long mode (EFER.LMA) or
    protected mode."""
    if not cr0 & 1:
        return layout("i8086")
    return layout("i386:x86-64" if efer & (1 << 10) else "i386")
