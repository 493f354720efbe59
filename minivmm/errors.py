"""The root of minivmm's exception hierarchy.

Every error minivmm raises as one of its own exception classes derives from
`MinivmmError`, so ``except MinivmmError`` catches all of them. Each such class
also keeps the builtin base it had before the root existed (`KvmError` is an
`OSError`, `GuestMemoryError` a `ValueError`, ...), so code that catches the
builtin keeps working. Plain argument checks raise the builtin exceptions
(`ValueError`, `TypeError`) directly, as the standard library does.
"""
from __future__ import annotations

__all__ = ["MinivmmError"]


class MinivmmError(Exception):
    """The base of every exception class minivmm defines; never raised by itself.

    A subclass lists `MinivmmError` first and its builtin base second, e.g.
    ``class KvmError(MinivmmError, OSError)``.
    """
