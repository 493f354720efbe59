"""Static Linux x86-64 executables: check, parse (ELF64, System V gABI and the x86-64 psABI)
and describe what the loader maps.

Only what a static program needs: PT_LOAD segments, PT_PHDR / the program
headers' address for AT_PHDR, PT_GNU_STACK, the entry point, and the symbol table
when the file keeps one (for fuzzing at a function). ET_EXEC is loaded at its
addresses, a static PIE (ET_DYN without PT_INTERP) at `PIE_BASE`.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MinivmmError

__all__ = ["LinuxImageError", "Program", "Segment", "read_program", "PIE_BASE"]

PIE_BASE = 0x1000000
"""Where a static PIE's first segment goes (the guest address space is identity mapped)."""

ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
PT_LOAD, PT_INTERP, PT_PHDR, PT_TLS, PT_GNU_STACK = 1, 3, 6, 7, 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4
_MACHINES = {3: "i386", 40: "ARM", 183: "AArch64", 243: "RISC-V", 8: "MIPS", 20: "PowerPC",
             21: "PowerPC64", 22: "s390", 62: "x86-64"}


class LinuxImageError(MinivmmError, ValueError):
    """The program cannot be run by minivmm's Linux personality; the message says why.
    `status` is what a shell answers: 127 for a missing file, 126 for one it cannot run."""

    def __init__(self, message: str, status: int = 126) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Segment:
    """A PT_LOAD segment at its load address: `filesz` bytes of the file from `offset`, then
    zeros to `memsz`."""
    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int          # PF_R | PF_W | PF_X


@dataclass
class Program:
    path: str
    entry: int
    segments: list[Segment]
    phdr: int                  # AT_PHDR
    phnum: int
    phentsize: int
    base: int                  # load bias (0 for ET_EXEC)
    pie: bool
    symbols: dict[str, int] = field(default_factory=dict)
    text: tuple[int, int] = (0, 0)          # [start, end) of the executable segments

    @property
    def end(self) -> int:
        """The first byte past the highest segment (where the program break starts)."""
        return max(s.vaddr + s.memsz for s in self.segments)


def read_program(path: str | Path) -> Program:
    """Parse `path` as a static x86-64 Linux executable; LinuxImageError says what is wrong."""
    path = str(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                return _parse(path, b"")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, data)
    except FileNotFoundError:
        raise LinuxImageError(f"{path}: no such file", 127) from None
    except IsADirectoryError:
        raise LinuxImageError(f"{path}: is a directory, not a program") from None
    except OSError as exc:
        raise LinuxImageError(f"{path}: cannot read it: {exc.strerror}") from None


def _parse(path: str, data: bytes | mmap.mmap) -> Program:
    """The Program that the file's bytes `data` describe (only headers and symbols are read)."""
    if data[:4] != b"\x7fELF":
        hint = " (a script: run its interpreter, a static build of it, on the script)" \
            if data[:2] == b"#!" else ""
        raise LinuxImageError(f"{path}: not an ELF executable{hint}")
    if len(data) < 64:
        raise LinuxImageError(f"{path}: truncated ELF file ({len(data)} bytes, the ELF header alone is 64)")
    if data[4] != 2:
        raise LinuxImageError(f"{path}: a 32-bit ELF file; minivmm runs x86-64 (ELF64) programs")
    if data[5] != 1:
        raise LinuxImageError(f"{path}: a big-endian ELF file; minivmm runs x86-64 programs")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != EM_X86_64:
        raise LinuxImageError(f"{path}: built for {_MACHINES.get(e_machine, f'machine {e_machine}')}, "
                              "not x86-64")
    if e_type not in (ET_EXEC, ET_DYN):
        kind = {0: "no file type", 1: "a relocatable object (.o): link it", 4: "a core dump"}.get(e_type, f"type {e_type}")
        raise LinuxImageError(f"{path}: {kind}, not an executable")
    entry, phoff, shoff = struct.unpack_from("<QQQ", data, 24)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", data, 54)
    if phentsize != 56 or phoff + phnum * 56 > len(data):
        raise LinuxImageError(f"{path}: truncated ELF file: its program headers end at "
                              f"{phoff + phnum * phentsize:#x}, the file at {len(data):#x}")
    headers = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * 56) for i in range(phnum)]
    if any(h[0] == PT_INTERP for h in headers):
        interp = next(data[h[2]:h[2] + h[5]].rstrip(b"\0").decode(errors="replace")
                      for h in headers if h[0] == PT_INTERP)
        raise LinuxImageError(f"{path}: dynamically linked (interpreter {interp}); minivmm runs static "
                              "programs: rebuild with -static (gcc -static, musl-gcc -static)")
    loads = [h for h in headers if h[0] == PT_LOAD]
    if not loads:
        raise LinuxImageError(f"{path}: no loadable segment")
    pie = e_type == ET_DYN
    first = min(h[3] for h in loads) & ~0xFFF
    base = PIE_BASE - first if pie else 0
    segments = []
    for _type, flags, offset, vaddr, _paddr, filesz, memsz, _align in loads:
        if offset + filesz > len(data):
            raise LinuxImageError(f"{path}: truncated ELF file: a segment ends at file offset "
                                  f"{offset + filesz:#x}, the file at {len(data):#x}")
        if filesz > memsz:
            raise LinuxImageError(f"{path}: a segment's file size {filesz:#x} exceeds its memory size {memsz:#x}")
        segments.append(Segment(base + vaddr, memsz, offset, filesz, flags))
    phdr = next((base + h[3] for h in headers if h[0] == PT_PHDR), None)
    if phdr is None:
        phdr = next((base + h[3] + phoff - h[2] for h in loads if h[2] <= phoff < h[2] + h[5]), 0)
    executable = [s for s in segments if s.flags & PF_X]
    text = (min(s.vaddr for s in executable), max(s.vaddr + s.memsz for s in executable)) \
        if executable else (0, 0)
    program = Program(path, base + entry, segments, phdr, phnum, phentsize, base, pie, text=text)
    program.symbols = _symbols(data, shoff, shentsize, shnum, base)
    return program


def _symbols(data: bytes | mmap.mmap, shoff: int, shentsize: int, shnum: int, base: int) -> dict[str, int]:
    """Function and object symbols of .symtab (empty for a stripped file)."""
    if not shoff or shentsize != 64 or shoff + shnum * 64 > len(data):
        return {}
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * 64) for i in range(shnum)]
    symbols: dict[str, int] = {}
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != 2 or entsize != 24 or link >= shnum:      # SHT_SYMTAB
            continue
        strtab = sections[link]
        strings = data[strtab[4]:strtab[4] + strtab[5]]
        for i in range(size // 24):
            st_name, st_info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", data, offset + i * 24)
            if st_info & 0xF in (1, 2) and shndx and value:     # STT_OBJECT, STT_FUNC, defined
                end = strings.find(b"\0", st_name)
                symbols[strings[st_name:end].decode(errors="replace")] = base + value
    return symbols
