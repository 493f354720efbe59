/*
 * Baseline for the EPT benchmark: the KVM operations behind minivmm's EPT
 * permissions, driven from C over /dev/kvm with no policy around them.
 *
 * usage: ept toggle|monitor|exec N
 *
 * 2 MiB of guest RAM; the page P = 0x101000 sits in a memslot of its own
 * between two others, as minivmm leaves it after the first protect().
 *   toggle:  N permission toggles of P between r-x and rwx: each is a
 *            KVM_SET_USER_MEMORY_REGION delete plus a create with or without
 *            KVM_MEM_READONLY (api.rst 4.35).
 *   monitor: P is a read-only slot; a 32-bit protected-mode guest stores to P
 *            in a loop; each store exits as KVM_EXIT_MMIO and the data is
 *            copied into RAM (what an emulated monitored write does).
 *   exec:    P has no memslot; the guest calls a `ret` at P in a loop. Each
 *            call is an emulation failure at RIP = P; P is mapped, one
 *            instruction single-stepped (KVM_SET_GUEST_DEBUG SINGLESTEP ->
 *            KVM_EXIT_DEBUG) and P unmapped again (a hidden execute hook).
 * Prints: mode=<m> n=<N> seconds=<s> us_per_op=<us>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "kvm_util.h"

#define MEMORY_SIZE (2u << 20)
#define PAGE 0x101000u
#define CODE 0x100000u

static int vm_fd, vcpu_fd;
static uint8_t *memory;
static struct kvm_run *run;

static void set_slot(uint32_t slot, uint64_t gpa, uint64_t size, uint32_t flags)
{
	struct kvm_userspace_memory_region region = {
		.slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size,
		.userspace_addr = size ? (uintptr_t)(memory + gpa) : 0,
	};
	checked_ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
}

static void protected_mode(void)
{
	struct kvm_sregs sregs;
	checked_ioctl(vcpu_fd, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	struct kvm_segment code = {
		.base = 0, .limit = 0xffffffff, .selector = 0x18, .type = 0xb, .present = 1,
		.dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
	};
	struct kvm_segment data = code;
	data.selector = 0x10;
	data.type = 0x3;
	sregs.cs = code;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.cr0 = 0x33; /* PE, MP, ET, NE */
	sregs.cr4 = 0;
	sregs.efer = 0;
	checked_ioctl(vcpu_fd, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE;
	regs.rsp = MEMORY_SIZE;
	regs.rflags = 2;
	checked_ioctl(vcpu_fd, KVM_SET_REGS, &regs, "KVM_SET_REGS");
}

static unsigned kvm_run_once(void)
{
	while (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
		if (errno != EINTR)
			die("KVM_RUN");
	}
	return run->exit_reason;
}

static void set_debug(uint32_t control)
{
	struct kvm_guest_debug debug;
	memset(&debug, 0, sizeof(debug));
	debug.control = control;
	checked_ioctl(vcpu_fd, KVM_SET_GUEST_DEBUG, &debug, "KVM_SET_GUEST_DEBUG");
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s toggle|monitor|exec N\n", argv[0]);
		return 1;
	}
	const char *mode = argv[1];
	long n = strtol(argv[2], NULL, 0);
	if (n <= 0) {
		fprintf(stderr, "ept: bad count %s\n", argv[2]);
		return 1;
	}
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm_fd < 0)
		die("KVM_CREATE_VM");
	memory = mmap(NULL, MEMORY_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (memory == MAP_FAILED)
		die("mmap");
	/* monitor: 1: mov %eax, (PAGE); inc %eax; jmp 1b */
	static const uint8_t monitor_code[] = {0xa3, 0x00, 0x10, 0x10, 0x00, 0x40, 0xeb, 0xf8};
	/* exec: 1: call PAGE; jmp 1b   and   PAGE: ret */
	static const uint8_t exec_code[] = {0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xeb, 0xf9};
	if (!strcmp(mode, "monitor"))
		memcpy(memory + CODE, monitor_code, sizeof(monitor_code));
	else
		memcpy(memory + CODE, exec_code, sizeof(exec_code));
	memory[PAGE] = 0xc3;

	set_slot(0, 0, PAGE, 0);
	set_slot(1, PAGE + 0x1000, MEMORY_SIZE - PAGE - 0x1000, 0);
	if (strcmp(mode, "exec"))
		set_slot(2, PAGE, 0x1000, strcmp(mode, "monitor") ? 0 : KVM_MEM_READONLY);

	vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
	if (vcpu_fd < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	protected_mode();

	double start = now_s();
	if (!strcmp(mode, "toggle")) {
		for (long i = 0; i < n; i++) {
			set_slot(2, PAGE, 0, 0);
			set_slot(2, PAGE, 0x1000, (i & 1) ? 0 : KVM_MEM_READONLY);
		}
	} else if (!strcmp(mode, "monitor")) {
		for (long i = 0; i < n; i++) {
			unsigned reason = kvm_run_once();
			if (reason != KVM_EXIT_MMIO || !run->mmio.is_write || run->mmio.phys_addr != PAGE) {
				fprintf(stderr, "ept: unexpected exit %u\n", reason);
				return 1;
			}
			memcpy(memory + run->mmio.phys_addr, run->mmio.data, run->mmio.len);
		}
	} else if (!strcmp(mode, "exec")) {
		for (long i = 0; i < n; i++) {
			unsigned reason = kvm_run_once();
			if (reason != KVM_EXIT_INTERNAL_ERROR) {
				fprintf(stderr, "ept: expected an emulation failure, got exit %u\n", reason);
				return 1;
			}
			set_slot(2, PAGE, 0x1000, 0);
			set_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);
			reason = kvm_run_once();
			if (reason != KVM_EXIT_DEBUG) {
				fprintf(stderr, "ept: expected a single-step exit, got exit %u\n", reason);
				return 1;
			}
			set_debug(0);
			set_slot(2, PAGE, 0, 0);
		}
	} else {
		fprintf(stderr, "ept: unknown mode %s\n", mode);
		return 1;
	}
	double seconds = now_s() - start;
	printf("mode=%s n=%ld seconds=%.6f us_per_op=%.3f\n", mode, n, seconds, seconds * 1e6 / (double)n);
	munmap(run, (size_t)run_size);
	munmap(memory, MEMORY_SIZE);
	close(vcpu_fd);
	close(vm_fd);
	close(kvm);
	return 0;
}
