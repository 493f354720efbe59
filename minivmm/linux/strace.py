"""strace-style lines for the system calls of a Linux program: `name(args) = result`.

Arguments are decoded by kind: paths and buffers as C strings (buffers the call
fills are shown after it returns, as strace does), fds and sizes in decimal, flags
and addresses in hex; an error result reads `-1 ENOENT (No such file or directory)`.
"""
from __future__ import annotations

import errno
import os

from ..syscalls import SyscallEvent
from .kernel import SYSCALL_NAMES, signed

__all__ = ["format_call", "SIGNATURES"]

# d: signed int, u: unsigned, x: hex, s: path string, b: buffer with the length in the
# next argument, o: buffer the call fills (length: the result), f: fd (signed 32-bit), m: mode
SIGNATURES = {
    "read": "fod", "write": "fbd", "pread64": "fodd", "pwrite64": "fbdd", "open": "sxm", "openat": "fsxm",
    "close": "f", "fstat": "fx", "stat": "sx", "lstat": "sx", "newfstatat": "fsxx", "statx": "fsxxx",
    "lseek": "fdd", "mmap": "xuxxfx", "mprotect": "xux", "munmap": "xu", "brk": "x",
    "ioctl": "fxx", "readv": "fxd", "writev": "fxd", "access": "sm", "faccessat": "fsm",
    "faccessat2": "fsmx", "getdents64": "fxd", "readlink": "sxd", "readlinkat": "fsxd",
    "exit": "d", "exit_group": "d", "arch_prctl": "xx", "set_tid_address": "x", "set_robust_list": "xd",
    "rseq": "xdxx", "uname": "x", "getrandom": "xdx", "clock_gettime": "dx", "prlimit64": "ddxx",
    "rt_sigaction": "dxxd", "rt_sigprocmask": "dxxd", "sendfile": "ffxd", "fcntl": "fdx",
    "dup": "f", "dup2": "ff", "dup3": "ffx", "chdir": "s", "getcwd": "xd", "unlink": "s", "mkdir": "sm",
    "unlinkat": "fsx", "mkdirat": "fsm", "prctl": "dxxxx", "poll": "xdd", "madvise": "xud",
    "mremap": "xuuxx", "futex": "xdd", "kill": "dd", "tgkill": "ddd", "sched_getaffinity": "ddx",
}


def _quote(data: bytes, limit: int = 32) -> str:
    out = []
    for byte in data[:limit]:
        char = chr(byte)
        if char == '"' or char == "\\":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:o}")
    return '"' + "".join(out) + '"' + ("..." if len(data) > limit else "")


def _result(value: int) -> str:
    if -4096 < value < 0:
        code = -value
        return f"-1 {errno.errorcode.get(code, code)} ({os.strerror(code)})"
    if value > 0xFFFF:
        return hex(value)
    return str(value)


def format_call(event: SyscallEvent, read_memory, read_string) -> str:
    """The strace line of `event` (after the call). `read_memory(address, n)` and
    `read_string(address)` read the guest (None where unreadable)."""
    name = SYSCALL_NAMES.get(event.number, f"syscall_{event.number}")
    kinds = SIGNATURES.get(name, "xxx")
    result = event.result if event.result is not None else 0
    args = []
    for i, kind in enumerate(kinds):
        value = event.args[i]
        if kind == "d":
            args.append(str(signed(value)))
        elif kind == "u":
            args.append(str(value))
        elif kind == "f":
            fd = value & 0xFFFFFFFF
            args.append("AT_FDCWD" if fd == 0xFFFFFF9C else str(fd - (1 << 32) if fd & 1 << 31 else fd))
        elif kind == "s":
            text = read_string(value)
            args.append("NULL" if not value else _quote(text.encode(errors="replace"), 256) if text is not None
                        else hex(value))
        elif kind in "bo":
            length = event.args[i + 1] if kind == "b" else max(result, 0)
            data = read_memory(value, min(length, 33)) if length else b""
            args.append(_quote(data) if data is not None else hex(value))
        elif kind == "m":
            args.append(f"{value:#o}")
        else:
            args.append(hex(value) if value else "0" if kind != "x" or name != "brk" else "NULL")
    return f"{name}({', '.join(args)}) = {'?' if event.result is None else _result(result)}"
