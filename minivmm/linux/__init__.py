"""Linux personality: unmodified static x86-64 Linux programs at CPL 3 in minivmm's
built-in user-mode kernel, every system call a SYSCALL hook (`minivmm.syscalls`).

| module      | job                                                            |
|-------------|----------------------------------------------------------------|
| `elf`       | check and parse a static ELF executable (ET_EXEC, static PIE)  |
| `space`     | the address space: 4 KiB pages with rights, brk, mmap, a limit |
| `vfs`       | exposed host paths, the fd table, std streams                  |
| `kernel`    | the system calls                                               |
| `strace`    | strace-style lines                                             |
| `process`   | `LinuxProcess`: build, run, exit status                        |
| `fuzz`      | binary-only fuzzing of such programs                           |
"""
from __future__ import annotations

__all__ = ["LinuxImageError", "LinuxProcess", "LinuxResult", "Program", "read_program"]

from ..lazy import lazy_names

# Imported on first use: the command line builds its parser without loading the personality.
__getattr__ = lazy_names(__name__, {"LinuxImageError": ".elf", "Program": ".elf", "read_program": ".elf",
                                    "LinuxProcess": ".process", "LinuxResult": ".process"})
