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

`IoLoop` goes one step further for floods of port I/O: a C loop that keeps
re-entering the guest and calls the Python handlers of each I/O exit itself
(about 1.4 us of interpreter time per exit instead of 2.5 us).

`restore_dirty` does a snapshot restore's memory part the same way: read a
memslot's dirty log, copy each dirty page back from the snapshot copy, and
re-protect the span that held them (manual dirty-log protect).

All are compiled with cffi on first use into minivmm's cache directory (gcc and
the Python headers are needed, as for any cffi module); where that is not
possible, `run_packed` is a Python function with the same contract and the
Python exit loop does what `IoLoop` does. Importing this module builds nothing:
the build runs at the first `run_packed_for`, `IoLoop` or read of `COMPILED`,
`BUILD_ERROR` or `restore_dirty`.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import struct
import sys
import threading
from pathlib import Path
from typing import Callable

from .actions import RESUME, Reply
from .cache import cache_dir
from .kvm import ExitKind, Ioctl, KvmRun

IO_TAG = 1 << 56
_EXIT_IO = int(ExitKind.IO)

# The fuzz cycle's argument block, declared once for cffi and for the C source.
_CYCLE_STRUCT = """
struct minivmm_fuzz_cycle {
    int vm_fd, vcpu_fd;
    unsigned int slot, length_size;
    unsigned long long bitmap, npages, guest, copy;
    unsigned long long run, regs, sregs, events;
    unsigned long long input, input_copy, previous;
    long long length_offset;
    unsigned long long length_address;
    long long pages;
    int stage;
};
"""
_CDEF = _CYCLE_STRUCT + """
long long minivmm_run_packed(int fd, void *run);
long long minivmm_io_loop(int fd, void *run, void *routes, void *info, void *vcpu, void *vmcs,
                          void *pre_entry, void *observers, void *resume, void *out,
                          long long *counters, double *stats);
long long minivmm_restore_dirty(int vm_fd, unsigned int slot, unsigned long long bitmap,
                                unsigned long long npages, unsigned long long guest,
                                unsigned long long copy, int clear);
long long minivmm_fuzz_cycle(struct minivmm_fuzz_cycle *c, const char *data, unsigned long long n);
"""
_SOURCE = _CYCLE_STRUCT + r"""
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define IO_TAG (1LL << 56)
#define LOOP_YIELD (-1000000LL)
enum { LOOP_ACTION = 1, LOOP_ERROR = 2, LOOP_STATE = 3 };

static long long pack_exit(struct kvm_run *run)
{
	unsigned int data = 0;

	if (run->exit_reason != KVM_EXIT_IO)
		return run->exit_reason;
	if (run->io.direction == KVM_EXIT_IO_OUT && run->io.size <= sizeof(data))
		memcpy(&data, (char *)run + run->io.data_offset, run->io.size);
	return IO_TAG | ((long long)(run->io.count > 1) << 52) | ((long long)run->io.size << 49) |
	       ((long long)run->io.port << 33) | ((long long)(run->io.direction == KVM_EXIT_IO_OUT) << 32) |
	       data;
}

long long minivmm_run_packed(int fd, void *run)
{
	if (ioctl(fd, KVM_RUN, 0) < 0)
		return -errno;
	return pack_exit(run);
}

static double monotonic(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static PyObject *s_qualification, *s_length, *s_detail, *s_data, *s_value, *s_vcpu_dirty, *s_vmcs_dirty;

static int truthy_attribute(PyObject *object, PyObject *name)
{
	PyObject *value = PyObject_GetAttr(object, name);
	int truth;

	if (!value)
		return -1;
	truth = PyObject_IsTrue(value);
	Py_DECREF(value);
	return truth;
}

/* Move the pending exception into `out`. */
static void keep_exception(PyObject *out)
{
	PyObject *type, *value, *traceback;

	PyErr_Fetch(&type, &value, &traceback);
	PyErr_NormalizeException(&type, &value, &traceback);
	if (value && traceback)
		PyException_SetTraceback(value, traceback);
	if (!value || PyList_Append(out, value) < 0) {
		PyErr_Clear();
		PyList_Append(out, Py_None);
	}
	Py_XDECREF(type);
	Py_XDECREF(value);
	Py_XDECREF(traceback);
}

/* One I/O exit with the GIL held. 0: handled, enter again; 1: no cached route, Python
 * takes the exit; 2: back to Python with *status set. */
static int handle_io(struct kvm_run *run, long long packed, PyObject **objects, long long *n,
		     double *stats, long long *status)
{
	PyObject *routes = objects[0], *info = objects[1], *vcpu = objects[2], *vmcs = objects[3];
	PyObject *pre_entry = objects[4], *observers = objects[5], *out = objects[7];
	PyObject *resume = PyTuple_GET_ITEM(objects[6], 0), *reply_type = PyTuple_GET_ITEM(objects[6], 1);
	PyObject *key, *route, *site, *chain, *data, *action = NULL, *args[2] = { vcpu, info };
	double began = 0.0;
	int timed, state;

	if (!s_qualification) {
		s_qualification = PyUnicode_InternFromString("qualification");
		s_length = PyUnicode_InternFromString("instruction_length");
		s_detail = PyUnicode_InternFromString("raw_kvm_exit");
		s_data = PyUnicode_InternFromString("data");
		s_value = PyUnicode_InternFromString("value");
		s_vcpu_dirty = PyUnicode_InternFromString("dirty");
		s_vmcs_dirty = PyUnicode_InternFromString("dirty");
		if (!s_qualification || !s_length || !s_detail || !s_data || !s_value || !s_vcpu_dirty || !s_vmcs_dirty)
			goto error;
	}
	if (PyErr_CheckSignals() < 0)     /* Ctrl-C, and the deadline's SIGALRM handler */
		goto error;
	key = PyLong_FromLongLong(packed >> 32);
	if (!key)
		goto error;
	route = PyDict_GetItemWithError(routes, key);
	Py_DECREF(key);
	if (!route) {
		if (PyErr_Occurred())
			goto error;
		return 1;
	}
	if (!PyTuple_Check(route) || PyTuple_GET_SIZE(route) != 3 || !PyTuple_Check(PyTuple_GET_ITEM(route, 1)) ||
	    !PyDict_Check(PyTuple_GET_ITEM(route, 2)))
		return 1;
	key = PyLong_FromUnsignedLongLong(run->s.regs.regs.rip);
	if (!key)
		goto error;
	site = PyDict_GetItemWithError(PyTuple_GET_ITEM(route, 2), key);
	Py_DECREF(key);
	if (!site) {                      /* an instruction not decoded yet: Python decodes it */
		if (PyErr_Occurred())
			goto error;
		return 1;
	}
	if (!PyTuple_Check(site) || PyTuple_GET_SIZE(site) != 2)
		return 1;
	Py_INCREF(route);                 /* a handler may clear the routes */
	data = PyLong_FromUnsignedLong((unsigned long)(packed & 0xFFFFFFFF));
	if (!data || PyObject_SetAttr(info, s_qualification, PyTuple_GET_ITEM(site, 0)) < 0 ||
	    PyObject_SetAttr(info, s_length, PyTuple_GET_ITEM(site, 1)) < 0 ||
	    PyObject_SetAttr(info, s_detail, PyTuple_GET_ITEM(route, 0)) < 0 ||
	    PyObject_SetAttr(info, s_data, data) < 0) {
		Py_XDECREF(data);
		Py_DECREF(route);
		goto error;
	}
	Py_DECREF(data);
	++*n;
	timed = *n < 64 || !(*n & 15);
	if (timed)
		began = monotonic();
	chain = PyTuple_GET_ITEM(route, 1);
	for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(chain); i++) {
		action = PyObject_Vectorcall(PyTuple_GET_ITEM(chain, i), args, 2, NULL);
		if (!action || action != Py_None)
			break;
		Py_DECREF(action);
		action = NULL;
	}
	if (timed) {
		stats[0] += monotonic() - began;
		stats[1] += 1.0;
	}
	Py_DECREF(route);
	if (action == resume || (action && (PyObject *)Py_TYPE(action) == reply_type && !(packed >> 32 & 1))) {
		/* RESUME: an IN reads the handler's info.data; Reply(int): an IN reads the int */
		PyObject *value = NULL;

		if (action != resume) {
			value = PyObject_GetAttr(action, s_value);
			if (!value)
				goto error;
			if (!PyLong_Check(value)) {       /* bytes: Python writes them */
				Py_DECREF(value);
				goto hand_back;
			}
			if (PyObject_SetAttr(info, s_data, value) < 0) {
				Py_DECREF(value);
				goto error;
			}
		}
		Py_DECREF(action);
		action = NULL;
		if (!(packed >> 32 & 1)) {
			unsigned long long bytes;

			if (!value && !(value = PyObject_GetAttr(info, s_data)))
				goto error;
			bytes = PyLong_AsUnsignedLongLongMask(value);
			Py_DECREF(value);
			if (PyErr_Occurred())
				goto error;
			memcpy((char *)run + run->io.data_offset, &bytes, packed >> 49 & 7);
		} else {
			Py_XDECREF(value);
		}
	}
hand_back:
	if (action) {
		int appended = PyList_Append(out, action);

		Py_DECREF(action);
		if (appended < 0)
			goto error;
		*status = LOOP_ACTION;
		return 2;
	}
	if (PyErr_Occurred())
		goto error;
	state = truthy_attribute(vcpu, s_vcpu_dirty);
	if (state == 0)
		state = truthy_attribute(vmcs, s_vmcs_dirty);
	if (state < 0)
		goto error;
	if (state || PyList_GET_SIZE(pre_entry) || PyList_GET_SIZE(observers)) {
		*status = LOOP_STATE;
		return 2;
	}
	return 0;
error:
	keep_exception(out);
	*status = LOOP_ERROR;
	return 2;
}

/* KVM_RUN again and again while each exit is a single-item I/O exit whose route the
 * Python exit loop has cached, calling its handlers here. Returns the first exit it does
 * not take (packed as by minivmm_run_packed, or a negative errno), or LOOP_YIELD with
 * counters[2] saying why. counters: [0] I/O exit number (in/out), [1] entries allowed
 * after the first, -1 for no limit (in/out), [2] status (out). stats: [0] seconds in
 * sampled handlers, [1] samples (accumulated). cffi calls this without the GIL. */
long long minivmm_io_loop(int fd, void *run, void *routes, void *info, void *vcpu, void *vmcs,
			  void *pre_entry, void *observers, void *resume, void *out, long long *counters,
			  double *stats)
{
	PyObject *objects[8] = { routes, info, vcpu, vmcs, pre_entry, observers, resume, out };
	long long n = counters[0], limit = counters[1], status = 0, packed;

	for (int first = 1;; first = 0) {
		PyGILState_STATE gil;
		int handled;

		if (!first) {
			if (limit == 0) {
				status = LOOP_STATE;
				packed = LOOP_YIELD;
				break;
			}
			limit--;
		}
		if (ioctl(fd, KVM_RUN, 0) < 0) {
			packed = -errno;
			break;
		}
		packed = pack_exit(run);
		if (packed < IO_TAG || (packed >> 52 & 1))
			break;
		gil = PyGILState_Ensure();
		handled = handle_io(run, packed, objects, &n, stats, &status);
		PyGILState_Release(gil);
		if (handled == 1)
			break;
		if (handled == 2) {
			packed = LOOP_YIELD;
			break;
		}
	}
	counters[0] = n;
	counters[1] = limit;
	counters[2] = status;
	return packed;
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
	/* Most of a large guest is clean: test 8 words (512 pages) at a time. A word-by-word
	 * loop costs about 3 us per GiB on these hosts, this one about 0.5 us. */
	for (unsigned long long block = 0; block < words; block += 8) {
		const unsigned long long *b = bitmap + block;
		unsigned long long end = block + 8 <= words ? block + 8 : words;

		if (end == block + 8 && !((b[0] | b[1]) | (b[2] | b[3]) | (b[4] | b[5]) | (b[6] | b[7])))
			continue;
		for (unsigned long long w = block; w < end; w++) {
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


/* One fuzz run up to its first exit: what Snapshot.restore + Harness.prepare + one
 * KVM_RUN do for a single-slot guest on a host with sync_regs. A negative errno with
 * c->stage 1 (dirty log) or 2 (KVM_RUN); else the packed exit. The special registers go
 * in only when they differ from the snapshot's (KVM applies sync_regs as regs, sregs,
 * events: the order Snapshot.restore uses). */
long long minivmm_fuzz_cycle(struct minivmm_fuzz_cycle *c, const char *data, unsigned long long n)
{
	struct kvm_run *run = (struct kvm_run *)c->run;
	char *input = (char *)c->input;
	unsigned int dirty = KVM_SYNC_X86_REGS | KVM_SYNC_X86_EVENTS;
	long long pages;

	c->stage = 1;
	pages = minivmm_restore_dirty(c->vm_fd, c->slot, c->bitmap, c->npages, c->guest, c->copy, 1);
	if (pages < 0)
		return pages;
	c->pages = pages;
	memcpy(&run->s.regs.regs, (void *)c->regs, sizeof(struct kvm_regs));
	memcpy(&run->s.regs.events, (void *)c->events, sizeof(struct kvm_vcpu_events));
	if (memcmp(&run->s.regs.sregs, (void *)c->sregs, sizeof(struct kvm_sregs))) {
		memcpy(&run->s.regs.sregs, (void *)c->sregs, sizeof(struct kvm_sregs));
		dirty |= KVM_SYNC_X86_SREGS;
	}
	if (c->previous > n)
		memcpy(input + n, (char *)c->input_copy + n, c->previous - n);
	memcpy(input, data, n);
	c->previous = n;
	if (c->length_offset >= 0)
		*(unsigned long long *)((char *)&run->s.regs.regs + c->length_offset) = n;
	else if (c->length_address)
		memcpy((void *)c->length_address, &n, c->length_size);     /* little-endian */
	run->kvm_dirty_regs = dirty;
	c->stage = 2;
	if (ioctl(c->vcpu_fd, KVM_RUN, 0) < 0)
		return -errno;
	c->stage = 0;
	return pack_exit(run);
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
    """The compiled cffi module, or None (the reason is kept in BUILD_ERROR). A module built
    before is loaded straight from the cache: neither cffi nor a compiler is touched then."""
    global BUILD_ERROR
    # The exit loop calls handlers through the full C API; warnings that hide a missing
    # declaration would otherwise build a module that fails to import.
    options = dict(py_limited_api=False, define_macros=[("_CFFI_NO_LIMITED_API", None)], extra_compile_args=["-O2", "-Werror=implicit-function-declaration",
                                                             "-Werror=int-conversion"])
    digest = hashlib.sha256((_CDEF + _SOURCE + repr(options) + sys.version).encode()).hexdigest()[:16]
    name = f"_minivmm_fastpath_{digest}"
    directory = cache_dir().parent / "cffi"
    try:
        built = _cached(directory, name)
        if built is None:
            try:
                from cffi import FFI
            except ImportError as exc:
                BUILD_ERROR = f"cffi is not installed: {exc}"
                return None
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / ".lock", "w") as lock:      # one builder at a time (pytest-xdist)
                fcntl.flock(lock, fcntl.LOCK_EX)
                built = _cached(directory, name)
                if built is None:
                    ffi = FFI()
                    ffi.cdef(_CDEF)
                    ffi.set_source(name, _SOURCE, **options)
                    scratch = directory / f".build-{os.getpid()}"
                    try:
                        compiled = Path(ffi.compile(tmpdir=str(scratch), verbose=False))
                        built = directory / compiled.name
                        os.replace(compiled, built)
                    finally:
                        import shutil
                        shutil.rmtree(scratch, ignore_errors=True)
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:   # no compiler, no headers, read-only cache: the Python path serves
        BUILD_ERROR = f"{type(exc).__name__}: {exc}"
        return None
    return module


def _cached(directory: Path, name: str) -> Path | None:
    """The built module `name` in `directory`, if there is one (builds land by rename, so a
    file found is complete)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = directory / (name + suffix)
        if path.exists():
            return path
    return None


