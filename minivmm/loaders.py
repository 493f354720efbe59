"""Guest image loaders: assembly source, flat binary, ELF (pyelftools), multiboot v1 kernels.

Every loader returns a `LoadedImage`: the bytes to copy into guest-physical
memory, the entry point, the symbols, and the initial registers the boot
protocol asks for (multiboot: EAX=0x2BADB002, EBX=the info structure).
`build_c_elf` compiles freestanding C with gcc into a cached static ELF.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from .cache import cache_dir
from .errors import MinivmmError
from .modes import ImageRange

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile

__all__ = ["LoaderError", "LoadedImage", "load_asm", "load_flat", "load_elf", "build_c_elf",
           "load_multiboot", "MultibootHeader", "MultibootModule", "parse_multiboot_header",
           "build_multiboot_info", "MULTIBOOT_INFO_ADDRESS", "ImageOverlapError", "check_no_overlap"]


class LoaderError(MinivmmError, ValueError):
    """An image cannot be loaded: the message says what is wrong with it."""


class ImageOverlapError(LoaderError):
    """Two images claim the same guest-physical bytes; the message names both ranges."""


def check_no_overlap(placed: Sequence[ImageRange], new: ImageRange) -> None:
    """Raise ImageOverlapError if `new` shares a byte with one of the `placed` ranges, unless
    it lies inside that range's zero-fill tail (`ImageRange.bss`)."""
    for old in placed:
        inside_bss = old.end - old.bss <= new.start and new.end <= old.end
        if new.start < old.end and old.start < new.end and not inside_bss:
            raise ImageOverlapError(f"{new} overlaps {old}: the later image would overwrite the "
                                    "earlier one's bytes")


@dataclass
class LoadedImage:
    """What goes into guest memory: `segments` are (guest-physical address, bytes) pairs."""
    segments: list[tuple[int, bytes]]
    entry: int | None = None
    symbols: dict[str, int] = field(default_factory=dict)
    registers: dict[str, int] = field(default_factory=dict)
    zero_fill: dict[int, int] = field(default_factory=dict)
    """Per segment address: how many of its trailing bytes are zero-fill (ELF bss)."""

    @property
    def end_address(self) -> int:
        return max((address + len(data) for address, data in self.segments), default=0)


def load_asm(source: str | os.PathLike, *, code_bits: int, load_address: int,
             defines: Mapping[str, int] = {}) -> LoadedImage:
    """Assemble with binutils (`minivmm.asm`), with minivmm.inc on the include path."""
    from .asm import assemble
    include = str(Path(__file__).parent / "guest_include")
    image = assemble(Path(source), code_bits=code_bits, load_address=load_address,
                     include_dirs=(include,), defines=defines)
    return LoadedImage([(image.load_address, image.data)], image.entry, dict(image.symbols))


def load_flat(path: str | os.PathLike, address: int, entry: int | None = None) -> LoadedImage:
    """A flat binary copied as is to `address`; the entry is its first byte unless given."""
    data = Path(path).read_bytes()
    if not data:
        raise LoaderError(f"{path}: the binary is empty")
    return LoadedImage([(address, data)], address if entry is None else entry)


# ---------------------------------------------------------------------------
# ELF


def load_elf(path: str | os.PathLike) -> LoadedImage:
    """PT_LOAD segments at their physical addresses (bss zero-filled), entry from the header,
    symbols from .symtab."""
    path = Path(path)
    with open(path, "rb") as stream:
        return _read_elf(stream, str(path))[0]


def _read_elf(stream, name: str) -> tuple[LoadedImage, list[tuple[int, int, int]]]:
    """An ELF32/ELF64 x86 executable from a seekable stream: the image (segments by p_paddr)
    and each PT_LOAD's (p_vaddr, p_paddr, p_memsz), for translating virtual entry points."""
    from elftools.common.exceptions import ELFError     # pyelftools loads with the first ELF
    from elftools.elf.elffile import ELFFile
    try:
        elf = ELFFile(stream)
        if elf["e_machine"] not in ("EM_X86_64", "EM_386"):
            raise LoaderError(f"{name}: ELF for {elf['e_machine']}, expected x86 (EM_386 or EM_X86_64)")
        if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
            raise LoaderError(f"{name}: ELF type {elf['e_type']}, expected an executable (ET_EXEC)")
        segments = []
        layout = []
        zero_fill = {}
        for segment in elf.iter_segments():
            if segment["p_type"] != "PT_LOAD" or segment["p_memsz"] == 0:
                continue
            data = segment.data()
            if segment["p_memsz"] < len(data):
                raise LoaderError(f"{name}: a PT_LOAD segment has p_memsz < p_filesz")
            segments.append((segment["p_paddr"], data + bytes(segment["p_memsz"] - len(data))))
            zero_fill[segment["p_paddr"]] = segment["p_memsz"] - len(data)
            layout.append((segment["p_vaddr"], segment["p_paddr"], segment["p_memsz"]))
        if not segments:
            raise LoaderError(f"{name}: no PT_LOAD segment")
        symbols = _elf_symbols(elf)
        return LoadedImage(segments, elf["e_entry"], symbols, zero_fill=zero_fill), layout
    except ELFError as exc:
        raise LoaderError(f"{name}: not a valid ELF file: {exc}") from None


