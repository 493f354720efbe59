"""Names a module offers whose defining modules load on first use (PEP 562 `__getattr__`), so
that importing the module does not import what a run may never need."""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Mapping


def lazy_names(module: str, homes: Mapping[str, str]) -> Callable[[str], object]:
    """The `__getattr__` of the module named `module`: each name of `homes` comes from the module
    `homes[name]` (relative to `module`'s package when it starts with a dot), imported at the first
    access and then kept in `module`'s namespace."""
    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        namespace = sys.modules[module]
        value = getattr(importlib.import_module(home, namespace.__package__), name)
        setattr(namespace, name, value)
        return value
    return __getattr__