# Set by `_load` on first use; until then a module attribute read of these goes
# through `__getattr__`, which builds.
BUILD_ERROR: str
"""Why the C code could not be built ("" when it was)."""
COMPILED: bool
"""True when the C code is built and loaded."""
_LAZY = frozenset({"BUILD_ERROR", "COMPILED", "restore_dirty"})
_module = None
_compiled = None
_loaded = False
_load_lock = threading.Lock()


def _load():
    """Build and load the cffi module on the first call; the module, or None (see BUILD_ERROR)."""
    global BUILD_ERROR, COMPILED, restore_dirty, _module, _compiled, _loaded
    if _loaded:
        return _module
    with _load_lock:
        if not _loaded:
            BUILD_ERROR = ""
            module = _build()
            COMPILED = module is not None
            _compiled = (module.lib.minivmm_run_packed, lambda address: module.ffi.cast("void *", address)) \
                if COMPILED else None
            restore_dirty = module.lib.minivmm_restore_dirty if COMPILED else None
            _module = module
            _loaded = True
    return _module


def __getattr__(name: str):
    if name in _LAZY:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


LOOP_YIELD = -1_000_000
"""`IoLoop.enter` came back without an exit to take; `IoLoop.status` says why:"""
LOOP_ACTION, LOOP_ERROR, LOOP_STATE = 1, 2, 3
"""a handler returned an action (in `IoLoop.out`), a handler raised (the exception is in
`out`), or the exit budget ran out or a handler left work for the next entry."""