def _elf_symbols(elf: "ELFFile") -> dict[str, int]:
    symbols: dict[str, int] = {}
    table = elf.get_section_by_name(".symtab")
    if table is None:
        return symbols
    for symbol in table.iter_symbols():
        if symbol.name and symbol["st_info"]["type"] not in ("STT_SECTION", "STT_FILE") \
                and symbol["st_shndx"] != "SHN_UNDEF":
            symbols[symbol.name] = symbol["st_value"]
    return symbols


C_FLAGS = ("-ffreestanding", "-nostdlib", "-static", "-fno-pie", "-no-pie", "-fno-stack-protector",
           "-fno-asynchronous-unwind-tables", "-mno-red-zone", "-mgeneral-regs-only", "-O2",
           "-Wl,--build-id=none", "-Wl,-z,noexecstack")


def build_c_elf(sources: Sequence[str | os.PathLike], *, cflags: Sequence[str] = (),
                link_address: int = 0x100000, bits: int = 64) -> Path:
    """Compile freestanding C into a static ELF whose text starts at `link_address`.

    gcc runs with -ffreestanding -nostdlib -static (see C_FLAGS); the result is
    cached in `minivmm.cache.cache_dir()/../elf`, keyed by the sources, flags and
    the gcc executable. The entry is `_start`.
    """
    import hashlib
    import shutil
    import subprocess
    import tempfile
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LoaderError("gcc not found: apt-get install gcc")
    paths = [Path(s).resolve() for s in sources]
    flags = list(C_FLAGS) + ["-m64" if bits == 64 else "-m32", f"-Wl,-Ttext-segment={link_address:#x}",
                             "-Wl,-e,_start"] + list(cflags)
    if bits == 64:
        flags.append("-mcmodel=small")
    digest = hashlib.sha256()
    stat = os.stat(os.path.realpath(gcc))
    digest.update(repr((gcc, stat.st_size, stat.st_mtime_ns, flags)).encode())
    for path in paths:
        try:
            digest.update(str(path).encode() + b"\0" + path.read_bytes())
        except OSError as exc:
            raise LoaderError(f"cannot read C source {path}: {exc}") from None
        for header in sorted(path.parent.glob("*.h")):
            digest.update(str(header).encode() + b"\0" + header.read_bytes())
    directory = cache_dir().parent / "elf"
    output = directory / f"{digest.hexdigest()[:32]}.elf"
    if output.is_file():
        return output
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".elf.tmp")
    os.close(fd)
    command = [gcc, *flags, "-o", tmp, *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise LoaderError(f"gcc failed (exit status {result.returncode}): {' '.join(command)}\n"
                          f"{result.stderr.rstrip()}")
    os.replace(tmp, output)
    return output


# ---------------------------------------------------------------------------
# Multiboot v1 (Multiboot Specification 0.6.96)

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
MULTIBOOT_PAGE_ALIGN = 1 << 0
MULTIBOOT_MEMORY_INFO = 1 << 1
MULTIBOOT_VIDEO_MODE = 1 << 2
MULTIBOOT_AOUT_KLUDGE = 1 << 16
MULTIBOOT_INFO_ADDRESS = 0x20000
"""Where the info structure, memory map, command line and loader name go (below 640 KiB,
above minivmm's system area)."""
INFO_MEMORY, INFO_CMDLINE, INFO_MODS, INFO_MEM_MAP, INFO_LOADER_NAME = 1 << 0, 1 << 2, 1 << 3, 1 << 6, 1 << 9
LOADER_NAME = b"minivmm\0"
_SUPPORTED_REQUIRED = MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO


@dataclass(frozen=True)
class MultibootHeader:
    """The multiboot v1 header of a kernel file and its address fields."""
    offset: int                 # of the header in the file
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def parse_multiboot_header(data: bytes) -> MultibootHeader:
    """Find and check the header: 4-byte aligned in the first 8 KiB, magic + flags + checksum == 0."""
    limit = min(len(data), MULTIBOOT_SEARCH) - 12
    for offset in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic != MULTIBOOT_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF:
            raise LoaderError(f"multiboot header at offset {offset:#x}: bad checksum {checksum:#x} "
                              f"(magic + flags + checksum must be 0 mod 2^32; expected "
                              f"{(-(magic + flags)) & 0xFFFFFFFF:#x})")
        unsupported = flags & 0xFFFF & ~_SUPPORTED_REQUIRED
        if unsupported:
            what = "a video mode (flags bit 2)" if unsupported & MULTIBOOT_VIDEO_MODE else \
                f"unknown required features (flags {unsupported:#x})"
            raise LoaderError(f"multiboot header at offset {offset:#x}: the kernel requires {what}, "
                              "which minivmm does not provide")
        if flags & MULTIBOOT_AOUT_KLUDGE:
            if offset + 32 > len(data):
                raise LoaderError(f"multiboot header at offset {offset:#x}: truncated address fields")
            fields = struct.unpack_from("<5I", data, offset + 12)
            return MultibootHeader(offset, flags, *fields)
        return MultibootHeader(offset, flags)
    raise LoaderError(f"no multiboot header (magic {MULTIBOOT_MAGIC:#x}) in the first "
                      f"{MULTIBOOT_SEARCH} bytes of the kernel")


@dataclass(frozen=True)
class MultibootModule:
    """A boot module (Multiboot 0.6.96 section 3.3, mods_*): its bytes and its string.

    `cmdline` is the module's string exactly as the kernel will read it (QEMU's
    `-initrd "file args"` passes the file name first; the YAML schema does the same).
    """
    data: bytes
    cmdline: str = ""


def load_multiboot(data: bytes, *, cmdline: str = "", memory_size: int,
                   info_address: int | None = None, modules: Sequence[MultibootModule] = (),
                   kernel_name: str = "") -> LoadedImage:
    """Load a multiboot v1 kernel (address fields of flags bit 16, else ELF32/ELF64 program
    headers) and its modules, and build its info structure.

    Modules go page-aligned after the kernel's highest byte, in order (the spec
    asks for page alignment when flags bit 0 is set; minivmm always aligns).
    The command line the kernel sees is `kernel_name` then `cmdline`, as QEMU's
    `-kernel` builds it (argv0 first; always present, possibly just the name).
    The info structure goes at `info_address` when given (an error if anything
    lands there), else at MULTIBOOT_INFO_ADDRESS when that is free, else
    page-aligned after the last module. The result's registers are the spec's
    entry state (section 3.2) EAX=0x2BADB002 and EBX=info address; the machine
    must start in 32-bit protected mode with paging off and flat segments
    (minivmm's protected mode).
    """
    header = parse_multiboot_header(data)
    if header.flags & MULTIBOOT_AOUT_KLUDGE:
        h = header
        if not h.load_addr <= h.header_addr:
            raise LoaderError(f"multiboot header: load_addr {h.load_addr:#x} is above header_addr "
                              f"{h.header_addr:#x}")
        file_start = header.offset - (h.header_addr - h.load_addr)
        if file_start < 0:
            raise LoaderError("multiboot header: header_addr - load_addr is larger than the header's offset")
        end = len(data) if h.load_end_addr == 0 else file_start + (h.load_end_addr - h.load_addr)
        if h.load_end_addr and h.load_end_addr < h.load_addr or end > len(data):
            raise LoaderError(f"multiboot header: load_end_addr {h.load_end_addr:#x} is outside the file")
        image = data[file_start:end]
        if h.bss_end_addr and h.bss_end_addr > h.load_addr + len(image):
            image += bytes(h.bss_end_addr - h.load_addr - len(image))
        loaded = LoadedImage([(h.load_addr, image)], h.entry_addr)
    else:
        if data[:4] != b"\x7fELF":
            raise LoaderError("multiboot header without the address fields (flags bit 16) and the "
                              "kernel is not an ELF file")
        import io
        loaded, layout = _read_elf(io.BytesIO(data), kernel_name or "the multiboot kernel")
        # An ELF64 kernel (GRUB accepts them; its entry code is still 32-bit) or one linked
        # at virtual addresses: translate the entry point to where it was loaded.
        for vaddr, paddr, memsz in layout:
            if vaddr != paddr and vaddr <= loaded.entry < vaddr + memsz:
                loaded.entry = loaded.entry - vaddr + paddr
                break
    for address, segment in loaded.segments:
        if address + len(segment) > 1 << 32:
            raise LoaderError(f"multiboot kernel segment at {address:#x} is above 4 GiB: the kernel "
                              "starts with paging off")
    if loaded.entry is None or loaded.entry >= 1 << 32:
        raise LoaderError(f"multiboot entry point {loaded.entry:#x} is not a 32-bit physical address")
    placed: list[tuple[int, int, str]] = []
    cursor = _page_up(loaded.end_address)
    for module in modules:
        placed.append((cursor, cursor + len(module.data), module.cmdline))
        loaded.segments.append((cursor, bytes(module.data)))
        cursor = _page_up(cursor + max(len(module.data), 1))
    full_cmdline = f"{kernel_name} {cmdline}" if kernel_name and cmdline else (kernel_name or cmdline)
    probe = build_multiboot_info(memory_size, full_cmdline, 0, placed)
    busy = [(a, a + len(d)) for a, d in loaded.segments]

    def free(at: int) -> bool:
        return all(at + len(probe) <= start or at >= end for start, end in busy)

    if info_address is None:
        info_address = MULTIBOOT_INFO_ADDRESS if free(MULTIBOOT_INFO_ADDRESS) else cursor
        if info_address + len(probe) > memory_size:
            raise LoaderError(f"no room for the multiboot info structure: the kernel and modules end at "
                              f"{cursor:#x} and guest RAM at {memory_size:#x}")
    elif not free(info_address):
        for address, segment in loaded.segments:
            if address < info_address + len(probe) and address + len(segment) > info_address:
                raise LoaderError(f"the kernel segment at {address:#x} overlaps the multiboot info "
                                  f"structure at {info_address:#x}")
    info = build_multiboot_info(memory_size, full_cmdline, info_address, placed)
    loaded.segments.append((info_address, info))
    loaded.registers = {"rax": MULTIBOOT_BOOTLOADER_MAGIC, "rbx": info_address}
    return loaded


def _page_up(value: int) -> int:
    return (value + 0xFFF) & ~0xFFF


def build_multiboot_info(memory_size: int, cmdline: str, address: int,
                         modules: Sequence[tuple[int, int, str]] = ()) -> bytes:
    """The multiboot_info structure (116 bytes, Multiboot 0.6.96 section 3.3), then the module
    list (mod_start, mod_end, string, reserved; 16 bytes each), the memory map, the command
    line, the module strings and the boot loader name.

    `modules` are (start, end, string) triples. RAM is one region from 0; the map
    reports [0, 640K) and [1M, end) as available, with minivmm's system area
    [0, 64K) reserved; 640K-1M (VGA, option ROMs, ACPI tables, BIOS) is left out,
    i.e. reserved.
    """
    from .modes import SYSTEM_AREA_END
    low_end = min(memory_size, 0xA0000)
    entries = [(0, SYSTEM_AREA_END, 2), (SYSTEM_AREA_END, low_end - SYSTEM_AREA_END, 1)]
    if memory_size > 0x100000:
        entries.append((0x100000, memory_size - 0x100000, 1))
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in entries)
    info_size = 116
    mods_addr = address + info_size
    mmap_addr = mods_addr + 16 * len(modules)
    cmdline_addr = mmap_addr + len(mmap)
    cmdline_bytes = cmdline.encode() + b"\0"
    strings = bytearray()
    strings_addr = cmdline_addr + len(cmdline_bytes)
    mods = bytearray()
    for start, end, text in modules:
        mods += struct.pack("<IIII", start, end, strings_addr + len(strings), 0)
        strings += text.encode() + b"\0"
    name_addr = strings_addr + len(strings)
    mem_lower = low_end // 1024
    mem_upper = max(0, memory_size - 0x100000) // 1024
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MEM_MAP | INFO_LOADER_NAME
    if modules:
        flags |= INFO_MODS
    info = bytearray(info_size)
    struct.pack_into("<IIII", info, 0, flags, mem_lower, mem_upper, 0xFFFFFFFF)   # boot_device: none
    struct.pack_into("<I", info, 16, cmdline_addr)
    struct.pack_into("<II", info, 20, len(modules), mods_addr if modules else 0)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, name_addr)
    return bytes(info) + bytes(mods) + mmap + cmdline_bytes + bytes(strings) + LOADER_NAME
