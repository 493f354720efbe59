"""What importing minivmm loads: the KVM bindings and the fast path pull in neither the
assembler's ELF reader (pyelftools) nor a cffi build."""
from __future__ import annotations

import subprocess
import sys

import pytest

import minivmm.asm
import minivmm.cache


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_kvm_loads_no_pyelftools() -> None:
    assert _run("import sys, minivmm.kvm; print(sorted(m for m in sys.modules if m.startswith('elftools')))") \
        == "[]"


def test_importing_fastpath_builds_nothing() -> None:
    code = ("import sys, minivmm.fastpath as f; "
            "print(f._loaded, 'cffi' in sys.modules, 'COMPILED' in vars(f), 'BUILD_ERROR' in vars(f))")
    assert _run(code) == "False False False False"


def test_fastpath_builds_on_first_use() -> None:
    code = ("import minivmm.fastpath as f; compiled = f.COMPILED; "
            "print(f._loaded, compiled == (f.restore_dirty is not None), compiled or bool(f.BUILD_ERROR))")
    assert _run(code) == "True True True"


def test_fastpath_has_no_other_lazy_attributes() -> None:
    import minivmm.fastpath as fastpath
    with pytest.raises(AttributeError, match="NOT_A_NAME"):
        fastpath.NOT_A_NAME


def test_asm_reexports_cache_dir() -> None:
    assert minivmm.asm.cache_dir is minivmm.cache.cache_dir
    assert "cache_dir" in minivmm.asm.__all__


def test_cli_start_loads_no_disassembler_elf_reader_assembler_fuzzer_or_rtc() -> None:
    code = ("import sys, minivmm.cli; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'capstone', 'elftools', 'cffi'}), 'minivmm.asm' in sys.modules, 'minivmm.fuzz.harness' in sys.modules, "
            "'minivmm.devices.rtc' in sys.modules)")
    assert _run(code) == "[] False False False"


def test_built_fast_path_loads_without_cffi() -> None:
    _run("import minivmm.fastpath as f; assert f.COMPILED, f.BUILD_ERROR")      # built (or cached)
    assert _run("import sys, minivmm.fastpath as f; print(f.COMPILED, 'cffi' in sys.modules)") == "True False"
