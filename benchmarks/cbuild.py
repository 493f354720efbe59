"""Build and run the C baselines that benchmarks compare Python against."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

BUILD_DIR = Path(__file__).resolve().parent / "build"
BASE_FLAGS = ("-O2", "-Wall")


class CBuildError(RuntimeError):
    """gcc is missing, a compile failed, or a C baseline exited non-zero."""


def build_c(source: Path, *, extra_flags: Sequence[str] = ()) -> Path:
    """Compile ``source`` to ``benchmarks/build/<stem>`` unless that binary is
    newer than the source and the headers beside it; return the binary's path."""
    source = Path(source).resolve()
    binary = BUILD_DIR / source.stem
    inputs = [source, *source.parent.glob("*.h")]
    if binary.exists() and binary.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in inputs):
        return binary
    gcc = shutil.which("gcc")
    if gcc is None:
        raise CBuildError("gcc not found: apt-get install gcc")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename, so parallel benchmark runs never
    # execute a half-written binary.
    partial = BUILD_DIR / f".{binary.name}.{os.getpid()}.partial"
    command = [gcc, *BASE_FLAGS, *extra_flags, "-o", str(partial), str(source)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CBuildError(f"compile failed: {' '.join(command)}\n{result.stderr.rstrip()}")
        os.replace(partial, binary)
    finally:
        partial.unlink(missing_ok=True)
    return binary


def run_c(binary: Path, *args: object, timeout: float | None = 300) -> str:
    """Run a built baseline and return its stdout."""
    command = [str(binary), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise CBuildError(
            f"{' '.join(command)} exited with status {result.returncode}\n{result.stderr.rstrip()}"
        )
    return result.stdout
