"""Assemble guest code with GNU binutils into a flat image.

``assemble`` runs ``as`` -> ``ld -N -Ttext=<load_address>`` -> ``objcopy -O
binary``, so ``.text``, ``.data`` and ``.bss`` form one contiguous image whose
first byte belongs at ``load_address``. Results are cached on disk, keyed by the
source, every parameter, the include files and the identity of the binutils
executables; a cache hit runs no subprocess.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cache import cache_dir
from .errors import MinivmmError

__all__ = ["AssemblyError", "BinutilsNotFoundError", "GuestImage", "assemble", "cache_dir"]

_TOOLS = ("as", "ld", "objcopy")
_INCLUDE_SUFFIXES = frozenset({".h", ".S", ".s", ".inc"})
_INLINE_SOURCE_NAME = "<inline>"
# Bump when the build recipe or the cache record format changes.
_RECIPE_VERSION = 1


class AssemblyError(MinivmmError):
    """A binutils step failed; the message carries the tool's stderr verbatim."""

    def __init__(self, message: str, *, command: Sequence[str] = (), stderr: str = "") -> None:
        super().__init__(message)
        self.command = list(command)
        self.stderr = stderr


class BinutilsNotFoundError(AssemblyError):
    """``as``, ``ld`` or ``objcopy`` is not on PATH."""


@dataclass(frozen=True)
class GuestImage:
    """A flat guest binary: ``data[0]`` belongs at guest-physical ``load_address``."""

    data: bytes
    load_address: int
    entry: int
    symbols: dict[str, int] = field(default_factory=dict)
    source: str | None = None

    @property
    def end_address(self) -> int:
        """First guest-physical address past the image (``.bss`` included)."""
        return self.load_address + len(self.data)


@dataclass(frozen=True)
class _Target:
    as_flag: str
    ld_emulation: str
    directive: str


_TARGETS: dict[int, _Target] = {
    16: _Target("--32", "elf_i386", ".code16"),
    32: _Target("--32", "elf_i386", ".code32"),
    64: _Target("--64", "elf_x86_64", ".code64"),
}


def assemble(
    source: str | os.PathLike[str],
    *,
    code_bits: int = 64,
    load_address: int,
    entry_symbol: str = "_start",
    include_dirs: Sequence[str | os.PathLike[str]] = (),
    defines: Mapping[str, int] = {},
    prelude: str = "",
) -> GuestImage:
    """Assemble ``source`` (a ``.S``/``.s`` path or inline assembly text).

    ``code_bits`` selects the object format and the initial ``.code16`` /
    ``.code32`` / ``.code64`` mode; the source may switch modes itself.
    ``prelude`` is assembly placed before the source in its own input file
    (line numbers in messages stay those of the source). ``defines`` become ``--defsym name=value`` absolute symbols. The entry is
    ``entry_symbol``'s address; when the default ``_start`` is absent the entry
    is ``load_address``. For a file source its directory is searched for
    ``.include`` files before ``include_dirs``.
    """
    if code_bits not in _TARGETS:
        raise ValueError(f"code_bits must be 16, 32 or 64, not {code_bits}")
    if load_address < 0:
        raise ValueError(f"load_address must be non-negative, not {load_address:#x}")

    source_path = _source_path(source)
    if source_path is not None:
        text = source_path.read_text()
        source_name = str(source_path)
        search_dirs = [source_path.parent, *map(_absolute, include_dirs)]
    else:
        text = str(source)
        source_name = _INLINE_SOURCE_NAME
        search_dirs = [_absolute(d) for d in include_dirs]

    key = _cache_key(
        text=text,
        source_name=source_name,
        code_bits=code_bits,
        load_address=load_address,
        entry_symbol=entry_symbol,
        search_dirs=search_dirs,
        defines=defines,
        prelude=prelude,
    )
    store = _Cache(cache_dir())
    cached = store.load(key, source_name)
    if cached is not None:
        return cached

    image = _build(
        text=text,
        source_path=source_path,
        source_name=source_name,
        target=_TARGETS[code_bits],
        load_address=load_address,
        entry_symbol=entry_symbol,
        search_dirs=search_dirs,
        defines=defines,
        prelude=prelude,
    )
    store.save(key, image)
    return image


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def _source_path(source: str | os.PathLike[str]) -> Path | None:
    if isinstance(source, os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"assembly source not found: {path}")
        return path.resolve()
    if "\n" in source:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve()
    looks_like_a_filename = path.suffix in (".S", ".s") and not any(c.isspace() or c == ";" for c in source)
    if looks_like_a_filename:
        raise FileNotFoundError(f"assembly source not found: {source}")
    return None


