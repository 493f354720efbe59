"""The Linux system calls a static x86-64 program makes, emulated over the address space
(`space`) and the virtual file system (`vfs`): the kernel of `minivmm.syscalls`.

Numbers and structure layouts are the x86-64 Linux ABI (arch/x86/entry/syscalls/
syscall_64.tbl; struct stat, statx, linux_dirent64, utsname, rlimit, timespec as
the uapi headers define them). A call the table does not have returns -ENOSYS and
is noted once per number; fork, clone and execve note that minivmm runs one
process. `exit`/`exit_group` and a fatal signal the program sends itself end the
run.
"""
from __future__ import annotations

import errno
import fcntl
import os
import random
import stat as stat_module
import struct
import time
from dataclasses import dataclass
from typing import Callable

from ..actions import RunEnd, Stop
from .entry import FLUSH_LIST, FLUSH_VECTOR, SLOT_SIZE, SLOTS, TABLE_OFFSET, WINDOW, pack_slot
from .space import HUGE_PAGE, PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, WINDOW_AREA, AddressSpace, page_up
from .vfs import OpenFile, Vfs, VfsError

__all__ = ["Clock", "LinuxKernel", "FATAL_SIGNAL_EXIT", "SYSCALL_NAMES"]

SYSCALL_NAMES = {
    0: "read", 1: "write", 2: "open", 3: "close", 4: "stat", 5: "fstat", 6: "lstat", 7: "poll",
    8: "lseek", 9: "mmap", 10: "mprotect", 11: "munmap", 12: "brk", 13: "rt_sigaction",
    14: "rt_sigprocmask", 15: "rt_sigreturn", 16: "ioctl", 17: "pread64", 18: "pwrite64", 19: "readv",
    20: "writev", 21: "access", 22: "pipe", 23: "select", 24: "sched_yield", 25: "mremap", 28: "madvise",
    32: "dup", 33: "dup2", 35: "nanosleep", 39: "getpid", 40: "sendfile", 56: "clone", 57: "fork",
    58: "vfork", 59: "execve", 60: "exit", 61: "wait4", 62: "kill", 63: "uname", 72: "fcntl",
    74: "fsync", 75: "fdatasync", 77: "ftruncate", 79: "getcwd", 80: "chdir", 83: "mkdir", 84: "rmdir",
    87: "unlink", 89: "readlink", 95: "umask", 96: "gettimeofday", 97: "getrlimit", 98: "getrusage",
    99: "sysinfo", 102: "getuid", 104: "getgid", 107: "geteuid", 108: "getegid", 110: "getppid",
    111: "getpgrp", 131: "sigaltstack", 157: "prctl", 158: "arch_prctl", 186: "gettid", 200: "tkill",
    201: "time", 202: "futex", 204: "sched_getaffinity", 217: "getdents64", 218: "set_tid_address",
    228: "clock_gettime", 229: "clock_getres", 230: "clock_nanosleep", 231: "exit_group", 234: "tgkill",
    257: "openat", 258: "mkdirat", 262: "newfstatat", 263: "unlinkat", 267: "readlinkat",
    269: "faccessat", 270: "pselect6", 271: "ppoll", 273: "set_robust_list", 292: "dup3", 293: "pipe2",
    302: "prlimit64", 318: "getrandom", 332: "statx", 334: "rseq", 435: "clone3", 439: "faccessat2",
}
_ONE_PROCESS = {56, 57, 58, 59, 61, 435, 22, 293}
FATAL_SIGNAL_EXIT = "fatal_signal"
_FATAL_SIGNALS = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 25, 26, 27, 29, 30, 31}
SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
                7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
                13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM"}
AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, AT_REMOVEDIR = 0x1000, 0x100, 0x200
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 1, 2, 0x10, 0x20, 0x100000
TCGETS, TIOCGWINSZ, FIONREAD = 0x5401, 0x5413, 0x541B
_STAT = struct.Struct("<QQQIIIIQqqqqqqqqq24x")
_IOVEC = struct.Struct("<QQ")
MASK64 = (1 << 64) - 1


def signed(value: int) -> int:
    return value - (1 << 64) if value & (1 << 63) else value


def signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & (1 << 31) else value


@dataclass
class Clock:
    """Real time, or (deterministic) a clock that starts at `start` and moves 1 us per read."""
    deterministic: bool = False
    start: float = 1_700_000_000.0
    reads: int = 0

    def now(self) -> float:
        if not self.deterministic:
            return time.time()
        self.reads += 1
        return self.start + self.reads * 1e-6

    def monotonic(self) -> float:
        if not self.deterministic:
            return time.monotonic()
        self.reads += 1
        return 1000.0 + self.reads * 1e-6


