/*
 * Baseline for the fuzz benchmark: a snapshot-fuzz loop in C over /dev/kvm,
 * doing per run what minivmm's harness does.
 *
 * usage: fuzz MEMORY_IMAGE REGS SREGS INPUT INPUT_GPA EXIT_PORT SECONDS
 *
 * MEMORY_IMAGE is the whole guest RAM (at GPA 0) as minivmm set it up for a
 * user-mode guest (page tables, GDT, IDT, TSS, the loaded target), REGS and
 * SREGS the raw struct kvm_regs / kvm_sregs of the vCPU at the entry point
 * (RSI holds the input length). The snapshot is that initial state. Per run:
 *   - copy INPUT to INPUT_GPA (the fuzz input),
 *   - put the snapshot registers back through kvm_run's sync_regs,
 *   - KVM_RUN until the guest writes to EXIT_PORT,
 *   - restore the pages the dirty log reports (KVM_GET_DIRTY_LOG, memcpy from
 *     the snapshot copy, KVM_CLEAR_DIRTY_LOG with manual dirty-log protect).
 * Runs for SECONDS and prints one line:
 *   runs=<n> seconds=<s> rate=<runs per second> dirty_pages=<average per run>
 * Any other exit prints a message to stderr and exits 1.
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
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kvm_util.h"

#define PAGE_SIZE 4096u

int main(int argc, char **argv)
{
	if (argc != 8) {
		fprintf(stderr, "usage: %s MEMORY_IMAGE REGS SREGS INPUT INPUT_GPA EXIT_PORT SECONDS\n", argv[0]);
		return 1;
	}
	size_t memory_size, regs_size, sregs_size, input_size;
	uint8_t *snapshot = read_file(argv[1], &memory_size);
	struct kvm_regs *regs = read_file(argv[2], &regs_size);
	struct kvm_sregs *sregs = read_file(argv[3], &sregs_size);
	uint8_t *input = read_file(argv[4], &input_size);
	uint64_t input_gpa = strtoull(argv[5], NULL, 0);
	unsigned port = (unsigned)strtoul(argv[6], NULL, 0);
	double seconds = atof(argv[7]);
	if (regs_size != sizeof(*regs) || sregs_size != sizeof(*sregs) || memory_size % PAGE_SIZE ||
	    input_gpa + input_size > memory_size) {
		fprintf(stderr, "fuzz: bad state files (regs %zu, sregs %zu, memory %zu)\n", regs_size,
			sregs_size, memory_size);
		return 1;
	}

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int vm = checked_ioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
	struct kvm_enable_cap cap = {
		.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
		.args = {KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE},
	};
	checked_ioctl(vm, KVM_ENABLE_CAP, &cap, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");

	uint8_t *memory = mmap(NULL, memory_size, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (memory == MAP_FAILED)
		die("mmap guest memory");
	memcpy(memory, snapshot, memory_size);
	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.flags = KVM_MEM_LOG_DIRTY_PAGES,
		.guest_phys_addr = 0,
		.memory_size = memory_size,
		.userspace_addr = (uintptr_t)memory,
	};
	checked_ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

	int vcpu = checked_ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	struct {
		struct kvm_cpuid2 header;
		struct kvm_cpuid_entry2 entries[256];
	} cpuid = {.header.nent = 256};
	checked_ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid, "KVM_GET_SUPPORTED_CPUID");
	checked_ioctl(vcpu, KVM_SET_CPUID2, &cpuid, "KVM_SET_CPUID2");
	int run_size = checked_ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	checked_ioctl(vcpu, KVM_SET_SREGS, sregs, "KVM_SET_SREGS");
	run->kvm_valid_regs = KVM_SYNC_X86_REGS;

	size_t pages = memory_size / PAGE_SIZE;
	size_t words = (pages + 63) / 64;
	uint64_t *bitmap = calloc(words, sizeof(uint64_t));
	if (!bitmap)
		die("calloc");
	struct kvm_dirty_log get = {.slot = 0, .dirty_bitmap = bitmap};
	struct kvm_clear_dirty_log clear = {.slot = 0, .first_page = 0, .num_pages = (uint32_t)pages,
					    .dirty_bitmap = bitmap};
	/* Start from a clean log. */
	checked_ioctl(vm, KVM_GET_DIRTY_LOG, &get, "KVM_GET_DIRTY_LOG");
	checked_ioctl(vm, KVM_CLEAR_DIRTY_LOG, &clear, "KVM_CLEAR_DIRTY_LOG");

	uint64_t runs = 0, dirty_total = 0;
	double start = now_s(), deadline = start + seconds, stop;
	for (;;) {
		memcpy(memory + input_gpa, input, input_size);
		run->s.regs.regs = *regs;
		run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
		for (;;) {
			if (ioctl(vcpu, KVM_RUN, 0) < 0) {
				if (errno == EINTR)
					continue;
				die("KVM_RUN");
			}
			if (run->exit_reason == KVM_EXIT_IO && run->io.port == port &&
			    run->io.direction == KVM_EXIT_IO_OUT)
				break;
			fprintf(stderr, "fuzz: unexpected exit %u (port %#x) at rip %#llx\n", run->exit_reason,
				run->exit_reason == KVM_EXIT_IO ? run->io.port : 0,
				(unsigned long long)run->s.regs.regs.rip);
			return 1;
		}
		checked_ioctl(vm, KVM_GET_DIRTY_LOG, &get, "KVM_GET_DIRTY_LOG");
		int any = 0;
		for (size_t w = 0; w < words; w++) {
			uint64_t bits = bitmap[w];
			while (bits) {
				size_t page = w * 64 + (size_t)__builtin_ctzll(bits);
				memcpy(memory + page * PAGE_SIZE, snapshot + page * PAGE_SIZE, PAGE_SIZE);
				bits &= bits - 1;
				dirty_total++;
				any = 1;
			}
		}
		if (any)
			checked_ioctl(vm, KVM_CLEAR_DIRTY_LOG, &clear, "KVM_CLEAR_DIRTY_LOG");
		runs++;
		if ((runs & 7) == 0 && (stop = now_s()) >= deadline)
			break;
	}
	stop = now_s();
	printf("runs=%llu seconds=%.6f rate=%.1f dirty_pages=%.2f\n", (unsigned long long)runs, stop - start,
	       (double)runs / (stop - start), runs ? (double)dirty_total / (double)runs : 0.0);
	return 0;
}
