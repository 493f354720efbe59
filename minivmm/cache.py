"""Where minivmm keeps what it builds on disk.

`cache_dir()` is the assembler's directory; its parent holds the other
caches side by side (``elf`` for C built into guest ELF files, ``cffi`` for the
compiled fast path, ``csrc`` for inline C of tests). This module owns only the
location: each cache's format belongs to the module that writes it.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$MINIVMM_CACHE_DIR``, else ``$XDG_CACHE_HOME/minivmm/asm``, else ``~/.cache/minivmm/asm``."""
    override = os.environ.get("MINIVMM_CACHE_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "minivmm" / "asm"