def pack_stat(st: os.stat_result) -> bytes:
    return _STAT.pack(st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, 0, st.st_rdev,
                      st.st_size, st.st_blksize, st.st_blocks,
                      int(st.st_atime), st.st_atime_ns % 10**9, int(st.st_mtime), st.st_mtime_ns % 10**9,
                      int(st.st_ctime), st.st_ctime_ns % 10**9)


def pack_statx(st: os.stat_result) -> bytes:
    def ts(seconds: float, ns: int) -> bytes:
        return struct.pack("<qIi", int(seconds), ns % 10**9, 0)
    head = struct.pack("<IIQIIIHHQQQQ", 0x7FF, st.st_blksize, 0, st.st_nlink, st.st_uid, st.st_gid,
                       st.st_mode, 0, st.st_ino, st.st_size, st.st_blocks, 0)
    times = ts(st.st_atime, st.st_atime_ns) + ts(st.st_ctime, st.st_ctime_ns) + \
        ts(st.st_ctime, st.st_ctime_ns) + ts(st.st_mtime, st.st_mtime_ns)
    devs = struct.pack("<IIII", os.major(st.st_rdev), os.minor(st.st_rdev), os.major(st.st_dev),
                       os.minor(st.st_dev))
    return (head + times + devs).ljust(256, b"\0")


