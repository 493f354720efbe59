"""What a Linux program may see of the host: exposed files and folders, and its std fds.

A guest path is the host path (so `busybox wc -l file` means what it means on the
host), resolved against the program's working folder or a directory fd, then
through the host's symlinks: the real path must lie under an exposed root, else
the call fails with EACCES (a note says which path and how to expose it). Writes
(O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, unlink, mkdir...) need a root exposed
writable, else EROFS. Host fds are opened O_CLOEXEC and closed with the process.
"""
from __future__ import annotations

import errno
import os
import posixpath
import stat as stat_module
from dataclasses import dataclass, field
from typing import Callable

from ..errors import MinivmmError

__all__ = ["Vfs", "VfsError", "OpenFile", "Root", "Stream", "HostStream", "BufferStream"]


class VfsError(MinivmmError, OSError):
    """A system call's failure as the program sees it: `errno`."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


@dataclass(frozen=True)
class Root:
    path: str              # real, absolute
    writable: bool = False

    def holds(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path.rstrip("/") + "/")


class Stream:
    """A std fd's other end: the host's fd, or buffers (for tests and fuzzing)."""
    host_fd: int | None = None

    def read(self, n: int) -> bytes:
        raise OSError(errno.EBADF, "not readable")

    def write(self, data) -> int:
        raise OSError(errno.EBADF, "not writable")


class HostStream(Stream):
    def __init__(self, fd: int) -> None:
        self.host_fd = fd

    def read(self, n: int) -> bytes:
        return os.read(self.host_fd, n)

    def write(self, data) -> int:
        return os.write(self.host_fd, data)


class BufferStream(Stream):
    """Reads come from `data`; writes are collected in `output` (and passed to `sink`)."""

    def __init__(self, data: bytes = b"", sink: Callable[[bytes], object] | None = None) -> None:
        self.data = memoryview(bytes(data))
        self.position = 0
        self.output = bytearray()
        self.sink = sink

    def read(self, n: int) -> bytes:
        chunk = bytes(self.data[self.position:self.position + n])
        self.position += len(chunk)
        return chunk

    def write(self, data) -> int:
        data = bytes(data)
        self.output += data
        if self.sink is not None:
            self.sink(data)
        return len(data)


@dataclass(eq=False)
class OpenFile:
    """What a guest fd refers to: a host fd (file or folder), or a std stream."""
    path: str
    flags: int
    host_fd: int | None = None
    stream: Stream | None = None
    directory: bool = False
    listing: list | None = None
    refs: int = 1
    cloexec: bool = False
    extra: dict = field(default_factory=dict)

    def close(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.host_fd is not None and self.stream is None:
            os.close(self.host_fd)
            self.host_fd = None


class Vfs:
    """The exposed roots, the working folder and the fd table of one program."""

    def __init__(self, roots: list[Root], cwd: str, note: Callable[[str], None]) -> None:
        self.roots = roots
        self.cwd = os.path.realpath(cwd)
        self.note = note
        self.fds: dict[int, OpenFile] = {}

    @staticmethod
    def parse_expose(spec: str) -> Root:
        """`PATH` (read-only) or `PATH:rw`."""
        path, writable = spec, False
        if spec.endswith(":rw"):
            path, writable = spec[:-3], True
        elif spec.endswith(":ro"):
            path = spec[:-3]
        if not os.path.exists(path):
            raise FileNotFoundError(f"--expose {spec}: {path} does not exist")
        return Root(os.path.realpath(path), writable)

    def close(self) -> None:
        for fd in list(self.fds):
            self.close_fd(fd)

    # -- paths ---------------------------------------------------------------------
    def resolve(self, path: str, base: str | None = None, *, write: bool = False,
                follow: bool = True) -> str:
        """The host path of guest `path`, checked against the roots (VfsError otherwise)."""
        if not path:
            raise VfsError(errno.ENOENT)
        joined = posixpath.normpath(posixpath.join(base or self.cwd, path))
        if follow:
            real = os.path.realpath(joined)
        else:
            real = posixpath.join(os.path.realpath(posixpath.dirname(joined)), posixpath.basename(joined))
        root = next((r for r in self.roots if r.holds(real)), None)
        if root is None:
            shown = joined if joined == real else f"{joined} (= {real})"
            self.note(f"{shown} is not exposed to the program: EACCES (expose it with --expose PATH)")
            raise VfsError(errno.EACCES)
        if write and not root.writable:
            self.note(f"{real} is exposed read-only: EROFS (expose it with --expose PATH:rw to write)")
            raise VfsError(errno.EROFS)
        return real

    def base_of(self, dirfd: int) -> str | None:
        """The folder a *at call's relative path starts from (AT_FDCWD: the working folder)."""
        if dirfd == -100 or dirfd == (1 << 32) - 100:
            return self.cwd
        entry = self.fds.get(dirfd)
        if entry is None:
            raise VfsError(errno.EBADF)
        if not entry.directory:
            raise VfsError(errno.ENOTDIR)
        return entry.path

    # -- fds -----------------------------------------------------------------------
    def install(self, entry: OpenFile, lowest: int = 0) -> int:
        fd = lowest
        while fd in self.fds:
            fd += 1
        self.fds[fd] = entry
        return fd

    def get(self, fd: int) -> OpenFile:
        entry = self.fds.get(fd)
        if entry is None:
            raise VfsError(errno.EBADF)
        return entry

    def close_fd(self, fd: int) -> None:
        entry = self.fds.pop(fd, None)
        if entry is None:
            raise VfsError(errno.EBADF)
        entry.close()

    def dup(self, fd: int, target: int | None = None, lowest: int = 0) -> int:
        entry = self.get(fd)
        if target is not None:
            if target == fd:
                return fd
            if target in self.fds:
                self.close_fd(target)
            self.fds[target] = entry
            entry.refs += 1
            return target
        entry.refs += 1
        return self.install(entry, lowest)

    def open(self, path: str, flags: int, mode: int, base: str | None) -> int:
        accmode = flags & 3
        write = accmode != os.O_RDONLY or bool(flags & (os.O_CREAT | os.O_TRUNC))
        real = self.resolve(path, base, write=write, follow=not flags & os.O_NOFOLLOW)
        host_flags = flags & ~(os.O_NOCTTY | 0o10000000) | os.O_CLOEXEC
        try:
            host_fd = os.open(real, host_flags, mode & 0o777)
        except OSError as exc:
            raise VfsError(exc.errno) from None
        directory = stat_module.S_ISDIR(os.fstat(host_fd).st_mode)
        entry = OpenFile(real, flags, host_fd, directory=directory, cloexec=bool(flags & os.O_CLOEXEC))
        return self.install(entry)