# ---------------------------------------------------------------------------
# Building


def _build(
    *,
    text: str,
    source_path: Path | None,
    source_name: str,
    target: _Target,
    load_address: int,
    entry_symbol: str,
    search_dirs: Sequence[Path],
    defines: Mapping[str, int],
    prelude: str,
) -> GuestImage:
    tools = _find_binutils()
    with tempfile.TemporaryDirectory(prefix="minivmm-asm-") as scratch_name:
        scratch = Path(scratch_name)
        # The mode directive lives in its own input file so that line numbers
        # in the assembler's messages match the user's source.
        prelude_file = scratch / "prelude.s"
        prelude_file.write_text(f"{target.directive}\n{prelude}\n")
        if source_path is None:
            source_path = scratch / "inline.s"
            source_path.write_text(text if text.endswith("\n") else text + "\n")
        obj, elf, binary = scratch / "guest.o", scratch / "guest.elf", scratch / "guest.bin"

        as_cmd = [tools["as"], target.as_flag]
        for directory in search_dirs:
            as_cmd += ["-I", str(directory)]
        for name, value in sorted(defines.items()):
            as_cmd += ["--defsym", f"{name}={int(value)}"]
        as_cmd += ["-o", str(obj), str(prelude_file), str(source_path)]
        _run(as_cmd, "assembler")

        ld_cmd = [
            tools["ld"], "-m", target.ld_emulation, "-N", f"-Ttext={load_address:#x}",
            "-e", entry_symbol, "--build-id=none", "-z", "noexecstack",
        ]
        if _ld_supports_no_warn_rwx_segments(tools["ld"]):
            ld_cmd.append("--no-warn-rwx-segments")
        ld_cmd += ["-o", str(elf), str(obj)]
        _run(ld_cmd, "linker")

        objcopy_cmd = [
            tools["objcopy"], "-O", "binary", "--remove-section=.note*",
            "--set-section-flags", ".bss=alloc,load,contents", str(elf), str(binary),
        ]
        _run(objcopy_cmd, "objcopy")

        symbols, loaded_start = _read_elf(elf)
        data = binary.read_bytes()

    if data and loaded_start != load_address:
        raise AssemblyError(
            f"{source_name}: the image starts at {loaded_start:#x}, not at load_address {load_address:#x}; "
            "keep code and data in .text/.data/.bss (no absolute section addresses)"
        )
    if entry_symbol in symbols:
        entry = symbols[entry_symbol]
    elif entry_symbol == "_start":
        entry = load_address
    else:
        raise AssemblyError(f"{source_name}: entry symbol {entry_symbol!r} is not defined")
    return GuestImage(data=data, load_address=load_address, entry=entry, symbols=symbols, source=source_name)


def _find_binutils() -> dict[str, str]:
    found = {tool: shutil.which(tool) for tool in _TOOLS}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        raise BinutilsNotFoundError(
            f"GNU binutils not found (as/ld/objcopy): apt-get install binutils (missing: {', '.join(missing)})"
        )
    return {tool: path for tool, path in found.items() if path is not None}