class LinuxKernel:
    """System calls of one program. `note(text)` reports to the user (once per text)."""

    def __init__(self, space: AddressSpace, vfs: Vfs, *, program: str, argv0: str,
                 note: Callable[[str], None], seed: int = 0, clock: Clock | None = None) -> None:
        self.space = space
        self.vfs = vfs
        self.program = program
        self.argv0 = argv0
        self.note = note
        self.random = random.Random(seed)
        self.clock = clock or Clock()
        self.fs_base = 0
        self.vcpu = None
        self.exit_status: int | None = None
        self.fatal_signal: int | None = None
        self.fast_reads: Callable[[], bool] = lambda: False
        self.fast: dict[int, tuple[int, int, int]] = {}     # fd -> its slot's window: base, size, next fill
        self.handlers: dict[int, Callable] = {}
        for number, name in SYSCALL_NAMES.items():
            method = getattr(self, "sys_" + name, None)
            if method is not None:
                self.handlers[number] = method

    # -- the kernel callback of minivmm.syscalls ---------------------------------------
    def __call__(self, vcpu, event) -> int | Stop:
        self.vcpu = vcpu
        number = event.number
        handler = self.handlers.get(number)
        if handler is None:
            return self._unknown(number)
        if self.fast:
            self._leave_fast_path(number, event.args)
        try:
            return handler(*event.args)
        except VfsError as exc:
            return -exc.errno
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        finally:
            if self.space.taken:
                self._flush_taken_rights()

    def _flush_taken_rights(self) -> None:
        """Rights went down (munmap, mprotect): the guest's flush routine rewrites those PTEs
        right after this call returns (`minivmm.linux.entry.flush_code`)."""
        listing = self.space.flush_list()
        if listing is not None:
            self.space.write(FLUSH_LIST, listing)
            self.vcpu.inject_exception(FLUSH_VECTOR)

    def _unknown(self, number: int) -> int:
        name = SYSCALL_NAMES.get(number, f"#{number}")
        if number in _ONE_PROCESS:
            self.note(f"{self.argv0} called {name}: minivmm runs one process (no fork, clone, execve, "
                      f"wait or pipe); it returned -ENOSYS")
        else:
            self.note(f"{self.argv0} made system call {number} ({name}), which minivmm does not emulate: "
                      "it returned -ENOSYS")
        return -errno.ENOSYS

    # -- reads served by the entry (minivmm.linux.entry) -------------------------------------
    _FD_CALLS = {19: (0,), 8: (0,), 3: (0,), 32: (0,), 33: (0, 1), 292: (0, 1), 72: (0,), 40: (1,),
                 17: (), 217: (0,)}
    FAST_FILE_LIMIT = 256 << 20

    def _slot_address(self, fd: int) -> int:
        return self.space.entry + TABLE_OFFSET + fd * SLOT_SIZE

    def _give_slot(self, fd: int) -> None:
        """A regular file opened read-only gets a slot: its bytes in guest pages, read by the entry."""
        if fd >= SLOTS or not self.fast_reads():
            return
        entry = self.vfs.fds[fd]
        if entry.directory or entry.flags & 3 != os.O_RDONLY:
            return
        st = os.fstat(entry.host_fd)
        if not stat_module.S_ISREG(st.st_mode) or not 0 < st.st_size <= self.FAST_FILE_LIMIT:
            return
        fill = page_up(min(st.st_size, WINDOW))
        area = self.space.windows
        if all(base != area for base, _, _ in self.fast.values()):
            self.fast[fd] = (area, WINDOW_AREA, fill)
        else:
            base = self.space.find_free(HUGE_PAGE, HUGE_PAGE)    # a free block: a huge page can back it
            if base is None or self.space.map(base, fill, PROT_READ) < 0:
                return
            self.space.prefer_huge_pages(base, fill)
            self.fast[fd] = (base, fill, fill)
        self._refill(fd, 0)

    def _refill(self, fd: int, position: int) -> None:
        """The slot's window holds the file's bytes from `position` on; each refill of the window
        area reads twice as much as the one before, up to the area's size."""
        base, size, fill = self.fast[fd]
        entry = self.vfs.fds[fd]
        done = 0
        with memoryview(self.space.mem)[base:base + fill] as view:
            while done < fill:
                n = os.preadv(entry.host_fd, [view[done:]], position + done)
                if n <= 0:
                    break
                done += n
        self.fast[fd] = (base, size, min(2 * fill, size))
        self.space.touched(base, done)
        file_size = os.fstat(entry.host_fd).st_size
        self.space.write(self._slot_address(fd), pack_slot(base, file_size, position, position, done))

    def _slot_read(self, fd: int, buf: int, count: int) -> int:
        """A read the entry left to the host (its bytes are not all in the window): served from
        the file, then the window moves to the new position."""
        raw = self.space.read(self._slot_address(fd), 24)
        _window, size, position = struct.unpack("<QQQ", raw)
        entry = self.vfs.fds[fd]
        with self._buffer(buf, min(count, max(size - position, 0)), True) as view:
            n = os.preadv(entry.host_fd, [view], position) if len(view) else 0
        self._refill(fd, position + n)
        return n

    def _leave_fast_path(self, number: int, args) -> None:
        """Before a call the host carries out on an fd with a slot: the host fd takes over at
        the position the entry reached, and the slot is freed."""
        for index in self._FD_CALLS.get(number, ()):
            fd = args[index] & 0xFFFFFFFF
            if fd in self.fast:
                self.release_slot(fd)

    def release_slot(self, fd: int) -> None:
        base, size, _ = self.fast.pop(fd)
        raw = self.space.read(self._slot_address(fd), 24)
        _base, length, position = struct.unpack("<QQQ", raw)
        self.space.write(self._slot_address(fd), pack_slot(0, 0, 0))
        entry = self.vfs.fds.get(fd)
        if entry is not None and entry.host_fd is not None:
            os.lseek(entry.host_fd, min(position, length), os.SEEK_SET)
        if base != self.space.windows:
            self.space.unmap(base, size)
            self._changed()

    # -- guest memory ------------------------------------------------------------------
    def _buffer(self, address: int, length: int, write: bool) -> memoryview:
        if not self.space.accessible(address, length, write):
            raise VfsError(errno.EFAULT)
        if write:
            self.space.touched(address, length)
        return memoryview(self.space.mem)[address:address + length]

    def _read(self, address: int, length: int) -> bytes:
        if not self.space.accessible(address, length):
            raise VfsError(errno.EFAULT)
        return self.space.mem[address:address + length]

    def _write(self, address: int, data: bytes) -> None:
        if not self.space.accessible(address, len(data), True):
            raise VfsError(errno.EFAULT)
        self.space.write(address, data)

    def string(self, address: int, limit: int = 4096) -> str:
        """The C string at `address` in guest memory (VfsError EFAULT or ENAMETOOLONG)."""
        mem = self.space.mem
        out = b""
        while len(out) < limit:
            if not self.space.accessible(address, 1):
                raise VfsError(errno.EFAULT)
            chunk_end = min((address | (PAGE - 1)) + 1, address + limit - len(out))
            chunk = mem[address:chunk_end]
            nul = chunk.find(b"\0")
            if nul >= 0:
                return (out + chunk[:nul]).decode("utf-8", "surrogateescape")
            out += chunk
            address = chunk_end
        raise VfsError(errno.ENAMETOOLONG)

    def _path(self, address: int) -> str:
        return self.string(address)

    # -- files -------------------------------------------------------------------------
    def _read_into(self, entry: OpenFile, view: memoryview, offset: int | None = None) -> int:
        if entry.directory:
            return -errno.EISDIR
        if entry.stream is not None:
            data = entry.stream.read(len(view))
            view[:len(data)] = data
            return len(data)
        if offset is None:
            return os.readv(entry.host_fd, [view])
        return os.preadv(entry.host_fd, [view], offset)

    def _write_from(self, entry: OpenFile, data, offset: int | None = None) -> int:
        if entry.stream is not None:
            return entry.stream.write(data)
        if entry.flags & 3 == os.O_RDONLY:
            return -errno.EBADF
        if offset is None:
            return os.write(entry.host_fd, data)
        return os.pwrite(entry.host_fd, data, offset)

    def sys_read(self, fd, buf, count, *_):
        if fd in self.fast:
            return self._slot_read(fd, buf, count)
        entry = self.vfs.get(fd)
        with self._buffer(buf, count, True) as view:
            return self._read_into(entry, view)

    def sys_pread64(self, fd, buf, count, offset, *_):
        entry = self.vfs.get(fd)
        if entry.stream is not None:
            return -errno.ESPIPE
        with self._buffer(buf, count, True) as view:
            return self._read_into(entry, view, offset)

    def sys_write(self, fd, buf, count, *_):
        entry = self.vfs.get(fd)
        with self._buffer(buf, count, False) as view:
            return self._write_from(entry, view)

    def sys_pwrite64(self, fd, buf, count, offset, *_):
        entry = self.vfs.get(fd)
        with self._buffer(buf, count, False) as view:
            return self._write_from(entry, view, offset)

    def _iovecs(self, iov, count) -> list[tuple[int, int]]:
        if count > 1024:
            return []
        raw = self._read(iov, count * 16)
        return [_IOVEC.unpack_from(raw, i * 16) for i in range(count)]

    def sys_readv(self, fd, iov, count, *_):
        entry = self.vfs.get(fd)
        total = 0
        for base, length in self._iovecs(iov, count):
            with self._buffer(base, length, True) as view:
                n = self._read_into(entry, view)
            if n < 0:
                return n if total == 0 else total
            total += n
            if n < length:
                break
        return total

    def sys_writev(self, fd, iov, count, *_):
        entry = self.vfs.get(fd)
        data = b"".join(self._read(base, length) for base, length in self._iovecs(iov, count))
        return self._write_from(entry, data) if data else 0

    def sys_sendfile(self, out_fd, in_fd, offset_ptr, count, *_):
        source, target = self.vfs.get(in_fd), self.vfs.get(out_fd)
        count = min(count, 1 << 20)
        if offset_ptr:
            offset = struct.unpack("<q", self._read(offset_ptr, 8))[0]
            data = os.pread(source.host_fd, count, offset) if source.stream is None else b""
            self._write(offset_ptr, struct.pack("<q", offset + len(data)))
        else:
            data = source.stream.read(count) if source.stream is not None else os.read(source.host_fd, count)
        return self._write_from(target, data) if data else 0

    def sys_open(self, path, flags, mode, *_):
        return self.sys_openat(-100, path, flags, mode)

    def sys_openat(self, dirfd, path, flags, mode, *_):
        name = self._path(path)
        fd = self.vfs.open(name, flags & 0xFFFFFFFF, mode, self.vfs.base_of(signed32(dirfd)))
        self._give_slot(fd)
        return fd

    def sys_close(self, fd, *_):
        self.vfs.close_fd(fd)
        return 0

    def sys_lseek(self, fd, offset, whence, *_):
        entry = self.vfs.get(fd)
        if entry.stream is not None and entry.stream.host_fd is None:
            return -errno.ESPIPE
        if entry.directory:
            if signed(offset) == 0 and whence == 0:
                entry.listing = None
                return 0
            return -errno.EINVAL
        return os.lseek(entry.host_fd if entry.stream is None else entry.stream.host_fd, signed(offset), whence)

    def _fstat_entry(self, entry: OpenFile) -> os.stat_result | None:
        host_fd = entry.host_fd if entry.stream is None else entry.stream.host_fd
        if host_fd is None:
            return None
        return os.fstat(host_fd)

    def _pipe_stat(self) -> bytes:
        return _STAT.pack(12, 1, 1, stat_module.S_IFIFO | 0o600, 0, 0, 0, 0, 0, 4096, 0, 0, 0, 0, 0, 0, 0)

    def _stat_path(self, dirfd, path, flags) -> os.stat_result | bytes:
        if flags & AT_EMPTY_PATH and path:
            name = self._path(path)
            if not name:
                entry = self.vfs.cwd_entry() if signed32(dirfd) == -100 else self.vfs.get(signed32(dirfd))
                st = self._fstat_entry(entry)
                return st if st is not None else self._pipe_stat()
        name = self._path(path)
        real = self.vfs.resolve(name, self.vfs.base_of(signed32(dirfd)),
                                follow=not flags & AT_SYMLINK_NOFOLLOW)
        return os.stat(real, follow_symlinks=not flags & AT_SYMLINK_NOFOLLOW)

    def sys_fstat(self, fd, buf, *_):
        st = self._fstat_entry(self.vfs.get(fd))
        self._write(buf, pack_stat(st) if st is not None else self._pipe_stat())
        return 0

    def sys_stat(self, path, buf, *_):
        return self.sys_newfstatat(-100, path, buf, 0)

    def sys_lstat(self, path, buf, *_):
        return self.sys_newfstatat(-100, path, buf, AT_SYMLINK_NOFOLLOW)

    def sys_newfstatat(self, dirfd, path, buf, flags, *_):
        st = self._stat_path(dirfd, path, flags)
        self._write(buf, st if isinstance(st, bytes) else pack_stat(st))
        return 0

    def sys_statx(self, dirfd, path, flags, mask, buf, *_):
        st = self._stat_path(dirfd, path, flags)
        if isinstance(st, bytes):
            st = os.stat_result((stat_module.S_IFIFO | 0o600, 1, 12, 1, 0, 0, 0, 0, 0, 0))
        self._write(buf, pack_statx(st))
        return 0

    def sys_access(self, path, mode, *_):
        return self.sys_faccessat(-100, path, mode, 0)

    def sys_faccessat2(self, dirfd, path, mode, flags, *_):
        return self.sys_faccessat(dirfd, path, mode, flags)

    def sys_faccessat(self, dirfd, path, mode, *rest):
        real = self.vfs.resolve(self._path(path), self.vfs.base_of(signed32(dirfd)), write=bool(mode & 2))
        return 0 if os.access(real, mode) else -errno.EACCES

    def sys_getdents64(self, fd, buf, count, *_):
        entry = self.vfs.get(fd)
        if not entry.directory:
            return -errno.ENOTDIR
        if entry.listing is None:
            entries = [(".", entry.path), ("..", os.path.dirname(entry.path))]
            entry.listing = [(name, os.lstat(p).st_ino, stat_module.S_IFMT(os.lstat(p).st_mode))
                             for name, p in entries]
            for item in os.scandir(entry.path):
                st = item.stat(follow_symlinks=False)
                entry.listing.append((item.name, st.st_ino, stat_module.S_IFMT(st.st_mode)))
            entry.extra["position"] = 0
        out = bytearray()
        position = entry.extra["position"]
        while position < len(entry.listing):
            name, ino, fmt = entry.listing[position]
            raw = name.encode("utf-8", "surrogateescape") + b"\0"
            reclen = (19 + len(raw) + 7) & ~7
            if len(out) + reclen > count:
                if not out:
                    return -errno.EINVAL
                break
            d_type = fmt >> 12
            out += struct.pack("<QqHB", ino, position + 1, reclen, d_type) + raw.ljust(reclen - 19, b"\0")
            position += 1
        entry.extra["position"] = position
        self._write(buf, bytes(out))
        return len(out)

    def sys_readlink(self, path, buf, size, *_):
        return self.sys_readlinkat(-100, path, buf, size)

    def sys_readlinkat(self, dirfd, path, buf, size, *_):
        name = self._path(path)
        if name == "/proc/self/exe":
            target = os.path.realpath(self.program)
        else:
            target = os.readlink(self.vfs.resolve(name, self.vfs.base_of(signed32(dirfd)), follow=False))
        data = target.encode()[:size]
        self._write(buf, data)
        return len(data)

    def sys_getcwd(self, buf, size, *_):
        data = self.vfs.cwd.encode() + b"\0"
        if len(data) > size:
            return -errno.ERANGE
        self._write(buf, data)
        return len(data)

    def sys_chdir(self, path, *_):
        real = self.vfs.resolve(self._path(path))
        if not os.path.isdir(real):
            return -errno.ENOTDIR
        self.vfs.cwd = real
        return 0

    def sys_mkdir(self, path, mode, *_):
        return self.sys_mkdirat(-100, path, mode)

    def sys_mkdirat(self, dirfd, path, mode, *_):
        os.mkdir(self.vfs.resolve(self._path(path), self.vfs.base_of(signed32(dirfd)), write=True), mode & 0o777)
        return 0

    def sys_unlink(self, path, *_):
        return self.sys_unlinkat(-100, path, 0)

    def sys_rmdir(self, path, *_):
        return self.sys_unlinkat(-100, path, AT_REMOVEDIR)

    def sys_unlinkat(self, dirfd, path, flags, *_):
        real = self.vfs.resolve(self._path(path), self.vfs.base_of(signed32(dirfd)), write=True, follow=False)
        (os.rmdir if flags & AT_REMOVEDIR else os.unlink)(real)
        return 0

    def sys_ftruncate(self, fd, length, *_):
        entry = self.vfs.get(fd)
        if entry.stream is not None or entry.flags & 3 == os.O_RDONLY:
            return -errno.EINVAL
        os.ftruncate(entry.host_fd, length)
        return 0

    def sys_fsync(self, fd, *_):
        self.vfs.get(fd)
        return 0

    sys_fdatasync = sys_fsync

    def sys_dup(self, fd, *_):
        return self.vfs.dup(fd)

    def sys_dup2(self, fd, target, *_):
        return self.vfs.dup(fd, target)

    def sys_dup3(self, fd, target, flags, *_):
        if fd == target:
            return -errno.EINVAL
        return self.vfs.dup(fd, target)

    def sys_fcntl(self, fd, cmd, arg, *_):
        entry = self.vfs.get(fd)
        if cmd in (0, 1030):                       # F_DUPFD, F_DUPFD_CLOEXEC
            return self.vfs.dup(fd, lowest=arg)
        if cmd == 1:                               # F_GETFD
            return 1 if entry.cloexec else 0
        if cmd == 2:
            entry.cloexec = bool(arg & 1)
            return 0
        if cmd == 3:                               # F_GETFL
            return entry.flags
        if cmd == 4:
            return 0
        return -errno.EINVAL

    def sys_ioctl(self, fd, request, arg, *_):
        entry = self.vfs.get(fd)
        request &= 0xFFFFFFFF
        host_fd = entry.stream.host_fd if entry.stream is not None else None
        if request in (TCGETS, TIOCGWINSZ):
            if host_fd is None or not os.isatty(host_fd):
                return -errno.ENOTTY
            size = 60 if request == TCGETS else 8
            self._write(arg, fcntl.ioctl(host_fd, request, bytes(size)))
            return 0
        if request == FIONREAD and entry.stream is not None and host_fd is None:
            self._write(arg, struct.pack("<i", len(entry.stream.data) - entry.stream.position))
            return 0
        return -errno.ENOTTY

    def sys_poll(self, fds, nfds, timeout, *_):
        ready = 0
        for i in range(min(nfds, 1024)):
            fd, events, _revents = struct.unpack("<ihh", self._read(fds + i * 8, 8))
            revents = events & 0x5 if fd in self.vfs.fds else 0x20     # POLLIN|POLLOUT, POLLNVAL
            self._write(fds + i * 8 + 6, struct.pack("<h", revents))
            ready += bool(revents)
        return ready

    def sys_ppoll(self, fds, nfds, *_):
        return self.sys_poll(fds, nfds, 0)

    # -- memory ------------------------------------------------------------------------
    def _out_of_memory(self, what: str, length: int) -> int:
        self.note(f"{self.argv0}: {what} of {length} bytes failed: the memory limit "
                  f"({self.space.limit_pages * PAGE >> 20} MiB) is reached (raise it with --memory)")
        return -errno.ENOMEM

    def sys_brk(self, address, *_):
        space = self.space
        if address < space.brk_start:
            return space.brk
        old_top, new_top = page_up(space.brk), page_up(address)
        if new_top > old_top:
            if not space.is_free(old_top, new_top - old_top) or new_top > space.mmap_top:
                return space.brk
            if space.map(old_top, new_top - old_top, PROT_READ | PROT_WRITE) < 0:
                self._out_of_memory("brk", new_top - old_top)
                return space.brk
            self._changed()
        elif new_top < old_top:
            space.unmap(new_top, old_top - new_top)
            self._changed()
        space.brk = address
        return address

    def _changed(self) -> None:
        self.space.reload(self.vcpu)

    def sys_mmap(self, address, length, prot, flags, fd, offset):
        space = self.space
        if not length or length >= 1 << 40 or address & (PAGE - 1) or offset & (PAGE - 1):
            return -errno.EINVAL
        size = page_up(length)
        fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)
        if fixed:
            if address < 0x10000 or address + size > space.top:
                return -errno.ENOMEM
            if flags & MAP_FIXED_NOREPLACE and not space.is_free(address, size):
                return -errno.EEXIST
            space.unmap(address, size)
        else:
            if address and space.is_free(page_up(address), size):
                address = page_up(address)
            else:
                found = space.find_free(size)
                if found is None:
                    return self._out_of_memory("mmap", length)
                address = found
        data = b""
        if not flags & MAP_ANONYMOUS:
            entry = self.vfs.get(signed32(fd))
            if entry.stream is not None or entry.directory:
                return -errno.ENODEV
            if flags & MAP_SHARED and prot & PROT_WRITE:
                self.note(f"{self.argv0}: a shared writable file mapping is private in minivmm "
                          "(writes do not reach the file)")
            data = os.pread(entry.host_fd, length, offset)
        if space.map(address, size, prot & 7) < 0:
            return self._out_of_memory("mmap", length)
        if data:
            space.write(address, data)
        self._changed()
        return address

    def sys_munmap(self, address, length, *_):
        if address & (PAGE - 1) or not length:
            return -errno.EINVAL
        self.space.unmap(address, min(page_up(length), max(self.space.top - address, 0)))
        self._changed()
        return 0

    def sys_mprotect(self, address, length, prot, *_):
        if address & (PAGE - 1):
            return -errno.EINVAL
        result = self.space.protect(address, page_up(length), prot & 7)
        self._changed()
        return result

    def sys_mremap(self, old, old_size, new_size, flags, new_address, *_):
        space = self.space
        old_size, new_size = page_up(old_size), page_up(new_size)
        if old & (PAGE - 1) or not new_size:
            return -errno.EINVAL
        if new_size <= old_size:
            if new_size < old_size:
                space.unmap(old + new_size, old_size - new_size)
                self._changed()
            return old
        if space.is_free(old + old_size, new_size - old_size):
            if space.map(old + old_size, new_size - old_size, space.rights[old // PAGE] & 7) < 0:
                return self._out_of_memory("mremap", new_size)
            self._changed()
            return old
        if not flags & 1:                      # MREMAP_MAYMOVE
            return -errno.ENOMEM
        target = space.find_free(new_size)
        if target is None or space.map(target, new_size, space.rights[old // PAGE] & 7) < 0:
            return self._out_of_memory("mremap", new_size)
        space.write(target, space.read(old, old_size))
        space.unmap(old, old_size)
        self._changed()
        return target

    def sys_madvise(self, address, length, advice, *_):
        if advice == 4 and address % PAGE == 0:           # MADV_DONTNEED: zero-fill again
            first = address // PAGE
            count = page_up(length) // PAGE
            if all(r & PROT_WRITE for r in self.space.rights[first:first + count]):
                self.space.mem.madvise(4, address, count * PAGE)
                self.space.touched(address, count * PAGE)
        return 0

    # -- process -----------------------------------------------------------------------
    def sys_exit(self, status, *_):
        self.exit_status = status & 0xFF
        return Stop(RunEnd.EXIT, exit_code=self.exit_status, message="exit")

    sys_exit_group = sys_exit

    def _signal_self(self, pid, sig) -> int | Stop:
        if sig == 0:
            return 0
        if sig not in _FATAL_SIGNALS:
            return 0
        self.fatal_signal = sig
        return Stop(RunEnd.ERROR, exit_code=128 + sig,
                    message=f"{FATAL_SIGNAL_EXIT}: {self.argv0} sent itself {SIGNAL_NAMES.get(sig, sig)}")

    def sys_kill(self, pid, sig, *_):
        if signed32(pid) not in (1000, 0, -1):
            return -errno.ESRCH
        return self._signal_self(pid, sig)

    def sys_tgkill(self, tgid, tid, sig, *_):
        return self._signal_self(tid, sig)

    def sys_tkill(self, tid, sig, *_):
        return self._signal_self(tid, sig)

    def sys_getpid(self, *_):
        return 1000

    sys_gettid = sys_getpid
    sys_getpgrp = sys_getpid

    def sys_getppid(self, *_):
        return 999

    def sys_getuid(self, *_):
        return os.getuid()

    def sys_geteuid(self, *_):
        return os.geteuid()

    def sys_getgid(self, *_):
        return os.getgid()

    def sys_getegid(self, *_):
        return os.getegid()

    def sys_umask(self, mask, *_):
        return 0o022

    def sys_set_tid_address(self, *_):
        return 1000

    def sys_set_robust_list(self, *_):
        return 0

    def sys_rseq(self, *_):
        return -errno.ENOSYS

    def sys_prctl(self, option, arg2, *_):
        if option == 16:                                        # PR_GET_NAME
            self._write(arg2, os.path.basename(self.argv0).encode()[:15].ljust(16, b"\0"))
            return 0
        if option == 15:                                        # PR_SET_NAME
            return 0
        return -errno.EINVAL

    def sys_arch_prctl(self, code, address, *_):
        if code == 0x1002:                                      # ARCH_SET_FS
            self.fs_base = address
            sregs = self.vcpu.sregs
            sregs.fs.base = address
            self.vcpu.set_sregs(sregs)
            return 0
        if code == 0x1003:                                      # ARCH_GET_FS
            self._write(address, struct.pack("<Q", self.fs_base))
            return 0
        if code == 0x1001:                                      # ARCH_SET_GS
            sregs = self.vcpu.sregs
            sregs.gs.base = address
            self.vcpu.set_sregs(sregs)
            return 0
        return -errno.EINVAL

    def sys_uname(self, buf, *_):
        fields = (b"Linux", b"minivmm", b"6.1.0-minivmm", b"#1 SMP minivmm", b"x86_64", b"(none)")
        self._write(buf, b"".join(f.ljust(65, b"\0") for f in fields))
        return 0

    def _rlimit(self, resource: int) -> tuple[int, int]:
        if resource == 3:                                       # RLIMIT_STACK
            return 8 << 20, MASK64
        if resource == 7:                                       # RLIMIT_NOFILE
            return 1024, 4096
        if resource == 9:                                       # RLIMIT_AS
            return self.space.limit_pages * PAGE, self.space.limit_pages * PAGE
        return MASK64, MASK64

    def sys_getrlimit(self, resource, buf, *_):
        self._write(buf, struct.pack("<QQ", *self._rlimit(resource)))
        return 0

    def sys_prlimit64(self, pid, resource, new, old, *_):
        if old:
            self._write(old, struct.pack("<QQ", *self._rlimit(resource)))
        return 0

    def sys_getrusage(self, who, buf, *_):
        self._write(buf, bytes(144))
        return 0

    def sys_sysinfo(self, buf, *_):
        total = self.space.limit_pages * PAGE
        free = total - self.space.used_pages * PAGE
        self._write(buf, struct.pack("<qQQQQQQQHHQQI", 1, 0, 0, 0, total, free, 0, 0, 1, 0, 0, 0, 1).ljust(112, b"\0"))
        return 0

    def sys_sched_getaffinity(self, pid, size, mask, *_):
        if size < 8:
            return -errno.EINVAL
        self._write(mask, b"\x01" + bytes(7))
        return 8

    def sys_sched_yield(self, *_):
        return 0

    def sys_futex(self, address, op, value, *_):
        command = op & 0x7F
        if command in (1, 10):                                  # FUTEX_WAKE, WAKE_BITSET
            return 0
        if command in (0, 9):                                   # WAIT: nobody else can wake it
            current = struct.unpack("<I", self._read(address, 4))[0]
            return -errno.EAGAIN if current != value & 0xFFFFFFFF else -errno.ETIMEDOUT
        return -errno.ENOSYS

    def sys_rt_sigaction(self, sig, act, oldact, size, *_):
        if oldact:
            self._write(oldact, bytes(32))
        return 0

    def sys_rt_sigprocmask(self, how, new, old, size, *_):
        if old:
            self._write(old, bytes(min(size, 128)))
        return 0

    def sys_sigaltstack(self, new, old, *_):
        if old:
            self._write(old, struct.pack("<QiiQ", 0, 2, 0, 0))        # SS_DISABLE
        return 0

    # -- time and randomness -----------------------------------------------------------
    def sys_clock_gettime(self, clock_id, buf, *_):
        now = self.clock.now() if clock_id in (0, 5, 8, 11) else self.clock.monotonic()
        self._write(buf, struct.pack("<qq", int(now), int(now % 1 * 1e9)))
        return 0

    def sys_clock_getres(self, clock_id, buf, *_):
        if buf:
            self._write(buf, struct.pack("<qq", 0, 1))
        return 0

    def sys_gettimeofday(self, tv, tz, *_):
        now = self.clock.now()
        if tv:
            self._write(tv, struct.pack("<qq", int(now), int(now % 1 * 1e6)))
        if tz:
            self._write(tz, bytes(8))
        return 0

    def sys_time(self, tloc, *_):
        now = int(self.clock.now())
        if tloc:
            self._write(tloc, struct.pack("<q", now))
        return now

    def sys_nanosleep(self, req, rem, *_):
        seconds, nanos = struct.unpack("<qq", self._read(req, 16))
        if not self.clock.deterministic:
            time.sleep(min(seconds + nanos / 1e9, 10.0))
        return 0

    def sys_clock_nanosleep(self, clock_id, flags, req, rem, *_):
        if flags & 1:                                           # TIMER_ABSTIME
            return 0
        return self.sys_nanosleep(req, rem)

    def sys_getrandom(self, buf, length, flags, *_):
        length = min(length, 1 << 20)
        self._write(buf, self.random.randbytes(length))
        return length

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self) -> tuple:
        """The host-side state a run changes: the address space's bookkeeping, the fd table
        (with host file positions), streams, clock, randomness and fs base."""
        fds = {}
        for fd, entry in self.vfs.fds.items():
            position = None
            if entry.stream is None and entry.host_fd is not None and not entry.directory:
                position = os.lseek(entry.host_fd, 0, os.SEEK_CUR)
            stream = entry.stream
            fds[fd] = (entry, entry.refs, position, getattr(stream, "position", None),
                       len(getattr(stream, "output", b"")))
        return (self.space.checkpoint(), fds, self.vfs.cwd, dict(self.fast), self.clock.reads,
                self.random.getstate(), self.fs_base)

    def rewind(self, state: tuple) -> None:
        space, fds, self.vfs.cwd, fast, self.clock.reads, random_state, self.fs_base = state
        self.space.rewind(space)
        kept = {id(entry) for entry, *_ in fds.values()}
        for entry in set(self.vfs.fds.values()):
            if id(entry) not in kept:
                entry.refs = 1
                entry.close()
        self.vfs.fds = {}
        for fd, (entry, refs, position, stream_position, output_length) in fds.items():
            self.vfs.fds[fd] = entry
            entry.refs = refs
            if position is not None:
                os.lseek(entry.host_fd, position, os.SEEK_SET)
            if stream_position is not None:
                entry.stream.position = stream_position
            if output_length is not None and hasattr(entry.stream, "output"):
                del entry.stream.output[output_length:]
        self.fast = dict(fast)
        self.random.setstate(random_state)
        self.exit_status = self.fatal_signal = None

    def random_bytes(self, n: int) -> bytes:
        return self.random.randbytes(n)