class IoLoop:
    """The exit loop in C, for the I/O exits whose route the Python exit loop has cached.

    `minivmm_io_loop` enters the guest again and again while each exit is a
    single-item I/O exit with a route in `routes` (`packed >> 32` ->
    `(detail, handlers, sites)`, `sites` mapping the exit's RIP to the decoded
    instruction's `(qualification, instruction length)`), fills
    `info.qualification`, `info.instruction_length`, `info.raw_kvm_exit` and
    `info.data` and calls the handlers with the GIL held, as the Python loop
    does (an IN answered with `RESUME` gets `info.data`, one answered with
    `Reply(int)` that int, here too). It comes back
    at the first other exit or an instruction not decoded yet, at any other
    action, at an exception, and when a handler leaves work for the next entry
    (`vcpu.dirty`, `vmcs.dirty`, a `pre_entry` hook or an observer).
    """

    def __init__(self, routes: dict, info, vcpu, vmcs, pre_entry: list, observers: list) -> None:
        ffi = _load().ffi
        self.objects = (routes, info, vcpu, vmcs, pre_entry, observers)
        self.out: list = []
        self.counters = ffi.new("long long[3]")
        self.stats = ffi.new("double[2]")
        # The C code gets the objects themselves: id() is the PyObject address in CPython,
        # and self.objects keeps them alive as long as the loop.
        self._markers = (RESUME, Reply)           # what the C code answers an IN from itself
        self._arguments = (*(ffi.cast("void *", id(o)) for o in (*self.objects, self._markers, self.out)),
                           self.counters, self.stats)

    def serves(self, *objects) -> bool:
        """True when this loop was made for these (routes, info, vcpu, vmcs, pre_entry, observers)."""
        return all(a is b for a, b in zip(self.objects, objects))

    @property
    def status(self) -> int:
        return self.counters[2]

    def enter(self, fd: int, run_arg, number: int, budget: int) -> tuple[int, int, int]:
        """(result, I/O exit number, budget) after running from I/O exit `number` with
        `budget` entries allowed after the first (-1: no limit)."""
        counters = self.counters
        counters[0], counters[1] = number, budget
        result = _module.lib.minivmm_io_loop(fd, run_arg, *self._arguments)
        return result, counters[0], counters[1]

    def take_stats(self) -> tuple[float, int]:
        """(seconds, samples) of the sampled handler calls since the last call."""
        stats = self.stats
        seconds, samples = stats[0], int(stats[1])
        stats[0] = stats[1] = 0.0
        return seconds, samples