def _run(command: list[str], step: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssemblyError(
            f"{step} failed (exit status {result.returncode}): {' '.join(command)}\n{result.stderr.rstrip()}",
            command=command,
            stderr=result.stderr,
        )


@functools.cache
def _ld_supports_no_warn_rwx_segments(ld: str) -> bool:
    result = subprocess.run([ld, "--help"], capture_output=True, text=True)
    return "--no-warn-rwx-segments" in result.stdout


def _read_elf(path: Path) -> tuple[dict[str, int], int]:
    """Return the defined symbols and the lowest address of any loaded section."""
    # Imported here, on a cache miss: importing minivmm (machine.py imports this
    # module) does not load pyelftools.
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as stream:
        elf = ELFFile(stream)
        symbols: dict[str, int] = {}
        symtab = elf.get_section_by_name(".symtab")
        for symbol in symtab.iter_symbols() if symtab is not None else ():
            if not symbol.name or symbol["st_shndx"] == "SHN_UNDEF":
                continue
            if symbol["st_info"]["type"] in ("STT_SECTION", "STT_FILE"):
                continue
            symbols[symbol.name] = symbol["st_value"]
        loaded = [
            section["sh_addr"]
            for section in elf.iter_sections()
            if section["sh_flags"] & 0x2  # SHF_ALLOC
            and section["sh_size"] > 0
            and not section.name.startswith(".note")
        ]
    return symbols, min(loaded, default=0)


# ---------------------------------------------------------------------------
# Cache


def _cache_key(
    *,
    text: str,
    source_name: str,
    code_bits: int,
    load_address: int,
    entry_symbol: str,
    search_dirs: Sequence[Path],
    defines: Mapping[str, int],
    prelude: str,
) -> str:
    parameters = {
        "recipe": _RECIPE_VERSION,
        "source_name": source_name,
        "code_bits": code_bits,
        "load_address": load_address,
        "entry_symbol": entry_symbol,
        "search_dirs": [str(d) for d in search_dirs],
        "defines": sorted((name, int(value)) for name, value in defines.items()),
        "prelude": prelude,
        "binutils": _binutils_fingerprint(),
    }
    digest = hashlib.sha256()
    digest.update(json.dumps(parameters, sort_keys=True).encode())
    digest.update(b"\0source\0" + text.encode())
    for directory in search_dirs:
        for include in _include_files(directory):
            digest.update(b"\0include\0" + str(include).encode() + b"\0" + include.read_bytes())
    return digest.hexdigest()


def _include_files(directory: Path) -> list[Path]:
    """Every includable file under ``directory`` (recursively): pass narrow include dirs."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*") if p.suffix in _INCLUDE_SUFFIXES and p.is_file())


def _binutils_fingerprint() -> list[object]:
    # Identifies the installed binutils by executable path, size and mtime:
    # unlike `as --version` this costs no subprocess, so a cache hit runs none.
    fingerprint: list[object] = []
    for tool in _TOOLS:
        path = shutil.which(tool)
        if path is None:
            fingerprint.append([tool, None])
            continue
        real = os.path.realpath(path)
        stat = os.stat(real)
        fingerprint.append([tool, real, stat.st_size, stat.st_mtime_ns])
    return fingerprint


@dataclass(frozen=True)
class _Cache:
    """One ``<key>.bin`` + ``<key>.json`` pair per image; the JSON is written
    last and records the binary's hash, so a torn or stale entry is a miss."""

    directory: Path

    def load(self, key: str, source_name: str) -> GuestImage | None:
        try:
            record = json.loads((self.directory / f"{key}.json").read_text())
            data = (self.directory / f"{key}.bin").read_bytes()
        except (OSError, ValueError):
            return None
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            return None
        return GuestImage(
            data=data,
            load_address=record["load_address"],
            entry=record["entry"],
            symbols=dict(record["symbols"]),
            source=source_name,
        )

    def save(self, key: str, image: GuestImage) -> None:
        record = {
            "load_address": image.load_address,
            "entry": image.entry,
            "symbols": image.symbols,
            "sha256": hashlib.sha256(image.data).hexdigest(),
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.directory / f"{key}.bin", image.data)
            _write_atomically(self.directory / f"{key}.json", json.dumps(record).encode())
        except OSError:
            pass  # an unwritable cache only costs speed


def _write_atomically(path: Path, content: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(content)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
