/*
 * Baseline for the exit-rate benchmark: the cheapest possible run loop over
 * /dev/kvm, doing the same per-exit work as a trivial Python port handler.
 *
 * usage: exit_rate GUEST_BINARY PORT
 *
 * The flat real-mode guest is loaded at GPA 0x8000 and started there. Every
 * `out` to PORT adds the written bytes to a checksum and resumes the guest;
 * `hlt` ends the run. Prints one line:
 *   exits=<n> seconds=<s> rate=<exits per second> checksum=<sum>
 * Any other exit, or any error, prints a message to stderr and exits 1.
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

#define GUEST_MEMORY_SIZE (2u << 20)
#define GUEST_LOAD_ADDRESS 0x8000u

static size_t load_guest(const char *path, uint8_t *memory)
{
	FILE *file = fopen(path, "rb");
	if (!file)
		die(path);
	size_t room = GUEST_MEMORY_SIZE - GUEST_LOAD_ADDRESS;
	size_t length = fread(memory + GUEST_LOAD_ADDRESS, 1, room, file);
	if (ferror(file))
		die(path);
	if (!feof(file)) {
		fprintf(stderr, "exit_rate: %s: larger than %zu bytes\n", path, room);
		exit(1);
	}
	fclose(file);
	return length;
}

static void enter_real_mode_at_load_address(int vcpu)
{
	struct kvm_sregs sregs;
	checked_ioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	struct kvm_segment *segments[] = {
		&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss,
	};
	for (size_t i = 0; i < sizeof(segments) / sizeof(segments[0]); i++) {
		segments[i]->selector = 0;
		segments[i]->base = 0;
	}
	checked_ioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");

	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = GUEST_LOAD_ADDRESS;
	regs.rflags = 0x2; /* bit 1 is reserved and always set */
	checked_ioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");
}

static double seconds_between(const struct timespec *start, const struct timespec *end)
{
	return (double)(end->tv_sec - start->tv_sec) + (double)(end->tv_nsec - start->tv_nsec) / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s GUEST_BINARY PORT\n", argv[0]);
		return 1;
	}
	char *end;
	unsigned long port = strtoul(argv[2], &end, 0);
	if (*argv[2] == '\0' || *end != '\0' || port > 0xffff) {
		fprintf(stderr, "exit_rate: bad port %s\n", argv[2]);
		return 1;
	}

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int vm = checked_ioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");

	uint8_t *memory = mmap(NULL, GUEST_MEMORY_SIZE, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (memory == MAP_FAILED)
		die("mmap guest memory");
	load_guest(argv[1], memory);
	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.guest_phys_addr = 0,
		.memory_size = GUEST_MEMORY_SIZE,
		.userspace_addr = (uintptr_t)memory,
	};
	checked_ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

	int vcpu = checked_ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	int run_size = checked_ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	enter_real_mode_at_load_address(vcpu);

	uint64_t exits = 0;
	uint64_t checksum = 0;
	struct timespec start, stop;
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason == KVM_EXIT_HLT)
			break;
		if (run->exit_reason == KVM_EXIT_IO && run->io.port == port &&
		    run->io.direction == KVM_EXIT_IO_OUT) {
			const uint8_t *data = (const uint8_t *)run + run->io.data_offset;
			for (uint32_t i = 0; i < (uint32_t)run->io.size * run->io.count; i++)
				checksum += data[i];
			exits++;
			continue;
		}
		if (run->exit_reason == KVM_EXIT_IO)
			fprintf(stderr, "exit_rate: unexpected I/O exit: %s port %#x size %u at exit %llu\n",
				run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in", run->io.port,
				run->io.size, (unsigned long long)exits);
		else
			fprintf(stderr, "exit_rate: unexpected exit reason %u at exit %llu\n",
				run->exit_reason, (unsigned long long)exits);
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &stop);

	double seconds = seconds_between(&start, &stop);
	printf("exits=%llu seconds=%.6f rate=%.0f checksum=%llu\n", (unsigned long long)exits, seconds,
	       seconds > 0 ? (double)exits / seconds : 0.0, (unsigned long long)checksum);
	return 0;
}
