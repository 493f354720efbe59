"""KVM_RUN and the decoding of its exit in C: the exit loop's measured hot path.

On the project's hosts a Python loop around `fcntl.ioctl(KVM_RUN)` spends
about 3 us of interpreter time per exit against 10-12 us in the kernel; the
same loop calling this C function through cffi spends about 1.7 us. The
function enters the guest once and returns one integer:

- a negative errno when KVM_RUN failed (-EINTR for a signal or immediate_exit),
- the KVM exit reason (0..255) for every exit but KVM_EXIT_IO,
- for KVM_EXIT_IO, `IO_TAG | (count > 1) << 52 | size << 49 | port << 33 |
  is_out << 32 | data`, where data is the first item an OUT wrote (32 bits).
  The upper half (`packed >> 32`) names the access completely, so the exit
  loop finds its route with one shift and one dict lookup.

`restore_dirty` does a snapshot restore's memory part the same way: read a
memslot's dirty log, copy each dirty page back from the snapshot copy, and
re-protect the span that held them (manual dirty-log protect).

Both are compiled with cffi on first use into minivmm's cache directory (gcc and
the Python headers are needed, as for any cffi module); where that is not
possible, `run_packed` is a Python function with the same contract.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import importlib.util
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable

from .asm import cache_dir
from .kvm import ExitKind, Ioctl, KvmRun

IO_TAG = 1 << 56
_EXIT_IO = int(ExitKind.IO)

_CDEF = """
long long minivmm_run_packed(int fd, void *run);
long long minivmm_restore_dirty(int vm_fd, unsigned int slot, unsigned long long bitmap,
                                unsigned long long npages, unsigned long long guest,
                                unsigned long long copy, int clear);
"""
_SOURCE = r"""
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

long long minivmm_run_packed(int fd, void *p)
{
	struct kvm_run *run = p;
	unsigned int data = 0;

	if (ioctl(fd, KVM_RUN, 0) < 0)
		return -errno;
	if (run->exit_reason != KVM_EXIT_IO)
		return run->exit_reason;
	if (run->io.direction == KVM_EXIT_IO_OUT && run->io.size <= sizeof(data))
		memcpy(&data, (char *)run + run->io.data_offset, run->io.size);
	return (1LL << 56) | ((long long)(run->io.count > 1) << 52) | ((long long)run->io.size << 49) |
	       ((long long)run->io.port << 33) | ((long long)(run->io.direction == KVM_EXIT_IO_OUT) << 32) |
	       data;
}

long long minivmm_restore_dirty(int vm_fd, unsigned int slot, unsigned long long bitmap_address,
				unsigned long long npages, unsigned long long guest_address,
				unsigned long long copy_address, int clear)
{
	unsigned long long *bitmap = (unsigned long long *)bitmap_address;
	char *guest = (char *)guest_address, *copy = (char *)copy_address;
	unsigned long long words = (npages + 63) / 64, first = words, last = 0, pages = 0;
	struct kvm_dirty_log log = { .slot = slot, .dirty_bitmap = bitmap };

	if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
		return -errno;
	for (unsigned long long w = 0; w < words; w++) {
		unsigned long long bits = bitmap[w];
		if (!bits)
			continue;
		if (first == words)
			first = w;
		last = w;
		while (bits) {
			unsigned long long page = w * 64 + __builtin_ctzll(bits);
			memcpy(guest + page * 4096, copy + page * 4096, 4096);
			bits &= bits - 1;
			pages++;
		}
	}
	if (clear && pages) {
		unsigned long long end = (last + 1) * 64 < npages ? (last + 1) * 64 : npages;
		struct kvm_clear_dirty_log c = { .slot = slot, .first_page = first * 64,
						 .num_pages = (unsigned int)(end - first * 64),
						 .dirty_bitmap = bitmap + first };
		if (ioctl(vm_fd, KVM_CLEAR_DIRTY_LOG, &c) < 0)
			return -errno;
	}
	return (long long)pages;
}
"""

RunPacked = Callable[[int, object], int]


def _python_run_packed(fd: int, run_mmap, _unpack_io=struct.Struct("<BBHIQ").unpack_from,
                       _unpack_reason=struct.Struct("<I").unpack_from, _ioctl=fcntl.ioctl,
                       _request=int(Ioctl.KVM_RUN), _io_offset=KvmRun.exit.offset,
                       _reason_offset=KvmRun.exit_reason.offset) -> int:
    """The same contract in Python, reading the kvm_run mapping `run_mmap`."""
    try:
        _ioctl(fd, _request, 0)
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    reason = _unpack_reason(run_mmap, _reason_offset)[0]
    if reason != _EXIT_IO:
        return reason
    direction, size, port, count, offset = _unpack_io(run_mmap, _io_offset)
    data = int.from_bytes(run_mmap[offset:offset + size], "little") if direction == 1 else 0
    return IO_TAG | (count > 1) << 52 | size << 49 | port << 33 | (direction == 1) << 32 | data


def unpack_io(packed: int) -> tuple[int, int, bool, bool, int]:
    """(port, size, is_out, multi_item, data) of a packed I/O exit."""
    return (packed >> 33 & 0xFFFF, packed >> 49 & 7, bool(packed >> 32 & 1), bool(packed >> 52 & 1),
            packed & 0xFFFFFFFF)


def _build():
    """The compiled cffi module, or None (the reason is kept in BUILD_ERROR)."""
    global BUILD_ERROR
    try:
        from cffi import FFI
    except ImportError as exc:
        BUILD_ERROR = f"cffi is not installed: {exc}"
        return None
    digest = hashlib.sha256((_CDEF + _SOURCE + sys.version).encode()).hexdigest()[:16]
    name = f"_minivmm_fastpath_{digest}"
    directory = cache_dir().parent / "cffi"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "w") as lock:      # one builder at a time (pytest-xdist)
            fcntl.flock(lock, fcntl.LOCK_EX)
            built = next(directory.glob(f"{name}*.so"), None)
            if built is None:
                ffi = FFI()
                ffi.cdef(_CDEF)
                ffi.set_source(name, _SOURCE)
                scratch = directory / f".build-{os.getpid()}"
                try:
                    compiled = Path(ffi.compile(tmpdir=str(scratch), verbose=False))
                    built = directory / compiled.name
                    os.replace(compiled, built)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:   # no compiler, no headers, read-only cache: the Python path serves
        BUILD_ERROR = f"{type(exc).__name__}: {exc}"
        return None
    return module


BUILD_ERROR = ""
_module = _build()
COMPILED = _module is not None
_compiled = (_module.lib.minivmm_run_packed, lambda address: _module.ffi.cast("void *", address)) \
    if COMPILED else None


restore_dirty = _module.lib.minivmm_restore_dirty if COMPILED else None
"""`restore_dirty(vm_fd, slot, bitmap_address, npages, guest_address, copy_address, clear)`:
copy the pages of `slot` that its dirty log marks from `copy_address` to
`guest_address` (both host addresses of the slot's first byte), re-protect
them when `clear`; the number of pages or a negative errno. None where the C
code is not built."""


def run_packed_for(run_mmap) -> tuple[RunPacked, object]:
    """(function, its second argument) that enter the guest whose kvm_run mapping is `run_mmap`."""
    if _compiled is not None:
        function, pointer = _compiled
        view = ctypes.c_char.from_buffer(run_mmap)
        address = ctypes.addressof(view)
        del view
        return function, pointer(address)
    return _python_run_packed, run_mmap