restore_dirty: Callable[..., int] | None
"""`restore_dirty(vm_fd, slot, bitmap_address, npages, guest_address, copy_address, clear)`:
copy the pages of `slot` that its dirty log marks from `copy_address` to
`guest_address` (both host addresses of the slot's first byte), re-protect
them when `clear`; the number of pages or a negative errno. None where the C
code is not built."""


def run_packed_for(run_mmap) -> tuple[RunPacked, object]:
    """(function, its second argument) that enter the guest whose kvm_run mapping is `run_mmap`."""
    _load()
    if _compiled is not None:
        function, pointer = _compiled
        view = ctypes.c_char.from_buffer(run_mmap)
        address = ctypes.addressof(view)
        del view
        return function, pointer(address)
    return _python_run_packed, run_mmap


class FuzzCycle:
    """One fuzz run up to its first exit in one C call (`minivmm_fuzz_cycle`).

    Does what `Snapshot.restore` (memory from the dirty log of a single-slot
    guest, general registers and events through sync_regs), `Harness.prepare`
    (the input, the snapshot's bytes past it up to the previous input's length,
    the length register or the length in memory) and one KVM_RUN do, and
    returns the exit packed as `run_packed` does, or a negative errno (`stage`
    says where: 1 the dirty log, 2 KVM_RUN). Those Python steps
    cost a large part of a short run on the project's hosts (README,
    "Benchmarks"). The harness keeps the Python path for everything this does
    not cover.
    """

    def __init__(self, *, vm_fd: int, vcpu_fd: int, slot: int, bitmap: int, npages: int,
                 guest: int, copy: int, run: int, regs: int, sregs: int, events: int,
                 input: int, input_copy: int, length_offset: int = -1, length_address: int = 0,
                 length_size: int = 8) -> None:
        module = _load()
        if module is None:
            raise RuntimeError(f"the C fast path is not built: {BUILD_ERROR}")
        self._call = module.lib.minivmm_fuzz_cycle
        c = self._c = module.ffi.new("struct minivmm_fuzz_cycle *")
        c.vm_fd, c.vcpu_fd, c.slot, c.length_size = vm_fd, vcpu_fd, slot, length_size
        c.bitmap, c.npages, c.guest, c.copy = bitmap, npages, guest, copy
        c.run, c.regs, c.sregs, c.events = run, regs, sregs, events
        c.input, c.input_copy, c.previous = input, input_copy, 0
        c.length_offset, c.length_address = length_offset, length_address

    def run(self, data: bytes) -> int:
        return self._call(self._c, data, len(data))

    @property
    def stage(self) -> int:
        return self._c.stage

    @property
    def pages(self) -> int:
        """Pages the last call copied back."""
        return self._c.pages

    @property
    def previous(self) -> int:
        """Length of the input the last call placed."""
        return self._c.previous

    @previous.setter
    def previous(self, value: int) -> None:
        self._c.previous = value
