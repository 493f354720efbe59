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
from .elf import LinuxImageError, Program, read_program
from .process import LinuxProcess, LinuxResult

__all__ = ["LinuxImageError", "LinuxProcess", "LinuxResult", "Program", "read_program"]
