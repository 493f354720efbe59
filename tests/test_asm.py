"""minivmm.asm: GNU binutils into flat guest images, with a disk cache."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from minivmm.asm import AssemblyError, BinutilsNotFoundError, GuestImage, assemble, cache_dir

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("as", "ld", "objcopy")),
    reason="GNU binutils (as/ld/objcopy) not installed",
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "asm-cache"
    monkeypatch.setenv("MINIVMM_CACHE_DIR", str(directory))
    return directory


def test_64bit_nop_hlt() -> None:
    image = assemble("nop; hlt", load_address=0x1000)
    assert image == GuestImage(data=b"\x90\xf4", load_address=0x1000, entry=0x1000, symbols=image.symbols,
                               source="<inline>")
    assert image.end_address == 0x1002


@pytest.mark.parametrize(
    ("code_bits", "encoding"),
    [(16, b"\xb8\x34\x12"), (32, b"\x66\xb8\x34\x12"), (64, b"\x66\xb8\x34\x12")],
)
def test_code_bits_select_the_operand_size(code_bits: int, encoding: bytes) -> None:
    assert assemble("mov $0x1234, %ax", code_bits=code_bits, load_address=0x7C00).data == encoding


def test_source_can_switch_modes_itself() -> None:
    image = assemble(".code16\nmov $0x1234, %eax\n.code32\nmov $0x1234, %eax\n", code_bits=32, load_address=0)
    assert image.data == b"\x66\xb8\x34\x12\x00\x00" + b"\xb8\x34\x12\x00\x00"


def test_symbols_entry_and_bss_are_laid_out_from_the_load_address() -> None:
    source = """
        .globl _start
        jmp _start
    message: .ascii "hi"
    _start:
        hlt
        .data
    counter: .long 0x11223344
        .bss
    buffer: .skip 16
    """
    image = assemble(source, load_address=0x200000)
    message = image.symbols["message"]
    assert image.symbols["_start"] == image.entry == message + 2
    assert image.data[message - 0x200000 : message - 0x200000 + 2] == b"hi"
    counter = image.symbols["counter"] - 0x200000
    assert image.data[counter : counter + 4] == (0x11223344).to_bytes(4, "little")
    buffer = image.symbols["buffer"] - 0x200000
    assert len(image.data) >= buffer + 16
    assert image.data[buffer : buffer + 16] == bytes(16)


def test_custom_entry_symbol() -> None:
    image = assemble("nop\nmain: hlt\n", load_address=0x8000, entry_symbol="main")
    assert image.entry == 0x8001


def test_missing_custom_entry_symbol_is_an_error() -> None:
    with pytest.raises(AssemblyError, match="'main'"):
        assemble("hlt", load_address=0x8000, entry_symbol="main")


def test_defines_become_absolute_symbols() -> None:
    image = assemble(".byte MAGIC\nmov $PORT, %dx\n", code_bits=16, load_address=0,
                     defines={"MAGIC": 0x42, "PORT": 0x3F8})
    assert image.data == b"\x42\xba\xf8\x03"
    assert image.symbols["MAGIC"] == 0x42


def test_source_file_and_include_dirs(tmp_path: Path) -> None:
    include_dir = tmp_path / "include"
    include_dir.mkdir()
    (include_dir / "ports.inc").write_text(".equ DEBUG_EXIT, 0xf4\n")
    source = tmp_path / "guest.S"
    source.write_text('.include "ports.inc"\n.include "local.inc"\n_start: out %al, $DEBUG_EXIT\n')
    (tmp_path / "local.inc").write_text("nop\n")

    for spelling in (source, str(source)):
        image = assemble(spelling, load_address=0x1000, include_dirs=[include_dir])
        assert image.data == b"\x90\xe6\xf4"
        assert image.entry == 0x1001
        assert image.source == str(source)


def test_changing_an_include_file_invalidates_the_cache(tmp_path: Path) -> None:
    (tmp_path / "value.inc").write_text(".byte 1\n")
    first = assemble('.include "value.inc"', load_address=0, include_dirs=[tmp_path])
    (tmp_path / "value.inc").write_text(".byte 2\n")
    second = assemble('.include "value.inc"', load_address=0, include_dirs=[tmp_path])
    assert (first.data, second.data) == (b"\x01", b"\x02")


def test_missing_source_file_is_reported() -> None:
    with pytest.raises(FileNotFoundError):
        assemble(Path("/nonexistent/guest.S"), load_address=0)
    with pytest.raises(FileNotFoundError):
        assemble("/nonexistent/guest.S", load_address=0)


def test_assembler_error_carries_its_own_message_and_line() -> None:
    with pytest.raises(AssemblyError) as caught:
        assemble("nop\nfrobnicate %eax\nhlt\n", load_address=0x1000)
    error = caught.value
    assert "inline.s:2: Error:" in str(error)
    assert "frobnicate" in str(error)
    assert error.command[0].endswith("as")
    assert " ".join(error.command) in str(error)
    assert ":2: Error:" in error.stderr


def test_linker_error_is_reported() -> None:
    with pytest.raises(AssemblyError, match="undefined reference to `nowhere'"):
        assemble("call nowhere", load_address=0x1000)


def test_cache_hit_runs_no_subprocess(monkeypatch: pytest.MonkeyPatch, private_cache: Path) -> None:
    source = "_start: mov $1, %eax\nhlt\n"
    first = assemble(source, load_address=0x4000)
    assert any(private_cache.iterdir())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"subprocess ran on a cache hit: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    assert assemble(source, load_address=0x4000) == first


def test_different_parameters_miss_the_cache() -> None:
    low = assemble("_start: jmp _start", load_address=0x1000)
    high = assemble("_start: jmp _start", load_address=0x2000)
    assert (low.entry, high.entry) == (0x1000, 0x2000)


def test_corrupt_cache_entry_is_rebuilt(private_cache: Path) -> None:
    first = assemble("nop", load_address=0)
    for binary in private_cache.glob("*.bin"):
        binary.write_bytes(b"garbage")
    assert assemble("nop", load_address=0) == first


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MINIVMM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "minivmm" / "asm"


def test_missing_binutils_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BinutilsNotFoundError, match=r"apt-get install binutils"):
        assemble("hlt", load_address=0)


def test_invalid_code_bits() -> None:
    with pytest.raises(ValueError):
        assemble("hlt", code_bits=8, load_address=0)
