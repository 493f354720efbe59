"""The tree cache: the located `Node` tree `load_config` composed for a config file, kept on disk
so that loading the same text again needs no YAML parser (importing PyYAML is a large part of a
short `minivmm run`).

A config path hashes to one of SLOTS marshal files under `cache_dir()/../configs`; the file holds
a stamp, the path, the whole text and the tree of the config last stored in that slot (texts up
to MAX_TEXT only: the cache stays small however many configs a test suite writes). It serves a
load only when the path and the text are the stored ones and the stamp matches: the Python
version (marshal's format) and the files that decide what a text composes to (the tree builder,
the limits it checks, PyYAML). An entry that cannot be read or written is a miss;
MINIVMM_CONFIG_CACHE=0 turns the cache off.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import marshal
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

from ..cache import cache_dir
from .validate import Node

FORMAT = 1
CACHE_ENV = "MINIVMM_CONFIG_CACHE"
SLOTS = 256
MAX_TEXT = 64 << 10


def enabled(text: str) -> bool:
    return len(text) <= MAX_TEXT and os.environ.get(CACHE_ENV, "1") != "0"


def entry(file: str) -> Path:
    """The cache file for the config at `file` (the path as `load_config` was given it)."""
    digest = hashlib.sha256(file.encode("utf-8", "surrogateescape")).digest()
    slot = int.from_bytes(digest[:4], "little") % SLOTS
    return cache_dir().parent / "configs" / f"{slot:02x}.marshal"


def load(text: str, file: str) -> Node | None:
    """The tree stored for `file` when it was composed from this very `text`, else None."""
    if not enabled(text):
        return None
    try:
        stamp, stored_file, stored_text, tree = marshal.loads(entry(file).read_bytes())
        if stamp != _stamp() or stored_file != file or stored_text != text:
            return None
        return _thaw(tree, file)
    except (OSError, EOFError, ValueError, TypeError):
        return None


def save(text: str, file: str, root: Node) -> None:
    """Store the tree composed from `text` for `file` (written whole by rename; errors ignored)."""
    if not enabled(text):
        return
    path = entry(file)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(marshal.dumps((_stamp(), file, text, _freeze(root))))
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass


@cache
def _stamp() -> tuple:
    sources = [Path(__file__).with_name("yamltree.py"), Path(__file__).with_name("validate.py")]
    spec = importlib.machinery.PathFinder.find_spec("yaml")
    if spec is not None and spec.origin:
        sources.append(Path(spec.origin))
    stats = []
    for source in sources:
        try:
            status = source.stat()
            stats.append((str(source), status.st_mtime_ns, status.st_size))
        except OSError:
            stats.append((str(source), 0, 0))
    return FORMAT, sys.version, tuple(stats)


def _freeze(node: Node) -> tuple:
    """`node` as marshal stores it: (value, line, key), children frozen in place."""
    value = node.value
    if isinstance(value, dict):
        value = {name: _freeze(child) for name, child in value.items()}
    elif isinstance(value, list):
        value = [_freeze(child) for child in value]
    return value, node.line, node.key


def _thaw(frozen: Any, file: str) -> Node:
    value, line, key = frozen
    if isinstance(value, dict):
        value = {name: _thaw(child, file) for name, child in value.items()}
    elif isinstance(value, list):
        value = [_thaw(child, file) for child in value]
    return Node(value, file, line, key)
